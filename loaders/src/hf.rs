//! Hugging Face Qwen2 checkpoint directories: `config.json` + `*.safetensors` (F32/F16/BF16),
//! tensor names mapped to GGUF names.

use crate::model::{dequantize_all, RawTensor};
use crate::quant::GgmlType;
use crate::tokenizer::tokenizer_from_hf_json;
use crate::{HostModel, Qwen2Config, TokenizerData};
use anyhow::{anyhow, bail, ensure, Context, Result};
use memmap2::Mmap;
use serde::Deserialize;
use std::collections::{BTreeMap, HashMap};
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

fn safetensors_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("cannot list {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .collect();
    files.sort();
    ensure!(
        !files.is_empty(),
        "{}: no *.safetensors files in the checkpoint directory",
        dir.display()
    );
    Ok(files)
}

/// The tokenizer of a HF checkpoint directory, or None when it has no `tokenizer.json`.
pub fn tokenizer_from_hf_dir(dir: &Path) -> Result<Option<TokenizerData>> {
    let tj = dir.join("tokenizer.json");
    if !tj.exists() {
        return Ok(None);
    }
    let text =
        std::fs::read_to_string(&tj).with_context(|| format!("cannot read {}", tj.display()))?;
    let cfg_path = dir.join("tokenizer_config.json");
    let cfg = if cfg_path.exists() {
        Some(
            std::fs::read_to_string(&cfg_path)
                .with_context(|| format!("cannot read {}", cfg_path.display()))?,
        )
    } else {
        None
    };
    let vocab = read_hf_config(dir).map(|c| c.vocab_size).unwrap_or(0);
    tokenizer_from_hf_json(&text, cfg.as_deref(), vocab)
        .map(Some)
        .with_context(|| format!("{}: bad tokenizer", tj.display()))
}

/// Load a HF Qwen2 checkpoint directory. Without `tokenizer.json` the tokenizer is empty
/// ([`TokenizerData::default`]).
pub fn load_hf_dir(dir: &Path) -> Result<HostModel> {
    let hc = read_hf_config(dir)?;
    let files = safetensors_files(dir)?;
    let maps: Vec<Mmap> = files
        .iter()
        .map(|p| {
            let f =
                std::fs::File::open(p).with_context(|| format!("cannot open {}", p.display()))?;
            // SAFETY: read-only mapping; the file must not be truncated while mapped.
            unsafe { Mmap::map(&f) }.with_context(|| format!("cannot map {}", p.display()))
        })
        .collect::<Result<_>>()?;
    let mut raw: Vec<RawTensor> = Vec::new();
    let mut seen: HashMap<String, PathBuf> = HashMap::new();
    for (p, m) in files.iter().zip(&maps) {
        let st = safetensors::SafeTensors::deserialize(m)
            .map_err(|e| anyhow!("{}: invalid safetensors file: {e}", p.display()))?;
        for (name, view) in st.tensors() {
            let Some(gname) = hf_to_gguf_name(&name) else {
                bail!(
                    "{}: unexpected tensor `{name}` (not part of a Qwen2 model)",
                    p.display()
                );
            };
            if let Some(prev) = seen.insert(gname.clone(), p.clone()) {
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
    let label = dir.display().to_string();
    let shape_of = |n: &str| raw.iter().find(|t| t.name == n).map(|t| t.shape.clone());
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
    let index: HashMap<&str, &Vec<usize>> =
        raw.iter().map(|t| (t.name.as_str(), &t.shape)).collect();
    config.check_tensors(&label, |n| index.get(n).map(|s| s.to_vec()))?;
    let tokenizer = tokenizer_from_hf_dir(dir)?.unwrap_or_default();
    let tensors: BTreeMap<_, _> = dequantize_all(raw, &label)?;
    Ok(HostModel {
        config,
        tokenizer,
        tensors,
    })
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
