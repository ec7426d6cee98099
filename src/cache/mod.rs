//! Expert-cache policies: which experts of each MoE layer are resident in a fixed number of slots.
//!
//! Owns the replacement policies (`lru`, `lfu`, `lfru`, `static`, `pin-lru`, `belady`, `spark`)
//! and the per-(layer, expert) [`Counts`] they calibrate from. Everything here is pure
//! computation: no I/O, no allocation on the lookup path, and nothing can fail.
//!
//! The cache model: a token's experts at a layer are served together; a resident expert is a
//! hit, any other is a miss (one load over the bus, or one host-side computation). A policy may
//! stream a missing expert past the cache instead of keeping it (`static` does so for every
//! expert it did not pin; a slot count smaller than a token's experts forces it).
//!
//! The honesty rule: an online policy sees a token's routing at a layer only when it is asked to
//! serve it ([`Policy::access`]), so it can use earlier tokens, earlier layers of the same token
//! and calibration counts, never the routing it is about to be scored on. Only [`Belady`] is
//! given the future, because it is the yardstick.
//!
//! Misses are what the cache costs, so prefetching cannot lower them (a prefetch is a load too;
//! Belady's demand-paging optimality). [`Belady`] keeps, after each token, the S experts whose
//! next use is nearest, streaming past anything farther: that is the optimum of this model
//! (checked against exhaustive search), so no policy here can beat it.

mod belady;
mod fixed;
mod freq;
mod lru;
mod slots;
mod spark;
#[cfg(test)]
mod spark_diff;
#[cfg(test)]
mod spark_ref;

pub use belady::Belady;
pub use fixed::{PinLru, Static};
pub use freq::{Lfru, Lfu};
pub use lru::Lru;
pub use slots::SlotLru;
pub use spark::Spark;

use crate::trace::Routing;

/// Marks "no slot" / "never" in index arrays.
pub(crate) const NONE: u32 = u32::MAX;

/// The replacement policies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, clap::ValueEnum)]
pub enum PolicyKind {
    /// least recently used
    Lru,
    /// least frequently used (counts include calibration), ties by recency
    Lfu,
    /// frequency-weighted recency: evict the lowest count / (1 + age)
    Lfru,
    /// the top-S experts of the calibration counts, fixed; everything else streams
    Static,
    /// a pinned hot set from the calibration counts plus LRU on the rest, split chosen per layer
    PinLru,
    /// the offline optimum (knows the future): the yardstick
    Belady,
    /// spark's default: per layer, the recency–frequency blend whose shadow cache misses least
    Spark,
}

impl PolicyKind {
    pub const ALL: [PolicyKind; 7] = [
        PolicyKind::Lru,
        PolicyKind::Lfu,
        PolicyKind::Lfru,
        PolicyKind::Static,
        PolicyKind::PinLru,
        PolicyKind::Belady,
        PolicyKind::Spark,
    ];

    pub fn name(self) -> &'static str {
        match self {
            PolicyKind::Lru => "lru",
            PolicyKind::Lfu => "lfu",
            PolicyKind::Lfru => "lfru",
            PolicyKind::Static => "static",
            PolicyKind::PinLru => "pin-lru",
            PolicyKind::Belady => "belady",
            PolicyKind::Spark => "spark",
        }
    }

    pub fn from_name(s: &str) -> Option<PolicyKind> {
        PolicyKind::ALL.into_iter().find(|p| p.name() == s)
    }
}

/// Per-(layer, expert) routing counts: calibration data, a profile's hotness table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Counts {
    pub n_layer: usize,
    pub n_expert: usize,
    data: Vec<u64>,
}

impl Counts {
    pub fn zero(n_layer: usize, n_expert: usize) -> Counts {
        Counts {
            n_layer,
            n_expert,
            data: vec![0; n_layer * n_expert],
        }
    }

    /// Counts of every expert use in `routing` (ids at or above `n_expert` are ignored).
    pub fn of(routing: &Routing, n_expert: usize) -> Counts {
        let mut c = Counts::zero(routing.n_layer(), n_expert);
        c.add(routing);
        c
    }

    /// Adds the uses in `routing`.
    pub fn add(&mut self, routing: &Routing) {
        for s in 0..routing.steps() {
            for l in 0..routing.n_layer().min(self.n_layer) {
                for &e in routing.ids(s, l) {
                    if usize::from(e) < self.n_expert {
                        self.bump(l, usize::from(e));
                    }
                }
            }
        }
    }

    pub fn get(&self, layer: usize, expert: usize) -> u64 {
        self.data[layer * self.n_expert + expert]
    }

    pub fn set(&mut self, layer: usize, expert: usize, v: u64) {
        self.data[layer * self.n_expert + expert] = v;
    }

    /// One more use of `expert` in `layer`; a count at `u64::MAX` stays there (never wraps to
    /// the coldest).
    pub fn bump(&mut self, layer: usize, expert: usize) {
        let c = &mut self.data[layer * self.n_expert + expert];
        *c = c.saturating_add(1);
    }

    pub fn layer(&self, layer: usize) -> &[u64] {
        &self.data[layer * self.n_expert..(layer + 1) * self.n_expert]
    }

    /// Every count added up (saturating at `u64::MAX`).
    pub fn total(&self) -> u64 {
        self.data.iter().fold(0u64, |t, &c| t.saturating_add(c))
    }

    /// Experts of `layer` by descending count, ties by ascending id.
    pub fn ranked(&self, layer: usize) -> Vec<u16> {
        let row = self.layer(layer);
        let mut ids: Vec<u16> = (0..self.n_expert as u32).map(|e| e as u16).collect();
        ids.sort_by(|&a, &b| {
            row[usize::from(b)]
                .cmp(&row[usize::from(a)])
                .then(a.cmp(&b))
        });
        ids
    }
}

/// What an online policy may know before it serves the first token.
#[derive(Debug, Clone)]
pub struct Setup<'a> {
    pub n_expert: usize,
    /// Experts per token.
    pub k: usize,
    /// Slots of each layer.
    pub slots: Vec<u32>,
    /// Counts that rank experts for pinning (the calibration part's, or a profile's).
    pub counts: &'a Counts,
    /// Counts known before the first token that are not replayed through [`Policy::access`]
    /// (a profile); learning policies start from them.
    pub prior: Option<&'a Counts>,
    /// The calibration routing, when there is one: the caller replays it through
    /// [`Policy::access`] before scoring (pin-lru also chooses its split on it).
    pub calibration: Option<&'a Routing>,
}

/// A replacement policy over every layer's cache.
pub trait Policy {
    /// Serves one token's experts `ids` at `layer`: afterwards each of them has been resident
    /// (extra ids stream past a cache smaller than the token's experts). Returns the loads.
    fn access(&mut self, layer: usize, ids: &[u16]) -> u32;

    /// Whether `expert` of `layer` is resident now.
    fn is_resident(&self, layer: usize, expert: u16) -> bool;
}

/// Builds an online policy; `None` for [`PolicyKind::Belady`], which needs the future
/// ([`Belady::new`]).
pub fn online(kind: PolicyKind, setup: &Setup<'_>) -> Option<Box<dyn Policy>> {
    Some(match kind {
        PolicyKind::Lru => Box::new(Lru::new(setup.n_expert, &setup.slots)),
        PolicyKind::Lfu => Box::new(Lfu::new(setup.n_expert, &setup.slots)),
        PolicyKind::Lfru => Box::new(Lfru::new(setup.n_expert, &setup.slots)),
        PolicyKind::Static => Box::new(Static::new(setup.n_expert, &setup.slots, setup.counts)),
        PolicyKind::PinLru => Box::new(PinLru::new(setup)),
        PolicyKind::Spark => Box::new(Spark::new(
            setup.n_expert,
            &setup.slots,
            setup.prior,
            setup.k,
        )),
        PolicyKind::Belady => return None,
    })
}

/// The resident set of one layer: membership by expert, members in a dense list.
#[derive(Debug, Clone, Default)]
pub(crate) struct ResidentSet {
    pub(crate) cap: usize,
    pub(crate) members: Vec<u16>,
    pos: Vec<u32>,
}

impl ResidentSet {
    pub(crate) fn new(n_expert: usize, cap: usize) -> ResidentSet {
        ResidentSet {
            cap,
            members: Vec::with_capacity(cap),
            pos: vec![NONE; n_expert],
        }
    }

    #[inline]
    pub(crate) fn contains(&self, e: u16) -> bool {
        self.pos[usize::from(e)] != NONE
    }

    #[inline]
    pub(crate) fn is_full(&self) -> bool {
        self.members.len() >= self.cap
    }

    #[inline]
    pub(crate) fn insert(&mut self, e: u16) {
        debug_assert!(!self.contains(e) && !self.is_full());
        self.pos[usize::from(e)] = self.members.len() as u32;
        self.members.push(e);
    }

    #[inline]
    pub(crate) fn remove(&mut self, e: u16) {
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
pub(crate) fn serve_scored<S>(set: &mut ResidentSet, ids: &[u16], admit: bool, mut score: S) -> u32
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
pub(crate) mod tests {
    use super::*;

    /// A one-layer routing from per-step id lists.
    pub(crate) fn routing(steps: &[&[u16]]) -> Routing {
        let mut r = Routing::new(1);
        for (i, ids) in steps.iter().enumerate() {
            r.push_step(0, i as u32, [(*ids, &[][..])]);
        }
        r
    }

    /// Misses of `p` over `steps` at layer 0.
    pub(crate) fn run(p: &mut dyn Policy, steps: &[&[u16]]) -> Vec<u32> {
        steps.iter().map(|ids| p.access(0, ids)).collect()
    }

    #[test]
    fn names_round_trip() {
        for p in PolicyKind::ALL {
            assert_eq!(PolicyKind::from_name(p.name()), Some(p));
        }
    }

    #[test]
    fn counts_rank_by_count_then_id() {
        let r = routing(&[&[3, 1], &[3, 2], &[1, 3]]);
        let c = Counts::of(&r, 4);
        assert_eq!(c.layer(0), &[0, 2, 1, 3]);
        assert_eq!(c.ranked(0), vec![3, 1, 2, 0]);
        assert_eq!(c.total(), 6);
    }

    #[test]
    fn resident_set_insert_remove() {
        let mut s = ResidentSet::new(8, 3);
        for e in [5, 2, 7] {
            s.insert(e);
        }
        assert!(s.is_full());
        s.remove(5);
        assert!(!s.contains(5) && s.contains(7) && s.contains(2));
        s.insert(1);
        assert_eq!(s.members.len(), 3);
    }
}
