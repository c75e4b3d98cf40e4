//! Times dequantization of the real model's tensors (f32 and f16 paths) and a full load.
//! Usage: cargo run --release -p cubeqwen-loaders --example bench_dequant -- MODEL.gguf
use cubeqwen_loaders::quant::{dequantize, dequantize_to_f16};
use cubeqwen_loaders::{load_model, GgufFile};
use std::time::Instant;

fn main() -> anyhow::Result<()> {
    let path = std::env::args()
        .nth(1)
        .expect("usage: bench_dequant MODEL.gguf");
    let g = GgufFile::open(path.as_ref())?;
    for name in [
        "token_embd.weight",
        "output.weight",
        "blk.0.ffn_down.weight",
        "blk.11.ffn_down.weight",
    ] {
        let t = g.tensor_info(name).unwrap();
        let n = t.n_elements() as usize;
        let mut a = vec![0f32; n];
        let s = Instant::now();
        dequantize(t.ty, g.tensor_bytes(t), &mut a)?;
        let f32_ms = s.elapsed().as_secs_f64() * 1e3;
        let mut b = vec![half::f16::ZERO; n];
        let s = Instant::now();
        dequantize_to_f16(t.ty, g.tensor_bytes(t), &mut b)?;
        let f16_ms = s.elapsed().as_secs_f64() * 1e3;
        println!("{name} {} {n}: to f32 {f32_ms:.1} ms ({:.2} ns/el), to f16 {f16_ms:.1} ms ({:.2} ns/el)",
            t.ty, f32_ms * 1e6 / n as f64, f16_ms * 1e6 / n as f64);
    }
    let s = Instant::now();
    let m = load_model(path.as_ref())?;
    println!(
        "load_model: {:.2} s, {} tensors",
        s.elapsed().as_secs_f64(),
        m.tensors.len()
    );
    Ok(())
}
