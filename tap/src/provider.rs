//! The residency provider the hooked ggml scheduler calls (ABI v1, `spark_moe_hook.h`).
//!
//! Owns the two exported symbols' behaviour, the process-wide [`Residency`] state, the
//! supervisor's plan (levels per layer and expert, written by the control thread through
//! atomics) and the counters the control channel and the exit line report: totals, and hits,
//! loads, streamed, evictions and bytes per layer in a fixed table of atomics (no allocation
//! on the hook path), which the control thread reads with the totals as one snapshot. Copies go through
//! ggml's own backend API on the engine's backend — `ggml_backend_tensor_set_async` for host →
//! device and `ggml_backend_tensor_copy_async` for slot → destination — so on CUDA they are
//! `cudaMemcpyAsync` calls on the engine's stream, ordered with the MUL_MAT_ID that follows
//! and with the previous step's reads of the same memory, with no CUDA code in the tap and no
//! second CUDA context. Slot memory comes from the backend's default buffer type (VRAM on
//! CUDA) and is kept until the process exits.
//!
//! Active only when `SPARK_RESIDENCY_SLOTS` is a positive number; otherwise every call is
//! declined and the stock path runs. A call that cannot be served (tensor name not `blk.N.…`,
//! a second model, no memory, the state busy) is declined, never half-served: declining after
//! copies were enqueued is harmless too, because the stock path then writes the same bytes.

use std::ffi::{c_void, CStr};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{fence, AtomicBool, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::Instant;

use spark_proto::control::{
    LayerCounters, ResidencyLayers, ResidencyStats, WantPlan, RESIDENCY_EXIT_PREFIX,
    RESIDENCY_TABLE_LAYERS,
};
use spark_proto::hook::{
    MoeRequestV1, ABI, ENV_RESIDENCY_METER as ENV_METER, ENV_RESIDENCY_PREFILL as ENV_PREFILL,
    ENV_RESIDENCY_SLOTS as ENV_SLOTS,
};

use crate::ffi::{
    as_fn, BufferBaseFn, BuftAllocFn, GgmlTensor, Sym, BUFFER_BASE, BUFT_ALLOC, GGML_TYPE_I8,
};
use crate::log::warn;
use crate::residency::{Call, Counters, Device, Residency, PINNED, TAIL};

static GET_BUFT: Sym = Sym::global(c"ggml_backend_get_default_buffer_type");
static SET_ASYNC: Sym = Sym::global(c"ggml_backend_tensor_set_async");
static COPY_ASYNC: Sym = Sym::global(c"ggml_backend_tensor_copy_async");

type GetBuftFn = unsafe extern "C" fn(*mut c_void) -> *mut c_void;
type SetAsyncFn = unsafe extern "C" fn(*mut c_void, *mut GgmlTensor, *const c_void, usize, usize);
type CopyAsyncFn =
    unsafe extern "C" fn(*mut c_void, *mut c_void, *const GgmlTensor, *mut GgmlTensor);

/// ggml's backend functions the provider calls, resolved once.
#[derive(Clone, Copy)]
struct Ggml {
    get_buft: GetBuftFn,
    buft_alloc: BuftAllocFn,
    buffer_base: BufferBaseFn,
    set_async: SetAsyncFn,
    copy_async: CopyAsyncFn,
}

impl Ggml {
    fn resolve() -> Option<Ggml> {
        // SAFETY: each type is the declared signature of that function in ggml-backend.h.
        unsafe {
            Some(Ggml {
                get_buft: as_fn(&GET_BUFT)?,
                buft_alloc: as_fn(&BUFT_ALLOC)?,
                buffer_base: as_fn(&BUFFER_BASE)?,
                set_async: as_fn(&SET_ASYNC)?,
                copy_async: as_fn(&COPY_ASYNC)?,
            })
        }
    }
}

/// Slot memory of one expert tensor of one layer: a ggml backend buffer.
pub struct GgmlSlots {
    buffer: *mut c_void,
    base: *mut u8,
}

// SAFETY: the buffer handle is only used under the provider's mutex, from whichever engine
// thread runs the scheduler; ggml buffers are not tied to a thread.
unsafe impl Send for GgmlSlots {}

/// A 1-D byte tensor over `len` bytes at `data` inside `buffer`: what ggml's copy functions
/// need to address a slot or an expert's bytes in the destination.
fn byte_tensor(buffer: *mut c_void, data: *mut u8, len: usize) -> GgmlTensor {
    // SAFETY: GgmlTensor is plain integers, pointers and byte arrays; all-zero is valid.
    let mut t: GgmlTensor = unsafe { std::mem::zeroed() };
    t.type_ = GGML_TYPE_I8;
    t.buffer = buffer;
    t.ne = [len as i64, 1, 1, 1];
    t.nb = [1, len, len, len];
    t.data = data.cast();
    t
}

/// Copies on the engine's backend, through ggml.
struct GgmlDevice {
    ggml: Ggml,
    backend: *mut c_void,
}

impl Device for GgmlDevice {
    type Slots = GgmlSlots;
    type Dst = *mut GgmlTensor;

    fn alloc(&mut self, bytes: usize) -> Option<GgmlSlots> {
        // SAFETY: backend is the live backend of the current hook call.
        let buft = unsafe { (self.ggml.get_buft)(self.backend) };
        if buft.is_null() {
            return None;
        }
        // SAFETY: buft is a live buffer type; a failed allocation returns null.
        let buffer = unsafe { (self.ggml.buft_alloc)(buft, bytes) };
        if buffer.is_null() {
            warn(&format!(
                "residency: no room for {} MiB of slots; that layer takes the stock path",
                bytes >> 20
            ));
            return None;
        }
        // SAFETY: buffer is live.
        let base = unsafe { (self.ggml.buffer_base)(buffer) }.cast::<u8>();
        Some(GgmlSlots { buffer, base })
    }

    fn host_to_dst(&mut self, dst: *mut GgmlTensor, dst_off: usize, src: &[u8]) {
        // SAFETY: dst is the hook call's destination tensor; the range lies inside it (the
        // same range stock ggml writes), src is host memory of that length.
        unsafe { (self.ggml.set_async)(self.backend, dst, src.as_ptr().cast(), dst_off, src.len()) }
    }

    fn slots_to_dst(
        &mut self,
        slots: &GgmlSlots,
        off: usize,
        dst: *mut GgmlTensor,
        dst_off: usize,
        len: usize,
    ) {
        // SAFETY: both ranges lie inside their buffers (slot sized by Residency, destination
        // range the one stock ggml writes); dst is the live destination tensor.
        unsafe {
            let s = byte_tensor(slots.buffer, slots.base.add(off), len);
            let mut d = byte_tensor((*dst).buffer, (*dst).data.cast::<u8>().add(dst_off), len);
            (self.ggml.copy_async)(self.backend, self.backend, &s, &mut d);
        }
    }

    fn dst_to_slots(
        &mut self,
        dst: *mut GgmlTensor,
        dst_off: usize,
        slots: &mut GgmlSlots,
        off: usize,
        len: usize,
    ) {
        // SAFETY: as slots_to_dst, the other way round: the destination range was filled by
        // the host copy enqueued just before on the same backend.
        unsafe {
            let d = byte_tensor((*dst).buffer, (*dst).data.cast::<u8>().add(dst_off), len);
            let mut s = byte_tensor(slots.buffer, slots.base.add(off), len);
            (self.ggml.copy_async)(self.backend, self.backend, &d, &mut s);
        }
    }
}

/// The supervisor's plan: a level per (layer, expert), written by the control thread.
struct Plan {
    n_layer: usize,
    n_expert: usize,
    levels: Box<[AtomicU8]>,
    planned: Box<[AtomicBool]>,
}

static PLAN: OnceLock<Plan> = OnceLock::new();
static STATE: Mutex<Option<Residency<GgmlSlots>>> = Mutex::new(None);
static SLOTS: OnceLock<u32> = OnceLock::new();
static METER: OnceLock<bool> = OnceLock::new();
static GGML: OnceLock<Option<Ggml>> = OnceLock::new();
static BROKEN: AtomicBool = AtomicBool::new(false);

/// Counters as the control thread reads them (copied from the state after every call).
static COUNTERS: [AtomicU64; 15] = [const { AtomicU64::new(0) }; 15];
static LAYERS: AtomicU64 = AtomicU64::new(0);

/// One layer's counters on the wire's order (`LayerCounters::to_array`).
type LayerCells = [AtomicU64; LayerCounters::FIELDS];
/// Counters per layer, for layers below the table's size: static, so the hook path never
/// allocates. Written only by the thread inside the provider (under `STATE`).
static LAYER_COUNTERS: [LayerCells; RESIDENCY_TABLE_LAYERS] =
    [const { [const { AtomicU64::new(0) }; LayerCounters::FIELDS] }; RESIDENCY_TABLE_LAYERS];
/// Layers past the table, or whose tensor name gave none (meter mode), added up.
static OTHER_LAYERS: LayerCells = [const { AtomicU64::new(0) }; LayerCounters::FIELDS];
/// One past the highest layer counted: the reader looks no further.
static LAYERS_SEEN: AtomicUsize = AtomicUsize::new(0);
/// Sequence lock over `COUNTERS`, `LAYERS` and the layer counters: odd while the provider
/// updates them, so the control thread reads totals and layers of one moment (they add up).
static SEQ: AtomicU64 = AtomicU64::new(0);
/// The model's experts per token (from its metadata, when the context is made).
static TOP_K: AtomicU64 = AtomicU64::new(0);

/// Records the model's experts per token, which tells wide (prompt) calls from decode.
pub fn set_top_k(top_k: u32) {
    TOP_K.store(u64::from(top_k), Ordering::Relaxed);
}

/// `SPARK_RESIDENCY_PREFILL=admit` turns the wide rule off (every call admits like decode;
/// wide calls are still counted apart), read once.
fn wide_rule() -> bool {
    static RULE: OnceLock<bool> = OnceLock::new();
    *RULE.get_or_init(
        || match std::env::var(ENV_PREFILL).as_deref().map(str::trim) {
            Err(_) | Ok("") | Ok("stream") => true,
            Ok("admit") => false,
            Ok(other) => {
                warn(&format!(
                "{ENV_PREFILL}={other:?} is neither stream nor admit; prompt batches are streamed"
            ));
                true
            }
        },
    )
}
static PROVIDER_NS: AtomicU64 = AtomicU64::new(0);

/// Slots per layer from the environment (0: provider off), read once.
pub fn configured_slots() -> u32 {
    *SLOTS.get_or_init(|| {
        let v = std::env::var(ENV_SLOTS).ok();
        let slots = match v.as_deref().map(str::trim) {
            None | Some("") => 0,
            Some(s) => s.parse::<u32>().unwrap_or_else(|_| {
                warn(&format!("{ENV_SLOTS}={s:?} is not a number; residency off"));
                0
            }),
        };
        if slots > 0 || metering() {
            // SAFETY: registering a plain extern "C" function with no captured state.
            if unsafe { libc::atexit(report_at_exit) } != 0 {
                warn("residency: could not register the exit report");
            }
        }
        slots
    })
}

/// Meter mode (`SPARK_RESIDENCY_METER=1` and no slots): decline every call, count what the
/// stock copy moves. Read once.
fn metering() -> bool {
    *METER.get_or_init(|| std::env::var(ENV_METER).is_ok_and(|v| v.trim() == "1"))
}

extern "C" fn report_at_exit() {
    let _ = catch_unwind(|| {
        use std::io::Write as _;
        let _ = writeln!(
            std::io::stderr().lock(),
            "{RESIDENCY_EXIT_PREFIX}{}",
            stats().to_text()
        );
    });
}

/// The counters, as `residency` reports them.
pub fn stats() -> ResidencyStats {
    let c = |i: usize| COUNTERS[i].load(Ordering::Relaxed);
    let planned = PLAN.get().map_or(0, |p| {
        p.planned
            .iter()
            .filter(|b| b.load(Ordering::Relaxed))
            .count() as u32
    });
    ResidencyStats {
        slots: configured_slots(),
        layers: LAYERS.load(Ordering::Relaxed) as u32,
        planned,
        calls: c(0),
        declined: c(1),
        hits: c(2),
        loads: c(3),
        streamed: c(4),
        evictions: c(5),
        bytes_hit: c(6),
        bytes_host: c(7),
        copies_host: c(8),
        copies_device: c(9),
        wide_calls: c(10),
        wide_hits: c(11),
        wide_loads: c(12),
        wide_streamed: c(13),
        copies_host_unbatched: c(14),
        provider_us: PROVIDER_NS.load(Ordering::Relaxed) / 1000,
    }
}

/// Publishes the counters after a call; `layer` names the call's layer and the counters before
/// it, whose difference joins that layer's counters. Writers hold `STATE`, so there is one.
fn publish(c: &Counters, layers: u32, layer: Option<(u32, &Counters)>) {
    let v = [
        c.calls,
        c.declined,
        c.hits,
        c.loads,
        c.streamed,
        c.evictions,
        c.bytes_hit,
        c.bytes_host,
        c.copies_host,
        c.copies_device,
        c.wide_calls,
        c.wide_hits,
        c.wide_loads,
        c.wide_streamed,
        c.copies_host_unbatched,
    ];
    let seq = SEQ.load(Ordering::Relaxed);
    SEQ.store(seq.wrapping_add(1), Ordering::Relaxed);
    fence(Ordering::Release);
    for (a, v) in COUNTERS.iter().zip(v) {
        a.store(v, Ordering::Relaxed);
    }
    LAYERS.store(u64::from(layers), Ordering::Relaxed);
    if let Some((l, before)) = layer {
        let (now, then) = (layer_part(c), layer_part(before));
        let cells = match LAYER_COUNTERS.get(l as usize) {
            Some(cells) => {
                LAYERS_SEEN.fetch_max(l as usize + 1, Ordering::Relaxed);
                cells
            }
            None => &OTHER_LAYERS,
        };
        for ((a, n), t) in cells.iter().zip(now.to_array()).zip(then.to_array()) {
            a.fetch_add(n.wrapping_sub(t), Ordering::Relaxed);
        }
    }
    SEQ.store(seq.wrapping_add(2), Ordering::Release);
}

/// The part of the counters kept per layer.
fn layer_part(c: &Counters) -> LayerCounters {
    LayerCounters {
        hits: c.hits,
        loads: c.loads,
        streamed: c.streamed,
        evictions: c.evictions,
        bytes_hit: c.bytes_hit,
        bytes_host: c.bytes_host,
    }
}

/// The counters per layer with their totals, of one moment (`residency layers`); `None` when
/// the provider kept updating them through every try (it updates once per hook call, in
/// microseconds, so a try fails only while a call is inside its update).
pub fn layer_snapshot() -> Option<ResidencyLayers> {
    let read = |cells: &LayerCells| {
        LayerCounters::from_array(std::array::from_fn(|i| cells[i].load(Ordering::Relaxed)))
    };
    let mut layers = Vec::new();
    for _ in 0..10_000 {
        let seq = SEQ.load(Ordering::Acquire);
        if seq % 2 == 1 {
            std::thread::yield_now();
            continue;
        }
        layers.clear();
        let seen = LAYERS_SEEN
            .load(Ordering::Relaxed)
            .min(RESIDENCY_TABLE_LAYERS);
        for (l, cells) in LAYER_COUNTERS[..seen].iter().enumerate() {
            let c = read(cells);
            if !c.is_zero() {
                layers.push((l as u32, c));
            }
        }
        let other = read(&OTHER_LAYERS);
        let c = |i: usize| COUNTERS[i].load(Ordering::Relaxed);
        let totals = LayerCounters::from_array([c(2), c(3), c(4), c(5), c(6), c(7)]);
        fence(Ordering::Acquire);
        if SEQ.load(Ordering::Relaxed) == seq {
            return Some(ResidencyLayers {
                seq: seq / 2,
                totals,
                other,
                layers,
            });
        }
        std::thread::yield_now();
    }
    None
}

/// Applies one `want` / `want+` line from the supervisor.
pub fn want(plan: &WantPlan, append: bool, n_layer: u32, n_expert: u32) -> Result<(), String> {
    if configured_slots() == 0 {
        return Err(format!("residency is off ({ENV_SLOTS} not set)"));
    }
    let p = PLAN.get_or_init(|| {
        let (l, e) = (n_layer as usize, n_expert as usize);
        Plan {
            n_layer: l,
            n_expert: e,
            levels: (0..l * e).map(|_| AtomicU8::new(0)).collect(),
            planned: (0..l).map(|_| AtomicBool::new(false)).collect(),
        }
    });
    let layer = plan.layer as usize;
    if layer >= p.n_layer {
        return Err(format!(
            "layer {layer} of a model with {} layers",
            p.n_layer
        ));
    }
    if let Some(&e) = plan
        .pinned
        .iter()
        .chain(&plan.tail)
        .find(|&&e| e as usize >= p.n_expert)
    {
        return Err(format!("expert {e} of a model with {} experts", p.n_expert));
    }
    let row = &p.levels[layer * p.n_expert..(layer + 1) * p.n_expert];
    if !append {
        for l in row {
            l.store(0, Ordering::Relaxed);
        }
    }
    for &e in &plan.tail {
        row[e as usize].fetch_max(TAIL, Ordering::Relaxed);
    }
    for &e in &plan.pinned {
        row[e as usize].store(PINNED, Ordering::Relaxed);
    }
    p.planned[layer].store(true, Ordering::Release);
    Ok(())
}

/// `blk.N.rest` → (N, rest).
fn split_name(name: &str) -> Option<(u32, &str)> {
    let rest = name.strip_prefix("blk.")?;
    let (n, tensor) = rest.split_once('.')?;
    Some((n.parse().ok()?, tensor))
}

/// Serves one hook call; `false` declines.
///
/// # Safety
/// `req` is the scheduler's request, valid for the duration of the call (ABI v1 contract).
pub unsafe fn provide(req: *const MoeRequestV1) -> bool {
    let slots = configured_slots();
    if req.is_null() || BROKEN.load(Ordering::Relaxed) {
        return false;
    }
    if slots == 0 {
        if metering() {
            // SAFETY: forwarded from our caller.
            let _ = catch_unwind(AssertUnwindSafe(|| unsafe { meter(&*req) }));
        }
        return false;
    }
    let started = Instant::now();
    let ok = catch_unwind(AssertUnwindSafe(|| {
        // SAFETY: forwarded from our caller.
        unsafe { provide_inner(slots, &*req) }
    }))
    .unwrap_or_else(|_| {
        // The state may be inconsistent now: stop serving (the stock path stays exact).
        BROKEN.store(true, Ordering::Relaxed);
        warn("residency: provider panicked; declining from now on");
        false
    });
    PROVIDER_NS.fetch_add(started.elapsed().as_nanos() as u64, Ordering::Relaxed);
    ok
}

/// Counts one call the stock path is about to serve (meter mode).
///
/// # Safety
/// As [`provide`].
unsafe fn meter(req: &MoeRequestV1) {
    let Ok(mut guard) = STATE.try_lock() else {
        return;
    };
    let state = guard.get_or_insert_with(|| Residency::new(0));
    let before = state.counters;
    let mut layer = u32::MAX; // unknown: counted with the layers past the table
    if req.abi != ABI || req.src.is_null() || req.used.is_null() || req.n_expert <= 0 {
        state.counters.calls += 1;
        state.counters.declined += 1;
    } else {
        // SAFETY: the scheduler passes a live source tensor and a bitset of ceil(n/32) words
        // for the duration of the call (ABI v1); the source bytes are never read here.
        let (src, used) = unsafe {
            (
                &*req.src.cast::<GgmlTensor>(),
                std::slice::from_raw_parts(req.used, (req.n_expert as usize).div_ceil(32)),
            )
        };
        // SAFETY: ggml tensor names are NUL-terminated within GGML_MAX_NAME.
        let name = unsafe { CStr::from_ptr(src.name.as_ptr()) };
        let (l, tensor) = name
            .to_str()
            .ok()
            .and_then(split_name)
            .unwrap_or((u32::MAX, ""));
        layer = l;
        state.counters.meter_stock(&Call {
            layer: 0,
            tensor,
            src_id: req.src as usize,
            n_expert: req.n_expert as usize,
            expert_size: req.expert_size,
            src: &[],
            used,
            dst: (),
        });
    }
    publish(&state.counters, 0, Some((layer, &before)));
}

/// # Safety
/// As [`provide`].
unsafe fn provide_inner(slots: u32, req: &MoeRequestV1) -> bool {
    let Ok(mut guard) = STATE.try_lock() else {
        return false; // another engine thread is inside: let it be, take the stock path
    };
    let state = guard.get_or_insert_with(|| Residency::new(slots));
    state.set_top_k(TOP_K.load(Ordering::Relaxed) as usize);
    state.set_wide_rule(wide_rule());
    let declined = |state: &mut Residency<GgmlSlots>| {
        state.counters.calls += 1;
        state.counters.declined += 1;
        publish(&state.counters, state.layers_with_memory(), None);
        false
    };
    let Some(ggml) = *GGML.get_or_init(|| {
        let g = Ggml::resolve();
        if g.is_none() {
            warn("residency: ggml backend functions not found; residency off");
        }
        g
    }) else {
        return declined(state);
    };
    if req.abi != ABI
        || req.backend.is_null()
        || req.src.is_null()
        || req.dst.is_null()
        || req.used.is_null()
        || req.n_expert <= 0
    {
        return declined(state);
    }
    // SAFETY: the scheduler passes live tensors (ABI v1).
    let (src, dst) = unsafe { (&*req.src.cast::<GgmlTensor>(), req.dst.cast::<GgmlTensor>()) };
    // SAFETY: ggml tensor names are NUL-terminated within GGML_MAX_NAME.
    let name = unsafe { CStr::from_ptr(src.name.as_ptr()) };
    let Some((layer, tensor)) = name.to_str().ok().and_then(split_name) else {
        return declined(state);
    };
    let n = req.n_expert as usize;
    let Some(bytes) = n.checked_mul(req.expert_size) else {
        return declined(state);
    };
    if src.data.is_null() {
        return declined(state);
    }
    // SAFETY: src is a host tensor of n_expert experts of expert_size bytes each (the
    // scheduler's own reads of src->data rely on the same), and the bitset has ceil(n/32)
    // words for the duration of the call.
    let (host, used) = unsafe {
        (
            std::slice::from_raw_parts(src.data.cast::<u8>(), bytes),
            std::slice::from_raw_parts(req.used, n.div_ceil(32)),
        )
    };
    let call = Call {
        layer,
        tensor,
        src_id: req.src as usize,
        n_expert: n,
        expert_size: req.expert_size,
        src: host,
        used,
        dst,
    };
    let plan = PLAN
        .get()
        .filter(|p| (layer as usize) < p.n_layer && p.n_expert == n)
        .filter(|p| p.planned[layer as usize].load(Ordering::Acquire));
    let row = plan.map(|p| &p.levels[layer as usize * n..(layer as usize + 1) * n]);
    let level = row.map(|r| move |e: u32| r[e as usize].load(Ordering::Relaxed));
    let level_ref: Option<&dyn Fn(u32) -> u8> = level.as_ref().map(|f| f as &dyn Fn(u32) -> u8);
    let mut dev = GgmlDevice {
        ggml,
        backend: req.backend,
    };
    let before = state.counters;
    let ok = state.serve(&mut dev, req.backend as usize, &call, level_ref);
    publish(
        &state.counters,
        state.layers_with_memory(),
        Some((layer, &before)),
    );
    ok
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::residency::tests::{stock_copy, Rng};
    use std::path::PathBuf;

    #[test]
    fn tensor_names_give_layer_and_tensor() {
        assert_eq!(
            split_name("blk.12.ffn_gate_exps.weight"),
            Some((12, "ffn_gate_exps.weight"))
        );
        assert_eq!(split_name("output.weight"), None);
        assert_eq!(split_name("blk.x.ffn_up_exps.weight"), None);
    }

    #[test]
    fn byte_tensors_describe_exactly_len_bytes() {
        let mut mem = [0u8; 16];
        let t = byte_tensor(std::ptr::null_mut(), mem.as_mut_ptr(), 16);
        // ggml_nbytes for a block size of 1: type size + sum of (ne[i] - 1) * nb[i]
        let nbytes = 1 + t
            .ne
            .iter()
            .zip(t.nb)
            .map(|(&ne, nb)| (ne as usize - 1) * nb)
            .sum::<usize>();
        assert_eq!(nbytes, 16);
        assert_eq!(t.type_, GGML_TYPE_I8);
    }

    /// The pinned CPU engine's library directory (scripts/build-engine, which CI runs).
    fn engine_lib_dir() -> PathBuf {
        let d = crate::cpu_engine_prefix().join("lib");
        assert!(
            d.join("libggml-base.so").exists(),
            "pinned engine missing at {}; run scripts/build-engine",
            d.display()
        );
        d
    }

    fn dlopen_global(path: &std::path::Path) {
        let c = std::ffi::CString::new(path.to_str().unwrap()).unwrap();
        // SAFETY: loading a shared library by path; its initialisers are ggml's own.
        let h = unsafe { libc::dlopen(c.as_ptr(), libc::RTLD_NOW | libc::RTLD_GLOBAL) };
        assert!(!h.is_null(), "dlopen {}", path.display());
    }

    fn sym<F: Copy>(name: &CStr) -> F {
        // SAFETY: dlsym on the global scope with a NUL-terminated name.
        let p = unsafe { libc::dlsym(libc::RTLD_DEFAULT, name.as_ptr()) };
        assert!(!p.is_null(), "{name:?} not found");
        // SAFETY: the caller names the symbol's C signature.
        unsafe { std::mem::transmute_copy::<*mut c_void, F>(&p) }
    }

    /// The provider against the real ggml (the pinned CPU build, loaded into this process as
    /// llama-server has it): slot buffers from the backend's buffer type, byte tensors accepted
    /// by ggml_backend_tensor_set_async / ggml_backend_tensor_copy_async, and a destination
    /// that ends up byte-identical to the stock scheduler's copy after random steps. On a GPU
    /// the same calls run on the CUDA backend.
    /// The tests that touch the process-wide counters take turns.
    static COUNTERS_LOCK: Mutex<()> = Mutex::new(());

    fn zero_counters() {
        for a in COUNTERS
            .iter()
            .chain(LAYER_COUNTERS.iter().flatten())
            .chain(&OTHER_LAYERS)
        {
            a.store(0, Ordering::Relaxed);
        }
        LAYERS_SEEN.store(0, Ordering::Relaxed);
    }

    /// A control thread reading while the provider publishes after every call still sees
    /// layers that add up to the totals (the sequence lock), and the last read sees them all.
    #[test]
    fn layer_snapshots_add_up_to_the_totals_while_calls_publish() {
        let _turn = COUNTERS_LOCK.lock().unwrap_or_else(|e| e.into_inner());
        zero_counters();
        let done = AtomicBool::new(false);
        let reads = std::thread::scope(|scope| {
            scope.spawn(|| {
                let mut c = Counters::default();
                for i in 0..200_000u64 {
                    let before = c;
                    c.calls += 1;
                    c.hits += i % 3;
                    c.loads += i % 2;
                    c.streamed += 1;
                    c.evictions += i % 5 / 4;
                    c.bytes_hit += 1000 * (i % 3);
                    c.bytes_host += 700;
                    // Layer 2000 is past the table: it is counted in `other`.
                    let layer = [0, 5, 17, 2000][(i % 4) as usize];
                    publish(&c, 3, Some((layer, &before)));
                }
                done.store(true, Ordering::Release);
            });
            let mut reads = 0u32;
            while !done.load(Ordering::Acquire) {
                if let Some(snap) = layer_snapshot() {
                    let sum = snap
                        .layers
                        .iter()
                        .fold(snap.other, |a, (_, c)| a.checked_add(c).unwrap());
                    assert_eq!(sum, snap.totals, "seq {}", snap.seq);
                    reads += 1;
                }
            }
            reads
        });
        assert!(reads > 0);
        let last = layer_snapshot().unwrap();
        assert_eq!(last.totals.streamed, 200_000);
        assert_eq!(
            last.layers.iter().map(|(l, _)| *l).collect::<Vec<_>>(),
            vec![0, 5, 17]
        );
        assert_eq!(last.other.streamed, 50_000);
        zero_counters();
    }

    #[test]
    fn serves_through_the_real_ggml_backend_api_exactly_like_the_stock_copy() {
        let _turn = COUNTERS_LOCK.lock().unwrap_or_else(|e| e.into_inner());
        let lib = engine_lib_dir();
        dlopen_global(&lib.join("libggml-base.so"));
        dlopen_global(&lib.join("libggml-cpu.so"));
        // The only test in this binary that configures the provider (set directly, not via
        // the environment, which other test threads may be reading).
        assert!(SLOTS.set(3).is_ok());
        assert_eq!(configured_slots(), 3);

        type CpuInit = unsafe extern "C" fn() -> *mut c_void;
        type AllocBuffer = unsafe extern "C" fn(*mut c_void, usize) -> *mut c_void;
        let cpu_init: CpuInit = sym(c"ggml_backend_cpu_init");
        let alloc: AllocBuffer = sym(c"ggml_backend_alloc_buffer");
        let base: BufferBaseFn = sym(c"ggml_backend_buffer_get_base");
        // SAFETY: plain constructor calls of the loaded ggml.
        let backend = unsafe { cpu_init() };
        assert!(!backend.is_null());

        let (n, es) = (16usize, 600usize); // expert larger than the 512-byte padding
        let mut rng = Rng::new(11);
        let host: Vec<u8> = (0..n * es).map(|_| rng.next() as u8).collect();
        let named = |name: &str, data: *mut u8| {
            let mut t = byte_tensor(std::ptr::null_mut(), data, n * es);
            for (d, s) in t.name.iter_mut().zip(name.bytes()) {
                *d = s as std::ffi::c_char;
            }
            t
        };
        let src = named("blk.3.ffn_up_exps.weight", host.as_ptr().cast_mut());
        // SAFETY: allocating a CPU buffer of n * es bytes and reading its base.
        let (buffer, mem) = unsafe {
            let b = alloc(backend, n * es);
            (b, base(b).cast::<u8>())
        };
        // The destination as the scheduler has it: a 3-D f32 weight of n experts.
        let mut dst = byte_tensor(buffer, mem, n * es);
        dst.type_ = 0; // GGML_TYPE_F32
        dst.ne = [(es / 4) as i64, 1, n as i64, 1];
        dst.nb = [4, es, es, es * n];
        // SAFETY: the buffer holds n * es bytes of host memory (CPU backend).
        let dst_bytes = || unsafe { std::slice::from_raw_parts_mut(mem, n * es) };

        for step in 0..40 {
            let mut ids: Vec<usize> = (0..1 + rng.below(4))
                .map(|_| rng.below(n as u64) as usize)
                .collect();
            if step % 9 == 0 {
                ids.push(n - 1);
            }
            let mut used = vec![0u32; n.div_ceil(32)];
            for &e in &ids {
                used[e / 32] |= 1 << (e % 32);
            }
            let garbage: Vec<u8> = (0..n * es).map(|_| rng.next() as u8).collect();
            dst_bytes().copy_from_slice(&garbage);
            let mut want = garbage;
            stock_copy(&mut want, &host, &used, n, es);
            let req = MoeRequestV1 {
                abi: ABI,
                reserved: 0,
                backend,
                src: (&src as *const GgmlTensor).cast(),
                dst: (&mut dst as *mut GgmlTensor).cast(),
                n_expert: n as i64,
                expert_size: es,
                used: used.as_ptr(),
            };
            // SAFETY: a request as the hooked scheduler builds it, valid for the call.
            let served = unsafe { crate::spark_moe_provide_v1(&req) };
            assert_eq!(served, 1, "step {step}");
            assert!(
                dst_bytes() == want.as_slice(),
                "step {step}: differs from the stock copy"
            );
        }
        let s = stats();
        assert_eq!(
            (s.slots, s.calls, s.declined, s.layers),
            (3, 40, 0, 1),
            "{s:?}"
        );
        assert!(s.hits > 0 && s.loads > 0 && s.evictions > 0, "{s:?}");
        // Every slice was of layer 3: its counters are the totals.
        let per = layer_snapshot().unwrap();
        assert_eq!(per.totals, LayerCounters::of_totals(&s));
        assert_eq!(per.layers, vec![(3, per.totals)]);
        assert!(per.other.is_zero());

        // Same name, another tensor (a second model): declined, nothing written.
        let other = named(
            "blk.3.ffn_up_exps.weight",
            host.as_ptr().cast_mut().wrapping_add(0),
        );
        let before = dst_bytes().to_vec();
        let used = [1u32];
        let req = MoeRequestV1 {
            abi: ABI,
            reserved: 0,
            backend,
            src: (&other as *const GgmlTensor).cast(),
            dst: (&mut dst as *mut GgmlTensor).cast(),
            n_expert: n as i64,
            expert_size: es,
            used: used.as_ptr(),
        };
        // SAFETY: as above.
        assert_eq!(unsafe { crate::spark_moe_provide_v1(&req) }, 0);
        assert!(dst_bytes() == before.as_slice());
        assert_eq!(stats().declined, 1);
    }
}
