//! The CUDA device, with the `cuda` feature: cudarc over the driver API, loaded at run time.
//!
//! Owns the primary context of one GPU (the one llama-server's CUDA backend also uses), a
//! dedicated stream, the slot arena and expert→slot table in VRAM, a pinned staging buffer, and
//! the NVRTC-compiled kernels (compiled once per process and cached). It executes the copy plans
//! of [`super::pool`]; it never decides residency.
//!
//! A swap stages the expert's slices from the mapped GGUF into pinned memory (one host memcpy
//! per slice), issues one asynchronous host-to-device copy per slice on the stream, uploads the
//! table, and synchronises. Registering the whole mapping with the driver instead would skip
//! the staging memcpy; it is left for when the bench shows the staging costs.

use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use cudarc::driver::{
    result, sys, CudaContext, CudaEvent, CudaFunction, CudaSlice, CudaStream, DevicePtrMut,
    DriverError, LaunchConfig, PinnedHostSlice, PushKernelArg,
};

use super::arena::SwapDevice;
use super::pool::{Layout, Plan};
use super::reference::Remap;
use super::{CudaError, CHECKSUM_CU, REMAP_CU};

fn drv(e: DriverError) -> CudaError {
    CudaError::Driver(e.to_string())
}

/// Opens device 0 and returns its name.
pub fn available() -> Result<String, CudaError> {
    Ok(Gpu::open(0)?.name())
}

/// One GPU: its primary context and a stream of our own.
#[derive(Debug, Clone)]
pub struct Gpu {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    kernels: Arc<OnceLock<Kernels>>,
}

impl Gpu {
    /// Retains the primary context of device `ordinal` (shared with llama-server's CUDA
    /// backend in the same process) and creates a dedicated stream.
    pub fn open(ordinal: usize) -> Result<Gpu, CudaError> {
        // SAFETY: only tries to dlopen the driver library by its usual names; no symbol is
        // called. cudarc panics on first use when the library is absent, so check first.
        if !unsafe { cudarc::driver::sys::is_culib_present() } {
            return Err(CudaError::NoLibrary("the CUDA driver library (libcuda.so)"));
        }
        let ctx = CudaContext::new(ordinal).map_err(drv)?;
        let stream = ctx.new_stream().map_err(drv)?;
        Ok(Gpu {
            ctx,
            stream,
            kernels: Arc::new(OnceLock::new()),
        })
    }

    pub fn name(&self) -> String {
        self.ctx
            .name()
            .unwrap_or_else(|e| format!("CUDA device {} ({e})", self.ctx.ordinal()))
    }

    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// The kernels, compiled with NVRTC on first use and cached for the process.
    pub fn kernels(&self) -> Result<&Kernels, CudaError> {
        if self.kernels.get().is_none() {
            let k = Kernels::load(self)?;
            let _ = self.kernels.set(k);
        }
        Ok(self.kernels.get().expect("kernels were just set"))
    }
}

/// The kernels of `kernels/`, compiled at run time.
#[derive(Debug, Clone)]
pub struct Kernels {
    remap: CudaFunction,
    checksum: CudaFunction,
}

impl Kernels {
    /// Compiles `remap.cu` and `checksum.cu` with NVRTC and loads them into the context.
    pub fn load(gpu: &Gpu) -> Result<Kernels, CudaError> {
        // SAFETY: only tries to dlopen NVRTC by its usual names; no symbol is called.
        if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
            return Err(CudaError::NoLibrary("NVRTC (libnvrtc.so)"));
        }
        let load = |name: &'static str, src: &str, func: &str| -> Result<CudaFunction, CudaError> {
            let ptx = cudarc::nvrtc::compile_ptx(src).map_err(|e| CudaError::Compile {
                name,
                message: e.to_string(),
            })?;
            let module = gpu.ctx.load_module(ptx).map_err(drv)?;
            module.load_function(func).map_err(drv)
        };
        Ok(Kernels {
            remap: load("remap.cu", REMAP_CU, "spark_remap")?,
            checksum: load("checksum.cu", CHECKSUM_CU, "spark_checksum")?,
        })
    }

    /// Runs the remap kernel on `ids` through `table`; misses come back sorted.
    pub fn remap(&self, gpu: &Gpu, ids: &[i32], table: &[i32]) -> Result<Remap, CudaError> {
        let n = ids.len();
        if n == 0 {
            return Ok(Remap::default());
        }
        let s = &gpu.stream;
        let d_ids = s.clone_htod(ids).map_err(drv)?;
        let none = [-1i32];
        let d_table = s
            .clone_htod(if table.is_empty() { &none[..] } else { table })
            .map_err(drv)?;
        let mut d_slots = s.alloc_zeros::<i32>(n).map_err(drv)?;
        let mut d_flags = s.alloc_zeros::<u8>(n).map_err(drv)?;
        let mut d_count = s.alloc_zeros::<u32>(1).map_err(drv)?;
        let mut d_list = s.alloc_zeros::<u32>(n).map_err(drv)?;
        let (n_i, ne_i) = (n as i32, table.len() as i32);
        let mut b = s.launch_builder(&self.remap);
        b.arg(&d_ids)
            .arg(&d_table)
            .arg(&n_i)
            .arg(&ne_i)
            .arg(&mut d_slots)
            .arg(&mut d_flags)
            .arg(&mut d_count)
            .arg(&mut d_list);
        // SAFETY: the arguments match `spark_remap`'s signature in kernels/remap.cu in order
        // and type (int*, int*, int, int, int*, unsigned char*, unsigned int*, unsigned int*);
        // every buffer holds at least `n` elements (the table `ne_i`), and the kernel writes
        // only below `n` and below the miss count, which is at most `n`.
        unsafe { b.launch(LaunchConfig::for_num_elems(n as u32)) }.map_err(drv)?;
        let slots = s.clone_dtoh(&d_slots).map_err(drv)?;
        let miss_flags = s.clone_dtoh(&d_flags).map_err(drv)?;
        let count = s.clone_dtoh(&d_count).map_err(drv)?[0] as usize;
        let mut misses = s.clone_dtoh(&d_list).map_err(drv)?;
        misses.truncate(count);
        misses.sort_unstable();
        Ok(Remap {
            slots,
            miss_flags,
            misses,
        })
    }
}

/// The slot arena and the expert→slot table in VRAM, fed through pinned staging memory.
#[derive(Debug)]
pub struct GpuArena {
    gpu: Gpu,
    mem: CudaSlice<u8>,
    table: CudaSlice<i32>,
    staging: Option<PinnedHostSlice<u8>>,
    plain_src: Option<PinnedHostSlice<u8>>,
    /// Timing events around each batch of copies.
    start: CudaEvent,
    end: CudaEvent,
    /// Event-timed copy seconds since the last `take_device_seconds`.
    device_s: f64,
}

impl GpuArena {
    /// Allocates the arena of `layout` (zeroed) and an empty table on `gpu`.
    pub fn new(gpu: &Gpu, layout: &Layout, _src: &[u8]) -> Result<GpuArena, CudaError> {
        let s = &gpu.stream;
        let mem = s
            .alloc_zeros::<u8>(layout.total_bytes.max(1) as usize)
            .map_err(drv)?;
        let n_table = (layout.layers.len() * layout.n_expert as usize).max(1);
        let table = s.clone_htod(&vec![-1i32; n_table]).map_err(drv)?;
        let timing = Some(sys::CUevent_flags::CU_EVENT_DEFAULT);
        Ok(GpuArena {
            gpu: gpu.clone(),
            mem,
            table,
            staging: None,
            plain_src: None,
            start: gpu.ctx.new_event(timing).map_err(drv)?,
            end: gpu.ctx.new_event(timing).map_err(drv)?,
            device_s: 0.0,
        })
    }

    fn pinned(
        ctx: &Arc<CudaContext>,
        slot: &mut Option<PinnedHostSlice<u8>>,
        bytes: usize,
    ) -> Result<(), CudaError> {
        if slot.as_ref().is_some_and(|p| p.len() >= bytes) {
            return Ok(());
        }
        *slot = None;
        // SAFETY: the memory is uninitialised; every byte is written (staging: before each
        // copy reads it; plain source: filled right below) before the device reads it.
        let mut p = unsafe { ctx.alloc_pinned::<u8>(bytes.max(1)) }.map_err(drv)?;
        p.as_mut_slice().map_err(drv)?.fill(0x5a);
        *slot = Some(p);
        Ok(())
    }
}

impl SwapDevice for GpuArena {
    fn label(&self) -> String {
        self.gpu.name()
    }

    fn is_gpu(&self) -> bool {
        true
    }

    fn execute(&mut self, src: &[u8], plan: &Plan, table: &[i32]) -> Result<(), CudaError> {
        let total = plan.bytes() as usize;
        Self::pinned(&self.gpu.ctx, &mut self.staging, total)?;
        let arena_len = self.mem.len() as u64;
        for c in &plan.copies {
            if c.src + c.bytes > src.len() as u64 {
                return Err(CudaError::Usage(format!(
                    "copy {} bytes at {}: past the end of the model file",
                    c.bytes, c.src
                )));
            }
            assert!(c.dst + c.bytes <= arena_len, "copy past the arena");
        }
        let staging = self.staging.as_mut().expect("staging was just allocated");
        // waits for any earlier use of the staging buffer (there is none: every call ends
        // synchronised), then hands out the host view
        let host = staging.as_mut_slice().map_err(drv)?;
        let stream = &self.gpu.stream;
        self.start.record(stream).map_err(drv)?;
        let (base, _sync) = self.mem.device_ptr_mut(stream);
        let mut at = 0usize;
        // stage slice i, then queue its copy: the DMA of slice i overlaps staging slice i + 1
        for c in &plan.copies {
            let (s, n) = (c.src as usize, c.bytes as usize);
            host[at..at + n].copy_from_slice(&src[s..s + n]);
            // SAFETY: the destination range lies inside `self.mem` (checked above); the source
            // is pinned memory owned by `self.staging`, at a range no later slice reuses, and it
            // is neither freed nor written again until the stream is synchronised below.
            let queued = unsafe {
                result::memcpy_htod_async(base + c.dst, &host[at..at + n], stream.cu_stream())
            };
            if let Err(e) = queued {
                // copies already queued still read the staging buffer: let them finish
                let _ = stream.synchronize();
                return Err(drv(e));
            }
            at += n;
        }
        drop(_sync);
        self.end.record(stream).map_err(drv)?;
        stream.memcpy_htod(table, &mut self.table).map_err(drv)?;
        stream.synchronize().map_err(drv)?;
        self.device_s += f64::from(self.start.elapsed_ms(&self.end).map_err(drv)?) / 1e3;
        Ok(())
    }

    fn plain_copy(&mut self, bytes: u64) -> Result<Duration, CudaError> {
        let n = (bytes as usize).min(self.mem.len());
        Self::pinned(&self.gpu.ctx, &mut self.plain_src, n)?;
        let host = self
            .plain_src
            .as_ref()
            .expect("source was just allocated")
            .as_slice()
            .map_err(drv)?;
        let stream = &self.gpu.stream;
        stream.synchronize().map_err(drv)?;
        let t = Instant::now();
        self.start.record(stream).map_err(drv)?;
        {
            let (base, _sync) = self.mem.device_ptr_mut(stream);
            // SAFETY: `n` bytes fit the arena (clamped above) and the pinned source holds at
            // least `n` bytes that stay alive and unwritten until the synchronise below.
            unsafe { result::memcpy_htod_async(base, &host[..n], stream.cu_stream()) }
                .map_err(drv)?;
        }
        self.end.record(stream).map_err(drv)?;
        stream.synchronize().map_err(drv)?;
        let wall = t.elapsed();
        self.device_s += f64::from(self.start.elapsed_ms(&self.end).map_err(drv)?) / 1e3;
        Ok(wall)
    }

    fn checksums(&mut self, ranges: &[(u64, u64)]) -> Result<Vec<u64>, CudaError> {
        if ranges.is_empty() {
            return Ok(Vec::new());
        }
        for &(o, n) in ranges {
            if o + n > self.mem.len() as u64 {
                return Err(CudaError::Usage(format!(
                    "checksum {n} bytes at {o}: past the arena"
                )));
            }
        }
        let s = &self.gpu.stream;
        let kernels = match self.gpu.kernels() {
            Ok(k) => k.clone(),
            Err(CudaError::NoLibrary(_)) => {
                // no NVRTC on this machine: read the arena back and checksum on the host
                let host = s.clone_dtoh(&self.mem).map_err(drv)?;
                return Ok(ranges
                    .iter()
                    .map(|&(o, n)| super::reference::checksum(&host[o as usize..(o + n) as usize]))
                    .collect());
            }
            Err(e) => return Err(e),
        };
        let offsets: Vec<u64> = ranges.iter().map(|r| r.0).collect();
        let lens: Vec<u64> = ranges.iter().map(|r| r.1).collect();
        let d_off = s.clone_htod(&offsets).map_err(drv)?;
        let d_len = s.clone_htod(&lens).map_err(drv)?;
        let mut d_out = s.alloc_zeros::<u64>(ranges.len()).map_err(drv)?;
        let mut b = s.launch_builder(&kernels.checksum);
        b.arg(&self.mem).arg(&d_off).arg(&d_len).arg(&mut d_out);
        let cfg = LaunchConfig {
            grid_dim: (ranges.len() as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: the arguments match `spark_checksum` (unsigned char*, u64*, u64*, u64*); one
        // block per range, and every range lies inside the arena (checked above); `d_out` has
        // one zeroed element per block.
        unsafe { b.launch(cfg) }.map_err(drv)?;
        s.clone_dtoh(&d_out).map_err(drv)
    }

    fn table(&mut self) -> Result<Vec<i32>, CudaError> {
        self.gpu.stream.clone_dtoh(&self.table).map_err(drv)
    }

    fn take_device_seconds(&mut self) -> Option<f64> {
        Some(std::mem::take(&mut self.device_s))
    }
}
