// Checksums of byte ranges of device memory, one block per range.
//
// The checksum of a range of len bytes: split it into little-endian u64 words (the last one
// zero-padded), then sum w_i * (2 * i + 1) over the words, wrapping mod 2^64. It depends on the
// order of the words and is computed identically on the CPU (src/cuda/reference.rs::checksum).
//
// base:    the device allocation
// offsets: n_ranges u64 byte offsets into base (any alignment)
// lens:    n_ranges u64 byte lengths
// out:     n_ranges u64 sums (zero them before the launch)
extern "C" __global__ void spark_checksum(const unsigned char *base,
                                          const unsigned long long *offsets,
                                          const unsigned long long *lens,
                                          unsigned long long *out) {
    const unsigned char *p = base + offsets[blockIdx.x];
    unsigned long long len = lens[blockIdx.x];
    unsigned long long words = (len + 7) / 8;
    unsigned long long acc = 0;
    for (unsigned long long w = threadIdx.x; w < words; w += blockDim.x) {
        unsigned long long v = 0;
        unsigned long long start = w * 8;
        for (int b = 0; b < 8; b++) {
            unsigned long long at = start + b;
            if (at < len) {
                v |= ((unsigned long long)p[at]) << (8 * b);
            }
        }
        acc += v * (2 * w + 1);
    }
    atomicAdd(&out[blockIdx.x], acc);
}
