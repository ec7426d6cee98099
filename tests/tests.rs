//! Integration tests, compiled as one binary; `util` holds what they share.

mod util;

mod gguf_files;
mod serve;
mod plan;
mod sessions;
mod telemetry;
mod validate;
mod simulate;
mod swap;
