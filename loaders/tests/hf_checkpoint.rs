//! Hugging Face checkpoint directories (config.json + safetensors shards + tokenizer.json).

mod common;

use cubeqwen_loaders::tokenizer::tokenizer_from_hf_json;
use cubeqwen_loaders::{
    convert_to_f16, hf_to_gguf_name, load_model, load_tokenizer_data, random_qwen2, HostModel,
    Qwen2Config, TensorData, TokenizerData,
};
use half::{bf16, f16};
use safetensors::Dtype;

fn config(tied: bool) -> Qwen2Config {
    Qwen2Config {
        hidden: 32,
        layers: 2,
        n_heads: 4,
        n_kv_heads: 2,
        head_dim: 8,
        ffn: 48,
        vocab: 300,
        rope_theta: 1e6,
        rms_eps: 1e-6,
        context_length: 2048,
        tied_embeddings: tied,
    }
}

/// Norm weights stored as BF16, other 1-D tensors F32, matrices F16 or F32 alternately.
fn dtype_of(name: &str, ndims: usize) -> Dtype {
    match (ndims, name) {
        (1, n) if n.ends_with("norm.weight") => Dtype::BF16,
        (1, _) => Dtype::F32,
        (_, n) if n.contains("ffn") => Dtype::F32,
        _ => Dtype::F16,
    }
}

/// What the loader must return for `m` stored with `dtype_of`.
fn expected(m: &HostModel) -> HostModel {
    let mut e = m.clone();
    for (name, t) in e.tensors.iter_mut() {
        if dtype_of(name, t.shape.len()) == Dtype::BF16 {
            t.data = TensorData::F32(
                t.data
                    .to_f32()
                    .iter()
                    .map(|&x| bf16::from_f32(x).to_f32())
                    .collect(),
            );
        }
    }
    e
}

#[test]
fn name_mapping() {
    for (hf, gguf) in [
        ("model.embed_tokens.weight", "token_embd.weight"),
        ("lm_head.weight", "output.weight"),
        ("model.norm.weight", "output_norm.weight"),
        (
            "model.layers.0.input_layernorm.weight",
            "blk.0.attn_norm.weight",
        ),
        (
            "model.layers.17.self_attn.q_proj.bias",
            "blk.17.attn_q.bias",
        ),
        (
            "model.layers.3.self_attn.o_proj.weight",
            "blk.3.attn_output.weight",
        ),
        (
            "model.layers.3.post_attention_layernorm.weight",
            "blk.3.ffn_norm.weight",
        ),
        (
            "model.layers.9.mlp.down_proj.weight",
            "blk.9.ffn_down.weight",
        ),
    ] {
        assert_eq!(hf_to_gguf_name(hf).as_deref(), Some(gguf));
        assert_eq!(common::gguf_to_hf(gguf), hf);
    }
    for bad in [
        "model.layers.x.mlp.down_proj.weight",
        "model.layers.1.mlp.down_proj.scales",
        "model.layers.1.rotary_emb.inv_freq",
        "embed_tokens.weight",
    ] {
        assert_eq!(hf_to_gguf_name(bad), None, "{bad}");
    }
}

#[test]
fn sharded_mixed_dtype_checkpoint_with_tokenizer() {
    let m = random_qwen2(&config(false), 12);
    let dir = tempfile::tempdir().unwrap();
    common::write_hf_dir(&m, dir.path(), 3, dtype_of);
    common::write_hf_tokenizer(&m, dir.path());
    let got = load_model(dir.path()).unwrap();
    let want = expected(&m);
    assert_eq!(got.config, want.config);
    assert_eq!(got.tokenizer, want.tokenizer);
    assert!(got.tensors == want.tensors);
    // BF16 rounding really happened (the test would pass vacuously otherwise).
    assert!(got.tensors["output_norm.weight"] != m.tensors["output_norm.weight"]);
    assert_eq!(load_tokenizer_data(dir.path()).unwrap(), m.tokenizer);
}

#[test]
fn tied_checkpoint_without_lm_head_and_without_tokenizer() {
    let m = random_qwen2(&config(true), 13);
    let dir = tempfile::tempdir().unwrap();
    common::write_hf_dir(&m, dir.path(), 1, |_, _| Dtype::F32);
    let got = load_model(dir.path()).unwrap();
    assert!(got.config.tied_embeddings);
    assert!(!got.tensors.contains_key("output.weight"));
    assert_eq!(got.tokenizer, TokenizerData::default());
    assert!(got.tensors == m.tensors);
    assert!(load_tokenizer_data(dir.path()).is_err());
}

#[test]
fn lm_head_present_with_tie_flag_means_untied() {
    let m = random_qwen2(&config(false), 14);
    let dir = tempfile::tempdir().unwrap();
    common::write_hf_dir(&m, dir.path(), 1, |_, _| Dtype::F16);
    std::fs::write(
        dir.path().join("config.json"),
        common::hf_config_json(&m, true),
    )
    .unwrap();
    let got = load_model(dir.path()).unwrap();
    assert!(!got.config.tied_embeddings);
    assert!(got.tensors.contains_key("output.weight"));
}

#[test]
fn convert_checkpoint_to_f16_gguf() {
    let m = random_qwen2(&config(false), 15);
    let dir = tempfile::tempdir().unwrap();
    let ck = dir.path().join("ck");
    common::write_hf_dir(&m, &ck, 2, dtype_of);
    common::write_hf_tokenizer(&m, &ck);
    let out = dir.path().join("out.gguf");
    convert_to_f16(&ck, &out).unwrap();
    let a = load_model(&ck).unwrap();
    let b = load_model(&out).unwrap();
    assert!(a == b);
    assert!(b.tokenizer.chat_template.is_some());
}

#[test]
fn tokenizer_json_padding_and_added_tokens() {
    let tj = r#"{
      "added_tokens": [
        {"id": 5, "content": "<|endoftext|>", "special": true},
        {"id": 6, "content": "<tool_call>", "special": false}
      ],
      "model": {"type": "BPE", "vocab": {"a": 0, "b": 1, "ab": 2, "Ġ": 3, "c": 4},
                "merges": ["a b", ["Ġ", "c"]]}
    }"#;
    let tc = r#"{"eos_token": {"content": "<|endoftext|>"}, "pad_token": "<|endoftext|>",
                "bos_token": null, "add_bos_token": false, "chat_template": "{{x}}"}"#;
    let t = tokenizer_from_hf_json(tj, Some(tc), 9).unwrap();
    assert_eq!(
        t.tokens,
        [
            "a",
            "b",
            "ab",
            "Ġ",
            "c",
            "<|endoftext|>",
            "<tool_call>",
            "[PAD7]",
            "[PAD8]"
        ]
    );
    assert_eq!(t.token_types, [1, 1, 1, 1, 1, 3, 4, 4, 4]);
    assert_eq!(t.merges, ["a b", "Ġ c"]);
    assert_eq!(t.eos_id, Some(5));
    assert_eq!(t.pad_id, Some(5));
    assert_eq!(t.bos_id, None);
    assert_eq!(t.chat_template.as_deref(), Some("{{x}}"));
    // No pre_tokenizer: not one we know, so not silently qwen2.
    assert_eq!((t.model.as_str(), t.pre.as_str()), ("gpt2", ""));
    // Conflicting ids and non-BPE models are errors.
    let clash = r#"{"added_tokens": [{"id": 0, "content": "z", "special": true}],
                    "model": {"type": "BPE", "vocab": {"a": 0}, "merges": []}}"#;
    assert!(tokenizer_from_hf_json(clash, None, 1).is_err());
    let uni = r#"{"model": {"type": "Unigram", "vocab": []}}"#;
    assert!(format!("{:#}", tokenizer_from_hf_json(uni, None, 1).unwrap_err()).contains("Unigram"));
}

#[test]
fn f16_values_survive_every_storage_dtype() {
    // A matrix whose f16 values are exactly representable in F32 and F16 storage must come back
    // bit-identical from either.
    let m = random_qwen2(&config(false), 16);
    for dt in [Dtype::F32, Dtype::F16] {
        let dir = tempfile::tempdir().unwrap();
        common::write_hf_dir(&m, dir.path(), 1, |_, _| dt);
        let got = load_model(dir.path()).unwrap();
        let (a, b) = (
            &got.tensors["blk.1.ffn_gate.weight"],
            &m.tensors["blk.1.ffn_gate.weight"],
        );
        assert_eq!(a, b, "{dt:?}");
        assert!(matches!(a.data, TensorData::F16(ref v) if v.iter().any(|x| *x != f16::ZERO)));
    }
}
