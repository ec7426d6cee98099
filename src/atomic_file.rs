//! Atomic file replacement: write a temporary sibling, fsync, rename over the target.
//!
//! Owns the rule that no reader ever sees a half-written file spark produced (models, profiles,
//! reports). A temporary that is dropped without `commit` is removed.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};

/// A temporary file that becomes `target` on [`AtomicFile::commit`].
pub struct AtomicFile {
    file: File,
    tmp: PathBuf,
    target: PathBuf,
    committed: bool,
}

impl AtomicFile {
    pub fn create(target: &Path) -> io::Result<AtomicFile> {
        let dir = match target.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let name = target
            .file_name()
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "path has no file name"))?;
        let tmp = dir.join(format!(
            ".{}.tmp.{}",
            name.to_string_lossy(),
            std::process::id()
        ));
        let file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)?;
        Ok(AtomicFile {
            file,
            tmp,
            target: target.to_path_buf(),
            committed: false,
        })
    }

    pub fn as_file(&self) -> &File {
        &self.file
    }

    /// Flushes the data to disk (fdatasync) and renames the temporary over the target. A
    /// reader, or a restart after a crash, sees the old file or the new one, never a mix. The
    /// directory is not synced: after a power cut the rename itself may be lost (the old,
    /// whole file remains), which costs a second fsync per write to prevent and is not needed
    /// for the no-half-written-file rule.
    pub fn commit(mut self) -> io::Result<()> {
        self.file.sync_data()?;
        fs::rename(&self.tmp, &self.target)?;
        self.committed = true;
        Ok(())
    }
}

impl Drop for AtomicFile {
    fn drop(&mut self) {
        if !self.committed {
            let _ = fs::remove_file(&self.tmp);
        }
    }
}

/// Writes `bytes` to `target` atomically.
pub fn write_atomic(target: &Path, bytes: &[u8]) -> io::Result<()> {
    use std::io::Write;
    let f = AtomicFile::create(target)?;
    (&f.file).write_all(bytes)?;
    f.commit()
}
