//! llama-bench runs and the receipts they make: locating llama-bench, running it under a
//! deadline and reading its JSON (also for `spark bench`), pairing a measurement with the plan
//! of the same settings, and `spark plan receipt`. Never spawns a process itself: llama-bench
//! runs through [`crate::supervisor::run_with_deadline`].

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::engine::Engine;
use crate::gguf::GgmlType;
use crate::supervisor::{run_with_deadline, Captured};

use super::cli::ReceiptArgs;
use super::fit::{self, FitOutcome, ModelFacts, Placement};
use super::hardware::HardwareFacts;
use super::receipt::{self, BenchRow, BenchSpec, Receipt, ReceiptStore};
use super::render::render_receipts;
use super::{forecast_for, hardware, model_facts, PlanError, PlanInput};

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

pub(super) fn run_receipt(a: ReceiptArgs) -> Result<(), PlanError> {
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
                n_gen: a.n_gen,
                repetitions: a.repetitions,
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
