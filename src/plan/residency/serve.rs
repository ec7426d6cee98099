//! The decision `spark serve --residency` acts on at start: the same forecast as `spark plan
//! --residency`, from the loaded profile's counts or the uniform prior, summed up as a
//! [`ServeDecision`] (what to run and why) for the start line and `/spark/status`; and again
//! later on serve's live counts (`serve/redecide.rs`). Gathers the host's facts like `spark
//! plan`; never starts anything.

use serde::Serialize;

use super::routing::{synthesize, HitSource, SYNTH_STEPS};
use super::{forecast, Machine, ResidencyForecast, Verdict, COPY_CALL_US_PRIOR, HANDOFF_US_PRIOR};
use crate::plan::fit::{MemorySettings, ModelFacts};
use crate::plan::forecast::{calibrate, Regime};
use crate::units::MIB;

/// The decision `spark serve --residency` acts on: the same forecast as `spark plan
/// --residency`, with hit ratios drawn from counts (`counts[layer][expert]`: a fresh profile's
/// at start, the live ones later; the `&str` names them in words) or the uniform prior.
pub fn decide(
    m: &ModelFacts,
    s: &MemorySettings,
    mach: &Machine,
    counts: Option<(&crate::cache::Counts, &str)>,
    ram_total_bytes: u64,
) -> Result<ResidencyForecast, String> {
    let (counts, named) = match counts {
        Some((c, name)) => (Some(c), name),
        None => (None, ""),
    };
    let (n, k) = (m.n_expert as usize, m.n_expert_used as usize);
    let mut w = vec![Vec::new(); m.n_layer as usize];
    let mut any = false;
    for (l, _) in &m.expert_layers {
        let l = *l as usize;
        let row: Vec<f64> = match counts.filter(|c| c.n_expert == n && l < c.n_layer) {
            Some(c) => c.layer(l).iter().map(|&x| x as f64).collect(),
            None => vec![1.0; n],
        };
        any |= counts.is_some() && row.iter().any(|&x| x > 0.0);
        if let Some(slot) = w.get_mut(l) {
            *slot = row;
        }
    }
    let routing = synthesize(&w, n, k, SYNTH_STEPS, 0x5eed);
    let source = if any {
        HitSource::Profile {
            path: named.into(),
            steps: SYNTH_STEPS,
        }
    } else {
        HitSource::UniformPrior { steps: SYNTH_STEPS }
    };
    forecast(
        m,
        s,
        0,
        mach,
        (&routing, source),
        &calibrate(Regime::ExpertsOffloaded, &[]),
        ram_total_bytes,
    )
}

/// What `spark serve --residency` decided at start, and why (shown at start and in
/// `/spark/status` under `placement.residency_decision`).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ServeDecision {
    /// `residency`, `stock`, or `as_asked` (no GPU facts, or `--cache-slots` given).
    pub run: String,
    /// Slots per host layer when `run` is `residency` and every layer gets the same count
    /// (with a per-layer split: the uniform count the same VRAM would buy).
    pub slots: Option<u32>,
    /// `[layer, slots]` of each host layer when the forecast chose a per-layer split (what
    /// serve then passes to the provider); `None` when every layer gets `slots`.
    pub slots_per_layer: Option<Vec<(u32, u32)>>,
    /// The `--n-cpu-moe` of the split the forecast chose (residency or stock): serve runs it.
    pub n_cpu_moe: Option<u32>,
    pub reason: String,
    /// Where the hit ratios came from.
    pub source: Option<String>,
    pub stock_tps: Option<f64>,
    pub spark_tps: Option<f64>,
    pub break_even_link_gbps: Option<f64>,
}

/// The GPU facts serve can be given: a `--gpu` preset and/or `--vram-bw`, `--h2d-bw`.
#[derive(Debug, Clone, Default)]
pub struct ServeGpu {
    pub card: Option<String>,
    pub vram_gbps: Option<f64>,
    pub h2d_gbps: Option<f64>,
}

/// The machine serve forecasts on: the GPU from `--gpu` and/or `--vram-bw`/`--h2d-bw`, the host
/// measured (`hardware::gather`), `budget_mib` of VRAM; with the host's RAM. `None` when the
/// GPU's bandwidths are not known (serve then runs the slots it was asked for and says so).
pub fn serve_machine(budget_mib: u64, gpu: &ServeGpu) -> Result<Option<(Machine, u64)>, String> {
    let card = match gpu.card.as_deref() {
        Some(c) => Some(crate::plan::presets::find(c).ok_or_else(|| {
            format!(
                "parse --gpu {c}: not a known card ({})",
                crate::plan::presets::keys()
            )
        })?),
        None => None,
    };
    let (Some(vram), Some(h2d)) = (
        gpu.vram_gbps.or_else(|| card.map(|c| c.vram_gbps())),
        gpu.h2d_gbps.or_else(|| card.map(|c| c.h2d_gbps())),
    ) else {
        return Ok(None);
    };
    let hw = crate::plan::hardware::gather(&crate::plan::hardware::HardwareOverrides::default())
        .map_err(|e| e.to_string())?;
    let threads = std::thread::available_parallelism()
        .map(|n| n.get() as u32)
        .unwrap_or(1);
    let mach = Machine {
        vram_budget_bytes: budget_mib.saturating_mul(MIB),
        vram_gbps: vram,
        h2d_gbps: h2d,
        host_gbps: hw.host_gbps_at(threads),
        host_gflops: hw.host_gflops_at(threads),
        type_costs: hw.type_costs.clone(),
        threads,
        handoff_us: HANDOFF_US_PRIOR,
        copy_call_us: COPY_CALL_US_PRIOR,
        sources: Vec::new(),
    };
    Ok(Some((mach, hw.ram_total_bytes)))
}

/// serve's residency decision: the forecast `spark plan --residency` shows, on `mach` (see
/// [`serve_machine`]) with `s` (`MemorySettings::serve` at the context llama-server runs, as
/// serve's placement counts it), from `counts` (named) or the uniform prior; its verdict as
/// serve acts on it.
pub fn decision_on(
    m: &ModelFacts,
    s: &MemorySettings,
    mach: &Machine,
    counts: Option<(&crate::cache::Counts, &str)>,
    ram_total_bytes: u64,
) -> Result<ServeDecision, String> {
    let f = decide(m, s, mach, counts, ram_total_bytes)?;
    let (run, slots, slots_per_layer, n_cpu_moe) = match f.verdict {
        // (A per-layer split of all zeros streams every used expert: still the provider's.)
        Verdict::Residency {
            slots_per_layer: Some(v),
            slots,
            n_cpu_moe,
        } => ("residency", Some(slots), Some(v), n_cpu_moe),
        Verdict::Residency {
            slots, n_cpu_moe, ..
        } if slots > 0 => ("residency", Some(slots), None, n_cpu_moe),
        Verdict::Residency { .. } => ("stock", None, None, f.stock.n_cpu_moe),
        Verdict::Stock { n_cpu_moe } => ("stock", None, None, n_cpu_moe),
    };
    Ok(ServeDecision {
        run: run.into(),
        slots,
        slots_per_layer,
        n_cpu_moe: Some(n_cpu_moe),
        reason: f.reason.clone(),
        source: Some(f.source.describe()),
        stock_tps: Some(f.stock.tps),
        spark_tps: f.spark.as_ref().map(|x| x.tps),
        break_even_link_gbps: f.break_even_link_gbps,
    })
}
