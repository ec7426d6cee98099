//! Byte counts for people: the one place spark turns a number of bytes into text.
//!
//! A leaf: imports nothing of spark. Binary units (KiB = 1024 B), as llama.cpp and `nvidia-smi`
//! print them. Each reader keeps the precision it has always had, so reports read as before.

/// One MiB in bytes.
pub const MIB: u64 = 1 << 20;

/// Bytes as MiB with one decimal, e.g. `12.5 MiB` (plans and budgets, which are given in MiB).
pub fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / MIB as f64)
}

/// Bytes as B, KiB, MiB or GiB, whichever reads best (file and tensor sizes).
pub fn human(bytes: u64) -> String {
    let b = bytes as f64;
    if bytes < 1024 {
        format!("{bytes} B")
    } else if b < 1024.0 * 1024.0 {
        format!("{:.1} KiB", b / 1024.0)
    } else if b < 1024.0 * 1024.0 * 1024.0 {
        format!("{:.1} MiB", b / 1024.0 / 1024.0)
    } else {
        format!("{:.2} GiB", b / 1024.0 / 1024.0 / 1024.0)
    }
}

/// A mean number of bytes (per token, per step) as B, KiB or MiB: fractions kept where they
/// matter, e.g. `1.50 MiB`, `12.3 KiB`, `17 B`.
pub fn mean(b: f64) -> String {
    if b >= MIB as f64 {
        format!("{:.2} MiB", b / MIB as f64)
    } else if b >= 1024.0 {
        format!("{:.1} KiB", b / 1024.0)
    } else {
        format!("{b:.0} B")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_reader_gets_its_precision() {
        assert_eq!(mib(MIB * 25 / 2), "12.5 MiB");
        assert_eq!(human(17), "17 B");
        assert_eq!(human(1536), "1.5 KiB");
        assert_eq!(human(3 * MIB), "3.0 MiB");
        assert_eq!(human(5 << 30), "5.00 GiB");
        assert_eq!(mean(17.4), "17 B");
        assert_eq!(mean(2048.0), "2.0 KiB");
        assert_eq!(mean(1.5 * MIB as f64), "1.50 MiB");
    }
}
