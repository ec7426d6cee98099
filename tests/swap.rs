//! The CUDA slot pool without a GPU: bookkeeping against a real fixture, byte equality of the
//! host-memory arena after random swap/evict sequences, `spark bench swap --cpu`, and the
//! "built without CUDA" stub. GPU checks (kernels vs references, device checksums) are behind
//! the `cuda` feature; they are ignored with their reason (`#[ignore = "needs a GPU…"]`) and scripts/gpu-check runs them.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};

use spark::bench::swap as bench;
use spark::cache::PolicyKind;
use spark::cuda::arena::{CpuArena, SwapDevice};
use spark::cuda::pool::{Outcome, SlotPool};
use spark::cuda::reference;
use spark::gguf::{GgufFile, MoeGeometry};

use crate::util;

/// A medium-sized fixture cut down to 2 layers of 8 experts (~0.8 MiB per expert, q8_0).
fn small_medium(dir: &Path) -> PathBuf {
    util::fixture(
        dir,
        "swap.gguf",
        &["--size", "medium", "--layers", "2", "--experts", "8"],
    )
}

#[derive(Debug, Clone)]
enum Op {
    Request {
        step: u64,
        layer: usize,
        ids: Vec<u32>,
    },
    Release {
        step: u64,
    },
}

fn ops(n_layer: usize, n_expert: u32) -> impl Strategy<Value = Vec<Op>> {
    let op = prop_oneof![
        3 => (0u64..6, 0..n_layer, prop::collection::vec(0..n_expert, 1..5))
            .prop_map(|(step, layer, ids)| Op::Request { step, layer, ids }),
        1 => (0u64..6).prop_map(|step| Op::Release { step }),
    ];
    prop::collection::vec(op, 1..60)
}

/// Every occupied slot holds exactly its expert's GGUF bytes, slice by slice.
fn assert_slots_equal_gguf(pool: &SlotPool, arena: &CpuArena, src: &[u8]) {
    let layout = pool.layout();
    for (li, l) in layout.layers.iter().enumerate() {
        for slot in 0..layout.slots {
            if let Some(e) = pool.slot_expert(li, slot) {
                for c in l.copies(e, slot) {
                    let got = &arena.bytes()[c.dst as usize..(c.dst + c.bytes) as usize];
                    let want = &src[c.src as usize..(c.src + c.bytes) as usize];
                    assert!(
                        got == want,
                        "layer {li} slot {slot} expert {e}: bytes differ"
                    );
                }
            }
        }
    }
}

#[test]
fn swap_random_sequences_keep_every_slot_equal_to_its_gguf_slice() {
    let dir = util::tempdir();
    let path = small_medium(dir.path());
    let file = GgufFile::open(&path).unwrap();
    let geometry = MoeGeometry::of(&file).unwrap();
    assert_eq!(geometry.moe_layers.len(), 2);
    assert!(geometry.moe_layers[0].expert_bytes > 512 * 1024);
    let src = file.bytes();
    let mut runner = TestRunner::new(Config {
        cases: 24,
        ..Config::default()
    });
    let strategy = (
        ops(2, geometry.n_expert),
        1u32..5,
        prop::sample::select(vec![PolicyKind::Lru, PolicyKind::Lfu, PolicyKind::Spark]),
    );
    runner
        .run(&strategy, |(ops, slots, policy)| {
            let mut pool = SlotPool::new(&geometry, slots, policy, None).unwrap();
            let mut arena = CpuArena::new(pool.layout());
            // what each in-flight step uses: (layer, expert) -> slot
            let mut in_use: HashMap<u64, Vec<(usize, u32, u32)>> = HashMap::new();
            for op in ops {
                match op {
                    Op::Request { step, layer, ids } => {
                        let served = pool.request(step, layer, &ids).unwrap();
                        arena.execute(src, &served.plan, pool.table()).unwrap();
                        for (e, o) in served.outcomes {
                            if let Outcome::Hit(s) | Outcome::Loaded(s) = o {
                                in_use.entry(step).or_default().push((layer, e, s));
                            }
                        }
                    }
                    Op::Release { step } => {
                        pool.release(step);
                        in_use.remove(&step);
                    }
                }
                pool.check().map_err(TestCaseError::fail)?;
                for used in in_use.values() {
                    for &(l, e, s) in used {
                        prop_assert_eq!(
                            pool.layer_table(l)[e as usize],
                            s as i32,
                            "expert {} of layer {} was evicted while in use",
                            e,
                            l
                        );
                    }
                }
            }
            assert_slots_equal_gguf(&pool, &arena, src);
            // the same check through checksums, as the GPU does it
            let checked = bench::verify(&pool, &mut arena, src).unwrap();
            let occupied = (0..2)
                .flat_map(|l| (0..slots).map(move |s| (l, s)))
                .filter(|&(l, s)| pool.slot_expert(l, s).is_some())
                .count() as u64;
            prop_assert_eq!(checked, occupied);
            prop_assert_eq!(arena.table().unwrap(), pool.table().to_vec());
            let st = pool.stats();
            prop_assert_eq!(
                st.bytes_moved,
                st.swaps * geometry.moe_layers[0].expert_bytes
            );
            Ok(())
        })
        .unwrap();
}

#[test]
fn swap_pool_follows_the_fixture_slices() {
    let dir = util::tempdir();
    let path = small_medium(dir.path());
    let file = GgufFile::open(&path).unwrap();
    let geometry = MoeGeometry::of(&file).unwrap();
    let mut pool = SlotPool::new(&geometry, 2, PolicyKind::Lru, None).unwrap();
    let served = pool.request(1, 1, &[5]).unwrap();
    let l1 = &geometry.moe_layers[1];
    let want: Vec<(u64, u64)> = l1.slices(5).map(|s| (s.offset, s.bytes)).collect();
    let got: Vec<(u64, u64)> = served
        .plan
        .copies
        .iter()
        .map(|c| (c.src, c.bytes))
        .collect();
    assert_eq!(got, want);
    assert_eq!(served.plan.bytes(), l1.expert_bytes);
    assert_eq!(pool.layer_table(1)[5], 0);
    assert_eq!(pool.layer_table(0), &[-1; 8]);
}

#[test]
fn swap_in_use_expert_survives_pressure_on_a_fixture() {
    let dir = util::tempdir();
    let path = small_medium(dir.path());
    let file = GgufFile::open(&path).unwrap();
    let geometry = MoeGeometry::of(&file).unwrap();
    let mut pool = SlotPool::new(&geometry, 2, PolicyKind::Lru, None).unwrap();
    pool.request(7, 0, &[1]).unwrap();
    for (step, e) in (100..).zip([2, 3, 4, 5, 6, 7, 2, 3]) {
        pool.request(step, 0, &[e]).unwrap();
        pool.release(step);
        assert!(pool.layer_table(0)[1] >= 0, "in-use expert 1 was evicted");
    }
    pool.release(7);
    pool.request(200, 0, &[2]).unwrap();
    pool.request(201, 0, &[3]).unwrap();
    assert_eq!(
        pool.layer_table(0)[1],
        -1,
        "released, the policy may evict it"
    );
}

#[test]
fn swap_reference_remap_agrees_with_the_table() {
    let mut runner = TestRunner::new(Config {
        cases: 64,
        ..Config::default()
    });
    let strategy = (
        prop::collection::vec(-1i32..4, 1..32),
        prop::collection::vec(-3i32..40, 0..64),
    );
    runner
        .run(&strategy, |(table, ids)| {
            let r = reference::remap(&ids, &table);
            prop_assert_eq!(r.slots.len(), ids.len());
            for (i, &e) in ids.iter().enumerate() {
                let want = if e >= 0 && (e as usize) < table.len() {
                    table[e as usize]
                } else {
                    -1
                };
                prop_assert_eq!(r.slots[i], want);
                prop_assert_eq!(r.miss_flags[i] == 1, want < 0);
                prop_assert_eq!(r.misses.contains(&(i as u32)), want < 0);
            }
            Ok(())
        })
        .unwrap();
}

#[test]
fn swap_bench_cpu_reports_host_numbers_and_verifies_slots() {
    let dir = util::tempdir();
    let path = small_medium(dir.path());
    let o = util::spark(&[
        "bench",
        "swap",
        "-m",
        path.to_str().unwrap(),
        "--cpu",
        "--json",
        "--slots",
        "3",
        "--swaps",
        "24",
        "--batches",
        "3",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["gpu"], false);
    assert!(v["device"].as_str().unwrap().contains("NOT a GPU"));
    assert_eq!(v["slots"], 3);
    assert_eq!(v["moe_layers"], 2);
    assert!(v["slots_verified"].as_u64().unwrap() > 0);
    assert!(v["single"]["count"].as_u64().unwrap() > 0);
    assert_eq!(v["batched"]["count"], 3);
    assert!(v["latency_by_size"][0]["expert_bytes"].as_u64().unwrap() > 512 * 1024);
    let o = util::spark(&[
        "bench",
        "swap",
        "-m",
        path.to_str().unwrap(),
        "--cpu",
        "--swaps",
        "8",
    ]);
    assert!(o.status.success());
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(text.contains("NOT a GPU number"), "{text}");
    assert!(text.contains("verified"), "{text}");
}

#[test]
fn swap_bench_bad_input_exits_2() {
    let dir = util::tempdir();
    let path = small_medium(dir.path());
    let p = path.to_str().unwrap();
    let o = util::spark(&["bench", "swap", "-m", p, "--cpu", "--miss-ratio", "1.5"]);
    assert_eq!(o.status.code(), Some(2));
    let o = util::spark(&["bench", "swap", "-m", p, "--cpu", "--slots", "0"]);
    assert_eq!(o.status.code(), Some(2));
    let missing = dir.path().join("missing.gguf");
    let o = util::spark(&["bench", "swap", "-m", missing.to_str().unwrap(), "--cpu"]);
    assert_eq!(o.status.code(), Some(2));
}

#[cfg(not(feature = "cuda"))]
#[test]
fn swap_without_cuda_the_stub_says_so_and_exits_2() {
    use spark::cuda::{CudaError, Gpu};
    const { assert!(!spark::cuda::ENABLED) };
    assert!(matches!(spark::cuda::available(), Err(CudaError::Disabled)));
    assert!(matches!(Gpu::open(0), Err(CudaError::Disabled)));
    let dir = util::tempdir();
    let path = small_medium(dir.path());
    let o = util::spark(&["bench", "swap", "-m", path.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("built without CUDA: rebuild with --features cuda"),
        "{err}"
    );
}

/// GPU checks: only with `--features cuda`, and ignored unless asked for (scripts/gpu-check runs
/// them with `--include-ignored`), so a run without a GPU says "ignored", never "ok".
#[cfg(feature = "cuda")]
mod gpu {
    use super::*;
    use rand::{Rng, SeedableRng};
    use spark::cuda::{Gpu, GpuArena};

    /// The fixture of a GPU test: `$SPARK_GPU_FIXTURE` (scripts/gpu-check writes one, since
    /// the device machine has no engine build), else a fresh one in `dir`.
    fn gpu_fixture(dir: &Path) -> PathBuf {
        match std::env::var_os("SPARK_GPU_FIXTURE") {
            Some(p) => PathBuf::from(p),
            None => small_medium(dir),
        }
    }

    #[test]
    #[ignore = "needs a GPU: run by scripts/gpu-check (--include-ignored)"]
    fn swap_gpu_remap_kernel_matches_reference() {
        let gpu = Gpu::open(0).unwrap();
        let kernels = gpu.kernels().unwrap();
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
        for case in 0..50 {
            let n_expert = rng.gen_range(1..300);
            let table: Vec<i32> = (0..n_expert).map(|_| rng.gen_range(-1..16)).collect();
            let n = rng.gen_range(0..4096);
            let ids: Vec<i32> = (0..n).map(|_| rng.gen_range(-2..n_expert + 2)).collect();
            let got = kernels.remap(&gpu, &ids, &table).unwrap();
            assert_eq!(got, reference::remap(&ids, &table), "case {case}");
        }
    }

    #[test]
    #[ignore = "needs a GPU: run by scripts/gpu-check (--include-ignored)"]
    fn swap_gpu_slots_equal_gguf_after_random_sequences() {
        let dir = util::tempdir();
        let path = gpu_fixture(dir.path());
        let file = GgufFile::open(&path).unwrap();
        let geometry = MoeGeometry::of(&file).unwrap();
        let src = file.bytes();
        let gpu = Gpu::open(0).unwrap();
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(11);
        for slots in [1u32, 3, 5] {
            let mut pool = SlotPool::new(&geometry, slots, PolicyKind::Spark, None).unwrap();
            let mut dev = GpuArena::new(&gpu, pool.layout(), src).unwrap();
            for i in 0..300u64 {
                let layer = rng.gen_range(0..2);
                let ids: Vec<u32> = (0..rng.gen_range(1..5))
                    .map(|_| rng.gen_range(0..8))
                    .collect();
                let served = pool.request(i % 4, layer, &ids).unwrap();
                dev.execute(src, &served.plan, pool.table()).unwrap();
                if rng.gen_bool(0.5) {
                    pool.release(rng.gen_range(0..4));
                }
            }
            // device checksums against CPU checksums of the GGUF slices, and the table
            let checked = bench::verify(&pool, &mut dev, src).unwrap();
            assert!(checked > 0);
        }
    }

    #[test]
    #[ignore = "needs a GPU: run by scripts/gpu-check (--include-ignored)"]
    fn swap_gpu_checksum_kernel_matches_reference() {
        let dir = util::tempdir();
        let path = gpu_fixture(dir.path());
        let file = GgufFile::open(&path).unwrap();
        let geometry = MoeGeometry::of(&file).unwrap();
        let src = file.bytes();
        let gpu = Gpu::open(0).unwrap();
        gpu.kernels().expect("NVRTC compiles the kernels");
        let mut pool = SlotPool::new(&geometry, 4, PolicyKind::Lru, None).unwrap();
        let mut dev = GpuArena::new(&gpu, pool.layout(), src).unwrap();
        let mut cpu = CpuArena::new(pool.layout());
        for e in 0..4 {
            let p = pool.request(0, 0, &[e]).unwrap().plan;
            dev.execute(src, &p, pool.table()).unwrap();
            cpu.execute(src, &p, pool.table()).unwrap();
        }
        // odd offsets and lengths inside the loaded slots
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        let used = pool.layout().layers[0].slot_offset(4);
        let ranges: Vec<(u64, u64)> = (0..200)
            .map(|_| {
                let o = rng.gen_range(0..used - 1);
                (o, rng.gen_range(0..(used - o).min(100_000)))
            })
            .collect();
        assert_eq!(
            dev.checksums(&ranges).unwrap(),
            cpu.checksums(&ranges).unwrap()
        );
    }
}
