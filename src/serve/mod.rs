//! `spark serve`: wraps llama-server so clients talk to spark exactly as they would talk to
//! llama-server, while spark keeps the child alive and reports on every request.
//!
//! Owns the serve loop: the listener, graceful shutdown (stop accepting, let in-flight requests
//! finish within a grace period, then stop the child within what is left of it),
//! `/spark/status` and `/spark/metrics`. Process lifecycle lives in [`crate::supervisor`];
//! forwarding in [`proxy`]; connection limits in [`listener`]; API keys in [`auth`].

pub mod auth;
pub mod cli;
pub mod host_memory;
pub mod listener;
pub mod live;
pub mod placement;
pub mod proxy;
pub mod stats;

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use serde_json::{json, Value};
use spark_proto::hook::{ENV_OFFLOAD_MIN_BATCH, ENV_RESIDENCY_SLOTS};

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
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 256,
            header_timeout: Duration::from_secs(30),
            max_body: 32 << 20,
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
    pub placement: placement::ServePlacement,
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

    pub fn status_json(&self) -> Value {
        let k = &self.keeper;
        let last_exit = k
            .last_exit
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        json!({
            "model": self.model.display().to_string(),
            "fingerprint": self.geometry.fingerprint.to_string(),
            "architecture": self.geometry.architecture,
            "geometry": {"n_layer": self.geometry.n_layer, "n_expert": self.geometry.n_expert, "n_expert_used": self.geometry.n_expert_used, "moe_layers": self.geometry.moe_layers.len()},
            "engine": {"llama_server": self.engine.llama_server.display().to_string(), "variant": self.engine.variant(), "hooked": self.engine.is_hooked(), "version": crate::engine::ENGINE_VERSION},
            "listen": self.listen.to_string(),
            "placement": self.placement,
            "uptime_s": self.started.elapsed().as_secs_f64(),
            "child": {"pid": k.pid.load(Ordering::Acquire), "port": k.port(), "ready": k.port().is_some(), "state": k.phase().name(), "unresponsive_since_unix_s": k.unresponsive_since().and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok()).map(|d| d.as_secs_f64()), "failed_probes": k.probe_failures.load(Ordering::Acquire), "restarts": k.restarts.load(Ordering::Acquire), "last_exit": last_exit},
            "connections": {"open": self.connections.open(), "max": self.connections.max, "rejected": self.connections.rejected.load(Ordering::Relaxed), "accept_errors": self.connections.accept_errors.load(Ordering::Relaxed), "header_timeout_s": self.connections.header_timeout.as_secs_f64()},
            "requests": self.stats.to_json(),
            "completed_requests": self.completed.load(Ordering::Acquire),
            "routing": self.live.as_ref().map(|l| l.shared.lock().unwrap_or_else(|e| e.into_inner()).to_json(&l.cfg)),
            "profile": self.live.as_ref().and_then(|l| l.cfg.profile_path.as_ref().map(|p| {
                let s = l.shared.lock().unwrap_or_else(|e| e.into_inner());
                json!({"path": p.display().to_string(), "at_start": l.profile_start, "writes": s.profile_writes, "last_write_us": s.profile_last_write_us, "error": s.profile_error})
            })),
        })
    }

    pub fn metrics_text(&self) -> String {
        let mut out = String::new();
        self.stats.prometheus(&mut out);
        use std::fmt::Write as _;
        let k = &self.keeper;
        let _ = writeln!(out, "# HELP spark_child_restarts_total Times llama-server was restarted.\n# TYPE spark_child_restarts_total counter\nspark_child_restarts_total {}", k.restarts.load(Ordering::Acquire));
        let _ = writeln!(out, "# HELP spark_child_up Whether llama-server is ready.\n# TYPE spark_child_up gauge\nspark_child_up {}", u8::from(k.port().is_some()));
        let hook_abi = match self.engine.is_hooked() {
            true => spark_proto::hook::ABI.to_string(),
            false => "none".to_string(),
        };
        let _ = writeln!(out, "# HELP spark_build_info spark's version, the engine build it serves with, and the residency hook ABI that build carries.\n# TYPE spark_build_info gauge\nspark_build_info{{version=\"{}\",engine_version=\"{}\",engine_variant=\"{}\",hook_abi=\"{hook_abi}\"}} 1", env!("CARGO_PKG_VERSION"), crate::engine::ENGINE_VERSION, self.engine.variant());
        let c = &self.connections;
        let _ = writeln!(out, "# HELP spark_connections_open Client connections being served.\n# TYPE spark_connections_open gauge\nspark_connections_open {}", c.open());
        let _ = writeln!(out, "# HELP spark_connections_rejected_total Client connections answered 503 because --max-connections were open.\n# TYPE spark_connections_rejected_total counter\nspark_connections_rejected_total {}", c.rejected.load(Ordering::Relaxed));
        let _ = writeln!(out, "# HELP spark_accept_errors_total Failed accepts of client connections (EMFILE and the like).\n# TYPE spark_accept_errors_total counter\nspark_accept_errors_total {}", c.accept_errors.load(Ordering::Relaxed));
        if let Some(l) = &self.live {
            let s = l.shared.lock().unwrap_or_else(|e| e.into_inner());
            let _ = writeln!(out, "# HELP spark_ring_dropped_total Routing records the tap dropped because the ring was full.\n# TYPE spark_ring_dropped_total counter\nspark_ring_dropped_total {}", s.ring_dropped);
            let _ = writeln!(out, "# HELP spark_routing_records_total Routing records read from the ring.\n# TYPE spark_routing_records_total counter\nspark_routing_records_total{{phase=\"prompt\"}} {}\nspark_routing_records_total{{phase=\"decode\"}} {}", s.prompt_records, s.decode_records);
            let _ = writeln!(out, "# HELP spark_shadow_cache_accesses_total Expert lookups served by the shadow cache.\n# TYPE spark_shadow_cache_accesses_total counter\nspark_shadow_cache_accesses_total {}", s.shadow_accesses);
            let _ = writeln!(out, "# HELP spark_shadow_cache_misses_total Shadow cache misses.\n# TYPE spark_shadow_cache_misses_total counter\nspark_shadow_cache_misses_total {}", s.shadow_misses);
            let _ = writeln!(out, "# HELP spark_profile_writes_total Profile rewrites.\n# TYPE spark_profile_writes_total counter\nspark_profile_writes_total {}", s.profile_writes);
            if s.window_accesses > 0 {
                let hit = |misses: u64| {
                    s.window_accesses.saturating_sub(misses) as f64 / s.window_accesses as f64
                };
                let _ = writeln!(out, "# HELP spark_shadow_cache_window_hit_ratio Shadow cache hit ratio over the last decode steps (up to {} of them).\n# TYPE spark_shadow_cache_window_hit_ratio gauge\nspark_shadow_cache_window_hit_ratio {}", l.cfg.window, hit(s.window_misses));
                let _ = writeln!(out, "# HELP spark_shadow_cache_belady_hit_ratio Belady bound: the best hit ratio any policy could reach with the same slots over the same decode steps.\n# TYPE spark_shadow_cache_belady_hit_ratio gauge\nspark_shadow_cache_belady_hit_ratio {}", hit(s.window_belady_misses));
            }
            if let Some(r) = s.residency {
                let _ = writeln!(out, "# HELP spark_residency_expert_slices_total Expert slices the residency provider served, by source (slot hit, loaded into a slot, streamed from host).\n# TYPE spark_residency_expert_slices_total counter\nspark_residency_expert_slices_total{{source=\"hit\"}} {}\nspark_residency_expert_slices_total{{source=\"load\"}} {}\nspark_residency_expert_slices_total{{source=\"stream\"}} {}", r.hits, r.loads, r.streamed);
                let _ = writeln!(out, "# HELP spark_residency_bytes_total Bytes the provider copied, by source.\n# TYPE spark_residency_bytes_total counter\nspark_residency_bytes_total{{source=\"slots\"}} {}\nspark_residency_bytes_total{{source=\"host\"}} {}", r.bytes_hit, r.bytes_host);
                let _ = writeln!(out, "# HELP spark_residency_hook_calls_total Scheduler hook calls, and how many the provider declined.\n# TYPE spark_residency_hook_calls_total counter\nspark_residency_hook_calls_total {}\nspark_residency_declined_total {}", r.calls, r.declined);
            }
        }
        out
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
        eprintln!(
            "spark: in-flight requests did not finish within {} s; closing them",
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
        let shutdown = async move {
            tokio::select! { _ = term.recv() => eprintln!("spark: SIGTERM, shutting down"), _ = int.recv() => eprintln!("spark: SIGINT, shutting down") }
        };
        serve(cfg, shutdown).await
    })
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
    let ram_total = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|t| crate::plan::hardware::parse_meminfo(&t))
        .map(|(total, _)| total)
        .unwrap_or(u64::MAX);
    let residency = match cfg.residency {
        true => Some(residency_setup(&cfg, &geometry)?),
        false => None,
    };
    let choose = |reserve_mib: u64| {
        placement::choose(
            &file,
            &geometry,
            cfg.vram_budget_mib.map(|b| b - reserve_mib),
            cfg.ctx,
            &cfg.llama_args,
            ram_total,
        )
    };
    let placement = match &residency {
        None => choose(0)?,
        Some(r) => {
            let moe_layers: Vec<u32> = geometry.moe_layers.iter().map(|l| l.layer).collect();
            let mut p = place_with_slots(r, &moe_layers, choose)?;
            p.budget_mib = cfg.vram_budget_mib;
            p
        }
    };
    drop(file);
    eprintln!(
        "spark: placement {:?}: llama-server {}{}",
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
    let addr = format!("{}:{}", cfg.host, cfg.port);
    let tcp = tokio::net::TcpListener::bind(&addr)
        .await
        .map_err(|source| ServeError::Listen {
            addr: addr.clone(),
            source,
        })?;
    let listen = tcp.local_addr()?;
    std::fs::create_dir_all(&cfg.work_dir)?;

    let server_cfg = LlamaServerConfig {
        binary: cfg.engine.llama_server.clone(),
        model: cfg.model.clone(),
        port: None,
        extra_args: placement
            .flags
            .iter()
            .chain(&cfg.llama_args)
            .cloned()
            .collect(),
        env: residency.as_ref().map_or_else(Vec::new, |r| r.env.clone()),
        ready_timeout: cfg.ready_timeout,
        log_path: cfg.work_dir.join("llama-server.log"),
    };
    let prefix = cfg.forward_log.then(|| "[llama-server] ".to_string());
    let backoff = cfg.backoff;
    let health = cfg.health;
    let (live, launcher, live_thread) = match &cfg.tap {
        Some(tap) if geometry.is_moe() => {
            let (handle, launcher, thread) = start_live(&cfg, &geometry, tap.clone())?;
            (Some(handle), Some(launcher), Some(thread))
        }
        Some(_) => {
            eprintln!(
                "spark: {} has no MoE layers: serving without routing statistics",
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
    });
    eprintln!(
        "spark: serving {} on http://{listen} (llama-server pid {})",
        cfg.model.display(),
        keeper.state.pid.load(Ordering::Acquire)
    );

    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut tasks = tokio::task::JoinSet::new();
    let mut backoff = listener::AcceptBackoff::default();
    tokio::pin!(shutdown);
    'accept: loop {
        tokio::select! {
            accepted = tcp.accept() => match accepted {
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
                        eprintln!("spark: accept failed: {e}{times}; pausing accepts for {} ms", pause.sleep.as_millis());
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

/// Slots per MoE layer of the shadow cache, and of the VRAM cache with `--residency`.
fn shadow_slots(cfg: &ServeConfig, geometry: &MoeGeometry) -> u32 {
    cfg.cache_slots
        .unwrap_or(2 * geometry.n_expert_used)
        .min(geometry.n_expert)
        .max(1)
}

/// What `--residency` adds to a serve run.
struct ResidencySetup {
    slots: u64,
    /// Bytes of one slot in each MoE layer (every expert tensor's slice plus the padding
    /// stock copies after it).
    slot_bytes: Vec<(u32, u64)>,
    /// For llama-server: the provider's slot count and the scheduler setting that sends
    /// decode's expert matrix products to the GPU (so the hook sees them).
    env: Vec<(String, String)>,
}

impl ResidencySetup {
    /// VRAM the slots of `layers` take, MiB.
    fn mib(&self, layers: &[u32]) -> u64 {
        let bytes: u64 = self
            .slot_bytes
            .iter()
            .filter(|(l, _)| layers.contains(l))
            .map(|(_, b)| b)
            .sum();
        (self.slots * bytes).div_ceil(1 << 20)
    }
}

/// Places the model with VRAM kept for the slots. First with slots for every MoE layer (the
/// most the provider could allocate), then, since the provider only allocates for layers
/// whose experts stay in host memory, with slots for those layers only; more budget never
/// moves more layers to the host, so the second placement needs at most what it reserves
/// (checked, else the first stands).
fn place_with_slots(
    r: &ResidencySetup,
    moe_layers: &[u32],
    choose: impl Fn(u64) -> Result<placement::ServePlacement, placement::Refused>,
) -> Result<placement::ServePlacement, placement::Refused> {
    let host_of =
        |p: &placement::ServePlacement| placement::host_expert_layers(p.placement, moe_layers);
    let first_mib = r.mib(moe_layers);
    let first = choose(first_mib)?;
    let needed = r.mib(&host_of(&first));
    let (mut p, reserved) = if needed < first_mib {
        match choose(needed) {
            Ok(second) if r.mib(&host_of(&second)) <= needed => (second, needed),
            _ => (first, first_mib),
        }
    } else {
        (first, first_mib)
    };
    let host = host_of(&p);
    if host.is_empty() {
        eprintln!("spark: residency: every expert fits in VRAM at this budget; the provider has nothing to serve");
    } else {
        eprintln!(
            "spark: residency: {} slots per expert layer in {} host-resident expert layers, {} MiB of VRAM kept for them",
            r.slots,
            host.len(),
            r.mib(&host)
        );
    }
    p.residency_mib = Some(reserved);
    Ok(p)
}

fn residency_setup(
    cfg: &ServeConfig,
    geometry: &MoeGeometry,
) -> Result<ResidencySetup, ServeError> {
    if !geometry.is_moe() {
        return Err(ServeError::Usage(format!(
            "--residency: {} has no MoE layers",
            cfg.model.display()
        )));
    }
    let Some(budget) = cfg.vram_budget_mib else {
        return Err(ServeError::Usage(
            "--residency needs --vram-budget: the slots and the placement share it".into(),
        ));
    };
    let slots = u64::from(shadow_slots(cfg, geometry));
    let slot_bytes = geometry
        .moe_layers
        .iter()
        .map(|l| {
            let b = l
                .tensors
                .iter()
                .map(|t| t.slice_bytes + t.slice_bytes.min(512))
                .sum::<u64>();
            (l.layer, b)
        })
        .collect();
    let mut env = vec![(ENV_RESIDENCY_SLOTS.to_string(), slots.to_string())];
    if std::env::var_os(ENV_OFFLOAD_MIN_BATCH).is_none() {
        env.push((ENV_OFFLOAD_MIN_BATCH.into(), "1".into()));
    }
    let r = ResidencySetup {
        slots,
        slot_bytes,
        env,
    };
    let all: Vec<u32> = geometry.moe_layers.iter().map(|l| l.layer).collect();
    let slot_mib = r.mib(&all);
    if slot_mib >= budget {
        return Err(ServeError::Usage(format!(
            "--residency: {slots} slots per layer take {slot_mib} MiB, the whole --vram-budget of {budget} MiB; lower --cache-slots or raise the budget"
        )));
    }
    eprintln!(
        "spark: residency: {slots} slots per expert layer (at most {slot_mib} MiB of VRAM), policy {}",
        cfg.cache_policy.name()
    );
    Ok(r)
}

/// Loads the profile (when `--spark`), starts the live thread, and builds the launcher that
/// gives every llama-server child the tap, a fresh ring and a control channel.
fn start_live(
    cfg: &ServeConfig,
    geometry: &MoeGeometry,
    tap: PathBuf,
) -> Result<
    (
        LiveHandle,
        crate::supervisor::Launcher,
        std::thread::JoinHandle<()>,
    ),
    anyhow::Error,
> {
    for stale in crate::ring::remove_stale_rings(std::path::Path::new("/dev/shm")) {
        eprintln!(
            "spark: removed {} left by a run that was killed",
            stale.display()
        );
    }
    let fingerprint = geometry.fingerprint.to_string();
    let (start_profile, profile_start) = match &cfg.profile {
        Some(path) => load_profile(path, geometry, &fingerprint)?,
        None => (None, "off".to_string()),
    };
    let k = geometry.n_expert_used as usize;
    let live_cfg = live::LiveConfig {
        n_layer: geometry.n_layer as usize,
        n_expert: geometry.n_expert as usize,
        k,
        slots: shadow_slots(cfg, geometry),
        residency: cfg.residency,
        policy: cfg.cache_policy,
        window: 2048,
        half_life: 256.0,
        profile_path: cfg.profile.clone(),
        fingerprint,
        start_profile,
    };
    let (runner, shared) = live::Live::new(live_cfg.clone());
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

/// Reads the profile at `path` for a model with this fingerprint. A profile of another model
/// is kept as `<path>.stale` (`.stale.1`, … when taken: never overwritten) and ignored, with a
/// warning; one that cannot be read or parsed (a count out of range, a fraction,
/// `n_expert_used=0`…) is an error (exit 2): its counts would seed the placement.
fn load_profile(
    path: &std::path::Path,
    geometry: &MoeGeometry,
    fingerprint: &str,
) -> Result<(Option<crate::profile::Profile>, String), crate::profile::ProfileError> {
    use crate::profile::{Freshness, Profile};
    if !path.exists() {
        return Ok((None, "new".into()));
    }
    let set_aside = |why: &str| match crate::profile::set_aside(path) {
        Ok(stale) => eprintln!(
            "spark: warning: profile {} {why}; kept as {} and starting fresh",
            path.display(),
            stale.display()
        ),
        Err(e) => eprintln!(
            "spark: warning: profile {} {why}; could not move it aside ({e}); starting fresh",
            path.display()
        ),
    };
    Ok(match Profile::read(path) {
        Err(e) => return Err(e),
        Ok(p) => match p.freshness(fingerprint) {
            Freshness::Fresh
                if p.n_layer() == geometry.n_layer as usize
                    && p.n_expert() == geometry.n_expert as usize =>
            {
                eprintln!(
                    "spark: loaded profile {} ({} tokens)",
                    path.display(),
                    p.tokens.unwrap_or(0)
                );
                (Some(p), "fresh".into())
            }
            Freshness::Unknown
                if p.n_layer() == geometry.n_layer as usize
                    && p.n_expert() == geometry.n_expert as usize =>
            {
                eprintln!("spark: warning: profile {} has no model fingerprint; its shape matches, so it is used and will be stamped", path.display());
                (Some(p), "unknown".into())
            }
            Freshness::Stale(other) => {
                set_aside(&format!("belongs to another model ({other})"));
                (None, "stale".into())
            }
            _ => {
                set_aside("does not match the model's shape");
                (None, "stale".into())
            }
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::fit::{Placement, Usage};

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

    fn placed(placement: Placement) -> placement::ServePlacement {
        placement::ServePlacement {
            placement,
            ctx: 4096,
            budget_mib: None,
            usage: Usage {
                vram_bytes: 0,
                host_bytes: 0,
            },
            flags: vec![],
            user_overrides: vec![],
            residency_mib: None,
        }
    }

    fn setup() -> ResidencySetup {
        ResidencySetup {
            slots: 4,
            // 8 MoE layers of 1 MiB per slot: 4 MiB per layer for 4 slots
            slot_bytes: (0..8).map(|l| (l, 1 << 20)).collect(),
            env: vec![],
        }
    }

    #[test]
    fn slots_are_kept_only_for_the_layers_whose_experts_stay_on_the_host() {
        let layers: Vec<u32> = (0..8).collect();
        // A planner that moves one more layer's experts to the host per 10 MiB reserved.
        let choose = |reserve: u64| {
            Ok(placed(Placement::CpuMoe {
                n: 2 + (reserve / 10) as u32,
            }))
        };
        let p = place_with_slots(&setup(), &layers, choose).unwrap();
        // All 8 layers: 32 MiB → 5 host layers → 20 MiB → 4 host layers (16 MiB ≤ 20).
        assert_eq!(p.placement, Placement::CpuMoe { n: 4 });
        assert_eq!(p.residency_mib, Some(20));

        // Everything fits on the GPU once less is reserved: the slots of the one host layer
        // the first placement had stay reserved (conservative), and no layer needs them.
        let choose = |reserve: u64| {
            Ok(placed(if reserve >= 30 {
                Placement::CpuMoe { n: 1 }
            } else {
                Placement::AllGpu
            }))
        };
        let p = place_with_slots(&setup(), &layers, choose).unwrap();
        assert_eq!((p.placement, p.residency_mib), (Placement::AllGpu, Some(4)));
    }

    #[test]
    fn a_planner_that_moves_more_layers_with_more_budget_keeps_the_first_placement() {
        let layers: Vec<u32> = (0..8).collect();
        // Perverse planner: less reserved → more host layers; the second placement would need
        // more than it reserves, so the conservative first one stands.
        let choose = |reserve: u64| {
            Ok(placed(Placement::CpuMoe {
                n: 8 - (reserve / 8) as u32,
            }))
        };
        let p = place_with_slots(&setup(), &layers, choose).unwrap();
        assert_eq!(p.placement, Placement::CpuMoe { n: 4 });
        assert_eq!(p.residency_mib, Some(32));
    }
}
