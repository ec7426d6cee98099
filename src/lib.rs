//! The `spark` library: everything the `spark` binary does, behind a thin CLI.
//!
//! See ARCHITECTURE.md for the map of modules and the invariants each one keeps.

pub mod atomic_file;
pub mod bench;
pub mod cache;
pub mod control;
pub mod cuda;
pub mod demo;
pub mod engine;
pub mod env_flags;
pub mod exit;
pub mod fixture;
pub mod fleet;
pub mod gguf;
pub mod inspect;
pub mod log;
pub mod manual;
pub mod plan;
pub mod profile;
pub mod progress;
pub mod ring;
pub mod serve;
pub mod sessions;
pub mod signals;
pub mod simulate;
pub mod supervisor;
pub mod svg;
pub mod telemetry;
pub mod text;
pub mod trace;
pub mod units;
pub mod validate;
pub mod vram_plan;
