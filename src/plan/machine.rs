//! What identifies a machine and where its measured facts live: the machine key, a rate at a
//! thread count and its interpolation, the per-machine directory, and the error of reading or
//! writing those records. A leaf of `plan/`: the hardware profile (`hardware.rs`) and the
//! per-type probe record (`type_cost.rs`) both build on it.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum HardwareError {
    #[error("read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("parse {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("write hardware profile {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// What identifies a machine: a cached measurement from another machine is never used.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MachineId {
    pub hostname: String,
    pub cpu_model: String,
    pub logical_cpus: u32,
    pub mem_total_bytes: u64,
}

impl MachineId {
    /// A short stable key for file names and receipts.
    pub fn key(&self) -> String {
        let mut h: u64 = 0xcbf29ce484222325;
        for b in format!(
            "{}|{}|{}|{}",
            self.hostname, self.cpu_model, self.logical_cpus, self.mem_total_bytes
        )
        .bytes()
        {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x100000001b3);
        }
        format!("{h:016x}")
    }
}

/// One measured point: a rate at a thread count.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct RatePoint {
    pub threads: u32,
    /// GB/s for bandwidth, GFLOP/s for compute.
    pub rate: f64,
}

pub fn rate_at(points: &[RatePoint], threads: u32) -> f64 {
    let mut pts: Vec<RatePoint> = points.to_vec();
    pts.sort_by_key(|p| p.threads);
    let Some(first) = pts.first() else {
        return 0.0;
    };
    if threads <= first.threads {
        return first.rate;
    }
    for w in pts.windows(2) {
        let (a, b) = (w[0], w[1]);
        if threads <= b.threads {
            let f = f64::from(threads - a.threads) / f64::from(b.threads - a.threads);
            return a.rate + f * (b.rate - a.rate);
        }
    }
    pts.last().map(|p| p.rate).unwrap_or(0.0)
}

/// The per-machine directory for hardware facts and receipts.
pub fn machine_dir() -> PathBuf {
    crate::engine::cache_dir().join("machine")
}
