//! Run a short-lived tool (llama-bench) to completion under a deadline and capture its output.
//!
//! Owns one-shot children: each runs in its own process group ([`ChildGroup`]); its stdout and
//! stderr go to temporary files (so a chatty child can never block on a full pipe); when the
//! deadline passes the whole group is stopped. Never waits without a deadline.

use std::io::Read;
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use super::child::{ChildGroup, SpawnError};

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Spawn(#[from] SpawnError),
    #[error("run {program}: {source}")]
    Io {
        program: String,
        source: std::io::Error,
    },
    #[error("run {program}: still running after {secs} s, stopped; last output:\n{tail}")]
    Timeout {
        program: String,
        secs: u64,
        tail: String,
    },
}

impl RunError {
    pub fn is_timeout(&self) -> bool {
        matches!(self, RunError::Timeout { .. })
    }
}

/// What a finished child left behind.
#[derive(Debug, Clone)]
pub struct Captured {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
    pub wall: Duration,
}

impl Captured {
    /// The last `n` lines of stderr, for error messages.
    pub fn stderr_tail(&self, n: usize) -> String {
        tail(&self.stderr, n)
    }
}

fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Runs `cmd` (stdin closed) until it exits or `timeout` passes; on timeout the child's process
/// group gets SIGTERM, a short grace period, then SIGKILL.
pub fn run_with_deadline(cmd: &mut Command, timeout: Duration) -> Result<Captured, RunError> {
    let program = cmd.get_program().to_string_lossy().into_owned();
    let io = |source: std::io::Error| RunError::Io {
        program: program.clone(),
        source,
    };
    let mut out = tempfile::tempfile().map_err(io)?;
    let mut err = tempfile::tempfile().map_err(io)?;
    cmd.stdin(Stdio::null())
        .stdout(out.try_clone().map_err(io)?)
        .stderr(err.try_clone().map_err(io)?);
    let started = Instant::now();
    let mut child = ChildGroup::spawn(cmd)?;
    let status = child.wait_until(started + timeout);
    let wall = started.elapsed();
    if status.is_none() {
        child.stop(Duration::from_secs(2));
    }
    let read = |f: &mut std::fs::File| -> Result<String, RunError> {
        use std::io::Seek;
        let mut s = String::new();
        f.seek(std::io::SeekFrom::Start(0)).map_err(io)?;
        let mut bytes = Vec::new();
        f.read_to_end(&mut bytes).map_err(io)?;
        s.push_str(&String::from_utf8_lossy(&bytes));
        Ok(s)
    };
    let stdout = read(&mut out)?;
    let stderr = read(&mut err)?;
    match status {
        Some(status) => Ok(Captured {
            status,
            stdout,
            stderr,
            wall,
        }),
        None => Err(RunError::Timeout {
            program,
            secs: timeout.as_secs(),
            tail: tail(&stderr, 10),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn captures_output_and_status() {
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "echo out; echo err >&2; exit 3"]);
        let c = run_with_deadline(&mut cmd, Duration::from_secs(10)).unwrap();
        assert_eq!(c.status.code(), Some(3));
        assert_eq!(c.stdout, "out\n");
        assert_eq!(c.stderr_tail(5), "err");
    }

    #[test]
    fn stops_a_child_past_its_deadline() {
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "echo started >&2; exec sleep 30"]);
        // The deadline is far longer than the shell needs to print its line (so a loaded
        // machine still sees "started") and far shorter than the sleep (so a hang fails).
        let e = run_with_deadline(&mut cmd, Duration::from_secs(5)).unwrap_err();
        assert!(e.is_timeout(), "{e}");
        assert!(e.to_string().contains("started"), "{e}");
    }
}
