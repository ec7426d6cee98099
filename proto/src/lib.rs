//! Spark's cross-process contracts.
//!
//! Owns every byte layout that crosses a process or file boundary and is produced by one program
//! and consumed by another: the binary routing-trace file today; the shared-memory ring, the
//! control protocol and the scheduler hook ABI as they land. Nothing here does I/O; both sides
//! (the `spark` library and the preloaded tap) use these types so a layout is written once.

pub mod control;
pub mod ring;
pub mod trace;
