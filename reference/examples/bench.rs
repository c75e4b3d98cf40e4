//! Speed of the reference on random weights.
//!
//! `cargo run --release -p cubeqwen-reference --example bench -- [toy|0.5b] [prompt] [new]`
//! `0.5b` builds a random model with the Qwen2.5-0.5B shapes (d 896, 24 layers, 14/2 heads,
//! ffn 4864, vocab 151936, separate output.weight) and times a prefill plus greedy decode.

use std::time::Instant;

use cubeqwen_reference::toy::{toy_config, toy_model};
use cubeqwen_reference::{greedy, RefModel};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let which = args.first().map(String::as_str).unwrap_or("toy");
    let prompt_len: usize = args.get(1).map_or(Ok(45), |s| s.parse())?;
    let new: usize = args.get(2).map_or(Ok(20), |s| s.parse())?;
    let config = match which {
        "toy" => toy_config(3, 6, 2, false),
        "0.5b" => cubeqwen_loaders::Qwen2Config {
            hidden: 896,
            layers: 24,
            n_heads: 14,
            n_kv_heads: 2,
            head_dim: 64,
            ffn: 4864,
            vocab: 151936,
            ..toy_config(24, 14, 2, false)
        },
        other => anyhow::bail!("unknown model `{other}` (toy | 0.5b)"),
    };
    let t = Instant::now();
    let host = toy_model(&config, 1);
    let model = RefModel::new(&host)?;
    drop(host);
    println!("{which}: built in {:.2?}", t.elapsed());
    let prompt: Vec<u32> = (0..prompt_len as u32)
        .map(|i| (i * 7919 + 13) % config.vocab as u32)
        .collect();

    let t = Instant::now();
    let mut cache = model.new_cache();
    model.forward(&mut cache, &prompt, 0)?;
    let prefill = t.elapsed();
    let t = Instant::now();
    let (ids, _) = greedy(&model, &prompt, new, &[])?;
    let total = t.elapsed();
    let decode = total.saturating_sub(prefill);
    println!(
        "{which}: prefill {prompt_len} tokens {prefill:.2?} ({:.1} tok/s); greedy {prompt_len}+{} tokens {total:.2?} \
         (decode ≈ {:.2} tok/s)",
        prompt_len as f64 / prefill.as_secs_f64(),
        ids.len(),
        (ids.len().saturating_sub(1)) as f64 / decode.as_secs_f64()
    );
    Ok(())
}
