//! `spark calibrate` and `spark validate`: end to end on a tiny fixture with the built-in
//! synthetic corpus, resumability after a kill, and the hard timeouts with fake llama-servers
//! (a never-ready one, one that stalls mid-answer, one that dies), each of which must end with
//! the right exit code and leave no process behind. A run that ignores its deadline hangs past
//! `util::HANG_LIMIT` (the defaults it would fall back to are longer) and fails; how long past
//! the deadline a loaded machine took is printed, never asserted.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::util::{alive, fixture, spark, spark_bin, tempdir, write_script};

/// A fake llama-server: answers /health, greets on the tap's control channel, answers
/// /tokenize; on /completion it stalls (FAKE_MODE=stall, after the headers and part of the
/// body), exits (FAKE_MODE=die), or answers in full with four generated tokens but never writes
/// a routing record (FAKE_MODE=answer). Writes its pid to $FAKE_PID, and `$FAKE_PID.completion`
/// when a completion arrives.
pub const FAKE_SERVER: &str = r#"#!/usr/bin/env python3
import json, os, socket, sys, threading, time
from http.server import ThreadingHTTPServer, BaseHTTPRequestHandler

mode = os.environ.get("FAKE_MODE", "stall")
pid_file = os.environ["FAKE_PID"]
with open(pid_file, "w") as f:
    f.write(str(os.getpid()))
args = sys.argv[1:]
port = int(args[args.index("--port") + 1])

def control():
    s = socket.socket(fileno=int(os.environ["SPARK_CONTROL_FD"]))
    s.sendall(b"spark-tap 1 arch=qwen3moe n_layer=2 n_expert=8 n_expert_used=2 n_embd=64\n")
    buf = b""
    while True:
        data = s.recv(4096)
        if not data:
            return
        buf += data
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            if line == b"stats":
                s.sendall(b"ok records=0 dropped=0 moe_layers=2 ubatches=0 hidden_bytes=0 unmapped=0 graph_reads=0\n")
            else:
                s.sendall(b"ok\n")

threading.Thread(target=control, daemon=True).start()

class H(BaseHTTPRequestHandler):
    def log_message(self, *a):
        pass
    def reply(self, obj):
        body = json.dumps(obj).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def do_GET(self):
        self.reply({"status": "ok"})
    def do_POST(self):
        n = int(self.headers.get("Content-Length", "0"))
        self.rfile.read(n)
        if self.path == "/tokenize":
            self.reply({"tokens": [1, 2, 3, 4, 5]})
            return
        with open(pid_file + ".completion", "w") as f:
            f.write("1")
        if mode == "die":
            os._exit(3)
        if mode == "answer":
            self.reply({"content": "abcd", "tokens": [7, 8, 9, 10],
                        "timings": {"prompt_per_second": 500.0, "predicted_per_second": 50.0}})
            return
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", "100000")
        self.end_headers()
        self.wfile.write(b'{"content": "')
        self.wfile.flush()
        time.sleep(3600)

ThreadingHTTPServer(("127.0.0.1", port), H).serve_forever()
"#;

/// A fake llama-server that never answers /health.
const NEVER_READY: &str = "#!/bin/sh\necho $$ > \"$FAKE_PID\"\nexec sleep 600\n";

fn read_pid(path: &Path) -> u32 {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
        .trim()
        .parse()
        .unwrap()
}

/// Model and corpus shared by one test.
struct Setup {
    dir: tempfile::TempDir,
    model: PathBuf,
    corpus: PathBuf,
}

fn setup() -> Setup {
    let dir = tempdir();
    let model = fixture(dir.path(), "tiny.gguf", &["--router", "skewed"]);
    let corpus = spark::sessions::synth::demo_corpus(&dir.path().join("demo"))
        .expect("demo corpus")
        .dir()
        .to_path_buf();
    Setup { dir, model, corpus }
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn calibrate_cmd(st: &Setup, out: &Path) -> Command {
    calibrate_chunks(st, out, "5", &[])
}

/// `spark calibrate` of at most `max_chunks` chunks, with `flags` before the server's arguments.
fn calibrate_chunks(st: &Setup, out: &Path, max_chunks: &str, flags: &[&str]) -> Command {
    let mut c = Command::new(spark_bin());
    c.args([
        "calibrate",
        "-m",
        s(&st.model),
        "--corpus",
        s(&st.corpus),
        "-o",
        s(out),
        "--max-chunks",
        max_chunks,
        "--chunk-tokens",
        "96",
        "--n-gen",
        "4",
    ]);
    c.args(flags).args(["--", "-t", "2"]);
    c
}

fn validate_args<'a>(st: &'a Setup, profile: &'a Path, report: &'a Path) -> Vec<&'a str> {
    vec![
        "validate",
        "-m",
        s(&st.model),
        "--profile",
        s(profile),
        "--corpus",
        s(&st.corpus),
        "--report",
        s(report),
        "--slots",
        "3",
        "--max-chunks",
        "2",
        "--chunk-tokens",
        "96",
        "--n-gen",
        "6",
    ]
}

/// The profile's count rows (comment lines carry the update time and differ).
fn count_rows(profile: &Path) -> Vec<String> {
    std::fs::read_to_string(profile)
        .unwrap()
        .lines()
        .filter(|l| !l.starts_with('#'))
        .map(str::to_string)
        .collect()
}

fn report_json(dir: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(dir.join("report.json")).expect("report.json written");
    serde_json::from_str(&text).unwrap()
}

#[test]
fn calibrate_then_validate_end_to_end() {
    let st = setup();
    let profile = st.dir.path().join("tiny.spark.csv");
    let o = calibrate_cmd(&st, &profile).output().unwrap();
    assert!(
        o.status.success(),
        "calibrate: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("tok/s") && err.contains("ETA"), "{err}");
    let p = spark::profile::Profile::read(&profile).unwrap();
    let fp = {
        let f = spark::gguf::GgufFile::open(&st.model).unwrap();
        spark::gguf::MoeGeometry::of(&f)
            .unwrap()
            .fingerprint
            .to_string()
    };
    assert!(p.is_fresh_for(&fp));
    assert!(p.counts.total() > 0);
    let trace_path = st.dir.path().join("tiny.spark.csv.trace");
    let trace = spark::trace::Trace::read(&trace_path, None).unwrap();
    // Every record's experts are counted in the profile, nothing else.
    let mut counts = spark::cache::Counts::of(&trace.prompt, trace.n_expert as usize);
    counts.add(&trace.decode);
    assert_eq!(counts, p.counts);
    assert!(trace.decode.steps() > 0);
    // The state stays for a later, longer run; the records it held are in the trace now.
    assert!(spark::validate::calibrate::state_path(&profile).exists());
    assert_eq!(
        std::fs::metadata(spark::validate::calibrate::records_path(&profile))
            .unwrap()
            .len(),
        0
    );

    let report = st.dir.path().join("report");
    let o = spark(&validate_args(&st, &profile, &report));
    assert!(
        o.status.success(),
        "validate: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    // No thresholds: the scores are measured, nothing is passed.
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(
        stdout.contains("report.md: measured: ") && !stdout.contains(": pass"),
        "{stdout}"
    );
    let r = report_json(&report);
    assert_eq!(r["status"], "measured");
    assert_eq!(r["chunks"].as_array().unwrap().len(), 2);
    for c in r["chunks"].as_array().unwrap() {
        assert!(c["prompt_tps"].as_f64().unwrap() > 0.0, "{c}");
        assert!(c["decode_tps"].as_f64().unwrap() > 0.0, "{c}");
    }
    let rows = r["decode"]["rows"].as_array().unwrap();
    let names: Vec<&str> = rows.iter().map(|x| x["set"].as_str().unwrap()).collect();
    assert_eq!(
        names,
        [
            "uniform",
            "calibrated static",
            "pinned + cache",
            "spark",
            "belady bound"
        ]
    );
    let belady = rows[4]["cold"].as_u64().unwrap();
    for row in rows {
        assert!(row["cold"].as_u64().unwrap() >= belady, "{row}");
        assert_eq!(row["lookups"], rows[0]["lookups"]);
    }
    let md = std::fs::read_to_string(report.join("report.md")).unwrap();
    assert!(md.contains("| belady bound |"), "{md}");
    assert!(report.join("cold_rate.svg").exists());

    // A budget buys whole slots: 4 layers × 48 KiB per slot, so 0.5 MiB buys 2.
    let mut args = validate_args(&st, &profile, &report);
    let i = args.iter().position(|a| *a == "--slots").unwrap();
    args.splice(i..i + 2, ["--budget-mib", "0.5"]);
    let o = spark(&args);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(report_json(&report)["slots"], 2);

    // A threshold any score meets: pass.
    let mut args = validate_args(&st, &profile, &report);
    args.extend(["--min-hit-ratio", "0"]);
    let o = spark(&args);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(report_json(&report)["status"], "pass");
    assert!(String::from_utf8_lossy(&o.stdout).contains("report.md: pass: "));

    // A threshold nobody can meet at 3 of 8 slots: exit 1, report says fail, and the run that
    // finished is not said to have ended early.
    let mut args = validate_args(&st, &profile, &report);
    args.extend(["--min-hit-ratio", "1.0"]);
    let o = spark(&args);
    assert_eq!(
        o.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert_eq!(report_json(&report)["status"], "fail");
    let md = std::fs::read_to_string(report.join("report.md")).unwrap();
    assert!(
        md.contains("fail: missed spark hit ratio ≥ --min-hit-ratio (limit 1, value"),
        "{md}"
    );
    assert!(!md.contains("nded early"), "{md}");

    // A profile for another model is refused as input.
    let other = fixture(st.dir.path(), "other.gguf", &["--layers", "3"]);
    let mut args = validate_args(&st, &profile, &report);
    args[2] = s(&other);
    let o = spark(&args);
    assert_eq!(
        o.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
}

#[test]
fn calibrate_resumes_after_a_kill_without_double_counting() {
    let st = setup();
    let whole = st.dir.path().join("whole.spark.csv");
    let o = calibrate_cmd(&st, &whole).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));

    let part = st.dir.path().join("part.spark.csv");
    let state = spark::validate::calibrate::state_path(&part);
    let mut child = calibrate_cmd(&st, &part)
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let done = std::fs::read_to_string(&state)
            .ok()
            .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
            .map_or(0, |v| v["done"].as_object().map_or(0, |m| m.len()));
        if done >= 2 {
            break;
        }
        assert!(
            child.try_wait().unwrap().is_none(),
            "calibrate ended before it could be killed"
        );
        assert!(Instant::now() < deadline, "no progress in the state file");
        std::thread::sleep(Duration::from_millis(20));
    }
    // A second calibration of the same profile meanwhile is refused.
    let o = calibrate_cmd(&st, &part).output().unwrap();
    assert_eq!(
        o.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(String::from_utf8_lossy(&o.stderr).contains("another calibration"));
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(!part.exists(), "no profile before every chunk is done");

    let o = calibrate_cmd(&st, &part).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("resuming"), "{err}");
    assert_eq!(count_rows(&part), count_rows(&whole));
    let a = spark::trace::Trace::read(&st.dir.path().join("whole.spark.csv.trace"), None).unwrap();
    let b = spark::trace::Trace::read(&st.dir.path().join("part.spark.csv.trace"), None).unwrap();
    assert_eq!(a.records().len(), b.records().len());
    let (pa, pb) = (
        spark::profile::Profile::read(&whole).unwrap(),
        spark::profile::Profile::read(&part).unwrap(),
    );
    assert_eq!(pa.tokens, pb.tokens);
}

#[test]
fn extending_a_finished_calibration_replays_only_the_new_chunks() {
    let st = setup();
    let whole = st.dir.path().join("whole.spark.csv");
    let o = calibrate_cmd(&st, &whole).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));

    // Three chunks, finished; then the same profile asked for five.
    let part = st.dir.path().join("part.spark.csv");
    let o = calibrate_chunks(&st, &part, "3", &[]).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stdout).contains("3 train chunks (3 replayed now)"));
    let o = calibrate_cmd(&st, &part).output().unwrap();
    let (out, err) = (
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr),
    );
    assert!(o.status.success(), "{err}");
    assert!(err.contains("3 of 5 chunks already done"), "{err}");
    assert!(out.contains("5 train chunks (2 replayed now)"), "{out}");
    assert_eq!(
        err.matches("calibrate: ").count() - 1,
        2,
        "two progress lines: {err}"
    );
    // The same profile and trace as one run of five.
    assert_eq!(count_rows(&part), count_rows(&whole));
    let (pa, pb) = (
        spark::profile::Profile::read(&whole).unwrap(),
        spark::profile::Profile::read(&part).unwrap(),
    );
    assert_eq!(pa.tokens, pb.tokens);
    let a = spark::trace::Trace::read(&st.dir.path().join("whole.spark.csv.trace"), None).unwrap();
    let b = spark::trace::Trace::read(&st.dir.path().join("part.spark.csv.trace"), None).unwrap();
    assert_eq!(a.records().len(), b.records().len());
    assert_eq!(a.decode.steps(), b.decode.steps());

    // Nothing new: no server is started (this one could not start), the outputs stay; and a
    // closed stdout ends the run quietly with 141, not a panic.
    let (read, write_end) = nix::unistd::pipe().unwrap();
    drop(read);
    let nowhere = ["--llama-server", "/nonexistent/llama-server"];
    let o = calibrate_chunks(&st, &part, "5", &[&nowhere[..], &["--quiet"]].concat())
        .stdout(Stdio::from(write_end))
        .output()
        .unwrap();
    assert_eq!(
        o.status.code(),
        Some(141),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(
        o.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert_eq!(count_rows(&part), count_rows(&whole));

    // A trace changed behind the state's back cannot stand for the done chunks: start over.
    let trace = st.dir.path().join("part.spark.csv.trace");
    let bytes = std::fs::read(&trace).unwrap();
    std::fs::write(&trace, &bytes[..bytes.len() - 1]).unwrap();
    let o = calibrate_chunks(&st, &part, "5", &nowhere)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{err}");
    assert!(err.contains("starting over"), "{err}");
}

/// Runs validate against a fake server; returns (exit code, seconds, report, fake's pid file).
fn run_fake(
    st: &Setup,
    profile: &Path,
    server: &Path,
    mode: &str,
    flags: &[&str],
) -> (Option<i32>, f64, serde_json::Value, PathBuf) {
    // Ends within HANG_LIMIT or fails: the deadline under test fired (exit 124 and the report
    // name it); how many seconds past it a loaded machine took is printed, never asserted.
    let report = st.dir.path().join(format!("report-{mode}"));
    let pid_file = st.dir.path().join(format!("fake-{mode}.pid"));
    let mut args = validate_args(st, profile, &report);
    args.extend(["--llama-server", s(server)]);
    args.extend_from_slice(flags);
    let (o, took) = crate::util::output_within(
        Command::new(spark_bin())
            .args(&args)
            .env("FAKE_MODE", mode)
            .env("FAKE_PID", &pid_file),
        crate::util::HANG_LIMIT,
    );
    let secs = took.as_secs_f64();
    eprintln!(
        "fake {mode}: exit {:?} after {secs:.2} s: {}",
        o.status.code(),
        String::from_utf8_lossy(&o.stderr)
    );
    (o.status.code(), secs, report_json(&report), pid_file)
}

/// A profile for the fixture without running a real calibration.
fn flat_profile(st: &Setup) -> PathBuf {
    let f = spark::gguf::GgufFile::open(&st.model).unwrap();
    let g = spark::gguf::MoeGeometry::of(&f).unwrap();
    let mut c = spark::cache::Counts::zero(g.n_layer as usize, g.n_expert as usize);
    for l in 0..g.n_layer as usize {
        for e in 0..g.n_expert as usize {
            c.set(l, e, (e as u64 + 1) * 3);
        }
    }
    let p = st.dir.path().join("flat.spark.csv");
    spark::profile::Profile::new(c, g.n_expert_used, Some(g.fingerprint.to_string()))
        .write(&p)
        .unwrap();
    p
}

#[test]
fn validate_times_out_on_a_server_that_never_becomes_ready() {
    let st = setup();
    let profile = flat_profile(&st);
    let server = write_script(st.dir.path(), "never-ready.sh", NEVER_READY);
    let (code, _secs, r, pid_file) =
        run_fake(&st, &profile, &server, "never", &["--ready-timeout", "2"]);
    assert_eq!(code, Some(124));
    assert_eq!(r["status"], "timeout");
    assert!(
        !alive(read_pid(&pid_file)),
        "the fake server outlived spark"
    );
}

#[test]
fn validate_times_out_on_a_request_that_stalls_mid_answer() {
    let st = setup();
    let profile = flat_profile(&st);
    let server = write_script(st.dir.path(), "fake-server.py", FAKE_SERVER);
    let (code, _secs, r, pid_file) =
        run_fake(&st, &profile, &server, "stall", &["--request-timeout", "2"]);
    assert_eq!(code, Some(124));
    assert_eq!(r["status"], "timeout");
    assert!(pid_file.with_extension("pid.completion").exists());
    assert!(
        !alive(read_pid(&pid_file)),
        "the fake server outlived spark"
    );
}

#[test]
fn validate_ends_on_the_whole_run_deadline() {
    let st = setup();
    let profile = flat_profile(&st);
    let server = write_script(st.dir.path(), "fake-server.py", FAKE_SERVER);
    let (code, _secs, r, pid_file) = run_fake(
        &st,
        &profile,
        &server,
        "stall",
        &["--request-timeout", "600", "--deadline", "2"],
    );
    assert_eq!(code, Some(124));
    assert_eq!(r["status"], "timeout");
    assert!(
        !alive(read_pid(&pid_file)),
        "the fake server outlived spark"
    );
}

#[test]
fn validate_reports_a_server_that_dies() {
    let st = setup();
    let profile = flat_profile(&st);
    let server = write_script(st.dir.path(), "fake-server.py", FAKE_SERVER);
    let (code, _secs, r, pid_file) =
        run_fake(&st, &profile, &server, "die", &["--request-timeout", "5"]);
    assert_eq!(code, Some(1));
    assert_eq!(r["status"], "error");
    assert!(r["error"].as_str().unwrap().contains("exited"), "{r}");
    assert!(!alive(read_pid(&pid_file)));
}

#[test]
fn validate_fails_when_the_server_answers_but_nothing_is_scored() {
    let st = setup();
    let profile = flat_profile(&st);
    let server = write_script(st.dir.path(), "fake-server.py", FAKE_SERVER);
    // No thresholds (it used to pass with exit 0), then thresholds any score would meet.
    for flags in [
        &[][..],
        &["--min-hit-ratio", "0", "--max-cold-rate", "1"][..],
    ] {
        let (code, _secs, r, _pid) = run_fake(&st, &profile, &server, "answer", flags);
        assert_eq!(code, Some(1), "{r}");
        assert_eq!(r["status"], "fail", "{r}");
        assert_eq!(
            r["chunks"].as_array().unwrap().len(),
            2,
            "every chunk answered: {r}"
        );
        let verdict = r["verdict"].as_str().unwrap();
        assert!(
            verdict.starts_with("fail: no decode token was scored: the server answered 2 of 2 chunks, it generated 8 tokens but no routing was captured"),
            "{verdict}"
        );
        let md = std::fs::read_to_string(st.dir.path().join("report-answer/report.md")).unwrap();
        assert!(
            md.starts_with(&format!("# spark validate: fail\n\n{verdict}\n")),
            "{md}"
        );
        assert!(!md.contains("nded early"), "the run finished: {md}");
    }
}

/// Kills `child` with `signal` once `marker` exists.
fn signal_when(child: &mut Child, marker: &Path, signal: nix::sys::signal::Signal) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !marker.exists() {
        assert!(child.try_wait().unwrap().is_none(), "validate ended early");
        assert!(
            Instant::now() < deadline,
            "the fake server got no completion"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), signal).unwrap();
}

fn spawn_fake_validate(
    st: &Setup,
    profile: &Path,
    server: &Path,
    tag: &str,
) -> (Child, PathBuf, PathBuf) {
    let report = st.dir.path().join(format!("report-{tag}"));
    let pid_file = st.dir.path().join(format!("fake-{tag}.pid"));
    let mut args = validate_args(st, profile, &report);
    args.extend(["--llama-server", s(server), "--request-timeout", "120"]);
    let child = Command::new(spark_bin())
        .args(&args)
        .env("FAKE_MODE", "stall")
        .env("FAKE_PID", &pid_file)
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    (child, report, pid_file)
}

#[test]
fn a_sigkilled_validate_leaves_no_child() {
    let st = setup();
    let profile = flat_profile(&st);
    let server = write_script(st.dir.path(), "fake-server.py", FAKE_SERVER);
    let (mut child, _report, pid_file) = spawn_fake_validate(&st, &profile, &server, "sigkill");
    signal_when(
        &mut child,
        &pid_file.with_extension("pid.completion"),
        nix::sys::signal::Signal::SIGKILL,
    );
    child.wait().unwrap();
    let pid = read_pid(&pid_file);
    // The parent-death signal is delivered by the kernel when spark dies; give it a moment.
    let deadline = Instant::now() + Duration::from_secs(10);
    while alive(pid) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        !alive(pid),
        "llama-server {pid} outlived a SIGKILLed validate"
    );
}

#[test]
fn ctrl_c_writes_a_partial_report_and_kills_the_child() {
    let st = setup();
    let profile = flat_profile(&st);
    let server = write_script(st.dir.path(), "fake-server.py", FAKE_SERVER);
    let (mut child, report, pid_file) = spawn_fake_validate(&st, &profile, &server, "sigint");
    signal_when(
        &mut child,
        &pid_file.with_extension("pid.completion"),
        nix::sys::signal::Signal::SIGINT,
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "validate ignored SIGINT");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(status.code(), Some(130));
    assert_eq!(report_json(&report)["status"], "interrupted");
    assert!(!alive(read_pid(&pid_file)));
}

#[test]
fn concurrent_validations_do_not_collide() {
    let st = setup();
    let profile = flat_profile(&st);
    let server = write_script(st.dir.path(), "fake-server.py", FAKE_SERVER);
    let mut runs: Vec<_> = ["c1", "c2"]
        .iter()
        .map(|tag| {
            let report = st.dir.path().join(format!("report-{tag}"));
            let pid_file = st.dir.path().join(format!("fake-{tag}.pid"));
            let mut args = validate_args(&st, &profile, &report);
            args.extend(["--llama-server", s(&server), "--request-timeout", "2"]);
            let child = Command::new(spark_bin())
                .args(&args)
                .env("FAKE_MODE", "stall")
                .env("FAKE_PID", &pid_file)
                .stderr(Stdio::null())
                .spawn()
                .unwrap();
            (child, report, pid_file)
        })
        .collect();
    for (child, report, pid_file) in &mut runs {
        assert_eq!(child.wait().unwrap().code(), Some(124));
        assert_eq!(report_json(report)["status"], "timeout");
        assert!(!alive(read_pid(pid_file)));
    }
    assert_ne!(read_pid(&runs[0].2), read_pid(&runs[1].2));
}

#[test]
fn demo_loop_calibrates_and_validates_the_builtin_corpus() {
    let dir = tempdir();
    let model = fixture(dir.path(), "tiny.gguf", &["--router", "skewed"]);
    let engine = spark::engine::Engine::locate(Some(&crate::util::llama_server())).unwrap();
    let t0 = Instant::now();
    let s = spark::validate::demo_loop(&model, &engine, &dir.path().join("demo")).unwrap();
    eprintln!(
        "demo loop: {:.1} s\n{}",
        t0.elapsed().as_secs_f64(),
        s.render()
    );
    assert_eq!(s.validate.report.status, "measured");
    assert!(s.calibrate.chunks > 0 && s.profile.exists());
    assert!(s.render().contains("| spark |"));
}

#[test]
fn ctrl_c_while_the_server_starts_ends_the_run_and_the_child() {
    let st = setup();
    let profile = flat_profile(&st);
    let server = write_script(st.dir.path(), "never-ready.sh", NEVER_READY);
    let report = st.dir.path().join("report-starting");
    let pid_file = st.dir.path().join("fake-starting.pid");
    let mut args = validate_args(&st, &profile, &report);
    args.extend(["--llama-server", s(&server), "--ready-timeout", "300"]);
    let mut child = Command::new(spark_bin())
        .args(&args)
        .env("FAKE_PID", &pid_file)
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    signal_when(&mut child, &pid_file, nix::sys::signal::Signal::SIGINT);
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "validate waited for the server's ready timeout"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(status.code(), Some(130));
    assert_eq!(report_json(&report)["status"], "interrupted");
    let pid = read_pid(&pid_file);
    let deadline = Instant::now() + Duration::from_secs(10);
    while alive(pid) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        !alive(pid),
        "the starting server outlived an interrupted validate"
    );
}
