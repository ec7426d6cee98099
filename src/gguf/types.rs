//! ggml tensor element types: ids as stored in GGUF files and their block geometry.
//!
//! Sizes follow `ggml/src/ggml.c` (`type_traits`) of the pinned llama.cpp build. Ids that ggml
//! retired (4, 5, 31–33, 36–38) and ids past the table are reported as unknown, never guessed.

use serde::Serialize;

/// A ggml tensor type known to this build, with its block size (elements) and block bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub struct GgmlType {
    pub id: u32,
    pub name: &'static str,
    pub block_elems: u64,
    pub block_bytes: u64,
}

macro_rules! ggml_types {
    ($( $konst:ident = $id:expr, $name:expr, $blk:expr, $bytes:expr; )*) => {
        impl GgmlType {
            $( pub const $konst: GgmlType = GgmlType { id: $id, name: $name, block_elems: $blk, block_bytes: $bytes }; )*
            /// Every type this build knows, in id order.
            pub const ALL: &'static [GgmlType] = &[ $( GgmlType::$konst, )* ];
        }
    };
}

// id, name, elements per block, bytes per block
ggml_types! {
    F32 = 0, "f32", 1, 4;
    F16 = 1, "f16", 1, 2;
    Q4_0 = 2, "q4_0", 32, 18;
    Q4_1 = 3, "q4_1", 32, 20;
    Q5_0 = 6, "q5_0", 32, 22;
    Q5_1 = 7, "q5_1", 32, 24;
    Q8_0 = 8, "q8_0", 32, 34;
    Q8_1 = 9, "q8_1", 32, 36;
    Q2_K = 10, "q2_K", 256, 84;
    Q3_K = 11, "q3_K", 256, 110;
    Q4_K = 12, "q4_K", 256, 144;
    Q5_K = 13, "q5_K", 256, 176;
    Q6_K = 14, "q6_K", 256, 210;
    Q8_K = 15, "q8_K", 256, 292;
    IQ2_XXS = 16, "iq2_xxs", 256, 66;
    IQ2_XS = 17, "iq2_xs", 256, 74;
    IQ3_XXS = 18, "iq3_xxs", 256, 98;
    IQ1_S = 19, "iq1_s", 256, 50;
    IQ4_NL = 20, "iq4_nl", 32, 18;
    IQ3_S = 21, "iq3_s", 256, 110;
    IQ2_S = 22, "iq2_s", 256, 82;
    IQ4_XS = 23, "iq4_xs", 256, 136;
    I8 = 24, "i8", 1, 1;
    I16 = 25, "i16", 1, 2;
    I32 = 26, "i32", 1, 4;
    I64 = 27, "i64", 1, 8;
    F64 = 28, "f64", 1, 8;
    IQ1_M = 29, "iq1_m", 256, 56;
    BF16 = 30, "bf16", 1, 2;
    TQ1_0 = 34, "tq1_0", 256, 54;
    TQ2_0 = 35, "tq2_0", 256, 66;
    MXFP4 = 39, "mxfp4", 32, 17;
    NVFP4 = 40, "nvfp4", 64, 36;
    Q1_0 = 41, "q1_0", 128, 18;
    Q2_0 = 42, "q2_0", 64, 18;
}

impl GgmlType {
    /// The type with this GGUF id, or `None` for a retired or unknown id.
    pub fn from_id(id: u32) -> Option<GgmlType> {
        GgmlType::ALL.iter().copied().find(|t| t.id == id)
    }

    /// The type with this name (case-insensitive), as used on the command line.
    pub fn from_name(name: &str) -> Option<GgmlType> {
        GgmlType::ALL
            .iter()
            .copied()
            .find(|t| t.name.eq_ignore_ascii_case(name))
    }

    /// Bytes of a tensor with these dimensions, or `None` when the first dimension is not a
    /// whole number of blocks or the size overflows.
    pub fn tensor_bytes(&self, dims: &[u64]) -> Option<u64> {
        let (&ne0, rest) = dims.split_first()?;
        if ne0 % self.block_elems != 0 {
            return None;
        }
        let row = (ne0 / self.block_elems).checked_mul(self.block_bytes)?;
        rest.iter().try_fold(row, |acc, &d| acc.checked_mul(d))
    }

    /// Bytes per element, for types without blocks (and an average for blocked ones).
    pub fn bytes_per_elem(&self) -> f64 {
        self.block_bytes as f64 / self.block_elems as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_unique_and_round_trip() {
        for t in GgmlType::ALL {
            assert_eq!(GgmlType::from_id(t.id), Some(*t));
            assert_eq!(GgmlType::from_name(t.name), Some(*t));
        }
        for retired in [4, 5, 31, 32, 33, 36, 37, 38, 43, 1000] {
            assert_eq!(GgmlType::from_id(retired), None);
        }
    }

    #[test]
    fn tensor_bytes_follow_blocks() {
        assert_eq!(GgmlType::F32.tensor_bytes(&[3, 5]), Some(60));
        assert_eq!(GgmlType::Q8_0.tensor_bytes(&[64, 2]), Some(2 * 2 * 34));
        assert_eq!(
            GgmlType::Q4_K.tensor_bytes(&[512, 3, 4]),
            Some(2 * 144 * 12)
        );
        assert_eq!(GgmlType::Q8_0.tensor_bytes(&[33]), None, "partial block");
        assert_eq!(GgmlType::F32.tensor_bytes(&[u64::MAX, 2]), None, "overflow");
    }
}
