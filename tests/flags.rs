//! No flag is silently ignored or clamped: each combination that used to be dropped without a
//! word is now a usage error (exit 2) that names the flag. One test per flag, each checking
//! the exit code, that stderr names the flag, and that nothing was printed to stdout.

use crate::util;

/// Runs spark and checks the refusal: exit 2, `flag` named on stderr, nothing on stdout.
fn refused(args: &[&str], flag: &str) -> String {
    let o = util::spark(args);
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert_eq!(o.status.code(), Some(2), "{args:?}: {err}");
    assert!(err.contains(flag), "{args:?} should name {flag}: {err}");
    assert!(o.stdout.is_empty(), "{args:?}");
    err
}

#[test]
fn serve_profile_without_spark_is_refused() {
    // It used to neither load nor write the profile, and say nothing.
    refused(&["serve", "-m", "m.gguf", "--profile", "p.csv"], "--spark");
}

#[test]
fn serve_cache_slots_zero_is_refused_not_raised_to_one() {
    refused(
        &["serve", "-m", "m.gguf", "--cache-slots", "0"],
        "--cache-slots",
    );
}

#[test]
fn serve_shadow_cache_flags_with_no_tap_are_refused() {
    // Without the tap there is no shadow cache: these were ignored.
    for flag in [
        &["--cache-slots", "4"][..],
        &["--cache-policy", "lru"],
        &["--tap", "x.so"],
    ] {
        let mut args = vec!["serve", "-m", "m.gguf", "--no-tap"];
        args.extend_from_slice(flag);
        refused(&args, "--no-tap");
    }
}

#[test]
fn serve_cache_slots_above_the_expert_count_is_refused_before_anything_starts() {
    // It used to become the expert count silently. The tiny fixture has 8 experts per layer.
    let dir = util::tempdir();
    let model = util::fixture(dir.path(), "tiny.gguf", &[]);
    let server = util::llama_server();
    let tap = crate::telemetry::tap_lib();
    let err = refused(
        &[
            "serve",
            "-m",
            model.to_str().unwrap(),
            "--llama-server",
            server.to_str().unwrap(),
            "--tap",
            tap.to_str().unwrap(),
            "--port",
            "0",
            "--cache-slots",
            "9",
        ],
        "--cache-slots 9",
    );
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("8 experts"), "{err}");
}

#[test]
fn trace_record_hidden_settings_without_hidden_capture_are_refused() {
    for flag in [
        &["--hidden-budget", "64"][..],
        &["--hidden-tensor", "attn_norm"],
    ] {
        let mut args = vec!["trace", "record", "-m", "m.gguf", "--out", "t.bin"];
        args.extend_from_slice(flag);
        refused(&args, "--hidden-every");
    }
    refused(
        &[
            "trace",
            "record",
            "-m",
            "m.gguf",
            "--out",
            "t.bin",
            "--hidden-every",
            "2",
            "--hidden-budget",
            "0",
        ],
        "--hidden-budget",
    );
}

#[test]
fn plan_receipt_zero_tokens_or_repetitions_are_refused_not_raised_to_one() {
    refused(
        &["plan", "receipt", "-m", "m.gguf", "--n-gen", "0"],
        "--n-gen",
    );
    refused(
        &["plan", "receipt", "-m", "m.gguf", "--repetitions", "0"],
        "--repetitions",
    );
}

#[test]
fn bench_residency_flags_for_rows_that_do_not_run_are_refused() {
    refused(
        &["bench", "residency", "-m", "m.gguf", "--bytes-slots", "2"],
        "--bytes",
    );
    refused(
        &["bench", "residency", "-m", "m.gguf", "--link-gbps", "10"],
        "--bytes",
    );
    let dir = util::tempdir();
    let model = util::fixture(dir.path(), "tiny.gguf", &[]);
    let m = model.to_str().unwrap();
    for (flag, value, configs) in [
        ("--slots", "2", "host"),
        ("--vram-budget", "64", "vram,host"),
        ("--hooked-bench", "/nonexistent", "host-copy"),
        ("--tap", "/nonexistent", "vram"),
        ("--llama-bench", "/nonexistent", "spark"),
    ] {
        let err = refused(
            &[
                "bench",
                "residency",
                "-m",
                m,
                flag,
                value,
                "--configs",
                configs,
            ],
            flag,
        );
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(err.contains("leaves out"), "{err}");
    }
}

#[test]
fn bench_swap_device_with_cpu_is_refused() {
    refused(
        &["bench", "swap", "-m", "m.gguf", "--cpu", "--device", "1"],
        "--cpu",
    );
    refused(
        &["bench", "swap", "-m", "m.gguf", "--batches", "0"],
        "--batches",
    );
}
