//! `slots`: the tap provider's own replacement rule, slot for slot, so that a replay of a
//! routing trace makes the same decisions the provider makes in llama-server.
//!
//! Owns a per-layer slot table with the provider's rule (`tap/src/residency.rs`, without a
//! supervisor plan): a missing expert takes the free slot with the lowest index, else the slot
//! least recently used by an earlier call whose expert this call does not use, ties to the lowest
//! slot index; with no such slot it is streamed past. A wide call (more than
//! [`WIDE_FACTOR`] × top-k experts at once: a prompt batch) only takes free slots. It differs from
//! [`super::Lru`] only in how it breaks ties between experts loaded by the same call (by slot,
//! where `lru` goes by order), which is what makes byte counts of a replay equal the provider's.
//! Pure computation, nothing can fail.

use super::Policy;

/// A call using more than this many times the model's top-k experts is wide (the provider's
/// `WIDE_FACTOR`): it admits only into free slots.
pub const WIDE_FACTOR: usize = 2;

const FREE: u32 = u32::MAX;

#[derive(Debug, Clone)]
struct Table {
    /// Expert → slot, `FREE` when not resident.
    slot_of: Vec<u32>,
    /// Slot → expert, `FREE` when empty.
    expert_in: Vec<u32>,
    last_use: Vec<u64>,
}

/// The provider's slot tables, one per layer.
#[derive(Debug, Clone)]
pub struct SlotLru {
    layers: Vec<Table>,
    top_k: usize,
    tick: u64,
    /// The call's ids, sorted (kept, so that a lookup allocates nothing once warm).
    sorted: Vec<u16>,
}

impl SlotLru {
    /// `slots[layer]` slots per layer (at most `n_expert` are used, as the provider caps them);
    /// `top_k` tells wide calls from decode (0: no call is wide).
    pub fn new(n_expert: usize, slots: &[u32], top_k: usize) -> SlotLru {
        SlotLru {
            layers: slots
                .iter()
                .map(|&s| {
                    let s = (s as usize).min(n_expert);
                    Table {
                        slot_of: vec![FREE; n_expert],
                        expert_in: vec![FREE; s],
                        last_use: vec![0; s],
                    }
                })
                .collect(),
            top_k,
            tick: 0,
            sorted: Vec::new(),
        }
    }
}

impl Policy for SlotLru {
    /// `ids` must be distinct; the provider serves them in ascending order, and so does this.
    fn access(&mut self, layer: usize, ids: &[u16]) -> u32 {
        self.tick += 1;
        let tick = self.tick;
        let t = &mut self.layers[layer];
        let sorted = &mut self.sorted;
        sorted.clear();
        sorted.extend_from_slice(ids);
        sorted.sort_unstable();
        let sorted: &[u16] = sorted;
        let wide = self.top_k > 0 && sorted.len() > WIDE_FACTOR * self.top_k;
        let used = |x: u32, sorted: &[u16]| sorted.binary_search(&(x as u16)).is_ok();
        let mut misses = 0;
        for &e in sorted {
            let e = usize::from(e);
            if e >= t.slot_of.len() {
                continue;
            }
            let s = t.slot_of[e];
            if s != FREE {
                t.last_use[s as usize] = tick;
                continue;
            }
            misses += 1;
            let slot = match t.expert_in.iter().position(|&x| x == FREE) {
                Some(s) => Some(s),
                None if wide => None,
                None => t
                    .expert_in
                    .iter()
                    .enumerate()
                    .filter(|&(_, &x)| !used(x, sorted))
                    .min_by_key(|&(s, _)| t.last_use[s])
                    .map(|(s, _)| s),
            };
            if let Some(s) = slot {
                let old = t.expert_in[s];
                if old != FREE {
                    t.slot_of[old as usize] = FREE;
                }
                t.expert_in[s] = e as u32;
                t.slot_of[e] = s as u32;
                t.last_use[s] = tick;
            }
        }
        misses
    }

    fn is_resident(&self, layer: usize, expert: u16) -> bool {
        self.layers[layer]
            .slot_of
            .get(usize::from(expert))
            .is_some_and(|&s| s != FREE)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::tests::run;
    use crate::cache::Lru;

    #[test]
    fn ties_go_to_the_lowest_slot_not_the_order_of_loading() {
        // Ids are served ascending: 1 → slot 0, 3 → slot 1, 5 → slot 2, one stamp. Then 9:
        // the lowest slot (0, expert 1) goes, where `lru` would evict 5 (loaded first).
        let mut p = SlotLru::new(16, &[3], 0);
        assert_eq!(run(&mut p, &[&[5, 1, 3], &[9]]), vec![3, 1]);
        assert!(!p.is_resident(0, 1) && p.is_resident(0, 3) && p.is_resident(0, 5));
        // 3 is refreshed; 7 then evicts the oldest of the rest: 5 (slot 2, stamp 1) rather than
        // 9 (slot 0, stamp 2).
        assert_eq!(run(&mut p, &[&[3], &[7]]), vec![0, 1]);
        assert!(!p.is_resident(0, 5) && p.is_resident(0, 9) && p.is_resident(0, 7));
    }

    #[test]
    fn a_token_larger_than_the_slots_streams_and_wide_calls_fill_only_free_slots() {
        let mut p = SlotLru::new(8, &[2], 2);
        // 1 and 2 take the slots, 3 streams past (both slots hold this call's experts).
        assert_eq!(run(&mut p, &[&[1, 2, 3], &[1, 2]]), vec![3, 0]);
        // A wide call (5 > 2 × 2 experts) evicts nothing: 1 and 2 stay.
        assert_eq!(run(&mut p, &[&[0, 3, 4, 5, 6], &[1, 2]]), vec![5, 0]);
        let mut q = SlotLru::new(8, &[0], 2);
        assert_eq!(run(&mut q, &[&[1], &[1]]), vec![1, 1]);
    }

    #[test]
    fn misses_equal_lru_on_single_expert_tokens() {
        // With one expert per call there are no ties, so the rule is plain LRU.
        let steps: Vec<Vec<u16>> = (0..400u32)
            .map(|i| vec![((i * 7 + i / 3) % 11) as u16])
            .collect();
        let refs: Vec<&[u16]> = steps.iter().map(|v| v.as_slice()).collect();
        for s in 0..6 {
            let mut a = SlotLru::new(11, &[s], 1);
            let mut b = Lru::new(11, &[s]);
            assert_eq!(run(&mut a, &refs), run(&mut b, &refs), "slots {s}");
        }
    }
}
