//! Added latency of spark's proxy, per request and per streamed chunk (p50/p99).
//!
//! An in-process upstream stands in for llama-server so that only the proxy is measured: it
//! answers `/ping` at once and streams SSE chunks that carry their send time. The same client
//! measures direct and proxied runs, alternating, and the difference of the quantiles is the
//! proxy's cost. Prints numbers; asserts nothing. Run: `cargo bench --bench proxy`.

use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use hdrhistogram::Histogram;
use http_body_util::{BodyExt, Empty};
use hyper::body::{Frame, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use spark::gguf::{GgufFile, GgufWriter, MoeGeometry, Value};
use spark::serve::{proxy, stats::Stats, ServeState};
use spark::supervisor::KeeperState;

static BASE: OnceLock<Instant> = OnceLock::new();

fn now_ns() -> u64 {
    BASE.get_or_init(Instant::now).elapsed().as_nanos() as u64
}

async fn upstream(
    req: Request<Incoming>,
) -> Result<Response<http_body_util::combinators::BoxBody<Bytes, Infallible>>, Infallible> {
    if req.uri().path() == "/stream" {
        let n: usize = req
            .uri()
            .query()
            .and_then(|q| q.strip_prefix("n="))
            .and_then(|v| v.parse().ok())
            .unwrap_or(100);
        let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(4);
        tokio::spawn(async move {
            for _ in 0..n {
                tokio::time::sleep(Duration::from_micros(500)).await;
                let chunk = format!("data: {{\"sent_ns\":{}}}\n\n", now_ns());
                if tx.send(Bytes::from(chunk)).await.is_err() {
                    return;
                }
            }
        });
        let mut r = Response::new(ChanBody(rx).boxed());
        r.headers_mut()
            .insert("content-type", "text/event-stream".parse().unwrap());
        return Ok(r);
    }
    Ok(Response::new(
        http_body_util::Full::new(Bytes::from_static(b"{\"status\":\"ok\"}")).boxed(),
    ))
}

/// A body fed by a channel: each message is one frame, sent when it is produced.
struct ChanBody(tokio::sync::mpsc::Receiver<Bytes>);

impl hyper::body::Body for ChanBody {
    type Data = Bytes;
    type Error = Infallible;
    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0.poll_recv(cx).map(|m| m.map(|b| Ok(Frame::data(b))))
    }
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(run());
}

async fn listen_upstream() -> u16 {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    tokio::spawn(async move {
        loop {
            let (s, _) = l.accept().await.unwrap();
            let _ = s.set_nodelay(true);
            tokio::spawn(
                http1::Builder::new().serve_connection(TokioIo::new(s), service_fn(upstream)),
            );
        }
    });
    port
}

async fn listen_proxy(upstream_port: u16) -> u16 {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("m.gguf");
    let mut w = GgufWriter::new();
    w.set("general.architecture", Value::String("qwen3moe".into()));
    w.set("qwen3moe.block_count", Value::U32(1));
    w.write(&model).unwrap();
    let file = GgufFile::open(&model).unwrap();
    let geometry = MoeGeometry::of(&file).unwrap();
    let placement =
        spark::serve::placement::choose(&file, &geometry, None, 4096, &[], u64::MAX).unwrap();
    let keeper = Arc::new(KeeperState::default());
    keeper.port.store(upstream_port, Ordering::Release);
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let listen = l.local_addr().unwrap();
    let state = Arc::new(ServeState {
        keeper,
        stats: Stats::default(),
        client: proxy::client(),
        max_body: 32 << 20,
        body_timeout: Duration::from_secs(60),
        api_keys: Default::default(),
        connections: spark::serve::listener::Connections::new(256, Duration::from_secs(30)),
        request_timeout: Duration::from_secs(30),
        idle_timeout: Duration::from_secs(30),
        model,
        geometry,
        engine: spark::engine::Engine {
            llama_server: "/bin/false".into(),
            llama_bench: None,
            prefix: None,
        },
        started: Instant::now(),
        completed: AtomicU64::new(0),
        listen,
        live: None,
        placement,
        host_memory: None,
        history: Default::default(),
    });
    tokio::spawn(async move {
        loop {
            let (s, _) = l.accept().await.unwrap();
            let _ = s.set_nodelay(true);
            let st = state.clone();
            tokio::spawn(http1::Builder::new().serve_connection(
                TokioIo::new(s),
                service_fn(move |r| proxy::handle(st.clone(), r)),
            ));
        }
    });
    port_of(listen)
}

fn port_of(a: std::net::SocketAddr) -> u16 {
    a.port()
}

fn hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000_000, 3).unwrap()
}

async fn run() {
    let up = listen_upstream().await;
    let px = listen_proxy(up).await;
    let client: Client<_, Empty<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let (mut req_direct, mut req_proxy) = (hist(), hist());
    let (mut chunk_direct, mut chunk_proxy) = (hist(), hist());
    let rounds = 20;
    let per_round = 250;
    for _ in 0..rounds {
        for (port, h) in [(up, &mut req_direct), (px, &mut req_proxy)] {
            for _ in 0..per_round {
                let t = Instant::now();
                let resp = client
                    .get(format!("http://127.0.0.1:{port}/ping").parse().unwrap())
                    .await
                    .unwrap();
                resp.into_body().collect().await.unwrap();
                h.record(t.elapsed().as_nanos() as u64).unwrap();
            }
        }
        for (port, h) in [(up, &mut chunk_direct), (px, &mut chunk_proxy)] {
            let resp = client
                .get(
                    format!("http://127.0.0.1:{port}/stream?n=100")
                        .parse()
                        .unwrap(),
                )
                .await
                .unwrap();
            let mut body = resp.into_body();
            while let Some(frame) = body.frame().await {
                let frame = frame.unwrap();
                let got = now_ns();
                if let Some(d) = frame.data_ref() {
                    let s = std::str::from_utf8(d).unwrap();
                    for part in s.split("\"sent_ns\":").skip(1) {
                        let sent: u64 = part
                            .trim_end_matches(|c: char| !c.is_ascii_digit())
                            .parse()
                            .unwrap();
                        h.record(got.saturating_sub(sent).max(1)).unwrap();
                    }
                }
            }
        }
    }
    let us = |h: &Histogram<u64>, q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    println!(
        "proxy bench: {} requests and {} streamed chunks each way, direct vs through spark",
        req_direct.len(),
        chunk_direct.len()
    );
    println!(
        "{:<28} {:>10} {:>10} {:>10}",
        "", "p50 µs", "p99 µs", "mean µs"
    );
    for (name, h) in [
        ("request direct", &req_direct),
        ("request via proxy", &req_proxy),
        ("chunk direct", &chunk_direct),
        ("chunk via proxy", &chunk_proxy),
    ] {
        println!(
            "{:<28} {:>10.1} {:>10.1} {:>10.1}",
            name,
            us(h, 0.5),
            us(h, 0.99),
            h.mean() / 1000.0
        );
    }
    println!(
        "added latency per request:  p50 {:.1} µs, p99 {:.1} µs",
        us(&req_proxy, 0.5) - us(&req_direct, 0.5),
        us(&req_proxy, 0.99) - us(&req_direct, 0.99)
    );
    println!(
        "added latency per chunk:    p50 {:.1} µs, p99 {:.1} µs",
        us(&chunk_proxy, 0.5) - us(&chunk_direct, 0.5),
        us(&chunk_proxy, 0.99) - us(&chunk_direct, 0.99)
    );
}
