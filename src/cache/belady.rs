//! `belady`: the offline optimum (MIN), the yardstick no online policy can beat.
//!
//! Owns, per layer, the future use list of every expert in the scored routing. It starts with the
//! best possible preload (the first S distinct experts the scored part references) and, on a miss
//! with a full cache, evicts the resident expert not used by the current token whose next use is
//! farthest (never used again counts as infinitely far). It must only ever be driven over the
//! routing it was built from, in order.

use super::{serve_scored, Policy, ResidentSet};
use crate::trace::Routing;

#[derive(Debug, Clone)]
struct BeladyLayer {
    set: ResidentSet,
    /// Steps at which each expert is used, ascending.
    uses: Vec<Vec<u32>>,
    /// Index into `uses[e]` of the first use after the last served step.
    cursor: Vec<u32>,
    step: u32,
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
        }
    }

    fn access(&mut self, ids: &[u16]) -> u32 {
        let s = self.step;
        for &e in ids {
            let (u, c) = (&self.uses[usize::from(e)], &mut self.cursor[usize::from(e)]);
            while (*c as usize) < u.len() && u[*c as usize] <= s {
                *c += 1;
            }
        }
        let (uses, cursor) = (&self.uses, &self.cursor);
        let misses = serve_scored(&mut self.set, ids, |m| {
            let next = uses[usize::from(m)]
                .get(cursor[usize::from(m)] as usize)
                .copied()
                .unwrap_or(u32::MAX);
            // Farthest next use has the lowest score.
            (-f64::from(next), 0)
        });
        self.step += 1;
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
        // The classic string: OPT with 3 frames takes 9 faults from a cold start, 3 of them the
        // first loads of 7, 0, 1, which the preload provides.
        let refs = [
            7u16, 0, 1, 2, 0, 3, 0, 4, 2, 3, 0, 3, 2, 1, 2, 0, 1, 7, 0, 1,
        ];
        let steps: Vec<[u16; 1]> = refs.iter().map(|&e| [e]).collect();
        let steps: Vec<&[u16]> = steps.iter().map(|s| &s[..]).collect();
        let m = belady_misses(&steps, 8, 3);
        assert_eq!(m.iter().sum::<u32>(), 6);
        // Faults: 2 (evict 7), 3 (evict 1), 4 (evict 0), 0 (evict 4), 1 (evict 3), 7 (evict 2).
        let faults: Vec<u16> = refs
            .iter()
            .zip(&m)
            .filter(|(_, &x)| x == 1)
            .map(|(&e, _)| e)
            .collect();
        assert_eq!(faults, vec![2, 3, 4, 0, 1, 7]);
    }

    #[test]
    fn multi_expert_tokens() {
        // Two slots, tokens of two experts: the preload holds {1, 2}.
        // {1,2} hit; {3,1}: evict 2 (next use step 2; 1 is this token's); {1,2}: evict 3
        // (never again); {2,1} hit.
        let m = belady_misses(&[&[1, 2], &[3, 1], &[1, 2], &[2, 1]], 4, 2);
        assert_eq!(m, vec![0, 1, 1, 0]);
    }

    #[test]
    fn cache_holding_everything_never_misses() {
        let m = belady_misses(&[&[0, 1], &[2, 3], &[1, 2]], 4, 4);
        assert_eq!(m, vec![0, 0, 0]);
    }

    /// The true optimum by exhaustive search: any free initial set of at most `slots`
    /// experts, then any resident set that holds the token's experts after each token.
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
                // Every subset of `avail` that contains `need` and fits.
                let mut sub = avail;
                loop {
                    if sub & need == need && ok(sub) {
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
