//! Spark's cross-process contracts.
//!
//! Owns every byte layout that crosses a process or file boundary and is produced by one program
//! and consumed by another: the shared-memory rings (`ring`), the control protocol (`control`),
//! the binary routing-trace file (`trace`) and the MoE residency hook ABI between the patched
//! ggml scheduler and a provider (`hook`, C header in `include/spark_moe_hook.h`). Nothing here
//! does I/O; both sides use these types so a layout is written once.

pub mod control;
pub mod hook;
pub mod ring;
pub mod trace;
