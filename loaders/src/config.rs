//! [`Qwen2Config`] from GGUF `qwen2.*` metadata or a HF `config.json`, its checks, and the
//! tensors a Qwen2 model must have.

use crate::gguf::GgufFile;
use crate::hf::HfConfig;
use crate::Qwen2Config;
use anyhow::{anyhow, bail, ensure, Context, Result};

/// Used when a file has no `qwen2.rope.freq_base` (llama.cpp's default as well).
/// Qwen2/Qwen2.5 files normally carry 1e6.
pub const DEFAULT_ROPE_THETA: f32 = 10_000.0;

impl Qwen2Config {
    /// Query projection width: `n_heads * head_dim`.
    pub fn q_dim(&self) -> usize {
        self.n_heads * self.head_dim
    }

    /// Key/value projection width: `n_kv_heads * head_dim`.
    pub fn kv_dim(&self) -> usize {
        self.n_kv_heads * self.head_dim
    }

    /// Checks the numbers are usable: nonzero, heads divisible by kv heads, an even head size
    /// (RoPE rotates pairs), no overflow. Every consumer of a config relies on this one check.
    pub fn validate(&self) -> Result<()> {
        for (name, v) in [
            ("hidden", self.hidden),
            ("layers", self.layers),
            ("n_heads", self.n_heads),
            ("n_kv_heads", self.n_kv_heads),
            ("head_dim", self.head_dim),
            ("ffn", self.ffn),
            ("vocab", self.vocab),
            ("context_length", self.context_length),
        ] {
            ensure!(v > 0, "config {name} is 0");
            ensure!(v <= 1 << 31, "config {name} = {v} is implausibly large");
        }
        ensure!(
            self.n_heads.is_multiple_of(self.n_kv_heads),
            "config: {} attention heads is not a multiple of {} kv heads",
            self.n_heads,
            self.n_kv_heads
        );
        ensure!(
            self.head_dim.is_multiple_of(2),
            "config head_dim {} is odd (RoPE rotates pairs)",
            self.head_dim
        );
        ensure!(
            self.n_heads.checked_mul(self.head_dim).is_some(),
            "config: n_heads * head_dim overflows"
        );
        ensure!(
            self.rope_theta.is_finite() && self.rope_theta > 0.0,
            "config rope_theta {} is not a positive number",
            self.rope_theta
        );
        ensure!(
            self.rms_eps.is_finite() && self.rms_eps >= 0.0,
            "config rms_eps {} is not a non-negative number",
            self.rms_eps
        );
        Ok(())
    }

    /// Checks that a KV cache of `ctx` positions fits the model: `1..=context_length`.
    pub fn check_ctx(&self, ctx: usize) -> Result<()> {
        ensure!(
            (1..=self.context_length).contains(&ctx),
            "a context of {ctx} tokens is outside 1..={} (the model's context length)",
            self.context_length
        );
        Ok(())
    }

    /// The non-layer tensors: (GGUF name, row-major shape, required).
    /// `output.weight` is optional: absent means tied embeddings.
    pub fn global_tensors(&self) -> Vec<(String, Vec<usize>, bool)> {
        let d = self.hidden;
        vec![
            ("token_embd.weight".to_string(), vec![self.vocab, d], true),
            ("output_norm.weight".to_string(), vec![d], true),
            ("output.weight".to_string(), vec![self.vocab, d], false),
        ]
    }

    /// The tensors of layer `i`: (GGUF name, row-major shape), all required.
    pub fn layer_tensors(&self, i: usize) -> Vec<(String, Vec<usize>)> {
        let (d, q, kv, f) = (self.hidden, self.q_dim(), self.kv_dim(), self.ffn);
        let b = |s: &str| format!("blk.{i}.{s}");
        vec![
            (b("attn_norm.weight"), vec![d]),
            (b("attn_q.weight"), vec![q, d]),
            (b("attn_q.bias"), vec![q]),
            (b("attn_k.weight"), vec![kv, d]),
            (b("attn_k.bias"), vec![kv]),
            (b("attn_v.weight"), vec![kv, d]),
            (b("attn_v.bias"), vec![kv]),
            (b("attn_output.weight"), vec![d, q]),
            (b("ffn_norm.weight"), vec![d]),
            (b("ffn_gate.weight"), vec![f, d]),
            (b("ffn_up.weight"), vec![f, d]),
            (b("ffn_down.weight"), vec![d, f]),
        ]
    }

    /// Every tensor of the model, with its shape and whether it is required.
    pub fn expected_tensors(&self) -> Vec<(String, Vec<usize>, bool)> {
        let mut v = self.global_tensors();
        for i in 0..self.layers {
            v.extend(self.layer_tensors(i).into_iter().map(|(n, s)| (n, s, true)));
        }
        v
    }

    /// Checks every required tensor exists with the right shape, given a lookup from name to
    /// row-major shape, and that `tied_embeddings` agrees with `output.weight`'s absence.
    /// `source` names the file in errors. Stops at the first problem.
    pub fn check_tensors(
        &self,
        source: &str,
        shape_of: impl Fn(&str) -> Option<Vec<usize>>,
    ) -> Result<()> {
        let check = |name: &str, want: &[usize], required: bool| -> Result<()> {
            match shape_of(name) {
                None if required => {
                    bail!("{source}: missing required tensor `{name}` (expected shape {want:?})")
                }
                None => Ok(()),
                Some(got) => {
                    ensure!(
                        got == want,
                        "{source}: tensor `{name}` has shape {got:?}, expected {want:?}"
                    );
                    Ok(())
                }
            }
        };
        for (name, want, required) in self.global_tensors() {
            check(&name, &want, required)?;
        }
        for i in 0..self.layers {
            for (name, want) in self.layer_tensors(i) {
                check(&name, &want, true)?;
            }
        }
        ensure!(
            self.tied_embeddings == shape_of("output.weight").is_none(),
            "{source}: tied_embeddings is {} but output.weight is {}",
            self.tied_embeddings,
            if self.tied_embeddings {
                "present"
            } else {
                "absent"
            }
        );
        Ok(())
    }
}

fn need<T>(g: &GgufFile, key: &str, v: Result<Option<T>>) -> Result<T> {
    v?.ok_or_else(|| anyhow!("{}: missing metadata `{key}`", g.path().display()))
}

/// The architecture named by `general.architecture`; errors unless it is `qwen2`.
pub fn check_architecture(g: &GgufFile) -> Result<()> {
    let arch = need(g, "general.architecture", g.get_str("general.architecture"))?;
    ensure!(
        arch == "qwen2",
        "{}: architecture `{arch}` is not supported (only qwen2)",
        g.path().display()
    );
    Ok(())
}

/// Read the Qwen2 config from GGUF metadata. `vocab` comes from `token_embd.weight`'s shape,
/// `tied_embeddings` from whether `output.weight` exists.
pub fn config_from_gguf(g: &GgufFile) -> Result<Qwen2Config> {
    check_architecture(g)?;
    let u = |k: &str| -> Result<usize> {
        let key = format!("qwen2.{k}");
        Ok(need(g, &key, g.get_u64(&key))? as usize)
    };
    let hidden = u("embedding_length")?;
    let n_heads = u("attention.head_count")?;
    let n_kv_heads = match g.get_u64("qwen2.attention.head_count_kv")? {
        Some(v) => v as usize,
        None => n_heads,
    };
    ensure!(
        n_heads > 0,
        "{}: qwen2.attention.head_count is 0",
        g.path().display()
    );
    let head_dim = match g.get_u64("qwen2.attention.key_length")? {
        Some(v) => v as usize,
        None => {
            ensure!(
                hidden % n_heads == 0,
                "{}: embedding_length {hidden} is not a multiple of head_count {n_heads}",
                g.path().display()
            );
            hidden / n_heads
        }
    };
    if let Some(vl) = g.get_u64("qwen2.attention.value_length")? {
        ensure!(
            vl as usize == head_dim,
            "{}: attention.value_length {vl} differs from the key length {head_dim} (unsupported)",
            g.path().display()
        );
    }
    let embd = g.tensor_info("token_embd.weight").ok_or_else(|| {
        anyhow!(
            "{}: missing required tensor `token_embd.weight`",
            g.path().display()
        )
    })?;
    ensure!(
        embd.ne.len() == 2,
        "{}: tensor `token_embd.weight` has shape {:?}, expected [vocab, {hidden}]",
        g.path().display(),
        embd.shape()
    );
    let cfg = Qwen2Config {
        hidden,
        layers: u("block_count")?,
        n_heads,
        n_kv_heads,
        head_dim,
        ffn: u("feed_forward_length")?,
        vocab: embd.ne[1] as usize,
        rope_theta: g
            .get_f32("qwen2.rope.freq_base")?
            .unwrap_or(DEFAULT_ROPE_THETA),
        rms_eps: need(
            g,
            "qwen2.attention.layer_norm_rms_epsilon",
            g.get_f32("qwen2.attention.layer_norm_rms_epsilon"),
        )?,
        context_length: u("context_length")?,
        tied_embeddings: g.tensor_info("output.weight").is_none(),
    };
    cfg.validate()
        .with_context(|| format!("{}: bad qwen2 config", g.path().display()))?;
    Ok(cfg)
}

/// The Qwen2 config of a HF checkpoint: `hc` (its `config.json`) and the tensors' shapes
/// (`shape_of`, by GGUF name). `vocab` comes from `token_embd.weight`'s rows and must agree with
/// `vocab_size`; `tied_embeddings` from whether `output.weight` exists. `label` names the
/// checkpoint in errors.
pub fn config_from_hf(
    hc: &HfConfig,
    label: &str,
    shape_of: impl Fn(&str) -> Option<Vec<usize>>,
) -> Result<Qwen2Config> {
    let embd = shape_of("token_embd.weight")
        .ok_or_else(|| anyhow!("{label}: missing required tensor `model.embed_tokens.weight`"))?;
    ensure!(
        embd.len() == 2,
        "{label}: tensor `model.embed_tokens.weight` has shape {embd:?}, expected [vocab, hidden]"
    );
    let has_lm_head = shape_of("output.weight").is_some();
    ensure!(
        has_lm_head || hc.tie_word_embeddings,
        "{label}: no lm_head.weight and config.json has tie_word_embeddings=false"
    );
    let n_heads = hc.num_attention_heads;
    ensure!(n_heads > 0, "{label}: num_attention_heads is 0");
    let config = Qwen2Config {
        hidden: hc.hidden_size,
        layers: hc.num_hidden_layers,
        n_heads,
        n_kv_heads: hc.num_key_value_heads.unwrap_or(n_heads),
        head_dim: hc.head_dim.unwrap_or(hc.hidden_size / n_heads),
        ffn: hc.intermediate_size,
        vocab: embd[0],
        rope_theta: hc.rope_theta(),
        rms_eps: hc.rms_norm_eps,
        context_length: hc.max_position_embeddings,
        tied_embeddings: !has_lm_head,
    };
    config
        .validate()
        .with_context(|| format!("{label}: bad config.json"))?;
    ensure!(
        embd[0] == hc.vocab_size,
        "{label}: embed_tokens has {} rows but config.json vocab_size is {}",
        embd[0],
        hc.vocab_size
    );
    config.check_tensors(label, &shape_of)?;
    Ok(config)
}

#[cfg(test)]
mod tests {
    use crate::random::tiny_config;

    #[test]
    fn validate_and_check_ctx() {
        let c = tiny_config();
        c.validate().unwrap();
        let bad = [
            (
                "head_dim",
                crate::Qwen2Config {
                    head_dim: 15,
                    ..c.clone()
                },
            ),
            (
                "context_length",
                crate::Qwen2Config {
                    context_length: 0,
                    ..c.clone()
                },
            ),
            (
                "kv heads",
                crate::Qwen2Config {
                    n_kv_heads: 3,
                    ..c.clone()
                },
            ),
            (
                "rope_theta",
                crate::Qwen2Config {
                    rope_theta: f32::NAN,
                    ..c.clone()
                },
            ),
        ];
        for (what, b) in bad {
            let e = b.validate().unwrap_err().to_string();
            assert!(e.contains(what), "{what}: {e}");
        }
        c.check_ctx(1).unwrap();
        c.check_ctx(c.context_length).unwrap();
        for ctx in [0, c.context_length + 1] {
            let e = c.check_ctx(ctx).unwrap_err().to_string();
            assert!(e.contains("context length"), "{e}");
        }
    }
}
