//! Writes GGUF v3 files: metadata in insertion order, tensor table, aligned data.
//!
//! The file is written to a temporary sibling and renamed into place after an fsync, so a reader
//! never sees a half-written model.

use std::io::{BufWriter, Write};
use std::path::Path;

use super::reader::{DEFAULT_ALIGNMENT, GGUF_MAGIC};
use super::types::GgmlType;
use super::value::Value;
use super::GgufError;
use crate::atomic_file::{AtomicFile, Mode};

/// A tensor waiting to be written: its data must be exactly `ggml_type.tensor_bytes(dims)`
/// bytes, or absent (`len` bytes left as a hole) in a header-only file.
struct PendingTensor {
    name: String,
    dims: Vec<u64>,
    ggml_type: GgmlType,
    data: Vec<u8>,
    len: u64,
}

/// Collects metadata and tensors, then writes them in one go.
#[derive(Default)]
pub struct GgufWriter {
    metadata: Vec<(String, Value)>,
    tensors: Vec<PendingTensor>,
    alignment: Option<u64>,
    /// Some tensors carry no bytes: the data section is written as a hole of the right size.
    sparse: bool,
}

impl GgufWriter {
    pub fn new() -> GgufWriter {
        GgufWriter::default()
    }

    /// Sets a metadata key (replacing an earlier value of the same key, keeping its position).
    pub fn set(&mut self, key: &str, value: Value) -> &mut Self {
        if key == "general.alignment" {
            self.alignment = value.as_u64();
        }
        match self.metadata.iter_mut().find(|(k, _)| k == key) {
            Some(slot) => slot.1 = value,
            None => self.metadata.push((key.to_string(), value)),
        }
        self
    }

    /// Adds a tensor. Panics if the data length does not match the type and dimensions: that is
    /// a bug in the caller, not bad input.
    pub fn add_tensor(
        &mut self,
        name: &str,
        dims: &[u64],
        ggml_type: GgmlType,
        data: Vec<u8>,
    ) -> &mut Self {
        let expected = ggml_type
            .tensor_bytes(dims)
            .expect("tensor dimensions fit the type");
        assert_eq!(data.len() as u64, expected, "tensor {name} data length");
        self.tensors.push(PendingTensor {
            name: name.to_string(),
            dims: dims.to_vec(),
            ggml_type,
            len: expected,
            data,
        });
        self
    }

    /// Adds a tensor without its bytes: the file gets the tensor's real size, written as a hole
    /// (a sparse file), so metadata readers (`inspect`, `plan`) see a full-width model without
    /// the disk space. Returns `None` when the dimensions do not fit the type.
    pub fn add_tensor_header_only(
        &mut self,
        name: &str,
        dims: &[u64],
        ggml_type: GgmlType,
    ) -> Option<&mut Self> {
        let len = ggml_type.tensor_bytes(dims)?;
        self.sparse = true;
        self.tensors.push(PendingTensor {
            name: name.to_string(),
            dims: dims.to_vec(),
            ggml_type,
            data: Vec::new(),
            len,
        });
        Some(self)
    }

    /// Serialises the whole file into memory (tests and small files).
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        let end = self
            .write_to(&mut out)
            .expect("writing to a Vec cannot fail");
        out.resize(end as usize, 0);
        out
    }

    /// Writes the file atomically at `path`, readable by all (a model holds no session text).
    pub fn write(&self, path: &Path) -> Result<(), GgufError> {
        let io = |source| GgufError::Io {
            path: path.to_path_buf(),
            source,
        };
        let file = AtomicFile::create_with(path, Mode::Public).map_err(io)?;
        let mut w = BufWriter::with_capacity(1 << 20, file.as_file());
        let end = self.write_to(&mut w).map_err(io)?;
        w.flush().map_err(io)?;
        drop(w);
        if self.sparse {
            // The holes of header-only tensors: the file ends where the last tensor ends.
            file.as_file().set_len(end).map_err(io)?;
        }
        file.commit().map_err(io)
    }

    /// Writes the file; returns where its data ends (past the holes of header-only tensors).
    fn write_to(&self, w: &mut impl Write) -> std::io::Result<u64> {
        let alignment = self.alignment.unwrap_or(DEFAULT_ALIGNMENT);
        let mut w = Counting { inner: w, pos: 0 };
        w.put(GGUF_MAGIC)?;
        w.put(&3u32.to_le_bytes())?;
        w.put(&(self.tensors.len() as u64).to_le_bytes())?;
        w.put(&(self.metadata.len() as u64).to_le_bytes())?;
        for (key, value) in &self.metadata {
            w.put(&encode_string(key))?;
            w.put(&(value.value_type() as u32).to_le_bytes())?;
            let mut buf = Vec::new();
            encode_value(value, &mut buf);
            w.put(&buf)?;
        }
        let mut offset = 0u64;
        let mut offsets = Vec::with_capacity(self.tensors.len());
        for t in &self.tensors {
            w.put(&encode_string(&t.name))?;
            w.put(&(t.dims.len() as u32).to_le_bytes())?;
            for d in &t.dims {
                w.put(&d.to_le_bytes())?;
            }
            w.put(&t.ggml_type.id.to_le_bytes())?;
            w.put(&offset.to_le_bytes())?;
            offsets.push(offset);
            offset = (offset + t.len).div_ceil(alignment) * alignment;
        }
        let data_start = w.pos.div_ceil(alignment) * alignment;
        w.put(&vec![0u8; (data_start - w.pos) as usize])?;
        let mut end = data_start;
        for (t, off) in self.tensors.iter().zip(offsets) {
            end = end.max(data_start + off + t.len);
            if t.data.is_empty() {
                continue; // a hole (header-only); set_len gives the file its size
            }
            w.put(&vec![0u8; (data_start + off - w.pos) as usize])?;
            w.put(&t.data)?;
        }
        Ok(end)
    }
}

/// A writer that knows how many bytes went through it.
struct Counting<'a, W: Write> {
    inner: &'a mut W,
    pos: u64,
}

impl<W: Write> Counting<'_, W> {
    fn put(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.pos += bytes.len() as u64;
        self.inner.write_all(bytes)
    }
}

fn encode_string(s: &str) -> Vec<u8> {
    let mut out = (s.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(s.as_bytes());
    out
}

fn encode_value(v: &Value, out: &mut Vec<u8>) {
    match v {
        Value::U8(x) => out.push(*x),
        Value::I8(x) => out.push(*x as u8),
        Value::U16(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::I16(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::U32(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::I32(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::F32(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::U64(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::I64(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::F64(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::Bool(x) => out.push(u8::from(*x)),
        Value::String(s) => out.extend_from_slice(&encode_string(s)),
        Value::Array(elem, items) => {
            debug_assert!(
                items.iter().all(|i| i.value_type() == *elem),
                "array items match the element type"
            );
            out.extend_from_slice(&(*elem as u32).to_le_bytes());
            out.extend_from_slice(&(items.len() as u64).to_le_bytes());
            for item in items {
                encode_value(item, out);
            }
        }
    }
}
