//! `spark plan --residency`: does residency pay on this machine? Stock llama.cpp with the best
//! `--n-cpu-moe` (experts of the host layers computed on the CPU) side by side with spark
//! residency on the same VRAM (the same host layers' experts streamed into per-layer slots over
//! the link, computed on the GPU), every term of each column, the break-even link bandwidth and
//! the recommendation — the one decision `spark serve --residency` also acts on.
//!
//! Owns the byte model of the tap provider (what one decode step moves over the link, reads from
//! host memory and copies inside VRAM: [`step_bytes`], exact by construction and checked against
//! the provider's own counters on lavapipe), the replay of routing through the provider's slot
//! rule ([`crate::cache::SlotLru`]) at each candidate slot count, the split of the VRAM into
//! resident layers and slots, and the verdict. Arithmetic on facts handed in, except
//! [`routing_for`], which reads the `--trace` or `--profile` it is given; never measures, never
//! spawns.
//!
//! The time model of one decode token, per column (each term printed):
//! - stock: VRAM reads ÷ VRAM bandwidth + the host layers' active expert bytes ÷ host
//!   bandwidth (+ the CPU's compute term of [`super::forecast`] on those weights) + one
//!   hand-off per host layer (the graph splits there: the hidden state goes to the CPU and back,
//!   two synchronisations; a prior until receipts measure it);
//! - spark: VRAM reads (every active expert is read on the GPU, plus the provider's slot ↔
//!   destination copies, read and written) ÷ VRAM bandwidth + link bytes ÷ host-to-device
//!   bandwidth + copy calls × the per-call cost (a prior).
//!
//! The bandwidth terms are divided by the regime's efficiency (receipts or prior), the fixed
//! terms are not; both columns use the same efficiency, so the verdict compares like with like.
//!
//! Split by concern: `bytes.rs` (the provider's byte model and the replay), `routing.rs`
//! (where the hit ratios come from), `render.rs` (the text form), `serve.rs` (serve's
//! decision); this file holds the candidates, the forecast and the verdict.

pub mod alloc;
mod bytes;
mod render;
mod routing;
mod serve;

pub use bytes::{replay, step_bytes, Replayer, StepBytes, PAD_MAX};
pub use render::render;
pub use routing::{routing_for, synthesize, zipf_weights, HitSource, SYNTH_STEPS};
pub use serve::{decide, decision_on, serve_machine, ServeDecision, ServeGpu};

use serde::Serialize;

use super::cli::PlanArgs;
use super::fit::{self, MemorySettings, ModelFacts, Placement};
use super::forecast::{calibrate, Calibration, Regime};
use super::hardware::HardwareFacts;
use super::receipt::ReceiptStore;
use super::{Plan, PlanError, PlanInput};
use crate::trace::Routing;
use crate::units::mib;
use bytes::pad;

/// Hand-off cost per host-resident expert layer per decode token under stock `--n-cpu-moe`, µs:
/// two small copies and two synchronisations. A prior: nothing here measures it yet.
pub const HANDOFF_US_PRIOR: f64 = 25.0;

/// Cost of one copy call the provider makes (host → device run, slot ↔ destination), µs: the
/// launch of an asynchronous copy. A prior.
pub const COPY_CALL_US_PRIOR: f64 = 3.0;

/// The per-layer split runs only where it forecasts at least this much faster than the same
/// count in every layer: below it, the difference is within the noise of a sampled routing
/// (512 tokens drawn from one prior give layers curves that differ by chance: on the
/// Qwen3-30B-A3B shape with `--zipf 1.2`, every layer alike, the split fitted to that chance
/// forecast 1.07% faster).
pub const PER_LAYER_MARGIN: f64 = 0.02;

/// Share of a routing's steps that warms the slots before hits are counted (a server runs warm).
pub const WARMUP_SHARE: f64 = 0.25;

/// The GPU and link facts the forecast needs, with where each came from.
#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    pub vram_budget_bytes: u64,
    pub vram_gbps: f64,
    pub h2d_gbps: f64,
    /// Host read bandwidth at the thread count, GB/s.
    pub host_gbps: f64,
    /// Host compute rate at the thread count, GFLOP/s (the host side's compute term without a
    /// probe record; 0 when unknown).
    pub host_gflops: f64,
    /// The host's measured cost per weight of each type (`spark plan probe`), as `spark plan`'s
    /// stock forecast charges it; `None` without a record or under `--host-gflops`.
    #[serde(skip)]
    pub type_costs: Option<super::type_cost::TypeCosts>,
    /// CPU threads the host side runs with (the probe's thread count to read).
    pub threads: u32,
    pub handoff_us: f64,
    pub copy_call_us: f64,
    pub sources: Vec<String>,
}

/// One column (or one candidate split): what a decode token moves and how long it takes.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Side {
    /// `--n-cpu-moe`: the expert layers `0..n` keep their experts in host memory.
    pub n_cpu_moe: u32,
    /// Host-resident expert layers.
    pub host_layers: u32,
    /// The uniform split: the slots in every host layer that this column's slot VRAM buys
    /// when each layer gets the same count (0 for stock). `slots_per_layer` is what runs.
    pub slots: u32,
    /// What runs in each host layer (empty for stock): the per-layer allocation where it
    /// forecasts faster than the uniform split, else the uniform split.
    pub slots_per_layer: Vec<LayerSlots>,
    /// Whether `slots_per_layer` is the per-layer allocation (`false`: uniform).
    pub per_layer: bool,
    /// The uniform split's forecast on the same VRAM (tok/s and hit ratio), beside the
    /// per-layer one (spark only).
    pub uniform_tps: Option<f64>,
    pub uniform_hit_ratio: Option<f64>,
    /// VRAM this column uses (weights, slots, KV, compute, reserve).
    pub vram_bytes: u64,
    /// Hits ÷ lookups of the host layers (None for stock).
    pub hit_ratio: Option<f64>,
    /// Bytes per token over the link (host → device).
    pub link_bytes: f64,
    /// Bytes per token read from host memory (stock: by the CPU; spark: by the link's copies).
    pub host_bytes: f64,
    /// Bytes per token read from VRAM by compute (weights, KV).
    pub vram_read_bytes: f64,
    /// Bytes per token copied inside VRAM by the provider (each read and written once).
    pub vram_copy_bytes: f64,
    pub host_copies: f64,
    pub device_copies: f64,
    /// Hand-offs per token (stock: one per host layer).
    pub handoffs: f64,
    /// Seconds per token, by term (before efficiency).
    pub t_vram: f64,
    pub t_host: f64,
    pub t_host_compute: f64,
    pub t_link: f64,
    pub t_fixed: f64,
    /// The ceiling (every bandwidth at 100%) and the forecast with its band, tok/s.
    pub ceiling_tps: f64,
    pub tps: f64,
    pub low: f64,
    pub high: f64,
}

impl Side {
    /// The slots in words: `N slots per layer`, or the per-layer range with its mean.
    pub fn describe_slots(&self) -> String {
        if !self.per_layer {
            return format!("{} slots per layer", self.slots);
        }
        let v = self.slots_per_layer.iter().map(|x| x.slots);
        let (lo, hi) = (v.clone().min().unwrap_or(0), v.clone().max().unwrap_or(0));
        let mean = v.map(f64::from).sum::<f64>() / self.slots_per_layer.len().max(1) as f64;
        match (lo, hi) {
            (0, 0) => format!(
                "0 slots per layer (every used expert streamed, none cached: {} in each would be slower)",
                self.slots
            ),
            _ => format!(
                "{lo}–{hi} slots per layer (per-layer, mean {mean:.1}; the same VRAM as {} in each is slower)",
                self.slots
            ),
        }
    }

    fn finish(mut self, eff: &Calibration) -> Side {
        let bw = self.t_vram + self.t_host + self.t_host_compute + self.t_link;
        let tps = |e: f64| {
            let t = bw / e.max(1e-9) + self.t_fixed;
            if t > 0.0 {
                1.0 / t
            } else {
                0.0
            }
        };
        self.ceiling_tps = tps(1.0);
        self.tps = tps(eff.efficiency);
        self.low = tps(eff.low);
        self.high = tps(eff.high);
        self
    }
}

/// One host layer's slots in a split, and its hit ratio there.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct LayerSlots {
    pub layer: u32,
    pub slots: u32,
    pub hit_ratio: Option<f64>,
}

/// Hit ratio per layer at one slot count (the miss curve, sampled at the candidates).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct CurvePoint {
    pub slots: u32,
    /// Mean over the expert layers.
    pub hit_ratio: f64,
    /// (layer, hit ratio) of every expert layer.
    pub per_layer: Vec<(u32, f64)>,
    /// Link bytes per token if every expert layer were streamed at this slot count.
    pub link_bytes_all_layers: f64,
}

/// What to run.
#[derive(Debug, Clone, Serialize, PartialEq)]
#[serde(tag = "run", rename_all = "snake_case")]
pub enum Verdict {
    /// spark residency: `--n-cpu-moe n` with `slots` per host layer, or with
    /// `slots_per_layer` ((layer, slots) of each host layer) when the per-layer split is
    /// faster.
    Residency {
        n_cpu_moe: u32,
        slots: u32,
        slots_per_layer: Option<Vec<(u32, u32)>>,
    },
    /// Stock placement (`--n-cpu-moe n`, or every layer on the GPU when n is 0).
    Stock { n_cpu_moe: u32 },
}

/// The whole answer.
#[derive(Debug, Clone, Serialize)]
pub struct ResidencyForecast {
    pub stock: Side,
    /// The best residency split, when any fits.
    pub spark: Option<Side>,
    /// Every split considered: resident layers vs slots.
    pub candidates: Vec<Side>,
    pub curve: Vec<CurvePoint>,
    pub source: HitSource,
    /// Link bandwidth at which the best split would tie stock (None: it wins or loses whatever
    /// the link).
    pub break_even_link_gbps: Option<f64>,
    pub break_even_note: String,
    pub verdict: Verdict,
    pub reason: String,
    pub machine: Machine,
    pub efficiency: Calibration,
    pub assumptions: Vec<String>,
}

/// One expert's slice in each expert tensor, per model layer (empty where no routed experts).
pub fn layer_tensor_bytes(m: &ModelFacts) -> Vec<Vec<u64>> {
    tensor_bytes_of(&m.geometry)
}

/// As [`layer_tensor_bytes`], from the GGUF geometry.
pub fn tensor_bytes_of(g: &crate::gguf::MoeGeometry) -> Vec<Vec<u64>> {
    let mut v = vec![Vec::new(); g.n_layer as usize];
    for l in &g.moe_layers {
        if let Some(slot) = v.get_mut(l.layer as usize) {
            *slot = l.tensors.iter().map(|t| t.slice_bytes).collect();
        }
    }
    v
}

/// VRAM one slot row (one slot in every tensor of `layer`) takes: slice plus padding, as the
/// provider allocates it.
fn slot_row_bytes(tb: &[u64]) -> u64 {
    tb.iter().map(|&es| es + pad(es)).sum()
}

/// Computes the forecast. `routing` is the decode routing to replay (from a trace, or drawn from a
/// profile or the prior, as `source` says); `stock_eff` the efficiency both columns use.
pub fn forecast(
    m: &ModelFacts,
    s: &MemorySettings,
    depth: u64,
    mach: &Machine,
    (routing, source): (&Routing, HitSource),
    eff: &Calibration,
    ram_total_bytes: u64,
) -> Result<ResidencyForecast, String> {
    if !m.is_moe() {
        return Err(format!(
            "{} has no routed experts: residency has nothing to stream",
            m.path
        ));
    }
    let budget = mach.vram_budget_bytes;
    let tb = layer_tensor_bytes(m);
    let n_expert = m.n_expert as usize;
    let k = m.n_expert_used as usize;
    let o = fit::overheads(m, s);
    let kv_read = (m.geometry.kv_bytes_per_token(s.k_type, s.v_type) * depth) as f64;
    let dense = m.dense_read_bytes() as f64;
    let warmup = ((routing.steps() as f64) * WARMUP_SHARE) as usize;

    // Stock: the smallest --n-cpu-moe that fits (fit's answer), every term.
    let (stock_n, stock_vram) = match fit::fit(m, s, Some(budget), ram_total_bytes) {
        fit::FitOutcome::Fits {
            placement, usage, ..
        } => (
            match placement {
                Placement::CpuMoe { n } => n,
                _ => 0,
            },
            usage.vram_bytes,
        ),
        fit::FitOutcome::Refused(r) => return Err(r.reason),
    };
    let host_layers = |n: u32| m.expert_layers.iter().filter(|(l, _)| *l < n).count() as u32;
    let stock = {
        let host = m.active_expert_bytes(0, stock_n) as f64;
        // The CPU's work on them, per weight type, as `spark plan` charges it: a probed type's
        // measured cost includes its reads, which are then not charged again.
        let host_terms = super::type_cost::compute_terms(
            &super::forecast::active_expert_elems_by_type(m, 0, stock_n),
            mach.type_costs.as_ref(),
            mach.threads,
            mach.host_gflops,
        );
        let host_read_in_terms: f64 = host_terms
            .iter()
            .filter(|t| t.includes_read)
            .map(|t| t.bytes)
            .sum();
        let vram = dense + m.active_expert_bytes(stock_n, u32::MAX) as f64 + kv_read;
        let hl = host_layers(stock_n);
        Side {
            n_cpu_moe: stock_n,
            host_layers: hl,
            slots: 0,
            vram_bytes: stock_vram,
            slots_per_layer: Vec::new(),
            per_layer: false,
            uniform_tps: None,
            uniform_hit_ratio: None,
            hit_ratio: None,
            link_bytes: 0.0,
            host_bytes: host,
            vram_read_bytes: vram,
            vram_copy_bytes: 0.0,
            host_copies: 0.0,
            device_copies: 0.0,
            handoffs: f64::from(hl),
            t_vram: vram / (mach.vram_gbps * 1e9),
            t_host: (host - host_read_in_terms).max(0.0) / (mach.host_gbps * 1e9),
            t_host_compute: host_terms.iter().map(|t| t.secs).sum(),
            t_link: 0.0,
            t_fixed: f64::from(hl) * mach.handoff_us * 1e-6,
            ceiling_tps: 0.0,
            tps: 0.0,
            low: 0.0,
            high: 0.0,
        }
        .finish(eff)
    };

    // spark: for each count of host layers, the slots the rest of the VRAM buys.
    let base = m.gpu_always_bytes() + o.kv_bytes + o.compute_bytes + o.reserve_bytes;
    let staging = m
        .expert_layers
        .iter()
        .map(|(l, _)| m.layer_expert_bytes(*l))
        .max()
        .unwrap_or(0);
    let steps = routing.steps().saturating_sub(warmup).max(1) as f64;
    let expert_layers: Vec<u32> = m.expert_layers.iter().map(|(l, _)| *l).collect();
    let row_of = |l: u32| slot_row_bytes(&tb[l as usize]);

    // The splits: for each count of host layers, the VRAM left for slots and the uniform count
    // it buys.
    struct Split {
        n: u32,
        hl: u32,
        fixed: u64,
        uniform: u32,
    }
    let mut splits = Vec::new();
    for n in 1..=m.expert_layer_end() {
        let hl = host_layers(n);
        if hl == 0 || (n > 0 && !expert_layers.contains(&(n - 1))) {
            continue;
        }
        let resident = m.experts_total() - m.experts_on_host(n);
        let fixed = base + staging + resident;
        if fixed > budget {
            continue;
        }
        let row: u64 = expert_layers
            .iter()
            .filter(|&&l| l < n)
            .map(|&l| row_of(l))
            .sum();
        let uniform = ((budget - fixed) / row.max(1)).min(u64::from(m.n_expert)) as u32;
        splits.push(Split {
            n,
            hl,
            fixed,
            uniform,
        });
    }

    // Every layer's bytes at each slot count of the grid (0 to the experts per layer, at most
    // about 65 counts) and at each uniform count: one replay per count, since the provider's
    // layers are independent, a per-layer split reads each layer at its own count.
    let step = (m.n_expert as usize).div_ceil(64).max(1);
    let mut counts: Vec<u32> = (0..=m.n_expert).step_by(step).collect();
    counts.push(m.n_expert);
    counts.extend(splits.iter().map(|sp| sp.uniform));
    counts.sort_unstable();
    counts.dedup();
    let replays: Vec<(u32, Vec<StepBytes>)> = counts
        .iter()
        .map(|&sl| (sl, replay(routing, n_expert, k, &tb, sl, warmup)))
        .collect();
    let bytes_at = |layer: u32, slots: u32| -> StepBytes {
        replays
            .iter()
            .find(|(s, _)| *s == slots)
            .map_or_else(StepBytes::default, |(_, r)| r[layer as usize])
    };
    // A layer's share of a token's time at a slot count: the terms of the spark column that
    // depend on the slots (link bytes, the slot copies read and written, copy calls).
    let layer_secs = |b: &StepBytes| -> f64 {
        let bw = b.link_bytes as f64 / (mach.h2d_gbps * 1e9)
            + 2.0 * b.device_copy_bytes as f64 / (mach.vram_gbps * 1e9);
        (bw / eff.efficiency.max(1e-9)
            + (b.host_copies + b.device_copies) as f64 * mach.copy_call_us * 1e-6)
            / steps
    };
    let ratio = |b: &StepBytes| (b.lookups > 0).then(|| b.hits as f64 / b.lookups as f64);
    let grid: Vec<u32> = (0..=m.n_expert)
        .step_by(step)
        .chain(std::iter::once(m.n_expert))
        .collect::<std::collections::BTreeSet<u32>>()
        .into_iter()
        .collect();
    let curves: Vec<alloc::LayerCurve> = expert_layers
        .iter()
        .map(|&l| alloc::LayerCurve {
            layer: l,
            row_bytes: row_of(l),
            points: grid
                .iter()
                .map(|&sl| (sl, layer_secs(&bytes_at(l, sl))))
                .collect(),
        })
        .collect();
    let side = |sp: &Split, slots: &[(u32, u32)]| -> Side {
        let mut sum = StepBytes::default();
        let mut slot_bytes = 0;
        let mut per_layer = Vec::with_capacity(slots.len());
        for &(l, sl) in slots {
            let b = bytes_at(l, sl);
            sum += b;
            slot_bytes += row_of(l) * u64::from(sl);
            per_layer.push(LayerSlots {
                layer: l,
                slots: sl,
                hit_ratio: ratio(&b),
            });
        }
        let per = |x: u64| x as f64 / steps;
        let link = per(sum.link_bytes);
        let copy = per(sum.device_copy_bytes);
        let vram = dense + m.active_expert_bytes(0, u32::MAX) as f64 + kv_read + 2.0 * copy;
        let calls = per(sum.host_copies) + per(sum.device_copies);
        Side {
            n_cpu_moe: sp.n,
            host_layers: sp.hl,
            slots: sp.uniform,
            slots_per_layer: per_layer,
            per_layer: false,
            uniform_tps: None,
            uniform_hit_ratio: None,
            vram_bytes: sp.fixed + slot_bytes,
            hit_ratio: ratio(&sum),
            link_bytes: link,
            host_bytes: link,
            vram_read_bytes: vram - 2.0 * copy,
            vram_copy_bytes: copy,
            host_copies: per(sum.host_copies),
            device_copies: per(sum.device_copies),
            handoffs: 0.0,
            t_vram: vram / (mach.vram_gbps * 1e9),
            t_host: 0.0,
            t_host_compute: 0.0,
            t_link: link / (mach.h2d_gbps * 1e9),
            t_fixed: calls * mach.copy_call_us * 1e-6,
            ceiling_tps: 0.0,
            tps: 0.0,
            low: 0.0,
            high: 0.0,
        }
        .finish(eff)
    };
    let mut candidates = Vec::new();
    for sp in &splits {
        let host: Vec<u32> = expert_layers
            .iter()
            .copied()
            .filter(|&l| l < sp.n)
            .collect();
        let uniform = side(
            sp,
            &host.iter().map(|&l| (l, sp.uniform)).collect::<Vec<_>>(),
        );
        let mine: Vec<alloc::LayerCurve> =
            curves.iter().filter(|c| c.layer < sp.n).cloned().collect();
        let at = alloc::allocate(&mine, budget - sp.fixed);
        let split: Vec<(u32, u32)> = mine
            .iter()
            .zip(&at)
            .map(|(c, &i)| (c.layer, c.points[i].0))
            .collect();
        let per_layer = side(sp, &split);
        let (u_tps, u_hit) = (uniform.tps, uniform.hit_ratio);
        let mut chosen = if per_layer.tps > uniform.tps * (1.0 + PER_LAYER_MARGIN)
            && per_layer.slots_per_layer != uniform.slots_per_layer
        {
            Side {
                per_layer: true,
                ..per_layer
            }
        } else {
            uniform
        };
        chosen.uniform_tps = Some(u_tps);
        chosen.uniform_hit_ratio = u_hit;
        candidates.push(chosen);
    }
    let spark = candidates
        .iter()
        .max_by(|a, b| a.tps.total_cmp(&b.tps))
        .cloned();

    // The miss curve at every replayed slot count (every expert layer streamed).
    let curve: Vec<CurvePoint> = replays
        .iter()
        .map(|(sl, r)| {
            let per_layer: Vec<(u32, f64)> = expert_layers
                .iter()
                .map(|&l| (l, ratio(&r[l as usize]).unwrap_or(0.0)))
                .collect();
            let mut all = StepBytes::default();
            for &l in &expert_layers {
                all += r[l as usize];
            }
            CurvePoint {
                slots: *sl,
                hit_ratio: ratio(&all).unwrap_or(0.0),
                per_layer,
                link_bytes_all_layers: all.link_bytes as f64 / steps,
            }
        })
        .collect();

    // Break-even link bandwidth: the lowest link rate at which some split ties stock.
    let stock_t = 1.0 / stock.tps.max(1e-12);
    let mut be: Option<f64> = None;
    let mut never = true;
    for c in &candidates {
        let rest = (c.t_vram) / eff.efficiency.max(1e-9) + c.t_fixed;
        if c.link_bytes <= 0.0 {
            if rest < stock_t {
                never = false;
            }
            continue;
        }
        if rest < stock_t {
            never = false;
            let bw = c.link_bytes / ((stock_t - rest) * eff.efficiency.max(1e-9)) / 1e9;
            be = Some(be.map_or(bw, |b: f64| b.min(bw)));
        }
    }
    let break_even_note = match (be, never, candidates.is_empty()) {
        (_, _, true) => "no split fits: the resident layers and one layer's staging copy leave no room for slots".into(),
        (Some(bw), _, _) => format!(
            "residency ties stock at a link of {bw:.1} GB/s (this link: {:.1} GB/s); below it stock wins",
            mach.h2d_gbps
        ),
        (None, true, _) => "residency cannot tie stock at any link rate here: its VRAM traffic and copy calls alone take longer than stock's whole token".into(),
        (None, false, _) => "residency streams nothing at its best split (every used expert hit)".into(),
    };
    let (verdict, reason) = match &spark {
        Some(sp) if sp.tps > stock.tps => (
            Verdict::Residency {
                n_cpu_moe: sp.n_cpu_moe,
                slots: sp.slots,
                slots_per_layer: sp.per_layer.then(|| {
                    sp.slots_per_layer
                        .iter()
                        .map(|x| (x.layer, x.slots))
                        .collect()
                }),
            },
            format!(
                "residency pays: {:.1} against {:.1} tok/s ({:.2}×) with {} in {} host layers at {:.0}% hits",
                sp.tps,
                stock.tps,
                sp.tps / stock.tps.max(1e-12),
                sp.describe_slots(),
                sp.host_layers,
                sp.hit_ratio.unwrap_or(0.0) * 100.0
            ),
        ),
        Some(sp) => (
            Verdict::Stock { n_cpu_moe: stock_n },
            format!(
                "stock placement: no split beats it — the best ({} in {} host layers, {:.0}% hits) forecasts {:.1} against stock's {:.1} tok/s",
                sp.describe_slots(),
                sp.host_layers,
                sp.hit_ratio.unwrap_or(0.0) * 100.0,
                sp.tps,
                stock.tps
            ),
        ),
        None if stock_n == 0 => (
            Verdict::Stock { n_cpu_moe: 0 },
            "stock placement: every expert fits in VRAM, nothing to stream".into(),
        ),
        None => (
            Verdict::Stock { n_cpu_moe: stock_n },
            "stock placement: no split into resident layers and slots fits the VRAM".into(),
        ),
    };
    let assumptions = vec![
        format!(
            "hit ratios from {}, replayed through the tap provider's own slot rule (lru, ties by slot; what it does without a plan from serve), after a warm-up of {:.0}% of the tokens",
            source.describe(),
            WARMUP_SHARE * 100.0
        ),
        format!(
            "slots per layer: the slot VRAM of each split is given greedily to the layer whose next larger count saves the most time per MiB (its own hit curve: hits save link bytes, every hit and load costs a VRAM copy and a call), at most the experts per layer, at least 0 (a layer whose slots would not pay is streamed); where that forecasts less than {:.0}% faster than the same count in every layer, every layer gets the same count",
            PER_LAYER_MARGIN * 100.0
        ),
        "link bytes are the provider's: one copy per run of consecutive experts not in a slot, slice plus ≤ 512 bytes of padding unless the run ends at the last expert (equal to its counters on lavapipe)".into(),
        "host-resident expert weights are pinned (llama-server --load-mode none, as serve --residency starts it); mapped memory streams at a fraction of the link".into(),
        format!(
            "spark: every host layer is streamed (the offload is global), one layer's expert tensors ({}) are the engine's copy destination in VRAM, and each hit and load is one slot ↔ destination copy inside VRAM",
            mib(staging)
        ),
        format!(
            "stock: one hand-off per host layer at {:.0} µs, spark: {:.0} µs per copy call (priors, not measured here)",
            mach.handoff_us, mach.copy_call_us
        ),
        format!(
            "both columns: bandwidth terms at efficiency {:.2} (band {:.2}–{:.2}, {}), fixed costs as they are",
            eff.efficiency, eff.low, eff.high, eff.source
        ),
    ];
    Ok(ResidencyForecast {
        stock,
        spark,
        candidates,
        curve,
        source,
        break_even_link_gbps: be,
        break_even_note,
        verdict,
        reason,
        machine: mach.clone(),
        efficiency: eff.clone(),
        assumptions,
    })
}

/// The GPU and link facts from the plan's hardware (flags or a `--gpu` preset), with sources.
pub fn machine_for(
    a: &PlanArgs,
    input: &PlanInput,
    hw: &HardwareFacts,
) -> Result<Machine, PlanError> {
    let need = "plan --residency: needs a GPU: --gpu CARD, or --vram-bw GB/s and --h2d-bw GB/s with --vram-total or --vram-budget MiB";
    let gpu = hw
        .gpu
        .as_ref()
        .ok_or_else(|| PlanError::Usage(need.into()))?;
    let h2d = gpu.h2d_gbps.ok_or_else(|| PlanError::Usage(need.into()))?;
    let mut sources = Vec::new();
    if let Some(c) = a.hardware.card() {
        sources.push(format!("card preset {}", c.describe()));
    }
    let budget = match (input.budget_bytes, gpu.vram_total_bytes) {
        (Some(b), _) => {
            sources.push(format!("VRAM budget: {} from --vram-budget", mib(b)));
            b
        }
        (None, Some(t)) => {
            sources.push(format!(
                "VRAM budget: the card's {} (no --vram-budget)",
                mib(t)
            ));
            t
        }
        (None, None) => return Err(PlanError::Usage(need.into())),
    };
    sources.push(format!(
        "GPU: {} at {:.0} GB/s VRAM, {:.1} GB/s host → device",
        gpu.name, gpu.vram_gbps, h2d
    ));
    Ok(Machine {
        vram_budget_bytes: budget,
        vram_gbps: gpu.vram_gbps,
        h2d_gbps: h2d,
        host_gbps: hw.host_gbps_at(input.threads),
        host_gflops: hw.host_gflops_at(input.threads),
        type_costs: hw.type_costs.clone(),
        threads: input.threads,
        handoff_us: HANDOFF_US_PRIOR,
        copy_call_us: COPY_CALL_US_PRIOR,
        sources,
    })
}

/// `spark plan --residency`: the forecast for the plan's model, settings and machine.
pub fn for_plan(
    a: &PlanArgs,
    input: &PlanInput,
    plan: &Plan,
    store: Option<&ReceiptStore>,
) -> Result<ResidencyForecast, PlanError> {
    let mach = machine_for(a, input, &plan.hardware)?;
    let (routing, source) = routing_for(a, &plan.model)?;
    let (d, _) = match store {
        Some(st) => st.efficiencies(
            &plan.hardware.machine.key(),
            Regime::ExpertsOffloaded,
            input.threads,
            |_| false,
        ),
        None => (Vec::new(), Vec::new()),
    };
    let eff = calibrate(Regime::ExpertsOffloaded, &d);
    forecast(
        &plan.model,
        &input.settings,
        input.depth,
        &mach,
        (&routing, source),
        &eff,
        plan.hardware.ram_total_bytes,
    )
    .map_err(|reason| PlanError::Refused {
        model: plan.model.path.clone(),
        reason,
    })
}

#[cfg(test)]
mod tests;
