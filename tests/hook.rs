//! The MoE residency hook patched into the ggml scheduler (scripts/patches/, ABI in
//! proto/include/spark_moe_hook.h): the hooked build carries it, spark tells the builds apart,
//! and on the CPU the hooked build answers exactly as the stock one.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use serde_json::{json, Value};
use spark::engine::{Backend, Engine};
use spark::supervisor::{LlamaServer, LlamaServerConfig};

use crate::util;

/// The hooked CPU build's prefix, as `scripts/build-engine --hooked` names it (scripts/test
/// builds it before the tests run).
pub fn hooked_prefix() -> PathBuf {
    let p = spark::engine::prefix(Backend::Cpu, true);
    assert!(
        p.join(".spark-built").exists(),
        "hooked build missing at {}; run scripts/build-engine --hooked (scripts/test does)",
        p.display()
    );
    p
}

/// What `scripts/build-engine ARGS --print` says the install prefix is.
fn script_prefix(args: &[&str]) -> PathBuf {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("scripts/build-engine");
    let o = Command::new(script)
        .args(args)
        .arg("--print")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    PathBuf::from(String::from_utf8(o.stdout).unwrap().trim())
}

#[test]
fn spark_names_every_engine_build_as_the_build_script_does() {
    let mut seen = std::collections::HashSet::new();
    for (backend, flag) in [
        (Backend::Cpu, None),
        (Backend::Cuda, Some("--cuda")),
        (Backend::Vulkan, Some("--vulkan")),
    ] {
        for hooked in [false, true] {
            let mut args: Vec<&str> = flag.into_iter().collect();
            if hooked {
                args.push("--hooked");
            }
            let p = spark::engine::prefix(backend, hooked);
            assert_eq!(p, script_prefix(&args), "{args:?}");
            assert!(seen.insert(p), "two variants share a cache key");
        }
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

const PROMPT: &str = "Experts that stay resident";

fn completion_body() -> Value {
    json!({"prompt": PROMPT, "n_predict": 16, "temperature": 0.0, "n_probs": 4, "cache_prompt": false})
}

fn answer(server: PathBuf, model: &std::path::Path, log: PathBuf) -> Value {
    answer_with(server, model, log, &["-c", "1024", "-t", "2", "-np", "1"])
}

fn answer_with(server: PathBuf, model: &std::path::Path, log: PathBuf, args: &[&str]) -> Value {
    let s = LlamaServer::start(&LlamaServerConfig {
        binary: server,
        model: model.to_path_buf(),
        port: None,
        extra_args: args.iter().map(|s| s.to_string()).collect(),
        env: vec![],
        ready_timeout: Duration::from_secs(60),
        log_path: log,
    })
    .unwrap();
    let a = s.post_json("/completion", &completion_body()).unwrap();
    s.stop();
    a
}

#[test]
fn the_hooked_build_carries_the_hook_and_answers_like_stock_on_the_cpu() {
    let hooked = hooked_prefix();
    let stock = util::engine_prefix();
    let lib = |p: &PathBuf| std::fs::read(p.join("lib/libggml-base.so")).unwrap();
    assert!(
        contains(&lib(&hooked), b"spark_moe_provide_v1"),
        "the hooked ggml looks up the provider"
    );
    assert!(
        !contains(&lib(&stock), b"spark_moe_provide_v1"),
        "the stock ggml is untouched"
    );

    let e = Engine::locate(Some(&hooked.join("bin/llama-server"))).unwrap();
    assert!(e.is_hooked(), "{}", e.variant());
    assert!(e.variant().starts_with("cpu-hooked-"), "{}", e.variant());
    let s = Engine::locate(Some(&util::llama_server())).unwrap();
    assert!(!s.is_hooked());
    assert_eq!(
        s.variant(),
        spark::engine::variant_name(Backend::Cpu, false)
    );

    let dir = util::tempdir();
    for router in ["skewed", "analytic"] {
        let model = util::fixture(
            dir.path(),
            &format!("{router}.gguf"),
            &["--router", router, "--type", "q8_0"],
        );
        let a = answer(util::llama_server(), &model, dir.path().join("stock.log"));
        let b = answer(
            hooked.join("bin/llama-server"),
            &model,
            dir.path().join("hooked.log"),
        );
        assert_eq!(a["content"], b["content"], "{router}");
        assert_eq!(
            a["completion_probabilities"], b["completion_probabilities"],
            "{router}: token probabilities differ"
        );
        assert_eq!(a["tokens_predicted"], 16);
        assert_eq!(
            a["completion_probabilities"].as_array().map(Vec::len),
            Some(16),
            "probabilities are compared, not absent"
        );
    }
}

/// `spark serve --residency` drives the hooked build with the tap's provider switched on: the
/// supervisor sends every layer's plan over the control channel and reads the provider's
/// counters into `/spark/status`, and the answers equal stock llama-server's exactly. On this
/// CPU build the scheduler never offloads an expert matrix product, so the hook is never
/// called (calls = 0); the GPU exactness run is `scripts/gpu-check`.
#[test]
fn serve_residency_sends_plans_to_the_provider_and_answers_like_stock() {
    let hooked = hooked_prefix();
    let dir = util::tempdir();
    let model = util::fixture(dir.path(), "skewed.gguf", &["--router", "skewed"]);
    let n_layer = 4; // the tiny fixture's layers (checked against status below)
    let profile = dir.path().join("profile.csv");
    let served = util::Served::start_with(
        &model,
        &hooked.join("bin/llama-server"),
        &[
            "--quiet",
            "--residency",
            "--vram-budget",
            "4096",
            "--cache-slots",
            "3",
            "--spark",
            "--profile",
            profile.to_str().unwrap(),
        ],
    );
    let status = served.status();
    assert_eq!(status["engine"]["hooked"], true, "{status}");
    assert_eq!(status["geometry"]["n_layer"], n_layer, "{status}");
    // The tiny model fits the budget whole: no layer keeps experts on the host, so no VRAM is
    // kept for slots, and the budget shown is the one given.
    assert_eq!(status["placement"]["budget_mib"], 4096, "{status}");
    assert_eq!(status["placement"]["residency_mib"], 0, "{status}");

    let through: Value = ureq::post(&served.url("/completion"))
        .timeout(Duration::from_secs(60))
        .send_json(completion_body())
        .unwrap()
        .into_json()
        .unwrap();
    // Plans go out when the child greets and after every completed request; wait for the
    // counters read after this request.
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    let residency = loop {
        let r = served.status()["routing"]["residency"].clone();
        if r["layers_planned"] == n_layer && r["plans_sent"].as_u64() >= Some(n_layer) {
            break r;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no plan reached the provider: {r}"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    // A restarted child starts with no plan: it gets every layer's plan again.
    kill_child_and_wait_for_plans(&served, residency["plans_sent"].as_u64().unwrap(), n_layer);
    let metrics = ureq::get(&served.url("/spark/metrics"))
        .timeout(Duration::from_secs(5))
        .call()
        .unwrap()
        .into_string()
        .unwrap();
    drop(served);
    assert!(
        metrics.contains("spark_residency_hook_calls_total 0"),
        "{metrics}"
    );
    assert_eq!(residency["slots_per_layer"], 3, "{residency}");
    assert_eq!(residency["error"], Value::Null, "{residency}");
    // CPU build: no GPU offload, so the scheduler's MoE-offload branch (and the hook) never runs.
    assert_eq!(residency["hook_calls"], 0, "{residency}");

    let direct = answer_with(
        util::llama_server(),
        &model,
        dir.path().join("stock.log"),
        &["-c", "2048", "-t", "2", "-np", "4"],
    );
    assert_eq!(through["content"], direct["content"]);
    assert_eq!(
        through["completion_probabilities"], direct["completion_probabilities"],
        "token probabilities differ"
    );
    assert_eq!(
        direct["completion_probabilities"].as_array().map(Vec::len),
        Some(16)
    );
}

/// SIGKILLs serve's llama-server and waits until a new one is ready and has been sent every
/// layer's plan (`n_layer` more than `sent_before`): a restarted child starts with no plan.
pub fn kill_child_and_wait_for_plans(served: &util::Served, sent_before: u64, n_layer: u64) {
    let old = served.child_pid();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(old as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    loop {
        let st = served.status();
        let r = &st["routing"]["residency"];
        if st["child"]["pid"].as_u64() != Some(u64::from(old))
            && st["child"]["ready"] == true
            && r["plans_sent"].as_u64() >= Some(sent_before + n_layer)
        {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the restarted child got no plan: {st}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// With the GPU's figures (`--gpu`), serve decides at start and, after a request, decides again
/// on the routing it has seen, and shows both: the decision it runs with its `--n-cpu-moe`, and
/// the one on live counts with whether it differs and what to do about it.
#[test]
fn serve_residency_decides_again_on_the_routing_it_has_seen() {
    let hooked = hooked_prefix();
    let dir = util::tempdir();
    let model = util::fixture(dir.path(), "skewed.gguf", &["--router", "skewed"]);
    let profile = dir.path().join("profile.csv");
    let served = util::Served::start_with(
        &model,
        &hooked.join("bin/llama-server"),
        &[
            "--quiet",
            "--residency",
            "--vram-budget",
            "4096",
            "--gpu",
            "rtx3060",
            "--spark",
            "--profile",
            profile.to_str().unwrap(),
        ],
    );
    let status = served.status();
    let at_start = &status["placement"]["residency_decision"];
    // The tiny model fits the budget whole: stock placement, every layer on the GPU.
    assert_eq!(at_start["run"], "stock", "{at_start}");
    assert_eq!(at_start["n_cpu_moe"], 0, "{at_start}");
    assert!(
        status["routing"]["residency_decision_now"].is_null(),
        "{status}"
    );
    // Stock placement runs without the provider: no plans are sent to it, no counters shown.
    assert!(status["routing"]["residency"].is_null(), "{status}");
    let _: Value = ureq::post(&served.url("/completion"))
        .timeout(Duration::from_secs(60))
        .send_json(completion_body())
        .unwrap()
        .into_json()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    let now = loop {
        let now = served.status()["routing"]["residency_decision_now"].clone();
        if !now.is_null() {
            break now;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no decision on live counts"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(now["error"].is_null(), "{now}");
    assert_eq!(now["run"], "stock", "the model still fits whole: {now}");
    assert_eq!(now["differs"], false, "{now}");
    assert!(now["at_records"].as_u64().unwrap() > 0, "{now}");
    assert!(
        now["source"]
            .as_str()
            .unwrap()
            .contains("the routing serve has seen"),
        "{now}"
    );
    assert!(now["took_us"].is_u64(), "{now}");
    let after = served.status();
    assert!(after["routing"]["residency"].is_null(), "{after}");
    // The live page says both (when chromium is installed); the screenshot is kept.
    if let Some(chrome) = crate::operator::chromium() {
        let page = served.url("/spark/");
        let dom = crate::operator::headless(&chrome, &page, 3500, None);
        let line = dom
            .split("id=\"decision\"")
            .nth(1)
            .and_then(|t| t.split("</p>").next())
            .unwrap_or_else(|| panic!("no decision on the page:\n{dom}"));
        assert!(line.contains("Residency decision at start"), "{line}");
        assert!(line.contains("On the routing seen since"), "{line}");
        assert!(line.contains("--n-cpu-moe 0"), "{line}");
        let shots = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/spark-page");
        std::fs::create_dir_all(&shots).unwrap();
        let shot = shots.join("decision.png");
        let _ = std::fs::remove_file(&shot);
        crate::operator::headless(&chrome, &page, 4500, Some(&shot));
        assert!(std::fs::read(&shot).unwrap().starts_with(b"\x89PNG"));
    }
}

#[test]
fn serve_residency_needs_the_hooked_build_and_a_budget() {
    let dir = util::tempdir();
    let model = util::fixture(dir.path(), "tiny.gguf", &[]);
    let m = model.to_str().unwrap();
    let stock = util::llama_server();
    let o = util::spark(&[
        "serve",
        "-m",
        m,
        "--residency",
        "--vram-budget",
        "4096",
        "--llama-server",
        stock.to_str().unwrap(),
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(
        err.contains("hooked") && err.contains("build-engine"),
        "{err}"
    );

    let hooked = hooked_prefix().join("bin/llama-server");
    let o = util::spark(&[
        "serve",
        "-m",
        m,
        "--residency",
        "--llama-server",
        hooked.to_str().unwrap(),
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(err.contains("--vram-budget"), "{err}");
}

/// GPU exactness of the provider: only with `--features cuda`, ignored unless asked for, on a
/// machine with a hooked CUDA engine (scripts/gpu-check residency runs it and sets the variables).
#[cfg(feature = "cuda")]
mod gpu {
    use super::*;
    use spark_proto::control::ResidencyStats;

    fn var(name: &str) -> Option<PathBuf> {
        std::env::var_os(name).map(PathBuf::from)
    }

    /// One greedy completion from the hooked CUDA llama-server with the experts of every layer
    /// in host memory and decode's expert products offloaded; with `slots`, the tap's provider
    /// serves them. Returns the answer and the provider's exit line, if it printed one.
    fn run(
        server: &std::path::Path,
        tap: &std::path::Path,
        model: &std::path::Path,
        n_layer: u32,
        slots: Option<u32>,
        log: PathBuf,
    ) -> (Value, Option<ResidencyStats>) {
        let mut env = vec![(
            spark_proto::hook::ENV_OFFLOAD_MIN_BATCH.to_string(),
            "1".to_string(),
        )];
        if let Some(s) = slots {
            env.push(("LD_PRELOAD".into(), tap.display().to_string()));
            env.push((spark_proto::hook::ENV_RESIDENCY_SLOTS.into(), s.to_string()));
        }
        let s = LlamaServer::start(&LlamaServerConfig {
            binary: server.to_path_buf(),
            model: model.to_path_buf(),
            port: None,
            extra_args: ["-c", "1024", "-np", "1", "-ngl", "99", "--n-cpu-moe"]
                .iter()
                .map(|s| s.to_string())
                .chain([n_layer.to_string()])
                .collect(),
            env,
            ready_timeout: Duration::from_secs(300),
            log_path: log.clone(),
        })
        .unwrap();
        let body = json!({"prompt": PROMPT, "n_predict": 48, "temperature": 0.0, "n_probs": 8, "cache_prompt": false});
        let a = s.post_json("/completion", &body).unwrap();
        s.stop();
        (a, crate::lavapipe::exit_stats(&log))
    }

    #[test]
    #[ignore = "needs a GPU and a hooked CUDA engine: run by scripts/gpu-check residency (--include-ignored)"]
    fn gpu_provider_answers_exactly_like_the_stock_path() {
        let (Some(server), Some(tap), Some(model)) = (
            var("SPARK_GPU_HOOKED"),
            var("SPARK_GPU_TAP"),
            var("SPARK_GPU_MOE_FIXTURE"),
        ) else {
            panic!("needs SPARK_GPU_HOOKED, SPARK_GPU_TAP and SPARK_GPU_MOE_FIXTURE (scripts/gpu-check residency sets them)");
        };
        let geometry =
            spark::gguf::MoeGeometry::of(&spark::gguf::GgufFile::open(&model).unwrap()).unwrap();
        let n_layer = geometry.n_layer;
        let dir = util::tempdir();
        let log = |n: &str| dir.path().join(n);
        // The stock path twice (the engine's own run-to-run spread), then the provider with a
        // cache that must evict (a quarter of the experts) and one that holds them all.
        let (stock, none) = run(&server, &tap, &model, n_layer, None, log("stock1.log"));
        assert!(none.is_none(), "no provider without the tap");
        let (stock2, _) = run(&server, &tap, &model, n_layer, None, log("stock2.log"));
        let stock_spread = stock["completion_probabilities"] != stock2["completion_probabilities"];
        for slots in [geometry.n_expert / 4, geometry.n_expert] {
            let (got, stats) = run(
                &server,
                &tap,
                &model,
                n_layer,
                Some(slots),
                log(&format!("spark-{slots}.log")),
            );
            let stats = stats.expect("the provider prints its counters at exit");
            eprintln!("slots {slots}: {stats:?} hit ratio {:?}", stats.hit_ratio());
            assert!(
                stats.calls > 0,
                "the hook was never called: is decode offloaded? {stats:?}"
            );
            assert_eq!(stats.declined, 0, "{stats:?}");
            assert!(stats.hits > 0, "{stats:?}");
            assert_eq!(
                got["content"], stock["content"],
                "slots {slots}: tokens differ (stock runs differ from each other: {stock_spread})"
            );
            assert_eq!(
                got["completion_probabilities"], stock["completion_probabilities"],
                "slots {slots}: probabilities differ (stock runs differ from each other: {stock_spread})"
            );
        }
    }
}

/// Every cached engine's CPU code is the portable x86-64-v3 baseline of scripts/engine-flags:
/// no AMX tile instructions (which die with SIGILL where the OS grants no tile state) and no
/// AVX-512 registers, whatever CPU built it. Reads the machine code with objdump.
#[test]
fn engine_cpu_code_uses_no_amx_and_no_avx512() {
    let mut checked = 0;
    for (backend, hooked) in [
        (Backend::Cpu, false),
        (Backend::Cpu, true),
        (Backend::Vulkan, true),
    ] {
        let lib = spark::engine::prefix(backend, hooked).join("lib/libggml-cpu.so");
        if !lib.exists() {
            continue; // scripts/test builds all three; the CPU build is checked below
        }
        let o = Command::new("objdump")
            .args(["-d", "--no-show-raw-insn"])
            .arg(&lib)
            .output()
            .expect("run objdump (binutils)");
        assert!(o.status.success(), "objdump {}", lib.display());
        let text = String::from_utf8_lossy(&o.stdout);
        let count = |pat: &str| text.lines().filter(|l| l.contains(pat)).count();
        for op in ["tilezero", "ldtilecfg", "tileloadd", "tdpb"] {
            assert_eq!(count(op), 0, "{}: AMX instruction {op}", lib.display());
        }
        assert_eq!(count("%zmm"), 0, "{}: AVX-512 registers", lib.display());
        assert!(count("%ymm") > 0, "{}: AVX2 code expected", lib.display());
        checked += 1;
    }
    assert!(
        spark::engine::is_built(Backend::Cpu, false) && checked > 0,
        "the CPU engine is missing; run scripts/build-engine"
    );
}

/// The graph observer on the hooked CPU engine: decode graphs are read once each after they
/// ran (not through the eval callback), and the routing is still exactly the analytic one.
#[test]
fn the_graph_observer_reads_the_routing_exactly_on_the_cpu() {
    let server = hooked_prefix().join("bin").join("llama-server");
    let summary = crate::telemetry::check_analytic_routing(&server, &[], &[]);
    assert!(
        summary["graph_reads"].as_u64().unwrap_or(0) > 0,
        "decode graphs were read by the observer: {summary}"
    );
}

/// `spark bench tap --callback` runs all five sides on the hooked engine (stock; routing through
/// the observer and through the callback; hidden states through each) and says how the hidden
/// side's rows were read. The timings are reported, never asserted.
#[test]
fn bench_tap_runs_every_side_and_reads_hidden_states_after_the_graph() {
    let dir = util::tempdir();
    let model = util::fixture(dir.path(), "tiny.gguf", &["--router", "skewed"]);
    let server = hooked_prefix().join("bin").join("llama-server");
    let o = util::spark(&[
        "bench",
        "tap",
        "-m",
        model.to_str().unwrap(),
        "--llama-server",
        server.to_str().unwrap(),
        "--tap",
        crate::telemetry::tap_lib().to_str().unwrap(),
        "--reps",
        "1",
        "--n-predict",
        "4",
        "--callback",
        "--json",
        "--",
        "-c",
        "512",
        "-t",
        "1",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let r: Value = serde_json::from_slice(&o.stdout).unwrap();
    for side in [
        "stock_tok_s",
        "tapped_tok_s",
        "callback_tok_s",
        "hidden_tok_s",
        "hidden_callback_tok_s",
    ] {
        assert_eq!(r[side].as_array().map(Vec::len), Some(1), "{side}: {r}");
    }
    assert!(r["records"].as_u64().unwrap() > 0, "{r}");
    assert!(r["hidden_chunks"].as_u64().unwrap() > 0, "{r}");
    assert!(r["hidden_after_graph_rows"].as_u64().unwrap() > 0, "{r}");
    assert!(r["hidden_callback_ratio"].as_f64().is_some(), "{r}");
}

/// With a hidden-state ring, the observer reads each layer's router input after the graph
/// too (the eval callback neither asks for it nor synchronises), and the values are exactly the
/// analytic router inputs; with the observer off, the callback reads them, equally exact.
#[test]
fn the_graph_observer_reads_the_router_inputs_exactly_on_the_cpu() {
    let server = hooked_prefix().join("bin").join("llama-server");
    let (pairs, _, after_graph) =
        crate::archs::check_arch_routing(&server, "qwen3moe", &[], &[], &[]);
    assert!(
        pairs > 0 && after_graph > 0,
        "{pairs} pairs, {after_graph} rows after the graph"
    );
    let (pairs, _, after_graph) = crate::archs::check_arch_routing(
        &server,
        "qwen3moe",
        &[],
        &[],
        &[(spark_proto::hook::ENV_GRAPH_READS, "off")],
    );
    assert!(pairs > 0, "callback path compared nothing");
    assert_eq!(
        after_graph, 0,
        "SPARK_GRAPH_READS=off leaves the router inputs to the callback"
    );
}
