//! CUDA expert residency: a pool of VRAM slots per MoE layer, fed from the memory-mapped GGUF.
//!
//! Owns the slot bookkeeping ([`pool`]: which expert sits in which slot, what to copy, what
//! to evict, what is pinned by an in-flight step), the CPU reference of every kernel
//! ([`reference`]), a host-memory stand-in for VRAM ([`arena`]) that executes the same copy
//! plans in tests, and `spark bench swap` ([`bench`]).
//!
//! The device side lives behind the `cuda` cargo feature (off by default): `enabled.rs` drives
//! cudarc (primary context, own stream, pinned staging, async copies, events, NVRTC kernels);
//! `disabled.rs` has the same entry points and answers [`CudaError::Disabled`]. The device only
//! executes the plans the bookkeeping produces; it never decides residency.
//!
//! Never: evict an expert pinned by an in-flight step; drop a non-resident expert (a miss that
//! cannot get a slot is served by streaming, never skipped).

pub mod arena;
pub mod bench;
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
