//! The supervisor: the only code that spawns or kills processes.
//!
//! Owns llama-server children: each runs in its own process group with a parent-death signal,
//! so it can never outlive spark; stopping is SIGTERM to the group, a grace period, then
//! SIGKILL. Every wait here has a deadline.

mod child;
mod keeper;
mod llama;
mod run;

pub use child::{ignore_file_size_signal, inherit_fds, ChildGroup, GroupKiller, SpawnError};
pub use keeper::{Backoff, ChildPhase, Health, Keeper, KeeperState, Launcher};
pub use llama::{free_port, LlamaServer, LlamaServerConfig, Probe, ServerError};
pub use run::{run_with_deadline, Captured, RunError};
