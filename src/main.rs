//! The `spark` binary: parses the command line, calls the library, maps errors to exit codes.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, CommandFactory, FromArgMatches, Parser, Subcommand};

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
    #[command(flatten)]
    log: spark::log::LogArgs,
}

/// The CLI definition: the derived one, with every `spark serve` flag also read from its
/// `SPARK_*` variable. Completions and the man page are generated from this too.
fn cli_command() -> clap::Command {
    Cli::command().mut_subcommand("serve", spark::env_flags::with_env)
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
    /// Check a profile on the held-out chunks: cold-hit rates per resident set, report, exit code
    Validate(spark::validate::ValidateArgs),
    /// Routing profiles (`<model>.gguf.spark.csv`): show, heatmap, merge, diff
    #[command(subcommand)]
    Profile(spark::fleet::ProfileCommand),
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell)
    Completions(spark::manual::CompletionsArgs),
    /// Print the man page (or write one page per subcommand with --out-dir)
    Man(spark::manual::ManArgs),
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
    out: Option<PathBuf>,
    /// Preset the other flags start from
    #[arg(long, value_enum, default_value = "tiny")]
    size: Size,
    /// Architecture, with its own tensor set and quirks
    #[arg(long, value_enum, default_value = "qwen3moe")]
    arch: fixture::Arch,
    /// A real model's layout (layers, experts, top-k, shared/dense layers; implies its --arch),
    /// at the --size widths; `--shape list` prints them
    #[arg(long)]
    shape: Option<String>,
    /// With --shape: the model's real widths, written header-only (the data section is a hole
    /// of the real size) for inspect and plan
    #[arg(long, requires = "shape")]
    full_width: bool,
    /// Quantise with the engine's own llama-quantize to this type (Q4_K_M, IQ4_XS, Q6_K, Q8_0,
    /// MXFP4_MOE, …); the fixture is written in --type first
    #[arg(long, value_name = "TYPE", conflicts_with = "full_width")]
    quantize: Option<String>,
    /// llama-quantize binary (default: next to the located llama-server)
    #[arg(long, value_name = "PATH")]
    llama_quantize: Option<PathBuf>,
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
    spark::supervisor::ignore_file_size_signal();
    spark::env_flags::apply_llama_fallbacks();
    let cli = match Cli::from_arg_matches(&cli_command().get_matches()) {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    if let Err(e) = spark::log::init(&cli.log) {
        spark::log::write_stderr(format!("spark: failed to {e}\n").as_bytes());
        return ExitCode::from(exit::USAGE as u8);
    }
    match run(cli).and_then(|()| flush_stdout()) {
        Ok(()) => ExitCode::from(exit::OK as u8),
        Err(err) => {
            tracing::error!("failed to {}", one_line(&err));
            ExitCode::from(exit_code(&err) as u8)
        }
    }
}

/// Flushes what `print!` left in stdout's buffer, so a failed last write is an error (exit 1,
/// or [`exit::BROKEN_PIPE`] for a closed pipe) and not a silent loss at exit.
fn flush_stdout() -> anyhow::Result<()> {
    use std::io::Write as _;
    match std::io::stdout().flush() {
        Ok(()) => Ok(()),
        Err(e) if e.raw_os_error() == Some(nix::libc::EPIPE) => {
            std::process::exit(exit::BROKEN_PIPE)
        }
        Err(e) => Err(anyhow::Error::new(e).context("write to stdout")),
    }
}

/// `print!` panics when stdout's reader has gone (EPIPE: SIGPIPE is ignored, as Rust sets it,
/// because spark also writes to sockets and to pipes of its children). Every command prints
/// through `print!`, so this one hook turns that panic, from any thread, into a quiet exit with
/// [`exit::BROKEN_PIPE`]. Any other failed write to stdout (a full disk, as with
/// `spark inspect m.gguf` redirected to `/dev/full`) ends the run with one log line and
/// [`exit::CHECK_FAILED`], no backtrace; any other panic goes to the default hook.
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
        if let Some(why) = msg.strip_prefix("failed printing to stdout: ") {
            tracing::error!("failed to write to stdout: {why}");
            std::process::exit(exit::CHECK_FAILED);
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
            || cause.is::<spark::log::LogError>()
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
    // serve shuts down on its own runtime; calibrate and validate finish with a partial report.
    if !matches!(
        cli.command,
        Command::Serve(_) | Command::Calibrate(_) | Command::Validate(_)
    ) {
        spark::signals::exit_on_interrupt().context("install the signal handlers")?;
    }
    match cli.command {
        Command::Trace(spark::trace::record::TraceCli::Record(a)) => spark::trace::record::run(&a)?,
        Command::Trace(spark::trace::record::TraceCli::Files(c)) => spark::trace::cli::run(c)?,
        Command::Simulate(a) => spark::simulate::run(&a)?,
        Command::Calibrate(a) => spark::validate::calibrate::run(&a)?,
        Command::Validate(a) => spark::validate::check::run(&a)?,
        Command::Profile(c) => spark::fleet::run(c)?,
        Command::Completions(a) => spark::manual::completions(&a, cli_command()),
        Command::Man(a) => spark::manual::man(&a, cli_command())?,
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
            let mut spec = match a.shape.as_deref() {
                Some("list") => {
                    for s in fixture::SHAPES {
                        println!(
                            "{:<26} {:<10} {:>3} layers {:>4} experts top-{} shared {} dense {}",
                            s.name,
                            s.arch.gguf_name(),
                            s.layers,
                            s.experts,
                            s.top_k,
                            s.shared_experts,
                            s.dense_layers()
                        );
                    }
                    return Ok(());
                }
                Some(name) => {
                    let shape = fixture::shapes::shape_named(name).ok_or_else(|| {
                        UsageError(format!(
                            "parse --shape {name}: unknown shape (spark fixture --shape list)"
                        ))
                    })?;
                    FixtureSpec::from_shape(shape, a.size, a.full_width)
                }
                None => FixtureSpec::preset(a.size),
            };
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
            if a.shape.is_none() {
                // The arch's quirks sized from the flags above (shared and dense FFN lengths
                // follow --expert-ff, expert groups follow --experts).
                a.arch.apply_defaults(&mut spec);
            }
            if let Some(t) = &a.weight_type {
                spec.weight_type = GgmlType::from_name(t).ok_or_else(|| {
                    UsageError(format!(
                        "parse --type {t}: unknown ggml type (f32, f16, q8_0; any with --full-width)"
                    ))
                })?;
            }
            let Some(out) = a.out.as_deref() else {
                return Err(UsageError("spark fixture needs --out PATH".into()).into());
            };
            let vocab = match a.vocab {
                Some(v) => v,
                None => engine::vocab_path(engine::DEFAULT_VOCAB)?,
            };
            let report = match &a.quantize {
                Some(qtype) => {
                    let tool = match a.llama_quantize.clone() {
                        Some(p) => p,
                        None => fixture::quantize::quantize_next_to(
                            &engine::Engine::locate(None)?.llama_server,
                        ),
                    };
                    fixture::quantize::write_quantized(&spec, &vocab, &tool, qtype, out)?
                }
                None => fixture::write_fixture(&spec, &vocab, out)?,
            };
            if a.json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                println!(
                    "wrote {} ({} bytes{}): {} {} layers, {} experts, top-{}, embd {}, router {}, {}",
                    report.path.display(),
                    report.bytes,
                    if spec.header_only { ", header only" } else { "" },
                    spec.arch.gguf_name(),
                    spec.layers,
                    spec.experts,
                    spec.top_k,
                    spec.embd,
                    spec.router.name(),
                    report.quantized.as_deref().unwrap_or(spec.weight_type.name)
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
