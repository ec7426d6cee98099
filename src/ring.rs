//! The supervisor's side of the shared-memory rings (routing records, hidden-state chunks).
//!
//! Owns the ring file: creates it in `/dev/shm` with mode 0600 (never reusing an existing name),
//! sizes and maps it, writes the header with the model geometry, and unlinks it when the
//! [`ShmRing`] is dropped, so no file outlives spark. Reads records through the
//! `spark_proto::ring` consumer. Never produces records (the tap does) and never blocks: a
//! read returns what is there.

use std::fs::OpenOptions;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use memmap2::MmapMut;
use spark_proto::ring::{
    self as proto_ring, Consumer, HiddenChunk, RingGeometry, KIND_HIDDEN, KIND_ROUTING,
};
use spark_proto::trace::RoutingRecord;

/// A record type that travels through a ring, with the kind its header carries.
pub trait RingRecord: bytemuck::Pod {
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
    #[error("create ring {path}: {source}")]
    Create {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("map ring {path}: {source}")]
    Map {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("set up ring {path}: {message}")]
    Layout { path: PathBuf, message: String },
}

/// A ring in `/dev/shm`, owned by this process; the file is unlinked on drop.
pub struct RingFile<T> {
    path: PathBuf,
    /// The name is already gone (the mapping stays valid in both processes).
    unlinked: bool,
    // Field order matters: the consumer points into the map, so it is dropped first.
    consumer: Consumer<T>,
    _map: MmapMut,
}

static NEXT: AtomicU64 = AtomicU64::new(0);

impl<T: RingRecord> RingFile<T> {
    /// Creates a fresh ring of `capacity` records (a power of two) in `/dev/shm`.
    pub fn create(capacity: u64, geometry: RingGeometry) -> Result<RingFile<T>, RingError> {
        Self::create_in(Path::new("/dev/shm"), capacity, geometry)
    }

    /// Creates a fresh ring in `dir` (tests use /dev/shm too; this exists for platforms where
    /// shared memory lives elsewhere).
    pub fn create_in(
        dir: &Path,
        capacity: u64,
        geometry: RingGeometry,
    ) -> Result<RingFile<T>, RingError> {
        let path = dir.join(format!(
            "spark-{}-{}-{}-{:08x}",
            T::NAME,
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed),
            rand::random::<u32>()
        ));
        let layout = |message: String| RingError::Layout {
            path: path.clone(),
            message,
        };
        proto_ring::check_capacity(capacity).map_err(|e| layout(e.to_string()))?;
        let len = proto_ring::ring_bytes::<T>(capacity);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .map_err(|source| RingError::Create {
                path: path.clone(),
                source,
            })?;
        // From here on the file exists: remove it on every error path.
        let cleanup = |e: RingError| {
            let _ = std::fs::remove_file(&path);
            e
        };
        file.set_len(len).map_err(|source| {
            cleanup(RingError::Create {
                path: path.clone(),
                source,
            })
        })?;
        // SAFETY: the file was just created by us with create_new and mode 0600; only the child
        // we hand its name to maps it, and it follows the ring protocol (no truncation).
        let mut map = unsafe { MmapMut::map_mut(&file) }.map_err(|source| {
            cleanup(RingError::Map {
                path: path.clone(),
                source,
            })
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
        .map_err(|e| cleanup(layout(e.to_string())))?;
        // SAFETY: the map lives in the same struct and outlives the consumer (field order), and
        // this is the only consumer of this ring.
        let consumer = unsafe { Consumer::<T>::attach(base, map.len(), T::KIND) }
            .map_err(|e| cleanup(layout(e.to_string())))?;
        Ok(RingFile {
            path,
            unlinked: false,
            consumer,
            _map: map,
        })
    }

    /// The ring file's path (what the child gets in `SPARK_RING`).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Removes the file's name now. Call it once the child has mapped the ring (it has when
    /// its greeting arrives): from then on nothing can leave the file behind, not even a
    /// SIGKILL of this process. Idempotent.
    pub fn unlink(&mut self) -> std::io::Result<()> {
        if !self.unlinked {
            std::fs::remove_file(&self.path)?;
            self.unlinked = true;
        }
        Ok(())
    }

    /// The consumer half.
    pub fn reader(&mut self) -> &mut Consumer<T> {
        &mut self.consumer
    }

    /// Moves up to `max` records into `out`; returns how many.
    pub fn drain_into(&mut self, out: &mut Vec<T>, max: usize) -> usize {
        self.consumer.pop_into(out, max)
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
            path: self.path.clone(),
            message: e.to_string(),
        })
    }
}

impl<T> Drop for RingFile<T> {
    fn drop(&mut self) {
        if !self.unlinked {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Removes ring files in `dir` left by spark processes that no longer run (a SIGKILLed
/// supervisor cannot unlink its ring). Rings of live processes are never touched. Returns the
/// paths removed.
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
    use std::os::unix::fs::PermissionsExt;

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
    fn ring_file_is_private_and_unlinked_on_drop() {
        let ring = ShmRing::create(64, RingGeometry::default()).unwrap();
        let path = ring.path().to_path_buf();
        assert!(path.starts_with("/dev/shm"));
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(
            std::fs::metadata(&path).unwrap().len(),
            proto_ring::ring_bytes::<RoutingRecord>(64)
        );
        drop(ring);
        assert!(!path.exists());
    }

    #[test]
    fn an_unlinked_ring_keeps_working() {
        let mut ring = ShmRing::create(64, RingGeometry::default()).unwrap();
        // SAFETY: the only producer; dropped before `ring`.
        let mut p = unsafe { ring.local_producer().unwrap() };
        ring.unlink().unwrap();
        ring.unlink().unwrap();
        assert!(!ring.path().exists());
        assert!(p.push(&record(3)));
        let mut out = Vec::new();
        assert_eq!(ring.drain_into(&mut out, 10), 1);
        assert_eq!(out[0], record(3));
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
}
