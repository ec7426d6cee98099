//! `spark bench residency --prompt N`: does prompt processing flush decode's hot set?
//!
//! Runs (d) twice with llama-bench `-pg N,TOKENS` (each repetition: an N-token prompt, then
//! TOKENS decoded tokens, so every decode run starts right after a prompt): once with the
//! provider admitting prompt batches like decode (`SPARK_RESIDENCY_PREFILL=admit`, the rule
//! before), once with the default rule that streams one-off uses of wide calls. Reports the
//! hit ratio of the decode calls alone (narrow calls: the provider counts wide calls apart),
//! the wide calls' own counters, and copy calls per decoded token. Reports, never asserts.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use serde::Serialize;
use spark_proto::hook::ENV_RESIDENCY_PREFILL;

use crate::gguf::MoeGeometry;
use crate::plan::llama_bench::run_llama_bench_with;
use crate::telemetry::{Provider, TapEnv};

use super::engines::{decode_spec, Runner};
use super::report::{residency_from_stderr, Residency};
use super::{BenchResidencyArgs, BenchResidencyError, Config};

/// One rule's run.
#[derive(Debug, Clone, Serialize)]
pub struct PrefillRow {
    /// `admit` (prompt batches admitted like decode) or `stream` (the default rule).
    pub rule: &'static str,
    /// llama-bench's `-pg` throughput, tokens (prompt + generated) per second.
    pub pg_tok_s: f64,
    pub residency: Residency,
}

/// The `--prompt` comparison.
#[derive(Debug, Clone, Serialize)]
pub struct PrefillReport {
    pub prompt: u64,
    pub tokens: u64,
    pub slots: u32,
    /// Decoded tokens per run: reps × tokens plus llama-bench's one-token warmup.
    pub decoded: u64,
    pub rows: Vec<PrefillRow>,
}

/// Measures both rules on the hooked build.
pub(super) fn measure_prefill(
    a: &BenchResidencyArgs,
    g: &MoeGeometry,
    hooked: &Runner,
    tap: &Path,
    threads: u32,
    slots: u32,
    prompt: u64,
) -> Result<PrefillReport, BenchResidencyError> {
    let decoded = a.tokens * u64::from(a.reps) + 1;
    let mut rows = Vec::new();
    for (i, rule) in ["admit", "stream"].into_iter().enumerate() {
        tracing::info!(
            target: crate::progress::TARGET,
            "measuring prefill: (d) spark, {prompt}-token prompts, prompt batches {rule} [{}/2]",
            i + 1
        );
        let mut spec = decode_spec(a, threads, g.n_layer, a.reps);
        spec.n_gen = 0;
        let tap_env = TapEnv {
            offload_min_batch: true,
            tap: Some(tap.to_path_buf()),
            provider: Some(Provider::Slots(spark_proto::hook::SlotCounts::Uniform(
                slots,
            ))),
            ..TapEnv::default()
        };
        let configure = |cmd: &mut Command| {
            tap_env.apply(cmd);
            cmd.env(ENV_RESIDENCY_PREFILL, rule);
            cmd.arg("-pg").arg(format!("{prompt},{}", a.tokens));
        };
        let (bench_rows, out) = run_llama_bench_with(
            &hooked.bench,
            &spec,
            Duration::from_secs(a.timeout),
            configure,
        )
        .map_err(|source| BenchResidencyError::Measure {
            letter: Config::Spark.letter(),
            config: Config::Spark.name(),
            source,
        })?;
        let pg_tok_s = bench_rows
            .iter()
            .find(|r| r.n_prompt > 0 && r.n_gen > 0)
            .map(|r| r.avg_ts)
            .ok_or(BenchResidencyError::NoDecodeRow {
                letter: Config::Spark.letter(),
                config: Config::Spark.name(),
            })?;
        rows.push(PrefillRow {
            rule,
            pg_tok_s,
            residency: residency_from_stderr(&out.stderr, decoded),
        });
    }
    Ok(PrefillReport {
        prompt,
        tokens: a.tokens,
        slots,
        decoded,
        rows,
    })
}
