//! `spark serve`: wraps llama-server so clients talk to spark exactly as they would talk to
//! llama-server, while spark keeps the child alive and reports on every request.
//!
//! Owns the serve loop: the listener, graceful shutdown (stop accepting, let in-flight requests
//! finish within a grace period, then stop the child within what is left of it),
//! and the launcher that gives every llama-server child the tap. Process lifecycle lives in
//! [`crate::supervisor`]; forwarding in [`proxy`]; connection limits in [`listener`]; API keys
//! in [`auth`]; layer placement and the sizing of residency slots in [`placement`]; the live
//! routing thread in [`live`]; `/spark/status` and `/spark/metrics` in [`status`]; loading the
//! profile in [`crate::profile`].

pub mod auth;
pub mod cli;
pub mod host_memory;
pub mod listener;
pub mod live;
pub mod notify;
pub mod page;
pub mod placement;
pub mod proxy;
pub mod redecide;
pub mod stats;
pub mod status;

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;

use crate::engine::Engine;
use crate::gguf::{GgufFile, MoeGeometry};
use crate::supervisor::{Backoff, Health, Keeper, LlamaServerConfig, ServerError};
use stats::Stats;

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("listen on {addr}: {source}")]
    Listen {
        addr: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    Server(#[from] ServerError),
    #[error("start the async runtime: {0}")]
    Runtime(std::io::Error),
    #[error("{0}")]
    Usage(String),
    #[error(transparent)]
    ApiKeys(#[from] auth::KeyError),
}

/// What clients may hold or send.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Client connections served at once; more get a 503 with `Retry-After`.
    pub max_connections: usize,
    /// Longest time a connection may take to send a request's headers (an idle keep-alive
    /// connection too); then it is closed.
    pub header_timeout: Duration,
    /// Largest request body, bytes; a larger one gets 413.
    pub max_body: u64,
    /// Longest time a request's body may take to arrive once its headers have; a slower one
    /// gets 408 (a body trickled a byte at a time must not hold a connection for ever).
    pub body_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 256,
            header_timeout: Duration::from_secs(30),
            max_body: 32 << 20,
            body_timeout: Duration::from_secs(60),
        }
    }
}

/// Least time llama-server gets between SIGTERM and SIGKILL on shutdown, even when the
/// requests used up the whole grace period.
const CHILD_STOP_MIN: Duration = Duration::from_secs(1);

/// Resolved options of `spark serve`.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    pub model: PathBuf,
    pub engine: Engine,
    pub host: String,
    pub port: u16,
    /// Arguments after `--`, passed to llama-server unchanged (they win).
    pub llama_args: Vec<String>,
    /// Extra environment of llama-server (for example the Vulkan device to use); spark's own
    /// settings for `--residency` come after it.
    pub env: Vec<(String, String)>,
    pub ready_timeout: Duration,
    /// Longest wait for the answer's headers.
    pub request_timeout: Duration,
    /// Longest silence inside a streamed answer.
    pub idle_timeout: Duration,
    /// Time in-flight requests get to finish on shutdown.
    pub grace: Duration,
    pub work_dir: PathBuf,
    /// Print llama-server's log lines with a prefix.
    pub forward_log: bool,
    pub backoff: Backoff,
    /// Health probes of the child and the hang bound; `None` probes nothing.
    pub health: Option<Health>,
    pub limits: Limits,
    /// The routing tap to preload; `None` serves without routing statistics.
    pub tap: Option<PathBuf>,
    /// `--spark`: the profile to load when fresh and rewrite after every request.
    pub profile: Option<PathBuf>,
    pub cache_slots: Option<u32>,
    /// `--residency`: the tap's provider serves experts from `cache_slots` VRAM slots per layer.
    pub residency: bool,
    /// `--gpu`, `--vram-bw`, `--h2d-bw`: what decides whether residency pays here.
    pub residency_gpu: crate::plan::residency::ServeGpu,
    /// Where host-resident weights live under `--residency` ([`host_memory`]).
    pub host_memory: host_memory::HostMemoryChoice,
    pub cache_policy: crate::cache::PolicyKind,
    /// VRAM budget for the placement, MiB.
    pub vram_budget_mib: Option<u64>,
    /// Context length the placement plans for.
    pub ctx: u64,
}

/// State shared by every connection.
pub struct ServeState {
    pub keeper: Arc<crate::supervisor::KeeperState>,
    pub stats: Stats,
    pub client: Client<HttpConnector, proxy::ClientBody>,
    /// Largest request body, bytes.
    pub max_body: u64,
    pub body_timeout: Duration,
    /// llama-server's API keys; spark's own routes ask for one when there are any.
    pub api_keys: auth::ApiKeys,
    pub connections: listener::Connections,
    pub request_timeout: Duration,
    pub idle_timeout: Duration,
    pub model: PathBuf,
    pub geometry: MoeGeometry,
    pub engine: Engine,
    pub started: Instant,
    pub completed: AtomicU64,
    pub listen: SocketAddr,
    /// Live routing statistics, when the tap runs.
    pub live: Option<LiveHandle>,
    /// Hit ratios of the last minutes, for the live page.
    pub history: page::History,
    pub placement: placement::ServePlacement,
    /// Pinned or mapped host weights (`--residency` only).
    pub host_memory: Option<host_memory::HostMemoryPlan>,
}

/// The serve side of the live routing thread.
pub struct LiveHandle {
    pub shared: live::LiveShared,
    pub cfg: live::LiveConfig,
    pub tx: std::sync::Mutex<std::sync::mpsc::Sender<live::LiveMsg>>,
    /// What happened to the profile at start: `fresh`, `new`, `stale`, `unknown`.
    pub profile_start: String,
}

impl ServeState {
    /// Called once per call (probes aside) whose answer reached the client whole;
    /// `completed_requests` counts the generating ones.
    pub fn request_completed(&self, generating: bool) {
        if generating {
            self.completed.fetch_add(1, Ordering::AcqRel);
        }
        if let Some(live) = &self.live {
            let _ = live
                .tx
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .send(live::LiveMsg::Completed);
        }
    }
}

/// The first part of a stop, out of one budget: in-flight requests get up to `grace` to finish,
/// then the connections left are closed (which drops their upstream ones, so llama-server is
/// not kept busy by answers nobody will read). Returns what llama-server gets between SIGTERM
/// and SIGKILL: what is left of `grace`, at least [`CHILD_STOP_MIN`].
async fn drain(
    grace: Duration,
    graceful: hyper_util::server::graceful::GracefulShutdown,
    tasks: &mut tokio::task::JoinSet<()>,
) -> Duration {
    let deadline = tokio::time::Instant::now() + grace;
    if tokio::time::timeout(grace, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(
            "in-flight requests did not finish within {} s; closing them",
            grace.as_secs()
        );
    }
    tasks.shutdown().await;
    deadline
        .saturating_duration_since(tokio::time::Instant::now())
        .max(CHILD_STOP_MIN)
}

/// Runs `spark serve` on its own runtime until SIGINT or SIGTERM.
pub fn run_until_signal(cfg: ServeConfig) -> Result<(), anyhow::Error> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(ServeError::Runtime)?;
    rt.block_on(async move {
        // Installed before anything starts: a signal that arrives while llama-server is still
        // starting is kept and handled as soon as serving begins, instead of killing spark
        // with the default action.
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate()).map_err(ServeError::Runtime)?;
        let mut int = signal(SignalKind::interrupt()).map_err(ServeError::Runtime)?;
        // A closed terminal (SIGHUP) stops spark the same graceful way.
        let mut hup = signal(SignalKind::hangup()).map_err(ServeError::Runtime)?;
        let shutdown = async move {
            tokio::select! { _ = term.recv() => tracing::info!("SIGTERM, shutting down"), _ = int.recv() => tracing::info!("SIGINT, shutting down"), _ = hup.recv() => tracing::info!("SIGHUP, shutting down") }
        };
        serve(cfg, shutdown).await
    })
}

/// `--residency`'s decision at start (`spark plan --residency`'s): `None` without `--residency`;
/// with `--cache-slots` or without the GPU's bandwidths, the slots as asked, said so. With a
/// decision, also the forecast to make it again on live counts (`redecide.rs`).
fn residency_decision(
    cfg: &ServeConfig,
    file: &GgufFile,
    geometry: &MoeGeometry,
) -> Result<
    (
        Option<crate::plan::residency::ServeDecision>,
        Option<redecide::DecideFn>,
    ),
    ServeError,
> {
    use crate::plan::fit::{MemorySettings, ModelFacts};
    use crate::plan::residency::{decision_on, serve_machine, ServeDecision};
    if !cfg.residency || !geometry.is_moe() {
        return Ok((None, None));
    }
    let as_asked = |reason: &str| {
        Some(ServeDecision {
            run: "as_asked".into(),
            slots: None,
            slots_per_layer: None,
            n_cpu_moe: None,
            reason: reason.into(),
            source: None,
            stock_tps: None,
            spark_tps: None,
            break_even_link_gbps: None,
        })
    };
    if cfg.cache_slots.is_some() {
        return Ok((
            as_asked("--cache-slots given: the slots as asked, no decision"),
            None,
        ));
    }
    let Some(budget) = cfg.vram_budget_mib else {
        return Ok((None, None)); // residency_setup refuses this with its own message
    };
    // A fresh profile's counts, read without side effects (the live thread loads it, or sets a
    // stale one aside, as before).
    let fp = geometry.fingerprint.to_string();
    let counts = cfg.profile.as_ref().and_then(|path| {
        crate::profile::Profile::read(path)
            .ok()
            .filter(|p| p.check_fresh(&fp, path).is_ok())
            .map(|p| p.counts)
    });
    // The context llama-server runs, as the placement counts it.
    let ctx = placement::user_ctx(&cfg.llama_args).unwrap_or(cfg.ctx);
    let Some((mach, ram_total)) =
        serve_machine(budget, &cfg.residency_gpu).map_err(ServeError::Usage)?
    else {
        return Ok((
            as_asked(
                "no GPU bandwidths (--gpu CARD, or --vram-bw and --h2d-bw): the default slots, no decision",
            ),
            None,
        ));
    };
    let m = ModelFacts::of(file, geometry.clone());
    let s = MemorySettings::serve(ctx);
    let named = cfg
        .profile
        .as_ref()
        .map(|p| format!("the profile {}", p.display()))
        .unwrap_or_default();
    let d = decision_on(
        &m,
        &s,
        &mach,
        counts.as_ref().map(|c| (c, named.as_str())),
        ram_total,
    )
    .map_err(ServeError::Usage)?;
    let decide: redecide::DecideFn = Box::new(move |c| {
        decision_on(
            &m,
            &s,
            &mach,
            Some((
                c,
                "the routing serve has seen (the start profile's counts included)",
            )),
            ram_total,
        )
    });
    Ok((Some(d), Some(decide)))
}

/// Pinned or mapped host weights under `--residency`, from RAM and the user's own load mode;
/// `--host-memory pinned` that cannot fit is refused like a placement (exit 3).
fn decide_host_memory(
    cfg: &ServeConfig,
    placement: &placement::ServePlacement,
) -> Result<host_memory::HostMemoryPlan, anyhow::Error> {
    let (ram_total, ram_available) = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|t| crate::plan::hardware::parse_meminfo(&t))
        .unwrap_or((0, 0));
    let env_mode = std::env::var("LLAMA_ARG_LOAD_MODE").ok();
    let user_mode = host_memory::user_load_mode(&cfg.llama_args, env_mode.as_deref());
    // The user's own placement flags win, and so does their host part.
    let host_bytes = placement
        .effective
        .as_ref()
        .map_or(placement.usage.host_bytes, |e| e.host_bytes);
    let mut plan = host_memory::decide(
        cfg.host_memory,
        host_bytes,
        ram_total,
        ram_available,
        user_mode.as_deref(),
    )
    .map_err(|e| placement::Refused {
        model: cfg.model.display().to_string(),
        budget: cfg
            .vram_budget_mib
            .map_or_else(|| "none".into(), |b| format!("{b} MiB")),
        reason: e.to_string(),
        help: "--host-memory auto (maps what cannot be pinned) or more RAM".into(),
    })?;
    if let Some(e) = &placement.effective {
        plan.reason = format!(
            "{} (host part of the placement llama-server runs: {})",
            plan.reason, e.note
        );
    }
    let mode = match plan.host_memory {
        host_memory::HostMemory::Pinned => "pinned",
        host_memory::HostMemory::Mapped => "mapped",
    };
    tracing::info!("residency: host weights {mode}: {}", plan.reason);
    Ok(plan)
}

/// Serves until `shutdown` resolves, then drains in-flight requests for up to the grace period
/// and stops the child.
pub async fn serve(
    cfg: ServeConfig,
    shutdown: impl Future<Output = ()>,
) -> Result<(), anyhow::Error> {
    let api_keys = auth::ApiKeys::of_llama_server(&cfg.llama_args, |k| std::env::var(k).ok())
        .map_err(ServeError::from)?;
    let file = GgufFile::open(&cfg.model)?;
    let geometry = MoeGeometry::of(&file)?;
    let mut slots =
        placement::shadow_slots(cfg.cache_slots, &geometry).map_err(|e| ServeError::Usage(e.0))?;
    let (decision, redecide) = residency_decision(&cfg, &file, &geometry)?;
    let mut run_residency = cfg.residency;
    // The provider's slots: `--cache-slots` (or the default) in every layer, unless the
    // decision chose a count, or a count per host layer.
    let mut layer_slots: Option<Vec<(u32, u32)>> = None;
    if let Some(d) = &decision {
        tracing::info!("residency decision: {} ({})", d.run, d.reason);
        match (d.run.as_str(), d.slots) {
            ("residency", Some(s)) => {
                slots = s;
                layer_slots = d.slots_per_layer.clone();
            }
            ("stock", _) => run_residency = false,
            _ => {}
        }
    }
    let slot_counts = match &layer_slots {
        Some(v) => spark_proto::hook::SlotCounts::per_layer(v.iter().copied()),
        None => spark_proto::hook::SlotCounts::Uniform(slots),
    };
    let residency = match run_residency {
        true => Some(
            placement::residency_setup(
                &cfg.model,
                &geometry,
                cfg.vram_budget_mib,
                slot_counts.clone(),
                cfg.cache_policy,
            )
            .map_err(|e| ServeError::Usage(e.0))?,
        ),
        false => None,
    };
    let placement = placement::place(
        &file,
        &geometry,
        cfg.vram_budget_mib,
        cfg.ctx,
        &cfg.llama_args,
        residency.as_ref(),
        decision
            .as_ref()
            .filter(|d| d.run == "residency")
            .and_then(|d| d.n_cpu_moe),
    )?;
    let mut placement = placement;
    // The decision on live counts is compared with the split that runs (its `--n-cpu-moe` as
    // placed: the decision's, unless it did not fit and fit placed it).
    let redecider = match (&decision, redecide) {
        (Some(d), Some(f)) if run_residency || d.run == "stock" => {
            let mut running = d.clone();
            running.n_cpu_moe = match placement.placement {
                crate::plan::fit::Placement::CpuMoe { n } => Some(n),
                crate::plan::fit::Placement::AllGpu => Some(0),
                crate::plan::fit::Placement::CpuOnly => None,
            };
            Some((f, running))
        }
        _ => None,
    };
    placement.residency_decision = decision;
    drop(file);
    let host_memory = match &residency {
        Some(_) => Some(decide_host_memory(&cfg, &placement)?),
        None => None,
    };
    tracing::info!(
        "placement {:?}: llama-server {}{}",
        placement.placement,
        placement.flags.join(" "),
        if placement.user_overrides.is_empty() {
            String::new()
        } else {
            format!(
                " (your arguments replace: {})",
                placement.user_overrides.join(", ")
            )
        }
    );
    let hosts = listener::hosts(&cfg.host).map_err(ServeError::Usage)?;
    let tcp = listener::bind_all(&hosts, cfg.port).await?;
    let listen = tcp[0].local_addr()?;
    std::fs::create_dir_all(&cfg.work_dir)?;

    let server_cfg = LlamaServerConfig {
        binary: cfg.engine.llama_server.clone(),
        model: cfg.model.clone(),
        port: None,
        extra_args: placement
            .flags
            .iter()
            .chain(host_memory.iter().flat_map(|h| &h.args))
            .chain(&cfg.llama_args)
            .cloned()
            .collect(),
        env: cfg
            .env
            .iter()
            .chain(residency.as_ref().map_or(&[][..], |r| &r.env[..]))
            .cloned()
            .collect(),
        ready_timeout: cfg.ready_timeout,
        log_path: cfg.work_dir.join("llama-server.log"),
    };
    let prefix = cfg.forward_log.then(|| "[llama-server] ".to_string());
    let backoff = cfg.backoff;
    let health = cfg.health;
    let (live, launcher, live_thread) = match &cfg.tap {
        Some(tap) if geometry.is_moe() => {
            let (handle, launcher, thread) = start_live(
                &cfg,
                &geometry,
                tap.clone(),
                slots,
                layer_slots.as_deref(),
                run_residency,
                redecider,
            )?;
            (Some(handle), Some(launcher), Some(thread))
        }
        Some(_) => {
            tracing::info!(
                "{} has no MoE layers: serving without routing statistics",
                cfg.model.display()
            );
            (None, None, None)
        }
        None => (None, None, None),
    };
    let mut keeper = tokio::task::spawn_blocking(move || {
        Keeper::start(server_cfg, backoff, health, prefix, launcher)
    })
    .await??;
    let state = Arc::new(ServeState {
        keeper: keeper.state.clone(),
        stats: Stats::default(),
        client: proxy::client(),
        max_body: cfg.limits.max_body,
        body_timeout: cfg.limits.body_timeout,
        api_keys,
        connections: listener::Connections::new(
            cfg.limits.max_connections,
            cfg.limits.header_timeout,
        ),
        request_timeout: cfg.request_timeout,
        idle_timeout: cfg.idle_timeout,
        model: cfg.model.clone(),
        geometry,
        engine: cfg.engine.clone(),
        started: Instant::now(),
        completed: AtomicU64::new(0),
        listen,
        live,
        placement,
        history: page::History::default(),
        host_memory,
    });
    let urls: Vec<String> = tcp
        .iter()
        .filter_map(|l| l.local_addr().ok())
        .map(|a| format!("http://{a}"))
        .collect();
    let history = page::spawn_history(state.clone());
    tracing::info!(
        "serving {} on {} (llama-server pid {})",
        cfg.model.display(),
        urls.join(" and "),
        keeper.state.pid.load(Ordering::Acquire)
    );
    let systemd = notify::Systemd::start(
        keeper.state.clone(),
        format!("serving {} on {}", cfg.model.display(), urls.join(" and ")),
    );

    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut tasks = tokio::task::JoinSet::new();
    let mut backoff = listener::AcceptBackoff::default();
    let mut next_listener = 0;
    tokio::pin!(shutdown);
    'accept: loop {
        tokio::select! {
            accepted = listener::accept_any(&tcp, &mut next_listener) => match accepted {
                Ok((stream, _)) => {
                    backoff.succeeded();
                    listener::serve(stream, &state, &graceful, &mut tasks);
                }
                Err(e) if listener::is_per_connection(&e) => {}
                Err(e) => {
                    state.connections.accept_errors.fetch_add(1, Ordering::Relaxed);
                    let pause = backoff.failed(Instant::now());
                    if let Some(n) = pause.log {
                        let times = if n > 1 { format!(" ({n} times since the last report)") } else { String::new() };
                        tracing::warn!("accept failed: {e}{times}; pausing accepts for {} ms", pause.sleep.as_millis());
                    }
                    tokio::select! {
                        _ = tokio::time::sleep(pause.sleep) => {}
                        _ = &mut shutdown => break 'accept,
                    }
                }
            },
            Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
            _ = &mut shutdown => break 'accept,
        }
    }
    drop(tcp);
    if let Some(systemd) = systemd {
        systemd.stopping();
    }
    history.abort();
    let child_grace = drain(cfg.grace, graceful, &mut tasks).await;
    tokio::task::spawn_blocking(move || keeper.stop_within(child_grace)).await?;
    if let (Some(live), Some(thread)) = (&state.live, live_thread) {
        let _ = live
            .tx
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .send(live::LiveMsg::Stop);
        let _ = tokio::task::spawn_blocking(move || thread.join()).await;
    }
    Ok(())
}

/// Loads the profile (when `--spark`), starts the live thread, and builds the launcher that
/// gives every llama-server child the tap, a fresh ring and a control channel.
fn start_live(
    cfg: &ServeConfig,
    geometry: &MoeGeometry,
    tap: PathBuf,
    slots: u32,
    layer_slots: Option<&[(u32, u32)]>,
    // Whether the provider runs: `--residency`, unless its decision chose stock placement.
    run_residency: bool,
    redecider: Option<(redecide::DecideFn, crate::plan::residency::ServeDecision)>,
) -> Result<
    (
        LiveHandle,
        crate::supervisor::Launcher,
        std::thread::JoinHandle<()>,
    ),
    anyhow::Error,
> {
    for stale in crate::ring::remove_stale_rings(std::path::Path::new("/dev/shm")) {
        tracing::info!("removed {} left by a run that was killed", stale.display());
    }
    let fingerprint = geometry.fingerprint.to_string();
    let (start_profile, profile_start) = match &cfg.profile {
        Some(path) => crate::profile::Profile::load_for(path, geometry)?,
        None => (None, "off".to_string()),
    };
    let k = geometry.n_expert_used as usize;
    let live_cfg = live::LiveConfig {
        n_layer: geometry.n_layer as usize,
        n_expert: geometry.n_expert as usize,
        k,
        slots,
        layer_slots: layer_slots.map(|v| {
            let counts = spark_proto::hook::SlotCounts::per_layer(v.iter().copied());
            (0..geometry.n_layer).map(|l| counts.of_layer(l)).collect()
        }),
        residency: run_residency,
        policy: cfg.cache_policy,
        window: 2048,
        half_life: 256.0,
        profile_path: cfg.profile.clone(),
        fingerprint,
        start_profile,
    };
    let (runner, shared) = live::Live::new(live_cfg.clone());
    let runner = match redecider {
        Some((f, running)) => runner.with_redecider(redecide::Redecider::new(
            f,
            running,
            live_cfg.profile_path.is_some(),
        )),
        None => runner,
    };
    let (tx, rx) = std::sync::mpsc::channel();
    let thread = std::thread::Builder::new()
        .name("spark-live".into())
        .spawn(move || runner.run(rx))?;
    let ring_tx = tx.clone();
    let ring_geometry = crate::telemetry::ring_geometry(geometry);
    let launcher: crate::supervisor::Launcher = Box::new(move |c: &LlamaServerConfig| {
        use crate::telemetry::TelemetryError;
        let t = crate::telemetry::launch_tapped(
            c,
            &tap,
            ring_geometry,
            crate::ring::DEFAULT_CAPACITY,
            None,
        )
        .map_err(|e| match e {
            TelemetryError::Server(e) => e,
            e => ServerError::Launch(e.to_string()),
        })?;
        let _ = ring_tx.send(live::LiveMsg::Ring(t.ring, t.control));
        Ok(t.server)
    });
    let handle = LiveHandle {
        shared,
        cfg: live_cfg,
        tx: std::sync::Mutex::new(tx),
        profile_start,
    };
    Ok((handle, launcher, thread))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A response body that never ends.
    struct Endless;

    impl hyper::body::Body for Endless {
        type Data = bytes::Bytes;
        type Error = std::convert::Infallible;
        fn poll_frame(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Option<Result<hyper::body::Frame<bytes::Bytes>, Self::Error>>>
        {
            std::task::Poll::Pending
        }
    }

    /// One connection in `tasks`, watched by `graceful`, with a request in flight whose answer
    /// takes `answer_after` (`None`: its body never ends). The flag is set when the task ends
    /// or is dropped.
    async fn in_flight(
        graceful: &hyper_util::server::graceful::GracefulShutdown,
        tasks: &mut tokio::task::JoinSet<()>,
        answer_after: Option<Duration>,
    ) -> (Arc<std::sync::atomic::AtomicBool>, tokio::io::DuplexStream) {
        use tokio::io::AsyncWriteExt;
        struct SetOnDrop(Arc<std::sync::atomic::AtomicBool>);
        impl Drop for SetOnDrop {
            fn drop(&mut self) {
                self.0.store(true, Ordering::Release);
            }
        }
        let (server, mut client) = tokio::io::duplex(1 << 16);
        let service = hyper::service::service_fn(move |_req| async move {
            let body = match answer_after {
                Some(d) => {
                    tokio::time::sleep(d).await;
                    http_body_util::Empty::new()
                        .map_err(|never| match never {})
                        .boxed()
                }
                None => http_body_util::BodyExt::boxed(Endless),
            };
            Ok::<_, std::convert::Infallible>(hyper::Response::new(body))
        });
        let conn = hyper::server::conn::http1::Builder::new()
            .serve_connection(hyper_util::rt::TokioIo::new(server), service);
        let conn = graceful.watch(conn);
        let ended = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let guard = SetOnDrop(ended.clone());
        tasks.spawn(async move {
            let _guard = guard;
            let _ = conn.await;
        });
        client
            .write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .unwrap();
        // Let the server read the request before the stop begins.
        tokio::time::sleep(Duration::from_millis(10)).await;
        (ended, client)
    }

    use http_body_util::BodyExt as _;

    #[tokio::test(start_paused = true)]
    async fn the_child_gets_what_the_requests_left_of_the_grace_period() {
        let grace = Duration::from_secs(5);
        // A request that ends 2 s into the stop leaves 3 s for llama-server.
        let graceful = hyper_util::server::graceful::GracefulShutdown::new();
        let mut tasks = tokio::task::JoinSet::new();
        let (_, _client) = in_flight(&graceful, &mut tasks, Some(Duration::from_secs(2))).await;
        let t0 = tokio::time::Instant::now();
        let left = drain(grace, graceful, &mut tasks).await;
        let took = t0.elapsed();
        assert!(
            took >= Duration::from_millis(1900) && took < Duration::from_secs(3),
            "{took:?}"
        );
        assert_eq!(
            took + left,
            grace,
            "one budget for both: {took:?} + {left:?}"
        );

        // A request that never ends uses the whole period: it is closed, and llama-server still
        // gets the minimum, not a second full period.
        let graceful = hyper_util::server::graceful::GracefulShutdown::new();
        let mut tasks = tokio::task::JoinSet::new();
        let (ended, _client) = in_flight(&graceful, &mut tasks, None).await;
        let t0 = tokio::time::Instant::now();
        let left = drain(grace, graceful, &mut tasks).await;
        assert_eq!(t0.elapsed(), grace);
        assert_eq!(left, CHILD_STOP_MIN);
        assert!(
            ended.load(Ordering::Acquire),
            "the connection left after the grace period is closed"
        );
        assert!(tasks.is_empty());
    }
}
