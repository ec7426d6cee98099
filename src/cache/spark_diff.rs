//! The differential test of the fast `spark` policy against its frozen reference
//! ([`super::spark_ref`], which is never edited): random traces, random slot counts, random
//! priors; both must agree on every access (misses), on the residency of every expert after
//! it, and on the blend they follow. Widths from 1 to 64 experts with up to 8 ids per access,
//! and real model widths (128–512 experts, top-8 to top-10) with batch-sized accesses of more
//! than 64 ids.

use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::spark_ref::SparkRef;
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
fn case(seed: u64, long: bool, wide: bool) -> Case {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let n_layer = rng.gen_range(1..=3);
    let n_expert = if wide {
        *[128usize, 256, 384, 512].choose(&mut rng).unwrap()
    } else {
        *[1usize, 2, 3, 5, 8, 16, 24, 40, 64]
            .choose(&mut rng)
            .unwrap()
    };
    let k = if wide {
        rng.gen_range(8..=10)
    } else {
        rng.gen_range(1..=n_expert.min(8))
    };
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
    } else if wide {
        rng.gen_range(1..300)
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
            let batch = wide && rng.gen_bool(0.15);
            let mut ids = if batch {
                // A batch's union: more than 64 distinct ids in one access.
                let n = rng.gen_range(65..=n_expert.min(200));
                distinct(&mut rng, n_expert, n, |r| r.gen_range(0..n_expert as u16))
            } else {
                match mode {
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
        k: if wide {
            rng.gen_range(8..=10)
        } else {
            rng.gen_range(1..=8)
        },
        slots,
        prior,
        steps,
    }
}

/// Runs one case through both policies; returns the most ids one access served.
fn check(seed: u64, long: bool, wide: bool) -> usize {
    let c = case(seed, long, wide);
    let mut widest = 0;
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
            widest = widest.max(ids.len());
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
    widest
}

#[test]
fn fast_policy_makes_the_reference_decisions() {
    for seed in 0..400 {
        check(seed, false, false);
    }
}

#[test]
fn fast_policy_makes_the_reference_decisions_at_real_model_widths() {
    // 128–512 experts per layer, top-8 to top-10, and batch unions of 65–200 ids per access:
    // the id masks and slot tables past one 64-bit word.
    let mut widest = 0;
    for seed in 2000..2040 {
        widest = widest.max(check(seed, false, true));
    }
    assert!(
        widest > 64,
        "no access served more than 64 ids (widest {widest})"
    );
}

#[test]
fn fast_policy_agrees_over_long_idle_stretches() {
    // Thousands of steps: residents idle past every member's safe age and past the decay
    // table's last age.
    for seed in 1000..1012 {
        check(seed, true, false);
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
