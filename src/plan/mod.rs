//! `spark plan`: what fits, which flags, how fast — a forecast from GGUF metadata and hardware
//! facts, calibrated by receipts (llama-bench measurements paired with plans).
//!
//! Owns the planner: hardware facts ([`hardware`]), memory fit and flags ([`fit`]), the roofline
//! forecast ([`forecast`]), receipts ([`receipt`]), the routing-concentration verdict
//! ([`routing`]) and the validation bench ([`validate`]). The planning itself is arithmetic on
//! facts handed in; only the receipt path runs llama-bench, and only through
//! [`crate::supervisor::run_with_deadline`]. Never spawns a process itself, never writes a file
//! except the per-machine hardware profile and receipt store (atomically).

pub mod fit;
pub mod forecast;
pub mod hardware;
pub mod median;
pub mod presets;
pub mod receipt;
pub mod residency;
pub mod routing;
pub mod validate;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use clap::{Args, Subcommand};
use serde::Serialize;

use crate::engine::{Engine, EngineError};
use crate::gguf::{GgmlType, GgufError, GgufFile, MoeGeometry};
use crate::supervisor::{run_with_deadline, Captured, RunError};

use fit::{FitOutcome, MemorySettings, ModelFacts, Placement, Refusal, MIB};
use forecast::{Forecast, RooflineInput};
use hardware::{HardwareError, HardwareFacts, HardwareOverrides};
use receipt::{BenchRow, BenchSpec, Receipt, ReceiptError, ReceiptStore};
use routing::Concentration;

/// Why planning failed. Messages read after "failed to".
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    #[error("{0}")]
    Usage(String),
    #[error(transparent)]
    Gguf(#[from] GgufError),
    #[error(transparent)]
    Hardware(#[from] HardwareError),
    #[error(transparent)]
    Receipt(#[from] ReceiptError),
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error(transparent)]
    Run(#[from] RunError),
    #[error("run llama-bench: it exited with {status}; last output:\n{tail}")]
    BenchFailed { status: String, tail: String },
    #[error("fit {model}: {reason}")]
    Refused { model: String, reason: String },
    #[error("read routing {path}: {message}")]
    Routing { path: PathBuf, message: String },
    #[error("validate the forecast: {0}")]
    Validation(String),
}

impl PlanError {
    /// The exit code this error maps to (see [`crate::exit`]).
    pub fn exit_code(&self) -> i32 {
        match self {
            PlanError::Refused { .. } => crate::exit::REFUSED,
            PlanError::Run(e) if e.is_timeout() => crate::exit::TIMEOUT,
            PlanError::Run(_) | PlanError::BenchFailed { .. } | PlanError::Validation(_) => {
                crate::exit::CHECK_FAILED
            }
            PlanError::Hardware(HardwareError::Write { .. })
            | PlanError::Receipt(ReceiptError::Write { .. }) => crate::exit::CHECK_FAILED,
            _ => crate::exit::USAGE,
        }
    }
}

/// `spark plan [...]` and its subcommands.
#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct PlanCommand {
    #[command(subcommand)]
    pub action: Option<PlanAction>,
    #[command(flatten)]
    pub plan: PlanArgs,
}

#[derive(Debug, Subcommand)]
pub enum PlanAction {
    /// Measure the plan with llama-bench (or read llama-bench JSON) and keep it as a receipt
    Receipt(Box<ReceiptArgs>),
    /// Show this machine's hardware profile (measured once, cached per machine)
    Hardware(HardwareArgs),
}

/// The flags every plan takes.
#[derive(Debug, Args, Clone)]
pub struct PlanArgs {
    /// The GGUF model
    #[arg(short = 'm', long = "model", value_name = "GGUF")]
    pub model: Option<PathBuf>,
    /// VRAM spark may use, MiB (as for `spark serve`); without it the plan is CPU only
    #[arg(long, value_name = "MiB")]
    pub vram_budget: Option<u64>,
    /// Context length the KV cache is sized for
    #[arg(long, default_value_t = 4096)]
    pub ctx: u64,
    /// KV-cache type of K (f16, q8_0, q4_0…)
    #[arg(long, default_value = "f16")]
    pub cache_type_k: String,
    /// KV-cache type of V (a quantised V needs flash attention, which the flags then turn on)
    #[arg(long, default_value = "f16")]
    pub cache_type_v: String,
    /// Micro-batch size (llama.cpp -ub); sizes the compute buffer
    #[arg(long, default_value_t = 512)]
    pub ubatch: u64,
    /// CPU threads (default: the machine's logical CPUs)
    #[arg(long)]
    pub threads: Option<u32>,
    /// VRAM kept back for the runtime (CUDA context, allocator slack), MiB
    #[arg(long, value_name = "MiB", default_value_t = 256)]
    pub reserve: u64,
    /// Tokens already in context for the decode forecast (KV reads); llama-bench tg runs at 0
    #[arg(long, default_value_t = 0)]
    pub depth: u64,
    /// Routing counts to judge concentration and the expert-cache hit ratio: a Spark profile CSV
    /// (`<model>.gguf.spark.csv`) or its hotness table
    #[arg(long, value_name = "CSV", conflicts_with = "trace")]
    pub profile: Option<PathBuf>,
    /// Routing trace (binary, JSONL or CSV) for the same verdict and hit ratio
    #[arg(long, value_name = "FILE")]
    pub trace: Option<PathBuf>,
    /// Do not fold stored receipts into the forecast
    #[arg(long)]
    pub no_receipts: bool,
    /// Print JSON instead of text
    #[arg(long)]
    pub json: bool,
    /// Does residency pay here? Stock `--n-cpu-moe` against spark residency on the same VRAM,
    /// every term, break-even link bandwidth and the verdict (needs a GPU: --gpu CARD, or
    /// --vram-bw, --h2d-bw and --vram-total or --vram-budget)
    #[arg(long)]
    pub residency: bool,
    /// Without --trace or --profile: a stated routing prior for --residency, expert of rank r
    /// drawn with weight r^-S (0: uniform, the default; real MoE routers are skewed)
    #[arg(long, value_name = "S", conflicts_with_all = ["trace", "profile"])]
    pub zipf: Option<f64>,
    #[command(flatten)]
    pub hardware: HardwareFlags,
}

/// Hardware overrides (flags win over measured and read values).
#[derive(Debug, Args, Clone, Default)]
pub struct HardwareFlags {
    /// Host memory bandwidth, GB/s (skips the measurement)
    #[arg(long, value_name = "GB/s")]
    pub host_bw: Option<f64>,
    /// Host compute, GFLOP/s (skips the measurement)
    #[arg(long, value_name = "GFLOP/s")]
    pub host_gflops: Option<f64>,
    /// Host RAM total, MiB
    #[arg(long, value_name = "MiB")]
    pub ram_total: Option<u64>,
    /// Host RAM available, MiB
    #[arg(long, value_name = "MiB")]
    pub ram_available: Option<u64>,
    /// Plan for a GPU with this VRAM bandwidth, GB/s (this build measures no GPU)
    #[arg(long, value_name = "GB/s")]
    pub vram_bw: Option<f64>,
    /// The GPU's compute, TFLOP/s (prefill forecast)
    #[arg(long, value_name = "TFLOP/s")]
    pub gpu_tflops: Option<f64>,
    /// The GPU's name, for the report
    #[arg(long)]
    pub gpu_name: Option<String>,
    /// The GPU's VRAM, MiB
    #[arg(long, value_name = "MiB")]
    pub vram_total: Option<u64>,
    /// Host-to-device bandwidth, GB/s
    #[arg(long, value_name = "GB/s")]
    pub h2d_bw: Option<f64>,
    /// Measure the host again even if a cached measurement exists
    #[arg(long)]
    pub remeasure: bool,
    /// Plan for a known card: its VRAM, VRAM bandwidth and PCIe link, each figure cited
    /// (an unknown name lists them); --vram-total, --vram-bw, --h2d-bw override it
    #[arg(long, value_name = "CARD")]
    pub gpu: Option<String>,
}

impl HardwareFlags {
    pub fn overrides(&self) -> HardwareOverrides {
        let card = self.gpu.as_deref().and_then(presets::find);
        HardwareOverrides {
            ram_total_mib: self.ram_total,
            ram_available_mib: self.ram_available,
            host_gbps: self.host_bw,
            host_gflops: self.host_gflops,
            gpu_name: self
                .gpu_name
                .clone()
                .or_else(|| card.map(|c| c.name.to_string())),
            vram_total_mib: self.vram_total.or_else(|| card.map(|c| c.vram_mib())),
            vram_gbps: self.vram_bw.or_else(|| card.map(|c| c.vram_gbps())),
            h2d_gbps: self.h2d_bw.or_else(|| card.map(|c| c.h2d_gbps())),
            gpu_tflops: self.gpu_tflops,
            remeasure: self.remeasure,
        }
    }

    /// The named card preset, if `--gpu` names one.
    pub fn card(&self) -> Option<&'static presets::CardPreset> {
        self.gpu.as_deref().and_then(presets::find)
    }

    fn validate(&self) -> Result<(), PlanError> {
        if let Some(g) = &self.gpu {
            if presets::find(g).is_none() {
                return Err(PlanError::Usage(format!(
                    "parse --gpu {g}: not a known card ({})",
                    presets::keys()
                )));
            }
        }
        for (name, v) in [
            ("--host-bw", self.host_bw),
            ("--host-gflops", self.host_gflops),
            ("--vram-bw", self.vram_bw),
            ("--gpu-tflops", self.gpu_tflops),
            ("--h2d-bw", self.h2d_bw),
        ] {
            if let Some(v) = v {
                if !(v.is_finite() && v > 0.0) {
                    return Err(PlanError::Usage(format!(
                        "parse {name} {v}: must be a positive number"
                    )));
                }
            }
        }
        Ok(())
    }
}

#[derive(Debug, Args)]
pub struct ReceiptArgs {
    #[command(flatten)]
    pub plan: PlanArgs,
    /// Read llama-bench `-o json` output instead of running llama-bench
    #[arg(long, value_name = "JSON")]
    pub from: Option<PathBuf>,
    /// llama-bench binary (default: next to the located llama-server)
    #[arg(long, value_name = "PATH")]
    pub llama_bench: Option<PathBuf>,
    /// Tokens generated per repetition
    #[arg(long, default_value_t = 32)]
    pub n_gen: u64,
    /// Prompt tokens per repetition (0: no prefill measurement)
    #[arg(long, default_value_t = 64)]
    pub n_prompt: u64,
    /// Repetitions
    #[arg(long, default_value_t = 3)]
    pub repetitions: u32,
    /// Seconds llama-bench may run before it is stopped (exit 124)
    #[arg(long, default_value_t = 300)]
    pub timeout: u64,
    /// Show the receipt without storing it
    #[arg(long)]
    pub dry_run: bool,
}

#[derive(Debug, Args)]
pub struct HardwareArgs {
    #[command(flatten)]
    pub hardware: HardwareFlags,
    /// Print JSON instead of text
    #[arg(long)]
    pub json: bool,
}

/// Resolved settings of one plan.
#[derive(Debug, Clone)]
pub struct PlanInput {
    pub model: PathBuf,
    pub settings: MemorySettings,
    pub budget_bytes: Option<u64>,
    pub threads: u32,
    pub depth: u64,
    pub use_receipts: bool,
}

impl PlanInput {
    pub fn from_args(a: &PlanArgs) -> Result<PlanInput, PlanError> {
        let model = a
            .model
            .clone()
            .ok_or_else(|| PlanError::Usage("plan: -m/--model GGUF is required".into()))?;
        let ty = |flag: &str, name: &str| {
            GgmlType::from_name(name)
                .filter(|t| KV_TYPES.contains(&t.name))
                .ok_or_else(|| {
                    PlanError::Usage(format!(
                        "parse {flag} {name}: not a KV-cache type ({})",
                        KV_TYPES.join(", ")
                    ))
                })
        };
        if a.ctx == 0 {
            return Err(PlanError::Usage("parse --ctx 0: must be at least 1".into()));
        }
        if a.ubatch == 0 {
            return Err(PlanError::Usage(
                "parse --ubatch 0: must be at least 1".into(),
            ));
        }
        if a.threads == Some(0) {
            return Err(PlanError::Usage(
                "parse --threads 0: must be at least 1".into(),
            ));
        }
        a.hardware.validate()?;
        let threads = a.threads.unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map(|n| n.get() as u32)
                .unwrap_or(1)
        });
        Ok(PlanInput {
            model,
            settings: MemorySettings {
                ctx: a.ctx,
                k_type: ty("--cache-type-k", &a.cache_type_k)?,
                v_type: ty("--cache-type-v", &a.cache_type_v)?,
                ubatch: a.ubatch,
                reserve_bytes: a.reserve.saturating_mul(MIB),
            },
            budget_bytes: a.vram_budget.map(|b| b.saturating_mul(MIB)),
            threads,
            depth: a.depth,
            use_receipts: !a.no_receipts,
        })
    }
}

/// KV-cache types llama.cpp accepts for `--cache-type-k/-v`.
pub const KV_TYPES: &[&str] = &[
    "f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "iq4_nl", "q5_0", "q5_1",
];

/// A complete plan: memory, placement or refusal, flags, forecast, routing verdict.
#[derive(Debug, Clone, Serialize)]
pub struct Plan {
    pub model: ModelFacts,
    pub settings: MemorySettings,
    pub budget_bytes: Option<u64>,
    pub memory: MemoryReport,
    pub outcome: FitOutcome,
    /// llama-server flags (empty when refused).
    pub flags: Vec<String>,
    pub forecast: Option<Forecast>,
    pub routing: Option<Concentration>,
    pub hardware: HardwareFacts,
    pub threads: u32,
}

/// The memory table.
#[derive(Debug, Clone, Serialize)]
pub struct MemoryReport {
    pub always_resident_bytes: u64,
    pub embeddings_host_bytes: u64,
    pub routed_expert_bytes_per_layer: Vec<(u32, u64)>,
    pub routed_expert_bytes: u64,
    pub kv_bytes: u64,
    pub kv_bytes_per_token: u64,
    pub compute_bytes: u64,
    pub reserve_bytes: u64,
}

impl Plan {
    pub fn placement(&self) -> Option<Placement> {
        match &self.outcome {
            FitOutcome::Fits { placement, .. } => Some(*placement),
            FitOutcome::Refused(_) => None,
        }
    }

    pub fn refusal(&self) -> Option<&Refusal> {
        match &self.outcome {
            FitOutcome::Refused(r) => Some(r),
            FitOutcome::Fits { .. } => None,
        }
    }
}

/// Opens the model and derives its facts.
pub fn model_facts(path: &Path) -> Result<ModelFacts, PlanError> {
    let file = GgufFile::open(path)?;
    let geometry = MoeGeometry::of(&file)?;
    Ok(ModelFacts::of(&file, geometry))
}

/// Builds the plan for `input` on `hw`, folding in `store`'s receipts (skipping those `exclude`
/// names) and a routing verdict.
pub fn make_plan(
    model: ModelFacts,
    input: &PlanInput,
    hw: HardwareFacts,
    store: Option<&ReceiptStore>,
    routing: Option<Concentration>,
) -> Plan {
    let s = input.settings;
    let o = fit::overheads(&model, &s);
    let memory = MemoryReport {
        always_resident_bytes: model.gpu_always_bytes(),
        embeddings_host_bytes: model.host_always_bytes(),
        routed_expert_bytes_per_layer: model
            .expert_layers
            .iter()
            .map(|(l, _)| (*l, model.layer_expert_bytes(*l)))
            .collect(),
        routed_expert_bytes: model.experts_total(),
        kv_bytes: o.kv_bytes,
        kv_bytes_per_token: model.geometry.kv_bytes_per_token(s.k_type, s.v_type),
        compute_bytes: o.compute_bytes,
        reserve_bytes: o.reserve_bytes,
    };
    let outcome = fit::fit(&model, &s, input.budget_bytes, hw.ram_total_bytes);
    let (flags, forecast) = match &outcome {
        FitOutcome::Fits {
            placement,
            headroom_bytes,
            ..
        } => {
            let hit = routing
                .as_ref()
                .and_then(|c| c.cache_hit_ratio(&model, *placement, *headroom_bytes));
            let f = forecast_for(&model, input, &hw, *placement, hit, store, |_| false);
            (
                fit::server_flags(&model, &s, *placement, input.threads),
                Some(f),
            )
        }
        FitOutcome::Refused(_) => (Vec::new(), None),
    };
    Plan {
        memory,
        settings: s,
        budget_bytes: input.budget_bytes,
        outcome,
        flags,
        forecast,
        routing,
        hardware: hw,
        threads: input.threads,
        model,
    }
}

/// The forecast of one placement, calibrated by the receipts `exclude` lets through.
pub fn forecast_for(
    model: &ModelFacts,
    input: &PlanInput,
    hw: &HardwareFacts,
    placement: Placement,
    cache_hit_ratio: Option<f64>,
    store: Option<&ReceiptStore>,
    exclude: impl Fn(&Receipt) -> bool,
) -> Forecast {
    let s = input.settings;
    let roof = forecast::roofline(
        model,
        hw,
        &RooflineInput {
            placement,
            threads: input.threads,
            depth: input.depth,
            kv_bytes_per_token: model.geometry.kv_bytes_per_token(s.k_type, s.v_type),
            cache_hit_ratio,
        },
    );
    let (d, p) = match store.filter(|_| input.use_receipts) {
        Some(st) => st.efficiencies(&hw.machine.key(), roof.regime, input.threads, exclude),
        None => (Vec::new(), Vec::new()),
    };
    forecast::forecast(roof, &d, &p)
}

/// Renders a plan as text.
pub fn render(p: &Plan) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let m = &p.model;
    let _ = writeln!(
        s,
        "model     {} ({}, {} layers, {})",
        m.path,
        m.architecture,
        m.n_layer,
        if m.is_moe() {
            format!("{} experts, {} used", m.n_expert, m.n_expert_used)
        } else {
            "dense".into()
        }
    );
    let hw = &p.hardware;
    let _ = writeln!(
        s,
        "machine   {} ({} CPUs), RAM {} total / {} available, host read {:.1} GB/s at {} threads{}",
        hw.machine.cpu_model,
        hw.machine.logical_cpus,
        fit::mib(hw.ram_total_bytes),
        fit::mib(hw.ram_available_bytes),
        hw.host_gbps_at(p.threads),
        p.threads,
        match &hw.gpu {
            Some(g) => format!(", GPU {} at {:.0} GB/s", g.name, g.vram_gbps),
            None => ", no GPU".into(),
        }
    );
    let mem = &p.memory;
    let _ = writeln!(s, "memory");
    let _ = writeln!(
        s,
        "  always resident      {:>12}  (attention, norms, router, output, shared experts)",
        fit::mib(mem.always_resident_bytes)
    );
    let _ = writeln!(
        s,
        "  embeddings (host)    {:>12}",
        fit::mib(mem.embeddings_host_bytes)
    );
    if m.is_moe() {
        let per: Vec<u64> = mem
            .routed_expert_bytes_per_layer
            .iter()
            .map(|x| x.1)
            .collect();
        let uniform = per.windows(2).all(|w| w[0] == w[1]);
        let _ = writeln!(
            s,
            "  routed experts       {:>12}  ({} per layer{})",
            fit::mib(mem.routed_expert_bytes),
            if uniform {
                fit::mib(per.first().copied().unwrap_or(0))
            } else {
                "varies".into()
            },
            if uniform { "" } else { ", see --json" }
        );
    }
    let _ = writeln!(
        s,
        "  KV cache             {:>12}  (ctx {}, K {}, V {}, {} B/token)",
        fit::mib(mem.kv_bytes),
        p.settings.ctx,
        p.settings.k_type.name,
        p.settings.v_type.name,
        mem.kv_bytes_per_token
    );
    let _ = writeln!(
        s,
        "  compute buffer       {:>12}  (ubatch {})",
        fit::mib(mem.compute_bytes),
        p.settings.ubatch
    );
    if p.budget_bytes.is_some() {
        let _ = writeln!(
            s,
            "  runtime reserve      {:>12}",
            fit::mib(mem.reserve_bytes)
        );
    }
    match &p.outcome {
        FitOutcome::Fits {
            placement,
            usage,
            headroom_bytes,
        } => {
            let what = match placement {
                Placement::AllGpu => "all layers and experts on the GPU".to_string(),
                Placement::CpuMoe { n } => format!(
                    "experts of layers 0..{n} in host memory ({} of {} MoE layers), the rest on the GPU",
                    m.expert_layers.iter().filter(|(l, _)| l < n).count(),
                    m.expert_layers.len()
                ),
                Placement::CpuOnly => "CPU only (no --vram-budget)".into(),
            };
            let _ = writeln!(s, "fit       {what}");
            if let Some(b) = p.budget_bytes {
                let _ = writeln!(
                    s,
                    "          VRAM {} of {} budget ({} headroom), host {}",
                    fit::mib(usage.vram_bytes),
                    fit::mib(b),
                    fit::mib(*headroom_bytes),
                    fit::mib(usage.host_bytes)
                );
            } else {
                let _ = writeln!(s, "          host {}", fit::mib(usage.host_bytes));
            }
            let _ = writeln!(
                s,
                "flags     -m {} {}",
                shell_quote(&m.path),
                p.flags.join(" ")
            );
        }
        FitOutcome::Refused(r) => {
            let _ = writeln!(s, "refused   {}", r.reason);
            let _ = writeln!(s, "what would help");
            for h in &r.suggestions {
                let _ = writeln!(s, "  - {h}");
            }
        }
    }
    if let Some(f) = &p.forecast {
        let r = &f.roofline;
        let _ = writeln!(
            s,
            "forecast  decode {:.1} tok/s (band {:.1}–{:.1}), ceiling {:.1} tok/s [{}]",
            f.decode.tps,
            f.decode.low,
            f.decode.high,
            r.decode_tps,
            r.regime.name()
        );
        let _ = writeln!(
            s,
            "          reads per token: {} from VRAM, {} from host",
            fit::mib(r.vram_bytes_per_token),
            fit::mib(r.host_bytes_per_token)
        );
        let _ = writeln!(
            s,
            "          prefill {:.0} tok/s (band {:.0}–{:.0}), ceiling {:.0} tok/s",
            f.prefill.tps, f.prefill.low, f.prefill.high, r.prefill_tps
        );
        let _ = writeln!(s, "assumptions");
        for a in &f.assumptions {
            let _ = writeln!(s, "  - {a}");
        }
    }
    if let Some(c) = &p.routing {
        let _ = writeln!(s, "routing   {}", c.verdict);
    }
    for src in &p.hardware.sources {
        let _ = writeln!(s, "source    {src}");
    }
    s
}

fn shell_quote(s: &str) -> String {
    if s.chars()
        .all(|c| c.is_ascii_alphanumeric() || "/._-+=:,".contains(c))
    {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}

/// Loads the receipt store unless the plan ignores receipts.
fn load_store(use_receipts: bool) -> Result<Option<ReceiptStore>, PlanError> {
    if !use_receipts {
        return Ok(None);
    }
    Ok(Some(ReceiptStore::load(&receipt::store_path())?))
}

fn load_routing(a: &PlanArgs, model: &ModelFacts) -> Result<Option<Concentration>, PlanError> {
    match (&a.profile, &a.trace) {
        (Some(path), _) => routing::from_profile(path, model).map(Some),
        (None, Some(path)) => routing::from_trace(path, model).map(Some),
        (None, None) => Ok(None),
    }
}

/// `spark plan`: prints the plan; a refusal is printed and returned as an error (exit 3).
pub fn run(cmd: PlanCommand) -> Result<(), PlanError> {
    match cmd.action {
        Some(PlanAction::Receipt(a)) => run_receipt(*a),
        Some(PlanAction::Hardware(a)) => {
            a.hardware.validate()?;
            let hw = hardware::gather(&a.hardware.overrides())?;
            if a.json {
                println!("{}", serde_json::to_string_pretty(&hw).expect("serialize"));
            } else {
                println!(
                    "machine    {} ({} logical CPUs, key {})",
                    hw.machine.cpu_model,
                    hw.machine.logical_cpus,
                    hw.machine.key()
                );
                println!(
                    "RAM        {} total, {} available",
                    fit::mib(hw.ram_total_bytes),
                    fit::mib(hw.ram_available_bytes)
                );
                for pt in &hw.host_read_gbps {
                    println!("host read  {:>6.1} GB/s at {} threads", pt.rate, pt.threads);
                }
                for pt in &hw.host_gflops {
                    println!(
                        "compute    {:>6.1} GFLOP/s at {} threads",
                        pt.rate, pt.threads
                    );
                }
                for s in &hw.sources {
                    println!("source     {s}");
                }
            }
            Ok(())
        }
        None => {
            let input = PlanInput::from_args(&cmd.plan)?;
            let model = model_facts(&input.model)?;
            let routing = load_routing(&cmd.plan, &model)?;
            let hw = hardware::gather(&cmd.plan.hardware.overrides())?;
            let store = load_store(input.use_receipts)?;
            let plan = make_plan(model, &input, hw, store.as_ref(), routing);
            let res = if cmd.plan.residency && plan.refusal().is_none() {
                Some(residency::for_plan(
                    &cmd.plan,
                    &input,
                    &plan,
                    store.as_ref(),
                )?)
            } else {
                None
            };
            if cmd.plan.json {
                let v = match &res {
                    Some(r) => serde_json::json!({ "plan": &plan, "residency": r }),
                    None => serde_json::to_value(&plan).expect("serialize"),
                };
                println!("{}", serde_json::to_string_pretty(&v).expect("serialize"));
            } else {
                print!("{}", render(&plan));
                if let Some(r) = &res {
                    print!("{}", residency::render(r));
                }
            }
            match plan.refusal() {
                Some(r) => Err(PlanError::Refused {
                    model: plan.model.path.clone(),
                    reason: r.reason.clone(),
                }),
                None => Ok(()),
            }
        }
    }
}

/// Runs llama-bench for `spec` under a deadline and parses its JSON.
pub fn run_llama_bench(
    bench: &Path,
    spec: &BenchSpec,
    timeout: Duration,
) -> Result<Vec<BenchRow>, PlanError> {
    Ok(run_llama_bench_with(bench, spec, timeout, |_| {})?.0)
}

/// As [`run_llama_bench`], with `configure` applied to the command first (environment), and
/// what the run left behind (its stderr carries the tap's exit line) returned with the rows.
pub fn run_llama_bench_with(
    bench: &Path,
    spec: &BenchSpec,
    timeout: Duration,
    configure: impl FnOnce(&mut Command),
) -> Result<(Vec<BenchRow>, Captured), PlanError> {
    let mut cmd = Command::new(bench);
    cmd.args(spec.args());
    configure(&mut cmd);
    let out = run_with_deadline(&mut cmd, timeout)?;
    if !out.status.success() {
        return Err(PlanError::BenchFailed {
            status: out.status.to_string(),
            tail: out.stderr_tail(15),
        });
    }
    let rows = receipt::parse_bench_json(&out.stdout, "from llama-bench")?;
    Ok((rows, out))
}

/// Locates llama-bench: an explicit path, else next to the located llama-server.
pub fn locate_llama_bench(explicit: Option<&Path>) -> Result<PathBuf, PlanError> {
    if let Some(p) = explicit {
        return Ok(p.to_path_buf());
    }
    let e = Engine::locate(None)?;
    e.llama_bench.ok_or_else(|| {
        PlanError::Usage(format!(
            "find llama-bench: not next to {}; pass --llama-bench PATH",
            e.llama_server.display()
        ))
    })
}

/// Pairs llama-bench rows with plans for the same settings: one receipt per configuration
/// (decode row plus the matching prefill row).
pub fn pair(
    model: &ModelFacts,
    base: &PlanInput,
    hw: &HardwareFacts,
    rows: &[BenchRow],
    store: Option<&ReceiptStore>,
    source: &str,
    exclude: &dyn Fn(&Receipt) -> bool,
) -> Vec<Receipt> {
    let mut out = Vec::new();
    // One receipt per configuration, in the order llama-bench ran them.
    let mut keys: Vec<String> = Vec::new();
    for r in rows {
        let k = r.settings_key();
        if !keys.contains(&k) {
            keys.push(k);
        }
    }
    for key in keys {
        let same: Vec<&BenchRow> = rows.iter().filter(|r| r.settings_key() == key).collect();
        let first = same[0];
        let decode = same.iter().find(|r| r.is_decode());
        let prefill = same.iter().find(|r| r.is_prefill());
        let mut input = base.clone();
        input.threads = first.n_threads.max(1);
        if let Some(k) = GgmlType::from_name(&first.type_k) {
            input.settings.k_type = k;
        }
        if let Some(v) = GgmlType::from_name(&first.type_v) {
            input.settings.v_type = v;
        }
        input.settings.ubatch = first.n_ubatch.max(1);
        input.depth = first.n_depth;
        let placement = if first.n_gpu_layers == 0 {
            Placement::CpuOnly
        } else if first.n_cpu_moe > 0 && model.is_moe() {
            Placement::CpuMoe { n: first.n_cpu_moe }
        } else {
            Placement::AllGpu
        };
        // What the machine actually ran on decides the regime, not the flags.
        let mut hw_run = hw.clone();
        if !first.has_gpu() {
            hw_run.gpu = None;
        }
        let f = forecast_for(model, &input, &hw_run, placement, None, store, |r| {
            exclude(r)
        });
        out.push(Receipt {
            machine: hw.machine.key(),
            unix_time: hardware::unix_now(),
            model: model.path.clone(),
            fingerprint: model.fingerprint.clone(),
            regime: f.roofline.regime,
            settings: key,
            threads: input.threads,
            n_gpu_layers: first.n_gpu_layers,
            n_cpu_moe: first.n_cpu_moe,
            source: source.to_string(),
            host_gbps: f.roofline.host_gbps,
            decode_ceiling_tps: f.roofline.decode_tps,
            decode_compute_secs: f.roofline.host_compute_secs,
            decode_measured_tps: decode.map(|r| r.avg_ts),
            decode_forecast_tps: f.decode.tps,
            decode_band: (f.decode.low, f.decode.high),
            prefill_ceiling_tps: f.roofline.prefill_tps,
            prefill_measured_tps: prefill.map(|r| r.avg_ts),
            prefill_forecast_tps: f.prefill.tps,
        });
    }
    out
}

/// Renders receipts as a table.
pub fn render_receipts(rs: &[Receipt]) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{:<34} {:<18} {:>10} {:>10} {:>10} {:>8} {:>7} {:>6}",
        "configuration", "regime", "ceiling", "forecast", "measured", "error", "eff", "band"
    );
    for r in rs {
        let err = r
            .decode_error()
            .map(|e| format!("{:+.1}%", e * 100.0))
            .unwrap_or_else(|| "-".into());
        let _ = writeln!(
            s,
            "{:<34} {:<18} {:>10.1} {:>10.1} {:>10} {:>8} {:>7} {:>6}",
            r.settings,
            r.regime.name(),
            r.decode_ceiling_tps,
            r.decode_forecast_tps,
            r.decode_measured_tps
                .map(|m| format!("{m:.1}"))
                .unwrap_or_else(|| "-".into()),
            err,
            r.decode_efficiency()
                .map(|e| format!("{e:.2}"))
                .unwrap_or_else(|| "-".into()),
            match r.decode_inside_band() {
                Some(true) => "inside",
                Some(false) => "OUT",
                None => "-",
            }
        );
    }
    s
}

fn run_receipt(a: ReceiptArgs) -> Result<(), PlanError> {
    let input = PlanInput::from_args(&a.plan)?;
    let model = model_facts(&input.model)?;
    let hw = hardware::gather(&a.plan.hardware.overrides())?;
    let store_path = receipt::store_path();
    let mut store = ReceiptStore::load(&store_path)?;
    let rows = match &a.from {
        Some(path) => receipt::read_bench_json(path)?,
        None => {
            let placement = match fit::fit(
                &model,
                &input.settings,
                input.budget_bytes,
                hw.ram_total_bytes,
            ) {
                FitOutcome::Fits { placement, .. } => placement,
                FitOutcome::Refused(r) => {
                    return Err(PlanError::Refused {
                        model: model.path.clone(),
                        reason: r.reason,
                    })
                }
            };
            let (ngl, ncmoe) = fit::gpu_layers(&model, placement);
            let bench = locate_llama_bench(a.llama_bench.as_deref())?;
            let spec = BenchSpec {
                model: input.model.clone(),
                threads: input.threads,
                n_gpu_layers: ngl,
                n_cpu_moe: ncmoe,
                type_k: input.settings.k_type.name.to_string(),
                type_v: input.settings.v_type.name.to_string(),
                flash_attn: fit::needs_flash_attn(&input.settings),
                ubatch: input.settings.ubatch,
                n_prompt: a.n_prompt,
                n_gen: a.n_gen.max(1),
                repetitions: a.repetitions.max(1),
            };
            run_llama_bench(&bench, &spec, Duration::from_secs(a.timeout))?
        }
    };
    if let Some(r) = rows.iter().find(|r| r.model_size > 0) {
        let weights: u64 = model.groups.values().sum();
        if r.model_size != weights {
            return Err(PlanError::Usage(format!(
                "pair llama-bench output with {}: it measured a model of {} bytes, this one has {} bytes of weights",
                model.path, r.model_size, weights
            )));
        }
    }
    let source = if a.from.is_some() {
        "file"
    } else {
        "llama-bench"
    };
    let use_store = input.use_receipts.then_some(&store);
    let fresh = pair(&model, &input, &hw, &rows, use_store, source, &|_| false);
    if a.plan.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&fresh).expect("serialize")
        );
    } else {
        print!("{}", render_receipts(&fresh));
    }
    if !a.dry_run {
        store.receipts.extend(fresh);
        store.version = 1;
        store.save(&store_path)?;
        if !a.plan.json {
            println!("stored in {}", store_path.display());
        }
    }
    Ok(())
}
