//! Keeps one llama-server alive for `spark serve`: starts it, notices when it dies, restarts it
//! with bounded exponential backoff, forwards its log lines with a prefix, stops it on request.
//!
//! Runs on a dedicated thread that lives as long as the keeper: the parent-death signal of a
//! child fires when the thread that forked it exits, so children are never forked from a
//! short-lived pool thread.

use std::io::{BufRead, BufReader, Seek, SeekFrom};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU32, AtomicU64, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::llama::{LlamaServer, LlamaServerConfig, ServerError};

/// What the proxy and `/spark/status` can see of the child.
#[derive(Debug, Default)]
pub struct KeeperState {
    /// Port of the ready server; 0 while it is down or starting.
    pub port: AtomicU16,
    pub pid: AtomicU32,
    pub restarts: AtomicU64,
    pub last_exit: Mutex<Option<String>>,
    stopping: AtomicBool,
}

impl KeeperState {
    pub fn port(&self) -> Option<u16> {
        match self.port.load(Ordering::Acquire) {
            0 => None,
            p => Some(p),
        }
    }
}

/// Backoff between restarts: doubles from `first` up to `max`; reset after a child has run for
/// `stable` without dying.
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
    stop_tx: mpsc::Sender<()>,
    thread: Option<JoinHandle<()>>,
    forwarder: Option<JoinHandle<()>>,
}

impl Keeper {
    /// Starts the server and returns once it is ready (or the first start failed). Later deaths
    /// are handled on the keeper thread. `log_prefix`: lines of the child's log are printed to
    /// stderr with this prefix (none when `None`).
    pub fn start(
        cfg: LlamaServerConfig,
        backoff: Backoff,
        log_prefix: Option<String>,
        launcher: Option<Launcher>,
    ) -> Result<Keeper, ServerError> {
        let launcher =
            launcher.unwrap_or_else(|| Box::new(|c: &LlamaServerConfig| LlamaServer::start(c)));
        let state = Arc::new(KeeperState::default());
        let (stop_tx, stop_rx) = mpsc::channel::<()>();
        let (ready_tx, ready_rx) = mpsc::channel::<Result<(), ServerError>>();
        let forwarder = log_prefix.map(|p| spawn_forwarder(cfg.log_path.clone(), p, state.clone()));
        let st = state.clone();
        let thread = std::thread::Builder::new()
            .name("spark-keeper".into())
            .spawn(move || keep(cfg, backoff, st, stop_rx, ready_tx, launcher))
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

    /// Stops the child (SIGTERM, grace, SIGKILL) and joins the threads.
    pub fn stop(&mut self) {
        self.state.stopping.store(true, Ordering::Release);
        let _ = self.stop_tx.send(());
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
    state: Arc<KeeperState>,
    stop_rx: mpsc::Receiver<()>,
    ready_tx: mpsc::Sender<Result<(), ServerError>>,
    mut launch: Launcher,
) {
    let mut first = Some(ready_tx);
    let mut delay = backoff.first;
    loop {
        let mut run_cfg = cfg.clone();
        run_cfg.port = None;
        let started = Instant::now();
        match launch(&run_cfg) {
            Ok(mut server) => {
                state.pid.store(server.pid(), Ordering::Release);
                state.port.store(server.port, Ordering::Release);
                if let Some(tx) = first.take() {
                    let _ = tx.send(Ok(()));
                }
                loop {
                    match stop_rx.recv_timeout(Duration::from_millis(100)) {
                        Ok(()) | Err(RecvTimeoutError::Disconnected) => {
                            state.port.store(0, Ordering::Release);
                            server.stop();
                            return;
                        }
                        Err(RecvTimeoutError::Timeout) => {}
                    }
                    if let Some(status) = server.exited() {
                        state.port.store(0, Ordering::Release);
                        let why = format!("llama-server (pid {}) exited: {status}", server.pid());
                        eprintln!("spark: {why}; restarting in {:.1} s", delay.as_secs_f64());
                        *state.last_exit.lock().unwrap_or_else(|e| e.into_inner()) = Some(why);
                        state.restarts.fetch_add(1, Ordering::AcqRel);
                        break;
                    }
                }
                if started.elapsed() >= backoff.stable {
                    delay = backoff.first;
                }
            }
            Err(e) => {
                if let Some(tx) = first.take() {
                    let _ = tx.send(Err(e));
                    return;
                }
                eprintln!("spark: failed to restart llama-server: {e}");
                *state.last_exit.lock().unwrap_or_else(|e| e.into_inner()) = Some(e.to_string());
            }
        }
        match stop_rx.recv_timeout(delay) {
            Ok(()) | Err(RecvTimeoutError::Disconnected) => return,
            Err(RecvTimeoutError::Timeout) => {}
        }
        delay = (delay * 2).min(backoff.max);
    }
}

/// Tails the child's log file and prints each new line with `prefix`. Follows truncation (the
/// file is recreated on every restart). Ends when the keeper stops.
fn spawn_forwarder(path: PathBuf, prefix: String, state: Arc<KeeperState>) -> JoinHandle<()> {
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
                            eprint!("{prefix}{partial}");
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
