//! `spark`: spark's default policy, an online choice among recency–frequency trade-offs.
//!
//! Why this file is over 800 lines: one policy whose per-layer state (`SparkLayer`), member
//! tables and eviction are one tight hot path, read and changed together; split, its private
//! fields would turn crate-visible for no reader's benefit. About 75 lines are tests; the
//! differential test against the frozen reference is `spark_diff.rs`.
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
//! - An access counts what it names first (CRF, last use, keys). Every eviction chooses among
//!   the residents it does not name, whose state that does not touch, so the choices are the
//!   reference's, which counts after serving; `last == t` then marks what the access names.
//! - A decaying member's score `crf · 2^(-λ·age)` keeps its order as time passes (every score
//!   shrinks by the same factor), so each expert carries a time-invariant key per member,
//!   `crf · 2^(λ·(last - t_ref))`, set once per use. The victim is the smallest key up to
//!   rounding: only residents whose key is within a relative 2^-40 of the smallest (the
//!   rounding of a key and of a score is below 2^-49 each) are scored exactly, with the
//!   reference's tie-breaks (lower last use, then earlier slot). `λ = 0` keys are the scores
//!   themselves.
//! - Each shadow keeps its residents' keys in one dense array by slot, each tagged with its slot
//!   in the low mantissa bits (a relative error of 2^(bits - 52), folded into the window), so
//!   one vectorised pass finds the lowest and its slot, and a second counts what lies within the
//!   window. A key of zero (never used) is alone: zeros rank by slot, below everything else.
//! - Each cache that misses serves only the ids it misses, from a bit mask built without
//!   branches, and a named expert's new key goes to its slot in every shadow or, where it is
//!   not resident, to a spare entry: no branch on residency per id and cache.
//! - Where that order argument needs care it is not used: a resident idle longer than its
//!   member's safe age (the decay table's last age, or where `2^(-λ·age)` leaves the normal
//!   floats) sends that shadow back to the exact scan until it is gone.
//! - The hyperbolic member's order changes with time, so its scores are computed once per access
//!   with an eviction (tagged the same way), and each eviction of that access takes the lowest.
//! - The real cache evicts first what the leader does not hold (a short list built once per
//!   access), else by the leader's exact score.
//!
//! Its cost is still about one eviction per miss of each of the nine caches (eight shadows and
//! the real one), about 13 per token-layer on the shared trace at 32 of 64 slots, against LRU's
//! one or two, plus the count of each named expert in each of them: it simulates at about 9 M
//! lookups per second here, not LRU's couple of hundred million.

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

/// The smallest of `v` (`+∞` when empty), with eight running minima so the compares do not
/// wait on each other and vectorise.
#[inline]
fn smallest(v: &[f64]) -> f64 {
    let mut acc = [f64::INFINITY; 8];
    let mut chunks = v.chunks_exact(8);
    for c in &mut chunks {
        for i in 0..8 {
            acc[i] = if c[i] < acc[i] { c[i] } else { acc[i] };
        }
    }
    for (a, &x) in acc.iter_mut().zip(chunks.remainder()) {
        *a = if x < *a { x } else { *a };
    }
    acc.iter()
        .fold(f64::INFINITY, |m, &a| if a < m { a } else { m })
}

/// Removes slot `p` of cache `c` the reference's way (the last slot moves into it); the caller
/// removes slot `p` of its per-slot arrays the same way (`Vec::swap_remove`).
#[inline]
fn take_slot(
    members: &mut Vec<u16>,
    pos: &mut [[u32; M + 1]],
    held: &mut [u16],
    c: usize,
    p: usize,
) {
    let e = members.swap_remove(p);
    if let Some(&moved) = members.get(p) {
        pos[usize::from(moved)][c] = p as u32;
    }
    pos[usize::from(e)][c] = NONE;
    held[usize::from(e)] &= !(1 << c);
}

/// Appends `e` to cache `c`.
#[inline]
fn put_slot(members: &mut Vec<u16>, pos: &mut [[u32; M + 1]], held: &mut [u16], c: usize, e: u16) {
    pos[usize::from(e)][c] = members.len() as u32;
    held[usize::from(e)] |= 1 << c;
    members.push(e);
}

/// Tags a key (or score) with its slot in the low bits of its mantissa, so the slot of the
/// lowest comes with it. A tagged value differs from the value by a relative `2^(bits - 52)` at
/// most for a normal float; a zero becomes the subnormal `slot · 2^-1074`, so zeros rank by slot.
#[inline]
fn tag(v: f64, slot: usize, mask: u64) -> f64 {
    f64::from_bits((v.to_bits() & !mask) | slot as u64)
}

/// The slot a tagged value carries.
#[inline]
fn slot_of(v: f64, mask: u64) -> usize {
    (v.to_bits() & mask) as usize
}

/// Tagged values from here up mark what the access being served names (never evicted for its
/// own token); real keys and scores stay far below.
const NAMED: f64 = f64::MAX;
const NAMED_FLOOR: f64 = f64::MAX / 2.0;

/// The lowest of a cache's tagged values.
enum Lowest {
    /// Every value marks a named resident.
    None,
    /// The lowest is alone within the window: its slot.
    Alone(usize),
    /// Several are within the window: the lowest's slot and the window's upper end (tagged
    /// values at most it).
    Window(usize, f64),
}

/// The lowest of `tagged`, alone or not within a relative `window` above it (a window wider
/// than the tagging error only sends more cases to the exact choice). A zero is alone: every
/// zero ranks the same but for its slot (never used: last use 0 too), and below every
/// nonzero.
#[inline]
fn lowest(tagged: &[f64], mask: u64, window: f64) -> Lowest {
    let low = smallest(tagged);
    if low >= NAMED_FLOOR {
        return Lowest::None;
    }
    if low < f64::MIN_POSITIVE {
        return Lowest::Alone(slot_of(low, mask));
    }
    let limit = low + low * window;
    if tagged.iter().filter(|&&v| v <= limit).count() == 1 {
        Lowest::Alone(slot_of(low, mask))
    } else {
        Lowest::Window(slot_of(low, mask), limit)
    }
}

/// The shadow of a key-ranked member: its residents in slots (the reference's `ResidentSet`
/// order: swap-remove, push) and each one's rank key tagged with its slot, in the first
/// `members.len()` of `cap + 1` entries (the rest is spare, so a write needs no branch). While
/// an access is served, what joins holds [`NAMED`], and so does everything it names once a
/// named resident turns out to hold the lowest key.
#[derive(Debug, Clone)]
struct Keyed {
    cap: usize,
    members: Vec<u16>,
    key: Vec<f64>,
}

/// The hyperbolic member's shadow: per slot the count and last use its score is made of, and
/// the score itself tagged with the slot, computed once per access with an eviction
/// ([`NAMED`] for what the access names).
#[derive(Debug, Clone)]
struct Hyper {
    cap: usize,
    members: Vec<u16>,
    count: Vec<f64>,
    /// The last use as a float (exact: steps stay far below 2^53).
    last: Vec<f64>,
    score: Vec<f64>,
}

/// The real cache: only its residents in slots; it evicts by per-expert state.
#[derive(Debug, Clone)]
struct Real {
    cap: usize,
    members: Vec<u16>,
}

#[derive(Debug, Clone)]
struct SparkLayer {
    /// Per expert, CRF per member as of the last use.
    crf: Vec<[f64; F]>,
    /// Per expert, its rank key per key-ranked member as of the last use,
    /// `crf · 2^(λ·(last - t_ref))`.
    key: Vec<[f64; F]>,
    /// Per expert, the step of the last use (0 = before the first token). An access counts
    /// what it names first, so `last == t` marks what the access at step `t` names.
    last: Vec<u64>,
    /// Per expert, bit `c`: cache `c` holds it (the `M` shadows, then the real one).
    held: Vec<u16>,
    /// Per expert, its slot in each cache, [`NONE`] when not resident.
    pos: Vec<[u32; M + 1]>,
    keyed: [Keyed; F],
    hyper: Hyper,
    real: Real,
    /// The slot bits of a tagged value (every cache of the layer has the same size).
    mask: u64,
    /// The windows above the lowest tagged value that hold every candidate: for keys, the
    /// slack plus the tagging error; for hyperbolic scores (ranked exactly), the tagging error.
    key_window: f64,
    score_window: f64,
    step: u64,
    /// Per decaying member, the step its keys are relative to.
    t_ref: [u64; D],
    /// Per decaying member, a lower bound on the last use of its shadow's residents that have
    /// been used.
    oldest: [u64; D],
    /// Scratch of one access: per named expert, bit `c` set when cache `c` did not hold it.
    missing: Vec<u16>,
    /// Scratch of one access: the real cache's residents the leader does not hold.
    cand: Vec<u16>,
}

/// The indices of an access's ids that one cache did not hold, in order: from a bit mask
/// built without branches when the access names at most 64, else by scanning the per-id bits.
struct Missed {
    bits: u64,
    /// With more than 64 ids: the next index to look at, and the id count.
    scan: Option<(usize, usize)>,
}

impl Missed {
    /// `missing`: per id of the access, bit `c` set when cache `c` did not hold it.
    #[inline]
    fn new(missing: &[u16], c: usize) -> Missed {
        let n = missing.len();
        if n > 64 {
            return Missed {
                bits: 0,
                scan: Some((0, n)),
            };
        }
        let mut bits = 0u64;
        for (i, &m) in missing.iter().enumerate() {
            bits |= u64::from((m >> c) & 1) << i;
        }
        Missed { bits, scan: None }
    }

    /// The next index whose per-id bits in `missing` have bit `c`.
    #[inline]
    fn next(&mut self, missing: &[u16], c: usize) -> Option<usize> {
        match &mut self.scan {
            None => {
                if self.bits == 0 {
                    return None;
                }
                let i = self.bits.trailing_zeros() as usize;
                self.bits &= self.bits - 1;
                Some(i)
            }
            Some((next, n)) => {
                while *next < *n {
                    let i = *next;
                    *next += 1;
                    if missing[i] & (1 << c) != 0 {
                        return Some(i);
                    }
                }
                None
            }
        }
    }
}

/// Bits of every cache in [`SparkLayer::held`].
const ALL: u16 = (1 << (M + 1)) - 1;

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
        let members: Vec<u16> = order.iter().copied().take(cap).collect();
        let mut pos = vec![[NONE; M + 1]; n_expert];
        let mut held = vec![0; n_expert];
        for (i, &e) in members.iter().enumerate() {
            pos[usize::from(e)] = [i as u32; M + 1];
            held[usize::from(e)] = ALL;
        }
        // Slots 0..cap need this many bits; a tagged value is then within a relative
        // 2^(bits - 52) of the value (bits ≤ 16: slots are u16 experts).
        let bits = usize::BITS - cap.saturating_sub(1).leading_zeros();
        let mask = (1u64 << bits) - 1;
        let err = f64::from(1u32 << bits) * (1.0 / (1u64 << 52) as f64);
        // At t = t_ref = 0 a key is the CRF itself: 0, or the prior count for λ = 0.
        let key = crf.clone();
        let keyed = std::array::from_fn(|f| Keyed {
            cap,
            key: (0..=cap)
                .map(|p| match members.get(p) {
                    Some(&e) => tag(key[usize::from(e)][f], p, mask),
                    None => NAMED,
                })
                .collect(),
            members: members.clone(),
        });
        let hyper = Hyper {
            cap,
            members: members.clone(),
            count: members
                .iter()
                .map(|&e| crf[usize::from(e)][F - 1])
                .collect(),
            last: vec![0.0; members.len()],
            score: vec![0.0; members.len()],
        };
        SparkLayer {
            crf,
            key,
            last: vec![0; n_expert],
            held,
            pos,
            keyed,
            hyper,
            real: Real { cap, members },
            mask,
            key_window: SLACK + 4.0 * err,
            score_window: 4.0 * err,
            step: 0,
            t_ref: [0; D],
            oldest: [0; D],
            missing: Vec::new(),
            cand: Vec::new(),
        }
    }

    /// Serves `ids`, adding each shadow's misses to `shadow_misses`; the real cache evicts by
    /// the member `lead`.
    ///
    /// What `ids` names is counted first (CRF, last use, keys): every eviction chooses among
    /// the residents `ids` does not name, whose state this does not touch, so the choices are
    /// the reference's, which counts after serving.
    fn access(
        &mut self,
        ids: &[u16],
        tab: &Tables,
        shadow_misses: &mut [f64; M],
        forget: f64,
        lead: usize,
    ) -> u32 {
        self.step += 1;
        let t = self.step;
        self.rebase(t);
        let mut gain = [1.0; F];
        for (f, g) in gain.iter_mut().enumerate().take(D) {
            let d = t - self.t_ref[f];
            let s = SHIFT[f];
            *g = pow2((d >> s) as i64) * tab.frac[f][(d & ((1 << s) - 1)) as usize];
        }
        self.missing.clear();
        let mut any = 0u16;
        for &id in ids {
            let e = usize::from(id);
            let m = !self.held[e] & ALL;
            any |= m;
            self.missing.push(m);
            let d = &tab.decay[((t - self.last[e]) as usize).min(MAX_AGE)];
            for f in 0..F {
                self.crf[e][f] = self.crf[e][f] * d[f] + 1.0;
                self.key[e][f] = self.crf[e][f] * gain[f];
            }
            self.last[e] = t;
            // Where it is resident, its slots take its new key and count now.
            // (Without a branch: where it is not, the write goes to the spare slot.)
            let pos = &self.pos[e];
            for f in 0..F {
                let c = &mut self.keyed[f];
                let p = (pos[f] as usize).min(c.cap);
                c.key[p] = tag(self.key[e][f], p, self.mask);
            }
            let p = pos[HYPER] as usize;
            if p < self.hyper.members.len() {
                self.hyper.count[p] = self.crf[e][F - 1];
                self.hyper.last[p] = t as f64;
            }
        }
        for f in 0..F {
            let m = if any & (1 << f) == 0 {
                0
            } else {
                self.serve_keyed(f, ids, t, tab)
            };
            shadow_misses[f] = shadow_misses[f] * forget + f64::from(m);
        }
        let m = self.serve_hyper(ids, t, any & (1 << HYPER) != 0);
        shadow_misses[HYPER] = shadow_misses[HYPER] * forget + f64::from(m);
        if any & (1 << REAL) == 0 {
            0
        } else {
            self.serve_real(ids, t, lead, tab)
        }
    }

    /// Writes the keys of the residents `ids` names into key-ranked shadow `f`; only those
    /// that joined it when `all` is false.
    #[inline]
    fn rekey(&mut self, f: usize, ids: &[u16], all: bool) {
        let c = &mut self.keyed[f];
        for (i, &id) in ids.iter().enumerate() {
            let e = usize::from(id);
            let p = self.pos[e][f] as usize;
            if all || self.missing[i] & (1 << f) != 0 {
                if let Some(k) = c.key.get_mut(p) {
                    *k = tag(self.key[e][f], p, self.mask);
                }
            }
        }
    }

    /// Moves each decaying member's reference step forward before its gains grow large; keys
    /// shrink by an exact power of two, so their order and ratios stay.
    fn rebase(&mut self, t: u64) {
        for f in 0..D {
            let s = SHIFT[f];
            let q = (t - self.t_ref[f]) >> s;
            if q >= REBASE {
                let scale = pow2(-(q as i64));
                for k in &mut self.key {
                    k[f] *= scale;
                }
                let c = &mut self.keyed[f];
                for (p, (k, &m)) in c.key.iter_mut().zip(&c.members).enumerate() {
                    *k = tag(self.key[usize::from(m)][f], p, self.mask);
                }
                self.t_ref[f] += q << s;
            }
        }
    }

    /// The exact score of `e` under member `f` at step `t` (the reference's formula).
    #[inline]
    fn score(&self, f: usize, e: usize, t: u64, tab: &Tables) -> f64 {
        let age = t - self.last[e];
        if f < F {
            self.crf[e][f] * tab.decay[(age as usize).min(MAX_AGE)][f]
        } else {
            self.crf[e][F - 1] / (1 + age) as f64
        }
    }

    /// The reference's choice among `members` (a cache's slots) under member `f`: the lowest
    /// exact score, ties by last use, then slot, of the slots `take` admits that this access
    /// does not name.
    fn choose(
        &self,
        members: &[u16],
        f: usize,
        t: u64,
        tab: &Tables,
        take: impl Fn(usize) -> bool,
    ) -> Option<usize> {
        let mut victim = None;
        let mut best = (f64::INFINITY, u64::MAX, u32::MAX);
        for (p, &m) in members.iter().enumerate() {
            let e = usize::from(m);
            if self.last[e] == t || !take(p) {
                continue;
            }
            let (s, l) = (self.score(f, e, t, tab), self.last[e]);
            if victim.is_none() || better(s, l, p as u32, best) {
                best = (s, l, p as u32);
                victim = Some(p);
            }
        }
        victim
    }

    /// Whether the residents of decaying member `f`'s shadow that may be evicted (used before,
    /// not named by this access) are all young enough to compare by key.
    fn young(&mut self, f: usize, t: u64, tab: &Tables) -> bool {
        if f >= D || t - self.oldest[f] <= tab.safe_age[f] {
            return true;
        }
        let mut low = t;
        for &m in &self.keyed[f].members {
            let e = usize::from(m);
            if self.last[e] != t && self.crf[e][f] > 0.0 {
                low = low.min(self.last[e]);
            }
        }
        self.oldest[f] = low;
        t - low <= tab.safe_age[f]
    }

    /// Serves `ids` on the shadow of a key-ranked member (decaying, or λ = 0) that misses some.
    /// The residents `ids` names hold their new keys, which are rarely the lowest; when one is,
    /// every named resident is marked [`NAMED`] for the rest of the access.
    fn serve_keyed(&mut self, f: usize, ids: &[u16], t: u64, tab: &Tables) -> u32 {
        if self.keyed[f].cap == 0 {
            return ids.len() as u32;
        }
        let mut marked = false;
        let mut misses = 0;
        // None until the first eviction; then whether keys may be trusted.
        let mut by_key: Option<bool> = None;
        let mut cur = Missed::new(&self.missing, f);
        while let Some(i) = cur.next(&self.missing, f) {
            let e = ids[i];
            // A repeated id is a miss only the first time.
            if self.held[usize::from(e)] & (1 << f) != 0 {
                continue;
            }
            misses += 1;
            if self.keyed[f].members.len() >= self.keyed[f].cap {
                let trusted = match by_key {
                    Some(b) => b,
                    None => *by_key.insert(self.young(f, t, tab)),
                };
                let victim = loop {
                    let c = &self.keyed[f];
                    if !trusted {
                        break self.choose(&c.members, f, t, tab, |_| true);
                    }
                    let live = &c.key[..c.members.len()];
                    let (low, window) = match lowest(live, self.mask, self.key_window) {
                        Lowest::None => break None,
                        Lowest::Alone(p) => (p, None),
                        Lowest::Window(p, limit) => (p, Some(limit)),
                    };
                    if self.last[usize::from(c.members[low])] == t {
                        // A named resident holds the lowest key: mark them all, look again.
                        debug_assert!(!marked);
                        marked = true;
                        for &id in ids {
                            let p = self.pos[usize::from(id)][f] as usize;
                            if let Some(k) = self.keyed[f].key.get_mut(p) {
                                *k = tag(NAMED, p, self.mask);
                            }
                        }
                        continue;
                    }
                    break match window {
                        None => Some(low),
                        Some(limit) => self.choose(&c.members, f, t, tab, |p| c.key[p] <= limit),
                    };
                };
                let Some(p) = victim else { continue };
                let c = &mut self.keyed[f];
                take_slot(&mut c.members, &mut self.pos, &mut self.held, f, p);
                let n = c.members.len();
                if p < n {
                    c.key[p] = tag(c.key[n], p, self.mask);
                }
            }
            let c = &mut self.keyed[f];
            let p = c.members.len();
            put_slot(&mut c.members, &mut self.pos, &mut self.held, f, e);
            c.key[p] = tag(NAMED, p, self.mask);
        }
        self.rekey(f, ids, marked);
        misses
    }

    /// Serves `ids` on the hyperbolic member's shadow: its scores are computed once per access
    /// with an eviction, and each eviction takes the lowest (ties: the reference's order).
    fn serve_hyper(&mut self, ids: &[u16], t: u64, any_miss: bool) -> u32 {
        let h = &mut self.hyper;
        let tf = t as f64;
        if !any_miss {
            return 0;
        }
        if h.cap == 0 {
            return ids.len() as u32;
        }
        let mask = self.mask;
        let mut misses = 0;
        let mut ready = false;
        let mut cur = Missed::new(&self.missing, HYPER);
        while let Some(i) = cur.next(&self.missing, HYPER) {
            let e = ids[i];
            if self.held[usize::from(e)] & (1 << HYPER) != 0 {
                continue;
            }
            misses += 1;
            let h = &mut self.hyper;
            if h.members.len() >= h.cap {
                if !ready {
                    // The reference's `count / (1 + age)` (steps stay far below 2^53, so the
                    // float arithmetic is exact up to the division), tagged; named: NAMED.
                    ready = true;
                    for (p, ((s, &c), &l)) in
                        h.score.iter_mut().zip(&h.count).zip(&h.last).enumerate()
                    {
                        let v = if l == tf { NAMED } else { c / (1.0 + (tf - l)) };
                        *s = tag(v, p, mask);
                    }
                }
                let at = match lowest(&h.score, mask, self.score_window) {
                    Lowest::None => continue,
                    Lowest::Alone(p) => p,
                    Lowest::Window(_, limit) => {
                        // Equal scores: the earlier last use, then the earlier slot.
                        let mut best = (f64::INFINITY, f64::INFINITY, usize::MAX);
                        for (p, ((&s, &c), &l)) in
                            h.score.iter().zip(&h.count).zip(&h.last).enumerate()
                        {
                            if s <= limit {
                                let v = (c / (1.0 + (tf - l)), l, p);
                                if v.0 < best.0 || (v.0 == best.0 && v.1 < best.1) {
                                    best = v;
                                }
                            }
                        }
                        best.2
                    }
                };
                take_slot(&mut h.members, &mut self.pos, &mut self.held, HYPER, at);
                h.count.swap_remove(at);
                h.last.swap_remove(at);
                h.score.swap_remove(at);
                if let Some(s) = h.score.get_mut(at) {
                    *s = tag(*s, at, mask);
                }
            }
            let h = &mut self.hyper;
            let p = h.members.len();
            put_slot(&mut h.members, &mut self.pos, &mut self.held, HYPER, e);
            h.count.push(self.crf[usize::from(e)][F - 1]);
            h.last.push(tf);
            h.score.push(tag(NAMED, p, mask));
        }
        misses
    }

    /// Serves `ids` on the real cache, which misses some: evict first what the leading shadow
    /// does not hold (earliest last use, then slot), then by the leader's score.
    fn serve_real(&mut self, ids: &[u16], t: u64, lead: usize, tab: &Tables) -> u32 {
        if self.real.cap == 0 {
            return ids.len() as u32;
        }
        let mut misses = 0;
        let mut ready = false;
        let mut cur = Missed::new(&self.missing, REAL);
        while let Some(i) = cur.next(&self.missing, REAL) {
            let e = ids[i];
            if self.held[usize::from(e)] & (1 << REAL) != 0 {
                continue;
            }
            misses += 1;
            if self.real.members.len() >= self.real.cap {
                if !ready {
                    ready = true;
                    self.cand.clear();
                    for &m in &self.real.members {
                        let x = usize::from(m);
                        if self.last[x] != t && self.held[x] & (1 << lead) == 0 {
                            self.cand.push(m);
                        }
                    }
                }
                let victim = if self.cand.is_empty() {
                    self.choose(&self.real.members, lead, t, tab, |_| true)
                } else {
                    let key = |m: u16| {
                        let x = usize::from(m);
                        (self.last[x], self.pos[x][REAL])
                    };
                    let mut at = 0;
                    for i in 1..self.cand.len() {
                        if key(self.cand[i]) < key(self.cand[at]) {
                            at = i;
                        }
                    }
                    let m = self.cand.swap_remove(at);
                    Some(self.pos[usize::from(m)][REAL] as usize)
                };
                let Some(p) = victim else { continue };
                take_slot(
                    &mut self.real.members,
                    &mut self.pos,
                    &mut self.held,
                    REAL,
                    p,
                );
            }
            put_slot(
                &mut self.real.members,
                &mut self.pos,
                &mut self.held,
                REAL,
                e,
            );
        }
        misses
    }
}

/// Spark's default policy.
#[derive(Debug, Clone)]
pub struct Spark {
    layers: Vec<SparkLayer>,
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
        let l = &self.layers[layer];
        let mut v: Vec<Vec<u16>> = l.keyed.iter().map(|c| c.members.clone()).collect();
        v.push(l.hyper.members.clone());
        v.push(l.real.members.clone());
        v
    }

    pub(crate) fn shadow_misses(&self) -> [f64; M] {
        self.shadow_misses
    }
}

impl Policy for Spark {
    fn access(&mut self, layer: usize, ids: &[u16]) -> u32 {
        let lead = self.leader();
        self.layers[layer].access(ids, tables(), &mut self.shadow_misses, self.forget, lead)
    }

    fn is_resident(&self, layer: usize, expert: u16) -> bool {
        self.layers[layer].held[usize::from(expert)] & (1 << REAL) != 0
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
