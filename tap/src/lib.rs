//! `libspark_tap.so`: preloaded into stock llama-server, it captures MoE routing into spark's
//! shared-memory ring.
//!
//! Owns two interposed llama.cpp entry points and the eval callback:
//! - `llama_init_from_model` forwards to the real function after installing the tap's
//!   `cb_eval` (chaining any callback the caller had set), maps the ring whose inherited
//!   descriptor `SPARK_RING_FD` names and starts the control thread on the socket in
//!   `SPARK_CONTROL_FD`;
//! - `llama_decode` (classic batches) and `llama_process` with the `llama_batch_ext_*` builder
//!   calls (the extended batches llama-server uses) are mirrored into preallocated shadows of
//!   each batch's token positions and output flags, so every record can say which token it
//!   belongs to; each wrapper forwards to the real function;
//! - the callback asks the scheduler only for `ffn_moe_weights-<il>` (whose sources hold the
//!   selected expert ids; on a hooked engine the graph observer reads those instead, once per
//!   graph) and, when switched on, the hidden state (`router_input`: the source of
//!   `ffn_moe_logits-<il>`, or a named norm); it answers "no" for every other tensor so the
//!   graph is not split elsewhere.
//!
//! It also exports the residency provider of spark's scheduler hook (`spark_moe_provide_v1`,
//! `spark_moe_hook_abi`; see `provider.rs`) and the graph observer (`spark_graph_observe_v1`,
//! `spark_graph_hook_abi`; see `graph.rs`), which a hooked llama.cpp build finds at run time
//! and stock builds never look for. The provider serves only when `SPARK_RESIDENCY_SLOTS` is
//! set; the observer (on unless `SPARK_GRAPH_READS=off`) lets the tap read each graph's
//! routing once after the graph instead of synchronising the device at every MoE layer.
//!
//! Must never: block the engine (a full ring drops and counts), allocate on the capture path
//! (callback and decode wrapper), let a panic cross the C boundary (every exported function
//! catches it), or link an async runtime.

mod batch;
mod capture;
mod control;
mod ffi;
mod graph;
mod log;
mod provider;
mod residency;
mod shared;

/// The pinned CPU engine's install prefix, as `scripts/build-engine --print` names it (the
/// name carries a key over the build's flags, which only the script and spark compute).
#[cfg(test)]
pub(crate) fn cpu_engine_prefix() -> std::path::PathBuf {
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/build-engine");
    let o = std::process::Command::new(&script)
        .arg("--print")
        .output()
        .unwrap_or_else(|e| panic!("run {}: {e}", script.display()));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    std::path::PathBuf::from(String::from_utf8(o.stdout).unwrap().trim())
}

use std::ffi::c_void;
use std::panic::{catch_unwind, AssertUnwindSafe};

use capture::BatchEvent;
use ffi::{
    as_fn, BatchAddEmbdFn, BatchAddFn, BatchAddTokenFn, BatchClearFn, BatchSetOutputFn,
    BatchSetPosFn, DecodeFn, InitFn, LlamaBatch, LlamaContextParams, LlamaEmbd, ProcessFn,
    LLAMA_PROCESS_TYPE_DECODE, REAL_BATCH_ADD, REAL_BATCH_ADD_EMBD, REAL_BATCH_ADD_TOKEN,
    REAL_BATCH_CLEAR, REAL_BATCH_FREE, REAL_BATCH_SET_OUTPUT_EMBD, REAL_BATCH_SET_OUTPUT_LOGITS,
    REAL_BATCH_SET_POS, REAL_DECODE, REAL_INIT, REAL_PROCESS,
};

/// Interposes `llama_init_from_model`: installs the tap's eval callback, then creates the
/// context with the real function.
///
/// # Safety
/// Called by llama.cpp's callers with the same contract as the real function.
#[no_mangle]
pub unsafe extern "C" fn llama_init_from_model(
    model: *mut c_void,
    params: LlamaContextParams,
) -> *mut c_void {
    // SAFETY: InitFn is the declared signature of llama_init_from_model in llama.h.
    let Some(real) = (unsafe { as_fn::<InitFn>(&REAL_INIT) }) else {
        log::warn("llama_init_from_model not found after the tap; is libllama loaded?");
        return std::ptr::null_mut();
    };
    // Reads SPARK_RESIDENCY_SLOTS now, so that a provider that is on reports at exit even if
    // the scheduler never calls it (a CPU build never offloads).
    let _ = catch_unwind(provider::configured_slots);
    let mut patched = params;
    let installed = catch_unwind(AssertUnwindSafe(|| {
        // SAFETY: model comes from llama.cpp's caller and is a live llama_model.
        unsafe { capture::on_context_params(model, &mut patched) }
    }))
    .unwrap_or(false);
    let params = if installed { patched } else { params };
    // The context's reserve graphs are prepared inside this call: the graph observer marks
    // them like the decode graphs that follow.
    // SAFETY: forwarding the caller's arguments to the real function.
    let ctx = graph::within(installed, || unsafe { real(model, params) });
    if installed {
        graph::register_target(ctx);
    }
    ctx
}

/// Interposes `llama_decode`: records the batch layout for the callback, then decodes.
///
/// # Safety
/// Called by llama.cpp's callers with the same contract as the real function.
#[no_mangle]
pub unsafe extern "C" fn llama_decode(ctx: *mut c_void, batch: LlamaBatch) -> i32 {
    // SAFETY: DecodeFn is the declared signature of llama_decode in llama.h.
    let Some(real) = (unsafe { as_fn::<DecodeFn>(&REAL_DECODE) }) else {
        log::warn("llama_decode not found after the tap; is libllama loaded?");
        return -1;
    };
    let _ = catch_unwind(AssertUnwindSafe(|| {
        // SAFETY: the batch is the caller's, valid for the duration of this call.
        unsafe { capture::on_decode(ctx, &batch) }
    }));
    // SAFETY: forwarding the caller's arguments to the real function.
    graph::within(graph::is_target(ctx), || unsafe { real(ctx, batch) })
}

/// Interposes `llama_process` (the extended-batch API llama-server uses): the batch's shadow
/// becomes the layout the callback attributes rows to, then the real function runs.
///
/// # Safety
/// Called by llama.cpp's callers with the same contract as the real function.
#[no_mangle]
pub unsafe extern "C" fn llama_process(ctx: *mut c_void, kind: i32, batch: *mut c_void) -> i32 {
    // SAFETY: ProcessFn is the declared signature of llama_process in llama.h.
    let Some(real) = (unsafe { as_fn::<ProcessFn>(&REAL_PROCESS) }) else {
        log::warn("llama_process not found after the tap; is libllama loaded?");
        return -1;
    };
    if kind == LLAMA_PROCESS_TYPE_DECODE {
        let _ = catch_unwind(|| capture::on_process(batch));
    }
    // SAFETY: forwarding the caller's arguments to the real function.
    graph::within(graph::is_target(ctx), || unsafe { real(ctx, kind, batch) })
}

/// Defines an interposed batch-builder function: forward to the real one, then mirror the
/// effect into the batch's shadow (never failing the caller because of the tap).
macro_rules! batch_fn {
    ($name:ident, $sym:ident, $ty:ty, ($($arg:ident: $t:ty),*) -> $ret:ty, $missing:expr, |$r:ident| $event:expr) => {
        /// Interposed `llama_batch_ext_*` builder call (see `batch_fn!`).
        ///
        /// # Safety
        /// Called by llama.cpp's callers with the same contract as the real function.
        #[no_mangle]
        #[allow(clippy::unused_unit)] // `-> ()` is how the macro spells a void builder
        pub unsafe extern "C" fn $name(batch: *mut c_void, $($arg: $t),*) -> $ret {
            // SAFETY: the type is the declared signature of this function in llama.h.
            let Some(real) = (unsafe { as_fn::<$ty>(&$sym) }) else {
                log::warn(concat!(stringify!($name), " not found after the tap"));
                return $missing;
            };
            // SAFETY: forwarding the caller's arguments to the real function.
            let $r = unsafe { real(batch, $($arg),*) };
            let _ = catch_unwind(AssertUnwindSafe(|| {
                if let Some(ev) = $event {
                    capture::on_batch(batch, ev);
                }
            }));
            $r
        }
    };
}

batch_fn!(llama_batch_ext_clear, REAL_BATCH_CLEAR, BatchClearFn, () -> (), (),
    |_r| Some(BatchEvent::Clear));
batch_fn!(llama_batch_ext_add, REAL_BATCH_ADD, BatchAddFn, (seq_id: i32) -> i32, -1,
    |r| Some(BatchEvent::Added(r)));
batch_fn!(llama_batch_ext_add_token, REAL_BATCH_ADD_TOKEN, BatchAddTokenFn,
    (seq_id: i32, id: i32) -> i32, -1, |r| Some(BatchEvent::Added(r)));
batch_fn!(llama_batch_ext_add_embd, REAL_BATCH_ADD_EMBD, BatchAddEmbdFn,
    (seq_id: i32, embd: LlamaEmbd) -> i32, -1, |r| Some(BatchEvent::Added(r)));
batch_fn!(llama_batch_ext_set_pos, REAL_BATCH_SET_POS, BatchSetPosFn,
    (idx: i32, pos: *const i32) -> bool, false,
    // SAFETY: a successful call read at least one position from `pos`.
    |r| (r && !pos.is_null()).then(|| BatchEvent::Pos(idx, unsafe { *pos })));
batch_fn!(llama_batch_ext_set_output_logits, REAL_BATCH_SET_OUTPUT_LOGITS, BatchSetOutputFn,
    (idx: i32, value: bool) -> bool, false, |r| r.then_some(BatchEvent::Output(idx, value)));
batch_fn!(llama_batch_ext_set_output_embd, REAL_BATCH_SET_OUTPUT_EMBD, BatchSetOutputFn,
    (idx: i32, value: bool) -> bool, false, |r| r.then_some(BatchEvent::Output(idx, value)));

/// Interposes `llama_batch_ext_free`: forgets the batch's shadow, then frees it.
///
/// # Safety
/// Called by llama.cpp's callers with the same contract as the real function.
#[no_mangle]
pub unsafe extern "C" fn llama_batch_ext_free(batch: *mut c_void) {
    let _ = catch_unwind(|| capture::on_batch(batch, BatchEvent::Free));
    // SAFETY: BatchClearFn has the same signature as llama_batch_ext_free.
    if let Some(real) = unsafe { as_fn::<BatchClearFn>(&REAL_BATCH_FREE) } {
        // SAFETY: forwarding the caller's argument to the real function.
        unsafe { real(batch) }
    }
}

/// The residency hook's ABI version (`SPARK_MOE_HOOK_VERSION_SYMBOL`): the hooked scheduler
/// uses the provider only when this equals its own `SPARK_MOE_HOOK_ABI`.
#[no_mangle]
pub extern "C" fn spark_moe_hook_abi() -> u32 {
    spark_proto::hook::ABI
}

/// The residency provider (`SPARK_MOE_HOOK_SYMBOL`): 1 when every used expert of the request
/// has been written into its destination in stream order, 0 to let the stock path copy.
///
/// # Safety
/// Called by the hooked ggml scheduler with a request valid for the duration of the call.
#[no_mangle]
pub unsafe extern "C" fn spark_moe_provide_v1(req: *const spark_proto::hook::MoeRequestV1) -> i32 {
    // SAFETY: forwarded from the scheduler; provide() catches panics itself.
    i32::from(unsafe { provider::provide(req) })
}

/// The graph observer's ABI version (`SPARK_GRAPH_HOOK_VERSION_SYMBOL`): the hooked scheduler
/// calls the observer only when this equals its own `SPARK_GRAPH_HOOK_ABI`.
#[no_mangle]
pub extern "C" fn spark_graph_hook_abi() -> u32 {
    graph::ABI
}

/// The graph observer (`SPARK_GRAPH_HOOK_SYMBOL`): marks the tensors the tap reads in small
/// graphs before they are allocated, and reads them once after the graph (`graph.rs`).
///
/// # Safety
/// Called by the hooked ggml scheduler with an event valid for the duration of the call.
#[no_mangle]
pub unsafe extern "C" fn spark_graph_observe_v1(ev: *const graph::GraphEventV1) {
    let _ = catch_unwind(|| {
        // SAFETY: forwarded from the scheduler.
        let Some(ev) = (unsafe { graph::accepted(ev) }) else {
            return;
        };
        match ev.phase {
            // SAFETY: the graph is live during the event.
            graph::PREPARE => unsafe { capture::on_graph_prepare(ev.graph) },
            // SAFETY: as above; the scheduler is the one that computed the graph.
            graph::COMPUTED => unsafe { capture::on_graph_computed(ev.sched, ev.graph) },
            _ => {}
        }
    });
}
