//! Per-request statistics of the proxy: counts and hdrhistograms of time to first byte,
//! total time and decode speed, plus token totals parsed from llama-server's own `timings`.
//!
//! Owns no I/O; the proxy feeds it, `/spark/status` and `/spark/metrics` read it.

use std::fmt::Write as _;
use std::sync::Mutex;
use std::time::Duration;

use hdrhistogram::Histogram;
use serde_json::{json, Value};

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
}

/// Thread-safe request statistics.
#[derive(Debug)]
pub struct Stats {
    inner: Mutex<Inner>,
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
            }),
        }
    }
}

impl Stats {
    pub fn record(&self, r: &RequestRecord) {
        let mut s = self.inner.lock().unwrap_or_else(|e| e.into_inner());
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
        }
        s.total_us
            .saturating_record(r.total.as_micros().max(1) as u64);
        if let Some(tps) = r.decode_tps.filter(|t| t.is_finite() && *t > 0.0) {
            s.decode_mtps
                .saturating_record((tps * 1000.0).max(1.0) as u64);
        }
    }

    pub fn requests(&self) -> u64 {
        self.inner
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .requests
    }

    /// The JSON block of `/spark/status`.
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
            "prompt_tokens": s.prompt_tokens,
            "generated_tokens": s.generated_tokens,
            "first_byte_ms": q(&s.first_byte_us, 1000.0),
            "total_ms": q(&s.total_us, 1000.0),
            "decode_tokens_per_s": q(&s.decode_mtps, 1000.0),
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
            "Requests proxied to llama-server.",
            s.requests,
        );
        counter(
            "spark_request_errors_total",
            "Proxied requests answered with status >= 400.",
            s.errors,
        );
        counter(
            "spark_requests_aborted_total",
            "Requests whose body ended early.",
            s.aborted,
        );
        counter(
            "spark_prompt_tokens_total",
            "Prompt tokens reported by llama-server.",
            s.prompt_tokens,
        );
        counter(
            "spark_generated_tokens_total",
            "Generated tokens reported by llama-server.",
            s.generated_tokens,
        );
        let mut summary = |name: &str, help: &str, h: &Histogram<u64>, scale: f64| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} summary");
            for q in [0.5, 0.9, 0.99] {
                let v = if h.is_empty() {
                    0.0
                } else {
                    h.value_at_quantile(q) as f64 / scale
                };
                let _ = writeln!(out, "{name}{{quantile=\"{q}\"}} {v}");
            }
            let _ = writeln!(out, "{name}_count {}", h.len());
        };
        summary(
            "spark_first_byte_seconds",
            "Time to the first byte of the answer.",
            &s.first_byte_us,
            1e6,
        );
        summary(
            "spark_request_seconds",
            "Whole request time.",
            &s.total_us,
            1e6,
        );
        summary(
            "spark_decode_tokens_per_second",
            "Decode speed reported by llama-server.",
            &s.decode_mtps,
            1e3,
        );
    }
}

/// Token counts and decode speed from the end of a llama-server answer: the last `timings`
/// object (native and OpenAI-style routes, streamed or not), else an OpenAI `usage` object.
pub fn parse_tail(tail: &[u8]) -> (Option<u64>, Option<u64>, Option<f64>) {
    let find_obj = |key: &[u8]| -> Option<Value> {
        let pos = tail.windows(key.len()).rposition(|w| w == key)?;
        let rest = &tail[pos + key.len()..];
        let start = rest.iter().position(|&b| b == b'{')?;
        serde_json::Deserializer::from_slice(&rest[start..])
            .into_iter::<Value>()
            .next()?
            .ok()
    };
    if let Some(t) = find_obj(b"\"timings\"") {
        return (
            t["prompt_n"].as_u64(),
            t["predicted_n"].as_u64(),
            t["predicted_per_second"].as_f64(),
        );
    }
    if let Some(u) = find_obj(b"\"usage\"") {
        return (
            u["prompt_tokens"].as_u64(),
            u["completion_tokens"].as_u64(),
            None,
        );
    }
    (None, None, None)
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

    #[test]
    fn records_fold_into_counts_and_quantiles() {
        let s = Stats::default();
        for i in 1..=100u64 {
            s.record(&RequestRecord {
                status: if i == 7 { 500 } else { 200 },
                first_byte: Some(Duration::from_millis(i)),
                total: Duration::from_millis(2 * i),
                prompt_tokens: Some(3),
                generated_tokens: Some(4),
                decode_tps: Some(100.0),
                ..Default::default()
            });
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
}
