//! `lfu` and `lfru`: frequency-driven eviction.
//!
//! Owns per-layer use counts and last-use steps (calibration warms them like any other token).
//! `lfu` evicts the lowest count (ties: least recent); `lfru`, frequency-weighted recency as in
//! vLLM's expert cache, evicts the lowest `count / (1 + age)`. Neither ever evicts an expert the
//! current token uses.

use super::{serve_scored, Policy, ResidentSet};

#[derive(Debug, Clone)]
struct FreqLayer {
    set: ResidentSet,
    count: Vec<u64>,
    last: Vec<u64>,
    step: u64,
}

impl FreqLayer {
    fn new(n_expert: usize, cap: u32) -> FreqLayer {
        FreqLayer {
            set: ResidentSet::new(n_expert, cap as usize),
            count: vec![0; n_expert],
            last: vec![0; n_expert],
            step: 0,
        }
    }

    fn access(&mut self, ids: &[u16], weighted: bool) -> u32 {
        self.step += 1;
        let (count, last, step) = (&self.count, &self.last, self.step);
        let misses = serve_scored(&mut self.set, ids, false, |m| {
            let m = usize::from(m);
            let c = count[m] as f64;
            let s = if weighted {
                c / (1 + step - last[m]) as f64
            } else {
                c
            };
            (s, last[m])
        });
        for &e in ids {
            self.count[usize::from(e)] += 1;
            self.last[usize::from(e)] = step;
        }
        misses
    }
}

/// Least frequently used, per layer.
#[derive(Debug, Clone)]
pub struct Lfu {
    layers: Vec<FreqLayer>,
}

impl Lfu {
    pub fn new(n_expert: usize, slots: &[u32]) -> Lfu {
        Lfu {
            layers: slots.iter().map(|&s| FreqLayer::new(n_expert, s)).collect(),
        }
    }
}

impl Policy for Lfu {
    fn access(&mut self, layer: usize, ids: &[u16]) -> u32 {
        self.layers[layer].access(ids, false)
    }

    fn is_resident(&self, layer: usize, expert: u16) -> bool {
        self.layers[layer].set.contains(expert)
    }
}

/// Frequency-weighted LRU, per layer.
#[derive(Debug, Clone)]
pub struct Lfru {
    layers: Vec<FreqLayer>,
}

impl Lfru {
    pub fn new(n_expert: usize, slots: &[u32]) -> Lfru {
        Lfru {
            layers: slots.iter().map(|&s| FreqLayer::new(n_expert, s)).collect(),
        }
    }
}

impl Policy for Lfru {
    fn access(&mut self, layer: usize, ids: &[u16]) -> u32 {
        self.layers[layer].access(ids, true)
    }

    fn is_resident(&self, layer: usize, expert: u16) -> bool {
        self.layers[layer].set.contains(expert)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::tests::run;

    #[test]
    fn lfu_hand_computed() {
        let mut p = Lfu::new(4, &[2]);
        let m = run(&mut p, &[&[1], &[1], &[2], &[1], &[3], &[2], &[1]]);
        // Step 5 {3}: 1 has count 3, 2 count 1: evict 2. Step 6 {2}: 3 has count 1: evict 3.
        assert_eq!(m, vec![1, 0, 1, 0, 1, 1, 0]);
        assert!(p.is_resident(0, 1) && p.is_resident(0, 2) && !p.is_resident(0, 3));
    }

    #[test]
    fn lfu_ties_evict_least_recent() {
        let mut p = Lfu::new(4, &[2]);
        // 1 and 2 both count 1, 1 is older: 3 evicts 1.
        assert_eq!(run(&mut p, &[&[1], &[2], &[3], &[2]]), vec![1, 1, 1, 0]);
        assert!(!p.is_resident(0, 1));
    }

    #[test]
    fn lfru_weighs_frequency_by_age() {
        let mut p = Lfru::new(5, &[2]);
        // After steps 1..=4: count(1)=3 last=3, count(2)=1 last=4.
        // Step 5 {3}: score(1) = 3/(1+5-3) = 1.0, score(2) = 1/(1+5-4) = 0.5: evict 2.
        assert_eq!(
            run(&mut p, &[&[1], &[1], &[1], &[2], &[3]]),
            vec![1, 0, 0, 1, 1]
        );
        assert!(p.is_resident(0, 1) && !p.is_resident(0, 2));
        // Step 6 {4}: score(1) = 3/(1+6-3) = 0.75, score(3) = 1/(1+6-5) = 0.5: evict 3.
        let mut q = Lfru::new(5, &[2]);
        let m = run(&mut q, &[&[1], &[1], &[1], &[2], &[3], &[4]]);
        assert_eq!(m, vec![1, 0, 0, 1, 1, 1]);
        assert!(q.is_resident(0, 1) && q.is_resident(0, 4) && !q.is_resident(0, 3));
    }
}
