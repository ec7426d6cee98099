//! The four configurations measured with llama-bench, one row each, and the choice of slots
//! per expert layer for (d).

use std::process::Command;
use std::time::Duration;

use crate::engine;
use crate::gguf::{GgufFile, MoeGeometry};
use crate::plan::llama_bench::run_llama_bench_with;
use crate::plan::receipt::BenchRow;
use crate::telemetry::{locate_tap, Provider, TapEnv};

use super::bytes::measure_bytes;
use super::engines::{decode_spec, gpu_facts, hooked_runner, stock_runner, Runner};
use super::report::{
    residency_from_stderr, BenchResidencyReport, EngineUsed, Engines, Machine, Row, Target,
};
use super::{BenchResidencyArgs, BenchResidencyError, Config, TARGET};

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
                crate::units::mib(per_slot)
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
                crate::units::mib(per_slot),
                expert_bytes.len()
            ),
        ));
    }
    Ok((
        n.div_ceil(4).max(1),
        "default: n_expert/4 rounded up".into(),
    ))
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
    let want_stock = configs.iter().any(|c| c.stock());
    // A flag for a row that does not run would be ignored: say so instead.
    let spark_rows = "(d) spark in --configs";
    let prompt_rows = "(d) spark in --configs";
    let hooked_rows = "(d) spark in --configs, or --bytes";
    let stock_rows = "one of vram, host, host-copy in --configs";
    for (given, flag, needs, used) in [
        (a.slots.is_some(), "--slots", spark_rows, want_spark),
        (
            a.vram_budget.is_some(),
            "--vram-budget",
            spark_rows,
            want_spark,
        ),
        (
            a.hooked_bench.is_some(),
            "--hooked-bench",
            hooked_rows,
            want_spark || a.bytes,
        ),
        (a.tap.is_some(), "--tap", hooked_rows, want_spark || a.bytes),
        (a.prompt.is_some(), "--prompt", prompt_rows, want_spark),
        (
            a.llama_bench.is_some(),
            "--llama-bench",
            stock_rows,
            want_stock,
        ),
    ] {
        if given && !used {
            return usage(format!(
                "parse {flag}: it applies to {needs}, which this run leaves out"
            ));
        }
    }
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
    for spec in &a.bytes_layer_slots {
        match spark_proto::hook::SlotCounts::parse(spec) {
            Ok(spark_proto::hook::SlotCounts::PerLayer(v)) => {
                if let Some(&(l, n)) = v.iter().find(|&&(l, n)| l >= g.n_layer || n > g.n_expert) {
                    return usage(format!(
                        "parse --bytes-layer-slots {spec}: layer {l} with {n} slots; the model has {} layers of {} experts",
                        g.n_layer, g.n_expert
                    ));
                }
            }
            Ok(_) => {
                return usage(format!(
                    "parse --bytes-layer-slots {spec}: give LAYER:SLOTS pairs (one count for every layer is --bytes-slots)"
                ))
            }
            Err(e) => return usage(format!("parse --bytes-layer-slots {spec}: {e}")),
        }
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
    let steps =
        crate::progress::Steps::new("bench residency", configs.len() as u64, "configs", false);
    for (i, &c) in configs.iter().enumerate() {
        let runner = if c.stock() { &stock } else { &hooked };
        let runner = runner
            .as_ref()
            .expect("located above for the selected configs");
        let n_cpu_moe = if c == Config::Vram { 0 } else { all_host };
        let spec = decode_spec(a, threads, n_cpu_moe, a.reps);
        // Only what the row says: no inherited preload, offload threshold or spark session
        // (without a ring and a control channel the tap only provides residency).
        let tap_env = TapEnv {
            offload_min_batch: matches!(c, Config::HostCopy | Config::Spark),
            tap: (c == Config::Spark).then(|| tap.clone().expect("located with the hooked build")),
            provider: (c == Config::Spark).then(|| {
                Provider::Slots(spark_proto::hook::SlotCounts::Uniform(
                    slots.as_ref().expect("chosen").0,
                ))
            }),
            ..TapEnv::default()
        };
        let env = tap_env.vars();
        steps.at(
            i as u64,
            || format!("measuring ({}) {}", c.letter(), c.name()),
            || {
                format!(
                    "measuring ({}) {} [{}/{}]",
                    c.letter(),
                    c.name(),
                    i + 1,
                    configs.len()
                )
            },
        );
        let configure = |cmd: &mut Command| tap_env.apply(cmd);
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
    let prefill = match (a.prompt, &hooked, &tap, &slots) {
        (Some(prompt), Some(h), Some(tap), Some(s)) => Some(super::prefill::measure_prefill(
            a, &g, h, tap, threads, s.0, prompt,
        )?),
        _ => None,
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
        prefill,
    })
}
