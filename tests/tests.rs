//! Integration tests, compiled as one binary; `util` holds what they share.

mod util;

mod bench_residency;
mod files;
mod flags;
mod gguf_files;
mod hook;
mod lavapipe;
mod plan;
mod serve;
mod serve_hardening;
mod sessions;
mod simulate;
mod swap;
mod telemetry;
mod validate;
