//! Writes seed inputs for the parse_gguf target: small valid qwen2 models and a file with every
//! metadata type.  Usage: cargo run --bin make_seeds -- corpus/parse_gguf
use cubeqwen_loaders::gguf::{Value, ValueType};
use cubeqwen_loaders::{random_qwen2, write_gguf_f16, GgmlType, GgufWriter, Qwen2Config};
use std::path::PathBuf;

fn main() -> anyhow::Result<()> {
    let dir = PathBuf::from(std::env::args().nth(1).unwrap_or("corpus/parse_gguf".into()));
    std::fs::create_dir_all(&dir)?;
    let c = Qwen2Config {
        hidden: 8,
        layers: 1,
        n_heads: 2,
        n_kv_heads: 1,
        head_dim: 4,
        ffn: 8,
        vocab: 8,
        rope_theta: 1e6,
        rms_eps: 1e-6,
        context_length: 64,
        tied_embeddings: true,
    };
    write_gguf_f16(&random_qwen2(&c, 1), &dir.join("tiny_tied.gguf"))?;
    let c2 = Qwen2Config { tied_embeddings: false, ..c };
    write_gguf_f16(&random_qwen2(&c2, 2), &dir.join("tiny_untied.gguf"))?;
    let mut w = GgufWriter::new();
    w.set("a", Value::U8(1)).set("b", Value::I8(-1)).set("c", Value::U16(2));
    w.set("d", Value::I16(-2)).set("e", Value::U32(3)).set("f", Value::I32(-3));
    w.set("g", Value::F32(0.5)).set("h", Value::Bool(true)).set("i", Value::String("s".into()));
    w.set("j", Value::U64(4)).set("k", Value::I64(-4)).set("l", Value::F64(0.25));
    w.set(
        "m",
        Value::Array(
            ValueType::Array,
            vec![Value::Array(ValueType::U8, vec![Value::U8(7)])],
        ),
    );
    w.set("general.alignment", Value::U32(16));
    let mut q = vec![0u8; 34];
    q[1] = 0x3c;
    q[2..].iter_mut().enumerate().for_each(|(i, b)| *b = i as u8);
    w.add_raw("q8", &[32], GgmlType::Q8_0, q)?;
    let mut k = vec![1u8; 144];
    k[1] = 0x3c;
    w.add_raw("q4k", &[256], GgmlType::Q4K, k)?;
    let mut k6 = vec![3u8; 210];
    k6[209] = 0x3c;
    w.add_raw("q6k", &[256], GgmlType::Q6K, k6)?;
    w.add_raw("q50", &[32], GgmlType::Q5_0, vec![0x11; 22])?;
    w.write(&dir.join("all_types.gguf"))?;
    Ok(())
}
