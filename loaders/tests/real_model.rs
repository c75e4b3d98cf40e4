//! Tests on the real Qwen2.5-Coder-0.5B-Instruct GGUF. The path is `$CUBEQWEN_MODEL`, defaulting
//! to `~/.cache/cubeqwen/qwen2.5-coder-0.5b-instruct.gguf`; when the file is missing these tests
//! FAIL, telling to run `scripts/fetch-model.sh`. Reference values come from llama.cpp's Python
//! `gguf` package (`tests/fixtures/make_fixtures.py`).

use cubeqwen_loaders::quant::dequantize;
use cubeqwen_loaders::{
    convert_to_f16, inspect, load_model, load_tokenizer_data, GgmlType, GgufFile, HostModel,
    TensorData,
};
use half::f16;
use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::Instant;

fn model_path() -> PathBuf {
    let p = match std::env::var_os("CUBEQWEN_MODEL") {
        Some(p) => PathBuf::from(p),
        None => {
            let home = std::env::var_os("HOME").expect("HOME is not set");
            PathBuf::from(home).join(".cache/cubeqwen/qwen2.5-coder-0.5b-instruct.gguf")
        }
    };
    assert!(
        p.is_file(),
        "real model not found at {} — run `scripts/fetch-model.sh` (or set CUBEQWEN_MODEL)",
        p.display()
    );
    p
}

fn fixture_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// The model is loaded once and shared by the tests of this file.
fn model() -> &'static HostModel {
    static M: OnceLock<HostModel> = OnceLock::new();
    M.get_or_init(|| {
        let t = Instant::now();
        let m = load_model(&model_path()).expect("load real model");
        eprintln!(
            "load_model(real 0.5B GGUF): {:.2} s ({} tensors)",
            t.elapsed().as_secs_f64(),
            m.tensors.len()
        );
        m
    })
}

#[test]
fn config_of_the_real_model() {
    let c = &model().config;
    assert_eq!(c.hidden, 896);
    assert_eq!(c.layers, 24);
    assert_eq!(c.n_heads, 14);
    assert_eq!(c.n_kv_heads, 2);
    assert_eq!(c.head_dim, 64);
    assert_eq!(c.ffn, 4864);
    assert_eq!(c.vocab, 151936);
    assert_eq!(c.rope_theta, 1.0e6);
    assert_eq!(c.rms_eps, 1.0e-6);
    assert_eq!(c.context_length, 32768);
    // This GGUF carries its own output.weight.
    assert!(!c.tied_embeddings);
    assert_eq!(model().tensors.len(), 291);
}

#[test]
fn tokenizer_of_the_real_model() {
    let t0 = Instant::now();
    let t = load_tokenizer_data(&model_path()).unwrap();
    eprintln!("load_tokenizer_data: {:.3} s", t0.elapsed().as_secs_f64());
    assert_eq!(t.model, "gpt2");
    assert_eq!(t.pre, "qwen2");
    assert_eq!(t.tokens.len(), 151936);
    assert_eq!(t.token_types.len(), 151936);
    assert_eq!(t.merges.len(), 151387);
    assert_eq!(t.eos_id, Some(151645));
    assert_eq!(t.bos_id, Some(151643));
    assert_eq!(t.pad_id, Some(151643));
    assert!(!t.add_bos);
    assert_eq!(t.tokens[151643], "<|endoftext|>");
    assert_eq!(t.tokens[151644], "<|im_start|>");
    assert_eq!(t.tokens[151645], "<|im_end|>");
    assert_eq!(t.token_types[151644], 3);
    assert_eq!(t.tokens[0], "!");
    assert_eq!(t.merges[0], "Ġ Ġ");
    assert!(t.chat_template.as_deref().unwrap().contains("<|im_start|>"));
    assert_eq!(t, model().tokenizer);
}

/// The `real:` fixtures are the first blocks of real tensors: the bytes must be those of the file,
/// and the loaded f16 values must be the gguf-py f32 values rounded to f16.
#[test]
fn loaded_values_match_gguf_py_fixtures() {
    let g = GgufFile::open(&model_path()).unwrap();
    let manifest = std::fs::read_to_string(fixture_dir().join("manifest.txt")).unwrap();
    let mut checked = 0;
    for line in manifest.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        let Some(tensor) = f[3].strip_prefix("real:") else {
            continue;
        };
        let raw = std::fs::read(fixture_dir().join(format!("{}.raw", f[0]))).unwrap();
        let expected: Vec<f32> = std::fs::read(fixture_dir().join(format!("{}.f32", f[0])))
            .unwrap()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
            .collect();
        let info = g.tensor_info(tensor).unwrap();
        assert_eq!(info.ty.name(), f[1]);
        assert_eq!(&g.tensor_bytes(info)[..raw.len()], &raw[..], "{tensor}");
        let t = model().tensor(tensor).unwrap();
        match &t.data {
            TensorData::F16(v) => {
                assert_eq!(t.shape.len(), 2);
                for (i, e) in expected.iter().enumerate() {
                    assert_eq!(v[i].to_bits(), f16::from_f32(*e).to_bits(), "{tensor}[{i}]");
                }
            }
            TensorData::F32(v) => {
                assert_eq!(t.shape.len(), 1);
                for (i, e) in expected.iter().enumerate() {
                    assert_eq!(v[i].to_bits(), e.to_bits(), "{tensor}[{i}]");
                }
            }
        }
        checked += 1;
    }
    assert_eq!(checked, 5);
}

fn checksum<I: Iterator<Item = u64>>(bits: I) -> (u64, u64) {
    let (mut s, mut w) = (0u64, 0u64);
    for (i, b) in bits.enumerate() {
        s = s.wrapping_add(b);
        w = w.wrapping_add(b.wrapping_mul((i % 65521) as u64 + 1));
    }
    (s, w)
}

/// Whole tensors (both 136M-value matrices among them) against gguf-py checksums, as f32 and as
/// the f16 the loader keeps.
#[test]
fn whole_tensors_match_gguf_py_checksums() {
    let g = GgufFile::open(&model_path()).unwrap();
    let text = std::fs::read_to_string(fixture_dir().join("checksums.txt")).unwrap();
    let mut n = 0;
    for line in text.lines().filter(|l| !l.is_empty()) {
        let f: Vec<&str> = line.split_whitespace().collect();
        let num = |i: usize| f[i].parse::<u64>().unwrap();
        let info = g.tensor_info(f[0]).unwrap();
        assert_eq!(info.ty, GgmlType::from_name(f[1]).unwrap());
        let mut v = vec![0f32; info.n_elements() as usize];
        assert_eq!(v.len() as u64, num(2));
        dequantize(info.ty, g.tensor_bytes(info), &mut v).unwrap();
        let c32 = checksum(v.iter().map(|x| x.to_bits() as u64));
        assert_eq!(c32, (num(3), num(4)), "{}: f32 checksum", f[0]);
        let loaded = &model().tensor(f[0]).unwrap().data;
        let c16 = match loaded {
            TensorData::F16(h) => checksum(h.iter().map(|x| x.to_bits() as u64)),
            TensorData::F32(x) => checksum(x.iter().map(|x| f16::from_f32(*x).to_bits() as u64)),
        };
        assert_eq!(c16, (num(5), num(6)), "{}: f16 checksum", f[0]);
        n += 1;
    }
    assert!(n >= 7);
}

#[test]
fn every_tensor_follows_the_dtype_policy_and_is_finite() {
    for (name, t) in &model().tensors {
        assert_eq!(t.data.len(), t.shape.iter().product::<usize>(), "{name}");
        match (&t.data, t.shape.len()) {
            (TensorData::F16(v), 2) => {
                assert!(v.iter().all(|x| x.is_finite()), "{name}");
                assert!(v.iter().any(|x| x.to_f32() != 0.0), "{name}");
            }
            (TensorData::F32(v), 1) => assert!(v.iter().all(|x| x.is_finite()), "{name}"),
            _ => panic!("{name}: wrong dtype for shape {:?}", t.shape),
        }
    }
    assert_eq!(
        model().tensor("token_embd.weight").unwrap().shape,
        [151936, 896]
    );
    assert_eq!(
        model().tensor("blk.3.ffn_down.weight").unwrap().shape,
        [896, 4864]
    );
    assert_eq!(
        model().tensor("blk.3.attn_k.weight").unwrap().shape,
        [128, 896]
    );
}

#[test]
fn inspect_the_real_model() {
    let s = inspect(&model_path()).unwrap();
    for want in [
        "architecture: qwen2",
        "hidden 896, layers 24, heads 14, kv heads 2, head_dim 64, ffn 4864, vocab 151936",
        "151936 tokens",
        "151387 merges",
        "eos 151645 \"<|im_end|>\"",
        "chat template present",
        "token_embd.weight",
        "Q5_0",
        "[151936, 896]",
        "93592576",
    ] {
        assert!(s.contains(want), "inspect output lacks {want:?}:\n{s}");
    }
}

#[test]
fn convert_real_model_to_f16_and_reload() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("f16.gguf");
    let t = Instant::now();
    convert_to_f16(&model_path(), &out).unwrap();
    eprintln!("convert_to_f16: {:.2} s", t.elapsed().as_secs_f64());
    let back = load_model(&out).unwrap();
    assert!(back == *model(), "F16 GGUF reloads differently");
    let g = GgufFile::open(&out).unwrap();
    assert_eq!(
        g.get_str("general.name").unwrap(),
        Some("Qwen2.5 Coder 0.5B Instruct AWQ")
    );
    assert_eq!(g.get_u32("general.file_type").unwrap(), Some(1));
    assert!(g
        .tensors()
        .iter()
        .all(|t| matches!(t.ty, GgmlType::F16 | GgmlType::F32)));
}
