//! GGUF files end to end: fixtures written by `spark fixture`, read back by `spark inspect`,
//! loaded by the pinned stock llama-server; the pinned source's vocab files; bad files.

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::Value as Json;
use spark::gguf::{GgmlType, GgufFile, GgufWriter, MoeGeometry, Value};
use spark::supervisor::{LlamaServer, LlamaServerConfig};

use crate::util;

fn inspect_json(path: &std::path::Path) -> Json {
    let o = util::spark(&["inspect", "--json", path.to_str().unwrap()]);
    assert!(
        o.status.success(),
        "inspect failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    serde_json::from_slice(&o.stdout).expect("inspect --json prints JSON")
}

/// Every variant a fixture can be: router × weight type.
const VARIANTS: &[(&str, &str)] = &[
    ("uniform", "f32"),
    ("skewed", "f16"),
    ("analytic", "q8_0"),
    ("skewed", "q8_0"),
    ("analytic", "f32"),
];

#[test]
fn inspect_reports_what_fixture_wrote() {
    let dir = util::tempdir();
    for (i, (router, ty)) in VARIANTS.iter().enumerate() {
        let (layers, experts, k, embd, ff) = (3 + i as u64, 4 + 2 * i as u64, 2u64, 64u64, 96u64);
        let flags = [
            "--router",
            router,
            "--type",
            ty,
            "--layers",
            &layers.to_string(),
            "--experts",
            &experts.to_string(),
            "--top-k",
            &k.to_string(),
            "--embd",
            &embd.to_string(),
            "--expert-ff",
            &ff.to_string(),
            "--seed",
            &i.to_string(),
        ];
        let path = util::fixture(dir.path(), &format!("f{i}.gguf"), &flags);
        let j = inspect_json(&path);
        let g = &j["geometry"];
        assert_eq!(g["architecture"], "qwen3moe");
        assert_eq!(g["n_layer"], layers);
        assert_eq!(g["n_expert"], experts);
        assert_eq!(g["n_expert_used"], k);
        assert_eq!(g["n_embd"], embd);
        assert_eq!(g["expert_ff_length"], ff);
        assert_eq!(g["moe_layers"].as_array().unwrap().len() as u64, layers);
        let t = GgmlType::from_name(ty).unwrap();
        // gate and up are [embd, ff] per expert, down is [ff, embd]: three equal slices.
        let slice = t.tensor_bytes(&[embd, ff]).unwrap();
        for b in j["expert_bytes_per_layer"].as_array().unwrap() {
            assert_eq!(b.as_u64().unwrap(), 3 * slice, "{router}/{ty}");
        }
        // Slices tile each expert tensor exactly, and they are where the reader says.
        let file = GgufFile::open(&path).unwrap();
        let geo = MoeGeometry::of(&file).unwrap();
        for layer in &geo.moe_layers {
            for et in &layer.tensors {
                let info = file.tensor(&et.name).unwrap();
                assert_eq!(et.slice_bytes * experts, info.bytes.unwrap());
                assert_eq!(et.file_offset, file.data_offset + info.offset);
            }
            let last = layer.slices(experts as u32 - 1).last().unwrap();
            assert!(last.offset + last.bytes <= file.file_size);
        }
        assert_eq!(j["fingerprint"], geo.fingerprint.to_string());
        let routed = j["geometry"]["groups"]["bytes"]["routed_experts"]
            .as_u64()
            .unwrap();
        assert_eq!(routed, layers * experts * 3 * slice);
    }
}

#[test]
fn fingerprint_changes_with_the_model_and_not_with_rereading() {
    let dir = util::tempdir();
    let a = util::fixture(dir.path(), "a.gguf", &["--seed", "1"]);
    let b = util::fixture(dir.path(), "b.gguf", &["--seed", "1", "--layers", "5"]);
    let fa = inspect_json(&a)["fingerprint"].clone();
    assert_eq!(fa, inspect_json(&a)["fingerprint"]);
    assert_ne!(fa, inspect_json(&b)["fingerprint"]);
}

#[test]
fn every_vocab_gguf_of_the_pinned_source_parses() {
    let models = util::engine_prefix().join("models");
    let mut n = 0;
    for entry in std::fs::read_dir(&models).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().and_then(|e| e.to_str()) != Some("gguf") {
            continue;
        }
        let file = GgufFile::open(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let tokens = file
            .get("tokenizer.ggml.tokens")
            .and_then(Value::as_array)
            .map(|a| a.len())
            .unwrap_or(0);
        assert!(tokens > 1000, "{} has {tokens} tokens", path.display());
        assert!(
            file.get_str("tokenizer.ggml.model").is_some(),
            "{}",
            path.display()
        );
        let geo = MoeGeometry::of(&file).unwrap();
        assert!(!geo.is_moe(), "vocab-only files have no experts");
        n += 1;
    }
    assert!(
        n >= 15,
        "expected the pinned source's vocab files, found {n}"
    );
}

fn start(model: &std::path::Path, dir: &std::path::Path, extra: &[&str]) -> LlamaServer {
    let mut extra_args: Vec<String> = vec![
        "-c".into(),
        "1024".into(),
        "-t".into(),
        "2".into(),
        "-np".into(),
        "1".into(),
    ];
    extra_args.extend(extra.iter().map(|s| s.to_string()));
    LlamaServer::start(&LlamaServerConfig {
        binary: util::llama_server(),
        model: model.to_path_buf(),
        port: None,
        extra_args,
        env: vec![],
        ready_timeout: Duration::from_secs(60),
        log_path: dir.join(format!(
            "{}.log",
            model.file_stem().unwrap().to_string_lossy()
        )),
    })
    .unwrap_or_else(|e| panic!("llama-server on {}: {e}", model.display()))
}

#[test]
fn stock_llama_server_runs_every_fixture_variant() {
    let dir = util::tempdir();
    for (i, (router, ty)) in VARIANTS.iter().enumerate() {
        let path = util::fixture(
            dir.path(),
            &format!("v{i}.gguf"),
            &["--router", router, "--type", ty],
        );
        let server = start(&path, dir.path(), &[]);
        let answer = server
            .post_json(
                "/completion",
                &serde_json::json!({"prompt": "Hello experts", "n_predict": 8, "temperature": 0.0}),
            )
            .unwrap();
        server.stop();
        let predicted = answer
            .pointer("/timings/predicted_n")
            .and_then(Json::as_u64)
            .unwrap_or(0);
        assert_eq!(predicted, 8, "{router}/{ty}: {answer}");
        assert!(
            answer["content"].as_str().is_some_and(|c| !c.is_empty()),
            "{router}/{ty}: {answer}"
        );
    }
}

/// The "done when" check: what `spark inspect --json` says about the medium fixture agrees with
/// what llama.cpp itself prints when it loads the file.
#[test]
fn inspect_agrees_with_llama_cpp_on_the_medium_fixture() {
    let dir = util::tempdir();
    let path = util::fixture(dir.path(), "medium.gguf", &["--size", "medium"]);
    let j = inspect_json(&path);
    let server = start(&path, dir.path(), &["-lv", "4"]);
    let log = std::fs::read_to_string(&server.log_path).unwrap();
    server.stop();
    let printed: BTreeMap<String, String> = log
        .lines()
        .filter_map(|l| l.split_once("print_info: ").map(|(_, r)| r))
        .filter_map(|r| {
            r.split_once('=')
                .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        })
        .collect();
    let num = |k: &str| -> u64 {
        printed
            .get(k)
            .unwrap_or_else(|| panic!("llama.cpp did not print {k}"))
            .parse()
            .unwrap()
    };
    let g = &j["geometry"];
    assert_eq!(g["n_layer"].as_u64().unwrap(), num("n_layer"));
    assert_eq!(g["n_expert"].as_u64().unwrap(), num("n_expert"));
    assert_eq!(g["n_expert_used"].as_u64().unwrap(), num("n_expert_used"));
    assert_eq!(g["n_embd"].as_u64().unwrap(), num("n_embd"));
    assert_eq!(g["expert_ff_length"].as_u64().unwrap(), num("n_ff_exp"));
    assert_eq!(g["head_dim_k"].as_u64().unwrap(), num("n_embd_head_k"));
    // Per-expert bytes from llama.cpp's own numbers: gate, up ([n_embd, n_ff_exp]) and down
    // ([n_ff_exp, n_embd]) in the fixture's q8_0.
    let slice = GgmlType::Q8_0
        .tensor_bytes(&[num("n_embd"), num("n_ff_exp")])
        .unwrap();
    for b in j["expert_bytes_per_layer"].as_array().unwrap() {
        assert_eq!(b.as_u64().unwrap(), 3 * slice);
    }
    // llama.cpp's "file size" is the sum of tensor bytes, in MiB with two decimals.
    let size_mib: f64 = printed["file size"]
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap();
    let ours = j["geometry"]["total_tensor_bytes"].as_u64().unwrap() as f64 / 1048576.0;
    assert!(
        (size_mib - ours).abs() < 0.006,
        "llama.cpp {size_mib} MiB vs spark {ours} MiB"
    );
    // KV cache: llama.cpp allocates n_ctx (1024 here) × per-token bytes at f16.
    let kv_line = log
        .lines()
        .find(|l| l.contains("KV buffer size"))
        .expect("llama.cpp prints its KV buffer");
    let kv_mib: f64 = kv_line
        .split('=')
        .nth(1)
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap();
    let per_tok = j["kv_bytes_per_token_f16"].as_u64().unwrap() as f64;
    assert!(
        (kv_mib - per_tok * 1024.0 / 1048576.0).abs() < 0.006,
        "KV {kv_mib} MiB vs {per_tok} B/token"
    );
}

#[test]
fn bad_files_are_input_errors_not_panics() {
    let dir = util::tempdir();
    let good = util::fixture(dir.path(), "good.gguf", &[]);
    let bytes = std::fs::read(&good).unwrap();
    let file = GgufFile::open(&good).unwrap();
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("empty", vec![], "empty"),
        ("text", b"hello, not a model\n".to_vec(), "not a GGUF file"),
        ("magic-only", b"GGUF".to_vec(), "truncated"),
        (
            "v1",
            [&b"GGUF"[..], &1u32.to_le_bytes(), &[0u8; 16]].concat(),
            "version 1",
        ),
        ("header-cut", bytes[..100].to_vec(), "truncated"),
        (
            "data-cut",
            bytes[..bytes.len() - 1000].to_vec(),
            "truncated",
        ),
        (
            "table-cut",
            bytes[..file.data_offset as usize - 8].to_vec(),
            "truncated",
        ),
        (
            "huge-count",
            {
                let mut b = bytes.clone();
                b[16..24].copy_from_slice(&u64::MAX.to_le_bytes());
                b
            },
            "truncated",
        ),
        (
            "bad-type",
            {
                let mut b = bytes.clone();
                let p = 24 + 8 + "general.architecture".len();
                b[p..p + 4].copy_from_slice(&77u32.to_le_bytes());
                b
            },
            "unknown value type 77",
        ),
    ];
    for (name, content, expect) in cases {
        let p = dir.path().join(format!("{name}.gguf"));
        std::fs::write(&p, &content).unwrap();
        let o = util::spark(&["inspect", p.to_str().unwrap()]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{name}: {err}");
        assert!(
            err.contains(expect),
            "{name}: expected {expect:?} in {err:?}"
        );
        assert!(
            err.contains(p.to_str().unwrap()),
            "{name}: the error names the file: {err}"
        );
        assert_eq!(
            err.trim().lines().count(),
            1,
            "{name}: one-line error: {err}"
        );
        assert!(!err.contains("panicked"), "{name}: {err}");
    }
    let o = util::spark(&["inspect", dir.path().join("missing.gguf").to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2));
    let o = util::spark(&["inspect", dir.path().to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2), "a directory is an input error");
}

#[test]
fn every_metadata_type_and_several_tensor_types_round_trip() {
    use spark::gguf::ValueType as T;
    let mut w = GgufWriter::new();
    let nested = Value::Array(
        T::Array,
        vec![
            Value::Array(T::I16, vec![Value::I16(-3), Value::I16(7)]),
            Value::Array(T::I16, vec![]),
        ],
    );
    let values = vec![
        ("t.u8", Value::U8(250)),
        ("t.i8", Value::I8(-100)),
        ("t.u16", Value::U16(65000)),
        ("t.i16", Value::I16(-32000)),
        ("t.u32", Value::U32(4_000_000_000)),
        ("t.i32", Value::I32(-2_000_000_000)),
        ("t.f32", Value::F32(1.5e-7)),
        ("t.bool", Value::Bool(true)),
        ("t.string", Value::String("héllo ✓".into())),
        ("t.u64", Value::U64(u64::MAX)),
        ("t.i64", Value::I64(i64::MIN)),
        ("t.f64", Value::F64(-2.25e300)),
        (
            "t.arr_str",
            Value::Array(
                T::String,
                vec![Value::String("a".into()), Value::String(String::new())],
            ),
        ),
        ("t.arr_empty", Value::Array(T::F32, vec![])),
        ("t.nested", nested),
        ("general.alignment", Value::U32(64)),
    ];
    for (k, v) in &values {
        w.set(k, v.clone());
    }
    let types = [
        GgmlType::F32,
        GgmlType::F16,
        GgmlType::BF16,
        GgmlType::Q8_0,
        GgmlType::Q4_K,
        GgmlType::IQ2_XXS,
        GgmlType::MXFP4,
        GgmlType::TQ1_0,
    ];
    let mut datas = Vec::new();
    for (i, t) in types.iter().enumerate() {
        let dims = [256u64, 3, 2];
        let n = t.tensor_bytes(&dims).unwrap() as usize;
        let data: Vec<u8> = (0..n).map(|j| (j * 31 + i * 7) as u8).collect();
        w.add_tensor(&format!("t{i}"), &dims, *t, data.clone());
        datas.push(data);
    }
    let dir = util::tempdir();
    let p = dir.path().join("rt.gguf");
    w.write(&p).unwrap();
    let f = GgufFile::open(&p).unwrap();
    assert_eq!(f.version, 3);
    assert_eq!(f.alignment, 64);
    assert_eq!(f.data_offset % 64, 0);
    for (k, v) in &values {
        assert_eq!(f.get(k), Some(v), "{k}");
    }
    let keys: Vec<&str> = f.metadata.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(
        keys,
        values.iter().map(|(k, _)| *k).collect::<Vec<_>>(),
        "order is kept"
    );
    for (i, t) in types.iter().enumerate() {
        let info = f.tensor(&format!("t{i}")).unwrap();
        assert_eq!(info.ggml_type, Some(*t));
        assert_eq!(info.dims, vec![256, 3, 2]);
        assert_eq!(info.offset % 64, 0);
        assert_eq!(f.tensor_data(info).unwrap(), &datas[i][..], "{}", t.name);
    }
    // In-memory and on-disk images are the same bytes.
    assert_eq!(std::fs::read(&p).unwrap(), w.to_bytes());
}

#[test]
fn unknown_tensor_type_is_reported_not_fatal() {
    let mut w = GgufWriter::new();
    w.set("general.architecture", Value::String("llama".into()));
    w.set("llama.block_count", Value::U32(1));
    w.add_tensor("blk.0.attn_q.weight", &[32, 2], GgmlType::F32, vec![0; 256]);
    let mut bytes = w.to_bytes();
    // Patch the tensor's type id (just before its 8-byte offset at the end of the table).
    let name = b"blk.0.attn_q.weight";
    let pos = bytes.windows(name.len()).position(|w| w == name).unwrap() + name.len() + 4 + 16;
    bytes[pos..pos + 4].copy_from_slice(&99u32.to_le_bytes());
    let dir = util::tempdir();
    let p = dir.path().join("unknown.gguf");
    std::fs::write(&p, &bytes).unwrap();
    let o = util::spark(&["inspect", p.to_str().unwrap()]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        out.contains("unknown type: blk.0.attn_q.weight (type#99)"),
        "{out}"
    );
    assert!(out.contains("dense model"), "{out}");
}

#[test]
fn fixture_rejects_bad_flags_with_exit_2() {
    let dir = util::tempdir();
    let out = dir.path().join("x.gguf");
    let vocab = util::default_vocab();
    for (flags, expect) in [
        (vec!["--top-k", "9"], "--top-k 9"),
        (vec!["--type", "q8_0", "--embd", "40"], "--embd 40"),
        (vec!["--type", "q9_9"], "--type q9_9"),
        (vec!["--experts", "1"], "--experts 1"),
    ] {
        let mut args = vec![
            "fixture",
            "--out",
            out.to_str().unwrap(),
            "--vocab",
            vocab.to_str().unwrap(),
        ];
        args.extend(flags);
        let o = util::spark(&args);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{err}");
        assert!(err.contains(expect), "{expect} in {err}");
        assert!(!out.exists(), "nothing written on bad input");
    }
    let o = util::spark(&[
        "fixture",
        "--out",
        out.to_str().unwrap(),
        "--vocab",
        dir.path().join("nope.gguf").to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(2));
    assert!(!out.exists());
}

#[test]
fn analytic_routing_is_computable_and_skewed_routing_is_hot() {
    let dir = util::tempdir();
    let path = util::fixture(
        dir.path(),
        "an.gguf",
        &["--router", "analytic", "--experts", "16", "--top-k", "4"],
    );
    let f = GgufFile::open(&path).unwrap();
    let tokens: Vec<u32> = (100..400).collect();
    let routing = spark::fixture::analytic_routing(&f, &tokens).unwrap();
    assert_eq!(routing.len(), tokens.len());
    let mut tight = 0;
    for per_layer in &routing {
        assert_eq!(per_layer.len(), 4);
        for (ids, margin) in per_layer {
            assert_eq!(ids.len(), 4);
            let mut d = ids.clone();
            d.sort();
            d.dedup();
            assert_eq!(d.len(), 4, "distinct experts");
            assert!(ids.iter().all(|&e| e < 16));
            if *margin < 1e-3 {
                tight += 1;
            }
        }
    }
    assert!(
        tight * 100 < tokens.len() * 4,
        "near-ties are rare: {tight}"
    );
    // Not analytic: refused.
    let skewed = util::fixture(dir.path(), "sk.gguf", &[]);
    assert!(spark::fixture::analytic_routing(&GgufFile::open(&skewed).unwrap(), &tokens).is_err());
}

/// Runs spark with `args`; None if it is still running after `deadline` (then it is killed).
fn spark_within(args: &[&str], deadline: Duration) -> Option<std::process::Output> {
    use std::process::{Command, Stdio};
    let mut child = Command::new(util::spark_bin())
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let end = std::time::Instant::now() + deadline;
    while std::time::Instant::now() < end {
        if child.try_wait().unwrap().is_some() {
            return Some(child.wait_with_output().unwrap());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
    None
}

#[test]
fn a_fifo_named_gguf_is_refused_at_once_not_waited_on() {
    let dir = util::tempdir();
    let fifo = dir.path().join("x.gguf");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    let f = fifo.to_str().unwrap();
    for args in [
        vec!["inspect", f],
        vec!["plan", "-m", f],
        vec!["serve", "-m", f, "--port", "0"],
    ] {
        // Generous: a hang is forever, a refusal is milliseconds.
        let o = spark_within(&args, Duration::from_secs(20))
            .unwrap_or_else(|| panic!("`spark {}` hung on a FIFO", args.join(" ")));
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "spark {}: {err}", args.join(" "));
        assert_eq!(err.trim_end().lines().count(), 1, "one line: {err}");
        assert!(
            err.contains(f) && err.contains("not a regular file"),
            "names the file: {err}"
        );
    }
    // A symlink to a regular file is still a model; a dangling one is an error naming it.
    let model = util::fixture(dir.path(), "m.gguf", &[]);
    let link = dir.path().join("link.gguf");
    std::os::unix::fs::symlink(&model, &link).unwrap();
    assert!(GgufFile::open(&link).is_ok());
    let dangling = dir.path().join("dangling.gguf");
    std::os::unix::fs::symlink(dir.path().join("nowhere"), &dangling).unwrap();
    let e = GgufFile::open(&dangling).unwrap_err().to_string();
    assert!(e.contains("dangling.gguf"), "{e}");
}
