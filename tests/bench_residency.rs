//! `spark bench residency` end to end on the tiny fixture with the CPU builds (stock and hooked,
//! both built by scripts/test): four llama-bench runs, the tap's residency exit line from the
//! hooked run, and a missing model as an input error. Asserts behaviour, never a speed.

use serde_json::Value;

use crate::util;

#[test]
fn four_placements_measured_and_the_residency_line_read() {
    let dir = util::tempdir();
    let model = util::fixture(dir.path(), "tiny.gguf", &[]);
    let hooked = crate::hook::hooked_prefix();
    let tap = crate::telemetry::tap_lib();
    let server = util::llama_server();
    let o = util::spark(&[
        "bench",
        "residency",
        "-m",
        model.to_str().unwrap(),
        "--tokens",
        "4",
        "--reps",
        "1",
        "--threads",
        "2",
        "--slots",
        "3",
        "--llama-server",
        server.to_str().unwrap(),
        "--tap",
        tap.to_str().unwrap(),
        "--json",
    ]);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "bench residency failed: {stderr}");
    let r: Value = serde_json::from_slice(&o.stdout)
        .unwrap_or_else(|e| panic!("--json printed no JSON ({e}); stderr: {stderr}"));

    let rows = r["rows"].as_array().expect("rows");
    let names: Vec<&str> = rows.iter().map(|x| x["config"].as_str().unwrap()).collect();
    assert_eq!(names, ["vram", "host", "host-copy", "spark"]);
    for row in rows {
        let t = row["tok_s"].as_f64().unwrap();
        assert!(t > 0.0 && t.is_finite(), "{row}");
        assert_eq!(row["n_gpu_layers"], 99);
    }
    // The tiny fixture has 4 layers: (b)-(d) put all of them on the host.
    let ncmoe: Vec<u64> = rows
        .iter()
        .map(|x| x["n_cpu_moe"].as_u64().unwrap())
        .collect();
    assert_eq!(ncmoe, [0, 4, 4, 4]);
    let env = |i: usize| -> Vec<String> {
        rows[i]["env"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap().to_string())
            .collect()
    };
    assert!(env(0).is_empty() && env(1).is_empty(), "{r}");
    assert_eq!(env(2), ["GGML_OP_OFFLOAD_MIN_BATCH=1"]);
    assert_eq!(
        env(3),
        [
            "GGML_OP_OFFLOAD_MIN_BATCH=1".to_string(),
            format!("LD_PRELOAD={}", tap.display()),
            "SPARK_RESIDENCY_SLOTS=3".to_string(),
        ]
    );
    assert_eq!(r["slots"], 3);
    assert_eq!(r["slots_from"], "--slots");
    assert_eq!(r["decoded_per_run"], 5, "4 timed tokens + 1 warmup token");

    // (a)-(c) ran the stock CPU build, (d) the hooked build that scripts/build-engine names:
    // spark's compiled-in hook id agrees with the script's.
    for row in &rows[..3] {
        assert_eq!(
            row["engine"],
            spark::engine::variant_name(spark::engine::Backend::Cpu, false)
        );
    }
    let variant = rows[3]["engine"].as_str().unwrap();
    let dir_name = hooked.file_name().unwrap().to_str().unwrap();
    assert!(dir_name.ends_with(variant), "{variant} vs {dir_name}");
    assert!(variant.starts_with("cpu-hooked-"), "{variant}");
    assert_eq!(
        rows[3]["llama_bench"].as_str().unwrap(),
        hooked.join("bin/llama-bench").to_str().unwrap()
    );

    let ratio = rows[3]["tok_s"].as_f64().unwrap() / rows[1]["tok_s"].as_f64().unwrap();
    let measured = r["target"]["measured"].as_f64().unwrap();
    assert!((measured - ratio).abs() < 1e-9);
    assert_eq!(r["target"]["goal"], "(d) >= 1.5x (b)");

    // The provider in the preloaded tap prints its counters when llama-bench exits.
    let res = &r["residency"];
    let c = &res["counters"];
    assert!(
        c.is_object(),
        "(d) reported no parsed residency line: {res}; stderr: {stderr}"
    );
    assert_eq!(c["slots"], 3, "{res}");
    // (d) ran the CPU build (asserted above), which offloads nothing, so the scheduler never
    // asks the provider for an expert: the honest counters are zero calls, and no hit ratio.
    assert_eq!(c["calls"], 0, "{res}");
    assert!(res["hit_ratio"].is_null(), "{res}");
    assert!(!r["machine"]["ran_on_gpu"].as_bool().unwrap());
}

#[test]
fn a_missing_model_is_an_input_error_naming_the_file() {
    let dir = util::tempdir();
    let missing = dir.path().join("absent.gguf");
    let o = util::spark(&["bench", "residency", "-m", missing.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2));
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains(missing.to_str().unwrap()), "{err}");
    assert!(o.stdout.is_empty());
}

#[test]
fn spark_without_the_hooked_build_names_the_script_that_builds_it() {
    let dir = util::tempdir();
    let model = util::fixture(dir.path(), "tiny.gguf", &[]);
    let empty = dir.path().join("cache");
    std::fs::create_dir(&empty).unwrap();
    let o = std::process::Command::new(util::spark_bin())
        .env("SPARK_CACHE", &empty)
        .env_remove("SPARK_LLAMA_SERVER")
        .args(["bench", "residency", "-m", model.to_str().unwrap()])
        .args(["--configs", "spark"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("scripts/build-engine --hooked"), "{err}");
    assert!(err.contains(empty.to_str().unwrap()), "{err}");
}
