//! Shared helpers for the integration tests: the spark binary, the engine build, temp dirs,
//! fixtures.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::Value;

/// The `spark` binary built for this test run.
pub fn spark_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_spark"))
}

/// Runs `spark` with `args` and returns its output.
pub fn spark(args: &[&str]) -> Output {
    Command::new(spark_bin())
        .args(args)
        .output()
        .expect("run spark")
}

/// How long a command that should end on its own deadline may run before the test calls it
/// hung. Far above every deadline the tests set (2–5 s) and below every default those deadlines
/// replace (validate's request timeout: 60 s; ready timeouts: 120 s), so a loaded machine never
/// trips it and an ignored deadline does.
pub const HANG_LIMIT: Duration = Duration::from_secs(45);

/// Runs `cmd` to completion with its output captured, but kills it and fails the test when it
/// is still running after `limit`: a hang fails, a slow machine does not.
pub fn output_within(cmd: &mut Command, limit: Duration) -> (Output, Duration) {
    let t0 = Instant::now();
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let pid = child.id();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(limit) {
        Ok(o) => (o.expect("wait"), t0.elapsed()),
        Err(_) => {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
            panic!("{cmd:?} was still running after {limit:?}: it ignored its deadline");
        }
    }
}

/// A fresh temporary directory for one test.
pub fn tempdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("spark-test-")
        .tempdir()
        .expect("create temp dir")
}

/// The cached engine install prefix (built by scripts/build-engine, which scripts/test runs).
pub fn engine_prefix() -> PathBuf {
    let p = spark::engine::prefix(spark::engine::Backend::Cpu, false);
    assert!(
        p.join(".spark-built").exists(),
        "the pinned llama.cpp build is missing at {}; run scripts/build-engine (scripts/test does)",
        p.display()
    );
    p
}

pub fn llama_server() -> PathBuf {
    engine_prefix().join("bin").join("llama-server")
}

pub fn default_vocab() -> PathBuf {
    engine_prefix()
        .join("models")
        .join(spark::engine::DEFAULT_VOCAB)
}

/// Writes a fixture with `spark fixture` and extra flags; returns its path.
pub fn fixture(dir: &Path, name: &str, flags: &[&str]) -> PathBuf {
    let out = dir.join(name);
    let vocab = default_vocab();
    let mut args = vec![
        "fixture",
        "--out",
        out.to_str().unwrap(),
        "--vocab",
        vocab.to_str().unwrap(),
    ];
    args.extend_from_slice(flags);
    let o = spark(&args);
    assert!(
        o.status.success(),
        "spark fixture failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    out
}

/// Whether `pid` is a live process (a zombie still has a /proc entry; it counts as gone).
pub fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat
            .rsplit(')')
            .next()
            .unwrap_or("")
            .trim_start()
            .starts_with('Z'),
        Err(_) => false,
    }
}

/// Waits up to `within` for `pid` to be gone; whether it is.
pub fn wait_gone(pid: u32, within: std::time::Duration) -> bool {
    let deadline = std::time::Instant::now() + within;
    while std::time::Instant::now() < deadline {
        if !alive(pid) {
            return true;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    !alive(pid)
}

/// Writes an executable script (a fake llama-server, for example) and returns its path.
pub fn write_script(dir: &Path, name: &str, text: &str) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    p
}

/// A `spark serve` child and the port it listens on.
pub struct Served {
    pub child: Child,
    pub port: u16,
    pub stderr: mpsc::Receiver<String>,
    /// What spark printed before it announced its address.
    pub early: Vec<String>,
}

impl Served {
    /// `spark serve` of `model` on a free port with the stock llama-server.
    pub fn start(model: &Path, extra: &[&str]) -> Served {
        Served::start_with(model, &llama_server(), extra)
    }

    /// `spark serve` of `model` with the llama-server binary `server`.
    pub fn start_with(model: &Path, server: &Path, extra: &[&str]) -> Served {
        Served::start_custom(
            model,
            server,
            extra,
            &["-c", "2048", "-t", "2", "-np", "4"],
            |_| {},
        )
    }

    /// `spark serve` of `model` with `server`, spark's flags `extra`, llama-server's arguments
    /// `llama` (after `--`), and `configure` applied to the command last (an rlimit, say).
    pub fn start_custom(
        model: &Path,
        server: &Path,
        extra: &[&str],
        llama: &[&str],
        configure: impl FnOnce(&mut Command),
    ) -> Served {
        let mut cmd = Command::new(spark_bin());
        cmd.args([
            "serve",
            "-m",
            model.to_str().unwrap(),
            "--port",
            "0",
            "--llama-server",
            server.to_str().unwrap(),
        ]);
        cmd.args(extra);
        cmd.arg("--").args(llama);
        configure(&mut cmd);
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let (tx, rx) = mpsc::channel();
        let err = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut early = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let Ok(line) = rx.recv_timeout(left) else {
                // Never leave a spark running behind a failed test.
                let _ = child.kill();
                let _ = child.wait();
                panic!("spark serve announces its address within 60 s; it said {early:?}");
            };
            // spark's own announcement, not a forwarded llama-server line that names its port.
            if let Some(rest) = line
                .strip_prefix("spark: serving ")
                .and_then(|l| l.split("http://127.0.0.1:").nth(1))
            {
                let port = rest.split_whitespace().next().unwrap().parse().unwrap();
                return Served {
                    child,
                    port,
                    stderr: rx,
                    early,
                };
            }
            early.push(line);
        }
    }

    pub fn url(&self, route: &str) -> String {
        format!("http://127.0.0.1:{}{route}", self.port)
    }

    pub fn status(&self) -> Value {
        ureq::get(&self.url("/spark/status"))
            .timeout(Duration::from_secs(5))
            .call()
            .unwrap()
            .into_json()
            .unwrap()
    }

    pub fn child_pid(&self) -> u32 {
        self.status()["child"]["pid"].as_u64().unwrap() as u32
    }
}

impl Drop for Served {
    /// SIGTERM first, so spark shuts down as a service manager would stop it (and removes its
    /// work directory); SIGKILL if it has not exited within 10 s.
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Parses a Prometheus text exposition with the `prometheus-parse` crate, and checks what that
/// lenient parser lets pass: every sample line parses (none silently skipped), every family has
/// `# HELP` and `# TYPE` before its samples, counters end in `_total`, and every histogram has
/// ascending `le` bounds, cumulative counts, a last `+Inf` bucket equal to its `_count`, and a
/// `_sum`. Panics with the text on the first fault.
pub fn parse_metrics(text: &str) -> prometheus_parse::Scrape {
    use prometheus_parse::{LineInfo, SampleType};
    use std::collections::HashMap;
    let mut types: HashMap<String, SampleType> = HashMap::new();
    let mut helped = std::collections::HashSet::new();
    let mut sample_lines = 0;
    for line in text.lines() {
        match LineInfo::parse(line) {
            LineInfo::Doc { metric_name, .. } => {
                assert!(
                    helped.insert(metric_name.to_string()),
                    "HELP twice: {line}\n{text}"
                );
            }
            LineInfo::Type {
                metric_alias,
                metric_name,
                sample_type,
            } => {
                let family = metric_alias.unwrap_or(metric_name);
                assert!(helped.contains(&family), "TYPE before HELP: {line}\n{text}");
                assert!(
                    types.insert(family, sample_type).is_none(),
                    "TYPE twice: {line}"
                );
            }
            LineInfo::Sample {
                metric_name, value, ..
            } => {
                sample_lines += 1;
                let family = ["_bucket", "_sum", "_count"]
                    .iter()
                    .find_map(|s| {
                        let base = metric_name.strip_suffix(s)?;
                        (types.get(base) == Some(&SampleType::Histogram)).then_some(base)
                    })
                    .unwrap_or(metric_name);
                let ty = types
                    .get(family)
                    .unwrap_or_else(|| panic!("sample without TYPE: {line}\n{text}"));
                if *ty == SampleType::Counter {
                    assert!(metric_name.ends_with("_total"), "counter name: {line}");
                }
                let v = if value == "+Inf" {
                    Ok(f64::INFINITY)
                } else {
                    value.parse::<f64>()
                };
                assert!(v.is_ok(), "value of {line}");
            }
            LineInfo::Empty => {}
            LineInfo::Ignored => panic!("a line the parser skips: {line:?}\n{text}"),
        }
    }
    let scrape = prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_string())))
        .expect("parse the exposition");
    let mut parsed = 0;
    for s in &scrape.samples {
        match &s.value {
            prometheus_parse::Value::Histogram(b) => {
                parsed += b.len();
                assert!(
                    b.windows(2)
                        .all(|w| w[0].less_than < w[1].less_than && w[0].count <= w[1].count),
                    "{}: buckets not ascending and cumulative: {b:?}",
                    s.metric
                );
                let last = b.last().expect("a histogram with buckets");
                assert_eq!(last.less_than, f64::INFINITY, "{}: last bucket", s.metric);
                let scalar = |suffix: &str| {
                    scrape
                        .samples
                        .iter()
                        .find(|x| x.metric == format!("{}{suffix}", s.metric))
                        .map(|x| match x.value {
                            prometheus_parse::Value::Untyped(v) => v,
                            ref v => panic!("{}{suffix}: {v:?}", s.metric),
                        })
                        .unwrap_or_else(|| panic!("{}{suffix} missing\n{text}", s.metric))
                };
                assert_eq!(last.count, scalar("_count"), "{}: +Inf = _count", s.metric);
                assert!(scalar("_sum") >= 0.0);
            }
            prometheus_parse::Value::Summary(q) => parsed += q.len(),
            _ => parsed += 1,
        }
    }
    assert_eq!(parsed, sample_lines, "every sample line was read\n{text}");
    scrape
}

/// The value of the first sample named `name` (labels ignored) in a scrape.
pub fn metric(scrape: &prometheus_parse::Scrape, name: &str) -> Option<f64> {
    scrape
        .samples
        .iter()
        .find(|s| s.metric == name)
        .and_then(|s| match s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => Some(v),
            _ => None,
        })
}
