//! `spark`: spark's default policy, a learned estimate of each expert's next-use distance.
//!
//! Belady evicts the expert whose next use is farthest. `spark` estimates that distance from what
//! is known when it must choose: how long ago the expert was last used (temporal locality: MoE
//! routing of consecutive tokens overlaps) and how popular it is in its layer (frequency skew:
//! a few experts per layer take a large share of tokens). It learns the mapping online, from the
//! trace it serves: for every (layer, expert) after every token it records an observation
//! "gap since last use = j, popularity rank bucket = f" and, when the expert is next used (or
//! `horizon` tokens pass), the distance to that use, capped at the horizon. The mean capped
//! distance per (gap bucket, rank bucket) cell is the prediction; the resident expert with the
//! largest prediction is evicted. Calibration routing trains the model like any served token,
//! so the calibrated priors are the model's cells and counts, not hand-set weights.
//!
//! What this module deliberately does not do: it never sees a token's routing before serving it
//! (the honesty rule), and it does not prefetch: a miss counts one load, a prefetch is a load
//! too, so prefetching cannot lower the miss count (it only hides latency, which the
//! simulator does not score). Earlier layers of the same token would inform a prefetch, not an
//! eviction: the eviction decision at layer l is about layer l of later tokens.
//!
//! The one constant is the horizon: `max(32, 8 × slots / k)` tokens, long enough for the cache
//! to turn over several times, beyond which the order of two far-away experts does not matter.

use super::{serve_scored, Counts, Policy, ResidentSet};

/// Gap buckets: 0, 1, 2, 3, then two buckets per power of two.
const GAP_BUCKETS: usize = 32;
/// Popularity buckets: octiles of the rank within the layer.
const RANK_BUCKETS: usize = 8;
const CELLS: usize = GAP_BUCKETS * RANK_BUCKETS;

#[inline]
fn gap_bucket(j: u64) -> usize {
    if j < 4 {
        return j as usize;
    }
    let b = 63 - j.leading_zeros() as usize; // floor(log2 j) >= 2
    let half = ((j >> (b - 1)) & 1) as usize;
    (4 + (b - 2) * 2 + half).min(GAP_BUCKETS - 1)
}

/// Mean capped next-use distance per cell, shared by all layers.
#[derive(Debug, Clone)]
struct DistanceModel {
    sum: Vec<f64>,
    n: Vec<f64>,
    horizon: u64,
}

impl DistanceModel {
    fn observe(&mut self, cell: usize, distance: u64) {
        self.sum[cell] += distance as f64;
        self.n[cell] += 1.0;
    }

    /// Predicted capped distance: the cell mean, with one pseudo-observation at half the horizon
    /// so an empty cell neither attracts nor repels eviction.
    #[inline]
    fn predict(&self, cell: usize) -> f64 {
        (self.sum[cell] + self.horizon as f64 / 2.0) / (self.n[cell] + 1.0)
    }
}

#[derive(Debug, Clone)]
struct SparkLayer {
    set: ResidentSet,
    count: Vec<u64>,
    /// Step of the last use (0 = before the first token).
    last: Vec<u64>,
    /// Experts by descending count; `pos` is the inverse.
    order: Vec<u16>,
    pos: Vec<u32>,
    step: u64,
}

impl SparkLayer {
    fn new(n_expert: usize, cap: u32, prior: Option<&[u64]>) -> SparkLayer {
        let count = match prior {
            Some(p) if p.len() == n_expert => p.to_vec(),
            _ => vec![0; n_expert],
        };
        let mut order: Vec<u16> = (0..n_expert as u32).map(|e| e as u16).collect();
        order.sort_by(|&a, &b| {
            count[usize::from(b)]
                .cmp(&count[usize::from(a)])
                .then(a.cmp(&b))
        });
        let mut pos = vec![0; n_expert];
        for (i, &e) in order.iter().enumerate() {
            pos[usize::from(e)] = i as u32;
        }
        SparkLayer {
            set: ResidentSet::new(n_expert, cap as usize),
            count,
            last: vec![0; n_expert],
            order,
            pos,
            step: 0,
        }
    }

    #[inline]
    fn cell(&self, e: usize, gap: u64) -> usize {
        let rank = self.pos[e] as usize * RANK_BUCKETS / self.order.len();
        gap_bucket(gap) * RANK_BUCKETS + rank
    }

    fn bump(&mut self, e: u16) {
        let e = usize::from(e);
        self.count[e] += 1;
        let mut p = self.pos[e] as usize;
        while p > 0 {
            let up = usize::from(self.order[p - 1]);
            if self.count[up] >= self.count[e] {
                break;
            }
            self.order.swap(p - 1, p);
            self.pos[up] = p as u32;
            p -= 1;
        }
        self.pos[e] = p as u32;
    }

    fn access(&mut self, ids: &[u16], model: &mut DistanceModel) -> u32 {
        self.step += 1;
        let t = self.step;
        let mut set = std::mem::take(&mut self.set);
        let misses = {
            let this = &*self;
            let model = &*model;
            serve_scored(&mut set, ids, true, |m| {
                let e = usize::from(m);
                // The observation after this token: gap 0 for the token's own expert (the
                // newcomer competing for admission), t - last for the others.
                let gap = if ids.contains(&m) {
                    0
                } else {
                    t - this.last[e]
                };
                let d = model.predict(this.cell(e, gap));
                (-d, if gap == 0 { t } else { this.last[e] })
            })
        };
        self.set = set;
        // Learn: resolve the observations this token settles.
        let h = model.horizon;
        for &id in ids {
            let e = usize::from(id);
            let gap = t - self.last[e];
            // Observations made at gaps j = gap - h.. gap - 1 (those still pending) resolve
            // with distance gap - j.
            for j in gap.saturating_sub(h)..gap {
                model.observe(self.cell(e, j), gap - j);
            }
        }
        for e in 0..self.last.len() {
            let gap = t - self.last[e];
            if gap >= h && !ids.contains(&(e as u16)) {
                // The observation made h tokens ago has waited the whole horizon.
                model.observe(self.cell(e, gap - h), h);
            }
        }
        for &id in ids {
            self.last[usize::from(id)] = t;
            self.bump(id);
        }
        misses
    }
}

/// Spark's default policy.
#[derive(Debug, Clone)]
pub struct Spark {
    layers: Vec<SparkLayer>,
    model: DistanceModel,
}

impl Spark {
    /// `prior`: counts known before the first token (a profile); pass `None` when the counts'
    /// routing will be replayed through [`Policy::access`] instead, so it is not counted twice.
    pub fn new(n_expert: usize, slots: &[u32], prior: Option<&Counts>, k: usize) -> Spark {
        let mean_slots =
            slots.iter().map(|&s| u64::from(s)).sum::<u64>() / slots.len().max(1) as u64;
        let horizon = (8 * mean_slots / k.max(1) as u64).max(32);
        let layers = slots
            .iter()
            .enumerate()
            .map(|(l, &s)| {
                let row = prior
                    .filter(|c| l < c.n_layer && c.n_expert == n_expert)
                    .map(|c| c.layer(l));
                SparkLayer::new(n_expert, s, row)
            })
            .collect();
        Spark {
            layers,
            model: DistanceModel {
                sum: vec![0.0; CELLS],
                n: vec![0.0; CELLS],
                horizon,
            },
        }
    }
}

impl Policy for Spark {
    fn access(&mut self, layer: usize, ids: &[u16]) -> u32 {
        self.layers[layer].access(ids, &mut self.model)
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
    fn gap_buckets_are_monotone_and_bounded() {
        let mut prev = 0;
        for j in 0..100_000u64 {
            let b = gap_bucket(j);
            assert!(b >= prev && b < GAP_BUCKETS);
            prev = b;
        }
        assert_eq!(
            (0..9).map(gap_bucket).collect::<Vec<_>>(),
            vec![0, 1, 2, 3, 4, 4, 5, 5, 6]
        );
    }

    #[test]
    fn cold_start_falls_back_to_recency() {
        // No data yet: every prediction is equal, so the least recent resident is evicted (LRU).
        let mut p = Spark::new(4, &[2], None, 1);
        let m = run(&mut p, &[&[1], &[2], &[3]]);
        assert_eq!(m, vec![1, 1, 1]);
        assert!(!p.is_resident(0, 1) && p.is_resident(0, 2) && p.is_resident(0, 3));
    }

    #[test]
    fn learns_to_keep_the_frequent_expert() {
        // Expert 0 every third token; the tokens between use experts that never return.
        let mut steps: Vec<Vec<u16>> = Vec::new();
        let mut next = 1u16;
        for i in 0..300 {
            if i % 3 == 0 {
                steps.push(vec![0]);
            } else {
                steps.push(vec![next]);
                next = if next == 200 { 1 } else { next + 1 };
            }
        }
        let refs: Vec<&[u16]> = steps.iter().map(|v| v.as_slice()).collect();
        let mut s = Spark::new(201, &[2], None, 1);
        let mut l = crate::cache::Lru::new(201, &[2]);
        let sm: u32 = run(&mut s, &refs).iter().sum();
        let lm: u32 = run(&mut l, &refs).iter().sum();
        // LRU: 0 is evicted by the two one-offs between its uses, so every access misses.
        assert_eq!(lm, 300);
        // Spark learns after a warm-up that 0 comes back and one-offs do not.
        assert!(sm < 230, "spark {sm} lru {lm}");
    }

    #[test]
    fn prior_counts_rank_experts() {
        let mut c = Counts::zero(1, 4);
        c.set(0, 3, 10);
        c.set(0, 1, 5);
        let p = Spark::new(4, &[2], Some(&c), 1);
        assert_eq!(p.layers[0].order[..2], [3, 1]);
    }
}
