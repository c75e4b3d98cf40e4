//! Small random Qwen2 models for tests (here and in other crates: parity tracers, kernels).

use std::collections::BTreeMap;

pub use cubeqwen_kernels::testing::Rng;
use cubeqwen_loaders::{HostModel, HostTensor, Qwen2Config, TensorData, TokenizerData};

/// The config of a toy model: hidden 64, head_dim 16, ffn 96, vocab 300, rope theta 1e6,
/// eps 1e-6, with the given layer and head counts.
pub fn toy_config(
    layers: usize,
    n_heads: usize,
    n_kv_heads: usize,
    tied_embeddings: bool,
) -> Qwen2Config {
    Qwen2Config {
        hidden: 64,
        layers,
        n_heads,
        n_kv_heads,
        head_dim: 16,
        ffn: 96,
        vocab: 300,
        rope_theta: 1e6,
        rms_eps: 1e-6,
        context_length: 4096,
        tied_embeddings,
    }
}

/// A 2-D f16 tensor of N(0, std²) values.
pub fn random_f16(rng: &mut Rng, rows: usize, cols: usize, std: f64) -> HostTensor {
    HostTensor {
        shape: vec![rows, cols],
        data: TensorData::F16(rng.f16_vec(rows * cols, 0.0, std)),
    }
}

/// A 1-D f32 tensor of `mean + N(0, std²)` values.
pub fn random_f32(rng: &mut Rng, len: usize, mean: f64, std: f64) -> HostTensor {
    HostTensor {
        shape: vec![len],
        data: TensorData::F32(rng.f32_vec(len, mean, std)),
    }
}

/// A random model for `config`: 2-D weights f16 ~ N(0, 0.05²) (embeddings N(0, 0.5²) so that
/// logits are not all tiny), norm weights ~ 1 ± 0.1, biases ~ N(0, 0.1²) (nonzero). It has an
/// `output.weight` unless `config.tied_embeddings`.
pub fn toy_model(config: &Qwen2Config, seed: u64) -> HostModel {
    let c = config;
    let mut rng = Rng::new(seed);
    let (d, qd, kvd) = (c.hidden, c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim);
    let mut t = BTreeMap::new();
    t.insert(
        "token_embd.weight".to_string(),
        random_f16(&mut rng, c.vocab, d, 0.5),
    );
    for l in 0..c.layers {
        let n = |s: &str| format!("blk.{l}.{s}");
        t.insert(n("attn_norm.weight"), random_f32(&mut rng, d, 1.0, 0.1));
        t.insert(n("attn_q.weight"), random_f16(&mut rng, qd, d, 0.05));
        t.insert(n("attn_q.bias"), random_f32(&mut rng, qd, 0.0, 0.1));
        t.insert(n("attn_k.weight"), random_f16(&mut rng, kvd, d, 0.05));
        t.insert(n("attn_k.bias"), random_f32(&mut rng, kvd, 0.0, 0.1));
        t.insert(n("attn_v.weight"), random_f16(&mut rng, kvd, d, 0.05));
        t.insert(n("attn_v.bias"), random_f32(&mut rng, kvd, 0.0, 0.1));
        t.insert(n("attn_output.weight"), random_f16(&mut rng, d, qd, 0.05));
        t.insert(n("ffn_norm.weight"), random_f32(&mut rng, d, 1.0, 0.1));
        t.insert(n("ffn_gate.weight"), random_f16(&mut rng, c.ffn, d, 0.05));
        t.insert(n("ffn_up.weight"), random_f16(&mut rng, c.ffn, d, 0.05));
        t.insert(n("ffn_down.weight"), random_f16(&mut rng, d, c.ffn, 0.05));
    }
    t.insert(
        "output_norm.weight".to_string(),
        random_f32(&mut rng, d, 1.0, 0.1),
    );
    if !c.tied_embeddings {
        t.insert(
            "output.weight".to_string(),
            random_f16(&mut rng, c.vocab, d, 0.05),
        );
    }
    HostModel {
        config: c.clone(),
        tokenizer: TokenizerData::default(),
        tensors: t,
    }
}
