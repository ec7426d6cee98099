//! `spark sessions extract`: walk the source roots, read every session, write the corpus.

use std::fs::{self, File};
use std::io::BufReader;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::chunk::Chunker;
use super::corpus::{Chunk, CorpusWriter, Manifest};
use super::message::{Parsed, Skipped, SourceStats};
use super::reader::{Line, LineReader};
use super::split::{split_key, SplitPlan};
use super::{claude, codex, SessionsError, Source};

/// One source root to read.
#[derive(Clone, Debug)]
pub struct SourceRoot {
    pub source: Source,
    pub root: PathBuf,
    /// Given on the command line: a missing directory is an error, not zero sessions.
    pub explicit: bool,
}

/// Resolved settings of one extraction.
#[derive(Clone, Debug)]
pub struct ExtractConfig {
    pub roots: Vec<SourceRoot>,
    pub out: PathBuf,
    pub test_frac: f64,
    pub chunk_chars: usize,
    pub max_line_bytes: usize,
    /// Replace an existing corpus at `out`.
    pub force: bool,
    /// Print a progress line to stderr every few seconds on long runs.
    pub progress: bool,
}

/// Reads the sessions under `cfg.roots` and writes the corpus to `cfg.out`.
pub fn extract(cfg: &ExtractConfig) -> Result<Manifest, SessionsError> {
    if !(cfg.test_frac > 0.0 && cfg.test_frac < 1.0) {
        return Err(SessionsError::TestFrac(cfg.test_frac));
    }
    if cfg.chunk_chars == 0 {
        return Err(SessionsError::ChunkChars);
    }
    if cfg.max_line_bytes == 0 {
        return Err(SessionsError::MaxLineBytes);
    }
    let mut found = Vec::new();
    for r in &cfg.roots {
        let exists = r.root.is_dir();
        if !exists && r.explicit {
            let flag = match r.source {
                Source::Claude => "--claude",
                Source::Codex => "--codex",
            };
            return Err(SessionsError::MissingDir {
                flag,
                path: r.root.clone(),
            });
        }
        let mut files = Vec::new();
        let mut unreadable_dirs = 0;
        if exists {
            walk(
                &r.root,
                Path::new(""),
                r.source,
                &mut files,
                &mut unreadable_dirs,
            )?;
            // By `/`-joined string, so a session sorts before its own subagent files.
            files.sort_by_cached_key(|p| (rel_string(p), p.clone()));
        }
        found.push((r, exists, files, unreadable_dirs));
    }
    let plan = split_plan(cfg, &found);
    let mut writer = CorpusWriter::create(&cfg.out, cfg.force)?;
    let total: usize = found.iter().map(|(_, _, f, _)| f.len()).sum();
    let mut progress = Progress::new(cfg.progress, total);
    let mut sources = Vec::new();
    let mut buf = Vec::new();
    for (r, exists, files, unreadable_dirs) in found {
        let mut stats = SourceStats {
            source: r.source,
            root: r.root.display().to_string(),
            found: exists,
            sessions: 0,
            empty_sessions: 0,
            unreadable_sessions: 0,
            unreadable_dirs,
            bytes: 0,
            lines: 0,
            messages: 0,
            skipped: Skipped::default(),
        };
        for rel in files {
            stats.sessions += 1;
            let chunks = read_session(cfg, &plan, r, &rel, &mut writer, &mut stats, &mut buf)?;
            if chunks == 0 {
                stats.empty_sessions += 1;
            }
            progress.tick(stats.bytes);
        }
        progress.done_source(stats.bytes);
        sources.push(stats);
    }
    writer.commit(cfg.test_frac, cfg.chunk_chars, cfg.max_line_bytes, sources)
}

/// The split of every session found; warns when no session would have been held out.
fn split_plan(cfg: &ExtractConfig, found: &[(&SourceRoot, bool, Vec<PathBuf>, u64)]) -> SplitPlan {
    let keys: Vec<String> = found
        .iter()
        .flat_map(|(r, _, files, _)| files.iter().map(|rel| split_key(r.source, rel)))
        .collect();
    let plan = SplitPlan::new(keys.iter().map(String::as_str), cfg.test_frac);
    if let Some(key) = plan.promoted() {
        tracing::warn!(
            "--test-frac {} held out none of the sessions; holding out {key} (the closest to the fraction) so validation has one",
            cfg.test_frac
        );
    }
    plan
}

/// Reads one session file into the writer; returns how many chunks it gave. Only a write
/// failure is an error; a file that cannot be read is counted as unreadable.
fn read_session(
    cfg: &ExtractConfig,
    plan: &SplitPlan,
    r: &SourceRoot,
    rel: &Path,
    writer: &mut CorpusWriter,
    stats: &mut SourceStats,
    buf: &mut Vec<u8>,
) -> Result<u32, SessionsError> {
    let path = r.root.join(rel);
    let key = split_key(r.source, rel);
    let split = plan.split_of(&key);
    let session = format!("{}:{}", r.source, rel_string(rel));
    let file = match File::open(&path) {
        Ok(f) => f,
        Err(_) => {
            stats.unreadable_sessions += 1;
            return Ok(0);
        }
    };
    let mut lines = LineReader::new(BufReader::with_capacity(64 << 10, file), cfg.max_line_bytes);
    let mut chunker = Chunker::new(cfg.chunk_chars);
    let mut emit = |chunk: u32, text: &str| {
        writer.write(&Chunk {
            session: session.clone(),
            source: r.source,
            split,
            chunk,
            text: text.to_string(),
        })
    };
    loop {
        let line = match lines.next_line(buf) {
            Ok(Some(l)) => l,
            Ok(None) => break,
            Err(_) => {
                stats.unreadable_sessions += 1;
                break;
            }
        };
        stats.lines += 1;
        match line {
            Line::TooLong(n) => {
                stats.bytes += n + 1;
                stats.skipped.too_long += 1;
                continue;
            }
            Line::Fits => stats.bytes += buf.len() as u64 + 1,
        }
        let Ok(text) = std::str::from_utf8(buf) else {
            stats.skipped.non_utf8 += 1;
            continue;
        };
        if text.trim().is_empty() {
            stats.skipped.blank += 1;
            continue;
        }
        let parsed = match r.source {
            Source::Claude => claude::parse_line(text),
            Source::Codex => codex::parse_line(text),
        };
        match parsed {
            Parsed::Message(m) => {
                stats.messages += 1;
                chunker.push(&m, &mut emit)?;
            }
            Parsed::Skip(reason) => stats.skipped.count(reason),
        }
    }
    chunker.finish(&mut emit)
}

/// The relative path with `/` separators (the session id after the source prefix).
fn rel_string(rel: &Path) -> String {
    rel.components()
        .map(|c| c.as_os_str().to_string_lossy())
        .collect::<Vec<_>>()
        .join("/")
}

/// Collects session files under `dir` (paths relative to the root), skipping hidden entries
/// and not following symlinks. A subdirectory that cannot be listed (or fails mid-listing) is
/// skipped with one warning and counted in `unreadable`; only an unreadable root is an error.
fn walk(
    root: &Path,
    rel: &Path,
    source: Source,
    out: &mut Vec<PathBuf>,
    unreadable: &mut u64,
) -> Result<(), SessionsError> {
    let dir = root.join(rel);
    let skip = |e: std::io::Error, unreadable: &mut u64| {
        if rel.as_os_str().is_empty() {
            return Err(SessionsError::io("read", &dir, e));
        }
        tracing::warn!("skipped directory {}: {e}", dir.display());
        *unreadable += 1;
        Ok(())
    };
    let entries = match fs::read_dir(&dir) {
        Ok(entries) => entries,
        Err(e) => return skip(e, unreadable),
    };
    for entry in entries {
        let entry = match entry {
            Ok(entry) => entry,
            // What was listed before stays; the rest of this directory is skipped.
            Err(e) => return skip(e, unreadable),
        };
        let name = entry.file_name();
        let name_str = name.to_string_lossy();
        if name_str.starts_with('.') {
            continue;
        }
        let Ok(ft) = entry.file_type() else { continue };
        let child = rel.join(&name);
        if ft.is_dir() {
            walk(root, &child, source, out, unreadable)?;
        } else if ft.is_file() && is_session_file(source, &name_str) {
            out.push(child);
        }
    }
    Ok(())
}

fn is_session_file(source: Source, name: &str) -> bool {
    name.ends_with(".jsonl")
        && match source {
            Source::Claude => true,
            Source::Codex => name.starts_with("rollout-"),
        }
}

struct Progress {
    enabled: bool,
    start: Instant,
    last: Instant,
    total: usize,
    done: usize,
    bytes_before: u64,
}

impl Progress {
    const EVERY: Duration = Duration::from_secs(2);

    fn new(enabled: bool, total: usize) -> Progress {
        let now = Instant::now();
        Progress {
            enabled,
            start: now,
            last: now,
            total,
            done: 0,
            bytes_before: 0,
        }
    }

    fn tick(&mut self, source_bytes: u64) {
        self.done += 1;
        if self.enabled && self.last.elapsed() >= Self::EVERY {
            self.last = Instant::now();
            let mib = (self.bytes_before + source_bytes) as f64 / (1 << 20) as f64;
            tracing::info!(
                target: crate::progress::TARGET,
                "extract: {}/{} sessions, {mib:.1} MiB read, {:.0}s",
                self.done,
                self.total,
                self.start.elapsed().as_secs_f64()
            );
        }
    }

    fn done_source(&mut self, source_bytes: u64) {
        self.bytes_before += source_bytes;
    }
}
