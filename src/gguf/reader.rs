//! Parses a GGUF file (v2 and v3) from a memory map: header, metadata, tensor table, data offset.
//!
//! Every length and offset read from the file is checked against the bytes that are really there
//! before it is used, so a truncated or corrupted file is an error, never a panic or a huge
//! allocation.

use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;

use super::types::GgmlType;
use super::value::{Value, ValueType};
use super::GgufError;

pub const GGUF_MAGIC: &[u8; 4] = b"GGUF";
pub const DEFAULT_ALIGNMENT: u64 = 32;
/// Deepest array nesting accepted; real files use one level.
const MAX_ARRAY_DEPTH: usize = 8;
const MAX_DIMS: u32 = 4;

/// One entry of the tensor table.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorInfo {
    pub name: String,
    /// ggml order: `dims[0]` is the innermost (contiguous) dimension.
    pub dims: Vec<u64>,
    pub type_id: u32,
    /// Known type, or `None` when the id is retired or unknown to this build.
    pub ggml_type: Option<GgmlType>,
    /// Offset relative to the start of the data section.
    pub offset: u64,
    /// Bytes of the tensor's data, when its type is known.
    pub bytes: Option<u64>,
}

impl TensorInfo {
    pub fn n_elements(&self) -> u64 {
        self.dims.iter().product()
    }

    /// Name of the type, or `type#<id>` when unknown.
    pub fn type_name(&self) -> String {
        self.ggml_type
            .map(|t| t.name.to_string())
            .unwrap_or_else(|| format!("type#{}", self.type_id))
    }
}

/// Clears `O_NONBLOCK` on an open file (regular files ignore it, but later reads through this
/// descriptor should not see it).
fn clear_nonblock(file: &File) -> std::io::Result<()> {
    use nix::fcntl::{fcntl, FcntlArg, OFlag};
    use std::os::fd::AsRawFd;
    let fd = file.as_raw_fd();
    let flags = OFlag::from_bits_truncate(fcntl(fd, FcntlArg::F_GETFL)?);
    fcntl(fd, FcntlArg::F_SETFL(flags & !OFlag::O_NONBLOCK))?;
    Ok(())
}

/// A parsed GGUF file, kept memory-mapped so tensor bytes can be read without copying.
#[derive(Debug)]
pub struct GgufFile {
    pub path: PathBuf,
    pub version: u32,
    pub metadata: Vec<(String, Value)>,
    pub tensors: Vec<TensorInfo>,
    pub alignment: u64,
    /// Absolute offset of the data section (end of the tensor table, aligned).
    pub data_offset: u64,
    pub file_size: u64,
    map: Mmap,
}

impl GgufFile {
    /// Opens and parses `path`.
    pub fn open(path: &Path) -> Result<GgufFile, GgufError> {
        let io = |source| GgufError::Io {
            path: path.to_path_buf(),
            source,
        };
        let not_a_file = || GgufError::NotAFile {
            path: path.to_path_buf(),
        };
        // Look before opening: opening a FIFO for reading blocks until a writer appears, and
        // opening a device may have side effects. symlink_metadata first, so a dangling link
        // is reported as what it is; a link to a regular file is fine.
        std::fs::symlink_metadata(path).map_err(io)?;
        if !std::fs::metadata(path).map_err(io)?.is_file() {
            return Err(not_a_file());
        }
        // The name may be swapped for a FIFO between the check and the open: O_NONBLOCK makes
        // that open return at once, and the descriptor is checked again.
        let file = {
            use std::os::unix::fs::OpenOptionsExt;
            std::fs::OpenOptions::new()
                .read(true)
                .custom_flags(nix::libc::O_NONBLOCK | nix::libc::O_NOCTTY)
                .open(path)
                .map_err(io)?
        };
        let meta = file.metadata().map_err(io)?;
        if !meta.is_file() {
            return Err(not_a_file());
        }
        clear_nonblock(&file).map_err(io)?;
        if meta.len() == 0 {
            return Err(GgufError::at(path, "file is empty"));
        }
        // SAFETY: the map is read-only and private to this process. Another process truncating
        // the file while it is mapped would raise SIGBUS; model files are not rewritten in
        // place by anything spark drives, and the writer replaces files by rename.
        let map = unsafe { Mmap::map(&file) }.map_err(io)?;
        Self::parse(path, map)
    }

    fn parse(path: &Path, map: Mmap) -> Result<GgufFile, GgufError> {
        let parsed = parse_bytes(&map).map_err(|e| e.with_path(path))?;
        Ok(GgufFile {
            path: path.to_path_buf(),
            version: parsed.version,
            metadata: parsed.metadata,
            tensors: parsed.tensors,
            alignment: parsed.alignment,
            data_offset: parsed.data_offset,
            file_size: map.len() as u64,
            map,
        })
    }

    /// The whole file as bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.map
    }

    /// The metadata value for `key`.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    pub fn get_u64(&self, key: &str) -> Option<u64> {
        self.get(key).and_then(Value::as_u64)
    }

    pub fn get_str(&self, key: &str) -> Option<&str> {
        self.get(key).and_then(Value::as_str)
    }

    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// The data of a tensor whose type is known.
    pub fn tensor_data(&self, info: &TensorInfo) -> Option<&[u8]> {
        let start = self.data_offset.checked_add(info.offset)?;
        let end = start.checked_add(info.bytes?)?;
        self.map.get(start as usize..end as usize)
    }
}

/// What [`parse_bytes`] finds in a buffer.
#[derive(Debug)]
pub struct Parsed {
    pub version: u32,
    pub metadata: Vec<(String, Value)>,
    pub tensors: Vec<TensorInfo>,
    pub alignment: u64,
    pub data_offset: u64,
}

/// Parses a whole GGUF image held in memory (the fuzz target calls this directly).
pub fn parse_bytes(buf: &[u8]) -> Result<Parsed, GgufError> {
    let mut c = Cursor { buf, pos: 0 };
    if buf.len() < 4 || &buf[..4] != GGUF_MAGIC {
        let shown = &buf[..buf.len().min(4)];
        return Err(GgufError::NotGguf {
            path: PathBuf::new(),
            found: format!("{shown:02x?}"),
        });
    }
    c.pos = 4;
    let version = c.u32("version")?;
    if version != 2 && version != 3 {
        return Err(GgufError::UnsupportedVersion {
            path: PathBuf::new(),
            version,
        });
    }
    let n_tensors = c.u64("tensor count")?;
    let n_kv = c.u64("metadata count")?;
    // Every key-value needs at least 8 (key length) + 4 (type) + 1 bytes; every tensor entry
    // at least 8 + 4 + 8 + 4 + 8. Reject counts the file cannot hold before allocating.
    c.check_count(n_kv, 13, "metadata count")?;
    let mut metadata = Vec::with_capacity(n_kv as usize);
    for _ in 0..n_kv {
        let key = c.string("metadata key")?;
        let type_id = c.u32("metadata value type")?;
        let vt = ValueType::from_id(type_id).ok_or_else(|| {
            c.corrupt(format!(
                "metadata key {key:?} has unknown value type {type_id}"
            ))
        })?;
        let value = c.value(vt, &key, 0)?;
        metadata.push((key, value));
    }
    let alignment = match metadata.iter().find(|(k, _)| k == "general.alignment") {
        None => DEFAULT_ALIGNMENT,
        Some((_, v)) => match v.as_u64() {
            Some(a) if a > 0 && a.is_power_of_two() => a,
            _ => {
                return Err(c.corrupt(format!(
                    "general.alignment {} is not a power of two",
                    v.summary()
                )))
            }
        },
    };
    c.check_count(n_tensors, 32, "tensor count")?;
    let mut tensors = Vec::with_capacity(n_tensors as usize);
    for _ in 0..n_tensors {
        let name = c.string("tensor name")?;
        let n_dims = c.u32("tensor dimension count")?;
        if n_dims == 0 || n_dims > MAX_DIMS {
            return Err(c.corrupt(format!(
                "tensor {name:?} has {n_dims} dimensions (1 to {MAX_DIMS} allowed)"
            )));
        }
        let mut dims = Vec::with_capacity(n_dims as usize);
        for _ in 0..n_dims {
            dims.push(c.u64("tensor dimension")?);
        }
        let type_id = c.u32("tensor type")?;
        let offset = c.u64("tensor offset")?;
        let ggml_type = GgmlType::from_id(type_id);
        let bytes = match ggml_type {
            Some(t) => Some(t.tensor_bytes(&dims).ok_or_else(|| {
                c.corrupt(format!(
                    "tensor {name:?} dimensions {dims:?} do not fit type {}",
                    t.name
                ))
            })?),
            None => None,
        };
        if offset % alignment != 0 {
            return Err(c.corrupt(format!(
                "tensor {name:?} offset {offset} is not aligned to {alignment}"
            )));
        }
        tensors.push(TensorInfo {
            name,
            dims,
            type_id,
            ggml_type,
            offset,
            bytes,
        });
    }
    let data_offset = (c.pos as u64).div_ceil(alignment) * alignment;
    let file_len = buf.len() as u64;
    if data_offset > file_len && !tensors.is_empty() {
        return Err(GgufError::Truncated {
            path: PathBuf::new(),
            what: "data section".into(),
            offset: c.pos as u64,
        });
    }
    for t in &tensors {
        if let Some(bytes) = t.bytes {
            let end = data_offset
                .checked_add(t.offset)
                .and_then(|s| s.checked_add(bytes));
            match end {
                Some(end) if end <= file_len => {}
                _ => {
                    return Err(GgufError::Truncated {
                        path: PathBuf::new(),
                        what: format!(
                            "data of tensor {:?} ({} bytes at data offset {})",
                            t.name, bytes, t.offset
                        ),
                        offset: file_len,
                    })
                }
            }
        }
    }
    Ok(Parsed {
        version,
        metadata,
        tensors,
        alignment,
        data_offset,
    })
}

struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], GgufError> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.buf.len());
        match end {
            Some(end) => {
                let s = &self.buf[self.pos..end];
                self.pos = end;
                Ok(s)
            }
            None => Err(GgufError::Truncated {
                path: PathBuf::new(),
                what: what.to_string(),
                offset: self.pos as u64,
            }),
        }
    }

    fn corrupt(&self, message: String) -> GgufError {
        GgufError::Corrupt {
            path: PathBuf::new(),
            offset: self.pos as u64,
            message,
        }
    }

    fn check_count(&self, count: u64, min_bytes_each: u64, what: &str) -> Result<(), GgufError> {
        let remaining = (self.buf.len() - self.pos) as u64;
        if count.saturating_mul(min_bytes_each) > remaining {
            return Err(GgufError::Truncated {
                path: PathBuf::new(),
                what: format!("{what} {count} (the file holds {remaining} more bytes)"),
                offset: self.pos as u64,
            });
        }
        Ok(())
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N], GgufError> {
        let s = self.take(N, what)?;
        let mut out = [0u8; N];
        out.copy_from_slice(s);
        Ok(out)
    }

    fn u32(&mut self, what: &str) -> Result<u32, GgufError> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &str) -> Result<u64, GgufError> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    fn string(&mut self, what: &str) -> Result<String, GgufError> {
        let len = self.u64(what)?;
        self.check_count(len, 1, what)?;
        let start = self.pos;
        let bytes = self.take(len as usize, what)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| GgufError::Corrupt {
            path: PathBuf::new(),
            offset: start as u64,
            message: format!("{what} is not valid UTF-8"),
        })
    }

    fn value(&mut self, vt: ValueType, key: &str, depth: usize) -> Result<Value, GgufError> {
        let what = "metadata value";
        Ok(match vt {
            ValueType::U8 => Value::U8(self.array::<1>(what)?[0]),
            ValueType::I8 => Value::I8(self.array::<1>(what)?[0] as i8),
            ValueType::U16 => Value::U16(u16::from_le_bytes(self.array(what)?)),
            ValueType::I16 => Value::I16(i16::from_le_bytes(self.array(what)?)),
            ValueType::U32 => Value::U32(u32::from_le_bytes(self.array(what)?)),
            ValueType::I32 => Value::I32(i32::from_le_bytes(self.array(what)?)),
            ValueType::F32 => Value::F32(f32::from_le_bytes(self.array(what)?)),
            ValueType::U64 => Value::U64(u64::from_le_bytes(self.array(what)?)),
            ValueType::I64 => Value::I64(i64::from_le_bytes(self.array(what)?)),
            ValueType::F64 => Value::F64(f64::from_le_bytes(self.array(what)?)),
            ValueType::Bool => match self.array::<1>(what)?[0] {
                0 => Value::Bool(false),
                1 => Value::Bool(true),
                b => return Err(self.corrupt(format!("metadata key {key:?} has bool byte {b}"))),
            },
            ValueType::String => Value::String(self.string("metadata string")?),
            ValueType::Array => {
                if depth >= MAX_ARRAY_DEPTH {
                    return Err(self.corrupt(format!(
                        "metadata key {key:?} nests arrays deeper than {MAX_ARRAY_DEPTH}"
                    )));
                }
                let elem_id = self.u32("array element type")?;
                let elem = ValueType::from_id(elem_id).ok_or_else(|| {
                    self.corrupt(format!(
                        "metadata key {key:?} has arrays of unknown type {elem_id}"
                    ))
                })?;
                let count = self.u64("array length")?;
                self.check_count(count, elem.fixed_size().unwrap_or(8) as u64, "array length")?;
                let mut items = Vec::with_capacity(count as usize);
                for _ in 0..count {
                    items.push(self.value(elem, key, depth + 1)?);
                }
                Value::Array(elem, items)
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gguf::{GgufWriter, Value, ValueType};
    use proptest::prelude::*;

    fn sample() -> Vec<u8> {
        let mut w = GgufWriter::new();
        w.set("general.architecture", Value::String("qwen3moe".into()));
        w.set("qwen3moe.expert_count", Value::U32(4));
        w.set(
            "a.nested",
            Value::Array(
                ValueType::Array,
                vec![Value::Array(ValueType::U8, vec![Value::U8(1)])],
            ),
        );
        w.add_tensor(
            "blk.0.ffn_up_exps.weight",
            &[32, 2, 4],
            GgmlType::Q8_0,
            vec![7; 8 * 34],
        );
        w.add_tensor("token_embd.weight", &[4, 3], GgmlType::F32, vec![1; 48]);
        w.to_bytes()
    }

    #[test]
    fn sample_parses() {
        let p = parse_bytes(&sample()).unwrap();
        assert_eq!(p.tensors.len(), 2);
        assert_eq!(p.metadata.len(), 3);
    }

    #[test]
    fn every_prefix_of_a_valid_file_is_an_error_not_a_panic() {
        let bytes = sample();
        for n in 0..bytes.len() {
            assert!(
                parse_bytes(&bytes[..n]).is_err(),
                "prefix of {n} bytes parsed"
            );
        }
    }

    proptest! {
        #[test]
        fn mutated_files_never_panic(edits in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8)) {
            let mut bytes = sample();
            for (i, b) in edits {
                let at = i.index(bytes.len());
                bytes[at] = b;
            }
            let _ = parse_bytes(&bytes);
        }

        #[test]
        fn random_bytes_after_the_magic_never_panic(tail in prop::collection::vec(any::<u8>(), 0..512)) {
            let mut bytes = b"GGUF\x03\0\0\0".to_vec();
            bytes.extend(tail);
            let _ = parse_bytes(&bytes);
        }
    }
}
