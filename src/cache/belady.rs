//! `belady`: the offline optimum (MIN), the yardstick no online policy can beat.
//!
//! Owns, per layer, the future use list of every expert in the scored routing. It starts with the
//! best possible preload (the first S distinct experts the scored part references). After each
//! token it keeps, of the resident experts and the token's own, the S whose next use is nearest
//! (never used again counts as infinitely far): with a full cache a miss evicts the expert whose
//! next use is farthest, or is streamed past when its own next use is the farthest. That is the
//! optimum of the cache model (see the exhaustive-search test), so no policy can beat it; when
//! every expert is needed again before the candidates, it is classic MIN. It must only ever be
//! driven over the routing it was built from, in order.

use super::{Policy, ResidentSet};
use crate::trace::Routing;

#[derive(Debug, Clone)]
struct BeladyLayer {
    set: ResidentSet,
    /// Steps at which each expert is used, ascending.
    uses: Vec<Vec<u32>>,
    /// Index into `uses[e]` of the first use after the last served step.
    cursor: Vec<u32>,
    step: u32,
    /// Scratch: candidates of the current token.
    pool: Vec<u16>,
}

impl BeladyLayer {
    fn new(future: &Routing, layer: usize, n_expert: usize, slots: u32) -> BeladyLayer {
        let mut uses = vec![Vec::new(); n_expert];
        let mut set = ResidentSet::new(n_expert, slots as usize);
        if layer < future.n_layer() {
            for s in 0..future.steps() {
                for &e in future.ids(s, layer) {
                    if usize::from(e) >= n_expert {
                        continue;
                    }
                    uses[usize::from(e)].push(s as u32);
                    if !set.contains(e) && !set.is_full() {
                        set.insert(e);
                    }
                }
            }
        }
        BeladyLayer {
            set,
            uses,
            cursor: vec![0; n_expert],
            step: 0,
            pool: Vec::new(),
        }
    }

    /// Next use of `e` after the last served step (`u32::MAX` when none).
    fn next_use(&self, e: u16) -> u32 {
        self.uses[usize::from(e)]
            .get(self.cursor[usize::from(e)] as usize)
            .copied()
            .unwrap_or(u32::MAX)
    }

    fn access(&mut self, ids: &[u16]) -> u32 {
        let s = self.step;
        self.step += 1;
        for &e in ids {
            let (u, c) = (&self.uses[usize::from(e)], &mut self.cursor[usize::from(e)]);
            while (*c as usize) < u.len() && u[*c as usize] <= s {
                *c += 1;
            }
        }
        let mut misses = 0;
        for &e in ids {
            if !self.set.contains(e) {
                misses += 1;
                self.pool.push(e);
            }
        }
        if self.pool.is_empty() {
            return 0;
        }
        if self.set.members.len() + self.pool.len() > self.set.cap {
            // Keep the S nearest next uses among residents and newcomers.
            self.pool.extend_from_slice(&self.set.members);
            let mut pool = std::mem::take(&mut self.pool);
            pool.sort_by_key(|&e| (self.next_use(e), e));
            for &e in &pool[self.set.cap.min(pool.len())..] {
                if self.set.contains(e) {
                    self.set.remove(e);
                }
            }
            pool.truncate(self.set.cap);
            self.pool = pool;
        }
        for i in 0..self.pool.len() {
            let e = self.pool[i];
            if !self.set.contains(e) {
                self.set.insert(e);
            }
        }
        self.pool.clear();
        misses
    }
}

/// Belady's MIN over the routing it was built from.
#[derive(Debug, Clone)]
pub struct Belady {
    layers: Vec<BeladyLayer>,
}

impl Belady {
    /// The optimum for serving `future` (steps in order) with `slots[l]` slots at layer `l`.
    pub fn new(future: &Routing, n_expert: usize, slots: &[u32]) -> Belady {
        Belady {
            layers: slots
                .iter()
                .enumerate()
                .map(|(l, &s)| BeladyLayer::new(future, l, n_expert, s))
                .collect(),
        }
    }
}

impl Policy for Belady {
    fn access(&mut self, layer: usize, ids: &[u16]) -> u32 {
        self.layers[layer].access(ids)
    }

    fn is_resident(&self, layer: usize, expert: u16) -> bool {
        self.layers[layer].set.contains(expert)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::tests::{routing, run};
    use proptest::prelude::*;

    fn belady_misses(steps: &[&[u16]], n_expert: usize, slots: u32) -> Vec<u32> {
        let r = routing(steps);
        let mut b = Belady::new(&r, n_expert, &[slots]);
        run(&mut b, steps)
    }

    #[test]
    fn textbook_reference_string() {
        // The classic string with 3 frames: MIN takes 9 faults from a cold start, 3 of them the
        // first loads of 7, 0, 1, which the preload provides. Streaming 4 past (it is never
        // used again, and 0, 2, 3 all return first) saves the later fault on 0.
        let refs = [
            7u16, 0, 1, 2, 0, 3, 0, 4, 2, 3, 0, 3, 2, 1, 2, 0, 1, 7, 0, 1,
        ];
        let steps: Vec<[u16; 1]> = refs.iter().map(|&e| [e]).collect();
        let steps: Vec<&[u16]> = steps.iter().map(|s| &s[..]).collect();
        let m = belady_misses(&steps, 8, 3);
        assert_eq!(m.iter().sum::<u32>(), 5);
        // Faults: 2 (evict 7), 3 (evict 1), 4 (streamed), 1 (evict 3), 7 (evict 2 or stream).
        let faults: Vec<u16> = refs
            .iter()
            .zip(&m)
            .filter(|(_, &x)| x == 1)
            .map(|(&e, _)| e)
            .collect();
        assert_eq!(faults, vec![2, 3, 4, 1, 7]);
    }

    #[test]
    fn multi_expert_tokens() {
        // Two slots, tokens of two experts: the preload holds {1, 2}.
        // {1,2} hit; {3,1}: 3 is never used again, 1 and 2 are next used at step 2: 3 streams
        // past; {1,2} and {2,1} hit.
        let m = belady_misses(&[&[1, 2], &[3, 1], &[1, 2], &[2, 1]], 4, 2);
        assert_eq!(m, vec![0, 1, 0, 0]);
        // {3,1}, then 3 returns first: evict 2 (next use step 3) — 1 at step 2 stays.
        let m = belady_misses(&[&[1, 2], &[3, 1], &[1, 3], &[2, 1]], 4, 2);
        assert_eq!(m, vec![0, 1, 0, 1]);
    }

    #[test]
    fn token_experts_may_be_dropped_after_serving() {
        // One slot; the preload holds 5 (first referenced). Token {5,6}: 6 loads and, being
        // the one needed next, stays; 5 (never again) goes.
        let m = belady_misses(&[&[5, 6], &[6], &[6]], 8, 1);
        assert_eq!(m, vec![1, 0, 0]);
    }

    #[test]
    fn cache_holding_everything_never_misses() {
        let m = belady_misses(&[&[0, 1], &[2, 3], &[1, 2]], 4, 4);
        assert_eq!(m, vec![0, 0, 0]);
    }

    /// The true optimum by exhaustive search: any free initial set of at most `slots`
    /// experts; after each token, any set of at most `slots` of the old residents and the
    /// token's experts; each of the token's experts not resident before costs one miss.
    fn exhaustive(steps: &[Vec<u16>], n_expert: usize, slots: usize) -> u32 {
        let n_states = 1usize << n_expert;
        let ok = |m: usize| m.count_ones() as usize <= slots;
        let mut dp: Vec<u32> = (0..n_states)
            .map(|m| if ok(m) { 0 } else { u32::MAX })
            .collect();
        for ids in steps {
            let need = ids.iter().fold(0usize, |a, &e| a | 1 << e);
            let mut next = vec![u32::MAX; n_states];
            for (state, &cost) in dp.iter().enumerate() {
                if cost == u32::MAX {
                    continue;
                }
                let loads = (need & !state).count_ones();
                let avail = state | need;
                // Every subset of `avail` that fits.
                let mut sub = avail;
                loop {
                    if ok(sub) {
                        next[sub] = next[sub].min(cost + loads);
                    }
                    if sub == 0 {
                        break;
                    }
                    sub = (sub - 1) & avail;
                }
            }
            dp = next;
        }
        dp.into_iter().min().unwrap()
    }

    proptest! {
        #[test]
        fn belady_is_the_exhaustive_optimum(
            n_expert in 2usize..7,
            k in 1usize..3,
            extra in 0usize..3,
            seq in proptest::collection::vec(proptest::collection::vec(0u16..7, 1..3), 1..14),
        ) {
            let k = k.min(n_expert);
            let slots = (k + extra).min(n_expert);
            // Distinct, in-range ids, at most k per token.
            let steps: Vec<Vec<u16>> = seq
                .iter()
                .map(|t| {
                    let mut v: Vec<u16> = Vec::new();
                    for &e in t {
                        let e = e % n_expert as u16;
                        if !v.contains(&e) && v.len() < k {
                            v.push(e);
                        }
                    }
                    v
                })
                .collect();
            let refs: Vec<&[u16]> = steps.iter().map(|v| v.as_slice()).collect();
            let got: u32 = belady_misses(&refs, n_expert, slots as u32).iter().sum();
            prop_assert_eq!(got, exhaustive(&steps, n_expert, slots));
        }
    }
}
