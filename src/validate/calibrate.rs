//! `spark calibrate`: replay the train chunks of a corpus, write the placement profile and the
//! routing trace, resumably.
//!
//! Owns the calibration state next to the profile: `<profile>.calibrate.json` (which chunks are
//! done, the partial counts, how many record bytes belong to them) and
//! `<profile>.calibrate.records` (the raw routing records of the done chunks, appended and
//! fsynced before the state that names them is replaced). A killed run is continued by the next
//! one: record bytes past the state's length (a chunk written but not committed) are cut off,
//! so no chunk is ever counted twice. The profile and the trace appear only when every chunk is
//! done; then the state files are removed. Never writes the profile or trace non-atomically.

use std::collections::BTreeSet;
use std::fs::OpenOptions;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use spark_proto::trace::{RoutingRecord, TraceHeader, FLAG_HAS_PROMPT, FLAG_WEIGHTS};

use super::replay::{replay, ChunkRun};
use super::{jobs, Progress, ServerArgs, ValidateError};
use crate::cache::Counts;

use crate::profile::{self, Profile};
use crate::sessions::{Corpus, Split};
use crate::trace::TraceWriter;

/// State file format version.
const STATE_VERSION: u32 = 1;

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
    corpus_created_unix: u64,
    chunk_tokens: usize,
    n_gen: u32,
    n_layer: u32,
    n_expert: u32,
    k: u32,
    done: BTreeSet<String>,
    /// Row-major `n_layer × n_expert`.
    counts: Vec<u64>,
    tokens: u64,
    /// Bytes of the records file that belong to the done chunks.
    records_bytes: u64,
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

fn read_state(path: &Path) -> Result<Option<State>, ValidateError> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| ValidateError::State {
                path: path.to_path_buf(),
                msg: format!("{e}; remove it to start the calibration over"),
            }),
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
    let (n_layer, n_expert) = (geo.n_layer as usize, geo.n_expert as usize);
    let fresh = State {
        version: STATE_VERSION,
        fingerprint: fingerprint.clone(),
        corpus_created_unix: corpus.manifest().created_unix,
        chunk_tokens: a.server.chunk_tokens,
        n_gen: a.server.n_gen,
        n_layer: geo.n_layer,
        n_expert: geo.n_expert,
        k: geo.n_expert_used,
        done: BTreeSet::new(),
        counts: vec![0; n_layer * n_expert],
        tokens: 0,
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
    let mut state = match read_state(&spath)? {
        Some(s) if same_run(&s, &fresh) => {
            if !a.quiet {
                eprintln!(
                    "spark calibrate: resuming {}: {} chunks already done",
                    spath.display(),
                    s.done.len()
                );
            }
            s
        }
        Some(_) => {
            if !a.quiet {
                eprintln!(
                    "spark calibrate: {} belongs to another model, corpus or chunk size; starting over",
                    spath.display()
                );
            }
            fresh
        }
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

    let todo: Vec<_> = all
        .iter()
        .filter(|j| !state.done.contains(&j.key))
        .cloned()
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
                        next.counts[l * n_expert + usize::from(e)] += 1;
                    }
                }
            }
            let tokens = (run.prompt_tokens + run.generated) as u64;
            next.tokens += tokens;
            next.records_bytes += bytes.len() as u64;
            next.done.insert(run.key.clone());
            let json = serde_json::to_vec(&next).expect("state serialises");
            crate::atomic_file::write_atomic(&spath, &json)
                .map_err(|e| ValidateError::io(&spath, e))?;
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

    // Every chunk is done: publish the trace, then the profile, then forget the state.
    let mut header = TraceHeader::new(
        geo.n_layer,
        geo.n_expert,
        geo.n_expert_used,
        FLAG_WEIGHTS | FLAG_HAS_PROMPT,
    );
    let _ = header.set_fingerprint(&fingerprint);
    let mut writer = TraceWriter::create(&trace_path, &header)?;
    records
        .seek(SeekFrom::Start(0))
        .map_err(|e| ValidateError::io(&rpath, e))?;
    let mut reader = std::io::BufReader::new(&mut records).take(state.records_bytes);
    let mut buf = vec![0u8; RECORD * 4096];
    let mut total = 0u64;
    loop {
        let n = read_full(&mut reader, &mut buf).map_err(|e| ValidateError::io(&rpath, e))?;
        if n == 0 {
            break;
        }
        if n % RECORD != 0 {
            return Err(ValidateError::State {
                path: rpath.clone(),
                msg: "a partial record at the end; remove the state to start over".into(),
            });
        }
        let mut recs: Vec<RoutingRecord> = vec![bytemuck::Zeroable::zeroed(); n / RECORD];
        bytemuck::cast_slice_mut::<RoutingRecord, u8>(&mut recs).copy_from_slice(&buf[..n]);
        writer.write(&recs)?;
        total += recs.len() as u64;
    }
    writer.finish()?;
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
    drop(records);
    remove_state(&profile_path);
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
        && a.corpus_created_unix == b.corpus_created_unix
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
