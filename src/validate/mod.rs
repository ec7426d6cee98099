//! `spark calibrate` and `spark validate`: a routing profile from the train sessions of a
//! corpus, then an unattended check of it on the held-out sessions.
//!
//! Owns the replay of corpus chunks through a tapped llama-server ([`replay`]), the resumable
//! calibration state ([`calibrate`]), the held-out report with its exit status ([`check`]) and
//! the short loop `spark demo` shows ([`demo_loop`]). Every wait has a deadline; a timeout, an
//! interrupt or a dead server still leaves a report (validate) or a resumable state (calibrate).
//! Never spawns or kills a process itself (the supervisor does, through the telemetry session),
//! never writes a file except atomically, and never scores with a second simulator: the cache
//! policies and [`crate::simulate::Experiment`] do the scoring.

pub mod calibrate;
pub mod check;
pub mod replay;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::engine::{Engine, EngineError};
use crate::gguf::GgufError;
use crate::profile::ProfileError;
use crate::sessions::{Corpus, SessionsError, Split};
use crate::telemetry::TelemetryError;
use crate::trace::TraceError;

pub use calibrate::{calibrate, CalibrateArgs, CalibrateSummary};
pub use check::{validate, ValidateArgs, ValidateOutcome};

#[derive(Debug, thiserror::Error)]
pub enum ValidateError {
    #[error("{0}")]
    Usage(String),
    #[error(transparent)]
    Corpus(#[from] SessionsError),
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error(transparent)]
    Gguf(#[from] GgufError),
    #[error(transparent)]
    Profile(#[from] ProfileError),
    #[error(transparent)]
    Trace(#[from] TraceError),
    #[error(transparent)]
    Telemetry(TelemetryError),
    #[error("finish in time: {0}")]
    Timeout(String),
    #[error("finish: interrupted by a signal")]
    Interrupted,
    #[error("write {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("read {path}: {msg}")]
    State { path: PathBuf, msg: String },
    #[error("pass the thresholds: {0}")]
    Threshold(String),
    /// The run finished but scored nothing: a pass on no evidence is a failure.
    #[error("score the held-out routing: {0}")]
    NothingScored(String),
}

impl ValidateError {
    /// The documented exit code for this error (see [`crate::exit`]).
    pub fn exit_code(&self) -> i32 {
        use crate::exit;
        match self {
            ValidateError::Usage(_)
            | ValidateError::Engine(_)
            | ValidateError::Gguf(_)
            | ValidateError::Profile(_) => exit::USAGE,
            ValidateError::Corpus(e) if e.is_usage() => exit::USAGE,
            ValidateError::Telemetry(e) if e.is_usage() => exit::USAGE,
            ValidateError::Telemetry(e) if e.is_timeout() => exit::TIMEOUT,
            ValidateError::Timeout(_) => exit::TIMEOUT,
            ValidateError::Interrupted => exit::INTERRUPTED,
            _ => exit::CHECK_FAILED,
        }
    }

    /// The report status this error leaves.
    pub fn status(&self) -> &'static str {
        match self {
            ValidateError::Timeout(_) => "timeout",
            ValidateError::Telemetry(e) if e.is_timeout() => "timeout",
            ValidateError::Interrupted => "interrupted",
            ValidateError::Threshold(_) | ValidateError::NothingScored(_) => "fail",
            _ => "error",
        }
    }

    pub(crate) fn io(path: &Path, source: std::io::Error) -> ValidateError {
        ValidateError::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}

/// Flags shared by calibrate and validate: which server, which deadlines.
#[derive(Debug, Clone, clap::Args)]
pub struct ServerArgs {
    /// llama-server binary (default: $SPARK_LLAMA_SERVER, then the build in the cache)
    #[arg(long, value_name = "PATH")]
    pub llama_server: Option<PathBuf>,
    /// The tap library (default: $SPARK_TAP, then next to the spark executable)
    #[arg(long, value_name = "PATH")]
    pub tap: Option<PathBuf>,
    /// Seconds to wait for llama-server to become ready
    #[arg(long, default_value_t = 120, value_name = "S")]
    pub ready_timeout: u64,
    /// Seconds one request (tokenize or completion) may take
    #[arg(long, default_value_t = 60, value_name = "S")]
    pub request_timeout: u64,
    /// Prompt tokens per chunk (the chunk's text is cut to this many tokens)
    #[arg(long, default_value_t = 2048, value_name = "N")]
    pub chunk_tokens: usize,
    /// Tokens generated after each chunk (greedy)
    #[arg(long, default_value_t = 8, value_name = "N")]
    pub n_gen: u32,
    /// Replay at most this many chunks (in corpus order)
    #[arg(long, value_name = "N")]
    pub max_chunks: Option<usize>,
    /// Arguments passed to llama-server unchanged (after spark's `-c`/`-np` defaults)
    #[arg(last = true)]
    pub server_args: Vec<String>,
}

impl ServerArgs {
    /// Defaults for library callers (the demo): the CLI's defaults.
    pub fn new(llama_server: Option<PathBuf>) -> ServerArgs {
        ServerArgs {
            llama_server,
            tap: None,
            ready_timeout: 120,
            request_timeout: 60,
            chunk_tokens: 2048,
            n_gen: 8,
            max_chunks: None,
            server_args: Vec::new(),
        }
    }

    fn check(&self) -> Result<(), ValidateError> {
        if self.chunk_tokens == 0 {
            return Err(ValidateError::Usage(
                "parse --chunk-tokens 0: a chunk needs at least one token".into(),
            ));
        }
        if self.request_timeout == 0 || self.ready_timeout == 0 {
            return Err(ValidateError::Usage(
                "parse the timeouts: --ready-timeout and --request-timeout must be at least 1 s"
                    .into(),
            ));
        }
        Ok(())
    }

    /// The replay configuration for `model`, logging the server to `log_path`.
    fn replay_config(
        &self,
        model: &Path,
        log_path: PathBuf,
        deadline: Option<Instant>,
        interrupt: Option<Arc<AtomicBool>>,
    ) -> Result<replay::ReplayConfig, ValidateError> {
        self.check()?;
        let engine = Engine::locate(self.llama_server.as_deref())?;
        let tap = crate::telemetry::locate_tap(self.tap.as_deref()).map_err(|e| {
            if e.is_usage() {
                ValidateError::Usage(e.to_string())
            } else {
                ValidateError::Telemetry(e)
            }
        })?;
        // One slot whose context holds a whole chunk and its generated tokens.
        let ctx = self.chunk_tokens + self.n_gen as usize + 16;
        let mut extra_args = vec!["-np".to_string(), "1".into(), "-c".into(), ctx.to_string()];
        extra_args.extend(self.server_args.iter().cloned());
        Ok(replay::ReplayConfig {
            session: crate::telemetry::SessionConfig {
                llama_server: engine.llama_server,
                model: model.to_path_buf(),
                tap: Some(tap),
                extra_args,
                env: Vec::new(),
                ring_capacity: crate::ring::DEFAULT_CAPACITY,
                hidden_capacity: None,
                ready_timeout: Duration::from_secs(self.ready_timeout),
                log_path,
            },
            request_timeout: Duration::from_secs(self.request_timeout),
            deadline,
            chunk_tokens: self.chunk_tokens,
            n_gen: self.n_gen,
            interrupt,
        })
    }
}

/// Opens `model` and returns its geometry, refusing a model without routed experts (`verb` is
/// the command, for the message).
pub fn moe_geometry(model: &Path, verb: &str) -> Result<crate::gguf::MoeGeometry, ValidateError> {
    let file = crate::gguf::GgufFile::open(model)?;
    let geo = crate::gguf::MoeGeometry::of(&file)?;
    if geo.n_expert == 0 || geo.n_expert_used == 0 {
        return Err(ValidateError::Usage(format!(
            "{verb} {}: it has no MoE layers (architecture {}); there is no routing to count",
            model.display(),
            geo.architecture
        )));
    }
    Ok(geo)
}

/// The chunks of `split`, at most `max` of them, as replay jobs numbered from 1 in corpus order.
pub fn jobs(
    corpus: &Corpus,
    split: Split,
    max: Option<usize>,
) -> Result<Vec<replay::Job>, ValidateError> {
    let mut out = Vec::new();
    for chunk in corpus.chunks(split) {
        if max.is_some_and(|m| out.len() >= m) {
            break;
        }
        let c = chunk?;
        out.push(replay::Job {
            request: out.len() as u32 + 1,
            key: format!("{}#{}", c.session, c.chunk),
            text: c.text,
        });
    }
    Ok(out)
}

/// A flag that SIGINT or SIGTERM sets, for the binary (library callers pass their own or none).
/// The handlers stay installed for the life of the process.
pub fn interrupt_on_signals() -> Result<Arc<AtomicBool>, ValidateError> {
    let flag = Arc::new(AtomicBool::new(false));
    let f = flag.clone();
    crate::signals::on_interrupt(move || f.store(true, Ordering::Release))
        .map_err(|e| ValidateError::io(Path::new("signal handler"), e))?;
    Ok(flag)
}

/// The progress line on stderr: chunks, token rate, ETA.
pub(crate) struct Progress {
    what: &'static str,
    total: usize,
    done: usize,
    tokens: u64,
    started: Instant,
    quiet: bool,
    /// A bar with an ETA on a terminal; else the plain lines.
    steps: crate::progress::Steps,
}

/// A [`Progress`] shared by the start and chunk callbacks of one replay.
pub(crate) type SharedProgress = std::cell::RefCell<Progress>;

impl Progress {
    pub(crate) fn new(what: &'static str, total: usize, quiet: bool) -> Progress {
        Progress {
            what,
            total,
            done: 0,
            tokens: 0,
            started: Instant::now(),
            quiet,
            steps: crate::progress::Steps::new(what, total as u64, "chunks", quiet),
        }
    }

    /// Rates count from now (the server is ready), not from the start of the run.
    pub(crate) fn restart(&mut self) {
        self.started = Instant::now();
        self.steps.reset_clock();
    }

    pub(crate) fn chunk(&mut self, key: &str, tokens: u64) {
        self.done += 1;
        self.tokens += tokens;
        if self.quiet {
            return;
        }
        let secs = self.started.elapsed().as_secs_f64().max(1e-3);
        let eta = secs / self.done as f64 * (self.total.saturating_sub(self.done)) as f64;
        self.steps.at(
            self.done as u64,
            || {
                format!(
                    "{} tokens, {:.0} tok/s",
                    self.tokens,
                    self.tokens as f64 / secs
                )
            },
            || {
                format!(
                    "spark {}: {}/{} chunks ({key}), {} tokens, {:.0} tok/s, ETA {}",
                    self.what,
                    self.done,
                    self.total,
                    self.tokens,
                    self.tokens as f64 / secs,
                    clock(eta)
                )
            },
        );
        if self.done == self.total {
            self.steps.finish();
        }
    }
}

fn clock(secs: f64) -> String {
    let s = secs.round() as u64;
    format!("{}:{:02}:{:02}", s / 3600, s / 60 % 60, s % 60)
}

/// What [`demo_loop`] did, for `spark demo` to print.
#[derive(Debug, Clone)]
pub struct DemoSummary {
    pub corpus: PathBuf,
    pub profile: PathBuf,
    pub report_dir: PathBuf,
    pub calibrate: CalibrateSummary,
    pub validate: ValidateOutcome,
}

impl DemoSummary {
    /// The lines `spark demo` prints.
    pub fn render(&self) -> String {
        let c = &self.calibrate;
        let mut s = format!(
            "calibrate: {} train chunks, {} tokens, {} routing records -> {}\n",
            c.chunks,
            c.tokens,
            c.records,
            self.profile.display()
        );
        s.push_str(&format!(
            "validate: {} held-out chunks at {} slots per layer -> {}\n",
            self.validate.report.chunks.len(),
            self.validate.report.slots,
            self.report_dir.join("report.md").display()
        ));
        s.push_str(&check::policy_table(&self.validate.report));
        s
    }
}

/// The demo's short loop: the built-in synthetic corpus under `dir/corpus`, a calibration of
/// `model` on a few train chunks, a validation on a few held-out chunks (short chunks, few
/// generated tokens), report in `dir/report`.
pub fn demo_loop(model: &Path, engine: &Engine, dir: &Path) -> Result<DemoSummary, ValidateError> {
    std::fs::create_dir_all(dir).map_err(|e| ValidateError::io(dir, e))?;
    let corpus = crate::sessions::synth::demo_corpus(dir)?;
    let mut server = ServerArgs::new(Some(engine.llama_server.clone()));
    server.chunk_tokens = 128;
    server.n_gen = 8;
    server.max_chunks = Some(3);
    server.server_args = vec!["-t".into(), "2".into()];
    let profile = dir.join("demo.spark.csv");
    // A fresh calibration every time: the demo shows the whole loop.
    calibrate::remove_state(&profile);
    let cal = calibrate(
        &CalibrateArgs {
            model: model.to_path_buf(),
            corpus: corpus.dir().to_path_buf(),
            out: Some(profile.clone()),
            trace: None,
            server: server.clone(),
            quiet: true,
        },
        None,
    )?;
    server.max_chunks = Some(3);
    let report_dir = dir.join("report");
    let outcome = validate(
        &ValidateArgs {
            model: model.to_path_buf(),
            profile: profile.clone(),
            corpus: corpus.dir().to_path_buf(),
            report: report_dir.clone(),
            budget_mib: None,
            slots: None,
            deadline: 600,
            min_hit_ratio: None,
            max_cold_rate: None,
            server,
            quiet: true,
        },
        None,
    )?;
    Ok(DemoSummary {
        corpus: corpus.dir().to_path_buf(),
        profile,
        report_dir,
        calibrate: cal,
        validate: outcome,
    })
}
