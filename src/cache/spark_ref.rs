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

#[cfg(test)]
mod tests {
    //! The differential test: random traces, random slot counts, random priors; the fast policy
    //! and this reference must agree on every access (misses), on the residency of every expert
    //! after it, and on the blend they follow.

    use rand::seq::SliceRandom;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    use super::SparkRef;
    use crate::cache::{Counts, Policy, Spark};

    /// One random workload: per step, per layer, the ids served.
    struct Case {
        n_expert: usize,
        k: usize,
        slots: Vec<u32>,
        prior: Option<Counts>,
        steps: Vec<Vec<Vec<u16>>>,
    }

    fn distinct(
        rng: &mut ChaCha8Rng,
        n: usize,
        k: usize,
        mut draw: impl FnMut(&mut ChaCha8Rng) -> u16,
    ) -> Vec<u16> {
        let mut ids = Vec::with_capacity(k);
        let mut guard = 0;
        while ids.len() < k.min(n) && guard < 1000 {
            let e = draw(rng);
            if !ids.contains(&e) {
                ids.push(e);
            }
            guard += 1;
        }
        ids
    }

    #[allow(clippy::needless_range_loop)]
    fn case(seed: u64, long: bool) -> Case {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let n_layer = rng.gen_range(1..=3);
        let n_expert = *[1usize, 2, 3, 5, 8, 16, 24, 40, 64]
            .choose(&mut rng)
            .unwrap();
        let k = rng.gen_range(1..=n_expert.min(8));
        let slots = (0..n_layer)
            .map(|_| match rng.gen_range(0..10) {
                0 => 0,
                1 => n_expert as u32 + rng.gen_range(0..3),
                2 => rng.gen_range(1..=k as u32),
                _ => rng.gen_range(k as u32..=n_expert as u32),
            })
            .collect();
        let prior = match rng.gen_range(0..4) {
            0 => {
                let mut c = Counts::zero(n_layer, n_expert);
                let flat = rng.gen_bool(0.3);
                for l in 0..n_layer {
                    for e in 0..n_expert {
                        let v = if flat {
                            7
                        } else {
                            rng.gen_range(0..5u64).pow(3)
                        };
                        c.set(l, e, v);
                    }
                }
                Some(c)
            }
            _ => None,
        };
        let n_steps = if long {
            rng.gen_range(4500..9000)
        } else {
            rng.gen_range(1..700)
        };
        let mode = rng.gen_range(0..5);
        // A per-layer ranking for skewed draws, pairs that always come together, phases.
        let perm: Vec<u16> = {
            let mut p: Vec<u16> = (0..n_expert as u16).collect();
            p.shuffle(&mut rng);
            p
        };
        let mut prev: Vec<Vec<u16>> = vec![Vec::new(); n_layer];
        let mut steps = Vec::with_capacity(n_steps);
        let mut phase_set: Vec<u16> = perm.iter().copied().take(k.max(2).min(n_expert)).collect();
        for s in 0..n_steps {
            if long && s % rng.gen_range(500..6000) == 0 {
                // A new working set; long stretches of it age everything else.
                let size = rng.gen_range(k..=(2 * k).min(n_expert));
                phase_set = distinct(&mut rng, n_expert, size, |r| {
                    r.gen_range(0..n_expert as u16)
                });
            }
            let mut layers = Vec::with_capacity(n_layer);
            for l in 0..n_layer {
                let kk = if rng.gen_bool(0.05) {
                    rng.gen_range(0..=k)
                } else {
                    k
                };
                let mut ids = match mode {
                    0 => distinct(&mut rng, n_expert, kk, |r| r.gen_range(0..n_expert as u16)),
                    1 => {
                        // Zipf-like with locality.
                        let p = &prev[l];
                        let perm = &perm;
                        distinct(&mut rng, n_expert, kk, |r| {
                            if !p.is_empty() && r.gen_bool(0.5) {
                                p[r.gen_range(0..p.len())]
                            } else {
                                let x: f64 = r.gen_range(0.0f64..1.0);
                                perm[((x * x * x) * n_expert as f64) as usize]
                            }
                        })
                    }
                    2 => {
                        // Pairs: 2i and 2i+1 always together (equal counts, equal recency).
                        let mut v = Vec::new();
                        while v.len() + 1 < kk.max(2) {
                            let a = 2 * rng.gen_range(0..(n_expert as u16).div_ceil(2));
                            if !v.contains(&a) {
                                v.push(a);
                                if usize::from(a) + 1 < n_expert {
                                    v.push(a + 1);
                                }
                            }
                            if n_expert < 4 {
                                break;
                            }
                        }
                        v.truncate(kk);
                        v
                    }
                    3 => {
                        // Phases of a small working set, sometimes one stray expert.
                        let set = &phase_set;
                        distinct(&mut rng, n_expert, kk, |r| {
                            if r.gen_bool(0.97) {
                                set[r.gen_range(0..set.len())]
                            } else {
                                r.gen_range(0..n_expert as u16)
                            }
                        })
                    }
                    _ => {
                        // Mostly one expert for a long time, then a burst.
                        if rng.gen_bool(0.9) {
                            vec![phase_set[0]]
                        } else {
                            distinct(&mut rng, n_expert, kk, |r| r.gen_range(0..n_expert as u16))
                        }
                    }
                };
                if !ids.is_empty() && rng.gen_bool(0.01) {
                    // A repeated id within one token.
                    let d = ids[rng.gen_range(0..ids.len())];
                    let at = rng.gen_range(0..=ids.len());
                    ids.insert(at, d);
                }
                prev[l] = ids.clone();
                layers.push(ids);
            }
            steps.push(layers);
        }
        Case {
            n_expert,
            k: rng.gen_range(1..=8),
            slots,
            prior,
            steps,
        }
    }

    fn check(seed: u64, long: bool) {
        let c = case(seed, long);
        let mut fast = Spark::new(c.n_expert, &c.slots, c.prior.as_ref(), c.k);
        let mut slow = SparkRef::new(c.n_expert, &c.slots, c.prior.as_ref(), c.k);
        let n_layer = c.slots.len();
        let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x5eed);
        for (s, layers) in c.steps.iter().enumerate() {
            let mut order: Vec<usize> = (0..n_layer).collect();
            if rng.gen_bool(0.1) {
                order.shuffle(&mut rng);
            }
            for l in order {
                let ids = &layers[l];
                let (a, b) = (fast.access(l, ids), slow.access(l, ids));
                assert_eq!(a, b, "seed {seed} step {s} layer {l} ids {ids:?}: misses");
                for e in 0..c.n_expert as u16 {
                    assert_eq!(
                        fast.is_resident(l, e),
                        slow.is_resident(l, e),
                        "seed {seed} step {s} layer {l} expert {e}: residency"
                    );
                }
            }
            assert_eq!(fast.lambda(), slow.lambda(), "seed {seed} step {s}: blend");
            assert_eq!(
                fast.shadow_misses().map(f64::to_bits),
                slow.shadow_misses().map(f64::to_bits),
                "seed {seed} step {s}: shadow misses"
            );
            for l in 0..n_layer {
                assert_eq!(
                    fast.caches(l),
                    slow.caches(l),
                    "seed {seed} step {s} layer {l}: slots"
                );
            }
        }
    }

    #[test]
    fn fast_policy_makes_the_reference_decisions() {
        for seed in 0..400 {
            check(seed, false);
        }
    }

    #[test]
    fn fast_policy_agrees_over_long_idle_stretches() {
        // Thousands of steps: residents idle past every member's safe age and past the decay
        // table's last age.
        for seed in 1000..1012 {
            check(seed, true);
        }
    }

    /// Serves one id per token on one layer of `slots` slots; every cache must match.
    fn lockstep(n_expert: usize, slots: u32, steps: &[u16]) {
        let mut fast = Spark::new(n_expert, &[slots], None, 1);
        let mut slow = SparkRef::new(n_expert, &[slots], None, 1);
        for (s, &e) in steps.iter().enumerate() {
            assert_eq!(fast.access(0, &[e]), slow.access(0, &[e]), "step {s}");
            assert_eq!(fast.caches(0), slow.caches(0), "step {s}");
            assert_eq!(fast.lambda(), slow.lambda(), "step {s}");
        }
    }

    #[test]
    fn idle_residents_past_the_decay_table_keep_the_reference_order() {
        // Past MAX_AGE every decaying score has stopped shrinking: two idle residents then rank
        // by their CRF, not by how long they have been idle. Expert 1 is used often and early,
        // expert 2 once and 300 tokens later; 6000 tokens of expert 0 later both are far past
        // the table, and a new expert must evict 2 (lower CRF), though 1 has idled longer.
        let mut steps: Vec<u16> = vec![1; 40];
        steps.extend(std::iter::repeat(0).take(300));
        steps.push(2);
        steps.push(3);
        steps.extend(std::iter::repeat(0).take(6000));
        steps.extend([9, 10, 1, 2, 3, 11, 12]);
        lockstep(16, 4, &steps);
    }

    #[test]
    fn idle_residents_older_than_the_decay_table() {
        // 4 slots, 1 expert per token: 0..4 used once, then only 0 for 5000 tokens, then new
        // experts: the victims are idle for more than MAX_AGE steps, where every decaying score
        // has stopped changing or is zero.
        let mut steps: Vec<u16> = vec![0, 1, 2, 3];
        steps.extend(std::iter::repeat(0).take(5000));
        steps.extend([9, 1, 10, 2, 11, 3, 12]);
        let mut fast = Spark::new(16, &[4], None, 1);
        let mut slow = SparkRef::new(16, &[4], None, 1);
        for (s, &e) in steps.iter().enumerate() {
            assert_eq!(fast.access(0, &[e]), slow.access(0, &[e]), "step {s}");
            for x in 0..16 {
                assert_eq!(
                    fast.is_resident(0, x),
                    slow.is_resident(0, x),
                    "step {s} expert {x}"
                );
            }
        }
    }
}
