//! The `spark` binary: parses the command line, calls the library, maps errors to exit codes.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};

use spark::engine::{self, Engine, EngineError};
use spark::exit;
use spark::fixture::{self, FixtureError, FixtureSpec, Router, Size};
use spark::gguf::{GgmlType, GgufError, GgufFile, MoeGeometry};
use spark::inspect::InspectReport;
use spark::supervisor::ServerError;

#[derive(Parser)]
#[command(name = "spark", version, about = "Expert-residency runtime sidecar for llama.cpp's llama-server", after_help = exit::HELP)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

// Parsed once per run: the size of the largest variant costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Command {
    /// Show what is in a GGUF model: geometry, expert sizes, byte totals, KV bytes, fingerprint
    Inspect(InspectArgs),
    /// Write a small qwen3moe model with seeded weights that stock llama-server runs
    Fixture(FixtureArgs),
    /// Write a fixture, inspect it and get a real completion from llama-server
    Demo(DemoArgs),
    /// Show which llama-server build spark would drive
    Engine(EngineArgs),
    /// Wrap llama-server: clients talk to spark as they would to llama-server
    Serve(spark::serve::cli::ServeArgs),
    /// Agent session logs (Claude Code, Codex) into a train/held-out prompt corpus
    Sessions(spark::sessions::cli::SessionsArgs),
    /// What fits, which flags, how fast: a forecast calibrated by llama-bench receipts
    Plan(spark::plan::cli::PlanCommand),
    /// Benchmarks that report numbers (`spark bench plan`: forecast error against llama-bench)
    #[command(subcommand)]
    Bench(BenchCommand),
    /// Routing traces: show one, convert between binary, JSONL and CSV
    #[command(subcommand)]
    Trace(spark::trace::record::TraceCli),
    /// Replay a routing trace through the cache policies: misses, ratio to Belady, plots
    Simulate(spark::simulate::SimulateArgs),
    /// Build a routing profile by replaying the train chunks of a session corpus (resumable)
    Calibrate(spark::validate::CalibrateArgs),
    /// Check a profile on the held-out chunks: cold-hit rates per placement, report, exit code
    Validate(spark::validate::ValidateArgs),
    /// Routing profiles (`<model>.gguf.spark.csv`): show, heatmap
    #[command(subcommand)]
    Profile(spark::profile::ProfileCommand),
}

#[derive(Args)]
struct InspectArgs {
    /// The GGUF file
    model: PathBuf,
    /// Print JSON instead of text
    #[arg(long)]
    json: bool,
    /// Context length for the KV-cache total (default: the model's)
    #[arg(long)]
    ctx: Option<u64>,
}

#[derive(Args)]
struct FixtureArgs {
    /// Output path of the GGUF file
    #[arg(long)]
    out: PathBuf,
    /// Preset the other flags start from
    #[arg(long, value_enum, default_value = "tiny")]
    size: Size,
    #[arg(long)]
    layers: Option<u32>,
    #[arg(long)]
    experts: Option<u32>,
    #[arg(long)]
    top_k: Option<u32>,
    #[arg(long)]
    embd: Option<u64>,
    /// FFN length of one expert
    #[arg(long)]
    expert_ff: Option<u64>,
    #[arg(long)]
    seed: Option<u64>,
    /// Router variant: uniform, skewed (a few hot experts) or analytic (routing computable from the file)
    #[arg(long, value_enum)]
    router: Option<Router>,
    /// Type of the large matrices: f32, f16 or q8_0
    #[arg(long = "type")]
    weight_type: Option<String>,
    /// Vocab GGUF whose tokenizer is copied (default: the pinned source's llama-spm vocab)
    #[arg(long)]
    vocab: Option<PathBuf>,
    /// Print what was written as JSON
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct DemoArgs {
    /// Working directory for the demo's model and logs
    #[arg(long)]
    dir: Option<PathBuf>,
    #[command(flatten)]
    engine: EngineArgs,
    /// Tokens to generate
    #[arg(long, default_value_t = 24)]
    n_predict: u32,
    /// Seconds to wait for llama-server to become ready
    #[arg(long, default_value_t = 120)]
    ready_timeout: u64,
}

#[derive(Args)]
struct EngineArgs {
    /// llama-server binary (default: $SPARK_LLAMA_SERVER, then the build in the cache)
    #[arg(long, value_name = "PATH")]
    llama_server: Option<PathBuf>,
}

/// `spark bench …`: measurements that report numbers (not tests).
#[derive(Debug, Subcommand)]
enum BenchCommand {
    /// Validate `spark plan` forecasts against llama-bench on fixtures (leave-one-model-out)
    Plan(spark::bench::plan::BenchPlanArgs),
    /// Decode tok/s of llama-server with the routing tap vs without (alternating repetitions)
    Tap(spark::bench::tap::BenchTapArgs),
    /// Expert swap-in GB/s and latency against a plain pinned copy (GPU with --features cuda; --cpu: host memory)
    Swap(spark::bench::swap::BenchSwapArgs),
    /// Decode tok/s with experts in VRAM, in host memory (stock), stock with per-step expert copies, and spark residency (hooked build + tap provider)
    Residency(spark::bench::residency::BenchResidencyArgs),
}

fn main() -> ExitCode {
    exit_quietly_on_closed_stdout();
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::from(exit::OK as u8),
        Err(err) => {
            eprintln!("spark: failed to {}", one_line(&err));
            ExitCode::from(exit_code(&err) as u8)
        }
    }
}

/// `print!` panics when stdout's reader has gone (EPIPE: SIGPIPE is ignored, as Rust sets it,
/// because spark also writes to sockets and to pipes of its children). Every command prints
/// through `print!`, so this one hook turns that panic, from any thread, into a quiet exit with
/// [`exit::BROKEN_PIPE`]; any other panic goes to the default hook.
fn exit_quietly_on_closed_stdout() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let msg = info
            .payload()
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| info.payload().downcast_ref::<&str>().copied())
            .unwrap_or("");
        // std's message: "failed printing to stdout: Broken pipe (os error 32)".
        if msg.starts_with("failed printing to stdout")
            && msg.ends_with(&format!("(os error {})", nix::libc::EPIPE))
        {
            std::process::exit(exit::BROKEN_PIPE);
        }
        default(info);
    }));
}

/// The error and its causes on one line. Library errors often quote their source in their own
/// message already; a cause whose text the line already ends with is not repeated.
fn one_line(err: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in err.chain() {
        let text = cause.to_string();
        if line.is_empty() {
            line = text;
        } else if !line.ends_with(&text) {
            line.push_str(": ");
            line.push_str(&text);
        }
    }
    line
}

/// Maps an error to a documented exit code by what caused it.
fn exit_code(err: &anyhow::Error) -> i32 {
    for cause in err.chain() {
        if let Some(e) = cause.downcast_ref::<spark::validate::ValidateError>() {
            return e.exit_code();
        }
        if let Some(e) = cause.downcast_ref::<spark::trace::record::RecordError>() {
            return if e.is_usage() {
                exit::USAGE
            } else if e.is_timeout() {
                exit::TIMEOUT
            } else {
                exit::CHECK_FAILED
            };
        }
        if let Some(e) = cause.downcast_ref::<spark::bench::tap::BenchTapError>() {
            return if e.is_usage() {
                exit::USAGE
            } else {
                exit::CHECK_FAILED
            };
        }
        if let Some(e) = cause.downcast_ref::<spark::bench::residency::BenchResidencyError>() {
            return e.exit_code();
        }
        if let Some(e) = cause.downcast_ref::<spark::cuda::CudaError>() {
            return e.exit_code();
        }
        if let Some(e) = cause.downcast_ref::<spark::simulate::SimulateError>() {
            return e.exit_code();
        }
        if cause.is::<spark::trace::TraceError>() || cause.is::<spark::profile::ProfileError>() {
            return exit::USAGE;
        }
        if let Some(e) = cause.downcast_ref::<spark::sessions::SessionsError>() {
            return if e.is_usage() {
                exit::USAGE
            } else {
                exit::CHECK_FAILED
            };
        }
        if let Some(e) = cause.downcast_ref::<spark::plan::PlanError>() {
            return e.exit_code();
        }
        if cause.is::<GgufError>()
            || cause.is::<EngineError>()
            || cause.is::<FixtureError>()
            || cause.is::<UsageError>()
        {
            return exit::USAGE;
        }
        if matches!(
            cause.downcast_ref::<spark::serve::ServeError>(),
            Some(spark::serve::ServeError::Usage(_))
        ) {
            return exit::USAGE;
        }
        if cause.is::<spark::serve::placement::Refused>() {
            return exit::REFUSED;
        }
        if let Some(e) = cause.downcast_ref::<spark::telemetry::TelemetryError>() {
            if e.is_usage() {
                return exit::USAGE;
            }
            if e.is_timeout() {
                return exit::TIMEOUT;
            }
        }
        if let Some(e) = cause.downcast_ref::<ServerError>() {
            return if e.is_timeout() {
                exit::TIMEOUT
            } else {
                exit::CHECK_FAILED
            };
        }
    }
    exit::CHECK_FAILED
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct UsageError(String);

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Trace(spark::trace::record::TraceCli::Record(a)) => spark::trace::record::run(&a)?,
        Command::Trace(spark::trace::record::TraceCli::Files(c)) => spark::trace::cli::run(c)?,
        Command::Simulate(a) => spark::simulate::run(&a)?,
        Command::Calibrate(a) => spark::validate::calibrate::run(&a)?,
        Command::Validate(a) => spark::validate::check::run(&a)?,
        Command::Profile(c) => spark::profile::run(c)?,
        Command::Inspect(a) => {
            let file = GgufFile::open(&a.model)?;
            let geometry = MoeGeometry::of(&file)?;
            let report = InspectReport::new(&file, geometry, a.ctx);
            if a.json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", report.render());
            }
        }
        Command::Fixture(a) => {
            let mut spec = FixtureSpec::preset(a.size);
            if let Some(v) = a.layers {
                spec.layers = v;
            }
            if let Some(v) = a.experts {
                spec.experts = v;
            }
            if let Some(v) = a.top_k {
                spec.top_k = v;
            }
            if let Some(v) = a.embd {
                spec.embd = v;
            }
            if let Some(v) = a.expert_ff {
                spec.expert_ff = v;
            }
            if let Some(v) = a.seed {
                spec.seed = v;
            }
            if let Some(v) = a.router {
                spec.router = v;
            }
            if spec.hot_experts >= spec.experts {
                spec.hot_experts = (spec.experts / 4).max(1);
            }
            if let Some(t) = &a.weight_type {
                spec.weight_type = GgmlType::from_name(t).ok_or_else(|| {
                    UsageError(format!(
                        "parse --type {t}: unknown ggml type (f32, f16, q8_0)"
                    ))
                })?;
            }
            let vocab = match a.vocab {
                Some(v) => v,
                None => engine::vocab_path(engine::DEFAULT_VOCAB)?,
            };
            let report = fixture::write_fixture(&spec, &vocab, &a.out)?;
            if a.json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                println!(
                    "wrote {} ({} bytes): {} layers, {} experts, top-{}, embd {}, router {}, {}",
                    report.path.display(),
                    report.bytes,
                    spec.layers,
                    spec.experts,
                    spec.top_k,
                    spec.embd,
                    spec.router.name(),
                    spec.weight_type.name
                );
            }
        }
        Command::Demo(a) => {
            let dir = a.dir.unwrap_or_else(|| engine::cache_dir().join("demo"));
            spark::demo::run(&spark::demo::DemoConfig {
                dir,
                llama_server: a.engine.llama_server,
                prompt: "The experts that a mixture-of-experts model routes to".into(),
                n_predict: a.n_predict,
                ready_timeout: Duration::from_secs(a.ready_timeout),
            })?;
        }
        Command::Serve(a) => {
            let model = a.model.clone();
            GgufFile::open(&model)?;
            let work = spark::atomic_file::private_tempdir("spark-serve-")
                .context("create a work directory")?;
            let cfg = a.resolve(work.path().to_path_buf())?;
            spark::serve::run_until_signal(cfg)?;
        }
        Command::Plan(a) => spark::plan::run(a)?,
        Command::Bench(BenchCommand::Plan(a)) => spark::bench::plan::run(a)?,
        Command::Bench(BenchCommand::Tap(a)) => spark::bench::tap::run_and_print(&a)?,
        Command::Bench(BenchCommand::Swap(a)) => spark::bench::swap::run_and_print(&a)?,
        Command::Bench(BenchCommand::Residency(a)) => spark::bench::residency::run_and_print(&a)?,
        Command::Sessions(a) => spark::sessions::cli::run(a)?,
        Command::Engine(a) => {
            let e = Engine::locate(a.llama_server.as_deref()).context("locate the engine")?;
            println!("llama-server {}", e.llama_server.display());
            if let Some(b) = &e.llama_bench {
                println!("llama-bench  {}", b.display());
            }
            if let Some(p) = &e.prefix {
                println!("prefix       {}", p.display());
            }
            println!(
                "version      {} ({}{})",
                engine::ENGINE_VERSION,
                e.variant(),
                if e.is_hooked() {
                    ", MoE residency hook patched in"
                } else {
                    ", stock"
                }
            );
        }
    }
    Ok(())
}
