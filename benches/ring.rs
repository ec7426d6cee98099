//! Ring throughput: one producer thread, one consumer thread, routing records through a real
//! `/dev/shm` ring. Reports records per second (target ≥ 20 M/s).

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use spark::ring::ShmRing;
use spark_proto::ring::RingGeometry;
use spark_proto::trace::{RoutingRecord, MAX_K};

const RECORDS: u64 = 1 << 22;

fn record(i: u64) -> RoutingRecord {
    let mut r = RoutingRecord {
        request: 1,
        token: i as u32,
        layer: (i % 48) as u16,
        phase: 1,
        n_used: 8,
        ids: [0; MAX_K],
        weights: [0.0; MAX_K],
    };
    for j in 0..8 {
        r.ids[j] = ((i as usize * 31 + j * 17) % 128) as u16;
        r.weights[j] = 0.125;
    }
    r
}

/// Moves `n` records through the ring; the producer publishes once per 48-record layer group,
/// as the tap does once per tensor; a full ring makes the producer retry (the bench measures
/// transfer, not drops). Returns the elapsed time and the failed pushes.
fn spsc(n: u64, capacity: u64) -> (Duration, u64) {
    let mut ring = ShmRing::create(capacity, RingGeometry::default()).unwrap();
    // SAFETY: the only producer; the scope joins it before `ring` drops.
    let mut producer = unsafe { ring.local_producer().unwrap() };
    let done = AtomicBool::new(false);
    let start = Instant::now();
    std::thread::scope(|s| {
        let done = &done;
        s.spawn(move || {
            let mut i = 0;
            while i < n {
                let before = i;
                for _ in 0..48 {
                    if i == n || !producer.write(&record(i)) {
                        break;
                    }
                    i += 1;
                }
                producer.publish();
                if i == before {
                    // Full: let the consumer run (the machine may have fewer free cores).
                    std::thread::yield_now();
                }
            }
            done.store(true, Ordering::Release);
        });
        let mut got = 0u64;
        let mut sum = 0u64;
        while got < n {
            let c = ring
                .reader()
                .consume(4096, |r| sum = sum.wrapping_add(u64::from(r.ids[0])));
            got += c as u64;
            if c == 0 {
                if done.load(Ordering::Acquire) && ring.written() == ring.read_count() {
                    break;
                }
                std::thread::yield_now();
            }
        }
        std::hint::black_box(sum);
    });
    (start.elapsed(), ring.dropped())
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("ring");
    g.throughput(Throughput::Elements(RECORDS));
    g.sample_size(10);
    g.bench_function("spsc_routing_records", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                total += spsc(RECORDS, 1 << 16).0;
            }
            total
        })
    });
    // The ring's own cost without any thread scheduling: one thread fills 48 records (one
    // layer's tensor), publishes, and drains them, over and over.
    g.bench_function("single_thread_push_pop", |b| {
        let mut ring = ShmRing::create(1 << 16, RingGeometry::default()).unwrap();
        // SAFETY: the only producer; it lives inside this closure, shorter than `ring`.
        let mut producer = unsafe { ring.local_producer().unwrap() };
        b.iter(|| {
            let mut sum = 0u64;
            let mut i = 0;
            while i < RECORDS {
                for _ in 0..48 {
                    producer.write(&record(i));
                    i += 1;
                }
                producer.publish();
                ring.reader()
                    .consume(48, |r| sum = sum.wrapping_add(u64::from(r.ids[0])));
            }
            std::hint::black_box(sum)
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
