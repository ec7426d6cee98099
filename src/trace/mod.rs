//! Routing traces: the in-memory model, the binary file on top of `spark_proto::trace`, and the
//! JSONL / CSV text formats.
//!
//! Owns reading and writing trace files (every write atomic) and the [`Trace`] model that the
//! simulator consumes: decode steps × layers × up to k expert ids, with prompt-processing records
//! kept apart. It never interprets routing (no statistics, no cache decisions) and never accepts a
//! damaged file as a shorter dataset: truncation, bad ids and malformed lines are errors that name
//! the file and the place.

pub mod cli;
pub mod record;
mod text;

use std::collections::HashMap;
use std::fs;
use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use spark_proto::trace::{
    self as wire, RoutingRecord, TraceFormatError, TraceHeader, FLAG_HAS_PROMPT, FLAG_IDS_SORTED,
    FLAG_WEIGHTS, MAX_K, PHASE_DECODE, PHASE_PROMPT,
};

use crate::atomic_file::AtomicFile;

pub use text::{read_csv, read_jsonl, write_csv, write_jsonl};

/// Why a trace could not be read, converted or written.
#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    #[error("read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("read {path}: {source}")]
    Format {
        path: PathBuf,
        source: TraceFormatError,
    },
    #[error("parse {path} line {line}: {msg}")]
    Parse {
        path: PathBuf,
        line: usize,
        msg: String,
    },
    #[error("read {path}: {msg}")]
    Invalid { path: PathBuf, msg: String },
    #[error(
        "read {path}: unknown trace format (name it .trace, .jsonl or .csv, or pass --from/--to)"
    )]
    UnknownFormat { path: PathBuf },
}

/// The file formats a trace can be stored in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// spark's binary trace (`.trace`, `.bin`)
    Binary,
    /// one decode step per line: `{"tok": n, "layers": [[ids…], …]}` (`.jsonl`, `.json`)
    Jsonl,
    /// `layer_id,expert_ids` rows, ids space-separated (`.csv`)
    Csv,
}

impl Format {
    /// The format a path's extension names.
    pub fn from_path(path: &Path) -> Option<Format> {
        let ext = path.extension()?.to_str()?.to_ascii_lowercase();
        match ext.as_str() {
            "trace" | "bin" | "sptrace" => Some(Format::Binary),
            "jsonl" | "json" | "ndjson" => Some(Format::Jsonl),
            "csv" => Some(Format::Csv),
            _ => None,
        }
    }

    /// The format to use for `path`: `explicit` if given, else the extension's.
    pub fn resolve(explicit: Option<Format>, path: &Path) -> Result<Format, TraceError> {
        explicit
            .or_else(|| Format::from_path(path))
            .ok_or_else(|| TraceError::UnknownFormat {
                path: path.to_path_buf(),
            })
    }

    pub fn name(self) -> &'static str {
        match self {
            Format::Binary => "binary",
            Format::Jsonl => "jsonl",
            Format::Csv => "csv",
        }
    }
}

/// A sequence of tokens (steps), each with the expert ids it used at every layer.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Routing {
    n_layer: usize,
    /// `offsets[s * n_layer + l] .. offsets[s * n_layer + l + 1]` index `ids` and `weights`.
    offsets: Vec<u32>,
    ids: Vec<u16>,
    weights: Vec<f32>,
    /// (request, token position) of each step.
    tokens: Vec<(u32, u32)>,
}

impl Routing {
    pub fn new(n_layer: usize) -> Routing {
        Routing {
            n_layer,
            offsets: vec![0],
            ..Routing::default()
        }
    }

    pub fn n_layer(&self) -> usize {
        self.n_layer
    }

    /// Number of steps (tokens).
    pub fn steps(&self) -> usize {
        self.tokens.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    /// The expert ids step `s` used at layer `l` (empty when not recorded).
    pub fn ids(&self, s: usize, l: usize) -> &[u16] {
        let i = s * self.n_layer + l;
        &self.ids[self.offsets[i] as usize..self.offsets[i + 1] as usize]
    }

    /// The router weights of [`Routing::ids`] (zeros when not recorded).
    pub fn weights(&self, s: usize, l: usize) -> &[f32] {
        let i = s * self.n_layer + l;
        &self.weights[self.offsets[i] as usize..self.offsets[i + 1] as usize]
    }

    /// (request, token position) of step `s`.
    pub fn token(&self, s: usize) -> (u32, u32) {
        self.tokens[s]
    }

    /// Total expert lookups (sum of ids over every step and layer).
    pub fn lookups(&self) -> u64 {
        self.ids.len() as u64
    }

    /// Appends one step; `layers` yields (ids, weights) for layers 0.. in order (missing trailing
    /// layers are empty; weights may be empty).
    pub fn push_step<'a>(
        &mut self,
        request: u32,
        token: u32,
        layers: impl IntoIterator<Item = (&'a [u16], &'a [f32])>,
    ) {
        let mut n = 0;
        for (ids, w) in layers.into_iter().take(self.n_layer) {
            self.ids.extend_from_slice(ids);
            if w.len() == ids.len() {
                self.weights.extend_from_slice(w);
            } else {
                self.weights.extend(std::iter::repeat(0.0).take(ids.len()));
            }
            self.offsets.push(self.ids.len() as u32);
            n += 1;
        }
        for _ in n..self.n_layer {
            self.offsets.push(self.ids.len() as u32);
        }
        self.tokens.push((request, token));
    }

    /// A copy holding only steps `range`.
    pub fn slice(&self, range: std::ops::Range<usize>) -> Routing {
        let mut r = Routing::new(self.n_layer);
        for s in range {
            let (req, tok) = self.token(s);
            r.push_step(
                req,
                tok,
                (0..self.n_layer).map(|l| (self.ids(s, l), self.weights(s, l))),
            );
        }
        r
    }
}

/// A routing trace: model geometry, decode steps and (apart) prompt-processing steps.
#[derive(Debug, Clone, PartialEq)]
pub struct Trace {
    pub n_layer: u32,
    pub n_expert: u32,
    /// Experts per token (the largest count any record holds).
    pub k: u32,
    pub fingerprint: Option<String>,
    /// Ids within a layer are sorted: router rank order is not known.
    pub ids_sorted: bool,
    /// Router weights were recorded.
    pub has_weights: bool,
    pub decode: Routing,
    pub prompt: Routing,
}

impl Trace {
    /// Reads `path` in `format` (or the format its extension names).
    pub fn read(path: &Path, format: Option<Format>) -> Result<Trace, TraceError> {
        match Format::resolve(format, path)? {
            Format::Binary => read_binary(path),
            Format::Jsonl => read_jsonl(path),
            Format::Csv => read_csv(path),
        }
    }

    /// Writes the trace to `path` in `format` (or the format its extension names), atomically.
    pub fn write(&self, path: &Path, format: Option<Format>) -> Result<(), TraceError> {
        match Format::resolve(format, path)? {
            Format::Binary => write_binary(self, path),
            Format::Jsonl => write_jsonl(self, path),
            Format::Csv => write_csv(self, path),
        }
    }

    /// The binary header describing this trace.
    pub fn header(&self) -> TraceHeader {
        let mut flags = 0;
        if self.has_weights {
            flags |= FLAG_WEIGHTS;
        }
        if self.ids_sorted {
            flags |= FLAG_IDS_SORTED;
        }
        if !self.prompt.is_empty() {
            flags |= FLAG_HAS_PROMPT;
        }
        let mut h = TraceHeader::new(self.n_layer, self.n_expert, self.k.max(1), flags);
        if let Some(fp) = &self.fingerprint {
            // A fingerprint too long for the field is dropped rather than failing a conversion.
            let _ = h.set_fingerprint(fp);
        }
        h
    }

    /// Every step as binary records: prompt steps first, then decode steps.
    pub fn records(&self) -> Vec<RoutingRecord> {
        let mut out =
            Vec::with_capacity((self.prompt.steps() + self.decode.steps()) * self.n_layer as usize);
        for (routing, phase) in [(&self.prompt, PHASE_PROMPT), (&self.decode, PHASE_DECODE)] {
            for s in 0..routing.steps() {
                let (req, tok) = routing.token(s);
                for l in 0..routing.n_layer() {
                    let mut r = RoutingRecord::new(req, tok, l as u16, phase, routing.ids(s, l));
                    let w = routing.weights(s, l);
                    r.weights[..w.len()].copy_from_slice(w);
                    out.push(r);
                }
            }
        }
        out
    }

    /// Builds a trace from records in time order. Records of one token may interleave with other
    /// tokens' (a batch is captured layer by layer); a token's step is found by (phase, request,
    /// token), and a layer recorded twice for the same key starts a new step.
    pub fn from_records(
        header: &TraceHeader,
        records: &[RoutingRecord],
        path: &Path,
    ) -> Result<Trace, TraceError> {
        let n_layer = header.n_layer as usize;
        let invalid = |msg: String| TraceError::Invalid {
            path: path.to_path_buf(),
            msg,
        };
        // Per phase: steps as per-layer record indices, and the open step of each key.
        let mut steps: [Vec<Vec<Option<usize>>>; 2] = [Vec::new(), Vec::new()];
        // Every step takes n_layer slots here and in the routing built from it; a real trace
        // fills most of them. Records that would open far more steps than they can fill belong
        // to a header with made-up layers: refused before it costs gigabytes.
        let slot_budget = records.len().saturating_mul(16).saturating_add(n_layer);
        let mut open: HashMap<(u8, u32, u32), usize> = HashMap::new();
        for (i, r) in records.iter().enumerate() {
            if r.phase > PHASE_DECODE {
                return Err(invalid(format!("record {i}: unknown phase {}", r.phase)));
            }
            if usize::from(r.layer) >= n_layer {
                return Err(invalid(format!(
                    "record {i}: layer {} out of range (n_layer={n_layer})",
                    r.layer
                )));
            }
            if usize::from(r.n_used) > MAX_K || u32::from(r.n_used) > header.k {
                return Err(invalid(format!(
                    "record {i}: {} experts used, header k={}",
                    r.n_used, header.k
                )));
            }
            check_ids(r.used_ids(), header.n_expert)
                .map_err(|m| invalid(format!("record {i}: {m}")))?;
            let p = usize::from(r.phase);
            let key = (r.phase, r.request, r.token);
            let idx = match open.get(&key) {
                Some(&s) if steps[p][s][usize::from(r.layer)].is_none() => s,
                _ => {
                    let open_steps = steps[0].len() + steps[1].len() + 1;
                    if open_steps.saturating_mul(n_layer) > slot_budget {
                        return Err(invalid(format!(
                            "the header claims {n_layer} layers, but {} records cannot fill {open_steps} steps of them (record {i})",
                            records.len()
                        )));
                    }
                    steps[p].push(vec![None; n_layer]);
                    let s = steps[p].len() - 1;
                    open.insert(key, s);
                    s
                }
            };
            steps[p][idx][usize::from(r.layer)] = Some(i);
        }
        let build = |p: usize| {
            let mut routing = Routing::new(n_layer);
            for step in &steps[p] {
                let first = step.iter().flatten().next().map(|&i| &records[i]);
                let (req, tok) = first.map(|r| (r.request, r.token)).unwrap_or((0, 0));
                routing.push_step(
                    req,
                    tok,
                    step.iter().map(|slot| match slot {
                        Some(i) => (records[*i].used_ids(), records[*i].used_weights()),
                        None => (&[][..], &[][..]),
                    }),
                );
            }
            routing
        };
        let prompt = build(usize::from(PHASE_PROMPT));
        let decode = build(usize::from(PHASE_DECODE));
        Ok(Trace {
            n_layer: header.n_layer,
            n_expert: header.n_expert,
            k: header.k,
            fingerprint: header.fingerprint_str().map(str::to_owned),
            ids_sorted: header.flags & FLAG_IDS_SORTED != 0,
            has_weights: header.flags & FLAG_WEIGHTS != 0,
            decode,
            prompt,
        })
    }
}

/// Checks that ids are below `n_expert` and distinct.
pub(crate) fn check_ids(ids: &[u16], n_expert: u32) -> Result<(), String> {
    for (j, &e) in ids.iter().enumerate() {
        if u32::from(e) >= n_expert {
            return Err(format!("expert id {e} out of range (n_expert={n_expert})"));
        }
        if ids[..j].contains(&e) {
            return Err(format!("expert id {e} listed twice"));
        }
    }
    Ok(())
}

/// Reads a binary trace file.
pub fn read_binary(path: &Path) -> Result<Trace, TraceError> {
    let bytes = fs::read(path).map_err(|source| TraceError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let (header, records) = wire::decode(&bytes).map_err(|source| TraceError::Format {
        path: path.to_path_buf(),
        source,
    })?;
    Trace::from_records(&header, &records, path)
}

/// Writes a binary trace file atomically.
pub fn write_binary(trace: &Trace, path: &Path) -> Result<(), TraceError> {
    let bytes = wire::encode(&trace.header(), &trace.records());
    crate::atomic_file::write_atomic(path, &bytes).map_err(|source| TraceError::Write {
        path: path.to_path_buf(),
        source,
    })
}

/// Appends records to a binary trace as they arrive; the file appears, complete and with its
/// record count set, only on [`TraceWriter::finish`]. Dropped unfinished, nothing is left behind.
pub struct TraceWriter {
    file: AtomicFile,
    path: PathBuf,
    count: u64,
}

impl TraceWriter {
    pub fn create(path: &Path, header: &TraceHeader) -> Result<TraceWriter, TraceError> {
        let werr = |source| TraceError::Write {
            path: path.to_path_buf(),
            source,
        };
        let file = AtomicFile::create(path).map_err(werr)?;
        let mut h = *header;
        h.record_count = wire::COUNT_UNKNOWN;
        file.as_file()
            .write_all(bytemuck::bytes_of(&h))
            .map_err(werr)?;
        Ok(TraceWriter {
            file,
            path: path.to_path_buf(),
            count: 0,
        })
    }

    pub fn write(&mut self, records: &[RoutingRecord]) -> Result<(), TraceError> {
        self.file
            .as_file()
            .write_all(bytemuck::cast_slice(records))
            .map_err(|source| TraceError::Write {
                path: self.path.clone(),
                source,
            })?;
        self.count += records.len() as u64;
        Ok(())
    }

    /// Sets the record count in the header and publishes the file.
    pub fn finish(self) -> Result<u64, TraceError> {
        let werr = |source| TraceError::Write {
            path: self.path.clone(),
            source,
        };
        let offset = std::mem::offset_of!(TraceHeader, record_count) as u64;
        let mut f = self.file.as_file();
        f.seek(SeekFrom::Start(offset)).map_err(werr)?;
        f.write_all(&self.count.to_le_bytes()).map_err(werr)?;
        let count = self.count;
        self.file.commit().map_err(werr)?;
        Ok(count)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn small() -> Trace {
        let mut decode = Routing::new(2);
        decode.push_step(0, 3, [(&[1u16, 2][..], &[][..]), (&[0u16, 3][..], &[][..])]);
        decode.push_step(0, 4, [(&[2u16, 3][..], &[][..]), (&[1u16, 3][..], &[][..])]);
        let mut prompt = Routing::new(2);
        prompt.push_step(0, 0, [(&[0u16, 1][..], &[][..]), (&[2u16, 3][..], &[][..])]);
        Trace {
            n_layer: 2,
            n_expert: 4,
            k: 2,
            fingerprint: Some("gguf-1-00".into()),
            ids_sorted: false,
            has_weights: false,
            decode,
            prompt,
        }
    }

    #[test]
    fn binary_round_trip_keeps_prompt_apart() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t.trace");
        let t = small();
        t.write(&p, None).unwrap();
        let back = Trace::read(&p, None).unwrap();
        assert_eq!(back, t);
        assert_eq!(back.prompt.steps(), 1);
        assert_eq!(back.decode.ids(1, 1), &[1, 3]);
    }

    #[test]
    fn interleaved_batch_records_group_by_token() {
        let h = TraceHeader::new(2, 8, 1, 0);
        let recs = [
            RoutingRecord::new(1, 0, 0, PHASE_DECODE, &[1]),
            RoutingRecord::new(2, 0, 0, PHASE_DECODE, &[5]),
            RoutingRecord::new(1, 0, 1, PHASE_DECODE, &[2]),
            RoutingRecord::new(2, 0, 1, PHASE_DECODE, &[6]),
            // Same key again at layer 0: a new step.
            RoutingRecord::new(1, 0, 0, PHASE_DECODE, &[7]),
        ];
        let t = Trace::from_records(&h, &recs, Path::new("x")).unwrap();
        assert_eq!(t.decode.steps(), 3);
        assert_eq!(t.decode.ids(0, 1), &[2]);
        assert_eq!(t.decode.ids(1, 0), &[5]);
        assert_eq!(t.decode.ids(2, 0), &[7]);
        assert_eq!(t.decode.ids(2, 1), &[] as &[u16]);
    }

    #[test]
    fn bad_records_are_errors() {
        let h = TraceHeader::new(2, 8, 2, 0);
        for rec in [
            RoutingRecord::new(0, 0, 2, PHASE_DECODE, &[1]),
            RoutingRecord::new(0, 0, 0, PHASE_DECODE, &[9]),
            RoutingRecord::new(0, 0, 0, PHASE_DECODE, &[3, 3]),
            RoutingRecord::new(0, 0, 0, 7, &[1]),
        ] {
            assert!(Trace::from_records(&h, &[rec], Path::new("x")).is_err());
        }
    }

    #[test]
    fn streaming_writer_sets_count() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s.trace");
        let t = small();
        let mut w = TraceWriter::create(&p, &t.header()).unwrap();
        let recs = t.records();
        w.write(&recs[..3]).unwrap();
        assert!(!p.exists());
        w.write(&recs[3..]).unwrap();
        assert_eq!(w.finish().unwrap(), recs.len() as u64);
        let bytes = fs::read(&p).unwrap();
        let (h, back) = wire::decode(&bytes).unwrap();
        assert_eq!(h.record_count, recs.len() as u64);
        assert_eq!(back, recs);
    }

    /// A 2 MB trace whose header makes up its geometry: every record a token of its own.
    fn made_up(n_layer: u32, n_expert: u32) -> Vec<u8> {
        let h = TraceHeader::new(n_layer, n_expert, 2, 0);
        let recs: Vec<RoutingRecord> = (0..(2 << 20) / wire::RECORD_SIZE as u32)
            .map(|t| RoutingRecord::new(0, t, (t % 4) as u16, PHASE_DECODE, &[1, 2]))
            .collect();
        wire::encode(&h, &recs)
    }

    #[test]
    fn header_sizes_are_checked_against_the_file_before_anything_is_allocated() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("big.trace");
        // 65,536 × 65,536 cells of 8 bytes (32 GiB of tables) from a 2 MB file.
        fs::write(&p, made_up(65536, 65536)).unwrap();
        let e = read_binary(&p).unwrap_err().to_string();
        assert!(e.contains("65536 layers × 65536 experts"), "{e}");
        // 65,536 layers of 8 experts: small tables, but each of the ~19,000 tokens would take
        // 65,536 slots (gigabytes); refused after a few steps.
        fs::write(&p, made_up(65536, 8)).unwrap();
        let e = read_binary(&p).unwrap_err().to_string();
        assert!(e.contains("claims 65536 layers"), "{e}");
        // The same records under their real geometry read fine.
        fs::write(&p, made_up(4, 8)).unwrap();
        let t = read_binary(&p).unwrap();
        assert_eq!(t.decode.steps(), (2 << 20) / wire::RECORD_SIZE);
    }

    #[test]
    fn slice_keeps_steps() {
        let t = small();
        let s = t.decode.slice(1..2);
        assert_eq!(s.steps(), 1);
        assert_eq!(s.ids(0, 0), &[2, 3]);
        assert_eq!(s.token(0), (0, 4));
    }
}
