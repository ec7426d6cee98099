//! `spark plan probe`: measures the host's compute cost per weight of each weight type with
//! ggml's own CPU kernels, once per machine, and records it beside the hardware profile
//! ([`super::type_cost`]).
//!
//! Method: for each type, two fixtures that differ only in the routed experts' FFN width, 4 of
//! 32 experts used per token and routed uniformly (decode's own reads: each token its own
//! experts, slices of each expert tensor), the weights a token reads 2× and 4× the last-level
//! cache so both runs read them from memory. (All experts active made a layer's expert tensors
//! one sequential stream, which ggml read faster than decode ever does: f16 came out as cheap as
//! q8_0 per weight.) llama-bench decodes each at each thread count; the slope (seconds per
//! token ÷ weights per token between the two) is what one more weight of that type costs,
//! reading and computing, with everything the two runs share (attention, output, graph
//! overhead) cancelled. The host read bandwidth measured around the
//! runs is kept beside it, to split off a compute share for types the probe did not measure.
//! The fixed cost per layer comes the same way from two tiny-width fixtures at 4 and 36 layers.
//!
//! Owns the probe's fixtures (`cache_dir()/type-probe/`, kept for the next probe) and its runs.
//! Spawns nothing itself: llama-bench and llama-quantize run through
//! [`crate::supervisor::run_with_deadline`]. Slow work (minutes): it says what it is doing.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::atomic_file::{AtomicFile, Mode};
use crate::fixture::{self, FixtureSpec, Router, Size};
use crate::gguf::GgmlType;
use crate::supervisor::run_with_deadline;

use super::cli::ProbeArgs;
use super::hardware::{self, HardwareFacts};
use super::llama_bench::{locate_llama_bench, run_llama_bench};
use super::receipt::BenchSpec;
use super::type_cost::{self, LayerPoint, ProbePoint, TypeCosts, DEFAULT_TYPES, TYPE_COST_VERSION};
use super::{model_facts, PlanError};

/// Last-level cache assumed when sysfs does not say.
const DEFAULT_LLC_BYTES: u64 = 32 << 20;

/// Fixture shape: 4 layers of 32 experts, 4 used per token (uniform routing), width 1024.
const LAYERS: u32 = 4;
const EXPERTS: u32 = 32;
/// Experts each token uses: a few of many, routed uniformly, as decode reads them (each token
/// its own experts, a slice of each expert tensor), not every expert of a layer in one stream.
const TOP_K: u32 = 4;
const EMBD: u64 = 1024;

impl ProbeArgs {
    /// The defaults `spark bench plan` probes with when no record exists.
    pub fn defaults() -> ProbeArgs {
        ProbeArgs {
            types: DEFAULT_TYPES.iter().map(|s| s.to_string()).collect(),
            threads: None,
            dir: None,
            llama_bench: None,
            n_gen: 32,
            repetitions: 5,
            rounds: 3,
            timeout: 300,
            layers_only: false,
            json: false,
        }
    }
}

/// How a probe type is made: written directly, or quantised from a q8_0 fixture with
/// `llama-quantize --pure` (every tensor of that one type, no k-quant mixture).
fn quantize_ftype(t: GgmlType) -> Option<&'static str> {
    match t.name {
        "q4_K" => Some("Q4_K_M"),
        "q5_K" => Some("Q5_K_M"),
        "q6_K" => Some("Q6_K"),
        "iq4_xs" => Some("IQ4_XS"),
        "iq4_nl" => Some("IQ4_NL"),
        "mxfp4" => Some("MXFP4_MOE"),
        "q4_0" => Some("Q4_0"),
        "q5_0" => Some("Q5_0"),
        _ => None,
    }
}

/// Expert FFN width for the small fixture: its routed-expert weights take at least
/// `2 × llc` bytes of type `t`, in whole 256-element blocks.
pub fn small_ff(t: GgmlType, llc: u64) -> u64 {
    let per_ff = f64::from(LAYERS) * 3.0 * EMBD as f64 * f64::from(TOP_K);
    let want = (2 * llc) as f64 / (per_ff * t.bytes_per_elem());
    ((want / 256.0).ceil() as u64).max(1) * 256
}

/// The last-level cache of CPU 0 from sysfs, bytes.
fn llc_bytes() -> u64 {
    (0..8)
        .rev()
        .find_map(|i| {
            let text = std::fs::read_to_string(format!(
                "/sys/devices/system/cpu/cpu0/cache/index{i}/size"
            ))
            .ok()?;
            parse_cache_size(&text)
        })
        .unwrap_or(DEFAULT_LLC_BYTES)
}

/// `32768K`, `2M`, `512` (bytes) as sysfs writes them.
pub fn parse_cache_size(text: &str) -> Option<u64> {
    let t = text.trim();
    let (num, mult) = match t.chars().last()? {
        'K' | 'k' => (&t[..t.len() - 1], 1u64 << 10),
        'M' | 'm' => (&t[..t.len() - 1], 1 << 20),
        'G' | 'g' => (&t[..t.len() - 1], 1 << 30),
        _ => (t, 1),
    };
    num.parse::<u64>().ok()?.checked_mul(mult)
}

fn spec(t: GgmlType, ff: u64) -> FixtureSpec {
    let mut s = FixtureSpec::preset(Size::Medium);
    s.layers = LAYERS;
    s.experts = EXPERTS;
    s.top_k = TOP_K;
    s.embd = EMBD;
    s.n_head = 8;
    s.n_head_kv = 4;
    s.head_dim = 128;
    s.expert_ff = ff;
    s.hot_experts = 2; // unused by the uniform router; must be below the expert count
    s.router = Router::Uniform;
    s.weight_type = if quantize_ftype(t).is_some() {
        GgmlType::Q8_0
    } else {
        t
    };
    s
}

/// Writes (or finds) the probe fixture of type `t` and width `ff` in `dir`.
fn fixture_for(
    t: GgmlType,
    ff: u64,
    dir: &Path,
    quantize: &Path,
    timeout: Duration,
) -> Result<PathBuf, PlanError> {
    let path = dir.join(format!(
        "probe-{}-ff{ff}-top{TOP_K}of{EXPERTS}.gguf",
        t.name
    ));
    if path.exists() {
        return Ok(path);
    }
    let fail = |m: String| PlanError::Validation(format!("write probe fixture {}: {m}", t.name));
    let vocab = crate::engine::vocab_path(crate::engine::DEFAULT_VOCAB)?;
    let s = spec(t, ff);
    std::fs::create_dir_all(dir).map_err(|e| fail(format!("{}: {e}", dir.display())))?;
    match quantize_ftype(t) {
        None => {
            fixture::write_fixture(&s, &vocab, &path).map_err(|e| fail(e.to_string()))?;
        }
        Some(ftype) => {
            let tmp = crate::atomic_file::private_tempdir("spark-probe-")
                .map_err(|e| fail(e.to_string()))?;
            let src = tmp.path().join("source.gguf");
            fixture::write_fixture(&s, &vocab, &src).map_err(|e| fail(e.to_string()))?;
            let dest = AtomicFile::create_with(&path, Mode::Public)
                .map_err(|e| fail(format!("{}: {e}", path.display())))?;
            let mut cmd = Command::new(quantize);
            cmd.arg("--allow-requantize")
                .arg("--pure")
                .arg(&src)
                .arg(dest.temp_path())
                .arg(ftype)
                .arg("2");
            let out = run_with_deadline(&mut cmd, timeout)?;
            if !out.status.success() {
                return Err(fail(format!(
                    "llama-quantize {ftype} exited with {}; last output:\n{}",
                    out.status,
                    out.stderr_tail(8)
                )));
            }
            dest.commit()
                .map_err(|e| fail(format!("{}: {e}", path.display())))?;
        }
    }
    Ok(path)
}

/// Decode seconds per token of `model` at `threads`, the fastest repetition; and the engine.
fn decode_secs(
    bench: &Path,
    model: &Path,
    threads: u32,
    a: &ProbeArgs,
) -> Result<(f64, String), PlanError> {
    let spec = BenchSpec {
        model: model.to_path_buf(),
        threads,
        n_gpu_layers: 0,
        n_cpu_moe: 0,
        type_k: "f16".into(),
        type_v: "f16".into(),
        flash_attn: false,
        ubatch: 512,
        n_prompt: 0,
        n_gen: a.n_gen.max(1),
        repetitions: a.repetitions.max(1),
    };
    let rows = run_llama_bench(bench, &spec, Duration::from_secs(a.timeout))?;
    let r = rows.iter().find(|r| r.is_decode()).ok_or_else(|| {
        PlanError::Validation(format!(
            "probe {}: llama-bench gave no decode row",
            model.display()
        ))
    })?;
    let best = r.samples_ts.iter().copied().fold(r.avg_ts, f64::max);
    if best <= 0.0 {
        return Err(PlanError::Validation(format!(
            "probe {}: llama-bench measured 0 tokens/s",
            model.display()
        )));
    }
    Ok((
        1.0 / best,
        format!("llama.cpp {} (build {})", r.build_commit, r.build_number),
    ))
}

/// Layer counts of the per-layer probe.
const LAYER_COUNTS: [u32; 2] = [4, 36];

/// The per-layer probe: the tiny preset (width 64, its weights next to nothing) in q8_0 at 4
/// and 36 layers, small and large alternating over the rounds, the fastest of each.
fn probe_layers(
    a: &ProbeArgs,
    bench: &Path,
    dir: &Path,
    threads: &[u32],
) -> Result<(Vec<LayerPoint>, String), PlanError> {
    let vocab = crate::engine::vocab_path(crate::engine::DEFAULT_VOCAB)?;
    let mut files = Vec::new();
    for n in LAYER_COUNTS {
        let path = dir.join(format!("probe-layers-{n}.gguf"));
        if !path.exists() {
            crate::progress::line(&format!("probe: writing the {n}-layer fixture"));
            let mut s = FixtureSpec::preset(Size::Tiny);
            s.layers = n;
            s.weight_type = GgmlType::Q8_0;
            std::fs::create_dir_all(dir)
                .map_err(|e| PlanError::Validation(format!("create {}: {e}", dir.display())))?;
            fixture::write_fixture(&s, &vocab, &path).map_err(|e| {
                PlanError::Validation(format!("write probe fixture {}: {e}", path.display()))
            })?;
        }
        files.push(path);
    }
    let mut out = Vec::new();
    let mut engine = String::new();
    for &th in threads {
        crate::progress::line(&format!("probe: fixed cost per layer at {th} threads"));
        let mut secs = [f64::INFINITY; 2];
        for _ in 0..a.rounds.max(1) {
            for (i, f) in files.iter().enumerate() {
                let (t, e) = decode_secs(bench, f, th, a)?;
                secs[i] = secs[i].min(t);
                engine = e;
            }
        }
        out.push(LayerPoint {
            threads: th,
            small_layers: LAYER_COUNTS[0],
            large_layers: LAYER_COUNTS[1],
            small_secs: secs[0],
            large_secs: secs[1],
        });
    }
    Ok((out, engine))
}

/// Runs the probe and returns the record (not saved).
pub fn probe(a: &ProbeArgs, hw: &HardwareFacts) -> Result<TypeCosts, PlanError> {
    let t0 = Instant::now();
    let mut types = Vec::new();
    for name in a.types.iter().filter(|_| !a.layers_only) {
        let t = GgmlType::from_name(name).ok_or_else(|| {
            PlanError::Usage(format!("parse --types: {name} is not a ggml type name"))
        })?;
        if quantize_ftype(t).is_none()
            && ![GgmlType::F16, GgmlType::Q8_0, GgmlType::F32].contains(&t)
        {
            return Err(PlanError::Usage(format!(
                "parse --types: the probe cannot make {name} fixtures (it makes f32, f16, q8_0, q4_K, q5_K, q6_K, iq4_xs, iq4_nl, mxfp4, q4_0, q5_0)"
            )));
        }
        types.push(t);
    }
    let threads = a
        .threads
        .clone()
        .unwrap_or_else(|| hardware::thread_counts(hw.machine.logical_cpus));
    if threads.is_empty() || threads.contains(&0) {
        return Err(PlanError::Usage(
            "parse --threads: give positive thread counts, e.g. 1,2".into(),
        ));
    }
    let bench = locate_llama_bench(a.llama_bench.as_deref())?;
    let quantize = bench.with_file_name("llama-quantize");
    let dir = a
        .dir
        .clone()
        .unwrap_or_else(|| crate::engine::cache_dir().join("type-probe"));
    let llc = llc_bytes();
    let steps = crate::progress::Steps::new(
        "plan probe",
        (types.len() * (2 + 2 * threads.len() * a.rounds.max(1) as usize)) as u64,
        "steps",
        false,
    );
    let mut done = 0u64;
    let mut points = Vec::new();
    let mut skipped = Vec::new();
    let mut engine = String::new();
    for t in types {
        let ff = small_ff(t, llc);
        let mut files = Vec::new();
        for f in [ff, 2 * ff] {
            steps.at(
                done,
                || format!("{} fixture ff {f}", t.name),
                || format!("probe: writing the {} fixture with expert FFN {f}", t.name),
            );
            done += 1;
            match fixture_for(t, f, &dir, &quantize, Duration::from_secs(a.timeout)) {
                Ok(p) => files.push(p),
                Err(e) => {
                    tracing::warn!("probe: skipping {}: {e}", t.name);
                    skipped.push((t.name.to_string(), e.to_string()));
                    break;
                }
            }
        }
        if files.len() < 2 {
            done += 2 * threads.len() as u64 * u64::from(a.rounds.max(1));
            continue;
        }
        let small = model_facts(&files[0])?;
        let large = model_facts(&files[1])?;
        // The type the varied tensors really have (llama-quantize decides).
        let ggml_type = small
            .geometry
            .moe_layers
            .first()
            .and_then(|l| l.tensors.first())
            .map(|x| x.ggml_type.clone())
            .unwrap_or_else(|| t.name.to_string());
        let weights =
            |m: &super::fit::ModelFacts| super::forecast::active_expert_elems(m, 0, u32::MAX);
        let bytes = |m: &super::fit::ModelFacts| m.active_expert_bytes(0, u32::MAX);
        for &th in &threads {
            let before = hardware::read_gbps_now(th);
            let mut secs = [f64::INFINITY; 2];
            // Small and large alternate, `rounds` times, and the fastest of each counts: on a
            // shared machine another process only ever slows a run down, and alternating keeps
            // one burst of load from landing on one size only.
            for round in 0..a.rounds.max(1) {
                for (i, f) in files.iter().enumerate() {
                    let size = ["small", "large"][i];
                    steps.at(
                        done,
                        || format!("{ggml_type} {th} threads {size} (round {})", round + 1),
                        || {
                            format!(
                                "probe: {ggml_type} at {th} threads, {size} fixture, round {} of {}",
                                round + 1,
                                a.rounds.max(1)
                            )
                        },
                    );
                    done += 1;
                    let (s, e) = decode_secs(&bench, f, th, a)?;
                    secs[i] = secs[i].min(s);
                    engine = e;
                }
            }
            let after = hardware::read_gbps_now(th);
            points.push(ProbePoint {
                ggml_type: ggml_type.clone(),
                threads: th,
                small_weights: weights(&small),
                large_weights: weights(&large),
                small_bytes: bytes(&small),
                large_bytes: bytes(&large),
                small_secs: secs[0],
                large_secs: secs[1],
                host_gbps: (before + after) / 2.0,
            });
        }
    }
    let (layers, layer_engine) = probe_layers(a, &bench, &dir, &threads)?;
    if engine.is_empty() {
        engine = layer_engine;
    }
    steps.finish();
    if points.is_empty() && !a.layers_only {
        return Err(PlanError::Validation(
            "probe: no type could be measured".into(),
        ));
    }
    Ok(TypeCosts {
        version: TYPE_COST_VERSION,
        machine: hw.machine.clone(),
        engine,
        points,
        skipped,
        layers,
        measured_unix: hardware::unix_now(),
        measure_secs: t0.elapsed().as_secs_f64(),
    })
}

/// The record as a table: per type and thread count, the slope, its read and compute shares.
pub fn render(c: &TypeCosts) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "host compute per weight, probed with {} in {:.0} s",
        c.engine, c.measure_secs
    );
    let _ = writeln!(
        s,
        "{:<8} {:>3} {:>7} {:>11} {:>11} {:>8} {:>11} {:>11}",
        "type", "t", "B/w", "small ms", "large ms", "GB/s", "ns/weight", "compute ns"
    );
    for p in &c.points {
        let cost = p.cost();
        let _ = writeln!(
            s,
            "{:<8} {:>3} {:>7.4} {:>11.3} {:>11.3} {:>8.1} {:>11} {:>11}",
            p.ggml_type,
            p.threads,
            cost.map(|c| c.bytes_per_weight).unwrap_or(0.0),
            p.small_secs * 1e3,
            p.large_secs * 1e3,
            p.host_gbps,
            cost.map(|c| format!("{:.4}", c.secs_per_weight * 1e9))
                .unwrap_or_else(|| "no slope".into()),
            cost.map(|c| format!("{:.4}", c.compute_secs_per_weight * 1e9))
                .unwrap_or_else(|| "-".into()),
        );
    }
    for p in &c.layers {
        let _ = writeln!(
            s,
            "per layer {:>3} threads: {} layers {:.3} ms, {} layers {:.3} ms: {}",
            p.threads,
            p.small_layers,
            p.small_secs * 1e3,
            p.large_layers,
            p.large_secs * 1e3,
            p.secs_per_layer()
                .map(|x| format!("{:.1} µs per layer", x * 1e6))
                .unwrap_or_else(|| "no slope".into())
        );
    }
    for (t, why) in &c.skipped {
        let _ = writeln!(s, "skipped {t}: {why}");
    }
    let _ = writeln!(
        s,
        "types not probed take {}'s measured compute per weight (stated prior)",
        type_cost::PRIOR_FROM
    );
    s
}

/// `spark plan probe`: probe, save, print.
pub fn run(a: ProbeArgs) -> Result<(), PlanError> {
    let hw = hardware::gather(&hardware::HardwareOverrides::default())?;
    let fresh = probe(&a, &hw)?;
    let path = type_cost::type_costs_path();
    let c = match type_cost::load(&path, &hw.machine) {
        Some(old) => type_cost::merge(old, fresh),
        None => fresh,
    };
    type_cost::save(&path, &c)?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&c).expect("serialize"));
    } else {
        print!("{}", render(&c));
        println!("saved in {}", path.display());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sysfs_cache_sizes_parse() {
        assert_eq!(parse_cache_size("32768K\n"), Some(32 << 20));
        assert_eq!(parse_cache_size("2M"), Some(2 << 20));
        assert_eq!(parse_cache_size("512"), Some(512));
        assert_eq!(parse_cache_size("x"), None);
        assert_eq!(parse_cache_size(""), None);
    }

    #[test]
    fn the_small_fixture_is_twice_the_cache_in_whole_blocks() {
        // Per unit of FFN width a token reads 4 layers × 3 tensors × 1024 × 4 used experts =
        // 49 152 weights. f16, 32 MiB cache: 2 × 33 554 432 B ÷ (49 152 × 2 B) = 682.7 → 768
        // (next 256).
        assert_eq!(small_ff(GgmlType::F16, 32 << 20), 768);
        // q4_K (144 B per 256): 67 108 864 ÷ (49 152 × 0.5625) = 2427.3 → 2560.
        assert_eq!(small_ff(GgmlType::Q4_K, 32 << 20), 2560);
        // q8_0 (34 B per 32): 67 108 864 ÷ (49 152 × 1.0625) = 1285.0 → 1536.
        assert_eq!(small_ff(GgmlType::Q8_0, 32 << 20), 1536);
        for t in [
            GgmlType::F16,
            GgmlType::Q4_K,
            GgmlType::Q8_0,
            GgmlType::IQ4_XS,
        ] {
            let ff = small_ff(t, 32 << 20);
            let bytes = 49_152.0 * ff as f64 * t.bytes_per_elem();
            assert!(bytes >= 2.0 * f64::from(32u32 << 20), "{}", t.name);
            assert!(spec(t, ff).validate().is_ok(), "{}", t.name);
        }
    }
}
