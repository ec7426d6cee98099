//! `lru`: least recently used, as llama.cpp's expert cache does it.
//!
//! Owns an O(1) intrusive recency list per layer (no allocation after construction). It never
//! evicts an expert the current token already touched.

use super::Policy;

/// One list node: links, the step that last touched it, residency. 16 bytes, so one expert's
/// state is one cache-line access.
#[derive(Debug, Clone, Copy)]
struct Node {
    prev: u32,
    next: u32,
    stamp: u32,
    resident: bool,
}

/// One layer's LRU list: node `n_expert` is the sentinel; `next` runs from most to least recent.
#[derive(Debug, Clone)]
pub(crate) struct LruList {
    cap: u32,
    len: u32,
    nodes: Vec<Node>,
    step: u32,
}

impl LruList {
    pub(crate) fn new(n_expert: usize, cap: u32) -> LruList {
        let s = n_expert as u32;
        LruList {
            cap,
            len: 0,
            nodes: vec![
                Node {
                    prev: s,
                    next: s,
                    stamp: 0,
                    resident: false,
                };
                n_expert + 1
            ],
            step: 0,
        }
    }

    #[inline]
    fn sentinel(&self) -> usize {
        self.nodes.len() - 1
    }

    #[inline]
    fn unlink(&mut self, e: usize) {
        let Node { prev, next, .. } = self.nodes[e];
        self.nodes[prev as usize].next = next;
        self.nodes[next as usize].prev = prev;
    }

    #[inline]
    fn push_front(&mut self, e: usize) {
        let s = self.sentinel();
        let first = self.nodes[s].next;
        self.nodes[e].next = first;
        self.nodes[e].prev = s as u32;
        self.nodes[first as usize].prev = e as u32;
        self.nodes[s].next = e as u32;
    }

    pub(crate) fn contains(&self, e: u16) -> bool {
        self.nodes[usize::from(e)].resident
    }

    /// Serves one token's ids; returns the loads. Hits are refreshed first, so every resident
    /// expert of the token sits ahead of the tail and is never evicted for its own token.
    #[inline]
    pub(crate) fn access(&mut self, ids: &[u16]) -> u32 {
        self.step = self.step.wrapping_add(1);
        let step = self.step;
        let mut misses = 0;
        for &id in ids {
            let e = usize::from(id);
            if self.nodes[e].resident {
                self.unlink(e);
                self.push_front(e);
                self.nodes[e].stamp = step;
            } else {
                misses += 1;
            }
        }
        if misses == 0 || self.cap == 0 {
            return misses;
        }
        for &id in ids {
            let e = usize::from(id);
            if self.nodes[e].stamp == step {
                continue;
            }
            if self.len == self.cap {
                let tail = self.nodes[self.sentinel()].prev as usize;
                if self.nodes[tail].stamp == step {
                    // Every resident expert belongs to this token: stream this one past.
                    continue;
                }
                self.unlink(tail);
                self.nodes[tail].resident = false;
                self.len -= 1;
            }
            self.push_front(e);
            self.nodes[e].resident = true;
            self.nodes[e].stamp = step;
            self.len += 1;
        }
        misses
    }
}

/// Least recently used, per layer.
#[derive(Debug, Clone)]
pub struct Lru {
    layers: Vec<LruList>,
}

impl Lru {
    pub fn new(n_expert: usize, slots: &[u32]) -> Lru {
        Lru {
            layers: slots.iter().map(|&s| LruList::new(n_expert, s)).collect(),
        }
    }
}

impl Policy for Lru {
    #[inline]
    fn access(&mut self, layer: usize, ids: &[u16]) -> u32 {
        self.layers[layer].access(ids)
    }

    fn is_resident(&self, layer: usize, expert: u16) -> bool {
        self.layers[layer].contains(expert)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::tests::run;
    use proptest::strategy::Strategy as _;

    #[test]
    fn hand_computed() {
        // Two slots: 1,2 load; 1 hits; 3 evicts 2 (LRU); 2 evicts 1; 3 hits.
        let mut p = Lru::new(4, &[2]);
        let m = run(&mut p, &[&[1], &[2], &[1], &[3], &[2], &[3]]);
        assert_eq!(m, vec![1, 1, 0, 1, 1, 0]);
        assert!(p.is_resident(0, 2) && p.is_resident(0, 3) && !p.is_resident(0, 1));
    }

    #[test]
    fn token_larger_than_cache_streams() {
        let mut p = Lru::new(8, &[2]);
        // 3 streams past {1, 2}; the next token hits 1 and 2.
        assert_eq!(run(&mut p, &[&[1, 2, 3], &[1, 2, 3]]), vec![3, 1]);
        let mut p = Lru::new(8, &[0]);
        assert_eq!(run(&mut p, &[&[1], &[1]]), vec![1, 1]);
    }

    /// The obvious model: a vector from least to most recent; the token's hits are refreshed
    /// first, then each miss evicts the least recent expert the token does not use.
    fn reference(n_slots: usize, steps: &[Vec<u16>]) -> Vec<u32> {
        let mut order: Vec<u16> = Vec::new();
        steps
            .iter()
            .map(|ids| {
                for &e in ids {
                    if let Some(p) = order.iter().position(|&x| x == e) {
                        order.remove(p);
                        order.push(e);
                    }
                }
                let mut misses = 0;
                for &e in ids {
                    if order.contains(&e) {
                        continue;
                    }
                    misses += 1;
                    if n_slots == 0 {
                        continue;
                    }
                    if order.len() == n_slots {
                        match order.iter().position(|x| !ids.contains(x)) {
                            Some(p) => {
                                order.remove(p);
                            }
                            None => continue,
                        }
                    }
                    order.push(e);
                }
                misses
            })
            .collect()
    }

    proptest::proptest! {
        #[test]
        fn matches_the_reference_model(
            slots in 0usize..6,
            steps in proptest::collection::vec(
                proptest::sample::subsequence((0u16..10).collect::<Vec<_>>(), 0..4)
                    .prop_shuffle(),
                0..80,
            ),
        ) {
            let mut p = Lru::new(10, &[slots as u32]);
            let refs: Vec<&[u16]> = steps.iter().map(|v| v.as_slice()).collect();
            proptest::prop_assert_eq!(run(&mut p, &refs), reference(slots, &steps));
        }
    }

    #[test]
    fn multi_id_steps_keep_current_token() {
        let mut p = Lru::new(8, &[3]);
        // {1,2} then {3,4}: 3 fills the free slot, 4 evicts 1 (3 is this token's).
        assert_eq!(run(&mut p, &[&[1, 2], &[3, 4], &[3, 4]]), vec![2, 2, 0]);
        assert!(!p.is_resident(0, 1));
    }
}
