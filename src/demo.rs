//! `spark demo`: the whole loop on a model spark writes itself — a fixture, its inspection, and
//! a real completion from the pinned stock llama-server.
//!
//! Owns the demo's narrative only; every step calls the library module that owns it.

use std::path::PathBuf;
use std::time::Duration;

use crate::engine::{self, Engine};
use crate::fixture::{self, FixtureSpec, Size};
use crate::gguf::{GgufFile, MoeGeometry};
use crate::inspect::InspectReport;
use crate::supervisor::{LlamaServer, LlamaServerConfig};

/// Options of `spark demo`.
#[derive(Debug, Clone)]
pub struct DemoConfig {
    pub dir: PathBuf,
    pub llama_server: Option<PathBuf>,
    pub prompt: String,
    pub n_predict: u32,
    pub ready_timeout: Duration,
}

/// Runs the demo, narrating on stderr and printing results on stdout.
pub fn run(cfg: &DemoConfig) -> anyhow::Result<()> {
    use anyhow::Context;
    let engine = Engine::locate(cfg.llama_server.as_deref())?;
    eprintln!("[1/4] engine: {}", engine.llama_server.display());
    std::fs::create_dir_all(&cfg.dir)
        .with_context(|| format!("create demo directory {}", cfg.dir.display()))?;

    let model = cfg.dir.join("spark-demo-tiny-skewed.gguf");
    let spec = FixtureSpec::preset(Size::Tiny);
    if !model.exists() {
        let vocab = engine::vocab_path(engine::DEFAULT_VOCAB)?;
        let rep = fixture::write_fixture(&spec, &vocab, &model)?;
        eprintln!(
            "[2/4] fixture: wrote {} ({} bytes, vocab {})",
            model.display(),
            rep.bytes,
            rep.n_vocab
        );
    } else {
        eprintln!("[2/4] fixture: reusing {}", model.display());
    }

    let file = GgufFile::open(&model)?;
    let geometry = MoeGeometry::of(&file)?;
    eprintln!("[3/4] spark inspect {}", model.display());
    print!("{}", InspectReport::new(&file, geometry, None).render());

    eprintln!("[4/4] llama-server: starting on the fixture");
    let server = LlamaServer::start(&LlamaServerConfig {
        binary: engine.llama_server.clone(),
        model: model.clone(),
        port: None,
        extra_args: vec![
            "-c".into(),
            "2048".into(),
            "-t".into(),
            "2".into(),
            "-np".into(),
            "1".into(),
        ],
        env: vec![],
        ready_timeout: cfg.ready_timeout,
        log_path: cfg.dir.join("llama-server.log"),
    })?;
    let answer = server.post_json(
        "/completion",
        &serde_json::json!({"prompt": cfg.prompt, "n_predict": cfg.n_predict, "temperature": 0.0, "cache_prompt": false}),
    );
    server.stop();
    let answer = answer?;
    let content = answer
        .get("content")
        .and_then(|c| c.as_str())
        .unwrap_or_default();
    let predicted = answer
        .pointer("/timings/predicted_n")
        .and_then(|v| v.as_u64())
        .unwrap_or(0);
    let tps = answer
        .pointer("/timings/predicted_per_second")
        .and_then(|v| v.as_f64())
        .unwrap_or(0.0);
    println!();
    println!("prompt     {:?}", cfg.prompt);
    println!("completion {content:?}");
    println!(
        "           {predicted} tokens at {tps:.1} tokens/s from llama-server (pid gone, log {})",
        cfg.dir.join("llama-server.log").display()
    );
    Ok(())
}
