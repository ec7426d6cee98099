//! The slice of llama.cpp's and ggml's C ABI the tap needs, and the symbol lookups.
//!
//! Owns the mirrored layouts (`llama_context_params` as an opaque blob with the two callback
//! offsets, `llama_batch`, `ggml_tensor`) and the function pointers found with `dlsym`. Every
//! size and offset here is checked against the pinned headers by this crate's unit test, which
//! compiles a C probe. Never calls into llama.cpp by itself; callers decide when.

use std::ffi::{c_char, c_void, CStr};
use std::sync::atomic::{AtomicPtr, Ordering};

/// `sizeof(struct llama_context_params)` in the pinned build.
pub const LLAMA_CONTEXT_PARAMS_SIZE: usize = 160;
/// `offsetof(struct llama_context_params, n_batch)`.
pub const N_BATCH_OFFSET: usize = 4;
/// `offsetof(struct llama_context_params, n_ubatch)`.
pub const N_UBATCH_OFFSET: usize = 8;
/// `offsetof(struct llama_context_params, cb_eval)`.
pub const CB_EVAL_OFFSET: usize = 88;
/// `offsetof(struct llama_context_params, cb_eval_user_data)`.
pub const CB_EVAL_USER_DATA_OFFSET: usize = 96;

/// `struct llama_context_params`, passed by value: only its size and alignment matter to the
/// calling convention, and the tap touches three fields by offset.
#[repr(C, align(8))]
#[derive(Clone, Copy)]
pub struct LlamaContextParams {
    pub bytes: [u8; LLAMA_CONTEXT_PARAMS_SIZE],
}

/// `ggml_backend_sched_eval_callback`.
pub type EvalCallback =
    unsafe extern "C" fn(t: *mut GgmlTensor, ask: bool, user_data: *mut c_void) -> bool;

impl LlamaContextParams {
    fn u32_at(&self, off: usize) -> u32 {
        let mut b = [0u8; 4];
        b.copy_from_slice(&self.bytes[off..off + 4]);
        u32::from_ne_bytes(b)
    }

    fn ptr_at(&self, off: usize) -> usize {
        let mut b = [0u8; 8];
        b.copy_from_slice(&self.bytes[off..off + 8]);
        usize::from_ne_bytes(b)
    }

    fn set_ptr_at(&mut self, off: usize, v: usize) {
        self.bytes[off..off + 8].copy_from_slice(&v.to_ne_bytes());
    }

    pub fn n_batch(&self) -> u32 {
        self.u32_at(N_BATCH_OFFSET)
    }

    pub fn n_ubatch(&self) -> u32 {
        self.u32_at(N_UBATCH_OFFSET)
    }

    /// The callback the caller installed, if any.
    pub fn cb_eval(&self) -> Option<EvalCallback> {
        let p = self.ptr_at(CB_EVAL_OFFSET);
        if p == 0 {
            None
        } else {
            // SAFETY: a non-null value in this field is a function pointer of exactly this type
            // (the header declares it so); usize and fn pointers have the same size here.
            Some(unsafe { std::mem::transmute::<usize, EvalCallback>(p) })
        }
    }

    pub fn cb_eval_user_data(&self) -> *mut c_void {
        self.ptr_at(CB_EVAL_USER_DATA_OFFSET) as *mut c_void
    }

    pub fn set_cb_eval(&mut self, cb: EvalCallback, user_data: *mut c_void) {
        self.set_ptr_at(CB_EVAL_OFFSET, cb as usize);
        self.set_ptr_at(CB_EVAL_USER_DATA_OFFSET, user_data as usize);
    }
}

/// `struct llama_batch`.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct LlamaBatch {
    pub n_tokens: i32,
    pub token: *mut i32,
    pub embd: *mut f32,
    pub pos: *mut i32,
    pub n_seq_id: *mut i32,
    pub seq_id: *mut *mut i32,
    pub logits: *mut i8,
}

pub const GGML_MAX_DIMS: usize = 4;
pub const GGML_MAX_SRC: usize = 10;
pub const GGML_MAX_NAME: usize = 64;
pub const GGML_TYPE_F32: i32 = 0;
pub const GGML_TYPE_I8: i32 = 24;
pub const GGML_TYPE_I32: i32 = 26;

/// `struct ggml_tensor`.
#[repr(C)]
pub struct GgmlTensor {
    pub type_: i32,
    pub buffer: *mut c_void,
    pub ne: [i64; GGML_MAX_DIMS],
    pub nb: [usize; GGML_MAX_DIMS],
    pub op: i32,
    pub op_params: [i32; 16],
    pub flags: i32,
    pub src: [*mut GgmlTensor; GGML_MAX_SRC],
    pub view_src: *mut GgmlTensor,
    pub view_offs: usize,
    pub data: *mut c_void,
    pub name: [c_char; GGML_MAX_NAME],
    pub extra: *mut c_void,
    pub padding: [c_char; 8],
}

pub const GGML_TENSOR_SIZE: usize = 336;
const _: () = assert!(std::mem::size_of::<GgmlTensor>() == GGML_TENSOR_SIZE);
const _: () = assert!(std::mem::size_of::<LlamaBatch>() == 56);
const _: () = assert!(std::mem::size_of::<LlamaContextParams>() == LLAMA_CONTEXT_PARAMS_SIZE);

/// `struct llama_embd` (passed by value to `llama_batch_ext_add_embd`).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct LlamaEmbd {
    pub data: *const f32,
    pub n_rows: usize,
    pub n_embd: usize,
}

/// `LLAMA_PROCESS_TYPE_DECODE`.
pub const LLAMA_PROCESS_TYPE_DECODE: i32 = 1;

pub type ProcessFn = unsafe extern "C" fn(*mut c_void, i32, *mut c_void) -> i32;
pub type BatchClearFn = unsafe extern "C" fn(*mut c_void);
pub type BatchAddFn = unsafe extern "C" fn(*mut c_void, i32) -> i32;
pub type BatchAddTokenFn = unsafe extern "C" fn(*mut c_void, i32, i32) -> i32;
pub type BatchAddEmbdFn = unsafe extern "C" fn(*mut c_void, i32, LlamaEmbd) -> i32;
pub type BatchSetPosFn = unsafe extern "C" fn(*mut c_void, i32, *const i32) -> bool;
pub type BatchSetOutputFn = unsafe extern "C" fn(*mut c_void, i32, bool) -> bool;

pub type InitFn = unsafe extern "C" fn(*mut c_void, LlamaContextParams) -> *mut c_void;
pub type DecodeFn = unsafe extern "C" fn(*mut c_void, LlamaBatch) -> i32;
pub type ModelI32Fn = unsafe extern "C" fn(*const c_void) -> i32;
pub type MetaStrFn = unsafe extern "C" fn(*const c_void, *const c_char, *mut c_char, usize) -> i32;
pub type BufferIsHostFn = unsafe extern "C" fn(*mut c_void) -> bool;
pub type TensorGetFn = unsafe extern "C" fn(*const GgmlTensor, *mut c_void, usize, usize);
pub type NbytesFn = unsafe extern "C" fn(*const GgmlTensor) -> usize;
/// `ggml_backend_tensor_get_async(backend, tensor, data, offset, size)`.
pub type TensorGetAsyncFn =
    unsafe extern "C" fn(*mut c_void, *const GgmlTensor, *mut c_void, usize, usize);
/// `ggml_backend_synchronize(backend)`.
pub type SynchronizeFn = unsafe extern "C" fn(*mut c_void);
/// `ggml_backend_sched_get_tensor_backend(sched, node)`.
pub type SchedTensorBackendFn = unsafe extern "C" fn(*mut c_void, *mut GgmlTensor) -> *mut c_void;
/// `ggml_graph_n_nodes(graph)`.
pub type GraphNNodesFn = unsafe extern "C" fn(*mut c_void) -> i32;
/// `ggml_graph_node(graph, i)`.
pub type GraphNodeFn = unsafe extern "C" fn(*mut c_void, i32) -> *mut GgmlTensor;
/// `ggml_backend_buft_alloc_buffer`.
pub type BuftAllocFn = unsafe extern "C" fn(*mut c_void, usize) -> *mut c_void;
/// `ggml_backend_buffer_get_base`.
pub type BufferBaseFn = unsafe extern "C" fn(*mut c_void) -> *mut c_void;
/// `ggml_backend_get_device` and `ggml_backend_dev_host_buffer_type`: pointer to pointer.
pub type PtrToPtrFn = unsafe extern "C" fn(*mut c_void) -> *mut c_void;

/// `GGML_TENSOR_FLAG_OUTPUT`: the allocator never reuses such a tensor's memory in its graph.
pub const GGML_TENSOR_FLAG_OUTPUT: i32 = 2;

/// A lazily resolved symbol.
pub struct Sym {
    name: &'static CStr,
    next: bool,
    ptr: AtomicPtr<c_void>,
}

impl Sym {
    /// A symbol from the next object after the tap (the function the tap wraps).
    pub const fn next(name: &'static CStr) -> Sym {
        Sym {
            name,
            next: true,
            ptr: AtomicPtr::new(std::ptr::null_mut()),
        }
    }

    /// A symbol from the process's global scope.
    pub const fn global(name: &'static CStr) -> Sym {
        Sym {
            name,
            next: false,
            ptr: AtomicPtr::new(std::ptr::null_mut()),
        }
    }

    /// The address, or null when the process has no such symbol.
    pub fn get(&self) -> *mut c_void {
        let p = self.ptr.load(Ordering::Acquire);
        if !p.is_null() {
            return p;
        }
        let handle = if self.next {
            libc::RTLD_NEXT
        } else {
            libc::RTLD_DEFAULT
        };
        // SAFETY: dlsym with a pseudo-handle and a NUL-terminated name has no preconditions.
        let p = unsafe { libc::dlsym(handle, self.name.as_ptr()) };
        self.ptr.store(p, Ordering::Release);
        p
    }
}

pub static REAL_INIT: Sym = Sym::next(c"llama_init_from_model");
pub static REAL_DECODE: Sym = Sym::next(c"llama_decode");
pub static REAL_PROCESS: Sym = Sym::next(c"llama_process");
pub static REAL_BATCH_CLEAR: Sym = Sym::next(c"llama_batch_ext_clear");
pub static REAL_BATCH_FREE: Sym = Sym::next(c"llama_batch_ext_free");
pub static REAL_BATCH_ADD: Sym = Sym::next(c"llama_batch_ext_add");
pub static REAL_BATCH_ADD_TOKEN: Sym = Sym::next(c"llama_batch_ext_add_token");
pub static REAL_BATCH_ADD_EMBD: Sym = Sym::next(c"llama_batch_ext_add_embd");
pub static REAL_BATCH_SET_POS: Sym = Sym::next(c"llama_batch_ext_set_pos");
pub static REAL_BATCH_SET_OUTPUT_LOGITS: Sym = Sym::next(c"llama_batch_ext_set_output_logits");
pub static REAL_BATCH_SET_OUTPUT_EMBD: Sym = Sym::next(c"llama_batch_ext_set_output_embd");
pub static MODEL_N_LAYER: Sym = Sym::global(c"llama_model_n_layer");
pub static MODEL_N_EMBD: Sym = Sym::global(c"llama_model_n_embd");
pub static MODEL_META_STR: Sym = Sym::global(c"llama_model_meta_val_str");
pub static BUFFER_IS_HOST: Sym = Sym::global(c"ggml_backend_buffer_is_host");
pub static TENSOR_GET: Sym = Sym::global(c"ggml_backend_tensor_get");
pub static NBYTES: Sym = Sym::global(c"ggml_nbytes");
pub static TENSOR_GET_ASYNC: Sym = Sym::global(c"ggml_backend_tensor_get_async");
pub static SYNCHRONIZE: Sym = Sym::global(c"ggml_backend_synchronize");
pub static SCHED_TENSOR_BACKEND: Sym = Sym::global(c"ggml_backend_sched_get_tensor_backend");
pub static GRAPH_N_NODES: Sym = Sym::global(c"ggml_graph_n_nodes");
pub static GRAPH_NODE: Sym = Sym::global(c"ggml_graph_node");
pub static BUFT_ALLOC: Sym = Sym::global(c"ggml_backend_buft_alloc_buffer");
pub static BUFFER_BASE: Sym = Sym::global(c"ggml_backend_buffer_get_base");
pub static GET_DEVICE: Sym = Sym::global(c"ggml_backend_get_device");
pub static DEV_HOST_BUFT: Sym = Sym::global(c"ggml_backend_dev_host_buffer_type");

/// Casts a resolved symbol to its function type.
///
/// # Safety
/// `F` must be the symbol's true C signature (a function pointer type).
pub unsafe fn as_fn<F: Copy>(sym: &Sym) -> Option<F> {
    let p = sym.get();
    if p.is_null() {
        return None;
    }
    debug_assert_eq!(std::mem::size_of::<F>(), std::mem::size_of::<*mut c_void>());
    // SAFETY: the caller names the right function type; p is a non-null code address.
    Some(unsafe { std::mem::transmute_copy::<*mut c_void, F>(&p) })
}

/// Allocates `len` bytes of the host buffer type of `backend`'s device — pinned (page-locked)
/// memory the device copies into directly, without a staging buffer — and returns its base.
/// `None` when the device has no host buffer type (the CPU) or the allocation fails. The buffer
/// lives as long as the process.
///
/// # Safety
/// `backend` must be a live ggml backend.
pub unsafe fn alloc_device_host(backend: *mut c_void, len: usize) -> Option<*mut u8> {
    // SAFETY: each type is the declared signature of that function in ggml-backend.h.
    let (get_device, host_buft, alloc, base) = unsafe {
        (
            as_fn::<PtrToPtrFn>(&GET_DEVICE)?,
            as_fn::<PtrToPtrFn>(&DEV_HOST_BUFT)?,
            as_fn::<BuftAllocFn>(&BUFT_ALLOC)?,
            as_fn::<BufferBaseFn>(&BUFFER_BASE)?,
        )
    };
    // SAFETY: backend is live; each result is checked before it is used.
    unsafe {
        let dev = get_device(backend);
        if dev.is_null() {
            return None;
        }
        let buft = host_buft(dev);
        if buft.is_null() {
            return None;
        }
        let buffer = alloc(buft, len);
        if buffer.is_null() {
            return None;
        }
        let p = base(buffer).cast::<u8>();
        (!p.is_null()).then_some(p)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;
    use std::process::Command;

    fn include_dir() -> Option<PathBuf> {
        if let Some(d) = std::env::var_os("SPARK_ENGINE_INCLUDE") {
            return Some(PathBuf::from(d));
        }
        let d = crate::cpu_engine_prefix().join("include");
        d.join("llama.h").exists().then_some(d)
    }

    /// Compiles a C probe against the pinned headers and compares every mirrored size and
    /// offset. Needs the engine build (scripts/build-engine) and a C compiler, as CI has.
    #[test]
    fn mirrored_layouts_match_the_pinned_headers() {
        let inc = include_dir().expect(
            "pinned llama.cpp headers not found; run scripts/build-engine or set SPARK_ENGINE_INCLUDE",
        );
        let dir = std::env::temp_dir().join(format!("spark-tap-probe-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let src = dir.join("probe.c");
        std::fs::write(
            &src,
            r#"#include <stdio.h>
#include <stddef.h>
#include "llama.h"
#include "ggml.h"
int main(void) {
  printf("%zu %zu %zu %zu %zu\n", sizeof(struct llama_context_params),
    offsetof(struct llama_context_params, n_batch), offsetof(struct llama_context_params, n_ubatch),
    offsetof(struct llama_context_params, cb_eval), offsetof(struct llama_context_params, cb_eval_user_data));
  printf("%zu %zu %zu %zu\n", sizeof(struct llama_batch), offsetof(struct llama_batch, pos),
    offsetof(struct llama_batch, logits), _Alignof(struct llama_context_params));
  printf("%zu %zu\n", sizeof(struct llama_embd), (size_t)LLAMA_PROCESS_TYPE_DECODE);
  printf("%zu %zu %zu %zu %zu %zu %zu %zu\n", sizeof(struct ggml_tensor), offsetof(struct ggml_tensor, buffer),
    offsetof(struct ggml_tensor, ne), offsetof(struct ggml_tensor, nb), offsetof(struct ggml_tensor, src),
    offsetof(struct ggml_tensor, data), offsetof(struct ggml_tensor, name), (size_t)GGML_TYPE_I32);
  printf("%zu\n", (size_t)GGML_TYPE_I8);
  return 0;
}
"#,
        )
        .unwrap();
        let exe = dir.join("probe");
        let cc = Command::new("cc")
            .arg("-I")
            .arg(&inc)
            .arg(&src)
            .arg("-o")
            .arg(&exe)
            .output()
            .expect("run cc");
        assert!(
            cc.status.success(),
            "{}",
            String::from_utf8_lossy(&cc.stderr)
        );
        let out = Command::new(&exe).output().unwrap();
        let _ = std::fs::remove_dir_all(&dir);
        let text = String::from_utf8(out.stdout).unwrap();
        let nums: Vec<usize> = text
            .split_whitespace()
            .map(|w| w.parse().unwrap())
            .collect();
        let t = std::mem::offset_of!(GgmlTensor, buffer);
        let expected = vec![
            LLAMA_CONTEXT_PARAMS_SIZE,
            N_BATCH_OFFSET,
            N_UBATCH_OFFSET,
            CB_EVAL_OFFSET,
            CB_EVAL_USER_DATA_OFFSET,
            std::mem::size_of::<LlamaBatch>(),
            std::mem::offset_of!(LlamaBatch, pos),
            std::mem::offset_of!(LlamaBatch, logits),
            std::mem::align_of::<LlamaContextParams>(),
            std::mem::size_of::<LlamaEmbd>(),
            LLAMA_PROCESS_TYPE_DECODE as usize,
            GGML_TENSOR_SIZE,
            t,
            std::mem::offset_of!(GgmlTensor, ne),
            std::mem::offset_of!(GgmlTensor, nb),
            std::mem::offset_of!(GgmlTensor, src),
            std::mem::offset_of!(GgmlTensor, data),
            std::mem::offset_of!(GgmlTensor, name),
            GGML_TYPE_I32 as usize,
            GGML_TYPE_I8 as usize,
        ];
        assert_eq!(nums, expected);
    }
}
