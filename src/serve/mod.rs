//! `spark serve`: wraps llama-server so clients talk to spark exactly as they would talk to
//! llama-server, while spark keeps the child alive and reports on every request.
//!
//! Owns the serve loop: the listener, graceful shutdown (stop accepting, let in-flight requests
//! finish within a grace period, then stop the child), `/spark/status` and `/spark/metrics`.
//! Process lifecycle lives in [`crate::supervisor`]; forwarding in [`proxy`].

pub mod cli;
pub mod proxy;
pub mod stats;

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};

use crate::engine::Engine;
use crate::gguf::{GgufFile, MoeGeometry};
use crate::supervisor::{Backoff, Keeper, LlamaServerConfig, ServerError};
use stats::Stats;

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("listen on {addr}: {source}")]
    Listen { addr: String, source: std::io::Error },
    #[error(transparent)]
    Server(#[from] ServerError),
    #[error("start the async runtime: {0}")]
    Runtime(std::io::Error),
}

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
}

/// State shared by every connection.
pub struct ServeState {
    pub keeper: Arc<crate::supervisor::KeeperState>,
    pub stats: Stats,
    pub client: Client<HttpConnector, Incoming>,
    pub request_timeout: Duration,
    pub idle_timeout: Duration,
    pub model: PathBuf,
    pub geometry: MoeGeometry,
    pub engine: Engine,
    pub started: Instant,
    pub completed: AtomicU64,
    pub listen: SocketAddr,
}

impl ServeState {
    /// Called once per request whose answer reached the client whole.
    pub fn request_completed(&self) {
        self.completed.fetch_add(1, Ordering::AcqRel);
    }

    pub fn status_json(&self) -> Value {
        let k = &self.keeper;
        let last_exit = k.last_exit.lock().unwrap_or_else(|e| e.into_inner()).clone();
        json!({
            "model": self.model.display().to_string(),
            "fingerprint": self.geometry.fingerprint.to_string(),
            "architecture": self.geometry.architecture,
            "geometry": {"n_layer": self.geometry.n_layer, "n_expert": self.geometry.n_expert, "n_expert_used": self.geometry.n_expert_used, "moe_layers": self.geometry.moe_layers.len()},
            "engine": {"llama_server": self.engine.llama_server.display().to_string(), "variant": "stock", "version": crate::engine::ENGINE_VERSION},
            "listen": self.listen.to_string(),
            "uptime_s": self.started.elapsed().as_secs_f64(),
            "child": {"pid": k.pid.load(Ordering::Acquire), "port": k.port(), "ready": k.port().is_some(), "restarts": k.restarts.load(Ordering::Acquire), "last_exit": last_exit},
            "requests": self.stats.to_json(),
            "completed_requests": self.completed.load(Ordering::Acquire),
        })
    }

    pub fn metrics_text(&self) -> String {
        let mut out = String::new();
        self.stats.prometheus(&mut out);
        use std::fmt::Write as _;
        let k = &self.keeper;
        let _ = writeln!(out, "# HELP spark_child_restarts_total Times llama-server was restarted.\n# TYPE spark_child_restarts_total counter\nspark_child_restarts_total {}", k.restarts.load(Ordering::Acquire));
        let _ = writeln!(out, "# HELP spark_child_up Whether llama-server is ready.\n# TYPE spark_child_up gauge\nspark_child_up {}", u8::from(k.port().is_some()));
        out
    }
}

/// Runs `spark serve` on its own runtime until SIGINT or SIGTERM.
pub fn run_until_signal(cfg: ServeConfig) -> Result<(), anyhow::Error> {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().map_err(ServeError::Runtime)?;
    rt.block_on(async move {
        let shutdown = async {
            use tokio::signal::unix::{signal, SignalKind};
            let mut term = signal(SignalKind::terminate()).expect("install SIGTERM handler");
            let mut int = signal(SignalKind::interrupt()).expect("install SIGINT handler");
            tokio::select! { _ = term.recv() => eprintln!("spark: SIGTERM, shutting down"), _ = int.recv() => eprintln!("spark: SIGINT, shutting down") }
        };
        serve(cfg, shutdown).await
    })
}

/// Serves until `shutdown` resolves, then drains in-flight requests for up to the grace period
/// and stops the child.
pub async fn serve(cfg: ServeConfig, shutdown: impl Future<Output = ()>) -> Result<(), anyhow::Error> {
    let file = GgufFile::open(&cfg.model)?;
    let geometry = MoeGeometry::of(&file)?;
    drop(file);
    let addr = format!("{}:{}", cfg.host, cfg.port);
    let listener = tokio::net::TcpListener::bind(&addr).await.map_err(|source| ServeError::Listen { addr: addr.clone(), source })?;
    let listen = listener.local_addr()?;
    std::fs::create_dir_all(&cfg.work_dir)?;

    let server_cfg = LlamaServerConfig {
        binary: cfg.engine.llama_server.clone(),
        model: cfg.model.clone(),
        port: None,
        extra_args: cfg.llama_args.clone(),
        env: vec![],
        ready_timeout: cfg.ready_timeout,
        log_path: cfg.work_dir.join("llama-server.log"),
    };
    let prefix = cfg.forward_log.then(|| "[llama-server] ".to_string());
    let backoff = cfg.backoff;
    let mut keeper = tokio::task::spawn_blocking(move || Keeper::start(server_cfg, backoff, prefix)).await??;
    let state = Arc::new(ServeState {
        keeper: keeper.state.clone(),
        stats: Stats::default(),
        client: proxy::client(),
        request_timeout: cfg.request_timeout,
        idle_timeout: cfg.idle_timeout,
        model: cfg.model.clone(),
        geometry,
        engine: cfg.engine.clone(),
        started: Instant::now(),
        completed: AtomicU64::new(0),
        listen,
    });
    eprintln!("spark: serving {} on http://{listen} (llama-server pid {})", cfg.model.display(), keeper.state.pid.load(Ordering::Acquire));

    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, _) = match accepted {
                    Ok(a) => a,
                    Err(e) => { eprintln!("spark: accept failed: {e}"); continue; }
                };
                let _ = stream.set_nodelay(true);
                let st = state.clone();
                let conn = http1::Builder::new().serve_connection(TokioIo::new(stream), service_fn(move |req| proxy::handle(st.clone(), req)));
                let conn = graceful.watch(conn);
                tokio::spawn(async move { let _ = conn.await; });
            }
            _ = &mut shutdown => break,
        }
    }
    drop(listener);
    if tokio::time::timeout(cfg.grace, graceful.shutdown()).await.is_err() {
        eprintln!("spark: in-flight requests did not finish within {} s; closing them", cfg.grace.as_secs());
    }
    tokio::task::spawn_blocking(move || keeper.stop()).await?;
    Ok(())
}
