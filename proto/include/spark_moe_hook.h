/*
 * spark MoE residency hook, ABI version 1.
 *
 * The contract between a patched ggml scheduler (scripts/patches/ggml-moe-residency-hook.patch)
 * and a residency provider preloaded into the same process (spark's tap). Written once here;
 * the Rust mirror is spark_proto::hook.
 *
 * Where: ggml_backend_sched_compute_splits, at the MoE-offload copy. An expert weight tensor
 * lives in host memory, the MUL_MAT_ID that reads it runs on another backend, and the scheduler
 * has read the routed ids into a bitset of used experts. Stock ggml then copies each used
 * expert from host memory into the split's copy of the weight (dst). With the hook, the
 * scheduler first asks the provider to fill exactly those experts of dst itself (for example
 * from a VRAM cache, device to device). The MUL_MAT_ID kernels are unchanged: dst holds the
 * same bytes at the same offsets either way, so outputs cannot change.
 *
 * Lookup: once per process, dlsym(RTLD_DEFAULT, SPARK_MOE_HOOK_SYMBOL) and
 * dlsym(RTLD_DEFAULT, SPARK_MOE_HOOK_VERSION_SYMBOL); the hook is used only when both exist and
 * the version function returns SPARK_MOE_HOOK_ABI. Otherwise the stock path runs.
 *
 * Provider rules: return 1 only when every expert marked in `used` has been written into dst
 * (at offset id * expert_size, expert_size bytes, plus the same trailing padding the stock
 * path copies) in stream order on `backend`, so that the MUL_MAT_ID enqueued next on `backend`
 * sees it. Return 0 to decline; the scheduler then copies as stock ggml does. Never keep
 * pointers to `req` after returning.
 */
#ifndef SPARK_MOE_HOOK_H
#define SPARK_MOE_HOOK_H

#include <stddef.h>
#include <stdint.h>

#define SPARK_MOE_HOOK_ABI 1u
#define SPARK_MOE_HOOK_SYMBOL "spark_moe_provide_v1"
#define SPARK_MOE_HOOK_VERSION_SYMBOL "spark_moe_hook_abi"

struct ggml_tensor;
struct ggml_backend;

struct spark_moe_request_v1 {
    uint32_t abi;                   /* SPARK_MOE_HOOK_ABI */
    uint32_t reserved;              /* 0 */
    struct ggml_backend * backend;  /* the backend that runs the MUL_MAT_ID (dst lives there) */
    const struct ggml_tensor * src; /* the host-resident expert weight [.., .., n_expert] */
    struct ggml_tensor * dst;       /* the split's copy of src on `backend` */
    int64_t n_expert;
    size_t expert_size;             /* bytes of one expert (src->nb[2]) */
    const uint32_t * used;          /* bitset over experts: bit (id % 32) of word id / 32 */
};

typedef int (*spark_moe_provide_v1_fn)(const struct spark_moe_request_v1 * req);
typedef uint32_t (*spark_moe_hook_abi_fn)(void);

#endif
