//! The tap's one way to say something: a line on llama-server's stderr (its log). A leaf of
//! the tap, so every part can warn without importing another.

/// One line on llama-server's stderr, prefixed `spark-tap: `.
pub fn warn(msg: &str) {
    eprintln!("spark-tap: {msg}");
}
