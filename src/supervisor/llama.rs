//! One llama-server child: start it on a free loopback port, wait until `/health` answers,
//! talk to it over HTTP with timeouts, stop it.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::child::{ChildGroup, SpawnError};

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(transparent)]
    Spawn(#[from] SpawnError),
    #[error("start llama-server: {0}")]
    Io(#[from] std::io::Error),
    #[error(
        "start llama-server: it exited with {status} before it was ready; last log lines:\n{log}"
    )]
    ExitedEarly { status: String, log: String },
    #[error("start llama-server: not ready after {secs} s; last log lines:\n{log}")]
    NotReady { secs: u64, log: String },
    #[error("request {route}: {message}")]
    Http { route: String, message: String },
    #[error("start llama-server with the tap: {0}")]
    Launch(String),
}

impl ServerError {
    pub fn is_timeout(&self) -> bool {
        matches!(self, ServerError::NotReady { .. })
    }
}

/// How to start llama-server.
#[derive(Debug, Clone)]
pub struct LlamaServerConfig {
    pub binary: PathBuf,
    pub model: PathBuf,
    pub port: Option<u16>,
    /// Extra arguments passed through unchanged (they win over spark's defaults).
    pub extra_args: Vec<String>,
    pub env: Vec<(String, String)>,
    pub ready_timeout: Duration,
    pub log_path: PathBuf,
}

/// What one health probe found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Probe {
    Healthy,
    /// No answer within the deadline, or not a 200.
    Failed(String),
    /// Spark could not send the probe (out of descriptors, say): nothing learnt of the server.
    Inconclusive(String),
}

/// A running llama-server.
pub struct LlamaServer {
    child: ChildGroup,
    pub port: u16,
    pub log_path: PathBuf,
    agent: ureq::Agent,
}

/// A port on 127.0.0.1 that was free a moment ago.
pub fn free_port() -> std::io::Result<u16> {
    Ok(TcpListener::bind(("127.0.0.1", 0))?.local_addr()?.port())
}

impl LlamaServer {
    /// Starts the server and waits for `/health` until the ready deadline.
    pub fn start(cfg: &LlamaServerConfig) -> Result<LlamaServer, ServerError> {
        Self::start_inheriting(cfg, &[])
    }

    /// Like [`LlamaServer::start`], and the child inherits the descriptors in `inherit` (open
    /// in this process, normally close-on-exec) under the same numbers, e.g. the tap's end of
    /// the control socket.
    pub fn start_inheriting(
        cfg: &LlamaServerConfig,
        inherit: &[std::os::fd::RawFd],
    ) -> Result<LlamaServer, ServerError> {
        let port = match cfg.port {
            Some(p) => p,
            None => free_port()?,
        };
        // Private: the log may hold prompts.
        let log = crate::atomic_file::create_private(&cfg.log_path)?;
        let mut cmd = Command::new(&cfg.binary);
        cmd.arg("-m").arg(&cfg.model);
        cmd.args(["--host", "127.0.0.1", "--port", &port.to_string()]);
        cmd.args(&cfg.extra_args);
        cmd.envs(cfg.env.iter().map(|(k, v)| (k, v)));
        if let Some(lib) = cfg
            .binary
            .parent()
            .and_then(Path::parent)
            .map(|p| p.join("lib"))
        {
            if lib.is_dir() {
                let old = std::env::var("LD_LIBRARY_PATH").unwrap_or_default();
                cmd.env(
                    "LD_LIBRARY_PATH",
                    if old.is_empty() {
                        lib.display().to_string()
                    } else {
                        format!("{}:{old}", lib.display())
                    },
                );
            }
        }
        cmd.stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        super::child::inherit_fds(&mut cmd, inherit);
        let child = ChildGroup::spawn(&mut cmd)?;
        let agent = ureq::AgentBuilder::new()
            .timeout_connect(Duration::from_secs(2))
            .timeout(Duration::from_secs(120))
            .build();
        let mut server = LlamaServer {
            child,
            port,
            log_path: cfg.log_path.clone(),
            agent,
        };
        server.wait_ready(cfg.ready_timeout)?;
        Ok(server)
    }

    fn wait_ready(&mut self, timeout: Duration) -> Result<(), ServerError> {
        let deadline = Instant::now() + timeout;
        let probe = ureq::AgentBuilder::new()
            .timeout(Duration::from_secs(1))
            .build();
        loop {
            if let Some(status) = self.child.try_status() {
                return Err(ServerError::ExitedEarly {
                    status: status.to_string(),
                    log: self.log_tail(20),
                });
            }
            if let Ok(resp) = probe.get(&self.url("/health")).call() {
                if resp.status() == 200 {
                    return Ok(());
                }
            }
            if Instant::now() >= deadline {
                self.child.stop(Duration::from_secs(2));
                return Err(ServerError::NotReady {
                    secs: timeout.as_secs(),
                    log: self.log_tail(20),
                });
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn url(&self, route: &str) -> String {
        format!("http://127.0.0.1:{}{route}", self.port)
    }

    pub fn pid(&self) -> u32 {
        self.child.pid()
    }

    /// A handle that kills this server's process group from another thread.
    pub fn killer(&self) -> super::child::GroupKiller {
        self.child.killer()
    }

    /// The exit status, if the server has exited (never blocks).
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_status()
    }

    /// POSTs JSON to `route` and returns the JSON answer.
    pub fn post_json(
        &self,
        route: &str,
        body: &serde_json::Value,
    ) -> Result<serde_json::Value, ServerError> {
        let http = |message: String| ServerError::Http {
            route: route.to_string(),
            message,
        };
        let resp = self
            .agent
            .post(&self.url(route))
            .send_json(body)
            .map_err(|e| http(e.to_string()))?;
        resp.into_json().map_err(|e| http(e.to_string()))
    }

    /// The last `n` lines of the server's log.
    pub fn log_tail(&self, n: usize) -> String {
        let text = std::fs::read_to_string(&self.log_path).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// One `GET /health` with a deadline of `timeout` (a stopped or hung server accepts the
    /// connection and never answers).
    pub fn probe_health(&self, timeout: Duration) -> Probe {
        let agent = ureq::AgentBuilder::new()
            .timeout_connect(timeout)
            .timeout(timeout)
            .build();
        match agent.get(&self.url("/health")).call() {
            Ok(resp) if resp.status() == 200 => Probe::Healthy,
            Ok(resp) => Probe::Failed(format!("/health answered {}", resp.status())),
            Err(ureq::Error::Status(code, _)) => Probe::Failed(format!("/health answered {code}")),
            Err(ureq::Error::Transport(t)) => {
                // Out of descriptors or memory here says nothing about the server.
                let mut source: Option<&(dyn std::error::Error + 'static)> = Some(&t);
                while let Some(e) = source {
                    let local = e
                        .downcast_ref::<std::io::Error>()
                        .and_then(std::io::Error::raw_os_error)
                        .is_some_and(|c| {
                            [
                                nix::libc::EMFILE,
                                nix::libc::ENFILE,
                                nix::libc::ENOBUFS,
                                nix::libc::ENOMEM,
                            ]
                            .contains(&c)
                        });
                    if local {
                        return Probe::Inconclusive(format!("/health: {t}"));
                    }
                    source = e.source();
                }
                Probe::Failed(format!("/health: {t}"))
            }
        }
    }

    /// Stops the server (SIGTERM, grace, SIGKILL).
    pub fn stop(self) {
        self.stop_within(Duration::from_secs(5));
    }

    /// Stops the server: SIGTERM, up to `grace` to exit, then SIGKILL. Returns how it ended.
    pub fn stop_within(mut self, grace: Duration) -> Option<std::process::ExitStatus> {
        self.child.stop(grace)
    }
}
