//! The counters and switches the capture path and the control thread share: all atomics, so
//! neither side ever waits for the other. A leaf of the tap.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, Ordering};

use spark_proto::control::HiddenTensor;

/// Counters and switches shared with the control thread (all lock-free).
pub struct Shared {
    pub request: AtomicU32,
    pub records: AtomicU64,
    pub dropped: AtomicU64,
    pub ubatches: AtomicU64,
    pub unmapped: AtomicU64,
    pub hidden_bytes: AtomicU64,
    pub layers_seen: [AtomicU64; 8],
    pub hidden_on: AtomicBool,
    pub hidden_available: AtomicBool,
    pub hidden_every: AtomicU32,
    pub hidden_budget: AtomicU64,
    pub hidden_tensor: AtomicU8,
    /// Graphs whose routing was read once after the graph (the graph observer, `graph.rs`).
    pub graph_reads: AtomicU64,
    /// Hidden-state rows (router inputs) read after their graph by the graph observer.
    pub graph_hidden_rows: AtomicU64,
}

#[allow(clippy::declare_interior_mutable_const)]
const ZERO: AtomicU64 = AtomicU64::new(0);

pub static SHARED: Shared = Shared {
    request: AtomicU32::new(0),
    records: AtomicU64::new(0),
    dropped: AtomicU64::new(0),
    ubatches: AtomicU64::new(0),
    unmapped: AtomicU64::new(0),
    hidden_bytes: AtomicU64::new(0),
    layers_seen: [ZERO; 8],
    hidden_on: AtomicBool::new(false),
    hidden_available: AtomicBool::new(false),
    hidden_every: AtomicU32::new(1),
    hidden_budget: AtomicU64::new(0),
    hidden_tensor: AtomicU8::new(0),
    graph_reads: AtomicU64::new(0),
    graph_hidden_rows: AtomicU64::new(0),
};

impl Shared {
    /// Distinct MoE layers seen so far.
    pub fn moe_layers(&self) -> u32 {
        self.layers_seen
            .iter()
            .map(|w| w.load(Ordering::Relaxed).count_ones())
            .sum()
    }

    pub fn hidden_tensor(&self) -> HiddenTensor {
        HiddenTensor::from_code(self.hidden_tensor.load(Ordering::Relaxed))
            .unwrap_or(HiddenTensor::FfnNorm)
    }
}
