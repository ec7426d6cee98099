//! Agent session logs → a prompt corpus split by session into train and held-out.
//!
//! Owns reading Claude Code session files (`~/.claude/projects/**/*.jsonl`) and Codex rollout
//! files (`~/.codex/sessions/**/rollout-*.jsonl`), turning each session's conversation (text,
//! tool calls, tool results) into plain text with simple role markers, cutting it into chunks of
//! about `chunk_chars` characters at message boundaries, and writing a corpus directory
//! (JSONL chunk files plus `manifest.json`) atomically. [`Corpus`] reads one back for calibrate
//! and validate. [`synth`] writes a synthetic session tree for the demo and the tests.
//!
//! Invariants:
//! - Reading is streaming: a session file is read line by line from a `BufRead`, a line longer
//!   than `max_line_bytes` is skipped without being held in memory, and a session's text is cut
//!   into chunks as it is read. No file is ever read whole.
//! - Bad input lines (not JSON, not UTF-8, too long, unknown shape) are counted by reason and
//!   skipped, never fatal. Only bad arguments and output failures end a run.
//! - A session goes to train or test by a SHA-256 of its path relative to its source root, so the
//!   split is the same on every machine and every run. A Claude Code subagent file goes where
//!   its parent session goes.
//! - A corpus is built in a temporary sibling directory and renamed into place: a reader never
//!   sees a partial corpus, and a failed run leaves nothing behind.
//!
//! Deliberately absent: this module never talks to a server and never tokenizes; chunk sizes are
//! in characters, and calibrate re-sizes by real token counts.

mod chunk;
mod claude;
pub mod cli;
mod codex;
mod corpus;
mod extract;
mod message;
mod reader;
mod split;
pub mod synth;

pub use corpus::{
    Chunk, Chunks, Corpus, CorpusWriter, FileEntry, Manifest, SplitCounts, CORPUS_FORMAT,
    CORPUS_VERSION,
};
pub use extract::{extract, ExtractConfig, SourceRoot};
pub use message::{Skipped, SourceStats};
pub use split::{split_key, split_of, split_unit, SplitPlan};

use std::fmt;
use std::io;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// Default test fraction of `spark sessions extract`.
pub const DEFAULT_TEST_FRAC: f64 = 0.2;
/// Default chunk size in characters.
pub const DEFAULT_CHUNK_CHARS: usize = 8000;
/// Default limit on one JSONL line; longer lines are skipped and counted.
pub const DEFAULT_MAX_LINE_BYTES: usize = 4 << 20;

/// Which agent wrote a session.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    Claude,
    Codex,
}

impl Source {
    pub fn name(self) -> &'static str {
        match self {
            Source::Claude => "claude",
            Source::Codex => "codex",
        }
    }
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The half of the corpus a session belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Split {
    Train,
    Test,
}

impl Split {
    pub fn name(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Test => "test",
        }
    }
}

impl fmt::Display for Split {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What can go wrong reading sessions, writing a corpus or reading one back.
#[derive(Debug, thiserror::Error)]
pub enum SessionsError {
    #[error("extract sessions: --test-frac must be strictly between 0 and 1, got {0}")]
    TestFrac(f64),
    #[error("extract sessions: --chunk-chars must be at least 1")]
    ChunkChars,
    #[error("extract sessions: --max-line-bytes must be at least 1")]
    MaxLineBytes,
    #[error("read {flag} {}: no such directory", path.display())]
    MissingDir { flag: &'static str, path: PathBuf },
    #[error("write {}: it exists and is not a spark corpus (refusing to overwrite it)", path.display())]
    NotACorpusOut { path: PathBuf },
    #[error("write {}: a corpus is already there (pass --force to replace it)", path.display())]
    CorpusExists { path: PathBuf },
    #[error("write {}: it exists and is not empty (refusing to overwrite it)", path.display())]
    OutNotEmpty { path: PathBuf },
    #[error("open corpus {}: {reason}", path.display())]
    BadCorpus { path: PathBuf, reason: String },
    #[error("read corpus file {}: line {line}: {reason}", path.display())]
    BadChunk {
        path: PathBuf,
        line: u64,
        reason: String,
    },
    #[error("{what} {}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

impl SessionsError {
    /// True for errors caused by the arguments or the input (exit 2); false for I/O failures
    /// while writing.
    pub fn is_usage(&self) -> bool {
        match self {
            SessionsError::Io { what, .. } => !matches!(
                *what,
                "write" | "create" | "rename" | "rename into place" | "remove"
            ),
            _ => true,
        }
    }

    pub(crate) fn io(
        what: &'static str,
        path: impl Into<PathBuf>,
        source: io::Error,
    ) -> SessionsError {
        SessionsError::Io {
            what,
            path: path.into(),
            source,
        }
    }
}
