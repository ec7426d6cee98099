//! Decode and prefill forecasts: a roofline ceiling from bytes read per token and memory
//! bandwidths, times an efficiency learned from receipts of the same regime on this machine.
//!
//! Owns the roofline, the regimes and the calibration rule. Pure arithmetic: never reads files,
//! never measures. A forecast always carries its band and the assumptions it rests on.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::fit::{ModelFacts, Placement};
use super::hardware::HardwareFacts;
use super::median::median_sorted;
use super::type_cost::{compute_terms, CostSource, TypeTerm};

/// What bounds decode: where the bytes a token reads live.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, PartialOrd, Ord)]
#[serde(rename_all = "snake_case")]
pub enum Regime {
    /// Every weight in VRAM.
    AllVram,
    /// Some routed experts in host memory, computed on the CPU.
    ExpertsOffloaded,
    /// No GPU: everything from host memory.
    CpuOnly,
}

impl Regime {
    pub fn name(self) -> &'static str {
        match self {
            Regime::AllVram => "all in VRAM",
            Regime::ExpertsOffloaded => "experts offloaded",
            Regime::CpuOnly => "CPU only",
        }
    }

    /// The regime a placement runs in on hardware with or without a GPU.
    pub fn of(placement: Placement, has_gpu: bool) -> Regime {
        match (placement, has_gpu) {
            (_, false) | (Placement::CpuOnly, _) => Regime::CpuOnly,
            (Placement::AllGpu, true) => Regime::AllVram,
            (Placement::CpuMoe { .. }, true) => Regime::ExpertsOffloaded,
        }
    }

    /// Efficiency assumed before any receipt exists, with its band.
    fn prior(self) -> (f64, f64, f64) {
        match self {
            Regime::AllVram => (0.7, 0.4, 0.9),
            Regime::ExpertsOffloaded => (0.5, 0.25, 0.85),
            Regime::CpuOnly => (0.6, 0.3, 1.0),
        }
    }
}

/// What a decode token reads, and the ceiling that implies.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Roofline {
    pub regime: Regime,
    pub threads: u32,
    pub vram_bytes_per_token: u64,
    pub host_bytes_per_token: u64,
    pub vram_gbps: Option<f64>,
    pub host_gbps: f64,
    /// Weight elements the CPU multiplies per decode token (the host side's active weights).
    #[serde(default)]
    pub host_weights_per_token: f64,
    /// Seconds per token of the per-type terms (`host_compute`): what bytes at the bandwidth
    /// miss. A probed type's term is its measured seconds per weight, reads included.
    #[serde(default)]
    pub host_compute_secs: f64,
    /// Seconds per token of the host bytes read at the host bandwidth: every host byte except
    /// those of probed types, whose reads are in their terms.
    #[serde(default)]
    pub host_read_secs: f64,
    /// The host's term per weight type: a probed type's weights at its measured seconds per
    /// weight (read and compute as ggml does them), another type's at the stated fallback
    /// compute on top of its reads (each term names its source).
    #[serde(default, skip_deserializing)]
    pub host_compute: Vec<TypeTerm>,
    /// Seconds per token of the CPU's fixed work per layer (op dispatch, the threads meeting at
    /// each op), measured by the probe; CPU-only regime only (0 when not probed).
    #[serde(default)]
    pub host_layer_secs: f64,
    /// Decode ceiling, tokens/s.
    pub decode_tps: f64,
    /// Prefill ceiling from compute (2 FLOP per active weight per token), tokens/s.
    pub prefill_tps: f64,
    /// Fraction of the offloaded experts' reads served from a VRAM cache, when a cache plan was
    /// given.
    pub cache_hit_ratio: Option<f64>,
}

/// Inputs of the roofline beyond the model and the hardware.
#[derive(Debug, Clone, Copy)]
pub struct RooflineInput {
    pub placement: Placement,
    pub threads: u32,
    /// Tokens already in the context (KV read per token); llama-bench's `tg` runs at depth 0.
    pub depth: u64,
    pub kv_bytes_per_token: u64,
    /// Expected hit ratio of a VRAM expert cache for the experts that `--n-cpu-moe` offloads.
    pub cache_hit_ratio: Option<f64>,
}

pub fn roofline(m: &ModelFacts, hw: &HardwareFacts, r: &RooflineInput) -> Roofline {
    let regime = Regime::of(r.placement, hw.gpu.is_some());
    let kv = r.kv_bytes_per_token * r.depth;
    let all_experts = m.active_expert_bytes(0, u32::MAX);
    let (vram, host) = match (regime, r.placement) {
        (Regime::CpuOnly, _) => (0, m.dense_read_bytes() + all_experts + kv),
        (_, Placement::CpuMoe { n }) => {
            let offloaded = m.active_expert_bytes(0, n) as f64;
            let hit = r.cache_hit_ratio.unwrap_or(0.0).clamp(0.0, 1.0);
            let from_cache = (offloaded * hit).round() as u64;
            let from_host = offloaded as u64 - from_cache;
            (
                m.dense_read_bytes() + m.active_expert_bytes(n, u32::MAX) + kv + from_cache,
                from_host,
            )
        }
        _ => (m.dense_read_bytes() + all_experts + kv, 0),
    };
    let host_gbps = hw.host_gbps_at(r.threads);
    let vram_gbps = hw.gpu.as_ref().map(|g| g.vram_gbps);
    let host_by_type = match (regime, r.placement) {
        (Regime::CpuOnly, _) => m.active_params_by_type.clone(),
        (_, Placement::CpuMoe { n }) => {
            let hit = r.cache_hit_ratio.unwrap_or(0.0).clamp(0.0, 1.0);
            let mut w = active_expert_elems_by_type(m, 0, n);
            w.values_mut().for_each(|v| *v *= 1.0 - hit);
            w
        }
        _ => BTreeMap::new(),
    };
    let host_weights: f64 = host_by_type.values().sum();
    let host_compute = compute_terms(
        &host_by_type,
        hw.type_costs.as_ref(),
        r.threads,
        hw.host_gflops_at(r.threads),
    );
    let host_compute_secs: f64 = host_compute.iter().map(|t| t.secs).sum();
    let covered: f64 = host_compute
        .iter()
        .filter(|t| t.includes_read)
        .map(|t| t.bytes)
        .sum();
    let host_read_secs = (host as f64 - covered).max(0.0) / (host_gbps * 1e9);
    let host_layer_secs = match (regime, hw.type_costs.as_ref()) {
        (Regime::CpuOnly, Some(c)) => f64::from(m.n_layer) * c.layer_secs(r.threads).unwrap_or(0.0),
        _ => 0.0,
    };
    let secs = host_read_secs
        + host_layer_secs
        + host_compute_secs
        + vram_gbps.map(|g| vram as f64 / (g * 1e9)).unwrap_or(0.0);
    let decode_tps = if secs > 0.0 { 1.0 / secs } else { 0.0 };
    let flops_per_token = 2.0 * m.active_params;
    let gflops = match (regime, hw.gpu.as_ref().and_then(|g| g.tflops)) {
        (Regime::AllVram, Some(t)) | (Regime::ExpertsOffloaded, Some(t)) => t * 1e3,
        _ => hw.host_gflops_at(r.threads),
    };
    let prefill_tps = if flops_per_token > 0.0 {
        gflops * 1e9 / flops_per_token
    } else {
        0.0
    };
    Roofline {
        regime,
        threads: r.threads,
        vram_bytes_per_token: vram,
        host_bytes_per_token: host,
        vram_gbps,
        host_gbps,
        host_weights_per_token: host_weights,
        host_compute_secs,
        host_read_secs,
        host_compute,
        host_layer_secs,
        decode_tps,
        prefill_tps,
        cache_hit_ratio: r.cache_hit_ratio,
    }
}

/// Seconds the CPU computes on `weights` weight elements at `gflops` (2 FLOP per weight);
/// 0 when the compute rate is unknown.
pub fn host_compute_secs(weights: f64, gflops: f64) -> f64 {
    if gflops > 0.0 && weights > 0.0 {
        2.0 * weights / (gflops * 1e9)
    } else {
        0.0
    }
}

/// Routed-expert weight elements one decode token multiplies in the expert layers `lo..hi`.
pub fn active_expert_elems(m: &ModelFacts, lo: u32, hi: u32) -> f64 {
    active_expert_elems_by_type(m, lo, hi).values().sum()
}

/// [`active_expert_elems`] by ggml type name.
pub fn active_expert_elems_by_type(m: &ModelFacts, lo: u32, hi: u32) -> BTreeMap<String, f64> {
    let n = f64::from(m.n_expert.max(1));
    let mut out = BTreeMap::new();
    for l in m
        .geometry
        .moe_layers
        .iter()
        .filter(|l| l.layer >= lo && l.layer < hi)
    {
        for t in &l.tensors {
            *out.entry(t.ggml_type.clone()).or_insert(0.0) +=
                t.dims.iter().product::<u64>() as f64 / n * f64::from(m.n_expert_used);
        }
    }
    out
}

/// One realized efficiency: measured ÷ ceiling.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sample {
    pub regime: Regime,
    pub decode: Option<f64>,
    pub prefill: Option<f64>,
}

/// A learned (or prior) efficiency with its band.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Calibration {
    pub efficiency: f64,
    pub low: f64,
    pub high: f64,
    pub receipts: usize,
    /// `receipts` or `prior`.
    pub source: String,
}

/// Calibrates from realized efficiencies: the median, and a band from the smallest to the
/// largest seen, never narrower than ±10% (±25% with a single receipt). Without receipts, the
/// regime's prior.
pub fn calibrate(regime: Regime, effs: &[f64]) -> Calibration {
    let mut v: Vec<f64> = effs
        .iter()
        .copied()
        .filter(|e| e.is_finite() && *e > 0.0)
        .collect();
    if v.is_empty() {
        let (e, lo, hi) = regime.prior();
        return Calibration {
            efficiency: e,
            low: lo,
            high: hi,
            receipts: 0,
            source: "prior".into(),
        };
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let med = median_sorted(&v);
    let min_width = if v.len() == 1 { 0.25 } else { 0.10 };
    Calibration {
        efficiency: med,
        low: v[0].min(med * (1.0 - min_width)),
        high: v[v.len() - 1].max(med * (1.0 + min_width)),
        receipts: v.len(),
        source: "receipts".into(),
    }
}

/// A rate with its band.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Banded {
    pub tps: f64,
    pub low: f64,
    pub high: f64,
    pub calibration: Calibration,
}

impl Banded {
    pub fn of(ceiling: f64, c: Calibration) -> Banded {
        Banded {
            tps: ceiling * c.efficiency,
            low: ceiling * c.low,
            high: ceiling * c.high,
            calibration: c,
        }
    }

    pub fn contains(&self, tps: f64) -> bool {
        tps >= self.low && tps <= self.high
    }
}

/// The forecast shown to the user.
#[derive(Debug, Clone, Serialize)]
pub struct Forecast {
    pub roofline: Roofline,
    pub decode: Banded,
    pub prefill: Banded,
    pub assumptions: Vec<String>,
}

pub fn forecast(roof: Roofline, decode_effs: &[f64], prefill_effs: &[f64]) -> Forecast {
    let decode = Banded::of(roof.decode_tps, calibrate(roof.regime, decode_effs));
    let prefill = Banded::of(roof.prefill_tps, calibrate(roof.regime, prefill_effs));
    let mut assumptions = vec![
        "decode reads every active weight once per token: the non-expert weights, k experts per MoE layer, one embedding row".to_string(),
        format!(
            "host reads at {:.1} GB/s with {} threads (measured streaming read)",
            roof.host_gbps, roof.threads
        ),
    ];
    if roof.host_compute_secs > 0.0 {
        assumptions.push(format!(
            "host time per token: {:.3} ms of reads at the bandwidth plus {:.3} ms for its {:.1} M weights by type:",
            roof.host_read_secs * 1e3,
            roof.host_compute_secs * 1e3,
            roof.host_weights_per_token / 1e6
        ));
        for t in &roof.host_compute {
            assumptions.push(format!("  {}", describe_term(t)));
        }
    }
    if roof.host_layer_secs > 0.0 {
        assumptions.push(format!(
            "plus the CPU's fixed work per layer (op dispatch, threads meeting at each op), measured by the probe: {:.3} ms per token",
            roof.host_layer_secs * 1e3
        ));
    }
    match roof.vram_gbps {
        Some(g) => assumptions.push(format!("VRAM reads at {g:.0} GB/s")),
        None => assumptions.push(
            "no GPU known: llama-server computes every layer on the CPU, whatever -ngl says".into(),
        ),
    }
    if roof.regime == Regime::ExpertsOffloaded {
        assumptions.push(
            "offloaded experts are computed on the CPU from host memory (llama.cpp does not copy them for decode)".into(),
        );
    }
    if let Some(h) = roof.cache_hit_ratio {
        assumptions.push(format!(
            "a VRAM expert cache serves {:.0}% of the offloaded experts' reads",
            h * 100.0
        ));
    }
    assumptions.push(
        "KV-cache reads grow with depth; the forecast is at the given --depth (llama-bench tg runs at 0)".into(),
    );
    assumptions.push(format!(
        "efficiency {:.2} ({}) of the {} regime; band {:.2}–{:.2}",
        decode.calibration.efficiency,
        if decode.calibration.receipts > 0 {
            format!(
                "median of {} receipts on this machine",
                decode.calibration.receipts
            )
        } else {
            "prior, no receipts yet: run `spark plan receipt`".into()
        },
        roof.regime.name(),
        decode.calibration.low,
        decode.calibration.high
    ));
    assumptions.push(
        "prefill ceiling = compute rate ÷ 2 FLOP per active weight (portable-code measurement), calibrated the same way".into(),
    );
    Forecast {
        roofline: roof,
        decode,
        prefill,
        assumptions,
    }
}

/// One line per type: weights, cost per weight, seconds, and where the cost came from.
pub fn describe_term(t: &TypeTerm) -> String {
    let src = match &t.source {
        CostSource::Measured => {
            "read and compute, measured by the probe with ggml's kernels".to_string()
        }
        CostSource::PriorFromMeasured { from } => {
            format!("not probed: {from}'s measured compute per weight, on top of the reads")
        }
        CostSource::Flops { gflops } => {
            format!("not probed: 2 FLOP per weight at {gflops:.1} GFLOP/s, on top of the reads")
        }
    };
    format!(
        "{:<7} {:>9.2} M weights × {:.4} ns = {:.3} ms ({src})",
        t.ggml_type,
        t.weights / 1e6,
        t.secs_per_weight * 1e9,
        t.secs * 1e3
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calibration_uses_median_and_spread() {
        let c = calibrate(Regime::CpuOnly, &[0.5, 0.9, 0.7]);
        assert_eq!(c.efficiency, 0.7);
        assert_eq!(c.low, 0.5);
        assert_eq!(c.high, 0.9);
        assert_eq!(c.receipts, 3);
        let one = calibrate(Regime::CpuOnly, &[0.8]);
        assert!((one.low - 0.6).abs() < 1e-12 && (one.high - 1.0).abs() < 1e-12);
        let none = calibrate(Regime::AllVram, &[f64::NAN]);
        assert_eq!(none.source, "prior");
        assert_eq!(none.receipts, 0);
    }

    #[test]
    fn regimes_follow_placement_and_gpu() {
        assert_eq!(Regime::of(Placement::AllGpu, false), Regime::CpuOnly);
        assert_eq!(Regime::of(Placement::AllGpu, true), Regime::AllVram);
        assert_eq!(
            Regime::of(Placement::CpuMoe { n: 2 }, true),
            Regime::ExpertsOffloaded
        );
        assert_eq!(Regime::of(Placement::CpuOnly, true), Regime::CpuOnly);
    }
}
