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
//!
//! How it avoids scoring every resident of every shadow on every miss, without changing a
//! decision (`spark_ref.rs` in the tests keeps the original scan; a differential test on random
//! traces and a golden test on the shared trace hold the two together, cache by cache):
//! - A decaying member's score `crf · 2^(-λ·age)` keeps its order as time passes (every score
//!   shrinks by the same factor), so each expert carries a time-invariant key per member,
//!   `crf · 2^(λ·(last - t_ref))`, set once per use and shared by all caches. The victim is the
//!   smallest key up to rounding: only residents whose key is within a relative 2^-40 of the
//!   smallest (the rounding of a key and of a score is below 2^-49 each) are scored exactly,
//!   with the reference's tie-breaks (lower last use, then earlier slot). `λ = 0` keys are the
//!   scores themselves. Each shadow keeps a short "low list" of the residents that may hold the
//!   lowest keys (every other resident's key is at least its threshold), rebuilt by a scan when
//!   it runs dry.
//! - Where that order argument needs care it is not used: a resident idle longer than its
//!   member's safe age (the decay table's last age, or where `2^(-λ·age)` leaves the normal
//!   floats) sends that shadow back to the exact scan until it is gone.
//! - The hyperbolic member's order changes with time, so its scores are computed once per access
//!   with a miss, and each eviction of that access takes the lowest.
//! - The real cache evicts first what the leader does not hold (a short list built once per
//!   access), else by the leader's score.
//!
//! Its cost is still about one eviction per miss of each of the nine caches (eight shadows and
//! the real one), about 13 per token-layer on the shared trace at 32 of 64 slots, against LRU's
//! one or two: it simulates at a few million lookups per second, not LRU's hundred million.

// Members are indices into several parallel arrays (λ, tables, keys, misses): index loops read best.
#![allow(clippy::needless_range_loop)]

use std::sync::OnceLock;

use super::{Counts, Policy, NONE};

/// Decay rates of the family, from pure recency to pure frequency.
const LAMBDAS: [f64; 7] = [1.0, 0.5, 0.25, 0.125, 0.0625, 0.03125, 0.0];
const F: usize = LAMBDAS.len();
/// Members: the CRF family plus the hyperbolic blend `count / (1 + age)` (lfru's order).
const M: usize = F + 1;
/// Ages beyond this decay like this one (2^-(λ·4096) is 0 for every λ > 0 that matters).
const MAX_AGE: usize = 4096;
/// The decaying members (λ > 0) are `0..D`; member `D = F - 1` is λ = 0 (pure frequency).
/// Members `0..F` are ranked by key.
const D: usize = F - 1;
/// λ of decaying member `f` is `2^-SHIFT[f]`.
const SHIFT: [u32; D] = [0, 1, 2, 3, 4, 5];
/// The hyperbolic member's index.
const HYPER: usize = F;
/// The real cache's index among a layer's caches (after the `M` shadows).
const REAL: usize = M;
/// Keys within this relative distance of the smallest are scored exactly (the rounding of a
/// key and of a score is below 2^-49 each).
const SLACK: f64 = 1.0 / (1u64 << 40) as f64;
/// A decaying member's keys are rebased before `λ·(t - t_ref)` passes this.
const REBASE: u64 = 512;
/// How many of a shadow's lowest keys its low list holds after a rebuild.
const LOW: usize = 8;

/// What every `spark` policy shares: the decay table and the fractional gains.
struct Tables {
    /// `2^(-λ·age)` for every member and age up to [`MAX_AGE`] (the reference's table).
    decay: Vec<[f64; F]>,
    /// `2^(λ_f · r)` for `r < 2^SHIFT[f]`.
    frac: [[f64; 32]; D],
    /// Per decaying member, the largest age at which scores and keys are exact enough to
    /// compare by key: the table has not clamped and `2^(-λ·age)` is a normal float.
    safe_age: [u64; D],
}

fn tables() -> &'static Tables {
    static TABLES: OnceLock<Tables> = OnceLock::new();
    TABLES.get_or_init(|| {
        let decay = (0..=MAX_AGE)
            .map(|age| {
                let mut row = [0.0; F];
                for (f, l) in LAMBDAS.iter().enumerate() {
                    row[f] = (-(l * age as f64)).exp2();
                }
                row
            })
            .collect();
        let mut frac = [[1.0; 32]; D];
        let mut safe_age = [0; D];
        for f in 0..D {
            debug_assert_eq!(LAMBDAS[f], 1.0 / f64::from(1u32 << SHIFT[f]));
            for r in 0..1usize << SHIFT[f] {
                frac[f][r] = (LAMBDAS[f] * r as f64).exp2();
            }
            safe_age[f] = (MAX_AGE as u64).min(1000 << SHIFT[f]);
        }
        Tables {
            decay,
            frac,
            safe_age,
        }
    })
}

/// `2^n` for `-1022 <= n <= 1023`, exactly.
#[inline]
fn pow2(n: i64) -> f64 {
    debug_assert!((-1022..=1023).contains(&n));
    f64::from_bits(((1023 + n) as u64) << 52)
}

/// The reference's order on candidates: lower score, then earlier last use, then earlier slot.
#[inline]
fn better(s: f64, last: u64, pos: u32, best: (f64, u64, u32)) -> bool {
    s < best.0 || (s == best.0 && (last < best.1 || (last == best.1 && pos < best.2)))
}

/// Everything a layer knows about one expert, in one place.
#[derive(Debug, Clone, Copy)]
struct Expert {
    /// CRF per member, as of the last use.
    crf: [f64; F],
    /// Rank key per key-ranked member: `crf · 2^(λ·(last - t_ref))`.
    key: [f64; F],
    /// Step of the last use (0 = before the first token).
    last: u64,
    /// Step of the access that names the expert (it may not be evicted for its own token).
    tok: u64,
    /// Slot in each cache (the `M` shadows, then the real one), [`NONE`] when not resident.
    pos: [u32; M + 1],
    /// Bit `f`: on the low list of shadow `f`.
    low: u8,
}

/// One cache of a layer (a shadow or the real one): members in slots, in the reference's
/// `ResidentSet` order (swap-remove, push).
#[derive(Debug, Clone)]
struct Cache {
    cap: usize,
    members: Vec<u16>,
    /// Key-ranked shadows: members that may hold the lowest keys. Every member not on it has a
    /// key of at least `thr`.
    low: Vec<u16>,
    thr: f64,
    /// How far above the lowest key a rebuilt low list reaches (a ratio above 1).
    spread: f64,
}

/// Scratch space of one access, kept to avoid allocating on the lookup path.
#[derive(Debug, Clone, Default)]
struct Scratch {
    cand: Vec<u16>,
    vals: Vec<f64>,
}

#[derive(Debug, Clone)]
struct SparkLayer {
    ex: Vec<Expert>,
    /// The `M` shadows, then the real cache.
    caches: Vec<Cache>,
    step: u64,
    /// Per decaying member, the step its keys are relative to.
    t_ref: [u64; D],
    /// Per decaying member, a lower bound on the last use of its residents that have been used.
    oldest: [u64; D],
}

impl SparkLayer {
    fn new(n_expert: usize, cap: u32, prior: Option<&[u64]>) -> SparkLayer {
        let cap = cap as usize;
        let mut ex = vec![
            Expert {
                crf: [0.0; F],
                key: [0.0; F],
                last: 0,
                tok: 0,
                pos: [NONE; M + 1],
                low: 0,
            };
            n_expert
        ];
        let mut order: Vec<u16> = (0..n_expert as u32).map(|e| e as u16).collect();
        if let Some(p) = prior.filter(|p| p.len() == n_expert) {
            for (e, &c) in p.iter().enumerate() {
                ex[e].crf[F - 1] = c as f64;
                // At t = t_ref = 0 a key is the CRF itself.
                ex[e].key[F - 1] = c as f64;
            }
            order.sort_by(|&a, &b| p[usize::from(b)].cmp(&p[usize::from(a)]).then(a.cmp(&b)));
        }
        let members: Vec<u16> = order.iter().copied().take(cap).collect();
        for (i, &e) in members.iter().enumerate() {
            ex[usize::from(e)].pos = [i as u32; M + 1];
        }
        let cache = Cache {
            cap,
            members,
            low: Vec::new(),
            thr: 0.0,
            spread: 2.0,
        };
        SparkLayer {
            ex,
            caches: vec![cache; M + 1],
            step: 0,
            t_ref: [0; D],
            oldest: [0; D],
        }
    }

    /// Serves `ids`, adding each shadow's misses to `shadow_misses`; the real cache evicts by
    /// the member `lead`.
    fn access(
        &mut self,
        ids: &[u16],
        tab: &Tables,
        scratch: &mut Scratch,
        shadow_misses: &mut [f64; M],
        forget: f64,
        lead: usize,
    ) -> u32 {
        self.step += 1;
        let t = self.step;
        for &id in ids {
            self.ex[usize::from(id)].tok = t;
        }
        self.rebase(t);
        for f in 0..M {
            let m = if f == HYPER {
                self.serve_hyper(ids, t, scratch)
            } else {
                self.serve_keyed(f, ids, t, tab, scratch)
            };
            shadow_misses[f] = shadow_misses[f] * forget + f64::from(m);
        }
        let misses = self.serve_real(ids, t, lead, tab, scratch);
        for &id in ids {
            let x = &mut self.ex[usize::from(id)];
            let d = &tab.decay[((t - x.last) as usize).min(MAX_AGE)];
            for f in 0..F {
                x.crf[f] = x.crf[f] * d[f] + 1.0;
            }
            x.last = t;
        }
        let mut gain = [1.0; F];
        for (f, g) in gain.iter_mut().enumerate().take(D) {
            let d = t - self.t_ref[f];
            let s = SHIFT[f];
            *g = pow2((d >> s) as i64) * tab.frac[f][(d & ((1 << s) - 1)) as usize];
        }
        for &id in ids {
            let e = usize::from(id);
            let x = &mut self.ex[e];
            for f in 0..F {
                x.key[f] = x.crf[f] * gain[f];
            }
            for f in 0..F {
                if x.pos[f] != NONE && x.key[f] < self.caches[f].thr && x.low & (1 << f) == 0 {
                    x.low |= 1 << f;
                    self.caches[f].low.push(id);
                }
            }
        }
        misses
    }

    /// Moves each decaying member's reference step forward before its gains grow large; keys
    /// shrink by an exact power of two, so their order and ratios stay.
    fn rebase(&mut self, t: u64) {
        for f in 0..D {
            let s = SHIFT[f];
            let q = (t - self.t_ref[f]) >> s;
            if q >= REBASE {
                let scale = pow2(-(q as i64));
                for x in &mut self.ex {
                    x.key[f] *= scale;
                }
                self.caches[f].thr *= scale;
                self.t_ref[f] += q << s;
            }
        }
    }

    #[inline]
    fn insert(&mut self, c: usize, e: u16) {
        let cache = &mut self.caches[c];
        debug_assert!(cache.members.len() < cache.cap);
        self.ex[usize::from(e)].pos[c] = cache.members.len() as u32;
        cache.members.push(e);
    }

    #[inline]
    fn remove(&mut self, c: usize, e: u16) {
        let cache = &mut self.caches[c];
        let p = self.ex[usize::from(e)].pos[c] as usize;
        let last = *cache.members.last().expect("remove from a non-empty set");
        cache.members[p] = last;
        self.ex[usize::from(last)].pos[c] = p as u32;
        cache.members.pop();
        let x = &mut self.ex[usize::from(e)];
        x.pos[c] = NONE;
        if c < F && x.low & (1 << c) != 0 {
            x.low &= !(1 << c);
            let i = cache
                .low
                .iter()
                .position(|&m| m == e)
                .expect("flagged on the low list");
            cache.low.swap_remove(i);
        }
    }

    /// The exact score of `e` under member `f` at step `t` (the reference's formula).
    #[inline]
    fn score(&self, f: usize, e: usize, t: u64, tab: &Tables) -> f64 {
        let x = &self.ex[e];
        let age = t - x.last;
        if f < F {
            x.crf[f] * tab.decay[(age as usize).min(MAX_AGE)][f]
        } else {
            x.crf[F - 1] / (1 + age) as f64
        }
    }

    /// The reference's scan: the member of cache `c` not named by this access with the lowest
    /// score under member `f`, ties by last use, then slot.
    fn scan(&self, c: usize, f: usize, t: u64, tab: &Tables) -> Option<u16> {
        let mut victim = None;
        let mut best = (f64::INFINITY, u64::MAX, u32::MAX);
        for (p, &m) in self.caches[c].members.iter().enumerate() {
            let e = usize::from(m);
            if self.ex[e].tok == t {
                continue;
            }
            let (s, l) = (self.score(f, e, t, tab), self.ex[e].last);
            if victim.is_none() || better(s, l, p as u32, best) {
                best = (s, l, p as u32);
                victim = Some(m);
            }
        }
        victim
    }

    /// Of `cand`, the reference's choice under member `f` in cache `c`.
    fn pick(&self, c: usize, f: usize, cand: &[u16], t: u64, tab: &Tables) -> Option<u16> {
        let mut victim = None;
        let mut best = (f64::INFINITY, u64::MAX, u32::MAX);
        for &m in cand {
            let e = usize::from(m);
            let (s, l, p) = (self.score(f, e, t, tab), self.ex[e].last, self.ex[e].pos[c]);
            if victim.is_none() || better(s, l, p, best) {
                best = (s, l, p);
                victim = Some(m);
            }
        }
        victim
    }

    /// Whether every resident of decaying member `f` that may be evicted (used before, not
    /// named by this access) is young enough to compare by key.
    fn keys_exact(&mut self, f: usize, t: u64, tab: &Tables) -> bool {
        if f >= D {
            return true;
        }
        if t - self.oldest[f] <= tab.safe_age[f] {
            return true;
        }
        let mut oldest = t;
        for &m in &self.caches[f].members {
            let x = &self.ex[usize::from(m)];
            if x.tok != t && x.crf[f] > 0.0 {
                oldest = oldest.min(x.last);
            }
        }
        self.oldest[f] = oldest;
        t - oldest <= tab.safe_age[f]
    }

    /// Refills the low list of key-ranked shadow `f` with its members (not named by this
    /// access) whose keys are at most `spread` times the lowest; `spread` adapts so the list
    /// holds about [`LOW`] members (any spread is correct: it only decides the list's length).
    fn rebuild_low(&mut self, f: usize, t: u64) {
        let cache = &mut self.caches[f];
        for &m in &cache.low {
            self.ex[usize::from(m)].low &= !(1 << f);
        }
        cache.low.clear();
        let mut kmin = f64::INFINITY;
        for &m in &cache.members {
            let x = &self.ex[usize::from(m)];
            if x.tok != t && x.key[f] < kmin {
                kmin = x.key[f];
            }
        }
        // At least the slack above the lowest, so its whole window is on the list.
        let limit = (kmin * cache.spread).max(kmin + kmin * SLACK);
        let mut thr = f64::INFINITY;
        for &m in &cache.members {
            let x = &mut self.ex[usize::from(m)];
            if x.tok == t {
                continue;
            }
            if x.key[f] <= limit {
                x.low |= 1 << f;
                cache.low.push(m);
            } else if x.key[f] < thr {
                thr = x.key[f];
            }
        }
        cache.thr = thr;
        let n = cache.low.len();
        if n < LOW / 2 && thr < f64::INFINITY {
            cache.spread = (cache.spread * cache.spread).min(1e300);
        } else if n > 2 * LOW {
            cache.spread = cache.spread.sqrt();
        }
    }

    /// The victim of key-ranked shadow `f` by its low list (the keys are exact enough).
    fn victim_by_key(
        &mut self,
        f: usize,
        t: u64,
        tab: &Tables,
        scratch: &mut Scratch,
    ) -> Option<u16> {
        let mut rebuilt = false;
        if self.caches[f].low.len() > 3 * LOW {
            // Crowded with residents whose keys have grown since: start over.
            self.rebuild_low(f, t);
            rebuilt = true;
        }
        loop {
            let cache = &self.caches[f];
            // The lowest key (at `at`) and the next one.
            let (mut kmin, mut next, mut at) = (f64::INFINITY, f64::INFINITY, usize::MAX);
            for (i, &m) in cache.low.iter().enumerate() {
                let x = &self.ex[usize::from(m)];
                if x.tok != t {
                    let k = x.key[f];
                    if k < kmin {
                        (next, kmin, at) = (kmin, k, i);
                    } else if k < next {
                        next = k;
                    }
                }
            }
            let limit = kmin + kmin * SLACK;
            if (kmin < f64::INFINITY && limit < cache.thr) || rebuilt {
                if kmin == f64::INFINITY {
                    return None;
                }
                let victim = if next > limit {
                    // Alone within the slack: it is the reference's choice.
                    cache.low[at]
                } else {
                    scratch.cand.clear();
                    for &m in &cache.low {
                        let x = &self.ex[usize::from(m)];
                        if x.tok != t && x.key[f] <= limit {
                            scratch.cand.push(m);
                        }
                    }
                    let v = self.pick(f, f, &scratch.cand, t, tab)?;
                    at = self.caches[f]
                        .low
                        .iter()
                        .position(|&m| m == v)
                        .expect("a candidate is on the low list");
                    v
                };
                self.caches[f].low.swap_remove(at);
                self.ex[usize::from(victim)].low &= !(1 << f);
                return Some(victim);
            }
            self.rebuild_low(f, t);
            rebuilt = true;
        }
    }

    /// Serves `ids` on the shadow of a key-ranked member (decaying, or λ = 0).
    fn serve_keyed(
        &mut self,
        f: usize,
        ids: &[u16],
        t: u64,
        tab: &Tables,
        scratch: &mut Scratch,
    ) -> u32 {
        let mut misses = 0;
        // None until the first eviction; then whether keys may be trusted.
        let mut by_key: Option<bool> = None;
        for &e in ids {
            if self.ex[usize::from(e)].pos[f] != NONE {
                continue;
            }
            misses += 1;
            let cache = &self.caches[f];
            if cache.cap == 0 {
                continue;
            }
            if cache.members.len() >= cache.cap {
                let trusted = *by_key.get_or_insert_with(|| self.keys_exact(f, t, tab));
                let victim = if trusted {
                    self.victim_by_key(f, t, tab, scratch)
                } else {
                    self.scan(f, f, t, tab)
                };
                match victim {
                    Some(v) => self.remove(f, v),
                    None => continue,
                }
            }
            self.insert(f, e);
        }
        misses
    }

    /// Serves `ids` on the hyperbolic member's shadow: its scores are computed once per access
    /// with a miss, and each eviction takes the lowest (ties: the reference's order).
    fn serve_hyper(&mut self, ids: &[u16], t: u64, scratch: &mut Scratch) -> u32 {
        let mut misses = 0;
        let mut ready = false;
        for &e in ids {
            if self.ex[usize::from(e)].pos[HYPER] != NONE {
                continue;
            }
            misses += 1;
            let cache = &self.caches[HYPER];
            if cache.cap == 0 {
                continue;
            }
            if cache.members.len() >= cache.cap {
                if !ready {
                    // Scores of the members that may go, in slot order; a victim's becomes +∞.
                    ready = true;
                    scratch.vals.clear();
                    scratch.cand.clear();
                    for &m in &cache.members {
                        let x = &self.ex[usize::from(m)];
                        if x.tok != t {
                            scratch.vals.push(x.crf[F - 1] / (1 + (t - x.last)) as f64);
                            scratch.cand.push(m);
                        }
                    }
                }
                let (mut low, mut at, mut tied) = (f64::INFINITY, usize::MAX, false);
                for (i, &v) in scratch.vals.iter().enumerate() {
                    if v < low {
                        (low, at, tied) = (v, i, false);
                    } else if v == low {
                        tied = true;
                    }
                }
                if at == usize::MAX {
                    continue;
                }
                if tied {
                    // Equal scores: earlier last use, then earlier slot.
                    for i in at + 1..scratch.vals.len() {
                        if scratch.vals[i] == low {
                            let (a, b) = (
                                &self.ex[usize::from(scratch.cand[i])],
                                &self.ex[usize::from(scratch.cand[at])],
                            );
                            if (a.last, a.pos[HYPER]) < (b.last, b.pos[HYPER]) {
                                at = i;
                            }
                        }
                    }
                }
                scratch.vals[at] = f64::INFINITY;
                let v = scratch.cand[at];
                self.remove(HYPER, v);
            }
            self.insert(HYPER, e);
        }
        misses
    }

    /// Serves `ids` on the real cache: evict first what the leading shadow does not hold
    /// (earliest last use, then slot), then by the leader's score.
    fn serve_real(
        &mut self,
        ids: &[u16],
        t: u64,
        lead: usize,
        tab: &Tables,
        scratch: &mut Scratch,
    ) -> u32 {
        let mut misses = 0;
        let mut ready = false;
        for &e in ids {
            if self.ex[usize::from(e)].pos[REAL] != NONE {
                continue;
            }
            misses += 1;
            let cache = &self.caches[REAL];
            if cache.cap == 0 {
                continue;
            }
            if cache.members.len() >= cache.cap {
                if !ready {
                    ready = true;
                    scratch.cand.clear();
                    for &m in &cache.members {
                        let x = &self.ex[usize::from(m)];
                        if x.tok != t && x.pos[lead] == NONE {
                            scratch.cand.push(m);
                        }
                    }
                }
                let victim = if scratch.cand.is_empty() {
                    self.scan(REAL, lead, t, tab)
                } else {
                    let key = |m: u16| {
                        let x = &self.ex[usize::from(m)];
                        (x.last, x.pos[REAL])
                    };
                    let mut at = 0;
                    for i in 1..scratch.cand.len() {
                        if key(scratch.cand[i]) < key(scratch.cand[at]) {
                            at = i;
                        }
                    }
                    Some(scratch.cand.swap_remove(at))
                };
                match victim {
                    Some(v) => self.remove(REAL, v),
                    None => continue,
                }
            }
            self.insert(REAL, e);
        }
        misses
    }
}

/// Spark's default policy.
#[derive(Debug, Clone)]
pub struct Spark {
    layers: Vec<SparkLayer>,
    scratch: Scratch,
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
            scratch: Scratch::default(),
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
impl Spark {
    /// Every cache of `layer` in slot order: the shadows, then the real one.
    pub(crate) fn caches(&self, layer: usize) -> Vec<Vec<u16>> {
        self.layers[layer]
            .caches
            .iter()
            .map(|c| c.members.clone())
            .collect()
    }

    pub(crate) fn shadow_misses(&self) -> [f64; M] {
        self.shadow_misses
    }
}

impl Policy for Spark {
    fn access(&mut self, layer: usize, ids: &[u16]) -> u32 {
        let lead = self.leader();
        self.layers[layer].access(
            ids,
            tables(),
            &mut self.scratch,
            &mut self.shadow_misses,
            self.forget,
            lead,
        )
    }

    fn is_resident(&self, layer: usize, expert: u16) -> bool {
        self.layers[layer].ex[usize::from(expert)].pos[REAL] != NONE
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
        let d = &tables().decay;
        assert_eq!(d[0][0], 1.0);
        assert_eq!(d[3][0], 0.125);
        assert_eq!(d[MAX_AGE][F - 1], 1.0);
        assert_eq!(d[2][1], 0.5);
        // The fractional gains of λ = 1/32: 2^(r/32).
        let t = tables();
        assert_eq!(t.frac[5][0], 1.0);
        assert!((t.frac[5][16] - std::f64::consts::SQRT_2).abs() < 1e-15);
        assert_eq!(t.safe_age, [1000, 2000, 4000, 4096, 4096, 4096]);
    }
}
