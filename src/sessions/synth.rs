//! A synthetic session tree: seeded, coding-agent-like conversations written by the project in
//! the on-disk formats of Claude Code and Codex, for the demo and the tests.
//!
//! ```text
//! OUT/claude/-home-dev-<repo>/<uuid>.jsonl                  Claude Code sessions
//! OUT/claude/-home-dev-<repo>/<uuid>/subagents/agent-<id>.jsonl   (some) subagent transcripts
//! OUT/codex/2026/11/<dd>/rollout-<time>-<uuid>.jsonl        Codex rollouts
//! ```
//!
//! Every conversation is one abstract script (a task, rounds of tool calls with plausible
//! results, a summary) rendered in either format, with the metadata lines real files carry
//! (summaries, snapshots, session metadata, reasoning, developer instructions) so extraction
//! skips what it must. The same seed writes the same bytes: no clock, no randomness beyond the
//! seeded generator.
//!
//! Why this file is over 800 lines: one seeded generator whose word lists, scripts and two
//! renderers draw from one random stream in a fixed order (the bytes it writes are the
//! contract); about 80 lines are tests.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;
use serde_json::{json, Value};

use super::corpus::{out_state, rfc3339, OutState, StagingDir};
use super::SessionsError;

/// What to write.
#[derive(Clone, Debug)]
pub struct SynthConfig {
    pub out: PathBuf,
    pub sessions: u32,
    pub seed: u64,
}

/// What was written.
#[derive(Clone, Debug, Serialize)]
pub struct SynthReport {
    /// Pass to `spark sessions extract --claude`.
    pub claude_root: PathBuf,
    /// Pass to `spark sessions extract --codex`.
    pub codex_root: PathBuf,
    pub claude_sessions: u32,
    pub claude_subagents: u32,
    pub codex_sessions: u32,
    pub lines: u64,
    pub bytes: u64,
}

/// Writes the tree atomically into `cfg.out`, which must be absent or an empty directory.
pub fn write_tree(cfg: &SynthConfig) -> Result<SynthReport, SessionsError> {
    match out_state(&cfg.out)? {
        Some(OutState::Absent) | Some(OutState::EmptyDir) => {}
        _ => {
            return Err(SessionsError::OutNotEmpty {
                path: cfg.out.clone(),
            })
        }
    }
    let staging = StagingDir::new(&cfg.out)?;
    let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed);
    let mut w = TreeWriter {
        root: staging.path().to_path_buf(),
        lines: 0,
        bytes: 0,
    };
    let n_claude = cfg.sessions.div_ceil(2);
    let n_codex = cfg.sessions / 2;
    let mut subagents = 0;
    // 2026-11-02T09:00:00Z
    let base: u64 = 1_793_610_000;
    for i in 0..n_claude {
        let t0 = base + u64::from(i) * 10_800;
        subagents += write_claude(&mut w, &mut rng, t0)?;
    }
    for i in 0..n_codex {
        let t0 = base + 3_600 + u64::from(i) * 10_800;
        write_codex(&mut w, &mut rng, t0)?;
    }
    staging.commit(false)?;
    Ok(SynthReport {
        claude_root: cfg.out.join("claude"),
        codex_root: cfg.out.join("codex"),
        claude_sessions: n_claude,
        claude_subagents: subagents,
        codex_sessions: n_codex,
        lines: w.lines,
        bytes: w.bytes,
    })
}

/// Sessions, seed and chunk size of the demo's built-in corpus.
pub const DEMO_SESSIONS: u32 = 16;
pub const DEMO_SEED: u64 = 2026;
pub const DEMO_CHUNK_CHARS: usize = 2000;

/// The small built-in corpus of `spark demo`: writes the synthetic tree under `dir/sessions`
/// and extracts it (test fraction 0.25, chunks of 2000 chars) into `dir/corpus`, replacing a
/// corpus left by an earlier run. The same files every time.
pub fn demo_corpus(dir: &Path) -> Result<super::Corpus, SessionsError> {
    let tree = dir.join("sessions");
    if tree.exists() {
        fs::remove_dir_all(&tree).map_err(|e| SessionsError::io("remove", &tree, e))?;
    }
    let report = write_tree(&SynthConfig {
        out: tree,
        sessions: DEMO_SESSIONS,
        seed: DEMO_SEED,
    })?;
    let out = dir.join("corpus");
    let roots = [
        (super::Source::Claude, report.claude_root),
        (super::Source::Codex, report.codex_root),
    ];
    super::extract(&super::ExtractConfig {
        roots: roots
            .into_iter()
            .map(|(source, root)| super::SourceRoot {
                source,
                root,
                explicit: true,
            })
            .collect(),
        out: out.clone(),
        test_frac: 0.25,
        chunk_chars: DEMO_CHUNK_CHARS,
        max_line_bytes: super::DEFAULT_MAX_LINE_BYTES,
        force: true,
        progress: false,
    })?;
    super::Corpus::open(&out)
}

struct TreeWriter {
    root: PathBuf,
    lines: u64,
    bytes: u64,
}

impl TreeWriter {
    fn write(&mut self, rel: &Path, lines: &[Value]) -> Result<(), SessionsError> {
        let path = self.root.join(rel);
        if let Some(dir) = path.parent() {
            fs::create_dir_all(dir).map_err(|e| SessionsError::io("create", dir, e))?;
        }
        let mut body = Vec::new();
        for l in lines {
            serde_json::to_writer(&mut body, l).expect("json values serialize");
            body.push(b'\n');
        }
        let mut f = fs::File::create(&path).map_err(|e| SessionsError::io("create", &path, e))?;
        f.write_all(&body)
            .map_err(|e| SessionsError::io("write", &path, e))?;
        self.lines += lines.len() as u64;
        self.bytes += body.len() as u64;
        Ok(())
    }
}

const REPOS: &[&str] = &[
    "ledger", "tilemap", "httpkit", "quarry", "minidb", "parsnip", "orbit",
];
const MODULES: &[&str] = &[
    "parser",
    "cache",
    "router",
    "config",
    "scheduler",
    "tokenizer",
    "server",
    "planner",
    "storage",
    "metrics",
    "auth",
    "queue",
];
const VERBS: &[&str] = &[
    "parse", "load", "flush", "resolve", "encode", "decode", "merge", "split", "validate",
    "render", "spawn", "drain", "evict", "lookup",
];
const TYPES: &[&str] = &[
    "Config", "Entry", "Frame", "Token", "Request", "Plan", "Slot", "Record", "Batch", "Handle",
];
const NOUNS: &[&str] = &[
    "timeout",
    "retry count",
    "buffer size",
    "cache key",
    "error message",
    "log level",
    "batch size",
    "port",
    "deadline",
    "page size",
];
const CASES: &[&str] = &[
    "empty",
    "unicode",
    "oversized",
    "duplicate",
    "negative",
    "truncated",
];
const VARS: &[&str] = &[
    "entry", "buf", "key", "frame", "pending", "slot", "count", "line", "item",
];

/// One conversation step, before it is rendered in a tool's format.
enum Step {
    User(String),
    Thinking(String),
    Assistant(String),
    Tool {
        id: String,
        call: Call,
        result: String,
        error: bool,
    },
    Subagent {
        id: String,
        description: String,
        prompt: String,
        steps: Vec<Step>,
        result: String,
    },
}

enum Call {
    Read(String),
    Grep(String),
    Bash(String),
    Edit {
        path: String,
        old: String,
        new: String,
    },
}

struct Ctx {
    repo: &'static str,
    module: &'static str,
    other: &'static str,
    verb: &'static str,
    ty: &'static str,
    noun: &'static str,
    case: &'static str,
}

impl Ctx {
    fn new(rng: &mut ChaCha8Rng) -> Ctx {
        let pick = |rng: &mut ChaCha8Rng, s: &[&'static str]| *s.choose(rng).expect("non-empty");
        let module = pick(rng, MODULES);
        let mut other = pick(rng, MODULES);
        if other == module {
            other =
                MODULES[(MODULES.iter().position(|m| *m == module).unwrap() + 1) % MODULES.len()];
        }
        Ctx {
            repo: pick(rng, REPOS),
            module,
            other,
            verb: pick(rng, VERBS),
            ty: pick(rng, TYPES),
            noun: pick(rng, NOUNS),
            case: pick(rng, CASES),
        }
    }

    fn func(&self) -> String {
        format!("{}_{}", self.verb, self.ty.to_lowercase())
    }

    fn file(&self) -> String {
        format!("src/{}.rs", self.module)
    }
}

fn id(rng: &mut ChaCha8Rng, prefix: &str) -> String {
    let a: u64 = rng.gen();
    let b: u32 = rng.gen();
    format!("{prefix}{a:016x}{b:08x}")
}

fn uuid(rng: &mut ChaCha8Rng) -> String {
    let a: u128 = rng.gen();
    let h = format!("{a:032x}");
    format!(
        "{}-{}-4{}-a{}-{}",
        &h[..8],
        &h[8..12],
        &h[13..16],
        &h[17..20],
        &h[20..32]
    )
}

fn task(rng: &mut ChaCha8Rng, c: &Ctx) -> String {
    let n = rng.gen_range(2..64);
    match rng.gen_range(0..6) {
        0 => format!(
            "The test `{}::tests::{}_{}` fails since my last change. Can you find out why and fix it? Don't change the test unless it is wrong.",
            c.module, c.func(), c.case
        ),
        1 => format!(
            "Add a `--{}` option to the `{}` subcommand that sets the {}. The default should stay {n}, and please document it in the README.",
            c.noun.replace(' ', "-"), c.module, c.noun
        ),
        2 => format!(
            "Refactor `{}` in {} so it returns a Result instead of panicking on {} input. Keep the public API otherwise the same.",
            c.func(), c.file(), c.case
        ),
        3 => format!(
            "Why is `{}` so slow on large inputs? It takes seconds for {n}k records. Profile it and fix the worst part.",
            c.func()
        ),
        4 => format!(
            "Write unit tests for the {} module, especially the edge cases around the {} and {} inputs.",
            c.module, c.noun, c.case
        ),
        _ => format!(
            "Explain how the {} and {} modules interact, then rename `{}` to `{}{}` everywhere.",
            c.module, c.other, c.ty, c.ty, c.other[..1].to_uppercase() + &c.other[1..]
        ),
    }
}

fn code(rng: &mut ChaCha8Rng, c: &Ctx, lines: usize) -> String {
    let mut out = String::new();
    let mut n = rng.gen_range(1..40);
    let mut push = |out: &mut String, s: String| {
        out.push_str(&format!("{n:>6}\t{s}\n"));
        n += 1;
    };
    push(
        &mut out,
        format!("use crate::{}::{{{}, Error}};", c.other, c.ty),
    );
    push(&mut out, String::new());
    push(
        &mut out,
        format!("/// {} a {} from its text form.", capitalise(c.verb), c.ty),
    );
    push(
        &mut out,
        format!(
            "pub fn {}(input: &str, limit: usize) -> Result<{}, Error> {{",
            c.func(),
            c.ty
        ),
    );
    for _ in 0..lines {
        let v = *VARS.choose(rng).unwrap();
        let w = *VARS.choose(rng).unwrap();
        let k = rng.gen_range(1..512);
        let s = match rng.gen_range(0..7) {
            0 => format!("    let {v} = {}(&{w})?;", VERBS.choose(rng).unwrap()),
            1 => format!("    if {v}.len() > limit {{ return Err(Error::TooLarge({v}.len())); }}"),
            2 => format!("    for {v} in {w}.iter().take({k}) {{ {w}_total += {v}.weight(); }}"),
            3 => format!("    {w}.insert({v}.key(), {v}.clone());"),
            4 => format!(
                "    tracing::debug!(\"{} {{}} {}s\", {v}.len());",
                c.verb, c.noun
            ),
            5 => format!(
                "    let {v} = match {w} {{ Some(x) => x, None => return Ok({}::default()) }};",
                c.ty
            ),
            _ => format!(
                "    // {} must stay below {k} or the {} overflows",
                c.noun, c.other
            ),
        };
        push(&mut out, s);
    }
    push(
        &mut out,
        format!("    Ok({}::from_parts(entry, limit))", c.ty),
    );
    push(&mut out, "}".into());
    out
}

fn capitalise(s: &str) -> String {
    s[..1].to_uppercase() + &s[1..]
}

fn test_output(rng: &mut ChaCha8Rng, c: &Ctx, fail: bool) -> String {
    let n = rng.gen_range(6..40);
    let mut out = format!(
        "   Compiling {} v0.{}.{} (/home/dev/{})\n    Finished `test` profile [unoptimized + debuginfo] target(s) in {}.{:02}s\n     Running unittests src/lib.rs (target/debug/deps/{}-{:016x})\n\nrunning {n} tests\n",
        c.repo, rng.gen_range(1..9), rng.gen_range(0..20), c.repo, rng.gen_range(1..30), rng.gen_range(0..100), c.repo, rng.gen::<u64>()
    );
    for i in 0..n.min(12) {
        let name = format!(
            "{}::tests::{}_{}",
            c.module,
            VERBS[i % VERBS.len()],
            CASES[i % CASES.len()]
        );
        out.push_str(&format!("test {name} ... ok\n"));
    }
    if fail {
        let name = format!("{}::tests::{}_{}", c.module, c.func(), c.case);
        let (l, r) = (rng.gen_range(0..100), rng.gen_range(100..200));
        out.push_str(&format!(
            "test {name} ... FAILED\n\nfailures:\n\n---- {name} stdout ----\nthread '{name}' panicked at {}:{}:9:\nassertion `left == right` failed\n  left: {l}\n right: {r}\n\nfailures:\n    {name}\n\ntest result: FAILED. {} passed; 1 failed; 0 ignored; 0 measured; 0 filtered out\n",
            c.file(), rng.gen_range(40..400), n - 1
        ));
    } else {
        out.push_str(&format!(
            "\ntest result: ok. {n} passed; 0 failed; 0 ignored; 0 measured; 0 filtered out; finished in 0.{:02}s\n",
            rng.gen_range(1..99)
        ));
    }
    out
}

fn grep_output(rng: &mut ChaCha8Rng, c: &Ctx) -> String {
    let mut out = String::new();
    for _ in 0..rng.gen_range(2..8) {
        let m = MODULES.choose(rng).unwrap();
        out.push_str(&format!(
            "src/{m}.rs:{}:    let {} = {}(&{}, {})?;\n",
            rng.gen_range(10..600),
            VARS.choose(rng).unwrap(),
            c.func(),
            VARS.choose(rng).unwrap(),
            rng.gen_range(1..256)
        ));
    }
    out
}

/// The abstract script of one conversation.
fn script(rng: &mut ChaCha8Rng, c: &Ctx, allow_subagent: bool) -> Vec<Step> {
    let mut steps = vec![Step::User(task(rng, c))];
    let rounds = rng.gen_range(3..9);
    let mut subagent_done = !allow_subagent;
    for r in 0..rounds {
        if rng.gen_bool(0.5) {
            steps.push(Step::Thinking(format!(
                "The user wants the {} handling in {} changed. I should check how `{}` is called from {} before editing anything, and run the tests after.",
                c.noun, c.file(), c.func(), c.other
            )));
        }
        let (say, call, result, error) = match (r, rng.gen_range(0..4)) {
            (0, _) | (_, 0) => (
                format!("I'll start by reading `{}` to see how `{}` handles the {}.", c.file(), c.func(), c.noun),
                Call::Read(c.file()),
                code(rng, c, 8 + r * 3),
                false,
            ),
            (_, 1) => (
                format!("Let me find every caller of `{}`.", c.func()),
                Call::Grep(c.func()),
                grep_output(rng, c),
                false,
            ),
            (_, 2) => {
                let fail = r + 1 < rounds && rng.gen_bool(0.5);
                (
                    "Let me run the tests.".to_string(),
                    Call::Bash(format!("cargo test {}", c.module)),
                    test_output(rng, c, fail),
                    fail,
                )
            }
            _ => (
                format!(
                    "The problem is that `{}` checks the {} before normalising it, so {} inputs slip through. I'll fix the comparison.",
                    c.func(), c.noun, c.case
                ),
                Call::Edit {
                    path: c.file(),
                    old: format!("    if {}.len() > limit {{", VARS.choose(rng).unwrap()),
                    new: format!("    if {}.normalised().len() > limit {{", VARS.choose(rng).unwrap()),
                },
                format!("The file {} has been updated.", c.file()),
                false,
            ),
        };
        steps.push(Step::Assistant(say));
        steps.push(Step::Tool {
            id: id(rng, "toolu_"),
            call,
            result,
            error,
        });
        if !subagent_done && r == 1 && rng.gen_bool(0.5) {
            subagent_done = true;
            let sub = Ctx::new(rng);
            let prompt = format!(
                "Search the codebase for every place that builds a `{}` by hand and report the file and line of each, with a one-line note on whether it validates the {}.",
                c.ty, c.noun
            );
            let mut sub_steps = vec![Step::User(prompt.clone())];
            sub_steps.push(Step::Assistant(format!(
                "Searching for `{}::new` and struct literals.",
                c.ty
            )));
            sub_steps.push(Step::Tool {
                id: id(rng, "toolu_"),
                call: Call::Grep(format!("{} {{", c.ty)),
                result: grep_output(rng, &sub),
                error: false,
            });
            let result =
                format!(
                "Found {} places. Two of them skip validation of the {}: src/{}.rs and src/{}.rs.",
                rng.gen_range(3..9), c.noun, sub.module, sub.other
            );
            sub_steps.push(Step::Assistant(result.clone()));
            steps.push(Step::Subagent {
                id: id(rng, "toolu_"),
                description: format!("Find {} constructors", c.ty),
                prompt,
                steps: sub_steps,
                result,
            });
        }
    }
    steps.push(Step::Assistant(format!(
        "Done. I changed `{}` in `{}` so {} inputs are rejected with an error instead of a panic, updated the callers in `src/{}.rs`, and added {} tests. `cargo test` passes.",
        c.func(), c.file(), c.case, c.other, rng.gen_range(1..5)
    )));
    steps
}

struct ClaudeLines<'a> {
    session: &'a str,
    cwd: String,
    sidechain: bool,
    t: u64,
    parent: Option<String>,
    lines: Vec<Value>,
}

impl ClaudeLines<'_> {
    fn push(&mut self, rng: &mut ChaCha8Rng, kind: &str, message: Value) {
        let uuid = uuid(rng);
        self.t += rng.gen_range(1..20);
        self.lines.push(json!({
            "parentUuid": self.parent,
            "isSidechain": self.sidechain,
            "userType": "external",
            "cwd": self.cwd,
            "sessionId": self.session,
            "version": "2.0.61",
            "gitBranch": "main",
            "type": kind,
            "message": message,
            "uuid": uuid,
            "timestamp": rfc3339(self.t),
        }));
        self.parent = Some(uuid);
    }
}

fn claude_input(call: &Call) -> (&'static str, Value) {
    match call {
        Call::Read(p) => ("Read", json!({ "file_path": p })),
        Call::Grep(p) => (
            "Grep",
            json!({ "pattern": p, "output_mode": "content", "-n": true }),
        ),
        Call::Bash(cmd) => (
            "Bash",
            json!({ "command": cmd, "description": "Run the tests" }),
        ),
        Call::Edit { path, old, new } => (
            "Edit",
            json!({ "file_path": path, "old_string": old, "new_string": new }),
        ),
    }
}

fn render_claude(
    rng: &mut ChaCha8Rng,
    out: &mut ClaudeLines<'_>,
    steps: &[Step],
    subagents: &mut Vec<(String, Vec<Step>)>,
) {
    let model = "claude-synthetic-1";
    for step in steps {
        match step {
            Step::User(text) => out.push(rng, "user", json!({ "role": "user", "content": text })),
            Step::Thinking(text) => out.push(
                rng,
                "assistant",
                json!({ "model": model, "role": "assistant", "type": "message",
                        "content": [{ "type": "thinking", "thinking": text, "signature": "c3ludGhldGlj" }] }),
            ),
            Step::Assistant(text) => out.push(
                rng,
                "assistant",
                json!({ "model": model, "role": "assistant", "type": "message",
                        "content": [{ "type": "text", "text": text }] }),
            ),
            Step::Tool { id, call, result, error } => {
                let (name, input) = claude_input(call);
                out.push(
                    rng,
                    "assistant",
                    json!({ "model": model, "role": "assistant", "type": "message", "stop_reason": "tool_use",
                            "content": [{ "type": "tool_use", "id": id, "name": name, "input": input }] }),
                );
                out.push(
                    rng,
                    "user",
                    json!({ "role": "user", "content": [{ "type": "tool_result", "tool_use_id": id,
                            "content": result, "is_error": error }] }),
                );
            }
            Step::Subagent { id, description, prompt, steps, result } => {
                out.push(
                    rng,
                    "assistant",
                    json!({ "model": model, "role": "assistant", "type": "message", "stop_reason": "tool_use",
                            "content": [{ "type": "tool_use", "id": id, "name": "Task",
                                          "input": { "description": description, "prompt": prompt,
                                                     "subagent_type": "general-purpose" } }] }),
                );
                out.push(
                    rng,
                    "user",
                    json!({ "role": "user", "content": [{ "type": "tool_result", "tool_use_id": id,
                            "content": [{ "type": "text", "text": result }] }] }),
                );
                subagents.push((id.clone(), steps_clone(steps)));
            }
        }
        if rng.gen_bool(0.05) {
            out.lines.push(json!({ "type": "system", "subtype": "informational",
                "content": "PostToolUse hook completed", "level": "info", "sessionId": out.session }));
        }
    }
}

fn steps_clone(steps: &[Step]) -> Vec<Step> {
    steps
        .iter()
        .map(|s| match s {
            Step::User(t) => Step::User(t.clone()),
            Step::Thinking(t) => Step::Thinking(t.clone()),
            Step::Assistant(t) => Step::Assistant(t.clone()),
            Step::Tool {
                id,
                call,
                result,
                error,
            } => Step::Tool {
                id: id.clone(),
                call: match call {
                    Call::Read(p) => Call::Read(p.clone()),
                    Call::Grep(p) => Call::Grep(p.clone()),
                    Call::Bash(p) => Call::Bash(p.clone()),
                    Call::Edit { path, old, new } => Call::Edit {
                        path: path.clone(),
                        old: old.clone(),
                        new: new.clone(),
                    },
                },
                result: result.clone(),
                error: *error,
            },
            Step::Subagent { .. } => Step::Assistant(String::new()),
        })
        .collect()
}

/// Writes one Claude Code session (and its subagent files); returns the number of subagents.
fn write_claude(w: &mut TreeWriter, rng: &mut ChaCha8Rng, t0: u64) -> Result<u32, SessionsError> {
    let c = Ctx::new(rng);
    let session = uuid(rng);
    let project = format!("-home-dev-{}", c.repo);
    let steps = script(rng, &c, true);
    let mut out = ClaudeLines {
        session: &session,
        cwd: format!("/home/dev/{}", c.repo),
        sidechain: false,
        t: t0,
        parent: None,
        lines: Vec::new(),
    };
    if rng.gen_bool(0.5) {
        out.lines.push(json!({ "type": "summary",
            "summary": format!("Fix {} handling in {}", c.noun, c.module), "leafUuid": uuid(rng) }));
    }
    let snapshot_id = uuid(rng);
    out.lines.push(json!({ "type": "file-history-snapshot", "messageId": snapshot_id,
        "snapshot": { "messageId": snapshot_id, "trackedFileBackups": {}, "timestamp": rfc3339(t0) },
        "isSnapshotUpdate": false }));
    let mut subagents = Vec::new();
    render_claude(rng, &mut out, &steps, &mut subagents);
    let lines = std::mem::take(&mut out.lines);
    w.write(
        &Path::new("claude")
            .join(&project)
            .join(format!("{session}.jsonl")),
        &lines,
    )?;
    let n = subagents.len() as u32;
    for (_, sub_steps) in subagents {
        let agent = format!("agent-{:08x}", rng.gen::<u32>());
        let mut sub = ClaudeLines {
            session: &session,
            cwd: format!("/home/dev/{}", c.repo),
            sidechain: true,
            t: t0 + 60,
            parent: None,
            lines: Vec::new(),
        };
        render_claude(rng, &mut sub, &sub_steps, &mut Vec::new());
        w.write(
            &Path::new("claude")
                .join(&project)
                .join(&session)
                .join("subagents")
                .join(format!("{agent}.jsonl")),
            &sub.lines,
        )?;
    }
    Ok(n)
}

fn codex_call(call: &Call) -> Value {
    match call {
        Call::Read(p) => json!({ "type": "function_call", "name": "shell",
            "arguments": json!({ "command": ["bash", "-lc", format!("sed -n '1,120p' {p}")] }).to_string() }),
        Call::Grep(p) => json!({ "type": "function_call", "name": "shell",
            "arguments": json!({ "command": ["bash", "-lc", format!("rg -n '{p}' src")] }).to_string() }),
        Call::Bash(cmd) => json!({ "type": "function_call", "name": "shell",
            "arguments": json!({ "command": ["bash", "-lc", cmd], "timeout_ms": 120000 }).to_string() }),
        Call::Edit { path, old, new } => json!({ "type": "custom_tool_call", "name": "apply_patch",
            "input": format!("*** Begin Patch\n*** Update File: {path}\n@@\n-{old}\n+{new}\n*** End Patch\n") }),
    }
}

/// Writes one Codex rollout.
fn write_codex(w: &mut TreeWriter, rng: &mut ChaCha8Rng, t0: u64) -> Result<(), SessionsError> {
    let c = Ctx::new(rng);
    let session = uuid(rng);
    let steps = script(rng, &c, false);
    let mut t = t0;
    let mut lines = Vec::new();
    let mut push = |rng: &mut ChaCha8Rng, kind: &str, payload: Value| {
        t += rng.gen_range(1..15);
        lines.push(json!({ "timestamp": rfc3339(t), "type": kind, "payload": payload }));
    };
    let cwd = format!("/home/dev/{}", c.repo);
    push(
        rng,
        "session_meta",
        json!({ "id": session, "timestamp": rfc3339(t0), "cwd": cwd,
        "originator": "codex_cli_rs", "cli_version": "0.58.0", "instructions": null, "source": "cli" }),
    );
    push(
        rng,
        "response_item",
        json!({ "type": "message", "role": "developer", "content": [{ "type": "input_text",
        "text": "<permissions instructions>Filesystem sandboxing: workspace-write. Approval policy: on-request.</permissions instructions>" }] }),
    );
    push(
        rng,
        "response_item",
        json!({ "type": "message", "role": "user", "content": [{ "type": "input_text",
        "text": format!("<environment_context>\n  <cwd>{cwd}</cwd>\n  <approval_policy>on-request</approval_policy>\n  <sandbox_mode>workspace-write</sandbox_mode>\n  <shell>bash</shell>\n</environment_context>") }] }),
    );
    push(
        rng,
        "turn_context",
        json!({ "cwd": cwd, "approval_policy": "on-request",
        "sandbox_policy": { "mode": "workspace-write" }, "model": "gpt-synthetic", "summary": "auto" }),
    );
    let mut n = 0;
    for step in &steps {
        match step {
            Step::User(text) => {
                push(
                    rng,
                    "response_item",
                    json!({ "type": "message", "role": "user",
                    "content": [{ "type": "input_text", "text": text }] }),
                );
                push(
                    rng,
                    "event_msg",
                    json!({ "type": "user_message", "message": text, "kind": "plain" }),
                );
            }
            Step::Thinking(text) => push(
                rng,
                "response_item",
                json!({ "type": "reasoning",
                "summary": [{ "type": "summary_text", "text": text }], "content": null,
                "encrypted_content": "gAAAAABzeW50aGV0aWM=" }),
            ),
            Step::Assistant(text) => {
                push(
                    rng,
                    "response_item",
                    json!({ "type": "message", "role": "assistant",
                    "content": [{ "type": "output_text", "text": text }] }),
                );
                push(
                    rng,
                    "event_msg",
                    json!({ "type": "agent_message", "message": text }),
                );
            }
            Step::Tool {
                call,
                result,
                error,
                ..
            } => {
                n += 1;
                let call_id = format!("call_{:024x}", rng.gen::<u128>() >> 32);
                let mut item = codex_call(call);
                item["call_id"] = json!(call_id);
                let custom = item["type"] == "custom_tool_call";
                push(rng, "response_item", item);
                let output = json!({ "output": result,
                    "metadata": { "exit_code": i32::from(*error), "duration_seconds": 0.4 } })
                .to_string();
                let kind = if custom {
                    "custom_tool_call_output"
                } else {
                    "function_call_output"
                };
                push(
                    rng,
                    "response_item",
                    json!({ "type": kind, "call_id": call_id, "output": output }),
                );
                if n % 3 == 0 {
                    push(
                        rng,
                        "event_msg",
                        json!({ "type": "token_count", "info": null }),
                    );
                }
            }
            Step::Subagent { .. } => {}
        }
    }
    let day = rfc3339(t0);
    let rel = Path::new("codex")
        .join(&day[0..4])
        .join(&day[5..7])
        .join(&day[8..10])
        .join(format!(
            "rollout-{}-{session}.jsonl",
            day[..19].replace(':', "-")
        ));
    w.write(&rel, &lines)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tree_bytes(root: &Path) -> Vec<(PathBuf, Vec<u8>)> {
        let mut out = Vec::new();
        let mut stack = vec![root.to_path_buf()];
        while let Some(d) = stack.pop() {
            for e in fs::read_dir(&d).unwrap() {
                let p = e.unwrap().path();
                if p.is_dir() {
                    stack.push(p);
                } else {
                    out.push((
                        p.strip_prefix(root).unwrap().to_path_buf(),
                        fs::read(&p).unwrap(),
                    ));
                }
            }
        }
        out.sort();
        out
    }

    #[test]
    fn same_seed_same_bytes_other_seed_other_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = |name: &str, seed| SynthConfig {
            out: dir.path().join(name),
            sessions: 6,
            seed,
        };
        let a = write_tree(&cfg("a", 7)).unwrap();
        write_tree(&cfg("b", 7)).unwrap();
        write_tree(&cfg("c", 8)).unwrap();
        assert_eq!(a.claude_sessions, 3);
        assert_eq!(a.codex_sessions, 3);
        let ta = tree_bytes(&dir.path().join("a"));
        assert_eq!(ta, tree_bytes(&dir.path().join("b")));
        assert_ne!(ta, tree_bytes(&dir.path().join("c")));
        assert_eq!(ta.len() as u32, 6 + a.claude_subagents);
        assert!(ta
            .iter()
            .all(|(p, b)| p.extension().unwrap() == "jsonl" && !b.is_empty()));
    }

    #[test]
    fn demo_corpus_has_both_splits_and_is_reproducible() {
        let dir = tempfile::tempdir().unwrap();
        let a = demo_corpus(dir.path()).unwrap();
        assert!(!a.is_empty(super::super::Split::Train));
        assert!(!a.is_empty(super::super::Split::Test));
        let first: Vec<_> = a
            .chunks(super::super::Split::Test)
            .map(Result::unwrap)
            .collect();
        // A second run over the same directory replaces both the tree and the corpus.
        let b = demo_corpus(dir.path()).unwrap();
        let second: Vec<_> = b
            .chunks(super::super::Split::Test)
            .map(Result::unwrap)
            .collect();
        assert_eq!(first, second);
        assert_eq!(a.manifest().sources, b.manifest().sources);
    }

    #[test]
    fn refuses_a_non_empty_directory() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("keep"), "x").unwrap();
        let err = write_tree(&SynthConfig {
            out: dir.path().to_path_buf(),
            sessions: 2,
            seed: 1,
        })
        .unwrap_err();
        assert!(matches!(err, SessionsError::OutNotEmpty { .. }), "{err}");
        assert_eq!(fs::read(dir.path().join("keep")).unwrap(), b"x");
    }
}
