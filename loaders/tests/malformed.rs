//! Hostile inputs: every malformed GGUF file or HF checkpoint must give a clear error naming the
//! file and the problem — never a panic, an abort, a huge allocation or an out-of-bounds read.
//! Cases are generated programmatically, from small valid files made by the writer or byte by
//! byte with the raw builder below (written independently of the writer).

mod common;

use cubeqwen_loaders::gguf::{GgufFile, Value};
use cubeqwen_loaders::{
    load_model, load_tokenizer_data, random_qwen2, write_gguf_f16, GgmlType, GgufWriter, HostModel,
    Qwen2Config, TensorData,
};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use safetensors::Dtype;
use std::path::{Path, PathBuf};

fn small_config() -> Qwen2Config {
    Qwen2Config {
        hidden: 16,
        layers: 1,
        n_heads: 2,
        n_kv_heads: 1,
        head_dim: 8,
        ffn: 32,
        vocab: 16,
        rope_theta: 1e6,
        rms_eps: 1e-6,
        context_length: 128,
        tied_embeddings: false,
    }
}

fn small_model() -> HostModel {
    random_qwen2(&small_config(), 42)
}

fn small_file_bytes() -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("m.gguf");
    write_gguf_f16(&small_model(), &p).unwrap();
    std::fs::read(p).unwrap()
}

/// Write `bytes` to a temp file, load it, and return the error text (panics if it loaded).
fn load_err(bytes: &[u8]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("hostile.gguf");
    std::fs::write(&p, bytes).unwrap();
    let e = match load_model(&p) {
        Ok(_) => panic!("hostile file loaded"),
        Err(e) => format!("{e:#}"),
    };
    assert!(
        e.contains("hostile.gguf"),
        "error does not name the file: {e}"
    );
    e
}

fn assert_has(e: &str, parts: &[&str]) {
    for p in parts {
        assert!(e.contains(p), "error {e:?} lacks {p:?}");
    }
}

/// Builds GGUF bytes field by field.
struct Raw(Vec<u8>);

impl Raw {
    fn new(version: u32, n_tensors: u64, n_kv: u64) -> Raw {
        let mut r = Raw(b"GGUF".to_vec());
        r.u32(version).u64(n_tensors).u64(n_kv);
        r
    }
    fn u32(&mut self, v: u32) -> &mut Self {
        self.0.extend(v.to_le_bytes());
        self
    }
    fn u64(&mut self, v: u64) -> &mut Self {
        self.0.extend(v.to_le_bytes());
        self
    }
    fn str(&mut self, s: &str) -> &mut Self {
        self.u64(s.len() as u64);
        self.0.extend(s.as_bytes());
        self
    }
    fn kv_u32(&mut self, k: &str, v: u32) -> &mut Self {
        self.str(k).u32(4).u32(v)
    }
    fn kv_str(&mut self, k: &str, v: &str) -> &mut Self {
        self.str(k).u32(8).str(v)
    }
    fn tensor(&mut self, name: &str, ne: &[u64], ty: u32, offset: u64) -> &mut Self {
        self.str(name).u32(ne.len() as u32);
        for d in ne {
            self.u64(*d);
        }
        self.u32(ty).u64(offset)
    }
    fn pad(&mut self, align: usize) -> &mut Self {
        while !self.0.len().is_multiple_of(align) {
            self.0.push(0);
        }
        self
    }
    fn data(&mut self, n: usize) -> &mut Self {
        self.0.extend((0..n).map(|i| (i % 7) as u8 + 0x30));
        self
    }
    fn parse_err(&self) -> String {
        match GgufFile::from_bytes(&self.0) {
            Ok(_) => panic!("hostile bytes parsed"),
            Err(e) => format!("{e:#}"),
        }
    }
}

#[test]
fn the_valid_small_file_loads() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("ok.gguf");
    std::fs::write(&p, small_file_bytes()).unwrap();
    assert!(load_model(&p).unwrap() == small_model());
    // And a raw-built file with one F32 tensor parses.
    let mut r = Raw::new(3, 1, 1);
    r.kv_str("general.architecture", "qwen2")
        .tensor("t", &[4], 0, 0)
        .pad(32)
        .data(16);
    let g = GgufFile::from_bytes(&r.0).unwrap();
    assert_eq!(g.tensor_info("t").unwrap().n_bytes, 16);
}

#[test]
fn empty_and_bad_magic_and_versions() {
    assert_has(&load_err(b""), &["truncated", "magic"]);
    assert_has(&load_err(b"GGU"), &["truncated"]);
    let mut b = small_file_bytes();
    b[0..4].copy_from_slice(b"GGML");
    assert_has(&load_err(&b), &["bad magic", "GGML"]);
    for v in [0u32, 1, 4, 77] {
        let mut b = small_file_bytes();
        b[4..8].copy_from_slice(&v.to_le_bytes());
        assert_has(&load_err(&b), &[&format!("unsupported GGUF version {v}")]);
    }
    let mut b = small_file_bytes();
    b[4..8].copy_from_slice(&3u32.to_be_bytes());
    assert_has(&load_err(&b), &["big-endian"]);
    // Version 2 files have the same layout: accepted.
    let mut b = small_file_bytes();
    b[4..8].copy_from_slice(&2u32.to_le_bytes());
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("v2.gguf");
    std::fs::write(&p, &b).unwrap();
    assert!(load_model(&p).is_ok());
}

#[test]
fn every_truncation_is_an_error() {
    let b = small_file_bytes();
    for n in 0..b.len() {
        let r = GgufFile::from_bytes(&b[..n]);
        assert!(r.is_err(), "prefix of {n} bytes parsed");
    }
    // Through the file API too, at a few places: header, metadata, tensor infos, data.
    let data_at = GgufFile::from_bytes(&b).unwrap().data_offset as usize;
    for n in [3, 10, 100, 1000, data_at - 1, data_at + 10, b.len() - 1] {
        let e = load_err(&b[..n]);
        assert!(
            e.contains("truncated") || e.contains("past the end") || e.contains("cannot fit"),
            "{n}: {e}"
        );
    }
}

#[test]
fn huge_counts_and_lengths_are_rejected_without_allocating() {
    // tensor count
    let mut b = small_file_bytes();
    b[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
    assert_has(&load_err(&b), &["tensor count", "cannot fit"]);
    // metadata count
    let mut b = small_file_bytes();
    b[16..24].copy_from_slice(&(u64::MAX / 2).to_le_bytes());
    assert_has(&load_err(&b), &["metadata count", "cannot fit"]);
    // key length
    let mut b = small_file_bytes();
    b[24..32].copy_from_slice(&(1u64 << 62).to_le_bytes());
    assert_has(&load_err(&b), &["truncated", "metadata key"]);
    // string value length
    let mut r = Raw::new(3, 0, 1);
    r.str("general.name").u32(8).u64(u64::MAX - 3);
    assert_has(&r.parse_err(), &["general.name", "truncated"]);
    // array count
    let mut r = Raw::new(3, 0, 1);
    r.str("tokenizer.ggml.tokens").u32(9).u32(8).u64(1 << 40);
    r.str("a");
    assert_has(&r.parse_err(), &["tokenizer.ggml.tokens", "cannot fit"]);
    // nested array counts
    let mut r = Raw::new(3, 0, 1);
    r.str("x").u32(9).u32(9).u64(1).u32(4).u64(u64::MAX);
    assert_has(&r.parse_err(), &["cannot fit"]);
    // More array elements than the metadata limit, all present in the file.
    let n = cubeqwen_loaders::gguf::MAX_ARRAY_ELEMENTS + 1;
    let mut r = Raw::new(3, 0, 1);
    r.str("big").u32(9).u32(0).u64(n);
    r.0.resize(r.0.len() + n as usize, 1);
    assert_has(&r.parse_err(), &["`big`", "exceeds the limit"]);
    // tensor name length
    let mut r = Raw::new(3, 1, 0);
    r.u64(u64::MAX).data(64);
    assert_has(&r.parse_err(), &["tensor name", "truncated"]);
}

#[test]
fn bad_metadata_values() {
    let mut r = Raw::new(3, 0, 1);
    r.str("x").u32(13).u32(0);
    assert_has(&r.parse_err(), &["unknown metadata value type 13"]);
    let mut r = Raw::new(3, 0, 1);
    r.str("x").u32(9).u32(99).u64(0);
    assert_has(&r.parse_err(), &["unknown metadata value type 99"]);
    let mut r = Raw::new(3, 0, 1);
    r.str("x").u32(7);
    r.0.push(2);
    assert_has(&r.parse_err(), &["bool value 2"]);
    let mut r = Raw::new(3, 0, 1);
    r.str("x").u32(8).u64(2);
    r.0.extend([0xC3, 0x28]);
    assert_has(&r.parse_err(), &["not valid UTF-8"]);
    // Arrays nested 100 deep.
    let mut r = Raw::new(3, 0, 1);
    r.str("deep").u32(9);
    for _ in 0..100 {
        r.u32(9).u64(1);
    }
    r.u32(4).u64(0);
    assert_has(&r.parse_err(), &["nested deeper"]);
    let mut r = Raw::new(3, 0, 2);
    r.kv_u32("a", 1).kv_u32("a", 2);
    assert_has(&r.parse_err(), &["duplicate metadata key `a`"]);
    for (align_ty, align) in [(4u32, 0u32), (4, 48)] {
        let mut r = Raw::new(3, 0, 1);
        r.str("general.alignment").u32(align_ty).u32(align);
        assert_has(&r.parse_err(), &["general.alignment", "power of two"]);
    }
    let mut r = Raw::new(3, 0, 1);
    r.kv_str("general.alignment", "32");
    assert_has(&r.parse_err(), &["general.alignment has type"]);
}

#[test]
fn bad_tensor_infos() {
    let one = |ne: &[u64], ty: u32, offset: u64, data: usize| {
        let mut r = Raw::new(3, 1, 0);
        r.tensor("w", ne, ty, offset).pad(32).data(data);
        r.parse_err()
    };
    assert_has(&one(&[], 0, 0, 64), &["tensor `w`", "0 dimensions"]);
    assert_has(&one(&[1, 1, 1, 1, 1], 0, 0, 64), &["5 dimensions"]);
    assert_has(&one(&[1 << 40, 1 << 40], 0, 0, 64), &["overflows"]);
    assert_has(&one(&[u64::MAX, 1], 0, 0, 64), &["too large"]);
    assert_has(
        &one(&[32], 99, 0, 64),
        &["tensor `w`", "unknown GGML tensor type id 99"],
    );
    assert_has(&one(&[32], 4, 0, 64), &["unknown GGML tensor type id 4"]);
    assert_has(
        &one(&[16], 8, 0, 64),
        &["not a multiple of the Q8_0 block size 32"],
    );
    assert_has(&one(&[8], 0, 3, 64), &["data offset 3", "alignment 32"]);
    assert_has(&one(&[32], 0, 0, 127), &["tensor `w`", "past the end"]);
    assert_has(&one(&[8], 0, 1 << 40, 64), &["past the end"]);
    assert_has(&one(&[8], 0, u64::MAX - 31, 64), &["past the end"]);
    assert_has(&one(&[1 << 30, 1 << 30], 0, 0, 64), &["past the end"]);
    // Overlap and duplicates.
    let mut r = Raw::new(3, 2, 0);
    r.tensor("a", &[16], 0, 0)
        .tensor("b", &[16], 0, 32)
        .pad(32)
        .data(128);
    assert_has(&r.parse_err(), &["`a`", "`b`", "overlap"]);
    let mut r = Raw::new(3, 2, 0);
    r.tensor("a", &[8], 0, 0)
        .tensor("a", &[8], 0, 32)
        .pad(32)
        .data(128);
    assert_has(&r.parse_err(), &["duplicate tensor name `a`"]);
    // Custom alignment is honoured when checking offsets.
    let mut r = Raw::new(3, 1, 1);
    r.kv_u32("general.alignment", 64)
        .tensor("a", &[8], 0, 32)
        .pad(64)
        .data(128);
    assert_has(&r.parse_err(), &["data offset 32", "alignment 64"]);
}

fn write_model_with(m: &HostModel, edit: impl FnOnce(&mut GgufWriter)) -> Vec<u8> {
    let mut w = GgufWriter::new();
    cubeqwen_loaders::writer::set_model_metadata(&mut w, m).unwrap();
    edit(&mut w);
    let mut w2 = w;
    for (name, t) in &m.tensors {
        match &t.data {
            TensorData::F16(v) => w2.add_f16(name, &t.shape, v).unwrap(),
            TensorData::F32(v) => w2.add_f32(name, &t.shape, v).unwrap(),
        };
    }
    w2.to_bytes().unwrap()
}

#[test]
fn missing_or_misshaped_required_tensors() {
    let mut m = small_model();
    m.tensors.remove("blk.0.ffn_up.weight");
    assert_has(
        &load_err(&write_model_with(&m, |_| {})),
        &["missing required tensor `blk.0.ffn_up.weight`", "[32, 16]"],
    );
    let mut m = small_model();
    m.tensors.remove("output_norm.weight");
    assert_has(
        &load_err(&write_model_with(&m, |_| {})),
        &["missing required tensor `output_norm.weight`"],
    );
    let mut m = small_model();
    m.tensors.remove("token_embd.weight");
    assert_has(
        &load_err(&write_model_with(&m, |_| {})),
        &["missing required tensor `token_embd.weight`"],
    );
    let mut m = small_model();
    let k = m.tensors.get_mut("blk.0.attn_k.weight").unwrap();
    k.shape = vec![16, 8];
    assert_has(
        &load_err(&write_model_with(&m, |_| {})),
        &["tensor `blk.0.attn_k.weight` has shape [16, 8], expected [8, 16]"],
    );
    let mut m = small_model();
    let b = m.tensors.get_mut("blk.0.attn_q.bias").unwrap();
    b.shape = vec![4, 4];
    assert_has(
        &load_err(&write_model_with(&m, |_| {})),
        &["`blk.0.attn_q.bias` has shape [4, 4], expected [16]"],
    );
    // output.weight of the wrong vocab.
    let mut m = small_model();
    let o = m.tensors.get_mut("output.weight").unwrap();
    o.shape = vec![8, 16];
    if let TensorData::F16(v) = &mut o.data {
        v.truncate(128);
    }
    assert_has(
        &load_err(&write_model_with(&m, |_| {})),
        &["`output.weight` has shape [8, 16], expected [16, 16]"],
    );
}

#[test]
fn bad_config_metadata() {
    let m = small_model();
    let e = load_err(&write_model_with(&m, |w| {
        w.set_str("general.architecture", "llama");
    }));
    assert_has(&e, &["architecture `llama` is not supported"]);
    let e = load_err(&write_model_with(&m, |w| {
        w.remove("general.architecture");
    }));
    assert_has(&e, &["missing metadata `general.architecture`"]);
    let e = load_err(&write_model_with(&m, |w| {
        w.remove("qwen2.block_count");
    }));
    assert_has(&e, &["missing metadata `qwen2.block_count`"]);
    let e = load_err(&write_model_with(&m, |w| {
        w.set_str("qwen2.embedding_length", "16");
    }));
    assert_has(&e, &["qwen2.embedding_length", "expected an integer"]);
    let e = load_err(&write_model_with(&m, |w| {
        w.set("qwen2.attention.head_count_kv", Value::I32(-1));
    }));
    assert_has(&e, &["qwen2.attention.head_count_kv"]);
    let e = load_err(&write_model_with(&m, |w| {
        w.set_u32("qwen2.attention.head_count_kv", 3);
    }));
    assert_has(&e, &["not a multiple of 3 kv heads"]);
    let e = load_err(&write_model_with(&m, |w| {
        w.set_u32("qwen2.attention.head_count", 0);
    }));
    assert_has(&e, &["head_count is 0"]);
    // A layer count far beyond the tensors present: an error about the first missing layer,
    // not a giant allocation.
    let e = load_err(&write_model_with(&m, |w| {
        w.set_u32("qwen2.block_count", u32::MAX / 2);
    }));
    assert_has(&e, &["missing required tensor `blk.1.attn_norm.weight`"]);
    let e = load_err(&write_model_with(&m, |w| {
        w.set_f32("qwen2.rope.freq_base", f32::NAN);
    }));
    assert_has(&e, &["rope_theta"]);
}

#[test]
fn bad_tokenizer_metadata() {
    let m = small_model();
    let e = load_err(&write_model_with(&m, |w| {
        w.set_u32("tokenizer.ggml.eos_token_id", 1_000_000);
    }));
    assert_has(&e, &["eos token id 1000000 is out of range"]);
    let e = load_err(&write_model_with(&m, |w| {
        w.set(
            "tokenizer.ggml.token_type",
            Value::Array(cubeqwen_loaders::ValueType::I32, vec![Value::I32(1)]),
        );
    }));
    assert_has(&e, &["1 token types for 16 tokens"]);
    let e = load_err(&write_model_with(&m, |w| {
        w.set_u32("tokenizer.ggml.tokens", 5);
    }));
    assert_has(
        &e,
        &["tokenizer.ggml.tokens", "expected an array of strings"],
    );
    // load_tokenizer_data reports the same.
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("tok.gguf");
    std::fs::write(
        &p,
        write_model_with(&m, |w| {
            w.set_u32("tokenizer.ggml.padding_token_id", 16);
        }),
    )
    .unwrap();
    let e = format!("{:#}", load_tokenizer_data(&p).unwrap_err());
    assert_has(&e, &["tok.gguf", "padding token id 16 is out of range"]);
}

#[test]
fn tensor_types_that_cannot_be_dequantized() {
    let m = small_model();
    // Replace ffn_down [16, 32] F16 by IQ4_NL raw data (block 32 elements, 18 bytes): parses,
    // but cannot be dequantized.
    let mut w = GgufWriter::new();
    cubeqwen_loaders::writer::set_model_metadata(&mut w, &m).unwrap();
    for (name, t) in &m.tensors {
        if name == "blk.0.ffn_down.weight" {
            w.add_raw(name, &t.shape, GgmlType::Iq4Nl, vec![1u8; 16 * 18])
                .unwrap();
            continue;
        }
        match &t.data {
            TensorData::F16(v) => w.add_f16(name, &t.shape, v).unwrap(),
            TensorData::F32(v) => w.add_f32(name, &t.shape, v).unwrap(),
        };
    }
    let e = load_err(&w.to_bytes().unwrap());
    assert_has(
        &e,
        &["blk.0.ffn_down.weight", "IQ4_NL", "cannot be dequantized"],
    );
}

#[test]
fn random_byte_corruption_never_panics() {
    // Deterministic corruption of the small valid file: any result is fine except a panic.
    let base = small_file_bytes();
    let mut rng = ChaCha8Rng::seed_from_u64(9);
    for _ in 0..3000 {
        let mut b = base.clone();
        for _ in 0..rng.random_range(1..5) {
            let i = rng.random_range(0..b.len().min(1200));
            b[i] = rng.random();
        }
        if let Ok(g) = GgufFile::from_bytes(&b) {
            let _ = cubeqwen_loaders::model_from_gguf(&g);
        }
    }
}

// ---- Hugging Face checkpoint directories ----

fn hf_dir() -> (tempfile::TempDir, PathBuf) {
    let t = tempfile::tempdir().unwrap();
    let d = t.path().join("ckpt");
    common::write_hf_dir(&small_model(), &d, 2, |_, n| {
        if n == 2 {
            Dtype::F16
        } else {
            Dtype::F32
        }
    });
    (t, d)
}

fn hf_err(dir: &Path) -> String {
    match load_model(dir) {
        Ok(_) => panic!("hostile checkpoint loaded"),
        Err(e) => format!("{e:#}"),
    }
}

fn shard(dir: &Path, i: usize) -> PathBuf {
    dir.join(format!("model-{:05}-of-00002.safetensors", i))
}

#[test]
fn hf_valid_dir_loads() {
    let (_t, d) = hf_dir();
    assert!(load_model(&d).unwrap().tensors == small_model().tensors);
}

#[test]
fn hf_bad_safetensors_headers() {
    // Header length beyond the file.
    let (_t, d) = hf_dir();
    let mut b = std::fs::read(shard(&d, 1)).unwrap();
    b[0..8].copy_from_slice(&u64::MAX.to_le_bytes());
    std::fs::write(shard(&d, 1), &b).unwrap();
    assert_has(
        &hf_err(&d),
        &["model-00001-of-00002.safetensors", "invalid safetensors"],
    );
    // Header not JSON.
    let (_t, d) = hf_dir();
    let mut b = std::fs::read(shard(&d, 2)).unwrap();
    b[8] = b'#';
    std::fs::write(shard(&d, 2), &b).unwrap();
    assert_has(
        &hf_err(&d),
        &["model-00002-of-00002.safetensors", "invalid safetensors"],
    );
    // Data cut short.
    let (_t, d) = hf_dir();
    let b = std::fs::read(shard(&d, 1)).unwrap();
    std::fs::write(shard(&d, 1), &b[..b.len() - 2]).unwrap();
    assert_has(
        &hf_err(&d),
        &["model-00001-of-00002.safetensors", "invalid safetensors"],
    );
    // Tiny file.
    let (_t, d) = hf_dir();
    std::fs::write(shard(&d, 1), [1u8, 0, 0]).unwrap();
    assert_has(&hf_err(&d), &["model-00001-of-00002.safetensors"]);
    // Header whose shape disagrees with its byte range (same header length: edit digits).
    let (_t, d) = hf_dir();
    let b = std::fs::read(shard(&d, 1)).unwrap();
    let n = u64::from_le_bytes(b[0..8].try_into().unwrap()) as usize;
    let header = String::from_utf8(b[8..8 + n].to_vec()).unwrap();
    let bad = header.replacen("\"shape\":[16]", "\"shape\":[17]", 1);
    assert_ne!(bad, header, "{header}");
    let mut nb = b[..8].to_vec();
    nb.extend(bad.as_bytes());
    nb.extend(&b[8 + n..]);
    std::fs::write(shard(&d, 1), &nb).unwrap();
    assert_has(
        &hf_err(&d),
        &["model-00001-of-00002.safetensors", "invalid safetensors"],
    );
}

#[test]
fn hf_bad_tensors_and_config() {
    let m = small_model();
    // Unsupported dtype.
    let t = tempfile::tempdir().unwrap();
    let d = t.path().join("c");
    common::write_hf_dir(&m, &d, 1, |_, _| Dtype::F32);
    let b = std::fs::read(d.join("model-00001-of-00001.safetensors")).unwrap();
    let n = u64::from_le_bytes(b[0..8].try_into().unwrap()) as usize;
    let header = String::from_utf8(b[8..8 + n].to_vec()).unwrap();
    let bad = header.replacen("\"F32\"", "\"I32\"", 1);
    let mut nb = b[..8].to_vec();
    nb.extend(bad.as_bytes());
    nb.extend(&b[8 + n..]);
    std::fs::write(d.join("model-00001-of-00001.safetensors"), &nb).unwrap();
    assert_has(&hf_err(&d), &["dtype I32", "supported: F32, F16, BF16"]);

    // Mis-shaped and missing tensors, via a modified model.
    let mut m2 = m.clone();
    m2.tensors.get_mut("blk.0.ffn_down.weight").unwrap().shape = vec![32, 16];
    let t = tempfile::tempdir().unwrap();
    common::write_hf_dir(&m2, t.path(), 1, |_, _| Dtype::F32);
    assert_has(
        &hf_err(t.path()),
        &["`blk.0.ffn_down.weight` has shape [32, 16], expected [16, 32]"],
    );
    let mut m3 = m.clone();
    m3.tensors.remove("blk.0.attn_v.bias");
    let t = tempfile::tempdir().unwrap();
    common::write_hf_dir(&m3, t.path(), 1, |_, _| Dtype::F32);
    assert_has(
        &hf_err(t.path()),
        &["missing required tensor `blk.0.attn_v.bias`"],
    );

    // Untied config without lm_head.
    let mut m4 = m.clone();
    m4.tensors.remove("output.weight");
    let t = tempfile::tempdir().unwrap();
    common::write_hf_dir(&m4, t.path(), 1, |_, _| Dtype::F32);
    std::fs::write(
        t.path().join("config.json"),
        common::hf_config_json(&m4, false),
    )
    .unwrap();
    assert_has(
        &hf_err(t.path()),
        &["no lm_head.weight", "tie_word_embeddings=false"],
    );

    // Other model types, missing / broken config.json, no shards.
    let (_t, d) = hf_dir();
    let cfg = std::fs::read_to_string(d.join("config.json")).unwrap();
    std::fs::write(d.join("config.json"), cfg.replace("\"qwen2\"", "\"llama\"")).unwrap();
    assert_has(
        &hf_err(&d),
        &["config.json", "model_type `llama` is not supported"],
    );
    std::fs::write(d.join("config.json"), "{\"model_type\": \"qwen2\"").unwrap();
    assert_has(&hf_err(&d), &["config.json", "bad config.json"]);
    std::fs::remove_file(d.join("config.json")).unwrap();
    assert_has(&hf_err(&d), &["cannot read", "config.json"]);
    let (_t, d) = hf_dir();
    std::fs::write(
        d.join("config.json"),
        cfg.replace("\"vocab_size\":16", "\"vocab_size\":17"),
    )
    .unwrap();
    assert_has(&hf_err(&d), &["vocab_size is 17"]);
    let (_t, d) = hf_dir();
    std::fs::remove_file(shard(&d, 1)).unwrap();
    std::fs::remove_file(shard(&d, 2)).unwrap();
    assert_has(&hf_err(&d), &["no *.safetensors files"]);

    // The same tensor in two shards; an unknown tensor.
    let (_t, d) = hf_dir();
    std::fs::copy(shard(&d, 1), d.join("model-extra.safetensors")).unwrap();
    assert_has(&hf_err(&d), &["is also in"]);
    let (_t, d) = hf_dir();
    let x = vec![0u8; 8];
    let view = safetensors::tensor::TensorView::new(Dtype::F32, vec![2], &x).unwrap();
    let bytes = safetensors::serialize([("model.vision.weight", view)], None).unwrap();
    std::fs::write(d.join("zz.safetensors"), bytes).unwrap();
    assert_has(
        &hf_err(&d),
        &["zz.safetensors", "unexpected tensor `model.vision.weight`"],
    );

    // A broken tokenizer.json.
    let (_t, d) = hf_dir();
    std::fs::write(
        d.join("tokenizer.json"),
        "{\"model\": {\"type\": \"BPE\", \"vocab\": {\"a\": 99999999}}}",
    )
    .unwrap();
    assert_has(&hf_err(&d), &["tokenizer.json", "far beyond"]);
    common::write_hf_tokenizer(&small_model(), &d);
    assert!(load_tokenizer_data(&d).is_ok());
    std::fs::write(
        d.join("config.json"),
        cfg.replace("\"vocab_size\":16", "\"vocab_size\":1000000000000"),
    )
    .unwrap();
    assert_has(
        &format!("{:#}", load_tokenizer_data(&d).unwrap_err()),
        &["vocab_size 1000000000000 is far beyond"],
    );
    std::fs::write(d.join("config.json"), &cfg).unwrap();
    std::fs::write(d.join("tokenizer.json"), "[").unwrap();
    assert_has(&hf_err(&d), &["tokenizer.json", "not valid JSON"]);
}

#[test]
fn missing_paths_are_named() {
    let e = format!(
        "{:#}",
        load_model(Path::new("/nonexistent/x.gguf")).unwrap_err()
    );
    assert_has(&e, &["/nonexistent/x.gguf"]);
    let e = format!(
        "{:#}",
        load_tokenizer_data(Path::new("/nonexistent/y.gguf")).unwrap_err()
    );
    assert_has(&e, &["/nonexistent/y.gguf"]);
    let t = tempfile::tempdir().unwrap();
    let e = format!("{:#}", load_model(t.path()).unwrap_err());
    assert_has(&e, &["config.json"]);
}
