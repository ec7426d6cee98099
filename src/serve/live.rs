//! Live routing statistics of `spark serve`, fed from the tap's ring: per-(layer, expert)
//! counts kept apart for prompt processing and decode (cumulative and decayed), the shadow
//! cache (spark's policy over the real decode routing, as if the planned slots existed) with
//! its hit ratio and the Belady bound over a recent window, and the profile rewrite after
//! every completed request that routed something new.
//!
//! Runs on one thread that owns the ring of the current llama-server child; the keeper hands
//! it a new ring after every restart. Never blocks the engine (the ring overruns and counts),
//! never writes a profile for another model (the fingerprint is checked at start).
//!
//! Why this file is over 800 lines: about 440 of them are tests of the fold; the code itself
//! (ring → counts, shadow cache, Belady window, plans, profile rewrite) is one thread's loop.

use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use spark_proto::control::{LayerCounters, ResidencyLayers, ResidencyStats, WantPlan};
use spark_proto::trace::RoutingRecord;

use crate::cache::{self, Belady, Counts, Policy, PolicyKind, Setup};
use crate::profile::Profile;
use crate::ring::ShmRing;
use crate::trace::Routing;

/// Decode tokens between plan updates while a request runs.
const PLAN_EVERY: u64 = 64;
/// Deadline of each plan line and counter read on the control channel.
const PLAN_TIMEOUT: Duration = Duration::from_secs(2);

/// Messages to the live thread. (A few per request: the size of `Ring` costs nothing.)
#[allow(clippy::large_enum_variant)]
pub enum LiveMsg {
    /// A new child started with this ring and control channel; the previous ones are drained
    /// and dropped (which frees the old ring once the old child is gone too).
    Ring(ShmRing, crate::control::ControlClient),
    /// A request's answer reached its client whole: fold everything, rewrite the profile if
    /// the routing changed since the last write.
    Completed,
    /// Fold what is left, write the profile once more if the routing changed, end.
    Stop,
}

/// What the live thread is configured with.
#[derive(Debug, Clone)]
pub struct LiveConfig {
    pub n_layer: usize,
    pub n_expert: usize,
    pub k: usize,
    /// Slots per MoE layer of the shadow cache (and of the provider's, with `--residency`).
    pub slots: u32,
    /// Slots of each model layer instead, when serve runs the planner's per-layer split: the
    /// provider's counts (0 in a layer the split gives none), which the shadow cache follows.
    pub layer_slots: Option<Vec<u32>>,
    /// `--residency`: the tap's provider caches experts in VRAM; the live thread sends it the
    /// policy's plan (pinned hot set from the profile + the shadow cache's resident tail) and
    /// reads its counters back.
    pub residency: bool,
    pub policy: PolicyKind,
    /// Decode steps kept for the Belady bound.
    pub window: usize,
    /// Half-life of the decayed decode counts, in decode tokens.
    pub half_life: f64,
    /// Where to rewrite the profile, and the model fingerprint to stamp; `None` without
    /// `--spark`.
    pub profile_path: Option<PathBuf>,
    pub fingerprint: String,
    /// A fresh profile loaded at start: its counts seed the tables and the policy's prior.
    pub start_profile: Option<Profile>,
}

impl LiveConfig {
    /// Slots of model layer `layer`.
    pub fn slots_of(&self, layer: usize) -> u32 {
        match &self.layer_slots {
            Some(v) => v.get(layer).copied().unwrap_or(0),
            None => self.slots,
        }
    }

    /// Slots of every model layer.
    pub fn slots_per_layer(&self) -> Vec<u32> {
        (0..self.n_layer).map(|l| self.slots_of(l)).collect()
    }

    /// `/spark/status`'s `slots_per_layer`: the one count when every layer has it (as before),
    /// else the count of each model layer, indexed by layer.
    fn slots_json(&self) -> Value {
        match &self.layer_slots {
            Some(_) => json!(self.slots_per_layer()),
            None => json!(self.slots),
        }
    }
}

/// The numbers `/spark/status` shows, updated by the live thread.
#[derive(Debug, Clone)]
pub struct LiveSnapshot {
    pub prompt: Counts,
    pub decode: Counts,
    /// Decayed decode counts, valid at `decode_tokens`.
    pub decayed: Vec<f64>,
    pub decode_tokens: u64,
    pub prompt_records: u64,
    pub decode_records: u64,
    pub bad_records: u64,
    pub ring_read: u64,
    pub ring_dropped: u64,
    pub rings: u64,
    pub shadow_accesses: u64,
    pub shadow_misses: u64,
    pub window_steps: usize,
    pub window_accesses: u64,
    pub window_misses: u64,
    pub window_belady_misses: u64,
    pub profile_writes: u64,
    pub profile_last_write_us: Option<u64>,
    pub profile_error: Option<String>,
    pub base_tokens: u64,
    /// The provider's counters, read after every plan update (`--residency`): the current
    /// child's, which start from zero with each child.
    pub residency: Option<ResidencyStats>,
    /// The counters of the children before the current one, added up (restarts keep totals).
    pub residency_earlier: ResidencyStats,
    /// Why the provider stopped taking plans, if it did.
    pub residency_error: Option<String>,
    pub residency_plans_sent: u64,
    /// The provider's counters per layer, read with `residency` (same deadline): the current
    /// child's, `None` before its first read or from a tap without per-layer counters.
    pub residency_layers: Option<ResidencyLayers>,
    /// The per-layer counters of the children before the current one, added up (one entry per
    /// model layer, then one for layers past the tap's table).
    pub residency_layers_earlier: Vec<LayerCounters>,
    /// Per-layer reads that failed (a reply that did not add up, a timeout, ...), and why the
    /// last one did.
    pub residency_layer_errors: u64,
    pub residency_layers_error: Option<String>,
    /// `--residency`'s decision on the routing seen so far (`redecide.rs`), and why the last
    /// try failed, if it did.
    pub decision_now: Option<super::redecide::DecisionNow>,
    pub decision_now_error: Option<String>,
}

/// Shared view of the live statistics.
pub type LiveShared = Arc<Mutex<LiveSnapshot>>;

fn ratio(num: u64, den: u64) -> Value {
    if den == 0 {
        Value::Null
    } else {
        json!(num as f64 / den as f64)
    }
}

/// `a` plus the counters of `b` (the gauges — slots, layers, planned — are `b`'s).
fn add_counters(a: &ResidencyStats, b: &ResidencyStats) -> ResidencyStats {
    ResidencyStats {
        slots: b.slots,
        layers: b.layers,
        planned: b.planned,
        calls: a.calls.saturating_add(b.calls),
        declined: a.declined.saturating_add(b.declined),
        hits: a.hits.saturating_add(b.hits),
        loads: a.loads.saturating_add(b.loads),
        streamed: a.streamed.saturating_add(b.streamed),
        evictions: a.evictions.saturating_add(b.evictions),
        bytes_hit: a.bytes_hit.saturating_add(b.bytes_hit),
        bytes_host: a.bytes_host.saturating_add(b.bytes_host),
        copies_host: a.copies_host.saturating_add(b.copies_host),
        copies_device: a.copies_device.saturating_add(b.copies_device),
        wide_calls: a.wide_calls.saturating_add(b.wide_calls),
        wide_hits: a.wide_hits.saturating_add(b.wide_hits),
        wide_loads: a.wide_loads.saturating_add(b.wide_loads),
        wide_streamed: a.wide_streamed.saturating_add(b.wide_streamed),
        copies_host_unbatched: a
            .copies_host_unbatched
            .saturating_add(b.copies_host_unbatched),
        provider_us: a.provider_us.saturating_add(b.provider_us),
    }
}

impl LiveSnapshot {
    /// The provider's counters since serve started, every child's added up (`None` before the
    /// first child reported any).
    pub fn residency_totals(&self) -> Option<ResidencyStats> {
        match self.residency {
            Some(r) => Some(add_counters(&self.residency_earlier, &r)),
            // Between a restart and the new child's first report, the totals stand.
            None if self.residency_earlier != ResidencyStats::default() => {
                Some(self.residency_earlier)
            }
            None => None,
        }
    }

    /// The provider's counters per layer since serve started, every child's added up: each
    /// layer with a non-zero counter, ascending, and the layers past the tap's table (`None`
    /// before any per-layer read).
    pub fn residency_layer_totals(&self) -> Option<(Vec<(u32, LayerCounters)>, LayerCounters)> {
        let mut all = self.residency_layers_earlier.clone();
        let mut other = all.pop()?;
        let current = self.residency_layers.as_ref();
        if current.is_none() && all.iter().all(LayerCounters::is_zero) && other.is_zero() {
            return None;
        }
        if let Some(c) = current {
            other = other.saturating_add(&c.other);
            for &(l, v) in &c.layers {
                // The reader checked every layer against the model's layer count.
                if let Some(a) = all.get_mut(l as usize) {
                    *a = a.saturating_add(&v);
                }
            }
        }
        let layers = all
            .into_iter()
            .enumerate()
            .filter(|(_, c)| !c.is_zero())
            .map(|(l, c)| (l as u32, c))
            .collect();
        Some((layers, other))
    }

    /// A new child starts its counters from zero: what the last one counted joins the totals.
    fn child_replaced(&mut self) {
        if let Some(r) = self.residency.take() {
            self.residency_earlier = add_counters(&self.residency_earlier, &r);
        }
        if let Some(c) = self.residency_layers.take() {
            let n = self.residency_layers_earlier.len();
            for (l, v) in c.layers.iter().map(|&(l, v)| (l as usize, v)) {
                if let Some(a) = self.residency_layers_earlier[..n - 1].get_mut(l) {
                    *a = a.saturating_add(&v);
                }
            }
            self.residency_layers_earlier[n - 1] =
                self.residency_layers_earlier[n - 1].saturating_add(&c.other);
        }
    }

    fn new(cfg: &LiveConfig) -> LiveSnapshot {
        let zero = Counts::zero(cfg.n_layer, cfg.n_expert);
        LiveSnapshot {
            prompt: zero.clone(),
            decode: zero,
            decayed: vec![0.0; cfg.n_layer * cfg.n_expert],
            decode_tokens: 0,
            prompt_records: 0,
            decode_records: 0,
            bad_records: 0,
            ring_read: 0,
            ring_dropped: 0,
            rings: 0,
            shadow_accesses: 0,
            shadow_misses: 0,
            window_steps: 0,
            window_accesses: 0,
            window_misses: 0,
            window_belady_misses: 0,
            profile_writes: 0,
            profile_last_write_us: None,
            profile_error: None,
            residency: None,
            residency_earlier: ResidencyStats::default(),
            residency_error: None,
            residency_plans_sent: 0,
            residency_layers: None,
            residency_layers_earlier: vec![LayerCounters::default(); cfg.n_layer + 1],
            residency_layer_errors: 0,
            residency_layers_error: None,
            decision_now: None,
            decision_now_error: None,
            base_tokens: cfg
                .start_profile
                .as_ref()
                .and_then(|p| p.tokens)
                .unwrap_or(0),
        }
    }

    /// The `routing` block of `/spark/status`.
    pub fn to_json(&self, cfg: &LiveConfig) -> Value {
        let top = |c: &Counts| -> Vec<Vec<u16>> {
            (0..c.n_layer)
                .map(|l| c.ranked(l).into_iter().take(cfg.k.max(1)).collect())
                .collect()
        };
        json!({
            "prompt": {"records": self.prompt_records, "expert_uses": self.prompt.total(), "top_per_layer": top(&self.prompt)},
            "decode": {"records": self.decode_records, "tokens": self.decode_tokens, "expert_uses": self.decode.total(), "top_per_layer": top(&self.decode), "half_life_tokens": cfg.half_life},
            "ring": {"read": self.ring_read, "dropped": self.ring_dropped, "rings": self.rings, "bad_records": self.bad_records},
            "shadow_cache": {
                "policy": cfg.policy.name(),
                "slots_per_layer": cfg.slots_json(),
                "accesses": self.shadow_accesses,
                "misses": self.shadow_misses,
                "hit_ratio": ratio(self.shadow_accesses - self.shadow_misses, self.shadow_accesses),
                "window": {
                    "steps": self.window_steps,
                    "accesses": self.window_accesses,
                    "misses": self.window_misses,
                    "belady_misses": self.window_belady_misses,
                    "hit_ratio": ratio(self.window_accesses - self.window_misses, self.window_accesses),
                    "belady_hit_ratio": ratio(self.window_accesses.saturating_sub(self.window_belady_misses), self.window_accesses),
                },
            },
            "residency_decision_now": match (&self.decision_now, &self.decision_now_error) {
                (_, Some(e)) => json!({"error": e}),
                (Some(d), None) => json!(d),
                (None, None) => Value::Null,
            },
            "residency": if cfg.residency {
                let r = self.residency.unwrap_or_default();
                let t = self.residency_totals().unwrap_or_default();
                json!({
                    "totals": {
                        "hook_calls": t.calls,
                        "declined": t.declined,
                        "hits": t.hits,
                        "loads": t.loads,
                        "streamed": t.streamed,
                        "evictions": t.evictions,
                        "bytes_from_slots": t.bytes_hit,
                        "bytes_from_host": t.bytes_host,
                        "hit_ratio": t.hit_ratio(),
                        "decode_hit_ratio": t.decode_hit_ratio(),
                        "copies_host": t.copies_host,
                        "copies_device": t.copies_device,
                        "prompt_batches": t.wide_calls,
                        "prompt_streamed": t.wide_streamed,
                    },
                    // The configured counts: the provider's `slots` counter is the largest one.
                    "slots_per_layer": if cfg.layer_slots.is_some() { cfg.slots_json() } else { json!(r.slots) },
                    "layers_with_slots": r.layers,
                    "layers_planned": r.planned,
                    "plans_sent": self.residency_plans_sent,
                    "hook_calls": r.calls,
                    "declined": r.declined,
                    "hits": r.hits,
                    "loads": r.loads,
                    "streamed": r.streamed,
                    "evictions": r.evictions,
                    "bytes_from_slots": r.bytes_hit,
                    "bytes_from_host": r.bytes_host,
                    "hit_ratio": r.hit_ratio(),
                    "decode_hit_ratio": r.decode_hit_ratio(),
                    "copies_host": r.copies_host,
                    "copies_device": r.copies_device,
                    "prompt_batches": r.wide_calls,
                    "prompt_streamed": r.wide_streamed,
                    "error": self.residency_error,
                    "layers": self.residency_layers_json(),
                    "layer_read_errors": self.residency_layer_errors,
                    "layers_error": self.residency_layers_error,
                })
            } else {
                Value::Null
            },
        })
    }
}

impl LiveSnapshot {
    /// Every layer's counters since serve started (every child's): `[{layer, hits, loads,
    /// streamed, evictions, bytes_from_slots, bytes_from_host, hit_ratio}]`, with the layers
    /// past the tap's table as `layer: null` when they counted anything; `null` before the
    /// first per-layer read.
    pub fn residency_layers_json(&self) -> Value {
        let Some((layers, other)) = self.residency_layer_totals() else {
            return Value::Null;
        };
        let row = |l: Option<u32>, c: &LayerCounters| {
            json!({
                "layer": l,
                "hits": c.hits,
                "loads": c.loads,
                "streamed": c.streamed,
                "evictions": c.evictions,
                "bytes_from_slots": c.bytes_hit,
                "bytes_from_host": c.bytes_host,
                "hit_ratio": c.hit_ratio(),
            })
        };
        let mut rows: Vec<Value> = layers.iter().map(|(l, c)| row(Some(*l), c)).collect();
        if !other.is_zero() {
            rows.push(row(None, &other));
        }
        Value::Array(rows)
    }
}

/// Decode routing being assembled into whole steps (one token, every layer), keyed by
/// (request, token position) so interleaved sequences of parallel slots stay apart.
struct Assembler {
    n_layer: usize,
    open: HashMap<(u32, u32), Partial>,
}

/// A token's routing being assembled: its layers' ids so far, and how many layers arrived.
type Partial = (Vec<Vec<u16>>, u32);

impl Assembler {
    /// Adds one record; returns the step's layers when its last layer arrived.
    fn add(&mut self, r: &RoutingRecord, ids: &[u16], misses: u32) -> Option<(Vec<Vec<u16>>, u32)> {
        let key = (r.request, r.token);
        let entry = self
            .open
            .entry(key)
            .or_insert_with(|| (vec![Vec::new(); self.n_layer], 0));
        entry.0[usize::from(r.layer)] = ids.to_vec();
        entry.1 += misses;
        if usize::from(r.layer) + 1 == self.n_layer {
            return self.open.remove(&key);
        }
        if self.open.len() > 4096 {
            // Steps whose last layer never came (a child that died mid-step): forget them.
            self.open.clear();
        }
        None
    }
}

/// The live thread's state.
pub struct Live {
    cfg: LiveConfig,
    shared: LiveShared,
    policy: Box<dyn Policy + Send>,
    ring: Option<ShmRing>,
    /// Kept open so the tap keeps its session; closing it would end the tap's control thread.
    control: Option<crate::control::ControlClient>,
    buf: Vec<RoutingRecord>,
    assembler: Assembler,
    /// Recent decode steps and the shadow's misses on each.
    window: VecDeque<(Vec<Vec<u16>>, u32)>,
    decayed_at: Vec<u64>,
    /// The plan last sent to the current child, per layer (`--residency`).
    sent: Vec<Option<WantPlan>>,
    /// Decode tokens at the last plan update.
    planned_at: u64,
    /// Routing records folded when the profile was last written (or at start); `None` until a
    /// first write when the start profile needs its fingerprint stamped.
    written_at: Option<u64>,
    /// The counts (prompt and decode, the start profile's included) and tokens this process had
    /// when it last wrote the profile: each write adds only what came since, to what the file
    /// holds then (another writer's counts included).
    written_counts: Counts,
    written_tokens: u64,
    /// Makes `--residency`'s decision again on the live counts (serve with GPU facts).
    redecider: Option<super::redecide::Redecider>,
}

impl Live {
    pub fn new(cfg: LiveConfig) -> (Live, LiveShared) {
        let mut snap = LiveSnapshot::new(&cfg);
        if let Some(p) = &cfg.start_profile {
            // A profile does not say which counts were prefill: they continue the decode table,
            // the one the shadow cache follows.
            snap.decode = p.counts.clone();
        }
        let shared = Arc::new(Mutex::new(snap));
        let zero = Counts::zero(cfg.n_layer, cfg.n_expert);
        let prior = cfg.start_profile.as_ref().map(|p| &p.counts);
        let slots = cfg.slots_per_layer();
        let setup = Setup {
            n_expert: cfg.n_expert,
            k: cfg.k,
            slots: slots.clone(),
            counts: prior.unwrap_or(&zero),
            prior,
            calibration: None,
        };
        let policy = online_send(cfg.policy, &setup);
        let snap_start = {
            let s = shared.lock().unwrap_or_else(|e| e.into_inner());
            (s.decode.clone(), s.base_tokens)
        };
        let cfg_profile_unstamped = cfg
            .start_profile
            .as_ref()
            .is_some_and(|p| p.fingerprint.is_none());
        let live = Live {
            assembler: Assembler {
                n_layer: cfg.n_layer,
                open: HashMap::new(),
            },
            decayed_at: vec![0; cfg.n_layer * cfg.n_expert],
            cfg,
            shared: shared.clone(),
            policy,
            ring: None,
            control: None,
            buf: Vec::with_capacity(1 << 14),
            window: VecDeque::new(),
            sent: Vec::new(),
            planned_at: 0,
            written_at: match cfg_profile_unstamped {
                true => None,
                false => Some(0),
            },
            written_counts: snap_start.0,
            written_tokens: snap_start.1,
            redecider: None,
        };
        (live, shared)
    }

    /// Makes `--residency`'s decision again on the live counts after completed requests.
    pub fn with_redecider(mut self, r: super::redecide::Redecider) -> Live {
        self.redecider = Some(r);
        self
    }

    /// Runs until [`LiveMsg::Stop`] or until every sender is gone.
    pub fn run(mut self, rx: Receiver<LiveMsg>) {
        loop {
            match rx.recv_timeout(Duration::from_millis(5)) {
                Ok(LiveMsg::Ring(r, control)) => {
                    self.drain();
                    self.ring = Some(r);
                    self.control = Some(control);
                    {
                        let mut s = self.lock();
                        s.rings += 1;
                        s.child_replaced();
                    }
                    // A new child has an empty plan.
                    self.sent = vec![None; self.cfg.n_layer];
                    self.publish_plan();
                }
                Ok(LiveMsg::Completed) => {
                    self.drain();
                    self.publish_plan();
                    self.update_window();
                    self.write_profile();
                    self.redecide();
                }
                Ok(LiveMsg::Stop) | Err(RecvTimeoutError::Disconnected) => {
                    self.drain();
                    self.update_window();
                    self.write_profile();
                    return;
                }
                Err(RecvTimeoutError::Timeout) => {
                    self.drain();
                    let now = self.lock().decode_tokens;
                    if now >= self.planned_at + PLAN_EVERY {
                        self.publish_plan();
                    }
                }
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, LiveSnapshot> {
        self.shared.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Folds every record waiting in the ring.
    pub fn drain(&mut self) {
        let Some(mut ring) = self.ring.take() else {
            return;
        };
        let mut buf = std::mem::take(&mut self.buf);
        loop {
            buf.clear();
            if ring.drain_into(&mut buf, 1 << 14) == 0 {
                break;
            }
            self.fold(&buf);
        }
        self.buf = buf;
        let (read, dropped) = (ring.read_count(), ring.dropped());
        self.ring = Some(ring);
        let mut s = self.lock();
        s.ring_read = read;
        s.ring_dropped = dropped;
    }

    /// Folds records into the tables and the shadow cache.
    pub fn fold(&mut self, records: &[RoutingRecord]) {
        let (n_layer, n_expert) = (self.cfg.n_layer, self.cfg.n_expert);
        let decay = std::f64::consts::LN_2 / self.cfg.half_life.max(1.0);
        let mut shared = self.shared.lock().unwrap_or_else(|e| e.into_inner());
        let s = &mut *shared;
        for r in records {
            let n = usize::from(r.n_used).min(r.ids.len());
            let ids = &r.ids[..n];
            let layer = usize::from(r.layer);
            if layer >= n_layer || ids.iter().any(|&e| usize::from(e) >= n_expert) {
                s.bad_records += 1;
                continue;
            }
            if r.phase == 0 {
                s.prompt_records += 1;
                for &e in ids {
                    s.prompt.bump(layer, usize::from(e));
                }
                continue;
            }
            s.decode_records += 1;
            if layer == 0 {
                s.decode_tokens += 1;
            }
            let now = s.decode_tokens;
            for &e in ids {
                let i = layer * n_expert + usize::from(e);
                s.decode.bump(layer, usize::from(e));
                let age = now.saturating_sub(self.decayed_at[i]) as f64;
                s.decayed[i] = s.decayed[i] * (-decay * age).exp() + 1.0;
                self.decayed_at[i] = now;
            }
            let misses = self.policy.access(layer, ids);
            s.shadow_accesses += n as u64;
            s.shadow_misses += u64::from(misses);
            if let Some(step) = self.assembler.add(r, ids, misses) {
                self.window.push_back(step);
                if self.window.len() > self.cfg.window {
                    self.window.pop_front();
                }
            }
        }
    }

    /// The plan of one layer: the profile's hottest experts pinned (half the slots, when a
    /// profile was loaded), then the shadow cache's other resident experts as the tail.
    pub fn plan_of(&self, layer: usize) -> WantPlan {
        let slots = self.cfg.slots_of(layer) as usize;
        let pinned: Vec<u32> = match &self.cfg.start_profile {
            Some(p) => p
                .counts
                .ranked(layer)
                .into_iter()
                .filter(|&e| p.counts.get(layer, usize::from(e)) > 0)
                .take(slots / 2)
                .map(u32::from)
                .collect(),
            None => Vec::new(),
        };
        let mut tail: Vec<u32> = (0..self.cfg.n_expert as u32)
            .filter(|&e| self.policy.is_resident(layer, e as u16) && !pinned.contains(&e))
            .collect();
        if tail.len() > slots - pinned.len() {
            // More resident than the slots left (pinned experts the shadow does not hold):
            // keep the hottest by decayed decode counts.
            let n = self.cfg.n_expert;
            let decay = std::f64::consts::LN_2 / self.cfg.half_life.max(1.0);
            let s = self.lock();
            let heat = |e: &u32| {
                let i = layer * n + *e as usize;
                let age = s.decode_tokens.saturating_sub(self.decayed_at[i]) as f64;
                s.decayed[i] * (-decay * age).exp()
            };
            tail.sort_by(|a, b| heat(b).total_cmp(&heat(a)));
            tail.truncate(slots - pinned.len());
        }
        WantPlan {
            layer: layer as u32,
            pinned,
            tail,
        }
    }

    /// Sends every layer whose plan changed to the provider, then reads its counters back.
    /// A provider that refuses a plan (or a channel that fails) stops the updates for this
    /// child; serving goes on, and `/spark/status` says why.
    fn publish_plan(&mut self) {
        if !self.cfg.residency || self.control.is_none() {
            return;
        }
        let now = self.lock().decode_tokens;
        self.planned_at = now;
        let mut sent = 0u64;
        let mut error = None;
        for layer in 0..self.cfg.n_layer {
            let plan = self.plan_of(layer);
            if self.sent[layer].as_ref() == Some(&plan) {
                continue;
            }
            let control = self.control.as_mut().expect("checked above");
            match control.want(&plan, PLAN_TIMEOUT) {
                Ok(()) => {
                    sent += 1;
                    self.sent[layer] = Some(plan);
                }
                Err(e) => {
                    error = Some(format!("plan for layer {layer}: {e}"));
                    break;
                }
            }
        }
        // The totals, then the same counters per layer, within one deadline.
        let started = Instant::now();
        let counters = match &error {
            None => self.control.as_mut().map(|c| c.residency(PLAN_TIMEOUT)),
            Some(_) => None,
        };
        let n_layer = self.cfg.n_layer as u32;
        let layers = match &counters {
            Some(Ok(_)) => self.control.as_mut().map(|c| {
                c.residency_layers(n_layer, PLAN_TIMEOUT.saturating_sub(started.elapsed()))
            }),
            _ => None,
        };
        let mut s = self.lock();
        s.residency_plans_sent += sent;
        match counters {
            Some(Ok(r)) => s.residency = Some(r),
            Some(Err(e)) => error = Some(format!("residency counters: {e}")),
            None => {}
        }
        match layers {
            Some(Ok(Some(l))) => s.residency_layers = Some(l),
            // A tap without per-layer counters: the totals stand alone.
            Some(Ok(None)) | None => {}
            Some(Err(e)) => {
                // Counted and shown; the previous read stays. Never a reason to stop serving.
                let e = format!("residency counters per layer: {e}");
                if s.residency_layers_error.as_deref() != Some(e.as_str()) {
                    tracing::warn!("residency: {e}");
                }
                s.residency_layer_errors += 1;
                s.residency_layers_error = Some(e);
            }
        }
        if let Some(e) = error {
            if s.residency_error.as_deref() != Some(e.as_str()) {
                tracing::warn!("residency: {e}");
            }
            s.residency_error = Some(e);
        }
    }

    /// Recomputes the Belady bound over the recent window (cheap: a few thousand steps).
    fn update_window(&mut self) {
        if self.window.is_empty() {
            return;
        }
        let mut routing = Routing::new(self.cfg.n_layer);
        let mut accesses = 0u64;
        let mut misses = 0u64;
        for (i, (layers, m)) in self.window.iter().enumerate() {
            routing.push_step(
                0,
                i as u32,
                layers.iter().map(|ids| (ids.as_slice(), &[][..])),
            );
            accesses += layers.iter().map(|l| l.len() as u64).sum::<u64>();
            misses += u64::from(*m);
        }
        let slots = self.cfg.slots_per_layer();
        let mut belady = Belady::new(&routing, self.cfg.n_expert, &slots);
        let mut bmiss = 0u64;
        for s in 0..routing.steps() {
            for l in 0..self.cfg.n_layer {
                bmiss += u64::from(belady.access(l, routing.ids(s, l)));
            }
        }
        let mut s = self.lock();
        s.window_steps = self.window.len();
        s.window_accesses = accesses;
        s.window_misses = misses;
        s.window_belady_misses = bmiss;
    }

    /// Rewrites the profile with every count so far (prompt and decode), atomically, when
    /// routing records arrived since the last write (a probe or a tokenize call routes nothing
    /// and costs no fsync).
    fn write_profile(&mut self) {
        let Some(path) = self.cfg.profile_path.clone() else {
            return;
        };
        let folded = {
            let s = self.lock();
            s.prompt_records + s.decode_records
        };
        if self.written_at == Some(folded) {
            return;
        }
        let started = Instant::now();
        let (counts, tokens) = {
            let s = self.lock();
            let routed_tokens =
                (s.prompt_records + s.decode_records) / self.cfg.n_layer.max(1) as u64;
            (s.all_counts(), s.base_tokens.saturating_add(routed_tokens))
        };
        // Only what came since the last write is added, under the profile's writer lock, to
        // what the file holds now: another serve or a calibration writing the same profile
        // keeps its counts.
        let mut delta = counts.clone();
        for l in 0..delta.n_layer {
            for e in 0..delta.n_expert {
                delta.set(
                    l,
                    e,
                    counts
                        .get(l, e)
                        .saturating_sub(self.written_counts.get(l, e)),
                );
            }
        }
        let add = crate::profile::Addition {
            delta: &delta,
            delta_tokens: tokens.saturating_sub(self.written_tokens),
            whole: &counts,
            whole_tokens: tokens,
        };
        let result = crate::profile::add_to(&path, &add, self.cfg.k as u32, &self.cfg.fingerprint)
            .map(|_| ());
        if result.is_ok() {
            self.written_at = Some(folded);
            self.written_counts = counts;
            self.written_tokens = tokens;
        }
        let mut s = self.lock();
        match result {
            Ok(()) => {
                s.profile_writes += 1;
                s.profile_last_write_us = Some(started.elapsed().as_micros() as u64);
                s.profile_error = None;
            }
            Err(e) => {
                tracing::error!("failed to {e}");
                s.profile_error = Some(e.to_string());
            }
        }
    }
}

impl Live {
    /// `--residency`'s decision on every count so far (the profile's at start included, as
    /// serve's next start would read them), when one is due (`redecide.rs`).
    fn redecide(&mut self) {
        let Some(r) = self.redecider.as_mut() else {
            return;
        };
        let now = Instant::now();
        let (counts, records) = {
            let s = self.shared.lock().unwrap_or_else(|e| e.into_inner());
            let records = s.prompt_records + s.decode_records;
            if !r.is_due(records, now) {
                return;
            }
            (s.all_counts(), records)
        };
        let Some(result) = r.due(&counts, records, now) else {
            return;
        };
        let mut s = self.lock();
        match result {
            Ok(d) => {
                s.decision_now = Some(d);
                s.decision_now_error = None;
            }
            Err(e) => s.decision_now_error = Some(e),
        }
    }
}

impl LiveSnapshot {
    /// Prompt and decode counts added up (the start profile's included): what the profile
    /// holds after a rewrite.
    fn all_counts(&self) -> Counts {
        let mut c = self.decode.clone();
        for l in 0..c.n_layer {
            for e in 0..c.n_expert {
                c.set(l, e, c.get(l, e).saturating_add(self.prompt.get(l, e)));
            }
        }
        c
    }
}

/// An online policy that can move to the live thread. Belady needs the future: the shadow
/// falls back to spark's policy for it.
fn online_send(kind: PolicyKind, setup: &Setup<'_>) -> Box<dyn Policy + Send> {
    match kind {
        PolicyKind::Lru => Box::new(cache::Lru::new(setup.n_expert, &setup.slots)),
        PolicyKind::Lfu => Box::new(cache::Lfu::new(setup.n_expert, &setup.slots)),
        PolicyKind::Lfru => Box::new(cache::Lfru::new(setup.n_expert, &setup.slots)),
        PolicyKind::Static => Box::new(cache::Static::new(
            setup.n_expert,
            &setup.slots,
            setup.counts,
        )),
        PolicyKind::PinLru => Box::new(cache::PinLru::new(setup)),
        PolicyKind::Spark | PolicyKind::Belady => Box::new(cache::Spark::new(
            setup.n_expert,
            &setup.slots,
            setup.prior,
            setup.k,
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(request: u32, token: u32, layer: u16, phase: u8, ids: &[u16]) -> RoutingRecord {
        let mut r = RoutingRecord {
            request,
            token,
            layer,
            phase,
            n_used: ids.len() as u8,
            ids: [0; 16],
            weights: [0.0; 16],
        };
        r.ids[..ids.len()].copy_from_slice(ids);
        r
    }

    fn cfg(profile_path: Option<PathBuf>) -> LiveConfig {
        LiveConfig {
            n_layer: 2,
            n_expert: 4,
            k: 2,
            slots: 2,
            layer_slots: None,
            residency: false,
            policy: PolicyKind::Lru,
            window: 100,
            half_life: 10.0,
            profile_path,
            fingerprint: "fp".into(),
            start_profile: None,
        }
    }

    /// The planner's per-layer split: the shadow cache and the plans follow each layer's own
    /// count (0: nothing resident, nothing planned), and the status shows the counts by layer.
    #[test]
    fn per_layer_slots_shape_the_shadow_the_plans_and_the_status() {
        let mut c = cfg(None);
        c.n_expert = 6;
        c.residency = true;
        c.layer_slots = Some(vec![0, 4]);
        let mut counts = Counts::zero(2, 6);
        counts.set(0, 4, 50);
        counts.set(1, 2, 7);
        counts.set(1, 3, 5);
        c.start_profile = Some(crate::profile::Profile::new(counts, 2, None));
        let (mut live, _) = Live::new(c.clone());
        live.fold(&[rec(1, 0, 0, 1, &[0, 3]), rec(1, 0, 1, 1, &[5, 1])]);
        live.fold(&[rec(1, 1, 0, 1, &[2, 4]), rec(1, 1, 1, 1, &[0, 4])]);
        let (p0, p1) = (live.plan_of(0), live.plan_of(1));
        assert!(p0.pinned.is_empty() && p0.tail.is_empty(), "{p0:?}");
        assert_eq!(p1.pinned, vec![2, 3]);
        assert!(p1.pinned.len() + p1.tail.len() <= 4, "{p1:?}");
        assert!(!p1.tail.is_empty(), "{p1:?}");
        assert!((0..6).all(|e| !live.policy.is_resident(0, e)));
        let j = live.lock().to_json(&c);
        assert_eq!(j["shadow_cache"]["slots_per_layer"], json!([0, 4]));
        assert_eq!(j["residency"]["slots_per_layer"], json!([0, 4]));
        // One count for every layer reads as before: a number.
        let j = live.lock().to_json(&cfg(None));
        assert_eq!(j["shadow_cache"]["slots_per_layer"], json!(2));
    }

    #[test]
    fn the_plan_pins_the_profile_hot_set_and_adds_the_shadow_tail_within_the_slots() {
        let mut c = cfg(None);
        c.slots = 3;
        c.n_expert = 6;
        c.residency = true;
        let mut counts = Counts::zero(2, 6);
        counts.set(0, 4, 50); // hottest of layer 0
        counts.set(0, 1, 20);
        counts.set(1, 2, 7); // layer 1: one expert ever seen
        c.start_profile = Some(crate::profile::Profile::new(counts, 2, None));
        let (mut live, _) = Live::new(c);
        // Pinned: slots / 2 = 1 per layer, only experts with counts.
        let p0 = live.plan_of(0);
        assert_eq!(p0.pinned, vec![4]);
        let p1 = live.plan_of(1);
        assert_eq!(p1.pinned, vec![2]);
        // Decode traffic makes experts resident in the (LRU) shadow: they become the tail.
        live.fold(&[rec(1, 0, 0, 1, &[0, 3]), rec(1, 1, 0, 1, &[5, 4])]);
        let p0 = live.plan_of(0);
        assert_eq!(p0.pinned, vec![4]);
        assert!(p0.pinned.len() + p0.tail.len() <= 3, "{p0:?}");
        assert!(
            !p0.tail.contains(&4),
            "a pinned expert is not repeated in the tail"
        );
        assert!(!p0.tail.is_empty(), "{p0:?}");
        for e in &p0.tail {
            assert!(
                live.policy.is_resident(0, *e as u16),
                "tail expert {e} is not resident"
            );
        }
        // Layer 1: three experts resident in the (3-slot LRU) shadow, one slot pinned to an
        // expert it does not hold: the tail keeps the two hottest by decayed decode counts
        // (3 and 5, used twice; 1 only once), not the first two by id.
        live.fold(&[
            rec(1, 2, 1, 1, &[0, 3]),
            rec(1, 2, 0, 1, &[0]),
            rec(1, 3, 1, 1, &[5, 3]),
            rec(1, 3, 0, 1, &[0]),
            rec(1, 4, 1, 1, &[1, 5]),
        ]);
        let p1 = live.plan_of(1);
        assert_eq!(p1.pinned, vec![2]);
        let mut tail = p1.tail.clone();
        tail.sort();
        assert_eq!(tail, vec![3, 5], "{p1:?}");
    }

    #[test]
    fn prompt_and_decode_are_counted_apart_and_the_shadow_cache_scores_decode() {
        let (mut live, shared) = Live::new(cfg(None));
        live.fold(&[rec(0, 0, 0, 0, &[0, 1]), rec(0, 0, 1, 0, &[2, 3])]);
        // Decode: two tokens, both layers; the second token repeats the first's experts.
        live.fold(&[
            rec(0, 1, 0, 1, &[0, 1]),
            rec(0, 1, 1, 1, &[2, 3]),
            rec(0, 2, 0, 1, &[0, 1]),
            rec(0, 2, 1, 1, &[3, 2]),
        ]);
        live.fold(&[rec(0, 3, 7, 1, &[0, 1]), rec(0, 3, 0, 1, &[9, 1])]);
        live.update_window();
        let s = shared.lock().unwrap();
        assert_eq!(s.prompt.get(0, 1), 1);
        assert_eq!(s.decode.get(0, 1), 2);
        assert_eq!(s.decode.get(1, 3), 2);
        assert_eq!(s.prompt.total(), 4);
        assert_eq!(s.decode.total(), 8);
        assert_eq!(s.bad_records, 2, "layer 7 and expert 9 are out of range");
        assert_eq!(s.decode_tokens, 2);
        assert_eq!(
            (s.shadow_accesses, s.shadow_misses),
            (8, 4),
            "cold misses only"
        );
        assert_eq!(s.window_steps, 2);
        assert_eq!(
            s.window_belady_misses, 0,
            "belady starts with the first S distinct experts"
        );
        // Decay: expert 0 of layer 0 was used at tokens 1 and 2 with half-life 10.
        let expect = (-(std::f64::consts::LN_2 / 10.0)).exp() + 1.0;
        assert!((s.decayed[0] - expect).abs() < 1e-9);
    }

    #[test]
    fn folded_counts_saturate_instead_of_wrapping() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.gguf.spark.csv");
        let mut c = cfg(Some(path.clone()));
        let mut counts = Counts::zero(2, 4);
        counts.set(0, 1, u64::MAX - 1); // the hottest expert, one use short of the limit
        counts.set(0, 2, 5);
        c.start_profile = Some(crate::profile::Profile::new(counts, 2, None));
        let (mut live, shared) = Live::new(c);
        // Eight uses of expert 1 in decode and two in the prompt: a wrapping add gave 7.
        for t in 0..8 {
            live.fold(&[rec(0, t, 0, 1, &[1, 2])]);
        }
        live.fold(&[rec(0, 0, 0, 0, &[1, 3]), rec(0, 1, 0, 0, &[1, 3])]);
        {
            let s = shared.lock().unwrap();
            assert_eq!(s.decode.get(0, 1), u64::MAX);
            assert_eq!(s.decode.get(0, 2), 13);
            assert_eq!(s.prompt.get(0, 1), 2);
            assert_eq!(s.decode.total(), u64::MAX, "the total saturates too");
        }
        live.write_profile();
        let text = std::fs::read_to_string(&path).unwrap();
        let row0 = text.lines().find(|l| !l.starts_with('#')).unwrap();
        assert_eq!(row0, format!("0,{},13,2", u64::MAX), "still the hottest");
    }

    #[test]
    fn profile_counts_equal_what_was_folded() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.gguf.spark.csv");
        let (mut live, _shared) = Live::new(cfg(Some(path.clone())));
        live.fold(&[
            rec(0, 0, 0, 0, &[0, 1]),
            rec(0, 0, 1, 0, &[2, 3]),
            rec(0, 1, 0, 1, &[0, 3]),
            rec(0, 1, 1, 1, &[1, 2]),
        ]);
        live.write_profile();
        let p = Profile::read(&path).unwrap();
        assert_eq!(p.counts.layer(0), &[2, 1, 0, 1]);
        assert_eq!(p.counts.layer(1), &[0, 1, 2, 1]);
        assert_eq!(p.fingerprint.as_deref(), Some("fp"));
        assert_eq!(p.tokens, Some(2));
    }

    #[test]
    fn another_writers_counts_in_the_profile_are_kept() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.gguf.spark.csv");
        let (mut live, _shared) = Live::new(cfg(Some(path.clone())));
        live.fold(&[rec(0, 0, 0, 0, &[0, 1]), rec(0, 0, 1, 0, &[2, 3])]);
        live.write_profile();
        // Another serve (or a calibration) of the same model adds 100 uses of expert 3 of
        // layer 0 and 50 tokens to the file meanwhile.
        let mut theirs = Counts::zero(2, 4);
        theirs.set(0, 3, 100);
        let add = crate::profile::Addition {
            delta: &theirs,
            delta_tokens: 50,
            whole: &theirs,
            whole_tokens: 50,
        };
        crate::profile::add_to(&path, &add, 2, "fp").unwrap();
        live.fold(&[rec(0, 1, 0, 1, &[0, 3]), rec(0, 1, 1, 1, &[1, 2])]);
        live.write_profile();
        let p = Profile::read(&path).unwrap();
        assert_eq!(p.counts.layer(0), &[2, 1, 0, 101], "both writers' counts");
        assert_eq!(p.counts.layer(1), &[0, 1, 2, 1]);
        assert_eq!(p.tokens, Some(52));
    }

    #[test]
    fn residency_counters_keep_their_totals_across_child_restarts() {
        let (_live, shared) = Live::new(cfg(None));
        let mut s = shared.lock().unwrap();
        let first = ResidencyStats {
            slots: 4,
            calls: 10,
            hits: 6,
            loads: 3,
            streamed: 1,
            bytes_hit: 600,
            bytes_host: 400,
            ..Default::default()
        };
        s.residency = Some(first);
        s.child_replaced();
        // Until the new child reports, the totals are the first child's.
        assert_eq!(s.residency_totals(), Some(first));
        // The new child counts from zero; the totals go on from the first child's.
        s.residency = Some(ResidencyStats {
            slots: 4,
            calls: 2,
            hits: 1,
            loads: 1,
            ..Default::default()
        });
        let t = s.residency_totals().unwrap();
        assert_eq!((t.calls, t.hits, t.loads, t.streamed), (12, 7, 4, 1));
        assert_eq!((t.bytes_hit, t.bytes_host), (600, 400));
        let j = s.to_json(&{
            let mut c = cfg(None);
            c.residency = true;
            c
        });
        assert_eq!(j["residency"]["hits"], 1, "the current child's");
        assert_eq!(j["residency"]["totals"]["hits"], 7, "every child's");
        assert_eq!(
            j["residency"]["layers"],
            Value::Null,
            "no per-layer read yet"
        );
    }

    /// A tap on the other end of a control pair, answering with `spark_proto`'s own dispatch:
    /// its first `residency layers` snapshot does not add up (a layer short of the totals),
    /// later ones do; with `old`, it predates the command and refuses it.
    fn fake_tap(theirs: std::os::fd::OwnedFd, old: bool) -> std::thread::JoinHandle<()> {
        use spark_proto::control::{respond, HiddenConfig, TapControl, TapStats};
        use std::io::{BufRead, Write};
        struct Tap(u32);
        impl TapControl for Tap {
            fn stats(&mut self) -> TapStats {
                TapStats::default()
            }
            fn flush(&mut self) -> u64 {
                0
            }
            fn reset(&mut self) {}
            fn set_request(&mut self, _: u32) {}
            fn set_hidden(&mut self, _: Option<HiddenConfig>) -> Result<(), String> {
                Ok(())
            }
            fn residency(&mut self) -> ResidencyStats {
                ResidencyStats {
                    slots: 2,
                    hits: 5,
                    loads: 1,
                    ..Default::default()
                }
            }
            fn residency_layers(&mut self, _: bool) -> Result<ResidencyLayers, String> {
                self.0 += 1;
                let c = LayerCounters::from_array;
                let layer1 = if self.0 == 1 { 0 } else { 3 };
                Ok(ResidencyLayers {
                    seq: u64::from(self.0),
                    totals: c([5, 1, 0, 0, 0, 0]),
                    other: LayerCounters::default(),
                    layers: vec![(0, c([2, 1, 0, 0, 0, 0])), (1, c([layer1, 0, 0, 0, 0, 0]))],
                })
            }
            fn want(&mut self, _: &WantPlan, _: bool) -> Result<(), String> {
                Ok(())
            }
        }
        let stream = std::os::unix::net::UnixStream::from(theirs);
        std::thread::spawn(move || {
            let mut out = stream.try_clone().unwrap();
            let mut tap = Tap(0);
            for line in std::io::BufReader::new(stream).lines() {
                let Ok(line) = line else { return };
                let reply = if old && line.starts_with("residency layers") {
                    "err bad-args residency takes no arguments".to_string()
                } else {
                    respond(&line, &mut tap).reply.to_line()
                };
                if writeln!(out, "{reply}").is_err() {
                    return;
                }
            }
        })
    }

    fn live_with_tap(old: bool) -> (Live, LiveShared, std::thread::JoinHandle<()>) {
        let (client, theirs) = crate::control::pair().unwrap();
        let peer = fake_tap(theirs, old);
        let mut c = cfg(None);
        c.residency = true;
        let (mut live, shared) = Live::new(c);
        live.control = Some(client);
        live.sent = vec![None; live.cfg.n_layer];
        (live, shared, peer)
    }

    #[test]
    fn per_layer_counters_that_do_not_add_up_are_counted_and_not_shown() {
        let (mut live, shared, peer) = live_with_tap(false);
        live.publish_plan();
        {
            let s = shared.lock().unwrap();
            assert_eq!(s.residency.map(|r| r.hits), Some(5), "the totals are read");
            assert_eq!(s.residency_layer_errors, 1);
            assert!(s.residency_layers.is_none());
            let e = s.residency_layers_error.as_deref().unwrap();
            assert!(
                e.contains("add up to 2,1,0,0,0,0 but the totals are 5,1,0,0,0,0"),
                "{e}"
            );
            assert!(
                s.residency_error.is_none(),
                "plans still go out: {:?}",
                s.residency_error
            );
        }
        // The next read adds up: it is taken, the error count stays.
        live.publish_plan();
        {
            let s = shared.lock().unwrap();
            assert_eq!(s.residency_layer_errors, 1);
            let l = s.residency_layers.as_ref().unwrap();
            assert_eq!((l.seq, l.layers.len()), (2, 2));
        }
        live.control = None;
        peer.join().unwrap();
    }

    #[test]
    fn a_tap_without_per_layer_counters_leaves_the_totals_alone() {
        let (mut live, shared, peer) = live_with_tap(true);
        live.publish_plan();
        let s = shared.lock().unwrap();
        assert_eq!(s.residency.map(|r| r.hits), Some(5));
        assert_eq!(s.residency_layer_errors, 0);
        assert!(s.residency_layers.is_none() && s.residency_layers_error.is_none());
        drop(s);
        live.control = None;
        peer.join().unwrap();
    }

    #[test]
    fn residency_counters_per_layer_keep_their_totals_across_child_restarts() {
        let mut eight = cfg(None);
        eight.n_layer = 8;
        let (_live, shared) = Live::new(eight);
        let mut s = shared.lock().unwrap();
        let c = LayerCounters::from_array;
        s.residency_layers = Some(ResidencyLayers {
            seq: 9,
            totals: c([6, 3, 1, 2, 600, 400]),
            other: LayerCounters::default(),
            layers: vec![
                (0, c([4, 2, 1, 2, 400, 300])),
                (3, c([2, 1, 0, 0, 200, 100])),
            ],
        });
        s.child_replaced();
        assert!(s.residency_layers.is_none());
        let (layers, other) = s.residency_layer_totals().unwrap();
        assert_eq!(layers.iter().map(|l| l.0).collect::<Vec<_>>(), vec![0, 3]);
        assert!(other.is_zero());
        // The new child counts from zero, in layers 3 and 5, and past the tap's table.
        s.residency_layers = Some(ResidencyLayers {
            seq: 2,
            totals: c([2, 2, 0, 0, 200, 200]),
            other: c([1, 0, 0, 0, 100, 0]),
            layers: vec![(3, c([1, 1, 0, 0, 100, 100])), (5, c([0, 1, 0, 0, 0, 100]))],
        });
        let (layers, other) = s.residency_layer_totals().unwrap();
        assert_eq!(
            layers,
            vec![
                (0, c([4, 2, 1, 2, 400, 300])),
                (3, c([3, 2, 0, 0, 300, 200])),
                (5, c([0, 1, 0, 0, 0, 100])),
            ]
        );
        assert_eq!(other, c([1, 0, 0, 0, 100, 0]));
        let j = s.to_json(&{
            let mut c = cfg(None);
            c.residency = true;
            c
        });
        let rows = j["residency"]["layers"].as_array().unwrap();
        assert_eq!(rows.len(), 4, "{rows:?}");
        assert_eq!(rows[1]["layer"], 3);
        assert_eq!(rows[1]["hits"], 3);
        assert_eq!(rows[1]["hit_ratio"], 0.6);
        assert_eq!(rows[3]["layer"], Value::Null, "layers past the tap's table");
    }

    #[test]
    fn the_profile_is_rewritten_only_when_routing_changed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.gguf.spark.csv");
        let (mut live, shared) = Live::new(cfg(Some(path.clone())));
        let writes = || shared.lock().unwrap().profile_writes;
        live.write_profile();
        assert_eq!(writes(), 0, "nothing routed yet: nothing to write");
        assert!(!path.exists());
        live.fold(&[rec(0, 0, 0, 0, &[0, 1]), rec(0, 0, 1, 0, &[2, 3])]);
        live.write_profile();
        assert_eq!(writes(), 1);
        // A probe or a tokenize call routes nothing: no rewrite, no fsync.
        for _ in 0..5 {
            live.write_profile();
        }
        assert_eq!(writes(), 1);
        live.fold(&[rec(0, 1, 0, 1, &[0, 3])]);
        live.write_profile();
        assert_eq!(writes(), 2);
        assert_eq!(Profile::read(&path).unwrap().counts.total(), 6);

        // A profile loaded without a fingerprint is stamped by the first write, routed or not.
        let mut c = cfg(Some(path.clone()));
        c.start_profile = Some(Profile::new(Counts::zero(2, 4), 2, None));
        let (mut live, shared) = Live::new(c);
        live.write_profile();
        assert_eq!(shared.lock().unwrap().profile_writes, 1);
        assert_eq!(
            Profile::read(&path).unwrap().fingerprint.as_deref(),
            Some("fp")
        );
        live.write_profile();
        assert_eq!(shared.lock().unwrap().profile_writes, 1);
    }
}
