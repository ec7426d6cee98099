//! Atomic file replacement and private files: write a temporary sibling, fsync, rename over the
//! target; private work directories and logs.
//!
//! Owns the rule that no reader ever sees a half-written file spark produced (models, profiles,
//! reports), and the rules for spark's temporaries:
//!
//! - A temporary is created exclusively (`O_CREAT|O_EXCL`, so a planted symlink or file at its
//!   name makes the create fail instead of redirecting the write) under an unpredictable name in
//!   the target's directory: `.<name>.spark-tmp-<pid>-<random>`. The rename replaces whatever
//!   is at the target (a symlink included) and never follows it.
//! - The first write into a directory (and then one every [`SWEEP_EVERY`]) sweeps it of
//!   temporaries whose writer (the `<pid>` in the name) no longer runs, the leftovers of a
//!   SIGKILL between create and rename. A live writer's temporary is never touched. Not every
//!   write: a profile rewritten after each request beside 200,000 other files must not list
//!   them all each time.
//! - Files are private (0600) unless the caller asks for [`Mode::Public`] (0666 less the umask,
//!   what `File::create` gives): models and profiles, which hold no session text.
//! - Work directories spark creates are 0700 ([`private_tempdir`]) and logs in them 0600
//!   ([`create_private`]). Each one alive is listed, so that a signal that ends spark removes
//!   it too ([`remove_work_dirs`]): a bench killed mid-run leaves no fixture in `/tmp`.
//!
//! A temporary that is dropped without `commit` is removed.

use std::fs::{self, File, OpenOptions, Permissions};
use std::io;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// The marker between a temporary's target name and its writer's pid.
pub const TMP_MARK: &str = ".spark-tmp-";

/// Random characters at the end of a temporary's name.
const RAND_CHARS: usize = 12;

/// Bytes of the target's name kept in a temporary's name (names are limited to 255 bytes).
const NAME_KEEP: usize = 96;

/// Who may read a file spark writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Owner only (0600): anything that holds or is derived from session text (corpora,
    /// traces, reports, logs), and the default.
    Private,
    /// 0666 less the umask (0644 under the usual umask), as `File::create` gives: models,
    /// fixtures and profiles, which hold no session text and which other tools read.
    Public,
}

impl Mode {
    fn bits(self) -> u32 {
        match self {
            Mode::Private => 0o600,
            Mode::Public => 0o666,
        }
    }
}

/// A temporary file that becomes `target` on [`AtomicFile::commit`].
pub struct AtomicFile {
    tmp: tempfile::NamedTempFile,
    dir: PathBuf,
    target: PathBuf,
}

impl AtomicFile {
    /// A private (0600) temporary for `target`.
    pub fn create(target: &Path) -> io::Result<AtomicFile> {
        Self::create_with(target, Mode::Private)
    }

    /// A temporary for `target` with the given mode. Sweeps the directory of dead writers'
    /// temporaries first.
    pub fn create_with(target: &Path, mode: Mode) -> io::Result<AtomicFile> {
        let dir = match target.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let name = target
            .file_name()
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "path has no file name"))?;
        if sweep_due(&dir) {
            sweep_dead_temporaries(&dir);
        }
        let prefix = temp_prefix(&name.to_string_lossy(), std::process::id());
        let tmp = tempfile::Builder::new()
            .prefix(&prefix)
            .rand_bytes(RAND_CHARS)
            .permissions(Permissions::from_mode(mode.bits()))
            .tempfile_in(&dir)?;
        Ok(AtomicFile {
            tmp,
            dir,
            target: target.to_path_buf(),
        })
    }

    pub fn as_file(&self) -> &File {
        self.tmp.as_file()
    }

    /// The temporary's path (for tests and diagnostics).
    pub fn temp_path(&self) -> &Path {
        self.tmp.path()
    }

    /// Flushes the data to disk (fsync), renames the temporary over the target, then fsyncs the
    /// directory so the rename itself survives a power cut. A reader, or a restart after a
    /// crash, sees the old file or the new one, never a mix.
    pub fn commit(self) -> io::Result<()> {
        self.tmp.as_file().sync_all()?;
        self.tmp.persist(&self.target).map_err(|e| e.error)?;
        sync_dir(&self.dir)
    }
}

/// fsyncs a directory. Filesystems that cannot sync a directory (EINVAL) are not an error.
fn sync_dir(dir: &Path) -> io::Result<()> {
    let d = File::open(dir)?;
    match d.sync_all() {
        Err(e) if e.raw_os_error() == Some(nix::libc::EINVAL) => Ok(()),
        r => r,
    }
}

/// `.<name>.spark-tmp-<pid>-` with `name` cut to [`NAME_KEEP`] bytes at a character boundary.
fn temp_prefix(name: &str, pid: u32) -> String {
    let mut end = name.len().min(NAME_KEEP);
    while !name.is_char_boundary(end) {
        end -= 1;
    }
    format!(".{}{TMP_MARK}{pid}-", &name[..end])
}

/// The writer pid of a temporary's file name, if it is one of ours:
/// `.<name>.spark-tmp-<pid>-<random>` with a random part of [`RAND_CHARS`] alphanumerics.
pub fn temp_writer(file_name: &str) -> Option<u32> {
    if !file_name.starts_with('.') {
        return None;
    }
    let (_, rest) = file_name.rsplit_once(TMP_MARK)?;
    let (pid, rand) = rest.split_once('-')?;
    if rand.len() != RAND_CHARS || !rand.bytes().all(|b| b.is_ascii_alphanumeric()) {
        return None;
    }
    if pid.is_empty() || !pid.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    pid.parse().ok()
}

/// Whether process `pid` exists (signal 0; EPERM means it exists under another user). A
/// zombie counts as alive; so does a recycled pid, which only delays a sweep.
pub fn pid_alive(pid: u32) -> bool {
    let Ok(raw) = i32::try_from(pid) else {
        return false;
    };
    if raw <= 0 {
        return true;
    }
    !matches!(
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(raw), None),
        Err(nix::errno::Errno::ESRCH)
    )
}

/// How often writes into one directory sweep it again after the first time.
pub const SWEEP_EVERY: std::time::Duration = std::time::Duration::from_secs(600);

/// Whether a write into `dir` should sweep it now: the first time this process writes there, then
/// once every [`SWEEP_EVERY`]. Remembers at most a few thousand directories (then starts over).
fn sweep_due(dir: &Path) -> bool {
    use std::collections::HashMap;
    use std::sync::{Mutex, OnceLock};
    use std::time::Instant;
    static SWEPT: OnceLock<Mutex<HashMap<PathBuf, Instant>>> = OnceLock::new();
    let mut swept = SWEPT
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    let now = Instant::now();
    let key = fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
    match swept.get(&key) {
        Some(t) if now.duration_since(*t) < SWEEP_EVERY => false,
        _ => {
            if swept.len() >= 4096 {
                swept.clear();
            }
            swept.insert(key, now);
            true
        }
    }
}

/// Opens (creating it, 0666 less the umask like the profile it guards) a lock file for `flock`.
/// Never follows a symlink at `path`, so a planted link cannot make spark create a file
/// elsewhere.
pub fn open_lock_file(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o666)
        .custom_flags(nix::libc::O_CLOEXEC | nix::libc::O_NOFOLLOW)
        .open(path)
}

/// Removes regular files in `dir` named like our temporaries whose writer no longer runs; best
/// effort (a directory that cannot be listed is left alone). Returns the paths removed.
///
/// Caveat: a writer in another pid namespace sharing the directory looks dead from here.
pub fn sweep_dead_temporaries(dir: &Path) -> Vec<PathBuf> {
    let mut removed = Vec::new();
    let Ok(entries) = fs::read_dir(dir) else {
        return removed;
    };
    let me = std::process::id();
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name.to_str().and_then(temp_writer) else {
            continue;
        };
        if pid == me || pid_alive(pid) {
            continue;
        }
        // Only plain files (never a directory, never through a symlink).
        if !entry.file_type().is_ok_and(|t| t.is_file()) {
            continue;
        }
        if fs::remove_file(entry.path()).is_ok() {
            removed.push(entry.path());
        }
    }
    removed
}

/// Writes `bytes` to `target` atomically, private (0600).
pub fn write_atomic(target: &Path, bytes: &[u8]) -> io::Result<()> {
    write_atomic_with(target, bytes, Mode::Private)
}

/// Writes `bytes` to `target` atomically with the given mode.
pub fn write_atomic_with(target: &Path, bytes: &[u8], mode: Mode) -> io::Result<()> {
    use std::io::Write;
    let f = AtomicFile::create_with(target, mode)?;
    f.as_file().write_all(bytes)?;
    f.commit()
}

/// A fresh work directory `<tmp>/<prefix>XXXXXX`, mode 0700, removed when dropped.
pub fn private_tempdir(prefix: &str) -> io::Result<WorkDir> {
    let dir = tempfile::Builder::new()
        .prefix(prefix)
        .permissions(Permissions::from_mode(0o700))
        .tempdir()?;
    live_work_dirs().push(dir.path().to_path_buf());
    Ok(WorkDir { dir })
}

/// A private work directory ([`private_tempdir`]), removed with everything in it when dropped,
/// or by [`remove_work_dirs`] when a signal ends the process first.
#[derive(Debug)]
pub struct WorkDir {
    dir: tempfile::TempDir,
}

impl WorkDir {
    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        live_work_dirs().retain(|p| p != self.dir.path());
    }
}

fn live_work_dirs() -> std::sync::MutexGuard<'static, Vec<PathBuf>> {
    static LIVE: std::sync::Mutex<Vec<PathBuf>> = std::sync::Mutex::new(Vec::new());
    LIVE.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Removes every work directory still alive: for a process about to exit on a signal, where
/// no destructor runs.
pub fn remove_work_dirs() {
    for p in live_work_dirs().drain(..) {
        let _ = fs::remove_dir_all(p);
    }
}

/// Creates (or truncates) `path` for writing, mode 0600; an existing regular file is narrowed
/// to 0600 too. For logs (a log may hold prompts). A path the user gave may be a symlink or a
/// device (`/dev/stderr`); that is followed and left as it is.
pub fn create_private(path: &Path) -> io::Result<File> {
    let f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .custom_flags(nix::libc::O_CLOEXEC)
        .open(path)?;
    if f.metadata()?.is_file() {
        f.set_permissions(Permissions::from_mode(0o600))?;
    }
    Ok(f)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn mode_of(p: &Path) -> u32 {
        fs::symlink_metadata(p).unwrap().permissions().mode() & 0o777
    }

    fn leftovers(dir: &Path) -> Vec<String> {
        fs::read_dir(dir)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.contains(TMP_MARK) || n.contains(".tmp."))
            .collect()
    }

    #[test]
    fn temp_names_round_trip_and_strangers_are_ignored() {
        let p = temp_prefix("model.gguf", 4242);
        assert_eq!(p, ".model.gguf.spark-tmp-4242-");
        assert_eq!(temp_writer(&format!("{p}aB3dE5gH7jK9")), Some(4242));
        // Corpus staging directories use nanoseconds, not 12 alphanumerics.
        assert_eq!(temp_writer(".c.spark-tmp-4242-123456789"), None);
        assert_eq!(temp_writer("model.gguf.spark-tmp-4242-aB3dE5gH7jK9"), None);
        assert_eq!(temp_writer(".m.spark-tmp--aB3dE5gH7jK9"), None);
        assert_eq!(temp_writer(".m.tmp.4242"), None);
        // A long name is cut at a character boundary and stays under 255 bytes.
        let long = "é".repeat(200);
        let p = temp_prefix(&long, u32::MAX);
        assert!(p.len() + RAND_CHARS < 255, "{}", p.len());
        assert_eq!(
            temp_writer(&format!("{p}{}", "x".repeat(RAND_CHARS))),
            Some(u32::MAX)
        );
    }

    #[test]
    fn a_write_is_private_by_default_and_public_on_request() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a");
        write_atomic(&a, b"x").unwrap();
        assert_eq!(mode_of(&a), 0o600);
        let b = dir.path().join("b");
        write_atomic_with(&b, b"x", Mode::Public).unwrap();
        // 0666 less the umask: at least owner read/write, never more than 0666.
        assert_eq!(mode_of(&b) & 0o600, 0o600);
        assert_eq!(mode_of(&b) & !0o666, 0);
        assert!(leftovers(dir.path()).is_empty());
    }

    #[test]
    fn planted_symlinks_never_redirect_a_write() {
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("victim");
        fs::write(&victim, b"precious").unwrap();
        let target = dir.path().join("out.csv");
        // The old predictable temporary name, and the target itself.
        symlink(
            &victim,
            dir.path()
                .join(format!(".out.csv.tmp.{}", std::process::id())),
        )
        .unwrap();
        symlink(&victim, &target).unwrap();
        write_atomic(&target, b"new").unwrap();
        assert_eq!(fs::read(&victim).unwrap(), b"precious");
        assert!(fs::symlink_metadata(&target).unwrap().is_file());
        assert_eq!(fs::read(&target).unwrap(), b"new");
    }

    #[test]
    fn dead_writers_temporaries_are_swept_and_live_ones_kept() {
        let dir = tempfile::tempdir().unwrap();
        let mut gone = std::process::Command::new("true").spawn().unwrap();
        let dead = gone.id();
        gone.wait().unwrap();
        let stale = dir
            .path()
            .join(format!("{}abcdefABCDEF", temp_prefix("p.csv", dead)));
        fs::write(&stale, b"half").unwrap();
        // A live writer: this process's parent.
        let live_pid = nix::unistd::getppid().as_raw() as u32;
        let live = dir
            .path()
            .join(format!("{}abcdefABCDEF", temp_prefix("p.csv", live_pid)));
        fs::write(&live, b"in progress").unwrap();
        // A directory of a dead pid with a matching name is never removed.
        let staged = dir
            .path()
            .join(format!("{}abcdefABCDEG", temp_prefix("c", dead)));
        fs::create_dir(&staged).unwrap();
        write_atomic(&dir.path().join("p.csv"), b"whole").unwrap();
        assert!(!stale.exists(), "a dead writer's temporary is swept");
        assert!(live.exists(), "a live writer's temporary is kept");
        assert!(staged.is_dir());
    }

    #[test]
    fn only_the_first_write_into_a_directory_sweeps_it() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("p.csv");
        write_atomic(&target, b"first").unwrap();
        let mut gone = std::process::Command::new("true").spawn().unwrap();
        let dead = gone.id();
        gone.wait().unwrap();
        let stale = dir
            .path()
            .join(format!("{}abcdefABCDEF", temp_prefix("p.csv", dead)));
        fs::write(&stale, b"half").unwrap();
        // Rewrites (a profile after every request) do not list the directory again...
        for _ in 0..3 {
            write_atomic(&target, b"again").unwrap();
        }
        assert!(
            stale.exists(),
            "a rewrite does not sweep the directory again"
        );
        // ...and an explicit sweep still finds the leftover.
        assert_eq!(sweep_dead_temporaries(dir.path()), vec![stale.clone()]);
        assert_eq!(fs::read(&target).unwrap(), b"again");
    }

    #[test]
    fn an_uncommitted_temporary_is_removed() {
        let dir = tempfile::tempdir().unwrap();
        let f = AtomicFile::create(&dir.path().join("x")).unwrap();
        let tmp = f.temp_path().to_path_buf();
        assert!(tmp.exists());
        assert_eq!(mode_of(&tmp), 0o600);
        drop(f);
        assert!(!tmp.exists());
        assert!(!dir.path().join("x").exists());
    }

    #[test]
    fn private_dirs_and_logs() {
        let d = private_tempdir("spark-unit-").unwrap();
        assert_eq!(mode_of(d.path()), 0o700);
        let log = d.path().join("l.log");
        fs::write(&log, b"old").unwrap();
        fs::set_permissions(&log, Permissions::from_mode(0o644)).unwrap();
        drop(create_private(&log).unwrap());
        assert_eq!(mode_of(&log), 0o600);
        assert_eq!(fs::read(&log).unwrap(), b"");
        let fresh = d.path().join("new.log");
        drop(create_private(&fresh).unwrap());
        assert_eq!(mode_of(&fresh), 0o600);
    }
}
