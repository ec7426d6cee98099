//! `static` and `pin-lru`: resident sets fixed from calibration counts.
//!
//! Owns the pinned sets chosen from [`Counts`] (top experts per layer) and, for `pin-lru`, the
//! per-layer split between pinned slots and an LRU over the rest, chosen by replaying the
//! calibration routing (never the scored part). Pinned experts are never evicted.

use super::lru::LruList;
use super::{Counts, Policy, Setup};
use crate::trace::Routing;

/// The top-S experts of each layer by calibration count (ties: lower id), fixed. An expert
/// outside that set streams past the cache: every use is a load.
#[derive(Debug, Clone)]
pub struct Static {
    pinned: Vec<Vec<bool>>,
}

impl Static {
    pub fn new(n_expert: usize, slots: &[u32], counts: &Counts) -> Static {
        let pinned = slots
            .iter()
            .enumerate()
            .map(|(l, &s)| pinned_row(n_expert, counts, l, s as usize))
            .collect();
        Static { pinned }
    }
}

/// Membership of the top-`n` experts of `layer` (all zero counts rank by id).
fn pinned_row(n_expert: usize, counts: &Counts, layer: usize, n: usize) -> Vec<bool> {
    let mut row = vec![false; n_expert];
    if layer < counts.n_layer && counts.n_expert == n_expert {
        for e in counts.ranked(layer).into_iter().take(n) {
            row[usize::from(e)] = true;
        }
    } else {
        row.iter_mut().take(n).for_each(|x| *x = true);
    }
    row
}

impl Policy for Static {
    fn access(&mut self, layer: usize, ids: &[u16]) -> u32 {
        let row = &self.pinned[layer];
        ids.iter().filter(|&&e| !row[usize::from(e)]).count() as u32
    }

    fn is_resident(&self, layer: usize, expert: u16) -> bool {
        self.pinned[layer][usize::from(expert)]
    }
}

#[derive(Debug, Clone)]
struct PinLayer {
    pinned: Vec<bool>,
    lru: LruList,
}

impl PinLayer {
    fn new(n_expert: usize, counts: &Counts, layer: usize, slots: u32, pinned: u32) -> PinLayer {
        PinLayer {
            pinned: pinned_row(n_expert, counts, layer, pinned as usize),
            lru: LruList::new(n_expert, slots - pinned),
        }
    }

    fn access(&mut self, ids: &[u16], scratch: &mut Vec<u16>) -> u32 {
        scratch.clear();
        scratch.extend(
            ids.iter()
                .copied()
                .filter(|&e| !self.pinned[usize::from(e)]),
        );
        self.lru.access(scratch)
    }
}

/// A pinned hot set per layer plus LRU on the other slots.
#[derive(Debug, Clone)]
pub struct PinLru {
    layers: Vec<PinLayer>,
    /// Pinned slots chosen for each layer.
    pub split: Vec<u32>,
    scratch: Vec<u16>,
}

impl PinLru {
    /// Chooses each layer's pinned count by replaying the calibration routing for candidate
    /// splits (0, S/8, …, S); without calibration routing, pins half the slots.
    pub fn new(setup: &Setup<'_>) -> PinLru {
        let n = setup.n_expert;
        let mut scratch = Vec::new();
        let split: Vec<u32> = setup
            .slots
            .iter()
            .enumerate()
            .map(|(l, &s)| match setup.calibration {
                Some(cal) if !cal.is_empty() && l < cal.n_layer() => {
                    best_split(n, setup.counts, cal, l, s, &mut scratch)
                }
                _ => s / 2,
            })
            .collect();
        Self::with_split(n, &setup.slots, setup.counts, split)
    }

    /// A pin-lru with the given pinned count per layer (clamped to the layer's slots).
    pub fn with_split(n_expert: usize, slots: &[u32], counts: &Counts, split: Vec<u32>) -> PinLru {
        let split: Vec<u32> = split.iter().zip(slots).map(|(&p, &s)| p.min(s)).collect();
        let layers = slots
            .iter()
            .zip(&split)
            .enumerate()
            .map(|(l, (&s, &p))| PinLayer::new(n_expert, counts, l, s, p))
            .collect();
        PinLru {
            layers,
            split,
            scratch: Vec::new(),
        }
    }
}

fn best_split(
    n_expert: usize,
    counts: &Counts,
    cal: &Routing,
    layer: usize,
    slots: u32,
    scratch: &mut Vec<u16>,
) -> u32 {
    let step = (slots / 8).max(1);
    let mut best = (u64::MAX, 0);
    let mut p = 0;
    loop {
        let mut layer_cache = PinLayer::new(n_expert, counts, layer, slots, p);
        let misses: u64 = (0..cal.steps())
            .map(|s| u64::from(layer_cache.access(cal.ids(s, layer), scratch)))
            .sum();
        if misses < best.0 {
            best = (misses, p);
        }
        if p == slots {
            break;
        }
        p = (p + step).min(slots);
    }
    best.1
}

impl Policy for PinLru {
    fn access(&mut self, layer: usize, ids: &[u16]) -> u32 {
        self.layers[layer].access(ids, &mut self.scratch)
    }

    fn is_resident(&self, layer: usize, expert: u16) -> bool {
        let l = &self.layers[layer];
        l.pinned[usize::from(expert)] || l.lru.contains(expert)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::tests::{routing, run};

    #[test]
    fn static_pins_the_top_counts() {
        let cal = routing(&[&[1, 2], &[1, 3], &[1, 2]]);
        let counts = Counts::of(&cal, 5);
        let mut p = Static::new(5, &[2], &counts);
        // Pinned {1, 2}: 3 and 4 are loads every time, nothing changes.
        assert_eq!(run(&mut p, &[&[1, 3], &[3, 4], &[2, 1]]), vec![1, 2, 0]);
        assert!(p.is_resident(0, 1) && p.is_resident(0, 2) && !p.is_resident(0, 3));
    }

    #[test]
    fn pin_lru_pins_and_caches_the_rest() {
        let cal = routing(&[&[0, 1], &[0, 2], &[0, 3]]);
        let counts = Counts::of(&cal, 6);
        let mut p = PinLru::with_split(6, &[3], &counts, vec![1]);
        // Expert 0 pinned; LRU of 2 over the rest: 4,5 load, 4 hits, 1 evicts 5, 5 evicts 4.
        let m = run(&mut p, &[&[0, 4], &[5], &[4, 0], &[1], &[5]]);
        assert_eq!(m, vec![1, 1, 0, 1, 1]);
        assert!(p.is_resident(0, 0) && p.is_resident(0, 1) && p.is_resident(0, 5));
        assert!(!p.is_resident(0, 4));
    }

    #[test]
    fn pin_lru_split_follows_calibration() {
        // Expert 0 every third token, the others cycling through 4 experts: a 2-slot LRU loses
        // 0 between its uses (every access a load), a pinned 0 never does.
        let steps: Vec<Vec<u16>> = (0..60)
            .map(|i| vec![if i % 3 == 0 { 0 } else { 1 + (i % 6) as u16 }])
            .collect();
        let refs: Vec<&[u16]> = steps.iter().map(|v| v.as_slice()).collect();
        let cal = routing(&refs);
        let counts = Counts::of(&cal, 8);
        let setup = Setup {
            n_expert: 8,
            k: 1,
            slots: vec![2],
            counts: &counts,
            prior: None,
            calibration: Some(&cal),
        };
        let p = PinLru::new(&setup);
        assert!(p.split[0] >= 1, "{:?}", p.split);
    }
}
