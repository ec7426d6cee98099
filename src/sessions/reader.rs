//! A bounded line reader: yields the lines of a `BufRead` one at a time, never holding more than
//! `max` bytes of one line; a longer line is consumed, reported as too long and dropped.

use std::io::{self, BufRead};

/// What [`LineReader::next_line`] found.
#[derive(Debug, PartialEq, Eq)]
pub enum Line {
    /// A line of at most `max` bytes is in the buffer (without its `\n` or `\r\n`).
    Fits,
    /// A line longer than `max` bytes (its length in bytes) was skipped; the buffer is empty.
    TooLong(u64),
}

pub struct LineReader<R> {
    inner: R,
    max: usize,
}

impl<R: BufRead> LineReader<R> {
    pub fn new(inner: R, max: usize) -> LineReader<R> {
        LineReader { inner, max }
    }

    /// Reads the next line into `buf` (cleared first); `None` at end of input.
    pub fn next_line(&mut self, buf: &mut Vec<u8>) -> io::Result<Option<Line>> {
        buf.clear();
        let mut started = false;
        let mut len: u64 = 0;
        let mut too_long = false;
        loop {
            let avail = match self.inner.fill_buf() {
                Ok(b) => b,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            if avail.is_empty() {
                if !started {
                    return Ok(None);
                }
                break;
            }
            started = true;
            let newline = avail.iter().position(|&b| b == b'\n');
            let take = newline.unwrap_or(avail.len());
            len += take as u64;
            if !too_long {
                if buf.len() + take > self.max {
                    too_long = true;
                    buf.clear();
                    buf.shrink_to(self.max.min(64 << 10));
                } else {
                    buf.extend_from_slice(&avail[..take]);
                }
            }
            self.inner.consume(take + usize::from(newline.is_some()));
            if newline.is_some() {
                break;
            }
        }
        if too_long {
            return Ok(Some(Line::TooLong(len)));
        }
        if buf.last() == Some(&b'\r') {
            buf.pop();
        }
        Ok(Some(Line::Fits))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(input: &[u8], max: usize, cap: usize) -> Vec<Result<Vec<u8>, u64>> {
        let mut r = LineReader::new(io::BufReader::with_capacity(cap, input), max);
        let mut out = Vec::new();
        let mut buf = Vec::new();
        while let Some(l) = r.next_line(&mut buf).unwrap() {
            out.push(match l {
                Line::Fits => Ok(buf.clone()),
                Line::TooLong(n) => Err(n),
            });
        }
        out
    }

    #[test]
    fn splits_lines_and_strips_crlf() {
        for cap in [1, 2, 3, 7, 4096] {
            let got = lines(b"ab\r\n\ncd\nlast", 100, cap);
            assert_eq!(
                got,
                vec![
                    Ok(b"ab".to_vec()),
                    Ok(vec![]),
                    Ok(b"cd".to_vec()),
                    Ok(b"last".to_vec())
                ],
                "capacity {cap}"
            );
        }
    }

    #[test]
    fn long_lines_are_skipped_and_reading_goes_on() {
        for cap in [1, 3, 8, 4096] {
            let got = lines(b"12345\n123456\n\nx\n1234567890", 5, cap);
            assert_eq!(
                got,
                vec![
                    Ok(b"12345".to_vec()),
                    Err(6),
                    Ok(vec![]),
                    Ok(b"x".to_vec()),
                    Err(10)
                ],
                "capacity {cap}"
            );
        }
    }

    #[test]
    fn empty_input_has_no_lines() {
        assert!(lines(b"", 5, 8).is_empty());
        assert_eq!(lines(b"\n", 5, 8), vec![Ok(vec![])]);
    }
}
