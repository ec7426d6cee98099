//! `spark trace …`: the subcommands that show and convert routing traces.
//!
//! Owns the argument types and what each subcommand prints. New subcommands (for example
//! `record`, which captures a trace from a live server) are added as variants of
//! [`TraceCommand`] and arms of [`run`]. It never parses a file format itself: the parent module
//! does.

use std::fmt::Write as _;
use std::path::PathBuf;

use super::{Format, Trace, TraceError};

/// The `spark trace` subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum TraceCommand {
    /// Show a trace's geometry, step counts and per-layer expert spread
    Show(ShowArgs),
    /// Convert a trace between the binary, JSONL and CSV formats
    Convert(ConvertArgs),
}

#[derive(Debug, clap::Args)]
pub struct ShowArgs {
    /// The trace file (.trace, .jsonl or .csv)
    pub file: PathBuf,
    /// Format of the file (default: from its extension)
    #[arg(long, value_enum)]
    pub from: Option<Format>,
}

#[derive(Debug, clap::Args)]
pub struct ConvertArgs {
    /// Input trace
    pub input: PathBuf,
    /// Output trace (written atomically)
    pub output: PathBuf,
    /// Input format (default: from the extension)
    #[arg(long, value_enum)]
    pub from: Option<Format>,
    /// Output format (default: from the extension)
    #[arg(long, value_enum)]
    pub to: Option<Format>,
}

/// Runs one `spark trace` subcommand, printing to stdout.
pub fn run(cmd: TraceCommand) -> Result<(), TraceError> {
    match cmd {
        TraceCommand::Show(a) => {
            let format = Format::resolve(a.from, &a.file)?;
            let trace = Trace::read(&a.file, Some(format))?;
            print!("{}", render(&trace, format, &a.file));
        }
        TraceCommand::Convert(a) => {
            let from = Format::resolve(a.from, &a.input)?;
            let to = Format::resolve(a.to, &a.output)?;
            let trace = Trace::read(&a.input, Some(from))?;
            trace.write(&a.output, Some(to))?;
            println!(
                "wrote {} ({}): {} decode steps, {} prompt steps, {} layers",
                a.output.display(),
                to.name(),
                trace.decode.steps(),
                if to == Format::Csv {
                    0
                } else {
                    trace.prompt.steps()
                },
                trace.n_layer
            );
            if to == Format::Csv && !trace.prompt.is_empty() {
                println!(
                    "note: csv has no phase column; {} prompt steps were not written",
                    trace.prompt.steps()
                );
            }
        }
    }
    Ok(())
}

/// The text `spark trace show` prints.
pub fn render(trace: &Trace, format: Format, path: &std::path::Path) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "trace        {} ({})", path.display(), format.name());
    let _ = writeln!(
        out,
        "geometry     {} layers, {} experts, k={}",
        trace.n_layer, trace.n_expert, trace.k
    );
    let _ = writeln!(
        out,
        "steps        {} decode, {} prompt",
        trace.decode.steps(),
        trace.prompt.steps()
    );
    let _ = writeln!(
        out,
        "lookups      {} decode, {} prompt",
        trace.decode.lookups(),
        trace.prompt.lookups()
    );
    let _ = writeln!(
        out,
        "fingerprint  {}",
        trace.fingerprint.as_deref().unwrap_or("(none)")
    );
    let _ = writeln!(
        out,
        "weights      {}; ids {}",
        if trace.has_weights {
            "recorded"
        } else {
            "not recorded"
        },
        if trace.ids_sorted {
            "sorted (rank order lost)"
        } else {
            "in router order"
        }
    );
    let r = &trace.decode;
    if r.is_empty() {
        return out;
    }
    let _ = writeln!(
        out,
        "layer  distinct  top-k share  repeat share (experts also used by the previous token)"
    );
    let e = trace.n_expert as usize;
    // One table for every layer, and only the experts a layer used are sorted: the work follows
    // the records, not the geometry the header claims.
    let mut seen = vec![0u64; e];
    let mut used: Vec<u16> = Vec::new();
    for l in 0..r.n_layer() {
        let mut repeat = 0u64;
        let mut total = 0u64;
        for s in 0..r.steps() {
            let ids = r.ids(s, l);
            for &x in ids {
                if seen[usize::from(x)] == 0 {
                    used.push(x);
                }
                seen[usize::from(x)] += 1;
                if s > 0 && r.ids(s - 1, l).contains(&x) {
                    repeat += 1;
                }
            }
            total += ids.len() as u64;
        }
        let distinct = used.len();
        let mut counts: Vec<u64> = used.iter().map(|&x| seen[usize::from(x)]).collect();
        for x in used.drain(..) {
            seen[usize::from(x)] = 0;
        }
        counts.sort_unstable_by(|a, b| b.cmp(a));
        let top: u64 = counts.iter().take(trace.k as usize).sum();
        let pct = |n: u64| 100.0 * n as f64 / total.max(1) as f64;
        let _ = writeln!(
            out,
            "{l:>5}  {distinct:>8}  {:>10.1}%  {:>11.1}%",
            pct(top),
            pct(repeat)
        );
    }
    out
}
