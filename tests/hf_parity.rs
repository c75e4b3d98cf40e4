//! `cubeqwen hf-parity` on a small random model whose "transformers" outputs are the f64
//! reference's (the real transformers run is on the GPU machine, `stage/run-gpu.sh hf`): a
//! clean directory passes, and a single NaN in the expected logits fails at once, naming its
//! position, however good the positions after it are.
//!
//! Randomized: the seed is printed first; `CUBEQWEN_SEED=N` replays it.

use std::path::Path;

use anyhow::{ensure, Result};
use cubecl::prelude::*;
use cubeqwen::reference::{greedy, RefModel};
use cubeqwen_kernels::runtime::RuntimeJob;
use cubeqwen_kernels::testing::{fresh_seed, run_test};
use cubeqwen_loaders::{random_qwen2, small_gqa7_config, write_gguf_f16, Qwen2Config};
use safetensors::{tensor::TensorView, Dtype};

const PROMPT: usize = 12;
const STEPS: usize = 6;

fn config() -> Qwen2Config {
    small_gqa7_config(2, 512, true)
}

/// Writes `dir/model` (GGUF) and `dir/reference.safetensors` as scripts/hf_reference.py
/// lays them out, with the f64 reference's logits; `poison` sets one logit (position,
/// column) to NaN.
/// `yardstick` writes that value as transformers' f16 error at every position.
fn write_dir(
    dir: &Path,
    seed: u64,
    poison: Option<(usize, usize)>,
    yardstick: Option<f32>,
) -> Result<()> {
    let cfg = config();
    let host = random_qwen2(&cfg, seed);
    write_gguf_f16(&host, &dir.join("model"))?;
    let ids: Vec<u32> = (0..PROMPT as u32).map(|i| (i * 41 + 3) % 512).collect();
    let reference = RefModel::new(&host)?;
    let mut logits: Vec<f32> = reference
        .forward(&mut reference.new_cache(), &ids, 0)?
        .iter()
        .flatten()
        .map(|&v| v as f32)
        .collect();
    if let Some((p, c)) = poison {
        logits[p * cfg.vocab + c] = f32::NAN;
    }
    let (greedy_ids, margins) = greedy(&reference, &ids, STEPS, &[])?;
    let i64s =
        |v: &[u32]| -> Vec<u8> { v.iter().flat_map(|&x| (x as i64).to_le_bytes()).collect() };
    let f32s = |v: &[f32]| -> Vec<u8> { v.iter().flat_map(|x| x.to_le_bytes()).collect() };
    let margins: Vec<f32> = margins.iter().map(|&m| m as f32).collect();
    let (a, b, c, d) = (i64s(&ids), f32s(&logits), i64s(&greedy_ids), f32s(&margins));
    let y = yardstick.map(|v| f32s(&[v; PROMPT]));
    let mut extra = Vec::new();
    if let Some(y) = &y {
        for name in ["yardstick_f16", "yardstick_f16_weights"] {
            extra.push((name, TensorView::new(Dtype::F32, vec![PROMPT], y)?));
        }
    }
    let bytes = safetensors::serialize(
        [
            ("input_ids", TensorView::new(Dtype::I64, vec![PROMPT], &a)?),
            (
                "logits",
                TensorView::new(Dtype::F32, vec![PROMPT, cfg.vocab], &b)?,
            ),
            ("greedy_ids", TensorView::new(Dtype::I64, vec![STEPS], &c)?),
            (
                "greedy_margins",
                TensorView::new(Dtype::F32, vec![STEPS], &d)?,
            ),
        ]
        .into_iter()
        .chain(extra),
        None,
    )?;
    std::fs::write(dir.join("reference.safetensors"), bytes)?;
    Ok(())
}

struct Parity {
    seed: u64,
    poison: Option<(usize, usize)>,
    yardstick: Option<f32>,
}

impl RuntimeJob for Parity {
    /// The report and whether it passed, or the error's text.
    type Output = std::result::Result<(String, bool), String>;
    fn run<R: Runtime>(self, client: ComputeClient<R>, _device: &str) -> Result<Self::Output> {
        let dir = std::env::temp_dir().join(format!(
            "cubeqwen-hf-parity-{}-{}-{}-{}",
            std::process::id(),
            self.seed,
            self.poison.is_some(),
            self.yardstick.is_some()
        ));
        std::fs::create_dir_all(&dir)?;
        write_dir(&dir, self.seed, self.poison, self.yardstick)?;
        let out = cubeqwen::hf_parity::run(&client, &dir, None).map_err(|e| format!("{e:#}"));
        std::fs::remove_dir_all(&dir)?;
        ensure!(!dir.exists());
        Ok(out)
    }
}

#[test]
fn a_clean_directory_passes() {
    let seed = fresh_seed();
    println!("seed {seed} (replay with CUBEQWEN_SEED={seed})");
    for yardstick in [None, Some(5e-3)] {
        let (report, ok) = run_test(Parity {
            seed,
            poison: None,
            yardstick,
        })
        .expect("hf-parity ran");
        println!("{report}");
        assert!(ok && report.ends_with("PASS"), "seed {seed}:\n{report}");
    }
}

/// The yardstick is the limit: transformers in f16 closer to its f32 logits than the engine is
/// (here 1e-9 per position) fails the check.
#[test]
fn an_engine_worse_than_the_yardstick_fails() {
    let seed = fresh_seed();
    println!("seed {seed} (replay with CUBEQWEN_SEED={seed})");
    let (report, ok) = run_test(Parity {
        seed,
        poison: None,
        yardstick: Some(1e-9),
    })
    .expect("hf-parity ran");
    println!("{report}");
    assert!(
        !ok && report.ends_with("FAIL") && report.contains("transformers with the model in f16"),
        "seed {seed}:\n{report}"
    );
}

#[test]
fn one_nan_fails_at_once_with_its_position() {
    let seed = fresh_seed();
    println!("seed {seed} (replay with CUBEQWEN_SEED={seed})");
    // Position 3 of 12: every position after it is finite and good.
    let err = run_test(Parity {
        seed,
        poison: Some((3, 7)),
        yardstick: None,
    })
    .expect_err("a NaN logit must fail hf-parity");
    assert!(
        err.contains("position 3, column 7"),
        "seed {seed}: the error does not name the NaN: {err}"
    );
}
