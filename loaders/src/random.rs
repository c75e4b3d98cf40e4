//! Synthetic Qwen2 models: [`random_qwen2`] and [`byte_level_tokenizer`] (small ones for tests),
//! the Qwen2.5 shapes by name ([`qwen25_config`]) and random-weight GGUF files of them
//! ([`write_random_gguf`]) for benchmarks.

use crate::tokenizer::{TOKEN_CONTROL, TOKEN_NORMAL, TOKEN_UNUSED};
use crate::{HostModel, HostTensor, Qwen2Config, TensorData, TokenizerData};
use half::f16;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::collections::{BTreeMap, HashSet};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;

/// A synthetic byte-level BPE tokenizer of exactly `vocab` tokens: the 256 byte tokens first
/// (fewer if `vocab < 256`), then random merges of earlier tokens, and — when `vocab >= 259` —
/// `<|endoftext|>`, `<|im_start|>`, `<|im_end|>` as the last three (control) tokens, with
/// `<|im_end|>` as eos and `<|endoftext|>` as padding, and a ChatML chat template.
pub fn byte_level_tokenizer(vocab: usize, seed: u64) -> TokenizerData {
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x7474_6f6b);
    let mut bytes: Vec<char> = ByteLevel::alphabet().into_iter().collect();
    bytes.sort_unstable();
    let specials = if vocab >= 259 { 3 } else { 0 };
    let mut tokens: Vec<String> = bytes.iter().take(vocab).map(|c| c.to_string()).collect();
    let mut seen: HashSet<String> = tokens.iter().cloned().collect();
    let mut merges = Vec::new();
    let mut tries = 0;
    while tokens.len() < vocab - specials && tries < 100 * vocab {
        tries += 1;
        let a = tokens[rng.random_range(0..tokens.len())].clone();
        let b = tokens[rng.random_range(0..tokens.len())].clone();
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

/// The factor by which the q and k weights exceed ±1/sqrt(fan_in). With plain ±1/sqrt(fan_in)
/// weights an attention score has a standard deviation of about 0.3 whatever the head size, so
/// the softmax is nearly uniform and a wrong attention scale or a missing causal mask barely
/// moves the output. With this gain the scores spread like a trained model's (std ≈ 4 before
/// RoPE): the mean softmax entropy is well below uniform, which
/// `reference::tests::random_models_have_peaked_attention` checks.
pub const QK_GAIN: f32 = 3.5;

/// A random Qwen2 model with `config`'s shapes: 2-D weights f16 uniform in ±1/sqrt(fan_in)
/// (q and k weights and biases [`QK_GAIN`] times larger, so attention is peaked), other biases
/// f32 in ±0.1, norm weights f32 in 1 ± 0.1; `output.weight` only when not tied. The tokenizer
/// is [`byte_level_tokenizer`]`(config.vocab, seed)`. Deterministic in `seed`.
pub fn random_qwen2(config: &Qwen2Config, seed: u64) -> HostModel {
    random_qwen2_with_tokenizer(config, seed, byte_level_tokenizer(config.vocab, seed))
}

/// [`random_qwen2`] with the given tokenizer (same weights for the same seed).
pub fn random_qwen2_with_tokenizer(
    config: &Qwen2Config,
    seed: u64,
    tokenizer: TokenizerData,
) -> HostModel {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut tensors = BTreeMap::new();
    for (name, shape, _) in config.expected_tensors() {
        if name == "output.weight" && config.tied_embeddings {
            continue;
        }
        let n: usize = shape.iter().product();
        let gain = if name.contains("attn_q.") || name.contains("attn_k.") {
            QK_GAIN
        } else {
            1.0
        };
        let mut uniform = |scale: f32| rng.random_range(-scale..scale);
        let data = if shape.len() == 2 {
            let scale = gain / (shape[1] as f32).sqrt();
            TensorData::F16((0..n).map(|_| f16::from_f32(uniform(scale))).collect())
        } else if name.ends_with("norm.weight") {
            TensorData::F32((0..n).map(|_| 1.0 + uniform(0.1)).collect())
        } else {
            TensorData::F32((0..n).map(|_| uniform(0.1 * gain)).collect())
        };
        tensors.insert(name, HostTensor { shape, data });
    }
    HostModel {
        config: config.clone(),
        tokenizer,
        tensors,
    }
}

/// A small Qwen2.5-like config for device tests: Qwen2.5-0.5B's GQA ratio (14 q heads on 2 kv
/// heads), head_dim 16, hidden 224, ffn 384, rope theta 1e6, eps 1e-6.
pub fn small_gqa7_config(layers: usize, vocab: usize, tied_embeddings: bool) -> Qwen2Config {
    Qwen2Config {
        hidden: 224,
        layers,
        n_heads: 14,
        n_kv_heads: 2,
        head_dim: 16,
        ffn: 384,
        vocab,
        rope_theta: 1_000_000.0,
        rms_eps: 1e-6,
        context_length: 4096,
        tied_embeddings,
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

/// The shapes [`qwen25_config`] knows, as users name them.
pub const QWEN25_SHAPES: [&str; 3] = ["0.5b", "1.5b", "7b"];

/// The config of a Qwen2.5 model size ("0.5b", "1.5b", "7b"; "0.5B" too), as the released
/// checkpoints have it: rope theta 1e6, RMS eps 1e-6, context 32768; 0.5B and 1.5B tie their
/// embeddings, 7B does not. "tiny" (not listed in [`QWEN25_SHAPES`]) is a test shape with
/// Qwen's vocabulary of 151936 on 2 small layers, so the real tokenizer fits it.
pub fn qwen25_config(name: &str) -> anyhow::Result<Qwen2Config> {
    let base = Qwen2Config {
        rope_theta: 1_000_000.0,
        rms_eps: 1e-6,
        context_length: 32768,
        tied_embeddings: true,
        vocab: 151936,
        ..tiny_config()
    };
    let c = match name.to_ascii_lowercase().as_str() {
        "0.5b" => Qwen2Config {
            hidden: 896,
            layers: 24,
            n_heads: 14,
            n_kv_heads: 2,
            head_dim: 64,
            ffn: 4864,
            ..base
        },
        "1.5b" => Qwen2Config {
            hidden: 1536,
            layers: 28,
            n_heads: 12,
            n_kv_heads: 2,
            head_dim: 128,
            ffn: 8960,
            ..base
        },
        "7b" => Qwen2Config {
            hidden: 3584,
            layers: 28,
            n_heads: 28,
            n_kv_heads: 4,
            head_dim: 128,
            ffn: 18944,
            vocab: 152064,
            tied_embeddings: false,
            ..base
        },
        "tiny" => Qwen2Config {
            context_length: 4096,
            ..base
        },
        other => anyhow::bail!(
            "unknown model shape `{other}`: expected one of {}",
            QWEN25_SHAPES.join(", ")
        ),
    };
    Ok(c)
}

/// Pads `t` to `vocab` tokens with `[PAD<id>]` tokens of type unused, as llama.cpp's converter
/// does for checkpoints whose embedding has more rows than the tokenizer has tokens (Qwen2.5-7B:
/// 152064 rows). A tokenizer with more tokens than `vocab` is an error.
pub fn pad_tokenizer(t: &mut TokenizerData, vocab: usize) -> anyhow::Result<()> {
    anyhow::ensure!(
        t.tokens.len() <= vocab,
        "the tokenizer has {} tokens, more than the {vocab} rows of the model's embedding",
        t.tokens.len()
    );
    for id in t.tokens.len()..vocab {
        t.tokens.push(format!("[PAD{id}]"));
        t.token_types.push(TOKEN_UNUSED);
    }
    Ok(())
}

/// Writes a random-weight F16 GGUF of `config`'s shape ([`random_qwen2`]`(config, seed)`),
/// carrying the tokenizer of `tokenizer_from` (a GGUF file, a tokenizer-only GGUF or an HF
/// checkpoint directory; padded to the vocabulary with [`pad_tokenizer`]) or, without one,
/// the synthetic [`byte_level_tokenizer`].
pub fn write_random_gguf(
    config: &Qwen2Config,
    seed: u64,
    tokenizer_from: Option<&std::path::Path>,
    out: &std::path::Path,
) -> anyhow::Result<()> {
    use anyhow::Context;
    config.validate()?;
    let tokenizer = match tokenizer_from {
        Some(p) => {
            let mut t = crate::load_tokenizer_data(p)
                .with_context(|| format!("reading the tokenizer of {}", p.display()))?;
            anyhow::ensure!(!t.tokens.is_empty(), "{}: no tokenizer tokens", p.display());
            pad_tokenizer(&mut t, config.vocab).with_context(|| p.display().to_string())?;
            t
        }
        None => byte_level_tokenizer(config.vocab, seed),
    };
    let model = random_qwen2_with_tokenizer(config, seed, tokenizer);
    crate::write_gguf_f16(&model, out)
}
