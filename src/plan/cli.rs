//! The flags of `spark plan` (and `spark plan receipt|hardware`), as typed, and their
//! resolution into hardware overrides.

use std::path::PathBuf;

use clap::{Args, Subcommand};

use super::hardware::HardwareOverrides;
use super::PlanError;

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
    /// Measure the host's compute cost per weight of each weight type with llama-bench (slow:
    /// minutes; once per machine, recorded beside the hardware profile)
    Probe(ProbeArgs),
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
        let card = self.card();
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
    pub fn card(&self) -> Option<&'static super::presets::CardPreset> {
        self.gpu.as_deref().and_then(super::presets::find)
    }

    pub(super) fn validate(&self) -> Result<(), PlanError> {
        if let Some(g) = &self.gpu {
            if super::presets::find(g).is_none() {
                return Err(PlanError::Usage(format!(
                    "parse --gpu {g}: not a known card ({})",
                    super::presets::keys()
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
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u64).range(1..))]
    pub n_gen: u64,
    /// Prompt tokens per repetition (0: no prefill measurement)
    #[arg(long, default_value_t = 64)]
    pub n_prompt: u64,
    /// Repetitions
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..))]
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

/// `spark plan probe`'s flags (the probe itself is `type_probe.rs`).
#[derive(Debug, Args)]
pub struct ProbeArgs {
    /// Weight types to probe, comma-separated (ggml names)
    #[arg(long, value_delimiter = ',', default_values_t = super::type_cost::DEFAULT_TYPES.iter().map(|s| s.to_string()))]
    pub types: Vec<String>,
    /// Thread counts, comma-separated (default: 1, 2, 4, … and the logical CPU count)
    #[arg(long, value_delimiter = ',')]
    pub threads: Option<Vec<u32>>,
    /// Where the probe's fixtures are kept
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// llama-bench binary (default: next to the located llama-server)
    #[arg(long, value_name = "PATH")]
    pub llama_bench: Option<PathBuf>,
    /// Tokens generated per repetition
    #[arg(long, default_value_t = 32)]
    pub n_gen: u64,
    /// Repetitions per llama-bench run
    #[arg(long, default_value_t = 5)]
    pub repetitions: u32,
    /// Rounds of small and large runs, alternating; the fastest repetition of each size over
    /// every round counts (the least disturbed)
    #[arg(long, default_value_t = 3)]
    pub rounds: u32,
    /// Seconds one llama-bench or llama-quantize run may take
    #[arg(long, default_value_t = 300)]
    pub timeout: u64,
    /// Probe only the fixed cost per layer (seconds), keeping the recorded types
    #[arg(long)]
    pub layers_only: bool,
    /// Print JSON instead of text
    #[arg(long)]
    pub json: bool,
}
