//! The swap bench's model of a slot cache: which expert of each MoE layer sits in which slot,
//! what a step must copy, what it evicts, and what in-flight steps pin. It drives the copies
//! `spark bench swap` measures; the slots llama-server serves from are the tap's
//! (`tap/src/residency.rs`), not these.
//!
//! Pure computation over the model geometry: no I/O, no device. A request produces a [`Plan`]
//! (byte copies from the GGUF file into the slot arena, plus the new expert→slot table) that a
//! device executes: the GPU (`enabled.rs`) or host memory ([`super::arena::CpuArena`]).
//!
//! Residency follows a cache policy from [`crate::cache`]: the policy says which experts it
//! wants resident; the pool reconciles its slots toward that set, except that an expert pinned
//! by an in-flight step is never evicted. A miss that finds no evictable slot is streamed (served
//! without caching), never dropped.
//!
//! Layer indices here are MoE-layer indices (positions in `MoeGeometry::moe_layers`).

use std::collections::HashMap;

use hdrhistogram::Histogram;
use serde::Serialize;

use crate::cache::{self, Counts, Policy, PolicyKind, Setup};
use crate::gguf::MoeGeometry;

/// Slices inside a slot start at multiples of this (device copies and checksums like it).
pub const SLOT_ALIGN: u64 = 256;

/// Errors of the bookkeeping.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error("build a slot pool: the model has no MoE layers")]
    NotMoe,
    #[error("build a slot pool: {0} slots per layer (need at least 1)")]
    NoSlots(u32),
    #[error("build a slot pool: {0} experts per layer is more than 65536")]
    TooManyExperts(u32),
    #[error("build a slot pool: policy {0} needs the future; choose an online policy")]
    OfflinePolicy(&'static str),
    #[error("serve layer {layer}: there are {n_layer} MoE layers")]
    BadLayer { layer: usize, n_layer: usize },
    #[error("serve expert {expert} of layer {layer}: the model has {n_expert} experts")]
    BadExpert {
        layer: usize,
        expert: u32,
        n_expert: u32,
    },
}

impl PoolError {
    /// Every error here is caused by the input (model, flags, ids).
    pub fn is_usage(&self) -> bool {
        true
    }
}

/// One expert tensor's place inside a slot.
#[derive(Debug, Clone, Serialize)]
pub struct SliceLayout {
    /// File offset of expert 0's slice of this tensor.
    pub file_offset: u64,
    /// Bytes of one expert's slice.
    pub bytes: u64,
    /// Offset of the slice inside the slot.
    pub in_slot: u64,
}

/// Where one MoE layer's slots are in the arena.
#[derive(Debug, Clone, Serialize)]
pub struct LayerLayout {
    /// The model layer (`blk.N`).
    pub layer: u32,
    /// Arena offset of slot 0.
    pub base: u64,
    /// Bytes between consecutive slots.
    pub slot_stride: u64,
    /// Bytes one swap-in moves (all the expert's slices).
    pub expert_bytes: u64,
    pub slices: Vec<SliceLayout>,
}

impl LayerLayout {
    /// Arena offset of `slot`.
    pub fn slot_offset(&self, slot: u32) -> u64 {
        self.base + u64::from(slot) * self.slot_stride
    }

    /// The copies that bring `expert` into `slot`, in tensor order.
    pub fn copies(&self, expert: u32, slot: u32) -> impl Iterator<Item = Copy> + '_ {
        let at = self.slot_offset(slot);
        self.slices.iter().map(move |s| Copy {
            src: s.file_offset + u64::from(expert) * s.bytes,
            dst: at + s.in_slot,
            bytes: s.bytes,
        })
    }
}

/// The arena: every layer's slots, back to back.
#[derive(Debug, Clone, Serialize)]
pub struct Layout {
    pub n_expert: u32,
    pub slots: u32,
    pub layers: Vec<LayerLayout>,
    pub total_bytes: u64,
}

impl Layout {
    pub fn new(geometry: &MoeGeometry, slots: u32) -> Result<Layout, PoolError> {
        if geometry.moe_layers.is_empty() {
            return Err(PoolError::NotMoe);
        }
        if slots == 0 {
            return Err(PoolError::NoSlots(slots));
        }
        let mut base = 0u64;
        let mut layers = Vec::with_capacity(geometry.moe_layers.len());
        for l in &geometry.moe_layers {
            let mut in_slot = 0u64;
            let slices = l
                .tensors
                .iter()
                .map(|t| {
                    let s = SliceLayout {
                        file_offset: t.file_offset,
                        bytes: t.slice_bytes,
                        in_slot,
                    };
                    in_slot = align_up(in_slot + t.slice_bytes);
                    s
                })
                .collect();
            let slot_stride = in_slot.max(SLOT_ALIGN);
            layers.push(LayerLayout {
                layer: l.layer,
                base,
                slot_stride,
                expert_bytes: l.expert_bytes,
                slices,
            });
            base += slot_stride * u64::from(slots);
        }
        Ok(Layout {
            n_expert: geometry.n_expert,
            slots,
            layers,
            total_bytes: base,
        })
    }
}

fn align_up(v: u64) -> u64 {
    v.div_ceil(SLOT_ALIGN) * SLOT_ALIGN
}

/// One byte copy: `bytes` from file offset `src` to arena offset `dst`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Copy {
    pub src: u64,
    pub dst: u64,
    pub bytes: u64,
}

/// One swap-in: `expert` of `layer` into `slot`, replacing `evicted`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Swap {
    pub layer: usize,
    pub slot: u32,
    pub expert: u32,
    pub evicted: Option<u32>,
}

/// What a device must do: the copies of every swap, then upload the table.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Plan {
    pub swaps: Vec<Swap>,
    pub copies: Vec<Copy>,
}

impl Plan {
    pub fn is_empty(&self) -> bool {
        self.swaps.is_empty()
    }

    pub fn bytes(&self) -> u64 {
        self.copies.iter().map(|c| c.bytes).sum()
    }

    pub fn extend(&mut self, other: Plan) {
        self.swaps.extend(other.swaps);
        self.copies.extend(other.copies);
    }
}

/// How one routed expert is served.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Outcome {
    /// Already resident in this slot.
    Hit(u32),
    /// Copied into this slot by the plan.
    Loaded(u32),
    /// Not cached: the policy streamed it past, or every candidate slot is pinned.
    Streamed,
}

/// The answer to one request.
#[derive(Debug, Clone, Default)]
pub struct Served {
    /// Each distinct id of the request, in first-seen order, with its outcome.
    pub outcomes: Vec<(u32, Outcome)>,
    pub plan: Plan,
}

/// Counters and the swap latency histogram.
#[derive(Debug, Clone)]
pub struct Stats {
    pub hits: u64,
    pub misses: u64,
    pub swaps: u64,
    pub evictions: u64,
    pub streamed: u64,
    /// Misses streamed because every slot the policy would give up was pinned.
    pub blocked_by_pins: u64,
    pub bytes_moved: u64,
    /// Nanoseconds per executed plan's swap, recorded by whoever executes plans.
    pub swap_latency_ns: Histogram<u64>,
}

impl Default for Stats {
    fn default() -> Stats {
        Stats {
            hits: 0,
            misses: 0,
            swaps: 0,
            evictions: 0,
            streamed: 0,
            blocked_by_pins: 0,
            bytes_moved: 0,
            swap_latency_ns: Histogram::new_with_bounds(1, 600_000_000_000, 3)
                .expect("valid histogram bounds"),
        }
    }
}

/// The slot pool of every MoE layer.
pub struct SlotPool {
    layout: Layout,
    policy: Box<dyn Policy>,
    /// Expert in each slot, per layer (`None` = free).
    slot_expert: Vec<Vec<Option<u32>>>,
    /// Pins on each slot, per layer.
    pins: Vec<Vec<u32>>,
    /// Host mirror of the device table: layer-major, `n_expert` i32 per layer, -1 = absent.
    table: Vec<i32>,
    /// What each in-flight step pinned.
    steps: HashMap<u64, Vec<(usize, u32)>>,
    stats: Stats,
}

impl std::fmt::Debug for SlotPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SlotPool")
            .field("slots", &self.layout.slots)
            .field("layers", &self.layout.layers.len())
            .finish()
    }
}

impl SlotPool {
    /// A pool of `slots` slots per MoE layer under `policy`; `counts` (per MoE layer) rank
    /// experts for the policies that use calibration.
    pub fn new(
        geometry: &MoeGeometry,
        slots: u32,
        policy: PolicyKind,
        counts: Option<&Counts>,
    ) -> Result<SlotPool, PoolError> {
        let layout = Layout::new(geometry, slots)?;
        let n_expert = geometry.n_expert;
        if n_expert > 65536 {
            return Err(PoolError::TooManyExperts(n_expert));
        }
        let n_layer = layout.layers.len();
        let zero = Counts::zero(n_layer, n_expert as usize);
        let setup = Setup {
            n_expert: n_expert as usize,
            k: geometry.n_expert_used.max(1) as usize,
            slots: vec![slots.min(n_expert); n_layer],
            counts: counts.unwrap_or(&zero),
            prior: counts,
            calibration: None,
        };
        let policy =
            cache::online(policy, &setup).ok_or(PoolError::OfflinePolicy(policy.name()))?;
        Ok(SlotPool {
            slot_expert: vec![vec![None; slots as usize]; n_layer],
            pins: vec![vec![0; slots as usize]; n_layer],
            table: vec![-1; n_layer * n_expert as usize],
            steps: HashMap::new(),
            stats: Stats::default(),
            layout,
            policy,
        })
    }

    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// Records how long executing one swap took on the device.
    pub fn record_swap_latency(&mut self, nanos: u64) {
        self.stats.swap_latency_ns.saturating_record(nanos.max(1));
    }

    /// The host mirror of the device table (layer-major, -1 = not resident).
    pub fn table(&self) -> &[i32] {
        &self.table
    }

    /// The expert→slot table of one MoE layer.
    pub fn layer_table(&self, layer: usize) -> &[i32] {
        let n = self.layout.n_expert as usize;
        &self.table[layer * n..(layer + 1) * n]
    }

    /// The expert in `slot` of `layer`.
    pub fn slot_expert(&self, layer: usize, slot: u32) -> Option<u32> {
        self.slot_expert[layer][slot as usize]
    }

    /// Pins held on `slot` of `layer`.
    pub fn pins(&self, layer: usize, slot: u32) -> u32 {
        self.pins[layer][slot as usize]
    }

    /// Steps that hold pins now.
    pub fn in_flight(&self) -> usize {
        self.steps.len()
    }

    /// Serves the routed experts `ids` of one step at `layer`: hits and loaded experts are
    /// pinned for `step` until [`SlotPool::release`]. Returns the outcomes and the copy plan.
    pub fn request(&mut self, step: u64, layer: usize, ids: &[u32]) -> Result<Served, PoolError> {
        let n_layer = self.layout.layers.len();
        if layer >= n_layer {
            return Err(PoolError::BadLayer { layer, n_layer });
        }
        let n_expert = self.layout.n_expert;
        let mut distinct: Vec<u32> = Vec::with_capacity(ids.len());
        for &e in ids {
            if e >= n_expert {
                return Err(PoolError::BadExpert {
                    layer,
                    expert: e,
                    n_expert,
                });
            }
            if !distinct.contains(&e) {
                distinct.push(e);
            }
        }
        let short: Vec<u16> = distinct.iter().map(|&e| e as u16).collect();
        self.policy.access(layer, &short);

        let base = layer * n_expert as usize;
        let mut served = Served::default();
        let mut outcome = vec![Outcome::Streamed; distinct.len()];
        // Hits first, so that loads below cannot evict an expert this step uses.
        for (i, &e) in distinct.iter().enumerate() {
            let s = self.table[base + e as usize];
            if s >= 0 {
                self.stats.hits += 1;
                self.pin(step, layer, s as u32);
                outcome[i] = Outcome::Hit(s as u32);
            }
        }
        for (i, &e) in distinct.iter().enumerate() {
            if matches!(outcome[i], Outcome::Hit(_)) {
                continue;
            }
            self.stats.misses += 1;
            if !self.policy.is_resident(layer, e as u16) {
                self.stats.streamed += 1;
                continue;
            }
            let Some(slot) = self.free_or_victim(layer) else {
                self.stats.streamed += 1;
                self.stats.blocked_by_pins += 1;
                continue;
            };
            let evicted = self.slot_expert[layer][slot as usize];
            if let Some(old) = evicted {
                self.table[base + old as usize] = -1;
                self.stats.evictions += 1;
            }
            self.slot_expert[layer][slot as usize] = Some(e);
            self.table[base + e as usize] = slot as i32;
            let ll = &self.layout.layers[layer];
            served.plan.copies.extend(ll.copies(e, slot));
            served.plan.swaps.push(Swap {
                layer,
                slot,
                expert: e,
                evicted,
            });
            self.stats.swaps += 1;
            self.stats.bytes_moved += ll.expert_bytes;
            self.pin(step, layer, slot);
            outcome[i] = Outcome::Loaded(slot);
        }
        served.outcomes = distinct.into_iter().zip(outcome).collect();
        Ok(served)
    }

    /// Drops every pin `step` holds (the step finished on the device).
    pub fn release(&mut self, step: u64) {
        if let Some(pinned) = self.steps.remove(&step) {
            for (layer, slot) in pinned {
                self.pins[layer][slot as usize] -= 1;
            }
        }
    }

    fn pin(&mut self, step: u64, layer: usize, slot: u32) {
        self.pins[layer][slot as usize] += 1;
        self.steps.entry(step).or_default().push((layer, slot));
    }

    /// A free slot, else an unpinned slot whose expert the policy no longer wants.
    fn free_or_victim(&self, layer: usize) -> Option<u32> {
        let slots = &self.slot_expert[layer];
        if let Some(s) = slots.iter().position(Option::is_none) {
            return Some(s as u32);
        }
        slots
            .iter()
            .enumerate()
            .find(|&(s, e)| {
                self.pins[layer][s] == 0
                    && e.is_some_and(|e| !self.policy.is_resident(layer, e as u16))
            })
            .map(|(s, _)| s as u32)
    }

    /// Checks the bookkeeping's invariants: the table and the slots agree, pins match the
    /// in-flight steps. Returns the first violation.
    pub fn check(&self) -> Result<(), String> {
        let n = self.layout.n_expert as usize;
        for (l, slots) in self.slot_expert.iter().enumerate() {
            for (s, e) in slots.iter().enumerate() {
                if let Some(e) = e {
                    if self.table[l * n + *e as usize] != s as i32 {
                        return Err(format!("layer {l} slot {s}: expert {e} not in the table"));
                    }
                }
            }
            for e in 0..n {
                let s = self.table[l * n + e];
                if s >= 0 && slots[s as usize] != Some(e as u32) {
                    return Err(format!("layer {l}: table sends expert {e} to slot {s}"));
                }
            }
        }
        let mut expected = self
            .pins
            .iter()
            .map(|p| vec![0u32; p.len()])
            .collect::<Vec<_>>();
        for pinned in self.steps.values() {
            for &(l, s) in pinned {
                expected[l][s as usize] += 1;
            }
        }
        if expected != self.pins {
            return Err("pin counts disagree with the in-flight steps".into());
        }
        Ok(())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::gguf::{ExpertTensor, Fingerprint, GroupTotals, LayerExperts};

    /// A geometry without a file: `n_layer` MoE layers of `n_expert` experts, slices of
    /// `slice` bytes per tensor (gate, up, down) laid out one tensor after another.
    pub(crate) fn geometry(n_layer: u32, n_expert: u32, k: u32, slice: [u64; 3]) -> MoeGeometry {
        let mut off = 1000u64;
        let moe_layers = (0..n_layer)
            .map(|layer| {
                let tensors = ["gate", "up", "down"]
                    .iter()
                    .zip(slice)
                    .map(|(role, bytes)| {
                        let t = ExpertTensor {
                            name: format!("blk.{layer}.ffn_{role}_exps.weight"),
                            role: role.to_string(),
                            ggml_type: "f32".into(),
                            dims: vec![bytes / 4, 1, u64::from(n_expert)],
                            file_offset: off,
                            slice_bytes: bytes,
                        };
                        off += bytes * u64::from(n_expert);
                        t
                    })
                    .collect();
                LayerExperts {
                    layer,
                    tensors,
                    expert_bytes: slice.iter().sum(),
                }
            })
            .collect();
        MoeGeometry {
            architecture: "qwen3moe".into(),
            name: None,
            n_layer,
            n_embd: 0,
            n_vocab: 0,
            n_head: 0,
            n_head_kv: vec![],
            head_dim_k: 0,
            head_dim_v: 0,
            context_length: None,
            n_expert,
            n_expert_used: k,
            n_expert_shared: 0,
            expert_ff_length: None,
            moe_layers,
            dense_layers: Vec::new(),
            nextn_layers: Vec::new(),
            linear_attention_layers: Vec::new(),
            hash_routed_layers: Vec::new(),
            groups: GroupTotals::default(),
            total_tensor_bytes: off,
            fingerprint: Fingerprint {
                file_size: off,
                header_sha256: [0; 32],
            },
        }
    }

    fn pool(slots: u32, kind: PolicyKind) -> SlotPool {
        SlotPool::new(&geometry(2, 8, 2, [40, 40, 24]), slots, kind, None).unwrap()
    }

    #[test]
    fn layout_aligns_slices_and_slots() {
        let l = Layout::new(&geometry(2, 8, 2, [40, 40, 24]), 3).unwrap();
        let l0 = &l.layers[0];
        assert_eq!(l0.expert_bytes, 104);
        let ins: Vec<u64> = l0.slices.iter().map(|s| s.in_slot).collect();
        assert_eq!(ins, vec![0, 256, 512]);
        assert_eq!(l0.slot_stride, 768);
        assert_eq!(l.layers[1].base, 3 * 768);
        assert_eq!(l.total_bytes, 6 * 768);
        let c: Vec<Copy> = l0.copies(2, 1).collect();
        assert_eq!(
            c[0],
            Copy {
                src: 1000 + 80,
                dst: 768,
                bytes: 40
            }
        );
        assert_eq!(c[2].src, 1000 + 320 + 320 + 48);
    }

    #[test]
    fn misses_load_then_hit() {
        let mut p = pool(2, PolicyKind::Lru);
        let s = p.request(1, 0, &[3, 5, 3]).unwrap();
        assert_eq!(s.outcomes.len(), 2, "duplicates are served once");
        assert!(s
            .outcomes
            .iter()
            .all(|(_, o)| matches!(o, Outcome::Loaded(_))));
        assert_eq!(s.plan.swaps.len(), 2);
        assert_eq!(s.plan.copies.len(), 6);
        assert_eq!(s.plan.bytes(), 208);
        p.release(1);
        let s = p.request(2, 0, &[5]).unwrap();
        assert!(matches!(s.outcomes[0].1, Outcome::Hit(_)));
        assert!(s.plan.is_empty());
        let st = p.stats();
        assert_eq!(
            (st.hits, st.misses, st.swaps, st.bytes_moved),
            (1, 2, 2, 208)
        );
        assert_eq!(p.layer_table(1), &[-1; 8]);
        p.check().unwrap();
    }

    #[test]
    fn the_policy_chooses_the_victim() {
        let mut p = pool(2, PolicyKind::Lru);
        for (step, e) in [(1, 0), (2, 1), (3, 0), (4, 2)] {
            p.request(step, 0, &[e]).unwrap();
            p.release(step);
        }
        // LRU evicts 1 (0 was used more recently)
        assert!(p.layer_table(0)[0] >= 0 && p.layer_table(0)[2] >= 0);
        assert_eq!(p.layer_table(0)[1], -1);
        assert_eq!(p.stats().evictions, 1);
        p.check().unwrap();
    }

    #[test]
    fn a_pinned_expert_is_never_evicted() {
        let mut p = pool(2, PolicyKind::Lru);
        p.request(1, 0, &[0, 1]).unwrap();
        // step 1 is in flight: LRU wants 0 out for 2, but 0 and 1 are pinned
        let s = p.request(2, 0, &[2]).unwrap();
        assert_eq!(s.outcomes, vec![(2, Outcome::Streamed)]);
        assert!(s.plan.is_empty());
        assert_eq!(p.stats().blocked_by_pins, 1);
        assert!(p.layer_table(0)[0] >= 0 && p.layer_table(0)[1] >= 0);
        p.check().unwrap();
        p.release(1);
        p.release(2);
        assert_eq!(p.in_flight(), 0);
        // now the slot the policy gave up is free to take
        let s = p.request(3, 0, &[2]).unwrap();
        assert!(matches!(s.outcomes[0].1, Outcome::Loaded(_)));
        assert_eq!(s.plan.swaps[0].evicted, Some(0));
        p.check().unwrap();
    }

    #[test]
    fn pins_count_per_step() {
        let mut p = pool(2, PolicyKind::Lru);
        let slot = match p.request(1, 0, &[4]).unwrap().outcomes[0].1 {
            Outcome::Loaded(s) => s,
            o => panic!("expected a load, got {o:?}"),
        };
        p.request(2, 0, &[4]).unwrap();
        assert_eq!(p.pins(0, slot), 2);
        p.release(1);
        assert_eq!(p.pins(0, slot), 1);
        p.release(2);
        p.release(2);
        assert_eq!(p.pins(0, slot), 0);
        p.check().unwrap();
    }

    #[test]
    fn bad_input_is_an_error() {
        let mut p = pool(2, PolicyKind::Spark);
        assert!(matches!(
            p.request(1, 2, &[0]),
            Err(PoolError::BadLayer { .. })
        ));
        assert!(matches!(
            p.request(1, 0, &[8]),
            Err(PoolError::BadExpert { .. })
        ));
        let g = geometry(1, 4, 1, [8, 8, 8]);
        assert!(matches!(
            SlotPool::new(&g, 0, PolicyKind::Lru, None),
            Err(PoolError::NoSlots(0))
        ));
        assert!(matches!(
            SlotPool::new(&g, 2, PolicyKind::Belady, None),
            Err(PoolError::OfflinePolicy(_))
        ));
    }
}
