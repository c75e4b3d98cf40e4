//! cubeqwen-loaders: model files (GGUF, safetensors) to typed host tensors.
//!
//! The interface other crates use:
//! - [`load_model`] opens a GGUF file or a Hugging Face checkpoint directory and returns a [`HostModel`]:
//!   the [`Qwen2Config`], the [`TokenizerData`] and every tensor under its GGUF name
//!   (`token_embd.weight`, `blk.N.attn_q.weight`, ...), dequantized.
//! - Tensor shapes are row-major (outermost first): `token_embd.weight` is `[vocab, d]`.
//! - 2-D weights are held as f16 ([`TensorData::F16`]); 1-D tensors (norm weights, biases) as f32.
//! - [`load_tokenizer_data`] reads only the tokenizer (GGUF metadata, or HF `tokenizer.json`).
//! - [`GgufFile`] (module [`gguf`]) is the bounds-checked GGUF v2/v3 reader, module [`hf`] reads
//!   HF checkpoint directories; they only read. [`model`], [`config`] and [`tokenizer`] build the
//!   model, config and tokenizer from what they read. [`quant`] holds [`GgmlType`] and the
//!   llama.cpp-exact dequantizers.
//! - [`write_gguf_f16`], [`convert_to_f16`] and [`GgufWriter`] (module [`writer`]) write GGUF v3.
//! - [`random_qwen2`] builds synthetic models (small ones for tests); [`qwen25_config`] names the
//!   Qwen2.5 shapes and [`write_random_gguf`] writes random-weight GGUFs of them for benchmarks;
//!   [`write_tokenizer_gguf`] keeps only a file's tokenizer; [`inspect()`] describes a GGUF file.
//!
//! Errors are `anyhow` errors naming the file and the problem; malformed input never panics.

use half::f16;

pub mod config;
pub mod gguf;
pub mod hf;
pub mod inspect;
pub mod model;
pub mod quant;
pub mod random;
pub mod tokenizer;
pub mod writer;

pub use config::{config_from_gguf, config_from_hf, DEFAULT_ROPE_THETA};
pub use gguf::{GgufFile, TensorInfo, Value, ValueType};
pub use hf::hf_to_gguf_name;
pub use inspect::inspect;
pub use model::{load_hf_dir, load_model, model_from_gguf};
pub use quant::{dequantize, dequantize_to_f16, GgmlType};
pub use random::{
    byte_level_tokenizer, pad_tokenizer, qwen25_config, random_qwen2, random_qwen2_with_tokenizer,
    small_gqa7_config, tiny_config, write_random_gguf, QWEN25_SHAPES,
};
pub use tokenizer::{load_tokenizer_data, tokenizer_from_gguf};
pub use writer::{convert_to_f16, write_gguf_f16, write_tokenizer_gguf, GgufWriter};

/// Qwen2 model hyper-parameters read from `qwen2.*` metadata (or HF `config.json`).
#[derive(Debug, Clone, PartialEq)]
pub struct Qwen2Config {
    pub hidden: usize,
    pub layers: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub ffn: usize,
    pub vocab: usize,
    pub rope_theta: f32,
    pub rms_eps: f32,
    pub context_length: usize,
    /// true when the file has no `output.weight`: the lm_head is `token_embd.weight`.
    pub tied_embeddings: bool,
}

/// What a BPE tokenizer needs, from `tokenizer.ggml.*` (or HF `tokenizer.json`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TokenizerData {
    /// `tokenizer.ggml.model`, e.g. "gpt2".
    pub model: String,
    /// `tokenizer.ggml.pre`, e.g. "qwen2".
    pub pre: String,
    pub tokens: Vec<String>,
    /// GGUF token types: 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte.
    pub token_types: Vec<i32>,
    /// "a b" pairs, in priority order.
    pub merges: Vec<String>,
    pub eos_id: Option<u32>,
    pub bos_id: Option<u32>,
    pub pad_id: Option<u32>,
    pub add_bos: bool,
    pub chat_template: Option<String>,
}

/// One tensor's raw data as a reader found it, borrowed from a mapping.
pub(crate) struct RawTensor<'a> {
    /// GGUF name.
    pub name: String,
    /// Row-major shape.
    pub shape: Vec<usize>,
    pub ty: GgmlType,
    pub bytes: &'a [u8],
}

#[derive(Debug, Clone, PartialEq)]
pub enum TensorData {
    F16(Vec<f16>),
    F32(Vec<f32>),
}

#[derive(Debug, Clone, PartialEq)]
pub struct HostTensor {
    /// Row-major shape, outermost first.
    pub shape: Vec<usize>,
    pub data: TensorData,
}

/// A whole model on the host: config, tokenizer and every tensor by GGUF name.
#[derive(Debug, Clone, PartialEq)]
pub struct HostModel {
    pub config: Qwen2Config,
    pub tokenizer: TokenizerData,
    pub tensors: std::collections::BTreeMap<String, HostTensor>,
}

impl HostModel {
    /// The tensor `name`, or an error naming it.
    pub fn tensor(&self, name: &str) -> anyhow::Result<&HostTensor> {
        self.tensors
            .get(name)
            .ok_or_else(|| anyhow::anyhow!("model has no tensor `{name}`"))
    }
}

impl TensorData {
    pub fn len(&self) -> usize {
        match self {
            TensorData::F16(v) => v.len(),
            TensorData::F32(v) => v.len(),
        }
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// The values widened to f32.
    pub fn to_f32(&self) -> Vec<f32> {
        match self {
            TensorData::F16(v) => v.iter().map(|x| x.to_f32()).collect(),
            TensorData::F32(v) => v.clone(),
        }
    }
}
