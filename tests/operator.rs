//! An operator's day (issue 26) and a failing stderr (issue 27): profiles merged and diffed
//! across machines, logs with levels and JSON, every serve flag from `SPARK_*`, systemd
//! notifications on a datagram socket, progress bars on a terminal and plain lines elsewhere,
//! completions and man pages, and a stderr that is full or closed never taking spark down.

use std::io::Read as _;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::util::{self, fixture, spark, spark_bin, tempdir, write_script};

/// A stand-in llama-server: answers `/health` and every POST at once, logs one line per request
/// on stderr (`fake-llama: …`), and writes the `LLAMA_ARG_*` and `SPARK_*` variables it got
/// to `$FAKE_ENV_OUT` when that is set.
const FAKE: &str = r#"#!/usr/bin/env python3
import json, os, sys
from http.server import ThreadingHTTPServer, BaseHTTPRequestHandler
args = sys.argv[1:]
port = int(args[args.index("--port") + 1])
out = os.environ.get("FAKE_ENV_OUT")
if out:
    with open(out + ".tmp", "w") as f:
        json.dump({k: v for k, v in os.environ.items() if k.startswith(("LLAMA_ARG_", "SPARK_"))}, f)
    os.rename(out + ".tmp", out)
sys.stderr.write("fake-llama: listening on %d\n" % port)
sys.stderr.flush()
class H(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def log_message(self, fmt, *a):
        sys.stderr.write("fake-llama: " + (fmt % a) + "\n")
        sys.stderr.flush()
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
        self.rfile.read(int(self.headers.get("Content-Length", "0")))
        self.reply({"content": "hi", "tokens_predicted": 2, "timings": {"predicted_n": 2, "predicted_per_second": 50.0}})
ThreadingHTTPServer(("127.0.0.1", port), H).serve_forever()
"#;

/// A port nobody listens on now.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A model and the fake server in `dir`.
fn setup(dir: &Path) -> (PathBuf, PathBuf) {
    let model = fixture(dir, "m.gguf", &[]);
    let fake = write_script(dir, "fake-llama-server", FAKE);
    (model, fake)
}

/// `spark serve` of `model` with the fake, on `port`, without the tap; `configure` sets the
/// rest (stderr, env, flags).
fn serve_cmd(model: &Path, fake: &Path, port: u16) -> Command {
    let mut cmd = Command::new(spark_bin());
    cmd.args(["serve", "-m", model.to_str().unwrap(), "--no-tap"])
        .args(["--port", &port.to_string()])
        .args(["--llama-server", fake.to_str().unwrap()])
        .args(["--hang-timeout", "0", "--ready-timeout", "30"])
        .stdin(Stdio::null())
        .stdout(Stdio::null());
    cmd
}

/// Kills spark when the test ends, however it ends.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn get(port: u16, route: &str) -> Result<Value, String> {
    ureq::get(&format!("http://127.0.0.1:{port}{route}"))
        .timeout(Duration::from_secs(5))
        .call()
        .map_err(|e| e.to_string())?
        .into_json()
        .map_err(|e| e.to_string())
}

/// Polls `/spark/status` until `want` holds (60 s at most); the last status.
fn wait_status(port: u16, child: &mut Child, want: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut last = Value::Null;
    while Instant::now() < deadline {
        if let Some(rc) = child.try_wait().unwrap() {
            panic!("spark exited ({rc}) while the test waited; last status {last}");
        }
        if let Ok(s) = get(port, "/spark/status") {
            if want(&s) {
                return s;
            }
            last = s;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("status never got there within 60 s: {last}");
}

fn ready(s: &Value) -> bool {
    s["child"]["state"] == "ready"
}

fn complete(port: u16) -> u16 {
    ureq::post(&format!("http://127.0.0.1:{port}/completion"))
        .timeout(Duration::from_secs(10))
        .send_json(serde_json::json!({"prompt": "hi", "n_predict": 2}))
        .map(|r| r.status())
        .unwrap_or_else(|e| match e {
            ureq::Error::Status(c, _) => c,
            e => panic!("completion: {e}"),
        })
}

fn kill(pid: u64) {
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    );
}

// ---- a stderr that is full or closed never takes spark down (issue 27) ----

/// Serves, answers, and restarts a killed llama-server with stderr failing on every write.
fn serves_and_restarts_with(stderr: Stdio, quiet: bool) {
    let dir = tempdir();
    let (model, fake) = setup(dir.path());
    let port = free_port();
    let mut cmd = serve_cmd(&model, &fake, port);
    if quiet {
        cmd.arg("--quiet");
    }
    let mut spark = Killed(cmd.stderr(stderr).spawn().unwrap());
    let s = wait_status(port, &mut spark.0, ready);
    assert_eq!(complete(port), 200);
    let first = s["child"]["pid"].as_u64().unwrap();
    kill(first);
    // The keeper logs the death and restarts the child; a panicking log line would leave it
    // `restarting` with 0 restarts forever.
    let s = wait_status(port, &mut spark.0, |s| {
        ready(s) && s["child"]["restarts"].as_u64() >= Some(1)
    });
    assert_ne!(s["child"]["pid"].as_u64().unwrap(), first);
    assert_eq!(complete(port), 200);
    assert!(
        s["log"]["dropped_lines"].as_u64().unwrap_or(0) > 0,
        "the failed writes are counted: {}",
        s["log"]
    );
}

#[test]
fn serve_with_a_full_stderr_keeps_serving_and_restarting() {
    let full = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/full")
        .unwrap();
    serves_and_restarts_with(Stdio::from(full), false);
}

#[test]
fn serve_with_a_closed_stderr_pipe_keeps_serving_and_restarting_even_quiet() {
    // A pipe whose reader is gone: every write gets EPIPE.
    let (reader, writer) = nix::unistd::pipe().unwrap();
    drop(reader);
    serves_and_restarts_with(Stdio::from(writer), true);
}

#[test]
fn inspect_into_a_full_stdout_fails_in_one_line_without_a_backtrace() {
    let dir = tempdir();
    let model = fixture(dir.path(), "m.gguf", &[]);
    let full = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/full")
        .unwrap();
    let o = Command::new(spark_bin())
        .args(["inspect", model.to_str().unwrap()])
        .stdout(full)
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        !err.contains("panicked") && !err.contains("backtrace"),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("No space left on device"), "{err}");
}

// ---- logs: levels, JSON, llama-server's lines tagged, nothing twice ----

/// Runs serve until it answered one completion, then stops it with SIGTERM; its stderr.
fn serve_log(extra: &[&str], env: &[(&str, &str)]) -> String {
    let dir = tempdir();
    let (model, fake) = setup(dir.path());
    let port = free_port();
    let mut cmd = serve_cmd(&model, &fake, port);
    cmd.args(extra).envs(env.iter().copied());
    let mut spark = Killed(cmd.stderr(Stdio::piped()).spawn().unwrap());
    wait_status(port, &mut spark.0, ready);
    assert_eq!(complete(port), 200);
    // The forwarder tails llama-server's log every 200 ms: let it catch up.
    std::thread::sleep(Duration::from_millis(800));
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(spark.0.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let mut err = String::new();
    spark
        .0
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    let rc = spark.0.wait().unwrap();
    assert!(rc.success(), "{rc}: {err}");
    err
}

#[test]
fn text_log_keeps_the_old_lines_and_tags_llama_server() {
    let err = serve_log(&[], &[]);
    let serving: Vec<_> = err
        .lines()
        .filter(|l| l.starts_with("spark: serving "))
        .collect();
    assert_eq!(serving.len(), 1, "printed once: {err}");
    assert!(err.contains("spark: placement "), "{err}");
    assert!(err.contains("spark: SIGTERM, shutting down"), "{err}");
    assert!(
        err.contains("[llama-server] fake-llama: listening on"),
        "{err}"
    );
    assert!(
        err.contains("[llama-server] fake-llama: \"POST /completion"),
        "{err}"
    );
    for l in err.lines() {
        assert!(
            l.starts_with("spark: ") || l.starts_with("[llama-server] "),
            "every line is spark's or llama-server's: {l:?}"
        );
    }
}

#[test]
fn json_log_has_levels_targets_and_llama_server_lines() {
    let err = serve_log(&["--log-format", "json"], &[]);
    let events: Vec<Value> = err
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l:?}")))
        .collect();
    let msgs = |pred: &dyn Fn(&Value) -> bool| events.iter().filter(|e| pred(e)).count();
    assert_eq!(
        msgs(&|e| e["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("serving "))
            && e["level"] == "INFO"
            && e["target"]
                .as_str()
                .is_some_and(|t| t.starts_with("spark::serve"))),
        1,
        "{err}"
    );
    assert!(
        msgs(&|e| e["target"] == "llama_server"
            && e["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("fake-llama: ")))
            >= 2,
        "{err}"
    );
    assert!(events.iter().all(|e| e["timestamp"].is_string()), "{err}");
}

#[test]
fn log_level_from_env_and_the_flag_wins() {
    // SPARK_LOG=warn hides the info lines; llama-server's too.
    let err = serve_log(&[], &[("SPARK_LOG", "warn")]);
    assert!(!err.contains("spark: serving"), "{err}");
    assert!(!err.contains("[llama-server]"), "{err}");
    // The flag beats the variable; per-target directives: spark's info, llama-server off.
    let err = serve_log(
        &["--log-level", "info,llama_server=off"],
        &[("SPARK_LOG", "warn")],
    );
    assert!(err.contains("spark: serving"), "{err}");
    assert!(!err.contains("[llama-server]"), "{err}");
    // A bad filter is a usage error naming it.
    let o = spark(&["--log-level", "spark=loud", "profile", "show", "x.csv"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("spark=loud"));
}

// ---- every serve flag from SPARK_*; LLAMA_ARG_* untouched ----

#[test]
fn serve_flags_come_from_spark_variables_and_flags_win() {
    let dir = tempdir();
    let (model, fake) = setup(dir.path());
    let port = free_port();
    let env_out = dir.path().join("env.json");
    // Everything from the environment: model, port, engine, flags, a switch.
    let mut cmd = Command::new(spark_bin());
    cmd.arg("serve")
        .env("SPARK_MODEL", &model)
        .env("SPARK_PORT", port.to_string())
        .env("SPARK_LLAMA_SERVER", &fake)
        .env("SPARK_NO_TAP", "1")
        .env("SPARK_QUIET", "true")
        .env("SPARK_HANG_TIMEOUT", "0")
        .env("SPARK_MAX_CONNECTIONS", "7")
        .env("LLAMA_ARG_N_PARALLEL", "3")
        .env("LLAMA_ARG_THREADS", "2")
        .env("FAKE_ENV_OUT", &env_out)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut spark = Killed(cmd.spawn().unwrap());
    let s = wait_status(port, &mut spark.0, ready);
    assert_eq!(s["connections"]["max"], 7);
    let seen: Value = serde_json::from_str(&std::fs::read_to_string(&env_out).unwrap()).unwrap();
    assert_eq!(seen["LLAMA_ARG_N_PARALLEL"], "3", "{seen}");
    assert_eq!(seen["LLAMA_ARG_THREADS"], "2", "{seen}");
    drop(spark);

    // The flag wins over its variable; SPARK_QUIET=0 is off.
    let port2 = free_port();
    let mut cmd = serve_cmd(&model, &fake, port2);
    cmd.env("SPARK_PORT", "1")
        .env("SPARK_MAX_CONNECTIONS", "7")
        .env("SPARK_QUIET", "0")
        .args(["--max-connections", "9"])
        .stderr(Stdio::piped());
    let mut spark = Killed(cmd.spawn().unwrap());
    let s = wait_status(port2, &mut spark.0, ready);
    assert_eq!(s["connections"]["max"], 9);
    assert_eq!(s["listen"], format!("127.0.0.1:{port2}"));

    let help = String::from_utf8_lossy(&spark_help()).into_owned();
    for var in [
        "SPARK_PORT",
        "SPARK_CACHE_SLOTS",
        "SPARK_QUIET",
        "SPARK_RESIDENCY",
        "SPARK_LOG",
    ] {
        assert!(
            help.contains(&format!("[env: {var}=")),
            "{var} in --help: {help}"
        );
    }
}

fn spark_help() -> Vec<u8> {
    let o = Command::new(spark_bin())
        .args(["serve", "--help"])
        .env_clear()
        .output()
        .unwrap();
    assert!(o.status.success());
    o.stdout
}

// ---- systemd: READY, STATUS, WATCHDOG, STOPPING on a datagram socket ----

#[test]
fn systemd_hears_ready_status_watchdog_and_stopping() {
    let dir = tempdir();
    let (model, fake) = setup(dir.path());
    let sock_path = dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let port = free_port();
    let mut cmd = serve_cmd(&model, &fake, port);
    cmd.env("NOTIFY_SOCKET", &sock_path)
        .env("WATCHDOG_USEC", "400000")
        .stderr(Stdio::null());
    let mut spark = Killed(cmd.spawn().unwrap());
    let mut got: Vec<String> = Vec::new();
    let recv_until = |got: &mut Vec<String>, pred: &dyn Fn(&[String]) -> bool| {
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut buf = [0u8; 4096];
        while !pred(got) {
            assert!(Instant::now() < deadline, "never got there: {got:?}");
            if let Ok(n) = sock.recv(&mut buf) {
                got.push(String::from_utf8_lossy(&buf[..n]).into_owned());
            }
        }
    };
    recv_until(&mut got, &|g| g.iter().any(|m| m.starts_with("READY=1")));
    let s = get(port, "/spark/status").unwrap();
    assert_eq!(
        s["child"]["state"], "ready",
        "READY=1 only once llama-server answers"
    );
    let ready_msg = got
        .iter()
        .find(|m| m.starts_with("READY=1"))
        .unwrap()
        .clone();
    assert!(ready_msg.contains("STATUS=serving "), "{ready_msg}");
    assert!(
        ready_msg.contains(&format!("MAINPID={}", spark.0.id())),
        "{ready_msg}"
    );
    recv_until(&mut got, &|g| {
        g.iter().filter(|m| *m == "WATCHDOG=1").count() >= 3
    });

    // A dead child: the status says so, then that it serves again.
    kill(s["child"]["pid"].as_u64().unwrap());
    recv_until(&mut got, &|g| g.iter().any(|m| m.contains("restarting")));
    let at = got.len();
    recv_until(&mut got, &|g| {
        g[at..].iter().any(|m| m.starts_with("STATUS=serving "))
    });

    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(spark.0.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    recv_until(&mut got, &|g| g.iter().any(|m| m.starts_with("STOPPING=1")));
    assert!(spark.0.wait().unwrap().success());
}

// ---- profiles across a fleet ----

fn write_profile(path: &Path, fp: &str, tokens: u64, rows: &[&[u64]]) {
    let mut t = format!(
        "# hotness table: n_layer={} n_expert={} n_expert_used=2\n# spark profile: version=1\n# model fingerprint: {fp}\n# tokens: {tokens}\n",
        rows.len(),
        rows[0].len()
    );
    for r in rows {
        t.push_str(
            &r.iter()
                .map(|c| c.to_string())
                .collect::<Vec<_>>()
                .join(","),
        );
        t.push('\n');
    }
    std::fs::write(path, t).unwrap();
}

#[test]
fn profiles_merge_with_weights_diff_and_refuse_another_model() {
    let dir = tempdir();
    let (a, b, c, out) = (
        dir.path().join("a.csv"),
        dir.path().join("b.csv"),
        dir.path().join("c.csv"),
        dir.path().join("merged.csv"),
    );
    write_profile(&a, "gguf-1-aaaa", 10, &[&[9, 1, 0, 0], &[0, 0, 5, 5]]);
    write_profile(&b, "gguf-1-aaaa", 20, &[&[0, 0, 8, 2], &[0, 0, 6, 4]]);
    write_profile(&c, "gguf-1-cccc", 5, &[&[1, 1, 1, 1], &[1, 1, 1, 1]]);
    let s = |p: &Path| p.to_str().unwrap().to_string();
    let o = spark(&["profile", "merge", &s(&a), &s(&b), "--out", &s(&out)]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let m = spark::profile::Profile::read(&out).unwrap();
    assert_eq!(m.counts.layer(0), &[9, 1, 8, 2]);
    assert_eq!(m.counts.layer(1), &[0, 0, 11, 9]);
    assert_eq!(m.tokens, Some(30));
    assert_eq!(m.fingerprint.as_deref(), Some("gguf-1-aaaa"));

    let o = spark(&[
        "profile",
        "merge",
        &s(&a),
        &s(&b),
        "--weight",
        "2",
        "--weight",
        "0.5",
        "--out",
        &s(&out),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let m = spark::profile::Profile::read(&out).unwrap();
    assert_eq!(m.counts.layer(0), &[18, 2, 4, 1]);

    // Another model: refused, exit 2, the file named, nothing written.
    std::fs::remove_file(&out).unwrap();
    let o = spark(&["profile", "merge", &s(&a), &s(&c), "--out", &s(&out)]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(
        err.contains("c.csv") && err.contains("gguf-1-cccc"),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(!out.exists());
    let o = spark(&[
        "profile",
        "merge",
        &s(&a),
        &s(&b),
        "--weight",
        "2",
        "--out",
        &s(&out),
    ]);
    assert_eq!(o.status.code(), Some(2));

    let o = spark(&["profile", "diff", &s(&a), &s(&b), "--slots", "2"]);
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(text.contains("    0    0/2"), "{text}");
    assert!(text.contains("    1    2/2"), "{text}");
    let o = spark(&["profile", "diff", &s(&a), &s(&b), "--slots", "2", "--json"]);
    let d: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(d["overlap"], 0.5);
    assert_eq!(d["layers"][0]["a_on_b"], 0.0);
    assert_eq!(d["layers"][0]["b_on_b"], 1.0);
    let o = spark(&["profile", "diff", &s(&a), &s(&c)]);
    assert_eq!(o.status.code(), Some(2));
}

// ---- progress: a bar on a terminal, plain lines elsewhere ----

#[test]
fn fixture_progress_is_a_bar_on_a_terminal_and_silent_on_a_pipe() {
    let dir = tempdir();
    let vocab = util::default_vocab();
    let out = dir.path().join("medium.gguf");
    let cmd = format!(
        "{} fixture --size medium --out {} --vocab {}",
        spark_bin().display(),
        out.display(),
        vocab.display()
    );
    // On a pseudo-terminal (util-linux `script`).
    let o = Command::new("script")
        .args(["-qec", &cmd, "/dev/null"])
        .output()
        .expect("script (util-linux) runs the command on a pty");
    let tty = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{tty}");
    assert!(
        tty.contains("spark writing fixture [") && tty.contains("ETA"),
        "{tty}"
    );
    assert!(tty.contains(" tensors"), "{tty}");
    // On pipes: the one line it always printed, nothing else.
    std::fs::remove_file(&out).unwrap();
    let o = spark(&[
        "fixture",
        "--size",
        "medium",
        "--out",
        out.to_str().unwrap(),
        "--vocab",
        vocab.to_str().unwrap(),
    ]);
    assert!(o.status.success());
    assert!(
        o.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert_eq!(stdout.lines().count(), 1, "{stdout}");
    assert!(stdout.starts_with("wrote "), "{stdout}");
}

// ---- completions and man pages ----

#[test]
fn completions_and_man_pages_come_from_the_cli() {
    let o = spark(&["completions", "bash"]);
    let bash = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success());
    assert!(
        bash.contains("--cache-slots") && bash.contains("merge"),
        "{bash}"
    );
    for shell in ["zsh", "fish"] {
        assert!(spark(&["completions", shell]).status.success());
    }
    let dir = tempdir();
    let o = spark(&["man", "--out-dir", dir.path().to_str().unwrap()]);
    assert!(o.status.success());
    let serve = std::fs::read_to_string(dir.path().join("spark-serve.1")).unwrap();
    assert!(
        serve.contains("SPARK_CACHE_SLOTS") && serve.contains(".TH"),
        "{serve}"
    );
    assert!(dir.path().join("spark-profile-merge.1").exists());
    let o = spark(&["man"]);
    assert!(String::from_utf8_lossy(&o.stdout).contains(".SH NAME"));
}

// ---- the live page, in a real headless Chromium ----

/// Debian's chromium, if installed (scripts/test installs it; with SPARK_REQUIRE_CHROMIUM=1 its
/// absence fails the test instead of skipping it).
pub fn chromium() -> Option<PathBuf> {
    let found = ["chromium", "chromium-browser"].iter().find_map(|n| {
        std::env::var_os("PATH").and_then(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join(n))
                .find(|c| c.is_file())
        })
    });
    if found.is_none() {
        assert!(
            std::env::var_os("SPARK_REQUIRE_CHROMIUM").is_none(),
            "SPARK_REQUIRE_CHROMIUM is set and chromium is missing (scripts/test installs it)"
        );
        eprintln!("skipped: chromium is not installed (scripts/test installs it from Debian)");
    }
    found
}

/// Runs headless Chromium on `url` with a fresh profile: `--dump-dom` (returned) or a
/// screenshot into `shot`. Waits `budget_ms` of the page's (virtual) time first.
pub fn headless(chrome: &Path, url: &str, budget_ms: u32, shot: Option<&Path>) -> String {
    let profile = tempdir();
    let mut cmd = Command::new(chrome);
    cmd.args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--hide-scrollbars",
        "--window-size=1280,1100",
    ])
    .arg(format!("--user-data-dir={}", profile.path().display()))
    .arg(format!("--virtual-time-budget={budget_ms}"));
    match shot {
        Some(p) => cmd.arg(format!("--screenshot={}", p.display())),
        None => cmd.arg("--dump-dom"),
    };
    cmd.arg(url);
    let (o, _) = util::output_within(&mut cmd, util::HANG_LIMIT);
    assert!(
        o.status.success(),
        "chromium: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// The text of the element with `id` in a dumped DOM.
pub fn text_of(dom: &str, id: &str) -> String {
    let Some(at) = dom.find(&format!("id=\"{id}\"")) else {
        panic!("no #{id} in {dom}")
    };
    let rest = &dom[at..];
    let start = rest.find('>').unwrap() + 1;
    let end = rest[start..].find('<').unwrap();
    rest[start..start + end].to_string()
}

#[test]
fn live_page_shows_and_updates_the_numbers_in_headless_chromium() {
    let Some(chrome) = chromium() else { return };
    let dir = tempdir();
    let model = fixture(dir.path(), "m.gguf", &["--router", "skewed"]);
    let tap = crate::telemetry::tap_lib();
    let served = util::Served::start(&model, &["--tap", tap.to_str().unwrap()]);
    let complete = |n: usize| {
        for i in 0..n {
            let r = ureq::post(&served.url("/completion"))
                .timeout(Duration::from_secs(60))
                .send_json(serde_json::json!({"prompt": format!("Tell me about experts {i}"), "n_predict": 24}))
                .unwrap();
            assert_eq!(r.status(), 200);
        }
    };
    complete(3);
    let heat: Value = ureq::get(&served.url("/spark/heat.json"))
        .call()
        .unwrap()
        .into_json()
        .unwrap();
    let (l, e) = (
        heat["n_layer"].as_u64().unwrap(),
        heat["n_expert"].as_u64().unwrap(),
    );
    assert!(l > 0 && e > 0, "{heat}");
    assert_eq!(heat["decode"].as_array().unwrap().len() as u64, l);
    let uses: u64 = heat["decode"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|r| r.as_array().unwrap())
        .map(|c| c.as_u64().unwrap())
        .sum();
    assert!(uses > 0, "the decode counts of the requests: {heat}");
    assert!(!heat["history"].as_array().unwrap().is_empty(), "{heat}");
    // Residency is off here: heat.json says so with a null table (the lavapipe test
    // `serve_residency_on_the_device_hits_grows_and_answers_like_stock` fills it).
    assert_eq!(heat.get("residency_layers"), Some(&Value::Null), "{heat}");
    let page = served.url("/spark/");
    let dom = headless(&chrome, &page, 3500, None);
    assert_eq!(
        text_of(&dom, "k-req"),
        "3",
        "the page shows the requests made"
    );
    assert_eq!(text_of(&dom, "state"), "ready");
    assert!(text_of(&dom, "model").ends_with("m.gguf"));
    let updates: u32 = dom
        .split("data-updates=\"")
        .nth(1)
        .and_then(|r| r.split('"').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    assert!(updates >= 2, "the page updates itself: {updates} updates");
    let heat = text_of(&dom, "heatnote");
    assert!(
        heat.contains("layers × 8 experts") || heat.contains("layers ×"),
        "{heat}"
    );
    assert!(text_of(&dom, "k-hit").ends_with('%'), "hit ratio shown");
    assert!(text_of(&dom, "k-bel").ends_with('%'), "Belady bound shown");

    // More requests: a fresh load shows the new count.
    complete(2);
    let dom = headless(&chrome, &page, 1500, None);
    assert_eq!(text_of(&dom, "k-req"), "5");

    // The screenshot, kept as a test artifact.
    let shots = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/spark-page");
    std::fs::create_dir_all(&shots).unwrap();
    let shot = shots.join("live.png");
    let _ = std::fs::remove_file(&shot);
    headless(&chrome, &page, 4500, Some(&shot));
    let png = std::fs::read(&shot).unwrap();
    assert!(
        png.starts_with(b"\x89PNG") && png.len() > 10_000,
        "{}",
        shot.display()
    );
    eprintln!("screenshot: {}", shot.display());

    // Same auth as /spark/status: with an API key, no key gets 401.
    drop(served);
    let keyed = util::Served::start_custom(
        &model,
        &util::llama_server(),
        &["--no-tap"],
        &["-c", "512", "--api-key", "k3y"],
        |_| {},
    );
    match ureq::get(&keyed.url("/spark/")).call() {
        Err(ureq::Error::Status(401, _)) => {}
        other => panic!("/spark/ without the key: {other:?}"),
    }
    let r = ureq::get(&keyed.url("/spark/"))
        .set("Authorization", "Bearer k3y")
        .call()
        .unwrap();
    assert!(r.into_string().unwrap().contains("<title>spark</title>"));
}
