//! Accepting client connections for `spark serve`: at most `max_connections` are served at once
//! (one more gets a short 503 with `Retry-After` and is closed; those answers are bounded too),
//! every request's headers must arrive within the header deadline (idle keep-alive connections
//! included), and an accept error such as EMFILE pauses accepting for a growing while (10 ms
//! doubling to 1 s) with one log line per second at most, so a full descriptor table neither
//! spins the loop nor floods the log.
//!
//! Listens where llama-server would: `--host` takes several addresses separated by commas
//! (`127.0.0.1,::1`), each bound on the same port, and connections are accepted from all of them.
//!
//! Owns the connection tasks and their counters; never touches a request's content (that is
//! [`super::proxy`]).

use std::convert::Infallible;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{HeaderValue, CONTENT_TYPE, RETRY_AFTER};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use super::ServeState;

/// The addresses of a `--host` value: comma-separated as llama-server takes them, blanks
/// around each trimmed, an IPv6 literal with or without brackets. An empty entry is an error.
pub fn hosts(spec: &str) -> Result<Vec<String>, String> {
    spec.split(',')
        .map(|h| {
            let h = h.trim();
            let h = h
                .strip_prefix('[')
                .and_then(|x| x.strip_suffix(']'))
                .unwrap_or(h);
            match h.is_empty() {
                true => Err(format!(
                    "--host {:?}: an empty address in the list",
                    crate::text::clip(spec, 200)
                )),
                false => Ok(h.to_string()),
            }
        })
        .collect()
}

/// Binds every host of `hosts` on `port`. With port 0 the first address picks a free port and
/// the others bind that same one, so a client reaches the server on one port whatever the
/// address. Fails on the first address that cannot be bound, naming it.
pub async fn bind_all(hosts: &[String], port: u16) -> Result<Vec<TcpListener>, super::ServeError> {
    let mut out: Vec<TcpListener> = Vec::with_capacity(hosts.len());
    let mut port = port;
    for h in hosts {
        let l = TcpListener::bind((h.as_str(), port))
            .await
            .map_err(|source| super::ServeError::Listen {
                addr: match h.contains(':') {
                    true => format!("[{h}]:{port}"),
                    false => format!("{h}:{port}"),
                },
                source,
            })?;
        if port == 0 {
            port = l.local_addr().map_err(super::ServeError::Runtime)?.port();
        }
        out.push(l);
    }
    Ok(out)
}

/// Accepts the next connection on any of `listeners`, starting the search after the one that
/// accepted last (`next`), so one busy address cannot starve the others.
pub async fn accept_any(
    listeners: &[TcpListener],
    next: &mut usize,
) -> io::Result<(TcpStream, std::net::SocketAddr)> {
    std::future::poll_fn(|cx| {
        let n = listeners.len();
        for i in 0..n {
            let k = (*next + i) % n;
            if let std::task::Poll::Ready(r) = listeners[k].poll_accept(cx) {
                *next = (k + 1) % n;
                return std::task::Poll::Ready(r);
            }
        }
        std::task::Poll::Pending
    })
    .await
}

/// Connections that may be held at once just to answer "busy"; beyond them a connection over
/// the cap is closed without an answer.
const BUSY_ANSWERS: usize = 64;
/// How long a connection over the cap may take to send its request and read the 503.
const BUSY_WITHIN: Duration = Duration::from_secs(2);

/// The connection cap and what happened at it.
#[derive(Debug)]
pub struct Connections {
    pub max: usize,
    pub header_timeout: Duration,
    slots: Arc<Semaphore>,
    busy: Arc<Semaphore>,
    /// Connections turned away because `max` were open.
    pub rejected: AtomicU64,
    /// Failed `accept` calls (EMFILE and the like).
    pub accept_errors: AtomicU64,
}

impl Connections {
    pub fn new(max: usize, header_timeout: Duration) -> Connections {
        Connections {
            max,
            header_timeout,
            slots: Arc::new(Semaphore::new(max)),
            busy: Arc::new(Semaphore::new(BUSY_ANSWERS)),
            rejected: AtomicU64::new(0),
            accept_errors: AtomicU64::new(0),
        }
    }

    /// Client connections being served now.
    pub fn open(&self) -> usize {
        self.max - self.slots.available_permits()
    }
}

/// Serves one accepted connection on a task in `tasks`: proxied when under the cap (watched by
/// `graceful`), else answered 503 and closed.
pub fn serve(
    stream: TcpStream,
    state: &Arc<ServeState>,
    graceful: &GracefulShutdown,
    tasks: &mut JoinSet<()>,
) {
    let _ = stream.set_nodelay(true);
    let conns = &state.connections;
    let Ok(slot) = conns.slots.clone().try_acquire_owned() else {
        conns.rejected.fetch_add(1, Ordering::Relaxed);
        if let Ok(busy) = conns.busy.clone().try_acquire_owned() {
            tasks.spawn(async move {
                let conn = http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(BUSY_WITHIN)
                    .title_case_headers(true)
                    .keep_alive(false)
                    .serve_connection(TokioIo::new(stream), service_fn(|_req| busy_answer()));
                let _ = tokio::time::timeout(BUSY_WITHIN, conn).await;
                drop(busy);
            });
        }
        return;
    };
    let st = state.clone();
    let conn = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(conns.header_timeout)
        // Answers look like llama-server's: header names as llama-server wrote them (spark's
        // own in title case, as llama-server writes its own), and no `Date`, which it never
        // sends.
        .preserve_header_case(true)
        .title_case_headers(true)
        .auto_date_header(false)
        .serve_connection(
            TokioIo::new(stream),
            service_fn(move |req| super::proxy::handle(st.clone(), req)),
        );
    let conn = graceful.watch(conn);
    tasks.spawn(async move {
        let _ = conn.await;
        drop(slot);
    });
}

async fn busy_answer() -> Result<Response<Full<Bytes>>, Infallible> {
    let body = serde_json::json!({"error": {"code": 503, "message": "spark serve has too many open connections (--max-connections)", "type": "spark_proxy_error"}});
    let mut r = Response::new(Full::new(Bytes::from(body.to_string())));
    *r.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r.headers_mut()
        .insert(RETRY_AFTER, HeaderValue::from_static("1"));
    Ok(r)
}

/// Errors that concern one connection only (it was reset before it was accepted): accept the
/// next one at once.
pub fn is_per_connection(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionRefused
            | io::ErrorKind::Interrupted
    )
}

/// The pause after failed accepts: 10 ms, doubling up to 1 s, back to 10 ms after an accept
/// succeeds; a log line at most once a second, saying how many failures it stands for.
#[derive(Debug)]
pub struct AcceptBackoff {
    next: Duration,
    last_log: Option<Instant>,
    unlogged: u64,
}

impl Default for AcceptBackoff {
    fn default() -> Self {
        AcceptBackoff {
            next: Self::FIRST,
            last_log: None,
            unlogged: 0,
        }
    }
}

/// What to do after a failed accept.
#[derive(Debug, PartialEq, Eq)]
pub struct Pause {
    pub sleep: Duration,
    /// `Some(n)`: log now, for the `n` failures since the last line (this one included).
    pub log: Option<u64>,
}

impl AcceptBackoff {
    pub const FIRST: Duration = Duration::from_millis(10);
    pub const MAX: Duration = Duration::from_secs(1);
    pub const LOG_EVERY: Duration = Duration::from_secs(1);

    pub fn failed(&mut self, now: Instant) -> Pause {
        let sleep = self.next;
        self.next = (self.next * 2).min(Self::MAX);
        self.unlogged += 1;
        let due = self
            .last_log
            .map_or(true, |t| now.duration_since(t) >= Self::LOG_EVERY);
        let log = due.then(|| {
            self.last_log = Some(now);
            std::mem::take(&mut self.unlogged)
        });
        Pause { sleep, log }
    }

    pub fn succeeded(&mut self) {
        self.next = Self::FIRST;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_failures_pause_longer_and_log_once_a_second() {
        let mut b = AcceptBackoff::default();
        let t0 = Instant::now();
        let mut now = t0;
        let mut sleeps = Vec::new();
        let mut logs = Vec::new();
        // Ten seconds of failing accepts, sleeping as told.
        while now < t0 + Duration::from_secs(10) {
            let p = b.failed(now);
            sleeps.push(p.sleep.as_millis());
            if let Some(n) = p.log {
                logs.push(n);
            }
            now += p.sleep;
        }
        assert_eq!(
            &sleeps[..8],
            &[10, 20, 40, 80, 160, 320, 640, 1000],
            "{sleeps:?}"
        );
        assert!(sleeps[8..].iter().all(|&s| s == 1000), "{sleeps:?}");
        assert_eq!(sleeps.len(), 16, "{sleeps:?}");
        // One line per second at most, and together they account for every failure.
        assert!(logs.len() <= 11, "{logs:?}");
        assert_eq!(logs.iter().sum::<u64>() + b.unlogged, sleeps.len() as u64);
        assert_eq!(logs[0], 1, "the first failure is reported at once");
        b.succeeded();
        assert_eq!(b.failed(now).sleep, AcceptBackoff::FIRST);
    }

    #[test]
    fn only_per_connection_errors_skip_the_pause() {
        assert!(is_per_connection(&io::Error::from(
            io::ErrorKind::ConnectionAborted
        )));
        assert!(!is_per_connection(&io::Error::from_raw_os_error(
            nix::libc::EMFILE
        )));
        assert!(!is_per_connection(&io::Error::from_raw_os_error(
            nix::libc::ENFILE
        )));
    }
}
