//! The flags of `spark serve` and their resolution into a [`ServeConfig`].

use std::path::PathBuf;
use std::time::Duration;

use crate::engine::Engine;
use crate::supervisor::{Backoff, Health};

use super::ServeConfig;

/// Flags of `spark serve` (raw, as typed).
#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    /// The GGUF model llama-server serves (also `SPARK_MODEL`, then `LLAMA_ARG_MODEL`)
    #[arg(short = 'm', long = "model")]
    pub model: PathBuf,
    /// Addresses to listen on, separated by commas as llama-server takes them
    /// (`127.0.0.1,::1`; also `SPARK_HOST`, then `LLAMA_ARG_HOST`)
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Port to listen on (0: any free port; also `SPARK_PORT`, then `LLAMA_ARG_PORT`)
    #[arg(long, default_value_t = 8080)]
    pub port: u16,
    /// llama-server binary (default: $SPARK_LLAMA_SERVER, then the build in the cache)
    #[arg(long, value_name = "PATH")]
    pub llama_server: Option<PathBuf>,
    /// Seconds to wait for llama-server to become ready
    #[arg(long, default_value_t = 120)]
    pub ready_timeout: u64,
    /// Seconds to wait for the headers of an answer
    #[arg(long, default_value_t = 600, value_parser = clap::value_parser!(u64).range(1..))]
    pub request_timeout: u64,
    /// Seconds of silence allowed inside a streamed answer
    #[arg(long, default_value_t = 300)]
    pub idle_timeout: u64,
    /// Seconds in-flight requests get to finish on SIGINT/SIGTERM (llama-server is stopped
    /// within what is left of them, at least 1 s)
    #[arg(long, default_value_t = 10)]
    pub grace: u64,
    /// Client connections served at once; more are answered 503 with Retry-After
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_connections: u32,
    /// Seconds a client connection may take to send a request's headers (idle keep-alive
    /// connections included); then it is closed
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..))]
    pub header_timeout: u64,
    /// Seconds a request's body may take to arrive after its headers; a slower one is
    /// answered 408
    #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..))]
    pub body_timeout: u64,
    /// Largest request body, MiB; a larger one is answered 413
    #[arg(long, value_name = "MiB", default_value_t = 32, value_parser = clap::value_parser!(u64).range(1..))]
    pub max_body: u64,
    /// Seconds llama-server may fail every health probe before it is killed and restarted
    /// (0: no health probes)
    #[arg(long, default_value_t = 30)]
    pub hang_timeout: u64,
    /// Don't print llama-server's log lines
    #[arg(long)]
    pub quiet: bool,
    /// Learn the routing profile: load `<model>.gguf.spark.csv` when it belongs to this model and rewrite
    /// it after every completed request that routed tokens
    #[arg(long)]
    pub spark: bool,
    /// Profile path instead of `<model>.gguf.spark.csv` (with --spark)
    #[arg(long, value_name = "PATH", requires = "spark")]
    pub profile: Option<PathBuf>,
    /// Run llama-server without the routing tap (a plain proxy: no routing statistics)
    #[arg(long, conflicts_with = "spark")]
    pub no_tap: bool,
    /// The tap library (default: $SPARK_TAP, then next to the spark binary)
    #[arg(long, value_name = "PATH", conflicts_with = "no_tap")]
    pub tap: Option<PathBuf>,
    /// Slots per MoE layer of the shadow cache (default: 2 × experts per token, at most the
    /// model's experts per layer); more than the model has is refused
    #[arg(long, conflicts_with = "no_tap", value_parser = clap::value_parser!(u32).range(1..))]
    pub cache_slots: Option<u32>,
    /// Serve experts from VRAM slots through the hooked engine's scheduler hook
    /// (`scripts/build-engine --cuda --hooked`): `--cache-slots` slots per expert layer,
    /// following the shadow cache's policy; their VRAM comes out of `--vram-budget`
    #[arg(long, conflicts_with = "no_tap")]
    pub residency: bool,
    /// With --residency: the card (a `spark plan --gpu` preset) whose VRAM and link bandwidths
    /// decide whether residency pays here; without it (or --vram-bw and --h2d-bw) serve runs
    /// the slots it is given and says it did not decide
    #[arg(long, value_name = "CARD", requires = "residency")]
    pub gpu: Option<String>,
    /// With --residency: the GPU's VRAM bandwidth, GB/s (overrides --gpu's)
    #[arg(long, value_name = "GB/s", requires = "residency")]
    pub vram_bw: Option<f64>,
    /// With --residency: host-to-device bandwidth, GB/s (overrides --gpu's)
    #[arg(long, value_name = "GB/s", requires = "residency")]
    pub h2d_bw: Option<f64>,
    /// Where host-resident expert weights live under `--residency`: `auto` pins them
    /// (llama-server `--load-mode none`, the GPU backend's pinned host buffer) when they fit in
    /// available RAM and maps them otherwise, `pinned` refuses to start (exit 3) when they
    /// cannot fit, `mapped` keeps llama.cpp's memory map; a `--load-mode` after `--` wins
    #[arg(long, value_enum, value_name = "MODE", requires = "residency")]
    pub host_memory: Option<super::host_memory::HostMemoryChoice>,
    /// VRAM spark may plan for, MiB (none: a CPU-only placement)
    #[arg(long, value_name = "MiB")]
    pub vram_budget: Option<u64>,
    /// Context length the KV cache is planned for (a `-c` after `--` wins)
    #[arg(long, default_value_t = 4096)]
    pub ctx: u64,
    /// Policy of the shadow cache
    #[arg(long, value_enum, default_value = "spark", conflicts_with = "no_tap")]
    pub cache_policy: crate::cache::PolicyKind,
    /// Arguments for llama-server, after `--`; they win over spark's choices
    #[arg(last = true)]
    pub llama_args: Vec<String>,
}

impl ServeArgs {
    /// Resolves the flags: finds the engine and (unless `--no-tap`) the tap.
    pub fn resolve(self, work_dir: PathBuf) -> Result<ServeConfig, anyhow::Error> {
        super::listener::hosts(&self.host).map_err(super::ServeError::Usage)?;
        let engine = Engine::locate(self.llama_server.as_deref())?;
        if self.residency && !engine.is_hooked() {
            return Err(super::ServeError::Usage(format!(
                "--residency needs the hooked engine (scripts/build-engine --cuda --hooked); {} is the {} build",
                engine.llama_server.display(),
                engine.variant()
            ))
            .into());
        }
        let tap = if self.no_tap {
            None
        } else {
            Some(crate::telemetry::locate_tap(self.tap.as_deref())?)
        };
        let profile = self.spark.then(|| {
            self.profile
                .clone()
                .unwrap_or_else(|| crate::profile::path_for(&self.model))
        });
        Ok(ServeConfig {
            model: self.model,
            engine,
            host: self.host,
            port: self.port,
            llama_args: self.llama_args,
            env: Vec::new(),
            ready_timeout: Duration::from_secs(self.ready_timeout),
            request_timeout: Duration::from_secs(self.request_timeout),
            idle_timeout: Duration::from_secs(self.idle_timeout),
            grace: Duration::from_secs(self.grace),
            work_dir,
            forward_log: !self.quiet,
            backoff: Backoff::default(),
            health: (self.hang_timeout > 0)
                .then(|| Health::with_hang_timeout(Duration::from_secs(self.hang_timeout))),
            limits: super::Limits {
                max_connections: self.max_connections as usize,
                header_timeout: Duration::from_secs(self.header_timeout),
                max_body: self.max_body.saturating_mul(1 << 20),
                body_timeout: Duration::from_secs(self.body_timeout),
            },
            tap,
            profile,
            cache_slots: self.cache_slots,
            residency: self.residency,
            residency_gpu: crate::plan::residency::ServeGpu {
                card: self.gpu,
                vram_gbps: self.vram_bw,
                h2d_gbps: self.h2d_bw,
            },
            host_memory: self
                .host_memory
                .unwrap_or(super::host_memory::HostMemoryChoice::Auto),
            cache_policy: self.cache_policy,
            vram_budget_mib: self.vram_budget,
            ctx: self.ctx,
        })
    }
}
