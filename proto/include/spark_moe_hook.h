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

/*
 * The graph observer, version 1 (same patch, same lookup rules, its own symbols).
 *
 * Where: the scheduler tells the observer twice about each graph. SPARK_GRAPH_PREPARE comes
 * before ggml_backend_sched_split_graph in ggml_backend_sched_reserve(_size) and
 * ggml_backend_sched_alloc_graph: the observer may set GGML_TENSOR_FLAG_OUTPUT on nodes it
 * will read, so that the allocator never reuses their memory within the graph (nothing else
 * about the graph may change). SPARK_GRAPH_COMPUTED comes after every split of the graph was
 * enqueued by ggml_backend_sched_graph_compute_async: the observer may read the nodes it
 * marked, with ggml_backend_tensor_get_async on the backend that computed each node
 * (ggml_backend_sched_get_tensor_backend) followed by one synchronisation, instead of the
 * synchronisation per read that an eval callback costs.
 *
 * Observer rules: never keep `ev` after returning; change nothing but output flags, and only
 * in PREPARE. Outputs never change: marking a node as an output changes only where it lives.
 */
#define SPARK_GRAPH_HOOK_ABI 1u
#define SPARK_GRAPH_HOOK_SYMBOL "spark_graph_observe_v1"
#define SPARK_GRAPH_HOOK_VERSION_SYMBOL "spark_graph_hook_abi"

#define SPARK_GRAPH_PREPARE 0u
#define SPARK_GRAPH_COMPUTED 1u

struct ggml_backend_sched;
struct ggml_cgraph;

struct spark_graph_event_v1 {
    uint32_t abi;                       /* SPARK_GRAPH_HOOK_ABI */
    uint32_t phase;                     /* SPARK_GRAPH_PREPARE or SPARK_GRAPH_COMPUTED */
    struct ggml_backend_sched * sched;  /* the scheduler (for ggml_backend_sched_get_tensor_backend) */
    struct ggml_cgraph * graph;         /* the caller's graph */
};

typedef void (*spark_graph_observe_v1_fn)(const struct spark_graph_event_v1 * ev);

#endif
