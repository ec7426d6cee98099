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
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
