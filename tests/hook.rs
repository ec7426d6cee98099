//! The MoE residency hook patched into the ggml scheduler (scripts/patches/, ABI in
//! proto/include/spark_moe_hook.h): the hooked build carries it, spark tells the builds apart,
//! and on the CPU the hooked build answers exactly as the stock one.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use serde_json::{json, Value};
use spark::engine::Engine;
use spark::supervisor::{LlamaServer, LlamaServerConfig};

use crate::util;

/// The hooked CPU build's prefix, as `scripts/build-engine --hooked` names it (scripts/test
/// builds it before the tests run).
fn hooked_prefix() -> PathBuf {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("scripts/build-engine");
    let o = Command::new(script)
        .args(["--hooked", "--print"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let p = PathBuf::from(String::from_utf8(o.stdout).unwrap().trim());
    assert!(
        p.join(".spark-built").exists(),
        "hooked build missing at {}; run scripts/build-engine --hooked (scripts/test does)",
        p.display()
    );
    p
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

fn answer(server: PathBuf, model: &std::path::Path, log: PathBuf) -> Value {
    let s = LlamaServer::start(&LlamaServerConfig {
        binary: server,
        model: model.to_path_buf(),
        port: None,
        extra_args: ["-c", "1024", "-t", "2", "-np", "1"]
            .iter()
            .map(|s| s.to_string())
            .collect(),
        env: vec![],
        ready_timeout: Duration::from_secs(60),
        log_path: log,
    })
    .unwrap();
    let body = json!({"prompt": "Experts that stay resident", "n_predict": 16, "temperature": 0.0, "n_probs": 4, "cache_prompt": false});
    let a = s.post_json("/completion", &body).unwrap();
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
    assert_eq!(s.variant(), "cpu");

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
