//! The `spark sessions` command line: raw flags, their resolution into configs, and the output.

use std::path::PathBuf;

use clap::{Args, Subcommand};

use super::extract::{ExtractConfig, SourceRoot};
use super::synth::SynthConfig;
use super::{Manifest, SessionsError, Source};

#[derive(Args, Debug)]
pub struct SessionsArgs {
    #[command(subcommand)]
    pub command: SessionsCommand,
}

#[derive(Subcommand, Debug)]
pub enum SessionsCommand {
    /// Turn Claude Code and Codex session logs into a train/test prompt corpus
    Extract(ExtractArgs),
    /// Write a synthetic Claude Code + Codex session tree (for the demo and tests)
    Synth(SynthArgs),
}

#[derive(Args, Debug)]
pub struct ExtractArgs {
    /// Claude Code projects directory [default: ~/.claude/projects]
    #[arg(long, value_name = "DIR")]
    pub claude: Option<PathBuf>,
    /// Codex sessions directory [default: ~/.codex/sessions]
    #[arg(long, value_name = "DIR")]
    pub codex: Option<PathBuf>,
    /// Corpus directory to write
    #[arg(long, value_name = "CORPUS")]
    pub out: PathBuf,
    /// Share of sessions held out for validation, strictly between 0 and 1
    #[arg(long, value_name = "F", default_value_t = super::DEFAULT_TEST_FRAC, allow_negative_numbers = true)]
    pub test_frac: f64,
    /// Approximate chunk size in characters (chunks are cut at message boundaries)
    #[arg(long, value_name = "N", default_value_t = super::DEFAULT_CHUNK_CHARS)]
    pub chunk_chars: usize,
    /// Lines longer than this many bytes are skipped and counted
    #[arg(long, value_name = "BYTES", default_value_t = super::DEFAULT_MAX_LINE_BYTES)]
    pub max_line_bytes: usize,
    /// Replace an existing corpus at --out
    #[arg(long)]
    pub force: bool,
    /// Print the manifest as JSON instead of a summary
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct SynthArgs {
    /// Directory to create (gets claude/ and codex/ subdirectories)
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// Number of sessions (half Claude Code, half Codex)
    #[arg(long, value_name = "N", default_value_t = 24)]
    pub sessions: u32,
    #[arg(long, value_name = "S", default_value_t = 1)]
    pub seed: u64,
    /// Print what was written as JSON
    #[arg(long)]
    pub json: bool,
}

fn home() -> PathBuf {
    std::env::var_os("HOME").map_or_else(|| PathBuf::from("."), PathBuf::from)
}

impl ExtractArgs {
    /// The resolved configuration (default roots under `$HOME`).
    pub fn config(&self) -> ExtractConfig {
        let root = |given: &Option<PathBuf>, source, default: &[&str]| match given {
            Some(p) => SourceRoot {
                source,
                root: p.clone(),
                explicit: true,
            },
            None => SourceRoot {
                source,
                root: default.iter().fold(home(), |p, s| p.join(s)),
                explicit: false,
            },
        };
        ExtractConfig {
            roots: vec![
                root(&self.claude, Source::Claude, &[".claude", "projects"]),
                root(&self.codex, Source::Codex, &[".codex", "sessions"]),
            ],
            out: self.out.clone(),
            test_frac: self.test_frac,
            chunk_chars: self.chunk_chars,
            max_line_bytes: self.max_line_bytes,
            force: self.force,
            progress: !self.json,
        }
    }
}

/// Runs `spark sessions …`.
pub fn run(args: SessionsArgs) -> Result<(), SessionsError> {
    match args.command {
        SessionsCommand::Extract(a) => {
            let m = super::extract(&a.config())?;
            if a.json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&m).expect("a manifest always serializes")
                );
            } else {
                print!("{}", render(&m, &a.out));
            }
        }
        SessionsCommand::Synth(a) => {
            let report = super::synth::write_tree(&SynthConfig {
                out: a.out.clone(),
                sessions: a.sessions,
                seed: a.seed,
            })?;
            if a.json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&report).expect("a report always serializes")
                );
            } else {
                println!(
                    "wrote {}: {} Claude Code sessions (+{} subagent files) in {}, {} Codex sessions in {}",
                    a.out.display(),
                    report.claude_sessions,
                    report.claude_subagents,
                    report.claude_root.display(),
                    report.codex_sessions,
                    report.codex_root.display()
                );
            }
        }
    }
    Ok(())
}

/// The human summary of an extraction.
pub fn render(m: &Manifest, out: &std::path::Path) -> String {
    let mut s = String::new();
    for src in &m.sources {
        if !src.found {
            s.push_str(&format!(
                "{:<6} {}: not found, 0 sessions\n",
                src.source, src.root
            ));
            continue;
        }
        let k = &src.skipped;
        s.push_str(&format!(
            "{:<6} {}: {} sessions ({} empty, {} unreadable), {} lines, {} messages kept\n",
            src.source,
            src.root,
            src.sessions,
            src.empty_sessions,
            src.unreadable_sessions,
            src.lines,
            src.messages
        ));
        s.push_str(&format!(
            "       skipped {}: {} by type, {} instructions, {} no text, {} blank, {} malformed, {} non-utf8, {} too long\n",
            k.total(),
            k.by_type,
            k.instructions,
            k.no_text,
            k.blank,
            k.malformed,
            k.non_utf8,
            k.too_long
        ));
        if src.unreadable_dirs > 0 {
            s.push_str(&format!(
                "       {} unreadable {} skipped (see the warnings above)\n",
                src.unreadable_dirs,
                if src.unreadable_dirs == 1 {
                    "directory"
                } else {
                    "directories"
                }
            ));
        }
    }
    for (name, c) in [("train", &m.train), ("test", &m.test)] {
        s.push_str(&format!(
            "{name:<6} {} sessions, {} chunks, {} chars\n",
            c.sessions, c.chunks, c.chars
        ));
    }
    s.push_str(&format!(
        "wrote {} (test fraction {}, chunks of about {} chars)\n",
        out.display(),
        m.test_frac,
        m.chunk_chars
    ));
    s
}
