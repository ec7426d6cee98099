//! Keeps one llama-server alive for `spark serve`: starts it, notices when it dies or stops
//! answering (a `/health` probe with a deadline; a child that fails them all for the hang bound
//! is killed), restarts it with bounded exponential backoff, forwards its log lines into spark's
//! log (target `llama_server`), stops it on request.
//!
//! Runs on a dedicated thread that lives as long as the keeper: the parent-death signal of a
//! child fires when the thread that forked it exits, so children are never forked from a
//! short-lived pool thread.

use std::io::{BufRead, BufReader, Seek, SeekFrom};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use super::llama::{LlamaServer, LlamaServerConfig, Probe, ServerError};

/// What the proxy and `/spark/status` can see of the child.
#[derive(Debug, Default)]
pub struct KeeperState {
    /// Port of the started server; 0 while it is down or starting.
    pub port: AtomicU16,
    pub pid: AtomicU32,
    pub restarts: AtomicU64,
    /// Answers the child gave that reached their client whole (the proxy counts them): a child
    /// that served one had a healthy run, and the restart backoff starts over after it.
    pub served: AtomicU64,
    pub last_exit: Mutex<Option<String>>,
    /// Health probes failed in a row (0 while the child answers).
    pub probe_failures: AtomicU64,
    /// Set while the child is reported unresponsive: since its first failed probe in a row.
    unresponsive_since: Mutex<Option<SystemTime>>,
    unresponsive: AtomicBool,
    phase: AtomicU8,
    stopping: AtomicBool,
}

/// Where the child is in its life, as `/spark/status` names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChildPhase {
    Starting,
    Ready,
    /// Running but failing its health probes: not ready, killed once the hang bound passes.
    Unresponsive,
    /// Exited or killed; the next start is pending.
    Restarting,
    Stopped,
}

impl ChildPhase {
    pub fn name(self) -> &'static str {
        match self {
            ChildPhase::Starting => "starting",
            ChildPhase::Ready => "ready",
            ChildPhase::Unresponsive => "unresponsive",
            ChildPhase::Restarting => "restarting",
            ChildPhase::Stopped => "stopped",
        }
    }
}

impl KeeperState {
    /// Port of the ready server: `None` while it is down, starting or unresponsive.
    pub fn port(&self) -> Option<u16> {
        if self.unresponsive.load(Ordering::Acquire) {
            return None;
        }
        match self.port.load(Ordering::Acquire) {
            0 => None,
            p => Some(p),
        }
    }

    pub fn phase(&self) -> ChildPhase {
        match self.phase.load(Ordering::Acquire) {
            1 => ChildPhase::Ready,
            2 => ChildPhase::Unresponsive,
            3 => ChildPhase::Restarting,
            4 => ChildPhase::Stopped,
            _ => ChildPhase::Starting,
        }
    }

    fn set_phase(&self, p: ChildPhase) {
        let v = match p {
            ChildPhase::Starting => 0,
            ChildPhase::Ready => 1,
            ChildPhase::Unresponsive => 2,
            ChildPhase::Restarting => 3,
            ChildPhase::Stopped => 4,
        };
        self.phase.store(v, Ordering::Release);
    }

    /// Since when the child has failed every health probe, while it is reported unresponsive.
    pub fn unresponsive_since(&self) -> Option<SystemTime> {
        *self
            .unresponsive_since
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    fn set_unresponsive(&self, since: Option<SystemTime>) {
        *self
            .unresponsive_since
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = since;
        self.unresponsive.store(since.is_some(), Ordering::Release);
    }
}

/// How the keeper watches a ready child: `GET /health` every `every`, each with a deadline of
/// `timeout`. After `mark_after` failures in a row the child is reported unresponsive (not
/// ready: the proxy answers 503 instead of forwarding); once every probe has failed for
/// `hang_after`, its process group is killed and it is restarted like a child that died.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Health {
    pub every: Duration,
    pub timeout: Duration,
    pub mark_after: u32,
    pub hang_after: Duration,
}

impl Health {
    /// Probes scaled to the hang bound: once a second (more often under a short bound), each
    /// with up to 2 s (less under a short bound) to answer.
    pub fn with_hang_timeout(hang_after: Duration) -> Health {
        Health {
            every: Duration::from_secs(1).min(hang_after / 4),
            timeout: Duration::from_secs(2).min(hang_after / 3),
            mark_after: 2,
            hang_after,
        }
    }
}

impl Default for Health {
    fn default() -> Self {
        Health::with_hang_timeout(Duration::from_secs(30))
    }
}

/// What one probe's outcome means for the child.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    /// Answering (or not failing long enough to say otherwise).
    Fine,
    /// It answered again after it had been reported unresponsive.
    Recovered,
    /// Just crossed `mark_after` failures in a row: report it unresponsive.
    Unresponsive,
    /// Every probe failed for `hang_after`: kill it.
    Hung,
}

/// The run of failed probes of one child; pure, so the thresholds are tested without processes.
#[derive(Debug)]
struct HealthWatch {
    health: Health,
    failures: u32,
    failing_since: Option<Instant>,
    marked: bool,
}

impl HealthWatch {
    fn new(health: Health) -> HealthWatch {
        HealthWatch {
            health,
            failures: 0,
            failing_since: None,
            marked: false,
        }
    }

    /// Folds the outcome of a probe that was sent at `sent`.
    fn observe(&mut self, ok: bool, sent: Instant, now: Instant) -> Verdict {
        if ok {
            let was = self.marked;
            *self = HealthWatch::new(self.health);
            return if was {
                Verdict::Recovered
            } else {
                Verdict::Fine
            };
        }
        self.failures += 1;
        let since = *self.failing_since.get_or_insert(sent);
        if now.duration_since(since) >= self.health.hang_after {
            return Verdict::Hung;
        }
        if !self.marked && self.failures >= self.health.mark_after {
            self.marked = true;
            return Verdict::Unresponsive;
        }
        Verdict::Fine
    }
}

/// Backoff between restarts: doubles from `first` up to `max` while children die without a
/// healthy run; reset after one (a child that became ready and served an answer, or ran for
/// `stable`).
#[derive(Debug, Clone, Copy)]
pub struct Backoff {
    pub first: Duration,
    pub max: Duration,
    pub stable: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            first: Duration::from_millis(500),
            max: Duration::from_secs(30),
            stable: Duration::from_secs(60),
        }
    }
}

/// Starts one llama-server child (the keeper calls it for the first start and every restart).
/// The default is a plain [`LlamaServer::start`]; `spark serve` passes one that sets up the tap.
pub type Launcher = Box<dyn FnMut(&LlamaServerConfig) -> Result<LlamaServer, ServerError> + Send>;

/// A running keeper thread.
pub struct Keeper {
    pub state: Arc<KeeperState>,
    /// Asks the thread to stop the child, giving it this long after SIGTERM.
    stop_tx: mpsc::Sender<Duration>,
    thread: Option<JoinHandle<()>>,
    forwarder: Option<JoinHandle<()>>,
}

impl Keeper {
    /// Starts the server and returns once it is ready (or the first start failed). Later deaths
    /// and hangs are handled on the keeper thread (`health`: `None` probes nothing).
    /// `log_prefix`: when `Some`, lines of the child's log are forwarded to spark's log as
    /// llama-server's (`[llama-server] ` in the text form, whatever the string); `None` drops them.
    pub fn start(
        cfg: LlamaServerConfig,
        backoff: Backoff,
        health: Option<Health>,
        log_prefix: Option<String>,
        launcher: Option<Launcher>,
    ) -> Result<Keeper, ServerError> {
        let launcher =
            launcher.unwrap_or_else(|| Box::new(|c: &LlamaServerConfig| LlamaServer::start(c)));
        let state = Arc::new(KeeperState::default());
        let (stop_tx, stop_rx) = mpsc::channel::<Duration>();
        let (ready_tx, ready_rx) = mpsc::channel::<Result<(), ServerError>>();
        let forwarder = log_prefix.map(|_| spawn_forwarder(cfg.log_path.clone(), state.clone()));
        let st = state.clone();
        let thread = std::thread::Builder::new()
            .name("spark-keeper".into())
            .spawn(move || keep(cfg, backoff, health, st, stop_rx, ready_tx, launcher))
            .map_err(ServerError::Io)?;
        let mut keeper = Keeper {
            state,
            stop_tx,
            thread: Some(thread),
            forwarder,
        };
        // The first start has its own deadline inside LlamaServer::start; a thread that dies
        // without answering is reported instead of waited on.
        match ready_rx.recv() {
            Ok(Ok(())) => Ok(keeper),
            Ok(Err(e)) => {
                keeper.stop();
                Err(e)
            }
            Err(_) => {
                keeper.stop();
                Err(ServerError::Io(std::io::Error::other(
                    "keeper thread ended before the server was ready",
                )))
            }
        }
    }

    /// Stops the child (SIGTERM, 5 s of grace, SIGKILL) and joins the threads.
    pub fn stop(&mut self) {
        self.stop_within(Duration::from_secs(5));
    }

    /// Stops the child (SIGTERM, up to `grace` to exit, SIGKILL) and joins the threads.
    pub fn stop_within(&mut self, grace: Duration) {
        self.state.stopping.store(true, Ordering::Release);
        let _ = self.stop_tx.send(grace);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        if let Some(t) = self.forwarder.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Keeper {
    fn drop(&mut self) {
        self.stop();
    }
}

fn keep(
    cfg: LlamaServerConfig,
    backoff: Backoff,
    health: Option<Health>,
    state: Arc<KeeperState>,
    stop_rx: mpsc::Receiver<Duration>,
    ready_tx: mpsc::Sender<Result<(), ServerError>>,
    mut launch: Launcher,
) {
    let mut first = Some(ready_tx);
    let mut delay = backoff.first;
    let stopped = |state: &KeeperState| {
        state.port.store(0, Ordering::Release);
        state.set_unresponsive(None);
        state.set_phase(ChildPhase::Stopped);
    };
    loop {
        let mut run_cfg = cfg.clone();
        run_cfg.port = None;
        let started = Instant::now();
        match launch(&run_cfg) {
            Ok(mut server) => {
                let served_before = state.served.load(Ordering::Acquire);
                state.pid.store(server.pid(), Ordering::Release);
                state.probe_failures.store(0, Ordering::Release);
                state.set_unresponsive(None);
                state.port.store(server.port, Ordering::Release);
                state.set_phase(ChildPhase::Ready);
                if let Some(tx) = first.take() {
                    let _ = tx.send(Ok(()));
                }
                let mut watch = health.map(HealthWatch::new);
                let mut next_probe = health.map(|h| Instant::now() + h.every);
                let why = loop {
                    match stop_rx.recv_timeout(Duration::from_millis(100)) {
                        Ok(grace) => {
                            stopped(&state);
                            server.stop_within(grace);
                            return;
                        }
                        Err(RecvTimeoutError::Disconnected) => {
                            stopped(&state);
                            server.stop();
                            return;
                        }
                        Err(RecvTimeoutError::Timeout) => {}
                    }
                    if let Some(status) = server.exited() {
                        break format!("llama-server (pid {}) exited: {status}", server.pid());
                    }
                    let (Some(h), Some(w), Some(at)) = (health, watch.as_mut(), next_probe) else {
                        continue;
                    };
                    if Instant::now() < at {
                        continue;
                    }
                    let sent = Instant::now();
                    let probe = server.probe_health(h.timeout);
                    next_probe = Some(Instant::now() + h.every);
                    let failure = match probe {
                        Probe::Healthy => {
                            state.probe_failures.store(0, Ordering::Release);
                            None
                        }
                        Probe::Failed(why) => {
                            state.probe_failures.fetch_add(1, Ordering::AcqRel);
                            Some(why)
                        }
                        Probe::Inconclusive(_) => continue,
                    };
                    let verdict = w.observe(failure.is_none(), sent, Instant::now());
                    let since = w
                        .failing_since
                        .and_then(|s| SystemTime::now().checked_sub(s.elapsed()));
                    match verdict {
                        Verdict::Fine => {}
                        Verdict::Recovered => {
                            tracing::info!(
                                "llama-server (pid {}) answers its health probe again",
                                server.pid()
                            );
                            state.set_unresponsive(None);
                            state.set_phase(ChildPhase::Ready);
                        }
                        Verdict::Unresponsive => {
                            let failures = state.probe_failures.load(Ordering::Acquire);
                            tracing::warn!(
                                "llama-server (pid {}) failed {failures} health probes in a row ({}); not ready, killed if it does not answer within {} s",
                                server.pid(),
                                failure.unwrap_or_default(),
                                h.hang_after.as_secs_f64()
                            );
                            state.set_unresponsive(Some(since.unwrap_or_else(SystemTime::now)));
                            state.set_phase(ChildPhase::Unresponsive);
                        }
                        Verdict::Hung => {
                            state.set_unresponsive(Some(since.unwrap_or_else(SystemTime::now)));
                            state.set_phase(ChildPhase::Unresponsive);
                            server.killer().kill();
                            // SIGKILL ends even a stopped process; the bound only guards against
                            // a reaping bug.
                            let deadline = Instant::now() + Duration::from_secs(5);
                            while server.exited().is_none() && Instant::now() < deadline {
                                std::thread::sleep(Duration::from_millis(20));
                            }
                            break format!(
                                "llama-server (pid {}) answered no health probe for {} s ({}); killed",
                                server.pid(),
                                h.hang_after.as_secs_f64(),
                                failure.unwrap_or_default()
                            );
                        }
                    }
                };
                // A healthy run (it served, or it lasted) starts the backoff over, before the
                // wait is announced.
                let served = state.served.load(Ordering::Acquire) > served_before;
                if served || started.elapsed() >= backoff.stable {
                    delay = backoff.first;
                }
                state.port.store(0, Ordering::Release);
                state.set_unresponsive(None);
                state.set_phase(ChildPhase::Restarting);
                tracing::warn!("{why}; restarting in {:.1} s", delay.as_secs_f64());
                *state.last_exit.lock().unwrap_or_else(|e| e.into_inner()) = Some(why);
                state.restarts.fetch_add(1, Ordering::AcqRel);
                drop(server);
            }
            Err(e) => {
                if let Some(tx) = first.take() {
                    let _ = tx.send(Err(e));
                    return;
                }
                state.set_phase(ChildPhase::Restarting);
                tracing::error!("failed to restart llama-server: {e}");
                *state.last_exit.lock().unwrap_or_else(|e| e.into_inner()) = Some(e.to_string());
            }
        }
        match stop_rx.recv_timeout(delay) {
            Ok(_) | Err(RecvTimeoutError::Disconnected) => {
                stopped(&state);
                return;
            }
            Err(RecvTimeoutError::Timeout) => {}
        }
        state.set_phase(ChildPhase::Starting);
        delay = (delay * 2).min(backoff.max);
    }
}

/// Tails the child's log file and logs each new line as an event of target
/// [`crate::log::LLAMA_SERVER`] (printed `[llama-server] <line>` in the text log). Follows
/// truncation (the file is recreated on every restart). Ends when the keeper stops.
fn spawn_forwarder(path: PathBuf, state: Arc<KeeperState>) -> JoinHandle<()> {
    std::thread::spawn(move || {
        let mut offset = 0u64;
        let mut partial = String::new();
        loop {
            let stopping = state.stopping.load(Ordering::Acquire);
            if let Ok(mut f) = std::fs::File::open(&path) {
                let len = f.metadata().map(|m| m.len()).unwrap_or(0);
                if len < offset {
                    offset = 0;
                    partial.clear();
                }
                if len > offset && f.seek(SeekFrom::Start(offset)).is_ok() {
                    let mut r = BufReader::new(f);
                    let mut buf = Vec::new();
                    while let Ok(n) = r.read_until(b'\n', &mut buf) {
                        if n == 0 {
                            break;
                        }
                        offset += n as u64;
                        partial.push_str(&String::from_utf8_lossy(&buf));
                        buf.clear();
                        if partial.ends_with('\n') {
                            crate::log::llama_server_line(partial.trim_end_matches(['\n', '\r']));
                            partial.clear();
                        }
                    }
                }
            }
            if stopping {
                return;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_child_is_marked_after_failures_in_a_row_and_hung_after_the_bound() {
        let h = Health {
            every: Duration::from_secs(1),
            timeout: Duration::from_secs(2),
            mark_after: 3,
            hang_after: Duration::from_secs(10),
        };
        let mut w = HealthWatch::new(h);
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        assert_eq!(w.observe(true, at(0), at(0)), Verdict::Fine);
        assert_eq!(w.observe(false, at(1), at(3)), Verdict::Fine);
        assert_eq!(w.observe(false, at(4), at(6)), Verdict::Fine);
        // One success in between starts the count again.
        assert_eq!(w.observe(true, at(7), at(7)), Verdict::Fine);
        assert_eq!(w.observe(false, at(8), at(10)), Verdict::Fine);
        assert_eq!(w.observe(false, at(11), at(13)), Verdict::Fine);
        assert_eq!(w.observe(false, at(14), at(16)), Verdict::Unresponsive);
        // Reported once, then nothing new until the bound, counted from the first failure.
        assert_eq!(w.observe(false, at(17), at(17)), Verdict::Fine);
        assert_eq!(w.observe(false, at(18), at(18)), Verdict::Hung);
        let mut w = HealthWatch::new(h);
        for s in 0..3 {
            w.observe(false, at(s), at(s));
        }
        assert_eq!(w.observe(true, at(4), at(4)), Verdict::Recovered);
        assert_eq!(w.observe(true, at(5), at(5)), Verdict::Fine);
    }

    #[test]
    fn probes_scale_down_with_a_short_hang_bound() {
        let h = Health::default();
        assert_eq!(
            (h.every, h.timeout, h.hang_after),
            (
                Duration::from_secs(1),
                Duration::from_secs(2),
                Duration::from_secs(30)
            )
        );
        let h = Health::with_hang_timeout(Duration::from_secs(2));
        assert_eq!(h.every, Duration::from_millis(500));
        assert!(h.timeout < h.hang_after);
    }
}
