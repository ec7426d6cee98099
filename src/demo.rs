//! `spark demo`: the whole loop on a model spark writes itself — a fixture, its inspection, a
//! real completion from the pinned stock llama-server, `spark serve --spark` learning from
//! requests, calibrate + validate on built-in synthetic agent sessions, and, where the hooked
//! Vulkan engine is built, one request through `spark serve --residency` on Mesa's lavapipe
//! (hits, loads, and the same answer as without the provider).
//!
//! The fixture's weights are seeded noise by design, so its text means nothing; the demo says so
//! and points at what does (routing, the profile, hit ratios, residency counters).
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
    tracing::info!(target: crate::progress::TARGET, "[1/8] engine: {}", engine.llama_server.display());
    std::fs::create_dir_all(&cfg.dir)
        .with_context(|| format!("create demo directory {}", cfg.dir.display()))?;

    let model = cfg.dir.join("spark-demo-tiny-skewed.gguf");
    let spec = FixtureSpec::preset(Size::Tiny);
    if !model.exists() {
        let vocab = engine::vocab_path(engine::DEFAULT_VOCAB)?;
        let rep = fixture::write_fixture(&spec, &vocab, &model)?;
        tracing::info!(
            target: crate::progress::TARGET,
            "[2/8] fixture: wrote {} ({} bytes, vocab {})",
            model.display(),
            rep.bytes,
            rep.n_vocab
        );
    } else {
        tracing::info!(target: crate::progress::TARGET, "[2/8] fixture: reusing {}", model.display());
    }

    let file = GgufFile::open(&model)?;
    let geometry = MoeGeometry::of(&file)?;
    tracing::info!(target: crate::progress::TARGET, "[3/8] spark inspect {}", model.display());
    print!(
        "{}",
        InspectReport::new(&file, geometry.clone(), None).render()
    );

    tracing::info!(target: crate::progress::TARGET, "[4/8] llama-server alone: a completion from the pinned stock build");
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
    println!(
        "note       the fixture's weights are seeded noise by design: its text means nothing."
    );
    println!(
        "           Look instead at what spark sees: routing per layer, the profile it writes,"
    );
    println!("           the shadow cache's hit ratio and, below, residency hits and loads.");

    serve_and_learn(cfg, &engine, &model)?;

    tracing::info!(
            target: crate::progress::TARGET,
        "[7/8] calibrate on the built-in synthetic agent sessions, validate on the held-out ones"
    );
    let summary = crate::validate::demo_loop(&model, &engine, &cfg.dir.join("loop"))?;
    println!();
    print!("{}", summary.render());

    residency_on_lavapipe(cfg, &model, &geometry)
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
        env: vec![],
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
        residency_gpu: Default::default(),
        host_memory: crate::serve::host_memory::HostMemoryChoice::Auto,
        cache_policy: crate::cache::PolicyKind::Spark,
        vram_budget_mib: None,
        ctx: 2048,
    };
    tracing::info!(
            target: crate::progress::TARGET,
        "[5/8] spark serve --spark -m {} --port {port}",
        model.display()
    );
    let serving = Serving::start(serve_cfg, cfg.ready_timeout)?;
    let (base, agent) = (&serving.base, &serving.agent);
    let result = (|| -> anyhow::Result<()> {
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
        tracing::info!(target: crate::progress::TARGET, "[6/8] what spark learned");
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
    let stopped = serving.stop();
    result?;
    stopped
}

/// `spark serve` running in this process on its own runtime, ready, until [`Serving::stop`].
struct Serving {
    rt: tokio::runtime::Runtime,
    stop_tx: tokio::sync::oneshot::Sender<()>,
    serving: tokio::task::JoinHandle<anyhow::Result<()>>,
    base: String,
    agent: ureq::Agent,
}

impl Serving {
    /// Starts `serve_cfg` and waits (bounded by `ready_timeout`) until it answers `/health`.
    fn start(
        serve_cfg: crate::serve::ServeConfig,
        ready_timeout: Duration,
    ) -> anyhow::Result<Serving> {
        let base = format!("http://127.0.0.1:{}", serve_cfg.port);
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?;
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let serving = rt.spawn(crate::serve::serve(serve_cfg, async move {
            let _ = stop_rx.await;
        }));
        let agent = ureq::AgentBuilder::new()
            .timeout(Duration::from_secs(300))
            .build();
        let s = Serving {
            rt,
            stop_tx,
            serving,
            base,
            agent,
        };
        let deadline = std::time::Instant::now() + ready_timeout + Duration::from_secs(5);
        loop {
            if s.serving.is_finished() {
                return Err(s
                    .stop()
                    .err()
                    .unwrap_or_else(|| anyhow::anyhow!("spark serve ended before it was ready")));
            }
            if s.agent
                .get(&format!("{}/health", s.base))
                .timeout(Duration::from_secs(1))
                .call()
                .is_ok()
            {
                return Ok(s);
            }
            if std::time::Instant::now() > deadline {
                let _ = s.stop();
                anyhow::bail!(
                    "spark serve was not ready within {} s",
                    ready_timeout.as_secs()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn status(&self) -> anyhow::Result<serde_json::Value> {
        Ok(self
            .agent
            .get(&format!("{}/spark/status", self.base))
            .timeout(Duration::from_secs(10))
            .call()?
            .into_json()?)
    }

    /// Stops serving (graceful, within its grace period) and returns how serving ended.
    fn stop(self) -> anyhow::Result<()> {
        let _ = self.stop_tx.send(());
        self.rt.block_on(self.serving)?
    }
}

/// Step 8: where the hooked Vulkan engine is built, one greedy request through `spark serve`
/// on Mesa's lavapipe without the provider, then the same through `spark serve --residency`:
/// the provider's hits and loads, and whether the answers are equal (they must be). Elsewhere,
/// one line on how to see it.
fn residency_on_lavapipe(
    cfg: &DemoConfig,
    model: &std::path::Path,
    geometry: &MoeGeometry,
) -> anyhow::Result<()> {
    use crate::engine::Backend;
    println!();
    if !engine::is_built(Backend::Vulkan, true) {
        tracing::info!(target: crate::progress::TARGET, "[8/8] residency: skipped, the hooked Vulkan engine is not built");
        println!("residency  to see spark serve experts from VRAM slots (hits, loads, the same answer as");
        println!("           without it) on this machine, no GPU needed: scripts/build-engine --vulkan --hooked");
        println!("           (scripts/test builds it), then run scripts/demo again");
        return Ok(());
    }
    let server = engine::prefix(Backend::Vulkan, true).join("bin/llama-server");
    let vulkan = Engine::locate(Some(&server))?;
    tracing::info!(
        target: crate::progress::TARGET,
        "[8/8] residency: spark serve --residency on {} (Mesa's lavapipe: a CPU posing as a GPU)",
        vulkan.variant()
    );
    let tap = crate::telemetry::locate_tap(None)?;
    let n_layer = geometry.n_layer.to_string();
    let mut answers = Vec::new();
    let mut counters = serde_json::Value::Null;
    for residency in [false, true] {
        let port = crate::supervisor::free_port()?;
        let serve_cfg = crate::serve::ServeConfig {
            model: model.to_path_buf(),
            engine: vulkan.clone(),
            host: "127.0.0.1".into(),
            port,
            // Every layer on the device with its experts in host memory, so the scheduler
            // copies experts every step: the copy the provider serves from its slots.
            llama_args: [
                "-ngl",
                "99",
                "--n-cpu-moe",
                &n_layer,
                "-fa",
                "off",
                "-c",
                "2048",
                "-np",
                "1",
                "-t",
                "2",
            ]
            .iter()
            .map(|a| a.to_string())
            .collect(),
            // lavapipe is a CPU-type Vulkan device, which ggml uses only when named; decode's
            // expert products go to the device (as they would on a GPU) in both runs.
            env: vec![
                ("GGML_VK_VISIBLE_DEVICES".into(), "0".into()),
                (spark_proto::hook::ENV_OFFLOAD_MIN_BATCH.into(), "1".into()),
            ],
            ready_timeout: cfg.ready_timeout,
            request_timeout: Duration::from_secs(300),
            idle_timeout: Duration::from_secs(120),
            grace: Duration::from_secs(5),
            work_dir: cfg.dir.join(if residency {
                "serve-residency"
            } else {
                "serve-vulkan"
            }),
            forward_log: false,
            backoff: crate::supervisor::Backoff::default(),
            health: Some(crate::supervisor::Health::default()),
            limits: crate::serve::Limits::default(),
            tap: Some(tap.clone()),
            profile: None,
            cache_slots: None,
            residency,
            // The demo compares answers with and without the provider: the same (mapped) host
            // memory on both sides, so only residency differs.
            host_memory: crate::serve::host_memory::HostMemoryChoice::Mapped,
            residency_gpu: Default::default(),
            cache_policy: crate::cache::PolicyKind::Spark,
            vram_budget_mib: residency.then_some(4096),
            ctx: 2048,
        };
        let serving = Serving::start(serve_cfg, cfg.ready_timeout)?;
        let asked = (|| -> anyhow::Result<(String, serde_json::Value)> {
            let body = serde_json::json!({"prompt": cfg.prompt, "n_predict": cfg.n_predict, "temperature": 0.0, "cache_prompt": false});
            let a: serde_json::Value = serving
                .agent
                .post(&format!("{}/completion", serving.base))
                .send_json(body)?
                .into_json()?;
            let text = a["content"].as_str().unwrap_or_default().to_string();
            // The provider's counters reach the status with the control replies that follow
            // plan updates, the last one after the request completed: wait until they stop
            // moving (the answer is whole, so no hook call is left), not for the first reply,
            // which may be one taken mid-request.
            let until = std::time::Instant::now() + Duration::from_secs(30);
            let mut last: Option<u64> = None;
            loop {
                let r = serving.status()?["routing"]["residency"].clone();
                let calls = r["hook_calls"].as_u64().filter(|&c| c > 0);
                if !residency
                    || (calls.is_some() && calls == last)
                    || std::time::Instant::now() > until
                {
                    return Ok((text, r));
                }
                last = calls;
                std::thread::sleep(Duration::from_millis(500));
            }
        })();
        let stopped = serving.stop();
        let (text, r) = asked?;
        stopped?;
        answers.push(text);
        if residency {
            counters = r;
        }
    }
    let n = |k: &str| counters[k].as_u64().unwrap_or(0);
    println!(
        "residency  serve --residency, {} slots per expert layer: {} hits, {} loads, {} streamed in {} hook calls",
        counters["slots_per_layer"].as_u64().map_or("?".into(), |s| s.to_string()),
        n("hits"),
        n("loads"),
        n("streamed"),
        n("hook_calls")
    );
    let same = answers[0] == answers[1];
    println!(
        "           answer equals the same run without the provider: {}",
        if same { "yes" } else { "NO" }
    );
    println!("           (lavapipe's speeds are not GPU speeds; its hits and bytes are what a GPU would see)");
    anyhow::ensure!(
        same,
        "residency changed the answer: {:?} without the provider, {:?} with it",
        answers[0],
        answers[1]
    );
    Ok(())
}
