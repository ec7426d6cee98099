//! The capture path: the eval callback, the batch hooks, and the ring producer (the pure batch
//! bookkeeping they use is [`crate::batch`]).
//!
//! Owns the tap's one mutable state (ring producer, preallocated position and scratch buffers),
//! guarded by a try-lock that never waits: if two threads ever evaluate at once, the loser
//! drops and counts. Everything allocated here is allocated in [`on_context_params`], outside
//! the capture path; [`on_decode`] and the callback only copy into existing buffers.
//!
//! Why this file is over 800 lines: the capture path is one state machine over the tap's only
//! mutable state (eval callback, batch hooks, hidden states); its pure bookkeeping lives in
//! [`crate::batch`] and the reads after a graph in `after_graph.rs`; about 60 lines are tests.

use std::cell::UnsafeCell;
use std::ffi::{c_char, c_void, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use spark_proto::control::{Greeting, HiddenTensor, CONTROL_VERSION};
use spark_proto::ring::{
    HiddenChunk, Producer, ENV_HIDDEN_RING_FD, ENV_RING_FD, HIDDEN_CHUNK_FLOATS, KIND_HIDDEN,
    KIND_ROUTING,
};
use spark_proto::trace::{RoutingRecord, MAX_K, PHASE_DECODE, PHASE_PROMPT};

use crate::batch::{parse_layer, RowMap, RowPositions, Shadow, N_SHADOWS};
use crate::control;
use crate::ffi::{
    as_fn, BufferIsHostFn, EvalCallback, GgmlTensor, LlamaBatch, LlamaContextParams, MetaStrFn,
    ModelI32Fn, NbytesFn, TensorGetFn, BUFFER_IS_HOST, GGML_TENSOR_FLAG_OUTPUT, GGML_TYPE_F32,
    GGML_TYPE_I32, MODEL_META_STR, MODEL_N_EMBD, MODEL_N_LAYER, NBYTES, TENSOR_GET,
};
use crate::graph::GATHER_MAX_TOKENS;

mod after_graph;
use crate::log::warn;
use crate::shared::SHARED;
pub use after_graph::{on_graph_computed, on_graph_prepare};
use after_graph::{Gather, Pending};

/// The callback the caller had installed before the tap, chained after the tap's own work.
static CHAIN_CB: AtomicUsize = AtomicUsize::new(0);
static CHAIN_UD: AtomicUsize = AtomicUsize::new(0);

struct State {
    producer: Option<Producer<RoutingRecord>>,
    /// Positions of the current batch's tokens (capacity fixed at init).
    pos: Vec<i32>,
    /// Output flags of the current batch's tokens.
    out: Vec<u8>,
    n_tokens: usize,
    pos_known: bool,
    phase: u8,
    /// Where the routing tensors' rows are in the batch.
    routing_rows: RowMap,
    /// Where the hidden-state tensors' rows are in the batch.
    hidden_rows: RowMap,
    /// The hidden-state ring, when the supervisor created one.
    hidden: Option<Producer<HiddenChunk>>,
    /// Copy target for tensors that live outside host memory.
    scratch: Vec<u8>,
    /// Copy target for every tensor of a small graph read once after it (`graph.rs`).
    gather: Gather,
    /// The tensors of the graph being read (capacity fixed at init).
    pending: Vec<Pending>,
    /// What the tap saw being put into each `llama_batch_ext` (positions, output flags).
    shadows: [Shadow; N_SHADOWS],
    next_evict: usize,
    /// Expert count of the model the ring was made for (0 = unknown).
    ring_experts: u32,
}

/// Set when a batch-builder call could not update its shadow (state busy): the next process
/// call then treats positions as unknown instead of trusting a stale copy.
static LOST: AtomicBool = AtomicBool::new(false);

struct Guarded {
    busy: AtomicBool,
    state: UnsafeCell<Option<State>>,
}

// SAFETY: `state` is only accessed while `busy` is held (see `with_state`).
unsafe impl Sync for Guarded {}

static STATE: Guarded = Guarded {
    busy: AtomicBool::new(false),
    state: UnsafeCell::new(None),
};

/// Runs `f` on the state if nobody else holds it; never waits.
fn with_state<R>(f: impl FnOnce(&mut Option<State>) -> R) -> Option<R> {
    if STATE
        .busy
        .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
        .is_err()
    {
        return None;
    }
    struct Release;
    impl Drop for Release {
        fn drop(&mut self) {
            STATE.busy.store(false, Ordering::Release);
        }
    }
    let _release = Release;
    // SAFETY: `busy` is held, so this is the only reference to the state.
    let state = unsafe { &mut *STATE.state.get() };
    Some(f(state))
}

/// Like `with_state` but spins (bounded) for the initialisation path, which is not hot.
fn with_state_init<R>(f: impl FnOnce(&mut Option<State>) -> R) -> Option<R> {
    let mut f = Some(f);
    for _ in 0..10_000 {
        if let Some(r) = with_state(|s| (f.take().expect("called once"))(s)) {
            return Some(r);
        }
        std::thread::yield_now();
    }
    None
}

fn meta(model: *const c_void, key: &str) -> Option<String> {
    // SAFETY: MetaStrFn is llama_model_meta_val_str's declared signature.
    let f = unsafe { as_fn::<MetaStrFn>(&MODEL_META_STR) }?;
    let key = CString::new(key).ok()?;
    let mut buf = [0 as c_char; 256];
    // SAFETY: model is a live llama_model, key is NUL-terminated, buf has the size we pass.
    let n = unsafe { f(model, key.as_ptr(), buf.as_mut_ptr(), buf.len()) };
    if n < 0 {
        return None;
    }
    // SAFETY: the function NUL-terminates within buf_size on success.
    let s = unsafe { std::ffi::CStr::from_ptr(buf.as_ptr()) };
    Some(s.to_string_lossy().into_owned())
}

fn geometry(model: *const c_void) -> Greeting {
    // SAFETY: ModelI32Fn matches llama_model_n_layer / llama_model_n_embd.
    let n_layer = unsafe { as_fn::<ModelI32Fn>(&MODEL_N_LAYER) }
        // SAFETY: model is a live llama_model.
        .map(|f| unsafe { f(model) })
        .unwrap_or(0);
    // SAFETY: as above.
    let n_embd = unsafe { as_fn::<ModelI32Fn>(&MODEL_N_EMBD) }
        // SAFETY: model is a live llama_model.
        .map(|f| unsafe { f(model) })
        .unwrap_or(0);
    let arch = meta(model, "general.architecture").unwrap_or_else(|| "unknown".into());
    let num = |k: &str| {
        meta(model, &format!("{arch}.{k}"))
            .and_then(|v| v.trim().parse::<u32>().ok())
            .unwrap_or(0)
    };
    Greeting {
        version: CONTROL_VERSION,
        n_expert: num("expert_count"),
        n_expert_used: num("expert_used_count"),
        arch: arch.replace(char::is_whitespace, "_"),
        n_layer: n_layer.max(0) as u32,
        n_embd: n_embd.max(0) as u32,
    }
}

/// Maps the ring whose inherited descriptor number `var` holds (the value of `SPARK_RING_FD` or
/// `SPARK_HIDDEN_RING_FD`), then closes the descriptor (the mapping stays, and llama-server's
/// own children never see the ring); returns its producer and the expert count in its header.
fn open_ring<T: bytemuck::Pod>(var: &str, kind: u32) -> Result<(Producer<T>, u32), String> {
    let fd: i32 = var
        .trim()
        .parse()
        .ok()
        .filter(|fd| *fd > 2)
        .ok_or_else(|| format!("ring descriptor {var:?} is not a descriptor number above 2"))?;
    // SAFETY: st is a plain C struct that fstat fills; fstat on an arbitrary integer only
    // reports whether it is an open descriptor.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: st is writable; fd is only inspected.
    let rc = unsafe { libc::fstat(fd, &mut st) };
    if rc != 0 {
        return Err(format!(
            "ring descriptor {fd}: {}",
            std::io::Error::last_os_error()
        ));
    }
    if st.st_mode & libc::S_IFMT != libc::S_IFREG {
        return Err(format!("ring descriptor {fd} is not a memory file"));
    }
    let len = st.st_size as usize;
    // SAFETY: mapping `len` bytes of an open regular file, shared, read-write; the kernel checks
    // the descriptor's access mode.
    let base = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            fd,
            0,
        )
    };
    // SAFETY: the supervisor handed this descriptor to us alone, for this mapping; the mapping
    // stays valid after close.
    unsafe { libc::close(fd) };
    if base == libc::MAP_FAILED {
        return Err(format!(
            "map ring descriptor {fd}: {}",
            std::io::Error::last_os_error()
        ));
    }
    // SAFETY: the mapping is never unmapped (it lives as long as the process) and this is the
    // ring's only producer (one tap per llama-server, one state per tap).
    let producer = unsafe { Producer::attach(base as *mut u8, len, kind) }
        .map_err(|e| format!("attach ring descriptor {fd}: {e}"))?;
    // SAFETY: attach validated that the mapping holds at least a whole header.
    let header = unsafe { spark_proto::ring::read_header(base as *const u8) };
    Ok((producer, header.n_expert))
}

/// Whether a context of a model with `model_experts` experts is the one the supervisor made
/// the ring for (`ring_experts`, 0 = unknown). A speculative-decoding draft model usually has
/// a different expert count (often none); its routing must not mix into the target's.
fn is_target_model(ring_experts: u32, model_experts: u32) -> bool {
    ring_experts == 0 || ring_experts == model_experts
}

/// Called from the `llama_init_from_model` wrapper: sets up the tap (once) and installs the
/// callback in `params`. Returns whether `params` was patched.
///
/// # Safety
/// `model` must be a live `llama_model`.
pub unsafe fn on_context_params(model: *mut c_void, params: &mut LlamaContextParams) -> bool {
    let cap = params.n_batch().max(params.n_ubatch()).max(512) as usize;
    // Geometry is read before taking the state (it calls into llama.cpp and allocates).
    let geo = geometry(model);
    crate::provider::set_top_k(geo.n_expert_used);
    // Scratch for tensors outside host memory (GPU builds): a ubatch of router ids and
    // weights plus a ubatch of hidden states. Zeroed allocations are committed lazily.
    let ubatch = params.n_ubatch().max(1) as usize;
    let scratch_len = (ubatch
        * (geo.n_expert.max(1) as usize * 4 + 2 * MAX_K * 4 + geo.n_embd as usize * 4))
        .max(1 << 20);
    // The gather target for graphs read once after they ran: every layer's routing ids (a view
    // over all experts' order) and weights for GATHER_MAX_TOKENS tokens (pinned memory of the
    // device, allocated at first use; larger graphs' tensors that do not fit are read one by
    // one after the synchronisation).
    // With a hidden-state ring, each layer's router input too (`n_embd` floats per token).
    let per_layer = GATHER_MAX_TOKENS as usize * 4 * (geo.n_expert as usize + 2 * MAX_K);
    let hidden_per_layer = GATHER_MAX_TOKENS as usize * 4 * geo.n_embd as usize;
    let gather_len = |hidden: bool| {
        let per_layer = per_layer + if hidden { hidden_per_layer } else { 0 };
        (per_layer * geo.n_layer.max(1) as usize).min(256 << 20)
    };
    // One routing and one hidden-state entry per layer, and room to spare.
    let pending_cap = 2 * geo.n_layer.max(1) as usize + 8;
    let first = with_state_init(|slot| {
        let first = slot.is_none();
        let mut ring_experts = 0;
        if first {
            let producer = match std::env::var(ENV_RING_FD) {
                Ok(fd) => match open_ring::<RoutingRecord>(&fd, KIND_ROUTING) {
                    Ok((p, experts)) => {
                        ring_experts = experts;
                        Some(p)
                    }
                    Err(e) => {
                        warn(&format!("routing capture off: {e}"));
                        None
                    }
                },
                Err(_) => {
                    warn(&format!("routing capture off: {ENV_RING_FD} is not set"));
                    None
                }
            };
            let hidden = std::env::var(ENV_HIDDEN_RING_FD).ok().and_then(|fd| {
                match open_ring::<HiddenChunk>(&fd, KIND_HIDDEN) {
                    Ok((p, _)) => Some(p),
                    Err(e) => {
                        warn(&format!("hidden-state capture unavailable: {e}"));
                        None
                    }
                }
            });
            SHARED
                .hidden_available
                .store(hidden.is_some(), Ordering::Relaxed);
            let gather = Gather::new(gather_len(hidden.is_some()));
            *slot = Some(State {
                producer,
                pos: Vec::with_capacity(cap),
                out: Vec::with_capacity(cap),
                n_tokens: 0,
                pos_known: false,
                phase: PHASE_PROMPT,
                routing_rows: RowMap::new(),
                hidden_rows: RowMap::new(),
                hidden,
                scratch: vec![0u8; scratch_len],
                gather,
                pending: Vec::with_capacity(pending_cap),
                shadows: std::array::from_fn(|_| Shadow::new(cap)),
                next_evict: 0,
                ring_experts,
            });
        } else if let Some(st) = slot.as_mut() {
            // A later context may take larger batches; growing happens here, off the hot path.
            if st.pos.capacity() < cap {
                st.pos.reserve(cap - st.pos.len());
                st.out.reserve(cap - st.out.len());
                for sh in &mut st.shadows {
                    sh.pos.reserve(cap - sh.pos.len());
                    sh.out.reserve(cap - sh.out.len());
                }
            }
        }
        let target = slot
            .as_ref()
            .is_some_and(|st| is_target_model(st.ring_experts, geo.n_expert));
        let capturing = slot
            .as_ref()
            .is_some_and(|st| st.producer.is_some() || st.hidden.is_some());
        (first, target, capturing)
    });
    let Some((first, target, capturing)) = first else {
        return false;
    };
    if first {
        control::start(geo.clone());
    }
    if !target {
        warn(&format!(
            "not tapping a context of a {} model with {} experts (the ring is for another model)",
            geo.arch, geo.n_expert
        ));
        return false;
    }
    if !capturing {
        // No ring to write into (for example llama-bench run with only the residency
        // provider): asking the scheduler for tensors would only split its graphs.
        return false;
    }
    if let Some(cb) = params.cb_eval() {
        if cb as usize != eval_cb as EvalCallback as usize {
            CHAIN_CB.store(cb as usize, Ordering::Relaxed);
            CHAIN_UD.store(params.cb_eval_user_data() as usize, Ordering::Relaxed);
        }
    }
    params.set_cb_eval(eval_cb, std::ptr::null_mut());
    true
}

/// Called from the `llama_decode` wrapper, before the real decode.
///
/// # Safety
/// `batch` must be the caller's valid batch.
pub unsafe fn on_decode(_ctx: *mut c_void, batch: &LlamaBatch) {
    let n = batch.n_tokens.max(0) as usize;
    let done = with_state(|slot| {
        let Some(st) = slot.as_mut() else { return };
        st.begin_batch();
        st.n_tokens = n;
        st.pos.clear();
        st.out.clear();
        st.pos_known = !batch.pos.is_null() && n <= st.pos.capacity();
        if !st.pos_known {
            return;
        }
        // SAFETY: the batch holds n_tokens positions (llama.h), and pos is non-null.
        let pos = unsafe { std::slice::from_raw_parts(batch.pos, n) };
        st.pos.extend_from_slice(pos); // within capacity: no allocation
        if batch.logits.is_null() {
            st.out.extend(std::iter::repeat_n(0u8, n));
            if let Some(last) = st.out.last_mut() {
                *last = 1;
            }
        } else {
            // SAFETY: a non-null logits array holds n_tokens flags.
            let flags = unsafe { std::slice::from_raw_parts(batch.logits, n) };
            st.out.extend(flags.iter().map(|&f| u8::from(f != 0)));
        }
        st.set_phase();
    });
    if done.is_none() {
        SHARED.unmapped.fetch_add(1, Ordering::Relaxed);
    }
}

impl State {
    fn begin_batch(&mut self) {
        self.routing_rows = RowMap::new();
        self.hidden_rows = RowMap::new();
    }

    /// A batch whose every token is an output is a decode step; otherwise prompt processing.
    fn set_phase(&mut self) {
        let n = self.out.len();
        let n_out = self.out.iter().filter(|&&o| o != 0).count();
        self.phase = if n > 0 && n_out == n {
            PHASE_DECODE
        } else {
            PHASE_PROMPT
        };
    }

    fn shadow(&mut self, batch: usize, create: bool) -> Option<&mut Shadow> {
        if let Some(i) = self.shadows.iter().position(|s| s.batch == batch) {
            return Some(&mut self.shadows[i]);
        }
        if !create {
            return None;
        }
        let i = match self.shadows.iter().position(|s| s.batch == 0) {
            Some(i) => i,
            None => {
                self.next_evict = (self.next_evict + 1) % N_SHADOWS;
                self.next_evict
            }
        };
        self.shadows[i].reset(batch);
        Some(&mut self.shadows[i])
    }
}

/// What a batch-builder call did, mirrored into the batch's shadow.
pub enum BatchEvent {
    Clear,
    Free,
    Added(i32),
    Pos(i32, i32),
    Output(i32, bool),
}

/// Mirrors one `llama_batch_ext_*` call (after the real one succeeded).
pub fn on_batch(batch: *mut c_void, ev: BatchEvent) {
    let batch = batch as usize;
    if batch == 0 {
        return;
    }
    let done = with_state(|slot| {
        let Some(st) = slot.as_mut() else { return };
        match ev {
            BatchEvent::Clear => {
                if let Some(sh) = st.shadow(batch, true) {
                    sh.reset(batch);
                }
            }
            BatchEvent::Free => {
                if let Some(sh) = st.shadow(batch, false) {
                    sh.reset(0);
                }
            }
            BatchEvent::Added(idx) if idx >= 0 => {
                if let Some(sh) = st.shadow(batch, true) {
                    if sh.ensure(idx as usize) {
                        sh.pos[idx as usize] = -1;
                        sh.out[idx as usize] = 0;
                    }
                }
            }
            BatchEvent::Pos(idx, p) if idx >= 0 => {
                if let Some(sh) = st.shadow(batch, true) {
                    if sh.ensure(idx as usize) {
                        sh.pos[idx as usize] = p;
                    }
                }
            }
            BatchEvent::Output(idx, v) if idx >= 0 => {
                if let Some(sh) = st.shadow(batch, true) {
                    if sh.ensure(idx as usize) {
                        sh.out[idx as usize] = u8::from(v);
                    }
                }
            }
            _ => {}
        }
    });
    if done.is_none() {
        LOST.store(true, Ordering::Relaxed);
    }
}

/// Called from the `llama_process` wrapper before the real call: the shadow of `batch`
/// becomes the layout the callback attributes rows to.
pub fn on_process(batch: *mut c_void) {
    let batch = batch as usize;
    let lost = LOST.swap(false, Ordering::Relaxed);
    let done = with_state(|slot| {
        let Some(st) = slot.as_mut() else { return };
        st.begin_batch();
        st.pos.clear();
        st.out.clear();
        let (mut pos, mut out) = (std::mem::take(&mut st.pos), std::mem::take(&mut st.out));
        let known = match st.shadow(batch, false) {
            Some(sh) if !sh.overflow && !lost && sh.pos.len() <= pos.capacity() => {
                pos.extend_from_slice(&sh.pos); // within capacity: no allocation
                out.extend_from_slice(&sh.out);
                !sh.pos.iter().any(|&p| p < 0)
            }
            _ => false,
        };
        st.pos = pos;
        st.out = out;
        st.n_tokens = st.pos.len();
        st.pos_known = known;
        st.set_phase();
    });
    if done.is_none() {
        SHARED.unmapped.fetch_add(1, Ordering::Relaxed);
    }
}

#[derive(Clone, Copy)]
enum Kind {
    Routing(u32),
    Hidden(u32),
}

/// Whether the graph observer marked `t` to be read after its graph (`graph.rs`): then the
/// eval callback neither asks for it nor reads it.
fn read_after_graph(t: &GgmlTensor) -> bool {
    t.flags & GGML_TENSOR_FLAG_OUTPUT != 0 && crate::graph::enabled()
}

/// Whether the graph observer reads the hidden state of the router product `logits` after the
/// graph: the router input is the tensor asked for and the observer marked it (`after_graph`).
///
/// # Safety
/// `logits` must be a live tensor.
unsafe fn hidden_after_graph(logits: &GgmlTensor) -> bool {
    SHARED.hidden_tensor() == HiddenTensor::RouterInput
        // SAFETY: forwarded from the caller.
        && unsafe { router_input(logits) }.is_some_and(read_after_graph)
}

/// The layer of a router product `ffn_moe_logits-<layer>`, whatever hidden capture is asking
/// for (the graph observer marks its input before the supervisor has said).
fn router_logits_layer(name: &[c_char; 64]) -> Option<u32> {
    const LOGITS: &[u8] = b"ffn_moe_logits-";
    let bytes = name.map(|c| c as u8);
    bytes
        .starts_with(LOGITS)
        .then(|| parse_layer(&bytes[LOGITS.len()..]))
        .flatten()
}

/// The input of a layer's router product `ffn_moe_logits-<layer>` (its `src[1]`): contiguous
/// f32 `[n_embd, rows]` with the product's rows, multiplied by a `[n_embd, n_expert]` router.
/// `None` when the product is not of that form (a LoRA-adapted router, whose named node is an
/// addition): then nothing is captured, never a guess. Read when the eval callback gets the
/// product, before any later node can reuse the input's memory.
///
/// # Safety
/// `logits` must be a live tensor.
unsafe fn router_input(logits: &GgmlTensor) -> Option<&GgmlTensor> {
    let (w, x) = (logits.src[0], logits.src[1]);
    if w.is_null() || x.is_null() {
        return None;
    }
    // SAFETY: a live tensor's sources are live.
    let (w, x) = unsafe { (&*w, &*x) };
    let rows_match = x.ne[1..] == logits.ne[1..];
    let product = w.ne[0] == x.ne[0] && w.ne[1] == logits.ne[0];
    let contiguous = x.nb[0] == 4 && x.nb[1] == 4 * x.ne[0].max(0) as usize;
    (x.type_ == GGML_TYPE_F32 && rows_match && product && contiguous).then_some(x)
}

/// Rows (tokens) of a tensor.
fn rows_of(t: &GgmlTensor) -> i64 {
    t.ne[1] * t.ne[2] * t.ne[3]
}

/// The selected-experts tensor of a `ffn_moe_weights-<layer>` tensor, when both have the types
/// and shapes a record can hold; otherwise counts the rows as unmapped or dropped.
fn routing_ids(w: &GgmlTensor) -> Option<&GgmlTensor> {
    let ids_t = w.src[1];
    if ids_t.is_null() {
        SHARED.unmapped.fetch_add(1, Ordering::Relaxed);
        return None;
    }
    // SAFETY: a live tensor's sources are live.
    let ids_t = unsafe { &*ids_t };
    let k = ids_t.ne[0].max(0) as usize;
    if ids_t.type_ != GGML_TYPE_I32 || w.type_ != GGML_TYPE_F32 || k == 0 || k > MAX_K {
        SHARED
            .dropped
            .fetch_add(rows_of(ids_t).max(0) as u64, Ordering::Relaxed);
        return None;
    }
    Some(ids_t)
}

/// Classifies a tensor by name without allocating; the hidden-state tensor only while hidden
/// capture is on.
fn classify(name: &[c_char; 64]) -> Option<Kind> {
    const ROUTING: &[u8] = b"ffn_moe_weights-";
    let bytes = name.map(|c| c as u8);
    if bytes.starts_with(ROUTING) {
        return parse_layer(&bytes[ROUTING.len()..]).map(Kind::Routing);
    }
    if SHARED.hidden_on.load(Ordering::Relaxed) {
        let prefix: &[u8] = match SHARED.hidden_tensor() {
            HiddenTensor::FfnNorm => b"ffn_norm-",
            HiddenTensor::AttnNorm => b"attn_norm-",
            // The router's product; its input is what is captured (`capture_hidden`).
            HiddenTensor::RouterInput => b"ffn_moe_logits-",
        };
        if bytes.starts_with(prefix) {
            return parse_layer(&bytes[prefix.len()..]).map(Kind::Hidden);
        }
    }
    None
}

/// The eval callback installed in every context.
///
/// # Safety
/// Called by ggml's scheduler with a live tensor.
pub unsafe extern "C" fn eval_cb(t: *mut GgmlTensor, ask: bool, _ud: *mut c_void) -> bool {
    catch_unwind(AssertUnwindSafe(|| {
        // SAFETY: forwarded from the scheduler's contract.
        unsafe { eval(t, ask) }
    }))
    // A panic: do not ask for anything, and never cancel the graph.
    .unwrap_or(!ask)
}

unsafe fn eval(t: *mut GgmlTensor, ask: bool) -> bool {
    if t.is_null() {
        return !ask;
    }
    // SAFETY: the scheduler passes a live tensor.
    let tensor = unsafe { &*t };
    let kind = classify(&tensor.name);
    let chain = CHAIN_CB.load(Ordering::Relaxed);
    let chain: Option<EvalCallback> = (chain != 0).then(|| {
        // SAFETY: CHAIN_CB only ever holds a non-zero EvalCallback address.
        unsafe { std::mem::transmute::<usize, EvalCallback>(chain) }
    });
    let ud = CHAIN_UD.load(Ordering::Relaxed) as *mut c_void;
    // Marked by the graph observer: read once after the graph, not here.
    let kind = kind.filter(|k| match k {
        Kind::Routing(_) => !read_after_graph(tensor),
        // SAFETY: the scheduler passes a live tensor.
        Kind::Hidden(_) => !unsafe { hidden_after_graph(tensor) },
    });
    if ask {
        // SAFETY: calling the caller's own callback with its own user data.
        let theirs = chain.is_some_and(|cb| unsafe { cb(t, true, ud) });
        return kind.is_some() || theirs;
    }
    if let Some(kind) = kind {
        let ok = with_state(|slot| {
            if let Some(st) = slot.as_mut() {
                match kind {
                    // SAFETY: the tensor has just been computed and its sources are still live.
                    Kind::Routing(layer) => unsafe { st.capture_routing(tensor, layer) },
                    // SAFETY: as above.
                    Kind::Hidden(layer) => unsafe { st.capture_hidden(tensor, layer) },
                }
            }
        });
        if ok.is_none() {
            SHARED.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
    if let Some(cb) = chain {
        // SAFETY: as above; the caller's callback sees data only for tensors it asked for.
        if unsafe { cb(t, true, ud) } {
            // SAFETY: as above.
            return unsafe { cb(t, false, ud) };
        }
    }
    true
}

fn is_host(buffer: *mut c_void) -> bool {
    if buffer.is_null() {
        return false;
    }
    // SAFETY: BufferIsHostFn is ggml_backend_buffer_is_host's signature.
    match unsafe { as_fn::<BufferIsHostFn>(&BUFFER_IS_HOST) } {
        // SAFETY: buffer is a live backend buffer owned by the tensor.
        Some(f) => unsafe { f(buffer) },
        None => false,
    }
}

impl State {
    /// Emits the sampled rows of a hidden-state tensor (`ffn_norm-<layer>` or
    /// `attn_norm-<layer>`, f32 `[n_embd, rows]`) as chunks, within the byte budget.
    ///
    /// # Safety
    /// `t` must be a computed, live tensor.
    unsafe fn capture_hidden(&mut self, t: &GgmlTensor, layer: u32) {
        let t = match SHARED.hidden_tensor() {
            // SAFETY: t is live, so are its sources.
            HiddenTensor::RouterInput => match unsafe { router_input(t) } {
                Some(x) => x,
                None => {
                    let rows = rows_of(t).max(0) as usize;
                    self.hidden_rows.advance(layer, rows);
                    SHARED.dropped.fetch_add(rows as u64, Ordering::Relaxed);
                    return;
                }
            },
            _ => t,
        };
        // SAFETY: t is computed and live.
        unsafe { self.capture_hidden_of(t, layer) }
    }

    /// Emits the sampled rows of the hidden-state tensor `t` itself (a named norm, or the router
    /// input), copied out of device memory when it lives there.
    ///
    /// # Safety
    /// `t` must be a computed, live tensor.
    unsafe fn capture_hidden_of(&mut self, t: &GgmlTensor, layer: u32) {
        // SAFETY: t is computed and live.
        let Some((base, _)) = (unsafe { self.bytes_of(t, 0) }) else {
            // The rows still advance, so that later layers map to the right tokens.
            let rows = rows_of(t).max(0) as usize;
            self.hidden_rows.advance(layer, rows);
            SHARED.dropped.fetch_add(rows as u64, Ordering::Relaxed);
            return;
        };
        // SAFETY: base holds t's bytes.
        unsafe { self.emit_hidden(t, layer, base) }
    }

    /// Emits the sampled rows of a hidden-state tensor from `base`, its bytes.
    ///
    /// # Safety
    /// `base` must hold the bytes of `t` (its own or a copy).
    unsafe fn emit_hidden(&mut self, t: &GgmlTensor, layer: u32, base: *const u8) {
        let n_embd = t.ne[0].max(0) as usize;
        let rows = rows_of(t).max(0) as usize;
        self.hidden_rows.advance(layer, rows);
        let map = self.hidden_rows;
        if t.type_ != GGML_TYPE_F32 || n_embd == 0 {
            return;
        }
        let every = SHARED.hidden_every.load(Ordering::Relaxed).max(1);
        let budget = SHARED.hidden_budget.load(Ordering::Relaxed);
        let tensor = SHARED.hidden_tensor().code();
        let request = SHARED.request.load(Ordering::Relaxed);
        let Some(producer) = self.hidden.as_mut() else {
            return;
        };
        let mut rows_pos = RowPositions::new(map, rows);
        let row_bytes = (n_embd * 4) as u64;
        let mut chunk: HiddenChunk = bytemuck::Zeroable::zeroed();
        for j in 0..rows {
            let token = rows_pos.next(j, self.pos_known, &self.pos, &self.out);
            let sample = match token {
                Some(p) => p.is_multiple_of(every),
                None => (j as u32).is_multiple_of(every),
            };
            if !sample {
                continue;
            }
            let used = SHARED.hidden_bytes.load(Ordering::Relaxed);
            if used + row_bytes > budget {
                SHARED.hidden_on.store(false, Ordering::Relaxed);
                break;
            }
            chunk.request = request;
            chunk.token = token.unwrap_or(u32::MAX);
            chunk.layer = layer as u16;
            chunk.phase = self.phase;
            chunk.tensor = tensor;
            chunk.n_embd = n_embd as u32;
            let mut ok = true;
            let mut off = 0;
            while off < n_embd {
                let len = (n_embd - off).min(HIDDEN_CHUNK_FLOATS);
                for i in 0..len {
                    let at = j * t.nb[1] + (off + i) * t.nb[0];
                    // SAFETY: `at` addresses element (off + i, j), inside the tensor's extent.
                    chunk.values[i] =
                        unsafe { std::ptr::read_unaligned(base.add(at) as *const f32) };
                }
                chunk.offset = off as u32;
                chunk.len = len as u32;
                ok &= producer.write(&chunk);
                off += len;
            }
            if ok {
                SHARED.hidden_bytes.fetch_add(row_bytes, Ordering::Relaxed);
            } else {
                SHARED.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
        producer.publish();
    }

    /// Gives a readable pointer to `t`'s bytes: its own memory when host-resident, otherwise a
    /// copy in `scratch[at..]`. None when the copy does not fit the preallocated scratch.
    ///
    /// # Safety
    /// `t` must be a computed, live tensor.
    unsafe fn bytes_of(&mut self, t: &GgmlTensor, at: usize) -> Option<(*const u8, usize)> {
        if t.data.is_null() {
            return None;
        }
        // SAFETY: NbytesFn is ggml_nbytes's signature; t is live.
        let n = unsafe { as_fn::<NbytesFn>(&NBYTES)?(t) };
        if is_host(t.buffer) {
            return Some((t.data as *const u8, at));
        }
        // SAFETY: TensorGetFn is ggml_backend_tensor_get's signature.
        let get = unsafe { as_fn::<TensorGetFn>(&TENSOR_GET) }?;
        let end = at.checked_add(n)?;
        if end > self.scratch.len() {
            return None;
        }
        // SAFETY: scratch[at..end] is writable and n bytes long; t is live and computed.
        unsafe { get(t, self.scratch.as_mut_ptr().add(at) as *mut c_void, 0, n) };
        Some((self.scratch.as_ptr().wrapping_add(at), end))
    }

    /// Emits one record per token row of a `ffn_moe_weights-<layer>` tensor.
    ///
    /// # Safety
    /// `w` must be a computed, live tensor whose `src[1]` is the selected-experts tensor.
    unsafe fn capture_routing(&mut self, w: &GgmlTensor, layer: u32) {
        let Some(ids_t) = routing_ids(w) else {
            return;
        };
        // SAFETY: both tensors are computed and live.
        let Some((ids_p, next)) = (unsafe { self.bytes_of(ids_t, 0) }) else {
            SHARED
                .dropped
                .fetch_add(rows_of(ids_t).max(0) as u64, Ordering::Relaxed);
            return;
        };
        // SAFETY: as above.
        let Some((w_p, _)) = (unsafe { self.bytes_of(w, next) }) else {
            SHARED
                .dropped
                .fetch_add(rows_of(ids_t).max(0) as u64, Ordering::Relaxed);
            return;
        };
        // SAFETY: the pointers hold the tensors' bytes (their own or copies).
        unsafe { self.emit_routing(w, ids_t, ids_p, w_p, layer) }
    }

    /// Emits one record per token row, from the bytes of the ids and weights tensors.
    ///
    /// # Safety
    /// `ids_p` and `w_p` must hold the bytes of `ids_t` and `w` (their own or copies).
    unsafe fn emit_routing(
        &mut self,
        w: &GgmlTensor,
        ids_t: &GgmlTensor,
        ids_p: *const u8,
        w_p: *const u8,
        layer: u32,
    ) {
        let k = ids_t.ne[0].max(0) as usize;
        let rows = rows_of(ids_t).max(0) as usize;

        // Which batch tokens these rows are.
        if self.routing_rows.advance(layer, rows) {
            SHARED.ubatches.fetch_add(1, Ordering::Relaxed);
        }
        let map = self.routing_rows;
        let word = (layer as usize / 64).min(7);
        SHARED.layers_seen[word].fetch_or(1 << (layer % 64), Ordering::Relaxed);
        let mut rows_pos = RowPositions::new(map, rows);
        let request = SHARED.request.load(Ordering::Relaxed);
        let Some(producer) = self.producer.as_mut() else {
            return;
        };
        let (mut written, mut dropped, mut unmapped) = (0u64, 0u64, 0u64);
        for j in 0..rows {
            let token = match rows_pos.next(j, self.pos_known, &self.pos, &self.out) {
                Some(p) => p,
                None => {
                    unmapped += 1;
                    u32::MAX
                }
            };
            let mut rec = RoutingRecord {
                request,
                token,
                layer: layer as u16,
                phase: self.phase,
                n_used: k as u8,
                ids: [0; MAX_K],
                weights: [0.0; MAX_K],
            };
            for i in 0..k {
                let io = j * ids_t.nb[1] + i * ids_t.nb[0];
                let wo = j * w.nb[2] + i * w.nb[1];
                // SAFETY: io and wo are inside the tensors' extents (ggml_nbytes covers every
                // element at these strides); unaligned reads are allowed.
                let (id, wt) = unsafe {
                    (
                        std::ptr::read_unaligned(ids_p.add(io) as *const i32),
                        std::ptr::read_unaligned(w_p.add(wo) as *const f32),
                    )
                };
                rec.ids[i] = id.clamp(0, i32::from(u16::MAX)) as u16;
                rec.weights[i] = wt;
            }
            if producer.write(&rec) {
                written += 1;
            } else {
                dropped += 1;
            }
        }
        producer.publish();
        SHARED.records.fetch_add(written, Ordering::Relaxed);
        if dropped > 0 {
            SHARED.dropped.fetch_add(dropped, Ordering::Relaxed);
        }
        if unmapped > 0 {
            SHARED.unmapped.fetch_add(unmapped, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(s: &str) -> [c_char; 64] {
        let mut n = [0 as c_char; 64];
        for (d, b) in n.iter_mut().zip(s.bytes()) {
            *d = b as c_char;
        }
        n
    }

    #[test]
    fn draft_models_are_not_tapped() {
        assert!(is_target_model(128, 128));
        assert!(is_target_model(0, 0));
        assert!(is_target_model(0, 64));
        assert!(!is_target_model(128, 0));
        assert!(!is_target_model(128, 64));
    }

    #[test]
    fn only_the_routing_weights_are_asked_for() {
        assert!(matches!(
            classify(&name("ffn_moe_weights-17")),
            Some(Kind::Routing(17))
        ));
        for other in [
            "ffn_moe_weights_norm-3",
            "ffn_moe_weights-",
            "ffn_moe_weights-3x",
            "ffn_moe_topk-3",
            "ffn_norm-3",
            "",
        ] {
            assert!(classify(&name(other)).is_none(), "{other}");
        }
    }
}
