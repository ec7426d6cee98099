//! The corpus directory: its format, its atomic writer and its reader.
//!
//! ```text
//! CORPUS/
//!   manifest.json       format "spark-corpus", version, counts, test fraction, chunk size, files
//!   train-000.jsonl     one chunk per line: {"session","source","split","chunk","text"}
//!   test-000.jsonl      (a split's file rolls over to -001 … past 64 MiB)
//! ```
//!
//! Chunks appear in a fixed order: sessions sorted by source then relative path, each session's
//! chunks in order. The manifest's per-file chunk counts let a reader detect a truncated file.

use std::fs::{self, File};
use std::io::{BufRead, BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use super::message::SourceStats;
use super::{SessionsError, Source, Split};

/// `manifest.json`'s `format` field.
pub const CORPUS_FORMAT: &str = "spark-corpus";
/// The corpus layout version this build writes and reads.
pub const CORPUS_VERSION: u32 = 1;
const MANIFEST: &str = "manifest.json";
const SHARD_BYTES: u64 = 64 << 20;

/// One line of a chunk file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Chunk {
    /// `<source>:<path relative to the source root>`.
    pub session: String,
    pub source: Source,
    pub split: Split,
    /// Index of this chunk within its session, from 0.
    pub chunk: u32,
    pub text: String,
}

/// Totals of one split.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SplitCounts {
    /// Sessions with at least one chunk.
    pub sessions: u64,
    pub chunks: u64,
    /// Characters (Unicode scalar values) of all chunk texts.
    pub chars: u64,
}

/// One chunk file of the corpus.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    pub name: String,
    pub split: Split,
    pub chunks: u64,
}

/// `manifest.json`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Manifest {
    pub format: String,
    pub version: u32,
    /// Creation time, RFC 3339 UTC.
    pub created: String,
    pub created_unix: u64,
    pub test_frac: f64,
    pub chunk_chars: usize,
    pub max_line_bytes: usize,
    /// What was read from each source root.
    pub sources: Vec<SourceStats>,
    pub train: SplitCounts,
    pub test: SplitCounts,
    pub files: Vec<FileEntry>,
}

impl Manifest {
    pub fn counts(&self, split: Split) -> &SplitCounts {
        match split {
            Split::Train => &self.train,
            Split::Test => &self.test,
        }
    }
}

/// What is at an output path before a run writes there.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum OutState {
    Absent,
    EmptyDir,
    Corpus,
}

/// Refuses an output path that is a non-empty non-corpus directory, a file, or a corpus without
/// `force`; says whether an existing corpus must be replaced.
pub(crate) fn check_corpus_out(out: &Path, force: bool) -> Result<OutState, SessionsError> {
    let state = out_state(out)?;
    match state {
        Some(s @ (OutState::Absent | OutState::EmptyDir)) => Ok(s),
        Some(OutState::Corpus) if force => Ok(OutState::Corpus),
        Some(OutState::Corpus) => Err(SessionsError::CorpusExists { path: out.into() }),
        None => Err(SessionsError::NotACorpusOut { path: out.into() }),
    }
}

/// `None`: something that is neither absent, an empty directory nor a corpus.
pub(crate) fn out_state(out: &Path) -> Result<Option<OutState>, SessionsError> {
    let meta = match fs::symlink_metadata(out) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Some(OutState::Absent)),
        Err(e) => return Err(SessionsError::io("inspect", out, e)),
    };
    if !meta.is_dir() {
        return Ok(None);
    }
    let mut entries = fs::read_dir(out).map_err(|e| SessionsError::io("inspect", out, e))?;
    if entries.next().is_none() {
        return Ok(Some(OutState::EmptyDir));
    }
    let is_corpus = fs::read(out.join(MANIFEST))
        .ok()
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
        .is_some_and(|v| v.get("format").and_then(|f| f.as_str()) == Some(CORPUS_FORMAT));
    Ok(is_corpus.then_some(OutState::Corpus))
}

/// A directory built next to its target and renamed into place on [`StagingDir::commit`];
/// dropped uncommitted, it is removed.
pub(crate) struct StagingDir {
    tmp: PathBuf,
    target: PathBuf,
    committed: bool,
}

impl StagingDir {
    pub fn new(target: &Path) -> Result<StagingDir, SessionsError> {
        let name = target
            .file_name()
            .ok_or_else(|| SessionsError::NotACorpusOut {
                path: target.into(),
            })?
            .to_string_lossy()
            .into_owned();
        let parent = match target.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        fs::create_dir_all(&parent).map_err(|e| SessionsError::io("create", &parent, e))?;
        remove_stale(&parent, &name);
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let tmp = parent.join(format!(".{name}.spark-tmp-{}-{nanos}", std::process::id()));
        // Owner only: the corpus holds session text.
        std::os::unix::fs::DirBuilderExt::mode(&mut fs::DirBuilder::new(), 0o700)
            .create(&tmp)
            .map_err(|e| SessionsError::io("create", &tmp, e))?;
        Ok(StagingDir {
            tmp,
            target: target.to_path_buf(),
            committed: false,
        })
    }

    pub fn path(&self) -> &Path {
        &self.tmp
    }

    /// Renames the staging directory to the target; `replace` first moves an existing target
    /// aside (and removes it after the swap). An absent or empty target needs no `replace`.
    pub fn commit(mut self, replace: bool) -> Result<(), SessionsError> {
        sync_dir(&self.tmp);
        let mut old = None;
        if replace && fs::symlink_metadata(&self.target).is_ok() {
            let mut aside = self.tmp.clone().into_os_string();
            aside.push(".old");
            let aside = PathBuf::from(aside);
            fs::rename(&self.target, &aside)
                .map_err(|e| SessionsError::io("rename", &self.target, e))?;
            old = Some(aside);
        }
        if let Err(e) = fs::rename(&self.tmp, &self.target) {
            if let Some(aside) = &old {
                let _ = fs::rename(aside, &self.target);
            }
            return Err(SessionsError::io("rename into place", &self.target, e));
        }
        self.committed = true;
        if let Some(aside) = old {
            let _ = fs::remove_dir_all(aside);
        }
        if let Some(parent) = self.target.parent() {
            sync_dir(if parent.as_os_str().is_empty() {
                Path::new(".")
            } else {
                parent
            });
        }
        Ok(())
    }
}

impl Drop for StagingDir {
    fn drop(&mut self) {
        if !self.committed {
            let _ = fs::remove_dir_all(&self.tmp);
        }
    }
}

/// Removes staging directories `.NAME.spark-tmp-PID-…` (and their `.old` set-asides) left next
/// to the target by a run that was killed, when process PID no longer exists. A live run's
/// directory is never touched.
fn remove_stale(parent: &Path, name: &str) {
    let prefix = format!(".{name}.spark-tmp-");
    let Ok(entries) = fs::read_dir(parent) else {
        return;
    };
    for entry in entries.flatten() {
        let file_name = entry.file_name();
        let Some(rest) = file_name.to_str().and_then(|n| n.strip_prefix(&prefix)) else {
            continue;
        };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if pid != std::process::id() && !Path::new("/proc").join(pid.to_string()).exists() {
            let _ = fs::remove_dir_all(entry.path());
        }
    }
}

fn sync_dir(dir: &Path) {
    // Persisting a directory entry is best effort: not every filesystem lets a directory be
    // opened for fsync.
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
}

struct Shard {
    entry: FileEntry,
    out: BufWriter<File>,
    path: PathBuf,
    bytes: u64,
}

/// Writes a corpus into a staging directory; [`CorpusWriter::commit`] writes the manifest and
/// renames it into place. Dropped without a commit, nothing is left behind.
pub struct CorpusWriter {
    staging: StagingDir,
    replace: bool,
    open: [Option<Shard>; 2],
    next_shard: [u32; 2],
    files: Vec<FileEntry>,
    counts: [SplitCounts; 2],
    last_session: [Option<String>; 2],
    line: Vec<u8>,
}

fn slot(split: Split) -> usize {
    match split {
        Split::Train => 0,
        Split::Test => 1,
    }
}

impl CorpusWriter {
    /// Checks `out` (see the module doc) and starts a staging directory next to it.
    pub fn create(out: &Path, force: bool) -> Result<CorpusWriter, SessionsError> {
        let state = check_corpus_out(out, force)?;
        Ok(CorpusWriter {
            staging: StagingDir::new(out)?,
            replace: state == OutState::Corpus,
            open: [None, None],
            next_shard: [0, 0],
            files: Vec::new(),
            counts: [SplitCounts::default(); 2],
            last_session: [None, None],
            line: Vec::new(),
        })
    }

    /// The staging directory (for tests that check it disappears).
    pub fn staging_path(&self) -> &Path {
        self.staging.path()
    }

    pub fn write(&mut self, chunk: &Chunk) -> Result<(), SessionsError> {
        let s = slot(chunk.split);
        if self.open[s]
            .as_ref()
            .is_some_and(|sh| sh.bytes >= SHARD_BYTES)
        {
            self.close(s)?;
        }
        if self.open[s].is_none() {
            let name = format!("{}-{:03}.jsonl", chunk.split.name(), self.next_shard[s]);
            self.next_shard[s] += 1;
            let path = self.staging.path().join(&name);
            // Session text: owner only, and a fresh file in our own staging directory.
            let f = std::os::unix::fs::OpenOptionsExt::mode(
                fs::OpenOptions::new().write(true).create_new(true),
                0o600,
            )
            .open(&path)
            .map_err(|e| SessionsError::io("create", &path, e))?;
            self.open[s] = Some(Shard {
                entry: FileEntry {
                    name,
                    split: chunk.split,
                    chunks: 0,
                },
                out: BufWriter::new(f),
                path,
                bytes: 0,
            });
        }
        self.line.clear();
        serde_json::to_writer(&mut self.line, chunk).expect("a chunk always serializes");
        self.line.push(b'\n');
        let shard = self.open[s].as_mut().expect("opened above");
        shard
            .out
            .write_all(&self.line)
            .map_err(|e| SessionsError::io("write", &shard.path, e))?;
        shard.bytes += self.line.len() as u64;
        shard.entry.chunks += 1;
        let c = &mut self.counts[s];
        c.chunks += 1;
        c.chars += chunk.text.chars().count() as u64;
        if self.last_session[s].as_deref() != Some(chunk.session.as_str()) {
            c.sessions += 1;
            self.last_session[s] = Some(chunk.session.clone());
        }
        Ok(())
    }

    fn close(&mut self, s: usize) -> Result<(), SessionsError> {
        if let Some(shard) = self.open[s].take() {
            let f = shard
                .out
                .into_inner()
                .map_err(|e| SessionsError::io("write", &shard.path, e.into_error()))?;
            f.sync_all()
                .map_err(|e| SessionsError::io("write", &shard.path, e))?;
            self.files.push(shard.entry);
        }
        Ok(())
    }

    /// Writes `manifest.json` and renames the corpus into place; returns the manifest.
    pub fn commit(
        mut self,
        test_frac: f64,
        chunk_chars: usize,
        max_line_bytes: usize,
        sources: Vec<SourceStats>,
    ) -> Result<Manifest, SessionsError> {
        self.close(0)?;
        self.close(1)?;
        self.files
            .sort_by(|a, b| (a.split, &a.name).cmp(&(b.split, &b.name)));
        let created_unix = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let manifest = Manifest {
            format: CORPUS_FORMAT.into(),
            version: CORPUS_VERSION,
            created: rfc3339(created_unix),
            created_unix,
            test_frac,
            chunk_chars,
            max_line_bytes,
            sources,
            train: self.counts[0],
            test: self.counts[1],
            files: std::mem::take(&mut self.files),
        };
        let path = self.staging.path().join(MANIFEST);
        let mut bytes = serde_json::to_vec_pretty(&manifest).expect("a manifest always serializes");
        bytes.push(b'\n');
        crate::atomic_file::write_atomic(&path, &bytes)
            .map_err(|e| SessionsError::io("write", &path, e))?;
        self.staging.commit(self.replace)?;
        Ok(manifest)
    }
}

/// A corpus on disk, opened for reading.
#[derive(Clone, Debug)]
pub struct Corpus {
    dir: PathBuf,
    manifest: Manifest,
}

impl Corpus {
    /// Reads and checks `dir/manifest.json`.
    pub fn open(dir: &Path) -> Result<Corpus, SessionsError> {
        let bad = |reason: String| SessionsError::BadCorpus {
            path: dir.into(),
            reason,
        };
        let path = dir.join(MANIFEST);
        let bytes = fs::read(&path).map_err(|e| bad(format!("read {MANIFEST}: {e}")))?;
        let v: serde_json::Value =
            serde_json::from_slice(&bytes).map_err(|e| bad(format!("parse {MANIFEST}: {e}")))?;
        if v.get("format").and_then(|f| f.as_str()) != Some(CORPUS_FORMAT) {
            return Err(bad(format!("{MANIFEST} is not a {CORPUS_FORMAT} manifest")));
        }
        let version = v.get("version").and_then(|f| f.as_u64());
        if version != Some(u64::from(CORPUS_VERSION)) {
            return Err(bad(format!(
                "corpus version {} is not the supported version {CORPUS_VERSION}",
                version.map_or("missing".into(), |n| n.to_string())
            )));
        }
        let manifest: Manifest =
            serde_json::from_value(v).map_err(|e| bad(format!("parse {MANIFEST}: {e}")))?;
        for f in &manifest.files {
            if f.name.contains('/') || f.name.contains('\\') || f.name.starts_with('.') {
                return Err(bad(format!("file name {:?} is not a plain name", f.name)));
            }
        }
        Ok(Corpus {
            dir: dir.to_path_buf(),
            manifest,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// Number of chunks in `split`.
    pub fn len(&self, split: Split) -> u64 {
        self.manifest.counts(split).chunks
    }

    pub fn is_empty(&self, split: Split) -> bool {
        self.len(split) == 0
    }

    /// The chunks of `split` in corpus order, streamed from disk. A read or parse error, a chunk
    /// of the wrong split or a file with fewer chunks than the manifest says ends the iteration
    /// with an error.
    pub fn chunks(&self, split: Split) -> Chunks {
        Chunks {
            dir: self.dir.clone(),
            split,
            files: self
                .manifest
                .files
                .iter()
                .filter(|f| f.split == split)
                .cloned()
                .rev()
                .collect(),
            cur: None,
            done: false,
            buf: String::new(),
        }
    }
}

struct OpenFile {
    path: PathBuf,
    reader: BufReader<File>,
    expected: u64,
    line: u64,
}

/// Iterator over one split's chunks; see [`Corpus::chunks`].
pub struct Chunks {
    dir: PathBuf,
    split: Split,
    /// Remaining files, last first.
    files: Vec<FileEntry>,
    cur: Option<OpenFile>,
    done: bool,
    buf: String,
}

impl Chunks {
    fn next_inner(&mut self) -> Result<Option<Chunk>, SessionsError> {
        loop {
            if self.cur.is_none() {
                let Some(entry) = self.files.pop() else {
                    return Ok(None);
                };
                let path = self.dir.join(&entry.name);
                let f = File::open(&path).map_err(|e| SessionsError::io("open", &path, e))?;
                self.cur = Some(OpenFile {
                    path,
                    reader: BufReader::new(f),
                    expected: entry.chunks,
                    line: 0,
                });
            }
            let cur = self.cur.as_mut().expect("opened above");
            self.buf.clear();
            let bad = |line: u64, reason: String| SessionsError::BadChunk {
                path: cur.path.clone(),
                line,
                reason,
            };
            let n = cur
                .reader
                .read_line(&mut self.buf)
                .map_err(|e| bad(cur.line + 1, e.to_string()))?;
            if n == 0 {
                if cur.line != cur.expected {
                    return Err(bad(
                        cur.line,
                        format!(
                            "truncated: {} chunks, the manifest says {}",
                            cur.line, cur.expected
                        ),
                    ));
                }
                self.cur = None;
                continue;
            }
            cur.line += 1;
            if cur.line > cur.expected {
                return Err(bad(
                    cur.line,
                    format!("more chunks than the manifest's {}", cur.expected),
                ));
            }
            let chunk: Chunk =
                serde_json::from_str(&self.buf).map_err(|e| bad(cur.line, e.to_string()))?;
            if chunk.split != self.split {
                return Err(bad(
                    cur.line,
                    format!("a {} chunk in a {} file", chunk.split, self.split),
                ));
            }
            return Ok(Some(chunk));
        }
    }
}

impl Iterator for Chunks {
    type Item = Result<Chunk, SessionsError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        match self.next_inner() {
            Ok(Some(c)) => Some(Ok(c)),
            Ok(None) => {
                self.done = true;
                None
            }
            Err(e) => {
                self.done = true;
                Some(Err(e))
            }
        }
    }
}

/// `YYYY-MM-DDTHH:MM:SSZ` for seconds since the Unix epoch (proleptic Gregorian, UTC).
pub(crate) fn rfc3339(unix: u64) -> String {
    let days = (unix / 86_400) as i64;
    let secs = unix % 86_400;
    // Civil-from-days (Howard Hinnant's algorithm), days counted from 1970-01-01.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_known_dates() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_798_761_599), "2026-12-31T23:59:59Z");
    }

    fn chunk(session: &str, split: Split, i: u32, text: &str) -> Chunk {
        Chunk {
            session: session.into(),
            source: Source::Claude,
            split,
            chunk: i,
            text: text.into(),
        }
    }

    #[test]
    fn write_then_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("corpus");
        let mut w = CorpusWriter::create(&out, false).unwrap();
        let written = vec![
            chunk("claude:a.jsonl", Split::Train, 0, "[user]\nhé\n"),
            chunk("claude:b.jsonl", Split::Test, 0, "[user]\nx\n"),
            chunk("claude:a.jsonl", Split::Train, 1, "[assistant]\ny\n"),
        ];
        for c in &written {
            w.write(c).unwrap();
        }
        let m = w.commit(0.2, 100, 1000, Vec::new()).unwrap();
        assert_eq!(
            m.train,
            SplitCounts {
                sessions: 1,
                chunks: 2,
                chars: 24
            }
        );
        assert_eq!(m.test.chunks, 1);
        let c = Corpus::open(&out).unwrap();
        let train: Vec<Chunk> = c.chunks(Split::Train).map(Result::unwrap).collect();
        assert_eq!(train, vec![written[0].clone(), written[2].clone()]);
        let test: Vec<Chunk> = c.chunks(Split::Test).map(Result::unwrap).collect();
        assert_eq!(test, vec![written[1].clone()]);
        let names: Vec<String> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            names,
            vec!["corpus".to_string()],
            "no staging directory left"
        );
    }

    #[test]
    fn a_dropped_writer_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("corpus");
        let mut w = CorpusWriter::create(&out, false).unwrap();
        w.write(&chunk("claude:a.jsonl", Split::Train, 0, "t"))
            .unwrap();
        let staging = w.staging_path().to_path_buf();
        assert!(staging.exists());
        drop(w);
        assert!(!staging.exists());
        assert!(!out.exists());
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[test]
    fn truncated_files_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("corpus");
        let mut w = CorpusWriter::create(&out, false).unwrap();
        for i in 0..3 {
            w.write(&chunk("claude:a.jsonl", Split::Train, i, "text"))
                .unwrap();
        }
        w.commit(0.2, 100, 1000, Vec::new()).unwrap();
        let file = out.join("train-000.jsonl");
        let body = fs::read_to_string(&file).unwrap();
        let cut: Vec<&str> = body.lines().take(2).collect();
        fs::write(&file, cut.join("\n") + "\n").unwrap();
        let c = Corpus::open(&out).unwrap();
        let got: Vec<_> = c.chunks(Split::Train).collect();
        assert_eq!(got.len(), 3);
        assert!(got[0].is_ok() && got[1].is_ok());
        let err = got[2].as_ref().unwrap_err().to_string();
        assert!(
            err.contains("truncated: 2 chunks, the manifest says 3"),
            "{err}"
        );
    }

    #[test]
    fn open_refuses_what_is_not_a_corpus() {
        let dir = tempfile::tempdir().unwrap();
        assert!(Corpus::open(dir.path()).is_err());
        fs::write(dir.path().join(MANIFEST), r#"{"format":"other"}"#).unwrap();
        assert!(Corpus::open(dir.path()).is_err());
        fs::write(
            dir.path().join(MANIFEST),
            r#"{"format":"spark-corpus","version":99}"#,
        )
        .unwrap();
        let err = Corpus::open(dir.path()).unwrap_err().to_string();
        assert!(err.contains("version 99"), "{err}");
    }
}
