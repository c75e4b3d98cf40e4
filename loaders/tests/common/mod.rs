//! Helpers shared by the integration tests: HF checkpoint directories built from a HostModel.
#![allow(dead_code)]

use cubeqwen_loaders::{HostModel, TensorData};
use half::{bf16, f16};
use safetensors::tensor::TensorView;
use safetensors::Dtype;
use std::path::Path;

/// HF name of a GGUF tensor name (the inverse of the loader's mapping, written independently).
pub fn gguf_to_hf(name: &str) -> String {
    match name {
        "token_embd.weight" => return "model.embed_tokens.weight".into(),
        "output_norm.weight" => return "model.norm.weight".into(),
        "output.weight" => return "lm_head.weight".into(),
        _ => {}
    }
    let rest = name.strip_prefix("blk.").unwrap();
    let (layer, rest) = rest.split_once('.').unwrap();
    let (module, kind) = rest.split_once('.').unwrap();
    let hf = match module {
        "attn_norm" => "input_layernorm",
        "ffn_norm" => "post_attention_layernorm",
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_output" => "self_attn.o_proj",
        "ffn_gate" => "mlp.gate_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        other => panic!("no HF name for {other}"),
    };
    format!("model.layers.{layer}.{hf}.{kind}")
}

/// Bytes of `t` in `dtype`.
pub fn encode(data: &TensorData, dtype: Dtype) -> Vec<u8> {
    let v = data.to_f32();
    match dtype {
        Dtype::F32 => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        Dtype::F16 => v
            .iter()
            .flat_map(|x| f16::from_f32(*x).to_bits().to_le_bytes())
            .collect(),
        Dtype::BF16 => v
            .iter()
            .flat_map(|x| bf16::from_f32(*x).to_bits().to_le_bytes())
            .collect(),
        other => panic!("{other:?}"),
    }
}

/// The HF `config.json` text for `m`.
pub fn hf_config_json(m: &HostModel, tie: bool) -> String {
    let c = &m.config;
    serde_json::json!({
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "hidden_size": c.hidden,
        "num_hidden_layers": c.layers,
        "num_attention_heads": c.n_heads,
        "num_key_value_heads": c.n_kv_heads,
        "intermediate_size": c.ffn,
        "vocab_size": c.vocab,
        "rope_theta": c.rope_theta,
        "rms_norm_eps": c.rms_eps,
        "max_position_embeddings": c.context_length,
        "tie_word_embeddings": tie,
        "torch_dtype": "bfloat16",
    })
    .to_string()
}

/// Write `m` as a HF checkpoint in `dir`, split over `shards` safetensors files, each tensor in
/// the dtype `dtype_of(gguf_name, ndims)` picks.
pub fn write_hf_dir(
    m: &HostModel,
    dir: &Path,
    shards: usize,
    dtype_of: impl Fn(&str, usize) -> Dtype,
) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(
        dir.join("config.json"),
        hf_config_json(m, m.config.tied_embeddings),
    )
    .unwrap();
    type Entry = (String, Dtype, Vec<usize>, Vec<u8>);
    let mut parts: Vec<Vec<Entry>> = vec![Vec::new(); shards];
    for (i, (name, t)) in m.tensors.iter().enumerate() {
        let dt = dtype_of(name, t.shape.len());
        parts[i % shards].push((gguf_to_hf(name), dt, t.shape.clone(), encode(&t.data, dt)));
    }
    for (s, part) in parts.iter().enumerate() {
        let views: Vec<(String, TensorView)> = part
            .iter()
            .map(|(n, dt, shape, b)| (n.clone(), TensorView::new(*dt, shape.clone(), b).unwrap()))
            .collect();
        let bytes = safetensors::serialize(views, None).unwrap();
        std::fs::write(
            dir.join(format!("model-{:05}-of-{:05}.safetensors", s + 1, shards)),
            bytes,
        )
        .unwrap();
    }
}

/// A HF `tokenizer.json` + `tokenizer_config.json` for the byte-level tokenizer of `m`.
pub fn write_hf_tokenizer(m: &HostModel, dir: &Path) {
    let t = &m.tokenizer;
    let mut vocab = serde_json::Map::new();
    let mut added = Vec::new();
    for (i, (tok, ty)) in t.tokens.iter().zip(&t.token_types).enumerate() {
        if *ty == 3 {
            added.push(serde_json::json!({"id": i, "content": tok, "special": true}));
        } else {
            vocab.insert(tok.clone(), serde_json::json!(i));
        }
    }
    // Newer tokenizers.json files store merges as pairs; use that form for half of them.
    let merges: Vec<serde_json::Value> = t
        .merges
        .iter()
        .enumerate()
        .map(|(i, m)| {
            if i % 2 == 0 {
                serde_json::json!(m)
            } else {
                let (a, b) = m.split_once(' ').unwrap();
                serde_json::json!([a, b])
            }
        })
        .collect();
    let tj = serde_json::json!({
        "version": "1.0",
        "added_tokens": added,
        "normalizer": {"type": "NFC"},
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": cubeqwen_loaders::tokenizer::QWEN2_PRETOKENIZER_REGEX},
             "behavior": "Isolated", "invert": false},
            {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": false}
        ]},
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "vocab": vocab, "merges": merges},
    });
    std::fs::write(dir.join("tokenizer.json"), tj.to_string()).unwrap();
    let name = |id: Option<u32>| id.map(|i| t.tokens[i as usize].clone());
    let tc = serde_json::json!({
        "eos_token": name(t.eos_id),
        "bos_token": name(t.bos_id),
        "pad_token": name(t.pad_id),
        "add_bos_token": t.add_bos,
        "chat_template": t.chat_template,
    });
    std::fs::write(dir.join("tokenizer_config.json"), tc.to_string()).unwrap();
}
