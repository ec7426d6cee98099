//! Profile rewrite after a request: render + atomic write (temporary file, fsync, rename) of a
//! 48 × 128 hotness table, the size of Qwen3-30B-A3B. Target ≤ 2 ms. Criterion prints the time;
//! `render` alone shows how much of it is the disk.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use spark::cache::Counts;
use spark::profile::Profile;

fn table() -> Profile {
    let mut c = Counts::zero(48, 128);
    for l in 0..48 {
        for e in 0..128 {
            c.set(l, e, ((l * 7919 + e * 104729) % 1_000_003) as u64);
        }
    }
    let mut p = Profile::new(
        c,
        8,
        Some("gguf-17000000000-00112233445566778899aabbccddeeff".into()),
    );
    p.tokens = Some(123_456_789);
    p.updated = Some(1_795_000_000);
    p
}

fn bench(c: &mut Criterion) {
    let p = table();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.gguf.spark.csv");
    let mut g = c.benchmark_group("profile_48x128");
    g.throughput(Throughput::Elements(1));
    g.bench_function("render", |b| b.iter(|| std::hint::black_box(p.render())));
    g.bench_function("rewrite_atomic", |b| b.iter(|| p.write(&path).unwrap()));
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
