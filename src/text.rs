//! Quoting user input inside messages: a bad value is shown, but never whole when it is huge
//! (a 100 MB line in a profile or a session log must not become a 100 MB error line).
//!
//! Owns nothing else; never allocates more than the clipped text.

use std::borrow::Cow;

/// At most `max` characters of `s`; a longer `s` is cut on a character boundary and ends with
/// `… (N bytes in all)`, so the message says it was cut and how much there was.
pub fn clip(s: &str, max: usize) -> Cow<'_, str> {
    match s.char_indices().nth(max) {
        None => Cow::Borrowed(s),
        Some((end, _)) => Cow::Owned(format!("{}… ({} bytes in all)", &s[..end], s.len())),
    }
}

/// Characters of a bad input an error message quotes at most.
pub const QUOTE_MAX: usize = 120;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_text_is_kept_and_long_text_is_cut_on_a_character() {
        assert_eq!(clip("abc", 3), "abc");
        assert_eq!(clip("abcd", 3), "abc… (4 bytes in all)");
        // Multi-byte characters are never split.
        assert_eq!(clip("ééé", 2), "éé… (6 bytes in all)");
        let huge = "x".repeat(100 << 20);
        assert!(clip(&huge, QUOTE_MAX).len() < 200);
    }
}
