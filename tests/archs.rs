//! Every MoE architecture spark writes fixtures for (`spark fixture --arch`), end to end on the
//! pinned CPU engine: the file loads and answers in stock llama-server; the routing the tap
//! captures equals the analytic routing computed from the file with the arch's own gating
//! (softmax, sigmoid plus selection bias within expert groups, router bias with softmax over the
//! chosen k); dense leading layers carry no routing and are named as such; linear-attention
//! layers still route; quantised files from the engine's own llama-quantize load and answer;
//! real shapes written header-only read right in `inspect` and `plan`; an arch spark does not
//! know is refused with exit 2.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{json, Value};
use spark::fixture::Arch;
use spark::gguf::{GgufFile, MoeGeometry};
use spark::supervisor::{LlamaServer, LlamaServerConfig};

use crate::telemetry::{read_records, tap_lib};
use crate::util;

/// `--arch` names of every arch (clap's value names).
pub const ARCHS: [&str; 11] = [
    "qwen3moe",
    "llama",
    "qwen35moe",
    "qwen3next",
    "gpt-oss",
    "glm4moe",
    "deepseek2",
    "gemma4",
    "llama4",
    "deepseek4",
    "qwen4exp",
];

/// The archs a run covers: [`ARCHS`], or those named in `SPARK_TEST_ARCHS` (comma-separated, to
/// rerun one arch's cells of the slow device tests); a name not in [`ARCHS`] fails the test.
pub fn archs() -> Vec<&'static str> {
    match std::env::var("SPARK_TEST_ARCHS") {
        Ok(list) if !list.trim().is_empty() => list
            .split(',')
            .map(|a| {
                let a = a.trim();
                *ARCHS
                    .iter()
                    .find(|&&k| k == a)
                    .unwrap_or_else(|| panic!("SPARK_TEST_ARCHS: {a} is not one of {ARCHS:?}"))
            })
            .collect(),
        _ => ARCHS.to_vec(),
    }
}

/// The quantisations every arch is run in (MXFP4_MOE is gpt-oss's format; it applies to every
/// arch's experts, so it runs on all of them).
pub const QUANTS: [&str; 5] = ["Q4_K_M", "IQ4_XS", "Q6_K", "Q8_0", "MXFP4_MOE"];

/// The (arch, quantisation) cells a run covers: with `SPARK_TEST_ALL=1` (`scripts/test --all`)
/// every arch in every type of [`QUANTS`]; otherwise (CI) each arch in one type, a different
/// one per arch in turn so every type runs on some arch, and gpt-oss in MXFP4 (its own format).
/// Only the archs of [`archs`].
pub fn quant_matrix() -> Vec<(&'static str, &'static str)> {
    let all = std::env::var("SPARK_TEST_ALL").as_deref() == Ok("1");
    let run = archs();
    if all {
        return run
            .into_iter()
            .flat_map(|a| QUANTS.iter().map(move |&q| (a, q)))
            .collect();
    }
    let one_each = vec![
        ("qwen3moe", "Q4_K_M"),
        ("llama", "Q8_0"),
        ("qwen35moe", "IQ4_XS"),
        ("qwen3next", "Q6_K"),
        ("gpt-oss", "MXFP4_MOE"),
        ("glm4moe", "Q6_K"),
        ("deepseek2", "Q4_K_M"),
        ("gemma4", "IQ4_XS"),
        ("llama4", "Q8_0"),
        ("deepseek4", "Q4_K_M"),
        ("qwen4exp", "Q6_K"),
    ];
    assert_eq!(one_each.len(), ARCHS.len(), "one quantisation per arch");
    one_each
        .into_iter()
        .filter(|(a, _)| run.contains(a))
        .collect()
}

/// Widths at which every block-quantised type applies to the expert tensors (K-quants and
/// IQ4_XS need rows of 256 elements; smaller rows fall back to another type).
pub const QUANT_WIDTH: [&str; 4] = ["--embd", "256", "--expert-ff", "256"];

/// Starts stock llama-server on `model`, asks for `n` tokens, stops it; returns the answer.
pub fn answer(server: &Path, model: &Path, log: PathBuf, n: u32) -> Value {
    let s = LlamaServer::start(&LlamaServerConfig {
        binary: server.to_path_buf(),
        model: model.to_path_buf(),
        port: None,
        extra_args: ["-c", "1024", "-np", "1", "-t", "2"]
            .iter()
            .map(|s| s.to_string())
            .collect(),
        env: Vec::new(),
        ready_timeout: Duration::from_secs(120),
        log_path: log.clone(),
    })
    .unwrap_or_else(|e| {
        panic!(
            "{} does not load: {e}\n{}",
            model.display(),
            std::fs::read_to_string(&log).unwrap_or_default()
        )
    });
    let a = s
        .post_json(
            "/completion",
            &json!({"prompt": "The experts of a mixture", "n_predict": n, "temperature": 0.0,
                    "cache_prompt": false}),
        )
        .unwrap();
    s.stop();
    a
}

fn geometry(model: &Path) -> MoeGeometry {
    MoeGeometry::of(&GgufFile::open(model).unwrap()).unwrap()
}

/// Each arch's fixture loads in stock llama-server and answers, with the geometry spark reads
/// from it: dense leading layers (glm4moe, deepseek2), a NextN layer (glm4moe), linear
/// attention (qwen35moe), shared experts, fused gate_up.
#[test]
fn every_arch_loads_and_answers_in_stock_llama_server() {
    let server = util::llama_server();
    let dir = util::tempdir();
    for arch in archs() {
        let model = util::fixture(
            dir.path(),
            &format!("{arch}.gguf"),
            &["--arch", arch, "--type", "f16"],
        );
        let g = geometry(&model);
        let a = answer(&server, &model, dir.path().join(format!("{arch}.log")), 8);
        assert_eq!(a["tokens_predicted"], 8, "{arch}: {a}");
        let expect_dense: &[u32] = match arch {
            "glm4moe" | "deepseek2" => &[0],
            // interleave_moe_layer_step 2: MoE at layers 1 and 3.
            "llama4" => &[0, 2],
            _ => &[],
        };
        assert_eq!(g.dense_layers, expect_dense, "{arch}");
        assert_eq!(
            g.nextn_layers,
            if arch == "glm4moe" { vec![4] } else { vec![] },
            "{arch}"
        );
        assert_eq!(
            g.linear_attention_layers,
            if matches!(arch, "qwen35moe" | "qwen3next" | "qwen4exp") {
                vec![0, 1, 2]
            } else {
                vec![]
            },
            "{arch}"
        );
        assert_eq!(
            g.hash_routed_layers,
            if arch == "deepseek4" { vec![0] } else { vec![] },
            "{arch}"
        );
        let shared = matches!(
            arch,
            "qwen35moe"
                | "qwen3next"
                | "glm4moe"
                | "deepseek2"
                | "llama4"
                | "deepseek4"
                | "qwen4exp"
        );
        assert_eq!(g.n_expert_shared, u32::from(shared), "{arch}");
        let roles: Vec<&str> = g.moe_layers[0]
            .tensors
            .iter()
            .map(|t| t.role.as_str())
            .collect();
        if arch == "qwen35moe" {
            assert_eq!(roles, ["gate_up", "down"], "fused gate_up");
        } else {
            assert_eq!(roles, ["gate", "up", "down"], "{arch}");
        }
        eprintln!(
            "{arch}: {} MoE layers, dense {:?}, nextn {:?}, linear {:?}: {}",
            g.moe_layers.len(),
            g.dense_layers,
            g.nextn_layers,
            g.linear_attention_layers,
            a["content"]
        );
    }
}

fn prompt() -> String {
    let words = [
        "river", "mountain", "expert", "routing", "table", "cache", "silver", "window", "garden",
        "engine", "quiet", "number", "yellow", "paper", "signal", "forest", "market", "thunder",
    ];
    let mut s = String::from("Once upon a time");
    for i in 0..120 {
        s.push(' ');
        s.push_str(words[(i * 7 + i / 3) % words.len()]);
    }
    s
}

/// Records the routing of an analytic fixture of `arch` through the tap and compares every
/// (token, layer) with the analytic computation, and the router inputs value by value; returns
/// (compared, near-ties skipped, router-input rows the graph observer read after their graph).
pub fn check_arch_routing(
    server: &Path,
    arch: &str,
    extra_fixture: &[&str],
    llama_args: &[String],
    env: &[(&str, &str)],
) -> (usize, usize, u64) {
    let dir = util::tempdir();
    let mut flags = vec!["--arch", arch, "--router", "analytic"];
    flags.extend_from_slice(extra_fixture);
    let model = util::fixture(dir.path(), "analytic.gguf", &flags);
    let trace = dir.path().join("analytic.trace");
    let n_predict = 24u32;
    let out = std::process::Command::new(util::spark_bin())
        .args([
            "trace",
            "record",
            "-m",
            model.to_str().unwrap(),
            "--out",
            trace.to_str().unwrap(),
            "--prompt",
            &prompt(),
            "--n-predict",
            &n_predict.to_string(),
            "--llama-server",
            server.to_str().unwrap(),
            "--tap",
            tap_lib().to_str().unwrap(),
            "--json",
            "--hidden-every",
            "3",
            "--hidden-tensor",
            "router_input",
            "--",
            "-np",
            "1",
            "-c",
            "1024",
        ])
        .args(llama_args)
        .envs(env.iter().copied())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{arch}: spark trace record failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let summary: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(summary["dropped"], 0, "{arch}");
    assert_eq!(summary["unmapped"], 0, "{arch}");
    let req = &summary["requests"][0];
    let ids = |v: &Value| -> Vec<u32> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|t| t.as_u64().unwrap() as u32)
            .collect()
    };
    let seq: Vec<u32> = ids(&req["prompt_tokens"])
        .into_iter()
        .chain(ids(&req["generated_tokens"]))
        .collect();
    let file = GgufFile::open(&model).unwrap();
    let g = MoeGeometry::of(&file).unwrap();
    let expected = spark::fixture::analytic_routing(&file, &seq).unwrap();
    let records = read_records(&trace);
    assert!(!records.is_empty(), "{arch}: nothing captured");
    let moe: Vec<u32> = g.moe_layers.iter().map(|l| l.layer).collect();
    let mut seen: Vec<u32> = records.iter().map(|r| u32::from(r.layer)).collect();
    seen.sort_unstable();
    seen.dedup();
    assert_eq!(
        seen, moe,
        "{arch}: routing captured at exactly the MoE layers (dense {:?} and NextN {:?} carry none)",
        g.dense_layers, g.nextn_layers
    );
    for l in &g.linear_attention_layers {
        assert!(
            seen.contains(l),
            "{arch}: linear-attention layer {l} routes"
        );
    }
    let (mut compared, mut skipped) = (0usize, 0usize);
    for r in &records {
        let (want, margin) = &expected[r.token as usize][usize::from(r.layer)];
        assert!(!want.is_empty(), "{arch}: layer {} is dense", r.layer);
        if *margin < 1e-3 {
            skipped += 1;
            continue;
        }
        let mut got: Vec<u32> = r.used_ids().iter().map(|&i| u32::from(i)).collect();
        let mut want = want.clone();
        got.sort_unstable();
        want.sort_unstable();
        assert_eq!(
            got, want,
            "{arch}: token {} (id {}) layer {}",
            r.token, seq[r.token as usize], r.layer
        );
        compared += 1;
    }
    assert!(compared > 0, "{arch}: nothing compared");
    let hash_layers = file
        .get_u64(&format!("{}.hash_layer_count", g.architecture))
        .unwrap_or(0);
    if hash_layers > 0 {
        // Hash-routed layers (deepseek4): the experts come from a fixed table by token id, not
        // from the router; the tap captures them like any other (the table lookup is the
        // graph's `ffn_moe_topk`), and they equal the file's table row for each token.
        let hashed = records
            .iter()
            .filter(|r| u64::from(r.layer) < hash_layers)
            .count();
        eprintln!("{arch}: {hashed} hash-routed (token, layer) pairs equal the table");
        assert!(hashed > 0, "{arch}: no hash-routed layer captured");
    }
    if g.n_expert > 0 && file.get_u64(&format!("{}.expert_group_count", g.architecture)) > Some(1) {
        // Group-limited routing is exercised: ignoring the groups would pick other experts for
        // some (token, layer) pairs, and the capture agreed with the grouped choice.
        let flat = spark::fixture::analytic_routing_without_groups(&file, &seq).unwrap();
        let differ = records
            .iter()
            .filter(|r| {
                let mut a = expected[r.token as usize][usize::from(r.layer)].0.clone();
                let mut b = flat[r.token as usize][usize::from(r.layer)].0.clone();
                a.sort_unstable();
                b.sort_unstable();
                a != b
            })
            .count();
        eprintln!(
            "{arch}: expert groups changed {differ} of {} selections",
            records.len()
        );
        assert!(differ > 0, "{arch}: the expert groups never mattered");
    }
    assert!(
        skipped * 50 <= compared,
        "{arch}: too many near ties: {skipped} of {compared}"
    );
    check_router_inputs(arch, &file, &g, &seq, &trace);
    let graph_hidden_rows = summary["graph_hidden_rows"].as_u64().unwrap();
    (compared, skipped, graph_hidden_rows)
}

/// The hidden states captured as `router_input` (every 3rd token) equal, value for value, the
/// vector the arch's router multiplies, computed from the file; at every MoE layer and no other.
fn check_router_inputs(arch: &str, file: &GgufFile, g: &MoeGeometry, seq: &[u32], trace: &Path) {
    let (header, chunks) =
        crate::telemetry::read_hidden(&trace.with_file_name("analytic.trace.hidden"));
    assert_eq!(u64::from(header.n_embd), g.n_embd, "{arch}");
    assert!(!chunks.is_empty(), "{arch}: no hidden states captured");
    let want = spark::fixture::analytic_router_inputs(file, seq).unwrap();
    let mut layers = std::collections::BTreeSet::new();
    let mut values = 0usize;
    for c in &chunks {
        assert_eq!(c.tensor, 2, "{arch}: chunks say router_input");
        assert_eq!(c.token % 3, 0, "{arch}: every 3rd token");
        layers.insert(u32::from(c.layer));
        let x = want[c.token as usize][usize::from(c.layer)]
            .as_ref()
            .unwrap_or_else(|| panic!("{arch}: hidden state at dense layer {}", c.layer));
        let at = c.offset as usize;
        for (i, &got) in c.values[..c.len as usize].iter().enumerate() {
            let w = x[at + i];
            assert!(
                (got - w).abs() <= 1e-4 * (1.0 + w.abs()),
                "{arch}: token {} layer {} [{}]: captured {got}, the router input is {w}",
                c.token,
                c.layer,
                at + i
            );
            values += 1;
        }
    }
    let moe: std::collections::BTreeSet<u32> = g.moe_layers.iter().map(|l| l.layer).collect();
    assert_eq!(
        layers, moe,
        "{arch}: router inputs at exactly the MoE layers"
    );
    eprintln!("{arch}: {} router-input values exact", values);
}

/// The tap's capture equals the routing computed from the file with each arch's own gating,
/// at exactly the layers that route (dense and NextN layers none, linear-attention layers too).
#[test]
fn routing_capture_is_exact_with_each_archs_gating() {
    let server = util::llama_server();
    for arch in archs() {
        let (c, s, after_graph) = check_arch_routing(&server, arch, &[], &[], &[]);
        assert_eq!(
            after_graph, 0,
            "{arch}: a stock engine has no graph observer; the eval callback reads everything"
        );
        eprintln!("{arch}: {c} (token, layer) pairs exact, {s} near ties skipped");
    }
}

/// Quantised by the engine's own llama-quantize, every arch loads and answers in the common
/// types ([`quant_matrix`]: all of them with `SPARK_TEST_ALL=1`), the expert tensors carry the
/// quantised type, and spark's expert slices are the file's
/// bytes split evenly; a type that needs an importance matrix is refused with exit 2 and says so.
#[test]
fn quantised_fixtures_of_every_arch_load_and_answer() {
    let server = util::llama_server();
    let quantize = server.with_file_name("llama-quantize");
    assert!(
        quantize.exists(),
        "llama-quantize is missing next to {}: rebuild with scripts/build-engine",
        server.display()
    );
    let dir = util::tempdir();
    for (arch, q) in quant_matrix() {
        {
            let name = format!("{arch}-{q}.gguf");
            let mut flags = vec!["--arch", arch, "--quantize", q];
            flags.extend_from_slice(&QUANT_WIDTH);
            flags.extend_from_slice(&["--llama-quantize", quantize.to_str().unwrap()]);
            let model = util::fixture(dir.path(), &name, &flags);
            let file = GgufFile::open(&model).unwrap();
            let g = MoeGeometry::of(&file).unwrap();
            for l in &g.moe_layers {
                for t in &l.tensors {
                    assert!(
                        !matches!(t.ggml_type.as_str(), "f32" | "f16"),
                        "{name}: {} stayed {}",
                        t.name,
                        t.ggml_type
                    );
                    let info = file.tensor(&t.name).unwrap();
                    assert_eq!(
                        t.slice_bytes * u64::from(g.n_expert),
                        info.bytes.unwrap(),
                        "{name}: {}",
                        t.name
                    );
                }
            }
            let a = answer(&server, &model, dir.path().join(format!("{name}.log")), 4);
            assert_eq!(a["tokens_predicted"], 4, "{name}: {a}");
            eprintln!(
                "{name}: experts {:?}",
                g.moe_layers[0]
                    .tensors
                    .iter()
                    .map(|t| format!("{} {}", t.role, t.ggml_type))
                    .collect::<Vec<_>>()
            );
        }
    }
    let out = util::spark(&[
        "fixture",
        "--out",
        dir.path().join("iq2.gguf").to_str().unwrap(),
        "--vocab",
        util::default_vocab().to_str().unwrap(),
        "--quantize",
        "IQ2_XXS",
        "--llama-quantize",
        quantize.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("IQ2_XXS") && err.contains("importance matrix"),
        "{err}"
    );
    assert!(
        !dir.path().join("iq2.gguf").exists(),
        "nothing half-written"
    );
}

/// Real shapes at their real widths, written header-only: the file has the model's real size
/// but no data blocks; inspect counts its layers, experts, shared experts, dense and NextN
/// layers, and every expert slice equals the tensor's bytes over the expert count; plan reads it.
#[test]
fn real_shapes_written_header_only_read_right_in_inspect_and_plan() {
    let dir = util::tempdir();
    for shape in spark::fixture::SHAPES {
        let path = dir.path().join(format!("{}.gguf", shape.name));
        let out = util::spark(&[
            "fixture",
            "--out",
            path.to_str().unwrap(),
            "--vocab",
            util::default_vocab().to_str().unwrap(),
            "--shape",
            shape.name,
            "--full-width",
            "--type",
            "q4_K",
        ]);
        assert!(
            out.status.success(),
            "{}: {}",
            shape.name,
            String::from_utf8_lossy(&out.stderr)
        );
        let meta = std::fs::metadata(&path).unwrap();
        use std::os::unix::fs::MetadataExt;
        assert!(
            meta.blocks() * 512 < meta.len() / 10,
            "{}: header-only file is sparse ({} of {} bytes allocated)",
            shape.name,
            meta.blocks() * 512,
            meta.len()
        );
        let out = util::spark(&["inspect", "--json", path.to_str().unwrap()]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let r: Value = serde_json::from_slice(&out.stdout).unwrap();
        let g = &r["geometry"];
        let file = GgufFile::open(&path).unwrap();
        assert_eq!(g["n_expert"], shape.experts, "{}", shape.name);
        assert_eq!(g["n_expert_used"], shape.top_k, "{}", shape.name);
        assert_eq!(g["n_expert_shared"], shape.shared_experts, "{}", shape.name);
        assert_eq!(
            g["n_layer"],
            shape.layers + shape.nextn,
            "{}: block count",
            shape.name
        );
        assert_eq!(
            g["moe_layers"].as_array().unwrap().len() as u32,
            shape.layers - shape.dense_layers(),
            "{}",
            shape.name
        );
        assert_eq!(
            g["dense_layers"].as_array().unwrap().len() as u32,
            shape.dense_layers(),
            "{}",
            shape.name
        );
        assert_eq!(
            g["nextn_layers"].as_array().unwrap().len() as u32,
            shape.nextn,
            "{}",
            shape.name
        );
        for l in g["moe_layers"].as_array().unwrap() {
            for t in l["tensors"].as_array().unwrap() {
                let info = file.tensor(t["name"].as_str().unwrap()).unwrap();
                assert_eq!(
                    t["slice_bytes"].as_u64().unwrap() * u64::from(shape.experts),
                    info.bytes.unwrap(),
                    "{}: {}",
                    shape.name,
                    info.name
                );
            }
        }
        let plan = util::spark(&[
            "plan",
            "-m",
            path.to_str().unwrap(),
            "--vram-budget",
            "24576",
            "--json",
            "--no-receipts",
        ]);
        assert!(
            matches!(plan.status.code(), Some(0) | Some(3)),
            "{}: plan {:?}: {}",
            shape.name,
            plan.status,
            String::from_utf8_lossy(&plan.stderr)
        );
        eprintln!(
            "{}: {} on disk as {} allocated; plan exit {:?}",
            shape.name,
            meta.len(),
            meta.blocks() * 512,
            plan.status.code()
        );
    }
}

/// A MoE of an arch spark does not know is refused by inspect and plan with exit 2 and a line
/// naming the arch and what spark lacks for it, never counted by guesswork.
#[test]
fn an_unsupported_moe_arch_is_refused_with_exit_2() {
    use spark::gguf::{GgmlType, GgufWriter, Value as GV};
    let dir = util::tempdir();
    let path = dir.path().join("dbrx.gguf");
    let mut w = GgufWriter::new();
    w.set("general.architecture", GV::String("dbrx".into()));
    w.set("dbrx.block_count", GV::U32(1));
    w.set("dbrx.embedding_length", GV::U32(32));
    w.set("dbrx.expert_count", GV::U32(4));
    w.set("dbrx.expert_used_count", GV::U32(2));
    w.add_tensor(
        "blk.0.ffn_up_exps.weight",
        &[32, 8, 4],
        GgmlType::F32,
        vec![0; 32 * 8 * 4 * 4],
    );
    w.write(&path).unwrap();
    for args in [
        vec!["inspect", path.to_str().unwrap()],
        vec!["plan", "-m", path.to_str().unwrap(), "--no-receipts"],
    ] {
        let out = util::spark(&args);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("arch dbrx") && err.contains("does not support"),
            "{args:?}: {err}"
        );
        assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
        assert!(
            out.stdout.is_empty(),
            "no numbers: {}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
    // The arch list spark reads is the arch list it writes fixtures for.
    let names: Vec<&str> = Arch::ALL.iter().map(|a| a.gguf_name()).collect();
    assert_eq!(names, spark::gguf::SUPPORTED_MOE_ARCHS);
}

/// `spark serve --spark` on archs with dense leading layers, a NextN layer, and interleaved dense
/// layers (llama4): the profile has a row for every block (Luce Spark's layout), the dense and NextN rows are defined and zero, the
/// MoE rows hold every routed token, and `spark plan --profile` reads it back.
#[test]
fn profiles_of_archs_with_dense_and_nextn_layers_have_every_row() {
    let dir = util::tempdir();
    for arch in ["glm4moe", "deepseek2", "qwen35moe", "llama4"] {
        let model = util::fixture(
            dir.path(),
            &format!("{arch}.gguf"),
            &["--arch", arch, "--router", "skewed"],
        );
        let g = geometry(&model);
        let served = util::Served::start(&model, &["--quiet", "--spark"]);
        let a: Value = ureq::post(&served.url("/completion"))
            .timeout(Duration::from_secs(120))
            .send_json(
                json!({"prompt": "The expert cache keeps hot experts", "n_predict": 8,
                              "temperature": 0.0}),
            )
            .unwrap()
            .into_json()
            .unwrap();
        assert_eq!(a["tokens_predicted"], 8, "{arch}: {a}");
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while served.status()["profile"]["writes"].as_u64().unwrap_or(0) < 1 {
            assert!(std::time::Instant::now() < deadline, "{arch}: no profile");
            std::thread::sleep(Duration::from_millis(50));
        }
        drop(served);
        let path = spark::profile::path_for(&model);
        let p = spark::profile::Profile::read(&path).unwrap();
        assert_eq!(
            (p.n_layer(), p.n_expert()),
            (g.n_layer as usize, g.n_expert as usize),
            "{arch}: one row per block"
        );
        let row = |l: u32| -> u64 {
            (0..g.n_expert as usize)
                .map(|e| p.counts.get(l as usize, e))
                .sum()
        };
        for &l in g.dense_layers.iter().chain(&g.nextn_layers) {
            assert_eq!(row(l), 0, "{arch}: dense/NextN layer {l} routes nothing");
        }
        let moe_rows: Vec<u64> = g.moe_layers.iter().map(|l| row(l.layer)).collect();
        assert!(moe_rows.iter().all(|&r| r > 0), "{arch}: {moe_rows:?}");
        let plan = util::spark(&[
            "plan",
            "-m",
            model.to_str().unwrap(),
            "--profile",
            path.to_str().unwrap(),
            "--vram-budget",
            "64",
            "--no-receipts",
        ]);
        assert!(
            matches!(plan.status.code(), Some(0) | Some(3)),
            "{arch}: {}",
            String::from_utf8_lossy(&plan.stderr)
        );
    }
}
