//! Simulator benchmarks: expert lookups per second (target ≥ 50 M/s for lru; `lru-crate` is the
//! same policy on the `lru` crate, for the dependency decision in ARCHITECTURE.md), and the quality
//! table on a real trace (misses per policy at S = 2k, 4k, 8k with calibrate-frac 0.5, ratio to
//! belady, spark's gain over lru), printed before criterion runs.
//!
//! The real trace is `$SPARK_TRACE`, else `tests/data/traces/olmoe-1b-7b-decode-299.jsonl` in
//! to the repository; without one the quality table is skipped. Throughput also runs on a
//! synthetic Qwen3-30B-A3B-shaped trace (48 layers × 128 experts, top-8).

use std::hint::black_box;
use std::path::PathBuf;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use rand::{Rng, SeedableRng};
use spark::cache::{self, Belady, Counts, Policy, PolicyKind, Setup};
use spark::simulate::{Experiment, Start, Versus};
use spark::trace::{Routing, Trace};

fn real_trace() -> Option<(PathBuf, Trace)> {
    let path = std::env::var_os("SPARK_TRACE")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join("tests/data/traces/olmoe-1b-7b-decode-299.jsonl")
        });
    let t = Trace::read(&path, None).ok()?;
    Some((path, t))
}

/// Zipf-skewed experts with temporal locality: each expert of a token repeats from the
/// previous token with probability 0.4, else is drawn from a per-layer Zipf(1.0) ranking.
fn synthetic(n_layer: usize, n_expert: usize, k: usize, steps: usize) -> Routing {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
    let weights: Vec<f64> = (1..=n_expert).map(|r| 1.0 / r as f64).collect();
    let total: f64 = weights.iter().sum();
    let perms: Vec<Vec<u16>> = (0..n_layer)
        .map(|_| {
            let mut p: Vec<u16> = (0..n_expert as u16).collect();
            for i in (1..p.len()).rev() {
                p.swap(i, rng.gen_range(0..=i));
            }
            p
        })
        .collect();
    let mut prev: Vec<Vec<u16>> = vec![Vec::new(); n_layer];
    let mut r = Routing::new(n_layer);
    for s in 0..steps {
        let mut layers: Vec<Vec<u16>> = Vec::with_capacity(n_layer);
        for l in 0..n_layer {
            let mut ids: Vec<u16> = Vec::with_capacity(k);
            for &e in &prev[l] {
                if ids.len() < k && rng.gen_bool(0.4) {
                    ids.push(e);
                }
            }
            while ids.len() < k {
                let mut x = rng.gen_range(0.0..total);
                let mut rank = 0;
                while x >= weights[rank] && rank + 1 < n_expert {
                    x -= weights[rank];
                    rank += 1;
                }
                let e = perms[l][rank];
                if !ids.contains(&e) {
                    ids.push(e);
                }
            }
            layers.push(ids);
        }
        r.push_step(0, s as u32, layers.iter().map(|v| (v.as_slice(), &[][..])));
        prev = layers;
    }
    r
}

fn quality_table(trace: &Trace, path: &std::path::Path) {
    let r = &trace.decode;
    let k = trace.k;
    let exp = Experiment::new(r, trace.n_expert as usize, k as usize, r.steps() / 2);
    println!(
        "\nquality on {} ({} layers, {} experts, k={}, {} decode steps, calibrate-frac 0.5)",
        path.display(),
        trace.n_layer,
        trace.n_expert,
        k,
        r.steps()
    );
    println!(
        "{:>6}  {:<8} {:>8} {:>10}",
        "slots", "policy", "misses", "vs_belady"
    );
    for mult in [2, 4, 8] {
        let s = (mult * k).min(trace.n_expert);
        let slots = vec![s; r.n_layer()];
        let b = exp.run(PolicyKind::Belady, &slots).misses;
        let mut lru = None;
        for p in PolicyKind::ALL {
            let o = exp.run(p, &slots);
            let m = o.misses;
            if p == PolicyKind::Lru {
                lru = Some(o.clone());
            }
            let vs = if b > 0 {
                format!("{:.3}", m as f64 / b as f64)
            } else if m == 0 {
                "1.000".into()
            } else {
                "-".into()
            };
            println!("{s:>6}  {:<8} {m:>8} {vs:>10}", p.name());
            if let (PolicyKind::Spark, Some(lru)) = (p, &lru) {
                let start = |k| Start::of(k, false, exp.calibrate_steps);
                let v = Versus::of(
                    s,
                    (&o, start(PolicyKind::Spark)),
                    (lru, start(PolicyKind::Lru)),
                );
                println!("{s:>6}  {}", v.line());
            }
        }
    }
    println!();
}

/// `lru` built on the `lru` crate, making the decisions of `spark::cache::Lru`: a token's hits
/// are refreshed first, then each miss evicts the least recent expert unless that one belongs
/// to the token too (then the miss streams past). It exists to measure the crate against the
/// project's own list (ARCHITECTURE.md, "Dependencies and why").
struct CrateLru {
    layers: Vec<Option<lru::LruCache<u16, ()>>>,
}

impl CrateLru {
    fn new(slots: &[u32]) -> CrateLru {
        CrateLru {
            layers: slots
                .iter()
                .map(|&s| std::num::NonZeroUsize::new(s as usize).map(lru::LruCache::new))
                .collect(),
        }
    }
}

impl Policy for CrateLru {
    fn access(&mut self, layer: usize, ids: &[u16]) -> u32 {
        let Some(c) = &mut self.layers[layer] else {
            return ids.len() as u32;
        };
        let mut misses = 0;
        for e in ids {
            if c.get(e).is_none() {
                misses += 1;
            }
        }
        if misses == 0 {
            return 0;
        }
        for &e in ids {
            if c.contains(&e) {
                continue;
            }
            if c.len() == c.cap().get() {
                let (&tail, _) = c.peek_lru().expect("a full cache has a tail");
                if ids.contains(&tail) {
                    continue;
                }
                c.pop_lru();
            }
            c.put(e, ());
        }
        misses
    }

    fn is_resident(&self, layer: usize, expert: u16) -> bool {
        self.layers[layer]
            .as_ref()
            .is_some_and(|c| c.contains(&expert))
    }
}

fn replay(p: &mut dyn Policy, r: &Routing) -> u64 {
    let mut m = 0u64;
    for s in 0..r.steps() {
        for l in 0..r.n_layer() {
            m += u64::from(p.access(l, r.ids(s, l)));
        }
    }
    m
}

fn bench(c: &mut Criterion) {
    let real = real_trace();
    if let Some((path, t)) = &real {
        quality_table(t, path);
    }
    let mut inputs: Vec<(String, Routing, usize, u32)> = vec![(
        "synthetic-48x128-k8".into(),
        synthetic(48, 128, 8, 1000),
        128,
        32,
    )];
    if let Some((_, t)) = real {
        inputs.push(("olmoe-299".into(), t.decode, t.n_expert as usize, 4 * t.k));
    }
    let mut g = c.benchmark_group("simulate_lookups");
    for (name, r, n_expert, s) in &inputs {
        g.throughput(Throughput::Elements(r.lookups()));
        let slots = vec![*s; r.n_layer()];
        let counts = Counts::zero(r.n_layer(), *n_expert);
        // The crate makes the same decisions as our list (checked here), so only speed differs.
        let ours = replay(
            cache::online(
                PolicyKind::Lru,
                &Setup {
                    n_expert: *n_expert,
                    k: 8,
                    slots: slots.clone(),
                    counts: &counts,
                    prior: None,
                    calibration: None,
                },
            )
            .expect("online policy")
            .as_mut(),
            r,
        );
        assert_eq!(
            replay(&mut CrateLru::new(&slots), r),
            ours,
            "{name}: lru crate"
        );
        g.bench_with_input(BenchmarkId::new("lru-crate", name), r, |b, r| {
            b.iter(|| black_box(replay(&mut CrateLru::new(&slots), r)))
        });
        for kind in [
            PolicyKind::Lru,
            PolicyKind::Lfru,
            PolicyKind::Spark,
            PolicyKind::Belady,
        ] {
            g.bench_with_input(BenchmarkId::new(kind.name(), name), r, |b, r| {
                b.iter(|| {
                    let mut p: Box<dyn Policy> = match kind {
                        PolicyKind::Belady => Box::new(Belady::new(r, *n_expert, &slots)),
                        _ => cache::online(
                            kind,
                            &Setup {
                                n_expert: *n_expert,
                                k: 8,
                                slots: slots.clone(),
                                counts: &counts,
                                prior: None,
                                calibration: None,
                            },
                        )
                        .expect("online policy"),
                    };
                    black_box(replay(p.as_mut(), r))
                })
            });
        }
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
