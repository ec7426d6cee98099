//! The capture path's pure batch bookkeeping: the tap's copy of each batch under construction
//! ([`Shadow`]), which rows of a tensor belong to which ubatch ([`RowMap`]), which token
//! position each row is ([`RowPositions`]), and the layer number in a tensor's name.
//!
//! No FFI, no globals, no allocation after construction: [`crate::capture`] owns the state and
//! calls these on the capture path; here they are plain values that tests can drive.

pub(crate) const N_SHADOWS: usize = 4;

/// The tap's copy of one `llama_batch_ext` under construction.
pub(crate) struct Shadow {
    pub(crate) batch: usize,
    pub(crate) pos: Vec<i32>,
    pub(crate) out: Vec<u8>,
    pub(crate) overflow: bool,
}

impl Shadow {
    pub(crate) fn new(cap: usize) -> Shadow {
        Shadow {
            batch: 0,
            pos: Vec::with_capacity(cap),
            out: Vec::with_capacity(cap),
            overflow: false,
        }
    }

    pub(crate) fn reset(&mut self, batch: usize) {
        self.batch = batch;
        self.pos.clear();
        self.out.clear();
        self.overflow = false;
    }

    /// Makes entry `idx` exist; false (and overflow) when it is beyond the preallocation.
    pub(crate) fn ensure(&mut self, idx: usize) -> bool {
        if idx >= self.pos.capacity() || idx >= self.out.capacity() {
            self.overflow = true;
            return false;
        }
        while self.pos.len() <= idx {
            self.pos.push(-1); // within capacity: no allocation
            self.out.push(0);
        }
        true
    }
}

/// Tracks which batch rows the tensors of one kind hold: a layer index that does not grow
/// means the next ubatch of the same batch.
#[derive(Clone, Copy)]
pub(crate) struct RowMap {
    last_layer: i32,
    pub(crate) start: usize,
    pub(crate) len: usize,
}

impl RowMap {
    pub(crate) const fn new() -> RowMap {
        RowMap {
            last_layer: -1,
            start: 0,
            len: 0,
        }
    }

    /// Advances for a tensor of `layer` with `rows` rows; true at a new ubatch.
    pub(crate) fn advance(&mut self, layer: u32, rows: usize) -> bool {
        if layer as i32 <= self.last_layer {
            self.start += self.len;
            self.len = 0;
        }
        self.last_layer = layer as i32;
        if self.len == 0 {
            self.len = rows;
            return true;
        }
        false
    }
}

/// The layer number at the start of `b` (a tensor name's tail, NUL-terminated), at most
/// `u16::MAX`.
pub(crate) fn parse_layer(b: &[u8]) -> Option<u32> {
    let mut v: u32 = 0;
    let mut digits = 0;
    for &c in b {
        match c {
            b'0'..=b'9' => {
                v = v.checked_mul(10)?.checked_add(u32::from(c - b'0'))?;
                digits += 1;
            }
            0 => break,
            _ => return None,
        }
    }
    (digits > 0 && v <= u32::from(u16::MAX)).then_some(v)
}

/// Maps row j of a tensor to its token position.
pub(crate) struct RowPositions {
    map: RowMap,
    full: bool,
    cursor: usize,
}

impl RowPositions {
    pub(crate) fn new(map: RowMap, rows: usize) -> RowPositions {
        RowPositions {
            map,
            full: rows == map.len,
            cursor: map.start,
        }
    }

    /// Rows must be asked for in order.
    pub(crate) fn next(&mut self, j: usize, known: bool, pos: &[i32], out: &[u8]) -> Option<u32> {
        if !known {
            return None;
        }
        let p = if self.full {
            pos.get(self.map.start + j).copied()
        } else {
            // Rows dropped before the last layer: the survivors are the output tokens.
            let end = (self.map.start + self.map.len)
                .min(pos.len())
                .min(out.len());
            while self.cursor < end && out[self.cursor] == 0 {
                self.cursor += 1;
            }
            let p = (self.cursor < end).then(|| pos[self.cursor]);
            self.cursor += 1;
            p
        };
        p.filter(|&p| p >= 0).map(|p| p as u32)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_map_to_positions_across_ubatches_and_the_trimmed_last_layer() {
        // A batch of 6 tokens at positions 10..16, split into ubatches of 4 and 2; only the
        // last token is an output, so the last layer keeps no row in the first ubatch and one
        // in the second.
        let pos: Vec<i32> = (10..16).collect();
        let out = [0u8, 0, 0, 0, 0, 1];
        let mut map = RowMap::new();
        let mut got = Vec::new();
        for (layer, rows) in [(0u32, 4usize), (1, 4), (2, 0), (0, 2), (1, 2), (2, 1)] {
            map.advance(layer, rows.max(1));
            let mut rp = RowPositions::new(map, rows.max(1));
            let v: Vec<Option<u32>> = (0..rows).map(|j| rp.next(j, true, &pos, &out)).collect();
            got.push((layer, v));
        }
        let p = |v: &[u32]| v.iter().map(|&x| Some(x)).collect::<Vec<_>>();
        assert_eq!(got[0], (0, p(&[10, 11, 12, 13])));
        assert_eq!(got[1], (1, p(&[10, 11, 12, 13])));
        assert_eq!(got[3], (0, p(&[14, 15])));
        assert_eq!(got[4], (1, p(&[14, 15])));
        assert_eq!(got[5], (2, p(&[15])));
        // Unknown positions stay unknown.
        let mut rp = RowPositions::new(RowMap::new(), 1);
        assert_eq!(rp.next(0, false, &pos, &out), None);
    }
}
