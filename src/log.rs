//! spark's log: every message spark prints about itself goes through `tracing` events, with a
//! level and a target (the module), filtered by `--log-level` / `SPARK_LOG` (the `EnvFilter`
//! syntax: `info`, `warn,spark::serve=debug`, `llama_server=off`) and written to stderr as text
//! or as JSON lines (`--log-format json`), one line per event.
//!
//! The text form is the lines spark always printed: `spark: <message>`, `spark: warning:
//! <message>` for warnings, `[llama-server] <line>` for llama-server's own log lines (events
//! of target [`LLAMA_SERVER`]), and progress lines as they are (target
//! [`crate::progress::TARGET`]). The JSON form carries the timestamp, level, target and fields.
//!
//! Owns the one invariant that logging never takes the process down: stderr is written with
//! `write_all` whose errors are swallowed (a closed pipe, a full disk), counted in [`dropped`],
//! and never retried; nothing here panics or blocks on a failed write. Must never be written
//! around with `eprintln!` (which panics when stderr fails): clippy's `disallowed-macros`
//! refuses it in the workspace.

use std::fmt;
use std::io::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};

use tracing::{Event, Level, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields, MakeWriter};
use tracing_subscriber::registry::LookupSpan;

/// Target of llama-server's own log lines, forwarded by the keeper.
pub const LLAMA_SERVER: &str = "llama_server";

/// Log lines dropped because stderr could not take them.
static DROPPED: AtomicU64 = AtomicU64::new(0);

/// Log lines (and other stderr writes through [`write_stderr`]) dropped because stderr failed
/// (closed pipe, full disk) since the process started.
pub fn dropped() -> u64 {
    DROPPED.load(Ordering::Relaxed)
}

/// Set by [`init`] when the log is JSON.
static JSON: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Whether log lines are text (the default), not JSON.
pub fn is_text() -> bool {
    !JSON.load(Ordering::Relaxed)
}

/// Writes `bytes` to stderr whole (above a progress bar on screen), or drops them and counts
/// the drop. Never panics.
pub fn write_stderr(bytes: &[u8]) {
    crate::progress::while_hidden(|| {
        let mut err = std::io::stderr().lock();
        if err.write_all(bytes).and_then(|()| err.flush()).is_err() {
            DROPPED.fetch_add(1, Ordering::Relaxed);
        }
    })
}

/// The level llama-server gives one of its log lines: llama.cpp's `<time> I|W|E|D <text>`
/// lines by their letter, `warning: …` and `error: …` lines by their word, anything else info.
pub fn llama_level(line: &str) -> Level {
    let letter = line
        .split_once(' ')
        .filter(|(t, _)| !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit() || b == b'.'))
        .and_then(|(_, rest)| rest.split_once(' '))
        .map(|(l, _)| l);
    match letter {
        Some("E") => Level::ERROR,
        Some("W") => Level::WARN,
        Some("D") => Level::DEBUG,
        _ if line.starts_with("error:") => Level::ERROR,
        _ if line.starts_with("warning:") => Level::WARN,
        _ => Level::INFO,
    }
}

/// Logs one line of llama-server's own log (target [`LLAMA_SERVER`]) at its [`llama_level`].
pub fn llama_server_line(line: &str) {
    match llama_level(line) {
        Level::ERROR => tracing::error!(target: LLAMA_SERVER, "{line}"),
        Level::WARN => tracing::warn!(target: LLAMA_SERVER, "{line}"),
        Level::DEBUG => tracing::debug!(target: LLAMA_SERVER, "{line}"),
        _ => tracing::info!(target: LLAMA_SERVER, "{line}"),
    }
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// `spark: message` lines, as spark always printed
    Text,
    /// One JSON object per line: timestamp, level, target, message and fields
    Json,
}

/// The log flags every subcommand takes.
#[derive(Debug, Clone, clap::Args)]
pub struct LogArgs {
    /// What to log: a level (error, warn, info, debug, trace) or per-target directives
    /// (`warn,spark::serve=debug`, `llama_server=off`) [default: info]
    #[arg(long, global = true, env = "SPARK_LOG", value_name = "FILTER")]
    pub log_level: Option<String>,
    /// Log line format on stderr
    #[arg(
        long,
        global = true,
        env = "SPARK_LOG_FORMAT",
        value_enum,
        default_value = "text"
    )]
    pub log_format: LogFormat,
}

/// Why the log could not be set up.
#[derive(Debug, thiserror::Error)]
#[error("parse --log-level / SPARK_LOG {spec:?}: {msg}")]
pub struct LogError {
    spec: String,
    msg: String,
}

/// The stderr writer of the subscriber: swallows and counts failed writes.
struct Stderr;

impl std::io::Write for Stderr {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        write_stderr(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for Stderr {
    type Writer = Stderr;
    fn make_writer(&'a self) -> Stderr {
        Stderr
    }
}

/// The text form: `spark: [warning: ]message[ key=value…]`, or `[llama-server] line`.
struct Text;

impl<S, N> FormatEvent<S, N> for Text
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut w: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let meta = event.metadata();
        if meta.target() == LLAMA_SERVER {
            w.write_str("[llama-server] ")?;
        } else if meta.target() == crate::progress::TARGET {
            // Progress lines carry their own wording (`spark calibrate: 3/10 chunks …`).
        } else {
            w.write_str("spark: ")?;
            match *meta.level() {
                Level::WARN => w.write_str("warning: ")?,
                Level::DEBUG => w.write_str("debug: ")?,
                Level::TRACE => w.write_str("trace: ")?,
                Level::ERROR | Level::INFO => {}
            }
        }
        ctx.field_format().format_fields(w.by_ref(), event)?;
        writeln!(w)
    }
}

/// Installs the global subscriber for `args`. Call once, first thing after parsing the flags.
pub fn init(args: &LogArgs) -> Result<(), LogError> {
    let spec = args.log_level.as_deref().unwrap_or("info");
    let filter = tracing_subscriber::EnvFilter::builder()
        .parse(spec)
        .map_err(|e| LogError {
            spec: spec.to_string(),
            msg: e.to_string(),
        })?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(Stderr)
        .with_ansi(false)
        .log_internal_errors(false);
    JSON.store(args.log_format == LogFormat::Json, Ordering::Relaxed);
    crate::progress::set_text_log(args.log_format != LogFormat::Json);
    let installed = match args.log_format {
        LogFormat::Text => builder.event_format(Text).try_init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(false)
            .try_init(),
    };
    // Already installed (a second call in one process): the first one stays.
    drop(installed);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn llama_server_lines_keep_their_own_level() {
        for (line, level) in [
            (
                "0.00.021.188 W srv  llama_server: security: no API key",
                Level::WARN,
            ),
            (
                "0.00.020.918 I srv  llama_server: initializing ...",
                Level::INFO,
            ),
            ("1.02.000.001 E srv  load_model: failed", Level::ERROR),
            ("0.00.000.100 D cmn  detail", Level::DEBUG),
            ("warning: no usable GPU found", Level::WARN),
            ("error: bad argument", Level::ERROR),
            (
                "fake-llama: \"POST /completion HTTP/1.1\" 200 -",
                Level::INFO,
            ),
            ("W without a time", Level::INFO),
        ] {
            assert_eq!(llama_level(line), level, "{line}");
        }
    }

    #[test]
    fn a_bad_filter_is_a_usage_error_naming_it() {
        let e = init(&LogArgs {
            log_level: Some("spark=loud".into()),
            log_format: LogFormat::Text,
        })
        .unwrap_err()
        .to_string();
        assert!(e.contains("spark=loud"), "{e}");
    }
}
