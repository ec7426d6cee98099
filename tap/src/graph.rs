//! The graph observer the hooked ggml scheduler calls (`spark_graph_observe_v1`, declared in
//! `spark_moe_hook.h`, same patch as the residency hook): the routing of every graph (and the
//! router inputs, when hidden states are captured) read once after the graph, with no
//! synchronisation per layer. On by default; `SPARK_GRAPH_READS=off`
//! falls back to the eval callback.
//!
//! Why: an eval callback that asks for a tensor makes the scheduler cut the graph there and
//! synchronise the device before the callback may read it, once per MoE layer. On a device
//! backend that costs a few percent of decode (7% on lavapipe), more on a real GPU where a
//! token takes milliseconds. With the observer, the tap marks the routing tensors as graph
//! outputs before the graph is allocated (so their memory is not reused within the graph),
//! answers "not needed" for them in the eval callback (no cut, no synchronisation), and reads
//! them all after the graph was enqueued: asynchronous reads into pinned memory of the device
//! that computed them (up to [`GATHER_MAX_TOKENS`] tokens), then one synchronisation per
//! backend, then whatever did not fit, one tensor at a time.
//!
//! Every graph is marked, measure graphs included, because ggml's allocator reuses the plan of
//! the graph it reserved for later graphs without looking at output flags (see
//! `capture::on_graph_prepare`). Two reads that once went wrong, each a test now
//! (`hook::the_graph_observer_reads_the_routing_exactly_on_the_cpu`,
//! `lavapipe::telemetry_on_the_device_is_exact`): marking only small graphs (every layer read
//! the last layer's experts), and reading into pageable memory on Vulkan (every read staged
//! through one buffer). With a hidden-state ring, each layer's router input (the default hidden
//! tensor, `router_input`) is marked and read the same way (`capture/after_graph.rs` says what
//! that costs in compute buffer); the named norms (`ffn_norm`, `attn_norm`) still go through the
//! eval callback. A stock engine never calls the observer. Marking a node as an output changes
//! where it lives, never what is computed.
//!
//! Acts only on graphs built inside a call into a tapped context (the thread-local flag set by
//! the `llama_init_from_model`, `llama_decode` and `llama_process` wrappers), so a draft
//! model's graphs are left alone, as the eval callback leaves them.
//!
//! Must never: change a graph beyond output flags, keep the event after returning, block on
//! anything but the backends' own synchronisation after the graph was enqueued.

use std::cell::Cell;
use std::ffi::c_void;
use std::sync::atomic::{AtomicUsize, Ordering};

use spark_proto::hook::ENV_GRAPH_READS;

use crate::ffi::{as_fn, GgmlTensor, GraphNNodesFn, GraphNodeFn, GRAPH_NODE, GRAPH_N_NODES};

/// `SPARK_GRAPH_HOOK_ABI`.
pub const ABI: u32 = 1;
/// `SPARK_GRAPH_PREPARE` / `SPARK_GRAPH_COMPUTED`.
pub const PREPARE: u32 = 0;
pub const COMPUTED: u32 = 1;

/// The pinned gather target holds the routing of graphs of up to this many tokens (decode and
/// small batches); the tensors of larger graphs that do not fit are read after the graph, one
/// by one (module doc).
pub const GATHER_MAX_TOKENS: i64 = 32;

/// `struct spark_graph_event_v1`.
#[repr(C)]
pub struct GraphEventV1 {
    pub abi: u32,
    pub phase: u32,
    pub sched: *mut c_void,
    pub graph: *mut c_void,
}

const _: () = assert!(std::mem::size_of::<GraphEventV1>() == 24);

thread_local! {
    /// Set while this thread is inside a call into a tapped context.
    static IN_TARGET: Cell<bool> = const { Cell::new(false) };
}

/// Contexts the tap installed its callback in (0: free entry).
static TARGETS: [AtomicUsize; 8] = [const { AtomicUsize::new(0) }; 8];

/// Remembers a tapped context.
pub fn register_target(ctx: *mut c_void) {
    if ctx.is_null() {
        return;
    }
    for t in &TARGETS {
        if t.compare_exchange(0, ctx as usize, Ordering::AcqRel, Ordering::Relaxed)
            .is_ok()
        {
            return;
        }
    }
}

/// Whether `ctx` is a tapped context.
pub fn is_target(ctx: *mut c_void) -> bool {
    !ctx.is_null()
        && TARGETS
            .iter()
            .any(|t| t.load(Ordering::Relaxed) == ctx as usize)
}

/// Runs `f` with this thread marked as inside a tapped context when `target` holds.
pub fn within<R>(target: bool, f: impl FnOnce() -> R) -> R {
    if !target {
        return f();
    }
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            IN_TARGET.with(|c| c.set(self.0));
        }
    }
    let _restore = Restore(IN_TARGET.with(|c| c.replace(true)));
    f()
}

/// The nodes of a graph, through ggml's public accessors.
pub struct Nodes {
    graph: *mut c_void,
    n: i32,
    node: GraphNodeFn,
}

impl Nodes {
    /// # Safety
    /// `graph` must be a live `ggml_cgraph`.
    pub unsafe fn of(graph: *mut c_void) -> Option<Nodes> {
        // SAFETY: the types are ggml_graph_n_nodes' and ggml_graph_node's signatures.
        let (n_nodes, node) = unsafe {
            (
                as_fn::<GraphNNodesFn>(&GRAPH_N_NODES)?,
                as_fn::<GraphNodeFn>(&GRAPH_NODE)?,
            )
        };
        // SAFETY: graph is live.
        let n = unsafe { n_nodes(graph) };
        Some(Nodes { graph, n, node })
    }

    /// Node `i` (0-based, in execution order).
    pub fn get(&self, i: i32) -> *mut GgmlTensor {
        // SAFETY: graph is live and 0 <= i < n.
        unsafe { (self.node)(self.graph, i) }
    }

    pub fn len(&self) -> i32 {
        self.n
    }
}

/// Set when the tap found the observer's reads unsafe in this process (`stand_down`).
static STOOD_DOWN: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Whether the observer acts: not switched off, and not stood down.
pub fn enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var(ENV_GRAPH_READS).map_or(true, |v| v.trim() != "off"))
        && !STOOD_DOWN.load(Ordering::Relaxed)
}

/// Turns the observer off for the rest of the process (the eval callback reads every graph
/// from now on, output flags or not), saying why once.
pub fn stand_down(why: &str) {
    if !STOOD_DOWN.swap(true, Ordering::Relaxed) {
        crate::log::warn(&format!(
            "graph observer off for this process: {why}; the eval callback reads the routing"
        ));
    }
}

/// Whether an observer event should be acted on: a known ABI, on a thread inside a tapped
/// context, with the observer not switched off. `lib.rs` then hands it to the capture path.
///
/// # Safety
/// `ev` is the scheduler's event (or null), valid for the duration of the call.
pub unsafe fn accepted<'a>(ev: *const GraphEventV1) -> Option<&'a GraphEventV1> {
    if ev.is_null() || !IN_TARGET.with(Cell::get) || !enabled() {
        return None;
    }
    // SAFETY: the scheduler passes a live event.
    let ev = unsafe { &*ev };
    (ev.abi == ABI && !ev.graph.is_null()).then_some(ev)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_and_mirror_agree_on_the_observer() {
        let header = include_str!("../../proto/include/spark_moe_hook.h");
        assert!(header.contains(&format!("#define SPARK_GRAPH_HOOK_ABI {ABI}u")));
        assert!(header.contains(&format!("#define SPARK_GRAPH_PREPARE {PREPARE}u")));
        assert!(header.contains(&format!("#define SPARK_GRAPH_COMPUTED {COMPUTED}u")));
        assert!(header.contains("\"spark_graph_observe_v1\""));
        assert!(header.contains("\"spark_graph_hook_abi\""));
    }

    #[test]
    fn only_calls_into_tapped_contexts_are_marked() {
        let a = 0x1000 as *mut c_void;
        let b = 0x2000 as *mut c_void;
        register_target(a);
        assert!(is_target(a));
        assert!(!is_target(b));
        assert!(!is_target(std::ptr::null_mut()));
        assert!(!IN_TARGET.with(Cell::get));
        within(true, || {
            assert!(IN_TARGET.with(Cell::get));
            within(false, || assert!(IN_TARGET.with(Cell::get)));
        });
        assert!(!IN_TARGET.with(Cell::get));
    }
}
