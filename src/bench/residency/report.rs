//! The report of `spark bench residency` (what was measured, with which builds, on which
//! machine) and the reading of the tap's residency exit line from llama-bench's stderr. Pure
//! data: runs nothing.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::Serialize;
use spark_proto::control::{ResidencyStats, RESIDENCY_EXIT_PREFIX};

use super::Config;

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
    /// The hit ratio of the narrow (decode) calls alone, wide (prompt) calls left out.
    pub decode_hit_ratio: Option<f64>,
    /// Host → device copy calls per decoded token, batched (now) and one per loaded expert
    /// (the provider before batching).
    pub host_copies_per_token: Option<f64>,
    pub host_copies_unbatched_per_token: Option<f64>,
    /// Device → device copy calls per decoded token.
    pub device_copies_per_token: Option<f64>,
}

impl Residency {
    fn missing(line: Option<String>, note: String) -> Residency {
        Residency {
            line,
            note: Some(note),
            counters: None,
            hit_ratio: None,
            host_bytes_per_token: None,
            slot_bytes_per_token: None,
            decode_hit_ratio: None,
            host_copies_per_token: None,
            host_copies_unbatched_per_token: None,
            device_copies_per_token: None,
        }
    }
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
    /// `--prompt`: decode's hit ratio after prompts, under both admission rules.
    pub prefill: Option<super::PrefillReport>,
}

/// One `--bytes` run: (c) metered, or (d) at one slot count.
#[derive(Debug, Clone, Serialize)]
pub struct BytesRow {
    pub config: Config,
    /// Slots per expert layer ((d) only; with a per-layer list, the largest count).
    pub slots: Option<u32>,
    /// The per-layer list this row ran with (`SPARK_RESIDENCY_SLOTS`'s form), if any.
    pub slots_per_layer: Option<String>,
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

/// Finds the tap's exit line in `stderr` and reads it; `decoded` is the tokens the run decoded.
pub fn residency_from_stderr(stderr: &str, decoded: u64) -> Residency {
    let line = stderr
        .lines()
        .rev()
        .find_map(|l| l.trim_end().strip_prefix(RESIDENCY_EXIT_PREFIX))
        .map(str::to_string);
    let Some(text) = line else {
        return Residency::missing(None, "no residency line".into());
    };
    match ResidencyStats::parse(&text) {
        Ok(s) => {
            let counters = s
                .fields()
                .iter()
                .map(|&(k, v)| (k.to_string(), v))
                .collect();
            let per = |b: u64| (decoded > 0).then(|| b as f64 / decoded as f64);
            Residency {
                line: Some(text),
                note: None,
                counters: Some(counters),
                hit_ratio: s.hit_ratio(),
                host_bytes_per_token: per(s.bytes_host),
                slot_bytes_per_token: per(s.bytes_hit),
                decode_hit_ratio: s.decode_hit_ratio(),
                host_copies_per_token: per(s.copies_host),
                host_copies_unbatched_per_token: per(s.copies_host_unbatched),
                device_copies_per_token: per(s.copies_device),
            }
        }
        Err(e) => Residency::missing(Some(text), format!("unreadable residency line: {e}")),
    }
}
