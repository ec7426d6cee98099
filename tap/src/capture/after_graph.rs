//! Reading a graph's routing (and, with a hidden-state ring, each layer's router input) once,
//! after the graph (the hooked engine's graph observer, `crate::graph`): marking those tensors
//! as outputs before the graph is allocated, reading them into pinned memory of the device that
//! computed them, one synchronisation per backend, and checking that the allocator kept them
//! apart before any record is written.
//!
//! Part of the capture path: runs under its state (`super::State`) and buffers; the pinned
//! gather target is allocated once, at the first graph.

use std::ffi::c_void;
use std::sync::atomic::Ordering;

use spark_proto::control::HiddenTensor;

use super::{
    classify, is_host, read_after_graph, router_input, router_logits_layer, routing_ids, rows_of,
    with_state, Kind, State,
};
use crate::ffi::{
    as_fn, GgmlTensor, NbytesFn, SchedTensorBackendFn, SynchronizeFn, TensorGetAsyncFn,
    GGML_TENSOR_FLAG_OUTPUT, NBYTES, SCHED_TENSOR_BACKEND, SYNCHRONIZE, TENSOR_GET_ASYNC,
};
use crate::graph::Nodes;
use crate::shared::SHARED;

/// The copy target of the tensors a small graph's device computed, read asynchronously after
/// the graph: pinned host memory of that device (`ffi::alloc_device_host`), allocated on first
/// use. It must be pinned: a backend may stage a read into pageable memory through one shared
/// buffer and copy it out only at the synchronisation (ggml-vulkan does, into
/// `sync_staging`), so two such reads before one synchronisation would both return the bytes
/// of the last. Tensors of any other device (or of a device with no pinned memory) are read
/// after the synchronisation, one by one, as the eval callback reads them.
pub(super) struct Gather {
    len: usize,
    /// Null until allocated (or when allocation failed).
    base: *mut u8,
    /// The backend whose device `base` is pinned for.
    backend: *mut c_void,
    tried: bool,
}

impl Gather {
    pub(super) fn new(len: usize) -> Gather {
        Gather {
            len,
            base: std::ptr::null_mut(),
            backend: std::ptr::null_mut(),
            tried: false,
        }
    }

    /// The pinned target for reads from `backend`, if it has one (allocated at the first ask).
    fn for_backend(&mut self, backend: *mut c_void) -> Option<*mut u8> {
        if !self.tried && !backend.is_null() {
            self.tried = true;
            // SAFETY: backend is a live backend of the scheduler running this graph.
            if let Some(p) = unsafe { crate::ffi::alloc_device_host(backend, self.len) } {
                self.base = p;
                self.backend = backend;
            }
        }
        (!self.base.is_null() && self.backend == backend).then_some(self.base)
    }
}

/// Where a tensor read after its graph can be found once the backends are synchronised.
#[derive(Clone, Copy)]
enum Loc {
    /// Host memory: the tensor's own bytes.
    Host(*const u8),
    /// `gather[offset..]`, filled by an asynchronous read.
    Gathered(usize),
    /// Did not fit the gather scratch: read synchronously (as the eval callback does).
    Later,
}

/// What a tensor read after its graph carries.
#[derive(Clone, Copy, PartialEq, Eq)]
enum What {
    Routing,
    /// The router input, captured as the hidden state (`HiddenTensor::RouterInput`).
    Hidden,
}

/// One tensor of a graph being read after it.
#[derive(Clone, Copy)]
pub(super) struct Pending {
    layer: u32,
    what: What,
    /// Routing: the routing weights (`ffn_moe_weights-<layer>`, `src[1]` the ids). Hidden: the
    /// router input (`src[1]` of `ffn_moe_logits-<layer>`).
    t: *const GgmlTensor,
    /// Where the routing ids are (routing only).
    ids: Loc,
    /// Where `t`'s bytes are.
    data: Loc,
}

/// Most distinct backends one graph's marked tensors live on.
const MAX_BACKENDS: usize = 4;

fn mark(t: *mut GgmlTensor) {
    if t.is_null() {
        return;
    }
    // SAFETY: a live node of a graph being prepared; only its flags change (observer rules).
    unsafe {
        (*t).flags |= GGML_TENSOR_FLAG_OUTPUT;
        if !(*t).view_src.is_null() {
            (*(*t).view_src).flags |= GGML_TENSOR_FLAG_OUTPUT;
        }
    }
}

/// Whether any two of the memory ranges the pending tensors read from (each one's routing
/// weights and the whole tensor its ids are a view of; each router input) overlap in one
/// buffer.
///
/// # Safety
/// Every `p.t` must be a live tensor.
unsafe fn marked_memory_overlaps(
    pending: &[Pending],
    nbytes: unsafe extern "C" fn(*const GgmlTensor) -> usize,
) -> bool {
    // SAFETY: live tensors (caller), their sources live too.
    let ranges = |p: &Pending| -> [(usize, usize, usize); 2] {
        let range = |t: *const GgmlTensor| -> (usize, usize, usize) {
            if t.is_null() {
                return (0, 0, 0);
            }
            // SAFETY: as above.
            let t = unsafe { &*t };
            let base = if t.view_src.is_null() {
                t
            } else {
                // SAFETY: as above.
                unsafe { &*t.view_src }
            };
            let start = base.data as usize;
            // SAFETY: a live tensor.
            (base.buffer as usize, start, start + unsafe { nbytes(base) })
        };
        if p.what == What::Hidden {
            return [range(p.t), (0, 0, 0)];
        }
        // SAFETY: as above.
        let w = unsafe { &*p.t };
        [range(p.t), range(w.src[1])]
    };
    let apart = |a: (usize, usize, usize), b: (usize, usize, usize)| {
        a.0 != b.0 || a.1 == 0 || b.1 == 0 || a.2 <= b.1 || b.2 <= a.1
    };
    for (i, p) in pending.iter().enumerate() {
        let [w, ids] = ranges(p);
        if !apart(w, ids) {
            return true;
        }
        for q in &pending[i + 1..] {
            let [w2, ids2] = ranges(q);
            if !(apart(w, w2) && apart(w, ids2) && apart(ids, w2) && apart(ids, ids2)) {
                return true;
            }
        }
    }
    false
}

/// Marks the routing tensors of every graph as outputs, to be read after it (graph observer,
/// PREPARE); and each layer's router input too when the supervisor handed over a hidden-state
/// ring.
///
/// Every graph, whatever its size, measure graphs included: ggml's allocator keeps the plan it
/// made when the scheduler reserved memory and reuses it for any later graph of the same node
/// count without looking at output flags (`ggml_gallocr_needs_realloc`). If the reserved graph
/// (a full ubatch) had not been marked, a decode graph marked at its own PREPARE would still
/// get that plan, in which every layer's routing ids share one piece of memory: each layer
/// would read the last layer's experts. Marking every graph makes every plan keep them.
///
/// The router inputs are marked from the first graph whenever a hidden-state ring exists (the
/// supervisor creates one only when asked to capture hidden states), before the supervisor has
/// said which tensor it wants, for the same reason. That keeps `n_embd` floats per token of
/// every layer alive to the end of the graph: `n_layer × n_embd × n_ubatch × 4` bytes more
/// compute buffer (48 MiB for 48 layers of 2048 at `-ub 128`, 192 MiB at `-ub 512`), paid
/// only by a capture run. The named norms (`ffn_norm`, `attn_norm`) are not marked: the eval
/// callback reads them.
///
/// # Safety
/// `graph` must be a live graph being prepared.
pub unsafe fn on_graph_prepare(graph: *mut c_void) {
    let wanted = with_state(|slot| {
        slot.as_ref()
            .map(|st| (st.producer.is_some(), st.hidden.is_some()))
    });
    let Some(Some((routing, hidden))) = wanted else {
        return;
    };
    if !routing && !hidden {
        return;
    }
    // SAFETY: forwarded from the caller.
    let Some(nodes) = (unsafe { Nodes::of(graph) }) else {
        return;
    };
    for i in 0..nodes.len() {
        let t = nodes.get(i);
        if t.is_null() {
            continue;
        }
        // SAFETY: a live node.
        let tensor = unsafe { &*t };
        if routing {
            if let Some(Kind::Routing(_)) = classify(&tensor.name) {
                let ids = tensor.src[1];
                if !ids.is_null() {
                    mark(t);
                    mark(ids);
                }
            }
        }
        if hidden && router_logits_layer(&tensor.name).is_some() {
            // SAFETY: a live node; shapes and types are set before allocation.
            if let Some(x) = unsafe { router_input(tensor) } {
                mark((x as *const GgmlTensor).cast_mut());
            }
        }
    }
}

/// Reads the marked tensors of a graph that has been enqueued (graph observer, COMPUTED).
///
/// # Safety
/// `sched` and `graph` must be the live scheduler and graph of the event.
pub unsafe fn on_graph_computed(sched: *mut c_void, graph: *mut c_void) {
    let ok = with_state(|slot| {
        if let Some(st) = slot.as_mut() {
            // SAFETY: forwarded from the caller.
            unsafe { st.capture_graph(sched, graph) }
        }
    });
    if ok.is_none() {
        SHARED.dropped.fetch_add(1, Ordering::Relaxed);
    }
}

impl State {
    /// Reads the marked tensors of an enqueued graph: asynchronous reads of every one into the
    /// gather scratch, one synchronisation per backend, then the records (module `graph`).
    ///
    /// # Safety
    /// `sched` and `graph` must be the live scheduler and graph that was just enqueued.
    unsafe fn capture_graph(&mut self, sched: *mut c_void, graph: *mut c_void) {
        // SAFETY: forwarded from the caller.
        let Some(nodes) = (unsafe { Nodes::of(graph) }) else {
            return;
        };
        // SAFETY: the types are the declared signatures of these ggml functions.
        let (Some(backend_of), Some(get_async), Some(sync)) = (unsafe {
            (
                as_fn::<SchedTensorBackendFn>(&SCHED_TENSOR_BACKEND),
                as_fn::<TensorGetAsyncFn>(&TENSOR_GET_ASYNC),
                as_fn::<SynchronizeFn>(&SYNCHRONIZE),
            )
        }) else {
            return;
        };
        self.pending.clear();
        let mut used = 0usize;
        let mut backends = [std::ptr::null_mut::<c_void>(); MAX_BACKENDS];
        let mut n_backends = 0usize;
        // Phase 1: enqueue a read of every marked tensor on the backend that computed it.
        let mut fetch =
            |st: &mut State, t: &GgmlTensor, fallback: *mut c_void| -> (Loc, *mut c_void) {
                if t.data.is_null() {
                    return (Loc::Later, fallback);
                }
                if is_host(t.buffer) {
                    return (Loc::Host(t.data as *const u8), fallback);
                }
                // SAFETY: NbytesFn is ggml_nbytes's signature; t is live.
                let Some(n) = (unsafe { as_fn::<NbytesFn>(&NBYTES) }).map(|f| unsafe { f(t) })
                else {
                    return (Loc::Later, fallback);
                };
                // SAFETY: sched is live and t one of its graph's nodes.
                let mut backend = unsafe { backend_of(sched, (t as *const GgmlTensor).cast_mut()) };
                if backend.is_null() {
                    backend = fallback;
                }
                let known = backends[..n_backends].contains(&backend);
                if backend.is_null()
                    || used + n > st.gather.len
                    || (!known && n_backends == MAX_BACKENDS)
                {
                    return (Loc::Later, backend);
                }
                let Some(base) = st.gather.for_backend(backend) else {
                    return (Loc::Later, backend);
                };
                if !known {
                    backends[n_backends] = backend;
                    n_backends += 1;
                }
                // SAFETY: base[used..used + n] is writable pinned memory of gather.len bytes; t
                // is a live tensor of n bytes on `backend`, read in stream order after the graph
                // that computes it.
                unsafe { get_async(backend, t, base.add(used).cast(), 0, n) };
                let at = used;
                used += n;
                (Loc::Gathered(at), backend)
            };
        // Router inputs are read when hidden capture is on and asks for them (`classify` names
        // the router product then).
        let router_inputs = self.hidden.is_some()
            && SHARED.hidden_on.load(Ordering::Relaxed)
            && SHARED.hidden_tensor() == HiddenTensor::RouterInput;
        for i in 0..nodes.len() {
            let t = nodes.get(i);
            if t.is_null() {
                continue;
            }
            // SAFETY: a live node.
            let tensor = unsafe { &*t };
            let (what, layer, read) = match classify(&tensor.name) {
                Some(Kind::Routing(layer)) if read_after_graph(tensor) => {
                    (What::Routing, layer, t.cast_const())
                }
                Some(Kind::Hidden(layer)) if router_inputs => {
                    // SAFETY: a live node.
                    match unsafe { router_input(tensor) } {
                        Some(x) if read_after_graph(x) => (What::Hidden, layer, x as *const _),
                        _ => continue,
                    }
                }
                _ => continue,
            };
            if self.pending.len() == self.pending.capacity() {
                break; // never grows here; the rest stays uncaptured and is counted below
            }
            // SAFETY: `read` is a live tensor of this graph (a node or a node's source).
            let read_t = unsafe { &*read };
            let (data, backend) = fetch(self, read_t, std::ptr::null_mut());
            let ids = match what {
                What::Hidden => Loc::Later,
                What::Routing => {
                    let Some(ids_t) = routing_ids(tensor) else {
                        continue;
                    };
                    fetch(self, ids_t, backend).0
                }
            };
            self.pending.push(Pending {
                layer,
                what,
                t: read,
                ids,
                data,
            });
        }
        // Phase 2: one synchronisation per backend.
        for &b in &backends[..n_backends] {
            // SAFETY: a live backend of this scheduler.
            unsafe { sync(b) };
        }
        // The allocator must have kept every marked tensor apart: if two share memory, its plan
        // did not see the marks, and the bytes read are another layer's. Drop this graph's
        // records (counted) and leave the rest of the process to the eval callback.
        // SAFETY: NbytesFn is ggml_nbytes's signature.
        if let Some(nbytes) = unsafe { as_fn::<NbytesFn>(&NBYTES) } {
            // SAFETY: the pending tensors are live nodes of this graph.
            if unsafe { marked_memory_overlaps(&self.pending, nbytes) } {
                for p in &self.pending {
                    // SAFETY: as above.
                    let t = unsafe { &*p.t };
                    let rows = match p.what {
                        // The weights are [k, 1, rows].
                        What::Routing => t.ne[2] * t.ne[3],
                        What::Hidden => rows_of(t),
                    };
                    SHARED
                        .dropped
                        .fetch_add(rows.max(0) as u64, Ordering::Relaxed);
                }
                crate::graph::stand_down("two marked tensors shared memory in a graph");
                return;
            }
        }
        // Phase 3: records, layer by layer in graph order (as the eval callback emits them).
        for i in 0..self.pending.len() {
            let p = self.pending[i];
            // SAFETY: a node of the graph (or a node's source), still live during the event.
            let t = unsafe { &*p.t };
            if p.what == What::Hidden {
                SHARED
                    .graph_hidden_rows
                    .fetch_add(rows_of(t).max(0) as u64, Ordering::Relaxed);
                match p.data {
                    // SAFETY: the graph has been synchronised; t is computed and live.
                    Loc::Later => unsafe { self.capture_hidden_of(t, p.layer) },
                    // SAFETY: the location holds t's bytes after the synchronisation.
                    loc => unsafe { self.emit_hidden(t, p.layer, self.located(loc)) },
                }
                continue;
            }
            let Some(ids_t) = routing_ids(t) else {
                continue;
            };
            let (Loc::Host(_) | Loc::Gathered(_), Loc::Host(_) | Loc::Gathered(_)) =
                (p.ids, p.data)
            else {
                // SAFETY: the graph has been synchronised; t is computed and live.
                unsafe { self.capture_routing(t, p.layer) };
                continue;
            };
            let ids_p = self.located(p.ids);
            let w_p = self.located(p.data);
            // SAFETY: both locations hold the tensors' bytes after the synchronisation.
            unsafe { self.emit_routing(t, ids_t, ids_p, w_p, p.layer) }
        }
        if !self.pending.is_empty() {
            SHARED.graph_reads.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn located(&self, loc: Loc) -> *const u8 {
        match loc {
            Loc::Host(p) => p,
            Loc::Gathered(at) => self.gather.base.cast_const().wrapping_add(at),
            Loc::Later => std::ptr::null(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tensor of `n` f32 values at `data` in `buffer`, optionally a view of `view_src`.
    fn tensor(buffer: usize, data: usize, n: i64) -> Box<GgmlTensor> {
        // SAFETY: GgmlTensor is plain data (integers and raw pointers); all zeroes is valid.
        let mut t: Box<GgmlTensor> = Box::new(unsafe { std::mem::zeroed() });
        t.buffer = buffer as *mut c_void;
        t.data = data as *mut c_void;
        t.ne = [n, 1, 1, 1];
        t
    }

    unsafe extern "C" fn f32_bytes(t: *const GgmlTensor) -> usize {
        // SAFETY: the test's own live tensors.
        unsafe { (*t).ne[0] as usize * 4 }
    }

    /// Two layers whose weights and argsort (the ids' view source) sit at `layouts`.
    /// (The tensors are boxed so that the pointers between them stay valid as the list grows.)
    #[allow(clippy::vec_box)]
    fn graph(layouts: [[usize; 2]; 2]) -> (Vec<Box<GgmlTensor>>, Vec<Pending>) {
        let mut keep = Vec::new();
        let mut pending = Vec::new();
        for (layer, [w_at, sort_at]) in layouts.into_iter().enumerate() {
            let sort = tensor(1, sort_at, 8);
            let mut ids = tensor(1, sort_at, 2);
            ids.view_src = &*sort as *const GgmlTensor as *mut GgmlTensor;
            let mut w = tensor(1, w_at, 2);
            w.src[1] = &*ids as *const GgmlTensor as *mut GgmlTensor;
            pending.push(Pending {
                layer: layer as u32,
                what: What::Routing,
                t: &*w,
                ids: Loc::Later,
                data: Loc::Later,
            });
            keep.extend([sort, ids, w]);
        }
        (keep, pending)
    }

    #[test]
    fn marked_tensors_that_share_memory_are_caught() {
        // Apart: weights at 0x1000 and 0x1100, argsorts (8 floats = 32 bytes) at 0x2000, 0x2100.
        let (_keep, apart) = graph([[0x1000, 0x2000], [0x1100, 0x2100]]);
        // SAFETY: the tensors in _keep outlive the call.
        assert!(!unsafe { marked_memory_overlaps(&apart, f32_bytes) });
        // The reserved plan reused one argsort's memory for the next layer's: caught.
        let (_keep, shared) = graph([[0x1000, 0x2000], [0x1100, 0x2010]]);
        // SAFETY: as above.
        assert!(unsafe { marked_memory_overlaps(&shared, f32_bytes) });
        // A layer's weights inside another layer's argsort: caught.
        let (_keep, inside) = graph([[0x1000, 0x2000], [0x2008, 0x2100]]);
        // SAFETY: as above.
        assert!(unsafe { marked_memory_overlaps(&inside, f32_bytes) });
    }
}
