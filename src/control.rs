//! The supervisor's end of the control line protocol (grammar in `spark_proto::control`).
//!
//! Owns the socket pair: one end stays here as a [`ControlClient`], the other is inherited by
//! llama-server (the tap finds it in `SPARK_CONTROL_FD`). Every read and write has a deadline;
//! a closed channel or a late reply is an error, never a hang. Never spawns anything.

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use spark_proto::control::{
    Command, Greeting, LayersReader, Reply, ResidencyLayers, ResidencyStats, TapStats, WantPlan,
    ERR_BAD_ARGS, MAX_LINE,
};

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("talk to the tap: {0}")]
    Io(#[from] std::io::Error),
    #[error("hear from the tap: no {what} within {secs} s")]
    Timeout { what: &'static str, secs: u64 },
    #[error("hear from the tap: the control channel closed (llama-server exited?)")]
    Closed,
    #[error("understand the tap: {0}")]
    Protocol(String),
    #[error("run tap command {command:?}: {code} {message}")]
    Rejected {
        command: String,
        code: String,
        message: String,
    },
}

impl ControlError {
    pub fn is_timeout(&self) -> bool {
        matches!(self, ControlError::Timeout { .. })
    }
}

/// The supervisor's end of the control channel.
pub struct ControlClient {
    stream: UnixStream,
    pending: Vec<u8>,
}

/// A connected pair: the client, and the descriptor to hand to the child.
pub fn pair() -> Result<(ControlClient, OwnedFd), ControlError> {
    let (ours, theirs) = UnixStream::pair()?;
    Ok((
        ControlClient {
            stream: ours,
            pending: Vec::new(),
        },
        OwnedFd::from(theirs),
    ))
}

impl ControlClient {
    /// Wraps an already-connected stream (tests, or a socket in a private directory).
    pub fn from_stream(stream: UnixStream) -> ControlClient {
        ControlClient {
            stream,
            pending: Vec::new(),
        }
    }

    pub fn raw_fd(&self) -> RawFd {
        self.stream.as_raw_fd()
    }

    /// Reads one line before `deadline`; `None` on clean EOF.
    pub fn read_line(
        &mut self,
        deadline: Instant,
        what: &'static str,
    ) -> Result<Option<String>, ControlError> {
        let start = Instant::now();
        loop {
            if let Some(i) = self.pending.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.pending.drain(..=i).collect();
                let text = String::from_utf8_lossy(&line[..line.len() - 1]).into_owned();
                return Ok(Some(text));
            }
            if self.pending.len() > MAX_LINE {
                return Err(ControlError::Protocol(format!(
                    "{what} longer than {MAX_LINE} bytes"
                )));
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(ControlError::Timeout {
                    what,
                    secs: deadline.duration_since(start).as_secs().max(1),
                });
            }
            self.stream
                .set_read_timeout(Some((deadline - now).max(Duration::from_millis(1))))?;
            let mut buf = [0u8; 1024];
            match self.stream.read(&mut buf) {
                Ok(0) if self.pending.is_empty() => return Ok(None),
                Ok(0) => return Err(ControlError::Closed),
                Ok(n) => self.pending.extend_from_slice(&buf[..n]),
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock
                            | std::io::ErrorKind::TimedOut
                            | std::io::ErrorKind::Interrupted
                    ) => {}
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Waits for the tap's greeting.
    pub fn greeting(&mut self, timeout: Duration) -> Result<Greeting, ControlError> {
        let line = self
            .read_line(Instant::now() + timeout, "greeting")?
            .ok_or(ControlError::Closed)?;
        Greeting::parse(&line).map_err(ControlError::Protocol)
    }

    /// Sends a raw line and reads the one reply line.
    pub fn call_line(&mut self, line: &str, timeout: Duration) -> Result<Reply, ControlError> {
        let deadline = Instant::now() + timeout;
        self.stream.set_write_timeout(Some(timeout))?;
        let mut out = line.as_bytes().to_vec();
        out.push(b'\n');
        self.stream.write_all(&out).map_err(|e| match e.kind() {
            std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset => {
                ControlError::Closed
            }
            _ => ControlError::Io(e),
        })?;
        let reply = self
            .read_line(deadline, "reply")?
            .ok_or(ControlError::Closed)?;
        Reply::parse(&reply).map_err(ControlError::Protocol)
    }

    /// Sends a command; an `err` reply becomes [`ControlError::Rejected`].
    pub fn call(&mut self, cmd: &Command, timeout: Duration) -> Result<String, ControlError> {
        let line = cmd.to_line();
        match self.call_line(&line, timeout)? {
            Reply::Ok(t) => Ok(t),
            Reply::Err { code, message } => Err(ControlError::Rejected {
                command: line,
                code,
                message,
            }),
        }
    }

    /// `stats`, parsed.
    pub fn stats(&mut self, timeout: Duration) -> Result<TapStats, ControlError> {
        let t = self.call(&Command::Stats, timeout)?;
        TapStats::parse(&t).map_err(ControlError::Protocol)
    }

    /// `residency`: the provider's counters, parsed.
    pub fn residency(&mut self, timeout: Duration) -> Result<ResidencyStats, ControlError> {
        let t = self.call(&Command::Residency, timeout)?;
        ResidencyStats::parse(&t).map_err(ControlError::Protocol)
    }

    /// `residency layers`, every page of one snapshot, checked (layers below `n_layer`, adding
    /// up to the totals: anything else is [`ControlError::Protocol`]), all pages within
    /// `timeout`. `None` when the tap predates per-layer counters (it refuses the command's
    /// arguments).
    pub fn residency_layers(
        &mut self,
        n_layer: u32,
        timeout: Duration,
    ) -> Result<Option<ResidencyLayers>, ControlError> {
        let deadline = Instant::now() + timeout;
        let mut reader = LayersReader::new(n_layer);
        while let Some(cmd) = reader.command() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(ControlError::Timeout {
                    what: "per-layer residency counters",
                    secs: timeout.as_secs().max(1),
                });
            }
            let line = cmd.to_line();
            match self.call_line(&line, left)? {
                Reply::Ok(t) => reader.take(&t).map_err(ControlError::Protocol)?,
                Reply::Err { code, .. } if code == ERR_BAD_ARGS && line == "residency layers" => {
                    return Ok(None)
                }
                Reply::Err { code, message } => {
                    return Err(ControlError::Rejected {
                        command: line,
                        code,
                        message,
                    })
                }
            }
        }
        reader.finish().map(Some).map_err(ControlError::Protocol)
    }

    /// Sends one layer's residency plan (one or more `want` lines), each under `timeout`.
    pub fn want(&mut self, plan: &WantPlan, timeout: Duration) -> Result<(), ControlError> {
        for line in plan.to_lines() {
            if let Reply::Err { code, message } = self.call_line(&line, timeout)? {
                return Err(ControlError::Rejected {
                    command: line,
                    code,
                    message,
                });
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_silent_peer_times_out_instead_of_hanging() {
        let (mut client, _theirs) = pair().unwrap();
        let err = client.greeting(Duration::from_millis(50)).unwrap_err();
        assert!(err.is_timeout(), "{err}");
    }

    #[test]
    fn a_closed_peer_is_reported() {
        let (mut client, theirs) = pair().unwrap();
        drop(theirs);
        assert!(matches!(
            client.greeting(Duration::from_secs(5)),
            Err(ControlError::Closed)
        ));
        assert!(matches!(
            client.call(&Command::Stats, Duration::from_secs(5)),
            Err(ControlError::Closed) | Err(ControlError::Io(_))
        ));
    }
}
