//! The train/test assignment: a pure function of a session's path relative to its source root.
//!
//! The key is the relative path with `/` separators (a Claude Code subagent file
//! `<project>/<session>/subagents/<agent>.jsonl` takes its parent's key
//! `<project>/<session>.jsonl`, so a session and its subagents never straddle the split). The
//! first 8 bytes of SHA-256(key), big-endian, give a number `u` in `[0, 1)`; the session is held
//! out when `u < test_frac`. SHA-256 is the same everywhere; `DefaultHasher` is not.

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
