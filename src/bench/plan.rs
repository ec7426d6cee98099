//! `spark bench plan`: validates the decode forecast against llama-bench on fixtures across
//! `--n-cpu-moe` and thread settings, with leave-one-out calibration, and reports the median
//! absolute error and the worst case.
//!
//! Owns the validation procedure. A configuration is never calibrated by its own receipt; the
//! strict score goes further and calibrates each model only from the other models' receipts
//! (on a machine without a GPU `--n-cpu-moe` changes nothing physically, so receipts of the same
//! model at other `--n-cpu-moe` values would be near-copies of the one being predicted). A
//! benchmark: it reports numbers and asserts nothing.
//!
//! Also owns `<dir>/measurements.json`, the raw llama-bench rows of the last run with the
//! bandwidth measured around each, so `--rescore` scores them again without measuring. The
//! same measurements are scored three ways: with the per-type compute term (the probe's record,
//! probed first when the machine has none), with one FLOP rate for every type, and bandwidth
//! only.

use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Args;
use serde::{Deserialize, Serialize};

use crate::fixture::{self, FixtureSpec, Size};
use crate::gguf::GgmlType;
use crate::plan::cli::ProbeArgs;
use crate::plan::fit::MemorySettings;
use crate::plan::forecast::calibrate;
use crate::plan::llama_bench::pair;
use crate::plan::median::median;
use crate::plan::receipt::{same_threads, BenchRow, BenchSpec, Receipt, ReceiptStore};
use crate::plan::type_cost;
use crate::plan::{hardware, model_facts, PlanError, PlanInput};
use crate::units::MIB;

#[derive(Debug, Args)]
pub struct BenchPlanArgs {
    /// Where the fixtures are written (kept for the next run)
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Thread counts to measure, comma-separated
    #[arg(long, value_delimiter = ',', default_value = "1,2")]
    pub threads: Vec<u32>,
    /// llama-bench binary (default: next to the located llama-server)
    #[arg(long, value_name = "PATH")]
    pub llama_bench: Option<PathBuf>,
    /// Tokens generated per repetition
    #[arg(long, default_value_t = 48)]
    pub n_gen: u64,
    /// Repetitions per configuration
    #[arg(long, default_value_t = 5)]
    pub repetitions: u32,
    /// Score the fastest repetition instead of the mean (on a shared machine the fastest one is
    /// the least disturbed; the bandwidth is a best-of measurement too)
    #[arg(long)]
    pub best: bool,
    /// Seconds one llama-bench run may take
    #[arg(long, default_value_t = 300)]
    pub timeout: u64,
    /// Do not add the measurements to this machine's receipts
    #[arg(long)]
    pub no_store: bool,
    /// Use the cached host bandwidth for every configuration instead of measuring it again just
    /// before each one (on a shared machine the bandwidth left to one process drifts)
    #[arg(long)]
    pub cached_bandwidth: bool,
    /// Score saved measurements again with the current forecast instead of measuring (seconds,
    /// not minutes): the last run's (`<dir>/measurements.json`) or the file given
    #[arg(long, value_name = "FILE", num_args = 0..=1, default_missing_value = "")]
    pub rescore: Option<PathBuf>,
    /// Do not run the per-type compute probe when this machine has none on record (the
    /// forecast then uses one FLOP rate for every type)
    #[arg(long)]
    pub no_probe: bool,
    /// Print JSON instead of text
    #[arg(long)]
    pub json: bool,
}

/// One fixture of the validation set.
struct Model {
    name: &'static str,
    spec: FixtureSpec,
}

fn models() -> Vec<Model> {
    // A uniform router: every token reads its own experts, as a real model's gigabytes per token
    // stream from memory. With the preset's skewed router a few hot experts per layer serve
    // most tokens and stay in the last-level cache of a fixture this small (tens of MB per
    // token), which favours the smaller types: the forecast models reads from memory.
    let mut medium = FixtureSpec::preset(Size::Medium);
    medium.router = fixture::Router::Uniform;
    let mut f16 = medium.clone();
    f16.weight_type = GgmlType::F16;
    let mut wide = medium.clone();
    wide.layers = 8;
    wide.experts = 64;
    wide.top_k = 8;
    wide.embd = 768;
    wide.n_head = 12;
    wide.n_head_kv = 4;
    wide.expert_ff = 256;
    let mut deep = medium.clone();
    deep.layers = 24;
    deep.experts = 16;
    deep.top_k = 2;
    deep.expert_ff = 768;
    vec![
        Model {
            name: "medium-q8_0-uniform",
            spec: medium,
        },
        Model {
            name: "medium-f16-uniform",
            spec: f16,
        },
        Model {
            name: "wide-q8_0-uniform",
            spec: wide,
        },
        Model {
            name: "deep-q8_0-uniform",
            spec: deep,
        },
    ]
}

/// One validated configuration.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub model: String,
    pub threads: u32,
    pub n_cpu_moe: u32,
    /// Host bandwidth the ceiling used, GB/s.
    pub host_gbps: f64,
    pub ceiling_tps: f64,
    /// Seconds per token of the ceiling that are the CPU's compute term.
    pub compute_secs: f64,
    pub measured_tps: f64,
    /// Forecast calibrated from the other models' receipts.
    pub forecast_strict_tps: f64,
    pub error_strict: f64,
    pub inside_band_strict: bool,
    /// Forecast calibrated from every other configuration's receipt.
    pub forecast_loo_tps: f64,
    pub error_loo: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub rows: Vec<Row>,
    pub median_abs_error_strict: f64,
    pub worst_abs_error_strict: f64,
    pub median_abs_error_loo: f64,
    pub worst_abs_error_loo: f64,
    pub inside_band_strict: usize,
    pub host_gbps: Vec<hardware::RatePoint>,
}

/// Scores receipts: for each, a forecast calibrated without it (strict: without its model).
pub fn score(receipts: &[(String, Receipt)]) -> Vec<Row> {
    let mut rows = Vec::new();
    for (i, (name, r)) in receipts.iter().enumerate() {
        let Some(measured) = r.decode_measured_tps else {
            continue;
        };
        let effs = |keep: &dyn Fn(&Receipt) -> bool| -> Vec<f64> {
            let pool: Vec<&Receipt> = receipts
                .iter()
                .enumerate()
                .filter(|(j, (_, o))| *j != i && o.regime == r.regime && keep(o))
                .map(|(_, (_, o))| o)
                .collect();
            let pool = same_threads(&pool, r.threads).unwrap_or(pool);
            pool.iter().filter_map(|o| o.decode_efficiency()).collect()
        };
        let strict = calibrate(r.regime, &effs(&|o| o.fingerprint != r.fingerprint));
        let loo = calibrate(r.regime, &effs(&|o| !o.same_configuration(r)));
        let fs = r.decode_ceiling_tps * strict.efficiency;
        let fl = r.decode_ceiling_tps * loo.efficiency;
        rows.push(Row {
            model: name.clone(),
            threads: r.threads,
            n_cpu_moe: r.n_cpu_moe,
            host_gbps: r.host_gbps,
            ceiling_tps: r.decode_ceiling_tps,
            compute_secs: r.decode_compute_secs,
            measured_tps: measured,
            forecast_strict_tps: fs,
            error_strict: (fs - measured) / measured,
            inside_band_strict: measured >= r.decode_ceiling_tps * strict.low
                && measured <= r.decode_ceiling_tps * strict.high,
            forecast_loo_tps: fl,
            error_loo: (fl - measured) / measured,
        });
    }
    rows
}

/// The receipts as the forecast saw them before the CPU's compute term existed: the same
/// measurements against a bandwidth-only ceiling (for the before/after line). Only for
/// receipts made without a probe record, whose compute term sits on top of the reads.
pub fn bandwidth_only(receipts: &[(String, Receipt)]) -> Vec<(String, Receipt)> {
    receipts
        .iter()
        .map(|(n, r)| {
            let mut r = r.clone();
            let secs = 1.0 / r.decode_ceiling_tps - r.decode_compute_secs;
            if r.decode_compute_secs > 0.0 && secs > 0.0 {
                r.decode_ceiling_tps = 1.0 / secs;
                r.decode_compute_secs = 0.0;
            }
            (n.clone(), r)
        })
        .collect()
}

pub fn summarize(rows: Vec<Row>, host_gbps: Vec<hardware::RatePoint>) -> Report {
    let abs = |f: fn(&Row) -> f64| rows.iter().map(|r| f(r).abs()).collect::<Vec<f64>>();
    let s = abs(|r| r.error_strict);
    let l = abs(|r| r.error_loo);
    Report {
        median_abs_error_strict: median(&s),
        worst_abs_error_strict: s.iter().copied().fold(0.0, f64::max),
        median_abs_error_loo: median(&l),
        worst_abs_error_loo: l.iter().copied().fold(0.0, f64::max),
        inside_band_strict: rows.iter().filter(|r| r.inside_band_strict).count(),
        rows,
        host_gbps,
    }
}

pub fn render(rep: &Report) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{:<12} {:>3} {:>6} {:>6} {:>8} {:>9} {:>9} {:>9} {:>8} {:>6} {:>9} {:>8}",
        "model",
        "t",
        "ncmoe",
        "GB/s",
        "cmp ms",
        "ceiling",
        "measured",
        "strict",
        "error",
        "band",
        "loo",
        "error"
    );
    for r in &rep.rows {
        let _ = writeln!(
            s,
            "{:<12} {:>3} {:>6} {:>6.1} {:>8.3} {:>9.1} {:>9.1} {:>9.1} {:>+7.1}% {:>6} {:>9.1} {:>+7.1}%",
            r.model,
            r.threads,
            r.n_cpu_moe,
            r.host_gbps,
            r.compute_secs * 1e3,
            r.ceiling_tps,
            r.measured_tps,
            r.forecast_strict_tps,
            r.error_strict * 100.0,
            if r.inside_band_strict { "in" } else { "OUT" },
            r.forecast_loo_tps,
            r.error_loo * 100.0
        );
    }
    let _ = writeln!(
        s,
        "strict (calibrated from other models only): median |error| {:.1}%, worst {:.1}%, {} of {} inside the band",
        rep.median_abs_error_strict * 100.0,
        rep.worst_abs_error_strict * 100.0,
        rep.inside_band_strict,
        rep.rows.len()
    );
    let _ = writeln!(
        s,
        "leave-one-configuration-out: median |error| {:.1}%, worst {:.1}%",
        rep.median_abs_error_loo * 100.0,
        rep.worst_abs_error_loo * 100.0
    );
    let bw: Vec<String> = rep
        .host_gbps
        .iter()
        .map(|p| format!("{:.1} GB/s at {} threads", p.rate, p.threads))
        .collect();
    let _ = writeln!(s, "host read bandwidth: {}", bw.join(", "));
    s
}

/// One llama-bench run of the validation set, as measured: kept in `<dir>/measurements.json`
/// so the same measurements can be scored again (`--rescore`) after the forecast changes.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Measurement {
    pub model: String,
    pub path: PathBuf,
    pub threads: u32,
    pub n_cpu_moe: u32,
    /// Host read bandwidth around the run (before and after, averaged), GB/s.
    pub host_gbps: f64,
    pub rows: Vec<BenchRow>,
}

/// The saved measurements of one machine.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Measurements {
    pub machine: String,
    pub measured_unix: u64,
    pub runs: Vec<Measurement>,
}

fn memory_settings() -> MemorySettings {
    MemorySettings {
        ctx: 512,
        k_type: GgmlType::F16,
        v_type: GgmlType::F16,
        ubatch: 512,
        reserve_bytes: 256 * MIB,
    }
}

/// Runs llama-bench over the validation set.
fn measure(
    a: &BenchPlanArgs,
    dir: &Path,
    hw: &hardware::HardwareFacts,
) -> Result<Vec<Measurement>, PlanError> {
    let bench = crate::plan::llama_bench::locate_llama_bench(a.llama_bench.as_deref())?;
    let vocab = crate::engine::vocab_path(crate::engine::DEFAULT_VOCAB)?;
    let models = models();
    let steps = crate::progress::Steps::new(
        "bench plan",
        (models.len() * a.threads.len() * 2) as u64,
        "runs",
        false,
    );
    let mut done = 0u64;
    let mut out = Vec::new();
    for m in models {
        let path = dir.join(format!("{}.gguf", m.name));
        if !path.exists() {
            tracing::info!(target: crate::progress::TARGET,"writing fixture {}", path.display());
            fixture::write_fixture(&m.spec, &vocab, &path)
                .map_err(|e| PlanError::Validation(format!("write fixture {}: {e}", m.name)))?;
        }
        let facts = model_facts(&path)?;
        let half = (facts.expert_layer_end() / 2).max(1);
        for &t in &a.threads {
            for ncmoe in [0, half] {
                let spec = BenchSpec {
                    model: path.clone(),
                    threads: t,
                    n_gpu_layers: 99,
                    n_cpu_moe: ncmoe,
                    type_k: "f16".into(),
                    type_v: "f16".into(),
                    flash_attn: false,
                    ubatch: 512,
                    n_prompt: 0,
                    n_gen: a.n_gen.max(1),
                    repetitions: a.repetitions.max(1),
                };
                let before = if a.cached_bandwidth {
                    hw.host_gbps_at(t)
                } else {
                    hardware::read_gbps_now(t)
                };
                steps.at(
                    done,
                    || format!("{} threads {t} --n-cpu-moe {ncmoe}", m.name),
                    || format!("measuring {} threads {t} --n-cpu-moe {ncmoe}", m.name),
                );
                done += 1;
                let rows = crate::plan::llama_bench::run_llama_bench(
                    &bench,
                    &spec,
                    Duration::from_secs(a.timeout),
                )?;
                // Bandwidth before and after the run, averaged.
                let host_gbps = if a.cached_bandwidth {
                    before
                } else {
                    (before + hardware::read_gbps_now(t)) / 2.0
                };
                out.push(Measurement {
                    model: m.name.to_string(),
                    path: path.clone(),
                    threads: t,
                    n_cpu_moe: ncmoe,
                    host_gbps,
                    rows,
                });
            }
        }
    }
    steps.finish();
    Ok(out)
}

/// Pairs each measurement with the forecast `hw` makes for it (its own bandwidth).
fn receipts_for(
    runs: &[Measurement],
    hw: &hardware::HardwareFacts,
    best: bool,
) -> Result<Vec<(String, Receipt)>, PlanError> {
    let mut receipts = Vec::new();
    for m in runs {
        let facts = model_facts(&m.path)?;
        let input = PlanInput {
            model: m.path.clone(),
            settings: memory_settings(),
            budget_bytes: None,
            threads: m.threads,
            depth: 0,
            use_receipts: false,
        };
        let mut hw_now = hw.clone();
        hw_now.host_read_gbps = vec![hardware::RatePoint {
            threads: m.threads,
            rate: m.host_gbps,
        }];
        let mut rows = m.rows.clone();
        if best {
            for r in &mut rows {
                r.avg_ts = r.samples_ts.iter().copied().fold(r.avg_ts, f64::max);
            }
        }
        for r in pair(&facts, &input, &hw_now, &rows, None, "bench plan", &|_| {
            false
        }) {
            receipts.push((m.model.clone(), r));
        }
    }
    Ok(receipts)
}

pub fn run(a: BenchPlanArgs) -> Result<(), PlanError> {
    if a.threads.is_empty() || a.threads.contains(&0) {
        return Err(PlanError::Usage(
            "parse --threads: give positive thread counts, e.g. 1,2".into(),
        ));
    }
    let dir = a
        .dir
        .clone()
        .unwrap_or_else(|| crate::engine::cache_dir().join("bench-plan"));
    std::fs::create_dir_all(&dir)
        .map_err(|e| PlanError::Usage(format!("create {}: {e}", dir.display())))?;
    let saved = dir.join("measurements.json");
    let mut hw = hardware::gather(&hardware::HardwareOverrides::default())?;
    // Saved measurements are read (and refused when they are not this machine's) before any
    // slow work starts.
    let saved = match &a.rescore {
        Some(p) if !p.as_os_str().is_empty() => p.clone(),
        _ => saved,
    };
    let rescored = match &a.rescore {
        None => None,
        Some(_) => {
            let text = std::fs::read_to_string(&saved).map_err(|e| {
                PlanError::Usage(format!(
                    "read {}: {e} (run `spark bench plan` without --rescore first)",
                    saved.display()
                ))
            })?;
            let m: Measurements = serde_json::from_str(&text)
                .map_err(|e| PlanError::Usage(format!("parse {}: {e}", saved.display())))?;
            if m.machine != hw.machine.key() {
                return Err(PlanError::Usage(format!(
                    "rescore {}: measured on machine {}, this is {}",
                    saved.display(),
                    m.machine,
                    hw.machine.key()
                )));
            }
            Some(m.runs)
        }
    };
    if hw.type_costs.is_none() && !a.no_probe {
        tracing::info!(
            target: crate::progress::TARGET,
            "no per-type compute probe of this machine yet: probing first (`spark plan probe`)"
        );
        let mut p = ProbeArgs::defaults();
        p.llama_bench = a.llama_bench.clone();
        let c = crate::plan::type_probe::probe(&p, &hw)?;
        type_cost::save(&type_cost::type_costs_path(), &c)?;
        hw.type_costs = Some(c);
    }
    let runs = match rescored {
        Some(runs) => runs,
        None => {
            let runs = measure(&a, &dir, &hw)?;
            let m = Measurements {
                machine: hw.machine.key(),
                measured_unix: hardware::unix_now(),
                runs,
            };
            let json = serde_json::to_vec_pretty(&m).expect("serialize");
            // The latest run, and a copy named by its time that the next run does not replace.
            let stamped = dir.join(format!("measurements-{}.json", m.measured_unix));
            for path in [&saved, &stamped] {
                crate::atomic_file::write_atomic(path, &json)
                    .map_err(|e| PlanError::Validation(format!("write {}: {e}", path.display())))?;
            }
            m.runs
        }
    };
    let receipts = receipts_for(&runs, &hw, a.best)?;
    let bw: Vec<hardware::RatePoint> = a
        .threads
        .iter()
        .map(|&t| hardware::RatePoint {
            threads: t,
            rate: hw.host_gbps_at(t),
        })
        .collect();
    let report = summarize(score(&receipts), bw);
    let mut no_layer_hw = hw.clone();
    if let Some(c) = no_layer_hw.type_costs.as_mut() {
        c.layers.clear();
    }
    let no_layer = summarize(
        score(&receipts_for(&runs, &no_layer_hw, a.best)?),
        Vec::new(),
    );
    let mut flat_hw = hw.clone();
    flat_hw.type_costs = None;
    let flat_receipts = receipts_for(&runs, &flat_hw, a.best)?;
    let flat = summarize(score(&flat_receipts), Vec::new());
    let before = summarize(score(&bandwidth_only(&flat_receipts)), Vec::new());
    if a.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "report": &report,
                "type_costs": &hw.type_costs,
                "without_layer_term": &no_layer,
                "flat_compute": &flat,
                "bandwidth_only": &before,
            }))
            .expect("serialize")
        );
    } else {
        if let Some(c) = &hw.type_costs {
            print!("{}", crate::plan::type_probe::render(c));
        } else {
            println!("no per-type probe: every type at 2 FLOP per weight at the portable FMA rate");
        }
        print!("{}", render(&report));
        for (what, r) in [
            ("per-type costs without the per-layer term", &no_layer),
            ("one FLOP rate for every type (2 FLOP per weight)", &flat),
            ("bandwidth only, no compute term", &before),
        ] {
            println!(
                "{what}: strict median |error| {:.1}%, worst {:.1}%; leave-one-configuration-out median {:.1}%, worst {:.1}%",
                r.median_abs_error_strict * 100.0,
                r.worst_abs_error_strict * 100.0,
                r.median_abs_error_loo * 100.0,
                r.worst_abs_error_loo * 100.0
            );
        }
        println!(
            "measurements {} {}",
            if a.rescore.is_some() {
                "rescored from"
            } else {
                "saved in"
            },
            saved.display()
        );
    }
    if !a.no_store && a.rescore.is_none() {
        let path = crate::plan::receipt::store_path();
        let mut store = ReceiptStore::load(&path)?;
        store.version = 1;
        store.receipts.extend(receipts.into_iter().map(|(_, r)| r));
        store.save(&path)?;
        if !a.json {
            println!("receipts stored in {}", path.display());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::forecast::Regime;

    fn receipt(fp: &str, settings: &str, ceiling: f64, measured: f64) -> (String, Receipt) {
        (
            fp.to_string(),
            Receipt {
                machine: "m".into(),
                unix_time: 0,
                model: fp.into(),
                fingerprint: fp.into(),
                regime: Regime::CpuOnly,
                settings: settings.into(),
                threads: 1,
                n_gpu_layers: 99,
                n_cpu_moe: 0,
                source: "test".into(),
                host_gbps: 10.0,
                decode_ceiling_tps: ceiling,
                decode_compute_secs: 0.0,
                decode_measured_tps: Some(measured),
                decode_forecast_tps: 0.0,
                decode_band: (0.0, 0.0),
                prefill_ceiling_tps: 1.0,
                prefill_measured_tps: None,
                prefill_forecast_tps: 0.0,
            },
        )
    }

    #[test]
    fn a_receipt_never_calibrates_itself() {
        // Model a runs at 50% of its ceiling, b at 100%: strict calibration of a uses only b.
        let rs = vec![
            receipt("a", "t1", 100.0, 50.0),
            receipt("a", "t2", 100.0, 50.0),
            receipt("b", "t1", 100.0, 100.0),
        ];
        let rows = score(&rs);
        assert_eq!(rows.len(), 3);
        assert!((rows[0].forecast_strict_tps - 100.0).abs() < 1e-9);
        assert!((rows[0].error_strict - 1.0).abs() < 1e-9);
        // Leave-one-configuration-out for a/t1 sees a/t2 (0.5) and b/t1 (1.0): median 0.75.
        assert!((rows[0].forecast_loo_tps - 75.0).abs() < 1e-9);
        let rep = summarize(rows, vec![]);
        assert!((rep.worst_abs_error_strict - 1.0).abs() < 1e-9);
    }
}
