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
/// Environment variable that switches the tap's provider on: slots per expert layer, one count
/// for every layer or a count per layer ([`SlotCounts`] says the format).
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
/// `off` switches the tap's graph observer off (on by default): the eval callback then reads
/// every graph's routing, as on a stock engine (`spark bench tap --callback` compares the two).
pub const ENV_GRAPH_READS: &str = "SPARK_GRAPH_READS";

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

/// The longest count or layer number `SPARK_RESIDENCY_SLOTS` accepts, in digits (a `u32`).
const MAX_DIGITS: usize = 9;

/// `SPARK_RESIDENCY_SLOTS`: slots per expert layer, one count for every layer (`N`, as before)
/// or a count per layer (`L:N,L:N,…`).
///
/// The per-layer form is strict: entries separated by single commas, each `L:N` with `L` the
/// model layer (`blk.L`) and `N` its slots, both plain decimal digits (no sign, no spaces, at
/// most 9 digits), layers strictly ascending (so none twice), at least one entry. A layer the
/// list does not name has 0 slots, and a layer with 0 slots is served by streaming every used
/// expert host → destination (counted like any streamed expert; no slot memory) — unlike `0`
/// alone, which turns the provider off. Surrounding whitespace of the whole value is ignored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SlotCounts {
    /// The same count in every expert layer (0: provider off).
    Uniform(u32),
    /// (layer, slots), layers strictly ascending; unnamed layers have 0.
    PerLayer(Vec<(u32, u32)>),
}

fn digits(s: &str, what: &str) -> Result<u32, String> {
    if s.is_empty() || s.len() > MAX_DIGITS || !s.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!(
            "{what} {s:?} is not a number of at most {MAX_DIGITS} digits"
        ));
    }
    s.parse()
        .map_err(|_| format!("{what} {s:?} is not a number"))
}

impl SlotCounts {
    /// Parses the variable's value (see the type's doc); the error says what is wrong.
    pub fn parse(value: &str) -> Result<SlotCounts, String> {
        let v = value.trim();
        if !v.contains(':') {
            return digits(v, "slot count").map(SlotCounts::Uniform);
        }
        let mut out: Vec<(u32, u32)> = Vec::new();
        for entry in v.split(',') {
            let (l, n) = entry
                .split_once(':')
                .ok_or_else(|| format!("entry {entry:?} is not LAYER:SLOTS"))?;
            let layer = digits(l, "layer")?;
            let slots = digits(n, "slot count")?;
            if let Some(&(prev, _)) = out.last() {
                if layer <= prev {
                    return Err(format!(
                        "layer {layer} after layer {prev}: layers must be strictly ascending"
                    ));
                }
            }
            out.push((layer, slots));
        }
        Ok(SlotCounts::PerLayer(out))
    }

    /// A count per layer from `(layer, slots)` pairs in any order (a later pair for the same
    /// layer wins); the per-layer form even when every count is equal.
    pub fn per_layer(pairs: impl IntoIterator<Item = (u32, u32)>) -> SlotCounts {
        let mut v: Vec<(u32, u32)> = pairs.into_iter().collect();
        v.sort_by_key(|p| p.0);
        let mut out: Vec<(u32, u32)> = Vec::with_capacity(v.len());
        for p in v {
            match out.last_mut() {
                Some(last) if last.0 == p.0 => *last = p,
                _ => out.push(p),
            }
        }
        SlotCounts::PerLayer(out)
    }

    /// The value to put in the environment; [`SlotCounts::parse`] reads it back unchanged.
    pub fn to_env(&self) -> String {
        match self {
            SlotCounts::Uniform(n) => n.to_string(),
            SlotCounts::PerLayer(v) => v
                .iter()
                .map(|(l, n)| format!("{l}:{n}"))
                .collect::<Vec<_>>()
                .join(","),
        }
    }

    /// Slots of model layer `layer`.
    pub fn of_layer(&self, layer: u32) -> u32 {
        match self {
            SlotCounts::Uniform(n) => *n,
            SlotCounts::PerLayer(v) => v
                .binary_search_by_key(&layer, |p| p.0)
                .map_or(0, |i| v[i].1),
        }
    }

    /// The largest count of any layer.
    pub fn max(&self) -> u32 {
        match self {
            SlotCounts::Uniform(n) => *n,
            SlotCounts::PerLayer(v) => v.iter().map(|p| p.1).max().unwrap_or(0),
        }
    }

    /// `0` alone: the provider is off.
    pub fn is_off(&self) -> bool {
        *self == SlotCounts::Uniform(0)
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

    #[test]
    fn slot_counts_read_one_number_or_a_strict_per_layer_list() {
        assert_eq!(SlotCounts::parse(" 12\n"), Ok(SlotCounts::Uniform(12)));
        assert_eq!(SlotCounts::parse("0"), Ok(SlotCounts::Uniform(0)));
        assert!(SlotCounts::parse("0").unwrap().is_off());
        let c = SlotCounts::parse("0:4,3:0,7:130").unwrap();
        assert_eq!(c, SlotCounts::PerLayer(vec![(0, 4), (3, 0), (7, 130)]));
        assert!(!c.is_off());
        assert_eq!(
            (c.of_layer(0), c.of_layer(3), c.of_layer(5), c.of_layer(7)),
            (4, 0, 0, 130)
        );
        assert_eq!(c.max(), 130);
        // The environment form reads back unchanged.
        assert_eq!(c.to_env(), "0:4,3:0,7:130");
        assert_eq!(SlotCounts::parse(&c.to_env()), Ok(c));
        assert_eq!(
            SlotCounts::per_layer([(5, 2), (1, 3), (5, 9)]),
            SlotCounts::PerLayer(vec![(1, 3), (5, 9)])
        );
        // Garbage is an error naming what is wrong, never a guess.
        for bad in [
            "",
            "x",
            "-1",
            "+3",
            "1.5",
            "4 ",
            "1:2,",
            ",1:2",
            "1:2,,3:4",
            "1:2, 3:4",
            "1:",
            ":2",
            "1:2:3",
            "a:2",
            "1:b",
            "3:1,2:1",
            "2:1,2:5",
            "1:-2",
            "1:+2",
            "1;2",
            "1:9999999999",
            "1=2",
        ] {
            let got = SlotCounts::parse(bad);
            if bad == "4 " {
                assert_eq!(
                    got,
                    Ok(SlotCounts::Uniform(4)),
                    "whitespace around the value"
                );
                continue;
            }
            assert!(got.is_err(), "{bad:?} parsed as {got:?}");
        }
        assert!(SlotCounts::parse("3:1,2:1")
            .unwrap_err()
            .contains("strictly ascending"));
    }
}
