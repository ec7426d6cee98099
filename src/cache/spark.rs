//! `spark`: spark's default policy, an online choice among recency–frequency trade-offs.
//!
//! MoE routing mixes two signals whose balance differs by model, layer and workload: temporal
//! locality (consecutive tokens share experts; LRU exploits it) and frequency skew (a few experts
//! take a large share of a layer's tokens; LFU and pinning exploit it). No single fixed blend wins
//! everywhere, and the blend must not be tuned to one trace. So each layer keeps a family of
//! combined recency–frequency (CRF) scores, `Σ over past uses of 2^(-λ·age)`, with λ spanning
//! pure recency (λ = 1, LRU order) to pure frequency (λ = 0, LFU order) on a geometric grid, plus
//! the hyperbolic blend `count / (1 + age)` (vLLM's LFRU order), and runs a shadow cache of the
//! same size for each member on every layer it serves. The real caches evict by the member whose
//! shadows have missed least recently, summed over layers (follow the leader; pooling the layers
//! keeps the choice from chasing noise, forgetting with a half-life of 4 × n_expert / k tokens
//! keeps it from clinging to a past workload), and first evict what the leader's shadow does not
//! hold, so the real cache converges on the leader's contents: the blend is learned from the
//! routing itself and keeps adapting.
//!
//! Two more mechanisms: at startup every slot is filled (by prior counts when a profile is
//! known, else by expert id), because loading at startup costs no decode time and an empty slot
//! serves nothing; and a profile's counts seed the frequency member.
//!
//! What it never does: see a token's routing before serving it (the honesty rule), or prefetch.
//! A miss counts one load and a prefetch is a load too, so prefetching (for example predicting
//! layer l from layer l-1 of the same token) can hide latency but never lower the miss count;
//! the simulator scores misses, so that mechanism belongs to the runtime, not to this policy.

use super::{serve_scored, Counts, Policy, ResidentSet};

/// Decay rates of the family, from pure recency to pure frequency.
const LAMBDAS: [f64; 7] = [1.0, 0.5, 0.25, 0.125, 0.0625, 0.03125, 0.0];
const F: usize = LAMBDAS.len();
/// Members: the CRF family plus the hyperbolic blend `count / (1 + age)` (lfru's order).
const M: usize = F + 1;
/// Ages beyond this decay like this one (2^-(λ·4096) is 0 for every λ > 0 that matters).
const MAX_AGE: usize = 4096;

/// `2^(-λ·age)` for every member and age up to [`MAX_AGE`].
#[derive(Debug, Clone)]
struct DecayTable(Vec<[f64; F]>);

impl DecayTable {
    fn new() -> DecayTable {
        DecayTable(
            (0..=MAX_AGE)
                .map(|age| {
                    let mut row = [0.0; F];
                    for (f, l) in LAMBDAS.iter().enumerate() {
                        row[f] = (-(l * age as f64)).exp2();
                    }
                    row
                })
                .collect(),
        )
    }

    #[inline]
    fn get(&self, age: u64, f: usize) -> f64 {
        self.0[(age as usize).min(MAX_AGE)][f]
    }
}

#[derive(Debug, Clone)]
struct SparkLayer {
    set: ResidentSet,
    shadows: Vec<ResidentSet>,
    /// CRF of each expert per member, as of its last use.
    crf: Vec<[f64; F]>,
    /// Step of the last use (0 = before the first token).
    last: Vec<u64>,
    step: u64,
}

impl SparkLayer {
    fn new(n_expert: usize, cap: u32, prior: Option<&[u64]>) -> SparkLayer {
        let cap = cap as usize;
        let mut crf = vec![[0.0; F]; n_expert];
        let mut order: Vec<u16> = (0..n_expert as u32).map(|e| e as u16).collect();
        if let Some(p) = prior.filter(|p| p.len() == n_expert) {
            for (e, &c) in p.iter().enumerate() {
                crf[e][F - 1] = c as f64;
            }
            order.sort_by(|&a, &b| p[usize::from(b)].cmp(&p[usize::from(a)]).then(a.cmp(&b)));
        }
        let mut set = ResidentSet::new(n_expert, cap);
        for &e in order.iter().take(cap) {
            set.insert(e);
        }
        SparkLayer {
            shadows: vec![set.clone(); M],
            set,
            crf,
            last: vec![0; n_expert],
            step: 0,
        }
    }

    /// Serves `ids`, adding each shadow's misses to `shadow_misses`; the real cache evicts by
    /// the member `lead`.
    fn access(
        &mut self,
        ids: &[u16],
        decay: &DecayTable,
        shadow_misses: &mut [f64; M],
        forget: f64,
        lead: usize,
    ) -> u32 {
        self.step += 1;
        let t = self.step;
        let (crf, last) = (&self.crf, &self.last);
        let score = |f: usize, m: u16| {
            let e = usize::from(m);
            let age = t - last[e];
            let v = if f < F {
                crf[e][f] * decay.get(age, f)
            } else {
                crf[e][F - 1] / (1 + age) as f64
            };
            (v, last[e])
        };
        for (f, shadow) in self.shadows.iter_mut().enumerate() {
            let m = serve_scored(shadow, ids, false, |m| score(f, m));
            shadow_misses[f] = shadow_misses[f] * forget + f64::from(m);
        }
        // Evict first what the leading shadow does not hold, so the real cache converges on the
        // leader's contents without extra loads when the leader changes; then by its score.
        let leader_set = &self.shadows[lead];
        let misses = serve_scored(&mut self.set, ids, false, |m| {
            if leader_set.contains(m) {
                score(lead, m)
            } else {
                (-1.0, last[usize::from(m)])
            }
        });
        for &id in ids {
            let e = usize::from(id);
            let age = t - self.last[e];
            for f in 0..F {
                self.crf[e][f] = self.crf[e][f] * decay.get(age, f) + 1.0;
            }
            self.last[e] = t;
        }
        misses
    }
}

/// Spark's default policy.
#[derive(Debug, Clone)]
pub struct Spark {
    layers: Vec<SparkLayer>,
    decay: DecayTable,
    /// Misses of each member's shadow caches, summed over layers, exponentially forgotten.
    shadow_misses: [f64; M],
    /// Per-access forgetting factor of `shadow_misses`.
    forget: f64,
}

impl Spark {
    /// `prior`: counts known before the first token (a profile); they order the startup fill and
    /// seed the frequency member. Pass `None` when the counts' routing is replayed through
    /// [`Policy::access`] instead, so it is not counted twice. `k`: experts per token.
    pub fn new(n_expert: usize, slots: &[u32], prior: Option<&Counts>, k: usize) -> Spark {
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
        // Routing statistics of a layer settle over a few uses of every expert: forget shadow
        // misses with a half-life of 4 × n_expert / k tokens (each token is one access per
        // layer), so the choice follows a workload that changes.
        let half_life = 4.0 * n_expert as f64 / k.max(1) as f64 * slots.len().max(1) as f64;
        let forget = (-1.0 / half_life).exp2();
        Spark {
            layers,
            decay: DecayTable::new(),
            shadow_misses: [0.0; M],
            forget,
        }
    }

    /// The member whose shadows have missed least (ties: the more recency-driven).
    fn leader(&self) -> usize {
        let mut best = 0;
        for f in 1..M {
            if self.shadow_misses[f] < self.shadow_misses[best] {
                best = f;
            }
        }
        best
    }

    /// The blend the cache currently follows: `Some(λ)` of the CRF family (1 = recency,
    /// 0 = frequency), `None` for the hyperbolic `count / (1 + age)`.
    pub fn lambda(&self) -> Option<f64> {
        LAMBDAS.get(self.leader()).copied()
    }
}

impl Policy for Spark {
    fn access(&mut self, layer: usize, ids: &[u16]) -> u32 {
        let lead = self.leader();
        self.layers[layer].access(ids, &self.decay, &mut self.shadow_misses, self.forget, lead)
    }

    fn is_resident(&self, layer: usize, expert: u16) -> bool {
        self.layers[layer].set.contains(expert)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::tests::run;
    use crate::cache::{Lfu, Lru};

    fn steps_of(v: &[Vec<u16>]) -> Vec<&[u16]> {
        v.iter().map(|s| s.as_slice()).collect()
    }

    #[test]
    fn startup_fill_follows_the_prior_then_ids() {
        let mut c = Counts::zero(1, 6);
        c.set(0, 4, 10);
        c.set(0, 2, 5);
        let p = Spark::new(6, &[3], Some(&c), 1);
        let resident: Vec<u16> = (0..6).filter(|&e| p.is_resident(0, e)).collect();
        assert_eq!(resident, vec![0, 2, 4]);
        // A cache as large as the layer never misses.
        let mut p = Spark::new(6, &[6], None, 2);
        assert_eq!(run(&mut p, &[&[5, 1], &[3, 0]]), vec![0, 0]);
    }

    #[test]
    fn follows_recency_when_recency_wins() {
        // 200 tokens over experts 0..6, then 400 over 10..16: the cache of 6 holds either
        // working set, so LRU only pays the switch, while LFU clings to the stale counts.
        let mut steps: Vec<Vec<u16>> = (0..200u16).map(|i| vec![i % 6, (i + 1) % 6]).collect();
        steps.extend((0..400u16).map(|i| vec![10 + (2 * i) % 6, 10 + (2 * i + 1) % 6]));
        let refs = steps_of(&steps);
        let mut s = Spark::new(16, &[6], None, 2);
        let sm: u32 = run(&mut s, &refs).iter().sum();
        let lm: u32 = run(&mut Lru::new(16, &[6]), &refs).iter().sum();
        let fm: u32 = run(&mut Lfu::new(16, &[6]), &refs).iter().sum();
        assert!(lm + 100 < fm, "lru {lm} lfu {fm}");
        assert!(sm <= lm + 20, "spark {sm} lru {lm}");
        assert_ne!(s.lambda(), Some(0.0));
    }

    #[test]
    fn follows_frequency_when_frequency_wins() {
        // Experts 0 and 1 every third token; the two tokens between use pairs of one-off
        // experts, enough to flush an LRU of 4. LFU keeps 0 and 1; spark must learn to.
        let mut steps: Vec<Vec<u16>> = Vec::new();
        let mut next = 2u16;
        for i in 0..600 {
            if i % 3 == 0 {
                steps.push(vec![0, 1]);
            } else {
                steps.push(vec![next, next + 1]);
                next = if next >= 96 { 2 } else { next + 2 };
            }
        }
        let refs = steps_of(&steps);
        let mut s = Spark::new(100, &[4], None, 2);
        let sm: u32 = run(&mut s, &refs).iter().sum();
        let lm: u32 = run(&mut Lru::new(100, &[4]), &refs).iter().sum();
        let fm: u32 = run(&mut Lfu::new(100, &[4]), &refs).iter().sum();
        assert!(fm + 100 < lm, "lfu {fm} lru {lm}");
        assert!(sm <= fm + 20, "spark {sm} lfu {fm}");
        assert_ne!(s.lambda(), Some(1.0));
    }

    #[test]
    fn decay_table_spans_recency_to_frequency() {
        let d = DecayTable::new();
        assert_eq!(d.get(0, 0), 1.0);
        assert_eq!(d.get(3, 0), 0.125);
        assert_eq!(d.get(1_000_000, F - 1), 1.0);
        assert_eq!(d.get(2, 1), 0.5);
    }
}
