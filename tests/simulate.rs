//! `spark simulate`, `spark trace show|convert` and `spark profile show` end to end: the shared
//! real trace, both text formats, the binary format, pictures, profiles, budgets, bad input.

use std::fs;
use std::path::{Path, PathBuf};

use serde_json::Value;
use spark::trace::Trace;

use crate::util::{spark, tempdir};

fn shared_trace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/traces/olmoe-1b-7b-decode-299.jsonl")
}

fn ok_stdout(args: &[&str]) -> String {
    let o = spark(args);
    assert!(
        o.status.success(),
        "spark {args:?} failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout).unwrap()
}

/// Runs spark expecting exit code `code`; returns stderr, checked to be one line, no panic.
fn fails_with(args: &[&str], code: i32) -> String {
    let o = spark(args);
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert_eq!(o.status.code(), Some(code), "spark {args:?}: {err}");
    assert!(!err.contains("panicked"), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(err.starts_with("spark: failed to "), "{err}");
    err
}

fn json(args: &[&str]) -> Value {
    serde_json::from_str(&ok_stdout(args)).unwrap()
}

/// Two layers, six experts, top-2, eight steps.
const JSONL: &str = "\
{\"tok\": 1, \"layers\": [[0, 1], [2, 3]]}
{\"tok\": 2, \"layers\": [[0, 2], [2, 4]]}
{\"tok\": 3, \"layers\": [[0, 1], [3, 5]]}
{\"tok\": 4, \"layers\": [[3, 4], [2, 3]]}
{\"tok\": 5, \"layers\": [[0, 5], [1, 2]]}
{\"tok\": 6, \"layers\": [[0, 1], [2, 3]]}
{\"tok\": 7, \"layers\": [[2, 3], [0, 4]]}
{\"tok\": 8, \"layers\": [[0, 1], [2, 3]]}
";

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    fs::write(&p, text).unwrap();
    p
}

fn misses(report: &Value) -> Vec<(u64, String, u64)> {
    report["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["slots"].as_u64().unwrap(),
                r["policy"].as_str().unwrap().to_string(),
                r["misses"].as_u64().unwrap(),
            )
        })
        .collect()
}

#[test]
fn shared_trace_simulates_with_the_issue_json_shape() {
    let t = shared_trace();
    let r = json(&[
        "simulate",
        "--trace",
        t.to_str().unwrap(),
        "--policy",
        "all",
        "--slots",
        "16,32,64",
        "--json",
    ]);
    assert_eq!(r["layers"], 16);
    assert_eq!(r["steps"], 299);
    assert_eq!(r["k"], 8);
    assert!(r["trace"]
        .as_str()
        .unwrap()
        .ends_with("olmoe-1b-7b-decode-299.jsonl"));
    let results = r["results"].as_array().unwrap();
    assert_eq!(results.len(), 3 * 7);
    for row in results {
        for key in [
            "slots",
            "policy",
            "misses",
            "accesses",
            "miss_ratio",
            "vs_belady",
        ] {
            assert!(row.get(key).is_some(), "{key} missing in {row}");
        }
        // 150 scored steps × 16 layers × 8 experts.
        assert_eq!(row["accesses"], 150 * 16 * 8);
        let ratio = row["misses"].as_f64().unwrap() / row["accesses"].as_f64().unwrap();
        assert!((row["miss_ratio"].as_f64().unwrap() - ratio).abs() < 1e-12);
    }
    for (slots, policy, m) in misses(&r) {
        let b = misses(&r)
            .into_iter()
            .find(|(s, p, _)| *s == slots && p == "belady")
            .unwrap()
            .2;
        assert!(m >= b, "{policy} at {slots}: {m} < belady {b}");
        if policy == "belady" {
            assert_eq!(
                results
                    .iter()
                    .find(|x| x["slots"] == slots && x["policy"] == "belady")
                    .unwrap()["vs_belady"],
                1.0
            );
        }
    }
    // Slots equal to the experts: everything fits after the preload, and spark fills every
    // slot at startup.
    let at = |p: &str| {
        misses(&r)
            .into_iter()
            .find(|(s, q, _)| *s == 64 && q == p)
            .unwrap()
            .2
    };
    assert_eq!(at("belady"), 0);
    assert_eq!(at("spark"), 0);
    assert!(at("lru") > 0);
}

#[test]
fn spark_against_lru_compares_like_with_like() {
    // At 64 slots (every expert fits) spark, filled by expert id before the first token, has
    // no misses while lru, which starts empty, pays 50 first uses: that printed "spark has
    // 100.0% fewer misses than lru". Like with like, first uses are left out for both.
    let t = shared_trace();
    let t = t.to_str().unwrap();
    let text = ok_stdout(&["simulate", "--trace", t, "--slots", "32,64"]);
    assert!(!text.contains("100.0% fewer"), "{text}");
    assert!(
        text.contains(
            "slots 64: spark and lru both have 0 misses on reuses (first uses left out: lru starts cold, spark starts filled by expert id)"
        ),
        "{text}"
    );
    assert!(text.contains("slots 32: spark has "), "{text}");
    let r = json(&["simulate", "--trace", t, "--slots", "32,64", "--json"]);
    let row = |slots: u64, p: &str| {
        r["results"]
            .as_array()
            .unwrap()
            .iter()
            .find(|x| x["slots"] == slots && x["policy"] == p)
            .unwrap()
            .clone()
    };
    for (p, start) in [
        ("lru", "cold"),
        ("lfu", "cold"),
        ("lfru", "cold"),
        ("static", "calibration-counts"),
        ("pin-lru", "calibration-counts"),
        ("belady", "oracle"),
        ("spark", "expert-ids"),
    ] {
        assert_eq!(row(64, p)["start"], start, "{p}");
    }
    // lru's 50 misses at 64 slots are all first uses; spark and belady have none.
    assert_eq!(row(64, "lru")["misses"], 50);
    assert_eq!(row(64, "lru")["first_use_misses"], 50);
    assert_eq!(row(64, "spark")["misses"], 0);
    let v = &r["spark_vs_lru"];
    assert_eq!(v[1]["slots"], 64);
    assert_eq!(v[1]["basis"], "reuse-misses");
    assert_eq!(
        (v[1]["spark"].as_u64(), v[1]["lru"].as_u64()),
        (Some(0), Some(0))
    );
    assert!(v[1]["spark_fewer_pct"].is_null());
    // At 32 slots: reuse misses are misses less first-use misses, for both.
    let reuse = |p: &str| {
        row(32, p)["misses"].as_u64().unwrap() - row(32, p)["first_use_misses"].as_u64().unwrap()
    };
    assert_eq!(v[0]["spark"].as_u64(), Some(reuse("spark")));
    assert_eq!(v[0]["lru"].as_u64(), Some(reuse("lru")));
    // A cold cache misses every first use.
    for p in ["lru", "lfu", "lfru"] {
        let first: u64 = r["results"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|x| x["policy"] == p)
            .map(|x| x["first_use_misses"].as_u64().unwrap())
            .max()
            .unwrap();
        assert_eq!(
            first,
            row(64, "lru")["first_use_misses"].as_u64().unwrap(),
            "{p}"
        );
    }

    // With a profile, spark and static start from it.
    let dir = tempdir();
    let trace = Trace::read(&shared_trace(), None).unwrap();
    let counts = spark::cache::Counts::of(&trace.decode, trace.n_expert as usize);
    let mut csv = format!(
        "# hotness table: n_layer={} n_expert={} n_expert_used={}\n",
        trace.n_layer, trace.n_expert, trace.k
    );
    for l in 0..counts.n_layer {
        let row: Vec<String> = counts.layer(l).iter().map(u64::to_string).collect();
        csv.push_str(&row.join(","));
        csv.push('\n');
    }
    let prof = write(dir.path(), "p.csv", &csv);
    let r = json(&[
        "simulate",
        "--trace",
        t,
        "--slots",
        "64",
        "--profile",
        prof.to_str().unwrap(),
        "--json",
    ]);
    let starts: Vec<(String, String)> = r["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| {
            (
                x["policy"].as_str().unwrap().to_string(),
                x["start"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert!(
        starts.contains(&("spark".into(), "profile".into())),
        "{starts:?}"
    );
    assert!(
        starts.contains(&("static".into(), "profile".into())),
        "{starts:?}"
    );
    assert!(
        starts.contains(&("lru".into(), "cold".into())),
        "{starts:?}"
    );
}

#[test]
fn text_formats_import_convert_and_agree() {
    let dir = tempdir();
    let d = dir.path();
    let jsonl = write(d, "t.jsonl", JSONL);
    let bin = d.join("t.trace");
    let csv = d.join("t.csv");
    let out = ok_stdout(&[
        "trace",
        "convert",
        jsonl.to_str().unwrap(),
        bin.to_str().unwrap(),
    ]);
    assert!(out.contains("8 decode steps"), "{out}");
    ok_stdout(&[
        "trace",
        "convert",
        bin.to_str().unwrap(),
        csv.to_str().unwrap(),
    ]);
    let text = fs::read_to_string(&csv).unwrap();
    assert!(
        text.starts_with("layer_id,expert_ids\n0,0 1\n1,2 3\n0,0 2\n"),
        "{text}"
    );
    let show = ok_stdout(&["trace", "show", bin.to_str().unwrap()]);
    assert!(show.contains("2 layers, 6 experts, k=2"), "{show}");
    assert!(show.contains("8 decode, 0 prompt"), "{show}");
    // An explicit --from reads a file whose extension says nothing.
    let odd = d.join("t.data");
    fs::copy(&csv, &odd).unwrap();
    let show = ok_stdout(&["trace", "show", odd.to_str().unwrap(), "--from", "csv"]);
    assert!(show.contains("(csv)"), "{show}");
    // The three formats simulate identically.
    let run = |p: &Path| {
        misses(&json(&[
            "simulate",
            "--trace",
            p.to_str().unwrap(),
            "--slots",
            "2,3,4",
            "--json",
        ]))
    };
    let a = run(&jsonl);
    assert_eq!(a.len(), 3 * 7);
    assert_eq!(a, run(&bin));
    assert_eq!(a, run(&csv));
}

#[test]
fn hand_checked_small_trace() {
    // Layer 0 scored steps 4..8 (calibrate-frac 0.5): {0,5} {0,1} {2,3} {0,1};
    // layer 1: {1,2} {2,3} {0,4} {2,3}. Two slots each.
    let dir = tempdir();
    let jsonl = write(dir.path(), "t.jsonl", JSONL);
    let r = json(&[
        "simulate",
        "--trace",
        jsonl.to_str().unwrap(),
        "--slots",
        "2",
        "--policy",
        "lru,belady,static",
        "--json",
    ]);
    let m: Vec<(String, u64)> = misses(&r).into_iter().map(|(_, p, m)| (p, m)).collect();
    // lru, warmed by steps 0..4 (layer 0 ends {3,4}, layer 1 ends {2,3}):
    //   layer 0: 2 + 1 + 2 + 2 = 7; layer 1: 1 + 1 + 2 + 2 = 6.
    // belady, preloaded with {0,5} and {1,2}:
    //   layer 0: 0, then {0,1}: 1 (evict 5), {2,3}: 2 (0,1 return first: stream both), {0,1}: 0;
    //   layer 1: 0, {2,3}: 1 (evict 1), {0,4}: 2 (streamed), {2,3}: 0.  Total 6.
    // static, top-2 of the calibration counts (layer 0: 0 and 1; layer 1: 2 and 3):
    //   layer 0: 1 + 0 + 2 + 0 = 3; layer 1: 1 + 0 + 2 + 0 = 3.
    assert_eq!(
        m,
        vec![
            ("lru".to_string(), 13),
            ("belady".to_string(), 6),
            ("static".to_string(), 6)
        ]
    );
}

#[test]
fn truncated_and_corrupt_traces_exit_2() {
    let dir = tempdir();
    let d = dir.path();
    let jsonl = write(d, "t.jsonl", JSONL);
    let bin = d.join("t.trace");
    ok_stdout(&[
        "trace",
        "convert",
        jsonl.to_str().unwrap(),
        bin.to_str().unwrap(),
    ]);
    let bytes = fs::read(&bin).unwrap();
    let cut = d.join("cut.trace");
    fs::write(&cut, &bytes[..bytes.len() - 10]).unwrap();
    let e = fails_with(&["trace", "show", cut.to_str().unwrap()], 2);
    assert!(e.contains("truncated") && e.contains("cut.trace"), "{e}");
    let e = fails_with(&["simulate", "--trace", cut.to_str().unwrap()], 2);
    assert!(e.contains("truncated"), "{e}");
    let mut bad = bytes.clone();
    bad[0] = b'X';
    let magic = d.join("magic.trace");
    fs::write(&magic, &bad).unwrap();
    let e = fails_with(&["trace", "show", magic.to_str().unwrap()], 2);
    assert!(e.contains("bad magic"), "{e}");
    let broken = write(
        d,
        "broken.jsonl",
        "{\"tok\": 1, \"layers\": [[0, 1]]}\n{\"tok\": 2\n",
    );
    let e = fails_with(&["simulate", "--trace", broken.to_str().unwrap()], 2);
    assert!(e.contains("broken.jsonl line 2"), "{e}");
}

#[test]
fn bad_flags_exit_2() {
    let dir = tempdir();
    let jsonl = write(dir.path(), "t.jsonl", JSONL);
    let t = jsonl.to_str().unwrap();
    let e = fails_with(&["simulate", "--trace", t, "--policy", "lru,mru"], 2);
    assert!(e.contains("\"mru\""), "{e}");
    let e = fails_with(&["simulate", "--trace", t, "--slots", "1"], 2);
    assert!(e.contains("below k=2"), "{e}");
    let e = fails_with(&["simulate", "--trace", t, "--calibrate-frac", "1.5"], 2);
    assert!(e.contains("--calibrate-frac"), "{e}");
    let e = fails_with(&["simulate", "--trace", "/nonexistent/x.jsonl"], 2);
    assert!(e.contains("/nonexistent/x.jsonl"), "{e}");
    let e = fails_with(&["trace", "show", "/tmp/whatever.xyz"], 2);
    assert!(e.contains("unknown trace format"), "{e}");
    let e = fails_with(&["simulate", "--trace", t, "--budget-mib", "4"], 2);
    assert!(e.contains("expert sizes are unknown"), "{e}");
}

#[test]
fn plot_and_heatmap_are_svg() {
    let dir = tempdir();
    let d = dir.path();
    let jsonl = write(d, "t.jsonl", JSONL);
    let plot = d.join("plot.svg");
    let out = ok_stdout(&[
        "simulate",
        "--trace",
        jsonl.to_str().unwrap(),
        "--slots",
        "2,3,4,5",
        "--plot",
        plot.to_str().unwrap(),
    ]);
    assert!(out.contains("wrote"), "{out}");
    let svg = fs::read_to_string(&plot).unwrap();
    assert!(svg.starts_with("<svg xmlns=\"http://www.w3.org/2000/svg\""));
    assert!(svg.trim_end().ends_with("</svg>"));
    for p in ["lru", "belady", "spark", "pin-lru"] {
        assert!(svg.contains(&format!(">{p}</text>")), "{p}");
    }
    // 7 policies × 4 slot counts.
    assert_eq!(svg.matches(r#"class="marker""#).count(), 28);

    let prof = write(
        d,
        "m.gguf.spark.csv",
        "# hotness table: n_layer=2 n_expert=6 n_expert_used=2\n9,5,1,1,1,0\n0,1,8,8,2,1\n",
    );
    let heat = d.join("heat.svg");
    let out = ok_stdout(&[
        "profile",
        "show",
        prof.to_str().unwrap(),
        "--heatmap",
        heat.to_str().unwrap(),
    ]);
    assert!(out.contains("2 layers, 6 experts, k=2"), "{out}");
    assert!(out.contains("none (a Luce Spark file)"), "{out}");
    let svg = fs::read_to_string(&heat).unwrap();
    assert!(svg.starts_with("<svg"));
    assert_eq!(svg.matches("<rect x=").count(), 12);
    assert!(svg.contains("layer 0 expert 0: 9"));
}

#[test]
fn profile_scoring_mode() {
    let dir = tempdir();
    let d = dir.path();
    let jsonl = write(d, "t.jsonl", JSONL);
    // The profile says layer 0's hot experts are 4 and 5, layer 1's are 0 and 1: static pins
    // those instead of the calibration part's.
    let prof = write(
        d,
        "p.csv",
        "# hotness table: n_layer=2 n_expert=6 n_expert_used=2\n0,0,0,0,9,8\n9,8,0,0,0,0\n",
    );
    let r = json(&[
        "simulate",
        "--trace",
        jsonl.to_str().unwrap(),
        "--profile",
        prof.to_str().unwrap(),
        "--slots",
        "2",
        "--policy",
        "static",
        "--json",
    ]);
    assert!(r["profile"].as_str().unwrap().ends_with("p.csv"));
    // Scored layer 0: {0,5} {0,1} {2,3} {0,1} → 1 + 2 + 2 + 2 = 7;
    // layer 1: {1,2} {2,3} {0,4} {2,3} → 1 + 2 + 1 + 2 = 6.
    assert_eq!(r["results"][0]["misses"], 13);
    let wrong = write(
        d,
        "wrong.csv",
        "# hotness table: n_layer=3 n_expert=6 n_expert_used=2\n1,1,1,1,1,1\n1,1,1,1,1,1\n1,1,1,1,1,1\n",
    );
    let e = fails_with(
        &[
            "simulate",
            "--trace",
            jsonl.to_str().unwrap(),
            "--profile",
            wrong.to_str().unwrap(),
        ],
        2,
    );
    assert!(e.contains("wrong.csv") && e.contains("3 layers"), "{e}");
}

#[test]
fn profiles_with_counts_out_of_range_exit_2_naming_the_line() {
    let dir = tempdir();
    let d = dir.path();
    let jsonl = write(d, "t.jsonl", JSONL);
    let h = "# hotness table: n_layer=2 n_expert=6 n_expert_used=2\n";
    for (name, text, line) in [
        // 2^64: it used to be read as u64::MAX, and wrapped to 7 after one request.
        (
            "big.csv",
            format!("{h}1,1,1,1,1,1\n18446744073709551616,0,0,0,0,0\n"),
            3,
        ),
        ("frac.csv", format!("{h}1,1,1.5,1,1,1\n1,1,1,1,1,1\n"), 2),
        (
            "k0.csv",
            "# hotness table: n_layer=2 n_expert=6 n_expert_used=0\n1,1,1,1,1,1\n1,1,1,1,1,1\n"
                .to_string(),
            1,
        ),
    ] {
        let prof = write(d, name, &text);
        let p = prof.to_str().unwrap();
        for args in [
            vec!["profile", "show", p],
            vec![
                "simulate",
                "--trace",
                jsonl.to_str().unwrap(),
                "--profile",
                p,
            ],
        ] {
            let e = fails_with(&args, 2);
            assert!(
                e.contains(&format!("{p} line {line}:")),
                "{args:?}: names the file and line: {e}"
            );
        }
    }
}

#[test]
fn a_closed_stdout_ends_quietly_with_141() {
    let dir = tempdir();
    let prof = write(
        dir.path(),
        "p.csv",
        "# hotness table: n_layer=2 n_expert=6 n_expert_used=2\n9,5,1,1,1,0\n0,1,8,8,2,1\n",
    );
    // A pipe whose reader is gone before spark writes, as after `| head -1` has exited.
    let (read, write_end) = nix::unistd::pipe().unwrap();
    drop(read);
    let o = std::process::Command::new(crate::util::spark_bin())
        .args(["profile", "show", prof.to_str().unwrap()])
        .stdout(std::process::Stdio::from(write_end))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(141), "{err}");
    assert!(err.is_empty(), "quiet: {err}");
}

#[test]
fn budget_mode_places_and_refuses() {
    let dir = tempdir();
    let jsonl = write(dir.path(), "t.jsonl", JSONL);
    let t = jsonl.to_str().unwrap();
    // 1 MiB experts, 6 MiB: the floor is k = 2 slots per layer (4 MiB); the 2 MiB left pin the
    // two hottest calibration experts across layers: layer 0's expert 0 and layer 1's expert 2
    // (3 uses each; layer 1's expert 3 also has 3 and loses the tie to the lower id).
    let r = json(&[
        "simulate",
        "--trace",
        t,
        "--budget-mib",
        "6",
        "--expert-bytes",
        "1048576",
        "--policy",
        "lru,belady",
        "--json",
    ]);
    let row = &r["results"][0];
    assert_eq!(row["slots_per_layer"], serde_json::json!([3, 3]));
    assert_eq!(row["slots"], 3);
    let moved = row["bytes_moved"].as_u64().unwrap();
    assert_eq!(moved, row["misses"].as_u64().unwrap() * 1_048_576);
    let e = fails_with(
        &[
            "simulate",
            "--trace",
            t,
            "--budget-mib",
            "3",
            "--expert-bytes",
            "1048576",
        ],
        3,
    );
    assert!(e.contains("cannot hold the per-layer floor"), "{e}");
}

/// Golden misses of the `spark` policy on the shared real trace, taken from the implementation
/// before it was made fast (commit 2cad393): the fast one must make every decision the same.
mod spark_golden {
    use spark::cache::{Counts, Policy, PolicyKind, Spark};
    use spark::simulate::Experiment;
    use spark::trace::{Routing, Trace};
    use spark::vram_plan::{plan, VramPlanInput};

    /// FNV-1a over a stream of u64 words.
    struct Fnv(u64);

    impl Fnv {
        fn new() -> Fnv {
            Fnv(0xcbf2_9ce4_8422_2325)
        }
        fn word(&mut self, w: u64) {
            for b in w.to_le_bytes() {
                self.0 ^= u64::from(b);
                self.0 = self.0.wrapping_mul(0x100_0000_01b3);
            }
        }
    }

    /// Replays steps `0..cal` unscored, then scores the rest; returns the scored misses. Every
    /// access's misses, the blend followed after each step and the final residency of every
    /// (layer, expert) go into `h`.
    fn run(
        r: &Routing,
        n_expert: usize,
        k: usize,
        slots: &[u32],
        prior: Option<&Counts>,
        cal: usize,
        h: &mut Fnv,
    ) -> u64 {
        let mut p = Spark::new(n_expert, slots, prior, k);
        let mut scored = 0u64;
        for s in 0..r.steps() {
            for l in 0..r.n_layer() {
                let m = p.access(l, r.ids(s, l));
                h.word(u64::from(m));
                if s >= cal {
                    scored += u64::from(m);
                }
            }
            h.word(p.lambda().map_or(u64::MAX, f64::to_bits));
        }
        for l in 0..r.n_layer() {
            for e in 0..n_expert as u16 {
                h.word(u64::from(p.is_resident(l, e)));
            }
        }
        scored
    }

    fn trace() -> Trace {
        Trace::read(&super::shared_trace(), None).expect("the shared trace reads")
    }

    const COLD: [u64; 64] = [
        35707, 33496, 31302, 29165, 27084, 25185, 23366, 21650, 20102, 18948, 18039, 17182, 16372,
        15709, 15035, 14390, 13805, 13198, 12641, 12133, 11620, 11088, 10547, 9943, 9486, 8947,
        8527, 8129, 7686, 7292, 6903, 6508, 6177, 5751, 5361, 5039, 4684, 4381, 4064, 3770, 3516,
        3235, 2980, 2755, 2555, 2319, 2112, 1882, 1695, 1521, 1357, 1180, 1037, 907, 778, 664, 546,
        454, 361, 272, 196, 122, 50, 0,
    ];
    const COLD_HASH: u64 = 0xbe86_5f3b_2ff9_a348;
    const CALIBRATED: [u64; 64] = [
        17783, 16587, 15367, 14272, 13190, 12187, 11272, 10409, 9574, 8939, 8414, 7964, 7581, 7261,
        6925, 6648, 6371, 6065, 5833, 5571, 5360, 5112, 4803, 4528, 4301, 4067, 3890, 3705, 3519,
        3323, 3133, 2970, 2832, 2631, 2449, 2360, 2194, 2051, 1917, 1781, 1666, 1540, 1425, 1316,
        1224, 1109, 1009, 887, 800, 716, 627, 550, 469, 416, 340, 282, 218, 177, 134, 97, 71, 46,
        13, 0,
    ];
    // The same replay as COLD (calibration only decides what is scored), so the same hash.
    const CALIBRATED_HASH: u64 = 0xbe86_5f3b_2ff9_a348;
    const PROFILE: [u64; 64] = [
        17783, 16587, 15367, 14272, 13190, 12187, 11272, 10409, 9559, 8881, 8354, 7948, 7557, 7217,
        6915, 6597, 6328, 6070, 5826, 5513, 5261, 5019, 4742, 4492, 4255, 4041, 3829, 3624, 3454,
        3252, 3114, 2963, 2812, 2656, 2506, 2352, 2187, 2065, 1906, 1801, 1656, 1548, 1440, 1335,
        1202, 1083, 994, 902, 794, 711, 595, 531, 449, 364, 297, 228, 177, 133, 94, 63, 39, 22, 3,
        0,
    ];
    const PROFILE_HASH: u64 = 0x7a10_291f_3452_e476;
    const BUDGET: [u64; 29] = [
        10409, 8966, 8001, 7339, 6655, 6147, 5590, 5102, 4610, 4088, 3717, 3310, 2959, 2598, 2265,
        1963, 1693, 1431, 1209, 986, 789, 598, 459, 324, 217, 119, 56, 19, 0,
    ];
    const BUDGET_HASH: u64 = 0x1514_4a17_4038_4f1d;

    fn check(name: &str, got: &[u64], hash: u64, want: &[u64], want_hash: u64) {
        if std::env::var_os("SPARK_GOLDEN_PRINT").is_some() {
            println!("{name}: {got:?} hash {hash:#018x}");
            return;
        }
        assert_eq!(got, want, "{name}: misses per slot count");
        assert_eq!(
            hash, want_hash,
            "{name}: per-access misses, blend or residency differ"
        );
    }

    /// Every slot count 1..=64 per layer from a cold start (no calibration, no prior).
    #[test]
    fn cold_replay_at_every_slot_count() {
        let t = trace();
        let (r, n, k) = (&t.decode, t.n_expert as usize, t.k as usize);
        let mut h = Fnv::new();
        let got: Vec<u64> = (1..=64)
            .map(|s| run(r, n, k, &vec![s; r.n_layer()], None, 0, &mut h))
            .collect();
        check("COLD", &got, h.0, &COLD, COLD_HASH);
    }

    /// What `spark simulate` does by default (calibrate-frac 0.5), at every slot count.
    #[test]
    fn calibrated_at_every_slot_count() {
        let t = trace();
        let (r, n, k) = (&t.decode, t.n_expert as usize, t.k as usize);
        let cal = r.steps() / 2;
        let exp = Experiment::new(r, n, k, cal);
        let mut h = Fnv::new();
        let got: Vec<u64> = (1..=64u32)
            .map(|s| {
                let slots = vec![s; r.n_layer()];
                let m = run(r, n, k, &slots, None, cal, &mut h);
                assert_eq!(m, exp.run(PolicyKind::Spark, &slots).misses);
                m
            })
            .collect();
        check("CALIBRATED", &got, h.0, &CALIBRATED, CALIBRATED_HASH);
    }

    /// `spark simulate --profile`: the counts are known up front (the prior seeds the fill and
    /// the frequency member).
    #[test]
    fn profile_prior_at_every_slot_count() {
        let t = trace();
        let (r, n, k) = (&t.decode, t.n_expert as usize, t.k as usize);
        let cal = r.steps() / 2;
        let prior = Counts::of(r, n);
        let mut exp = Experiment::new(r, n, k, cal);
        exp.counts = prior.clone();
        exp.prior = Some(prior.clone());
        let mut h = Fnv::new();
        let got: Vec<u64> = (1..=64u32)
            .map(|s| {
                let slots = vec![s; r.n_layer()];
                let m = run(r, n, k, &slots, Some(&prior), cal, &mut h);
                assert_eq!(m, exp.run(PolicyKind::Spark, &slots).misses);
                m
            })
            .collect();
        check("PROFILE", &got, h.0, &PROFILE, PROFILE_HASH);
    }

    /// `spark simulate --budget-mib` with 1 MiB experts: per-layer slots from the placement,
    /// 128..=1024 MiB in steps of 32.
    #[test]
    fn budget_placements() {
        let t = trace();
        let (r, n, k) = (&t.decode, t.n_expert as usize, t.k as usize);
        let cal = r.steps() / 2;
        let exp = Experiment::new(r, n, k, cal);
        let sizes = vec![1u64 << 20; r.n_layer()];
        let mut h = Fnv::new();
        let got: Vec<u64> = (0..29u64)
            .map(|i| {
                let plan = plan(&VramPlanInput {
                    counts: &exp.counts,
                    expert_bytes: &sizes,
                    budget: (128 + 32 * i) << 20,
                    floor: k as u32,
                })
                .expect("the budget holds the floor");
                let slots = plan.slots();
                let m = run(r, n, k, &slots, None, cal, &mut h);
                assert_eq!(m, exp.run(PolicyKind::Spark, &slots).misses);
                m
            })
            .collect();
        check("BUDGET", &got, h.0, &BUDGET, BUDGET_HASH);
    }
}
