//! The train/test assignment: a pure function of a session's path relative to its source root.
//!
//! The key is the relative path with `/` separators (a Claude Code subagent file
//! `<project>/<session>/subagents/<agent>.jsonl` takes its parent's key
//! `<project>/<session>.jsonl`, so a session and its subagents never straddle the split). The
//! first 8 bytes of SHA-256(key), big-endian, give a number `u` in `[0, 1)`; the session is held
//! out when `u < test_frac`. SHA-256 is the same everywhere; `DefaultHasher` is not.
//!
//! One guarantee on top ([`SplitPlan`]): when an extraction has at least two sessions (distinct
//! keys) and the rule holds none of them out, the session whose key has the smallest `u` (the
//! one closest to being held out; ties by key) is held out instead, so validation always has a
//! session to replay. Extract warns when it applies the guarantee. The rule is deterministic:
//! the same files give the same split on every machine.

use std::path::{Component, Path};

use sha2::{Digest, Sha256};

use super::{Source, Split};

/// The split key of the session file at `rel` (relative to the source root).
pub fn split_key(source: Source, rel: &Path) -> String {
    let parts: Vec<String> = rel
        .components()
        .filter_map(|c| match c {
            Component::Normal(s) => Some(s.to_string_lossy().into_owned()),
            _ => None,
        })
        .collect();
    let n = parts.len();
    if source == Source::Claude && n >= 3 && parts[n - 2] == "subagents" {
        let mut parent = parts[..n - 2].join("/");
        parent.push_str(".jsonl");
        return parent;
    }
    parts.join("/")
}

/// Where `key` falls in `[0, 1)`.
pub fn split_unit(key: &str) -> f64 {
    let digest = Sha256::digest(key.as_bytes());
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    (u64::from_be_bytes(first) >> 11) as f64 / (1u64 << 53) as f64
}

/// The split of the session with `key` for a test fraction in `(0, 1)`.
pub fn split_of(key: &str, test_frac: f64) -> Split {
    if split_unit(key) < test_frac {
        Split::Test
    } else {
        Split::Train
    }
}

/// The split of every session of one extraction: [`split_of`], plus at least one held-out
/// session when there are at least two.
#[derive(Clone, Debug)]
pub struct SplitPlan {
    test_frac: f64,
    /// The key held out by the guarantee, when the hash rule held out none.
    promoted: Option<String>,
}

impl SplitPlan {
    /// The plan for the sessions with `keys` (repeats are one session).
    pub fn new<'a>(keys: impl IntoIterator<Item = &'a str>, test_frac: f64) -> SplitPlan {
        let mut distinct = 0usize;
        let mut any_test = false;
        let mut closest: Option<(f64, &str)> = None;
        let mut seen = std::collections::BTreeSet::new();
        for key in keys {
            if !seen.insert(key) {
                continue;
            }
            distinct += 1;
            let u = split_unit(key);
            any_test |= u < test_frac;
            if closest.map_or(true, |(cu, ck)| (u, key) < (cu, ck)) {
                closest = Some((u, key));
            }
        }
        let promoted = match closest {
            Some((_, key)) if distinct >= 2 && !any_test => Some(key.to_string()),
            _ => None,
        };
        SplitPlan {
            test_frac,
            promoted,
        }
    }

    /// The split of the session with `key`.
    pub fn split_of(&self, key: &str) -> Split {
        if self.promoted.as_deref() == Some(key) {
            Split::Test
        } else {
            split_of(key, self.test_frac)
        }
    }

    /// The session held out by the guarantee, when the hash rule held out none.
    pub fn promoted(&self) -> Option<&str> {
        self.promoted.as_deref()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subagents_follow_their_parent() {
        let k = |p: &str| split_key(Source::Claude, Path::new(p));
        assert_eq!(k("proj/abc.jsonl"), "proj/abc.jsonl");
        assert_eq!(k("proj/abc/subagents/agent-1.jsonl"), "proj/abc.jsonl");
        assert_eq!(k("./proj/agent-1.jsonl"), "proj/agent-1.jsonl");
        assert_eq!(
            split_key(Source::Codex, Path::new("2026/11/27/rollout-x.jsonl")),
            "2026/11/27/rollout-x.jsonl"
        );
        assert_eq!(
            split_key(Source::Codex, Path::new("a/subagents/b.jsonl")),
            "a/subagents/b.jsonl"
        );
    }

    #[test]
    fn at_least_one_session_is_held_out_when_there_are_two() {
        let keys: Vec<String> = (0..8).map(|i| format!("p/{i}.jsonl")).collect();
        let refs = || keys.iter().map(String::as_str);
        // A fraction so small the hash rule holds none of the eight out.
        let frac = 1e-9;
        assert!(refs().all(|k| split_of(k, frac) == Split::Train));
        let plan = SplitPlan::new(refs(), frac);
        let closest = refs()
            .min_by(|a, b| split_unit(a).total_cmp(&split_unit(b)))
            .unwrap();
        assert_eq!(plan.promoted(), Some(closest));
        let held: Vec<&str> = refs().filter(|k| plan.split_of(k) == Split::Test).collect();
        assert_eq!(held, vec![closest]);
        // One session (even repeated, as subagent files are) is never held out; when the rule
        // holds one out, the plan changes nothing.
        let one = SplitPlan::new(["p/a.jsonl", "p/a.jsonl"], frac);
        assert_eq!(one.promoted(), None);
        let plan = SplitPlan::new(refs(), 0.5);
        assert_eq!(plan.promoted(), None);
        for k in refs() {
            assert_eq!(plan.split_of(k), split_of(k, 0.5));
        }
    }

    #[test]
    fn unit_is_in_range_and_fraction_is_respected() {
        let n = 4000;
        let held = (0..n)
            .filter(|i| {
                let u = split_unit(&format!("proj/{i}.jsonl"));
                assert!((0.0..1.0).contains(&u));
                split_of(&format!("proj/{i}.jsonl"), 0.25) == Split::Test
            })
            .count();
        // A binomial(4000, 0.25) is within 1000 ± 150 with overwhelming probability, and the
        // hash is fixed, so this is deterministic anyway.
        assert!((850..1150).contains(&held), "held out {held} of {n}");
    }
}
