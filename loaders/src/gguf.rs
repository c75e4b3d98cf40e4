//! GGUF reader (versions 2 and 3, little-endian) over a memory map.
//!
//! Every count and length read from the file is checked against the bytes that remain before
//! anything is allocated for it, and every tensor's data range is checked to lie inside the file,
//! aligned and not overlapping another tensor. Tensor data is borrowed from the mapping.

use crate::quant::GgmlType;
use anyhow::{anyhow, bail, ensure, Context, Result};
use memmap2::Mmap;
use std::fs::File;
use std::path::{Path, PathBuf};

pub const GGUF_MAGIC: &[u8; 4] = b"GGUF";
pub const DEFAULT_ALIGNMENT: u64 = 32;
/// GGML_MAX_DIMS.
pub const MAX_DIMS: usize = 4;
/// Arrays nested deeper than this are rejected (protects the stack).
pub const MAX_ARRAY_DEPTH: usize = 8;
/// Most metadata array elements a file may hold in total (all arrays together). A parsed
/// element takes 32 bytes in memory for 1 to 8 in the file, so this caps metadata memory at
/// about 1 GiB. Real tokenizers hold a few hundred thousand tokens and merges.
pub const MAX_ARRAY_ELEMENTS: u64 = 1 << 25;

/// GGUF metadata value type ids.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum ValueType {
    U8 = 0,
    I8 = 1,
    U16 = 2,
    I16 = 3,
    U32 = 4,
    I32 = 5,
    F32 = 6,
    Bool = 7,
    String = 8,
    Array = 9,
    U64 = 10,
    I64 = 11,
    F64 = 12,
}

impl ValueType {
    pub fn from_id(id: u32) -> Result<ValueType> {
        use ValueType::*;
        Ok(match id {
            0 => U8,
            1 => I8,
            2 => U16,
            3 => I16,
            4 => U32,
            5 => I32,
            6 => F32,
            7 => Bool,
            8 => String,
            9 => Array,
            10 => U64,
            11 => I64,
            12 => F64,
            _ => bail!("unknown metadata value type {id}"),
        })
    }

    /// The fewest bytes one value of this type takes in a file.
    fn min_size(self) -> u64 {
        use ValueType::*;
        match self {
            U8 | I8 | Bool => 1,
            U16 | I16 => 2,
            U32 | I32 | F32 => 4,
            U64 | I64 | F64 | String => 8,
            Array => 12,
        }
    }
}

/// A metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    String(String),
    /// Element type and elements (all of that type).
    Array(ValueType, Vec<Value>),
    U64(u64),
    I64(i64),
    F64(f64),
}

impl Value {
    pub fn value_type(&self) -> ValueType {
        match self {
            Value::U8(_) => ValueType::U8,
            Value::I8(_) => ValueType::I8,
            Value::U16(_) => ValueType::U16,
            Value::I16(_) => ValueType::I16,
            Value::U32(_) => ValueType::U32,
            Value::I32(_) => ValueType::I32,
            Value::F32(_) => ValueType::F32,
            Value::Bool(_) => ValueType::Bool,
            Value::String(_) => ValueType::String,
            Value::Array(..) => ValueType::Array,
            Value::U64(_) => ValueType::U64,
            Value::I64(_) => ValueType::I64,
            Value::F64(_) => ValueType::F64,
        }
    }

    /// Any integer value as i128 (no loss), or None.
    pub fn as_int(&self) -> Option<i128> {
        Some(match *self {
            Value::U8(v) => v as i128,
            Value::I8(v) => v as i128,
            Value::U16(v) => v as i128,
            Value::I16(v) => v as i128,
            Value::U32(v) => v as i128,
            Value::I32(v) => v as i128,
            Value::U64(v) => v as i128,
            Value::I64(v) => v as i128,
            _ => return None,
        })
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }

    /// Short human-readable rendering (arrays summarized).
    pub fn summary(&self) -> String {
        match self {
            Value::String(s) => {
                let mut t: String = s.chars().take(60).collect();
                if t.len() < s.len() {
                    t.push('…');
                }
                format!("{t:?}")
            }
            Value::Array(t, v) => {
                let head: Vec<String> = v.iter().take(4).map(|x| x.summary()).collect();
                let more = if v.len() > 4 { ", …" } else { "" };
                format!("[{t:?}; {}] [{}{more}]", v.len(), head.join(", "))
            }
            Value::U8(v) => v.to_string(),
            Value::I8(v) => v.to_string(),
            Value::U16(v) => v.to_string(),
            Value::I16(v) => v.to_string(),
            Value::U32(v) => v.to_string(),
            Value::I32(v) => v.to_string(),
            Value::U64(v) => v.to_string(),
            Value::I64(v) => v.to_string(),
            Value::F32(v) => format!("{v:e}"),
            Value::F64(v) => format!("{v:e}"),
            Value::Bool(v) => v.to_string(),
        }
    }
}

/// One tensor's header entry.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorInfo {
    pub name: String,
    /// GGUF dims, innermost first (`ne`).
    pub ne: Vec<u64>,
    pub ty: GgmlType,
    /// Offset relative to the start of the data section.
    pub offset: u64,
    /// Byte size of the data.
    pub n_bytes: u64,
    /// Absolute offset in the file.
    pub file_offset: u64,
}

impl TensorInfo {
    /// Row-major shape, outermost first (`ne` reversed).
    pub fn shape(&self) -> Vec<usize> {
        self.ne.iter().rev().map(|&d| d as usize).collect()
    }

    pub fn n_elements(&self) -> u64 {
        self.ne.iter().product()
    }
}

/// An open GGUF file.
pub struct GgufFile {
    path: PathBuf,
    mmap: Mmap,
    pub version: u32,
    metadata: Vec<(String, Value)>,
    tensors: Vec<TensorInfo>,
    tensor_index: std::collections::HashMap<String, usize>,
    pub alignment: u64,
    /// Absolute offset of the tensor data section.
    pub data_offset: u64,
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    /// Array elements still allowed (see [`MAX_ARRAY_ELEMENTS`]).
    element_budget: u64,
}

impl<'a> Reader<'a> {
    fn remaining(&self) -> u64 {
        (self.buf.len() - self.pos) as u64
    }

    fn take(&mut self, n: u64, what: &str) -> Result<&'a [u8]> {
        if n > self.remaining() {
            bail!(
                "truncated: {what} needs {n} bytes at offset {} but only {} remain",
                self.pos,
                self.remaining()
            );
        }
        let s = &self.buf[self.pos..self.pos + n as usize];
        self.pos += n as usize;
        Ok(s)
    }

    fn arr<const N: usize>(&mut self, what: &str) -> Result<[u8; N]> {
        let s = self.take(N as u64, what)?;
        Ok(s.try_into().expect("length checked"))
    }

    fn u32(&mut self, what: &str) -> Result<u32> {
        Ok(u32::from_le_bytes(self.arr(what)?))
    }

    fn u64(&mut self, what: &str) -> Result<u64> {
        Ok(u64::from_le_bytes(self.arr(what)?))
    }

    fn string(&mut self, what: &str) -> Result<String> {
        let at = self.pos;
        let len = self.u64(what)?;
        let bytes = self
            .take(len, what)
            .with_context(|| format!("{what}: string length {len}"))?;
        String::from_utf8(bytes.to_vec())
            .map_err(|_| anyhow!("{what}: string at offset {at} is not valid UTF-8"))
    }

    fn value(&mut self, ty: ValueType, depth: usize, what: &str) -> Result<Value> {
        Ok(match ty {
            ValueType::U8 => Value::U8(self.arr::<1>(what)?[0]),
            ValueType::I8 => Value::I8(self.arr::<1>(what)?[0] as i8),
            ValueType::U16 => Value::U16(u16::from_le_bytes(self.arr(what)?)),
            ValueType::I16 => Value::I16(i16::from_le_bytes(self.arr(what)?)),
            ValueType::U32 => Value::U32(self.u32(what)?),
            ValueType::I32 => Value::I32(i32::from_le_bytes(self.arr(what)?)),
            ValueType::F32 => Value::F32(f32::from_le_bytes(self.arr(what)?)),
            ValueType::Bool => {
                let b = self.arr::<1>(what)?[0];
                ensure!(b <= 1, "{what}: bool value {b} is neither 0 nor 1");
                Value::Bool(b == 1)
            }
            ValueType::String => Value::String(self.string(what)?),
            ValueType::U64 => Value::U64(self.u64(what)?),
            ValueType::I64 => Value::I64(i64::from_le_bytes(self.arr(what)?)),
            ValueType::F64 => Value::F64(f64::from_le_bytes(self.arr(what)?)),
            ValueType::Array => {
                ensure!(
                    depth < MAX_ARRAY_DEPTH,
                    "{what}: arrays nested deeper than {MAX_ARRAY_DEPTH}"
                );
                let et = ValueType::from_id(self.u32(what)?)
                    .with_context(|| format!("{what}: array element type"))?;
                let n = self.u64(what)?;
                let max = self.remaining() / et.min_size();
                ensure!(
                    n <= max,
                    "{what}: array of {n} {et:?} elements cannot fit in the {} bytes left",
                    self.remaining()
                );
                ensure!(
                    n <= self.element_budget,
                    "{what}: array of {n} elements exceeds the limit of {MAX_ARRAY_ELEMENTS} metadata array elements"
                );
                self.element_budget -= n;
                let mut v = Vec::with_capacity(n.min(1 << 16) as usize);
                for _ in 0..n {
                    v.push(self.value(et, depth + 1, what)?);
                }
                Value::Array(et, v)
            }
        })
    }
}

fn align_up(x: u64, a: u64) -> Option<u64> {
    x.checked_add(a - 1).map(|v| v / a * a)
}

impl GgufFile {
    /// Map and parse the GGUF file at `path`. Errors name the file and the problem.
    pub fn open(path: &Path) -> Result<GgufFile> {
        let file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
        // SAFETY: the file is mapped read-only; as with any mmap, it must not be truncated by
        // another process while mapped.
        let mmap = unsafe { Mmap::map(&file) }
            .with_context(|| format!("cannot map {}", path.display()))?;
        Self::parse(path, mmap).with_context(|| format!("{}: invalid GGUF file", path.display()))
    }

    /// Parse GGUF bytes held in memory (used by the fuzzer and tests).
    pub fn from_bytes(bytes: &[u8]) -> Result<GgufFile> {
        if bytes.is_empty() {
            bail!("<memory>: invalid GGUF file: empty input");
        }
        let mut m = memmap2::MmapMut::map_anon(bytes.len())?;
        m.copy_from_slice(bytes);
        let mmap = m.make_read_only()?;
        let path = PathBuf::from("<memory>");
        Self::parse(&path, mmap).context("<memory>: invalid GGUF file")
    }

    fn parse(path: &Path, mmap: Mmap) -> Result<GgufFile> {
        let (version, metadata, tensors, alignment, data_offset) = {
            let mut r = Reader {
                buf: &mmap,
                pos: 0,
                element_budget: MAX_ARRAY_ELEMENTS,
            };
            let magic = r.arr::<4>("magic")?;
            ensure!(
                &magic == GGUF_MAGIC,
                "bad magic {:?} (expected \"GGUF\")",
                String::from_utf8_lossy(&magic)
            );
            let version = r.u32("version")?;
            if version.swap_bytes() == 2 || version.swap_bytes() == 3 {
                bail!("big-endian GGUF files are not supported");
            }
            ensure!(
                version == 2 || version == 3,
                "unsupported GGUF version {version} (supported: 2, 3)"
            );
            let n_tensors = r.u64("tensor count")?;
            let n_kv = r.u64("metadata count")?;
            // Each KV takes at least 8 (key length) + 4 (type) + 1 bytes; each tensor info
            // at least 8 + 4 + 8 + 4 + 8.
            ensure!(
                n_kv <= r.remaining() / 13,
                "metadata count {n_kv} cannot fit in the {} bytes of the file",
                mmap.len()
            );
            let mut metadata: Vec<(String, Value)> = Vec::with_capacity(n_kv.min(1024) as usize);
            let mut keys = std::collections::HashSet::new();
            for i in 0..n_kv {
                let key = r
                    .string("metadata key")
                    .with_context(|| format!("metadata #{i}"))?;
                let what = format!("metadata `{key}`");
                ensure!(keys.insert(key.clone()), "duplicate metadata key `{key}`");
                let ty = ValueType::from_id(r.u32(&what)?).with_context(|| what.clone())?;
                let v = r.value(ty, 0, &what)?;
                metadata.push((key, v));
            }
            let alignment = match metadata.iter().find(|(k, _)| k == "general.alignment") {
                None => DEFAULT_ALIGNMENT,
                Some((_, Value::U32(a))) => {
                    ensure!(
                        *a != 0 && a.is_power_of_two(),
                        "general.alignment {a} is not a power of two"
                    );
                    *a as u64
                }
                Some((_, v)) => bail!(
                    "general.alignment has type {:?}, expected U32",
                    v.value_type()
                ),
            };
            ensure!(
                n_tensors <= r.remaining() / 32,
                "tensor count {n_tensors} cannot fit in the {} bytes of the file",
                mmap.len()
            );
            let mut tensors: Vec<TensorInfo> = Vec::with_capacity(n_tensors.min(4096) as usize);
            let mut names = std::collections::HashSet::new();
            for i in 0..n_tensors {
                let name = r
                    .string("tensor name")
                    .with_context(|| format!("tensor #{i}"))?;
                let what = format!("tensor `{name}`");
                ensure!(names.insert(name.clone()), "duplicate tensor name `{name}`");
                let n_dims = r.u32(&what)? as usize;
                ensure!(
                    (1..=MAX_DIMS).contains(&n_dims),
                    "{what}: {n_dims} dimensions (supported: 1 to {MAX_DIMS})"
                );
                let mut ne = Vec::with_capacity(n_dims);
                for _ in 0..n_dims {
                    let d = r.u64(&what)?;
                    ensure!(d <= i64::MAX as u64, "{what}: dimension {d} is too large");
                    ne.push(d);
                }
                let ty_id = r.u32(&what)?;
                let ty = GgmlType::from_id(ty_id).with_context(|| what.clone())?;
                let offset = r.u64(&what)?;
                let n_el = ne
                    .iter()
                    .try_fold(1u64, |a, &d| a.checked_mul(d))
                    .ok_or_else(|| anyhow!("{what}: element count of {ne:?} overflows"))?;
                ensure!(
                    ne[0] % ty.block_size() as u64 == 0,
                    "{what}: row length {} is not a multiple of the {ty} block size {}",
                    ne[0],
                    ty.block_size()
                );
                let n_bytes = ty.bytes_for(n_el).with_context(|| what.clone())?;
                ensure!(
                    offset % alignment == 0,
                    "{what}: data offset {offset} is not a multiple of the alignment {alignment}"
                );
                tensors.push(TensorInfo {
                    name,
                    ne,
                    ty,
                    offset,
                    n_bytes,
                    file_offset: 0,
                });
            }
            let data_offset = align_up(r.pos as u64, alignment)
                .ok_or_else(|| anyhow!("data section offset overflows"))?;
            let file_len = mmap.len() as u64;
            if !tensors.is_empty() {
                ensure!(
                    data_offset <= file_len,
                    "truncated: tensor data section starts at {data_offset} but the file is {file_len} bytes"
                );
            }
            for t in tensors.iter_mut() {
                let start = data_offset.checked_add(t.offset);
                let end = start.and_then(|s| s.checked_add(t.n_bytes));
                match (start, end) {
                    (Some(s), Some(e)) if e <= file_len => t.file_offset = s,
                    _ => bail!(
                        "tensor `{}`: data [{} + {}, {} bytes) runs past the end of the file ({} bytes)",
                        t.name,
                        data_offset,
                        t.offset,
                        t.n_bytes,
                        file_len
                    ),
                }
            }
            let mut order: Vec<&TensorInfo> = tensors.iter().collect();
            order.sort_by_key(|t| t.offset);
            for w in order.windows(2) {
                ensure!(
                    w[0].offset + w[0].n_bytes <= w[1].offset || w[0].n_bytes == 0,
                    "tensors `{}` and `{}` overlap (data at {}..{} and {}..)",
                    w[0].name,
                    w[1].name,
                    w[0].offset,
                    w[0].offset + w[0].n_bytes,
                    w[1].offset
                );
            }
            (version, metadata, tensors, alignment, data_offset)
        };
        let tensor_index = tensors
            .iter()
            .enumerate()
            .map(|(i, t)| (t.name.clone(), i))
            .collect();
        Ok(GgufFile {
            tensor_index,
            path: path.to_path_buf(),
            mmap,
            version,
            metadata,
            tensors,
            alignment,
            data_offset,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// All metadata in file order.
    pub fn metadata(&self) -> &[(String, Value)] {
        &self.metadata
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    fn typed<'a, T>(
        &'a self,
        key: &str,
        want: &str,
        f: impl FnOnce(&'a Value) -> Option<T>,
    ) -> Result<Option<T>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => match f(v) {
                Some(x) => Ok(Some(x)),
                None => bail!(
                    "{}: metadata `{key}` is {}, expected {want}",
                    self.path.display(),
                    v.summary()
                ),
            },
        }
    }

    /// Any integer metadata value that fits u32. `Ok(None)` when absent.
    pub fn get_u32(&self, key: &str) -> Result<Option<u32>> {
        self.typed(key, "an integer that fits u32", |v| {
            v.as_int().and_then(|i| u32::try_from(i).ok())
        })
    }

    /// Any integer metadata value that fits u64.
    pub fn get_u64(&self, key: &str) -> Result<Option<u64>> {
        self.typed(key, "an integer that fits u64", |v| {
            v.as_int().and_then(|i| u64::try_from(i).ok())
        })
    }

    /// A float metadata value (F32, or F64 narrowed).
    pub fn get_f32(&self, key: &str) -> Result<Option<f32>> {
        self.typed(key, "a float", |v| match v {
            Value::F32(x) => Some(*x),
            Value::F64(x) => Some(*x as f32),
            _ => None,
        })
    }

    pub fn get_bool(&self, key: &str) -> Result<Option<bool>> {
        self.typed(key, "a bool", |v| match v {
            Value::Bool(b) => Some(*b),
            _ => None,
        })
    }

    pub fn get_str(&self, key: &str) -> Result<Option<&str>> {
        self.typed(key, "a string", |v| v.as_str())
    }

    /// An array's elements.
    pub fn get_array(&self, key: &str) -> Result<Option<&[Value]>> {
        self.typed(key, "an array", |v| match v {
            Value::Array(_, items) => Some(items.as_slice()),
            _ => None,
        })
    }

    /// An array of strings.
    pub fn get_str_array(&self, key: &str) -> Result<Option<Vec<String>>> {
        self.typed(key, "an array of strings", |v| match v {
            Value::Array(ValueType::String, items) => {
                items.iter().map(|x| x.as_str().map(String::from)).collect()
            }
            _ => None,
        })
    }

    /// An array of integers, each fitting i32.
    pub fn get_i32_array(&self, key: &str) -> Result<Option<Vec<i32>>> {
        self.typed(key, "an array of integers", |v| match v {
            Value::Array(_, items) => items
                .iter()
                .map(|x| x.as_int().and_then(|i| i32::try_from(i).ok()))
                .collect(),
            _ => None,
        })
    }

    /// Tensor infos in file order.
    pub fn tensors(&self) -> &[TensorInfo] {
        &self.tensors
    }

    pub fn tensor_info(&self, name: &str) -> Option<&TensorInfo> {
        self.tensor_index.get(name).map(|&i| &self.tensors[i])
    }

    /// The tensor's raw bytes, borrowed from the mapping (bounds checked when the file was opened).
    pub fn tensor_bytes(&self, info: &TensorInfo) -> &[u8] {
        // Infos from this file were bounds-checked at open; a foreign info gets an empty slice
        // (and then a length error from whoever uses it) rather than a panic.
        let s = info.file_offset as usize;
        self.mmap
            .get(s..s.saturating_add(info.n_bytes as usize))
            .unwrap_or(&[])
    }

    /// The whole file's bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.mmap
    }
}
