//! A frozen copy of the `spark` policy as it was before it was made fast (commit 2cad393),
//! kept only for tests: the fast [`super::Spark`] must make exactly the decisions this one makes
//! (same misses on every access, same residency, same blend). Do not optimise or fix this file;
//! it is the reference. `ResidentSet` and `serve_scored` are copied in too, so a change to the
//! shared helpers in `cache/mod.rs` cannot move the reference along with the code under test.

use super::{Counts, Policy};
use crate::cache::NONE;

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
pub struct SparkRef {
    layers: Vec<SparkLayer>,
    decay: DecayTable,
    /// Misses of each member's shadow caches, summed over layers, exponentially forgotten.
    shadow_misses: [f64; M],
    /// Per-access forgetting factor of `shadow_misses`.
    forget: f64,
}

impl SparkRef {
    /// `prior`: counts known before the first token (a profile); they order the startup fill and
    /// seed the frequency member. Pass `None` when the counts' routing is replayed through
    /// [`Policy::access`] instead, so it is not counted twice. `k`: experts per token.
    pub fn new(n_expert: usize, slots: &[u32], prior: Option<&Counts>, k: usize) -> SparkRef {
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
        SparkRef {
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

#[cfg(test)]
impl SparkRef {
    /// Every cache of `layer` in slot order: the shadows, then the real one.
    pub(crate) fn caches(&self, layer: usize) -> Vec<Vec<u16>> {
        let l = &self.layers[layer];
        let mut v: Vec<Vec<u16>> = l.shadows.iter().map(|s| s.members.clone()).collect();
        v.push(l.set.members.clone());
        v
    }

    pub(crate) fn shadow_misses(&self) -> [f64; M] {
        self.shadow_misses
    }
}

impl Policy for SparkRef {
    fn access(&mut self, layer: usize, ids: &[u16]) -> u32 {
        let lead = self.leader();
        self.layers[layer].access(ids, &self.decay, &mut self.shadow_misses, self.forget, lead)
    }

    fn is_resident(&self, layer: usize, expert: u16) -> bool {
        self.layers[layer].set.contains(expert)
    }
}

/// The resident set of one layer: membership by expert, members in a dense list.
#[derive(Debug, Clone, Default)]
struct ResidentSet {
    cap: usize,
    members: Vec<u16>,
    pos: Vec<u32>,
}

impl ResidentSet {
    fn new(n_expert: usize, cap: usize) -> ResidentSet {
        ResidentSet {
            cap,
            members: Vec::with_capacity(cap),
            pos: vec![NONE; n_expert],
        }
    }

    #[inline]
    fn contains(&self, e: u16) -> bool {
        self.pos[usize::from(e)] != NONE
    }

    #[inline]
    fn is_full(&self) -> bool {
        self.members.len() >= self.cap
    }

    #[inline]
    fn insert(&mut self, e: u16) {
        debug_assert!(!self.contains(e) && !self.is_full());
        self.pos[usize::from(e)] = self.members.len() as u32;
        self.members.push(e);
    }

    #[inline]
    fn remove(&mut self, e: u16) {
        let p = self.pos[usize::from(e)] as usize;
        let last = *self.members.last().expect("remove from a non-empty set");
        self.members[p] = last;
        self.pos[usize::from(last)] = p as u32;
        self.members.pop();
        self.pos[usize::from(e)] = NONE;
    }
}

/// Serves `ids` on a score-evicting set: hits are free; a miss on a full set evicts the member
/// with the lowest `score` (ties: lowest second key) among those not in `ids`. With `admit`,
/// the missing expert itself competes too (its score is asked for while it is not resident) and
/// is streamed past the cache when it scores lowest; without, it is streamed past only when every
/// member is in `ids`. Returns the loads.
#[inline]
fn serve_scored<S>(set: &mut ResidentSet, ids: &[u16], admit: bool, mut score: S) -> u32
where
    S: FnMut(u16) -> (f64, u64),
{
    let mut misses = 0;
    for &e in ids {
        if set.contains(e) {
            continue;
        }
        misses += 1;
        if set.cap == 0 {
            continue;
        }
        if set.is_full() {
            let mut victim = None;
            let mut best = (f64::INFINITY, u64::MAX);
            if admit {
                best = score(e);
                victim = Some(e);
            }
            for &m in &set.members {
                if ids.contains(&m) {
                    continue;
                }
                let s = score(m);
                if victim.is_none() || s.0 < best.0 || (s.0 == best.0 && s.1 < best.1) {
                    best = s;
                    victim = Some(m);
                }
            }
            match victim {
                Some(v) if v != e => set.remove(v),
                _ => continue,
            }
        }
        set.insert(e);
    }
    misses
}
