//! The code path the real model takes, on a model of its exact shape, against the f64
//! reference at every position.
//!
//! The real model cannot travel to the GPU machine, so this test builds one of its shape:
//! Qwen2.5-Coder-0.5B as its GGUF holds it (24 layers, hidden 896, 14 q heads on 2 kv heads,
//! head_dim 64, ffn 4864, vocab 151936, an untied lm_head `output.weight`), with random
//! weights (`random_qwen2`: peaked attention, so attention bugs show). The token ids are the
//! golden cases' (tests/data/golden.json: the real tokenizer's output, which CI checks in
//! golden_device, including the real special ids `<|im_start|>` and `<|im_end|>`). Each case
//! runs as generation runs it: the prompt prefilled in chunks of [`CHUNK`] (16-row matmuls:
//! the GEMV on CUDA, as a short prompt takes), then the golden greedy continuation decoded
//! token by token (GEMV); a last case runs every sequence back to back (611 tokens) in
//! 512-token chunks (two, through cubek on CUDA). The
//! logits at every position must match the reference's prefill of the same sequence.
//!
//! Sizes: with `CUBEQWEN_FULL_SHAPES=1` (the GPU runner) the real shape and every case; else
//! (CI on software Vulkan, where the real vocabulary's logits at 1222 positions take many
//! minutes) 2 layers of hidden 224 (14 q heads on 2 kv heads of 16), vocabulary 4096 (the ids
//! taken modulo it), the cases of at most 128 tokens, and the back-to-back case (199 tokens)
//! with 128-token chunks.
//! On CUDA the long chunks must resolve to cubek and the short ones to the GEMV, or the test
//! fails. Randomized: the seed is printed on failure; `CUBEQWEN_SEED=N` replays it.
#![allow(clippy::neg_cmp_op_on_partial_ord)] // `!(x <= tol)`: NaN must fail

use anyhow::{ensure, Result};
use cubecl::prelude::*;
use cubeqwen::forward::Session;
use cubeqwen::model::DeviceModel;
use cubeqwen::reference::RefModel;
use cubeqwen_kernels::matmul::{resolve_variant, MatmulVariant};
use cubeqwen_kernels::runtime::RuntimeJob;
use cubeqwen_kernels::testing::{fresh_seed, full_shapes, rel_err, run_test};
use cubeqwen_loaders::{qwen25_config, random_qwen2, small_gqa7_config, Qwen2Config};
use serde_json::Value;

/// Per-position relative logit error allowed at the CI size (2 layers). It grows with the
/// position (f16 q and k under peaked attention). Measured on wgpu (positions < 200): at most
/// 3.6e-3; at positions 410-440: 6.3e-3. About 3x.
const MAX_REL: f64 = 2e-2;
/// The same at the real shape (`CUBEQWEN_FULL_SHAPES=1`: 24 layers, on the GPU machine), where
/// the f16 rounding of 24 layers compounds. Measured on the H100 (2026-11-26, seed
/// 1795723009872919689): 4.4e-3 at position 28, 1.4e-2 at 93, 3.2e-2 at 342, 3.5e-2 at 582;
/// the chunked attention kernel instead of the flash one (`CUBEQWEN_NO_FLASH=1`) gave 3.0e-2
/// and 3.5e-2 at the same positions, so the growth is not the prefill attention's; a second
/// seed (with cubek prefill matmuls), 4.3e-2 at position 409. About 2.5x.
const MAX_REL_FULL: f64 = 1e-1;
/// Prefill chunk of the per-case runs: several chunks per prompt, each of more rows than one
/// (the GEMV of a short prompt on CUDA; the 512-token chunks take cubek's matmul).
const CHUNK: usize = 16;

fn config() -> Qwen2Config {
    let real = Qwen2Config {
        tied_embeddings: false,
        ..qwen25_config("0.5b").expect("a known shape")
    };
    if full_shapes() {
        real
    } else {
        small_gqa7_config(2, 4096, false)
    }
}

/// (name, prompt ids, golden greedy ids) of every golden case with a greedy run, the ids
/// modulo `vocab`.
fn cases(vocab: usize) -> Vec<(String, Vec<u32>, Vec<u32>)> {
    let golden: Value = serde_json::from_str(include_str!("data/golden.json")).unwrap();
    let ids = |v: &Value| -> Vec<u32> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| (x.as_u64().unwrap() % vocab as u64) as u32)
            .collect()
    };
    golden["cases"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c.get("greedy_ids").is_some())
        .map(|c| {
            (
                c["name"].as_str().unwrap().to_string(),
                ids(&c["prompt_ids"]),
                ids(&c["greedy_ids"]),
            )
        })
        .collect()
}

struct Production {
    seed: u64,
}

impl RuntimeJob for Production {
    /// Per case: name, positions, worst rel err and its position.
    type Output = Vec<(String, usize, f64, usize)>;
    fn run<R: Runtime>(self, client: ComputeClient<R>, device: &str) -> Result<Self::Output> {
        let cfg = config();
        let t0 = std::time::Instant::now();
        let host = random_qwen2(&cfg, self.seed);
        ensure!(
            host.tensors.contains_key("output.weight"),
            "the lm_head must be untied"
        );
        let reference = RefModel::new(&host)?;
        let full = full_shapes();
        let mut runs: Vec<(String, Vec<u32>, usize, usize)> = cases(cfg.vocab)
            .into_iter()
            .filter(|(_, p, g)| full || p.len() + g.len() <= 128)
            .map(|(name, prompt, greedy)| {
                let n = prompt.len();
                let seq = prompt.into_iter().chain(greedy).collect();
                (name, seq, n, CHUNK)
            })
            .collect();
        let all: Vec<u32> = runs.iter().flat_map(|r| r.1.clone()).collect();
        let long_chunk = if full { 512 } else { 128 };
        ensure!(all.len() > long_chunk, "the long case must span two chunks");
        runs.push((
            "back to back".into(),
            all.clone(),
            all.len() - 8,
            long_chunk,
        ));
        let ctx = all.len();
        let model = DeviceModel::upload(&client, &host, ctx)?;
        drop(host);
        println!(
            "{} layers, hidden {}, vocab {} on {device}; model built in {:.1?}",
            cfg.layers,
            cfg.hidden,
            cfg.vocab,
            t0.elapsed()
        );

        // On CUDA the long chunks must take the tensor-core path (cubek) and the short ones
        // the tensor-core GEMV, as the real model's prompts do.
        let long = resolve_variant(
            &client,
            MatmulVariant::Auto,
            long_chunk,
            cfg.ffn,
            cfg.hidden,
        );
        let short = resolve_variant(&client, MatmulVariant::Auto, CHUNK, cfg.hidden, cfg.hidden);
        if std::env::var("CUBEQWEN_TEST_DEVICE").is_ok_and(|d| d == "cuda") {
            ensure!(
                long == MatmulVariant::Cubek && short == MatmulVariant::GemvMma,
                "on CUDA a {long_chunk}-row prefill chunk resolves to {long:?} (not Cubek) or a \
                 {CHUNK}-row one to {short:?} (not GemvMma)"
            );
        }

        let mut out = Vec::new();
        for (name, seq, prompt_len, chunk) in runs {
            let t = std::time::Instant::now();
            let mut session = Session::new(&client, &model, ctx)?;
            session.prefill_chunk = chunk;
            let vocab = cfg.vocab;
            let mut got: Vec<Vec<f32>> = session
                .forward_all(&client, &seq[..prompt_len], None)?
                .chunks_exact(vocab)
                .map(<[f32]>::to_vec)
                .collect();
            for &id in &seq[prompt_len..] {
                got.push(session.forward(&client, &[id], None)?.to_vec(&client)?);
            }
            let device_time = t.elapsed();
            let want = reference.forward(&mut reference.new_cache(), &seq, 0)?;
            let mut worst = (0.0f64, 0);
            for (p, (g, w)) in got.iter().zip(&want).enumerate() {
                let g: Vec<f64> = g.iter().map(|&v| v as f64).collect();
                let e = rel_err(&g, w);
                if !(e <= worst.0) {
                    worst = (e, p);
                }
            }
            println!(
                "{name}: {} positions ({prompt_len} prefilled in chunks of {chunk}; {} decoded), worst logit rel err {:.3e} at position {} (device {device_time:.1?}, reference {:.1?})",
                seq.len(),
                seq.len() - prompt_len,
                worst.0,
                worst.1,
                t.elapsed() - device_time
            );
            out.push((name, seq.len(), worst.0, worst.1));
        }
        Ok(out)
    }
}

#[test]
fn golden_prompts_on_the_real_shape_match_the_reference_at_every_position() {
    let seed = fresh_seed();
    println!("seed {seed}");
    let max_rel = if full_shapes() { MAX_REL_FULL } else { MAX_REL };
    for (name, n, e, p) in run_test(Production { seed }) {
        assert!(
            e <= max_rel,
            "{name}: logit rel err {e:.3e} > {max_rel:.0e} at position {p} of {n} (seed {seed}; replay with CUBEQWEN_SEED={seed})"
        );
    }
}
