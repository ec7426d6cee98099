//! Shared helpers for the integration tests: the spark binary, the engine build, temp dirs,
//! fixtures.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

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
    let p = spark::engine::prefix("cpu");
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
