//! Cutting one session's message stream into chunks of about `limit` characters.
//!
//! Messages are kept whole while they fit: a chunk is closed before a message that would take
//! it past the limit. A single message longer than the limit is cut into pieces of at most
//! `limit` characters, at a line break in the second half of a piece where there is one, and
//! always at a `char` boundary.

pub struct Chunker {
    limit: usize,
    cur: String,
    cur_chars: usize,
    next_index: u32,
}

impl Chunker {
    pub fn new(limit: usize) -> Chunker {
        assert!(limit > 0, "chunk limit is checked by the caller");
        Chunker {
            limit,
            cur: String::new(),
            cur_chars: 0,
            next_index: 0,
        }
    }

    /// Adds one message; `emit(index, text)` receives every chunk this closes.
    pub fn push<E>(
        &mut self,
        msg: &str,
        emit: &mut impl FnMut(u32, &str) -> Result<(), E>,
    ) -> Result<(), E> {
        let mut chars = msg.chars().count();
        if self.cur_chars > 0 && self.cur_chars + chars > self.limit {
            self.flush(emit)?;
        }
        let mut rest = msg;
        while chars > self.limit {
            let cut = cut_point(rest, self.limit);
            let (piece, tail) = rest.split_at(cut);
            self.emit_one(piece, emit)?;
            chars -= piece.chars().count();
            rest = tail;
        }
        self.cur.push_str(rest);
        self.cur_chars += chars;
        Ok(())
    }

    /// Closes the last chunk; returns how many chunks the session had.
    pub fn finish<E>(
        mut self,
        emit: &mut impl FnMut(u32, &str) -> Result<(), E>,
    ) -> Result<u32, E> {
        self.flush(emit)?;
        Ok(self.next_index)
    }

    fn flush<E>(&mut self, emit: &mut impl FnMut(u32, &str) -> Result<(), E>) -> Result<(), E> {
        if self.cur_chars > 0 {
            let text = std::mem::take(&mut self.cur);
            self.emit_one(&text, emit)?;
            self.cur = text;
            self.cur.clear();
            self.cur_chars = 0;
        }
        Ok(())
    }

    fn emit_one<E>(
        &mut self,
        text: &str,
        emit: &mut impl FnMut(u32, &str) -> Result<(), E>,
    ) -> Result<(), E> {
        let i = self.next_index;
        self.next_index += 1;
        emit(i, text)
    }
}

/// Byte offset to cut `s` (longer than `limit` chars) so the head has at most `limit` chars.
fn cut_point(s: &str, limit: usize) -> usize {
    let hard = s.char_indices().nth(limit).map_or(s.len(), |(i, _)| i);
    match s[..hard].rfind('\n') {
        Some(nl) if nl + 1 > hard / 2 => nl + 1,
        _ => hard,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunks(limit: usize, msgs: &[&str]) -> Vec<(u32, String)> {
        let mut out = Vec::new();
        let mut emit = |i: u32, t: &str| -> Result<(), ()> {
            out.push((i, t.to_string()));
            Ok(())
        };
        let mut c = Chunker::new(limit);
        for m in msgs {
            c.push(m, &mut emit).unwrap();
        }
        let n = c.finish(&mut emit).unwrap();
        assert_eq!(n as usize, out.len());
        out
    }

    #[test]
    fn messages_stay_whole_when_they_fit() {
        let got = chunks(10, &["aaaa\n", "bbbb\n", "cc\n", "dddddddd\n"]);
        assert_eq!(
            got,
            vec![
                (0, "aaaa\nbbbb\n".into()),
                (1, "cc\n".into()),
                (2, "dddddddd\n".into())
            ]
        );
    }

    #[test]
    fn long_messages_are_cut_at_char_boundaries_within_the_limit() {
        let msg = "é".repeat(25);
        let got = chunks(10, &["x\n", &msg]);
        assert_eq!(got[0].1, "x\n");
        let pieces: Vec<usize> = got[1..].iter().map(|(_, t)| t.chars().count()).collect();
        assert_eq!(pieces, vec![10, 10, 5]);
        let joined: String = got[1..].iter().map(|(_, t)| t.as_str()).collect();
        assert_eq!(joined, msg);
    }

    #[test]
    fn long_messages_prefer_line_breaks() {
        let got = chunks(10, &["abcdefg\nhijklmnop\nq"]);
        assert_eq!(
            got,
            vec![
                (0, "abcdefg\n".into()),
                (1, "hijklmnop\n".into()),
                (2, "q".into())
            ]
        );
    }

    #[test]
    fn every_chunk_respects_the_limit() {
        let msgs: Vec<String> = (0..50).map(|i| "wörd ".repeat(i % 13 + 1) + "\n").collect();
        let refs: Vec<&str> = msgs.iter().map(String::as_str).collect();
        let got = chunks(17, &refs);
        assert!(got
            .iter()
            .all(|(_, t)| t.chars().count() <= 17 && !t.is_empty()));
        let joined: String = got.iter().map(|(_, t)| t.as_str()).collect();
        assert_eq!(joined, msgs.concat());
        assert!(got.iter().enumerate().all(|(i, (j, _))| i as u32 == *j));
    }
}
