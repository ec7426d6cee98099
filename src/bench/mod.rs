//! `spark bench`: every benchmark in one folder, one file (or folder) per subcommand.
//!
//! - [`residency`]: decode tok/s under four expert placements with llama-bench, the tap's
//!   residency counters, and `--bytes` (host→device bytes per token);
//! - [`tap`]: llama-server's decode speed with and without the tap;
//! - [`plan`]: the plan's decode forecast against llama-bench receipts (leave-one-out);
//! - [`swap`]: what expert copies cost on a device, through [`crate::cuda`]'s swap measurement
//!   kit (the CPU arena without a GPU).
//!
//! A benchmark reports numbers and asserts none. Never spawns a process itself: llama-bench,
//! llama-server and nvidia-smi run through [`crate::supervisor`]; a tapped child's environment
//! comes from [`crate::telemetry::TapEnv`].

pub mod plan;
pub mod residency;
pub mod swap;
pub mod tap;
