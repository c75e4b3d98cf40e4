#![allow(dead_code)]
//! Golden checks of the reference on the real Qwen2.5-Coder-0.5B-Instruct model, shared by
//! `tests/reference_golden.rs` (which loads the model with `cubeqwen_loaders::load_model`).
//!
//! Data (copied from the project's golden set, see `data/golden_cases.txt`): prompt ids,
//! per-position prompt argmax, greedy ids and greedy top-2 margins for the `france` and
//! `haiku_seventeen` cases, and the 151936 f32 last-position logits of `france`.

use std::time::Instant;

use anyhow::{ensure, Context, Result};
use cubeqwen::reference::{argmax, greedy, top2, RefModel};

/// Greedy steps are compared up to (not including) the first step whose golden top-2 margin
/// is below this: there the oracle's and our rounding may legitimately pick differently.
pub const MARGIN_TRUST: f64 = 0.1;
/// Allowed relative L2 error of the france last-position logits.
pub const MAX_REL_L2: f64 = 1e-2;
/// Stop ids (`<|im_end|>`, `<|endoftext|>`).
pub const EOS: [u32; 2] = [151645, 151643];

#[derive(Debug, Default, Clone)]
pub struct Case {
    pub name: String,
    pub prompt_ids: Vec<u32>,
    pub prompt_argmax: Vec<u32>,
    pub greedy_ids: Vec<u32>,
    pub step_margin: Vec<f64>,
}

pub fn cases() -> Vec<Case> {
    let mut out: Vec<Case> = Vec::new();
    for line in include_str!("../data/golden_cases.txt").lines() {
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let (key, rest) = line.split_once(' ').expect("`key values` line");
        if key == "case" {
            out.push(Case {
                name: rest.to_string(),
                ..Case::default()
            });
            continue;
        }
        let c = out.last_mut().expect("a case line first");
        let ints = || {
            rest.split_whitespace()
                .map(|s| s.parse::<u32>().unwrap())
                .collect()
        };
        match key {
            "prompt_ids" => c.prompt_ids = ints(),
            "prompt_argmax" => c.prompt_argmax = ints(),
            "greedy_ids" => c.greedy_ids = ints(),
            "step_margin" => {
                c.step_margin = rest
                    .split_whitespace()
                    .map(|s| s.parse().unwrap())
                    .collect()
            }
            _ => panic!("unknown key {key}"),
        }
    }
    out
}

pub fn france_last_logits() -> Vec<f32> {
    include_bytes!("../data/france.last_logits.f32")
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

fn rel_l2(a: &[f64], b: &[f32]) -> f64 {
    let num: f64 = a.iter().zip(b).map(|(x, &y)| (x - y as f64).powi(2)).sum();
    let den: f64 = b.iter().map(|&y| (y as f64).powi(2)).sum();
    (num / den).sqrt()
}

/// Runs every golden check on `model`, printing what it measures; errors on the first
/// failed check (after printing all measurements of that case).
pub fn check_all(model: &RefModel) -> Result<()> {
    for case in cases() {
        check_case(model, &case).with_context(|| format!("golden case `{}`", case.name))?;
    }
    Ok(())
}

pub fn check_case(model: &RefModel, case: &Case) -> Result<()> {
    let name = &case.name;
    let t = Instant::now();
    let logits = model.forward(&mut model.new_cache(), &case.prompt_ids, 0)?;
    let prefill = t.elapsed();
    println!(
        "[{name}] prefill of {} tokens: {prefill:.2?}",
        case.prompt_ids.len()
    );

    // Prompt argmax at every position. At a position where our own top-2 margin is below
    // MARGIN_TRUST a different pick is reported but tolerated.
    let mut mismatches = Vec::new();
    for (p, (row, &want)) in logits.iter().zip(&case.prompt_argmax).enumerate() {
        let (got, a, b) = top2(row).context("NaN logits")?;
        if got as u32 != want {
            mismatches.push((p, got, want, a - b));
        }
    }
    println!("[{name}] prompt argmax mismatches (pos, ours, golden, our margin): {mismatches:?}");
    ensure!(
        mismatches.iter().all(|m| m.3 < MARGIN_TRUST),
        "prompt argmax differs at a confident position: {mismatches:?}"
    );
    if name == "france" {
        ensure!(
            mismatches.is_empty(),
            "france prompt argmax must match everywhere"
        );
        let golden = france_last_logits();
        let last = logits.last().unwrap();
        ensure!(
            last.len() == golden.len(),
            "vocab {} vs golden {}",
            last.len(),
            golden.len()
        );
        let e = rel_l2(last, &golden);
        let max_abs = last
            .iter()
            .zip(&golden)
            .map(|(x, &y)| (x - y as f64).abs())
            .fold(0.0, f64::max);
        println!(
            "[{name}] last-position logits: relative L2 error {e:.3e}, max abs diff {max_abs:.3e}"
        );
        ensure!(e <= MAX_REL_L2, "relative L2 error {e:e} > {MAX_REL_L2:e}");
        ensure!(
            argmax(last) == Some(golden_argmax(&golden)),
            "last argmax differs"
        );
    }

    let t = Instant::now();
    let (ids, margins) = greedy(model, &case.prompt_ids, case.greedy_ids.len(), &EOS)?;
    let dt = t.elapsed();
    let n_tok = case.prompt_ids.len() + ids.len();
    println!(
        "[{name}] greedy {}+{} tokens: {dt:.2?} ({:.2} tokens/s overall)",
        case.prompt_ids.len(),
        ids.len(),
        n_tok as f64 / dt.as_secs_f64()
    );
    let trusted = case
        .step_margin
        .iter()
        .position(|&m| m < MARGIN_TRUST)
        .unwrap_or(case.greedy_ids.len());
    let agree = ids
        .iter()
        .zip(&case.greedy_ids)
        .take_while(|(a, b)| a == b)
        .count();
    println!(
        "[{name}] greedy: {agree} of {} steps equal (must: first {trusted}); ours {ids:?}",
        case.greedy_ids.len()
    );
    println!(
        "[{name}] our margins {:?}",
        margins
            .iter()
            .map(|m| (m * 1e4).round() / 1e4)
            .collect::<Vec<_>>()
    );
    ensure!(
        agree >= trusted,
        "greedy ids differ at step {agree}, before the first low-margin step {trusted}"
    );
    Ok(())
}

fn golden_argmax(v: &[f32]) -> usize {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    best
}
