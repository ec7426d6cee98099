//! Hardware facts for the planner: host RAM, host memory bandwidth and compute per thread count,
//! and (from flags, or the `cuda` feature when it exists) the GPU's VRAM and bandwidth.
//!
//! Owns the per-machine hardware profile `cache_dir()/machine/hardware.json`: the measured part
//! (bandwidth, compute) is cached there and re-measured when the machine identity changes; RAM is
//! read from `/proc/meminfo` on every call because it changes. Flags always win over both. Also
//! reads (never makes) the per-type compute costs a probe measured with ggml's own kernels
//! ([`super::type_cost`]; the probe that spawns llama-bench is [`super::type_probe`]). Never
//! spawns processes and never measures in a debug build without saying so (a debug build's numbers
//! are not cached).

use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::{Deserialize, Serialize};

pub use super::machine::{machine_dir, rate_at, HardwareError, MachineId, RatePoint};

/// Hardware profile format version; a cache with another version is re-measured.
pub const HARDWARE_VERSION: u32 = 1;

/// The measured, cacheable part of the hardware profile.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Measured {
    pub version: u32,
    pub machine: MachineId,
    /// Streaming read bandwidth of host memory, GB/s, per thread count.
    pub host_read_gbps: Vec<RatePoint>,
    /// f32 multiply-add throughput, GFLOP/s, per thread count (portable code, no explicit SIMD).
    pub host_gflops: Vec<RatePoint>,
    /// Unix seconds of the measurement.
    pub measured_unix: u64,
    /// Seconds the measurement took.
    pub measure_secs: f64,
}

/// GPU facts; without the `cuda` feature they come from flags only.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct GpuFacts {
    pub name: String,
    pub vram_total_bytes: Option<u64>,
    pub vram_free_bytes: Option<u64>,
    /// Device memory bandwidth, GB/s.
    pub vram_gbps: f64,
    /// Host-to-device bandwidth, GB/s.
    pub h2d_gbps: Option<f64>,
    /// Dense compute, TFLOP/s.
    pub tflops: Option<f64>,
    /// `flags` or `cuda`.
    pub source: String,
}

/// Everything the planner knows about this machine.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HardwareFacts {
    pub machine: MachineId,
    pub ram_total_bytes: u64,
    pub ram_available_bytes: u64,
    pub host_read_gbps: Vec<RatePoint>,
    pub host_gflops: Vec<RatePoint>,
    pub gpu: Option<GpuFacts>,
    /// The host's compute cost per weight of each probed type (`spark plan probe`), when a probe
    /// of this machine is on record and `--host-gflops` does not override it.
    #[serde(default)]
    pub type_costs: Option<super::type_cost::TypeCosts>,
    /// Where each fact came from, e.g. `host bandwidth: measured (cached 2026-…)`.
    pub sources: Vec<String>,
}

/// Flag overrides; `None` means "use the measured or read value".
#[derive(Debug, Clone, Default)]
pub struct HardwareOverrides {
    pub ram_total_mib: Option<u64>,
    pub ram_available_mib: Option<u64>,
    /// Host bandwidth in GB/s at every thread count.
    pub host_gbps: Option<f64>,
    pub host_gflops: Option<f64>,
    pub gpu_name: Option<String>,
    pub vram_total_mib: Option<u64>,
    pub vram_gbps: Option<f64>,
    pub h2d_gbps: Option<f64>,
    pub gpu_tflops: Option<f64>,
    /// Measure again even when a cached measurement exists.
    pub remeasure: bool,
}

impl HardwareFacts {
    /// Host read bandwidth at `threads`, GB/s (linear between measured points, flat outside).
    pub fn host_gbps_at(&self, threads: u32) -> f64 {
        rate_at(&self.host_read_gbps, threads)
    }

    pub fn host_gflops_at(&self, threads: u32) -> f64 {
        rate_at(&self.host_gflops, threads)
    }
}

/// RAM from `/proc/meminfo`-formatted text: (total, available) in bytes.
pub fn parse_meminfo(text: &str) -> Option<(u64, u64)> {
    let field = |name: &str| -> Option<u64> {
        let line = text.lines().find(|l| l.starts_with(name))?;
        let rest = line[name.len()..].trim_start_matches(':').trim();
        let mut parts = rest.split_whitespace();
        let n: u64 = parts.next()?.parse().ok()?;
        let mult = match parts.next() {
            Some("kB") | Some("KB") | Some("kb") => 1024,
            None => 1,
            Some(_) => return None,
        };
        n.checked_mul(mult)
    };
    let total = field("MemTotal")?;
    let avail = field("MemAvailable").or_else(|| field("MemFree"))?;
    Some((total, avail))
}

fn read_meminfo() -> Result<(u64, u64), HardwareError> {
    let path = PathBuf::from("/proc/meminfo");
    let text = std::fs::read_to_string(&path).map_err(|source| HardwareError::Read {
        path: path.clone(),
        source,
    })?;
    parse_meminfo(&text).ok_or(HardwareError::Parse {
        path,
        message: "no MemTotal or MemAvailable line".into(),
    })
}

/// This machine's identity (hostname, CPU model, logical CPUs, RAM).
pub fn machine_id(mem_total_bytes: u64) -> MachineId {
    let hostname = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into());
    let cpu_model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| std::env::consts::ARCH.to_string());
    let logical_cpus = std::thread::available_parallelism()
        .map(|n| n.get() as u32)
        .unwrap_or(1);
    MachineId {
        hostname,
        cpu_model,
        logical_cpus,
        mem_total_bytes,
    }
}

pub fn hardware_path() -> PathBuf {
    machine_dir().join("hardware.json")
}

/// Thread counts to measure: 1, 2, 4, … and the machine's logical CPU count.
pub fn thread_counts(logical: u32) -> Vec<u32> {
    let mut v = Vec::new();
    let mut t = 1;
    while t < logical {
        v.push(t);
        t *= 2;
    }
    v.push(logical.max(1));
    v
}

/// Streaming-read bandwidth in GB/s with `threads` threads, one rate per pass: each thread
/// compares its halves of two equal buffers, which libc's `memcmp` does with the widest loads the
/// CPU has, so the number does not depend on how spark itself was compiled.
fn read_passes(a: &[u8], b: &[u8], threads: u32, passes: u32) -> Vec<f64> {
    let chunk = a.len().div_ceil(threads as usize);
    (0..passes)
        .map(|_| {
            let t0 = Instant::now();
            std::thread::scope(|s| {
                for (x, y) in a.chunks(chunk).zip(b.chunks(chunk)) {
                    s.spawn(move || std::hint::black_box(std::hint::black_box(x) == y));
                }
            });
            (a.len() + b.len()) as f64 / t0.elapsed().as_secs_f64() / 1e9
        })
        .collect()
}

/// The best of `passes`: what the machine can do.
fn read_bandwidth(a: &[u8], b: &[u8], threads: u32, passes: u32) -> f64 {
    read_passes(a, b, threads, passes)
        .into_iter()
        .fold(0.0, f64::max)
}

/// Measures host read bandwidth at `threads` now, the median of 6 passes (about 0.3 s): for
/// validation on a shared machine, where the bandwidth left to one process drifts minute to
/// minute.
pub fn read_gbps_now(threads: u32) -> f64 {
    let a = vec![0x5au8; 128 << 20];
    let b = vec![0x5au8; 128 << 20];
    super::median::median(&read_passes(&a, &b, threads.max(1), 6))
}

/// f32 multiply-add throughput in GFLOP/s with `threads` threads.
fn gflops(threads: u32, iters: u32) -> f64 {
    let t0 = Instant::now();
    std::thread::scope(|s| {
        for t in 0..threads {
            s.spawn(move || {
                let mut a = [1.0f32 + t as f32 * 1e-3; 32];
                let b = std::hint::black_box([0.999_999f32; 32]);
                let c = std::hint::black_box([1e-7f32; 32]);
                for _ in 0..iters {
                    for i in 0..32 {
                        a[i] = a[i] * b[i] + c[i];
                    }
                }
                std::hint::black_box(a);
            });
        }
    });
    let flops = 2.0 * 32.0 * f64::from(iters) * f64::from(threads);
    flops / t0.elapsed().as_secs_f64() / 1e9
}

/// Runs the short benchmarks (about a second on a quiet machine).
pub fn measure(machine: MachineId) -> Measured {
    let t0 = Instant::now();
    // 2 × 128 MiB: larger than any last-level cache this is likely to meet.
    let a = vec![0x5au8; 128 << 20];
    let b = vec![0x5au8; 128 << 20];
    let counts = thread_counts(machine.logical_cpus);
    let host_read_gbps = counts
        .iter()
        .map(|&t| RatePoint {
            threads: t,
            rate: read_bandwidth(&a, &b, t, 4),
        })
        .collect();
    drop((a, b));
    // The compute loop is compiled code: a debug build runs a short, slow version of it.
    let iters = if cfg!(debug_assertions) {
        50_000
    } else {
        2_000_000
    };
    let host_gflops = counts
        .iter()
        .map(|&t| RatePoint {
            threads: t,
            rate: (0..2).map(|_| gflops(t, iters)).fold(0.0, f64::max),
        })
        .collect();
    Measured {
        version: HARDWARE_VERSION,
        machine,
        host_read_gbps,
        host_gflops,
        measured_unix: unix_now(),
        measure_secs: t0.elapsed().as_secs_f64(),
    }
}

pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Reads a cached measurement; `None` when absent, unreadable, of another version or machine.
pub fn load_cached(path: &Path, machine: &MachineId) -> Option<Measured> {
    let text = std::fs::read_to_string(path).ok()?;
    let m: Measured = serde_json::from_str(&text).ok()?;
    (m.version == HARDWARE_VERSION && &m.machine == machine && !m.host_read_gbps.is_empty())
        .then_some(m)
}

pub fn save(path: &Path, m: &Measured) -> Result<(), HardwareError> {
    let write = |source| HardwareError::Write {
        path: path.to_path_buf(),
        source,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(write)?;
    }
    let json = serde_json::to_vec_pretty(m).expect("hardware facts serialize");
    crate::atomic_file::write_atomic(path, &json).map_err(write)
}

/// Gathers the facts: RAM now, bandwidth and compute from the cache (measuring when needed and
/// no flag gives them), GPU facts from flags. Measures nothing when flags give every rate.
pub fn gather(o: &HardwareOverrides) -> Result<HardwareFacts, HardwareError> {
    let (ram_total, ram_avail) = read_meminfo()?;
    let machine = machine_id(ram_total);
    let mut sources = Vec::new();
    let need_measure = o.host_gbps.is_none() || o.host_gflops.is_none();
    let path = hardware_path();
    let measured = if !need_measure {
        None
    } else if let Some(m) = load_cached(&path, &machine).filter(|_| !o.remeasure) {
        sources.push(format!(
            "host rates: measured {} s ago, cached in {}",
            unix_now().saturating_sub(m.measured_unix),
            path.display()
        ));
        Some(m)
    } else {
        let m = measure(machine.clone());
        if cfg!(debug_assertions) {
            sources.push(
                "host rates: measured now by a debug build (not cached; use a release build)"
                    .into(),
            );
        } else {
            save(&path, &m)?;
            sources.push(format!(
                "host rates: measured now in {:.1} s, cached in {}",
                m.measure_secs,
                path.display()
            ));
        }
        Some(m)
    };
    let flat = |rate: f64| vec![RatePoint { threads: 1, rate }];
    let host_read_gbps = match o.host_gbps {
        Some(r) => {
            sources.push(format!("host bandwidth: {r} GB/s from --host-bw"));
            flat(r)
        }
        None => measured
            .as_ref()
            .map(|m| m.host_read_gbps.clone())
            .unwrap_or_default(),
    };
    let host_gflops = match o.host_gflops {
        Some(r) => {
            sources.push(format!("host compute: {r} GFLOP/s from --host-gflops"));
            flat(r)
        }
        None => measured
            .as_ref()
            .map(|m| m.host_gflops.clone())
            .unwrap_or_default(),
    };
    let type_costs = if o.host_gflops.is_some() {
        None
    } else {
        let path = super::type_cost::type_costs_path();
        let c = super::type_cost::load(&path, &machine);
        match &c {
            Some(c) => sources.push(format!(
                "host compute per weight type: {} probed with {} {} s ago, in {}",
                c.types().join(", "),
                c.engine,
                unix_now().saturating_sub(c.measured_unix),
                path.display()
            )),
            None => sources.push(
                "host compute per weight type: not probed (`spark plan probe` measures it); 2 FLOP per weight at the portable FMA rate for every type".into(),
            ),
        }
        c
    };
    let mib = |v: u64| v.saturating_mul(1 << 20);
    let ram_total_bytes = o.ram_total_mib.map(mib).unwrap_or(ram_total);
    let ram_available_bytes = o
        .ram_available_mib
        .map(mib)
        .unwrap_or(ram_avail)
        .min(ram_total_bytes);
    if o.ram_total_mib.is_some() || o.ram_available_mib.is_some() {
        sources.push("host RAM: from --ram-total / --ram-available".into());
    } else {
        sources.push("host RAM: /proc/meminfo".into());
    }
    let gpu = o.vram_gbps.map(|vram_gbps| GpuFacts {
        name: o
            .gpu_name
            .clone()
            .unwrap_or_else(|| "GPU (from flags)".into()),
        vram_total_bytes: o.vram_total_mib.map(mib),
        vram_free_bytes: None,
        vram_gbps,
        h2d_gbps: o.h2d_gbps,
        tflops: o.gpu_tflops,
        source: "flags".into(),
    });
    match &gpu {
        Some(_) => sources.push("GPU: from --vram-bw and friends".into()),
        None => sources.push(
            "GPU: none known (this build has no `cuda` feature; pass --vram-bw to plan for one)"
                .into(),
        ),
    }
    Ok(HardwareFacts {
        machine,
        ram_total_bytes,
        ram_available_bytes,
        host_read_gbps,
        host_gflops,
        gpu,
        type_costs,
        sources,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meminfo_parses_kib_lines() {
        let text = "MemTotal:       24684084 kB\nMemFree:        22469180 kB\nMemAvailable:   23981216 kB\n";
        assert_eq!(
            parse_meminfo(text),
            Some((24684084 * 1024, 23981216 * 1024))
        );
        assert_eq!(
            parse_meminfo("MemTotal: 10 kB\nMemFree: 4 kB\n"),
            Some((10240, 4096))
        );
        assert_eq!(parse_meminfo("Nothing: 1 kB\n"), None);
        assert_eq!(parse_meminfo("MemTotal: x kB\nMemFree: 1 kB"), None);
    }

    #[test]
    fn rates_interpolate_between_thread_counts() {
        let pts = [
            RatePoint {
                threads: 1,
                rate: 10.0,
            },
            RatePoint {
                threads: 4,
                rate: 40.0,
            },
        ];
        assert_eq!(rate_at(&pts, 1), 10.0);
        assert_eq!(rate_at(&pts, 2), 20.0);
        assert_eq!(rate_at(&pts, 16), 40.0);
        assert_eq!(rate_at(&[], 2), 0.0);
    }

    #[test]
    fn thread_counts_double_up_to_the_cpu_count() {
        assert_eq!(thread_counts(1), vec![1]);
        assert_eq!(thread_counts(2), vec![1, 2]);
        assert_eq!(thread_counts(6), vec![1, 2, 4, 6]);
    }

    #[test]
    fn cache_from_another_machine_is_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("hw.json");
        let me = machine_id(1 << 30);
        let m = Measured {
            version: HARDWARE_VERSION,
            machine: me.clone(),
            host_read_gbps: vec![RatePoint {
                threads: 1,
                rate: 5.0,
            }],
            host_gflops: vec![],
            measured_unix: 1,
            measure_secs: 0.1,
        };
        save(&path, &m).unwrap();
        assert!(load_cached(&path, &me).is_some());
        let other = MachineId {
            hostname: "elsewhere".into(),
            ..me
        };
        assert!(load_cached(&path, &other).is_none());
    }
}
