//! systemd readiness and watchdog for `spark serve` (`Type=notify`, `WatchdogSec=`): when
//! `NOTIFY_SOCKET` is set, `READY=1` once llama-server answers, a `STATUS=` line whenever the
//! child's state changes (ready, unresponsive, restarting, starting), `WATCHDOG=1` every half
//! `WATCHDOG_USEC` while the serve loop runs, and `STOPPING=1` when shutdown begins.
//!
//! Owns the datagram protocol of `sd_notify(3)` (a path or an abstract `@name` socket, one
//! datagram of `KEY=value` lines per message). Never blocks serving and never fails it: a
//! datagram that cannot be sent is dropped with a debug line. Does nothing at all without
//! `NOTIFY_SOCKET`; ignores the watchdog when `WATCHDOG_PID` names another process.

use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::sync::Arc;
use std::time::Duration;

use crate::supervisor::{ChildPhase, KeeperState};

/// A connection to the service manager's notification socket.
pub struct Notifier {
    sock: UnixDatagram,
    addr: SocketAddr,
}

impl Notifier {
    /// The notifier `NOTIFY_SOCKET` names, if any (a bad value is logged and ignored).
    pub fn from_env() -> Option<Notifier> {
        let path = std::env::var_os("NOTIFY_SOCKET")?;
        match Notifier::to(&path) {
            Ok(n) => Some(n),
            Err(e) => {
                tracing::warn!(
                    "NOTIFY_SOCKET={}: {e}; not notifying the service manager",
                    path.to_string_lossy()
                );
                None
            }
        }
    }

    /// A notifier for the socket at `path` (`@name`: an abstract socket).
    pub fn to(path: &std::ffi::OsStr) -> std::io::Result<Notifier> {
        use std::os::unix::ffi::OsStrExt as _;
        let bytes = path.as_bytes();
        let addr = match bytes.strip_prefix(b"@") {
            Some(name) => {
                use std::os::linux::net::SocketAddrExt as _;
                SocketAddr::from_abstract_name(name)?
            }
            None => SocketAddr::from_pathname(path)?,
        };
        let sock = UnixDatagram::unbound()?;
        sock.set_nonblocking(true)?;
        Ok(Notifier { sock, addr })
    }

    /// Sends one message (`KEY=value` lines); a failure is dropped with a debug line.
    pub fn send(&self, msg: &str) {
        if let Err(e) = self.sock.send_to_addr(msg.as_bytes(), &self.addr) {
            tracing::debug!("notify the service manager ({msg:?}): {e}");
        }
    }
}

/// The watchdog interval systemd asks for (`WATCHDOG_USEC`, for this process when
/// `WATCHDOG_PID` is set), or `None`.
pub fn watchdog_usec() -> Option<Duration> {
    if let Some(pid) = std::env::var_os("WATCHDOG_PID") {
        if pid.to_str().and_then(|p| p.parse::<u32>().ok()) != Some(std::process::id()) {
            return None;
        }
    }
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
    (usec > 0).then(|| Duration::from_micros(usec))
}

/// The `STATUS=` text of a child state.
pub fn status_line(phase: ChildPhase, serving: &str) -> String {
    match phase {
        ChildPhase::Ready => serving.to_string(),
        ChildPhase::Starting => "starting llama-server".into(),
        ChildPhase::Unresponsive => {
            "llama-server is unresponsive (failing its health probes)".into()
        }
        ChildPhase::Restarting => "llama-server exited; restarting".into(),
        ChildPhase::Stopped => "llama-server stopped".into(),
    }
}

/// The running notification task of one serve run.
pub struct Systemd {
    notifier: Arc<Notifier>,
    task: tokio::task::JoinHandle<()>,
}

impl Systemd {
    /// When `NOTIFY_SOCKET` is set: sends `READY=1` (llama-server has answered: the keeper is
    /// started) with `serving` as the status, and starts the task that reports state changes
    /// and feeds the watchdog. Call on the runtime, after the keeper started.
    pub fn start(keeper: Arc<KeeperState>, serving: String) -> Option<Systemd> {
        let notifier = Arc::new(Notifier::from_env()?);
        let mut last = keeper.phase();
        notifier.send(&format!(
            "READY=1\nSTATUS={}\nMAINPID={}",
            status_line(last, &serving),
            std::process::id()
        ));
        let watchdog = watchdog_usec().map(|d| d / 2);
        let tick = watchdog
            .unwrap_or(Duration::from_millis(250))
            .min(Duration::from_millis(250));
        let n = notifier.clone();
        let task = tokio::spawn(async move {
            let mut fed = tokio::time::Instant::now();
            if watchdog.is_some() {
                n.send("WATCHDOG=1");
            }
            loop {
                tokio::time::sleep(tick).await;
                let phase = keeper.phase();
                if phase != last {
                    last = phase;
                    n.send(&format!("STATUS={}", status_line(phase, &serving)));
                }
                if let Some(every) = watchdog {
                    if fed.elapsed() >= every {
                        n.send("WATCHDOG=1");
                        fed = tokio::time::Instant::now();
                    }
                }
            }
        });
        Some(Systemd { notifier, task })
    }

    /// Shutdown has begun: stops the task and sends `STOPPING=1`.
    pub fn stopping(self) {
        self.task.abort();
        self.notifier
            .send("STOPPING=1\nSTATUS=stopping: draining requests and stopping llama-server");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_reach_a_path_socket_and_an_abstract_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let rx = UnixDatagram::bind(&path).unwrap();
        Notifier::to(path.as_os_str()).unwrap().send("READY=1");
        let mut buf = [0u8; 64];
        let n = rx.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1");

        use std::os::linux::net::SocketAddrExt as _;
        let name = format!("spark-notify-test-{}", std::process::id());
        let rx = UnixDatagram::bind_addr(&SocketAddr::from_abstract_name(&name).unwrap()).unwrap();
        Notifier::to(std::ffi::OsStr::new(&format!("@{name}")))
            .unwrap()
            .send("WATCHDOG=1");
        let n = rx.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"WATCHDOG=1");
    }

    #[test]
    fn a_missing_socket_drops_the_message_without_failing() {
        let n = Notifier::to(std::ffi::OsStr::new("/nonexistent/notify")).unwrap();
        n.send("READY=1");
    }
}
