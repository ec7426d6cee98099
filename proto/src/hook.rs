//! The MoE residency hook ABI, version 1: the Rust mirror of `proto/include/spark_moe_hook.h`,
//! which the patched ggml scheduler includes. The header is the normative text (contract,
//! rules for providers); this mirror lets a provider written in Rust (the tap, with CUDA)
//! implement it without restating the layout.

/// `SPARK_MOE_HOOK_ABI`: the version a provider must report.
pub const ABI: u32 = 1;
/// Symbol the scheduler looks up for the provider function.
pub const PROVIDE_SYMBOL: &str = "spark_moe_provide_v1";
/// Symbol the scheduler looks up for the provider's ABI version.
pub const ABI_SYMBOL: &str = "spark_moe_hook_abi";
/// Environment variable that switches the tap's provider on: slots per expert layer.
pub const ENV_RESIDENCY_SLOTS: &str = "SPARK_RESIDENCY_SLOTS";
/// Environment variable that, with no slots, makes the tap's provider a meter: it declines every
/// call (the stock copy runs) and counts the experts and bytes that copy moves (`streamed`,
/// `bytes_host`). `spark bench residency --bytes` measures the host-copy placement with it.
pub const ENV_RESIDENCY_METER: &str = "SPARK_RESIDENCY_METER";
/// Environment variable that sets how the provider admits experts in wide calls (prompt-sized
/// batches): `stream` (the default) streams one-off uses and admits only into free slots or
/// over a lower plan level; `admit` admits them like decode's (the rule before; benchmarks
/// compare the two).
pub const ENV_RESIDENCY_PREFILL: &str = "SPARK_RESIDENCY_PREFILL";
/// ggml's batch size from which an op on host-resident weights is offloaded to the GPU (32 by
/// default). At 1, decode's expert matrix products reach the MoE-offload copy, and the hook.
pub const ENV_OFFLOAD_MIN_BATCH: &str = "GGML_OP_OFFLOAD_MIN_BATCH";

/// `struct spark_moe_request_v1`. Pointers are opaque here (`ggml_backend`, `ggml_tensor`).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct MoeRequestV1 {
    pub abi: u32,
    pub reserved: u32,
    pub backend: *mut core::ffi::c_void,
    pub src: *const core::ffi::c_void,
    pub dst: *mut core::ffi::c_void,
    pub n_expert: i64,
    pub expert_size: usize,
    /// Bitset over experts: bit `id % 32` of word `id / 32`.
    pub used: *const u32,
}

const _: () = assert!(core::mem::size_of::<MoeRequestV1>() == 56);
const _: () = assert!(core::mem::align_of::<MoeRequestV1>() == 8);

impl MoeRequestV1 {
    /// Whether expert `id` is marked used.
    ///
    /// # Safety
    /// `used` must point to at least `ceil(n_expert / 32)` words, as the scheduler guarantees
    /// for the duration of the call, and `id < n_expert`.
    pub unsafe fn is_used(&self, id: usize) -> bool {
        // SAFETY: the caller guarantees the bitset covers `id`.
        let word = unsafe { *self.used.add(id / 32) };
        word & (1 << (id % 32)) != 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_and_mirror_name_the_same_symbols_and_version() {
        let header = include_str!("../include/spark_moe_hook.h");
        assert!(header.contains(&format!("#define SPARK_MOE_HOOK_ABI {ABI}u")));
        assert!(header.contains(&format!(
            "#define SPARK_MOE_HOOK_SYMBOL \"{PROVIDE_SYMBOL}\""
        )));
        assert!(header.contains(&format!(
            "#define SPARK_MOE_HOOK_VERSION_SYMBOL \"{ABI_SYMBOL}\""
        )));
        // Field order as in the header.
        let fields = [
            "uint32_t abi;",
            "uint32_t reserved;",
            "backend;",
            "src;",
            "dst;",
            "int64_t n_expert;",
            "size_t expert_size;",
            "used;",
        ];
        let mut at = 0;
        for f in fields {
            let p = header[at..]
                .find(f)
                .unwrap_or_else(|| panic!("{f} missing or out of order"));
            at += p + f.len();
        }
    }

    #[test]
    fn used_bits_read_as_the_scheduler_writes_them() {
        let bits = [0b1010_u32, 1 << 31];
        let req = MoeRequestV1 {
            abi: ABI,
            reserved: 0,
            backend: core::ptr::null_mut(),
            src: core::ptr::null(),
            dst: core::ptr::null_mut(),
            n_expert: 64,
            expert_size: 0,
            used: bits.as_ptr(),
        };
        // SAFETY: two words cover 64 experts.
        let used: Vec<usize> = (0..64).filter(|&i| unsafe { req.is_used(i) }).collect();
        assert_eq!(used, vec![1, 3, 63]);
    }
}
