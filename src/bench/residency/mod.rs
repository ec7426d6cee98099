//! `spark bench residency`: decode tokens/s of one model under four configurations, measured
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
//!
//! Split by concern: the flags, configurations and errors here; [`run`] (the four rows and the
//! choice of slots), [`bytes`] (`--bytes`: host→device bytes per token and the predicted hit
//! ratio), [`prefill`] (`--prompt`: decode's hit ratio right after prompts, under both
//! admission rules for prompt batches), [`engines`] (which builds run, what the machine is), [`report`] (the report's types
//! and the reading of the exit line), [`render`] (the human report).

use std::path::PathBuf;

use serde::Serialize;

use crate::engine::EngineError;
use crate::gguf::GgufError;
use crate::plan::PlanError;
use crate::telemetry::TelemetryError;

mod bytes;
mod engines;
mod prefill;
mod render;
mod report;
mod run;

pub use bytes::{default_bytes_slots, predict_hit_ratio};
pub use prefill::{PrefillReport, PrefillRow};
pub use render::render;
pub use report::{
    residency_from_stderr, BenchResidencyReport, BytesReport, BytesRow, EngineUsed, Engines,
    Machine, Residency, Row, Target,
};
pub use run::{choose_slots, run};

pub use spark_proto::hook::{ENV_OFFLOAD_MIN_BATCH, ENV_RESIDENCY_METER, ENV_RESIDENCY_SLOTS};
/// The goal for (d) against (b), printed next to the measurement, never checked.
pub const TARGET: &str = "(d) >= 1.5x (b)";
const TARGET_RATIO: f64 = 1.5;

/// One of the four configurations.
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
    #[arg(long, value_delimiter = ',', value_name = "N,N,N", requires = "bytes")]
    pub bytes_slots: Vec<u32>,
    /// Also run (d) with a count per layer, in SPARK_RESIDENCY_SLOTS's form (`L:N,L:N,…`,
    /// layers ascending; unnamed layers 0 slots, streamed); repeat for more rows
    #[arg(long, value_name = "L:N,L:N", requires = "bytes")]
    pub bytes_layer_slots: Vec<String>,
    /// Link bandwidth for the --bytes forecast, GB/s (default: PCIe 4.0 x16, one direction)
    #[arg(long, default_value_t = PCIE4_X16_GBPS, value_name = "GB/s", requires = "bytes")]
    pub link_gbps: f64,
    /// Also run (d) after N-token prompts (llama-bench -pg N,TOKENS), once admitting prompt
    /// batches like decode (the rule before) and once streaming their one-off uses (the
    /// default), and report the hit ratio of the decode calls that follow each prompt
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    pub prompt: Option<u64>,
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
    use spark_proto::control::{ResidencyStats, RESIDENCY_EXIT_PREFIX};

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
