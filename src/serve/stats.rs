//! Per-request statistics of the proxy. Requests are generating calls (completion, chat,
//! Responses, Anthropic Messages, infill): counts, token totals parsed from each answer, and
//! time to first byte, total time and decode speed, both as hdrhistogram quantiles (for
//! `/spark/status`) and as fixed-bucket Prometheus histograms (for `/spark/metrics`). Probes
//! (`/health`, `/slots`, `/props`, `/models`, `/metrics`) and other calls (tokenize,
//! embeddings…) are only counted, apart, so they never move the request numbers.
//!
//! Owns no I/O; the proxy feeds it, `/spark/status` and `/spark/metrics` read it.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hdrhistogram::Histogram;
use serde_json::{json, Value};

/// What kind of call a route is, by its path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouteKind {
    /// Generates tokens: counted as a request, timed, its tokens added up.
    Generate,
    /// A liveness or information probe: counted apart, never timed.
    Probe,
    /// Anything else (tokenize, embeddings, rerank, props updates…): counted apart.
    Other,
}

/// llama-server's generating routes (tools/server/server.cpp of the pinned build).
const GENERATE_ROUTES: &[&str] = &[
    "/completion",
    "/completions",
    "/v1/completions",
    "/chat/completions",
    "/v1/chat/completions",
    "/responses",
    "/v1/responses",
    "/v1/messages",
    "/infill",
];

/// Routes monitoring and load balancers poll.
const PROBE_ROUTES: &[&str] = &[
    "/health",
    "/v1/health",
    "/slots",
    "/props",
    "/models",
    "/v1/models",
    "/metrics",
];

pub fn route_kind(path: &str) -> RouteKind {
    if GENERATE_ROUTES.contains(&path) {
        RouteKind::Generate
    } else if PROBE_ROUTES.contains(&path) {
        RouteKind::Probe
    } else {
        RouteKind::Other
    }
}

/// What one finished request contributed.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RequestRecord {
    pub route: String,
    pub status: u16,
    /// Time from receiving the request to the first body byte of the answer.
    pub first_byte: Option<Duration>,
    pub total: Duration,
    pub chunks: u64,
    pub bytes: u64,
    /// The client went away or the upstream failed before the body ended.
    pub aborted: bool,
    pub prompt_tokens: Option<u64>,
    pub generated_tokens: Option<u64>,
    pub decode_tps: Option<f64>,
}

/// Bucket bounds of the request-time histograms, seconds: 1 ms to 5 min.
pub const SECONDS_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    120.0, 300.0,
];

/// Bucket bounds of the decode-speed histogram, tokens per second.
pub const TPS_BUCKETS: &[f64] = &[
    1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 2000.0, 5000.0, 10000.0,
];

/// A Prometheus histogram: a count per bucket (not cumulative; rendered cumulative), the sum
/// and the count of every observation.
#[derive(Debug, Clone)]
struct Buckets {
    bounds: &'static [f64],
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

impl Buckets {
    fn new(bounds: &'static [f64]) -> Buckets {
        Buckets {
            bounds,
            counts: vec![0; bounds.len()],
            sum: 0.0,
            count: 0,
        }
    }

    fn observe(&mut self, v: f64) {
        if let Some(i) = self.bounds.iter().position(|&b| v <= b) {
            self.counts[i] += 1;
        }
        self.sum += v;
        self.count += 1;
    }

    /// `# HELP`, `# TYPE`, every `_bucket` (cumulative, `+Inf` last), `_sum`, `_count`.
    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        let mut cumulative = 0;
        for (b, c) in self.bounds.iter().zip(&self.counts) {
            cumulative += c;
            let _ = writeln!(out, "{name}_bucket{{le=\"{b}\"}} {cumulative}");
        }
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {}", self.count);
        let _ = writeln!(out, "{name}_sum {}\n{name}_count {}", self.sum, self.count);
    }
}

#[derive(Debug)]
struct Inner {
    requests: u64,
    errors: u64,
    aborted: u64,
    prompt_tokens: u64,
    generated_tokens: u64,
    first_byte_us: Histogram<u64>,
    total_us: Histogram<u64>,
    /// Decode speed in milli-tokens per second (histograms hold integers).
    decode_mtps: Histogram<u64>,
    first_byte_s: Buckets,
    total_s: Buckets,
    decode_tps: Buckets,
    probes: u64,
    probe_errors: u64,
    other: u64,
    other_errors: u64,
}

/// Thread-safe request statistics.
#[derive(Debug)]
pub struct Stats {
    inner: Mutex<Inner>,
    in_flight: Arc<AtomicU64>,
}

/// One generating request between its arrival and the end of its answer; dropping it ends it.
#[derive(Debug)]
pub struct InFlight(Arc<AtomicU64>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Default for Stats {
    fn default() -> Self {
        let h = || Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("valid histogram bounds");
        Stats {
            inner: Mutex::new(Inner {
                requests: 0,
                errors: 0,
                aborted: 0,
                prompt_tokens: 0,
                generated_tokens: 0,
                first_byte_us: h(),
                total_us: h(),
                decode_mtps: h(),
                first_byte_s: Buckets::new(SECONDS_BUCKETS),
                total_s: Buckets::new(SECONDS_BUCKETS),
                decode_tps: Buckets::new(TPS_BUCKETS),
                probes: 0,
                probe_errors: 0,
                other: 0,
                other_errors: 0,
            }),
            in_flight: Arc::new(AtomicU64::new(0)),
        }
    }
}

impl Stats {
    /// Counts a request of `kind` as in flight until the returned guard drops (generating
    /// requests only; `None` for the others).
    pub fn enter(&self, kind: RouteKind) -> Option<InFlight> {
        (kind == RouteKind::Generate).then(|| {
            self.in_flight.fetch_add(1, Ordering::AcqRel);
            InFlight(self.in_flight.clone())
        })
    }

    pub fn in_flight(&self) -> u64 {
        self.in_flight.load(Ordering::Acquire)
    }

    pub fn record(&self, r: &RequestRecord) {
        let mut s = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        match route_kind(&r.route) {
            RouteKind::Probe => {
                s.probes += 1;
                s.probe_errors += u64::from(r.status >= 400);
                return;
            }
            RouteKind::Other => {
                s.other += 1;
                s.other_errors += u64::from(r.status >= 400);
                return;
            }
            RouteKind::Generate => {}
        }
        s.requests += 1;
        if r.status >= 400 {
            s.errors += 1;
        }
        if r.aborted {
            s.aborted += 1;
        }
        s.prompt_tokens += r.prompt_tokens.unwrap_or(0);
        s.generated_tokens += r.generated_tokens.unwrap_or(0);
        if let Some(fb) = r.first_byte {
            s.first_byte_us
                .saturating_record(fb.as_micros().max(1) as u64);
            s.first_byte_s.observe(fb.as_secs_f64());
        }
        s.total_us
            .saturating_record(r.total.as_micros().max(1) as u64);
        s.total_s.observe(r.total.as_secs_f64());
        if let Some(tps) = r.decode_tps.filter(|t| t.is_finite() && *t > 0.0) {
            s.decode_mtps
                .saturating_record((tps * 1000.0).max(1.0) as u64);
            s.decode_tps.observe(tps);
        }
    }

    /// Generating requests recorded so far.
    pub fn requests(&self) -> u64 {
        self.inner
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .requests
    }

    /// The JSON block of `/spark/status`: generating requests, with the probes and the other
    /// calls counted apart.
    pub fn to_json(&self) -> Value {
        let s = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let q = |h: &Histogram<u64>, scale: f64| {
            if h.is_empty() {
                Value::Null
            } else {
                json!({"p50": h.value_at_quantile(0.5) as f64 / scale, "p99": h.value_at_quantile(0.99) as f64 / scale, "max": h.max() as f64 / scale, "count": h.len()})
            }
        };
        json!({
            "count": s.requests,
            "errors": s.errors,
            "aborted": s.aborted,
            "in_flight": self.in_flight(),
            "prompt_tokens": s.prompt_tokens,
            "generated_tokens": s.generated_tokens,
            "first_byte_ms": q(&s.first_byte_us, 1000.0),
            "total_ms": q(&s.total_us, 1000.0),
            "decode_tokens_per_s": q(&s.decode_mtps, 1000.0),
            "probes": {"count": s.probes, "errors": s.probe_errors},
            "other": {"count": s.other, "errors": s.other_errors},
        })
    }

    /// Prometheus text lines (without the process-level ones the caller adds).
    pub fn prometheus(&self, out: &mut String) {
        let s = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let mut counter = |name: &str, help: &str, v: u64| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}"
            );
        };
        counter(
            "spark_requests_total",
            "Generating requests proxied to llama-server (completion, chat, responses, messages, infill).",
            s.requests,
        );
        counter(
            "spark_request_errors_total",
            "Generating requests answered with status >= 400.",
            s.errors,
        );
        counter(
            "spark_requests_aborted_total",
            "Generating requests whose body ended early.",
            s.aborted,
        );
        counter(
            "spark_prompt_tokens_total",
            "Prompt tokens llama-server evaluated (not reused from its cache).",
            s.prompt_tokens,
        );
        counter(
            "spark_generated_tokens_total",
            "Tokens llama-server generated, on every generating route.",
            s.generated_tokens,
        );
        counter(
            "spark_probes_total",
            "Probes (health, slots, props, models, metrics) passed to llama-server; not requests.",
            s.probes,
        );
        counter(
            "spark_probe_errors_total",
            "Probes answered with status >= 400.",
            s.probe_errors,
        );
        counter(
            "spark_other_calls_total",
            "Other calls passed to llama-server (tokenize, embeddings, ...); not requests.",
            s.other,
        );
        let _ = writeln!(
            out,
            "# HELP spark_requests_in_flight Generating requests whose answer has not ended.\n# TYPE spark_requests_in_flight gauge\nspark_requests_in_flight {}",
            self.in_flight()
        );
        s.first_byte_s.render(
            out,
            "spark_first_byte_seconds",
            "Time from a generating request to the first byte of its answer.",
        );
        s.total_s.render(
            out,
            "spark_request_seconds",
            "Whole time of a generating request.",
        );
        s.decode_tps.render(
            out,
            "spark_decode_tokens_per_second",
            "Decode speed of a generating request: llama-server's timings, else measured over a streamed answer.",
        );
    }
}

/// Token counts and decode speed of one answer.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Tokens {
    /// Prompt tokens evaluated (not reused from llama-server's cache).
    pub prompt: Option<u64>,
    pub generated: Option<u64>,
    /// From llama-server's `timings`, when the answer carries them.
    pub decode_tps: Option<f64>,
}

/// The JSON object after the last (or the first) `key` in `buf`, if it parses whole.
fn object_after(buf: &[u8], key: &[u8], last: bool) -> Option<Value> {
    let mut at = buf.windows(key.len());
    let pos = if last {
        at.rposition(|w| w == key)?
    } else {
        at.position(|w| w == key)?
    };
    let rest = &buf[pos + key.len()..];
    let start = rest.iter().position(|&b| b == b'{')?;
    serde_json::Deserializer::from_slice(&rest[start..])
        .into_iter::<Value>()
        .next()?
        .ok()
}

/// Prompt tokens evaluated, from a `usage` object of any of llama-server's formats: OpenAI
/// (`prompt_tokens` less `prompt_tokens_details.cached_tokens`), Responses (`input_tokens` less
/// `input_tokens_details.cached_tokens`), Anthropic (`input_tokens`, which excludes
/// `cache_read_input_tokens` already).
fn usage_prompt(u: &Value) -> Option<u64> {
    let cached = |details: &str| u[details]["cached_tokens"].as_u64().unwrap_or(0);
    if let Some(p) = u["prompt_tokens"].as_u64() {
        return Some(p.saturating_sub(cached("prompt_tokens_details")));
    }
    let i = u["input_tokens"].as_u64()?;
    Some(i.saturating_sub(cached("input_tokens_details")))
}

/// Token counts and decode speed from a llama-server answer, given its first bytes (`head`)
/// and its last (`tail`): the last `timings` object (native and OpenAI-style routes, the
/// streamed Responses API), else the last `usage` object: OpenAI `completion_tokens`,
/// Responses and Anthropic `output_tokens` (a streamed Anthropic answer ends with
/// `message_delta`, whose usage has output tokens only; its prompt tokens are in the
/// `message_start` at the head).
pub fn parse_answer(head: &[u8], tail: &[u8]) -> Tokens {
    if let Some(t) = object_after(tail, b"\"timings\"", true) {
        return Tokens {
            prompt: t["prompt_n"].as_u64(),
            generated: t["predicted_n"].as_u64(),
            decode_tps: t["predicted_per_second"].as_f64(),
        };
    }
    let Some(u) = object_after(tail, b"\"usage\"", true) else {
        return Tokens::default();
    };
    let generated = u["completion_tokens"]
        .as_u64()
        .or_else(|| u["output_tokens"].as_u64());
    let prompt =
        usage_prompt(&u).or_else(|| usage_prompt(&object_after(head, b"\"usage\"", false)?));
    Tokens {
        prompt,
        generated,
        decode_tps: None,
    }
}

/// [`parse_answer`] of a whole answer held in one buffer, as a tuple.
pub fn parse_tail(tail: &[u8]) -> (Option<u64>, Option<u64>, Option<f64>) {
    let t = parse_answer(tail, tail);
    (t.prompt, t.generated, t.decode_tps)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_streamed_and_plain_timings() {
        let sse = b"data: {\"content\":\"a\"}\n\ndata: {\"content\":\"\",\"stop\":true,\"timings\":{\"prompt_n\":12,\"predicted_n\":8,\"predicted_per_second\":150.5}}\n\n";
        assert_eq!(parse_tail(sse), (Some(12), Some(8), Some(150.5)));
        let oai = br#"{"choices":[],"usage":{"completion_tokens":5,"prompt_tokens":9,"total_tokens":14}}"#;
        assert_eq!(parse_tail(oai), (Some(9), Some(5), None));
        assert_eq!(
            parse_tail(b"{\"timings\": {\"prompt_n\""),
            (None, None, None),
            "cut object"
        );
        assert_eq!(parse_tail(b""), (None, None, None));
    }

    // The answers below have the shapes the pinned llama-server writes
    // (tools/server/server-task.cpp); tests/serve.rs checks the same routes end to end.
    #[test]
    fn parses_the_responses_and_anthropic_formats_streamed_or_not() {
        let oai_cached = br#"{"usage":{"completion_tokens":5,"prompt_tokens":9,"total_tokens":14,"prompt_tokens_details":{"cached_tokens":4}}}"#;
        assert_eq!(parse_tail(oai_cached), (Some(5), Some(5), None));
        let responses = br#"{"object":"response","output":[],"status":"completed","usage":{"input_tokens":11,"output_tokens":7,"total_tokens":18,"input_tokens_details":{"cached_tokens":1}}}"#;
        assert_eq!(parse_tail(responses), (Some(10), Some(7), None));
        let responses_sse = b"event: response.output_text.delta\ndata: {\"type\":\"response.output_text.delta\",\"delta\":\"x\"}\n\nevent: response.completed\ndata: {\"type\":\"response.completed\",\"response\":{\"output\":[],\"usage\":{\"input_tokens\":11,\"output_tokens\":7}},\"timings\":{\"prompt_n\":11,\"predicted_n\":7,\"predicted_per_second\":99.0}}\n\n";
        assert_eq!(parse_tail(responses_sse), (Some(11), Some(7), Some(99.0)));
        let anthropic = br#"{"type":"message","content":[{"type":"text","text":"say \"usage\": {}"}],"usage":{"cache_read_input_tokens":3,"input_tokens":8,"output_tokens":6}}"#;
        assert_eq!(parse_tail(anthropic), (Some(8), Some(6), None));
        let head = b"event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"content\":[],\"usage\":{\"cache_read_input_tokens\":0,\"input_tokens\":13,\"output_tokens\":0}}}\n\nevent: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"delta\":{\"text\":\"a\"}}\n\n";
        let tail = b"data: {\"type\":\"content_block_stop\",\"index\":0}\n\nevent: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"max_tokens\"},\"usage\":{\"output_tokens\":12}}\n\nevent: message_stop\ndata: {\"type\":\"message_stop\"}\n\n";
        assert_eq!(
            parse_answer(head, tail),
            Tokens {
                prompt: Some(13),
                generated: Some(12),
                decode_tps: None
            }
        );
    }

    #[test]
    fn routes_are_generating_calls_probes_or_other() {
        for r in [
            "/completion",
            "/v1/chat/completions",
            "/v1/responses",
            "/v1/messages",
            "/infill",
        ] {
            assert_eq!(route_kind(r), RouteKind::Generate, "{r}");
        }
        for r in ["/health", "/slots", "/props", "/v1/models", "/metrics"] {
            assert_eq!(route_kind(r), RouteKind::Probe, "{r}");
        }
        for r in [
            "/tokenize",
            "/v1/embeddings",
            "/v1/messages/count_tokens",
            "/slots/0",
        ] {
            assert_eq!(route_kind(r), RouteKind::Other, "{r}");
        }
    }

    fn generating(ms: u64) -> RequestRecord {
        RequestRecord {
            route: "/completion".into(),
            status: 200,
            first_byte: Some(Duration::from_micros(500 * ms)),
            total: Duration::from_millis(ms),
            prompt_tokens: Some(3),
            generated_tokens: Some(4),
            decode_tps: Some(100.0),
            ..Default::default()
        }
    }

    #[test]
    fn records_fold_into_counts_and_quantiles() {
        let s = Stats::default();
        for i in 1..=100u64 {
            let mut r = generating(2 * i);
            r.first_byte = Some(Duration::from_millis(i));
            if i == 7 {
                r.status = 500;
            }
            s.record(&r);
        }
        let j = s.to_json();
        assert_eq!(j["count"], 100);
        assert_eq!(j["errors"], 1);
        assert_eq!(j["prompt_tokens"], 300);
        assert_eq!(j["generated_tokens"], 400);
        let p50 = j["first_byte_ms"]["p50"].as_f64().unwrap();
        assert!((49.0..=51.0).contains(&p50), "{p50}");
        assert!((j["decode_tokens_per_s"]["p50"].as_f64().unwrap() - 100.0).abs() < 0.2);
        let mut text = String::new();
        s.prometheus(&mut text);
        assert!(text.contains("spark_requests_total 100"));
        assert!(text.contains("spark_request_errors_total 1"));
    }

    #[test]
    fn probes_and_other_calls_are_counted_apart_and_never_timed() {
        let s = Stats::default();
        s.record(&generating(2));
        let before = s.to_json();
        for route in ["/health", "/slots", "/health", "/v1/models", "/health"] {
            s.record(&RequestRecord {
                route: route.into(),
                status: if route == "/slots" { 501 } else { 200 },
                first_byte: Some(Duration::from_micros(50)),
                total: Duration::from_micros(80),
                ..Default::default()
            });
        }
        s.record(&RequestRecord {
            route: "/tokenize".into(),
            status: 200,
            total: Duration::from_micros(90),
            ..Default::default()
        });
        let j = s.to_json();
        assert_eq!(j["count"], 1);
        assert_eq!(j["errors"], 0);
        assert_eq!(
            j["total_ms"], before["total_ms"],
            "probes move no request time"
        );
        assert_eq!(j["first_byte_ms"], before["first_byte_ms"]);
        assert_eq!(j["probes"], json!({"count": 5, "errors": 1}));
        assert_eq!(j["other"], json!({"count": 1, "errors": 0}));
        let mut text = String::new();
        s.prometheus(&mut text);
        assert!(text.contains("\nspark_probes_total 5\n"), "{text}");
        assert!(text.contains("\nspark_request_seconds_count 1\n"), "{text}");
    }

    #[test]
    fn the_in_flight_gauge_follows_the_guards_of_generating_requests() {
        let s = Stats::default();
        assert!(s.enter(RouteKind::Probe).is_none());
        let a = s.enter(RouteKind::Generate);
        let b = s.enter(RouteKind::Generate);
        assert_eq!(s.in_flight(), 2);
        drop(a);
        assert_eq!(s.to_json()["in_flight"], 1);
        drop(b);
        let mut text = String::new();
        s.prometheus(&mut text);
        assert!(text.contains("\nspark_requests_in_flight 0\n"), "{text}");
    }

    /// The histograms as a Prometheus parser reads them: cumulative buckets ending in `+Inf`
    /// at the count, a `_sum`, and nothing before the first sample but zero counts.
    #[test]
    fn histograms_are_prometheus_histograms() {
        let parse = |s: &Stats| {
            let mut text = String::new();
            s.prometheus(&mut text);
            let scrape =
                prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_string()))).unwrap();
            let get = |name: &str| -> Vec<(f64, f64)> {
                let h = scrape
                    .samples
                    .iter()
                    .find(|x| x.metric == name)
                    .unwrap_or_else(|| panic!("{name} missing in {text}"));
                match &h.value {
                    prometheus_parse::Value::Histogram(b) => {
                        b.iter().map(|c| (c.less_than, c.count)).collect()
                    }
                    v => panic!("{name} is {v:?}"),
                }
            };
            let value = |name: &str| {
                scrape
                    .samples
                    .iter()
                    .find(|x| x.metric == name)
                    .map(|x| match x.value {
                        prometheus_parse::Value::Untyped(v) => v,
                        ref v => panic!("{name}: {v:?}"),
                    })
                    .unwrap_or_else(|| panic!("{name} missing"))
            };
            (
                get("spark_request_seconds"),
                value("spark_request_seconds_sum"),
                value("spark_request_seconds_count"),
                get("spark_decode_tokens_per_second"),
            )
        };
        let s = Stats::default();
        let (b, sum, count, _) = parse(&s);
        assert_eq!(b.len(), SECONDS_BUCKETS.len() + 1);
        assert!(b.iter().all(|&(_, c)| c == 0.0), "empty before any sample");
        assert_eq!((sum, count), (0.0, 0.0));

        for ms in [2, 40, 40, 700, 90_000] {
            s.record(&generating(ms));
        }
        let (b, sum, count, tps) = parse(&s);
        assert_eq!(count, 5.0);
        assert!((sum - 90.782).abs() < 1e-9, "{sum}");
        assert!(
            b.windows(2).all(|w| w[0].0 < w[1].0 && w[0].1 <= w[1].1),
            "{b:?}"
        );
        assert_eq!(b.last().unwrap(), &(f64::INFINITY, 5.0));
        let at = |le: f64| b.iter().find(|x| x.0 == le).unwrap().1;
        assert_eq!(at(0.001), 0.0);
        assert_eq!(at(0.0025), 1.0);
        assert_eq!(at(0.05), 3.0);
        assert_eq!(at(1.0), 4.0);
        assert_eq!(at(60.0), 4.0);
        assert_eq!(at(120.0), 5.0);
        assert_eq!(tps.iter().find(|x| x.0 == 100.0).unwrap().1, 5.0);
        assert_eq!(tps.iter().find(|x| x.0 == 50.0).unwrap().1, 0.0);
    }
}
