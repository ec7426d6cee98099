//! The shared-memory ring: header layout and the single-producer / single-consumer algorithm.
//!
//! Why this file is over 800 lines: the byte layout and both halves of the SPSC algorithm
//! (with the consumer's checks) belong together, since the ordering argument spans producer and
//! consumer; about 220 lines are tests.
//!
//! Owns the bytes of the ring file (a [`RingHeader`] followed by `capacity` fixed-size records)
//! and the two halves that move records through it: [`Producer`] (used by the preloaded tap
//! inside llama-server) and [`Consumer`] (used by the supervisor). Both operate on memory that
//! someone else mapped; nothing here creates, maps or closes a file, and nothing here allocates
//! (except the records a consumer appends to its caller's vector).
//!
//! Layout (little-endian, offsets in bytes):
//!
//! ```text
//! 0     magic "SPKRING\0", version, header_size, record_size, record_kind, capacity,
//!       model geometry (n_layer, n_expert, n_expert_used, n_embd), creator pid
//! 128   write cursor (u64, producer-owned cache line) and dropped-record counter (u64)
//! 192   read cursor (u64, consumer-owned cache line)
//! 256   capacity × record_size bytes of records; record n lives in slot n mod capacity
//! ```
//!
//! Invariants: cursors count records since creation and never wrap (u64); `capacity` is a power
//! of two; the producer stores `write` with Release after writing a record and loads `read`
//! with Acquire before reusing a slot; the consumer mirrors that. The producer never overwrites
//! an unread record: when the ring is full it drops the new record and increments `dropped`,
//! so the engine never waits and a reader never sees a torn record.
//!
//! Neither side trusts the other's bytes. The consumer checks, on every read, that the write
//! cursor is neither behind its read cursor nor more than `capacity` ahead, that the header's
//! fixed fields still hold what it attached to, and that each record's own header fields are
//! in range ([`Record::is_sane`]); the first violation is a protocol error ([`RingFault`]): it
//! is counted, and the consumer reads nothing more from that ring. Slot indices are always
//! masked by the capacity it validated at attach, so no cursor value can move a read outside
//! the mapping. The producer treats a read cursor ahead of its write cursor as a full ring.

use std::marker::PhantomData;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering};

/// First eight bytes of a ring file.
pub const RING_MAGIC: [u8; 8] = *b"SPKRING\0";
/// Layout version written and accepted.
pub const RING_VERSION: u32 = 1;
/// Bytes before the first record.
pub const RING_HEADER_SIZE: usize = 256;
/// `RingHeader::record_kind` of a ring carrying `trace::RoutingRecord`s.
pub const KIND_ROUTING: u32 = 1;
/// `RingHeader::record_kind` of a ring carrying [`HiddenChunk`]s.
pub const KIND_HIDDEN: u32 = 2;
/// Floats of hidden state one [`HiddenChunk`] carries.
pub const HIDDEN_CHUNK_FLOATS: usize = 1016;

/// Environment variable holding the descriptor number of the hidden-state ring in the child
/// (absent: no capture). Inherited like [`ENV_RING_FD`].
pub const ENV_HIDDEN_RING_FD: &str = "SPARK_HIDDEN_RING_FD";

/// Up to [`HIDDEN_CHUNK_FLOATS`] values of one token's pre-gate hidden state at one layer.
/// A vector longer than one chunk spans consecutive chunks (`offset` counts floats).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct HiddenChunk {
    pub request: u32,
    /// Token position, as in `RoutingRecord::token`.
    pub token: u32,
    pub layer: u16,
    /// `RoutingRecord::phase` values.
    pub phase: u8,
    /// `control::HiddenTensor::code`: 0 `ffn_norm`, 1 `attn_norm`, 2 `router_input`.
    pub tensor: u8,
    /// Length of the whole vector (n_embd).
    pub n_embd: u32,
    /// Index of this chunk's first value in the vector.
    pub offset: u32,
    /// Valid values in `values`.
    pub len: u32,
    pub reserved: [u32; 2],
    pub values: [f32; HIDDEN_CHUNK_FLOATS],
}

const _: () = assert!(std::mem::size_of::<HiddenChunk>() == 4096);

/// First eight bytes of a hidden-state file (`spark trace record --hidden-every`).
pub const HIDDEN_FILE_MAGIC: [u8; 8] = *b"SPKHIDDN";
/// Version of the hidden-state file layout.
pub const HIDDEN_FILE_VERSION: u32 = 1;

/// Header of a hidden-state file: this header, then `count` [`HiddenChunk`]s, as they left the
/// ring. A file whose body is not exactly `count` whole chunks is truncated.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct HiddenFileHeader {
    pub magic: [u8; 8],
    pub version: u32,
    /// `size_of::<HiddenChunk>()`.
    pub chunk_size: u32,
    pub n_embd: u32,
    pub reserved: u32,
    pub count: u64,
}

const _: () = assert!(std::mem::size_of::<HiddenFileHeader>() == 32);

/// Largest capacity a header may claim (2^26 records, several GiB of routing records).
pub const MAX_CAPACITY: u64 = 1 << 26;

/// Environment variable holding the descriptor number of the routing ring in the child: an
/// anonymous memory file (memfd) the child inherits, already sized and initialised. The ring has
/// no name anywhere, so it cannot outlive the processes that hold it. The tap maps it and
/// closes the descriptor.
pub const ENV_RING_FD: &str = "SPARK_RING_FD";
/// Environment variable holding the child's end of the control socket (a file descriptor).
pub const ENV_CONTROL_FD: &str = "SPARK_CONTROL_FD";

/// Bytes of the header that never change after creation: magic, version, header_size,
/// record_size, record_kind, capacity.
pub const FIXED_HEADER_BYTES: usize = 32;
const _: () = assert!(std::mem::offset_of!(RingHeader, capacity) + 8 == FIXED_HEADER_BYTES);

/// Byte offset of the write cursor.
pub const WRITE_OFFSET: usize = 128;
/// Byte offset of the dropped-record counter.
pub const DROPPED_OFFSET: usize = 136;
/// Byte offset of the read cursor.
pub const READ_OFFSET: usize = 192;

/// The ring file header. The cursor fields are only touched atomically through [`Producer`] /
/// [`Consumer`]; the struct form exists to fix and document the layout.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct RingHeader {
    /// [`RING_MAGIC`].
    pub magic: [u8; 8],
    /// [`RING_VERSION`].
    pub version: u32,
    /// [`RING_HEADER_SIZE`].
    pub header_size: u32,
    /// Bytes per record.
    pub record_size: u32,
    /// What the records are ([`KIND_ROUTING`]).
    pub record_kind: u32,
    /// Record slots; a power of two.
    pub capacity: u64,
    /// Model geometry, as the creator read it from the GGUF file.
    pub n_layer: u32,
    pub n_expert: u32,
    pub n_expert_used: u32,
    pub n_embd: u32,
    /// Process id of the creator (the supervisor).
    pub creator_pid: u32,
    /// Zero.
    pub reserved0: u32,
    /// Zero.
    pub reserved1: [u64; 9],
    /// Records published by the producer since creation.
    pub write: u64,
    /// Records the producer dropped because the ring was full.
    pub dropped: u64,
    /// Zero.
    pub reserved2: [u64; 6],
    /// Records consumed since creation.
    pub read: u64,
    /// Zero.
    pub reserved3: [u64; 7],
}

const _: () = assert!(std::mem::size_of::<RingHeader>() == RING_HEADER_SIZE);
const _: () = assert!(std::mem::offset_of!(RingHeader, write) == WRITE_OFFSET);
const _: () = assert!(std::mem::offset_of!(RingHeader, dropped) == DROPPED_OFFSET);
const _: () = assert!(std::mem::offset_of!(RingHeader, read) == READ_OFFSET);

/// Model geometry carried in the header.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RingGeometry {
    pub n_layer: u32,
    pub n_expert: u32,
    pub n_expert_used: u32,
    pub n_embd: u32,
}

/// Why a memory region is not a usable ring.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RingError {
    /// Shorter than the header, or shorter than header + capacity × record size.
    TooSmall { len: usize, needed: u64 },
    /// Not a ring file.
    BadMagic,
    /// A layout version this build does not know.
    Version { found: u32 },
    /// A header size other than [`RING_HEADER_SIZE`].
    HeaderSize { found: u32 },
    /// The records are not the type the caller expects.
    RecordSize { found: u32, expected: u32 },
    /// The record kind is not the one the caller expects.
    RecordKind { found: u32, expected: u32 },
    /// Capacity zero, not a power of two, or above [`MAX_CAPACITY`].
    Capacity { found: u64 },
    /// The base address is not 8-byte aligned.
    Unaligned,
}

impl std::fmt::Display for RingError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RingError::TooSmall { len, needed } => {
                write!(f, "ring is {len} bytes, needs {needed}")
            }
            RingError::BadMagic => write!(f, "not a spark ring (bad magic)"),
            RingError::Version { found } => {
                write!(
                    f,
                    "ring version {found} is not supported (this build reads {RING_VERSION})"
                )
            }
            RingError::HeaderSize { found } => {
                write!(f, "ring header size {found}, expected {RING_HEADER_SIZE}")
            }
            RingError::RecordSize { found, expected } => {
                write!(f, "ring record size {found}, expected {expected}")
            }
            RingError::RecordKind { found, expected } => {
                write!(f, "ring record kind {found}, expected {expected}")
            }
            RingError::Capacity { found } => write!(
                f,
                "ring capacity {found} must be a power of two between 1 and {MAX_CAPACITY}"
            ),
            RingError::Unaligned => write!(f, "ring memory is not 8-byte aligned"),
        }
    }
}

impl std::error::Error for RingError {}

/// A record type a ring carries, and what a consumer checks of each record before handing it
/// out: the fields a reader indexes or slices by.
pub trait Record: bytemuck::Pod {
    /// Whether this record's header fields are in range for a ring of `geometry` (a zero
    /// geometry field means unknown and is not checked).
    fn is_sane(&self, geometry: &RingGeometry) -> bool;
}

impl Record for crate::trace::RoutingRecord {
    fn is_sane(&self, g: &RingGeometry) -> bool {
        usize::from(self.n_used) <= crate::trace::MAX_K
            && self.phase <= crate::trace::PHASE_DECODE
            && (g.n_layer == 0 || u32::from(self.layer) < g.n_layer)
    }
}

impl Record for HiddenChunk {
    fn is_sane(&self, g: &RingGeometry) -> bool {
        self.len as usize <= HIDDEN_CHUNK_FLOATS
            && self
                .offset
                .checked_add(self.len)
                .is_some_and(|end| end <= self.n_embd)
            && crate::control::HiddenTensor::from_code(self.tensor).is_some()
            && self.phase <= crate::trace::PHASE_DECODE
            && (g.n_layer == 0 || u32::from(self.layer) < g.n_layer)
    }
}

/// A protocol error the consumer found in a ring; after it, nothing more is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RingFault {
    /// The write cursor is behind what was already read.
    CursorBehind { write: u64, read: u64 },
    /// The write cursor claims more unread records than the ring holds.
    CursorAhead {
        write: u64,
        read: u64,
        capacity: u64,
    },
    /// A fixed header field (magic, version, sizes, kind, capacity) changed after attach.
    HeaderChanged,
    /// Record number `index` (since creation) has out-of-range header fields.
    BadRecord { index: u64 },
}

impl std::fmt::Display for RingFault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RingFault::CursorBehind { write, read } => {
                write!(f, "write cursor {write} is behind read cursor {read}")
            }
            RingFault::CursorAhead {
                write,
                read,
                capacity,
            } => write!(
                f,
                "write cursor {write} is more than capacity {capacity} ahead of read cursor {read}"
            ),
            RingFault::HeaderChanged => write!(f, "the ring header changed after attach"),
            RingFault::BadRecord { index } => {
                write!(f, "record {index} has out-of-range header fields")
            }
        }
    }
}

/// Bytes a ring of `capacity` records of `T` needs.
pub fn ring_bytes<T>(capacity: u64) -> u64 {
    RING_HEADER_SIZE as u64 + capacity * std::mem::size_of::<T>() as u64
}

/// Checks `capacity` is a power of two within bounds.
pub fn check_capacity(capacity: u64) -> Result<(), RingError> {
    if capacity == 0 || !capacity.is_power_of_two() || capacity > MAX_CAPACITY {
        return Err(RingError::Capacity { found: capacity });
    }
    Ok(())
}

/// A validated ring region: base pointer, capacity, record type, and the header as validated.
struct Region<T> {
    base: NonNull<u8>,
    mask: u64,
    header: RingHeader,
    _t: PhantomData<T>,
}

// SAFETY: a Region is a pointer into shared memory whose concurrent use is governed by the SPSC
// protocol (atomic cursors, slot ownership); T is Pod so it has no thread affinity.
unsafe impl<T: bytemuck::Pod> Send for Region<T> {}

impl<T: bytemuck::Pod> Region<T> {
    /// # Safety
    /// `base` must point to `len` bytes readable and writable for the Region's lifetime, shared
    /// only with processes that follow this module's protocol.
    unsafe fn validate(base: *mut u8, len: usize, kind: u32) -> Result<Region<T>, RingError> {
        let base = NonNull::new(base).ok_or(RingError::Unaligned)?;
        if !(base.as_ptr() as usize).is_multiple_of(8) {
            return Err(RingError::Unaligned);
        }
        if len < RING_HEADER_SIZE {
            return Err(RingError::TooSmall {
                len,
                needed: RING_HEADER_SIZE as u64,
            });
        }
        // SAFETY: the caller guarantees `len >= RING_HEADER_SIZE` readable bytes (checked above)
        // and the pointer is 8-aligned, enough for the header's u64 fields.
        let h: RingHeader = unsafe { std::ptr::read_volatile(base.as_ptr() as *const RingHeader) };
        if h.magic != RING_MAGIC {
            return Err(RingError::BadMagic);
        }
        if h.version != RING_VERSION {
            return Err(RingError::Version { found: h.version });
        }
        if h.header_size as usize != RING_HEADER_SIZE {
            return Err(RingError::HeaderSize {
                found: h.header_size,
            });
        }
        let rs = std::mem::size_of::<T>() as u32;
        if h.record_size != rs {
            return Err(RingError::RecordSize {
                found: h.record_size,
                expected: rs,
            });
        }
        if h.record_kind != kind {
            return Err(RingError::RecordKind {
                found: h.record_kind,
                expected: kind,
            });
        }
        check_capacity(h.capacity)?;
        let needed = ring_bytes::<T>(h.capacity);
        if (len as u64) < needed {
            return Err(RingError::TooSmall { len, needed });
        }
        Ok(Region {
            base,
            mask: h.capacity - 1,
            header: h,
            _t: PhantomData,
        })
    }

    /// Whether the header's fixed fields (magic through capacity, the first
    /// [`FIXED_HEADER_BYTES`] bytes) still hold what was validated at attach.
    fn header_unchanged(&self) -> bool {
        // SAFETY: the validated region holds at least RING_HEADER_SIZE > FIXED_HEADER_BYTES
        // bytes at base; a byte array has no alignment requirement and every bit pattern is
        // valid, and a volatile read tolerates another process writing these bytes (the value
        // may be torn, never invalid). The cursors, which are accessed atomically, are not read.
        let now: [u8; FIXED_HEADER_BYTES] = unsafe {
            std::ptr::read_volatile(self.base.as_ptr() as *const [u8; FIXED_HEADER_BYTES])
        };
        now[..] == bytemuck::bytes_of(&self.header)[..FIXED_HEADER_BYTES]
    }

    fn geometry(&self) -> RingGeometry {
        RingGeometry {
            n_layer: self.header.n_layer,
            n_expert: self.header.n_expert,
            n_expert_used: self.header.n_expert_used,
            n_embd: self.header.n_embd,
        }
    }

    fn cursor(&self, offset: usize) -> &AtomicU64 {
        // SAFETY: offset is one of the header's u64 cursor offsets, inside the validated region
        // and 8-aligned (base is 8-aligned); the memory lives as long as self; all accesses to
        // these words in every process are atomic.
        unsafe { AtomicU64::from_ptr(self.base.as_ptr().add(offset) as *mut u64) }
    }

    fn slot(&self, n: u64) -> *mut T {
        // Masked: whatever `n` is (a cursor from the other process included), i < capacity.
        let i = (n & self.mask) as usize;
        // SAFETY: i < capacity, and the validated region holds capacity records after the
        // header, so the offset stays inside the mapping.
        unsafe {
            self.base
                .as_ptr()
                .add(RING_HEADER_SIZE + i * std::mem::size_of::<T>()) as *mut T
        }
    }

    fn capacity(&self) -> u64 {
        self.mask + 1
    }
}

/// Writes a fresh header (cursors zero) into `base`.
///
/// # Safety
/// `base` must be 8-aligned and point to at least [`ring_bytes::<T>`]`(capacity)` writable bytes
/// that no other party uses yet.
pub unsafe fn init_ring<T: bytemuck::Pod>(
    base: *mut u8,
    len: usize,
    capacity: u64,
    kind: u32,
    geometry: RingGeometry,
    creator_pid: u32,
) -> Result<(), RingError> {
    check_capacity(capacity)?;
    let needed = ring_bytes::<T>(capacity);
    if (len as u64) < needed {
        return Err(RingError::TooSmall { len, needed });
    }
    if base.is_null() || !(base as usize).is_multiple_of(8) {
        return Err(RingError::Unaligned);
    }
    let h = RingHeader {
        magic: RING_MAGIC,
        version: RING_VERSION,
        header_size: RING_HEADER_SIZE as u32,
        record_size: std::mem::size_of::<T>() as u32,
        record_kind: kind,
        capacity,
        n_layer: geometry.n_layer,
        n_expert: geometry.n_expert,
        n_expert_used: geometry.n_expert_used,
        n_embd: geometry.n_embd,
        creator_pid,
        ..bytemuck::Zeroable::zeroed()
    };
    // SAFETY: the caller guarantees the region is writable, aligned and not yet shared.
    unsafe { std::ptr::write_volatile(base as *mut RingHeader, h) };
    std::sync::atomic::fence(Ordering::Release);
    Ok(())
}

/// Reads the header (cursors as plain values, for display).
///
/// # Safety
/// `base` must point to at least [`RING_HEADER_SIZE`] readable, 8-aligned bytes.
pub unsafe fn read_header(base: *const u8) -> RingHeader {
    // SAFETY: guaranteed by the caller.
    unsafe { std::ptr::read_volatile(base as *const RingHeader) }
}

/// The producing half. Exactly one may exist per ring, in one thread at a time.
pub struct Producer<T> {
    region: Region<T>,
    write: u64,
    read_cache: u64,
}

impl<T: bytemuck::Pod> Producer<T> {
    /// Attaches to an initialised ring.
    ///
    /// # Safety
    /// `base..base+len` must stay mapped, readable and writable while the producer lives, and no
    /// other producer may exist for this ring.
    pub unsafe fn attach(base: *mut u8, len: usize, kind: u32) -> Result<Producer<T>, RingError> {
        // SAFETY: forwarded from the caller.
        let region = unsafe { Region::<T>::validate(base, len, kind)? };
        let write = region.cursor(WRITE_OFFSET).load(Ordering::Relaxed);
        let read_cache = region.cursor(READ_OFFSET).load(Ordering::Acquire);
        Ok(Producer {
            region,
            write,
            read_cache,
        })
    }

    /// Slots the ring holds.
    pub fn capacity(&self) -> u64 {
        self.region.capacity()
    }

    /// Writes `rec` into the next free slot without publishing it; returns false (and counts a
    /// drop) if the ring is full. Call [`Producer::publish`] to make written records visible.
    #[inline]
    pub fn write(&mut self, rec: &T) -> bool {
        // A read cursor ahead of ours (a broken consumer) counts as a full ring.
        let used = |read: u64| self.write.checked_sub(read).unwrap_or(u64::MAX);
        if used(self.read_cache) >= self.region.capacity() {
            self.read_cache = self.region.cursor(READ_OFFSET).load(Ordering::Acquire);
            if used(self.read_cache) >= self.region.capacity() {
                self.region
                    .cursor(DROPPED_OFFSET)
                    .fetch_add(1, Ordering::Relaxed);
                return false;
            }
        }
        // SAFETY: slot `write` is free: the consumer has released every record below read_cache
        // (Acquire above) and write - read_cache < capacity, so no unread record lives there.
        unsafe { std::ptr::write_unaligned(self.region.slot(self.write), *rec) };
        self.write += 1;
        true
    }

    /// Makes every written record visible to the consumer.
    #[inline]
    pub fn publish(&mut self) {
        self.region
            .cursor(WRITE_OFFSET)
            .store(self.write, Ordering::Release);
    }

    /// [`Producer::write`] then [`Producer::publish`].
    #[inline]
    pub fn push(&mut self, rec: &T) -> bool {
        let ok = self.write(rec);
        self.publish();
        ok
    }

    /// Counts `n` records dropped for a reason other than a full ring (e.g. a tensor larger
    /// than the capture scratch).
    pub fn count_dropped(&mut self, n: u64) {
        self.region
            .cursor(DROPPED_OFFSET)
            .fetch_add(n, Ordering::Relaxed);
    }

    /// Records published so far and records dropped so far.
    pub fn counters(&self) -> (u64, u64) {
        (
            self.region.cursor(WRITE_OFFSET).load(Ordering::Relaxed),
            self.region.cursor(DROPPED_OFFSET).load(Ordering::Relaxed),
        )
    }
}

/// The consuming half. Exactly one may exist per ring.
pub struct Consumer<T> {
    region: Region<T>,
    read: u64,
    geometry: RingGeometry,
    fault: Option<RingFault>,
    protocol_errors: u64,
}

impl<T: Record> Consumer<T> {
    /// Attaches to an initialised ring.
    ///
    /// # Safety
    /// `base..base+len` must stay mapped and readable/writable while the consumer lives, and no
    /// other consumer may exist for this ring.
    pub unsafe fn attach(base: *mut u8, len: usize, kind: u32) -> Result<Consumer<T>, RingError> {
        // SAFETY: forwarded from the caller.
        let region = unsafe { Region::<T>::validate(base, len, kind)? };
        let read = region.cursor(READ_OFFSET).load(Ordering::Relaxed);
        let geometry = region.geometry();
        Ok(Consumer {
            region,
            read,
            geometry,
            fault: None,
            protocol_errors: 0,
        })
    }

    /// Slots the ring holds.
    pub fn capacity(&self) -> u64 {
        self.region.capacity()
    }

    /// Records the first protocol error: from now on nothing more is read.
    fn fail(&mut self, fault: RingFault) {
        if self.fault.is_none() {
            self.fault = Some(fault);
            self.protocol_errors += 1;
        }
    }

    /// The producer's write cursor, checked: the number of records published and not yet
    /// consumed, or None (after recording a fault) if the ring is broken.
    fn pending(&mut self) -> Option<(u64, u64)> {
        if self.fault.is_some() {
            return None;
        }
        let write = self.region.cursor(WRITE_OFFSET).load(Ordering::Acquire);
        let capacity = self.region.capacity();
        let Some(n) = write.checked_sub(self.read) else {
            self.fail(RingFault::CursorBehind {
                write,
                read: self.read,
            });
            return None;
        };
        if n > capacity {
            self.fail(RingFault::CursorAhead {
                write,
                read: self.read,
                capacity,
            });
            return None;
        }
        if !self.region.header_unchanged() {
            self.fail(RingFault::HeaderChanged);
            return None;
        }
        Some((write, n))
    }

    /// Copies record number `n`, if its header fields are sane.
    fn record(&self, n: u64) -> Option<T> {
        // SAFETY: slot() is always inside the mapping (masked index). Records in [read, write)
        // were fully written before the producer's Release store of `write`, which pending()'s
        // Acquire load observed, and the producer does not touch them until `read` is released.
        // A producer that breaks that rule can only give torn bytes, and every bit pattern is
        // a valid T (Pod); read_unaligned needs no alignment.
        let rec = unsafe { std::ptr::read_unaligned(self.region.slot(n)) };
        rec.is_sane(&self.geometry).then_some(rec)
    }

    /// Releases the records below `read` to the producer.
    fn release(&mut self) {
        self.region
            .cursor(READ_OFFSET)
            .store(self.read, Ordering::Release);
    }

    /// Records published but not yet consumed (0 once a protocol error was found; checking
    /// may find one).
    pub fn available(&mut self) -> u64 {
        self.pending().map_or(0, |(_, n)| n)
    }

    /// Moves up to `max` published records into `out` (appending); returns how many. Stops at
    /// the first protocol error (see [`Consumer::fault`]).
    pub fn pop_into(&mut self, out: &mut Vec<T>, max: usize) -> usize {
        self.consume(max, |r| out.push(*r))
    }

    /// Calls `f` on up to `max` published records, then releases them. Stops at the first
    /// protocol error (see [`Consumer::fault`]).
    pub fn consume(&mut self, max: usize, mut f: impl FnMut(&T)) -> usize {
        let Some((_, n)) = self.pending() else {
            return 0;
        };
        // n <= capacity <= MAX_CAPACITY, so this fits a usize.
        let n = n.min(max as u64);
        let mut done = 0u64;
        while done < n {
            let index = self.read + done;
            match self.record(index) {
                Some(rec) => f(&rec),
                None => {
                    self.fail(RingFault::BadRecord { index });
                    break;
                }
            }
            done += 1;
        }
        self.read += done;
        self.release();
        done as usize
    }

    /// Discards every published record; returns how many (0 on a protocol error).
    pub fn skip_all(&mut self) -> u64 {
        let Some((write, n)) = self.pending() else {
            return 0;
        };
        self.read = write;
        self.release();
        n
    }

    /// Records consumed so far.
    pub fn read_count(&self) -> u64 {
        self.read
    }

    /// Records the producer has dropped so far (as it says).
    pub fn dropped(&self) -> u64 {
        self.region.cursor(DROPPED_OFFSET).load(Ordering::Relaxed)
    }

    /// Records the producer has published so far (its write cursor, unchecked).
    pub fn written(&self) -> u64 {
        self.region.cursor(WRITE_OFFSET).load(Ordering::Acquire)
    }

    /// The protocol error that stopped this consumer, if any.
    pub fn fault(&self) -> Option<RingFault> {
        self.fault
    }

    /// Protocol errors found (0 or 1: the first one stops the consumer).
    pub fn protocol_errors(&self) -> u64 {
        self.protocol_errors
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[repr(C)]
    #[derive(Clone, Copy, Debug, PartialEq, bytemuck::Pod, bytemuck::Zeroable)]
    struct Rec {
        seq: u64,
        check: u64,
    }

    impl Record for Rec {
        fn is_sane(&self, _: &RingGeometry) -> bool {
            self.check == !self.seq
        }
    }

    #[repr(C)]
    #[derive(Clone, Copy, Debug, PartialEq, bytemuck::Pod, bytemuck::Zeroable)]
    struct Tiny([u8; 4]);

    impl Record for Tiny {
        fn is_sane(&self, _: &RingGeometry) -> bool {
            true
        }
    }

    fn region(cap: u64) -> Vec<u64> {
        vec![0u64; ring_bytes::<Rec>(cap) as usize / 8]
    }

    #[test]
    fn wraps_around_and_counts_drops() {
        let mut mem = region(4);
        let len = mem.len() * 8;
        let base = mem.as_mut_ptr() as *mut u8;
        // SAFETY: `mem` outlives producer and consumer and is 8-aligned.
        unsafe { init_ring::<Rec>(base, len, 4, 7, RingGeometry::default(), 1).unwrap() };
        // SAFETY: as above; one producer and one consumer.
        let mut p = unsafe { Producer::<Rec>::attach(base, len, 7).unwrap() };
        // SAFETY: as above.
        let mut c = unsafe { Consumer::<Rec>::attach(base, len, 7).unwrap() };
        let mut out = Vec::new();
        let mut seq = 0;
        for round in 0..5 {
            for _ in 0..6 {
                p.push(&Rec { seq, check: !seq });
                seq += 1;
            }
            out.clear();
            assert_eq!(c.pop_into(&mut out, 100), 4);
            let first = round * 6;
            assert_eq!(
                out.iter().map(|r| r.seq).collect::<Vec<_>>(),
                (first..first + 4).collect::<Vec<_>>()
            );
            assert!(out.iter().all(|r| r.check == !r.seq));
        }
        assert_eq!(c.dropped(), 10);
        assert_eq!(c.written(), 20);
    }

    #[test]
    fn rejects_bad_headers() {
        let mut mem = region(8);
        let len = mem.len() * 8;
        let base = mem.as_mut_ptr() as *mut u8;
        // SAFETY: `mem` is 8-aligned and outlives every use below.
        unsafe {
            assert!(matches!(
                Consumer::<Rec>::attach(base, len, 1),
                Err(RingError::BadMagic)
            ));
            init_ring::<Rec>(base, len, 8, 1, RingGeometry::default(), 1).unwrap();
            assert!(matches!(
                Consumer::<Rec>::attach(base, len, 2),
                Err(RingError::RecordKind { .. })
            ));
            assert!(matches!(
                Consumer::<Tiny>::attach(base, len, 1),
                Err(RingError::RecordSize { .. })
            ));
            assert!(matches!(
                Consumer::<Rec>::attach(base, len - 8, 1),
                Err(RingError::TooSmall { .. })
            ));
            assert!(matches!(
                init_ring::<Rec>(base, len, 6, 1, RingGeometry::default(), 1),
                Err(RingError::Capacity { found: 6 })
            ));
        }
    }

    /// A ring of 4 `Rec`s with `n` published records, and its consumer.
    fn published(mem: &mut [u64], n: u64) -> (*mut u8, usize, Consumer<Rec>) {
        let len = mem.len() * 8;
        let base = mem.as_mut_ptr() as *mut u8;
        // SAFETY: `mem` is 8-aligned and outlives every use in the calling test.
        unsafe { init_ring::<Rec>(base, len, 4, 7, RingGeometry::default(), 1).unwrap() };
        // SAFETY: as above; one producer and one consumer.
        let mut p = unsafe { Producer::<Rec>::attach(base, len, 7).unwrap() };
        for seq in 0..n {
            p.push(&Rec { seq, check: !seq });
        }
        // SAFETY: as above.
        let c = unsafe { Consumer::<Rec>::attach(base, len, 7).unwrap() };
        (base, len, c)
    }

    fn poke(base: *mut u8, offset: usize, value: u64) {
        // SAFETY: callers pass an offset inside the header of a live test region, 8-aligned.
        unsafe { std::ptr::write_volatile(base.add(offset) as *mut u64, value) };
    }

    #[test]
    fn a_write_cursor_behind_or_too_far_ahead_stops_the_consumer() {
        for (write, fault) in [
            (
                u64::MAX,
                RingFault::CursorAhead {
                    write: u64::MAX,
                    read: 2,
                    capacity: 4,
                },
            ),
            (
                7,
                RingFault::CursorAhead {
                    write: 7,
                    read: 2,
                    capacity: 4,
                },
            ),
            (1, RingFault::CursorBehind { write: 1, read: 2 }),
        ] {
            let mut mem = region(4);
            let (base, _, mut c) = published(&mut mem, 3);
            let mut out = Vec::new();
            assert_eq!(c.pop_into(&mut out, 2), 2);
            poke(base, WRITE_OFFSET, write);
            assert_eq!(c.pop_into(&mut out, 100), 0);
            assert_eq!(c.fault(), Some(fault));
            assert_eq!(c.protocol_errors(), 1);
            // Even once the cursor looks right again, nothing more is read.
            poke(base, WRITE_OFFSET, 3);
            assert_eq!(c.pop_into(&mut out, 100), 0);
            assert_eq!(c.skip_all(), 0);
            assert_eq!(c.available(), 0);
            assert_eq!(c.protocol_errors(), 1);
            assert_eq!(out.len(), 2);
        }
    }

    #[test]
    fn a_bad_record_or_a_changed_header_stops_the_consumer() {
        let mut mem = region(4);
        let (base, _, mut c) = published(&mut mem, 3);
        // Record 1's check field no longer matches.
        poke(base, RING_HEADER_SIZE + std::mem::size_of::<Rec>() + 8, 0);
        let mut out = Vec::new();
        assert_eq!(c.pop_into(&mut out, 100), 1, "the good record before it");
        assert_eq!(c.fault(), Some(RingFault::BadRecord { index: 1 }));
        assert_eq!(c.read_count(), 1);

        let mut mem = region(4);
        let (base, _, mut c) = published(&mut mem, 3);
        poke(base, 24, 1 << 20); // capacity
        assert_eq!(c.skip_all(), 0);
        assert_eq!(c.fault(), Some(RingFault::HeaderChanged));
    }

    #[test]
    fn a_read_cursor_ahead_of_the_producer_means_full() {
        let mut mem = region(4);
        let len = mem.len() * 8;
        let base = mem.as_mut_ptr() as *mut u8;
        // SAFETY: `mem` is 8-aligned and outlives the producer.
        unsafe { init_ring::<Rec>(base, len, 4, 7, RingGeometry::default(), 1).unwrap() };
        poke(base, READ_OFFSET, 1000);
        // SAFETY: as above; the only producer.
        let mut p = unsafe { Producer::<Rec>::attach(base, len, 7).unwrap() };
        assert!(!p.push(&Rec { seq: 0, check: !0 }));
        assert_eq!(p.counters(), (0, 1));
    }

    #[test]
    fn record_checks_follow_the_geometry() {
        use crate::trace::RoutingRecord;
        let g = RingGeometry {
            n_layer: 4,
            n_expert: 8,
            n_expert_used: 2,
            n_embd: 64,
        };
        let ok = RoutingRecord::new(0, 0, 3, 1, &[1, 2]);
        assert!(ok.is_sane(&g));
        assert!(!RoutingRecord { layer: 4, ..ok }.is_sane(&g));
        assert!(RoutingRecord { layer: 4, ..ok }.is_sane(&RingGeometry::default()));
        assert!(!RoutingRecord { n_used: 17, ..ok }.is_sane(&g));
        assert!(!RoutingRecord { phase: 2, ..ok }.is_sane(&g));
        let h = HiddenChunk {
            n_embd: 64,
            offset: 32,
            len: 32,
            ..bytemuck::Zeroable::zeroed()
        };
        assert!(h.is_sane(&g));
        assert!(!HiddenChunk { len: 33, ..h }.is_sane(&g));
        assert!(!HiddenChunk {
            offset: u32::MAX,
            ..h
        }
        .is_sane(&g));
        assert!(!HiddenChunk {
            n_embd: 2048,
            offset: 0,
            len: 1017,
            ..h
        }
        .is_sane(&RingGeometry::default()));
        assert!(HiddenChunk { tensor: 2, ..h }.is_sane(&g));
        assert!(!HiddenChunk { tensor: 3, ..h }.is_sane(&g));
    }
}
