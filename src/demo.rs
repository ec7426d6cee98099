//! `spark demo`: the whole loop on a model spark writes itself — a fixture, its inspection, a
//! real completion from the pinned stock llama-server, `spark serve --spark` learning from
//! requests, and calibrate + validate on built-in synthetic agent sessions.
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
    eprintln!("[1/7] engine: {}", engine.llama_server.display());
    std::fs::create_dir_all(&cfg.dir)
        .with_context(|| format!("create demo directory {}", cfg.dir.display()))?;

    let model = cfg.dir.join("spark-demo-tiny-skewed.gguf");
    let spec = FixtureSpec::preset(Size::Tiny);
    if !model.exists() {
        let vocab = engine::vocab_path(engine::DEFAULT_VOCAB)?;
        let rep = fixture::write_fixture(&spec, &vocab, &model)?;
        eprintln!(
            "[2/7] fixture: wrote {} ({} bytes, vocab {})",
            model.display(),
            rep.bytes,
            rep.n_vocab
        );
    } else {
        eprintln!("[2/7] fixture: reusing {}", model.display());
    }

    let file = GgufFile::open(&model)?;
    let geometry = MoeGeometry::of(&file)?;
    eprintln!("[3/7] spark inspect {}", model.display());
    print!("{}", InspectReport::new(&file, geometry, None).render());

    eprintln!("[4/7] llama-server alone: a completion from the pinned stock build");
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
    println!("           {predicted} tokens at {tps:.1} tokens/s from llama-server");

    serve_and_learn(cfg, &engine, &model)?;

    eprintln!(
        "[7/7] calibrate on the built-in synthetic agent sessions, validate on the held-out ones"
    );
    let summary = crate::validate::demo_loop(&model, &engine, &cfg.dir.join("loop"))?;
    println!();
    print!("{}", summary.render());
    Ok(())
}

/// Steps 5 and 6: `spark serve --spark` in this process, a few requests through it, the profile
/// it rewrote and the live status.
fn serve_and_learn(
    cfg: &DemoConfig,
    engine: &Engine,
    model: &std::path::Path,
) -> anyhow::Result<()> {
    use std::time::Instant;
    let tap = crate::telemetry::locate_tap(None)?;
    let port = crate::supervisor::free_port()?;
    let profile = crate::profile::path_for(model);
    let serve_cfg = crate::serve::ServeConfig {
        model: model.to_path_buf(),
        engine: engine.clone(),
        host: "127.0.0.1".into(),
        port,
        llama_args: vec![
            "-c".into(),
            "2048".into(),
            "-t".into(),
            "2".into(),
            "-np".into(),
            "2".into(),
        ],
        ready_timeout: cfg.ready_timeout,
        request_timeout: Duration::from_secs(120),
        idle_timeout: Duration::from_secs(60),
        grace: Duration::from_secs(5),
        work_dir: cfg.dir.join("serve"),
        forward_log: false,
        backoff: crate::supervisor::Backoff::default(),
        health: Some(crate::supervisor::Health::default()),
        limits: crate::serve::Limits::default(),
        tap: Some(tap),
        profile: Some(profile.clone()),
        cache_slots: None,
        residency: false,
        host_memory: crate::serve::host_memory::HostMemoryChoice::Auto,
        cache_policy: crate::cache::PolicyKind::Spark,
        vram_budget_mib: None,
        ctx: 2048,
    };
    eprintln!(
        "[5/7] spark serve --spark -m {} --port {port}",
        model.display()
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let serving = rt.spawn(crate::serve::serve(serve_cfg, async move {
        let _ = stop_rx.await;
    }));
    let base = format!("http://127.0.0.1:{port}");
    let agent = ureq::AgentBuilder::new()
        .timeout(Duration::from_secs(120))
        .build();
    let deadline = Instant::now() + cfg.ready_timeout + Duration::from_secs(5);
    let result = (|| -> anyhow::Result<()> {
        loop {
            if serving.is_finished() {
                anyhow::bail!("spark serve ended before it was ready");
            }
            if agent
                .get(&format!("{base}/health"))
                .timeout(Duration::from_secs(1))
                .call()
                .is_ok()
            {
                break;
            }
            if Instant::now() > deadline {
                anyhow::bail!(
                    "spark serve was not ready within {} s",
                    cfg.ready_timeout.as_secs()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let prompts = [
            "Write a function that caches the hottest experts",
            "Explain why expert routing is skewed",
            "List three ways to make decoding faster",
        ];
        for (i, p) in prompts.iter().enumerate() {
            let body = serde_json::json!({"messages": [{"role": "user", "content": p}], "max_tokens": 24, "temperature": 0.0});
            let r: serde_json::Value = agent
                .post(&format!("{base}/v1/chat/completions"))
                .send_json(body)?
                .into_json()?;
            let text = r
                .pointer("/choices/0/message/content")
                .and_then(|c| c.as_str())
                .unwrap_or_default();
            let clipped: String = text.chars().take(60).collect();
            println!(
                "request {}  POST /v1/chat/completions through spark -> {clipped:?}",
                i + 1
            );
            // The profile is rewritten after each answer; wait (bounded) for the rewrite.
            let until = Instant::now() + Duration::from_secs(10);
            loop {
                let st: serde_json::Value = agent
                    .get(&format!("{base}/spark/status"))
                    .call()?
                    .into_json()?;
                let writes = st
                    .pointer("/profile/writes")
                    .and_then(|w| w.as_u64())
                    .unwrap_or(0);
                if writes > i as u64 || Instant::now() > until {
                    let us = st
                        .pointer("/profile/last_write_us")
                        .and_then(|w| w.as_u64())
                        .unwrap_or(0);
                    println!(
                        "           profile rewritten ({writes} writes so far, last took {:.2} ms)",
                        us as f64 / 1000.0
                    );
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        eprintln!("[6/7] what spark learned");
        let st: serde_json::Value = agent
            .get(&format!("{base}/spark/status"))
            .call()?
            .into_json()?;
        let text = std::fs::read_to_string(&profile)?;
        println!();
        println!("{} (first lines):", profile.display());
        for line in text.lines().take(7) {
            println!("  {line}");
        }
        let r = &st["routing"];
        let pct = |v: &serde_json::Value| {
            v.as_f64()
                .map(|x| format!("{:.1}%", 100.0 * x))
                .unwrap_or_else(|| "n/a".into())
        };
        println!();
        println!("GET /spark/status:");
        println!(
            "  requests            {} ({} errors)",
            st["requests"]["count"], st["requests"]["errors"]
        );
        println!(
            "  routing records     {} prompt, {} decode ({} decode tokens), {} dropped",
            r["prompt"]["records"],
            r["decode"]["records"],
            r["decode"]["tokens"],
            r["ring"]["dropped"]
        );
        println!(
            "  hottest decode experts per layer {}",
            r["decode"]["top_per_layer"]
        );
        let sc = &r["shadow_cache"];
        println!("  shadow cache        {} slots/layer, policy {}: hit ratio {} (Belady bound over the window {})", sc["slots_per_layer"], sc["policy"].as_str().unwrap_or("?"), pct(&sc["hit_ratio"]), pct(&sc["window"]["belady_hit_ratio"]));
        Ok(())
    })();
    let _ = stop_tx.send(());
    let served = rt.block_on(serving);
    result?;
    served??;
    Ok(())
}
