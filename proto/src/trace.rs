//! The binary routing-trace layout: one [`TraceHeader`] followed by whole [`RoutingRecord`]s.
//!
//! Owns the bytes of a routing record (shared with the shared-memory ring, which carries the very
//! same record type) and of the trace file header. It validates a header and splits a byte buffer
//! into records; it never opens, reads or writes a file (the `spark` library's `trace` module
//! does), and it never guesses: a wrong magic, version, header size or record size, or a body
//! that is not a whole number of records, is an error, never a shorter dataset.
//!
//! File layout (all integers little-endian, as on every platform spark runs on):
//!
//! ```text
//! offset 0                 TraceHeader (header_size bytes, 144 in version 1)
//! offset header_size       record_count × RoutingRecord (record_size bytes each, 108)
//! ```

use std::fmt;

/// Most experts one token may use at one layer that a record can hold.
pub const MAX_K: usize = 16;

/// One token's routing at one MoE layer.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct RoutingRecord {
    /// Request sequence number (0 when unknown).
    pub request: u32,
    /// Token position in the request's sequence (prompt tokens first, then generated).
    pub token: u32,
    /// MoE layer index (block index).
    pub layer: u16,
    /// [`PHASE_PROMPT`] or [`PHASE_DECODE`].
    pub phase: u8,
    /// Valid entries in `ids` / `weights` (k).
    pub n_used: u8,
    /// Selected expert ids; entries past `n_used` are zero.
    pub ids: [u16; MAX_K],
    /// Router weights of the selected experts; zero when not recorded.
    pub weights: [f32; MAX_K],
}

const _: () = assert!(std::mem::size_of::<RoutingRecord>() == 108);
const _: () = assert!(std::mem::align_of::<RoutingRecord>() == 4);

/// `RoutingRecord::phase` of a prompt-processing (prefill) token.
pub const PHASE_PROMPT: u8 = 0;
/// `RoutingRecord::phase` of a generated (decode) token.
pub const PHASE_DECODE: u8 = 1;

impl RoutingRecord {
    /// A record for `ids` (at most [`MAX_K`]; extra ids are dropped by the caller's contract,
    /// so callers check the length first) with zero weights.
    pub fn new(request: u32, token: u32, layer: u16, phase: u8, ids: &[u16]) -> RoutingRecord {
        let n = ids.len().min(MAX_K);
        let mut r = RoutingRecord {
            request,
            token,
            layer,
            phase,
            n_used: n as u8,
            ids: [0; MAX_K],
            weights: [0.0; MAX_K],
        };
        r.ids[..n].copy_from_slice(&ids[..n]);
        r
    }

    /// The valid expert ids.
    pub fn used_ids(&self) -> &[u16] {
        &self.ids[..usize::from(self.n_used).min(MAX_K)]
    }

    /// The valid router weights.
    pub fn used_weights(&self) -> &[f32] {
        &self.weights[..usize::from(self.n_used).min(MAX_K)]
    }
}

/// First eight bytes of every trace file.
pub const TRACE_MAGIC: [u8; 8] = *b"SPKTRACE";
/// Layout version this crate reads and writes.
pub const TRACE_VERSION: u32 = 1;
/// Bytes of the model fingerprint field (a NUL-padded UTF-8 string).
pub const FINGERPRINT_LEN: usize = 96;
/// `TraceHeader::record_count` of a file whose writer did not finish: the count is then taken
/// from the file size, which must still be a whole number of records.
pub const COUNT_UNKNOWN: u64 = u64::MAX;

/// `TraceHeader::flags`: router weights are recorded.
pub const FLAG_WEIGHTS: u32 = 1 << 0;
/// `TraceHeader::flags`: ids within a record are sorted, so router rank order is lost.
pub const FLAG_IDS_SORTED: u32 = 1 << 1;
/// `TraceHeader::flags`: prompt-phase records are present.
pub const FLAG_HAS_PROMPT: u32 = 1 << 2;

/// The self-describing trace file header.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct TraceHeader {
    /// [`TRACE_MAGIC`].
    pub magic: [u8; 8],
    /// [`TRACE_VERSION`].
    pub version: u32,
    /// Size of this header in bytes; records start here.
    pub header_size: u32,
    /// Size of one record in bytes.
    pub record_size: u32,
    /// MoE layers of the model.
    pub n_layer: u32,
    /// Experts per MoE layer.
    pub n_expert: u32,
    /// Experts used per token (top-k).
    pub k: u32,
    /// `FLAG_*` bits.
    pub flags: u32,
    /// Zero.
    pub reserved: u32,
    /// Records in the file, or [`COUNT_UNKNOWN`].
    pub record_count: u64,
    /// Model fingerprint string, NUL-padded; all zero when unknown.
    pub fingerprint: [u8; FINGERPRINT_LEN],
}

/// Size of the version-1 header.
pub const HEADER_SIZE: usize = std::mem::size_of::<TraceHeader>();
/// Size of one record.
pub const RECORD_SIZE: usize = std::mem::size_of::<RoutingRecord>();

const _: () = assert!(HEADER_SIZE == 144);

/// Why a byte buffer is not a valid trace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TraceFormatError {
    /// Shorter than a header.
    TooShort { len: u64 },
    /// The first eight bytes are not [`TRACE_MAGIC`].
    BadMagic,
    /// A layout version this crate does not read.
    Version { found: u32 },
    /// The header claims a size other than [`HEADER_SIZE`].
    HeaderSize { found: u32 },
    /// The header claims a record size other than [`RECORD_SIZE`].
    RecordSize { found: u32 },
    /// Geometry fields out of range (k larger than [`MAX_K`] or the expert count, zero layers…).
    Geometry { n_layer: u32, n_expert: u32, k: u32 },
    /// The body is not a whole number of records, or shorter than the declared count.
    Truncated { body: u64, expected: u64 },
    /// The fingerprint string does not fit the field.
    FingerprintTooLong { len: usize },
    /// The geometry asks readers for per-(layer, expert) tables far larger than the file could
    /// justify (a header that does not belong to its records).
    Oversized {
        n_layer: u32,
        n_expert: u32,
        file_len: u64,
    },
}

/// Bytes of per-(layer, expert) tables (8 bytes a cell) a header may ask of a reader whatever
/// the file's size; beyond it, at most [`TABLE_PER_FILE_BYTE`] bytes per byte of the file.
/// Real models need far less: 61 layers × 384 experts is 187 KB.
pub const TABLE_FLOOR: u64 = 64 << 20;
/// Bytes of tables allowed per byte of file beyond [`TABLE_FLOOR`].
pub const TABLE_PER_FILE_BYTE: u64 = 64;

impl fmt::Display for TraceFormatError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TraceFormatError::TooShort { len } => write!(
                f,
                "read trace header: file has {len} bytes, a header needs {HEADER_SIZE}"
            ),
            TraceFormatError::BadMagic => {
                write!(f, "read trace header: not a spark trace (bad magic)")
            }
            TraceFormatError::Version { found } => write!(
                f,
                "read trace header: unsupported version {found} (this build reads {TRACE_VERSION})"
            ),
            TraceFormatError::HeaderSize { found } => write!(
                f,
                "read trace header: header size {found}, expected {HEADER_SIZE}"
            ),
            TraceFormatError::RecordSize { found } => write!(
                f,
                "read trace header: record size {found}, expected {RECORD_SIZE}"
            ),
            TraceFormatError::Geometry {
                n_layer,
                n_expert,
                k,
            } => write!(
                f,
                "read trace header: bad geometry n_layer={n_layer} n_expert={n_expert} k={k}"
            ),
            TraceFormatError::Truncated { body, expected } => write!(
                f,
                "read trace records: truncated ({body} bytes of records, expected {expected})"
            ),
            TraceFormatError::FingerprintTooLong { len } => write!(
                f,
                "write trace header: fingerprint of {len} bytes exceeds {FINGERPRINT_LEN}"
            ),
            TraceFormatError::Oversized {
                n_layer,
                n_expert,
                file_len,
            } => write!(
                f,
                "read trace header: {n_layer} layers × {n_expert} experts is far more than a file of {file_len} bytes can describe"
            ),
        }
    }
}

impl std::error::Error for TraceFormatError {}

impl TraceHeader {
    /// A version-1 header with an unknown record count and no fingerprint.
    pub fn new(n_layer: u32, n_expert: u32, k: u32, flags: u32) -> TraceHeader {
        TraceHeader {
            magic: TRACE_MAGIC,
            version: TRACE_VERSION,
            header_size: HEADER_SIZE as u32,
            record_size: RECORD_SIZE as u32,
            n_layer,
            n_expert,
            k,
            flags,
            reserved: 0,
            record_count: COUNT_UNKNOWN,
            fingerprint: [0; FINGERPRINT_LEN],
        }
    }

    /// Stores `fp` in the fingerprint field.
    pub fn set_fingerprint(&mut self, fp: &str) -> Result<(), TraceFormatError> {
        let b = fp.as_bytes();
        if b.len() > FINGERPRINT_LEN || b.contains(&0) {
            return Err(TraceFormatError::FingerprintTooLong { len: b.len() });
        }
        self.fingerprint = [0; FINGERPRINT_LEN];
        self.fingerprint[..b.len()].copy_from_slice(b);
        Ok(())
    }

    /// The fingerprint string, `None` when the field is empty or not UTF-8.
    pub fn fingerprint_str(&self) -> Option<&str> {
        let end = self
            .fingerprint
            .iter()
            .position(|&b| b == 0)
            .unwrap_or(FINGERPRINT_LEN);
        match std::str::from_utf8(&self.fingerprint[..end]) {
            Ok("") | Err(_) => None,
            Ok(s) => Some(s),
        }
    }

    /// Checks magic, version, sizes and geometry.
    pub fn validate(&self) -> Result<(), TraceFormatError> {
        if self.magic != TRACE_MAGIC {
            return Err(TraceFormatError::BadMagic);
        }
        if self.version != TRACE_VERSION {
            return Err(TraceFormatError::Version {
                found: self.version,
            });
        }
        if self.header_size as usize != HEADER_SIZE {
            return Err(TraceFormatError::HeaderSize {
                found: self.header_size,
            });
        }
        if self.record_size as usize != RECORD_SIZE {
            return Err(TraceFormatError::RecordSize {
                found: self.record_size,
            });
        }
        if self.n_layer == 0
            || self.n_layer > u32::from(u16::MAX) + 1
            || self.n_expert == 0
            || self.n_expert > u32::from(u16::MAX) + 1
            || self.k == 0
            || self.k as usize > MAX_K
            || self.k > self.n_expert
        {
            return Err(TraceFormatError::Geometry {
                n_layer: self.n_layer,
                n_expert: self.n_expert,
                k: self.k,
            });
        }
        Ok(())
    }

    /// Reads and validates the header at the start of `bytes`.
    pub fn parse(bytes: &[u8]) -> Result<TraceHeader, TraceFormatError> {
        if bytes.len() < HEADER_SIZE {
            return Err(TraceFormatError::TooShort {
                len: bytes.len() as u64,
            });
        }
        let h: TraceHeader = bytemuck::pod_read_unaligned(&bytes[..HEADER_SIZE]);
        if h.magic != TRACE_MAGIC {
            return Err(TraceFormatError::BadMagic);
        }
        h.validate()?;
        Ok(h)
    }

    /// Checks the sizes the geometry asks of a reader against the file's real length, before
    /// anything is allocated: per-(layer, expert) tables may take at most [`TABLE_FLOOR`] bytes,
    /// or [`TABLE_PER_FILE_BYTE`] per byte of a larger file.
    pub fn check_claims(&self, file_len: u64) -> Result<(), TraceFormatError> {
        let table = u64::from(self.n_layer) * u64::from(self.n_expert) * 8;
        if table > TABLE_FLOOR.max(file_len.saturating_mul(TABLE_PER_FILE_BYTE)) {
            return Err(TraceFormatError::Oversized {
                n_layer: self.n_layer,
                n_expert: self.n_expert,
                file_len,
            });
        }
        Ok(())
    }

    /// Number of records a file of `file_len` bytes holds under this header: the body must be a
    /// whole number of records and, when the count is known, exactly that many; the geometry
    /// must fit the file ([`TraceHeader::check_claims`]).
    pub fn records_in(&self, file_len: u64) -> Result<u64, TraceFormatError> {
        self.check_claims(file_len)?;
        let body = file_len.saturating_sub(HEADER_SIZE as u64);
        let rs = RECORD_SIZE as u64;
        if self.record_count == COUNT_UNKNOWN {
            if !body.is_multiple_of(rs) {
                return Err(TraceFormatError::Truncated {
                    body,
                    expected: body / rs * rs + rs,
                });
            }
            return Ok(body / rs);
        }
        let expected = self.record_count.saturating_mul(rs);
        if body != expected {
            return Err(TraceFormatError::Truncated { body, expected });
        }
        Ok(self.record_count)
    }
}

/// Splits a whole trace file image into its header and records.
pub fn decode(bytes: &[u8]) -> Result<(TraceHeader, Vec<RoutingRecord>), TraceFormatError> {
    let h = TraceHeader::parse(bytes)?;
    let n = h.records_in(bytes.len() as u64)? as usize;
    let records = bytes[HEADER_SIZE..HEADER_SIZE + n * RECORD_SIZE]
        .chunks_exact(RECORD_SIZE)
        .map(bytemuck::pod_read_unaligned::<RoutingRecord>)
        .collect();
    Ok((h, records))
}

/// The bytes of a whole trace file: `header` (its count set to `records.len()`) then `records`.
pub fn encode(header: &TraceHeader, records: &[RoutingRecord]) -> Vec<u8> {
    let mut h = *header;
    h.record_count = records.len() as u64;
    let mut out = Vec::with_capacity(HEADER_SIZE + records.len() * RECORD_SIZE);
    out.extend_from_slice(bytemuck::bytes_of(&h));
    out.extend_from_slice(bytemuck::cast_slice(records));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> (TraceHeader, Vec<RoutingRecord>) {
        let mut h = TraceHeader::new(2, 8, 2, FLAG_IDS_SORTED);
        h.set_fingerprint("gguf-123-abcdef").unwrap();
        let recs = vec![
            RoutingRecord::new(0, 0, 0, PHASE_DECODE, &[1, 5]),
            RoutingRecord::new(0, 0, 1, PHASE_DECODE, &[2, 7]),
        ];
        (h, recs)
    }

    #[test]
    fn round_trip() {
        let (h, recs) = sample();
        let bytes = encode(&h, &recs);
        assert_eq!(bytes.len(), HEADER_SIZE + 2 * RECORD_SIZE);
        let (h2, r2) = decode(&bytes).unwrap();
        assert_eq!(h2.record_count, 2);
        assert_eq!(h2.fingerprint_str(), Some("gguf-123-abcdef"));
        assert_eq!(r2, recs);
        assert_eq!(r2[1].used_ids(), &[2, 7]);
    }

    #[test]
    fn truncated_is_an_error() {
        let (h, recs) = sample();
        let bytes = encode(&h, &recs);
        for cut in [1, 50, RECORD_SIZE] {
            let e = decode(&bytes[..bytes.len() - cut]).unwrap_err();
            assert!(matches!(e, TraceFormatError::Truncated { .. }), "{e}");
        }
        // Unknown count: whole records are fine, a partial one is not.
        let mut h = h;
        h.record_count = COUNT_UNKNOWN;
        let mut raw = bytemuck::bytes_of(&h).to_vec();
        raw.extend_from_slice(bytemuck::cast_slice(&recs));
        assert_eq!(decode(&raw).unwrap().1.len(), 2);
        raw.pop();
        assert!(matches!(
            decode(&raw).unwrap_err(),
            TraceFormatError::Truncated { .. }
        ));
    }

    #[test]
    fn header_errors() {
        let (h, recs) = sample();
        let good = encode(&h, &recs);
        let mut b = good.clone();
        b[0] = b'X';
        assert_eq!(decode(&b).unwrap_err(), TraceFormatError::BadMagic);
        let mut bad = h;
        bad.version = 9;
        assert_eq!(
            decode(&encode(&bad, &recs)).unwrap_err(),
            TraceFormatError::Version { found: 9 }
        );
        let mut bad = h;
        bad.record_size = 100;
        assert_eq!(
            decode(&encode(&bad, &recs)).unwrap_err(),
            TraceFormatError::RecordSize { found: 100 }
        );
        let mut bad = h;
        bad.k = 17;
        assert!(matches!(
            decode(&encode(&bad, &recs)).unwrap_err(),
            TraceFormatError::Geometry { .. }
        ));
        assert!(matches!(
            decode(&good[..10]).unwrap_err(),
            TraceFormatError::TooShort { len: 10 }
        ));
    }

    #[test]
    fn fingerprint_field_limits() {
        let mut h = TraceHeader::new(1, 4, 1, 0);
        assert_eq!(h.fingerprint_str(), None);
        assert!(h.set_fingerprint(&"x".repeat(FINGERPRINT_LEN + 1)).is_err());
        h.set_fingerprint(&"y".repeat(FINGERPRINT_LEN)).unwrap();
        assert_eq!(h.fingerprint_str().unwrap().len(), FINGERPRINT_LEN);
    }
}
