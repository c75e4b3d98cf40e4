//! Rough timings: `cargo run --release --example bench` (tokenizer part needs /tmp/tokdata.json).
use std::time::Instant;
use textgen_dev::sampling::{Sampler, SamplingParams};

fn main() {
    let n = 151_936;
    let logits: Vec<f32> = (0..n as u32)
        .map(|i| ((i.wrapping_mul(2654435761) % 100_003) as f32) / 10_000.0 - 5.0)
        .collect();
    let history: Vec<u32> = (0..200).map(|i| i * 700).collect();
    let cases = [
        ("greedy", SamplingParams::greedy()),
        ("default (k40 p.95 minp.05)", SamplingParams::default()),
        (
            "top_p 0.95 only",
            SamplingParams {
                top_k: 0,
                min_p: 0.0,
                ..Default::default()
            },
        ),
        (
            "temperature only",
            SamplingParams {
                top_k: 0,
                top_p: 1.0,
                min_p: 0.0,
                ..Default::default()
            },
        ),
        (
            "default + repeat penalty 1.1",
            SamplingParams {
                repeat_penalty: 1.1,
                ..Default::default()
            },
        ),
    ];
    for (name, p) in cases {
        let mut s = Sampler::new(p).unwrap();
        let iters = 200;
        let t = Instant::now();
        let mut acc = 0u64;
        for _ in 0..iters {
            acc += s.sample(&logits, &history) as u64;
        }
        let dt = t.elapsed().as_secs_f64() / iters as f64;
        println!("{name:32} {:8.1} us/token  ({acc})", dt * 1e6);
    }
}
