//! Small synthetic Qwen2 models for tests: [`random_qwen2`] and [`byte_level_tokenizer`].

use crate::tokenizer::{TOKEN_CONTROL, TOKEN_NORMAL};
use crate::{HostModel, HostTensor, Qwen2Config, TensorData, TokenizerData};
use half::f16;
use std::collections::{BTreeMap, HashSet};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;

/// SplitMix64: tiny, deterministic across platforms and crate versions.
pub struct SplitMix64(u64);

impl SplitMix64 {
    pub fn new(seed: u64) -> Self {
        SplitMix64(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [-1, 1).
    pub fn next_f32(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }

    /// Uniform in 0..n (n > 0).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
}

/// A synthetic byte-level BPE tokenizer of exactly `vocab` tokens: the 256 byte tokens first
/// (fewer if `vocab < 256`), then random merges of earlier tokens, and — when `vocab >= 259` —
/// `<|endoftext|>`, `<|im_start|>`, `<|im_end|>` as the last three (control) tokens, with
/// `<|im_end|>` as eos and `<|endoftext|>` as padding, and a ChatML chat template.
pub fn byte_level_tokenizer(vocab: usize, seed: u64) -> TokenizerData {
    let mut rng = SplitMix64::new(seed ^ 0x7474_6f6b);
    let mut bytes: Vec<char> = ByteLevel::alphabet().into_iter().collect();
    bytes.sort_unstable();
    let specials = if vocab >= 259 { 3 } else { 0 };
    let mut tokens: Vec<String> = bytes.iter().take(vocab).map(|c| c.to_string()).collect();
    let mut seen: HashSet<String> = tokens.iter().cloned().collect();
    let mut merges = Vec::new();
    let mut tries = 0;
    while tokens.len() < vocab - specials && tries < 100 * vocab {
        tries += 1;
        let a = tokens[rng.below(tokens.len())].clone();
        let b = tokens[rng.below(tokens.len())].clone();
        let m = format!("{a}{b}");
        if m.chars().count() <= 8 && seen.insert(m.clone()) {
            merges.push(format!("{a} {b}"));
            tokens.push(m);
        }
    }
    let mut token_types = vec![TOKEN_NORMAL; tokens.len()];
    let (mut eos_id, mut pad_id, mut chat_template) = (None, None, None);
    if specials == 3 {
        let base = tokens.len() as u32;
        tokens.extend(["<|endoftext|>", "<|im_start|>", "<|im_end|>"].map(String::from));
        token_types.extend([TOKEN_CONTROL; 3]);
        pad_id = Some(base);
        eos_id = Some(base + 2);
        chat_template = Some(
            "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
                .to_string(),
        );
    }
    TokenizerData {
        model: "gpt2".into(),
        pre: "qwen2".into(),
        tokens,
        token_types,
        merges,
        eos_id,
        bos_id: pad_id,
        pad_id,
        add_bos: false,
        chat_template,
    }
}

/// A random Qwen2 model with `config`'s shapes: 2-D weights f16 uniform in ±1/sqrt(fan_in),
/// biases f32 in ±0.1, norm weights f32 in 1 ± 0.1; `output.weight` only when not tied.
/// The tokenizer is [`byte_level_tokenizer`]`(config.vocab, seed)`. Deterministic in `seed`.
pub fn random_qwen2(config: &Qwen2Config, seed: u64) -> HostModel {
    let mut rng = SplitMix64::new(seed);
    let mut tensors = BTreeMap::new();
    for (name, shape, _) in config.expected_tensors() {
        if name == "output.weight" && config.tied_embeddings {
            continue;
        }
        let n: usize = shape.iter().product();
        let data = if shape.len() == 2 {
            let scale = 1.0 / (shape[1] as f32).sqrt();
            TensorData::F16(
                (0..n)
                    .map(|_| f16::from_f32(rng.next_f32() * scale))
                    .collect(),
            )
        } else if name.ends_with("norm.weight") {
            TensorData::F32((0..n).map(|_| 1.0 + 0.1 * rng.next_f32()).collect())
        } else {
            TensorData::F32((0..n).map(|_| 0.1 * rng.next_f32()).collect())
        };
        tensors.insert(name, HostTensor { shape, data });
    }
    HostModel {
        config: config.clone(),
        tokenizer: byte_level_tokenizer(config.vocab, seed),
        tensors,
    }
}

/// A tiny config for tests: hidden 64, 2 layers, 4 heads, 2 kv heads, ffn 128, vocab 256.
pub fn tiny_config() -> Qwen2Config {
    Qwen2Config {
        hidden: 64,
        layers: 2,
        n_heads: 4,
        n_kv_heads: 2,
        head_dim: 16,
        ffn: 128,
        vocab: 256,
        rope_theta: 1_000_000.0,
        rms_eps: 1e-6,
        context_length: 4096,
        tied_embeddings: true,
    }
}
