//! Reads Hugging Face Qwen2 checkpoint directories: `config.json`, the tensors of
//! `*.safetensors` (F32/F16/BF16) under their GGUF names, and the tokenizer files' text.
//! Building a model from them is [`crate::model`]'s job.

use crate::quant::GgmlType;
use crate::RawTensor;
use anyhow::{anyhow, bail, ensure, Context, Result};
use memmap2::Mmap;
use serde::Deserialize;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// The fields of a HF `config.json` that matter; defaults are those of transformers' Qwen2Config.
#[derive(Debug, Deserialize)]
pub struct HfConfig {
    pub model_type: Option<String>,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: Option<usize>,
    pub intermediate_size: usize,
    pub vocab_size: usize,
    pub head_dim: Option<usize>,
    /// transformers < 5 writes `rope_theta` here; transformers 5 writes it in `rope_parameters`.
    pub rope_theta: Option<f32>,
    pub rope_parameters: Option<RopeParameters>,
    pub rope_scaling: Option<serde_json::Value>,
    #[serde(default = "default_eps")]
    pub rms_norm_eps: f32,
    #[serde(default = "default_ctx")]
    pub max_position_embeddings: usize,
    #[serde(default)]
    pub tie_word_embeddings: bool,
}

/// `rope_parameters` of transformers 5 configs.
#[derive(Debug, Deserialize)]
pub struct RopeParameters {
    pub rope_theta: Option<f32>,
    pub rope_type: Option<String>,
}

/// transformers' Qwen2 default when no theta is given anywhere.
pub const HF_DEFAULT_ROPE_THETA: f32 = 10_000.0;

impl HfConfig {
    /// The RoPE base: `rope_parameters.rope_theta`, else `rope_theta`, else transformers' default.
    pub fn rope_theta(&self) -> f32 {
        self.rope_parameters
            .as_ref()
            .and_then(|r| r.rope_theta)
            .or(self.rope_theta)
            .unwrap_or(HF_DEFAULT_ROPE_THETA)
    }
}
fn default_eps() -> f32 {
    1e-6
}
fn default_ctx() -> usize {
    32768
}

/// Read and check `dir/config.json` (must be `model_type: qwen2`).
pub fn read_hf_config(dir: &Path) -> Result<HfConfig> {
    let p = dir.join("config.json");
    let text =
        std::fs::read_to_string(&p).with_context(|| format!("cannot read {}", p.display()))?;
    let c: HfConfig =
        serde_json::from_str(&text).with_context(|| format!("{}: bad config.json", p.display()))?;
    let mt = c.model_type.as_deref().unwrap_or("<none>");
    ensure!(
        mt == "qwen2",
        "{}: model_type `{mt}` is not supported (only qwen2)",
        p.display()
    );
    let rope_type = c
        .rope_parameters
        .as_ref()
        .and_then(|r| r.rope_type.as_deref())
        .unwrap_or("default");
    ensure!(
        rope_type == "default" && c.rope_scaling.as_ref().is_none_or(|v| v.is_null()),
        "{}: RoPE scaling (`{rope_type}` / rope_scaling) is not supported",
        p.display()
    );
    Ok(c)
}

/// The GGUF name of a HF Qwen2 tensor name, or None when it is not part of a Qwen2 model.
pub fn hf_to_gguf_name(name: &str) -> Option<String> {
    match name {
        "model.embed_tokens.weight" => return Some("token_embd.weight".into()),
        "model.norm.weight" => return Some("output_norm.weight".into()),
        "lm_head.weight" => return Some("output.weight".into()),
        _ => {}
    }
    let rest = name.strip_prefix("model.layers.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (module, kind) = rest.rsplit_once('.')?;
    let g = match module {
        "input_layernorm" => "attn_norm",
        "post_attention_layernorm" => "ffn_norm",
        "self_attn.q_proj" => "attn_q",
        "self_attn.k_proj" => "attn_k",
        "self_attn.v_proj" => "attn_v",
        "self_attn.o_proj" => "attn_output",
        "mlp.gate_proj" => "ffn_gate",
        "mlp.up_proj" => "ffn_up",
        "mlp.down_proj" => "ffn_down",
        _ => return None,
    };
    matches!(kind, "weight" | "bias").then(|| format!("blk.{layer}.{g}.{kind}"))
}

/// The `*.safetensors` files of a checkpoint directory, memory-mapped.
pub(crate) struct HfCheckpoint {
    files: Vec<(PathBuf, Mmap)>,
}

impl HfCheckpoint {
    /// Maps every `*.safetensors` file of `dir` (in name order); errors when there is none.
    pub(crate) fn open(dir: &Path) -> Result<Self> {
        let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
            .with_context(|| format!("cannot list {}", dir.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
            .collect();
        paths.sort();
        ensure!(
            !paths.is_empty(),
            "{}: no *.safetensors files in the checkpoint directory",
            dir.display()
        );
        let files = paths
            .into_iter()
            .map(|p| {
                let f = std::fs::File::open(&p)
                    .with_context(|| format!("cannot open {}", p.display()))?;
                // SAFETY: read-only mapping; the file must not be truncated while mapped.
                let m = unsafe { Mmap::map(&f) }
                    .with_context(|| format!("cannot map {}", p.display()))?;
                Ok((p, m))
            })
            .collect::<Result<_>>()?;
        Ok(Self { files })
    }

    /// Every tensor under its GGUF name, borrowed from the mappings. Errors on a tensor that is
    /// not part of a Qwen2 model, one found in two files, or a dtype other than F32/F16/BF16.
    pub(crate) fn tensors(&self) -> Result<Vec<RawTensor<'_>>> {
        let mut raw: Vec<RawTensor> = Vec::new();
        let mut seen: HashMap<String, &Path> = HashMap::new();
        for (p, m) in &self.files {
            let st = safetensors::SafeTensors::deserialize(m)
                .map_err(|e| anyhow!("{}: invalid safetensors file: {e}", p.display()))?;
            for (name, view) in st.tensors() {
                let Some(gname) = hf_to_gguf_name(&name) else {
                    bail!(
                        "{}: unexpected tensor `{name}` (not part of a Qwen2 model)",
                        p.display()
                    );
                };
                if let Some(prev) = seen.insert(gname.clone(), p) {
                    bail!(
                        "{}: tensor `{name}` is also in {}",
                        p.display(),
                        prev.display()
                    );
                }
                let ty = match view.dtype() {
                    safetensors::Dtype::F32 => GgmlType::F32,
                    safetensors::Dtype::F16 => GgmlType::F16,
                    safetensors::Dtype::BF16 => GgmlType::BF16,
                    other => bail!(
                        "{}: tensor `{name}` has dtype {other:?} (supported: F32, F16, BF16)",
                        p.display()
                    ),
                };
                raw.push(RawTensor {
                    name: gname,
                    shape: view.shape().to_vec(),
                    ty,
                    bytes: view.data(),
                });
            }
        }
        Ok(raw)
    }
}

/// The text of `dir/tokenizer.json` and, when present, of `dir/tokenizer_config.json`; None
/// when the directory has no `tokenizer.json`.
pub fn read_tokenizer_files(dir: &Path) -> Result<Option<(String, Option<String>)>> {
    let read = |name: &str| -> Result<Option<String>> {
        let p = dir.join(name);
        if !p.exists() {
            return Ok(None);
        }
        std::fs::read_to_string(&p)
            .map(Some)
            .with_context(|| format!("cannot read {}", p.display()))
    };
    let Some(tokenizer) = read("tokenizer.json")? else {
        return Ok(None);
    };
    Ok(Some((tokenizer, read("tokenizer_config.json")?)))
}

#[cfg(test)]
mod rope_config_tests {
    use super::*;

    fn parse(extra: &str) -> Result<HfConfig> {
        let dir =
            std::env::temp_dir().join(format!("cq-hfcfg-{}-{}", std::process::id(), extra.len()));
        std::fs::create_dir_all(&dir)?;
        std::fs::write(
            dir.join("config.json"),
            format!(
                r#"{{"model_type":"qwen2","hidden_size":64,"num_hidden_layers":2,"num_attention_heads":4,
                "intermediate_size":128,"vocab_size":256{extra}}}"#
            ),
        )?;
        let c = read_hf_config(&dir);
        std::fs::remove_dir_all(&dir)?;
        c
    }

    #[test]
    fn rope_theta_from_either_place() {
        assert_eq!(
            parse(r#","rope_theta":1000000.0"#).unwrap().rope_theta(),
            1e6
        );
        // transformers 5 layout
        let c =
            parse(r#","rope_parameters":{"rope_theta":500000.0,"rope_type":"default"}"#).unwrap();
        assert_eq!(c.rope_theta(), 5e5);
        assert_eq!(parse("").unwrap().rope_theta(), HF_DEFAULT_ROPE_THETA);
    }

    #[test]
    fn rope_scaling_is_refused() {
        let e = parse(r#","rope_parameters":{"rope_theta":1e6,"rope_type":"yarn","factor":4.0}"#)
            .unwrap_err();
        assert!(e.to_string().contains("not supported"), "{e}");
        let e = parse(r#","rope_scaling":{"type":"linear","factor":2.0}"#).unwrap_err();
        assert!(e.to_string().contains("not supported"), "{e}");
    }
}
