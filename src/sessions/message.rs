//! What a session line becomes, shared by the Claude Code and Codex readers, extraction and the
//! corpus manifest: the parsed message or the reason it was skipped, the per-source counts, and
//! the two text helpers both readers use. A leaf of `sessions`: it imports none of its siblings.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::Source;

/// What one line contributes.
#[derive(Debug, PartialEq, Eq)]
pub enum Parsed {
    /// One message's text with role markers, ending in `\n`.
    Message(String),
    Skip(Reason),
}

/// Why a line was skipped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    /// Not JSON, or JSON without the fields its type needs.
    Malformed,
    /// A line type that carries no conversation (summaries, snapshots, metadata, reasoning).
    ByType,
    /// Developer or system instructions (Codex).
    Instructions,
    /// A user or assistant line with no text (only images, empty content).
    NoText,
}

/// Lines skipped, by reason.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Skipped {
    pub blank: u64,
    pub malformed: u64,
    pub non_utf8: u64,
    pub too_long: u64,
    pub by_type: u64,
    pub instructions: u64,
    pub no_text: u64,
}

impl Skipped {
    pub fn total(&self) -> u64 {
        self.blank
            + self.malformed
            + self.non_utf8
            + self.too_long
            + self.by_type
            + self.instructions
            + self.no_text
    }

    pub(super) fn count(&mut self, r: Reason) {
        match r {
            Reason::Malformed => self.malformed += 1,
            Reason::ByType => self.by_type += 1,
            Reason::Instructions => self.instructions += 1,
            Reason::NoText => self.no_text += 1,
        }
    }
}

/// What was read from one source root. `lines == messages + skipped.total()`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceStats {
    pub source: Source,
    pub root: String,
    /// False when the (default) root does not exist.
    pub found: bool,
    /// Session files found.
    pub sessions: u64,
    /// Sessions that gave no text at all.
    pub empty_sessions: u64,
    /// Sessions that could not be opened or failed mid-read (what was read before is kept).
    pub unreadable_sessions: u64,
    /// Subdirectories that could not be listed (skipped, with a warning each); their sessions
    /// are not counted anywhere else.
    #[serde(default)]
    pub unreadable_dirs: u64,
    pub bytes: u64,
    pub lines: u64,
    /// Lines kept as conversation.
    pub messages: u64,
    pub skipped: Skipped,
}

/// Appends `[marker]\n text \n` to `out` unless `text` is blank.
pub fn push_block(out: &mut String, marker: &str, text: &str) {
    if text.trim().is_empty() {
        return;
    }
    out.push('[');
    out.push_str(marker);
    out.push_str("]\n");
    out.push_str(text);
    if !text.ends_with('\n') {
        out.push('\n');
    }
}

/// The text of a tool result: a string, text blocks, an object's `content`/`output`/`text`
/// string, or the JSON itself.
pub fn tool_output_text(v: &Value) -> String {
    match v {
        Value::Null => String::new(),
        Value::String(s) => s.clone(),
        Value::Array(items) => items
            .iter()
            .filter_map(|b| match b {
                Value::String(s) => Some(s.as_str()),
                _ => b.get("text").and_then(Value::as_str),
            })
            .collect::<Vec<_>>()
            .join("\n"),
        Value::Object(m) => ["content", "output", "text"]
            .iter()
            .find_map(|k| m.get(*k).filter(|c| !c.is_null()))
            .map_or_else(|| v.to_string(), tool_output_text),
        _ => v.to_string(),
    }
}
