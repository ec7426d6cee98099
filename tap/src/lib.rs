//! `libspark_tap.so`: preloaded into stock llama-server, it captures MoE routing into spark's
//! shared-memory ring.
//!
//! Owns two interposed llama.cpp entry points and the eval callback:
//! - `llama_init_from_model` forwards to the real function after installing the tap's
//!   `cb_eval` (chaining any callback the caller had set), opens the ring named by `SPARK_RING`
//!   and starts the control thread on the socket in `SPARK_CONTROL_FD`;
//! - `llama_decode` remembers the batch's token positions and output flags (preallocated
//!   buffers) so every record can say which token it belongs to, then forwards;
//! - the callback asks the scheduler only for `ffn_moe_weights-<il>` (whose sources hold the
//!   selected expert ids) and, when switched on, the pre-gate hidden state; it answers "no" for
//!   every other tensor so the graph is not split elsewhere.
//!
//! Must never: block the engine (a full ring drops and counts), allocate on the capture path
//! (callback and decode wrapper), let a panic cross the C boundary (every exported function
//! catches it), or link an async runtime.

mod capture;
mod control;
mod ffi;

use std::ffi::c_void;
use std::panic::{catch_unwind, AssertUnwindSafe};

use ffi::{as_fn, DecodeFn, InitFn, LlamaBatch, LlamaContextParams, REAL_DECODE, REAL_INIT};

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
        control::warn("llama_init_from_model not found after the tap; is libllama loaded?");
        return std::ptr::null_mut();
    };
    let mut patched = params;
    let installed = catch_unwind(AssertUnwindSafe(|| {
        // SAFETY: model comes from llama.cpp's caller and is a live llama_model.
        unsafe { capture::on_context_params(model, &mut patched) }
    }))
    .unwrap_or(false);
    let params = if installed { patched } else { params };
    // SAFETY: forwarding the caller's arguments to the real function.
    unsafe { real(model, params) }
}

/// Interposes `llama_decode`: records the batch layout for the callback, then decodes.
///
/// # Safety
/// Called by llama.cpp's callers with the same contract as the real function.
#[no_mangle]
pub unsafe extern "C" fn llama_decode(ctx: *mut c_void, batch: LlamaBatch) -> i32 {
    // SAFETY: DecodeFn is the declared signature of llama_decode in llama.h.
    let Some(real) = (unsafe { as_fn::<DecodeFn>(&REAL_DECODE) }) else {
        control::warn("llama_decode not found after the tap; is libllama loaded?");
        return -1;
    };
    let _ = catch_unwind(AssertUnwindSafe(|| {
        // SAFETY: the batch is the caller's, valid for the duration of this call.
        unsafe { capture::on_decode(ctx, &batch) }
    }));
    // SAFETY: forwarding the caller's arguments to the real function.
    unsafe { real(ctx, batch) }
}
