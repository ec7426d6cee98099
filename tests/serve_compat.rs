//! spark serve as llama-server's clients and llama.cpp's own server test suite see it: several
//! listen addresses, `LLAMA_ARG_*` settings, header names as llama-server writes them; and the
//! suite's stand-in (`scripts/suite/standin.py`) and comparison (`scripts/suite/compare.py`).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::util;

fn script(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("scripts/suite")
        .join(name)
}

/// The head of the answer to `request` sent to `addr`.
fn head_of(addr: (&str, u16), request: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    s.write_all(request).unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !got.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = s.read(&mut buf).unwrap();
        assert!(n > 0, "closed: {}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&buf[..n]);
    }
    String::from_utf8_lossy(&got).into_owned()
}

#[test]
fn llama_arg_host_listens_on_every_address_and_headers_keep_llama_servers_case() {
    let dir = util::tempdir();
    let model = util::fixture(dir.path(), "m.gguf", &[]);
    let port = spark::supervisor::free_port().unwrap();
    let mut child = Command::new(util::spark_bin())
        .args([
            "serve",
            "-m",
            model.to_str().unwrap(),
            "--quiet",
            "--no-tap",
        ])
        .arg("--llama-server")
        .arg(util::llama_server())
        .args(["--", "-c", "2048", "-t", "2"])
        .env("LLAMA_ARG_HOST", "127.0.0.1,::1")
        .env("LLAMA_ARG_PORT", port.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let err = child.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(err).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    let announced = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(l) if l.starts_with("spark: serving ") => break l,
            Ok(_) => {}
            Err(_) => {
                let _ = child.kill();
                panic!("spark serve did not start");
            }
        }
    };
    let result = std::panic::catch_unwind(|| {
        assert!(
            announced.contains(&format!("http://127.0.0.1:{port} and http://[::1]:{port}")),
            "{announced}"
        );
        for host in ["127.0.0.1", "::1"] {
            let head = head_of(
                (host, port),
                b"GET /health HTTP/1.1\r\nHost: x\r\nOrigin: http://example.org\r\n\r\n",
            );
            assert!(head.starts_with("HTTP/1.1 200"), "{host}: {head}");
            // As llama-server wrote them, not lower-cased.
            assert!(
                head.contains("\r\nAccess-Control-Allow-Origin: http://example.org\r\n"),
                "{host}: {head}"
            );
            assert!(head.contains("\r\nContent-Type: "), "{host}: {head}");
            assert!(!head.to_ascii_lowercase().contains("\r\ndate:"), "{head}");
            // spark's own answers are written in title case too.
            let head = head_of(
                (host, port),
                b"GET /spark/status HTTP/1.1\r\nHost: x\r\n\r\n",
            );
            assert!(
                head.contains("\r\nContent-Type: application/json"),
                "{head}"
            );
        }
    });
    let _ = child.kill();
    let _ = child.wait();
    if let Err(e) = result {
        std::panic::resume_unwind(e);
    }
}

#[test]
fn an_empty_address_in_host_is_a_usage_error() {
    let dir = util::tempdir();
    let model = util::fixture(dir.path(), "m.gguf", &[]);
    let o = util::spark(&[
        "serve",
        "-m",
        model.to_str().unwrap(),
        "--host",
        "127.0.0.1,,::1",
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(err.contains("empty address"), "{err}");
}

/// The stand-in's command for `args` on `side`, as JSON.
fn mapped(side: &str, args: &[&str]) -> Vec<String> {
    let o = Command::new("python3")
        .arg(script("standin.py"))
        .args(args)
        .env("SPARK_SUITE_SIDE", side)
        .env("SPARK_SUITE_MODEL", "/m/fixture.gguf")
        .env("SPARK_SUITE_LLAMA_SERVER", "/e/llama-server")
        .env("SPARK_SUITE_SPARK", "/s/spark")
        .env("SPARK_SUITE_SPARK_ARGS", "--spark --quiet")
        .env("SPARK_SUITE_DRY_RUN", "1")
        .output()
        .expect("python3 runs the stand-in");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    serde_json::from_slice(&o.stdout).unwrap()
}

#[test]
fn the_suite_stand_in_puts_the_fixture_in_place_of_every_model() {
    // What the suite's tinyllama preset passes (utils.py), with a draft model and an API key.
    let args = [
        "--port",
        "8080",
        "--temp",
        "0.8",
        "--seed",
        "42",
        "--host",
        "127.0.0.1,::1",
        "--offline",
        "--hf-repo",
        "ggml-org/test-model-stories260K",
        "--alias",
        "tinyllama-2",
        "--ctx-size",
        "512",
        "--model-draft",
        "/tmp/draft.gguf",
        "--api-key",
        "k",
        "--no-jinja",
    ];
    let stock = mapped("stock", &args);
    assert_eq!(
        stock,
        [
            "/e/llama-server",
            "--model",
            "/m/fixture.gguf",
            "--host",
            "127.0.0.1,::1",
            "--port",
            "8080",
            "--temp",
            "0.8",
            "--seed",
            "42",
            "--alias",
            "tinyllama-2",
            "--ctx-size",
            "512",
            "--api-key",
            "k",
            "--no-jinja",
            "--model-draft",
            "/m/fixture.gguf",
        ]
    );
    let spark = mapped("spark", &args);
    assert_eq!(
        spark,
        [
            "/s/spark",
            "serve",
            "--model",
            "/m/fixture.gguf",
            "--host",
            "127.0.0.1,::1",
            "--port",
            "8080",
            "--spark",
            "--quiet",
            "--",
            "--temp",
            "0.8",
            "--seed",
            "42",
            "--alias",
            "tinyllama-2",
            "--ctx-size",
            "512",
            "--api-key",
            "k",
            "--no-jinja",
            "--model-draft",
            "/m/fixture.gguf",
        ]
    );
    // `--flag=value` forms and a run without any model (the router preset) get the fixture too.
    assert_eq!(
        mapped("stock", &["--hf-file=x.gguf", "--port=9"]),
        [
            "/e/llama-server",
            "--model",
            "/m/fixture.gguf",
            "--port",
            "9"
        ]
    );
    // Bad use is exit 2 with a message.
    let o = Command::new("python3")
        .arg(script("standin.py"))
        .arg("--port")
        .env("SPARK_SUITE_SIDE", "stock")
        .env("SPARK_SUITE_MODEL", "/m")
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("--port needs a value"));
}

#[test]
fn the_suite_comparison_fails_only_on_a_test_that_passes_against_stock() {
    let dir = util::tempdir();
    let report = |name: &str, cases: &[(&str, &str)]| {
        let mut x = String::from("<testsuites><testsuite>");
        for (case, outcome) in cases {
            x.push_str(&format!("<testcase classname=\"unit.t\" name=\"{case}\">"));
            match *outcome {
                "failed" => x.push_str("<failure message=\"x\"/>"),
                "error" => x.push_str("<error message=\"x\"/>"),
                "skipped" => x.push_str("<skipped/>"),
                _ => {}
            }
            x.push_str("</testcase>");
        }
        x.push_str("</testsuite></testsuites>");
        let p = dir.path().join(name);
        std::fs::write(&p, x).unwrap();
        p
    };
    let stock = report(
        "stock.xml",
        &[
            ("a", "passed"),
            ("b", "failed"),
            ("c", "passed"),
            ("d", "skipped"),
        ],
    );
    let same = report(
        "same.xml",
        &[
            ("a", "passed"),
            ("b", "failed"),
            ("c", "passed"),
            ("d", "passed"),
        ],
    );
    let worse = report(
        "worse.xml",
        &[("a", "passed"), ("b", "passed"), ("d", "skipped")],
    );
    let run = |spark: &PathBuf| {
        let o = Command::new("python3")
            .arg(script("compare.py"))
            .arg(&stock)
            .arg(spark)
            .output()
            .unwrap();
        (
            o.status.code(),
            String::from_utf8_lossy(&o.stdout).into_owned(),
        )
    };
    let (code, out) = run(&same);
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains("against stock llama-server: 2 passed, 1 failed, 0 errors, 1 skipped"),
        "{out}"
    );
    // c passes against stock and is missing through spark; b only passes through spark.
    let (code, out) = run(&worse);
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.contains("REGRESSION: unit.t::c passes against stock, missing through spark"),
        "{out}"
    );
    assert!(!out.contains("REGRESSION: unit.t::b"), "{out}");
}
