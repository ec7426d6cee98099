//! A child process in its own process group that dies with its parent.

use std::os::unix::process::CommandExt;
use std::process::{Child, Command, ExitStatus};
use std::time::{Duration, Instant};

use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;

#[derive(Debug, thiserror::Error)]
#[error("start {program}: {source}")]
pub struct SpawnError {
    pub program: String,
    pub source: std::io::Error,
}

/// A running child that leads its own process group. Dropping it stops the group.
#[derive(Debug)]
pub struct ChildGroup {
    child: Child,
    pgid: Pid,
    exited: Option<ExitStatus>,
}

/// Lets the child of `cmd` inherit the descriptors `fds` (clears their close-on-exec flag in
/// the child only, between fork and exec).
pub fn inherit_fds(cmd: &mut Command, fds: &[std::os::fd::RawFd]) {
    if fds.is_empty() {
        return;
    }
    let fds = fds.to_vec();
    // SAFETY: runs in the forked child before exec; fcntl is async-signal-safe and the closure
    // allocates nothing (the Vec was built before fork).
    unsafe {
        cmd.pre_exec(move || {
            for &fd in &fds {
                let flags = nix::libc::fcntl(fd, nix::libc::F_GETFD);
                if flags < 0
                    || nix::libc::fcntl(fd, nix::libc::F_SETFD, flags & !nix::libc::FD_CLOEXEC) < 0
                {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
}

/// Ignores SIGXFSZ in this process: a write past the file-size limit (`ulimit -f`, RLIMIT_FSIZE)
/// then fails with EFBIG, an error spark reports and cleans up after, instead of a signal that
/// ends spark silently with its work directory left behind. (The ring's memory file is sized
/// with ftruncate, which the limit also bounds.)
pub fn ignore_file_size_signal() {
    use nix::sys::signal::{signal, SigHandler};
    // SAFETY: SIG_IGN installs no handler code; changing a disposition to "ignore" is safe at
    // any time, from any thread.
    unsafe {
        let _ = signal(Signal::SIGXFSZ, SigHandler::SigIgn);
    }
}

impl ChildGroup {
    /// Spawns `cmd` as the leader of a new process group, with SIGKILL as its parent-death
    /// signal.
    pub fn spawn(cmd: &mut Command) -> Result<ChildGroup, SpawnError> {
        let program = cmd.get_program().to_string_lossy().into_owned();
        let parent = std::process::id();
        // SAFETY: the closure runs in the forked child before exec and only calls
        // async-signal-safe functions (setpgid, prctl, getppid, kill via nix wrappers), and
        // allocates nothing.
        unsafe {
            cmd.pre_exec(move || {
                nix::unistd::setpgid(Pid::from_raw(0), Pid::from_raw(0))?;
                nix::sys::prctl::set_pdeathsig(Signal::SIGKILL)?;
                // The parent may have died between fork and prctl: then nobody would signal us.
                if nix::unistd::getppid().as_raw() as u32 != parent {
                    nix::sys::signal::raise(Signal::SIGKILL)?;
                }
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .map_err(|source| SpawnError { program, source })?;
        let pgid = Pid::from_raw(child.id() as i32);
        Ok(ChildGroup {
            child,
            pgid,
            exited: None,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// A handle that can SIGKILL this group from another thread (e.g. a watchdog whose
    /// deadline passed while the owning thread is blocked in a request).
    pub fn killer(&self) -> GroupKiller {
        GroupKiller { pgid: self.pgid }
    }

    /// The exit status if the child has exited (never blocks).
    pub fn try_status(&mut self) -> Option<ExitStatus> {
        if self.exited.is_none() {
            self.exited = self.child.try_wait().ok().flatten();
        }
        self.exited
    }

    /// Waits for exit until `deadline`; `None` if the child still runs then.
    pub fn wait_until(&mut self, deadline: Instant) -> Option<ExitStatus> {
        loop {
            if let Some(s) = self.try_status() {
                return Some(s);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM to the group, up to `grace` to exit, then SIGKILL; always reaps the child.
    pub fn stop(&mut self, grace: Duration) -> Option<ExitStatus> {
        if self.try_status().is_none() {
            let _ = killpg(self.pgid, Signal::SIGTERM);
            if self.wait_until(Instant::now() + grace).is_none() {
                let _ = killpg(self.pgid, Signal::SIGKILL);
                // SIGKILL cannot be caught; the bound only guards against a zombie-reaping bug.
                self.wait_until(Instant::now() + Duration::from_secs(5));
            }
        }
        // Grandchildren left in the group get the same end.
        let _ = killpg(self.pgid, Signal::SIGKILL);
        self.exited
    }
}

/// Kills a [`ChildGroup`]'s process group from any thread. Only valid while the group's
/// leader is unreaped (its owner still holds the [`ChildGroup`]): after that the id may be reused.
#[derive(Debug, Clone, Copy)]
pub struct GroupKiller {
    pgid: Pid,
}

impl GroupKiller {
    /// SIGKILL to the whole group; the owner still reaps the leader.
    pub fn kill(&self) {
        let _ = killpg(self.pgid, Signal::SIGKILL);
    }
}

impl Drop for ChildGroup {
    fn drop(&mut self) {
        self.stop(Duration::from_secs(3));
    }
}
