//! GGUF writer (version 3, little-endian): metadata of every type, F32/F16 tensors and raw
//! (already quantized) tensor bytes, data aligned to `general.alignment` (default 32).

use crate::gguf::{GgufFile, Value, ValueType, DEFAULT_ALIGNMENT};
use crate::quant::GgmlType;
use crate::{HostModel, TensorData, TokenizerData};
use anyhow::{bail, ensure, Context, Result};
use half::f16;
use std::borrow::Cow;
use std::io::Write;
use std::path::Path;

struct PendingTensor<'a> {
    name: String,
    /// GGUF dims, innermost first.
    ne: Vec<u64>,
    ty: GgmlType,
    data: Cow<'a, [u8]>,
}

/// Builds a GGUF v3 file in memory order: metadata, tensor infos, aligned tensor data.
#[derive(Default)]
pub struct GgufWriter<'a> {
    metadata: Vec<(String, Value)>,
    tensors: Vec<PendingTensor<'a>>,
}

impl<'a> GgufWriter<'a> {
    pub fn new() -> Self {
        Self::default()
    }

    /// Add (or replace) a metadata value.
    pub fn set(&mut self, key: &str, value: Value) -> &mut Self {
        match self.metadata.iter_mut().find(|(k, _)| k == key) {
            Some(slot) => slot.1 = value,
            None => self.metadata.push((key.to_string(), value)),
        }
        self
    }

    /// Remove a metadata key if present.
    pub fn remove(&mut self, key: &str) -> &mut Self {
        self.metadata.retain(|(k, _)| k != key);
        self
    }

    pub fn set_str(&mut self, key: &str, v: &str) -> &mut Self {
        self.set(key, Value::String(v.to_string()))
    }

    pub fn set_u32(&mut self, key: &str, v: u32) -> &mut Self {
        self.set(key, Value::U32(v))
    }

    pub fn set_f32(&mut self, key: &str, v: f32) -> &mut Self {
        self.set(key, Value::F32(v))
    }

    /// Add a tensor of raw bytes of type `ty`; `shape` is row-major (outermost first).
    /// The byte length must match the shape and type.
    pub fn add_raw(
        &mut self,
        name: &str,
        shape: &[usize],
        ty: GgmlType,
        data: impl Into<Cow<'a, [u8]>>,
    ) -> Result<&mut Self> {
        let data = data.into();
        ensure!(
            !self.tensors.iter().any(|t| t.name == name),
            "duplicate tensor `{name}`"
        );
        ensure!(
            (1..=crate::gguf::MAX_DIMS).contains(&shape.len()),
            "tensor `{name}`: {} dims (1 to 4 supported)",
            shape.len()
        );
        ensure!(
            shape[shape.len() - 1].is_multiple_of(ty.block_size()),
            "tensor `{name}`: row length {} is not a multiple of the {ty} block size",
            shape[shape.len() - 1]
        );
        let n: u64 = shape.iter().map(|&d| d as u64).product();
        let want = ty.bytes_for(n)?;
        ensure!(
            data.len() as u64 == want,
            "tensor `{name}`: {} bytes of data, {ty} {shape:?} needs {want}",
            data.len()
        );
        self.tensors.push(PendingTensor {
            name: name.to_string(),
            ne: shape.iter().rev().map(|&d| d as u64).collect(),
            ty,
            data,
        });
        Ok(self)
    }

    /// Add an F32 tensor (borrowed, not copied, on little-endian hosts).
    pub fn add_f32(&mut self, name: &str, shape: &[usize], v: &'a [f32]) -> Result<&mut Self> {
        let bytes: Cow<'a, [u8]> = if cfg!(target_endian = "little") {
            Cow::Borrowed(bytemuck::cast_slice(v))
        } else {
            Cow::Owned(v.iter().flat_map(|x| x.to_le_bytes()).collect())
        };
        self.add_raw(name, shape, GgmlType::F32, bytes)
    }

    /// Add an F16 tensor (borrowed, not copied, on little-endian hosts).
    pub fn add_f16(&mut self, name: &str, shape: &[usize], v: &'a [f16]) -> Result<&mut Self> {
        let bytes: Cow<'a, [u8]> = if cfg!(target_endian = "little") {
            Cow::Borrowed(bytemuck::cast_slice(v))
        } else {
            Cow::Owned(v.iter().flat_map(|x| x.to_bits().to_le_bytes()).collect())
        };
        self.add_raw(name, shape, GgmlType::F16, bytes)
    }

    /// Add an owned F32 tensor.
    pub fn add_f32_owned(&mut self, name: &str, shape: &[usize], v: &[f32]) -> Result<&mut Self> {
        let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
        self.add_raw(name, shape, GgmlType::F32, bytes)
    }

    /// Add an owned F16 tensor.
    pub fn add_f16_owned(&mut self, name: &str, shape: &[usize], v: &[f16]) -> Result<&mut Self> {
        let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_bits().to_le_bytes()).collect();
        self.add_raw(name, shape, GgmlType::F16, bytes)
    }

    fn alignment(&self) -> Result<u64> {
        match self.metadata.iter().find(|(k, _)| k == "general.alignment") {
            None => Ok(DEFAULT_ALIGNMENT),
            Some((_, Value::U32(a))) if *a != 0 && a.is_power_of_two() => Ok(*a as u64),
            Some((_, v)) => bail!("general.alignment must be a U32 power of two, got {v:?}"),
        }
    }

    /// The whole file as bytes.
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        let mut out = Vec::new();
        self.write_to(&mut out)?;
        Ok(out)
    }

    /// Write the file to `path`.
    pub fn write(&self, path: &Path) -> Result<()> {
        let f = std::fs::File::create(path)
            .with_context(|| format!("cannot create {}", path.display()))?;
        let mut w = std::io::BufWriter::new(f);
        self.write_to(&mut w)
            .and_then(|_| Ok(w.flush()?))
            .with_context(|| format!("writing {}", path.display()))
    }

    pub fn write_to(&self, w: &mut impl Write) -> Result<()> {
        let align = self.alignment()?;
        let mut head = Vec::new();
        head.extend_from_slice(b"GGUF");
        head.extend_from_slice(&3u32.to_le_bytes());
        head.extend_from_slice(&(self.tensors.len() as u64).to_le_bytes());
        head.extend_from_slice(&(self.metadata.len() as u64).to_le_bytes());
        for (k, v) in &self.metadata {
            put_str(&mut head, k);
            head.extend_from_slice(&(v.value_type() as u32).to_le_bytes());
            put_value(&mut head, v)?;
        }
        let mut offset = 0u64;
        let mut offsets = Vec::with_capacity(self.tensors.len());
        for t in &self.tensors {
            put_str(&mut head, &t.name);
            head.extend_from_slice(&(t.ne.len() as u32).to_le_bytes());
            for d in &t.ne {
                head.extend_from_slice(&d.to_le_bytes());
            }
            head.extend_from_slice(&t.ty.id().to_le_bytes());
            head.extend_from_slice(&offset.to_le_bytes());
            offsets.push(offset);
            offset = (offset + t.data.len() as u64).div_ceil(align) * align;
        }
        let pad = |n: u64| vec![0u8; ((align - n % align) % align) as usize];
        let head_len = head.len() as u64;
        head.extend(pad(head_len));
        w.write_all(&head)?;
        for t in &self.tensors {
            w.write_all(&t.data)?;
            w.write_all(&pad(t.data.len() as u64))?;
        }
        Ok(())
    }
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn put_value(out: &mut Vec<u8>, v: &Value) -> Result<()> {
    match v {
        Value::U8(x) => out.push(*x),
        Value::I8(x) => out.push(*x as u8),
        Value::U16(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::I16(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::U32(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::I32(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::F32(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::Bool(x) => out.push(*x as u8),
        Value::String(s) => put_str(out, s),
        Value::U64(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::I64(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::F64(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::Array(et, items) => {
            out.extend_from_slice(&(*et as u32).to_le_bytes());
            out.extend_from_slice(&(items.len() as u64).to_le_bytes());
            for it in items {
                ensure!(
                    it.value_type() == *et,
                    "array of {et:?} holds a {:?}",
                    it.value_type()
                );
                put_value(out, it)?;
            }
        }
    }
    Ok(())
}

fn str_array(v: &[String]) -> Value {
    Value::Array(
        ValueType::String,
        v.iter().map(|s| Value::String(s.clone())).collect(),
    )
}

/// Set the `qwen2.*`, `tokenizer.ggml.*` and `tokenizer.chat_template` keys for `model`.
pub fn set_model_metadata(w: &mut GgufWriter, model: &HostModel) -> Result<()> {
    let c = &model.config;
    c.validate()?;
    let u = |x: usize, what: &str| -> Result<u32> {
        u32::try_from(x).with_context(|| format!("config {what} = {x} does not fit u32"))
    };
    w.set_str("general.architecture", "qwen2");
    w.set_u32("qwen2.block_count", u(c.layers, "layers")?);
    w.set_u32(
        "qwen2.context_length",
        u(c.context_length, "context_length")?,
    );
    w.set_u32("qwen2.embedding_length", u(c.hidden, "hidden")?);
    w.set_u32("qwen2.feed_forward_length", u(c.ffn, "ffn")?);
    w.set_u32("qwen2.attention.head_count", u(c.n_heads, "n_heads")?);
    w.set_u32(
        "qwen2.attention.head_count_kv",
        u(c.n_kv_heads, "n_kv_heads")?,
    );
    w.set_u32("qwen2.attention.key_length", u(c.head_dim, "head_dim")?);
    w.set_u32("qwen2.attention.value_length", u(c.head_dim, "head_dim")?);
    w.set_f32("qwen2.rope.freq_base", c.rope_theta);
    w.set_f32("qwen2.attention.layer_norm_rms_epsilon", c.rms_eps);
    set_tokenizer_metadata(w, &model.tokenizer);
    Ok(())
}

/// Set the `tokenizer.ggml.*` and `tokenizer.chat_template` keys for `t`.
pub fn set_tokenizer_metadata(w: &mut GgufWriter, t: &TokenizerData) {
    w.set_str("tokenizer.ggml.model", &t.model);
    w.set_str("tokenizer.ggml.pre", &t.pre);
    w.set("tokenizer.ggml.tokens", str_array(&t.tokens));
    w.set(
        "tokenizer.ggml.token_type",
        Value::Array(
            ValueType::I32,
            t.token_types.iter().map(|&x| Value::I32(x)).collect(),
        ),
    );
    w.set("tokenizer.ggml.merges", str_array(&t.merges));
    for (key, id) in [
        ("tokenizer.ggml.eos_token_id", t.eos_id),
        ("tokenizer.ggml.bos_token_id", t.bos_id),
        ("tokenizer.ggml.padding_token_id", t.pad_id),
    ] {
        match id {
            Some(id) => w.set_u32(key, id),
            None => w.remove(key),
        };
    }
    w.set("tokenizer.ggml.add_bos_token", Value::Bool(t.add_bos));
    match &t.chat_template {
        Some(s) => w.set_str("tokenizer.chat_template", s),
        None => w.remove("tokenizer.chat_template"),
    };
}

/// Add every tensor of `model`: 2+ dims as F16, 1-D as F32 (converting when needed).
pub fn add_model_tensors<'a>(w: &mut GgufWriter<'a>, model: &'a HostModel) -> Result<()> {
    let c = &model.config;
    ensure!(
        c.tied_embeddings != model.tensors.contains_key("output.weight"),
        "model config says tied_embeddings={} but output.weight is {}",
        c.tied_embeddings,
        if c.tied_embeddings {
            "present"
        } else {
            "absent"
        }
    );
    for (name, t) in &model.tensors {
        ensure!(
            t.data.len() == t.shape.iter().product::<usize>(),
            "tensor `{name}`: {} values for shape {:?}",
            t.data.len(),
            t.shape
        );
        match (&t.data, t.shape.len() >= 2) {
            (TensorData::F16(v), true) => w.add_f16(name, &t.shape, v)?,
            (TensorData::F32(v), true) => {
                let h: Vec<f16> = v.iter().map(|&x| f16::from_f32(x)).collect();
                w.add_f16_owned(name, &t.shape, &h)?
            }
            (TensorData::F32(v), false) => w.add_f32(name, &t.shape, v)?,
            (TensorData::F16(_), false) => w.add_f32_owned(name, &t.shape, &t.data.to_f32())?,
        };
    }
    Ok(())
}

/// Write `model` as an F16 GGUF (1-D tensors F32) with qwen2 and tokenizer metadata, such that
/// `load_model(out)` gives back the same model.
pub fn write_gguf_f16(model: &HostModel, out: &Path) -> Result<()> {
    let mut w = GgufWriter::new();
    w.set_str("general.name", "cubeqwen");
    set_model_metadata(&mut w, model)?;
    w.set_u32("general.file_type", 1); // LLAMA_FTYPE_MOSTLY_F16
    add_model_tensors(&mut w, model)?;
    w.write(out)
}

/// Convert a GGUF file or HF checkpoint directory to an F16 GGUF (1-D tensors F32). From a GGUF
/// input every metadata key is kept except `general.file_type` (set to F16),
/// `general.quantization_version` and `general.alignment` (dropped).
pub fn convert_to_f16(input: &Path, output: &Path) -> Result<()> {
    let model = crate::load_model(input)?;
    let mut w = GgufWriter::new();
    if !input.is_dir() {
        let g = GgufFile::open(input)?;
        for (k, v) in g.metadata() {
            w.set(k, v.clone());
        }
        w.remove("general.quantization_version");
        w.remove("general.alignment");
    } else {
        w.set_str("general.name", &input.display().to_string());
    }
    set_model_metadata(&mut w, &model)?;
    w.set_u32("general.file_type", 1);
    add_model_tensors(&mut w, &model)?;
    w.write(output)
}

/// Write a GGUF holding only the tokenizer of `input` (a GGUF file or an HF checkpoint
/// directory): `general.architecture` qwen2, `tokenizer.*` keys, no tensors. A few MB for
/// Qwen's 151936-token vocabulary; [`crate::load_tokenizer_data`] reads it back.
pub fn write_tokenizer_gguf(input: &Path, output: &Path) -> Result<()> {
    let t = crate::load_tokenizer_data(input)?;
    ensure!(
        !t.tokens.is_empty(),
        "{}: the tokenizer has no tokens",
        input.display()
    );
    let mut w = GgufWriter::new();
    w.set_str("general.architecture", "qwen2");
    w.set_str(
        "general.name",
        &format!(
            "tokenizer of {}",
            input.file_name().unwrap_or_default().to_string_lossy()
        ),
    );
    set_tokenizer_metadata(&mut w, &t);
    w.write(output)
}
