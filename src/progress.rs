//! Progress of long steps (calibrate and validate chunks, bench measurements, writing a large
//! fixture): on a terminal, one `indicatif` bar with its position, rate and ETA on stderr; when
//! stderr is not a terminal (a pipe, a file, a service's journal), the plain progress lines
//! spark always printed, unchanged, as log events of target [`TARGET`] (written without the
//! `spark: ` prefix in the text format).
//!
//! Owns the choice between the two and the one bar on screen: log lines written while it is
//! shown go above it ([`while_hidden`]), never through it. Never draws on a pipe, and never
//! when the log is JSON (a log shipper reads that stream).

use std::io::IsTerminal as _;
use std::sync::Mutex;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// Target of the plain progress lines.
pub const TARGET: &str = "spark::progress";

/// The bar on screen, if any: log writes suspend it.
static SHOWN: Mutex<Option<ProgressBar>> = Mutex::new(None);

/// Whether the log is text (the default); the log's setup says so when it is JSON, which has
/// no room for a bar (this leaf never asks the log, which writes through [`while_hidden`]).
static TEXT_LOG: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(true);

/// Told by the log's setup whether its lines are text.
pub fn set_text_log(text: bool) {
    TEXT_LOG.store(text, std::sync::atomic::Ordering::Relaxed);
}

/// Whether progress is drawn as bars: stderr is a terminal and the log is text.
pub fn bars() -> bool {
    std::io::stderr().is_terminal() && TEXT_LOG.load(std::sync::atomic::Ordering::Relaxed)
}

/// Runs `write` with the bar on screen (if any) hidden, so a log line lands above it.
pub fn while_hidden<R>(write: impl FnOnce() -> R) -> R {
    let bar = SHOWN.lock().ok().and_then(|g| g.clone());
    match bar {
        Some(b) if !b.is_finished() => b.suspend(write),
        _ => write(),
    }
}

/// One long job of `total` steps.
pub struct Steps {
    bar: Option<ProgressBar>,
}

impl Steps {
    /// A job named `what` (`calibrate`, `writing fixture`…) of `total` steps of `unit`; a bar
    /// only when [`bars`] and `!quiet`.
    pub fn new(what: &str, total: u64, unit: &str, quiet: bool) -> Steps {
        if quiet || !bars() {
            return Steps { bar: None };
        }
        let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
        let style = ProgressStyle::with_template(&format!(
            "{{prefix}} [{{bar:30.cyan/blue}}] {{pos}}/{{len}} {unit} {{msg}}  {{elapsed}} elapsed, ETA {{eta}}"
        ))
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ");
        bar.set_style(style);
        bar.set_prefix(format!("spark {what}"));
        bar.enable_steady_tick(Duration::from_millis(500));
        if let Ok(mut g) = SHOWN.lock() {
            *g = Some(bar.clone());
        }
        Steps { bar: Some(bar) }
    }

    /// Whether a bar is drawn (else the caller's plain lines are).
    pub fn is_bar(&self) -> bool {
        self.bar.is_some()
    }

    /// The job reached `pos` steps; `msg` goes beside the bar. Without a bar, `plain()` is the
    /// progress line printed instead (as before).
    pub fn at(&self, pos: u64, msg: impl FnOnce() -> String, plain: impl FnOnce() -> String) {
        match &self.bar {
            Some(b) => {
                b.set_position(pos);
                b.set_message(msg());
            }
            None => tracing::info!(target: TARGET, "{}", plain()),
        }
    }

    /// The job reached `pos` steps, for the bar only: a job that printed no plain lines stays
    /// silent off a terminal.
    pub fn bar_at(&self, pos: u64, msg: impl FnOnce() -> String) {
        if let Some(b) = &self.bar {
            b.set_position(pos);
            b.set_message(msg());
        }
    }

    /// Rates and the ETA count from now (the work has really begun).
    pub fn reset_clock(&self) {
        if let Some(b) = &self.bar {
            b.reset_elapsed();
            b.reset_eta();
        }
    }

    /// The job ended: the bar stays on screen with its last numbers.
    pub fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish();
        }
    }
}

impl Drop for Steps {
    fn drop(&mut self) {
        if let Some(b) = &self.bar {
            if !b.is_finished() {
                b.abandon();
            }
            if let Ok(mut g) = SHOWN.lock() {
                *g = None;
            }
        }
    }
}

/// A plain progress line (no bar): a log event of [`TARGET`], printed as it is.
pub fn line(msg: &str) {
    tracing::info!(target: TARGET, "{msg}");
}
