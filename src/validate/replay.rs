//! Replays corpus chunks through a tapped llama-server under deadlines.
//!
//! Owns the two-thread shape shared by `spark calibrate` and `spark validate`: a runner thread
//! starts the tapped server (it lives as long as the server, so the parent-death signal stays
//! armed), sizes each chunk by the server's own tokenizer, sends the cut token ids as one greedy
//! completion and hands back the routing; the calling thread is the watchdog: it enforces the
//! request deadline and the whole-run deadline, watches for an interrupt, and on any of them
//! kills the server's process group (through the supervisor's [`GroupKiller`]) so the runner's
//! blocked request returns at once. Never spawns or kills a process itself, and never waits
//! without a deadline.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use spark_proto::trace::{RoutingRecord, PHASE_DECODE};

use super::ValidateError;
use crate::gguf::MoeGeometry;
use crate::supervisor::GroupKiller;
use crate::telemetry::{Session, SessionConfig, TelemetryError, CONTROL_TIMEOUT};

/// How to replay.
#[derive(Debug, Clone)]
pub struct ReplayConfig {
    /// The tapped server; its `ready_timeout` is capped by the whole-run deadline.
    pub session: SessionConfig,
    /// Longest one request (tokenize or completion) may take.
    pub request_timeout: Duration,
    /// The whole run ends by then.
    pub deadline: Option<Instant>,
    /// A chunk's prompt is cut to this many tokens.
    pub chunk_tokens: usize,
    /// Tokens generated after each prompt.
    pub n_gen: u32,
    /// Set (by a signal handler) to stop the run.
    pub interrupt: Option<Arc<AtomicBool>>,
}

/// One chunk to replay.
#[derive(Debug, Clone)]
pub struct Job {
    /// Stamped on the chunk's records (stable across resumed runs).
    pub request: u32,
    /// `session#chunk`, for reports and resume state.
    pub key: String,
    pub text: String,
}

/// What one replayed chunk gave.
#[derive(Debug, Clone)]
pub struct ChunkRun {
    pub request: u32,
    pub key: String,
    /// Prompt tokens sent (after the cut).
    pub prompt_tokens: usize,
    /// Tokens the text had before the cut.
    pub text_tokens: usize,
    pub generated: usize,
    pub prompt_tps: Option<f64>,
    pub decode_tps: Option<f64>,
    pub seconds: f64,
    pub records: Vec<RoutingRecord>,
}

impl ChunkRun {
    pub fn decode_records(&self) -> usize {
        self.records
            .iter()
            .filter(|r| r.phase == PHASE_DECODE)
            .count()
    }
}

/// The server the runner started.
#[derive(Debug, Clone)]
pub struct Started {
    pub geometry: MoeGeometry,
    pub fingerprint: String,
    pub pid: u32,
}

enum Event {
    Started(Box<Started>, GroupKiller),
    Begin,
    /// A chunk with no tokens was skipped.
    Skipped,
    Done(ChunkRun),
    Finished(Result<(), TelemetryError>),
}

/// How often the watchdog looks at its deadlines and the interrupt flag.
const TICK: Duration = Duration::from_millis(25);

/// Replays `jobs` in order. `on_start` sees the server once it is ready; `on_chunk` gets each
/// finished chunk (an error from it stops the run and is returned). Errors: a timeout
/// ([`ValidateError::Timeout`]), an interrupt, or what the server or telemetry reported.
pub fn replay(
    cfg: &ReplayConfig,
    jobs: Vec<Job>,
    mut on_start: impl FnMut(&Started) -> Result<(), ValidateError>,
    mut on_chunk: impl FnMut(ChunkRun) -> Result<(), ValidateError>,
) -> Result<(), ValidateError> {
    // Named rings left by SIGKILLed supervisors of older versions (rings no longer have names).
    for stale in crate::ring::remove_stale_rings(Path::new("/dev/shm")) {
        tracing::info!("removed stale ring {}", stale.display());
    }
    let mut session_cfg = cfg.session.clone();
    if let Some(d) = cfg.deadline {
        let left = d.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(ValidateError::Timeout(
                "the whole-run deadline passed before the server started".into(),
            ));
        }
        session_cfg.ready_timeout = session_cfg.ready_timeout.min(left);
    }
    let abort = Arc::new(AtomicBool::new(false));
    let (tx, rx) = mpsc::channel::<Event>();
    let (chunk_tokens, n_gen) = (cfg.chunk_tokens.max(1), cfg.n_gen);
    let runner_abort = abort.clone();
    let runner = std::thread::Builder::new()
        .name("spark-replay".into())
        .spawn(move || {
            let r = run_jobs(&session_cfg, jobs, chunk_tokens, n_gen, &tx, &runner_abort);
            let _ = tx.send(Event::Finished(r));
        })
        .map_err(|e| ValidateError::Io {
            path: "replay thread".into(),
            source: e,
        })?;

    let mut killer: Option<GroupKiller> = None;
    let mut request_deadline: Option<Instant> = None;
    let mut halt: Option<ValidateError> = None;
    // Once halted, how long the runner may take to wind down (its own waits are bounded).
    let mut wind_down: Option<Instant> = None;
    let result = loop {
        if halt.is_none() {
            let now = Instant::now();
            if cfg
                .interrupt
                .as_ref()
                .is_some_and(|f| f.load(Ordering::Acquire))
            {
                halt = Some(ValidateError::Interrupted);
            } else if cfg.deadline.is_some_and(|d| now >= d) {
                halt = Some(ValidateError::Timeout(
                    "the whole-run deadline passed".into(),
                ));
            } else if request_deadline.is_some_and(|d| now >= d) {
                halt = Some(ValidateError::Timeout(format!(
                    "a request got no complete answer within {} s (--request-timeout)",
                    cfg.request_timeout.as_secs_f64()
                )));
            }
            if halt.is_some() {
                abort.store(true, Ordering::Release);
                if let Some(k) = &killer {
                    k.kill();
                }
                wind_down = Some(if killer.is_some() {
                    // The killed server's request fails at once; stopping it is bounded.
                    now + Duration::from_secs(10)
                } else if matches!(halt, Some(ValidateError::Interrupted)) {
                    // A server still starting cannot be killed from here: a user who pressed
                    // Ctrl-C is not kept waiting for it. The runner sees the abort flag, stops
                    // the server as soon as it is up (or its ready timeout passes), and a
                    // process that exits first takes the server with it (parent-death signal).
                    now + Duration::from_secs(2)
                } else {
                    // Startup waits are bounded by the ready timeout (itself capped by the
                    // whole-run deadline) and the control timeout.
                    now + cfg.session.ready_timeout + CONTROL_TIMEOUT + Duration::from_secs(5)
                });
            }
        }
        if wind_down.is_some_and(|d| Instant::now() >= d) {
            // The runner is stuck past every bound it has: report without it.
            break Err(halt.take().expect("halted"));
        }
        match rx.recv_timeout(TICK) {
            Ok(Event::Started(s, k)) => {
                killer = Some(k);
                if halt.is_some() {
                    k.kill();
                    continue;
                }
                if let Err(e) = on_start(&s) {
                    abort.store(true, Ordering::Release);
                    halt = Some(e);
                    wind_down = Some(Instant::now() + Duration::from_secs(15));
                }
            }
            Ok(Event::Begin) => request_deadline = Some(Instant::now() + cfg.request_timeout),
            Ok(Event::Skipped) => request_deadline = None,
            Ok(Event::Done(run)) => {
                request_deadline = None;
                if halt.is_none() {
                    if let Err(e) = on_chunk(run) {
                        abort.store(true, Ordering::Release);
                        if let Some(k) = &killer {
                            k.kill();
                        }
                        halt = Some(e);
                        wind_down = Some(Instant::now() + Duration::from_secs(15));
                    }
                }
            }
            Ok(Event::Finished(r)) => {
                let _ = runner.join();
                break match halt.take() {
                    Some(h) => Err(h),
                    None => r.map_err(|e| {
                        if e.is_timeout() {
                            ValidateError::Timeout(e.to_string())
                        } else {
                            ValidateError::Telemetry(e)
                        }
                    }),
                };
            }
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => {
                let _ = runner.join();
                break Err(halt.take().unwrap_or_else(|| {
                    ValidateError::Usage("replay chunks: the replay thread ended early".into())
                }));
            }
        }
    };
    result
}

/// The runner thread: start, then one tokenize + completion per job, until done or aborted.
fn run_jobs(
    cfg: &SessionConfig,
    jobs: Vec<Job>,
    chunk_tokens: usize,
    n_gen: u32,
    tx: &mpsc::Sender<Event>,
    abort: &AtomicBool,
) -> Result<(), TelemetryError> {
    let mut session = Session::start(cfg)?;
    session.discard();
    let started = Started {
        geometry: session.geometry.clone(),
        fingerprint: session.fingerprint.clone(),
        pid: session.server().pid(),
    };
    let _ = tx.send(Event::Started(Box::new(started), session.server().killer()));
    if abort.load(Ordering::Acquire) {
        session.stop();
        return Ok(());
    }
    let r = (|| {
        for job in jobs {
            if abort.load(Ordering::Acquire) {
                return Ok(());
            }
            let _ = tx.send(Event::Begin);
            let t0 = Instant::now();
            let mut tokens = session.tokenize(&job.text)?;
            let text_tokens = tokens.len();
            tokens.truncate(chunk_tokens);
            if tokens.is_empty() {
                let _ = tx.send(Event::Skipped);
                continue;
            }
            let mut records = Vec::new();
            let c =
                session.complete(job.request, &serde_json::json!(tokens), n_gen, &mut records)?;
            let _ = tx.send(Event::Done(ChunkRun {
                request: job.request,
                key: job.key,
                prompt_tokens: tokens.len(),
                text_tokens,
                generated: c.tokens.len(),
                prompt_tps: c.prompt_per_second,
                decode_tps: c.predicted_per_second,
                seconds: t0.elapsed().as_secs_f64(),
                records,
            }));
        }
        Ok(())
    })();
    session.stop();
    r
}
