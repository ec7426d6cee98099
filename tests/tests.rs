//! Integration tests, compiled as one binary; `util` holds what they share.

mod util;

mod bench_residency;
mod files;
mod gguf_files;
mod hook;
mod plan;
mod serve;
mod sessions;
mod simulate;
mod swap;
mod telemetry;
mod validate;
