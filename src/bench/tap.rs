//! `spark bench tap`: decode speed of llama-server with the tap preloaded versus without.
//!
//! Owns the overhead measurement: a stock, a tapped (routing only) and a tapped llama-server
//! capturing hidden states of every token, on the same model, started side by side, then
//! alternating repetitions of the same greedy completion (the order rotates every repetition
//! so drift and warm-up hit all sides equally). Reports llama-server's
//! own decode tokens/s per repetition, the medians and their ratio. A benchmark reports a
//! number; it never asserts one. Never spawns processes itself (the supervisor does).

use crate::plan::median::median;
use std::path::PathBuf;
use std::time::Duration;

use serde::Serialize;

use crate::engine::{self, Engine, EngineError};
use crate::fixture::{self, FixtureError, FixtureSpec, Size};
use crate::telemetry::{locate_tap, Session, SessionConfig, TelemetryError};
use spark_proto::control::{HiddenConfig, HiddenTensor};
use spark_proto::hook::ENV_GRAPH_READS;

#[derive(Debug, clap::Args)]
pub struct BenchTapArgs {
    /// Model to serve (default: a medium fixture written to a temporary directory)
    #[arg(short = 'm', long)]
    pub model: Option<PathBuf>,
    /// Repetitions per side
    #[arg(long, default_value_t = 6)]
    pub reps: u32,
    /// Tokens generated per repetition
    #[arg(long, default_value_t = 96)]
    pub n_predict: u32,
    /// llama-server binary (default: $SPARK_LLAMA_SERVER, then the build in the cache)
    #[arg(long, value_name = "PATH")]
    pub llama_server: Option<PathBuf>,
    /// The tap library (default: $SPARK_TAP, then next to the spark executable)
    #[arg(long, value_name = "PATH")]
    pub tap: Option<PathBuf>,
    /// Skip the third server that also captures hidden states of every token
    #[arg(long)]
    pub no_hidden: bool,
    /// Also run the tapped servers with the graph observer off (`SPARK_GRAPH_READS=off`): on a
    /// hooked engine, the eval-callback path (a graph cut and a synchronisation per MoE layer)
    /// side by side with the observer's one read per graph, for routing and (unless
    /// --no-hidden) for hidden states
    #[arg(long)]
    pub callback: bool,
    /// Print JSON
    #[arg(long)]
    pub json: bool,
    /// Arguments passed to both llama-servers unchanged
    #[arg(last = true)]
    pub server_args: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum BenchTapError {
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error(transparent)]
    Fixture(#[from] FixtureError),
    #[error(transparent)]
    Telemetry(#[from] TelemetryError),
    #[error("create a work directory: {0}")]
    Io(#[from] std::io::Error),
    #[error("bench tap: {0}")]
    NoTiming(String),
}

impl BenchTapError {
    pub fn is_usage(&self) -> bool {
        match self {
            BenchTapError::Engine(_) | BenchTapError::Fixture(_) => true,
            BenchTapError::Telemetry(e) => e.is_usage(),
            _ => false,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct BenchTapReport {
    pub model: PathBuf,
    pub reps: u32,
    pub n_predict: u32,
    pub stock_tok_s: Vec<f64>,
    pub tapped_tok_s: Vec<f64>,
    pub hidden_tok_s: Vec<f64>,
    pub stock_median: f64,
    pub tapped_median: f64,
    pub hidden_median: Option<f64>,
    /// `--callback`: tapped with the graph observer off (the eval callback reads every graph).
    pub callback_tok_s: Vec<f64>,
    pub callback_median: Option<f64>,
    /// tapped ÷ stock (target ≥ 0.98 for routing only on a device, issue 23)
    pub ratio: f64,
    /// tapped through the eval callback ÷ stock.
    pub callback_ratio: Option<f64>,
    /// tapped with hidden states of every token ÷ stock (target ≥ 0.95 on a device)
    pub hidden_ratio: Option<f64>,
    /// `--callback`: hidden states of every token with the graph observer off.
    pub hidden_callback_tok_s: Vec<f64>,
    pub hidden_callback_median: Option<f64>,
    pub hidden_callback_ratio: Option<f64>,
    pub records: u64,
    pub dropped: u64,
    pub hidden_chunks: u64,
    pub hidden_dropped: u64,
    /// Hidden-state rows the hidden side's tap read once after their graph (the graph observer)
    /// rather than through the eval callback: 0 on a stock engine.
    pub hidden_after_graph_rows: u64,
}

pub fn run(a: &BenchTapArgs) -> Result<BenchTapReport, BenchTapError> {
    let engine = Engine::locate(a.llama_server.as_deref())?;
    let tap = locate_tap(a.tap.as_deref())?;
    let work = crate::atomic_file::private_tempdir("spark-bench-tap-")?;
    let model = match &a.model {
        Some(m) => m.clone(),
        None => {
            let out = work.path().join("medium.gguf");
            let vocab = engine::vocab_path(engine::DEFAULT_VOCAB)?;
            fixture::write_fixture(&FixtureSpec::preset(Size::Medium), &vocab, &out)?;
            out
        }
    };
    let cfg = |tap: Option<PathBuf>, hidden: bool, name: &str, callback: bool| SessionConfig {
        llama_server: engine.llama_server.clone(),
        model: model.clone(),
        tap,
        extra_args: a.server_args.clone(),
        env: if callback {
            vec![(ENV_GRAPH_READS.to_string(), "off".to_string())]
        } else {
            Vec::new()
        },
        ring_capacity: 1 << 18,
        hidden_capacity: hidden.then_some(1 << 14),
        ready_timeout: Duration::from_secs(180),
        log_path: work.path().join(name),
    };
    let mut sides = vec![
        Session::start(&cfg(None, false, "stock.log", false))?,
        Session::start(&cfg(Some(tap.clone()), false, "tapped.log", false))?,
    ];
    // Sides 0 and 1 are stock and tapped; the optional ones follow in this order.
    let callback_side = a.callback.then_some(sides.len());
    if a.callback {
        sides.push(Session::start(&cfg(
            Some(tap.clone()),
            false,
            "callback.log",
            true,
        ))?);
    }
    let hidden = |name: &str, callback: bool| -> Result<Session, BenchTapError> {
        let mut h = Session::start(&cfg(Some(tap.clone()), true, name, callback))?;
        h.keep_hidden = false;
        h.set_hidden(Some(HiddenConfig {
            every: 1,
            budget_mib: u32::MAX >> 12,
            tensor: HiddenTensor::RouterInput,
        }))?;
        Ok(h)
    };
    let hidden_side = (!a.no_hidden).then_some(sides.len());
    if !a.no_hidden {
        sides.push(hidden("hidden.log", false)?);
    }
    let hidden_callback_side = (!a.no_hidden && a.callback).then_some(sides.len());
    if hidden_callback_side.is_some() {
        sides.push(hidden("hidden-callback.log", true)?);
    }
    for s in &mut sides {
        s.discard();
    }
    let prompt = serde_json::json!("The experts that a mixture-of-experts model routes to");
    let mut tps: Vec<Vec<f64>> = vec![Vec::new(); sides.len()];
    let mut records = Vec::new();
    let mut total = 0u64;
    // One unmeasured round each, so every server has touched every page of the model.
    for s in &mut sides {
        s.complete(0, &prompt, 8, &mut records)?;
    }
    let n = sides.len();
    let steps =
        crate::progress::Steps::new("bench tap", u64::from(a.reps) * n as u64, "runs", false);
    for rep in 0..a.reps {
        // Rotate the order every repetition so no side always runs first.
        for i in 0..n {
            steps.bar_at(u64::from(rep) * n as u64 + i as u64, || {
                format!("repetition {}/{}", rep + 1, a.reps)
            });
            let side = (i + rep as usize) % n;
            records.clear();
            let c = sides[side].complete(rep + 1, &prompt, a.n_predict, &mut records)?;
            let t = c.predicted_per_second.ok_or_else(|| {
                BenchTapError::NoTiming("llama-server reported no decode timing".into())
            })?;
            if side == 1 {
                total += records.len() as u64;
            }
            tps[side].push(t);
        }
    }
    let dropped = sides[1].ring_dropped();
    let (hidden_chunks, hidden_dropped) = hidden_side
        .map(|i| (sides[i].hidden_drained, sides[i].hidden_dropped()))
        .unwrap_or((0, 0));
    let hidden_after_graph_rows = match hidden_side {
        Some(i) => sides[i]
            .control()
            .and_then(|c| c.stats(Duration::from_secs(5)).ok())
            .map_or(0, |s| s.graph_hidden_rows),
        None => 0,
    };
    for s in sides {
        s.stop();
    }
    let of = |side: Option<usize>| side.map(|i| tps[i].clone()).unwrap_or_default();
    let (hidden_tok_s, callback_tok_s) = (of(hidden_side), of(callback_side));
    let hidden_callback_tok_s = of(hidden_callback_side);
    let hcm = (!hidden_callback_tok_s.is_empty()).then(|| median(&hidden_callback_tok_s));
    let (s_tps, t_tps) = (tps[0].clone(), tps[1].clone());
    let (sm, tm) = (median(&s_tps), median(&t_tps));
    let hm = (!hidden_tok_s.is_empty()).then(|| median(&hidden_tok_s));
    let cm = (!callback_tok_s.is_empty()).then(|| median(&callback_tok_s));
    let over_stock = |x: f64| if sm > 0.0 { x / sm } else { 0.0 };
    Ok(BenchTapReport {
        model,
        reps: a.reps,
        n_predict: a.n_predict,
        stock_tok_s: s_tps,
        tapped_tok_s: t_tps,
        hidden_tok_s,
        stock_median: sm,
        tapped_median: tm,
        hidden_median: hm,
        callback_tok_s,
        callback_median: cm,
        ratio: over_stock(tm),
        callback_ratio: cm.map(over_stock),
        hidden_ratio: hm.map(over_stock),
        hidden_callback_tok_s,
        hidden_callback_median: hcm,
        hidden_callback_ratio: hcm.map(over_stock),
        records: total,
        dropped,
        hidden_chunks,
        hidden_dropped,
        hidden_after_graph_rows,
    })
}

/// Runs the bench and prints the report.
pub fn run_and_print(a: &BenchTapArgs) -> Result<(), BenchTapError> {
    let r = run(a)?;
    if a.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&r).expect("report serialises")
        );
    } else {
        let fmt = |v: &[f64]| {
            v.iter()
                .map(|x| format!("{x:.1}"))
                .collect::<Vec<_>>()
                .join(" ")
        };
        println!("model        {}", r.model.display());
        println!(
            "stock  tok/s {}  (median {:.2})",
            fmt(&r.stock_tok_s),
            r.stock_median
        );
        println!(
            "tapped tok/s {}  (median {:.2})",
            fmt(&r.tapped_tok_s),
            r.tapped_median
        );
        println!(
            "ratio        {:.3}  (tapped ÷ stock, routing only; {} records captured, {} dropped)",
            r.ratio, r.records, r.dropped
        );
        if let (Some(cm), Some(cr)) = (r.callback_median, r.callback_ratio) {
            println!("callbk tok/s {}  (median {cm:.2})", fmt(&r.callback_tok_s));
            println!(
                "ratio        {cr:.3}  (tapped through the eval callback, graph observer off, ÷ stock)"
            );
        }
        if let (Some(hm), Some(hr)) = (r.hidden_median, r.hidden_ratio) {
            println!("hidden tok/s {}  (median {hm:.2})", fmt(&r.hidden_tok_s));
            println!(
                "ratio        {hr:.3}  (routing + hidden states every token ÷ stock; {} chunks, {} dropped; {} rows read after their graph)",
                r.hidden_chunks, r.hidden_dropped, r.hidden_after_graph_rows
            );
        }
        if let (Some(m), Some(ratio)) = (r.hidden_callback_median, r.hidden_callback_ratio) {
            println!(
                "hidcb  tok/s {}  (median {m:.2})",
                fmt(&r.hidden_callback_tok_s)
            );
            println!(
                "ratio        {ratio:.3}  (routing + hidden states every token through the eval callback, graph observer off, ÷ stock)"
            );
        }
    }
    Ok(())
}
