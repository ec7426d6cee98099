//! Devices that execute copy plans, and the host-memory arena that stands in for VRAM.
//!
//! [`SwapDevice`] is what the bench and the tests drive: the GPU (`enabled.rs`) and
//! [`CpuArena`] run the exact same [`Plan`]s, so the CPU proves the bookkeeping byte for byte
//! and the GPU only has to prove its copies. A CPU arena's timings are host memcpy numbers,
//! never GPU numbers.

use std::time::{Duration, Instant};

use super::pool::{Layout, Plan};
use super::reference;
use super::CudaError;

/// Something that holds the slot arena and the expert→slot table, and executes plans.
pub trait SwapDevice {
    /// What this is, for reports ("host memory (not a GPU)", the GPU's name).
    fn label(&self) -> String;
    /// Whether timings are GPU timings.
    fn is_gpu(&self) -> bool;
    /// Executes `plan` (copies from `src`, the mapped GGUF) then uploads `table`; returns when
    /// the copies are complete.
    fn execute(&mut self, src: &[u8], plan: &Plan, table: &[i32]) -> Result<(), CudaError>;
    /// One plain copy of `bytes` bytes from pinned (or ordinary) host memory into the arena:
    /// the peak a swap is compared with. Returns the synchronised elapsed time.
    fn plain_copy(&mut self, bytes: u64) -> Result<Duration, CudaError>;
    /// [`reference::checksum`] of each arena range `(offset, len)`.
    fn checksums(&mut self, ranges: &[(u64, u64)]) -> Result<Vec<u64>, CudaError>;
    /// The table as the device holds it.
    fn table(&mut self) -> Result<Vec<i32>, CudaError>;
    /// Seconds the device itself spent copying (event-timed) since the last call, when the
    /// device times its copies (the GPU does; the CPU arena does not).
    fn take_device_seconds(&mut self) -> Option<f64> {
        None
    }
}

/// Host memory standing in for VRAM.
#[derive(Debug)]
pub struct CpuArena {
    mem: Vec<u8>,
    table: Vec<i32>,
    scratch: Vec<u8>,
}

impl CpuArena {
    /// An arena for `layout`, zero-filled, with an empty table.
    pub fn new(layout: &Layout) -> CpuArena {
        CpuArena {
            mem: vec![0xa5; layout.total_bytes as usize],
            table: vec![-1; layout.layers.len() * layout.n_expert as usize],
            scratch: Vec::new(),
        }
    }

    /// The arena's bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.mem
    }
}

impl SwapDevice for CpuArena {
    fn label(&self) -> String {
        "host memory (CPU arena, NOT a GPU)".into()
    }

    fn is_gpu(&self) -> bool {
        false
    }

    fn execute(&mut self, src: &[u8], plan: &Plan, table: &[i32]) -> Result<(), CudaError> {
        for c in &plan.copies {
            let (s, d, n) = (c.src as usize, c.dst as usize, c.bytes as usize);
            let from = src.get(s..s + n).ok_or_else(|| {
                CudaError::Usage(format!(
                    "copy {n} bytes at {s}: past the end of the model file"
                ))
            })?;
            self.mem[d..d + n].copy_from_slice(from);
        }
        self.table.clear();
        self.table.extend_from_slice(table);
        Ok(())
    }

    fn plain_copy(&mut self, bytes: u64) -> Result<Duration, CudaError> {
        let n = (bytes as usize).min(self.mem.len());
        if self.scratch.len() < n {
            self.scratch = vec![0x5a; n];
        }
        let t = Instant::now();
        self.mem[..n].copy_from_slice(&self.scratch[..n]);
        std::hint::black_box(&self.mem);
        Ok(t.elapsed())
    }

    fn checksums(&mut self, ranges: &[(u64, u64)]) -> Result<Vec<u64>, CudaError> {
        Ok(ranges
            .iter()
            .map(|&(o, n)| reference::checksum(&self.mem[o as usize..(o + n) as usize]))
            .collect())
    }

    fn table(&mut self) -> Result<Vec<i32>, CudaError> {
        Ok(self.table.clone())
    }
}
