//! The tap provider's byte model: what one decode step of one host layer moves over the link,
//! reads from host memory and copies inside VRAM ([`step_bytes`], exact by construction and
//! checked against the provider's own counters on lavapipe), and the replay of routing through
//! the provider's slot rule ([`crate::cache::SlotLru`]) that sums it per layer at given slot
//! counts. Pure arithmetic on the routing and slice sizes handed in; never fails.

use serde::Serialize;

use crate::cache::{Policy, SlotLru};
use crate::trace::Routing;

/// Stock ggml copies at most this many bytes past the last expert of a run (the provider's
/// `PAD_MAX`).
pub const PAD_MAX: u64 = 512;

pub(super) fn pad(es: u64) -> u64 {
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
        Self::per_layer(
            n_expert,
            top_k,
            tensor_bytes,
            &vec![slots; tensor_bytes.len()],
        )
    }

    /// As [`Replayer::new`] with `slots[l]` slots in layer `l` (missing layers: 0).
    pub fn per_layer(
        n_expert: usize,
        top_k: usize,
        tensor_bytes: &'a [Vec<u64>],
        slots: &[u32],
    ) -> Self {
        let n_layer = tensor_bytes.len();
        let mut per: Vec<u32> = slots.iter().copied().take(n_layer).collect();
        per.resize(n_layer, 0);
        Replayer {
            policy: SlotLru::new(n_expert, &per, top_k),
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
}
