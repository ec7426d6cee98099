// Maps a batch of routed expert ids through the device expert->slot table.
//
// ids:        n int32 expert ids (n_tokens * k, row-major)
// table:      n_expert int32, the slot of each expert or -1 when not resident
// slots:      n int32 out, the slot of each id or -1 (not resident or id out of range)
// miss_flags: n uint8 out, 1 where the id is not resident
// miss_count: one uint32, incremented per miss (zero it before the launch)
// miss_list:  n uint32 out, positions of the misses in arrival order (order is unspecified;
//             the first *miss_count entries are valid)
// CPU reference: src/cuda/reference.rs::remap.
extern "C" __global__ void spark_remap(const int *ids, const int *table, int n, int n_expert,
                                       int *slots, unsigned char *miss_flags,
                                       unsigned int *miss_count, unsigned int *miss_list) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) {
        return;
    }
    int e = ids[i];
    int s = (e >= 0 && e < n_expert) ? table[e] : -1;
    slots[i] = s;
    miss_flags[i] = s < 0 ? 1 : 0;
    if (s < 0) {
        unsigned int at = atomicAdd(miss_count, 1u);
        miss_list[at] = (unsigned int)i;
    }
}
