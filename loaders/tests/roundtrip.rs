//! Writer ↔ reader round trips on small synthetic models and hand-built GGUF files.

use cubeqwen_loaders::gguf::{Value, ValueType};
use cubeqwen_loaders::{
    convert_to_f16, inspect, load_model, load_tokenizer_data, random_qwen2, tiny_config,
    write_gguf_f16, GgmlType, GgufFile, GgufWriter, HostModel, Qwen2Config, TensorData,
};
use half::f16;

fn untied() -> Qwen2Config {
    Qwen2Config {
        tied_embeddings: false,
        ..tiny_config()
    }
}

fn round_trip(m: &HostModel) -> HostModel {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("m.gguf");
    write_gguf_f16(m, &p).unwrap();
    load_model(&p).unwrap()
}

#[test]
fn tiny_tied_model_round_trips_exactly() {
    let m = random_qwen2(&tiny_config(), 7);
    assert!(!m.tensors.contains_key("output.weight"));
    assert_eq!(m.tensors.len(), 2 + 2 * 12);
    let back = round_trip(&m);
    assert_eq!(back.config, m.config);
    assert_eq!(back.tokenizer, m.tokenizer);
    assert_eq!(back.tensors, m.tensors);
    assert!(back.config.tied_embeddings);
}

#[test]
fn untied_model_with_specials_and_odd_head_dim_round_trips() {
    // head_dim != hidden / heads exercises qwen2.attention.key_length.
    let c = Qwen2Config {
        hidden: 96,
        layers: 3,
        n_heads: 4,
        n_kv_heads: 1,
        head_dim: 32,
        ffn: 160,
        vocab: 300,
        rope_theta: 123456.0,
        rms_eps: 1e-5,
        context_length: 777,
        tied_embeddings: false,
    };
    let m = random_qwen2(&c, 99);
    assert_eq!(m.tensor("blk.2.attn_q.weight").unwrap().shape, [128, 96]);
    assert_eq!(
        m.tensor("blk.2.attn_output.weight").unwrap().shape,
        [96, 128]
    );
    assert_eq!(m.tokenizer.tokens.len(), 300);
    assert_eq!(m.tokenizer.eos_id, Some(299));
    assert!(m.tokenizer.merges.len() > 30);
    let back = round_trip(&m);
    assert!(back == m);
}

#[test]
fn seeds_give_different_models_and_same_seed_the_same() {
    let a = random_qwen2(&tiny_config(), 1);
    let b = random_qwen2(&tiny_config(), 2);
    assert!(a != b);
    assert!(a == random_qwen2(&tiny_config(), 1));
    // Values are spread, not constant.
    let v = a.tensor("blk.0.ffn_up.weight").unwrap().data.to_f32();
    let mean = v.iter().sum::<f32>() / v.len() as f32;
    let var = v.iter().map(|x| (x - mean).powi(2)).sum::<f32>() / v.len() as f32;
    assert!(var > 1e-4, "variance {var}");
}

#[test]
fn a_changed_value_is_detected_after_round_trip() {
    let m = random_qwen2(&untied(), 3);
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("m.gguf");
    write_gguf_f16(&m, &p).unwrap();
    let at = GgufFile::open(&p)
        .unwrap()
        .tensor_info("blk.1.attn_v.bias")
        .unwrap()
        .file_offset as usize;
    let mut bytes = std::fs::read(&p).unwrap();
    bytes[at + 5] ^= 0x40;
    std::fs::write(&p, &bytes).unwrap();
    assert!(load_model(&p).unwrap() != m);
}

#[test]
fn f32_matrices_are_written_as_f16_and_1d_as_f32() {
    let mut m = random_qwen2(&tiny_config(), 5);
    let up = m.tensors.get_mut("blk.1.ffn_up.weight").unwrap();
    let f32s: Vec<f32> = up.data.to_f32().iter().map(|x| x * 1.000_01).collect();
    up.data = TensorData::F32(f32s.clone());
    let back = round_trip(&m);
    let got = &back.tensor("blk.1.ffn_up.weight").unwrap().data;
    let want: Vec<f16> = f32s.iter().map(|&x| f16::from_f32(x)).collect();
    assert_eq!(got, &TensorData::F16(want));
    assert!(matches!(
        back.tensor("blk.1.attn_q.bias").unwrap().data,
        TensorData::F32(_)
    ));
}

#[test]
fn every_metadata_type_round_trips_with_alignment_and_raw_tensors() {
    let nested = Value::Array(
        ValueType::Array,
        vec![
            Value::Array(ValueType::I16, vec![Value::I16(-3), Value::I16(4)]),
            Value::Array(ValueType::String, vec![Value::String("x y".into())]),
            Value::Array(ValueType::F64, vec![]),
        ],
    );
    let kvs = vec![
        ("a.u8", Value::U8(200)),
        ("a.i8", Value::I8(-100)),
        ("a.u16", Value::U16(60000)),
        ("a.i16", Value::I16(-30000)),
        ("a.u32", Value::U32(4_000_000_000)),
        ("a.i32", Value::I32(-2_000_000_000)),
        ("a.f32", Value::F32(-1.5e-7)),
        ("a.bool", Value::Bool(true)),
        ("a.str", Value::String("héllo\n\u{1F600}".into())),
        ("a.u64", Value::U64(u64::MAX - 1)),
        ("a.i64", Value::I64(i64::MIN + 1)),
        ("a.f64", Value::F64(std::f64::consts::PI)),
        ("a.nested", nested),
        ("general.alignment", Value::U32(64)),
    ];
    // A Q8_0 block passed through as raw bytes, and an F32 and an F16 tensor.
    let mut q8 = f16::from_f32(0.125).to_bits().to_le_bytes().to_vec();
    q8.extend((0..32).map(|i| (i * 5) as u8));
    let f32s = [1.0f32, -2.0, 3.5];
    let f16s: Vec<f16> = [0.5f32, 0.25, -8.0, 1e-3, 7.0, 9.0]
        .iter()
        .map(|&x| f16::from_f32(x))
        .collect();
    let mut w = GgufWriter::new();
    for (k, v) in &kvs {
        w.set(k, v.clone());
    }
    w.add_f32("t.f32", &[3], &f32s).unwrap();
    w.add_raw("t.q8", &[1, 32], GgmlType::Q8_0, q8.clone())
        .unwrap();
    w.add_f16("t.f16", &[2, 3], &f16s).unwrap();
    let bytes = w.to_bytes().unwrap();
    let g = GgufFile::from_bytes(&bytes).unwrap();
    assert_eq!(g.version, 3);
    assert_eq!(g.alignment, 64);
    assert_eq!(g.data_offset % 64, 0);
    let got: Vec<(String, Value)> = g.metadata().to_vec();
    let want: Vec<(String, Value)> = kvs
        .iter()
        .map(|(k, v)| (k.to_string(), v.clone()))
        .collect();
    assert_eq!(got, want);
    assert_eq!(g.get_u32("a.u8").unwrap(), Some(200));
    assert!(
        g.get_u32("a.i8").is_err(),
        "negative value as u32 must be an error"
    );
    assert_eq!(g.get_str("a.str").unwrap(), Some("héllo\n\u{1F600}"));
    assert!(g.get_str("a.u8").is_err());
    assert_eq!(g.get_u32("missing").unwrap(), None);
    let names: Vec<&str> = g.tensors().iter().map(|t| t.name.as_str()).collect();
    assert_eq!(names, ["t.f32", "t.q8", "t.f16"]);
    for t in g.tensors() {
        assert_eq!(t.offset % 64, 0, "{}", t.name);
    }
    let q = g.tensor_info("t.q8").unwrap();
    assert_eq!(q.ty, GgmlType::Q8_0);
    assert_eq!(q.ne, [32, 1]);
    assert_eq!(g.tensor_bytes(q), &q8[..]);
    let h = g.tensor_info("t.f16").unwrap();
    assert_eq!(h.ne, [3, 2]);
    assert_eq!(h.shape(), [2, 3]);
    let mut out = [0f32; 6];
    cubeqwen_loaders::dequantize(h.ty, g.tensor_bytes(h), &mut out).unwrap();
    assert_eq!(
        out,
        [0.5, 0.25, -8.0, f16::from_f32(1e-3).to_f32(), 7.0, 9.0]
    );
    let f = g.tensor_info("t.f32").unwrap();
    assert_eq!(g.tensor_bytes(f).len(), 12);
    assert_eq!(&g.tensor_bytes(f)[4..8], &(-2.0f32).to_le_bytes());
}

#[test]
fn tokenizer_data_is_read_from_metadata_alone() {
    let m = random_qwen2(&untied(), 11);
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("m.gguf");
    write_gguf_f16(&m, &p).unwrap();
    let t = load_tokenizer_data(&p).unwrap();
    assert_eq!(t, m.tokenizer);
    assert_eq!(t.tokens.len(), 256);
    // Cutting the tensor data off makes the file invalid for every reader.
    let g = GgufFile::open(&p).unwrap();
    let cut = g.data_offset as usize;
    drop(g);
    let bytes = std::fs::read(&p).unwrap();
    std::fs::write(&p, &bytes[..cut + 1]).unwrap();
    assert!(load_model(&p).is_err());
    assert!(load_tokenizer_data(&p).is_err());
}

#[test]
fn convert_to_f16_keeps_metadata_and_values() {
    let m = random_qwen2(&untied(), 21);
    let dir = tempfile::tempdir().unwrap();
    // A source with a Q8_0 tensor and extra metadata.
    let src = dir.path().join("src.gguf");
    let mut w = GgufWriter::new();
    w.set_str("general.name", "tiny test");
    w.set_u32("general.quantization_version", 2);
    w.set_str("custom.key", "kept");
    cubeqwen_loaders::writer::set_model_metadata(&mut w, &m).unwrap();
    let mut q8_bytes = Vec::new();
    let mut expected_up = m.clone();
    for (name, t) in &m.tensors {
        if name == "blk.0.ffn_up.weight" {
            // Quantize crudely to Q8_0 with scale 1/64 per block.
            let v = t.data.to_f32();
            let mut deq = Vec::new();
            for blk in v.chunks(32) {
                q8_bytes.extend(f16::from_f32(1.0 / 64.0).to_bits().to_le_bytes());
                for x in blk {
                    let q = (x * 64.0).round().clamp(-127.0, 127.0) as i8;
                    q8_bytes.push(q as u8);
                    deq.push(f16::from_f32(q as f32 / 64.0));
                }
            }
            expected_up.tensors.get_mut(name).unwrap().data = TensorData::F16(deq);
            w.add_raw(name, &t.shape, GgmlType::Q8_0, q8_bytes.clone())
                .unwrap();
        } else {
            match &t.data {
                TensorData::F16(v) => w.add_f16(name, &t.shape, v).unwrap(),
                TensorData::F32(v) => w.add_f32(name, &t.shape, v).unwrap(),
            };
        }
    }
    w.write(&src).unwrap();
    let dst = dir.path().join("dst.gguf");
    convert_to_f16(&src, &dst).unwrap();
    let g = GgufFile::open(&dst).unwrap();
    assert_eq!(g.get_str("general.name").unwrap(), Some("tiny test"));
    assert_eq!(g.get_str("custom.key").unwrap(), Some("kept"));
    assert_eq!(g.get_u32("general.quantization_version").unwrap(), None);
    assert_eq!(g.get_u32("general.file_type").unwrap(), Some(1));
    assert_eq!(
        g.tensor_info("blk.0.ffn_up.weight").unwrap().ty,
        GgmlType::F16
    );
    assert_eq!(
        g.tensor_info("blk.0.attn_q.bias").unwrap().ty,
        GgmlType::F32
    );
    let back = load_model(&dst).unwrap();
    assert!(back == expected_up);
    assert!(
        back != m,
        "the Q8_0 tensor must differ from the unquantized original"
    );
}

#[test]
fn inspect_reports_config_tokenizer_and_tensors() {
    let m = random_qwen2(&untied(), 4);
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("m.gguf");
    write_gguf_f16(&m, &p).unwrap();
    let s = inspect(&p).unwrap();
    for want in [
        "GGUF v3",
        "architecture: qwen2",
        "hidden 64, layers 2, heads 4, kv heads 2, head_dim 16, ffn 128, vocab 256",
        "tied embeddings false",
        "model \"gpt2\", pre \"qwen2\", 256 tokens",
        "chat template absent",
        "blk.1.ffn_down.weight",
        "[64, 128]",
        "16384", // 64 * 128 * 2 bytes
        "F16",
    ] {
        assert!(s.contains(want), "missing {want:?} in:\n{s}");
    }
}
