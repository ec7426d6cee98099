//! The HTTP front of `spark serve`: every llama-server route passes through unchanged and
//! streamed (bodies are forwarded frame by frame, never buffered whole); `/spark/status` and
//! `/spark/metrics` are answered by spark itself.
//!
//! Owns request forwarding and metering. Never blocks on the child's lifecycle: while
//! llama-server is restarting (or unresponsive), requests get a 503 with `Retry-After` at once.
//! A request body over `--max-body` gets 413 and one that is not valid HTTP framing (bad chunked
//! encoding) 400, never a 502 that would blame llama-server. Every request is counted once,
//! including one whose client leaves before the answer starts.

use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::{Body, Frame, Incoming};
use hyper::header::{HeaderValue, CONTENT_LENGTH, CONTENT_TYPE, HOST, RETRY_AFTER};
use hyper::{Request, Response, StatusCode};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

use super::stats::{parse_answer, route_kind, InFlight, RequestRecord, RouteKind};
use super::ServeState;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub type ProxyBody = BoxBody<Bytes, BoxError>;

/// Bytes of the end of each answer kept to read llama-server's `timings` or `usage`.
const TAIL_BYTES: usize = 16 * 1024;
/// Bytes of the start of each answer kept: a streamed Anthropic answer names its prompt tokens
/// in its first event only.
const HEAD_BYTES: usize = 4 * 1024;

/// The status recorded for a request whose client closed the connection before the answer
/// started (nothing was sent; nginx logs the same number).
pub const CLIENT_GONE: u16 = 499;

/// What the client's request body did wrong, found while it streamed upstream.
#[derive(Debug, Clone)]
enum BodyFault {
    /// Not valid HTTP/1 framing (bad chunked encoding, for example).
    Invalid(String),
    /// More bytes than the limit.
    TooLarge,
    /// Not all there within the body deadline.
    TooSlow,
}

/// The client's request body on its way to llama-server: counts its bytes against the limit and
/// remembers why it failed, so the proxy answers 400 or 413 instead of blaming the upstream.
pub struct ClientBody {
    inner: Incoming,
    left: u64,
    fault: Arc<OnceLock<BodyFault>>,
    /// When the whole body must have arrived (`--body-timeout` after its headers).
    deadline: Pin<Box<tokio::time::Sleep>>,
}

impl Body for ClientBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                let n = frame.data_ref().map_or(0, |d| d.len() as u64);
                if n > this.left {
                    let _ = this.fault.set(BodyFault::TooLarge);
                    return Poll::Ready(Some(Err("request body over the size limit".into())));
                }
                this.left -= n;
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => {
                let _ = this.fault.set(BodyFault::Invalid(e.to_string()));
                Poll::Ready(Some(Err(Box::new(e))))
            }
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => match this.deadline.as_mut().poll(cx) {
                Poll::Ready(()) => {
                    let _ = this.fault.set(BodyFault::TooSlow);
                    Poll::Ready(Some(Err("request body not received in time".into())))
                }
                Poll::Pending => Poll::Pending,
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

/// Records a request whose future is dropped while it waits for llama-server's answer (hyper
/// drops it when the client closes the connection), unless disarmed first.
struct Pending<'a> {
    state: &'a ServeState,
    route: Option<String>,
    received: Instant,
}

impl Pending<'_> {
    /// The answer (or an error that is recorded elsewhere) came: nothing to record here.
    fn disarm(mut self) -> String {
        self.route.take().unwrap_or_default()
    }
}

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        if let Some(route) = self.route.take() {
            self.state.stats.record(&RequestRecord {
                route,
                status: CLIENT_GONE,
                total: self.received.elapsed(),
                aborted: true,
                ..Default::default()
            });
        }
    }
}

/// Methods forwarded to llama-server: those its HTTP library (cpp-httplib) handles; it answers
/// any other 400 and closes the connection, and so does spark.
const FORWARDED_METHODS: &[hyper::Method] = &[
    hyper::Method::GET,
    hyper::Method::HEAD,
    hyper::Method::POST,
    hyper::Method::PUT,
    hyper::Method::DELETE,
    hyper::Method::OPTIONS,
    hyper::Method::PATCH,
];

/// Headers that describe one hop, not the message (RFC 9110 §7.6.1).
const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "upgrade",
];

/// Removes the hop-by-hop headers: the fixed list, and every header the `Connection` header
/// names (`Connection: close, X-Hop` makes `X-Hop` hop-by-hop too), RFC 9110 §7.6.1.
fn strip_hop_by_hop(headers: &mut hyper::HeaderMap) {
    let named: Vec<hyper::header::HeaderName> = headers
        .get_all(hyper::header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| hyper::header::HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for h in named {
        headers.remove(h);
    }
    for h in HOP_BY_HOP {
        headers.remove(*h);
    }
}

/// The upstream client: one fresh loopback connection per request. llama-server closes a
/// connection after some answers (streamed ones among them) without saying so in advance, and a
/// request whose body streams through cannot be replayed on a new connection; a pooled
/// connection would turn that race into a 502. A loopback connect costs tens of microseconds.
pub fn client() -> Client<HttpConnector, ClientBody> {
    let mut connector = HttpConnector::new();
    connector.set_connect_timeout(Some(Duration::from_secs(5)));
    connector.set_nodelay(true);
    Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(0)
        // Header names travel as they were written, both ways (clients and llama.cpp's own
        // tests compare them as written: `Access-Control-Allow-Origin`); names spark adds are
        // written in title case, as llama-server writes its own.
        .http1_preserve_header_case(true)
        .http1_title_case_headers(true)
        .build(connector)
}

fn full(status: StatusCode, content_type: &str, body: impl Into<Bytes>) -> Response<ProxyBody> {
    let mut r = Response::new(
        Full::new(body.into())
            .map_err(|never| match never {})
            .boxed(),
    );
    *r.status_mut() = status;
    r.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_str(content_type).expect("static content type"),
    );
    r
}

fn error_json(status: StatusCode, message: &str) -> Response<ProxyBody> {
    let body = serde_json::json!({"error": {"code": status.as_u16(), "message": message, "type": "spark_proxy_error"}});
    full(status, "application/json", body.to_string())
}

/// Handles one request.
pub async fn handle(
    state: Arc<ServeState>,
    req: Request<Incoming>,
) -> Result<Response<ProxyBody>, BoxError> {
    let received = Instant::now();
    let path = req.uri().path();
    if path.starts_with("/spark/") && !state.api_keys.allows(req.headers()) {
        let body = serde_json::json!({"error": {"code": 401, "message": "Invalid API Key", "type": "authentication_error"}});
        let mut r = full(
            StatusCode::UNAUTHORIZED,
            "application/json",
            body.to_string(),
        );
        r.headers_mut().insert(
            hyper::header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Bearer"),
        );
        return Ok(r);
    }
    if let Some(a) = super::page::route(path, &state) {
        let mut r = full(a.status, a.content_type, a.body);
        if let Some(to) = a.location {
            r.headers_mut()
                .insert(hyper::header::LOCATION, HeaderValue::from_static(to));
        }
        return Ok(r);
    }
    match path {
        "/spark/status" => {
            return Ok(full(
                StatusCode::OK,
                "application/json",
                state.status_json().to_string(),
            ))
        }
        "/spark/metrics" => {
            return Ok(full(
                StatusCode::OK,
                "text/plain; version=0.0.4",
                state.metrics_text(),
            ))
        }
        _ => {}
    }
    // Methods llama-server's HTTP library does not take (an invented or 100 KB one) get its
    // answer, a 400 on a closed connection, from spark: never forwarded, never a 502.
    if !FORWARDED_METHODS.contains(req.method()) {
        let method = req.method().as_str();
        state.stats.record(&RequestRecord {
            route: req.uri().path().to_string(),
            status: 400,
            total: received.elapsed(),
            ..Default::default()
        });
        let mut r = error_json(
            StatusCode::BAD_REQUEST,
            &format!(
                "method {:?} is not supported",
                crate::text::clip(method, crate::text::QUOTE_MAX)
            ),
        );
        r.headers_mut()
            .insert(hyper::header::CONNECTION, HeaderValue::from_static("close"));
        return Ok(r);
    }
    let route = req.uri().path().to_string();
    let kind = route_kind(&route);
    let in_flight = state.stats.enter(kind);
    let Some(port) = state.keeper.port() else {
        state.stats.record(&RequestRecord {
            route,
            status: 503,
            total: received.elapsed(),
            ..Default::default()
        });
        let mut r = error_json(
            StatusCode::SERVICE_UNAVAILABLE,
            &format!(
                "llama-server is not ready ({})",
                state.keeper.phase().name()
            ),
        );
        r.headers_mut()
            .insert(RETRY_AFTER, HeaderValue::from_static("1"));
        return Ok(r);
    };
    let declared = req
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > state.max_body) {
        return Ok(too_large(&state, route, received));
    }
    let (mut parts, body) = req.into_parts();
    // `OPTIONS *` (asterisk form) asks about the server as a whole; the upstream client sends
    // origin-form only, and llama-server answers `OPTIONS /` exactly as it answers `OPTIONS *`.
    let pq = match parts.uri.path_and_query().map(|p| p.as_str()) {
        Some("*") | None => "/",
        Some(pq) => pq,
    };
    parts.uri = format!("http://127.0.0.1:{port}{pq}").parse()?;
    strip_hop_by_hop(&mut parts.headers);
    parts
        .headers
        .insert(HOST, HeaderValue::from_str(&format!("127.0.0.1:{port}"))?);
    let fault = Arc::new(OnceLock::new());
    let body = ClientBody {
        inner: body,
        left: state.max_body,
        fault: fault.clone(),
        deadline: Box::pin(tokio::time::sleep(state.body_timeout)),
    };
    let upstream = Request::from_parts(parts, body);
    let pending = Pending {
        state: &state,
        route: Some(route),
        received,
    };
    let answer = tokio::time::timeout(state.request_timeout, state.client.request(upstream)).await;
    let route = pending.disarm();
    let resp = match answer {
        Ok(Ok(resp)) => resp,
        Ok(Err(e)) => {
            match fault.get() {
                Some(BodyFault::TooLarge) => return Ok(too_large(&state, route, received)),
                Some(BodyFault::TooSlow) => {
                    state.stats.record(&RequestRecord {
                        route,
                        status: 408,
                        total: received.elapsed(),
                        ..Default::default()
                    });
                    let mut r = error_json(
                        StatusCode::REQUEST_TIMEOUT,
                        &format!(
                            "request body not received within {} s (spark serve --body-timeout)",
                            state.body_timeout.as_secs()
                        ),
                    );
                    // The rest of the body is never read: the connection cannot carry another
                    // request.
                    r.headers_mut()
                        .insert(hyper::header::CONNECTION, HeaderValue::from_static("close"));
                    return Ok(r);
                }
                Some(BodyFault::Invalid(why)) => {
                    state.stats.record(&RequestRecord {
                        route,
                        status: 400,
                        total: received.elapsed(),
                        ..Default::default()
                    });
                    return Ok(error_json(
                        StatusCode::BAD_REQUEST,
                        &format!("invalid request body: {why}"),
                    ));
                }
                None => {}
            }
            state.stats.record(&RequestRecord {
                route,
                status: 502,
                total: received.elapsed(),
                aborted: true,
                ..Default::default()
            });
            return Ok(error_json(
                StatusCode::BAD_GATEWAY,
                &format!("llama-server failed: {e}"),
            ));
        }
        Err(_) => {
            state.stats.record(&RequestRecord {
                route,
                status: 504,
                total: received.elapsed(),
                aborted: true,
                ..Default::default()
            });
            return Ok(error_json(
                StatusCode::GATEWAY_TIMEOUT,
                &format!(
                    "llama-server sent no answer within {} s",
                    state.request_timeout.as_secs()
                ),
            ));
        }
    };
    let (mut parts, body) = resp.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    let status = parts.status.as_u16();
    let streamed = parts
        .headers
        .get(CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"text/event-stream"));
    // A body without a length can be ended properly when llama-server breaks off: with the
    // chunked terminator, after an error event when it is a stream of events.
    let end_on_error = match parts.headers.contains_key(CONTENT_LENGTH) {
        true => None,
        false if streamed && route.ends_with("/messages") => Some(ErrorEnd::AnthropicEvent),
        false if streamed => Some(ErrorEnd::Event),
        false => Some(ErrorEnd::Terminator),
    };
    let metered = Metered {
        inner: body,
        state: state.clone(),
        record: RequestRecord {
            route,
            status,
            ..Default::default()
        },
        received,
        tail: Vec::new(),
        head: Vec::new(),
        streamed,
        last_byte: None,
        kind,
        in_flight,
        idle: Box::pin(tokio::time::sleep(state.idle_timeout)),
        idle_timeout: state.idle_timeout,
        done: false,
        end_on_error,
        ended: false,
    };
    Ok(Response::from_parts(parts, metered.boxed()))
}

fn too_large(state: &ServeState, route: String, received: Instant) -> Response<ProxyBody> {
    state.stats.record(&RequestRecord {
        route,
        status: 413,
        total: received.elapsed(),
        ..Default::default()
    });
    error_json(
        StatusCode::PAYLOAD_TOO_LARGE,
        &format!(
            "request body over {} bytes (spark serve --max-body)",
            state.max_body
        ),
    )
}

/// A response body that forwards frames as they come and meters them; records the request
/// when the body ends (or is dropped early). A silent upstream for `idle_timeout` ends the body
/// with an error instead of hanging the client.
struct Metered {
    inner: Incoming,
    state: Arc<ServeState>,
    record: RequestRecord,
    received: Instant,
    tail: Vec<u8>,
    head: Vec<u8>,
    /// A server-sent-events answer: tokens arrive as they are generated.
    streamed: bool,
    last_byte: Option<Duration>,
    kind: RouteKind,
    in_flight: Option<InFlight>,
    idle: Pin<Box<tokio::time::Sleep>>,
    idle_timeout: Duration,
    done: bool,
    /// How to end the client's body when llama-server's breaks off (`None`: a body with a
    /// length, which can only be cut).
    end_on_error: Option<ErrorEnd>,
    /// The body was ended after an error: the next poll reports the end.
    ended: bool,
}

/// How a chunked answer is ended when llama-server's answer breaks off mid-way (it died, or
/// went silent past `--idle-timeout`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ErrorEnd {
    /// Just the chunked terminator.
    Terminator,
    /// An error event as llama-server streams one (`data: {"error": …}`), then the terminator.
    Event,
    /// The Anthropic Messages API's error event (`event: error`), then the terminator.
    AnthropicEvent,
}

impl ErrorEnd {
    /// The last frame before the terminator, if any.
    fn frame(self, message: &str) -> Option<Bytes> {
        let text = match self {
            ErrorEnd::Terminator => return None,
            ErrorEnd::Event => format!(
                "data: {}\n\n",
                serde_json::json!({"error": {"code": 500, "message": message, "type": "server_error"}})
            ),
            ErrorEnd::AnthropicEvent => format!(
                "event: error\ndata: {}\n\n",
                serde_json::json!({"type": "error", "error": {"type": "api_error", "message": message}})
            ),
        };
        Some(Bytes::from(text))
    }
}

impl Metered {
    /// Ends the client's body after llama-server's broke off with `message`: an error event
    /// and the terminator where the framing allows, else an error (the connection is cut).
    fn break_off(&mut self, message: String) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.finish(true);
        match self.end_on_error {
            None => Poll::Ready(Some(Err(message.into()))),
            Some(end) => {
                self.ended = true;
                match end.frame(&message) {
                    Some(b) => Poll::Ready(Some(Ok(Frame::data(b)))),
                    None => Poll::Ready(None),
                }
            }
        }
    }
}

impl Metered {
    fn finish(&mut self, aborted: bool) {
        if self.done {
            return;
        }
        self.done = true;
        self.record.total = self.received.elapsed();
        self.record.aborted = aborted;
        let tokens = parse_answer(&self.head, &self.tail);
        self.record.prompt_tokens = tokens.prompt;
        self.record.generated_tokens = tokens.generated;
        self.record.decode_tps = tokens.decode_tps.or_else(|| self.measured_tps());
        self.state.stats.record(&self.record);
        self.in_flight = None;
        if !aborted && self.record.status < 400 {
            self.state
                .keeper
                .served
                .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        }
        if !aborted && self.record.status < 400 && self.kind != RouteKind::Probe {
            self.state
                .request_completed(self.kind == RouteKind::Generate);
        }
    }

    /// Decode speed of a streamed answer whose end carries no `timings` (the Anthropic
    /// Messages API): the first token arrives with the first body byte, every later one until
    /// the last byte.
    fn measured_tps(&self) -> Option<f64> {
        let (first, last) = (self.record.first_byte?, self.last_byte?);
        let n = self.record.generated_tokens?;
        let secs = last.saturating_sub(first).as_secs_f64();
        (self.streamed && n >= 2 && secs > 0.0).then(|| (n - 1) as f64 / secs)
    }
}

impl Body for Metered {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        if this.ended {
            return Poll::Ready(None);
        }
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    if this.record.first_byte.is_none() {
                        this.record.first_byte = Some(this.received.elapsed());
                    }
                    this.last_byte = Some(this.received.elapsed());
                    this.record.chunks += 1;
                    this.record.bytes += data.len() as u64;
                    if this.head.len() < HEAD_BYTES {
                        let take = data.len().min(HEAD_BYTES - this.head.len());
                        this.head.extend_from_slice(&data[..take]);
                    }
                    this.tail.extend_from_slice(data);
                    if this.tail.len() > 2 * TAIL_BYTES {
                        this.tail.drain(..this.tail.len() - TAIL_BYTES);
                    }
                }
                let deadline = tokio::time::Instant::now() + this.idle_timeout;
                this.idle.as_mut().reset(deadline);
                // hyper stops polling once the body says it has ended, so the end is noticed
                // here rather than by a final `None`.
                if this.inner.is_end_stream() {
                    this.finish(false);
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => {
                this.break_off(format!("llama-server's answer broke off: {e}"))
            }
            Poll::Ready(None) => {
                this.finish(false);
                Poll::Ready(None)
            }
            Poll::Pending => match this.idle.as_mut().poll(cx) {
                Poll::Ready(()) => this.break_off(format!(
                    "llama-server sent nothing for {} s",
                    this.idle_timeout.as_secs()
                )),
                Poll::Pending => Poll::Pending,
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        self.ended || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        match self.end_on_error {
            // The error event may add bytes to a body of unknown length.
            Some(_) => hyper::body::SizeHint::default(),
            None => self.inner.size_hint(),
        }
    }
}

impl Drop for Metered {
    fn drop(&mut self) {
        // The client went away (or the connection closed) before the end.
        self.finish(true);
    }
}

use std::future::Future as _;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_named_in_connection_are_hop_by_hop_too() {
        let mut h = hyper::HeaderMap::new();
        h.insert(
            "connection",
            HeaderValue::from_static("close, X-Hop ,x-other"),
        );
        h.append("connection", HeaderValue::from_static("X-Third"));
        for n in ["x-hop", "x-other", "x-third", "keep-alive", "x-end-to-end"] {
            h.insert(n, HeaderValue::from_static("1"));
        }
        strip_hop_by_hop(&mut h);
        let left: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(left, vec!["x-end-to-end"]);
    }
}
