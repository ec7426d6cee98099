//! The routing profile `<model>.gguf.spark.csv`: per-(layer, expert) hotness counts.
//!
//! Owns the file layout, compatible with Luce Spark's: a comment header
//! `# hotness table: n_layer=L n_expert=E n_expert_used=K`, then L rows of E comma-separated
//! counts (non-negative integers: a fraction, a count of 2^64 or more, `n_expert_used=0`, or
//! counts adding up past [`MAX_TOTAL`] are refused with the file and line). spark adds its own
//! comment lines (`# spark profile: version=1`, `# model fingerprint:
//! …`, `# tokens: N`, `# updated: <unix seconds>`), which Spark ignores and which this reader does
//! not require. It writes atomically and tells a fresh profile from a stale one; it never loads a
//! profile for another model silently (callers check [`Profile::freshness`]) and never decides
//! which experts are resident (the caches and [`crate::vram_plan`] do, from its counts).
//!
//! Why this file is over 800 lines: the format (parse, write, freshness, set-aside) and the one
//! lock every writer takes are one contract, and about 150 lines are tests.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use crate::cache::Counts;
use crate::gguf::MoeGeometry;

/// Version of spark's comment lines.
pub const PROFILE_VERSION: u32 = 1;

/// The most the counts of one profile may add up to (2^63). Every sum over a profile then fits
/// in a `u64`, and the counts serve folds in (saturating) have room to grow.
pub const MAX_TOTAL: u64 = 1 << 63;

/// Why a profile could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum ProfileError {
    #[error("read profile {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("write profile {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("parse profile {path} line {line}: {msg}")]
    Parse {
        path: PathBuf,
        line: usize,
        msg: String,
    },
    #[error("parse profile {path}: {msg}")]
    Invalid { path: PathBuf, msg: String },
    /// Profiles that cannot be combined (`spark profile merge` / `diff`).
    #[error("combine profile {path}: {msg}")]
    Combine { path: PathBuf, msg: String },
    #[error("use profile {path}: it was made for model {found}, not {expected} (stale)")]
    Stale {
        path: PathBuf,
        found: String,
        expected: String,
    },
    #[error("lock profile {path}: {msg}")]
    Lock { path: PathBuf, msg: String },
    #[error("add to profile {path}: {msg}; it was left as it is")]
    Merge { path: PathBuf, msg: String },
}

/// A profile's relation to a model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Freshness {
    /// Made for this model.
    Fresh,
    /// Made for another model (its fingerprint).
    Stale(String),
    /// A profile without spark's fingerprint line (for example one written by Luce Spark).
    Unknown,
}

/// A hotness profile.
#[derive(Debug, Clone, PartialEq)]
pub struct Profile {
    pub n_expert_used: u32,
    pub counts: Counts,
    pub fingerprint: Option<String>,
    /// Tokens the counts were gathered over.
    pub tokens: Option<u64>,
    /// Unix seconds of the last update.
    pub updated: Option<u64>,
    /// spark's format version; `None` for a file without spark's lines.
    pub version: Option<u32>,
}

/// The profile path next to a model: `<model>.gguf.spark.csv`.
pub fn path_for(model: &Path) -> PathBuf {
    let mut s = model.as_os_str().to_owned();
    s.push(".spark.csv");
    PathBuf::from(s)
}

/// A count of the file: decimal digits only (no sign, fraction or exponent), below 2^64.
fn parse_count(t: &str) -> Result<u64, &'static str> {
    if t.is_empty() {
        return Err("empty");
    }
    if !t.bytes().all(|b| b.is_ascii_digit()) {
        return Err(if t.parse::<f64>().is_ok() {
            "not a whole number of uses (a count is a non-negative integer)"
        } else {
            "not a number"
        });
    }
    t.parse::<u64>()
        .map_err(|_| "2^64 or more, past what a count can hold")
}

/// Most set-aside copies kept per profile (`.stale`, `.stale.1` … `.stale.999`).
pub const MAX_SET_ASIDE: u32 = 1000;

/// Moves the profile at `path` aside as `<path>.stale`, or `<path>.stale.1`, `.stale.2`, … when
/// that name is taken, and returns the new name. Never replaces an existing file: a name is
/// claimed with a hard link, which fails if it exists (on a filesystem without hard links, a
/// name that exists is skipped before a rename). Fails once [`MAX_SET_ASIDE`] copies exist.
pub fn set_aside(path: &Path) -> std::io::Result<PathBuf> {
    use std::io::ErrorKind;
    for n in 0..MAX_SET_ASIDE {
        let mut s = path.as_os_str().to_owned();
        s.push(".stale");
        if n > 0 {
            s.push(format!(".{n}"));
        }
        let aside = PathBuf::from(s);
        match std::fs::hard_link(path, &aside) {
            Ok(()) => {
                std::fs::remove_file(path)?;
                return Ok(aside);
            }
            Err(e) if e.kind() == ErrorKind::AlreadyExists => continue,
            Err(e) if e.kind() == ErrorKind::NotFound => return Err(e),
            Err(_) => {
                // No hard links here (e.g. FAT): check, then rename.
                if std::fs::symlink_metadata(&aside).is_ok() {
                    continue;
                }
                std::fs::rename(path, &aside)?;
                return Ok(aside);
            }
        }
    }
    Err(std::io::Error::new(
        ErrorKind::AlreadyExists,
        format!("{MAX_SET_ASIDE} set-aside copies exist already; remove some"),
    ))
}

#[cfg(test)]
mod set_aside_tests {
    use super::*;

    fn one(l: usize, e: usize) -> Counts {
        let mut c = Counts::zero(2, 4);
        c.set(l, e, 1);
        c
    }

    #[test]
    fn concurrent_writers_add_their_counts_and_none_is_lost() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("m.gguf.spark.csv");
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let p = p.clone();
                std::thread::spawn(move || {
                    let d = one(t % 2, t);
                    for _ in 0..25 {
                        let add = Addition {
                            delta: &d,
                            delta_tokens: 1,
                            whole: &d,
                            whole_tokens: 1,
                        };
                        add_to(&p, &add, 2, "fp").unwrap();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let got = Profile::read(&p).unwrap();
        assert_eq!(got.counts.total(), 100, "every writer's counts are there");
        assert_eq!(got.counts.get(0, 0), 25);
        assert_eq!(got.counts.get(1, 3), 25);
        assert_eq!(got.tokens, Some(100));
        assert!(lock_path(&p).exists());
    }

    #[test]
    fn a_profile_that_changed_into_something_else_is_never_overwritten() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("m.gguf.spark.csv");
        let d = one(0, 0);
        let add = Addition {
            delta: &d,
            delta_tokens: 1,
            whole: &d,
            whole_tokens: 1,
        };
        for (text, why) in [
            ("not a profile", "cannot be read"),
            (
                "# model fingerprint: other\n# hotness table: n_layer=2 n_expert=4 n_expert_used=2\n1,1,1,1\n1,1,1,1\n",
                "another model",
            ),
            (
                "# hotness table: n_layer=1 n_expert=4 n_expert_used=2\n1,1,1,1\n",
                "1 layers",
            ),
        ] {
            std::fs::write(&p, text).unwrap();
            let e = add_to(&p, &add, 2, "fp").unwrap_err().to_string();
            assert!(e.contains(why) && e.contains("left as it is"), "{e}");
            assert_eq!(std::fs::read_to_string(&p).unwrap(), text);
        }
    }

    #[test]
    fn every_set_aside_copy_is_kept_under_its_own_name() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("m.gguf.spark.csv");
        let mut names = Vec::new();
        for i in 0..4 {
            std::fs::write(&p, format!("profile {i}")).unwrap();
            names.push(set_aside(&p).unwrap());
            assert!(!p.exists());
        }
        let want: Vec<PathBuf> = [".stale", ".stale.1", ".stale.2", ".stale.3"]
            .iter()
            .map(|s| dir.path().join(format!("m.gguf.spark.csv{s}")))
            .collect();
        assert_eq!(names, want);
        for (i, n) in names.iter().enumerate() {
            assert_eq!(std::fs::read_to_string(n).unwrap(), format!("profile {i}"));
        }
        // A gap is filled, nothing is overwritten.
        std::fs::remove_file(&names[1]).unwrap();
        std::fs::write(&p, "profile 4").unwrap();
        assert_eq!(set_aside(&p).unwrap(), names[1]);
        assert_eq!(std::fs::read_to_string(&names[2]).unwrap(), "profile 2");
        assert!(set_aside(&p).is_err(), "nothing to set aside");
    }
}

/// The writer lock of a profile: `flock` on `<profile>.lock`, held by every writer (serve's
/// rewrites, calibrate's publication) for one read-add-write, so no writer replaces counts
/// another one wrote. The kernel releases it whatever ends the holder; the lock file stays
/// (removing it would let two writers lock two different files).
pub struct WriterLock {
    _lock: nix::fcntl::Flock<std::fs::File>,
}

/// The lock file of the profile at `path`.
pub fn lock_path(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(".lock");
    PathBuf::from(s)
}

/// How long a writer waits for another one's read-add-write (which takes milliseconds).
pub const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

impl WriterLock {
    /// Takes the writer lock of the profile at `path`, waiting up to `wait` for another writer.
    pub fn acquire(path: &Path, wait: std::time::Duration) -> Result<WriterLock, ProfileError> {
        use nix::fcntl::{Flock, FlockArg};
        let lpath = lock_path(path);
        let err = |msg: String| ProfileError::Lock {
            path: path.to_path_buf(),
            msg,
        };
        let deadline = std::time::Instant::now() + wait;
        let mut file = crate::atomic_file::open_lock_file(&lpath)
            .map_err(|e| err(format!("open {}: {e}", lpath.display())))?;
        loop {
            match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
                Ok(lock) => return Ok(WriterLock { _lock: lock }),
                Err((f, nix::errno::Errno::EWOULDBLOCK)) => {
                    if std::time::Instant::now() >= deadline {
                        return Err(err(format!(
                            "another writer held {} for {} s",
                            lpath.display(),
                            wait.as_secs_f64()
                        )));
                    }
                    file = f;
                    std::thread::sleep(std::time::Duration::from_millis(5));
                }
                Err((_, e)) => return Err(err(format!("{}: {e}", lpath.display()))),
            }
        }
    }
}

/// What one writer adds to a profile: the counts it gathered since its last write (`delta`),
/// and everything it knows (`whole`: the start profile it loaded plus its own counts), which is
/// written as it is when the file is not there.
pub struct Addition<'a> {
    pub delta: &'a Counts,
    pub delta_tokens: u64,
    pub whole: &'a Counts,
    pub whole_tokens: u64,
}

/// Adds `add.delta` to the profile at `path` under its writer lock: reads what is there now,
/// adds, writes atomically, and returns the profile written. A missing file gets `add.whole`.
/// A file that cannot be parsed, names another model or has another shape is left as it is
/// (an error): it is never overwritten.
pub fn add_to(
    path: &Path,
    add: &Addition<'_>,
    n_expert_used: u32,
    fingerprint: &str,
) -> Result<Profile, ProfileError> {
    let delta = add.delta;
    let _lock = WriterLock::acquire(path, LOCK_WAIT)?;
    let merge_err = |msg: String| ProfileError::Merge {
        path: path.to_path_buf(),
        msg,
    };
    let (mut p, missing) = match Profile::read(path) {
        Ok(p) => {
            if let Freshness::Stale(other) = p.freshness(fingerprint) {
                return Err(merge_err(format!(
                    "it now belongs to another model ({other})"
                )));
            }
            if p.n_layer() != delta.n_layer || p.n_expert() != delta.n_expert {
                return Err(merge_err(format!(
                    "it now has {} layers × {} experts, not {} × {}",
                    p.n_layer(),
                    p.n_expert(),
                    delta.n_layer,
                    delta.n_expert
                )));
            }
            (p, false)
        }
        Err(ProfileError::Read { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
            let mut p = Profile::new(add.whole.clone(), n_expert_used, None);
            p.tokens = Some(add.whole_tokens);
            (p, true)
        }
        Err(e) => return Err(merge_err(format!("it cannot be read ({e})"))),
    };
    if !missing {
        for l in 0..delta.n_layer {
            for e in 0..delta.n_expert {
                let c = p.counts.get(l, e).saturating_add(delta.get(l, e));
                p.counts.set(l, e, c);
            }
        }
        p.tokens = Some(p.tokens.unwrap_or(0).saturating_add(add.delta_tokens));
    }
    p.fingerprint = Some(fingerprint.to_string());
    p.version = Some(PROFILE_VERSION);
    p.updated = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .ok()
        .map(|d| d.as_secs());
    p.write(path)?;
    Ok(p)
}

fn key_value<'a>(s: &'a str, key: &str) -> Option<&'a str> {
    s.split_whitespace()
        .find_map(|kv| kv.strip_prefix(key).and_then(|r| r.strip_prefix('=')))
}

impl Profile {
    pub fn new(counts: Counts, n_expert_used: u32, fingerprint: Option<String>) -> Profile {
        Profile {
            n_expert_used,
            counts,
            fingerprint,
            tokens: None,
            updated: None,
            version: Some(PROFILE_VERSION),
        }
    }

    pub fn n_layer(&self) -> usize {
        self.counts.n_layer
    }

    pub fn n_expert(&self) -> usize {
        self.counts.n_expert
    }

    /// Reads a profile file.
    pub fn read(path: &Path) -> Result<Profile, ProfileError> {
        let text = std::fs::read_to_string(path).map_err(|source| ProfileError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Profile::parse(&text, path)
    }

    /// Parses profile text; `path` only names the file in errors.
    pub fn parse(text: &str, path: &Path) -> Result<Profile, ProfileError> {
        let mut geometry: Option<(usize, usize, u32)> = None;
        let mut fingerprint = None;
        let mut tokens = None;
        let mut updated = None;
        let mut version = None;
        let mut rows: Vec<Vec<u64>> = Vec::new();
        let mut total = 0u64;
        for (i, raw) in text.lines().enumerate() {
            let line_no = i + 1;
            let perr = |msg: String| ProfileError::Parse {
                path: path.to_path_buf(),
                line: line_no,
                msg,
            };
            let line = raw.trim();
            if line.is_empty() {
                continue;
            }
            if let Some(c) = line.strip_prefix('#') {
                let c = c.trim();
                if let Some(rest) = c.strip_prefix("hotness table:") {
                    let num = |k: &str| -> Result<u64, ProfileError> {
                        let v = key_value(rest, k)
                            .ok_or_else(|| perr(format!("hotness table header lacks {k}")))?;
                        parse_count(v).map_err(|why| {
                            perr(format!(
                                "{k}={}: {why}",
                                crate::text::clip(v, crate::text::QUOTE_MAX)
                            ))
                        })
                    };
                    let (l, e, k) = (num("n_layer")?, num("n_expert")?, num("n_expert_used")?);
                    if l == 0 || e == 0 || k == 0 || e > 65536 || l > 65536 || k > e {
                        return Err(perr(format!(
                            "bad geometry n_layer={l} n_expert={e} n_expert_used={k} \
                             (each at least 1, n_expert_used at most n_expert)"
                        )));
                    }
                    geometry = Some((l as usize, e as usize, k as u32));
                } else if let Some(rest) = c.strip_prefix("spark profile:") {
                    version = Some(
                        key_value(rest, "version")
                            .and_then(|v| v.parse().ok())
                            .ok_or_else(|| perr("bad spark profile version line".into()))?,
                    );
                } else if let Some(rest) = c.strip_prefix("model fingerprint:") {
                    fingerprint = Some(rest.trim().to_string()).filter(|s| !s.is_empty());
                } else if let Some(rest) = c.strip_prefix("tokens:") {
                    tokens = Some(
                        rest.trim()
                            .parse()
                            .map_err(|_| perr("bad tokens line".into()))?,
                    );
                } else if let Some(rest) = c.strip_prefix("updated:") {
                    updated = Some(
                        rest.trim()
                            .parse()
                            .map_err(|_| perr("bad updated line".into()))?,
                    );
                }
                continue;
            }
            let Some((_, n_expert, _)) = geometry else {
                return Err(perr("counts before the hotness table header".into()));
            };
            let row = line
                .split(',')
                .enumerate()
                .map(|(e, t)| {
                    let t = t.trim();
                    parse_count(t).map_err(|why| {
                        perr(format!(
                            "bad count {} {:?}: {why}",
                            e + 1,
                            crate::text::clip(t, crate::text::QUOTE_MAX)
                        ))
                    })
                })
                .collect::<Result<Vec<u64>, ProfileError>>()?;
            if row.len() != n_expert {
                return Err(perr(format!(
                    "{} counts in a row, expected n_expert={n_expert}",
                    row.len()
                )));
            }
            // Sums over a profile (per layer, in total) must not overflow anywhere downstream.
            total = row
                .iter()
                .try_fold(total, |t, &c| t.checked_add(c).filter(|&t| t <= MAX_TOTAL))
                .ok_or_else(|| {
                    perr(format!(
                        "the counts add up past {MAX_TOTAL} (2^63), the most a profile may hold"
                    ))
                })?;
            rows.push(row);
        }
        let Some((n_layer, n_expert, k)) = geometry else {
            return Err(ProfileError::Invalid {
                path: path.to_path_buf(),
                msg: "no \"# hotness table:\" header".into(),
            });
        };
        if rows.len() != n_layer {
            return Err(ProfileError::Invalid {
                path: path.to_path_buf(),
                msg: format!("{} rows, expected n_layer={n_layer}", rows.len()),
            });
        }
        let mut counts = Counts::zero(n_layer, n_expert);
        for (l, row) in rows.iter().enumerate() {
            for (e, &c) in row.iter().enumerate() {
                counts.set(l, e, c);
            }
        }
        Ok(Profile {
            n_expert_used: k,
            counts,
            fingerprint,
            tokens,
            updated,
            version,
        })
    }

    /// The file text.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "# hotness table: n_layer={} n_expert={} n_expert_used={}",
            self.n_layer(),
            self.n_expert(),
            self.n_expert_used
        );
        let _ = writeln!(out, "# spark profile: version={PROFILE_VERSION}");
        if let Some(fp) = &self.fingerprint {
            let _ = writeln!(out, "# model fingerprint: {fp}");
        }
        if let Some(t) = self.tokens {
            let _ = writeln!(out, "# tokens: {t}");
        }
        if let Some(u) = self.updated {
            let _ = writeln!(out, "# updated: {u}");
        }
        for l in 0..self.n_layer() {
            for (e, c) in self.counts.layer(l).iter().enumerate() {
                if e > 0 {
                    out.push(',');
                }
                let _ = write!(out, "{c}");
            }
            out.push('\n');
        }
        out
    }

    /// Writes the profile atomically (temporary file, fsync, rename), readable by all as before
    /// (counts per expert, no session text).
    pub fn write(&self, path: &Path) -> Result<(), ProfileError> {
        crate::atomic_file::write_atomic_with(
            path,
            self.render().as_bytes(),
            crate::atomic_file::Mode::Public,
        )
        .map_err(|source| ProfileError::Write {
            path: path.to_path_buf(),
            source,
        })
    }

    /// Whether this profile was made for the model with fingerprint `fingerprint`.
    pub fn freshness(&self, fingerprint: &str) -> Freshness {
        match &self.fingerprint {
            None => Freshness::Unknown,
            Some(f) if f == fingerprint => Freshness::Fresh,
            Some(f) => Freshness::Stale(f.clone()),
        }
    }

    /// True only for a profile that names exactly this model.
    pub fn is_fresh_for(&self, fingerprint: &str) -> bool {
        self.freshness(fingerprint) == Freshness::Fresh
    }

    /// `Ok` unless the profile names another model.
    pub fn check_fresh(&self, fingerprint: &str, path: &Path) -> Result<(), ProfileError> {
        match self.freshness(fingerprint) {
            Freshness::Stale(found) => Err(ProfileError::Stale {
                path: path.to_path_buf(),
                found,
                expected: fingerprint.to_string(),
            }),
            _ => Ok(()),
        }
    }

    /// Reads the profile at `path` for `geometry`'s model, as `spark serve --spark` starts, and
    /// says what it found: `new` (no file), `fresh`, `unknown` (no fingerprint, same shape) or
    /// `stale` or `damaged`. A profile of another model is kept as `<path>.stale` (`.stale.1`,
    /// … when taken: never overwritten) and ignored, with a warning; so is one that cannot be
    /// parsed (a count out of range, a fraction, `n_expert_used=0`…): its counts must not seed
    /// the shadow cache, and serving goes on. One that cannot be read at all is an error (exit
    /// 2). Explicit inputs (`profile show`, `validate`) stay errors: they do not come here.
    pub fn load_for(
        path: &Path,
        geometry: &MoeGeometry,
    ) -> Result<(Option<Profile>, String), ProfileError> {
        let fingerprint = geometry.fingerprint.to_string();
        if !path.exists() {
            return Ok((None, "new".into()));
        }
        let set_aside = |why: &str| match set_aside(path) {
            Ok(stale) => tracing::warn!(
                "profile {} {why}; kept as {} and starting fresh",
                path.display(),
                stale.display()
            ),
            Err(e) => tracing::warn!(
                "profile {} {why}; could not move it aside ({e}); starting fresh",
                path.display()
            ),
        };
        Ok(match Profile::read(path) {
            // serve's own profile, damaged (a bad count, a cut row): set aside like a stale
            // one, so serving goes on and learns afresh. A file that cannot be read at all
            // stays an error (it could not be replaced either).
            Err(e @ (ProfileError::Parse { .. } | ProfileError::Invalid { .. })) => {
                set_aside(&format!("cannot be used ({e})"));
                (None, "damaged".into())
            }
            Err(e) => return Err(e),
            Ok(p) => match p.freshness(&fingerprint) {
                Freshness::Fresh
                    if p.n_layer() == geometry.n_layer as usize
                        && p.n_expert() == geometry.n_expert as usize =>
                {
                    tracing::info!(
                        "loaded profile {} ({} tokens)",
                        path.display(),
                        p.tokens.unwrap_or(0)
                    );
                    (Some(p), "fresh".into())
                }
                Freshness::Unknown
                    if p.n_layer() == geometry.n_layer as usize
                        && p.n_expert() == geometry.n_expert as usize =>
                {
                    tracing::warn!("profile {} has no model fingerprint; its shape matches, so it is used and will be stamped", path.display());
                    (Some(p), "unknown".into())
                }
                Freshness::Stale(other) => {
                    set_aside(&format!("belongs to another model ({other})"));
                    (None, "stale".into())
                }
                _ => {
                    set_aside("does not match the model's shape");
                    (None, "stale".into())
                }
            },
        })
    }

    /// The summary `spark profile show` prints.
    pub fn summary(&self, path: &Path) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "profile      {}", path.display());
        let _ = writeln!(
            out,
            "geometry     {} layers, {} experts, k={}",
            self.n_layer(),
            self.n_expert(),
            self.n_expert_used
        );
        let _ = writeln!(
            out,
            "spark lines  {}",
            match self.version {
                Some(v) => format!("version {v}"),
                None => "none (a Luce Spark file)".into(),
            }
        );
        let _ = writeln!(
            out,
            "fingerprint  {}",
            self.fingerprint.as_deref().unwrap_or("(none)")
        );
        let _ = writeln!(
            out,
            "tokens       {}",
            self.tokens.map_or("(unknown)".into(), |t| t.to_string())
        );
        let _ = writeln!(
            out,
            "updated      {}",
            self.updated
                .map_or("(unknown)".into(), |t| format!("{t} (unix)"))
        );
        let _ = writeln!(out, "layer  total  top-k share  experts for 50% / 90%");
        let k = self.n_expert_used.max(1) as usize;
        for l in 0..self.n_layer() {
            let mut row = self.counts.layer(l).to_vec();
            row.sort_unstable_by(|a, b| b.cmp(a));
            let total: u64 = row.iter().sum();
            let top: u64 = row.iter().take(k).sum();
            let reach = |frac: f64| {
                let mut acc = 0;
                for (i, c) in row.iter().enumerate() {
                    acc += c;
                    if acc as f64 >= frac * total as f64 {
                        return i + 1;
                    }
                }
                row.len()
            };
            let _ = writeln!(
                out,
                "{l:>5}  {total:>5}  {:>10.1}%  {:>4} / {}",
                100.0 * top as f64 / total.max(1) as f64,
                reach(0.5),
                reach(0.9)
            );
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LUCE: &str = "# hotness table: n_layer=2 n_expert=4 n_expert_used=2\n5,0,3,1\n0,7,2,2\n";

    #[test]
    fn reads_a_luce_spark_file() {
        let p = Profile::parse(LUCE, Path::new("m.gguf.spark.csv")).unwrap();
        assert_eq!((p.n_layer(), p.n_expert(), p.n_expert_used), (2, 4, 2));
        assert_eq!(p.counts.layer(1), &[0, 7, 2, 2]);
        assert_eq!(p.version, None);
        assert_eq!(p.freshness("gguf-1-ab"), Freshness::Unknown);
        assert!(!p.is_fresh_for("gguf-1-ab"));
    }

    #[test]
    fn round_trips_with_spark_lines_and_detects_stale() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.gguf.spark.csv");
        let mut p = Profile::parse(LUCE, &path).unwrap();
        p.fingerprint = Some("gguf-10-aa".into());
        p.tokens = Some(42);
        p.updated = Some(1_700_000_000);
        p.version = Some(PROFILE_VERSION);
        p.write(&path).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.starts_with("# hotness table: n_layer=2 n_expert=4 n_expert_used=2\n"));
        let back = Profile::read(&path).unwrap();
        assert_eq!(back, p);
        assert!(back.is_fresh_for("gguf-10-aa"));
        assert_eq!(
            back.freshness("gguf-11-bb"),
            Freshness::Stale("gguf-10-aa".into())
        );
        let e = back
            .check_fresh("gguf-11-bb", &path)
            .unwrap_err()
            .to_string();
        assert!(e.contains("stale"), "{e}");
    }

    #[test]
    fn malformed_profiles_are_errors() {
        for (text, needle) in [
            ("1,2\n", "before the hotness table"),
            (
                "# hotness table: n_layer=1 n_expert=3 n_expert_used=1\n1,2\n",
                "line 2",
            ),
            (
                "# hotness table: n_layer=2 n_expert=2 n_expert_used=1\n1,2\n",
                "1 rows",
            ),
            (
                "# hotness table: n_layer=1 n_expert=2\n1,2\n",
                "n_expert_used",
            ),
            (
                "# hotness table: n_layer=1 n_expert=2 n_expert_used=1\n1,x\n",
                "bad count",
            ),
            ("", "no \"# hotness table:\" header"),
        ] {
            let e = Profile::parse(text, Path::new("p.csv"))
                .unwrap_err()
                .to_string();
            assert!(e.contains(needle), "{e}");
            assert!(e.contains("p.csv"), "{e}");
        }
    }

    #[test]
    fn out_of_range_counts_are_refused_with_the_file_and_line() {
        const H: &str = "# hotness table: n_layer=2 n_expert=2 n_expert_used=1\n";
        for (text, line, needle) in [
            // 2^64: past u64 (the f64 fallback once saturated it to u64::MAX).
            (
                format!("{H}1,2\n18446744073709551616,0\n"),
                3,
                "2^64 or more",
            ),
            (
                format!("{H}99999999999999999999999,0\n1,1\n"),
                2,
                "2^64 or more",
            ),
            // u64::MAX fits a count, but no profile's counts may add up past 2^63.
            (
                format!("{H}18446744073709551615,0\n1,1\n"),
                2,
                "add up past",
            ),
            (format!("{H}{0},0\n{0},1\n", 1u64 << 62), 3, "add up past"),
            (format!("{H}1.5,2\n1,1\n"), 2, "not a whole number"),
            (format!("{H}1,2\n1,2.0\n"), 3, "not a whole number"),
            (format!("{H}1,2\n1e3,2\n"), 3, "not a whole number"),
            (format!("{H}-1,2\n1,1\n"), 2, "not a whole number"),
            (format!("{H}+1,2\n1,1\n"), 2, "not a whole number"),
            (format!("{H}1,,\n1,1\n"), 2, "empty"),
            (format!("{H}NaN,1\n1,1\n"), 2, "not a whole number"),
            (format!("{H}0x10,1\n1,1\n"), 2, "not a number"),
            (
                "# hotness table: n_layer=1 n_expert=2 n_expert_used=0\n1,2\n".to_string(),
                1,
                "n_expert_used=0",
            ),
            (
                "\n# hotness table: n_layer=1 n_expert=2 n_expert_used=1.5\n1,2\n".to_string(),
                2,
                "n_expert_used=1.5: not a whole number",
            ),
            (
                "# hotness table: n_layer=18446744073709551616 n_expert=2 n_expert_used=1\n"
                    .to_string(),
                1,
                "n_layer=18446744073709551616: 2^64 or more",
            ),
        ] {
            let e = Profile::parse(&text, Path::new("/p/m.spark.csv"))
                .unwrap_err()
                .to_string();
            assert!(
                e.starts_with(&format!("parse profile /p/m.spark.csv line {line}: ")),
                "{text:?}: {e}"
            );
            assert!(e.contains(needle), "{text:?}: {e}");
            assert!(!e.contains('\n'), "one line: {e}");
        }
        // The edges that stay valid: zero counts, a total of exactly 2^63.
        let ok = format!("{H}0,0\n{},0\n", 1u64 << 63);
        let p = Profile::parse(&ok, Path::new("p.csv")).unwrap();
        assert_eq!(p.counts.total(), MAX_TOTAL);
        assert_eq!(p.counts.layer(1), &[1u64 << 63, 0]);
    }

    #[test]
    fn path_sits_next_to_the_model() {
        assert_eq!(
            path_for(Path::new("/m/qwen.gguf")),
            PathBuf::from("/m/qwen.gguf.spark.csv")
        );
    }
}
