//! Rough timings: `cargo run --release --example bench` (tokenizer part needs /tmp/tokdata.json).
use std::time::Instant;
use textgen_dev::sampling::{Sampler, SamplingParams};

fn main() {
    tokenizer_timings();
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

fn tokenizer_timings() {
    let Ok(text) = std::fs::read_to_string("/tmp/tokdata.json") else {
        println!("no /tmp/tokdata.json: skipping tokenizer timings");
        return;
    };
    let j: serde_json::Value = serde_json::from_str(&text).unwrap();
    let strings = |k: &str| -> Vec<String> {
        j[k].as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap().to_string())
            .collect()
    };
    let data = cubeqwen_loaders::TokenizerData {
        model: j["model"].as_str().unwrap().into(),
        pre: j["pre"].as_str().unwrap().into(),
        tokens: strings("tokens"),
        token_types: j["token_type"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_i64().unwrap() as i32)
            .collect(),
        merges: strings("merges"),
        eos_id: j["eos_id"].as_u64().map(|v| v as u32),
        chat_template: j["chat_template"].as_str().map(str::to_string),
        ..Default::default()
    };
    let t = Instant::now();
    let tok = textgen_dev::tokenizer::Tokenizer::from_data(&data).unwrap();
    println!(
        "Tokenizer::from_data           {:8.1} ms",
        t.elapsed().as_secs_f64() * 1e3
    );
    let t = Instant::now();
    let tmpl = textgen_dev::chat::ChatTemplate::from_data(&data).unwrap();
    let prompt = "The history of computing is a story of abstraction. ".repeat(40);
    let rendered = tmpl
        .render(&[textgen_dev::chat::ChatMessage::user(prompt)], true)
        .unwrap();
    println!(
        "chat template compile+render   {:8.1} ms",
        t.elapsed().as_secs_f64() * 1e3
    );
    let t = Instant::now();
    let ids = tok.encode(&rendered).unwrap();
    println!(
        "encode {} chars -> {} ids      {:8.1} ms",
        rendered.len(),
        ids.len(),
        t.elapsed().as_secs_f64() * 1e3
    );
    let t = Instant::now();
    let mut dec = tok.stream_decoder();
    let mut n = 0;
    for &i in &ids {
        n += dec.push(i).unwrap().len();
    }
    println!(
        "stream decode {} ids ({n} B)     {:8.1} us/id",
        ids.len(),
        t.elapsed().as_secs_f64() * 1e6 / ids.len() as f64
    );
}
