//! Integration tests, compiled as one binary; `util` holds what they share.

// Test diagnostics go to the harness's captured stderr; a panic there fails only the test.
#![allow(clippy::disallowed_macros)]

mod util;

mod archs;
mod bench_residency;
mod engine_build;
mod files;
mod flags;
mod gguf_files;
mod hook;
mod lavapipe;
mod operator;
mod plan;
mod serve;
mod serve_compat;
mod serve_hardening;
mod sessions;
mod simulate;
mod swap;
mod telemetry;
mod validate;
