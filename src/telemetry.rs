//! A llama-server with the routing tap preloaded: ring, control channel, greeting, requests.
//!
//! Owns one telemetry session: creates the ring, the control socket pair, finds the tap
//! library, has the supervisor start llama-server with `LD_PRELOAD`, `SPARK_RING_FD` and
//! `SPARK_CONTROL_FD`, reads the greeting, stamps requests, and drains records while a request
//! runs (a drainer thread, so the ring does not overrun on long prompts). Never spawns or kills
//! a process itself (the supervisor does) and never waits without a deadline: a server that
//! dies mid-request surfaces as an error from the HTTP call or the control channel.
//!
//! The one place a tapped child's environment is set up ([`TapEnv`]): llama-server here and in
//! `spark serve`'s keeper, llama-bench in `spark bench residency`.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use std::os::fd::RawFd;

use spark_proto::control::{Command, Greeting, HiddenConfig};
use spark_proto::hook::{
    SlotCounts, ENV_OFFLOAD_MIN_BATCH, ENV_RESIDENCY_METER, ENV_RESIDENCY_SLOTS,
};
use spark_proto::ring::{
    HiddenChunk, RingGeometry, ENV_CONTROL_FD, ENV_HIDDEN_RING_FD, ENV_RING_FD,
};
use spark_proto::trace::RoutingRecord;

use crate::control::{self, ControlClient, ControlError};
use crate::gguf::{GgufError, GgufFile, MoeGeometry};
use crate::ring::{HiddenRing, RingError, ShmRing};
use crate::supervisor::{LlamaServer, LlamaServerConfig, ServerError};

/// File name of the tap library.
pub const TAP_FILE: &str = "libspark_tap.so";
/// Environment variable naming the tap library explicitly.
pub const ENV_TAP: &str = "SPARK_TAP";

#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("find the tap library: {0}")]
    NoTap(String),
    #[error(transparent)]
    Gguf(#[from] GgufError),
    #[error(transparent)]
    Ring(#[from] RingError),
    #[error(transparent)]
    Control(#[from] ControlError),
    #[error(transparent)]
    Server(#[from] ServerError),
    #[error("run request {request}: llama-server exited during the request ({status}); last log lines:\n{log}")]
    ServerDied {
        request: u32,
        status: String,
        log: String,
    },
    #[error("run request {request}: {message}")]
    Request { request: u32, message: String },
}

impl TelemetryError {
    pub fn is_timeout(&self) -> bool {
        match self {
            TelemetryError::Control(e) => e.is_timeout(),
            TelemetryError::Server(e) => e.is_timeout(),
            _ => false,
        }
    }

    /// A problem with what the user passed (model file, tap path), as opposed to a runtime
    /// failure.
    pub fn is_usage(&self) -> bool {
        matches!(self, TelemetryError::NoTap(_) | TelemetryError::Gguf(_))
    }
}

/// Finds the tap: `explicit`, else `$SPARK_TAP`, else next to the running executable (or its
/// parent directory, for test binaries in `target/*/deps`).
pub fn locate_tap(explicit: Option<&Path>) -> Result<PathBuf, TelemetryError> {
    let candidate = explicit.map(Path::to_path_buf).or_else(|| {
        std::env::var_os(ENV_TAP)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    });
    if let Some(p) = candidate {
        return if p.is_file() {
            Ok(p)
        } else {
            Err(TelemetryError::NoTap(format!(
                "{} does not exist",
                p.display()
            )))
        };
    }
    let exe = std::env::current_exe().map_err(|e| TelemetryError::NoTap(e.to_string()))?;
    let mut tried = Vec::new();
    let mut dir = exe.parent();
    for _ in 0..2 {
        let Some(d) = dir else { break };
        let p = d.join(TAP_FILE);
        if p.is_file() {
            return Ok(p);
        }
        tried.push(p.display().to_string());
        dir = d.parent();
    }
    Err(TelemetryError::NoTap(format!(
        "not found at {}; build it with `cargo build -p spark-tap`, or pass --tap PATH or set {ENV_TAP}",
        tried.join(", ")
    )))
}

/// What the tap's residency provider does in a child.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Provider {
    /// Serve experts from slots: this many in every expert layer, or a count per layer
    /// (`SPARK_RESIDENCY_SLOTS`).
    Slots(SlotCounts),
    /// No slots: decline every call and count what the stock copy moves
    /// (`SPARK_RESIDENCY_METER=1`).
    Meter,
}

/// Every variable through which spark speaks to the tap and the hooked scheduler in a child.
pub const TAP_VARS: [&str; 7] = [
    "LD_PRELOAD",
    ENV_OFFLOAD_MIN_BATCH,
    ENV_RESIDENCY_SLOTS,
    ENV_RESIDENCY_METER,
    ENV_RING_FD,
    ENV_HIDDEN_RING_FD,
    ENV_CONTROL_FD,
];

/// The environment of a tapped child: the tap preloaded, the descriptors of its rings and
/// control channel, the residency provider's setting, and the scheduler setting that sends
/// decode's expert products to the device (so the hook sees them). Nothing set is nothing
/// passed.
#[derive(Debug, Clone, Default)]
pub struct TapEnv {
    /// `GGML_OP_OFFLOAD_MIN_BATCH=1`.
    pub offload_min_batch: bool,
    /// The tap library, preloaded.
    pub tap: Option<PathBuf>,
    pub ring_fd: Option<RawFd>,
    pub control_fd: Option<RawFd>,
    pub hidden_ring_fd: Option<RawFd>,
    pub provider: Option<Provider>,
}

impl TapEnv {
    /// The variables, in a fixed order.
    pub fn vars(&self) -> Vec<(String, String)> {
        let mut v: Vec<(String, String)> = Vec::new();
        let mut set = |k: &str, val: String| v.push((k.to_string(), val));
        if self.offload_min_batch {
            set(ENV_OFFLOAD_MIN_BATCH, "1".into());
        }
        if let Some(t) = &self.tap {
            set("LD_PRELOAD", t.display().to_string());
        }
        if let Some(fd) = self.ring_fd {
            set(ENV_RING_FD, fd.to_string());
        }
        if let Some(fd) = self.control_fd {
            set(ENV_CONTROL_FD, fd.to_string());
        }
        if let Some(fd) = self.hidden_ring_fd {
            set(ENV_HIDDEN_RING_FD, fd.to_string());
        }
        match &self.provider {
            Some(Provider::Slots(n)) => set(ENV_RESIDENCY_SLOTS, n.to_env()),
            Some(Provider::Meter) => set(ENV_RESIDENCY_METER, "1".into()),
            None => {}
        }
        v
    }

    /// The descriptors the child must inherit.
    pub fn fds(&self) -> Vec<RawFd> {
        [self.control_fd, self.ring_fd, self.hidden_ring_fd]
            .into_iter()
            .flatten()
            .collect()
    }

    /// Sets up `cmd` (a short tool such as llama-bench): every variable of [`TAP_VARS`] the
    /// parent has is removed first, so only what this says reaches the child; then these are
    /// set and the descriptors inherited.
    pub fn apply(&self, cmd: &mut std::process::Command) {
        for k in TAP_VARS {
            cmd.env_remove(k);
        }
        for (k, v) in self.vars() {
            cmd.env(k, v);
        }
        crate::supervisor::inherit_fds(cmd, &self.fds());
    }
}

/// How to start a tapped (or, for comparison, untapped) llama-server.
#[derive(Debug, Clone)]
pub struct SessionConfig {
    pub llama_server: PathBuf,
    pub model: PathBuf,
    /// None: start llama-server without the tap (the baseline of `spark bench tap`).
    pub tap: Option<PathBuf>,
    pub extra_args: Vec<String>,
    /// Extra environment of the child (for example the residency provider's slots, or the
    /// Vulkan device to use).
    pub env: Vec<(String, String)>,
    pub ring_capacity: u64,
    /// Slots of a hidden-state ring (4 KiB each); None: no hidden-state capture possible.
    pub hidden_capacity: Option<u64>,
    pub ready_timeout: Duration,
    pub log_path: PathBuf,
}

/// A running llama-server and, when tapped, its ring and control channel.
pub struct Session {
    server: Option<LlamaServer>,
    ring: Option<ShmRing>,
    hidden: Option<HiddenRing>,
    /// Hidden-state chunks drained so far (when kept).
    pub hidden_chunks: Vec<HiddenChunk>,
    /// Keep drained hidden-state chunks (false: count them only).
    pub keep_hidden: bool,
    /// Hidden-state chunks drained so far, kept or not.
    pub hidden_drained: u64,
    control: Option<ControlClient>,
    pub greeting: Option<Greeting>,
    pub geometry: MoeGeometry,
    pub fingerprint: String,
    agent: ureq::Agent,
}

/// What one completion returned.
#[derive(Debug, Clone)]
pub struct Completion {
    pub content: String,
    /// Generated token ids, in order.
    pub tokens: Vec<u32>,
    /// Decode tokens per second as llama-server measured it.
    pub predicted_per_second: Option<f64>,
    /// Prompt tokens per second as llama-server measured it.
    pub prompt_per_second: Option<f64>,
}

/// Deadline for one control command.
pub const CONTROL_TIMEOUT: Duration = Duration::from_secs(10);

/// The ring geometry of a model.
pub fn ring_geometry(g: &MoeGeometry) -> RingGeometry {
    RingGeometry {
        n_layer: g.n_layer,
        n_expert: g.n_expert,
        n_expert_used: g.n_expert_used,
        n_embd: g.n_embd as u32,
    }
}

/// A llama-server started with the tap: its rings (anonymous memory), its control channel and
/// the tap's greeting.
pub struct Tapped {
    pub server: LlamaServer,
    pub ring: ShmRing,
    pub hidden: Option<HiddenRing>,
    pub control: ControlClient,
    pub greeting: Greeting,
}

/// Starts llama-server as `server_cfg` says, with the tap preloaded, a fresh routing ring (and a
/// hidden-state ring when `hidden_capacity` is given) and a control socket pair; waits for the
/// tap's greeting. The rings are anonymous memory files the child inherits by descriptor
/// (`SPARK_RING_FD`, `SPARK_HIDDEN_RING_FD`): they have no name at any moment, so no way of
/// killing spark, before or after the greeting, can leave anything in /dev/shm. The one place a
/// tapped child is set up: sessions and `spark serve`'s keeper both call it.
pub fn launch_tapped(
    server_cfg: &LlamaServerConfig,
    tap: &Path,
    geometry: RingGeometry,
    ring_capacity: u64,
    hidden_capacity: Option<u64>,
) -> Result<Tapped, TelemetryError> {
    let ring = ShmRing::create(ring_capacity, geometry)?;
    let hidden = match hidden_capacity {
        Some(c) => Some(HiddenRing::create(c, geometry)?),
        None => None,
    };
    let (mut control, theirs) = control::pair()?;
    use std::os::fd::AsRawFd;
    let tap_env = TapEnv {
        tap: Some(tap.to_path_buf()),
        ring_fd: Some(ring.fd()),
        control_fd: Some(theirs.as_raw_fd()),
        hidden_ring_fd: hidden.as_ref().map(|h| h.fd()),
        ..TapEnv::default()
    };
    let mut cfg = server_cfg.clone();
    cfg.env.extend(tap_env.vars());
    let server = LlamaServer::start_inheriting(&cfg, &tap_env.fds())?;
    // Only the child keeps its end open, so its death closes the channel.
    drop(theirs);
    let greeting = control.greeting(CONTROL_TIMEOUT)?;
    Ok(Tapped {
        server,
        ring,
        hidden,
        control,
        greeting,
    })
}

impl Session {
    pub fn start(cfg: &SessionConfig) -> Result<Session, TelemetryError> {
        let file = GgufFile::open(&cfg.model)?;
        let geometry = MoeGeometry::of(&file)?;
        let fingerprint = geometry.fingerprint.to_string();
        drop(file);
        let agent = ureq::AgentBuilder::new()
            .timeout_connect(Duration::from_secs(2))
            .timeout(Duration::from_secs(600))
            .build();
        let server_cfg = LlamaServerConfig {
            binary: cfg.llama_server.clone(),
            model: cfg.model.clone(),
            port: None,
            extra_args: cfg.extra_args.clone(),
            env: cfg.env.clone(),
            ready_timeout: cfg.ready_timeout,
            log_path: cfg.log_path.clone(),
        };
        let Some(tap) = &cfg.tap else {
            let server = LlamaServer::start(&server_cfg)?;
            return Ok(Session {
                server: Some(server),
                ring: None,
                hidden: None,
                hidden_chunks: Vec::new(),
                keep_hidden: true,
                hidden_drained: 0,
                control: None,
                greeting: None,
                geometry,
                fingerprint,
                agent,
            });
        };
        let t = launch_tapped(
            &server_cfg,
            tap,
            ring_geometry(&geometry),
            cfg.ring_capacity,
            cfg.hidden_capacity,
        )?;
        Ok(Session {
            server: Some(t.server),
            ring: Some(t.ring),
            hidden: t.hidden,
            hidden_chunks: Vec::new(),
            keep_hidden: true,
            hidden_drained: 0,
            control: Some(t.control),
            greeting: Some(t.greeting),
            geometry,
            fingerprint,
            agent,
        })
    }

    pub fn server(&self) -> &LlamaServer {
        self.server.as_ref().expect("server present until stop")
    }

    pub fn control(&mut self) -> Option<&mut ControlClient> {
        self.control.as_mut()
    }

    pub fn ring(&mut self) -> Option<&mut ShmRing> {
        self.ring.as_mut()
    }

    /// Switches hidden-state capture on (with its sampling and budget) or off.
    pub fn set_hidden(&mut self, cfg: Option<HiddenConfig>) -> Result<(), TelemetryError> {
        if let Some(c) = self.control.as_mut() {
            c.call(&Command::Hidden(cfg), CONTROL_TIMEOUT)?;
        }
        Ok(())
    }

    /// Discards whatever is in the ring (e.g. the server's warm-up run).
    pub fn discard(&mut self) -> u64 {
        if let Some(h) = self.hidden.as_mut() {
            h.reader().skip_all();
        }
        self.ring
            .as_mut()
            .map(|r| r.reader().skip_all())
            .unwrap_or(0)
    }

    /// Tokenizes `text` the way the server will (special tokens added).
    pub fn tokenize(&self, text: &str) -> Result<Vec<u32>, TelemetryError> {
        let v = self.post(
            0,
            "/tokenize",
            &serde_json::json!({"content": text, "add_special": true}),
        )?;
        ids(&v["tokens"]).ok_or_else(|| TelemetryError::Request {
            request: 0,
            message: "tokenize answer has no token list".into(),
        })
    }

    fn post(
        &self,
        request: u32,
        route: &str,
        body: &serde_json::Value,
    ) -> Result<serde_json::Value, TelemetryError> {
        let url = self.server().url(route);
        match self.agent.post(&url).send_json(body) {
            Ok(resp) => resp.into_json().map_err(|e| TelemetryError::Request {
                request,
                message: e.to_string(),
            }),
            Err(e) => Err(TelemetryError::Request {
                request,
                message: e.to_string(),
            }),
        }
    }

    /// Runs one greedy completion of `prompt` (text or token ids) stamped with `request`,
    /// appending every routing record captured meanwhile to `out`.
    pub fn complete(
        &mut self,
        request: u32,
        prompt: &serde_json::Value,
        n_predict: u32,
        out: &mut Vec<RoutingRecord>,
    ) -> Result<Completion, TelemetryError> {
        if let Some(c) = self.control.as_mut() {
            c.call(&Command::Request(request), CONTROL_TIMEOUT)?;
        }
        let body = serde_json::json!({
            "prompt": prompt,
            "n_predict": n_predict,
            "temperature": 0.0,
            "top_k": 1,
            "ignore_eos": true,
            "cache_prompt": false,
            "return_tokens": true,
        });
        let url = self.server().url("/completion");
        let agent = self.agent.clone();
        let done = AtomicBool::new(false);
        let result = std::thread::scope(|s| {
            let ring = self.ring.as_mut();
            let mut hidden = self.hidden.as_mut();
            let (keep, chunks, drained) = (
                self.keep_hidden,
                &mut self.hidden_chunks,
                &mut self.hidden_drained,
            );
            let (done, out) = (&done, &mut *out);
            let drainer = s.spawn(move || {
                let Some(ring) = ring else { return };
                let mut buf = Vec::with_capacity(4096);
                loop {
                    let finished = done.load(Ordering::Acquire);
                    buf.clear();
                    let mut n = ring.drain_into(&mut buf, 65536);
                    out.extend_from_slice(&buf);
                    if let Some(h) = hidden.as_mut() {
                        let m = if keep {
                            h.drain_into(chunks, 4096)
                        } else {
                            h.reader().consume(4096, |_| {})
                        };
                        *drained += m as u64;
                        n += m;
                    }
                    if n == 0 {
                        if finished {
                            return;
                        }
                        std::thread::sleep(Duration::from_millis(2));
                    }
                }
            });
            let r = agent.post(&url).send_json(&body);
            done.store(true, Ordering::Release);
            let _ = drainer.join();
            // Boxed: ureq's error is large, and only its message is used.
            r.map_err(Box::new)
        });
        let v: serde_json::Value = match result {
            Ok(resp) => resp.into_json().map_err(|e| TelemetryError::Request {
                request,
                message: e.to_string(),
            })?,
            Err(e) => {
                // Give a crashed server a moment to be reaped, then say so.
                let server = self.server.as_mut().expect("server present until stop");
                let deadline = Instant::now() + Duration::from_secs(2);
                while Instant::now() < deadline {
                    if let Some(status) = server.exited() {
                        return Err(TelemetryError::ServerDied {
                            request,
                            status: status.to_string(),
                            log: server.log_tail(15),
                        });
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
                return Err(TelemetryError::Request {
                    request,
                    message: e.to_string(),
                });
            }
        };
        Ok(Completion {
            content: v["content"].as_str().unwrap_or_default().to_string(),
            tokens: ids(&v["tokens"]).unwrap_or_default(),
            predicted_per_second: v["timings"]["predicted_per_second"].as_f64(),
            prompt_per_second: v["timings"]["prompt_per_second"].as_f64(),
        })
    }

    /// Hidden-state chunks the producer dropped (ring full) so far.
    pub fn hidden_dropped(&self) -> u64 {
        self.hidden.as_ref().map(|r| r.dropped()).unwrap_or(0)
    }

    /// Records the producer dropped (ring full) so far.
    pub fn ring_dropped(&self) -> u64 {
        self.ring.as_ref().map(|r| r.dropped()).unwrap_or(0)
    }

    /// Stops the server (the ring memory is freed once both processes let go of it).
    pub fn stop(mut self) {
        if let Some(c) = self.control.as_mut() {
            let _ = c.call(&Command::Quit, Duration::from_secs(2));
        }
        if let Some(s) = self.server.take() {
            s.stop();
        }
    }
}

fn ids(v: &serde_json::Value) -> Option<Vec<u32>> {
    v.as_array()?
        .iter()
        .map(|t| t.as_u64().map(|x| x as u32))
        .collect()
}
