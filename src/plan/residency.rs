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
//! Why this file is over 800 lines: the byte model, the replay that gives hit ratios, the
//! forecast, its rendering and serve's decision share one set of terms (bytes per token per
//! side, copy calls, hand-offs) that must stay in step; about 180 lines are tests. The
//! rendering (`render`) and the routing inputs (`routing_for`, `synthesize`) are the first
//! candidates to move out when this grows.

use serde::Serialize;

use rand::{Rng, SeedableRng};

use super::cli::PlanArgs;
use super::fit::{self, MemorySettings, ModelFacts, Placement};
use super::forecast::{calibrate, Calibration, Regime};
use super::hardware::HardwareFacts;
use super::receipt::ReceiptStore;
use super::{Plan, PlanError, PlanInput};
use crate::cache::{Policy, SlotLru};
use crate::trace::Routing;
use crate::units::{mib, MIB};

/// Stock ggml copies at most this many bytes past the last expert of a run (the provider's
/// `PAD_MAX`).
pub const PAD_MAX: u64 = 512;

/// Hand-off cost per host-resident expert layer per decode token under stock `--n-cpu-moe`, µs:
/// two small copies and two synchronisations. A prior: nothing here measures it yet.
pub const HANDOFF_US_PRIOR: f64 = 25.0;

/// Cost of one copy call the provider makes (host → device run, slot ↔ destination), µs: the
/// launch of an asynchronous copy. A prior.
pub const COPY_CALL_US_PRIOR: f64 = 3.0;

/// Tokens synthesised from a profile or the uniform prior, and the warm-up before scoring.
pub const SYNTH_STEPS: usize = 512;
/// Share of a routing's steps that warms the slots before hits are counted (a server runs warm).
pub const WARMUP_SHARE: f64 = 0.25;

fn pad(es: u64) -> u64 {
    es.min(PAD_MAX)
}

/// What one step of one layer moves, summed over the layer's expert tensors.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct StepBytes {
    /// Used experts (per layer, not per tensor).
    pub lookups: u64,
    /// Used experts served from a slot.
    pub hits: u64,
    /// Host → device bytes: one copy per run of consecutive used experts not served from a
    /// slot, each expert's slice plus up to 512 bytes of padding after the run unless it ends at
    /// the last expert (exactly what stock ggml copies for those experts).
    pub link_bytes: u64,
    /// Host → device copy calls (runs).
    pub host_copies: u64,
    /// Bytes copied inside VRAM: slot → destination for hits, destination → slot for loads.
    pub device_copy_bytes: u64,
    pub device_copies: u64,
}

impl std::ops::AddAssign for StepBytes {
    fn add_assign(&mut self, o: StepBytes) {
        self.lookups += o.lookups;
        self.hits += o.hits;
        self.link_bytes += o.link_bytes;
        self.host_copies += o.host_copies;
        self.device_copy_bytes += o.device_copy_bytes;
        self.device_copies += o.device_copies;
    }
}

/// The bytes of one step of one layer: `used` ascending and distinct, `hit(e)` whether expert `e`
/// was in a slot before the step, `loaded(e)` whether a missing `e` got a slot in this step;
/// `tensor_bytes` is one expert's slice in each expert tensor of the layer.
pub fn step_bytes(
    n_expert: usize,
    tensor_bytes: &[u64],
    used: &[u16],
    hit: impl Fn(u16) -> bool,
    loaded: impl Fn(u16) -> bool,
) -> StepBytes {
    let mut b = StepBytes {
        lookups: used.len() as u64,
        hits: used.iter().filter(|&&e| hit(e)).count() as u64,
        ..StepBytes::default()
    };
    let last = n_expert.saturating_sub(1);
    for &es in tensor_bytes {
        let span = |e: u16| es + if usize::from(e) < last { pad(es) } else { 0 };
        let mut i = 0;
        while i < used.len() {
            let e = used[i];
            if hit(e) {
                b.device_copy_bytes += span(e);
                b.device_copies += 1;
                i += 1;
                continue;
            }
            let first = e;
            let mut end = e;
            while i + 1 < used.len() && used[i + 1] == end + 1 && !hit(used[i + 1]) {
                i += 1;
                end = used[i];
            }
            b.link_bytes += u64::from(end - first) * es + span(end);
            b.host_copies += 1;
            for x in first..=end {
                if loaded(x) {
                    b.device_copy_bytes += span(x);
                    b.device_copies += 1;
                }
            }
            i += 1;
        }
    }
    b
}

/// Replays accesses through the provider's slot rule and sums [`step_bytes`] per layer.
pub struct Replayer<'a> {
    policy: SlotLru,
    n_expert: usize,
    tensor_bytes: &'a [Vec<u64>],
    ids: Vec<u16>,
    before: Vec<bool>,
    /// Per model layer, what the counted accesses moved.
    pub out: Vec<StepBytes>,
}

impl<'a> Replayer<'a> {
    /// `tensor_bytes[l]` is layer `l`'s expert slices (empty for a layer without routed
    /// experts); `slots` per layer; `top_k` tells wide calls apart as the provider does.
    pub fn new(n_expert: usize, top_k: usize, tensor_bytes: &'a [Vec<u64>], slots: u32) -> Self {
        let n_layer = tensor_bytes.len();
        Replayer {
            policy: SlotLru::new(n_expert, &vec![slots; n_layer], top_k),
            n_expert,
            tensor_bytes,
            ids: Vec::new(),
            before: vec![false; n_expert],
            out: vec![StepBytes::default(); n_layer],
        }
    }

    /// One call at `layer` using `ids` (any order, repeats and ids out of range ignored);
    /// counted unless it is part of the warm-up.
    pub fn access(&mut self, layer: usize, ids: &[u16], counted: bool) {
        let n = self.n_expert;
        let Some(tb) = self.tensor_bytes.get(layer).filter(|t| !t.is_empty()) else {
            return;
        };
        self.ids.clear();
        self.ids
            .extend(ids.iter().copied().filter(|&e| usize::from(e) < n));
        if self.ids.is_empty() {
            return;
        }
        self.ids.sort_unstable();
        self.ids.dedup();
        for &e in &self.ids {
            self.before[usize::from(e)] = self.policy.is_resident(layer, e);
        }
        self.policy.access(layer, &self.ids);
        if !counted {
            return;
        }
        let (before, policy) = (&self.before, &self.policy);
        self.out[layer] += step_bytes(
            n,
            tb,
            &self.ids,
            |e| before[usize::from(e)],
            |e| !before[usize::from(e)] && policy.is_resident(layer, e),
        );
    }

    /// Everything the counted accesses moved, over all layers.
    pub fn total(&self) -> StepBytes {
        let mut t = StepBytes::default();
        for b in &self.out {
            t += *b;
        }
        t
    }
}

/// Replays `routing` (step by step) with `slots` per layer, counting steps from `warmup` on.
pub fn replay(
    routing: &Routing,
    n_expert: usize,
    top_k: usize,
    tensor_bytes: &[Vec<u64>],
    slots: u32,
    warmup: usize,
) -> Vec<StepBytes> {
    let mut r = Replayer::new(n_expert, top_k, tensor_bytes, slots);
    let n_layer = routing.n_layer().min(tensor_bytes.len());
    for s in 0..routing.steps() {
        for l in 0..n_layer {
            r.access(l, routing.ids(s, l), s >= warmup);
        }
    }
    r.out
}

/// Where the hit ratios come from.
#[derive(Debug, Clone, Serialize, PartialEq)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum HitSource {
    /// A routing trace, replayed in order.
    Trace { path: String, steps: usize },
    /// A profile's counts: tokens sampled from them (independent draws, seeded), replayed.
    Profile { path: String, steps: usize },
    /// No routing given: every expert equally likely (the worst case for a cache), sampled.
    UniformPrior { steps: usize },
    /// A stated prior: the expert of rank r (ranks shuffled over ids per layer) drawn with
    /// weight r^-s, sampled.
    ZipfPrior { s: f64, steps: usize },
}

impl HitSource {
    pub fn describe(&self) -> String {
        match self {
            HitSource::Trace { path, steps } => {
                format!("the trace {path} ({steps} decode tokens, replayed in order)")
            }
            HitSource::Profile { path, steps } => format!(
                "the profile {path} ({steps} tokens drawn from its counts, independent draws: no order, so recency cannot help beyond frequency)"
            ),
            HitSource::ZipfPrior { s, steps } => format!(
                "a stated prior: the expert of rank r drawn with weight r^-{s} (independent draws), {steps} tokens"
            ),
            HitSource::UniformPrior { steps } => format!(
                "a stated prior: uniform routing, {steps} tokens drawn (the worst case for a cache; pass --trace or --profile for your own routing)"
            ),
        }
    }
}

/// Draws `steps` tokens of `k` distinct experts per expert layer from per-layer weights
/// (`weights[l]`, empty for a layer without experts; all-zero rows draw uniformly), seeded.
pub fn synthesize(
    weights: &[Vec<f64>],
    n_expert: usize,
    k: usize,
    steps: usize,
    seed: u64,
) -> Routing {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let n_layer = weights.len();
    let mut routing = Routing::new(n_layer);
    let k = k.min(n_expert);
    let mut layer_ids: Vec<Vec<u16>> = vec![Vec::new(); n_layer];
    let zeros: Vec<f32> = Vec::new();
    for s in 0..steps {
        for (l, w) in weights.iter().enumerate() {
            let ids = &mut layer_ids[l];
            ids.clear();
            if w.is_empty() || n_expert == 0 {
                continue;
            }
            let total: f64 = w.iter().sum();
            let mut taken = vec![false; n_expert];
            let mut left = total;
            while ids.len() < k {
                let e = if left > 0.0 {
                    let mut x = rng.gen::<f64>() * left;
                    let mut pick = None;
                    for (e, &we) in w.iter().enumerate() {
                        if taken[e] || we <= 0.0 {
                            continue;
                        }
                        pick = Some(e);
                        if x < we {
                            break;
                        }
                        x -= we;
                    }
                    match pick {
                        Some(e) => e,
                        None => break,
                    }
                } else {
                    let free: Vec<usize> = (0..n_expert).filter(|&e| !taken[e]).collect();
                    if free.is_empty() {
                        break;
                    }
                    free[rng.gen_range(0..free.len())]
                };
                taken[e] = true;
                if left > 0.0 {
                    left -= w[e].max(0.0);
                    if left <= 1e-12 * total {
                        left = 0.0;
                    }
                }
                ids.push(e as u16);
            }
        }
        routing.push_step(
            0,
            s as u32,
            layer_ids.iter().map(|v| (v.as_slice(), zeros.as_slice())),
        );
    }
    routing
}

/// Weights r^-s over `n` experts, ranks assigned to ids by a seeded shuffle (hot experts are
/// not neighbours by id, which would flatter the run copies).
pub fn zipf_weights(n: usize, s: f64, seed: u64) -> Vec<f64> {
    use rand::seq::SliceRandom;
    let mut ids: Vec<usize> = (0..n).collect();
    ids.shuffle(&mut rand_chacha::ChaCha8Rng::seed_from_u64(seed));
    let mut w = vec![0.0; n];
    for (rank, &e) in ids.iter().enumerate() {
        w[e] = ((rank + 1) as f64).powf(-s);
    }
    w
}

/// The GPU and link facts the forecast needs, with where each came from.
#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    pub vram_budget_bytes: u64,
    pub vram_gbps: f64,
    pub h2d_gbps: f64,
    /// Host read bandwidth at the thread count, GB/s.
    pub host_gbps: f64,
    /// Host compute rate at the thread count, GFLOP/s (the host side's compute term; 0 when
    /// unknown).
    pub host_gflops: f64,
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
    /// Slots per host layer (0 for stock).
    pub slots: u32,
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
    /// spark residency: `--n-cpu-moe n` with `slots` per host layer.
    Residency { n_cpu_moe: u32, slots: u32 },
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
        let vram = dense + m.active_expert_bytes(stock_n, u32::MAX) as f64 + kv_read;
        let hl = host_layers(stock_n);
        Side {
            n_cpu_moe: stock_n,
            host_layers: hl,
            slots: 0,
            vram_bytes: stock_vram,
            hit_ratio: None,
            link_bytes: 0.0,
            host_bytes: host,
            vram_read_bytes: vram,
            vram_copy_bytes: 0.0,
            host_copies: 0.0,
            device_copies: 0.0,
            handoffs: f64::from(hl),
            t_vram: vram / (mach.vram_gbps * 1e9),
            t_host: host / (mach.host_gbps * 1e9),
            t_host_compute: super::forecast::host_compute_secs(
                super::forecast::active_expert_elems(m, 0, stock_n),
                mach.host_gflops,
            ),
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
    let mut replays: Vec<(u32, Vec<StepBytes>)> = Vec::new();
    let mut replay_at = |slots: u32| -> Vec<StepBytes> {
        if let Some((_, r)) = replays.iter().find(|(s, _)| *s == slots) {
            return r.clone();
        }
        let r = replay(routing, n_expert, k, &tb, slots, warmup);
        replays.push((slots, r.clone()));
        r
    };
    let steps = routing.steps().saturating_sub(warmup).max(1) as f64;
    let mut candidates = Vec::new();
    for n in 1..=m.expert_layer_end() {
        let hl = host_layers(n);
        if hl == 0 || (n > 0 && !m.expert_layers.iter().any(|(l, _)| *l == n - 1)) {
            continue;
        }
        let resident = m.experts_total() - m.experts_on_host(n);
        let fixed = base + staging + resident;
        if fixed > budget {
            continue;
        }
        let row: u64 = m
            .expert_layers
            .iter()
            .filter(|(l, _)| *l < n)
            .map(|(l, _)| slot_row_bytes(&tb[*l as usize]))
            .sum();
        let slots = ((budget - fixed) / row.max(1)).min(u64::from(m.n_expert)) as u32;
        let r = replay_at(slots);
        let mut sum = StepBytes::default();
        for (l, _) in m.expert_layers.iter().filter(|(l, _)| *l < n) {
            sum += r[*l as usize];
        }
        let per = |x: u64| x as f64 / steps;
        let link = per(sum.link_bytes);
        let copy = per(sum.device_copy_bytes);
        let vram = dense + m.active_expert_bytes(0, u32::MAX) as f64 + kv_read + 2.0 * copy;
        let calls = per(sum.host_copies) + per(sum.device_copies);
        candidates.push(
            Side {
                n_cpu_moe: n,
                host_layers: hl,
                slots,
                vram_bytes: fixed + row * u64::from(slots),
                hit_ratio: (sum.lookups > 0).then(|| sum.hits as f64 / sum.lookups as f64),
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
            .finish(eff),
        );
    }
    let spark = candidates
        .iter()
        .max_by(|a, b| a.tps.total_cmp(&b.tps))
        .cloned();

    // The miss curve at the candidate slot counts (every expert layer streamed).
    let mut slot_counts: Vec<u32> = candidates.iter().map(|c| c.slots).collect();
    slot_counts.sort_unstable();
    slot_counts.dedup();
    let curve: Vec<CurvePoint> = slot_counts
        .iter()
        .map(|&sl| {
            let r = replay_at(sl);
            let per_layer: Vec<(u32, f64)> = m
                .expert_layers
                .iter()
                .map(|(l, _)| {
                    let b = r[*l as usize];
                    (
                        *l,
                        if b.lookups > 0 {
                            b.hits as f64 / b.lookups as f64
                        } else {
                            0.0
                        },
                    )
                })
                .collect();
            let (h, n): (u64, u64) = m
                .expert_layers
                .iter()
                .map(|(l, _)| (r[*l as usize].hits, r[*l as usize].lookups))
                .fold((0, 0), |a, b| (a.0 + b.0, a.1 + b.1));
            let link: u64 = m
                .expert_layers
                .iter()
                .map(|(l, _)| r[*l as usize].link_bytes)
                .sum();
            CurvePoint {
                slots: sl,
                hit_ratio: if n > 0 { h as f64 / n as f64 } else { 0.0 },
                per_layer,
                link_bytes_all_layers: link as f64 / steps,
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
            },
            format!(
                "residency pays: {:.1} against {:.1} tok/s ({:.2}×) with {} slots in each of {} host layers at {:.0}% hits",
                sp.tps,
                stock.tps,
                sp.tps / stock.tps.max(1e-12),
                sp.slots,
                sp.host_layers,
                sp.hit_ratio.unwrap_or(0.0) * 100.0
            ),
        ),
        Some(sp) => (
            Verdict::Stock { n_cpu_moe: stock_n },
            format!(
                "stock placement: no split beats it — the best ({} slots in each of {} host layers, {:.0}% hits) forecasts {:.1} against stock's {:.1} tok/s",
                sp.slots,
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

/// Renders the forecast as text: the two columns, every term, the curve and the verdict.
pub fn render(f: &ResidencyForecast) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let mb = |b: f64| format!("{:.1} MiB", b / MIB as f64);
    let ms = |t: f64| format!("{:.2} ms", t * 1e3);
    let _ = writeln!(s, "residency: does it pay here?");
    let sp = f.spark.as_ref();
    let col = |x: Option<String>| x.unwrap_or_else(|| "-".into());
    let row = |s: &mut String, name: &str, a: String, b: Option<String>| {
        let _ = writeln!(s, "  {name:<28} {a:>20} {:>20}", col(b));
    };
    let _ = writeln!(
        s,
        "  {:<28} {:>20} {:>20}",
        "", "(b) stock", "(d) spark residency"
    );
    row(
        &mut s,
        "placement",
        format!("--n-cpu-moe {}", f.stock.n_cpu_moe),
        sp.map(|c| format!("--n-cpu-moe {} + {} slots", c.n_cpu_moe, c.slots)),
    );
    row(
        &mut s,
        "host expert layers",
        f.stock.host_layers.to_string(),
        sp.map(|c| c.host_layers.to_string()),
    );
    row(
        &mut s,
        "VRAM used",
        mib(f.stock.vram_bytes),
        sp.map(|c| mib(c.vram_bytes)),
    );
    row(
        &mut s,
        "hit ratio (host layers)",
        "-".into(),
        sp.and_then(|c| c.hit_ratio)
            .map(|h| format!("{:.1}%", h * 100.0)),
    );
    row(
        &mut s,
        "link bytes/token",
        mb(f.stock.link_bytes),
        sp.map(|c| mb(c.link_bytes)),
    );
    row(
        &mut s,
        "host-memory bytes/token",
        mb(f.stock.host_bytes),
        sp.map(|c| mb(c.host_bytes)),
    );
    row(
        &mut s,
        "VRAM read bytes/token",
        mb(f.stock.vram_read_bytes),
        sp.map(|c| mb(c.vram_read_bytes)),
    );
    row(
        &mut s,
        "VRAM slot copies/token",
        mb(f.stock.vram_copy_bytes),
        sp.map(|c| format!("{} ({:.0} calls)", mb(c.vram_copy_bytes), c.device_copies)),
    );
    row(
        &mut s,
        "host copies/token",
        "-".into(),
        sp.map(|c| format!("{:.0}", c.host_copies)),
    );
    row(
        &mut s,
        "hand-offs/token",
        format!("{:.0}", f.stock.handoffs),
        sp.map(|c| format!("{:.0}", c.handoffs)),
    );
    row(
        &mut s,
        "time: VRAM",
        ms(f.stock.t_vram),
        sp.map(|c| ms(c.t_vram)),
    );
    row(
        &mut s,
        "time: host read",
        ms(f.stock.t_host),
        sp.map(|c| ms(c.t_host)),
    );
    row(
        &mut s,
        "time: host compute",
        ms(f.stock.t_host_compute),
        sp.map(|c| ms(c.t_host_compute)),
    );
    row(
        &mut s,
        "time: link",
        ms(f.stock.t_link),
        sp.map(|c| ms(c.t_link)),
    );
    row(
        &mut s,
        "time: hand-offs / copy calls",
        ms(f.stock.t_fixed),
        sp.map(|c| ms(c.t_fixed)),
    );
    row(
        &mut s,
        "ceiling tok/s",
        format!("{:.1}", f.stock.ceiling_tps),
        sp.map(|c| format!("{:.1}", c.ceiling_tps)),
    );
    row(
        &mut s,
        "decode tok/s (band)",
        format!(
            "{:.1} ({:.1}–{:.1})",
            f.stock.tps, f.stock.low, f.stock.high
        ),
        sp.map(|c| format!("{:.1} ({:.1}–{:.1})", c.tps, c.low, c.high)),
    );
    let _ = writeln!(s, "break-even {}", f.break_even_note);
    let _ = writeln!(s, "verdict   {}", f.reason);
    if !f.candidates.is_empty() {
        let _ = writeln!(
            s,
            "splits    host layers  slots  hits    link/token   tok/s"
        );
        for c in &f.candidates {
            let _ = writeln!(
                s,
                "          {:>11} {:>6} {:>5.1}% {:>12} {:>7.1}",
                c.host_layers,
                c.slots,
                c.hit_ratio.unwrap_or(0.0) * 100.0,
                mb(c.link_bytes),
                c.tps
            );
        }
    }
    if let Some(p) = f
        .curve
        .iter()
        .find(|p| Some(p.slots) == sp.map(|c| c.slots))
    {
        let lo = p
            .per_layer
            .iter()
            .map(|x| x.1)
            .fold(f64::INFINITY, f64::min);
        let hi = p.per_layer.iter().map(|x| x.1).fold(0.0, f64::max);
        let _ = writeln!(
            s,
            "per layer at {} slots: hit ratio {:.1}%–{:.1}% (mean {:.1}%; every layer in --json)",
            p.slots,
            lo * 100.0,
            hi * 100.0,
            p.hit_ratio * 100.0
        );
    }
    let _ = writeln!(s, "assumptions");
    for a in &f.assumptions {
        let _ = writeln!(s, "  - {a}");
    }
    for src in &f.machine.sources {
        let _ = writeln!(s, "source    {src}");
    }
    s
}

/// The routing to replay for `a`'s `--trace` or `--profile` (checked against the model as
/// `spark plan` checks them), else the uniform prior.
pub fn routing_for(a: &PlanArgs, m: &ModelFacts) -> Result<(Routing, HitSource), PlanError> {
    let err = |path: &std::path::Path, message: String| PlanError::Routing {
        path: path.to_path_buf(),
        message,
    };
    let shape = |path: &std::path::Path, l: usize, e: usize| {
        if l != m.n_layer as usize || e != m.n_expert as usize {
            return Err(err(
                path,
                format!(
                    "it has {l} layers × {e} experts, the model {} × {}",
                    m.n_layer, m.n_expert
                ),
            ));
        }
        Ok(())
    };
    if let Some(path) = &a.trace {
        let t = crate::trace::Trace::read(path, None).map_err(|e| err(path, e.to_string()))?;
        if let Some(fp) = &t.fingerprint {
            if fp != &m.fingerprint {
                return Err(err(
                    path,
                    format!(
                        "the trace was recorded on model {fp}, not {}",
                        m.fingerprint
                    ),
                ));
            }
        }
        shape(path, t.n_layer as usize, t.n_expert as usize)?;
        if t.decode.steps() < 4 {
            return Err(err(
                path,
                format!(
                    "it holds {} decode tokens; a hit ratio needs at least 4",
                    t.decode.steps()
                ),
            ));
        }
        let steps = t.decode.steps();
        return Ok((
            t.decode,
            HitSource::Trace {
                path: path.display().to_string(),
                steps,
            },
        ));
    }
    let layers_with_experts = |w: &dyn Fn(usize) -> Vec<f64>| -> Vec<Vec<f64>> {
        let mut v = vec![Vec::new(); m.n_layer as usize];
        for (l, _) in &m.expert_layers {
            if let Some(slot) = v.get_mut(*l as usize) {
                *slot = w(*l as usize);
            }
        }
        v
    };
    let (n, k) = (m.n_expert as usize, m.n_expert_used as usize);
    if let Some(path) = &a.profile {
        let p = crate::profile::Profile::read(path).map_err(|e| err(path, e.to_string()))?;
        p.check_fresh(&m.fingerprint, path)
            .map_err(|e| err(path, e.to_string()))?;
        shape(path, p.counts.n_layer, p.counts.n_expert)?;
        let w = layers_with_experts(&|l| p.counts.layer(l).iter().map(|&c| c as f64).collect());
        return Ok((
            synthesize(&w, n, k, SYNTH_STEPS, 0x5eed),
            HitSource::Profile {
                path: path.display().to_string(),
                steps: SYNTH_STEPS,
            },
        ));
    }
    if let Some(z) = a.zipf.filter(|z| *z > 0.0) {
        if !z.is_finite() || z > 8.0 {
            return Err(PlanError::Usage(format!(
                "parse --zipf {z}: give an exponent between 0 and 8"
            )));
        }
        let w = layers_with_experts(&|l| zipf_weights(n, z, 0x21f + l as u64));
        return Ok((
            synthesize(&w, n, k, SYNTH_STEPS, 0x5eed),
            HitSource::ZipfPrior {
                s: z,
                steps: SYNTH_STEPS,
            },
        ));
    }
    let w = layers_with_experts(&|_| vec![1.0; n]);
    Ok((
        synthesize(&w, n, k, SYNTH_STEPS, 0x5eed),
        HitSource::UniformPrior { steps: SYNTH_STEPS },
    ))
}

/// The decision `spark serve --residency` acts on: the same forecast as `spark plan
/// --residency`, with hit ratios drawn from the profile's counts (`counts[layer][expert]`, when
/// serve loaded a fresh one) or the uniform prior.
pub fn decide(
    m: &ModelFacts,
    s: &MemorySettings,
    mach: &Machine,
    counts: Option<&crate::cache::Counts>,
    ram_total_bytes: u64,
) -> Result<ResidencyForecast, String> {
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
            path: "the loaded profile".into(),
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
    /// Slots per host layer when `run` is `residency`.
    pub slots: Option<u32>,
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

/// serve's residency decision: the forecast `spark plan --residency` shows, for `file` at
/// `budget_mib` and `ctx`, from `counts` (a fresh profile) or the uniform prior. `None` when the
/// GPU's bandwidths are not known (serve then runs the slots it was asked for and says so).
pub fn serve_decision(
    file: &crate::gguf::GgufFile,
    geometry: &crate::gguf::MoeGeometry,
    budget_mib: u64,
    ctx: u64,
    gpu: &ServeGpu,
    counts: Option<&crate::cache::Counts>,
) -> Result<Option<ServeDecision>, String> {
    let card = match gpu.card.as_deref() {
        Some(c) => Some(super::presets::find(c).ok_or_else(|| {
            format!(
                "parse --gpu {c}: not a known card ({})",
                super::presets::keys()
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
    let m = ModelFacts::of(file, geometry.clone());
    let hw = super::hardware::gather(&super::hardware::HardwareOverrides::default())
        .map_err(|e| e.to_string())?;
    let threads = std::thread::available_parallelism()
        .map(|n| n.get() as u32)
        .unwrap_or(1);
    let s = MemorySettings {
        ctx,
        k_type: crate::gguf::GgmlType::F16,
        v_type: crate::gguf::GgmlType::F16,
        ubatch: 512,
        reserve_bytes: 0,
    };
    let mach = Machine {
        vram_budget_bytes: budget_mib.saturating_mul(MIB),
        vram_gbps: vram,
        h2d_gbps: h2d,
        host_gbps: hw.host_gbps_at(threads),
        host_gflops: hw.host_gflops_at(threads),
        handoff_us: HANDOFF_US_PRIOR,
        copy_call_us: COPY_CALL_US_PRIOR,
        sources: Vec::new(),
    };
    let f = decide(&m, &s, &mach, counts, hw.ram_total_bytes)?;
    let (run, slots) = match f.verdict {
        Verdict::Residency { slots, .. } if slots > 0 => ("residency", Some(slots)),
        _ => ("stock", None),
    };
    Ok(Some(ServeDecision {
        run: run.into(),
        slots,
        reason: f.reason.clone(),
        source: Some(f.source.describe()),
        stock_tps: Some(f.stock.tps),
        spark_tps: f.spark.as_ref().map(|x| x.tps),
        break_even_link_gbps: f.break_even_link_gbps,
    }))
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
mod tests {
    use super::*;

    fn bytes(n: usize, tb: &[u64], used: &[u16], hits: &[u16], loads: &[u16]) -> StepBytes {
        step_bytes(n, tb, used, |e| hits.contains(&e), |e| loads.contains(&e))
    }

    #[test]
    fn runs_of_misses_are_one_copy_with_padding_after_the_run() {
        // 16 experts of 300 bytes, one tensor: misses 2, 3, 4 are one run (3 × 300 + 300 pad),
        // 9 a second (300 + 300); all four loaded.
        let b = bytes(16, &[300], &[2, 3, 4, 9], &[], &[2, 3, 4, 9]);
        assert_eq!(b.link_bytes, 900 + 300 + 600);
        assert_eq!((b.host_copies, b.device_copies), (2, 4));
        assert_eq!(b.device_copy_bytes, 4 * 600);
        // A hit in the middle splits the run: [2] [4], and 3 comes from its slot.
        let b = bytes(16, &[300], &[2, 3, 4], &[3], &[2, 4]);
        assert_eq!(b.link_bytes, 600 + 600);
        assert_eq!((b.hits, b.host_copies, b.device_copies), (1, 2, 3));
        // The last expert has no padding after it; padding is capped at 512 bytes.
        let b = bytes(16, &[700], &[14, 15], &[], &[]);
        assert_eq!(b.link_bytes, 1400);
        let b = bytes(16, &[700], &[13], &[], &[]);
        assert_eq!(b.link_bytes, 700 + 512);
        // Several tensors add up, each with its own padding.
        let b = bytes(8, &[300, 700], &[1], &[], &[]);
        assert_eq!(b.link_bytes, 600 + 1212);
        assert_eq!(b.host_copies, 2);
    }

    #[test]
    fn replay_matches_the_stock_copy_without_slots_and_streams_less_with_them() {
        // Zero slots: every step moves what stock copies.
        let mut r = Routing::new(1);
        let steps: [&[u16]; 3] = [&[0, 1], &[5, 7], &[0, 1]];
        for (i, ids) in steps.iter().enumerate() {
            r.push_step(0, i as u32, [(*ids, &[][..])]);
        }
        let tb = vec![vec![100u64]];
        let none = replay(&r, 8, 2, &tb, 0, 0)[0];
        // [0, 1]: one run plus padding; [5] plus padding, [7] is the last expert: no padding.
        assert_eq!(
            none.link_bytes,
            (200 + 100) + ((100 + 100) + 100) + (200 + 100)
        );
        assert_eq!(none.hits, 0);
        // Four slots: the third step hits 0 and 1.
        let four = replay(&r, 8, 2, &tb, 4, 0)[0];
        assert_eq!(four.hits, 2);
        assert_eq!(four.link_bytes, none.link_bytes - 300);
        // Warm-up steps are not counted.
        let warm = replay(&r, 8, 2, &tb, 4, 2)[0];
        assert_eq!((warm.lookups, warm.hits, warm.link_bytes), (2, 2, 0));
    }

    #[test]
    fn synthesized_routing_follows_the_weights() {
        let w = vec![vec![1000.0, 1.0, 1.0, 1.0, 0.0, 0.0], Vec::new()];
        let r = synthesize(&w, 6, 2, 200, 7);
        assert_eq!(r.steps(), 200);
        let mut zero = 0;
        for s in 0..r.steps() {
            let ids = r.ids(s, 0);
            assert_eq!(ids.len(), 2);
            assert!(ids[0] != ids[1]);
            assert!(
                ids.iter().all(|&e| e < 4),
                "zero-weight experts never drawn"
            );
            zero += ids.contains(&0) as usize;
            assert!(r.ids(s, 1).is_empty());
        }
        assert!(
            zero > 190,
            "the heavy expert is nearly always drawn: {zero}"
        );
        // The same seed draws the same tokens.
        assert_eq!(r, synthesize(&w, 6, 2, 200, 7));
    }

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

    fn machine(h2d: f64) -> Machine {
        Machine {
            vram_budget_bytes: 5 * MIB,
            vram_gbps: 300.0,
            h2d_gbps: h2d,
            host_gbps: 10.0,
            host_gflops: 50.0,
            handoff_us: HANDOFF_US_PRIOR,
            copy_call_us: COPY_CALL_US_PRIOR,
            sources: Vec::new(),
        }
    }

    #[test]
    fn serve_decides_residency_where_it_pays_and_stock_where_it_does_not() {
        let dir = tempfile::tempdir().unwrap();
        let m = facts(dir.path());
        let s = MemorySettings {
            ctx: 256,
            k_type: crate::gguf::GgmlType::F16,
            v_type: crate::gguf::GgmlType::F16,
            ubatch: 512,
            reserve_bytes: 0,
        };
        // Routing concentrated on two experts per layer: after the warm-up every use hits.
        let mut hot = crate::cache::Counts::zero(4, 32);
        for l in 0..4 {
            hot.set(l, 3, 1000);
            hot.set(l, 17, 1000);
        }
        let f = decide(&m, &s, &machine(25.0), Some(&hot), u64::MAX).unwrap();
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
}
