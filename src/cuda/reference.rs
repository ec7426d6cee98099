//! CPU references of the kernels in `kernels/`: what the GPU must compute, bit for bit.
//!
//! Owns the definitions of the remap result and the range checksum. Pure functions: no I/O, no
//! allocation beyond the results.

/// What the remap kernel writes for a batch of routed expert ids.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Remap {
    /// The slot of each id, or -1 when it is not resident (or out of range).
    pub slots: Vec<i32>,
    /// 1 where the id is a miss.
    pub miss_flags: Vec<u8>,
    /// Positions of the misses, ascending (the GPU writes them in any order; sort to compare).
    pub misses: Vec<u32>,
}

/// Maps `ids` (n_tokens × k, row-major) through `table` (the slot of each expert, -1 = not
/// resident), as `kernels/remap.cu` does.
pub fn remap(ids: &[i32], table: &[i32]) -> Remap {
    let mut r = Remap {
        slots: Vec::with_capacity(ids.len()),
        miss_flags: Vec::with_capacity(ids.len()),
        misses: Vec::new(),
    };
    for (i, &e) in ids.iter().enumerate() {
        let s = usize::try_from(e)
            .ok()
            .and_then(|e| table.get(e).copied())
            .unwrap_or(-1);
        let s = if s < 0 { -1 } else { s };
        r.slots.push(s);
        r.miss_flags.push(u8::from(s < 0));
        if s < 0 {
            r.misses.push(i as u32);
        }
    }
    r
}

/// The checksum of `kernels/checksum.cu`: little-endian u64 words (the last zero-padded),
/// summed as `w_i * (2 i + 1)` wrapping mod 2^64. Order-sensitive, and cheap to compute in
/// parallel.
pub fn checksum(bytes: &[u8]) -> u64 {
    let mut acc = 0u64;
    for (i, chunk) in bytes.chunks(8).enumerate() {
        let mut w = [0u8; 8];
        w[..chunk.len()].copy_from_slice(chunk);
        let v = u64::from_le_bytes(w);
        acc = acc.wrapping_add(v.wrapping_mul(2 * i as u64 + 1));
    }
    acc
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remap_maps_resident_and_flags_misses() {
        let table = [3, -1, 0, -1];
        let r = remap(&[0, 1, 2, 3, 2, 0], &table);
        assert_eq!(r.slots, vec![3, -1, 0, -1, 0, 3]);
        assert_eq!(r.miss_flags, vec![0, 1, 0, 1, 0, 0]);
        assert_eq!(r.misses, vec![1, 3]);
    }

    #[test]
    fn remap_out_of_range_ids_are_misses() {
        let r = remap(&[-1, 7, 0], &[5]);
        assert_eq!(r.slots, vec![-1, -1, 5]);
        assert_eq!(r.misses, vec![0, 1]);
    }

    #[test]
    fn checksum_is_order_sensitive_and_pads_the_tail() {
        assert_eq!(checksum(&[]), 0);
        assert_eq!(checksum(&[1]), 1);
        // word 0 = 1, word 1 = 2: 1*1 + 2*3
        let mut b = [0u8; 16];
        b[0] = 1;
        b[8] = 2;
        assert_eq!(checksum(&b), 7);
        b[0] = 2;
        b[8] = 1;
        assert_eq!(checksum(&b), 5);
        // a short tail is zero-padded
        assert_eq!(checksum(&[0, 0, 0, 0, 0, 0, 0, 0, 1]), 3);
        assert_eq!(checksum(&[0xff; 8]), u64::MAX);
    }
}
