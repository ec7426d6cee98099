//! The GPU measurement kit behind `spark bench swap`: what copying expert slices from the
//! memory-mapped GGUF into VRAM costs on a device (host→device link bandwidth, VRAM copy
//! bandwidth, per-swap latency, what a decode step waits for), with its kernels.
//!
//! **Residency in production does not run here.** The expert slots inside llama-server are the
//! tap's (`tap/src/residency.rs`, fed from the engine's own host tensors and copied with the
//! engine's backend); the tap links neither cudarc nor this crate. What lives here drives the
//! measurement: a model of a slot cache ([`pool`]: which expert sits in which slot, what to
//! copy, what to evict, what an in-flight step pins) that produces copy plans, a host-memory
//! stand-in for VRAM ([`arena`]) that executes the same plans in tests, and the CPU reference
//! of every kernel ([`reference`]). The procedure itself is [`crate::bench::swap`].
//!
//! The device side lives behind the `cuda` cargo feature (off by default): `enabled.rs` drives
//! cudarc (primary context, own stream, pinned staging, async copies, events, NVRTC kernels);
//! `disabled.rs` has the same entry points and answers [`CudaError::Disabled`]. The device only
//! executes the plans the pool produces; it never decides which expert is resident.
//!
//! Never: evict an expert pinned by an in-flight step; drop a non-resident expert (a miss that
//! cannot get a slot is served by streaming, never skipped).

pub mod arena;
pub mod pool;
pub mod reference;

#[cfg(feature = "cuda")]
#[path = "enabled.rs"]
mod device;
#[cfg(not(feature = "cuda"))]
#[path = "disabled.rs"]
mod device;

pub use device::{available, Gpu, GpuArena, Kernels};

use crate::exit;

/// The remap kernel's source (`kernels/remap.cu`), compiled at run time with NVRTC.
pub const REMAP_CU: &str = include_str!("../../kernels/remap.cu");
/// The per-range checksum kernel's source (`kernels/checksum.cu`).
pub const CHECKSUM_CU: &str = include_str!("../../kernels/checksum.cu");

/// Errors of the CUDA module.
#[derive(Debug, thiserror::Error)]
pub enum CudaError {
    #[error("run on a GPU: built without CUDA: rebuild with --features cuda")]
    Disabled,
    #[error("load {0}: not found on this machine (no NVIDIA driver or CUDA runtime here; use --cpu for the host-memory check)")]
    NoLibrary(&'static str),
    #[error("use the CUDA driver: {0}")]
    Driver(String),
    #[error("compile kernel {name} with NVRTC: {message}")]
    Compile { name: &'static str, message: String },
    #[error("{0}")]
    Pool(#[from] pool::PoolError),
    #[error("{0}")]
    Usage(String),
    #[error("check GPU results: {0}")]
    Mismatch(String),
}

impl CudaError {
    /// The documented exit code: a build without CUDA or bad input is a usage error (2).
    pub fn exit_code(&self) -> i32 {
        match self {
            CudaError::Disabled | CudaError::NoLibrary(_) | CudaError::Usage(_) => exit::USAGE,
            CudaError::Pool(e) if e.is_usage() => exit::USAGE,
            _ => exit::CHECK_FAILED,
        }
    }
}

/// Whether this binary was built with the `cuda` feature.
pub const ENABLED: bool = cfg!(feature = "cuda");
