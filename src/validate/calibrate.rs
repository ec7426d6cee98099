//! `spark calibrate`: replay the train chunks of a corpus, write the routing profile and the
//! routing trace, resumably and extensibly.
//!
//! Owns the calibration state next to the profile: `<profile>.calibrate.json` (which chunks are
//! done, each with the SHA-256 of its text, the counts so far, how many record bytes belong to
//! them) and `<profile>.calibrate.records` (the raw routing records of the done chunks not yet
//! in a published trace, appended and fsynced before the state that names them is replaced). A
//! killed run is continued by the next one: record bytes past the state's length (a chunk
//! written but not committed) are cut off, so no chunk is ever counted twice. The profile and
//! the trace appear only when every chunk is done. The state outlives a finished run: it then
//! names the trace that holds the done chunks' records (their count and SHA-256), so a later run
//! that asks for more chunks (a larger `--max-chunks`, a corpus extracted again with more
//! sessions) replays only the chunks it has not done, and republishes the trace and profile
//! with old and new together. A state whose done chunks are not all among this run's train
//! chunks (same key, same text), or whose trace changed, is started over, with a message.
//! Never writes the profile or trace non-atomically.

use std::collections::BTreeMap;
use std::fs::OpenOptions;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use spark_proto::trace::{RoutingRecord, TraceHeader, FLAG_HAS_PROMPT, FLAG_WEIGHTS, HEADER_SIZE};

use super::replay::{replay, ChunkRun};
use super::{jobs, Progress, ServerArgs, ValidateError};
use crate::cache::Counts;

use crate::profile::{self, Profile};
use crate::sessions::{Corpus, Split};
use crate::trace::TraceWriter;

/// State file format version (2: per-chunk text digests, kept after a finished run).
const STATE_VERSION: u32 = 2;

#[derive(Debug, Clone, clap::Args)]
pub struct CalibrateArgs {
    /// The GGUF model to calibrate
    #[arg(short = 'm', long)]
    pub model: PathBuf,
    /// Corpus directory written by `spark sessions extract`
    #[arg(long)]
    pub corpus: PathBuf,
    /// Output profile (default: `<model>.spark.csv`, next to the model)
    #[arg(short = 'o', long = "out", value_name = "PROFILE")]
    pub out: Option<PathBuf>,
    /// Output binary routing trace (default: the profile path with `.trace` appended)
    #[arg(long, value_name = "OUT")]
    pub trace: Option<PathBuf>,
    #[command(flatten)]
    pub server: ServerArgs,
    /// No progress lines
    #[arg(long)]
    pub quiet: bool,
}

/// What a calibration produced.
#[derive(Debug, Clone, Serialize)]
pub struct CalibrateSummary {
    pub profile: PathBuf,
    pub trace: PathBuf,
    /// Train chunks in the profile (resumed ones included).
    pub chunks: usize,
    /// Of which replayed by this run.
    pub replayed: usize,
    pub tokens: u64,
    pub records: u64,
    pub n_layer: u32,
    pub n_expert: u32,
    pub k: u32,
}

/// The resume state: what the done chunks contributed.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
struct State {
    version: u32,
    fingerprint: String,
    chunk_tokens: usize,
    n_gen: u32,
    n_layer: u32,
    n_expert: u32,
    k: u32,
    /// Done chunks: `session#chunk` → SHA-256 (hex) of the chunk's text.
    done: BTreeMap<String, String>,
    /// Row-major `n_layer × n_expert`.
    counts: Vec<u64>,
    tokens: u64,
    /// The request number of the next replayed chunk (a chunk's records carry its number, and
    /// no two chunks share one).
    next_request: u32,
    /// The trace an earlier finished run published: its first `records` records are the done
    /// chunks' records that are no longer in the records file.
    published: Option<Published>,
    /// Bytes of the records file that belong to the done chunks (after the published ones).
    records_bytes: u64,
}

/// A published trace holding the records of done chunks.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
struct Published {
    trace: PathBuf,
    records: u64,
    /// SHA-256 (hex) of those records' bytes.
    sha256: String,
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn text_digest(text: &str) -> String {
    use sha2::{Digest, Sha256};
    hex(&Sha256::digest(text.as_bytes()))
}

fn with_suffix(p: &Path, suffix: &str) -> PathBuf {
    let mut s = p.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

/// The state file of a calibration writing `profile`.
pub fn state_path(profile: &Path) -> PathBuf {
    with_suffix(profile, ".calibrate.json")
}

/// The partial records file of a calibration writing `profile`.
pub fn records_path(profile: &Path) -> PathBuf {
    with_suffix(profile, ".calibrate.records")
}

/// Forgets a calibration in progress for `profile` (the next run starts over).
pub fn remove_state(profile: &Path) {
    let _ = std::fs::remove_file(state_path(profile));
    let _ = std::fs::remove_file(records_path(profile));
}

/// The saved state: `Ok(None)` when there is none, `Err(version)` when it is of another state
/// version (started over, never misread).
fn read_state(path: &Path) -> Result<Option<Result<State, u64>>, ValidateError> {
    let corrupt = |e: serde_json::Error| ValidateError::State {
        path: path.to_path_buf(),
        msg: format!("{e}; remove it to start the calibration over"),
    };
    match std::fs::read(path) {
        Ok(bytes) => {
            let v: serde_json::Value = serde_json::from_slice(&bytes).map_err(corrupt)?;
            match v.get("version").and_then(serde_json::Value::as_u64) {
                Some(n) if n == u64::from(STATE_VERSION) => serde_json::from_value(v)
                    .map(|s| Some(Ok(s)))
                    .map_err(corrupt),
                other => Ok(Some(Err(other.unwrap_or(0)))),
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(ValidateError::State {
            path: path.to_path_buf(),
            msg: e.to_string(),
        }),
    }
}

const RECORD: usize = std::mem::size_of::<RoutingRecord>();

/// Runs `spark calibrate`. `interrupt`: a flag that stops the run (the state is kept).
pub fn calibrate(
    a: &CalibrateArgs,
    interrupt: Option<Arc<AtomicBool>>,
) -> Result<CalibrateSummary, ValidateError> {
    let corpus = Corpus::open(&a.corpus)?;
    let geo = super::moe_geometry(&a.model, "calibrate")?;
    let fingerprint = geo.fingerprint.to_string();
    let profile_path = a.out.clone().unwrap_or_else(|| profile::path_for(&a.model));
    let trace_path = a
        .trace
        .clone()
        .unwrap_or_else(|| with_suffix(&profile_path, ".trace"));
    let all = jobs(&corpus, Split::Train, a.server.max_chunks)?;
    if all.is_empty() {
        return Err(ValidateError::Usage(format!(
            "calibrate from {}: the corpus has no train chunks",
            a.corpus.display()
        )));
    }
    let digests: BTreeMap<&str, String> = all
        .iter()
        .map(|j| (j.key.as_str(), text_digest(&j.text)))
        .collect();
    let (n_layer, n_expert) = (geo.n_layer as usize, geo.n_expert as usize);
    let fresh = State {
        version: STATE_VERSION,
        fingerprint: fingerprint.clone(),
        chunk_tokens: a.server.chunk_tokens,
        n_gen: a.server.n_gen,
        n_layer: geo.n_layer,
        n_expert: geo.n_expert,
        k: geo.n_expert_used,
        done: BTreeMap::new(),
        counts: vec![0; n_layer * n_expert],
        tokens: 0,
        next_request: 1,
        published: None,
        records_bytes: 0,
    };
    let spath = state_path(&profile_path);
    let rpath = records_path(&profile_path);
    // One calibration per profile at a time (two would count the same chunks twice). The lock
    // is released by the kernel whatever ends this process, so a killed run never blocks.
    let _lock = lock(
        &with_suffix(&profile_path, ".calibrate.lock"),
        &profile_path,
    )?;
    let header = {
        let mut h = TraceHeader::new(
            geo.n_layer,
            geo.n_expert,
            geo.n_expert_used,
            FLAG_WEIGHTS | FLAG_HAS_PROMPT,
        );
        let _ = h.set_fingerprint(&fingerprint);
        h
    };
    let say = |msg: String| {
        if !a.quiet {
            eprintln!("spark calibrate: {msg}");
        }
    };
    let mut state = match read_state(&spath)? {
        Some(Err(version)) => {
            say(format!(
                "{} is a version {version} state, this build keeps version {STATE_VERSION}; \
                 starting over",
                spath.display()
            ));
            fresh
        }
        Some(Ok(s)) => match reusable(&s, &fresh, &digests, &header) {
            Ok(()) => {
                say(format!(
                    "resuming {}: {} of {} chunks already done",
                    spath.display(),
                    s.done.len(),
                    all.len()
                ));
                s
            }
            Err(why) => {
                say(format!("{} {why}; starting over", spath.display()));
                fresh
            }
        },
        None => fresh,
    };
    // Record bytes past the committed length belong to a chunk that was never counted.
    let mut records = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&rpath)
        .map_err(|e| ValidateError::io(&rpath, e))?;
    let have = records
        .metadata()
        .map_err(|e| ValidateError::io(&rpath, e))?
        .len();
    if have < state.records_bytes {
        return Err(ValidateError::State {
            path: rpath.clone(),
            msg: format!(
                "{have} bytes, the state names {}; remove {} to start over",
                state.records_bytes,
                spath.display()
            ),
        });
    }
    records
        .set_len(state.records_bytes)
        .map_err(|e| ValidateError::io(&rpath, e))?;
    records
        .seek(SeekFrom::End(0))
        .map_err(|e| ValidateError::io(&rpath, e))?;

    // Chunks not done yet, numbered after every request a done chunk used.
    let todo: Vec<_> = all
        .iter()
        .filter(|j| !state.done.contains_key(&j.key))
        .zip(state.next_request..)
        .map(|(j, request)| super::replay::Job {
            request,
            ..j.clone()
        })
        .collect();
    let replayed = todo.len();
    if !todo.is_empty() {
        let log = with_suffix(&profile_path, ".server.log");
        let cfg = a.server.replay_config(&a.model, log, None, interrupt)?;
        let progress = super::SharedProgress::new(Progress::new("calibrate", todo.len(), a.quiet));
        let mut commit = |run: ChunkRun| -> Result<(), ValidateError> {
            let bytes: &[u8] = bytemuck::cast_slice(&run.records);
            records
                .write_all(bytes)
                .and_then(|_| records.sync_data())
                .map_err(|e| ValidateError::io(&rpath, e))?;
            let mut next = state.clone();
            for r in &run.records {
                let l = usize::from(r.layer);
                for &e in r.used_ids() {
                    if l < n_layer && usize::from(e) < n_expert {
                        let c = &mut next.counts[l * n_expert + usize::from(e)];
                        *c = c.saturating_add(1);
                    }
                }
            }
            let tokens = (run.prompt_tokens + run.generated) as u64;
            next.tokens = next.tokens.saturating_add(tokens);
            next.records_bytes += bytes.len() as u64;
            let digest = digests.get(run.key.as_str()).cloned().unwrap_or_default();
            next.done.insert(run.key.clone(), digest);
            next.next_request = next.next_request.max(run.request.saturating_add(1));
            write_state(&spath, &next)?;
            state = next;
            progress.borrow_mut().chunk(&run.key, tokens);
            Ok(())
        };
        let on_start = |_: &super::replay::Started| {
            progress.borrow_mut().restart();
            Ok(())
        };
        replay(&cfg, todo, on_start, &mut commit)?;
    }

    // Every chunk is done: publish the trace (the published records, then the new ones), then
    // the profile, then name the new trace in the state and empty the records file.
    let up_to_date = state.records_bytes == 0
        && state
            .published
            .as_ref()
            .is_some_and(|p| p.trace == trace_path);
    let published = if up_to_date {
        state.published.clone().expect("checked above")
    } else {
        publish_trace(
            &trace_path,
            &header,
            state.published.as_ref(),
            &mut records,
            state.records_bytes,
            &rpath,
        )?
    };
    let total = published.records;
    let mut counts = Counts::zero(n_layer, n_expert);
    for l in 0..n_layer {
        for e in 0..n_expert {
            counts.set(l, e, state.counts[l * n_expert + e]);
        }
    }
    let mut p = Profile::new(counts, geo.n_expert_used, Some(fingerprint));
    p.tokens = Some(state.tokens);
    p.updated = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .ok()
        .map(|d| d.as_secs());
    p.write(&profile_path)?;
    if !up_to_date {
        state.published = Some(published);
        state.records_bytes = 0;
        write_state(&spath, &state)?;
        records
            .set_len(0)
            .map_err(|e| ValidateError::io(&rpath, e))?;
    }
    drop(records);
    let _ = std::fs::remove_file(with_suffix(&profile_path, ".calibrate.lock"));
    Ok(CalibrateSummary {
        profile: profile_path,
        trace: trace_path,
        chunks: state.done.len(),
        replayed,
        tokens: state.tokens,
        records: total,
        n_layer: geo.n_layer,
        n_expert: geo.n_expert,
        k: geo.n_expert_used,
    })
}

fn write_state(path: &Path, state: &State) -> Result<(), ValidateError> {
    let json = serde_json::to_vec(state).expect("state serialises");
    crate::atomic_file::write_atomic(path, &json).map_err(|e| ValidateError::io(path, e))
}

/// Why a saved state cannot be continued by this run, if it cannot.
fn reusable(
    s: &State,
    fresh: &State,
    digests: &BTreeMap<&str, String>,
    header: &TraceHeader,
) -> Result<(), String> {
    if !same_run(s, fresh) {
        return Err("belongs to another model, chunk size or number of generated tokens".into());
    }
    if let Some((key, _)) = s
        .done
        .iter()
        .find(|(k, d)| digests.get(k.as_str()) != Some(*d))
    {
        return Err(format!(
            "counts chunk {key}, which this run's train chunks do not hold with the same text \
             (another corpus, or a smaller --max-chunks)"
        ));
    }
    if let Some(p) = &s.published {
        check_published(p, header)?;
    }
    Ok(())
}

/// Reads the first `p.records` records of the published trace after its header, checking the
/// header and their hash; each slice of records goes to `each`.
fn read_published(
    p: &Published,
    header: &TraceHeader,
    mut each: impl FnMut(&[u8]) -> Result<(), String>,
) -> Result<(), String> {
    use sha2::{Digest, Sha256};
    let name = p.trace.display();
    let mut f = std::fs::File::open(&p.trace)
        .map_err(|e| format!("names the trace {name}, which cannot be read ({e})"))?;
    let mut head = [0u8; HEADER_SIZE];
    f.read_exact(&mut head)
        .map_err(|e| format!("names the trace {name}, which has no header ({e})"))?;
    let h = TraceHeader::parse(&head).map_err(|e| format!("names the trace {name}: {e}"))?;
    if (h.n_layer, h.n_expert, h.k, h.fingerprint)
        != (
            header.n_layer,
            header.n_expert,
            header.k,
            header.fingerprint,
        )
        || h.record_count < p.records
    {
        return Err(format!(
            "names the trace {name}, which was replaced since (another model or fewer records)"
        ));
    }
    let mut reader = std::io::BufReader::new(f).take(p.records * RECORD as u64);
    let mut hash = Sha256::new();
    let mut buf = vec![0u8; RECORD * 4096];
    let mut got = 0u64;
    loop {
        let n = read_full(&mut reader, &mut buf).map_err(|e| format!("read {name}: {e}"))?;
        if n == 0 {
            break;
        }
        hash.update(&buf[..n]);
        got += n as u64;
        each(&buf[..n])?;
    }
    if got != p.records * RECORD as u64 || hex(&hash.finalize()) != p.sha256 {
        return Err(format!(
            "names the trace {name}, whose records changed since it was written"
        ));
    }
    Ok(())
}

fn check_published(p: &Published, header: &TraceHeader) -> Result<(), String> {
    read_published(p, header, |_| Ok(()))
}

/// Writes the trace at `path`: the records of `published`, then the first `bytes` bytes of the
/// records file; returns what it now holds.
fn publish_trace(
    path: &Path,
    header: &TraceHeader,
    published: Option<&Published>,
    records: &mut std::fs::File,
    bytes: u64,
    rpath: &Path,
) -> Result<Published, ValidateError> {
    use sha2::{Digest, Sha256};
    let mut writer = TraceWriter::create(path, header)?;
    let mut hash = Sha256::new();
    let mut total = 0u64;
    let mut put = |chunk: &[u8], writer: &mut TraceWriter| -> Result<(), ValidateError> {
        let mut recs: Vec<RoutingRecord> = vec![bytemuck::Zeroable::zeroed(); chunk.len() / RECORD];
        bytemuck::cast_slice_mut::<RoutingRecord, u8>(&mut recs).copy_from_slice(chunk);
        writer.write(&recs)?;
        hash.update(chunk);
        total += recs.len() as u64;
        Ok(())
    };
    if let Some(p) = published {
        let mut failed = None;
        read_published(p, header, |chunk| {
            put(chunk, &mut writer).map_err(|e| {
                let m = e.to_string();
                failed = Some(e);
                m
            })
        })
        .map_err(|msg| {
            failed.take().unwrap_or_else(|| ValidateError::State {
                path: p.trace.clone(),
                msg: format!("the calibration state {msg}; remove the state to start over"),
            })
        })?;
    }
    records
        .seek(SeekFrom::Start(0))
        .map_err(|e| ValidateError::io(rpath, e))?;
    let mut reader = std::io::BufReader::new(&mut *records).take(bytes);
    let mut buf = vec![0u8; RECORD * 4096];
    loop {
        let n = read_full(&mut reader, &mut buf).map_err(|e| ValidateError::io(rpath, e))?;
        if n == 0 {
            break;
        }
        if n % RECORD != 0 {
            return Err(ValidateError::State {
                path: rpath.to_path_buf(),
                msg: "a partial record at the end; remove the state to start over".into(),
            });
        }
        put(&buf[..n], &mut writer)?;
    }
    writer.finish()?;
    Ok(Published {
        trace: path.to_path_buf(),
        records: total,
        sha256: hex(&hash.finalize()),
    })
}

fn lock(path: &Path, profile: &Path) -> Result<nix::fcntl::Flock<std::fs::File>, ValidateError> {
    let file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .map_err(|e| ValidateError::io(path, e))?;
    nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock).map_err(|(_, e)| {
        if e == nix::errno::Errno::EWOULDBLOCK {
            ValidateError::Usage(format!(
                "calibrate {}: another calibration is writing it",
                profile.display()
            ))
        } else {
            ValidateError::io(path, e.into())
        }
    })
}

fn same_run(a: &State, b: &State) -> bool {
    a.version == b.version
        && a.fingerprint == b.fingerprint
        && a.chunk_tokens == b.chunk_tokens
        && a.n_gen == b.n_gen
        && a.n_layer == b.n_layer
        && a.n_expert == b.n_expert
        && a.counts.len() == b.counts.len()
}

/// Reads until `buf` is full or the reader ends; the bytes read.
fn read_full(r: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..])? {
            0 => break,
            m => n += m,
        }
    }
    Ok(n)
}

/// Runs `spark calibrate` with Ctrl-C handling and prints what it wrote.
pub fn run(a: &CalibrateArgs) -> Result<(), ValidateError> {
    let interrupt = super::interrupt_on_signals()?;
    let s = calibrate(a, Some(interrupt))?;
    println!(
        "wrote {}: {} train chunks ({} replayed now), {} tokens; {} layers, {} experts, top-{}",
        s.profile.display(),
        s.chunks,
        s.replayed,
        s.tokens,
        s.n_layer,
        s.n_expert,
        s.k
    );
    println!("wrote {}: {} routing records", s.trace.display(), s.records);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state() -> State {
        State {
            version: STATE_VERSION,
            fingerprint: "fp".into(),
            chunk_tokens: 96,
            n_gen: 4,
            n_layer: 1,
            n_expert: 2,
            k: 1,
            done: BTreeMap::new(),
            counts: vec![0, 0],
            tokens: 0,
            next_request: 1,
            published: None,
            records_bytes: 0,
        }
    }

    #[test]
    fn a_state_of_another_version_is_started_over_not_misread() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s.json");
        // A version-1 state (done as a list, no digests) from an interrupted older run.
        std::fs::write(&p, r#"{"version":1,"done":["a#0"],"records_bytes":0}"#).unwrap();
        assert!(matches!(read_state(&p).unwrap(), Some(Err(1))));
        write_state(&p, &state()).unwrap();
        assert_eq!(read_state(&p).unwrap().unwrap().unwrap(), state());
        std::fs::write(&p, "{").unwrap();
        assert!(read_state(&p).is_err(), "a corrupt state is an error");
    }

    #[test]
    fn done_chunks_must_all_be_in_this_run_with_the_same_text() {
        let header = TraceHeader::new(1, 2, 1, FLAG_WEIGHTS);
        let mut s = state();
        s.done.insert("a#0".into(), text_digest("hello"));
        let fresh = state();
        let more: BTreeMap<&str, String> =
            [("a#0", text_digest("hello")), ("a#1", text_digest("more"))].into();
        assert_eq!(reusable(&s, &fresh, &more, &header), Ok(()));
        let changed: BTreeMap<&str, String> = [("a#0", text_digest("hello!"))].into();
        assert!(reusable(&s, &fresh, &changed, &header)
            .unwrap_err()
            .contains("a#0"));
        let fewer: BTreeMap<&str, String> = [("b#0", text_digest("x"))].into();
        assert!(reusable(&s, &fresh, &fewer, &header).is_err());
        let mut other = state();
        other.n_gen = 8;
        assert!(reusable(&s, &other, &more, &header).is_err());
    }
}
