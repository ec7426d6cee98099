//! `spark serve` tried as a hostile or unlucky client would: connection floods, a full
//! descriptor table, a hung llama-server, broken or oversized request bodies, clients that leave
//! early, a shutdown under load, and spark's own routes behind llama-server's API key.
//!
//! Why this file is over 800 lines: one scenario per test, each with its own hostile client;
//! they share the served-child and raw-socket helpers.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::util::{self, wait_gone, Served};

/// llama-server's arguments in most tests here (those of [`Served::start`]).
const LLAMA: &[&str] = &["-c", "2048", "-t", "2", "-np", "4"];
/// One slot with a long context: a generation that runs until it is full takes many seconds
/// (with 512 tokens per slot it would end within a second on a fast machine).
const LONG: &[&str] = &["-c", "16384", "-t", "2", "-np", "1"];

/// An HTTP answer read off a raw socket.
#[derive(Debug)]
struct Answer {
    status: u16,
    head: String,
    body: String,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.head.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case(name).then(|| v.trim())
        })
    }
}

/// Reads one answer (head, then a body of `content-length` bytes, or up to the close) from `s`,
/// giving up after `within`.
fn read_answer(s: &mut TcpStream, within: Duration) -> Result<Answer, String> {
    s.set_read_timeout(Some(within)).unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 8192];
    let split = loop {
        if let Some(i) = got.windows(4).position(|w| w == b"\r\n\r\n") {
            break i;
        }
        match s.read(&mut buf) {
            Ok(0) => return Err(format!("closed before an answer: {got:?}")),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) => return Err(format!("no answer: {e}; got {got:?}")),
        }
    };
    let head = String::from_utf8_lossy(&got[..split]).into_owned();
    let mut body = got[split + 4..].to_vec();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("not an HTTP answer: {head}"))?;
    let mut answer = Answer {
        status,
        head,
        body: String::new(),
    };
    let len: Option<usize> = answer.header("content-length").and_then(|v| v.parse().ok());
    while len.map_or(true, |l| body.len() < l) {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => body.extend_from_slice(&buf[..n]),
            Err(_) if len.is_none() => break,
            Err(e) => return Err(format!("body cut short: {e}")),
        }
    }
    answer.body = String::from_utf8_lossy(&body).into_owned();
    Ok(answer)
}

/// Sends `request` on a new connection and reads the answer.
fn exchange(port: u16, request: &[u8]) -> Answer {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.write_all(request).unwrap();
    read_answer(&mut s, Duration::from_secs(30)).unwrap()
}

/// `/spark/status`, retried until it answers (a spark short of descriptors may not at first).
fn status_within(port: u16, within: Duration) -> Value {
    let deadline = Instant::now() + within;
    loop {
        match ureq::get(&format!("http://127.0.0.1:{port}/spark/status"))
            .timeout(Duration::from_secs(2))
            .call()
        {
            Ok(r) => return r.into_json().unwrap(),
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                std::thread::sleep(Duration::from_millis(200));
            }
            Err(e) => panic!("/spark/status did not answer within {within:?}: {e}"),
        }
    }
}

/// Polls `/spark/status` until `done` holds; panics with the last status after `within`.
fn wait_status(
    served: &Served,
    within: Duration,
    what: &str,
    done: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = Instant::now() + within;
    loop {
        let st = served.status();
        if done(&st) {
            return st;
        }
        assert!(Instant::now() < deadline, "{what} within {within:?}: {st}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn connections_over_the_cap_get_503_and_half_sent_headers_are_cut_off() {
    let dir = util::tempdir();
    let model = util::fixture(dir.path(), "m.gguf", &[]);
    let served = Served::start(
        &model,
        &[
            "--quiet",
            "--no-tap",
            "--max-connections",
            "4",
            "--header-timeout",
            "2",
        ],
    );
    // Four clients that stop in the middle of their headers hold every slot.
    let mut idle: Vec<TcpStream> = (0..4)
        .map(|_| {
            let mut s = TcpStream::connect(("127.0.0.1", served.port)).unwrap();
            s.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n").unwrap();
            s
        })
        .collect();
    // Spark accepts in arrival order: the next client is over the cap.
    let a = exchange(served.port, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_eq!(a.status, 503, "{a:?}");
    assert_eq!(a.header("retry-after"), Some("1"), "{a:?}");
    assert!(a.body.contains("--max-connections"), "{a:?}");
    // The header deadline closes the stalled ones (a generous bound: it is 2 s).
    for s in &mut idle {
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let mut buf = [0u8; 512];
        match s.read(&mut buf) {
            Ok(0) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
            Ok(n) => panic!(
                "a stalled connection got an answer: {}",
                String::from_utf8_lossy(&buf[..n])
            ),
            Err(e) => panic!("a stalled connection is still open after 30 s: {e}"),
        }
    }
    // Their slots are free again.
    let st = wait_status(&served, Duration::from_secs(10), "slots freed", |st| {
        st["connections"]["open"] == 1
    });
    assert_eq!(st["connections"]["max"], 4, "{st}");
    assert_eq!(st["connections"]["rejected"], 1, "{st}");
    let a = exchange(served.port, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_eq!(a.status, 200, "{a:?}");
}

/// CPU time (user + system) of `pid` so far, in clock ticks (USER_HZ, 100 a second on Linux).
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .unwrap()
        .1
        .split_whitespace()
        .collect();
    // After the command name: state is field 3 of stat(5), utime 14, stime 15.
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

#[test]
fn a_full_descriptor_table_pauses_accepts_instead_of_spinning() {
    let dir = util::tempdir();
    let model = util::fixture(dir.path(), "m.gguf", &[]);
    let served = Served::start_custom(
        &model,
        &util::llama_server(),
        &[
            "--quiet",
            "--no-tap",
            "--max-connections",
            "1000",
            "--header-timeout",
            "120",
        ],
        LLAMA,
        |cmd| {
            use std::os::unix::process::CommandExt;
            // SAFETY: runs in the forked child before exec; setrlimit is async-signal-safe and
            // nothing is allocated.
            unsafe {
                cmd.pre_exec(|| {
                    let lim = nix::libc::rlimit {
                        rlim_cur: 64,
                        rlim_max: 64,
                    };
                    match nix::libc::setrlimit(nix::libc::RLIMIT_NOFILE, &lim) {
                        0 => Ok(()),
                        _ => Err(std::io::Error::last_os_error()),
                    }
                });
            }
        },
    );
    let pid = served.child.id();
    // More idle clients than spark has descriptors: the rest wait in the backlog, and every
    // accept fails with EMFILE.
    let idle: Vec<TcpStream> = (0..100)
        .map(|_| {
            let mut s = TcpStream::connect(("127.0.0.1", served.port)).unwrap();
            s.write_all(b"GET /health HTTP/1.1\r\n").unwrap();
            s
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let line = served
            .stderr
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .expect("spark reports failed accepts within 20 s");
        if line.contains("accept failed") {
            assert!(line.contains("Too many open files"), "{line}");
            break;
        }
    }
    // Three seconds of a full table.
    let _: Vec<String> = served.stderr.try_iter().collect();
    let (ticks0, t0) = (cpu_ticks(pid), Instant::now());
    std::thread::sleep(Duration::from_secs(3));
    let (ticks1, wall) = (cpu_ticks(pid), t0.elapsed());
    let lines: Vec<String> = served.stderr.try_iter().collect();
    let failures = lines.iter().filter(|l| l.contains("accept failed")).count();
    assert!(
        !lines.iter().any(|l| l.contains("health probes")),
        "a probe spark could not send is no failure of llama-server: {lines:?}"
    );
    let cpu = Duration::from_millis((ticks1 - ticks0) * 10);
    eprintln!("over {wall:?}: {failures} log lines, {cpu:?} of CPU");
    assert!(
        failures <= 2 * wall.as_secs() as usize + 2,
        "one line a second at most, got {failures}: {:?}",
        &lines[..lines.len().min(5)]
    );
    assert!(
        cpu < wall / 2,
        "spark spins on failed accepts: {cpu:?} of CPU in {wall:?}"
    );
    // Once the clients go, spark serves again.
    drop(idle);
    let st = status_within(served.port, Duration::from_secs(30));
    assert!(
        st["connections"]["accept_errors"].as_u64().unwrap() >= 1,
        "{st}"
    );
}

#[test]
fn a_hung_llama_server_is_reported_answered_503_and_replaced() {
    let dir = util::tempdir();
    let model = util::fixture(dir.path(), "m.gguf", &[]);
    let served = Served::start(&model, &["--quiet", "--no-tap", "--hang-timeout", "6"]);
    let first = served.child_pid();
    let before = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(first as i32),
        nix::sys::signal::Signal::SIGSTOP,
    )
    .unwrap();
    let st = wait_status(
        &served,
        Duration::from_secs(30),
        "reported unresponsive",
        |st| st["child"]["state"] == "unresponsive",
    );
    assert_eq!(st["child"]["ready"], false, "{st}");
    assert_eq!(st["child"]["pid"], first, "{st}");
    let since = st["child"]["unresponsive_since_unix_s"].as_f64().unwrap();
    assert!(since >= before - 1.0, "{st}");
    assert!(st["child"]["failed_probes"].as_u64().unwrap() >= 1, "{st}");
    // Not ready: an answer at once, with the time to come back.
    let a = exchange(
        served.port,
        b"POST /completion HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}",
    );
    assert_eq!(a.status, 503, "{a:?}");
    assert_eq!(a.header("retry-after"), Some("1"), "{a:?}");

    let st = wait_status(&served, Duration::from_secs(60), "replaced", |st| {
        st["child"]["ready"] == true && st["child"]["pid"] != first
    });
    assert_eq!(st["child"]["state"], "ready", "{st}");
    assert_eq!(st["child"]["restarts"], 1, "{st}");
    assert!(st["child"]["unresponsive_since_unix_s"].is_null(), "{st}");
    let why = st["child"]["last_exit"].as_str().unwrap();
    assert!(
        why.contains("health probe") && why.contains("killed"),
        "{st}"
    );
    assert!(
        wait_gone(first, Duration::from_secs(5)),
        "the hung llama-server {first} was left"
    );
    let got: Value = ureq::post(&served.url("/completion"))
        .timeout(Duration::from_secs(60))
        .send_json(json!({"prompt": "again", "n_predict": 4}))
        .unwrap()
        .into_json()
        .unwrap();
    assert_eq!(got["tokens_predicted"], 4);
}

#[test]
fn bad_or_oversized_request_bodies_get_400_and_413_not_502() {
    let dir = util::tempdir();
    let model = util::fixture(dir.path(), "m.gguf", &[]);
    let served = Served::start(&model, &["--quiet", "--no-tap", "--max-body", "1"]);
    // Chunked encoding with a chunk size that is not hex.
    let a = exchange(
        served.port,
        b"POST /completion HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n{}\r\n0\r\n\r\n",
    );
    assert_eq!(a.status, 400, "{a:?}");
    assert!(a.body.contains("invalid request body"), "{a:?}");

    // A declared length over 1 MiB is refused before any of it is read.
    let a = exchange(
        served.port,
        format!(
            "POST /completion HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            2 << 20
        )
        .as_bytes(),
    );
    assert_eq!(a.status, 413, "{a:?}");

    // A chunked body is counted as it streams: 2 MiB of JSON whitespace before the object.
    let mut s = TcpStream::connect(("127.0.0.1", served.port)).unwrap();
    let mut reader = s.try_clone().unwrap();
    let writer = std::thread::spawn(move || {
        let head = b"POST /completion HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n";
        let chunk = [b' '; 64 << 10];
        let mut req = head.to_vec();
        for _ in 0..32 {
            req.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
            req.extend_from_slice(&chunk);
            req.extend_from_slice(b"\r\n");
        }
        req.extend_from_slice(b"2\r\n{}\r\n0\r\n\r\n");
        // spark may close the connection before it has read it all.
        let _ = s.write_all(&req);
    });
    let a = read_answer(&mut reader, Duration::from_secs(30)).unwrap();
    writer.join().unwrap();
    assert_eq!(a.status, 413, "{a:?}");

    // Under the limit, bodies pass as before.
    let ok = exchange(
        served.port,
        b"POST /completion HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 35\r\n\r\n{\"prompt\": \"hello\", \"n_predict\": 2}",
    );
    assert_eq!(ok.status, 200, "{ok:?}");
    let st = served.status();
    assert_eq!(st["requests"]["count"], 4, "{st}");
    assert_eq!(st["requests"]["errors"], 3, "{st}");
}

#[test]
fn a_client_that_leaves_before_the_answer_starts_is_counted() {
    let dir = util::tempdir();
    let model = util::fixture(dir.path(), "m.gguf", &[]);
    // One slot with a long context: the completion below runs for seconds.
    let served = Served::start_custom(
        &model,
        &util::llama_server(),
        &["--quiet", "--no-tap"],
        LONG,
        |_| {},
    );
    // A non-streamed completion long enough that its client is gone before the answer.
    let body = json!({"prompt": "count", "n_predict": 100000, "ignore_eos": true}).to_string();
    let mut s = TcpStream::connect(("127.0.0.1", served.port)).unwrap();
    s.write_all(
        format!(
            "POST /completion HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .as_bytes(),
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    drop(s);
    let st = wait_status(
        &served,
        Duration::from_secs(10),
        "the request counted",
        |st| st["requests"]["count"] == 1,
    );
    assert_eq!(st["requests"]["aborted"], 1, "{st}");
    assert_eq!(st["completed_requests"], 0, "{st}");
}

#[test]
fn shutdown_takes_the_grace_period_not_twice_it() {
    let dir = util::tempdir();
    let model = util::fixture(dir.path(), "m.gguf", &[]);
    let mut served = Served::start_custom(
        &model,
        &util::llama_server(),
        &["--quiet", "--no-tap", "--grace", "3"],
        LONG,
        |_| {},
    );
    let child = served.child_pid();
    // A stream that outlasts the grace period (it runs until the slot's context is full, for
    // many seconds).
    let url = served.url("/completion");
    let (tx, streaming) = std::sync::mpsc::channel();
    let stream = std::thread::spawn(move || {
        let r = ureq::post(&url).timeout(Duration::from_secs(60)).send_json(
            json!({"prompt": "count", "n_predict": 100000, "stream": true, "ignore_eos": true}),
        );
        if let Ok(r) = r {
            let mut reader = r.into_reader();
            let mut buf = [0u8; 4096];
            while let Ok(n) = reader.read(&mut buf) {
                if n == 0 {
                    break;
                }
                let _ = tx.send(());
            }
        }
    });
    streaming
        .recv_timeout(Duration::from_secs(30))
        .expect("the stream starts within 30 s");
    let t0 = Instant::now();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(served.child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    // The stop has one budget: 3 s of grace, at least 1 s more for llama-server between
    // SIGTERM and SIGKILL (before, llama-server got its own 5 s on top: 8 s in all). The
    // budget itself is checked with paused time in serve's unit tests
    // (the_child_gets_what_the_requests_left_of_the_grace_period); here the time is printed,
    // and only a hang fails.
    let status = loop {
        if let Some(s) = served.child.try_wait().unwrap() {
            break s;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "spark did not exit on SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let took = t0.elapsed();
    eprintln!("--grace 3 under a stream: spark exited after {took:?}");
    assert!(status.success(), "{status}");
    assert!(wait_gone(child, Duration::from_secs(5)));
    stream.join().unwrap();
    let said: Vec<String> = served.stderr.try_iter().collect();
    assert!(
        said.iter().any(|l| l.contains("did not finish within 3 s")),
        "the stream outlasted the grace period: {said:?}"
    );
}

#[test]
fn spark_routes_want_llama_servers_api_key() {
    let dir = util::tempdir();
    let model = util::fixture(dir.path(), "m.gguf", &[]);
    let mut llama = LLAMA.to_vec();
    llama.extend(["--api-key", "sekret"]);
    let served = Served::start_custom(
        &model,
        &util::llama_server(),
        &["--quiet", "--no-tap"],
        &llama,
        |_| {},
    );
    let get = |route: &str, header: Option<(&str, &str)>| {
        let mut r = ureq::get(&served.url(route)).timeout(Duration::from_secs(10));
        if let Some((k, v)) = header {
            r = r.set(k, v);
        }
        match r.call() {
            Ok(r) => (r.status(), r.into_string().unwrap()),
            Err(ureq::Error::Status(code, r)) => (code, r.into_string().unwrap()),
            Err(e) => panic!("{route}: {e}"),
        }
    };
    for route in ["/spark/status", "/spark/metrics"] {
        let (code, body) = get(route, None);
        assert_eq!(code, 401, "{route} without a key: {body}");
        assert!(
            !body.contains("fingerprint") && !body.contains("spark_"),
            "{body}"
        );
        assert_eq!(get(route, Some(("Authorization", "Bearer wrong"))).0, 401);
        assert_eq!(get(route, Some(("X-Api-Key", "sekre"))).0, 401);
        assert_eq!(
            get(route, Some(("Authorization", "Bearer sekret"))).0,
            200,
            "{route}"
        );
        assert_eq!(get(route, Some(("X-Api-Key", "sekret"))).0, 200, "{route}");
    }
    // llama-server's own routes keep their own check, passed through.
    assert_eq!(get("/v1/models", None).0, 401);
    assert_eq!(
        get("/v1/models", Some(("Authorization", "Bearer sekret"))).0,
        200
    );
    assert_eq!(get("/health", None).0, 200, "public in llama-server");
}

/// Entries of `dir` whose names start with `prefix` (serve's work directories).
fn work_dirs(dir: &std::path::Path, prefix: &str) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with(prefix))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn a_body_trickled_past_the_body_timeout_gets_408() {
    let dir = util::tempdir();
    let model = util::fixture(dir.path(), "m.gguf", &[]);
    let served = Served::start(&model, &["--quiet", "--no-tap", "--body-timeout", "2"]);
    let mut s = TcpStream::connect(("127.0.0.1", served.port)).unwrap();
    s.write_all(b"POST /completion HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{")
        .unwrap();
    // One byte every 300 ms: each byte well within any idle bound, the whole far past 2 s.
    let mut writer = s.try_clone().unwrap();
    let trickle = std::thread::spawn(move || {
        for _ in 0..60 {
            std::thread::sleep(Duration::from_millis(300));
            if writer.write_all(b" ").is_err() {
                return;
            }
        }
    });
    let a = read_answer(&mut s, Duration::from_secs(30)).unwrap();
    assert_eq!(a.status, 408, "{a:?}");
    assert!(a.body.contains("--body-timeout"), "{a:?}");
    assert_eq!(a.header("connection"), Some("close"), "{a:?}");
    drop(s);
    trickle.join().unwrap();
    // A body that arrives in time still passes.
    let ok = exchange(
        served.port,
        b"POST /completion HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 35\r\n\r\n{\"prompt\": \"hello\", \"n_predict\": 2}",
    );
    assert_eq!(ok.status, 200, "{ok:?}");
}

#[test]
fn sighup_stops_serve_gracefully_and_leaves_nothing_behind() {
    let dir = util::tempdir();
    let model = util::fixture(dir.path(), "m.gguf", &[]);
    let tmp = dir.path().join("tmp");
    std::fs::create_dir(&tmp).unwrap();
    let t = tmp.clone();
    let mut served =
        Served::start_custom(&model, &util::llama_server(), &["--quiet"], LLAMA, |c| {
            c.env("TMPDIR", &t);
        });
    let child = served.child_pid();
    assert_eq!(work_dirs(&tmp, "spark-serve-").len(), 1);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(served.child.id() as i32),
        nix::sys::signal::Signal::SIGHUP,
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(s) = served.child.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "spark ignored SIGHUP");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(
        status.code(),
        Some(0),
        "a graceful stop, not death by signal: {status:?}"
    );
    let said: Vec<String> = served.stderr.try_iter().collect();
    assert!(said.iter().any(|l| l.contains("SIGHUP")), "{said:?}");
    assert!(
        wait_gone(child, Duration::from_secs(5)),
        "llama-server {child} was left"
    );
    assert!(
        work_dirs(&tmp, "spark-serve-").is_empty(),
        "the work dir was left"
    );
}

#[test]
fn a_file_size_limit_is_an_error_with_a_message_not_a_silent_death() {
    use std::os::unix::process::CommandExt;
    let dir = util::tempdir();
    let model = util::fixture(dir.path(), "m.gguf", &[]);
    let tmp = dir.path().join("tmp");
    std::fs::create_dir(&tmp).unwrap();
    let mut cmd = std::process::Command::new(util::spark_bin());
    cmd.args([
        "serve",
        "-m",
        model.to_str().unwrap(),
        "--port",
        "0",
        "--quiet",
    ])
    .arg("--llama-server")
    .arg(util::llama_server())
    .env("TMPDIR", &tmp);
    // SAFETY: setrlimit is async-signal-safe and allocates nothing.
    unsafe {
        cmd.pre_exec(|| {
            // 1 MiB: far below the routing ring's memory file.
            let lim = nix::libc::rlimit {
                rlim_cur: 1 << 20,
                rlim_max: 1 << 20,
            };
            if nix::libc::setrlimit(nix::libc::RLIMIT_FSIZE, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let (o, _) = util::output_within(&mut cmd, util::HANG_LIMIT);
    let err = String::from_utf8_lossy(&o.stderr);
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(
        o.status.signal(),
        None,
        "killed by a signal: {:?} {err}",
        o.status
    );
    assert!(o.status.code().is_some_and(|c| c != 0), "{err}");
    assert!(err.contains("File too large"), "says why: {err}");
    assert!(
        work_dirs(&tmp, "spark-serve-").is_empty(),
        "the work dir was left"
    );
}

#[test]
fn a_damaged_profile_of_its_own_is_set_aside_while_explicit_inputs_stay_errors() {
    let dir = util::tempdir();
    let model = util::fixture(dir.path(), "m.gguf", &[]);
    let path = spark::profile::path_for(&model);
    // A bad count, and a huge one: the message must not repeat it whole.
    let huge = "9".repeat(1 << 20);
    let damaged =
        format!("# hotness table: n_layer=4 n_expert=8 n_expert_used=2\n1,2,x{huge},4,5,6,7,8\n");
    std::fs::write(&path, &damaged).unwrap();
    let o = util::spark(&["profile", "show", path.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(
        o.status.code(),
        Some(2),
        "an explicit input stays an error: {err}"
    );
    assert!(err.contains("bad count 3"), "{err}");
    assert!(
        err.len() < 2000,
        "the message repeats the bad input: {} bytes",
        err.len()
    );

    let served = Served::start(&model, &["--spark"]);
    let st = served.status();
    assert_eq!(st["profile"]["at_start"], "damaged", "{st}");
    let mut aside = path.clone().into_os_string();
    aside.push(".stale");
    assert_eq!(
        std::fs::read_to_string(&aside).unwrap(),
        damaged,
        "kept as it was"
    );
    assert!(
        served
            .early
            .iter()
            .any(|l| l.contains("cannot be used") && l.len() < 2000),
        "{:?}",
        served
            .early
            .iter()
            .map(|l| &l[..l.len().min(300)])
            .collect::<Vec<_>>()
    );
}

#[test]
fn odd_methods_and_options_star_are_answered_not_blamed_on_llama_server() {
    let dir = util::tempdir();
    let model = util::fixture(dir.path(), "m.gguf", &[]);
    let served = Served::start(&model, &["--quiet", "--no-tap"]);
    // llama-server answers `OPTIONS *` with its CORS preflight.
    let a = exchange(served.port, b"OPTIONS * HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_eq!(a.status, 200, "{a:?}");
    assert!(a.head.contains("Access-Control-Allow-Methods: "), "{a:?}");
    // An invented method, and one of 100 KB: 400 on a closed connection, as llama-server.
    for method in ["FOO".to_string(), "X".repeat(100_000)] {
        let a = exchange(
            served.port,
            format!("{method} /completion HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes(),
        );
        assert_eq!(a.status, 400, "{}", a.head);
        assert!(a.body.len() < 1000, "{} bytes", a.body.len());
    }
    let st = served.status();
    assert_eq!(st["child"]["restarts"], 0, "{st}");
    let m = ureq::get(&served.url("/spark/metrics"))
        .call()
        .unwrap()
        .into_string()
        .unwrap();
    assert!(!m.contains("status=\"502\""), "{m}");
}

#[test]
fn request_timeout_zero_is_refused() {
    let o = util::spark(&["serve", "-m", "x.gguf", "--request-timeout", "0"]);
    assert_eq!(
        o.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// Reads what `s` sends until it closes, the chunked terminator arrives, or `within` passes.
fn read_stream(s: &mut TcpStream, within: Duration) -> String {
    s.set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let deadline = Instant::now() + within;
    let mut got = Vec::new();
    let mut buf = [0u8; 8192];
    while Instant::now() < deadline && !got.ends_with(b"\r\n0\r\n\r\n") {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut => {}
            Err(_) => break,
        }
    }
    String::from_utf8_lossy(&got).into_owned()
}

#[test]
fn a_child_killed_mid_stream_ends_the_stream_with_an_error_event_and_the_terminator() {
    let dir = util::tempdir();
    let model = util::fixture(dir.path(), "m.gguf", &[]);
    let served = Served::start_custom(
        &model,
        &util::llama_server(),
        &["--quiet", "--no-tap"],
        LONG,
        |_| {},
    );
    let child = served.child_pid();
    let body = json!({"prompt": "once upon a time", "n_predict": 8000, "stream": true}).to_string();
    let mut s = TcpStream::connect(("127.0.0.1", served.port)).unwrap();
    s.write_all(
        format!(
            "POST /completion HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .as_bytes(),
    )
    .unwrap();
    // Some tokens first.
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 8192];
    while got.windows(6).filter(|w| w == b"data: ").count() < 3 {
        let n = s.read(&mut buf).unwrap();
        assert!(n > 0, "closed early: {}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&buf[..n]);
    }
    let head = String::from_utf8_lossy(&got).into_owned();
    assert!(head.contains("Transfer-Encoding: chunked"), "{head}");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let rest = read_stream(&mut s, Duration::from_secs(30));
    assert!(
        rest.ends_with("\r\n0\r\n\r\n"),
        "the chunked body is ended properly: ...{}",
        &rest[rest.len().saturating_sub(300)..]
    );
    let last = rest.rsplit("data: ").next().unwrap();
    assert!(
        last.starts_with("{\"error\":") && last.contains("broke off"),
        "an error event ends the stream: ...{}",
        &rest[rest.len().saturating_sub(300)..]
    );
}

#[test]
fn the_restart_backoff_starts_over_after_a_child_that_served() {
    let dir = util::tempdir();
    let model = util::fixture(dir.path(), "m.gguf", &[]);
    let served = Served::start(&model, &["--quiet", "--no-tap"]);
    let mut waits = Vec::new();
    for round in 0..3 {
        let st = wait_status(&served, Duration::from_secs(60), "ready", |st| {
            st["child"]["ready"] == true
        });
        let got: Value = ureq::post(&served.url("/completion"))
            .timeout(Duration::from_secs(60))
            .send_json(json!({"prompt": "hello", "n_predict": 2}))
            .unwrap()
            .into_json()
            .unwrap();
        assert_eq!(got["tokens_predicted"], 2, "round {round}");
        let pid = st["child"]["pid"].as_u64().unwrap() as i32;
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        )
        .unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        let line = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = served
                .stderr
                .recv_timeout(left)
                .expect("spark announces the restart");
            if line.contains("restarting in") {
                break line;
            }
        };
        waits.push(line.rsplit("restarting in ").next().unwrap().to_string());
    }
    // Every child was ready and served: none of them counts as a failure to back off from.
    assert_eq!(waits, vec!["0.5 s"; 3]);
}
