//! Tests of the forecast: serve's decision, and the per-layer split against a replay of the
//! counts it shows.

use super::*;
use crate::units::MIB;

fn facts(dir: &std::path::Path) -> ModelFacts {
    use crate::gguf::{GgmlType, GgufFile, GgufWriter, MoeGeometry, Value};
    let mut w = GgufWriter::new();
    w.set("general.architecture", Value::String("qwen3moe".into()));
    for (k, v) in [
        ("block_count", 4u32),
        ("embedding_length", 64),
        ("attention.head_count", 4),
        ("attention.head_count_kv", 2),
        ("expert_count", 32),
        ("expert_used_count", 2),
        ("expert_feed_forward_length", 64),
    ] {
        w.set(&format!("qwen3moe.{k}"), Value::U32(v));
    }
    w.add_tensor(
        "token_embd.weight",
        &[64, 100],
        GgmlType::F32,
        vec![0; 64 * 100 * 4],
    );
    for l in 0..4 {
        for t in ["ffn_gate_exps", "ffn_up_exps", "ffn_down_exps"] {
            w.add_tensor(
                &format!("blk.{l}.{t}.weight"),
                &[64, 64, 32],
                GgmlType::F32,
                vec![0; 64 * 64 * 32 * 4],
            );
        }
    }
    let p = dir.join("m.gguf");
    w.write(&p).unwrap();
    let f = GgufFile::open(&p).unwrap();
    let g = MoeGeometry::of(&f).unwrap();
    ModelFacts::of(&f, g)
}

/// A 256-token context, f16 KV, no reserve.
fn settings() -> MemorySettings {
    MemorySettings {
        ctx: 256,
        k_type: crate::gguf::GgmlType::F16,
        v_type: crate::gguf::GgmlType::F16,
        ubatch: 512,
        reserve_bytes: 0,
    }
}

fn machine(h2d: f64) -> Machine {
    Machine {
        vram_budget_bytes: 5 * MIB,
        vram_gbps: 300.0,
        h2d_gbps: h2d,
        host_gbps: 10.0,
        host_gflops: 50.0,
        type_costs: None,
        threads: 8,
        handoff_us: HANDOFF_US_PRIOR,
        copy_call_us: COPY_CALL_US_PRIOR,
        sources: Vec::new(),
    }
}

#[test]
fn serve_decides_residency_where_it_pays_and_stock_where_it_does_not() {
    let dir = tempfile::tempdir().unwrap();
    let m = facts(dir.path());
    let s = settings();
    // Routing concentrated on two experts per layer: after the warm-up every use hits.
    let mut hot = crate::cache::Counts::zero(4, 32);
    for l in 0..4 {
        hot.set(l, 3, 1000);
        hot.set(l, 17, 1000);
    }
    let f = decide(
        &m,
        &s,
        &machine(25.0),
        Some((&hot, "the test profile")),
        u64::MAX,
    )
    .unwrap();
    assert!(f.stock.n_cpu_moe > 0, "stock offloads: {:?}", f.stock);
    let sp = f.spark.as_ref().unwrap();
    assert_eq!(sp.hit_ratio, Some(1.0));
    assert_eq!(sp.link_bytes, 0.0);
    assert!(
        matches!(f.verdict, Verdict::Residency { .. }),
        "{}",
        f.reason
    );
    assert!(matches!(f.source, HitSource::Profile { .. }));
    // Uniform routing over a link far slower than host memory: stock, and the reason says so.
    let f = decide(&m, &s, &machine(0.05), None, u64::MAX).unwrap();
    assert_eq!(
        f.verdict,
        Verdict::Stock {
            n_cpu_moe: f.stock.n_cpu_moe
        }
    );
    assert!(f.reason.starts_with("stock placement"), "{}", f.reason);
    assert!(matches!(f.source, HitSource::UniformPrior { .. }));
    // Either some link rate above this one would tie, or none would: said either way.
    if let Some(be) = f.break_even_link_gbps {
        assert!(be > 0.05, "break-even {be} above the slow link");
    } else {
        assert!(
            f.break_even_note.contains("cannot tie"),
            "{}",
            f.break_even_note
        );
    }
}

/// Two skewed layers beside two flat ones: every split stays within the VRAM and the cap,
/// a per-layer split runs only where it forecasts faster than the same count in each, and
/// the forecast's bytes are exactly a replay with the per-layer counts it shows.
#[test]
fn the_forecast_runs_its_per_layer_slots_within_the_budget() {
    let dir = tempfile::tempdir().unwrap();
    let m = facts(dir.path());
    let s = settings();
    let hot: Vec<f64> = (0..32)
        .map(|e| if e % 11 == 3 { 100.0 } else { 1.0 })
        .collect();
    let w = vec![hot.clone(), vec![1.0; 32], hot, vec![1.0; 32]];
    let routing = synthesize(&w, 32, 2, 400, 9);
    let mach = machine(25.0);
    let f = forecast(
        &m,
        &s,
        0,
        &mach,
        (&routing, HitSource::UniformPrior { steps: 400 }),
        &calibrate(Regime::ExpertsOffloaded, &[]),
        u64::MAX,
    )
    .unwrap();
    assert!(!f.candidates.is_empty());
    let tb = layer_tensor_bytes(&m);
    for c in &f.candidates {
        assert!(c.vram_bytes <= mach.vram_budget_bytes, "{c:?}");
        assert_eq!(c.slots_per_layer.len() as u32, c.host_layers);
        assert!(c.slots_per_layer.iter().all(|x| x.slots <= 32));
        let u = c.uniform_tps.unwrap();
        if c.per_layer {
            assert!(
                c.tps > u * (1.0 + PER_LAYER_MARGIN),
                "{} vs uniform {u}",
                c.tps
            );
        } else {
            assert!(c.slots_per_layer.iter().all(|x| x.slots == c.slots));
            assert_eq!(c.tps, u);
        }
        // The bytes are a replay with exactly these counts.
        let mut slots = vec![0u32; 4];
        for x in &c.slots_per_layer {
            slots[x.layer as usize] = x.slots;
        }
        let warmup = (400.0 * WARMUP_SHARE) as usize;
        let mut r = Replayer::per_layer(32, 2, &tb, &slots);
        for step in 0..routing.steps() {
            for l in 0..c.n_cpu_moe as usize {
                r.access(l, routing.ids(step, l), step >= warmup);
            }
        }
        let link = r.total().link_bytes as f64 / (400 - warmup) as f64;
        assert!(
            (link - c.link_bytes).abs() < 1e-6,
            "{link} vs {}",
            c.link_bytes
        );
    }
    // With every layer on the host, the flat layers together are given more slots than
    // the skewed ones, whose three hot experts need few. (Not necessarily each: slots in a
    // flat layer pay most when they hold all of it, loads gone, so one flat layer may get
    // every slot and the other none.)
    let all = f.candidates.iter().find(|c| c.host_layers == 4).unwrap();
    assert!(all.per_layer, "{all:?}");
    let at = |l: usize| all.slots_per_layer[l].slots;
    assert!(at(1) + at(3) > at(0) + at(2), "{:?}", all.slots_per_layer);
    // The verdict carries the per-layer counts when the chosen split has them.
    if let Verdict::Residency {
        slots_per_layer: Some(v),
        ..
    } = &f.verdict
    {
        assert_eq!(v.len(), f.spark.as_ref().unwrap().slots_per_layer.len());
    }
}

/// With a probe record, the stock column charges the host's expert work as `spark plan` does:
/// a probed type's weights at its measured seconds per weight, reads included (so those bytes
/// are not charged again at the bandwidth); without one, reads plus 2 FLOP per weight.
#[test]
fn the_stock_column_charges_each_probed_type_its_measured_cost() {
    use crate::plan::hardware::MachineId;
    use crate::plan::type_cost::{ProbePoint, TypeCosts, TYPE_COST_VERSION};
    let dir = tempfile::tempdir().unwrap();
    let m = facts(dir.path());
    let s = settings();
    let plain = decide(&m, &s, &machine(25.0), None, u64::MAX).unwrap();
    let n = plain.stock.n_cpu_moe;
    assert!(n > 0, "stock keeps experts on the host: {:?}", plain.stock);
    // 100 M more f32 weights per token cost 0.02 s more: 0.2 ns per weight, reads included.
    let f32_point = ProbePoint {
        ggml_type: "f32".into(),
        threads: 8,
        small_weights: 100e6,
        large_weights: 200e6,
        small_bytes: 400_000_000,
        large_bytes: 800_000_000,
        small_secs: 0.02,
        large_secs: 0.04,
        host_gbps: 10.0,
    };
    let mut probed = machine(25.0);
    probed.type_costs = Some(TypeCosts {
        version: TYPE_COST_VERSION,
        machine: MachineId {
            hostname: "h".into(),
            cpu_model: "c".into(),
            logical_cpus: 8,
            mem_total_bytes: 1,
        },
        engine: "e".into(),
        points: vec![f32_point],
        skipped: vec![],
        layers: vec![],
        measured_unix: 0,
        measure_secs: 0.0,
    });
    let f = decide(&m, &s, &probed, None, u64::MAX).unwrap();
    assert_eq!(
        f.stock.n_cpu_moe, n,
        "the placement does not depend on the costs"
    );
    let weights = crate::plan::forecast::active_expert_elems(&m, 0, n);
    assert!(
        (f.stock.t_host_compute - weights * 0.2e-9).abs() < 1e-12,
        "{:?}",
        f.stock
    );
    assert_eq!(
        f.stock.t_host, 0.0,
        "every host byte is an f32 expert weight, read in its term"
    );
    // Without the record: the bytes at 10 GB/s plus 2 FLOP per weight at 50 GFLOP/s.
    let bytes = m.active_expert_bytes(0, n) as f64;
    assert!((plain.stock.t_host - bytes / 10e9).abs() < 1e-12);
    assert!((plain.stock.t_host_compute - weights * 2.0 / 50e9).abs() < 1e-12);
}
