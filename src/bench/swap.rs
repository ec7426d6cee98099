//! `spark bench swap`: what expert swap-ins cost on a device, against a plain copy of the same
//! bytes.
//!
//! Owns the measurement procedure, run identically on the GPU (`--features cuda`) and on the
//! host-memory arena (`--cpu`, a plumbing check whose numbers are host memcpy, never GPU
//! numbers). Every device call synchronises before the clock is read. The run ends by checking
//! that every occupied slot holds exactly its expert's bytes from the GGUF file.

use std::path::PathBuf;
use std::time::Instant;

use hdrhistogram::Histogram;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

use crate::cache::PolicyKind;
use crate::cuda::arena::{CpuArena, SwapDevice};
use crate::cuda::pool::{Layout, Plan, SlotPool};
use crate::cuda::{reference, CudaError};
use crate::gguf::{GgufFile, MoeGeometry};

/// Flags of `spark bench swap`.
#[derive(Debug, Clone, clap::Args)]
pub struct BenchSwapArgs {
    /// The GGUF model (a medium or large fixture gives real-sized experts)
    #[arg(short = 'm', long)]
    pub model: PathBuf,
    /// Slots per MoE layer (default: a quarter of the experts, at least the experts per token)
    #[arg(long)]
    pub slots: Option<u32>,
    /// Run the same plans against host memory: checks the plumbing, reports host memcpy GB/s
    /// (NOT a GPU number)
    #[arg(long)]
    pub cpu: bool,
    /// Print the report as JSON
    #[arg(long)]
    pub json: bool,
    /// Single-expert swaps to time
    #[arg(long, default_value_t = 256)]
    pub swaps: u32,
    /// Batched swaps (one decode step missing every expert of every layer) to time
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..))]
    pub batches: u32,
    /// Miss ratio for what a decode step waits for
    #[arg(long, default_value_t = 0.25)]
    pub miss_ratio: f64,
    /// Cache policy that chooses evictions
    #[arg(long, value_enum, default_value = "lru")]
    pub policy: PolicyKind,
    /// Seed of the expert choices
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// CUDA device ordinal
    #[arg(long, default_value_t = 0, conflicts_with = "cpu")]
    pub device: usize,
}

/// Bytes moved in a time.
#[derive(Debug, Clone, Serialize)]
pub struct Throughput {
    pub count: u64,
    pub bytes: u64,
    pub seconds: f64,
    pub gb_per_s: f64,
}

impl Throughput {
    fn new(count: u64, bytes: u64, seconds: f64) -> Throughput {
        let gb_per_s = if seconds > 0.0 {
            bytes as f64 / seconds / 1e9
        } else {
            0.0
        };
        Throughput {
            count,
            bytes,
            seconds,
            gb_per_s,
        }
    }
}

/// Single-swap latency of experts of one size.
#[derive(Debug, Clone, Serialize)]
pub struct SizeLatency {
    pub expert_bytes: u64,
    pub swaps: u64,
    pub p50_us: f64,
    pub p99_us: f64,
}

/// What a decode step waits for at a miss ratio.
#[derive(Debug, Clone, Serialize)]
pub struct DecodeWait {
    pub miss_ratio: f64,
    /// Experts a step routes to (MoE layers × experts per token).
    pub experts_per_step: u64,
    /// Bytes a step moves at this miss ratio.
    pub bytes_per_step: u64,
    /// Those bytes at the batched GB/s.
    pub estimated_ms: f64,
    /// Steps actually run with about this miss ratio, one plan per layer.
    pub measured_steps: u64,
    pub measured_miss_ratio: f64,
    pub measured_mean_ms: f64,
    pub measured_p99_ms: f64,
}

/// Device-side (event-timed) copy bandwidth: the DMA alone, without host staging.
#[derive(Debug, Clone, Serialize)]
pub struct DeviceTimed {
    pub single_gb_per_s: f64,
    pub batched_gb_per_s: f64,
    pub plain_gb_per_s: f64,
    pub batched_fraction_of_plain: f64,
}

/// The report of `spark bench swap`.
#[derive(Debug, Clone, Serialize)]
pub struct SwapReport {
    pub device: String,
    /// False for `--cpu`: then every GB/s here is host memcpy, not a GPU number.
    pub gpu: bool,
    pub model: PathBuf,
    pub policy: &'static str,
    pub moe_layers: usize,
    pub n_expert: u32,
    pub experts_per_token: u32,
    pub slots: u32,
    pub arena_bytes: u64,
    pub single: Throughput,
    pub batched: Throughput,
    /// Plain copies of a batch's bytes from pinned host memory (the peak).
    pub plain_copy: Throughput,
    pub single_fraction_of_plain: f64,
    pub batched_fraction_of_plain: f64,
    pub latency_by_size: Vec<SizeLatency>,
    pub decode_wait: DecodeWait,
    /// GPU only: the same copies timed by CUDA events on the stream.
    pub device_timed: Option<DeviceTimed>,
    pub swaps: u64,
    pub evictions: u64,
    pub bytes_moved: u64,
    /// Slots checked byte for byte (checksums) against the GGUF slices.
    pub slots_verified: u64,
}

/// Runs the bench on the device the flags choose.
pub fn run(args: &BenchSwapArgs) -> Result<SwapReport, CudaError> {
    let file = GgufFile::open(&args.model).map_err(|e| CudaError::Usage(e.to_string()))?;
    let geometry = MoeGeometry::of(&file).map_err(|e| CudaError::Usage(e.to_string()))?;
    let slots = args.slots.unwrap_or_else(|| default_slots(&geometry));
    let layout = Layout::new(&geometry, slots)?;
    if args.cpu {
        let mut dev = CpuArena::new(&layout);
        measure(args, &file, &geometry, slots, &mut dev)
    } else {
        let gpu = crate::cuda::Gpu::open(args.device)?;
        let mut dev = crate::cuda::GpuArena::new(&gpu, &layout, file.bytes())?;
        measure(args, &file, &geometry, slots, &mut dev)
    }
}

/// A quarter of the experts, at least the experts per token.
pub fn default_slots(g: &MoeGeometry) -> u32 {
    (g.n_expert / 4)
        .max(g.n_expert_used)
        .clamp(1, g.n_expert.max(1))
}

/// The measurement procedure, on any device.
pub fn measure<D: SwapDevice>(
    args: &BenchSwapArgs,
    file: &GgufFile,
    geometry: &MoeGeometry,
    slots: u32,
    dev: &mut D,
) -> Result<SwapReport, CudaError> {
    if !(0.0..=1.0).contains(&args.miss_ratio) {
        return Err(CudaError::Usage(format!(
            "parse --miss-ratio {}: expected a number from 0 to 1",
            args.miss_ratio
        )));
    }
    let src = file.bytes();
    let mut pool = SlotPool::new(geometry, slots, args.policy, None)?;
    let n_layer = pool.layout().layers.len();
    let n_expert = geometry.n_expert;
    let k = geometry.n_expert_used.max(1);
    let mut rng = ChaCha8Rng::seed_from_u64(args.seed);
    warm_pages(src, pool.layout());
    let mut step = 0u64;

    // single-expert swaps
    dev.take_device_seconds();
    let mut by_size: std::collections::BTreeMap<u64, Histogram<u64>> = Default::default();
    let (mut single_bytes, mut single_s, mut single_n) = (0u64, 0f64, 0u64);
    for i in 0..args.swaps {
        let layer = i as usize % n_layer;
        let Some(&e) = absent(&pool, layer, n_expert).choose(&mut rng) else {
            continue;
        };
        step += 1;
        let served = pool.request(step, layer, &[e])?;
        let (plan, dt) = timed(dev, src, &served.plan, pool.table())?;
        pool.release(step);
        if plan.is_empty() {
            continue;
        }
        let ns = (dt * 1e9) as u64;
        pool.record_swap_latency(ns);
        let size = pool.layout().layers[layer].expert_bytes;
        by_size
            .entry(size)
            .or_insert_with(new_hist)
            .saturating_record(ns.max(1));
        single_bytes += plan.bytes();
        single_s += dt;
        single_n += 1;
    }

    let single_dev = dev.take_device_seconds();

    // batched swaps: a step that misses min(k, slots) experts at every layer, one plan
    let per_layer = k.min(slots) as usize;
    let (mut batch_bytes, mut batch_s, mut batch_n) = (0u64, 0f64, 0u64);
    for _ in 0..args.batches {
        step += 1;
        let mut plan = Plan::default();
        for layer in 0..n_layer {
            let mut ids = absent(&pool, layer, n_expert);
            ids.shuffle(&mut rng);
            ids.truncate(per_layer);
            plan.extend(pool.request(step, layer, &ids)?.plan);
        }
        let (_, dt) = timed(dev, src, &plan, pool.table())?;
        pool.release(step);
        if plan.is_empty() {
            continue;
        }
        batch_bytes += plan.bytes();
        batch_s += dt;
        batch_n += 1;
    }

    // the peak: plain copies of a batch's bytes
    let mean_batch = batch_bytes.checked_div(batch_n).unwrap_or(0);
    let mut plain_s = 0f64;
    let plain_n = u64::from(args.batches.max(1));
    let batch_dev = dev.take_device_seconds();
    dev.plain_copy(mean_batch)?; // first touch of the source buffer is not measured
    dev.take_device_seconds();
    for _ in 0..plain_n {
        plain_s += dev.plain_copy(mean_batch)?.as_secs_f64();
    }
    let plain_dev = dev.take_device_seconds();
    let gbps = |bytes: u64, s: f64| if s > 0.0 { bytes as f64 / s / 1e9 } else { 0.0 };
    let device_timed = match (single_dev, batch_dev, plain_dev) {
        (Some(a), Some(b), Some(c)) => {
            let plain = gbps(mean_batch * plain_n, c);
            let batched = gbps(batch_bytes, b);
            Some(DeviceTimed {
                single_gb_per_s: gbps(single_bytes, a),
                batched_gb_per_s: batched,
                plain_gb_per_s: plain,
                batched_fraction_of_plain: if plain > 0.0 { batched / plain } else { 0.0 },
            })
        }
        _ => None,
    };
    let single = Throughput::new(single_n, single_bytes, single_s);
    let batched = Throughput::new(batch_n, batch_bytes, batch_s);
    let plain_copy = Throughput::new(plain_n, mean_batch * plain_n, plain_s);
    let frac = |t: &Throughput| {
        if plain_copy.gb_per_s > 0.0 {
            t.gb_per_s / plain_copy.gb_per_s
        } else {
            0.0
        }
    };

    // what a decode step waits for at the miss ratio
    let decode_wait = decode_wait(args, &mut pool, dev, src, &mut rng, &mut step, &batched, k)?;

    let slots_verified = verify(&pool, dev, src)?;
    let st = pool.stats();
    Ok(SwapReport {
        device: dev.label(),
        gpu: dev.is_gpu(),
        model: args.model.clone(),
        policy: args.policy.name(),
        moe_layers: n_layer,
        n_expert,
        experts_per_token: k,
        slots,
        arena_bytes: pool.layout().total_bytes,
        single_fraction_of_plain: frac(&single),
        batched_fraction_of_plain: frac(&batched),
        single,
        batched,
        plain_copy,
        latency_by_size: by_size
            .into_iter()
            .map(|(expert_bytes, h)| SizeLatency {
                expert_bytes,
                swaps: h.len(),
                p50_us: h.value_at_quantile(0.5) as f64 / 1e3,
                p99_us: h.value_at_quantile(0.99) as f64 / 1e3,
            })
            .collect(),
        decode_wait,
        device_timed,
        swaps: st.swaps,
        evictions: st.evictions,
        bytes_moved: st.bytes_moved,
        slots_verified,
    })
}

#[allow(clippy::too_many_arguments)]
fn decode_wait<D: SwapDevice>(
    args: &BenchSwapArgs,
    pool: &mut SlotPool,
    dev: &mut D,
    src: &[u8],
    rng: &mut ChaCha8Rng,
    step: &mut u64,
    batched: &Throughput,
    k: u32,
) -> Result<DecodeWait, CudaError> {
    let n_layer = pool.layout().layers.len();
    let n_expert = pool.layout().n_expert;
    let k = k.min(pool.layout().slots).min(n_expert).max(1);
    let misses_per_layer = (args.miss_ratio * f64::from(k)).round() as usize;
    let bytes_per_step: u64 = pool
        .layout()
        .layers
        .iter()
        .map(|l| l.expert_bytes * misses_per_layer as u64)
        .sum();
    let estimated_ms = if batched.gb_per_s > 0.0 {
        bytes_per_step as f64 / (batched.gb_per_s * 1e9) * 1e3
    } else {
        0.0
    };
    let mut hist = new_hist();
    let (mut total_s, mut routed, mut missed, mut steps) = (0f64, 0u64, 0u64, 0u64);
    for _ in 0..args.batches.max(1) * 2 {
        *step += 1;
        let mut wait = 0f64;
        for layer in 0..n_layer {
            let mut miss = absent(pool, layer, n_expert);
            miss.shuffle(rng);
            miss.truncate(misses_per_layer);
            let mut hit: Vec<u32> = (0..n_expert)
                .filter(|&e| pool.layer_table(layer)[e as usize] >= 0)
                .collect();
            hit.shuffle(rng);
            hit.truncate(k as usize - miss.len());
            let ids: Vec<u32> = miss.into_iter().chain(hit).collect();
            let served = pool.request(*step, layer, &ids)?;
            routed += served.outcomes.len() as u64;
            missed += served
                .outcomes
                .iter()
                .filter(|(_, o)| !matches!(o, crate::cuda::pool::Outcome::Hit(_)))
                .count() as u64;
            let (_, dt) = timed(dev, src, &served.plan, pool.table())?;
            wait += dt;
        }
        pool.release(*step);
        hist.saturating_record(((wait * 1e9) as u64).max(1));
        total_s += wait;
        steps += 1;
    }
    Ok(DecodeWait {
        miss_ratio: args.miss_ratio,
        experts_per_step: (n_layer as u64) * u64::from(k),
        bytes_per_step,
        estimated_ms,
        measured_steps: steps,
        measured_miss_ratio: if routed > 0 {
            missed as f64 / routed as f64
        } else {
            0.0
        },
        measured_mean_ms: if steps > 0 {
            total_s / steps as f64 * 1e3
        } else {
            0.0
        },
        measured_p99_ms: hist.value_at_quantile(0.99) as f64 / 1e6,
    })
}

/// Executes `plan` on `dev` and times it (the device synchronises before returning).
fn timed<'p, D: SwapDevice>(
    dev: &mut D,
    src: &[u8],
    plan: &'p Plan,
    table: &[i32],
) -> Result<(&'p Plan, f64), CudaError> {
    if plan.is_empty() {
        return Ok((plan, 0.0));
    }
    let t = Instant::now();
    dev.execute(src, plan, table)?;
    Ok((plan, t.elapsed().as_secs_f64()))
}

/// Experts of `layer` that are not resident.
fn absent(pool: &SlotPool, layer: usize, n_expert: u32) -> Vec<u32> {
    let t = pool.layer_table(layer);
    (0..n_expert).filter(|&e| t[e as usize] < 0).collect()
}

fn new_hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 600_000_000_000, 3).expect("valid histogram bounds")
}

/// Reads every expert byte once so that page faults of the mapping are not timed.
fn warm_pages(src: &[u8], layout: &Layout) {
    let mut acc = 0u64;
    for l in &layout.layers {
        for s in &l.slices {
            let start = s.file_offset as usize;
            let end = (start + s.bytes as usize * layout.n_expert as usize).min(src.len());
            for page in src[start.min(end)..end].chunks(4096) {
                acc = acc.wrapping_add(u64::from(page[0]));
            }
        }
    }
    std::hint::black_box(acc);
}

/// Checks every occupied slot against the GGUF bytes (device checksums vs CPU checksums) and
/// the device table against the pool's. Returns the slots checked.
pub fn verify<D: SwapDevice>(pool: &SlotPool, dev: &mut D, src: &[u8]) -> Result<u64, CudaError> {
    let layout = pool.layout();
    let mut ranges = Vec::new();
    let mut expected = Vec::new();
    let mut slots = 0u64;
    for (li, l) in layout.layers.iter().enumerate() {
        for slot in 0..layout.slots {
            let Some(e) = pool.slot_expert(li, slot) else {
                continue;
            };
            slots += 1;
            for c in l.copies(e, slot) {
                ranges.push((c.dst, c.bytes));
                expected.push(reference::checksum(
                    &src[c.src as usize..(c.src + c.bytes) as usize],
                ));
            }
        }
    }
    let got = dev.checksums(&ranges)?;
    if let Some(i) = (0..expected.len()).find(|&i| got.get(i) != Some(&expected[i])) {
        return Err(CudaError::Mismatch(format!(
            "arena range at {} ({} bytes) has checksum {:?}, the GGUF slice {}",
            ranges[i].0,
            ranges[i].1,
            got.get(i),
            expected[i]
        )));
    }
    if dev.table()? != pool.table() {
        return Err(CudaError::Mismatch(
            "the device's expert→slot table differs from the pool's".into(),
        ));
    }
    Ok(slots)
}

impl SwapReport {
    /// The text report.
    pub fn render(&self) -> String {
        let mut s = String::new();
        let unit = if self.gpu {
            "GB/s"
        } else {
            "GB/s host memcpy, NOT a GPU number"
        };
        s += &format!("device       {}\n", self.device);
        s += &format!(
            "model        {} ({} MoE layers, {} experts, top-{})\n",
            self.model.display(),
            self.moe_layers,
            self.n_expert,
            self.experts_per_token
        );
        s += &format!(
            "slots        {} per layer, {} arena bytes, policy {}\n",
            self.slots, self.arena_bytes, self.policy
        );
        s += &format!(
            "single swap  {:.2} {unit} ({} swaps, {} bytes), {:.1}% of plain copy\n",
            self.single.gb_per_s,
            self.single.count,
            self.single.bytes,
            100.0 * self.single_fraction_of_plain
        );
        s += &format!(
            "batched      {:.2} {unit} ({} batches, {} bytes), {:.1}% of plain copy\n",
            self.batched.gb_per_s,
            self.batched.count,
            self.batched.bytes,
            100.0 * self.batched_fraction_of_plain
        );
        s += &format!(
            "plain copy   {:.2} {unit} ({} copies of {} bytes)\n",
            self.plain_copy.gb_per_s,
            self.plain_copy.count,
            self.plain_copy
                .bytes
                .checked_div(self.plain_copy.count)
                .unwrap_or(0)
        );
        if let Some(d) = &self.device_timed {
            s += &format!(
                "device copy  event-timed DMA only: single {:.2} GB/s, batched {:.2} GB/s, plain {:.2} GB/s ({:.1}%)\n",
                d.single_gb_per_s,
                d.batched_gb_per_s,
                d.plain_gb_per_s,
                100.0 * d.batched_fraction_of_plain
            );
        }
        for l in &self.latency_by_size {
            s += &format!(
                "latency      expert {} bytes: p50 {:.1} us, p99 {:.1} us ({} swaps)\n",
                l.expert_bytes, l.p50_us, l.p99_us, l.swaps
            );
        }
        let w = &self.decode_wait;
        s += &format!(
            "decode wait  miss ratio {:.2}: {} bytes per step, {:.3} ms estimated; measured {:.3} ms mean, {:.3} ms p99 over {} steps (miss ratio {:.2})\n",
            w.miss_ratio,
            w.bytes_per_step,
            w.estimated_ms,
            w.measured_mean_ms,
            w.measured_p99_ms,
            w.measured_steps,
            w.measured_miss_ratio
        );
        s += &format!(
            "verified     {} slots equal their GGUF slices; {} swaps, {} evictions, {} bytes moved\n",
            self.slots_verified, self.swaps, self.evictions, self.bytes_moved
        );
        s
    }
}

/// Runs the bench and prints the report (text, or JSON with `--json`).
pub fn run_and_print(args: &BenchSwapArgs) -> Result<(), CudaError> {
    let report = run(args)?;
    if args.json {
        let text = serde_json::to_string_pretty(&report)
            .map_err(|e| CudaError::Usage(format!("write the report as JSON: {e}")))?;
        println!("{text}");
    } else {
        print!("{}", report.render());
    }
    Ok(())
}
