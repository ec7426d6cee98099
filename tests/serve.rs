//! `spark serve` end to end against the pinned stock llama-server: pass-through equality,
//! restarts, signals, concurrency, and that nothing is left behind.

use std::io::{BufRead, BufReader, Read};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use spark::supervisor::{LlamaServer, LlamaServerConfig};

use crate::util::{self, wait_gone, Served};

fn post(url: &str, body: &Value) -> Result<Value, String> {
    match ureq::post(url)
        .timeout(Duration::from_secs(60))
        .send_json(body)
    {
        Ok(r) => r.into_json().map_err(|e| e.to_string()),
        Err(ureq::Error::Status(code, r)) => Err(format!(
            "{url}: status {code}: {}",
            r.into_string().unwrap_or_default()
        )),
        Err(e) => Err(e.to_string()),
    }
}

/// The generated text of a streamed chat completion, from its SSE lines.
fn stream_chat(url: &str, body: &Value) -> Result<String, String> {
    let resp = ureq::post(url)
        .timeout(Duration::from_secs(60))
        .send_json(body)
        .map_err(|e| e.to_string())?;
    let mut text = String::new();
    let mut done = false;
    for line in BufReader::new(resp.into_reader()).lines() {
        let line = line.map_err(|e| e.to_string())?;
        let Some(data) = line.strip_prefix("data: ") else {
            continue;
        };
        if data == "[DONE]" {
            // Keep reading to the end of the body, as a well-behaved client does.
            done = true;
            continue;
        }
        let v: Value = serde_json::from_str(data).map_err(|e| format!("{e}: {data}"))?;
        if let Some(c) = v
            .pointer("/choices/0/delta/content")
            .and_then(Value::as_str)
        {
            text.push_str(c);
        }
    }
    if done {
        Ok(text)
    } else {
        Err("stream ended without [DONE]".into())
    }
}

#[test]
fn proxy_answers_equal_llama_server_answers() {
    let dir = util::tempdir();
    let model = util::fixture(dir.path(), "m.gguf", &["--router", "skewed"]);
    let prompts = ["The expert cache", "Once upon a time", "fn main() {"];
    let chat = |p: &str, stream: bool| json!({"messages": [{"role": "user", "content": p}], "max_tokens": 12, "temperature": 0.0, "stream": stream});
    let completion = |p: &str| json!({"prompt": p, "n_predict": 12, "temperature": 0.0});

    let direct = LlamaServer::start(&LlamaServerConfig {
        binary: util::llama_server(),
        model: model.clone(),
        port: None,
        extra_args: ["-c", "2048", "-t", "2", "-np", "4"]
            .iter()
            .map(|s| s.to_string())
            .collect(),
        env: vec![],
        ready_timeout: Duration::from_secs(60),
        log_path: dir.path().join("direct.log"),
    })
    .unwrap();
    let mut expected = Vec::new();
    for p in prompts {
        let c = post(&direct.url("/completion"), &completion(p)).unwrap();
        let n = post(&direct.url("/v1/chat/completions"), &chat(p, false)).unwrap();
        let s = stream_chat(&direct.url("/v1/chat/completions"), &chat(p, true)).unwrap();
        expected.push((
            c["content"].clone(),
            n["choices"][0]["message"]["content"].clone(),
            s,
        ));
    }
    direct.stop();

    let served = Served::start(&model, &["--quiet"]);
    for (p, (c, n, s)) in prompts.iter().zip(&expected) {
        let got = post(&served.url("/completion"), &completion(p))
            .unwrap_or_else(|e| panic!("{e}; status {}", served.status()));
        assert_eq!(&got["content"], c, "/completion {p:?}");
        let got = post(&served.url("/v1/chat/completions"), &chat(p, false)).unwrap();
        assert_eq!(&got["choices"][0]["message"]["content"], n, "chat {p:?}");
        let got = stream_chat(&served.url("/v1/chat/completions"), &chat(p, true)).unwrap();
        assert_eq!(&got, s, "streamed chat {p:?}");
        assert!(!s.is_empty());
    }
    // Other routes pass through too.
    let mut refused = 0;
    for route in ["/health", "/v1/models", "/props", "/slots", "/metrics"] {
        // /slots and /metrics answer 501 unless llama-server was started with them enabled:
        // the proxy passes that through too.
        match ureq::get(&served.url(route))
            .timeout(Duration::from_secs(5))
            .call()
        {
            Ok(_) => {}
            Err(ureq::Error::Status(501, _)) => refused += 1,
            Err(e) => panic!("{route}: {e}"),
        }
    }
    let tok = post(&served.url("/tokenize"), &json!({"content": "hello world"})).unwrap();
    assert!(!tok["tokens"].as_array().unwrap().is_empty());
    let st = served.status();
    assert_eq!(st["requests"]["errors"], 0, "{st}");
    assert_eq!(st["requests"]["probes"]["errors"], refused, "{st}");
    assert_eq!(st["requests"]["aborted"], 0, "{st}");
    assert!(
        st["requests"]["generated_tokens"].as_u64().unwrap() >= 12 * 6,
        "{st}"
    );
    assert_eq!(
        st["completed_requests"], 9,
        "generating requests only: {st}"
    );
    assert!(st["requests"]["first_byte_ms"]["p50"].as_f64().unwrap() > 0.0);
    let metrics = ureq::get(&served.url("/spark/metrics"))
        .call()
        .unwrap()
        .into_string()
        .unwrap();
    util::parse_metrics(&metrics);
    assert!(metrics.contains("spark_requests_total 9\n"), "{metrics}");
    assert!(metrics.contains("spark_child_up 1"), "{metrics}");
}

#[test]
fn sixteen_concurrent_streaming_clients_see_no_errors() {
    let dir = util::tempdir();
    let model = util::fixture(dir.path(), "m.gguf", &[]);
    let served = Served::start(&model, &["--quiet"]);
    let url = served.url("/v1/chat/completions");
    let handles: Vec<_> = (0..16)
        .map(|i| {
            let url = url.clone();
            std::thread::spawn(move || {
                let body = json!({"messages": [{"role": "user", "content": format!("client {i} says hello")}], "max_tokens": 16, "temperature": 0.0, "stream": true});
                stream_chat(&url, &body)
            })
        })
        .collect();
    let results: Vec<Result<String, String>> =
        handles.into_iter().map(|h| h.join().unwrap()).collect();
    let errors: Vec<&String> = results.iter().filter_map(|r| r.as_ref().err()).collect();
    assert!(errors.is_empty(), "errors: {errors:?}");
    let st = served.status();
    assert_eq!(st["requests"]["errors"], 0);
    assert_eq!(st["requests"]["aborted"], 0, "{st}");
}

#[test]
fn a_dead_llama_server_is_restarted_and_the_client_gets_an_error() {
    let dir = util::tempdir();
    let model = util::fixture(dir.path(), "m.gguf", &[]);
    let served = Served::start(&model, &["--quiet"]);
    let first = served.child_pid();
    // A long streamed request, killed mid-way.
    let url = served.url("/completion");
    let req = std::thread::spawn(move || {
        let resp = ureq::post(&url).timeout(Duration::from_secs(60)).send_json(
            json!({"prompt": "count", "n_predict": 100000, "stream": true, "ignore_eos": true}),
        );
        match resp {
            Ok(r) => {
                let mut body = String::new();
                match r.into_reader().read_to_string(&mut body) {
                    Ok(_) if body.contains("\"stop\":true") => Ok(()),
                    Ok(_) => Err("stream cut short".to_string()),
                    Err(e) => Err(e.to_string()),
                }
            }
            Err(e) => Err(e.to_string()),
        }
    });
    std::thread::sleep(Duration::from_millis(500));
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(first as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let outcome = req.join().unwrap();
    assert!(
        outcome.is_err(),
        "the client must see the failure, not a clean end"
    );

    let deadline = Instant::now() + Duration::from_secs(30);
    let st = loop {
        let st = served.status();
        if st["child"]["ready"] == true && st["child"]["pid"].as_u64() != Some(first as u64) {
            break st;
        }
        assert!(Instant::now() < deadline, "not restarted: {st}");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(st["child"]["restarts"], 1);
    assert!(
        st["child"]["last_exit"]
            .as_str()
            .unwrap()
            .contains("signal"),
        "{st}"
    );
    let got = post(
        &served.url("/completion"),
        &json!({"prompt": "again", "n_predict": 4}),
    )
    .unwrap();
    assert_eq!(got["tokens_predicted"], 4);
}

#[test]
fn sigterm_stops_cleanly_and_sigkill_leaves_no_llama_server() {
    let dir = util::tempdir();
    let model = util::fixture(dir.path(), "m.gguf", &[]);

    let mut served = Served::start(&model, &["--quiet"]);
    let child = served.child_pid();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(served.child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(s) = served.child.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "spark did not exit on SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "{status}");
    assert!(
        wait_gone(child, Duration::from_secs(5)),
        "llama-server {child} outlived spark"
    );
    let said: Vec<String> = served.stderr.try_iter().collect();
    assert!(said.iter().any(|l| l.contains("SIGTERM")), "{said:?}");

    let mut served = Served::start(&model, &["--quiet"]);
    let child = served.child_pid();
    served.child.kill().unwrap();
    served.child.wait().unwrap();
    assert!(
        wait_gone(child, Duration::from_secs(5)),
        "llama-server {child} outlived a SIGKILLed spark"
    );
}

#[test]
fn a_server_that_never_gets_ready_times_out_with_124() {
    let dir = util::tempdir();
    let model = util::fixture(dir.path(), "m.gguf", &[]);
    let pidfile = dir.path().join("stuck.pid");
    let fake = util::write_script(
        dir.path(),
        "stuck-server",
        &format!(
            "#!/bin/sh\necho $$ > {}\nexec sleep 600\n",
            pidfile.display()
        ),
    );
    // Hangs past util::HANG_LIMIT (the default ready timeout is longer) if the flag is ignored.
    let (o, took) = util::output_within(
        Command::new(util::spark_bin()).args([
            "serve",
            "-m",
            model.to_str().unwrap(),
            "--port",
            "0",
            "--ready-timeout",
            "2",
            "--llama-server",
            fake.to_str().unwrap(),
        ]),
        util::HANG_LIMIT,
    );
    let err = String::from_utf8_lossy(&o.stderr);
    eprintln!("serve gave up after {took:?}");
    assert_eq!(o.status.code(), Some(124), "{err}");
    assert!(err.contains("not ready after 2 s"), "{err}");
    let pid: u32 = std::fs::read_to_string(&pidfile)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(
        wait_gone(pid, Duration::from_secs(5)),
        "the stuck server {pid} was left running"
    );
}

#[test]
fn serve_rejects_a_bad_model_with_exit_2() {
    let dir = util::tempdir();
    let bad = dir.path().join("bad.gguf");
    std::fs::write(&bad, b"not a model").unwrap();
    let o = util::spark(&["serve", "-m", bad.to_str().unwrap(), "--port", "0"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("not a GGUF file"));
}

fn ring_files_of(pid: u32) -> Vec<String> {
    std::fs::read_dir("/dev/shm")
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(&format!("spark-ring-{pid}-")))
        .collect()
}

#[test]
fn spark_mode_writes_a_profile_whose_counts_are_what_the_ring_delivered() {
    let dir = util::tempdir();
    let model = util::fixture(dir.path(), "m.gguf", &["--router", "skewed"]);
    let served = Served::start(&model, &["--quiet", "--spark"]);
    let profile_path = spark::profile::path_for(&model);
    assert!(
        !profile_path.exists(),
        "nothing is written before a request"
    );
    post(&served.url("/completion"), &json!({"prompt": "The expert cache keeps hot experts", "n_predict": 16, "temperature": 0.0})).unwrap();
    // The rewrite follows the end of the answer; give the live thread its moment.
    let deadline = Instant::now() + Duration::from_secs(10);
    let st = loop {
        let st = served.status();
        if st["profile"]["writes"].as_u64().unwrap_or(0) >= 1 {
            break st;
        }
        assert!(Instant::now() < deadline, "profile never written: {st}");
        std::thread::sleep(Duration::from_millis(50));
    };
    let p = spark::profile::Profile::read(&profile_path).unwrap();
    let file = spark::gguf::GgufFile::open(&model).unwrap();
    let geo = spark::gguf::MoeGeometry::of(&file).unwrap();
    assert_eq!(
        p.fingerprint.as_deref(),
        Some(geo.fingerprint.to_string().as_str())
    );
    assert_eq!((p.n_layer(), p.n_expert()), (4, 8));
    let routing = &st["routing"];
    let records = routing["ring"]["read"].as_u64().unwrap();
    assert!(records > 0);
    assert_eq!(routing["ring"]["dropped"], 0);
    // Every record carries k = 2 experts; the profile holds every one of them.
    assert_eq!(p.counts.total(), 2 * records, "{st}");
    assert_eq!(
        p.counts.total(),
        routing["prompt"]["expert_uses"].as_u64().unwrap()
            + routing["decode"]["expert_uses"].as_u64().unwrap()
    );
    // 16 generated tokens: the first comes from the prompt batch, 15 decode steps per layer.
    assert_eq!(routing["decode"]["tokens"], 15, "{st}");
    assert!(routing["shadow_cache"]["hit_ratio"].as_f64().unwrap() > 0.0);
    let bel = routing["shadow_cache"]["window"]["belady_hit_ratio"]
        .as_f64()
        .unwrap();
    assert!(
        bel >= routing["shadow_cache"]["window"]["hit_ratio"]
            .as_f64()
            .unwrap(),
        "belady is a bound: {st}"
    );

    // A second request adds to the same table.
    post(
        &served.url("/completion"),
        &json!({"prompt": "again", "n_predict": 8, "temperature": 0.0}),
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while served.status()["profile"]["writes"].as_u64().unwrap() < 2 {
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(50));
    }
    let st = served.status();
    let p2 = spark::profile::Profile::read(&profile_path).unwrap();
    assert_eq!(
        p2.counts.total(),
        2 * st["routing"]["ring"]["read"].as_u64().unwrap()
    );
    assert!(p2.counts.total() > p.counts.total());
}

#[test]
fn a_profile_of_another_model_is_set_aside_as_stale() {
    let dir = util::tempdir();
    let model = util::fixture(dir.path(), "m.gguf", &[]);
    let other = util::fixture(dir.path(), "other.gguf", &["--seed", "9"]);
    // A profile written for `other`, placed where `model`'s profile goes.
    let served = Served::start(&other, &["--quiet", "--spark"]);
    post(
        &served.url("/completion"),
        &json!({"prompt": "hello", "n_predict": 4}),
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while served.status()["profile"]["writes"].as_u64().unwrap() < 1 {
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(50));
    }
    drop(served);
    let theirs = std::fs::read_to_string(spark::profile::path_for(&other)).unwrap();
    std::fs::write(spark::profile::path_for(&model), &theirs).unwrap();

    let served = Served::start(&model, &["--spark"]);
    let st = served.status();
    assert_eq!(st["profile"]["at_start"], "stale", "{st}");
    let mut stale = spark::profile::path_for(&model).into_os_string();
    stale.push(".stale");
    assert_eq!(
        std::fs::read_to_string(&stale).unwrap(),
        theirs,
        "the old file is kept as .stale"
    );
    assert!(
        !spark::profile::path_for(&model).exists(),
        "nothing loaded silently"
    );
    assert!(
        served
            .early
            .iter()
            .any(|l| l.contains("belongs to another model")),
        "{:?}",
        served.early
    );
}

#[test]
fn sigkill_during_profile_rewrites_never_leaves_a_broken_profile_or_a_stale_ring() {
    let dir = util::tempdir();
    let model = util::fixture(dir.path(), "m.gguf", &[]);
    let profile = spark::profile::path_for(&model);
    for round in 0..4u64 {
        let existed = profile.exists();
        let mut served = Served::start(&model, &["--quiet", "--spark"]);
        let spark_pid = served.child.id();
        let llama = served.child_pid();
        assert!(
            ring_files_of(spark_pid).is_empty(),
            "the ring's name is unlinked once the tap has mapped it"
        );
        let st = served.status();
        let expect = if existed { "fresh" } else { "new" };
        assert_eq!(
            st["profile"]["at_start"], expect,
            "the profile a killed run left is whole: {st}"
        );
        // Requests in a loop so rewrites are under way when the kill lands.
        let url = served.url("/completion");
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let s2 = stop.clone();
        let load = std::thread::spawn(move || {
            while !s2.load(std::sync::atomic::Ordering::Relaxed) {
                let _ = post(&url, &json!({"prompt": "load", "n_predict": 2}));
            }
        });
        // Wait for the first rewrite of this run, then kill a little later, at a different
        // moment each round, while further rewrites are under way.
        let deadline = Instant::now() + Duration::from_secs(30);
        while served.status()["profile"]["writes"].as_u64().unwrap_or(0) < 1 {
            assert!(Instant::now() < deadline, "no profile rewrite within 30 s");
            std::thread::sleep(Duration::from_millis(20));
        }
        std::thread::sleep(Duration::from_millis(37 * round));
        served.child.kill().unwrap();
        served.child.wait().unwrap();
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        load.join().unwrap();
        assert!(
            wait_gone(llama, Duration::from_secs(5)),
            "llama-server outlived a SIGKILLed spark"
        );
        if profile.exists() {
            spark::profile::Profile::read(&profile).expect("the profile is whole after SIGKILL");
        }
        assert!(
            ring_files_of(spark_pid).is_empty(),
            "nothing left in /dev/shm after SIGKILL"
        );
    }
    assert!(profile.exists());
    // A ring file of a dead process (from a spark killed between creating the ring and the
    // tap's greeting) is swept by the next start.
    let mut gone = Command::new("true").spawn().unwrap();
    let dead = gone.id();
    gone.wait().unwrap();
    let stale = std::path::PathBuf::from(format!("/dev/shm/spark-ring-{dead}-0-00000000"));
    std::fs::write(&stale, b"").unwrap();
    let next = Served::start(&model, &["--quiet", "--spark"]);
    assert!(
        !stale.exists(),
        "stale ring of dead pid {dead} left after the next start"
    );
    drop(next);
}

#[test]
fn placement_flags_are_passed_and_an_impossible_budget_is_refused_with_3() {
    let dir = util::tempdir();
    let model = util::fixture(dir.path(), "m.gguf", &[]);
    let o = util::spark(&[
        "serve",
        "-m",
        model.to_str().unwrap(),
        "--port",
        "0",
        "--vram-budget",
        "1",
        "--llama-server",
        util::llama_server().to_str().unwrap(),
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(3), "{err}");
    assert!(
        err.contains("VRAM budget of 1 MiB") && err.contains("what would help"),
        "{err}"
    );

    // CPU only: spark passes -ngl 0 and its context; the user's -c (after --) wins and is named.
    let served = Served::start(&model, &["--quiet", "--no-tap"]);
    let st = served.status();
    assert_eq!(st["placement"]["placement"]["kind"], "cpu_only", "{st}");
    assert_eq!(st["placement"]["flags"], json!(["-ngl", "0"]));
    assert_eq!(st["placement"]["user_overrides"], json!(["-c 2048"]));
    assert!(
        st["routing"].is_null(),
        "--no-tap serves without routing statistics"
    );
    assert!(
        served
            .early
            .iter()
            .any(|l| l.contains("your arguments replace: -c 2048")),
        "{:?}",
        served.early
    );
}

/// The events of a streamed answer: the JSON of every `data:` line but `[DONE]`.
fn sse_events(url: &str, body: &Value) -> Vec<Value> {
    let resp = ureq::post(url)
        .timeout(Duration::from_secs(60))
        .send_json(body)
        .unwrap_or_else(|e| panic!("{url}: {e}"));
    let mut text = String::new();
    resp.into_reader().read_to_string(&mut text).unwrap();
    text.lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter(|d| *d != "[DONE]")
        .map(|d| serde_json::from_str(d).unwrap_or_else(|e| panic!("{url}: {e}: {d}")))
        .collect()
}

/// Tokens generated, as the answer itself says: the last event (or the answer) that carries
/// `timings.predicted_n`, `tokens_predicted`, or a `usage` with `completion_tokens` or
/// `output_tokens`, in any of llama-server's formats.
fn own_count(events: &[Value]) -> Option<u64> {
    events.iter().rev().find_map(|e| {
        let usage = e
            .get("usage")
            .or_else(|| e.pointer("/response/usage"))
            .filter(|u| !u.is_null());
        e.pointer("/timings/predicted_n")
            .and_then(Value::as_u64)
            .or_else(|| e["tokens_predicted"].as_u64())
            .or_else(|| usage.and_then(|u| u["completion_tokens"].as_u64()))
            .or_else(|| usage.and_then(|u| u["output_tokens"].as_u64()))
    })
}

#[test]
fn every_generating_route_adds_its_tokens() {
    let dir = util::tempdir();
    let model = util::fixture(dir.path(), "m.gguf", &["--router", "skewed"]);
    let served = Served::start(&model, &["--quiet"]);
    let p = "The expert cache keeps";
    let msgs = json!([{"role": "user", "content": p}]);
    // Every generating route of the pinned llama-server, plain and streamed.
    let cases = [
        ("/completion", json!({"prompt": p, "n_predict": 8})),
        ("/v1/completions", json!({"prompt": p, "max_tokens": 8})),
        (
            "/v1/chat/completions",
            json!({"messages": msgs, "max_tokens": 8}),
        ),
        ("/v1/responses", json!({"input": p, "max_output_tokens": 8})),
        (
            "/v1/messages",
            json!({"model": "m", "messages": msgs, "max_tokens": 8}),
        ),
    ];
    let mut routes_seen = 0;
    let mut untimed = Vec::new();
    for (route, body) in &cases {
        for stream in [false, true] {
            let mut body = body.clone();
            body["stream"] = json!(stream);
            body["temperature"] = json!(0.0);
            let before = served.status()["requests"].clone();
            let events = if stream {
                sse_events(&served.url(route), &body)
            } else {
                vec![post(&served.url(route), &body).unwrap_or_else(|e| panic!("{e}"))]
            };
            let own = own_count(&events)
                .unwrap_or_else(|| panic!("{route} (stream {stream}) says no count: {events:?}"));
            let after = served.status()["requests"].clone();
            let delta = |k: &str| after[k].as_u64().unwrap() - before[k].as_u64().unwrap();
            assert!(own > 0, "{route}: {events:?}");
            assert_eq!(delta("count"), 1, "{route} (stream {stream})");
            assert_eq!(
                delta("generated_tokens"),
                own,
                "{route} (stream {stream}) answered {own} tokens: {after}"
            );
            assert!(
                delta("prompt_tokens") > 0,
                "{route} (stream {stream}): {after}"
            );
            // A decode-speed sample: llama-server's timings, or measured over the stream when
            // it carries none; a plain answer without timings gives none.
            let timed = events.iter().any(|e| e.get("timings").is_some());
            if !timed {
                untimed.push(format!("{route} stream {stream}"));
            }
            let samples = |r: &Value| r["decode_tokens_per_s"]["count"].as_u64().unwrap_or(0);
            let expect = u64::from(timed || (stream && own >= 2));
            assert_eq!(
                samples(&after) - samples(&before),
                expect,
                "{route} (stream {stream}): {after}"
            );
            routes_seen += 1;
        }
    }
    assert_eq!(routes_seen, 10);
    // What the pinned llama-server writes: no `timings` on these answers, so spark counts their
    // tokens from `usage` (and times the stream itself).
    assert_eq!(
        untimed,
        [
            "/v1/responses stream false",
            "/v1/messages stream false",
            "/v1/messages stream true"
        ]
    );
    let st = served.status();
    assert_eq!(st["requests"]["errors"], 0, "{st}");
    assert_eq!(st["requests"]["in_flight"], 0, "{st}");
    let tps = st["requests"]["decode_tokens_per_s"]["p50"]
        .as_f64()
        .unwrap();
    assert!(tps > 0.0, "{st}");
    let m = util::parse_metrics(
        &ureq::get(&served.url("/spark/metrics"))
            .call()
            .unwrap()
            .into_string()
            .unwrap(),
    );
    assert_eq!(
        util::metric(&m, "spark_generated_tokens_total"),
        st["requests"]["generated_tokens"].as_f64()
    );
    assert_eq!(util::metric(&m, "spark_requests_total"), Some(10.0));
}

#[test]
fn probes_are_not_requests_and_rewrite_no_profile() {
    let dir = util::tempdir();
    let model = util::fixture(dir.path(), "m.gguf", &["--router", "skewed"]);
    let served = Served::start(&model, &["--quiet", "--spark"]);
    let writes = || served.status()["profile"]["writes"].as_u64().unwrap();
    let complete = |prompt: &str| {
        post(
            &served.url("/completion"),
            &json!({"prompt": prompt, "n_predict": 8, "temperature": 0.0}),
        )
        .unwrap()
    };
    let wait_writes = |n: u64| {
        let deadline = Instant::now() + Duration::from_secs(10);
        while writes() < n {
            assert!(Instant::now() < deadline, "profile write {n} never came");
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    complete("The expert cache keeps hot experts");
    wait_writes(1);
    let before = served.status()["requests"].clone();
    let mut refused = 0;
    for route in ["/health", "/slots", "/health", "/v1/models", "/health"] {
        match ureq::get(&served.url(route)).call() {
            Ok(_) => {}
            Err(ureq::Error::Status(501, _)) => refused += 1,
            Err(e) => panic!("{route}: {e}"),
        }
    }
    // Not a probe, not a request either: it routes nothing, so it rewrites nothing.
    post(&served.url("/tokenize"), &json!({"content": "hello"})).unwrap();
    let after = served.status()["requests"].clone();
    for k in ["count", "errors", "first_byte_ms", "total_ms"] {
        assert_eq!(after[k], before[k], "{k} moved by probes: {after}");
    }
    assert_eq!(after["probes"], json!({"count": 5, "errors": refused}));
    assert_eq!(after["other"], json!({"count": 1, "errors": 0}));
    // The live thread handles messages in order: once the next request's rewrite is done,
    // any rewrite the probes or the tokenize call had asked for would have been counted.
    complete("again");
    wait_writes(2);
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(writes(), 2, "{}", served.status());

    let text = ureq::get(&served.url("/spark/metrics"))
        .call()
        .unwrap()
        .into_string()
        .unwrap();
    let m = util::parse_metrics(&text);
    assert_eq!(util::metric(&m, "spark_probes_total"), Some(5.0));
    assert_eq!(util::metric(&m, "spark_requests_total"), Some(2.0));
    assert_eq!(util::metric(&m, "spark_requests_in_flight"), Some(0.0));
    assert_eq!(util::metric(&m, "spark_profile_writes_total"), Some(2.0));
    let info = m
        .samples
        .iter()
        .find(|s| s.metric == "spark_build_info")
        .unwrap_or_else(|| panic!("{text}"));
    assert_eq!(info.labels.get("version"), Some(env!("CARGO_PKG_VERSION")));
    assert_eq!(info.labels.get("hook_abi"), Some("none"), "a stock build");
    assert!(info
        .labels
        .get("engine_variant")
        .unwrap()
        .starts_with("cpu-"));
    let st = served.status();
    let window = &st["routing"]["shadow_cache"]["window"];
    let belady = util::metric(&m, "spark_shadow_cache_belady_hit_ratio").unwrap();
    // Within float parsing (serde_json's is not exact to the last bit).
    let said = window["belady_hit_ratio"].as_f64().unwrap();
    assert!((belady - said).abs() < 1e-12, "{belady} vs {st}");
    assert!(belady >= util::metric(&m, "spark_shadow_cache_window_hit_ratio").unwrap());
}
