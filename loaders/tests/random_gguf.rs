//! The Qwen2.5 shapes by name, tokenizer padding, tokenizer-only GGUFs and random-weight GGUFs
//! carrying another file's tokenizer (what `cubeqwen random-gguf` writes for benchmarks).

use cubeqwen_loaders::tokenizer::TOKEN_UNUSED;
use cubeqwen_loaders::{
    byte_level_tokenizer, load_model, load_tokenizer_data, pad_tokenizer, qwen25_config,
    random_qwen2, random_qwen2_with_tokenizer, write_gguf_f16, write_random_gguf,
    write_tokenizer_gguf, GgufFile, TensorData,
};

#[test]
fn qwen25_shapes_are_the_released_configs() {
    let a = qwen25_config("0.5b").unwrap();
    assert_eq!(
        (
            a.hidden,
            a.ffn,
            a.layers,
            a.n_heads,
            a.n_kv_heads,
            a.head_dim,
            a.vocab
        ),
        (896, 4864, 24, 14, 2, 64, 151936)
    );
    assert!(a.tied_embeddings);
    let b = qwen25_config("1.5B").unwrap();
    assert_eq!(
        (
            b.hidden,
            b.ffn,
            b.layers,
            b.n_heads,
            b.n_kv_heads,
            b.head_dim,
            b.vocab
        ),
        (1536, 8960, 28, 12, 2, 128, 151936)
    );
    assert!(b.tied_embeddings);
    let c = qwen25_config("7b").unwrap();
    assert_eq!(
        (
            c.hidden,
            c.ffn,
            c.layers,
            c.n_heads,
            c.n_kv_heads,
            c.head_dim,
            c.vocab
        ),
        (3584, 18944, 28, 28, 4, 128, 152064)
    );
    assert!(!c.tied_embeddings);
    for s in [&a, &b, &c] {
        assert_eq!(
            (s.rope_theta, s.rms_eps, s.context_length),
            (1e6, 1e-6, 32768)
        );
        s.validate().unwrap();
    }
    let e = qwen25_config("3b").unwrap_err().to_string();
    assert!(
        e.contains("unknown model shape `3b`") && e.contains("0.5b, 1.5b, 7b"),
        "{e}"
    );
}

#[test]
fn tokenizer_is_padded_to_the_vocabulary_and_never_cut() {
    let mut t = byte_level_tokenizer(300, 1);
    pad_tokenizer(&mut t, 305).unwrap();
    assert_eq!(t.tokens.len(), 305);
    assert_eq!(t.tokens[300], "[PAD300]");
    assert_eq!(t.token_types[304], TOKEN_UNUSED);
    let e = pad_tokenizer(&mut t, 304).unwrap_err().to_string();
    assert!(e.contains("305 tokens, more than the 304 rows"), "{e}");
}

#[test]
fn tokenizer_only_gguf_then_random_model_with_that_tokenizer() {
    let dir = tempfile::tempdir().unwrap();
    // A source model whose tokenizer has fewer tokens than the "tiny" shape's 151936 rows.
    let mut src = random_qwen2(&cubeqwen_loaders::tiny_config(), 3);
    src.tokenizer = byte_level_tokenizer(1000, 3);
    src.config.vocab = 1000;
    src.tensors.insert(
        "token_embd.weight".into(),
        cubeqwen_loaders::HostTensor {
            shape: vec![1000, 64],
            data: TensorData::F16(vec![half::f16::from_f32(0.5); 64_000]),
        },
    );
    let src_path = dir.path().join("src.gguf");
    write_gguf_f16(&src, &src_path).unwrap();

    let tok = dir.path().join("tok.gguf");
    write_tokenizer_gguf(&src_path, &tok).unwrap();
    let g = GgufFile::open(&tok).unwrap();
    assert!(g.tensors().is_empty());
    drop(g);
    assert_eq!(load_tokenizer_data(&tok).unwrap(), src.tokenizer);
    assert!(
        load_model(&tok).is_err(),
        "a tokenizer-only file loaded as a model"
    );

    let shape = qwen25_config("tiny").unwrap();
    let out = dir.path().join("random.gguf");
    write_random_gguf(&shape, 9, Some(&tok), &out).unwrap();
    let m = load_model(&out).unwrap();
    assert_eq!(m.config, shape);
    assert_eq!(m.tokenizer.tokens.len(), shape.vocab);
    assert_eq!(m.tokenizer.tokens[..1000], src.tokenizer.tokens[..]);
    assert_eq!(m.tokenizer.merges, src.tokenizer.merges);
    assert_eq!(m.tokenizer.eos_id, src.tokenizer.eos_id);
    // Weights are random at ±1/sqrt(fan_in), never all zeros; same seed, same weights.
    let w = m.tensor("blk.1.ffn_down.weight").unwrap().data.to_f32();
    let bound = 1.0 / (shape.ffn as f32).sqrt();
    assert!(w.iter().all(|x| x.abs() <= bound * 1.001));
    assert!(w.iter().filter(|x| **x != 0.0).count() > w.len() * 9 / 10);
    assert!(w.iter().map(|x| x.abs()).sum::<f32>() / w.len() as f32 > bound / 4.0);
    let again = random_qwen2_with_tokenizer(&shape, 9, Default::default());
    assert_eq!(again.tensors, m.tensors);

    // A tokenizer larger than the shape's vocabulary is refused with the reason.
    let small = cubeqwen_loaders::tiny_config(); // vocab 256
    let e = write_random_gguf(&small, 0, Some(&tok), &dir.path().join("x.gguf")).unwrap_err();
    assert!(
        format!("{e:#}").contains("1000 tokens, more than the 256 rows"),
        "{e:#}"
    );
    // A tokenizer-only source without tokens is refused.
    let empty = dir.path().join("empty.gguf");
    let mut w = cubeqwen_loaders::GgufWriter::new();
    w.set_str("general.architecture", "qwen2");
    w.write(&empty).unwrap();
    let e = write_tokenizer_gguf(&empty, &dir.path().join("y.gguf")).unwrap_err();
    assert!(e.to_string().contains("no tokens"), "{e:#}");
}
