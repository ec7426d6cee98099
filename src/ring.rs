//! The supervisor's side of the shared-memory rings (routing records, hidden-state chunks).
//!
//! Owns the ring memory: creates it as an anonymous memory file (`memfd_create`, close-on-exec,
//! sealed against resizing), sizes and maps it, writes the header with the model geometry, and
//! hands the child its descriptor by inheritance ([`RingFile::fd`]). The memory has no name in
//! any filesystem at any moment, so nothing of it outlives the last process that maps it or
//! holds its descriptor, not even when spark is SIGKILLed before the tap has greeted. Reads
//! records through the `spark_proto::ring` consumer, which checks everything the producer
//! wrote. Never produces records (the tap does) and never blocks: a read returns what is there.

use std::fs::File;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};

use memmap2::MmapMut;
use spark_proto::ring::{
    self as proto_ring, Consumer, HiddenChunk, RingFault, RingGeometry, KIND_HIDDEN, KIND_ROUTING,
};
use spark_proto::trace::RoutingRecord;

/// A record type that travels through a ring, with the kind its header carries.
pub trait RingRecord: proto_ring::Record {
    const KIND: u32;
    const NAME: &'static str;
}

impl RingRecord for RoutingRecord {
    const KIND: u32 = KIND_ROUTING;
    const NAME: &'static str = "ring";
}

impl RingRecord for HiddenChunk {
    const KIND: u32 = KIND_HIDDEN;
    const NAME: &'static str = "hidden";
}

/// The routing ring.
pub type ShmRing = RingFile<RoutingRecord>;
/// The hidden-state ring.
pub type HiddenRing = RingFile<HiddenChunk>;

/// Default slots: 2^18 routing records (about 27 MiB).
pub const DEFAULT_CAPACITY: u64 = 1 << 18;

#[derive(Debug, thiserror::Error)]
pub enum RingError {
    #[error("create ring {name}: {source}")]
    Create {
        name: String,
        source: std::io::Error,
    },
    #[error("map ring {name}: {source}")]
    Map {
        name: String,
        source: std::io::Error,
    },
    #[error("set up ring {name}: {message}")]
    Layout { name: String, message: String },
}

/// A ring in an anonymous memory file owned by this process.
pub struct RingFile<T> {
    name: String,
    // Field order matters: the consumer points into the map, so it is dropped first.
    consumer: Consumer<T>,
    _map: MmapMut,
    /// The memory file; the child inherits it under the same number.
    fd: OwnedFd,
    /// A protocol error was reported already.
    warned: bool,
}

/// Creates an anonymous, close-on-exec memory file: memfd (sealable) where the kernel has it,
/// else an unnamed file in /dev/shm (O_TMPFILE, or created and unlinked at once).
fn anonymous_file(name: &str) -> std::io::Result<(File, bool)> {
    use nix::sys::memfd::{memfd_create, MemFdCreateFlag};
    let cname = std::ffi::CString::new(name).expect("ring names have no NUL");
    match memfd_create(
        &cname,
        MemFdCreateFlag::MFD_CLOEXEC | MemFdCreateFlag::MFD_ALLOW_SEALING,
    ) {
        Ok(fd) => Ok((File::from(fd), true)),
        Err(_) => Ok((tempfile::tempfile_in("/dev/shm")?, false)),
    }
}

impl<T: RingRecord> RingFile<T> {
    /// Creates a fresh ring of `capacity` records (a power of two).
    pub fn create(capacity: u64, geometry: RingGeometry) -> Result<RingFile<T>, RingError> {
        let name = format!("spark-{}", T::NAME);
        let layout = |message: String| RingError::Layout {
            name: name.clone(),
            message,
        };
        proto_ring::check_capacity(capacity).map_err(|e| layout(e.to_string()))?;
        let len = proto_ring::ring_bytes::<T>(capacity);
        let create = |source| RingError::Create {
            name: name.clone(),
            source,
        };
        let (file, sealable) = anonymous_file(&name).map_err(create)?;
        file.set_len(len).map_err(create)?;
        if sealable {
            // The size is final: no process (the child included) can shrink the file under
            // spark's mapping, which would turn reads into SIGBUS.
            use nix::fcntl::{fcntl, FcntlArg, SealFlag};
            fcntl(
                file.as_raw_fd(),
                FcntlArg::F_ADD_SEALS(
                    SealFlag::F_SEAL_SHRINK | SealFlag::F_SEAL_GROW | SealFlag::F_SEAL_SEAL,
                ),
            )
            .map_err(|e| create(e.into()))?;
        }
        // SAFETY: the file was just created by us, has no name, and cannot be resized (sealed);
        // only the child we hand its descriptor to maps it, and it follows the ring protocol.
        let mut map = unsafe { MmapMut::map_mut(&file) }.map_err(|source| RingError::Map {
            name: name.clone(),
            source,
        })?;
        let base = map.as_mut_ptr();
        // SAFETY: the map is page-aligned, `len` bytes long and not yet shared with anyone.
        unsafe {
            proto_ring::init_ring::<T>(
                base,
                map.len(),
                capacity,
                T::KIND,
                geometry,
                std::process::id(),
            )
        }
        .map_err(|e| layout(e.to_string()))?;
        // SAFETY: the map lives in the same struct and outlives the consumer (field order), and
        // this is the only consumer of this ring.
        let consumer = unsafe { Consumer::<T>::attach(base, map.len(), T::KIND) }
            .map_err(|e| layout(e.to_string()))?;
        Ok(RingFile {
            name,
            consumer,
            _map: map,
            fd: OwnedFd::from(file),
            warned: false,
        })
    }

    /// The memory file's descriptor (close-on-exec; the child inherits it when it is passed
    /// to `LlamaServer::start_inheriting`, and finds its number in `SPARK_RING_FD`).
    pub fn fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// A name for messages (`spark-ring`, `spark-hidden`); it names no file.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The consumer half.
    pub fn reader(&mut self) -> &mut Consumer<T> {
        &mut self.consumer
    }

    /// Moves up to `max` records into `out`; returns how many. A protocol error stops the
    /// ring (it is reported once on stderr and by [`RingFile::fault`]).
    pub fn drain_into(&mut self, out: &mut Vec<T>, max: usize) -> usize {
        let n = self.consumer.pop_into(out, max);
        self.warn_on_fault();
        n
    }

    fn warn_on_fault(&mut self) {
        if !self.warned {
            if let Some(f) = self.consumer.fault() {
                self.warned = true;
                tracing::warn!(
                    "{}: protocol error ({f}); no more records are read from it",
                    self.name
                );
            }
        }
    }

    /// The protocol error that stopped this ring, if any.
    pub fn fault(&self) -> Option<RingFault> {
        self.consumer.fault()
    }

    /// Records the producer dropped because the ring was full.
    pub fn dropped(&self) -> u64 {
        self.consumer.dropped()
    }

    /// Records the producer published.
    pub fn written(&self) -> u64 {
        self.consumer.written()
    }

    /// Records consumed so far.
    pub fn read_count(&self) -> u64 {
        self.consumer.read_count()
    }

    /// The producer side on this very mapping, for benches and tests in one process.
    ///
    /// # Safety
    /// At most one producer may exist per ring, and it must not outlive `self`.
    pub unsafe fn local_producer(&mut self) -> Result<proto_ring::Producer<T>, RingError> {
        let len = self._map.len();
        let base = self._map.as_mut_ptr();
        // SAFETY: forwarded from the caller: a single producer that does not outlive the map.
        unsafe { proto_ring::Producer::attach(base, len, T::KIND) }.map_err(|e| RingError::Layout {
            name: self.name.clone(),
            message: e.to_string(),
        })
    }
}

/// Removes ring files in `dir` left by spark processes that no longer run: rings used to be
/// named files in /dev/shm (`spark-ring-<pid>-…`), which a SIGKILLed supervisor of an older
/// version could leave behind. Rings of live processes are never touched. Returns the paths
/// removed.
pub fn remove_stale_rings(dir: &Path) -> Vec<PathBuf> {
    let mut removed = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return removed;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(rest) = name.to_str().and_then(|n| {
            n.strip_prefix("spark-ring-")
                .or_else(|| n.strip_prefix("spark-hidden-"))
        }) else {
            continue;
        };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<i32>().ok()) else {
            continue;
        };
        // Signal 0 checks existence; EPERM means it exists under another user.
        let alive = !matches!(
            nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None),
            Err(nix::errno::Errno::ESRCH)
        );
        if !alive && std::fs::remove_file(entry.path()).is_ok() {
            removed.push(entry.path());
        }
    }
    removed
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use spark_proto::trace::MAX_K;

    /// A record whose every field is derived from `seq`, so a torn record cannot pass `check`.
    fn record(seq: u64) -> RoutingRecord {
        let s = seq as u32;
        let mut r = RoutingRecord {
            request: s,
            token: s.wrapping_mul(2654435761),
            layer: (seq % 48) as u16,
            phase: (seq % 2) as u8,
            n_used: (seq % MAX_K as u64) as u8 + 1,
            ids: [0; MAX_K],
            weights: [0.0; MAX_K],
        };
        for i in 0..MAX_K {
            r.ids[i] = (s as u16).wrapping_add(i as u16 * 7);
            r.weights[i] = (s % 100_000) as f32 + i as f32;
        }
        r
    }

    #[test]
    fn ring_memory_has_no_name_is_close_on_exec_and_cannot_be_resized() {
        let before = shm_names();
        let mut ring = ShmRing::create(64, RingGeometry::default()).unwrap();
        let target = std::fs::read_link(format!("/proc/self/fd/{}", ring.fd())).unwrap();
        assert!(
            target.to_string_lossy().starts_with("/memfd:spark-ring"),
            "{}",
            target.display()
        );
        let created: Vec<_> = shm_names().difference(&before).cloned().collect();
        assert!(
            created.iter().all(|n| !n.starts_with("spark-")),
            "nothing named in /dev/shm: {created:?}"
        );
        // SAFETY: fd is open for the whole test; F_GETFD reads flags only.
        let fd_flags = unsafe { nix::libc::fcntl(ring.fd(), nix::libc::F_GETFD) };
        assert_ne!(fd_flags & nix::libc::FD_CLOEXEC, 0);
        let f = File::open(format!("/proc/self/fd/{}", ring.fd())).unwrap();
        assert_eq!(
            f.metadata().unwrap().len(),
            proto_ring::ring_bytes::<RoutingRecord>(64)
        );
        let rw = std::fs::OpenOptions::new()
            .write(true)
            .open(format!("/proc/self/fd/{}", ring.fd()))
            .unwrap();
        assert!(rw.set_len(0).is_err(), "sealed against shrinking");
        assert!(rw.set_len(1 << 30).is_err(), "sealed against growing");
        // SAFETY: the only producer; dropped before `ring`.
        let mut p = unsafe { ring.local_producer().unwrap() };
        assert!(p.push(&record(3)));
        let mut out = Vec::new();
        assert_eq!(ring.drain_into(&mut out, 10), 1);
        assert_eq!(out[0], record(3));
    }

    fn shm_names() -> std::collections::BTreeSet<String> {
        std::fs::read_dir("/dev/shm")
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default()
    }

    #[test]
    fn bad_capacity_is_an_error_and_leaves_no_file() {
        let err = ShmRing::create(100, RingGeometry::default())
            .err()
            .expect("capacity 100 is not a power of two");
        assert!(err.to_string().contains("power of two"), "{err}");
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(12))]
        /// A producer much faster than the consumer: records are dropped and counted, and every
        /// record read is whole, in order, and accounted for.
        #[test]
        fn fast_producer_drops_and_counts_but_never_tears(
            cap_log in 2u32..9,
            total in 1_000u64..40_000,
            batch in 1usize..64,
            pause_every in 1usize..16,
        ) {
            let cap = 1u64 << cap_log;
            let mut ring = ShmRing::create(cap, RingGeometry::default()).unwrap();
            // SAFETY: the only producer; joined before `ring` is dropped.
            let mut producer = unsafe { ring.local_producer().unwrap() };
            let mut seen = Vec::new();
            std::thread::scope(|s| {
                let h = s.spawn(move || {
                    let mut pushed = 0u64;
                    for seq in 0..total {
                        if producer.write(&record(seq)) {
                            pushed += 1;
                        }
                        if seq % 3 == 0 {
                            producer.publish();
                        }
                    }
                    producer.publish();
                    pushed
                });
                let mut buf = Vec::new();
                let mut rounds = 0usize;
                loop {
                    let finished = h.is_finished();
                    buf.clear();
                    let n = ring.drain_into(&mut buf, batch);
                    seen.extend(buf.iter().map(|r| (r.request, *r)));
                    rounds += 1;
                    if rounds % pause_every == 0 {
                        std::thread::yield_now();
                    }
                    if finished && n == 0 && ring.written() == ring.read_count() {
                        break;
                    }
                }
                let pushed = h.join().unwrap();
                assert_eq!(pushed, ring.written());
            });
            let mut last = None;
            for (seq, r) in &seen {
                prop_assert_eq!(*r, record(u64::from(*seq)));
                if let Some(l) = last {
                    prop_assert!(*seq > l, "out of order: {} after {}", seq, l);
                }
                last = Some(*seq);
            }
            prop_assert_eq!(seen.len() as u64 + ring.dropped(), total);
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]
        /// A hostile or corrupt producer: arbitrary cursor values and arbitrary bytes anywhere
        /// in the header and the records of a real ring mapping. Draining never panics, never
        /// returns more than the ring holds, and after a protocol error never reads again.
        #[test]
        fn arbitrary_header_and_record_bytes_never_break_the_consumer(
            cap_log in 0u32..6,
            pushed in 0u64..40,
            drained_first in 0usize..40,
            write in prop_oneof![any::<u64>(), 0u64..80, Just(u64::MAX), Just(0u64)],
            read in prop_oneof![any::<u64>(), 0u64..80],
            pokes in proptest::collection::vec((0usize..256, any::<u8>()), 0..12),
            record_pokes in proptest::collection::vec((any::<usize>(), any::<u8>()), 0..24),
            max in 0usize..100,
        ) {
            let cap = 1u64 << cap_log;
            let mut ring = ShmRing::create(cap, RingGeometry {
                n_layer: 48, n_expert: 64, n_expert_used: 8, n_embd: 0,
            }).unwrap();
            {
                // SAFETY: the only producer; dropped at the end of this block.
                let mut p = unsafe { ring.local_producer().unwrap() };
                for seq in 0..pushed {
                    p.push(&record(seq));
                }
            }
            let mut out = Vec::new();
            ring.drain_into(&mut out, drained_first);
            let base = ring._map.as_mut_ptr();
            let len = ring._map.len();
            // SAFETY: every offset is inside the mapping (header offsets < 256 <= len, record
            // offsets reduced modulo the record area); cursor offsets are 8-aligned.
            unsafe {
                std::ptr::write_volatile(base.add(proto_ring::WRITE_OFFSET) as *mut u64, write);
                std::ptr::write_volatile(base.add(proto_ring::READ_OFFSET) as *mut u64, read);
                for &(at, b) in &pokes {
                    std::ptr::write_volatile(base.add(at), b);
                }
                let body = len - proto_ring::RING_HEADER_SIZE;
                for &(at, b) in &record_pokes {
                    std::ptr::write_volatile(base.add(proto_ring::RING_HEADER_SIZE + at % body), b);
                }
            }
            let mut total = 0u64;
            for round in 0..4 {
                out.clear();
                let n = match round {
                    0 => ring.drain_into(&mut out, max),
                    1 => ring.reader().consume(max, |r| assert!(usize::from(r.n_used) <= MAX_K)),
                    2 => ring.reader().skip_all() as usize,
                    _ => ring.reader().available() as usize,
                };
                prop_assert!(n as u64 <= cap, "round {} returned {} from a ring of {}", round, n, cap);
                prop_assert_eq!(out.len(), if round == 0 { n } else { 0 });
                for r in &out {
                    prop_assert!(usize::from(r.n_used) <= MAX_K && r.phase <= 1 && r.layer < 48);
                }
                if round < 3 {
                    total += n as u64;
                }
            }
            prop_assert!(total <= 3 * cap);
            if let Some(f) = ring.fault() {
                prop_assert_eq!(ring.reader().protocol_errors(), 1);
                out.clear();
                prop_assert_eq!(ring.drain_into(&mut out, 1000), 0, "stopped after {}", f);
                prop_assert_eq!(ring.reader().skip_all(), 0);
            }
        }
    }
}
