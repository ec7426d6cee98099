//! GGUF model files: reading (on a memory map), writing, and what spark needs to know about a
//! MoE model — its geometry, where each expert's bytes live, and a fingerprint.
//!
//! Owns the GGUF byte format. Never executes a model and never writes a file in place.

mod moe;
mod reader;
mod types;
mod value;
mod writer;

use std::path::{Path, PathBuf};

pub use moe::{
    ExpertSlice, ExpertTensor, Fingerprint, GroupTotals, LayerExperts, MoeGeometry, TensorGroup,
    SUPPORTED_MOE_ARCHS,
};
pub use reader::{parse_bytes, GgufFile, Parsed, TensorInfo, DEFAULT_ALIGNMENT};
pub use types::GgmlType;
pub use value::{Value, ValueType};
pub use writer::GgufWriter;

/// Why a GGUF file could not be read or written. Messages read after "failed to".
#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    #[error("read {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("read {path}: not a regular file")]
    NotAFile { path: PathBuf },
    #[error("read {path}: not a GGUF file (magic {found}, expected \"GGUF\")")]
    NotGguf { path: PathBuf, found: String },
    #[error("read {path}: GGUF version {version} is not supported (2 and 3 are)")]
    UnsupportedVersion { path: PathBuf, version: u32 },
    #[error("read {path}: file is truncated: {what} at byte {offset}")]
    Truncated {
        path: PathBuf,
        what: String,
        offset: u64,
    },
    #[error("read {path}: file is corrupt at byte {offset}: {message}")]
    Corrupt {
        path: PathBuf,
        offset: u64,
        message: String,
    },
    #[error("read {path}: {message}")]
    Invalid { path: PathBuf, message: String },
}

impl GgufError {
    fn at(path: &Path, message: &str) -> GgufError {
        GgufError::Invalid {
            path: path.to_path_buf(),
            message: message.to_string(),
        }
    }

    /// Attaches the file path to an error produced by the path-less byte parser.
    fn with_path(mut self, p: &Path) -> GgufError {
        match &mut self {
            GgufError::Io { path, .. }
            | GgufError::NotAFile { path }
            | GgufError::NotGguf { path, .. }
            | GgufError::UnsupportedVersion { path, .. }
            | GgufError::Truncated { path, .. }
            | GgufError::Corrupt { path, .. }
            | GgufError::Invalid { path, .. } => *path = p.to_path_buf(),
        }
        self
    }
}
