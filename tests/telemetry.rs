//! Telemetry end to end: the tap inside stock llama-server, the ring, the control channel,
//! `spark trace record`, and exactness against the analytic fixture.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use spark::gguf::GgufFile;
use spark::telemetry::{Session, SessionConfig};
use spark_proto::trace::{RoutingRecord, PHASE_DECODE, PHASE_PROMPT};

use crate::util::{fixture, llama_server, spark, tempdir};

/// The tap library: `$SPARK_TAP`, else built once here with cargo (a workspace member, so CI's
/// `cargo test --workspace` has the sources; building is a no-op when it is fresh).
pub fn tap_lib() -> PathBuf {
    static TAP: OnceLock<PathBuf> = OnceLock::new();
    TAP.get_or_init(|| {
        if let Some(p) = std::env::var_os("SPARK_TAP").filter(|v| !v.is_empty()) {
            return PathBuf::from(p);
        }
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let out = std::process::Command::new(cargo)
            .args(["build", "-p", "spark-tap", "--message-format=short"])
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .output()
            .expect("run cargo build -p spark-tap");
        assert!(
            out.status.success(),
            "building the tap failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        // The spark binary under test sits in the same profile directory as the tap.
        let dir = crate::util::spark_bin().parent().unwrap().to_path_buf();
        let p = dir.join(spark::telemetry::TAP_FILE);
        assert!(p.is_file(), "tap not at {}", p.display());
        p
    })
    .clone()
}

fn session(dir: &Path, model: &Path, extra: &[&str]) -> Session {
    Session::start(&SessionConfig {
        llama_server: llama_server(),
        model: model.to_path_buf(),
        tap: Some(tap_lib()),
        extra_args: extra.iter().map(|s| s.to_string()).collect(),
        env: Vec::new(),
        ring_capacity: 1 << 16,
        hidden_capacity: Some(1 << 10),
        ready_timeout: Duration::from_secs(120),
        log_path: dir.join("server.log"),
    })
    .expect("start a tapped llama-server")
}

/// A prompt of well over 200 tokens for the llama-spm vocabulary.
fn long_prompt() -> String {
    let words = [
        "river", "mountain", "expert", "routing", "table", "cache", "silver", "window", "garden",
        "engine", "quiet", "number", "yellow", "paper", "signal", "forest", "market", "thunder",
    ];
    let mut s = String::from("Once upon a time");
    for i in 0..220 {
        s.push(' ');
        s.push_str(words[(i * 7 + i / 3) % words.len()]);
    }
    s
}

#[test]
fn routing_matches_the_analytic_computation_exactly() {
    let summary = check_analytic_routing(&llama_server(), &[], &[]);
    // The stock engine has no graph observer: every record came through the eval callback.
    assert_eq!(summary["graph_reads"], 0, "{summary}");
}

/// `spark trace record` through `server` (with `args` for llama-server and `env` for spark and
/// its child) on the analytic fixture: every captured (token, layer) expert set equals the
/// independent computation, and every token is accounted for. The lavapipe tests run it with
/// every layer on the device.
/// Returns `trace record`'s JSON summary (graph reads included).
pub fn check_analytic_routing(
    server: &Path,
    args: &[String],
    env: &[(&str, &str)],
) -> serde_json::Value {
    let dir = tempdir();
    let model = fixture(dir.path(), "analytic.gguf", &["--router", "analytic"]);
    let trace = dir.path().join("analytic.trace");
    let n_predict = 60u32;
    let out = spark_with(
        env,
        &[
            "trace",
            "record",
            "-m",
            model.to_str().unwrap(),
            "--out",
            trace.to_str().unwrap(),
            "--prompt",
            &long_prompt(),
            "--n-predict",
            &n_predict.to_string(),
            "--llama-server",
            server.to_str().unwrap(),
            "--tap",
            tap_lib().to_str().unwrap(),
            "--json",
            "--",
            "-np",
            "1",
            "-c",
            "1024",
        ],
        args,
    );
    assert!(
        out.status.success(),
        "spark trace record failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let req = &summary["requests"][0];
    let ids = |v: &serde_json::Value| -> Vec<u32> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|t| t.as_u64().unwrap() as u32)
            .collect()
    };
    let prompt = ids(&req["prompt_tokens"]);
    let generated = ids(&req["generated_tokens"]);
    assert!(prompt.len() >= 200, "prompt has {} tokens", prompt.len());
    assert_eq!(generated.len(), n_predict as usize);
    assert_eq!(summary["dropped"], 0);
    assert_eq!(summary["unmapped"], 0);

    // The recorded file is a valid trace for the rest of spark.
    let show = spark(&["trace", "show", trace.to_str().unwrap()]);
    assert!(
        show.status.success(),
        "spark trace show failed: {}",
        String::from_utf8_lossy(&show.stderr)
    );
    let jsonl = dir.path().join("analytic.jsonl");
    let conv = spark(&[
        "trace",
        "convert",
        trace.to_str().unwrap(),
        jsonl.to_str().unwrap(),
    ]);
    assert!(
        conv.status.success(),
        "spark trace convert failed: {}",
        String::from_utf8_lossy(&conv.stderr)
    );
    let steps = std::fs::read_to_string(&jsonl).unwrap().lines().count();
    assert_eq!(
        steps,
        prompt.len() + n_predict as usize - 1,
        "one JSONL line per evaluated token (prompt and decode)"
    );

    let records = read_records(&trace);
    let file = GgufFile::open(&model).unwrap();
    let (n_layer, k) = (
        summary["n_layer"].as_u64().unwrap() as usize,
        summary["k"].as_u64().unwrap() as usize,
    );
    let seq: Vec<u32> = prompt.iter().chain(&generated).copied().collect();
    let expected = spark::fixture::analytic_routing(&file, &seq).unwrap();
    let p = prompt.len() as u32;
    let decoded = n_predict - 1; // the last sampled token is never evaluated

    // Exactness: every captured (token, layer) expert set equals the independent one.
    let (mut compared, mut skipped) = (0usize, 0usize);
    let mut per_layer: BTreeMap<(u16, u8), Vec<u32>> = BTreeMap::new();
    let mut counts = vec![vec![0u64; 64]; n_layer];
    for r in &records {
        assert_eq!(r.request, 1);
        assert_eq!(usize::from(r.n_used), k);
        assert!(
            (r.token as usize) < seq.len(),
            "token position {} out of range",
            r.token
        );
        per_layer
            .entry((r.layer, r.phase))
            .or_default()
            .push(r.token);
        for &id in r.used_ids() {
            counts[usize::from(r.layer)][usize::from(id)] += 1;
        }
        let (want, margin) = &expected[r.token as usize][usize::from(r.layer)];
        if *margin < 1e-3 {
            skipped += 1;
            continue;
        }
        let mut got: Vec<u32> = r.used_ids().iter().map(|&i| u32::from(i)).collect();
        let mut want = want.clone();
        got.sort_unstable();
        want.sort_unstable();
        assert_eq!(
            got, want,
            "token {} (id {}) layer {}",
            r.token, seq[r.token as usize], r.layer
        );
        compared += 1;
    }
    eprintln!("exactness: {compared} (token, layer) pairs compared, {skipped} near-ties skipped");
    assert!(skipped * 100 <= compared, "too many near ties: {skipped}");

    // Token accounting: all prompt tokens at every layer but the last, which sees only the
    // output row; every evaluated decode token at every layer.
    for layer in 0..n_layer as u16 {
        let prompt_tokens = &per_layer[&(layer, PHASE_PROMPT)];
        let decode_tokens = &per_layer[&(layer, PHASE_DECODE)];
        if usize::from(layer) + 1 < n_layer {
            assert_eq!(*prompt_tokens, (0..p).collect::<Vec<_>>(), "layer {layer}");
        } else {
            assert_eq!(*prompt_tokens, vec![p - 1], "last layer");
        }
        assert_eq!(
            *decode_tokens,
            (p..p + decoded).collect::<Vec<_>>(),
            "layer {layer}"
        );
        let total: u64 = counts[usize::from(layer)].iter().sum();
        assert_eq!(
            total,
            ((prompt_tokens.len() + decode_tokens.len()) * k) as u64,
            "layer {layer}: per-expert counts must sum to tokens × k"
        );
    }
    summary
}

/// `spark ARGS -- … EXTRA` with `env` added: the llama-server flags in `extra` follow the ones
/// `args` already passes after its `--`.
fn spark_with(env: &[(&str, &str)], args: &[&str], extra: &[String]) -> std::process::Output {
    std::process::Command::new(crate::util::spark_bin())
        .args(args)
        .args(extra)
        .envs(env.iter().copied())
        .output()
        .expect("run spark")
}

/// Records of a binary trace, read with the proto layout only.
pub fn read_records(path: &Path) -> Vec<RoutingRecord> {
    let bytes = std::fs::read(path).unwrap();
    let hs = spark_proto::trace::HEADER_SIZE;
    let body = &bytes[hs..];
    assert_eq!(
        body.len() % spark_proto::trace::RECORD_SIZE,
        0,
        "truncated trace"
    );
    body.chunks_exact(spark_proto::trace::RECORD_SIZE)
        .map(bytemuck::pod_read_unaligned)
        .collect()
}

#[test]
fn control_channel_greets_answers_and_rejects_unknown_verbs() {
    let dir = tempdir();
    let model = fixture(dir.path(), "tiny.gguf", &[]);
    let mut s = session(dir.path(), &model, &["-np", "1"]);
    let g = s.greeting.clone().unwrap();
    assert_eq!(g.arch, "qwen3moe");
    assert_eq!((g.n_layer, g.n_expert, g.n_expert_used), (4, 8, 2));
    let c = s.control().unwrap();
    let t = Duration::from_secs(10);
    let lines =
        |c: &mut spark::control::ControlClient, l: &str| c.call_line(l, t).unwrap().to_line();
    // The golden error transcript, replayed against the real tap (its `stats` replies hold
    // live counters, so those lines are checked by shape only).
    let golden = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("proto/golden/control-errors.txt"),
    )
    .unwrap();
    let mut sent = None;
    for line in golden.lines() {
        if let Some(cmd) = line.strip_prefix("> ") {
            sent = Some(lines(c, cmd));
        } else if let Some(want) = line.strip_prefix("< ") {
            let got = sent
                .take()
                .expect("reply without command in the transcript");
            if want.starts_with("ok records=") {
                assert!(got.starts_with("ok records="), "{got}");
            } else {
                assert_eq!(got, want);
            }
        }
    }
    // Without SPARK_RESIDENCY_SLOTS the residency provider is off: plans are refused, the
    // counters say so.
    assert_eq!(
        lines(c, "want 1 - 3"),
        "err unavailable residency is off (SPARK_RESIDENCY_SLOTS not set)"
    );
    assert!(
        lines(c, "residency").starts_with("ok slots=0 layers=0 planned=0 calls=0"),
        "residency off reports zero slots"
    );
    // Its counters per layer: one page, nothing counted.
    assert_eq!(
        lines(c, "residency layers"),
        "ok seq=0 next=- totals=0,0,0,0,0,0 other=0,0,0,0,0,0"
    );
    assert_eq!(lines(c, "request 7"), "ok request=7");
    assert_eq!(
        lines(c, "frobnicate"),
        "err unknown-verb unknown verb \"frobnicate\""
    );
    assert_eq!(
        lines(c, "stats now"),
        "err bad-args stats takes no arguments"
    );
    let stats = c.stats(t).unwrap();
    // The server's warm-up already ran through the tap.
    assert_eq!(stats.moe_layers, 4);
    assert!(stats.records > 0);
    assert_eq!(lines(c, "reset"), "ok");
    assert_eq!(c.stats(t).unwrap().records, 0);
    s.discard();
    let mut recs = Vec::new();
    s.complete(7, &serde_json::json!("Hello there"), 4, &mut recs)
        .unwrap();
    assert!(!recs.is_empty());
    assert!(recs.iter().all(|r| r.request == 7));
    assert_eq!(lines(s.control().unwrap(), "quit"), "ok bye");
    assert_ring_is_anonymous(s.server().pid());
    s.stop();
}

/// Ring files named for this process in /dev/shm (the old, named rings).
pub fn named_rings_of(pid: u32) -> Vec<String> {
    std::fs::read_dir("/dev/shm")
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| {
            n.starts_with(&format!("spark-ring-{pid}-"))
                || n.starts_with(&format!("spark-hidden-{pid}-"))
        })
        .collect()
}

/// The tap mapped the rings from their inherited descriptors and closed those: llama-server
/// maps anonymous memory files, holds no descriptor of them, and nothing has a name in /dev/shm.
fn assert_ring_is_anonymous(server: u32) {
    let maps = std::fs::read_to_string(format!("/proc/{server}/maps")).unwrap();
    assert!(
        maps.lines().any(|l| l.contains("/memfd:spark-ring")),
        "llama-server maps the routing ring: {maps}"
    );
    let fds: Vec<String> = std::fs::read_dir(format!("/proc/{server}/fd"))
        .unwrap()
        .flatten()
        .filter_map(|e| std::fs::read_link(e.path()).ok())
        .map(|t| t.to_string_lossy().into_owned())
        .filter(|t| t.contains("spark-ring") || t.contains("spark-hidden"))
        .collect();
    assert!(
        fds.is_empty(),
        "the tap closes the ring descriptors: {fds:?}"
    );
    assert!(named_rings_of(std::process::id()).is_empty());
}

/// CPU time (clock ticks, user + system) a process has used, from /proc.
fn cpu_ticks(pid: i32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let num = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    num(11) + num(12)
}

#[test]
fn a_server_killed_mid_request_is_reported_not_waited_on() {
    let dir = tempdir();
    let model = fixture(dir.path(), "tiny.gguf", &[]);
    let mut s = session(dir.path(), &model, &["-np", "1", "-c", "4096"]);
    s.discard();
    let pid = s.server().pid() as i32;
    let start = cpu_ticks(pid);
    let killer = std::thread::spawn(move || {
        // Kill once the server is visibly working on the request (it has burnt CPU time).
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while cpu_ticks(pid) < start + 30 && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        )
        .unwrap();
    });
    let mut recs = Vec::new();
    let err = s
        .complete(
            1,
            &serde_json::json!("Tell me a long story"),
            3000,
            &mut recs,
        )
        .expect_err("the server was killed");
    killer.join().unwrap();
    let msg = err.to_string();
    assert!(
        msg.contains("llama-server exited during the request"),
        "unexpected error: {msg}"
    );
    assert!(
        !recs.is_empty(),
        "records captured before the crash are kept"
    );
    s.stop();
    assert!(
        named_rings_of(std::process::id()).is_empty(),
        "ring file left behind"
    );
}

/// Hidden-state capture on the analytic fixture: the router input at every layer is
/// `rmsnorm(embedding[token]) * ffn_norm[layer]`, so the captured vectors can be checked
/// against the file.
#[test]
fn hidden_states_are_sampled_and_match_the_router_input() {
    check_hidden_states(&llama_server(), &[], &[]);
}

/// A hidden-state file written by `spark trace record --hidden-every`: its header and chunks.
pub fn read_hidden(
    path: &Path,
) -> (
    spark_proto::ring::HiddenFileHeader,
    Vec<spark_proto::ring::HiddenChunk>,
) {
    let bytes = std::fs::read(path).unwrap();
    let header: spark_proto::ring::HiddenFileHeader = bytemuck::pod_read_unaligned(&bytes[..32]);
    assert_eq!(&header.magic, b"SPKHIDDN");
    let chunk_size = std::mem::size_of::<spark_proto::ring::HiddenChunk>();
    assert_eq!(bytes.len() - 32, header.count as usize * chunk_size);
    let chunks = bytes[32..]
        .chunks_exact(chunk_size)
        .map(bytemuck::pod_read_unaligned)
        .collect();
    (header, chunks)
}

/// Hidden-state capture through `server` (see [`check_analytic_routing`] for `args`, `env`).
pub fn check_hidden_states(server: &Path, args: &[String], env: &[(&str, &str)]) {
    let dir = tempdir();
    let model = fixture(dir.path(), "analytic.gguf", &["--router", "analytic"]);
    let trace = dir.path().join("h.trace");
    let out = spark_with(
        env,
        &[
            "trace",
            "record",
            "-m",
            model.to_str().unwrap(),
            "--out",
            trace.to_str().unwrap(),
            "--prompt",
            "The quick brown fox jumps over the lazy dog again and again",
            "--n-predict",
            "12",
            "--hidden-every",
            "2",
            "--llama-server",
            server.to_str().unwrap(),
            "--tap",
            tap_lib().to_str().unwrap(),
            "--json",
            "--",
            "-np",
            "1",
        ],
        args,
    );
    assert!(
        out.status.success(),
        "spark trace record failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let seq: Vec<u32> = ["prompt_tokens", "generated_tokens"]
        .iter()
        .flat_map(|k| summary["requests"][0][k].as_array().unwrap().clone())
        .map(|t| t.as_u64().unwrap() as u32)
        .collect();
    let (header, chunks) = read_hidden(&dir.path().join("h.trace.hidden"));
    assert!(!chunks.is_empty());

    let file = GgufFile::open(&model).unwrap();
    let f32s = |name: &str| -> Vec<f32> {
        let t = file.tensor(name).unwrap();
        spark::fixture::decode(file.tensor_data(t).unwrap(), t.ggml_type.unwrap()).unwrap()
    };
    let embd = f32s("token_embd.weight");
    let n = header.n_embd as usize;
    let mut layers_seen = std::collections::BTreeSet::new();
    for c in &chunks {
        assert_eq!(c.token % 2, 0, "only every 2nd token is sampled");
        assert_eq!((c.offset, c.len as usize), (0, n));
        layers_seen.insert(c.layer);
        let tok = seq[c.token as usize] as usize;
        let x = &embd[tok * n..(tok + 1) * n];
        let ss: f32 = x.iter().map(|v| v * v).sum::<f32>() / n as f32;
        let scale = 1.0 / (ss + spark::fixture::RMS_EPS).sqrt();
        let w = f32s(&format!("blk.{}.ffn_norm.weight", c.layer));
        for i in 0..n {
            let want = x[i] * scale * w[i];
            let got = c.values[i];
            assert!(
                (got - want).abs() <= 1e-4 * (1.0 + want.abs()),
                "token {} layer {} [{i}]: {got} vs {want}",
                c.token,
                c.layer
            );
        }
    }
    assert_eq!(layers_seen.len(), 4);
}

#[test]
fn trace_record_rejects_bad_input_with_one_line_and_exit_2() {
    let dir = tempdir();
    let out = dir.path().join("x.trace");
    let base = [
        "trace",
        "record",
        "-m",
        "/nonexistent.gguf",
        "--out",
        out.to_str().unwrap(),
    ];
    for (extra, needle) in [
        (&[][..], "give --prompt TEXT or --prompts FILE"),
        (
            &["--prompt", "hi", "--hidden-every", "0"][..],
            "--hidden-every 0",
        ),
        (
            &[
                "--prompt",
                "hi",
                "--hidden-every",
                "1",
                "--hidden-tensor",
                "ffn_up",
            ][..],
            "--hidden-tensor ffn_up",
        ),
        (
            &["--prompt", "hi", "--ring-capacity", "1000"][..],
            "--ring-capacity 1000",
        ),
        (
            &["--prompts", "/nonexistent/prompts.txt"][..],
            "read prompts",
        ),
        (
            &["--prompt", "hi", "--tap", "/nonexistent/libspark_tap.so"][..],
            "tap",
        ),
    ] {
        let mut args: Vec<&str> = base.to_vec();
        args.extend_from_slice(extra);
        let o = spark(&args);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(needle), "{args:?}: {err}");
        assert_eq!(err.trim_end().lines().count(), 1, "{args:?}: {err}");
        assert!(!out.exists());
    }
}

/// A dense two-layer llama model with the pinned vocabulary, so llama-server runs it.
fn dense_model(path: &Path) {
    use spark::gguf::{GgmlType, GgufWriter, Value};
    let vocab = GgufFile::open(&crate::util::default_vocab()).unwrap();
    let n_vocab = vocab
        .get("tokenizer.ggml.tokens")
        .and_then(Value::as_array)
        .unwrap()
        .len() as u64;
    let mut w = GgufWriter::new();
    w.set("general.architecture", Value::String("llama".into()));
    w.set("llama.block_count", Value::U32(2));
    w.set("llama.embedding_length", Value::U32(64));
    w.set("llama.feed_forward_length", Value::U32(128));
    w.set("llama.attention.head_count", Value::U32(4));
    w.set("llama.attention.head_count_kv", Value::U32(2));
    w.set("llama.context_length", Value::U32(2048));
    w.set("llama.attention.layer_norm_rms_epsilon", Value::F32(1e-6));
    for (key, value) in &vocab.metadata {
        if key.starts_with("tokenizer.") {
            w.set(key, value.clone());
        }
    }
    let mut t = |name: &str, dims: &[u64], fill: f32| {
        let n: u64 = dims.iter().product();
        let bytes: Vec<u8> = (0..n).flat_map(|_| fill.to_le_bytes()).collect();
        w.add_tensor(name, dims, GgmlType::F32, bytes);
    };
    t("token_embd.weight", &[64, n_vocab], 0.01);
    t("output_norm.weight", &[64], 1.0);
    t("output.weight", &[64, n_vocab], 0.0);
    for l in 0..2 {
        let b = |s: &str| format!("blk.{l}.{s}.weight");
        t(&b("attn_norm"), &[64], 1.0);
        t(&b("attn_q"), &[64, 64], 0.0);
        t(&b("attn_k"), &[64, 32], 0.0);
        t(&b("attn_v"), &[64, 32], 0.0);
        t(&b("attn_output"), &[64, 64], 0.0);
        t(&b("ffn_norm"), &[64], 1.0);
        t(&b("ffn_gate"), &[64, 128], 0.0);
        t(&b("ffn_up"), &[64, 128], 0.0);
        t(&b("ffn_down"), &[128, 64], 0.0);
    }
    w.write(path).unwrap();
}

#[test]
fn a_dense_model_loads_with_the_tap_and_reports_no_moe_layers() {
    let dir = tempdir();
    let model = dir.path().join("dense.gguf");
    dense_model(&model);
    let mut s = session(dir.path(), &model, &["-np", "1"]);
    let g = s.greeting.clone().unwrap();
    assert_eq!((g.arch.as_str(), g.n_expert), ("llama", 0));
    s.discard();
    let mut recs = Vec::new();
    s.complete(1, &serde_json::json!("Hello"), 4, &mut recs)
        .unwrap();
    assert!(recs.is_empty());
    let stats = s.control().unwrap().stats(Duration::from_secs(10)).unwrap();
    assert_eq!((stats.moe_layers, stats.records), (0, 0));
    let log = std::fs::read_to_string(dir.path().join("server.log")).unwrap();
    assert!(log.contains("no MoE layers"), "{log}");
    s.stop();

    let o = spark(&[
        "trace",
        "record",
        "-m",
        model.to_str().unwrap(),
        "--out",
        dir.path().join("d.trace").to_str().unwrap(),
        "--prompt",
        "Hello",
        "--llama-server",
        llama_server().to_str().unwrap(),
        "--tap",
        tap_lib().to_str().unwrap(),
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(err.contains("has no MoE layers"), "{err}");
    assert!(!dir.path().join("d.trace").exists());
}

#[test]
fn trace_record_stamps_each_prompt_of_a_prompts_file_with_its_request() {
    let dir = tempdir();
    let model = fixture(dir.path(), "tiny.gguf", &[]);
    let prompts = dir.path().join("prompts.txt");
    std::fs::write(
        &prompts,
        "First prompt here\n\nA second, longer prompt to follow\n",
    )
    .unwrap();
    let trace = dir.path().join("p.trace");
    let out = spark(&[
        "trace",
        "record",
        "-m",
        model.to_str().unwrap(),
        "--out",
        trace.to_str().unwrap(),
        "--prompts",
        prompts.to_str().unwrap(),
        "--n-predict",
        "5",
        "--llama-server",
        llama_server().to_str().unwrap(),
        "--tap",
        tap_lib().to_str().unwrap(),
        "--json",
        "--",
        "-np",
        "1",
    ]);
    assert!(
        out.status.success(),
        "spark trace record failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let requests = summary["requests"].as_array().unwrap();
    assert_eq!(requests.len(), 2, "the empty line is skipped");
    let records = read_records(&trace);
    for (i, req) in requests.iter().enumerate() {
        let id = i as u32 + 1;
        let p = req["prompt_tokens"].as_array().unwrap().len() as u32;
        let mine: Vec<&RoutingRecord> = records.iter().filter(|r| r.request == id).collect();
        assert_eq!(mine.len() as u64, req["records"].as_u64().unwrap());
        // Layer 0 sees every prompt token and the 4 evaluated generated tokens, in order.
        let layer0: Vec<u32> = mine
            .iter()
            .filter(|r| r.layer == 0)
            .map(|r| r.token)
            .collect();
        assert_eq!(layer0, (0..p + 4).collect::<Vec<_>>(), "request {id}");
    }
    assert_eq!(records.len() as u64, summary["records"].as_u64().unwrap());
}
