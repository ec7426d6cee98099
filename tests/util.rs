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
