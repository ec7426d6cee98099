//! `spark trace record`: capture a binary routing trace from a live, tapped llama-server.
//!
//! Owns the recording flow: start a telemetry session, discard the server's warm-up routing,
//! send each prompt as one greedy completion stamped with its request number, stream the
//! captured records into a [`TraceWriter`] (the file appears only when complete), and report
//! what was captured, including records the tap had to drop. Never edits records: what the
//! tap captured is what the file holds, in capture order.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Serialize;
use spark_proto::control::{HiddenConfig, HiddenTensor};
use spark_proto::ring::{HiddenChunk, HiddenFileHeader, HIDDEN_FILE_MAGIC, HIDDEN_FILE_VERSION};
use spark_proto::trace::{TraceHeader, FLAG_HAS_PROMPT, FLAG_WEIGHTS};

use super::{TraceError, TraceWriter};
use crate::engine::{Engine, EngineError};
use crate::ring::DEFAULT_CAPACITY;
use crate::telemetry::{locate_tap, Session, SessionConfig, TelemetryError, CONTROL_TIMEOUT};

/// `spark trace …`: the file subcommands of [`super::cli`] plus `record`.
#[derive(Debug, clap::Subcommand)]
pub enum TraceCli {
    #[command(flatten)]
    Files(super::cli::TraceCommand),
    /// Start llama-server with the tap, send prompts, write the captured routing as a binary trace
    Record(RecordArgs),
}

#[derive(Debug, clap::Args)]
pub struct RecordArgs {
    /// The GGUF model to serve
    #[arg(short = 'm', long)]
    pub model: PathBuf,
    /// Output binary trace (written atomically)
    #[arg(long)]
    pub out: PathBuf,
    /// One prompt
    #[arg(long, conflicts_with = "prompts")]
    pub prompt: Option<String>,
    /// A file of prompts, one per line (empty lines skipped)
    #[arg(long)]
    pub prompts: Option<PathBuf>,
    /// Tokens to generate per prompt (greedy)
    #[arg(long, default_value_t = 64)]
    pub n_predict: u32,
    /// llama-server binary (default: $SPARK_LLAMA_SERVER, then the build in the cache)
    #[arg(long, value_name = "PATH")]
    pub llama_server: Option<PathBuf>,
    /// The tap library (default: $SPARK_TAP, then next to the spark executable)
    #[arg(long, value_name = "PATH")]
    pub tap: Option<PathBuf>,
    /// Ring slots (a power of two)
    #[arg(long, default_value_t = DEFAULT_CAPACITY)]
    pub ring_capacity: u64,
    /// Seconds to wait for llama-server to become ready
    #[arg(long, default_value_t = 120)]
    pub ready_timeout: u64,
    /// Where llama-server's log goes (default: next to --out, with `.server.log` appended)
    #[arg(long)]
    pub log: Option<PathBuf>,
    /// Also capture the pre-gate hidden state of every Nth token into `<out>.hidden`
    #[arg(long, value_name = "N")]
    pub hidden_every: Option<u32>,
    /// Byte budget of hidden-state capture, in MiB
    #[arg(long, value_name = "MIB", default_value_t = 256, requires = "hidden_every", value_parser = clap::value_parser!(u32).range(1..))]
    pub hidden_budget: u32,
    /// Graph tensor holding the hidden state: router_input (what each layer's router
    /// multiplies, on every arch; on a hooked engine read once after each graph, which keeps
    /// n_layer × n_embd × ubatch floats of compute buffer), ffn_norm or attn_norm (read by the
    /// eval callback, which synchronises at every layer on a device)
    #[arg(
        long,
        value_name = "NAME",
        default_value = "router_input",
        requires = "hidden_every"
    )]
    pub hidden_tensor: String,
    /// Print the summary as JSON (includes each request's prompt and generated token ids)
    #[arg(long)]
    pub json: bool,
    /// Arguments passed to llama-server unchanged
    #[arg(last = true)]
    pub server_args: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error("read prompts {path}: {source}")]
    Prompts {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("record a trace: give --prompt TEXT or --prompts FILE (with at least one prompt)")]
    NoPrompt,
    #[error("record a trace: {model} has no MoE layers (architecture {arch}); there is no routing to capture")]
    Dense { model: PathBuf, arch: String },
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error(transparent)]
    Telemetry(#[from] TelemetryError),
    #[error(transparent)]
    Trace(#[from] TraceError),
    #[error("parse --hidden-tensor {0}: expected router_input, ffn_norm or attn_norm")]
    HiddenTensor(String),
    #[error("parse --hidden-every 0: sample at least every token (N ≥ 1)")]
    HiddenEvery,
    #[error("parse --ring-capacity {0}: must be a power of two between 1 and 67108864")]
    RingCapacity(u64),
    #[error("write {path}: {source}")]
    HiddenFile {
        path: PathBuf,
        source: std::io::Error,
    },
}

impl RecordError {
    pub fn is_usage(&self) -> bool {
        match self {
            RecordError::Prompts { .. }
            | RecordError::NoPrompt
            | RecordError::Dense { .. }
            | RecordError::Engine(_)
            | RecordError::HiddenTensor(_)
            | RecordError::HiddenEvery
            | RecordError::RingCapacity(_) => true,
            RecordError::HiddenFile { .. } => false,
            RecordError::Telemetry(e) => e.is_usage(),
            RecordError::Trace(_) => false,
        }
    }

    pub fn is_timeout(&self) -> bool {
        matches!(self, RecordError::Telemetry(e) if e.is_timeout())
    }
}

/// One request of a recording.
#[derive(Debug, Clone, Serialize)]
pub struct RequestSummary {
    pub request: u32,
    pub prompt_tokens: Vec<u32>,
    pub generated_tokens: Vec<u32>,
    pub records: u64,
}

/// What `spark trace record` captured.
#[derive(Debug, Clone, Serialize)]
pub struct RecordSummary {
    pub path: PathBuf,
    pub n_layer: u32,
    pub n_expert: u32,
    pub k: u32,
    pub records: u64,
    pub prompt_records: u64,
    pub decode_records: u64,
    /// Records the tap could not deliver (ring full, or a tensor it could not read).
    pub dropped: u64,
    /// Records whose token position the tap could not attribute.
    pub unmapped: u64,
    /// Graphs whose routing the tap read once after the graph (a hooked engine's graph
    /// observer), not through the eval callback's synchronisation per layer.
    pub graph_reads: u64,
    /// Hidden-state rows (router inputs) the tap read once after their graph, not through the
    /// eval callback.
    pub graph_hidden_rows: u64,
    /// The hidden-state file and its chunk count, when captured.
    pub hidden_path: Option<PathBuf>,
    pub hidden_chunks: u64,
    pub hidden_dropped: u64,
    pub requests: Vec<RequestSummary>,
}

fn read_prompts(a: &RecordArgs) -> Result<Vec<String>, RecordError> {
    let mut prompts = Vec::new();
    if let Some(p) = &a.prompt {
        prompts.push(p.clone());
    }
    if let Some(path) = &a.prompts {
        let text = std::fs::read_to_string(path).map_err(|source| RecordError::Prompts {
            path: path.clone(),
            source,
        })?;
        prompts.extend(
            text.lines()
                .filter(|l| !l.trim().is_empty())
                .map(str::to_string),
        );
    }
    if prompts.is_empty() {
        return Err(RecordError::NoPrompt);
    }
    Ok(prompts)
}

fn default_log(out: &Path) -> PathBuf {
    let mut s = out.as_os_str().to_owned();
    s.push(".server.log");
    PathBuf::from(s)
}

/// Runs `spark trace record`.
pub fn record(a: &RecordArgs) -> Result<RecordSummary, RecordError> {
    let prompts = read_prompts(a)?;
    spark_proto::ring::check_capacity(a.ring_capacity)
        .map_err(|_| RecordError::RingCapacity(a.ring_capacity))?;
    let hidden_cfg = match a.hidden_every {
        None => None,
        Some(0) => return Err(RecordError::HiddenEvery),
        Some(every) => Some(HiddenConfig {
            every,
            budget_mib: a.hidden_budget,
            tensor: HiddenTensor::parse(&a.hidden_tensor)
                .ok_or_else(|| RecordError::HiddenTensor(a.hidden_tensor.clone()))?,
        }),
    };
    let engine = Engine::locate(a.llama_server.as_deref())?;
    let tap = locate_tap(a.tap.as_deref())?;
    let cfg = SessionConfig {
        llama_server: engine.llama_server,
        model: a.model.clone(),
        tap: Some(tap),
        extra_args: a.server_args.clone(),
        env: Vec::new(),
        ring_capacity: a.ring_capacity,
        hidden_capacity: hidden_cfg.map(|_| 1 << 14),
        ready_timeout: Duration::from_secs(a.ready_timeout),
        log_path: a.log.clone().unwrap_or_else(|| default_log(&a.out)),
    };
    let mut session = Session::start(&cfg)?;
    let g = session
        .greeting
        .clone()
        .expect("a tapped session has a greeting");
    if g.n_expert == 0 || session.geometry.n_expert == 0 {
        let arch = g.arch.clone();
        session.stop();
        return Err(RecordError::Dense {
            model: a.model.clone(),
            arch,
        });
    }
    if hidden_cfg.is_some() {
        session.set_hidden(hidden_cfg)?;
    }
    // Routing of the server's warm-up run belongs to no request.
    session.discard();
    let mut header = TraceHeader::new(
        session.geometry.n_layer,
        session.geometry.n_expert,
        session.geometry.n_expert_used,
        FLAG_WEIGHTS | FLAG_HAS_PROMPT,
    );
    let _ = header.set_fingerprint(&session.fingerprint);
    let mut writer = TraceWriter::create(&a.out, &header)?;
    let mut requests = Vec::new();
    let (mut prompt_records, mut decode_records) = (0u64, 0u64);
    let mut buf = Vec::new();
    for (i, prompt) in prompts.iter().enumerate() {
        let request = i as u32 + 1;
        let prompt_tokens = session.tokenize(prompt)?;
        buf.clear();
        let completion = session.complete(
            request,
            &serde_json::Value::String(prompt.clone()),
            a.n_predict,
            &mut buf,
        )?;
        for r in &buf {
            if r.phase == spark_proto::trace::PHASE_DECODE {
                decode_records += 1;
            } else {
                prompt_records += 1;
            }
        }
        writer.write(&buf)?;
        requests.push(RequestSummary {
            request,
            prompt_tokens,
            generated_tokens: completion.tokens,
            records: buf.len() as u64,
        });
    }
    let stats = match session.control() {
        Some(c) => Some(c.stats(CONTROL_TIMEOUT).map_err(TelemetryError::from)?),
        None => None,
    };
    let ring_dropped = session.ring_dropped();
    let hidden_dropped = session.hidden_dropped();
    let chunks = std::mem::take(&mut session.hidden_chunks);
    let n_embd = session.geometry.n_embd as u32;
    session.stop();
    let records = writer.finish()?;
    let hidden_path = match hidden_cfg {
        Some(_) => {
            let mut p = a.out.as_os_str().to_owned();
            p.push(".hidden");
            let p = PathBuf::from(p);
            write_hidden(&p, n_embd, &chunks)?;
            Some(p)
        }
        None => None,
    };
    Ok(RecordSummary {
        path: a.out.clone(),
        n_layer: header.n_layer,
        n_expert: header.n_expert,
        k: header.k,
        records,
        prompt_records,
        decode_records,
        dropped: stats.map(|s| s.dropped).unwrap_or(0).max(ring_dropped),
        unmapped: stats.map(|s| s.unmapped).unwrap_or(0),
        graph_reads: stats.map(|s| s.graph_reads).unwrap_or(0),
        graph_hidden_rows: stats.map(|s| s.graph_hidden_rows).unwrap_or(0),
        hidden_path,
        hidden_chunks: chunks.len() as u64,
        hidden_dropped,
        requests,
    })
}

/// Writes hidden-state chunks as a `spark_proto::ring::HiddenFileHeader` file, atomically.
fn write_hidden(path: &Path, n_embd: u32, chunks: &[HiddenChunk]) -> Result<(), RecordError> {
    use std::io::Write;
    let err = |source| RecordError::HiddenFile {
        path: path.to_path_buf(),
        source,
    };
    let header = HiddenFileHeader {
        magic: HIDDEN_FILE_MAGIC,
        version: HIDDEN_FILE_VERSION,
        chunk_size: std::mem::size_of::<HiddenChunk>() as u32,
        n_embd,
        reserved: 0,
        count: chunks.len() as u64,
    };
    let file = crate::atomic_file::AtomicFile::create(path).map_err(err)?;
    {
        let mut w = std::io::BufWriter::new(file.as_file());
        w.write_all(bytemuck::bytes_of(&header)).map_err(err)?;
        w.write_all(bytemuck::cast_slice(chunks)).map_err(err)?;
        w.flush().map_err(err)?;
    }
    file.commit().map_err(err)?;
    Ok(())
}

/// Runs `spark trace record` and prints its summary.
pub fn run(a: &RecordArgs) -> Result<(), RecordError> {
    let s = record(a)?;
    if a.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&s).expect("summary serialises")
        );
    } else {
        println!(
            "wrote {}: {} records ({} prompt, {} decode) from {} request(s); {} layers, {} experts, top-{}",
            s.path.display(),
            s.records,
            s.prompt_records,
            s.decode_records,
            s.requests.len(),
            s.n_layer,
            s.n_expert,
            s.k
        );
    }
    if s.dropped > 0 {
        tracing::warn!(
            "the tap dropped {} records (ring full); the trace is incomplete — raise --ring-capacity",
            s.dropped
        );
    }
    if let Some(p) = &s.hidden_path {
        if !a.json {
            println!(
                "wrote {}: {} hidden-state chunks ({} dropped)",
                p.display(),
                s.hidden_chunks,
                s.hidden_dropped
            );
        }
    }
    if s.unmapped > 0 {
        tracing::warn!(
            "{} records have no token position (token = 4294967295)",
            s.unmapped
        );
    }
    Ok(())
}
