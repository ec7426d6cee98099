//! `spark sessions extract` and `spark sessions synth` on handmade and synthetic session trees:
//! exact counts, conversation text, a machine-independent split, argument errors, and an
//! output directory that is replaced atomically or not at all.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use spark::sessions::{self, Chunk, Corpus, CorpusWriter, Manifest, Skipped, Source, Split};

use crate::util::{spark, spark_bin, tempdir};

const CODEX_FILE: &str = "2026/11/02/rollout-2026-11-02T10-00-00-a1b2c3d4.jsonl";

fn write_lines(path: &Path, lines: &[&[u8]]) {
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    let mut body = Vec::new();
    for l in lines {
        body.extend_from_slice(l);
        body.push(b'\n');
    }
    fs::write(path, body).unwrap();
}

/// A Claude Code tree (one session with every kind of bad line, its subagent, an empty session,
/// a non-session file) and a Codex tree (one rollout, a non-rollout file). Returns the roots.
fn handmade_tree(dir: &Path) -> (PathBuf, PathBuf) {
    let claude = dir.join("claude");
    let codex = dir.join("codex");
    let huge = format!(
        r#"{{"type":"user","message":{{"role":"user","content":"{}"}}}}"#,
        "x".repeat(5000)
    );
    write_lines(
        &claude.join("proj/e.jsonl"),
        &[
            br#"{"type":"summary","summary":"Fix parser","leafUuid":"u0"}"#,
            br#"{"type":"file-history-snapshot","messageId":"m","snapshot":{}}"#,
            br#"{"type":"user","message":{"role":"user","content":"Fix the failing parser test."}}"#,
            br#"{"type":"assistant","message":{"role":"assistant","content":[{"type":"text","text":"Running the tests."},{"type":"tool_use","id":"t1","name":"Bash","input":{"command":"cargo test"}}]}}"#,
            br#"{"type":"user","message":{"role":"user","content":[{"type":"tool_result","tool_use_id":"t1","content":"test result: FAILED. 1 failed"}]}}"#,
            br#"{"type":"assistant","message":{"role":"assistant","content":["#,
            b"{\"type\":\"user\",\"message\":{\"content\":\"caf\xe9\"}}",
            huge.as_bytes(),
            b"",
            br#"{"type":"system","content":"hook ran"}"#,
            br#"{"type":"assistant","message":{"content":null}}"#,
            br#"{"type":"assistant","message":{"role":"assistant","content":[{"type":"thinking","thinking":"The off-by-one is in the loop bound."},{"type":"text","text":"Fixed the loop bound; tests pass."}]}}"#,
        ],
    );
    write_lines(
        &claude.join("proj/e/subagents/agent-1.jsonl"),
        &[
            br#"{"type":"user","isSidechain":true,"message":{"role":"user","content":"Find callers of parse_entry."}}"#,
            br#"{"type":"assistant","isSidechain":true,"message":{"role":"assistant","content":[{"type":"text","text":"Two callers: src/a.rs and src/b.rs."}]}}"#,
        ],
    );
    fs::write(claude.join("proj/empty.jsonl"), b"").unwrap();
    fs::write(claude.join("proj/notes.txt"), b"not a session\n").unwrap();
    write_lines(
        &codex.join(CODEX_FILE),
        &[
            br#"{"timestamp":"2026-11-02T10:00:00Z","type":"session_meta","payload":{"id":"a1b2c3d4","cwd":"/w"}}"#,
            br#"{"type":"response_item","payload":{"type":"message","role":"developer","content":[{"type":"input_text","text":"sandbox rules"}]}}"#,
            br#"{"type":"response_item","payload":{"type":"message","role":"user","content":[{"type":"input_text","text":"<user_instructions>be terse</user_instructions>"}]}}"#,
            br#"{"type":"turn_context","payload":{"model":"m"}}"#,
            br#"{"type":"response_item","payload":{"type":"message","role":"user","content":[{"type":"input_text","text":"List the files."}]}}"#,
            br#"{"type":"event_msg","payload":{"type":"user_message","message":"List the files."}}"#,
            br#"{"type":"response_item","payload":{"type":"reasoning","summary":[],"encrypted_content":"x"}}"#,
            br#"{"type":"response_item","payload":{"type":"function_call","name":"shell","arguments":"{\"command\":[\"ls\"]}","call_id":"c1"}}"#,
            br#"{"type":"response_item","payload":{"type":"function_call_output","call_id":"c1","output":"Cargo.toml\nsrc"}}"#,
            b"{\"type\":\"response_item\",\"payload\":{\"type\":\"message\",\"role\":\"assistant\",\"content\":[{\"type\":\"output_text\",\"text\":\"There are two files.\"}]}}\r",
            br#"{"type":"response_item","payload":"#,
            b"[1,2,3]",
        ],
    );
    fs::write(codex.join("2026/11/02/history.jsonl"), b"{}\n").unwrap();
    (claude, codex)
}

const CLAUDE_TEXT: &str = "[user]\nFix the failing parser test.\n[assistant]\nRunning the tests.\n[tool_call Bash]\n{\"command\":\"cargo test\"}\n[tool_result]\ntest result: FAILED. 1 failed\n[thinking]\nThe off-by-one is in the loop bound.\n[assistant]\nFixed the loop bound; tests pass.\n";
const SUBAGENT_TEXT: &str =
    "[user]\nFind callers of parse_entry.\n[assistant]\nTwo callers: src/a.rs and src/b.rs.\n";
const CODEX_TEXT: &str = "[user]\nList the files.\n[tool_call shell]\n{\"command\":[\"ls\"]}\n[tool_result]\nCargo.toml\nsrc\n[assistant]\nThere are two files.\n";

fn run_extract(claude: &Path, codex: &Path, out: &Path, extra: &[&str]) -> Output {
    let mut args = vec![
        "sessions",
        "extract",
        "--claude",
        claude.to_str().unwrap(),
        "--codex",
        codex.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    spark(&args)
}

fn ok_manifest(o: &Output) -> Manifest {
    assert!(
        o.status.success(),
        "spark failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    serde_json::from_slice(&o.stdout).expect("--json prints the manifest")
}

fn all_chunks(corpus: &Corpus, split: Split) -> Vec<Chunk> {
    corpus.chunks(split).map(|c| c.unwrap()).collect()
}

fn names_in(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

#[test]
fn extract_counts_every_line_exactly() {
    let dir = tempdir();
    let (claude, codex) = handmade_tree(dir.path());
    let out = dir.path().join("corpus");
    let m = ok_manifest(&run_extract(
        &claude,
        &codex,
        &out,
        &["--json", "--max-line-bytes", "4096"],
    ));
    assert_eq!(m.format, "spark-corpus");
    assert_eq!(m.version, 1);
    assert_eq!(m.test_frac, 0.2);
    assert_eq!(m.chunk_chars, 8000);
    assert_eq!(m.max_line_bytes, 4096);
    assert_eq!(m.sources.len(), 2);

    let c = &m.sources[0];
    assert_eq!(c.source, Source::Claude);
    assert!(c.found);
    assert_eq!(
        (c.sessions, c.empty_sessions, c.unreadable_sessions),
        (3, 1, 0)
    );
    assert_eq!((c.lines, c.messages), (14, 6));
    assert_eq!(
        c.skipped,
        Skipped {
            blank: 1,
            malformed: 1,
            non_utf8: 1,
            too_long: 1,
            by_type: 3,
            instructions: 0,
            no_text: 1,
        }
    );

    let x = &m.sources[1];
    assert_eq!(x.source, Source::Codex);
    assert_eq!(
        (x.sessions, x.empty_sessions, x.lines, x.messages),
        (1, 0, 12, 4)
    );
    assert_eq!(
        x.skipped,
        Skipped {
            malformed: 2,
            by_type: 4,
            instructions: 2,
            ..Skipped::default()
        }
    );
    for s in &m.sources {
        assert_eq!(s.lines, s.messages + s.skipped.total());
    }

    // proj/e.jsonl hashes below 0.2 (held out) and its subagent follows it; the rollout is train.
    assert_eq!((m.test.sessions, m.test.chunks), (2, 2));
    assert_eq!((m.train.sessions, m.train.chunks), (1, 1));
    assert_eq!(
        m.test.chars as usize,
        CLAUDE_TEXT.chars().count() + SUBAGENT_TEXT.chars().count()
    );

    let corpus = Corpus::open(&out).unwrap();
    let test = all_chunks(&corpus, Split::Test);
    let got: Vec<(&str, u32, &str)> = test
        .iter()
        .map(|c| (c.session.as_str(), c.chunk, c.text.as_str()))
        .collect();
    assert_eq!(
        got,
        vec![
            ("claude:proj/e.jsonl", 0, CLAUDE_TEXT),
            ("claude:proj/e/subagents/agent-1.jsonl", 0, SUBAGENT_TEXT),
        ]
    );
    let train = all_chunks(&corpus, Split::Train);
    assert_eq!(train.len(), 1);
    assert_eq!(train[0].session, format!("codex:{CODEX_FILE}"));
    assert_eq!(train[0].source, Source::Codex);
    assert_eq!(train[0].split, Split::Train);
    assert_eq!(train[0].text, CODEX_TEXT);

    assert_eq!(
        names_in(&out),
        vec!["manifest.json", "test-000.jsonl", "train-000.jsonl"]
    );
    assert_eq!(names_in(dir.path()), vec!["claude", "codex", "corpus"]);
}

#[test]
fn huge_line_limit_is_a_flag() {
    let dir = tempdir();
    let (claude, codex) = handmade_tree(dir.path());
    let out = dir.path().join("corpus");
    // At the default 4 MiB limit the 5 KB line is an ordinary user message.
    let m = ok_manifest(&run_extract(&claude, &codex, &out, &["--json"]));
    assert_eq!(m.sources[0].skipped.too_long, 0);
    assert_eq!(m.sources[0].messages, 7);
    let text = &all_chunks(&Corpus::open(&out).unwrap(), Split::Test)[0].text;
    assert!(text.contains(&"x".repeat(5000)));
}

#[test]
fn chunks_are_cut_at_message_boundaries() {
    let dir = tempdir();
    let (claude, codex) = handmade_tree(dir.path());
    let out = dir.path().join("corpus");
    let m = ok_manifest(&run_extract(
        &claude,
        &codex,
        &out,
        &["--json", "--chunk-chars", "60", "--max-line-bytes", "4096"],
    ));
    let corpus = Corpus::open(&out).unwrap();
    let test = all_chunks(&corpus, Split::Test);
    assert_eq!(test.len() as u64, m.test.chunks);
    let claude_chunks: Vec<&Chunk> = test
        .iter()
        .filter(|c| c.session == "claude:proj/e.jsonl")
        .collect();
    let texts: Vec<&str> = claude_chunks.iter().map(|c| c.text.as_str()).collect();
    assert_eq!(
        texts,
        vec![
            "[user]\nFix the failing parser test.\n",
            "[assistant]\nRunning the tests.\n[tool_call Bash]\n",
            "{\"command\":\"cargo test\"}\n",
            "[tool_result]\ntest result: FAILED. 1 failed\n",
            "[thinking]\nThe off-by-one is in the loop bound.\n[assistant]\n",
            "Fixed the loop bound; tests pass.\n",
        ]
    );
    let indices: Vec<u32> = claude_chunks.iter().map(|c| c.chunk).collect();
    assert_eq!(indices, vec![0, 1, 2, 3, 4, 5]);
    assert!(test.iter().all(|c| c.text.chars().count() <= 60));
}

#[test]
fn split_assignment_is_golden() {
    // Computed independently (Python hashlib): the first 8 bytes of SHA-256 of the relative path,
    // big-endian, shifted right by 11 and divided by 2^53.
    let golden = [
        ("proj/a.jsonl", 0.4162172548431148),
        ("proj/b.jsonl", 0.22477310653405524),
        ("proj/c.jsonl", 0.9409942910476868),
        ("proj/e.jsonl", 0.10825779943931868),
        (CODEX_FILE, 0.8569131645799498),
    ];
    for (key, u) in golden {
        assert_eq!(sessions::split_unit(key), u, "{key}");
    }
    let at = |frac| {
        golden
            .iter()
            .map(|(k, _)| sessions::split_of(k, frac))
            .collect::<Vec<_>>()
    };
    use Split::{Test, Train};
    assert_eq!(at(0.2), vec![Train, Train, Train, Test, Train]);
    assert_eq!(at(0.5), vec![Test, Test, Train, Test, Train]);
    assert_eq!(
        sessions::split_key(Source::Claude, Path::new("proj/e/subagents/agent-9.jsonl")),
        "proj/e.jsonl"
    );
}

#[test]
fn same_input_same_corpus() {
    let dir = tempdir();
    let synth = dir.path().join("tree");
    let o = spark(&[
        "sessions",
        "synth",
        "--out",
        synth.to_str().unwrap(),
        "--sessions",
        "10",
        "--seed",
        "5",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let (claude, codex) = (synth.join("claude"), synth.join("codex"));
    let a = dir.path().join("a");
    let b = dir.path().join("b");
    let ma = ok_manifest(&run_extract(
        &claude,
        &codex,
        &a,
        &["--json", "--test-frac", "0.5"],
    ));
    let mb = ok_manifest(&run_extract(
        &claude,
        &codex,
        &b,
        &["--json", "--test-frac", "0.5"],
    ));
    assert_eq!(ma.files, mb.files);
    assert_eq!(ma.sources, mb.sources);
    for f in &ma.files {
        assert_eq!(
            fs::read(a.join(&f.name)).unwrap(),
            fs::read(b.join(&f.name)).unwrap(),
            "{}",
            f.name
        );
    }
}

#[test]
fn synthetic_tree_extracts_cleanly() {
    let dir = tempdir();
    let synth = dir.path().join("tree");
    let o = spark(&[
        "sessions",
        "synth",
        "--out",
        synth.to_str().unwrap(),
        "--sessions",
        "12",
        "--seed",
        "1",
        "--json",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let report: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(report["claude_sessions"], 6);
    assert_eq!(report["codex_sessions"], 6);
    let subagents = report["claude_subagents"].as_u64().unwrap();

    let out = dir.path().join("corpus");
    let m = ok_manifest(&run_extract(
        &synth.join("claude"),
        &synth.join("codex"),
        &out,
        &["--json", "--test-frac", "0.5", "--chunk-chars", "2000"],
    ));
    let (c, x) = (&m.sources[0], &m.sources[1]);
    assert_eq!(c.sessions, 6 + subagents);
    assert_eq!(x.sessions, 6);
    for s in [c, x] {
        assert_eq!(s.empty_sessions, 0);
        assert_eq!(
            (s.skipped.malformed, s.skipped.non_utf8, s.skipped.too_long),
            (0, 0, 0)
        );
        assert!(s.messages > 10 * s.sessions / 2, "{s:?}");
        assert!(
            s.skipped.by_type > 0,
            "metadata lines are present and skipped"
        );
        assert_eq!(s.lines, s.messages + s.skipped.total());
    }
    assert!(
        x.skipped.instructions >= 6,
        "each rollout has developer instructions"
    );
    assert_eq!(m.train.sessions + m.test.sessions, 12 + subagents);
    assert!(m.train.chunks > 0 && m.test.chunks > 0);

    let corpus = Corpus::open(&out).unwrap();
    for split in [Split::Train, Split::Test] {
        let chunks = all_chunks(&corpus, split);
        assert_eq!(chunks.len() as u64, corpus.len(split));
        assert!(chunks.iter().all(|c| c.split == split));
        assert!(chunks.iter().all(|c| c.text.chars().count() <= 2000));
        // Chunk indices of each session run 0, 1, 2, … in order.
        let mut next = std::collections::HashMap::new();
        for ch in &chunks {
            let n = next.entry(ch.session.clone()).or_insert(0u32);
            assert_eq!(ch.chunk, *n, "{}", ch.session);
            *n += 1;
        }
    }
    let all: String = all_chunks(&corpus, Split::Train)
        .into_iter()
        .chain(all_chunks(&corpus, Split::Test))
        .map(|c| c.text)
        .collect();
    for marker in [
        "[user]\n",
        "[assistant]\n",
        "[tool_call ",
        "[tool_result]\n",
        "[thinking]\n",
    ] {
        assert!(all.contains(marker), "{marker}");
    }
    assert!(
        !all.contains("permissions instructions"),
        "developer text is skipped"
    );
}

#[test]
fn bad_test_frac_is_a_usage_error() {
    let dir = tempdir();
    let (claude, codex) = handmade_tree(dir.path());
    let out = dir.path().join("corpus");
    for bad in ["0", "1", "1.5", "-0.1", "NaN"] {
        let o = run_extract(&claude, &codex, &out, &["--test-frac", bad]);
        assert_eq!(o.status.code(), Some(2), "--test-frac {bad}");
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(
            err.contains("--test-frac must be strictly between 0 and 1"),
            "{err}"
        );
        assert!(!out.exists());
    }
    let o = run_extract(&claude, &codex, &out, &["--chunk-chars", "0"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(!out.exists());
    assert_eq!(names_in(dir.path()), vec!["claude", "codex"]);
}

#[test]
fn missing_dirs_explicit_is_an_error_default_is_empty() {
    let dir = tempdir();
    let out = dir.path().join("corpus");
    let missing = dir.path().join("nope");
    let o = run_extract(&missing, &missing, &out, &[]);
    assert_eq!(o.status.code(), Some(2));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("--claude") && err.contains("no such directory"),
        "{err}"
    );
    assert!(!out.exists());

    // Defaults under an empty $HOME: zero sessions, an empty but valid corpus.
    let home = dir.path().join("home");
    fs::create_dir(&home).unwrap();
    let o = Command::new(spark_bin())
        .args(["sessions", "extract", "--json", "--out"])
        .arg(&out)
        .env("HOME", &home)
        .output()
        .unwrap();
    let m = ok_manifest(&o);
    assert!(m.sources.iter().all(|s| !s.found && s.sessions == 0));
    assert_eq!(
        m.sources[0].root,
        home.join(".claude/projects").display().to_string()
    );
    assert_eq!(
        m.sources[1].root,
        home.join(".codex/sessions").display().to_string()
    );
    let corpus = Corpus::open(&out).unwrap();
    assert!(corpus.is_empty(Split::Train) && corpus.is_empty(Split::Test));
    assert_eq!(corpus.chunks(Split::Train).count(), 0);
}

#[test]
fn output_is_replaced_atomically_or_not_at_all() {
    let dir = tempdir();
    let (claude, codex) = handmade_tree(dir.path());

    // A directory that is not a corpus is refused, even with --force, and left as it was.
    let other = dir.path().join("other");
    fs::create_dir(&other).unwrap();
    fs::write(other.join("keep.txt"), "mine").unwrap();
    for extra in [&[][..], &["--force"][..]] {
        let o = run_extract(&claude, &codex, &other, extra);
        assert_eq!(o.status.code(), Some(2));
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains("not a spark corpus"), "{err}");
        assert_eq!(names_in(&other), vec!["keep.txt"]);
    }

    // An existing corpus needs --force; without it nothing changes.
    let out = dir.path().join("corpus");
    let first = ok_manifest(&run_extract(&claude, &codex, &out, &["--json"]));
    let before = fs::read(out.join("manifest.json")).unwrap();
    let o = run_extract(&claude, &codex, &out, &["--chunk-chars", "60"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("--force"));
    assert_eq!(fs::read(out.join("manifest.json")).unwrap(), before);

    let second = ok_manifest(&run_extract(
        &claude,
        &codex,
        &out,
        &["--json", "--force", "--chunk-chars", "60"],
    ));
    assert_eq!(second.chunk_chars, 60);
    assert!(second.test.chunks > first.test.chunks);
    assert_eq!(Corpus::open(&out).unwrap().manifest().chunk_chars, 60);

    // An empty directory is fine to write into.
    let empty = dir.path().join("empty");
    fs::create_dir(&empty).unwrap();
    ok_manifest(&run_extract(&claude, &codex, &empty, &["--json"]));

    // A staging directory left by a killed run (its process is gone: no pid is this large) is
    // cleaned up by the next run; a live one would be kept.
    let stale = dir.path().join(".corpus.spark-tmp-999999999-1");
    fs::create_dir(&stale).unwrap();
    fs::write(stale.join("train-000.jsonl"), "partial").unwrap();
    ok_manifest(&run_extract(&claude, &codex, &out, &["--json", "--force"]));
    assert!(!stale.exists());

    // No staging or set-aside directories are left next to the outputs.
    assert_eq!(
        names_in(dir.path()),
        vec!["claude", "codex", "corpus", "empty", "other"]
    );
}

#[test]
fn a_failed_write_leaves_no_partial_corpus() {
    let dir = tempdir();
    let out = dir.path().join("corpus");
    {
        let mut w = CorpusWriter::create(&out, false).unwrap();
        w.write(&Chunk {
            session: "claude:p/s.jsonl".into(),
            source: Source::Claude,
            split: Split::Train,
            chunk: 0,
            text: "[user]\nhi\n".into(),
        })
        .unwrap();
        assert!(w.staging_path().join("train-000.jsonl").exists());
        // Dropped without commit, as when extraction fails half-way.
    }
    assert!(!out.exists());
    assert!(names_in(dir.path()).is_empty());

    // An output whose parent is a file fails before anything is written and leaves nothing.
    let (claude, codex) = handmade_tree(dir.path());
    fs::write(dir.path().join("file"), "x").unwrap();
    let o = run_extract(&claude, &codex, &dir.path().join("file/corpus"), &[]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert_eq!(err.matches("Not a directory").count(), 1, "{err}");
    assert_eq!(names_in(dir.path()), vec!["claude", "codex", "file"]);
}

/// `spark sessions extract` with the file permissions enforced even for root: the capabilities
/// that let root ignore them (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH) are dropped from the child's
/// bounding set before it runs spark, so a mode-000 directory is unreadable to it as to any user.
fn run_extract_without_dac_override(claude: &Path, codex: &Path, out: &Path) -> Output {
    use std::os::unix::process::CommandExt;
    let mut cmd = Command::new(spark_bin());
    cmd.args(["sessions", "extract", "--claude"])
        .arg(claude)
        .arg("--codex")
        .arg(codex)
        .arg("--out")
        .arg(out);
    // SAFETY: the closure only calls prctl(2) and geteuid(2), both async-signal-safe, and
    // allocates nothing before exec.
    unsafe {
        cmd.pre_exec(|| {
            for cap in [1, 2] {
                // CAP_DAC_OVERRIDE = 1, CAP_DAC_READ_SEARCH = 2 (linux/capability.h).
                if nix::libc::prctl(nix::libc::PR_CAPBSET_DROP, cap, 0, 0, 0) != 0
                    && nix::libc::geteuid() == 0
                {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    cmd.output()
        .expect("run spark without CAP_DAC_OVERRIDE (root needs CAP_SETPCAP to drop it)")
}

#[test]
fn an_unreadable_subdirectory_is_skipped_counted_and_warned_once() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempdir();
    let (claude, codex) = handmade_tree(dir.path());
    let locked = claude.join("locked");
    write_lines(
        &locked.join("deeper/s.jsonl"),
        &[br#"{"type":"user","message":{"content":"never read"}}"#],
    );
    fs::set_permissions(&locked, fs::Permissions::from_mode(0o000)).unwrap();
    let out = dir.path().join("corpus");
    let o = run_extract_without_dac_override(&claude, &codex, &out);
    fs::set_permissions(&locked, fs::Permissions::from_mode(0o755)).unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(0), "{err}");
    let warning = format!("spark: warning: skipped directory {}: ", locked.display());
    assert_eq!(err.matches(&warning).count(), 1, "one warning: {err}");
    assert!(err.contains("Permission denied"), "{err}");
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(
        text.contains("3 sessions (1 empty, 0 unreadable), 14 lines, 7 messages kept"),
        "the rest of the tree is read as before: {text}"
    );
    assert!(text.contains("1 unreadable directory skipped"), "{text}");
    let m = Corpus::open(&out).unwrap().manifest().clone();
    assert_eq!(
        (m.sources[0].unreadable_dirs, m.sources[1].unreadable_dirs),
        (1, 0)
    );
}

#[test]
fn text_summary_names_what_was_found() {
    let dir = tempdir();
    let (claude, codex) = handmade_tree(dir.path());
    let out = dir.path().join("corpus");
    let o = run_extract(&claude, &codex, &out, &["--max-line-bytes", "4096"]);
    assert!(o.status.success());
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(
        text.contains("3 sessions (1 empty, 0 unreadable), 14 lines, 6 messages kept"),
        "{text}"
    );
    assert!(text.contains("skipped 8: 3 by type, 0 instructions, 1 no text, 1 blank, 1 malformed, 1 non-utf8, 1 too long"), "{text}");
    assert!(text.contains("train  1 sessions, 1 chunks"), "{text}");
    assert!(text.contains("test   2 sessions, 2 chunks"), "{text}");
}

#[test]
fn lines_over_the_default_limit_are_skipped_not_fatal() {
    let dir = tempdir();
    let claude = dir.path().join("claude");
    let huge = format!(
        r#"{{"type":"user","message":{{"content":"{}"}}}}"#,
        "y".repeat(5 << 20)
    );
    write_lines(
        &claude.join("p/s.jsonl"),
        &[
            huge.as_bytes(),
            br#"{"type":"user","message":{"content":"after the huge line"}}"#,
        ],
    );
    let codex = dir.path().join("codex");
    fs::create_dir(&codex).unwrap();
    let out = dir.path().join("corpus");
    let m = ok_manifest(&run_extract(&claude, &codex, &out, &["--json"]));
    let c = &m.sources[0];
    assert_eq!((c.lines, c.messages, c.skipped.too_long), (2, 1, 1));
    assert_eq!(
        c.bytes,
        fs::metadata(claude.join("p/s.jsonl")).unwrap().len()
    );
    let corpus = Corpus::open(&out).unwrap();
    let texts: Vec<String> = [Split::Train, Split::Test]
        .into_iter()
        .flat_map(|s| all_chunks(&corpus, s))
        .map(|c| c.text)
        .collect();
    assert_eq!(texts, vec!["[user]\nafter the huge line\n".to_string()]);
}

#[test]
fn eight_sessions_none_hashed_out_still_hold_one_out_with_a_warning() {
    // Eight Claude Code sessions whose keys all hash at or above the default fraction 0.2: the
    // hash rule alone holds none out (what made validate exit 2). The closest one is held out
    // instead, with a warning.
    let dir = tempdir();
    let claude = dir.path().join("claude");
    let codex = dir.path().join("codex");
    fs::create_dir_all(&codex).unwrap();
    let names: Vec<String> = (0..)
        .map(|i| format!("proj/s{i}.jsonl"))
        .filter(|k| sessions::split_unit(k) >= 0.2)
        .take(8)
        .collect();
    for n in &names {
        write_lines(
            &claude.join(n),
            &[br#"{"type":"user","message":{"role":"user","content":"Fix the failing parser test."}}"#],
        );
    }
    let closest = names
        .iter()
        .min_by(|a, b| sessions::split_unit(a).total_cmp(&sessions::split_unit(b)))
        .unwrap();
    let out = dir.path().join("corpus");
    let o = run_extract(&claude, &codex, &out, &["--json"]);
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    let m = ok_manifest(&o);
    assert_eq!((m.train.sessions, m.test.sessions), (7, 1), "{err}");
    assert!(
        err.contains("spark: warning: --test-frac 0.2 held out none of the sessions")
            && err.contains(closest.as_str()),
        "{err}"
    );
    let corpus = Corpus::open(&out).unwrap();
    let test = all_chunks(&corpus, Split::Test);
    assert_eq!(test.len(), 1);
    assert_eq!(test[0].session, format!("claude:{closest}"));
    // With a fraction that holds some out by hash, nothing changes and nothing is said.
    let out2 = dir.path().join("corpus2");
    let o = run_extract(&claude, &codex, &out2, &["--json", "--test-frac", "0.9"]);
    assert!(!String::from_utf8_lossy(&o.stderr).contains("warning"));
    let m = ok_manifest(&o);
    let by_hash = names
        .iter()
        .filter(|k| sessions::split_unit(k) < 0.9)
        .count() as u64;
    assert_eq!(m.test.sessions, by_hash);
}
