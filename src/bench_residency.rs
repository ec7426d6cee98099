//! `spark bench residency`: decode tokens/s of one model under four expert placements, measured
//! with the pinned llama-bench, and the residency provider's counters.
//!
//! Owns the four configurations — which llama-bench binary, which flags, which environment —
//! the choice of slots per expert layer, and the reading of the tap's residency exit line
//! (`spark_proto::control::RESIDENCY_EXIT_PREFIX`) from llama-bench's stderr:
//!
//! - (a) `vram`: stock llama-bench, every tensor in VRAM;
//! - (b) `host`: stock, `-ncmoe <n_layer>` (every layer's experts in host memory);
//! - (c) `host-copy`: as (b) with `GGML_OP_OFFLOAD_MIN_BATCH=1`, so the scheduler runs decode's
//!   expert matmuls on the GPU and copies the experts it uses every step;
//! - (d) `spark`: the hooked build as (c), with the tap preloaded as the residency provider
//!   (`SPARK_RESIDENCY_SLOTS`; no ring, no control channel).
//!
//! A benchmark: it reports numbers, and the target next to the measured ratio, and
//! asserts none. Never spawns a process itself: llama-bench and nvidia-smi run through
//! [`crate::supervisor::run_with_deadline`]. On a CPU build nothing is offloaded, so the four
//! rows measure the same thing and the hook never runs; the command still works end to end.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde::Serialize;
use spark_proto::control::{ResidencyStats, RESIDENCY_EXIT_PREFIX};
use spark_proto::ring::{ENV_CONTROL_FD, ENV_HIDDEN_RING_FD, ENV_RING_FD};

use crate::engine::{self, Backend, Engine, EngineError};
use crate::gguf::{GgufError, GgufFile, MoeGeometry};
use crate::plan::receipt::{BenchRow, BenchSpec};
use crate::plan::{run_llama_bench_with, PlanError};
use crate::supervisor::run_with_deadline;
use crate::telemetry::{locate_tap, TelemetryError};

pub use spark_proto::hook::{ENV_OFFLOAD_MIN_BATCH, ENV_RESIDENCY_METER, ENV_RESIDENCY_SLOTS};
/// The goal for (d) against (b), printed next to the measurement, never checked.
pub const TARGET: &str = "(d) >= 1.5x (b)";
const TARGET_RATIO: f64 = 1.5;

/// One of the four placements.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, clap::ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Config {
    /// (a) stock, experts in VRAM
    #[value(alias = "a")]
    Vram,
    /// (b) stock, every layer's experts in host memory
    #[value(alias = "b")]
    Host,
    /// (c) as (b), decode's expert matmuls on the GPU with per-step expert copies
    #[value(alias = "c")]
    HostCopy,
    /// (d) hooked build with the tap as residency provider
    #[value(alias = "d")]
    Spark,
}

impl Config {
    pub fn name(self) -> &'static str {
        match self {
            Config::Vram => "vram",
            Config::Host => "host",
            Config::HostCopy => "host-copy",
            Config::Spark => "spark",
        }
    }

    pub fn letter(self) -> char {
        match self {
            Config::Vram => 'a',
            Config::Host => 'b',
            Config::HostCopy => 'c',
            Config::Spark => 'd',
        }
    }

    fn stock(self) -> bool {
        self != Config::Spark
    }
}

#[derive(Debug, clap::Args)]
pub struct BenchResidencyArgs {
    /// The GGUF model (a MoE model)
    #[arg(short = 'm', long, value_name = "GGUF")]
    pub model: PathBuf,
    /// Tokens decoded per repetition (llama-bench -n; -p is 0)
    #[arg(long, default_value_t = 64)]
    pub tokens: u64,
    /// Repetitions per configuration (llama-bench -r)
    #[arg(long, default_value_t = 3)]
    pub reps: u32,
    /// CPU threads (llama-bench -t; default: the machine's logical CPUs)
    #[arg(long)]
    pub threads: Option<u32>,
    /// Seconds one llama-bench run may take before it is stopped (exit 124)
    #[arg(long, default_value_t = 600)]
    pub timeout: u64,
    /// Residency slots per expert layer for (d) (default: from --vram-budget, else n_expert/4
    /// rounded up)
    #[arg(long, conflicts_with = "vram_budget")]
    pub slots: Option<u32>,
    /// VRAM for (d)'s slots, MiB: slots per layer = budget ÷ one expert of every expert layer
    #[arg(long, value_name = "MiB")]
    pub vram_budget: Option<u64>,
    /// Configurations to measure, comma-separated: vram,host,host-copy,spark (or a,b,c,d)
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "vram,host,host-copy,spark"
    )]
    pub configs: Vec<Config>,
    /// llama-server whose build's llama-bench runs (a)-(c) (default: $SPARK_LLAMA_SERVER, then
    /// the cache's CUDA build, then its CPU build)
    #[arg(long, value_name = "PATH")]
    pub llama_server: Option<PathBuf>,
    /// Stock llama-bench for (a)-(c) (default: next to the located llama-server)
    #[arg(long, value_name = "PATH")]
    pub llama_bench: Option<PathBuf>,
    /// Hooked llama-bench for (d) (default: the hooked build of the same variant in the cache,
    /// as `scripts/build-engine --hooked` names it)
    #[arg(long, value_name = "PATH")]
    pub hooked_bench: Option<PathBuf>,
    /// The tap library (default: $SPARK_TAP, then next to the spark executable)
    #[arg(long, value_name = "PATH")]
    pub tap: Option<PathBuf>,
    /// Also measure the bytes copied host→device per decoded token for (c) and (d) at three
    /// slot counts, next to the hit ratio spark's LRU shadow cache predicts from the routing
    /// captured in the same run (needs the hooked build and the tap)
    #[arg(long)]
    pub bytes: bool,
    /// Slot counts for --bytes (default: n_expert/4, n_expert/2 and 3·n_expert/4, rounded up)
    #[arg(long, value_delimiter = ',', value_name = "N,N,N")]
    pub bytes_slots: Vec<u32>,
    /// Link bandwidth for the --bytes forecast, GB/s (default: PCIe 4.0 x16, one direction)
    #[arg(long, default_value_t = PCIE4_X16_GBPS, value_name = "GB/s")]
    pub link_gbps: f64,
    /// Print JSON
    #[arg(long)]
    pub json: bool,
}

/// PCIe 4.0 x16, one direction: 16 GT/s per lane × 16 lanes × 128b/130b encoding ÷ 8 bits
/// = 31.5 GB/s (the PCI-SIG PCIe 4.0 base specification's signalling rate and encoding; real
/// copies reach less, so the forecast is a lower bound on the time).
pub const PCIE4_X16_GBPS: f64 = 31.5;

#[derive(Debug, thiserror::Error)]
pub enum BenchResidencyError {
    #[error("{0}")]
    Usage(String),
    #[error(transparent)]
    Gguf(#[from] GgufError),
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error(transparent)]
    Telemetry(#[from] TelemetryError),
    #[error("find the hooked engine: no {variant} build at {}; run scripts/build-engine --hooked{flag} (or pass --hooked-bench PATH, or leave spark out of --configs)", path.display())]
    NoHooked {
        variant: String,
        path: PathBuf,
        flag: &'static str,
    },
    #[error("measure ({letter}) {config}: {source}")]
    Measure {
        letter: char,
        config: &'static str,
        source: PlanError,
    },
    #[error("measure ({letter}) {config}: llama-bench reported no decode result")]
    NoDecodeRow { letter: char, config: &'static str },
    #[error("create the routing ring for --bytes: {0}")]
    Ring(#[from] crate::ring::RingError),
}

impl BenchResidencyError {
    /// The exit code this error maps to (see [`crate::exit`]).
    pub fn exit_code(&self) -> i32 {
        match self {
            BenchResidencyError::Usage(_)
            | BenchResidencyError::Gguf(_)
            | BenchResidencyError::Engine(_)
            | BenchResidencyError::NoHooked { .. } => crate::exit::USAGE,
            BenchResidencyError::Telemetry(e) if e.is_usage() => crate::exit::USAGE,
            BenchResidencyError::Measure { source, .. } => source.exit_code(),
            _ => crate::exit::CHECK_FAILED,
        }
    }
}

/// One measured configuration.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub config: Config,
    pub letter: char,
    /// The build that ran: `cpu`, `cuda`, `cpu-hooked-<id>`…
    pub engine: String,
    pub llama_bench: PathBuf,
    pub n_gpu_layers: u32,
    pub n_cpu_moe: u32,
    /// Environment the run got beyond the inherited one (`NAME=value`).
    pub env: Vec<String>,
    /// llama-bench's mean decode tokens/s over the repetitions (`avg_ts`).
    pub tok_s: f64,
    /// Its standard deviation (`stddev_ts`).
    pub sd: f64,
    pub samples_ts: Vec<f64>,
    /// tok/s ÷ (b)'s, when (b) was measured.
    pub ratio_to_host: Option<f64>,
    /// llama-bench's backends and device (its JSON's `backends`, `gpu_info`).
    pub backends: String,
    pub gpu_info: String,
}

/// What (d)'s llama-bench said about residency when it exited.
#[derive(Debug, Clone, Serialize)]
pub struct Residency {
    /// The line as printed (after the prefix), when there was one.
    pub line: Option<String>,
    /// Why there are no counters (`no residency line`, or the parse error).
    pub note: Option<String>,
    /// The parsed counters by name (`slots`, `calls`, `hits`, `loads`, `streamed`, `bytes_hit`,
    /// `bytes_host`…).
    pub counters: Option<BTreeMap<String, u64>>,
    /// hits ÷ (hits + loads + streamed); none when no slice was served.
    pub hit_ratio: Option<f64>,
    /// bytes_host ÷ tokens decoded in the run (timed and warmup).
    pub host_bytes_per_token: Option<f64>,
    /// bytes_hit ÷ tokens decoded in the run.
    pub slot_bytes_per_token: Option<f64>,
}

/// The builds and library that ran.
#[derive(Debug, Clone, Serialize)]
pub struct Engines {
    pub stock: Option<EngineUsed>,
    pub hooked: Option<EngineUsed>,
    pub tap: Option<PathBuf>,
    /// The hook key this spark was built with (`scripts/build-engine --hooked` uses the same).
    pub hook_id: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct EngineUsed {
    pub variant: String,
    pub llama_bench: PathBuf,
}

#[derive(Debug, Clone, Serialize)]
pub struct Target {
    pub goal: &'static str,
    /// (d) ÷ (b), when both were measured.
    pub measured: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    /// `nvidia-smi` name and memory per GPU, or `no GPU (…)`.
    pub gpu: String,
    /// llama-bench's `cpu_info`.
    pub cpu: String,
    /// Whether any llama-bench run used a GPU backend.
    pub ran_on_gpu: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct BenchResidencyReport {
    pub model: PathBuf,
    pub n_layer: u32,
    pub expert_layers: u32,
    pub n_expert: u32,
    pub n_expert_used: u32,
    pub tokens: u64,
    pub reps: u32,
    pub threads: u32,
    /// Tokens one llama-bench run decodes: `reps × tokens` timed plus the one-token warmup
    /// generation llama-bench runs first (its default; spark does not pass `--no-warmup`).
    pub decoded_per_run: u64,
    /// (d)'s slots per expert layer, when (d) ran.
    pub slots: Option<u32>,
    /// Where that number came from.
    pub slots_from: Option<String>,
    pub rows: Vec<Row>,
    pub target: Target,
    pub residency: Option<Residency>,
    pub engines: Engines,
    pub machine: Machine,
    /// `--bytes`: host→device bytes per decoded token, measured and predicted.
    pub bytes: Option<BytesReport>,
}

/// One `--bytes` run: (c) metered, or (d) at one slot count.
#[derive(Debug, Clone, Serialize)]
pub struct BytesRow {
    pub config: Config,
    /// Slots per expert layer ((d) only).
    pub slots: Option<u32>,
    /// Tokens the run decoded (warmup included), each one evaluation.
    pub decoded: u64,
    /// The provider's exit counters: hit ratio, host and slot bytes per decoded token. For (c)
    /// the meter's: every call declined, the stock copy's experts and bytes counted as
    /// streamed and `bytes_host`.
    pub residency: Residency,
    /// The hit ratio of spark's `lru` shadow cache, same slots, on the routing this very run
    /// captured ((d) only).
    pub predicted_hit_ratio: Option<f64>,
    /// Routing records the run's ring held (token × expert layer).
    pub ring_records: u64,
    /// Why a number is missing, when one is.
    pub note: Option<String>,
    /// Forecast: milliseconds per token the host bytes take at `--link-gbps`.
    pub link_ms_per_token: Option<f64>,
    /// The host bytes `spark plan --residency`'s byte model gives for the routing this run
    /// captured, replayed through the provider's slot rule (equal to the provider's
    /// `bytes_host` when the model is exact).
    pub forecast_bytes_host: Option<u64>,
}

/// The `--bytes` table.
#[derive(Debug, Clone, Serialize)]
pub struct BytesReport {
    pub link_gbps: f64,
    /// Whether the device is a CPU posing as one (Mesa's lavapipe / llvmpipe).
    pub cpu_device: bool,
    pub device: String,
    pub rows: Vec<BytesRow>,
}

/// The default `--bytes` slot counts: a quarter, a half and three quarters of the experts,
/// rounded up, at least 1, distinct.
pub fn default_bytes_slots(n_expert: u32) -> Vec<u32> {
    let mut v: Vec<u32> = [1u32, 2, 3]
        .iter()
        .map(|q| (n_expert * q).div_ceil(4).clamp(1, n_expert.max(1)))
        .collect();
    v.dedup();
    v
}

/// The hit ratio spark's `lru` shadow cache predicts for `records` (one run's routing, in ring
/// order) with `slots` per layer: each layer's records in order are that layer's steps, ids
/// ascending within a step as the provider serves them.
pub fn predict_hit_ratio(
    records: &[spark_proto::trace::RoutingRecord],
    n_layer: usize,
    n_expert: usize,
    slots: u32,
) -> Option<f64> {
    use crate::cache::Policy;
    let mut lru = crate::cache::Lru::new(n_expert, &vec![slots; n_layer]);
    let (mut used, mut misses) = (0u64, 0u64);
    let mut ids: Vec<u16> = Vec::new();
    for r in records {
        let layer = usize::from(r.layer);
        if layer >= n_layer {
            continue;
        }
        ids.clear();
        ids.extend(
            r.used_ids()
                .iter()
                .copied()
                .filter(|&e| usize::from(e) < n_expert),
        );
        ids.sort_unstable();
        ids.dedup();
        used += ids.len() as u64;
        misses += u64::from(lru.access(layer, &ids));
    }
    (used > 0).then(|| (used - misses) as f64 / used as f64)
}

/// Slots per expert layer and how they were chosen, for a model with `n` experts per layer and
/// `expert_bytes` (one expert's bytes) for each expert layer.
pub fn choose_slots(
    n: u32,
    expert_bytes: &[u64],
    slots: Option<u32>,
    vram_budget_mib: Option<u64>,
) -> Result<(u32, String), BenchResidencyError> {
    if let Some(s) = slots {
        if s == 0 || s > n {
            return Err(BenchResidencyError::Usage(format!(
                "parse --slots {s}: must be between 1 and the model's {n} experts"
            )));
        }
        return Ok((s, "--slots".into()));
    }
    if let Some(mib) = vram_budget_mib {
        let per_slot: u64 = expert_bytes.iter().sum();
        let budget = mib.saturating_mul(1 << 20);
        let fit = budget / per_slot.max(1);
        if fit == 0 {
            return Err(BenchResidencyError::Usage(format!(
                "size slots from --vram-budget {mib}: one slot in each of {} expert layers needs {}",
                expert_bytes.len(),
                crate::plan::fit::mib(per_slot)
            )));
        }
        let s = fit.min(u64::from(n)) as u32;
        let capped = if fit > u64::from(n) {
            format!(", capped at the {n} experts")
        } else {
            String::new()
        };
        return Ok((
            s,
            format!(
                "--vram-budget {mib} MiB ÷ {} per slot across {} expert layers{capped}",
                crate::plan::fit::mib(per_slot),
                expert_bytes.len()
            ),
        ));
    }
    Ok((
        n.div_ceil(4).max(1),
        "default: n_expert/4 rounded up".into(),
    ))
}

/// Finds the tap's exit line in `stderr` and reads it; `decoded` is the tokens the run decoded.
pub fn residency_from_stderr(stderr: &str, decoded: u64) -> Residency {
    let line = stderr
        .lines()
        .rev()
        .find_map(|l| l.trim_end().strip_prefix(RESIDENCY_EXIT_PREFIX))
        .map(str::to_string);
    let Some(text) = line else {
        return Residency {
            line: None,
            note: Some("no residency line".into()),
            counters: None,
            hit_ratio: None,
            host_bytes_per_token: None,
            slot_bytes_per_token: None,
        };
    };
    match ResidencyStats::parse(&text) {
        Ok(s) => {
            let counters = s
                .to_text()
                .split_ascii_whitespace()
                .filter_map(|w| {
                    let (k, v) = w.split_once('=')?;
                    Some((k.to_string(), v.parse().ok()?))
                })
                .collect();
            let per = |b: u64| (decoded > 0).then(|| b as f64 / decoded as f64);
            Residency {
                line: Some(text),
                note: None,
                counters: Some(counters),
                hit_ratio: s.hit_ratio(),
                host_bytes_per_token: per(s.bytes_host),
                slot_bytes_per_token: per(s.bytes_hit),
            }
        }
        Err(e) => Residency {
            note: Some(format!("unreadable residency line: {e}")),
            line: Some(text),
            counters: None,
            hit_ratio: None,
            host_bytes_per_token: None,
            slot_bytes_per_token: None,
        },
    }
}

/// What runs a configuration.
struct Runner {
    bench: PathBuf,
    variant: String,
}

fn located_bench(path: &Path, what: &str) -> Result<Runner, BenchResidencyError> {
    if !path.is_file() {
        return Err(BenchResidencyError::Usage(format!(
            "find {what}: {} does not exist",
            path.display()
        )));
    }
    Ok(Runner {
        bench: path.to_path_buf(),
        variant: Engine::of_bench(path).variant(),
    })
}

fn stock_runner(a: &BenchResidencyArgs) -> Result<Runner, BenchResidencyError> {
    if let Some(p) = &a.llama_bench {
        return located_bench(p, "llama-bench");
    }
    let e = Engine::locate_prefer_cuda(a.llama_server.as_deref())?;
    let bench = e.llama_bench.clone().ok_or_else(|| {
        BenchResidencyError::Usage(format!(
            "find llama-bench: not next to {}; pass --llama-bench PATH",
            e.llama_server.display()
        ))
    })?;
    Ok(Runner {
        bench,
        variant: e.variant(),
    })
}

fn hooked_runner(
    a: &BenchResidencyArgs,
    stock: Option<&Runner>,
) -> Result<Runner, BenchResidencyError> {
    if let Some(p) = &a.hooked_bench {
        return located_bench(p, "the hooked llama-bench");
    }
    // The hooked build of the stock build's backend; without one, CUDA when it is built.
    let backend = match stock.and_then(|r| Backend::of_variant(&r.variant)) {
        Some(b) => b,
        None if engine::is_built(Backend::Cuda, false) => Backend::Cuda,
        None => Backend::Cpu,
    };
    let prefix = engine::prefix(backend, true);
    let bench = prefix.join("bin").join("llama-bench");
    if !prefix.join(".spark-built").exists() || !bench.is_file() {
        return Err(BenchResidencyError::NoHooked {
            variant: engine::variant_name(backend, true),
            path: prefix,
            flag: match backend {
                Backend::Cpu => "",
                Backend::Cuda => " --cuda",
                Backend::Vulkan => " --vulkan",
            },
        });
    }
    Ok(Runner {
        variant: Engine::of_bench(&bench).variant(),
        bench,
    })
}

/// The GPUs nvidia-smi names, or why there are none.
fn gpu_facts() -> String {
    let mut cmd = Command::new("nvidia-smi");
    cmd.args(["--query-gpu=name,memory.total", "--format=csv,noheader"]);
    match run_with_deadline(&mut cmd, Duration::from_secs(20)) {
        Ok(c) if c.status.success() => {
            let gpus: Vec<&str> = c
                .stdout
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .collect();
            if gpus.is_empty() {
                "no GPU (nvidia-smi lists none)".into()
            } else {
                gpus.join("; ")
            }
        }
        Ok(c) => format!(
            "no GPU (nvidia-smi exited with {}: {})",
            c.status,
            c.stderr_tail(1).trim()
        ),
        Err(e) if e.is_timeout() => "no GPU (nvidia-smi did not answer)".into(),
        Err(_) => "no GPU (nvidia-smi not found)".into(),
    }
}

/// Runs the selected configurations and gathers the report.
pub fn run(a: &BenchResidencyArgs) -> Result<BenchResidencyReport, BenchResidencyError> {
    let usage = |m: String| Err(BenchResidencyError::Usage(m));
    if a.tokens == 0 {
        return usage("parse --tokens 0: must be at least 1".into());
    }
    if a.reps == 0 {
        return usage("parse --reps 0: must be at least 1".into());
    }
    if a.threads == Some(0) {
        return usage("parse --threads 0: must be at least 1".into());
    }
    if a.timeout == 0 {
        return usage("parse --timeout 0: must be at least 1 second".into());
    }
    let mut configs = a.configs.clone();
    configs.sort();
    configs.dedup();
    if configs.is_empty() {
        return usage("parse --configs: name at least one of vram, host, host-copy, spark".into());
    }
    let file = GgufFile::open(&a.model)?;
    let g = MoeGeometry::of(&file)?;
    drop(file);
    if !g.is_moe() {
        return usage(format!(
            "bench residency on {}: the model has no routed experts",
            a.model.display()
        ));
    }
    let want_spark = configs.contains(&Config::Spark);
    let stock = if configs.iter().any(|c| c.stock()) {
        Some(stock_runner(a)?)
    } else {
        None
    };
    if let Some(&bad) = a.bytes_slots.iter().find(|&&x| x == 0 || x > g.n_expert) {
        return usage(format!(
            "parse --bytes-slots {bad}: must be between 1 and the model's {} experts",
            g.n_expert
        ));
    }
    if !(a.link_gbps.is_finite() && a.link_gbps > 0.0) {
        return usage(format!(
            "parse --link-gbps {}: must be a positive number of GB/s",
            a.link_gbps
        ));
    }
    let (hooked, tap, slots) = if want_spark || a.bytes {
        let sizes: Vec<u64> = g.moe_layers.iter().map(|l| l.expert_bytes).collect();
        let slots = if want_spark {
            Some(choose_slots(g.n_expert, &sizes, a.slots, a.vram_budget)?)
        } else {
            None
        };
        // A stock build located only to pick the hooked variant: its absence is no error.
        let base = match &stock {
            Some(_) => None,
            None if a.hooked_bench.is_none() => stock_runner(a).ok(),
            None => None,
        };
        let h = hooked_runner(a, stock.as_ref().or(base.as_ref()))?;
        let tap = locate_tap(a.tap.as_deref())?;
        (Some(h), Some(tap), slots)
    } else {
        (None, None, None)
    };
    let threads = a.threads.unwrap_or_else(|| {
        std::thread::available_parallelism()
            .map(|n| n.get() as u32)
            .unwrap_or(1)
    });
    let decoded = a.tokens * u64::from(a.reps) + 1;
    let all_host = g.n_layer;
    let mut rows: Vec<Row> = Vec::new();
    let mut residency = None;
    let mut cpu = String::new();
    let mut ran_on_gpu = false;
    for (i, &c) in configs.iter().enumerate() {
        let runner = if c.stock() { &stock } else { &hooked };
        let runner = runner
            .as_ref()
            .expect("located above for the selected configs");
        let n_cpu_moe = if c == Config::Vram { 0 } else { all_host };
        let spec = decode_spec(a, threads, n_cpu_moe, a.reps);
        let mut env: Vec<(&str, String)> = Vec::new();
        if matches!(c, Config::HostCopy | Config::Spark) {
            env.push((ENV_OFFLOAD_MIN_BATCH, "1".into()));
        }
        if c == Config::Spark {
            let tap = tap.as_ref().expect("located with the hooked build");
            env.push(("LD_PRELOAD", tap.display().to_string()));
            env.push((
                ENV_RESIDENCY_SLOTS,
                slots.as_ref().expect("chosen").0.to_string(),
            ));
        }
        eprintln!(
            "measuring ({}) {} [{}/{}]",
            c.letter(),
            c.name(),
            i + 1,
            configs.len()
        );
        let configure = |cmd: &mut Command| {
            // Only what the row says: no inherited preload, offload threshold or spark session
            // (without a ring and a control channel the tap only provides residency).
            for k in [
                "LD_PRELOAD",
                ENV_OFFLOAD_MIN_BATCH,
                ENV_RESIDENCY_SLOTS,
                ENV_RESIDENCY_METER,
                ENV_RING_FD,
                ENV_HIDDEN_RING_FD,
                ENV_CONTROL_FD,
            ] {
                cmd.env_remove(k);
            }
            for (k, v) in &env {
                cmd.env(k, v);
            }
        };
        let (bench_rows, out) = run_llama_bench_with(
            &runner.bench,
            &spec,
            Duration::from_secs(a.timeout),
            configure,
        )
        .map_err(|source| BenchResidencyError::Measure {
            letter: c.letter(),
            config: c.name(),
            source,
        })?;
        let r: &BenchRow =
            bench_rows
                .iter()
                .find(|r| r.is_decode())
                .ok_or(BenchResidencyError::NoDecodeRow {
                    letter: c.letter(),
                    config: c.name(),
                })?;
        if cpu.is_empty() {
            cpu = r.cpu_info.clone();
        }
        ran_on_gpu |= r.has_gpu();
        if c == Config::Spark {
            residency = Some(residency_from_stderr(&out.stderr, decoded));
        }
        rows.push(Row {
            config: c,
            letter: c.letter(),
            engine: runner.variant.clone(),
            llama_bench: runner.bench.clone(),
            n_gpu_layers: 99,
            n_cpu_moe,
            env: env.iter().map(|(k, v)| format!("{k}={v}")).collect(),
            tok_s: r.avg_ts,
            sd: r.stddev_ts,
            samples_ts: r.samples_ts.clone(),
            ratio_to_host: None,
            backends: r.backends.clone(),
            gpu_info: r.gpu_info.clone(),
        });
    }
    let host = rows
        .iter()
        .find(|r| r.config == Config::Host)
        .map(|r| r.tok_s);
    for r in &mut rows {
        r.ratio_to_host = host.map(|h| r.tok_s / h);
    }
    let measured = rows
        .iter()
        .find(|r| r.config == Config::Spark)
        .and_then(|r| r.ratio_to_host);
    let bytes = if a.bytes {
        let h = hooked.as_ref().expect("located for --bytes");
        let tap = tap.as_ref().expect("located for --bytes");
        Some(measure_bytes(a, &g, h, tap, threads)?)
    } else {
        None
    };
    let used = |r: &Option<Runner>| {
        r.as_ref().map(|r| EngineUsed {
            variant: r.variant.clone(),
            llama_bench: r.bench.clone(),
        })
    };
    Ok(BenchResidencyReport {
        model: a.model.clone(),
        n_layer: g.n_layer,
        expert_layers: g.moe_layers.len() as u32,
        n_expert: g.n_expert,
        n_expert_used: g.n_expert_used,
        tokens: a.tokens,
        reps: a.reps,
        threads,
        decoded_per_run: decoded,
        slots: slots.as_ref().map(|s| s.0),
        slots_from: slots.map(|s| s.1),
        rows,
        target: Target {
            goal: TARGET,
            measured,
        },
        residency,
        engines: Engines {
            stock: used(&stock),
            hooked: used(&hooked),
            tap,
            hook_id: engine::hook_id(),
        },
        machine: Machine {
            gpu: gpu_facts(),
            cpu,
            ran_on_gpu,
        },
        bytes,
    })
}

/// llama-bench decoding `--tokens` tokens `reps` times (no prompt), every layer on the device
/// and the experts of the first `n_cpu_moe` layers on the host; no flash attention (lavapipe
/// crashes in it for larger batches, and every configuration runs the same attention).
fn decode_spec(a: &BenchResidencyArgs, threads: u32, n_cpu_moe: u32, reps: u32) -> BenchSpec {
    BenchSpec {
        model: a.model.clone(),
        threads,
        n_gpu_layers: 99,
        n_cpu_moe,
        type_k: "f16".into(),
        type_v: "f16".into(),
        flash_attn: false,
        ubatch: 512,
        n_prompt: 0,
        n_gen: a.tokens,
        repetitions: reps,
    }
}

/// The `--bytes` runs: the hooked llama-bench decoding `--tokens` tokens once per row, every
/// layer's experts on the host and decode offloaded, the tap preloaded with a routing ring;
/// (c) with the provider as a meter (the stock copy runs and is counted), (d) with the
/// provider at each slot count. The routing each run captured is replayed through spark's
/// `lru` shadow cache with the same slots, for the predicted hit ratio.
fn measure_bytes(
    a: &BenchResidencyArgs,
    g: &MoeGeometry,
    hooked: &Runner,
    tap: &Path,
    threads: u32,
) -> Result<BytesReport, BenchResidencyError> {
    let slot_counts = if a.bytes_slots.is_empty() {
        default_bytes_slots(g.n_expert)
    } else {
        a.bytes_slots.clone()
    };
    let decoded = a.tokens + 1; // one repetition plus llama-bench's one-token warmup
    let runs: Vec<(Config, Option<u32>)> = std::iter::once((Config::HostCopy, None))
        .chain(slot_counts.iter().map(|&s| (Config::Spark, Some(s))))
        .collect();
    let mut rows = Vec::new();
    let mut device = String::new();
    for (i, &(c, slots)) in runs.iter().enumerate() {
        eprintln!(
            "measuring bytes: ({}) {}{} [{}/{}]",
            c.letter(),
            c.name(),
            slots.map(|s| format!(", {s} slots")).unwrap_or_default(),
            i + 1,
            runs.len()
        );
        // One token's records per expert layer, plus room: the ring never overruns here.
        let capacity = (decoded * g.moe_layers.len() as u64 + 1024).next_power_of_two();
        let mut ring = crate::ring::ShmRing::create(capacity, crate::telemetry::ring_geometry(g))?;
        let spec = decode_spec(a, threads, g.n_layer, 1);
        let ring_fd = ring.fd();
        let configure = |cmd: &mut Command| {
            for k in [
                ENV_RESIDENCY_SLOTS,
                ENV_RESIDENCY_METER,
                ENV_HIDDEN_RING_FD,
                ENV_CONTROL_FD,
            ] {
                cmd.env_remove(k);
            }
            cmd.env(ENV_OFFLOAD_MIN_BATCH, "1")
                .env("LD_PRELOAD", tap)
                .env(ENV_RING_FD, ring_fd.to_string());
            crate::supervisor::inherit_fds(cmd, &[ring_fd]);
            match slots {
                Some(s) => cmd.env(ENV_RESIDENCY_SLOTS, s.to_string()),
                None => cmd.env(ENV_RESIDENCY_METER, "1"),
            };
        };
        let result = run_llama_bench_with(
            &hooked.bench,
            &spec,
            Duration::from_secs(a.timeout),
            configure,
        );
        let (bench_rows, out) = result.map_err(|source| BenchResidencyError::Measure {
            letter: c.letter(),
            config: c.name(),
            source,
        })?;
        if device.is_empty() {
            if let Some(r) = bench_rows.iter().find(|r| r.is_decode()) {
                device = if r.gpu_info.trim().is_empty() {
                    r.backends.clone()
                } else {
                    format!("{} ({})", r.gpu_info, r.backends)
                };
            }
        }
        let mut records = Vec::new();
        while ring.drain_into(&mut records, 1 << 16) > 0 {}
        let residency = residency_from_stderr(&out.stderr, decoded);
        let mut note = residency.note.clone();
        let predicted = match slots {
            Some(_) if ring.dropped() > 0 => {
                note = Some(format!("the ring dropped {} records", ring.dropped()));
                None
            }
            Some(_) if records.is_empty() => {
                note = Some("the tap captured no routing".into());
                None
            }
            Some(s) => predict_hit_ratio(&records, g.n_layer as usize, g.n_expert as usize, s),
            None => None,
        };
        let forecast_bytes_host = (ring.dropped() == 0 && !records.is_empty()).then(|| {
            use crate::plan::residency::{tensor_bytes_of, Replayer};
            let tb = tensor_bytes_of(g);
            let mut rp = Replayer::new(
                g.n_expert as usize,
                g.n_expert_used as usize,
                &tb,
                slots.unwrap_or(0),
            );
            for r in &records {
                rp.access(usize::from(r.layer), r.used_ids(), true);
            }
            rp.total().link_bytes
        });
        let link_ms_per_token = residency
            .host_bytes_per_token
            .map(|b| b / (a.link_gbps * 1e9) * 1e3);
        rows.push(BytesRow {
            config: c,
            slots,
            decoded,
            residency,
            predicted_hit_ratio: predicted,
            ring_records: records.len() as u64,
            note,
            link_ms_per_token,
            forecast_bytes_host,
        });
    }
    let lower = device.to_ascii_lowercase();
    Ok(BytesReport {
        link_gbps: a.link_gbps,
        cpu_device: lower.contains("llvmpipe") || lower.contains("lavapipe"),
        device,
        rows,
    })
}

fn bytes(b: f64) -> String {
    if b >= (1 << 20) as f64 {
        format!("{:.2} MiB", b / (1 << 20) as f64)
    } else if b >= 1024.0 {
        format!("{:.1} KiB", b / 1024.0)
    } else {
        format!("{b:.0} B")
    }
}

/// The human report.
pub fn render(r: &BenchResidencyReport) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "model      {}: {} layers ({} with experts), {} experts, top-{}",
        r.model.display(),
        r.n_layer,
        r.expert_layers,
        r.n_expert,
        r.n_expert_used
    );
    let _ = writeln!(
        s,
        "decode     llama-bench -p 0 -n {} -r {} -t {} -ngl 99; {} tokens decoded per run ({} × {} timed + 1 warmup)",
        r.tokens, r.reps, r.threads, r.decoded_per_run, r.reps, r.tokens
    );
    let _ = writeln!(s);
    let _ = writeln!(
        s,
        "    {:<10} {:<56} {:>20} {:>7}",
        "config", "placement", "tok/s (mean ± sd)", "vs (b)"
    );
    for row in &r.rows {
        // A hooked build without the provider takes the stock path; say which build ran.
        let build = if row.config.stock() && row.engine.contains("-hooked-") {
            "hooked (no tap)"
        } else if row.config.stock() {
            "stock"
        } else {
            "hooked"
        };
        let placement = match row.config {
            Config::Vram => format!("{build}, experts in VRAM"),
            Config::Host => format!("{build}, -ncmoe {} (experts on host)", row.n_cpu_moe),
            Config::HostCopy => {
                format!(
                    "{build}, -ncmoe {}, {ENV_OFFLOAD_MIN_BATCH}=1",
                    row.n_cpu_moe
                )
            }
            Config::Spark => format!(
                "{build}, -ncmoe {}, min batch 1, tap, {} slots/layer",
                row.n_cpu_moe,
                r.slots.unwrap_or(0)
            ),
        };
        let _ = writeln!(
            s,
            "({}) {:<10} {:<56} {:>11.2} ± {:>6.2} {:>7}",
            row.letter,
            row.config.name(),
            placement,
            row.tok_s,
            row.sd,
            row.ratio_to_host
                .map(|x| format!("{x:.2}x"))
                .unwrap_or_else(|| "-".into())
        );
    }
    let _ = writeln!(s);
    let target = match r.target.measured {
        Some(x) => format!(
            "measured {x:.2}x{} (the issue's goal; reported, not checked)",
            if x >= TARGET_RATIO { "" } else { ", below it" }
        ),
        None => "not measured (needs host and spark in --configs)".into(),
    };
    let _ = writeln!(s, "target     {}: {target}", r.target.goal);
    if let Some(res) = &r.residency {
        let _ = writeln!(
            s,
            "residency  (d) {} slots per expert layer ({})",
            r.slots.unwrap_or(0),
            r.slots_from.as_deref().unwrap_or("-")
        );
        match &res.counters {
            Some(c) => {
                let g = |k: &str| c.get(k).copied().unwrap_or(0);
                let _ = writeln!(
                    s,
                    "           hit ratio {}, hits {}, loads {}, streamed {}, calls {}, declined {}",
                    res.hit_ratio
                        .map(|h| format!("{h:.3}"))
                        .unwrap_or_else(|| "-".into()),
                    g("hits"),
                    g("loads"),
                    g("streamed"),
                    g("calls"),
                    g("declined")
                );
                let _ = writeln!(
                    s,
                    "           bytes_hit {}, bytes_host {}; per decoded token: {} from host, {} from slots",
                    g("bytes_hit"),
                    g("bytes_host"),
                    bytes(res.host_bytes_per_token.unwrap_or(0.0)),
                    bytes(res.slot_bytes_per_token.unwrap_or(0.0))
                );
                let _ = writeln!(
                    s,
                    "           {RESIDENCY_EXIT_PREFIX}{}",
                    res.line.as_deref().unwrap_or("")
                );
            }
            None => {
                let _ = writeln!(
                    s,
                    "           {}{}",
                    res.note.as_deref().unwrap_or("no residency line"),
                    res.line
                        .as_deref()
                        .map(|l| format!(": {l}"))
                        .unwrap_or_default()
                );
            }
        }
    }
    if let Some(b) = &r.bytes {
        render_bytes(&mut s, b, r);
    }
    let e = &r.engines;
    let mut first = true;
    let mut engine_line = |label: &str, text: String| {
        let head = if first { "engines" } else { "" };
        first = false;
        let _ = writeln!(s, "{head:<10} {label:<7}{text}");
    };
    if let Some(st) = &e.stock {
        engine_line(
            "stock",
            format!("{} {}", st.variant, st.llama_bench.display()),
        );
    }
    if let Some(h) = &e.hooked {
        engine_line(
            "hooked",
            format!("{} {}", h.variant, h.llama_bench.display()),
        );
    }
    if let Some(t) = &e.tap {
        engine_line("tap", t.display().to_string());
    }
    let _ = writeln!(s, "machine    GPU: {}", r.machine.gpu);
    let _ = writeln!(
        s,
        "           CPU: {}",
        if r.machine.cpu.is_empty() {
            "-"
        } else {
            &r.machine.cpu
        }
    );
    if r.bytes.as_ref().is_some_and(|b| b.cpu_device) {
        let _ = writeln!(
            s,
            "note       the device is Mesa's lavapipe, a CPU that poses as a Vulkan GPU: tok/s here are\n           not GPU figures; the bytes and hit ratios are what a GPU would see"
        );
    }
    if !r.machine.ran_on_gpu {
        let _ = writeln!(
            s,
            "note       llama-bench ran on the CPU only: the placements do not differ here, the hook is\n           never called, and these numbers say nothing about residency"
        );
    }
    s
}

fn render_bytes(s: &mut String, b: &BytesReport, r: &BenchResidencyReport) {
    let decoded = b.rows.first().map_or(0, |x| x.decoded);
    let _ = writeln!(
        s,
        "bytes      host→device per decoded token: hooked llama-bench -n {} -r 1 ({decoded} tokens with the warmup),\n           experts of all {} layers on the host, decode offloaded, on {}",
        r.tokens,
        r.n_layer,
        if b.device.is_empty() { "-" } else { &b.device }
    );
    let _ = writeln!(
        s,
        "           {:<14} {:>5} {:>9} {:>15} {:>12} {:>12} {:>22}",
        "config",
        "slots",
        "hit ratio",
        "predicted (lru)",
        "host/token",
        "slots/token",
        format!("at {} GB/s (forecast)", b.link_gbps)
    );
    let opt = |x: Option<f64>, f: &dyn Fn(f64) -> String| x.map(f).unwrap_or_else(|| "-".into());
    for row in &b.rows {
        let _ = writeln!(
            s,
            "           ({}) {:<10} {:>5} {:>9} {:>15} {:>12} {:>12} {:>22}",
            row.config.letter(),
            row.config.name(),
            row.slots.map_or("-".into(), |x| x.to_string()),
            opt(
                row.residency.hit_ratio.filter(|_| row.slots.is_some()),
                &|h| format!("{h:.3}")
            ),
            opt(row.predicted_hit_ratio, &|h| format!("{h:.3}")),
            opt(row.residency.host_bytes_per_token, &bytes),
            opt(
                row.residency
                    .slot_bytes_per_token
                    .filter(|_| row.slots.is_some()),
                &bytes
            ),
            opt(row.link_ms_per_token, &|ms| format!("{ms:.4} ms/token")),
        );
        if let Some(n) = &row.note {
            let _ = writeln!(s, "               {n}");
        }
    }
    let _ = writeln!(
        s,
        "           (c) is metered at the hook: the provider declines and counts what the stock copy moves.\n           The prediction replays the routing the same run captured (the tap's ring) through spark's\n           lru cache; the provider breaks ties between experts loaded in the same step by slot, lru by\n           order, which can move a few hits. The forecast is host bytes ÷ link bandwidth only."
    );
}

/// Runs the bench and prints the report (text, or JSON with `--json`).
pub fn run_and_print(a: &BenchResidencyArgs) -> Result<(), BenchResidencyError> {
    let r = run(a)?;
    if a.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&r).expect("report serialises")
        );
    } else {
        print!("{}", render(&r));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stats() -> ResidencyStats {
        ResidencyStats {
            slots: 3,
            layers: 4,
            calls: 40,
            hits: 30,
            loads: 6,
            streamed: 4,
            bytes_hit: 3000,
            bytes_host: 1000,
            ..ResidencyStats::default()
        }
    }

    #[test]
    fn reads_the_last_residency_line_and_divides_by_decoded_tokens() {
        let err = format!(
            "llama-bench: noise\n{RESIDENCY_EXIT_PREFIX}{}\nother\n{RESIDENCY_EXIT_PREFIX}{}\n",
            ResidencyStats::default().to_text(),
            stats().to_text()
        );
        let r = residency_from_stderr(&err, 10);
        let c = r.counters.expect("parsed");
        assert_eq!(c["slots"], 3);
        assert_eq!(c["calls"], 40);
        assert_eq!(r.hit_ratio, Some(0.75));
        assert_eq!(r.host_bytes_per_token, Some(100.0));
        assert_eq!(r.slot_bytes_per_token, Some(300.0));
        assert!(r.note.is_none());
    }

    #[test]
    fn absent_or_broken_lines_are_said_not_invented() {
        let r = residency_from_stderr("llama-bench: nothing here\n", 5);
        assert_eq!(r.note.as_deref(), Some("no residency line"));
        assert!(r.counters.is_none() && r.line.is_none() && r.hit_ratio.is_none());
        let r = residency_from_stderr(&format!("{RESIDENCY_EXIT_PREFIX}slots=x\n"), 5);
        assert!(r.counters.is_none());
        assert!(r.note.unwrap().starts_with("unreadable residency line"));
        assert_eq!(r.line.as_deref(), Some("slots=x"));
    }

    #[test]
    fn slots_come_from_the_flag_the_budget_or_a_quarter_of_the_experts() {
        let mib = 1u64 << 20;
        let sizes = [mib, mib, 2 * mib];
        assert_eq!(choose_slots(8, &sizes, Some(3), None).unwrap().0, 3);
        assert!(choose_slots(8, &sizes, Some(0), None).is_err());
        assert!(choose_slots(8, &sizes, Some(9), None).is_err());
        let (s, from) = choose_slots(8, &sizes, None, Some(9)).unwrap();
        assert_eq!(s, 2, "9 MiB over 4 MiB per slot: {from}");
        assert!(from.contains("--vram-budget 9 MiB"), "{from}");
        let (s, from) = choose_slots(8, &sizes, None, Some(1000)).unwrap();
        assert_eq!(s, 8);
        assert!(from.contains("capped"), "{from}");
        let e = choose_slots(8, &sizes, None, Some(3)).unwrap_err();
        assert_eq!(e.exit_code(), crate::exit::USAGE);
        assert_eq!(choose_slots(8, &sizes, None, None).unwrap().0, 2);
        assert_eq!(choose_slots(6, &sizes, None, None).unwrap().0, 2);
        assert_eq!(choose_slots(2, &sizes, None, None).unwrap().0, 1);
    }

    #[test]
    fn configs_parse_by_name_and_letter() {
        use clap::ValueEnum;
        for (s, c) in [
            ("vram", Config::Vram),
            ("b", Config::Host),
            ("host-copy", Config::HostCopy),
            ("d", Config::Spark),
        ] {
            assert_eq!(Config::from_str(s, false).unwrap(), c);
        }
        assert_eq!(Config::HostCopy.name(), "host-copy");
    }
}
