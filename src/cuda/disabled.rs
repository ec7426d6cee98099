//! The CUDA device without the `cuda` feature: same entry points, each answers
//! [`CudaError::Disabled`]. Holds no state and links nothing.

use std::time::Duration;

use super::arena::SwapDevice;
use super::pool::{Layout, Plan};
use super::reference::Remap;
use super::CudaError;

/// Whether a CUDA device can be used: never, in this build.
pub fn available() -> Result<String, CudaError> {
    Err(CudaError::Disabled)
}

/// A CUDA device (primary context and a dedicated stream). Cannot be built here.
#[derive(Debug)]
pub struct Gpu {
    _never: std::convert::Infallible,
}

impl Gpu {
    pub fn open(_ordinal: usize) -> Result<Gpu, CudaError> {
        Err(CudaError::Disabled)
    }

    pub fn name(&self) -> String {
        match self._never {}
    }
}

/// The NVRTC-compiled kernels. Cannot be built here.
#[derive(Debug)]
pub struct Kernels {
    _never: std::convert::Infallible,
}

impl Kernels {
    pub fn load(_gpu: &Gpu) -> Result<Kernels, CudaError> {
        Err(CudaError::Disabled)
    }

    pub fn remap(&self, _gpu: &Gpu, _ids: &[i32], _table: &[i32]) -> Result<Remap, CudaError> {
        match self._never {}
    }
}

/// The slot arena in VRAM. Cannot be built here.
#[derive(Debug)]
pub struct GpuArena {
    _never: std::convert::Infallible,
}

impl GpuArena {
    pub fn new(_gpu: &Gpu, _layout: &Layout, _src: &[u8]) -> Result<GpuArena, CudaError> {
        Err(CudaError::Disabled)
    }
}

impl SwapDevice for GpuArena {
    fn label(&self) -> String {
        match self._never {}
    }
    fn is_gpu(&self) -> bool {
        match self._never {}
    }
    fn execute(&mut self, _src: &[u8], _plan: &Plan, _table: &[i32]) -> Result<(), CudaError> {
        match self._never {}
    }
    fn plain_copy(&mut self, _bytes: u64) -> Result<Duration, CudaError> {
        match self._never {}
    }
    fn checksums(&mut self, _ranges: &[(u64, u64)]) -> Result<Vec<u64>, CudaError> {
        match self._never {}
    }
    fn table(&mut self) -> Result<Vec<i32>, CudaError> {
        match self._never {}
    }
    fn take_device_seconds(&mut self) -> Option<f64> {
        match self._never {}
    }
}
