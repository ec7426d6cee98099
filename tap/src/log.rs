//! The tap's one way to say something: a line on llama-server's stderr (its log). A leaf of
//! the tap, so every part can warn without importing another.

/// One line on llama-server's stderr, prefixed `spark-tap: `; dropped if stderr fails (a
/// closed or full stderr must not take llama-server down).
pub fn warn(msg: &str) {
    use std::io::Write as _;
    let _ = writeln!(std::io::stderr().lock(), "spark-tap: {msg}");
}
