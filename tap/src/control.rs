//! The tap's end of the control line protocol: one background thread on the inherited socket.
//!
//! Owns the thread that sends the greeting, reads command lines and answers each with one
//! reply (grammar and dispatch live in `spark_proto::control`). It changes the capture path
//! only through atomics, so it can never stall the engine. Reads wake up every second and a
//! partial line older than [`LINE_DEADLINE`] is answered with an error and discarded; writes
//! have a deadline too. Clean EOF ends the thread quietly.

use std::io::{Read, Write};
use std::os::fd::FromRawFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use spark_proto::control::{
    respond, Greeting, HiddenConfig, Reply, ResidencyLayers, ResidencyStats, TapControl, TapStats,
    WantPlan, ERR_TOO_LONG, MAX_LINE,
};
use spark_proto::ring::{ENV_CONTROL_FD, ENV_HIDDEN_RING_FD};

use crate::log::warn;
use crate::shared::SHARED;

/// How long a started command line may take to arrive completely.
pub const LINE_DEADLINE: Duration = Duration::from_secs(10);

/// Starts the control thread if `SPARK_CONTROL_FD` names a socket; says "no MoE layers" for a
/// dense model either way.
pub fn start(greeting: Greeting) {
    if greeting.n_expert == 0 {
        warn(&format!(
            "model architecture {} has no MoE layers; nothing to capture",
            greeting.arch
        ));
    }
    let Some(fd) = std::env::var(ENV_CONTROL_FD)
        .ok()
        .and_then(|v| v.parse::<i32>().ok())
    else {
        return;
    };
    // SAFETY: F_GETFD on an arbitrary integer only reports whether it is an open descriptor.
    if fd < 0 || unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
        warn(&format!("{ENV_CONTROL_FD}={fd} is not an open descriptor"));
        return;
    }
    // SAFETY: the supervisor handed us this descriptor for our exclusive use; we mark it
    // close-on-exec so llama-server's own children do not inherit it.
    let stream = unsafe {
        libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC);
        UnixStream::from_raw_fd(fd)
    };
    let spawned = std::thread::Builder::new()
        .name("spark-tap-control".into())
        .spawn(move || {
            if let Err(e) = serve(stream, &greeting) {
                warn(&format!("control channel closed: {e}"));
            }
        });
    if let Err(e) = spawned {
        warn(&format!("could not start the control thread: {e}"));
    }
}

struct Tap {
    n_layer: u32,
    n_expert: u32,
    /// The per-layer snapshot the supervisor is paging through.
    layers: Option<ResidencyLayers>,
}

impl TapControl for Tap {
    fn stats(&mut self) -> TapStats {
        TapStats {
            records: SHARED.records.load(Ordering::Relaxed),
            dropped: SHARED.dropped.load(Ordering::Relaxed),
            moe_layers: SHARED.moe_layers(),
            ubatches: SHARED.ubatches.load(Ordering::Relaxed),
            hidden_bytes: SHARED.hidden_bytes.load(Ordering::Relaxed),
            unmapped: SHARED.unmapped.load(Ordering::Relaxed),
            graph_reads: SHARED.graph_reads.load(Ordering::Relaxed),
            graph_hidden_rows: SHARED.graph_hidden_rows.load(Ordering::Relaxed),
        }
    }

    fn flush(&mut self) -> u64 {
        // The capture path publishes after every tensor, so everything is already visible.
        SHARED.records.load(Ordering::Relaxed)
    }

    fn reset(&mut self) {
        for c in [
            &SHARED.records,
            &SHARED.dropped,
            &SHARED.ubatches,
            &SHARED.unmapped,
            &SHARED.hidden_bytes,
        ] {
            c.store(0, Ordering::Relaxed);
        }
        SHARED.graph_reads.store(0, Ordering::Relaxed);
        SHARED.graph_hidden_rows.store(0, Ordering::Relaxed);
    }

    fn set_request(&mut self, id: u32) {
        SHARED.request.store(id, Ordering::Relaxed);
    }

    fn set_hidden(&mut self, cfg: Option<HiddenConfig>) -> Result<(), String> {
        match cfg {
            None => {
                SHARED.hidden_on.store(false, Ordering::Relaxed);
                Ok(())
            }
            Some(h) => {
                if !SHARED.hidden_available.load(Ordering::Relaxed) {
                    return Err(format!(
                        "no hidden-state ring: the supervisor did not set {ENV_HIDDEN_RING_FD}"
                    ));
                }
                SHARED.hidden_every.store(h.every, Ordering::Relaxed);
                SHARED
                    .hidden_budget
                    .store(u64::from(h.budget_mib) << 20, Ordering::Relaxed);
                SHARED
                    .hidden_tensor
                    .store(h.tensor.code(), Ordering::Relaxed);
                SHARED.hidden_bytes.store(0, Ordering::Relaxed);
                SHARED.hidden_on.store(true, Ordering::Release);
                Ok(())
            }
        }
    }

    fn residency(&mut self) -> ResidencyStats {
        crate::provider::stats()
    }

    fn residency_layers(&mut self, fresh: bool) -> Result<ResidencyLayers, String> {
        if fresh || self.layers.is_none() {
            self.layers =
                Some(crate::provider::layer_snapshot().ok_or(
                    "the provider kept updating its counters through every try; ask again",
                )?);
        }
        Ok(self.layers.clone().unwrap_or_default())
    }

    fn want(&mut self, plan: &WantPlan, append: bool) -> Result<(), String> {
        crate::provider::want(plan, append, self.n_layer, self.n_expert)
    }
}

fn serve(mut stream: UnixStream, greeting: &Greeting) -> std::io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(1)))?;
    stream.set_write_timeout(Some(Duration::from_secs(5)))?;
    send(&mut stream, &greeting.to_line())?;
    let mut tap = Tap {
        n_layer: greeting.n_layer,
        n_expert: greeting.n_expert,
        layers: None,
    };
    let mut line: Vec<u8> = Vec::with_capacity(MAX_LINE + 1);
    let mut started: Option<Instant> = None;
    let mut discarding = false;
    let mut buf = [0u8; 4096];
    loop {
        let n = match stream.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(n) => n,
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut
                    || e.kind() == std::io::ErrorKind::Interrupted =>
            {
                if started.is_some_and(|s| s.elapsed() > LINE_DEADLINE) {
                    let r = Reply::err(ERR_TOO_LONG, "incomplete line discarded after deadline");
                    send(&mut stream, &r.to_line())?;
                    line.clear();
                    started = None;
                }
                continue;
            }
            Err(e) => return Err(e),
        };
        for &b in &buf[..n] {
            if b == b'\n' {
                started = None;
                if discarding {
                    discarding = false;
                    continue;
                }
                let text = String::from_utf8_lossy(&line).into_owned();
                line.clear();
                let r = respond(&text, &mut tap);
                send(&mut stream, &r.reply.to_line())?;
                if r.quit {
                    return Ok(());
                }
            } else if !discarding {
                started.get_or_insert_with(Instant::now);
                if line.len() >= MAX_LINE {
                    let r = Reply::err(ERR_TOO_LONG, format!("line exceeds {MAX_LINE} bytes"));
                    send(&mut stream, &r.to_line())?;
                    line.clear();
                    discarding = true;
                } else {
                    line.push(b);
                }
            }
        }
    }
}

fn send(stream: &mut UnixStream, line: &str) -> std::io::Result<()> {
    let mut out = Vec::with_capacity(line.len() + 1);
    out.extend_from_slice(line.as_bytes());
    out.push(b'\n');
    stream.write_all(&out)
}
