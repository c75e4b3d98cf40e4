//! RMSNorm parity: the cubecl kernel against the f64 reference at Qwen hidden sizes.

use anyhow::Result;
use cubecl::prelude::*;
use cubeqwen_kernels::rmsnorm::{reference, rms_norm};
use cubeqwen_kernels::runtime::RuntimeJob;
use cubeqwen_kernels::testing::*;
use cubeqwen_kernels::DeviceTensor;
use half::f16;

/// f16 output has a relative rounding error of ≤ 2^-11 per element (≈ 4.9e-4); 1e-3 leaves
/// room for f32 accumulation yet fails on a wrong index, a missing weight or a wrong eps.
const TOL: f64 = 1e-3;

struct Case {
    rows: usize,
    cols: usize,
    seed: u64,
}

impl RuntimeJob for Case {
    type Output = f64;
    fn run<R: Runtime>(self, client: ComputeClient<R>, _device: &str) -> Result<f64> {
        let Case { rows, cols, seed } = self;
        let mut rng = Rng::new(seed);
        // Offset mean so rows are not zero-centred; weights around 1 but not 1.
        let x = rng.f16_vec(rows * cols, 0.3, 2.0);
        let w = rng.f32_vec(cols, 1.0, 0.25);
        let eps = 1e-6f32;

        let xd = DeviceTensor::<R, f16>::from_slice(&client, &x, &[rows, cols])?;
        let wd = DeviceTensor::<R, f32>::from_slice(&client, &w, &[cols])?;
        let yd = DeviceTensor::<R, f16>::from_slice(
            &client,
            &vec![POISON_F16; rows * cols],
            &[rows, cols],
        )?;
        rms_norm(&client, &xd, &wd, &yd, eps)?;
        let y = f16_to_f64(&yd.to_vec(&client)?);

        let want = reference(&f16_to_f64(&x), &f32_to_f64(&w), cols, eps as f64);
        let err = rel_err(&y, &want);
        let (max_abs, at) = max_abs_err(&y, &want);
        println!(
            "rmsnorm rows={rows:5} cols={cols:5} seed={seed}: rel_err={err:.3e} max_abs={max_abs:.3e} at {at}"
        );
        Ok(err)
    }
}

fn check(rows: usize, cols: usize) {
    let seed = fresh_seed().wrapping_add((rows * 31 + cols) as u64);
    let err = run_test(Case { rows, cols, seed });
    assert!(
        err <= TOL,
        "rmsnorm rows={rows} cols={cols} seed={seed}: rel_err {err:.3e} > {TOL:.0e}"
    );
}

#[test]
fn rmsnorm_hidden_896() {
    for rows in [1, 7, 33, 128] {
        check(rows, 896);
    }
}

#[test]
fn rmsnorm_ffn_4864() {
    for rows in [1, 3, 17] {
        check(rows, 4864);
    }
}

#[test]
fn rmsnorm_odd_widths() {
    // Widths that are not a multiple of the block size, and one smaller than it.
    for (rows, cols) in [(5, 100), (2, 1537), (9, 64)] {
        check(rows, cols);
    }
}

struct BadShape;
impl RuntimeJob for BadShape {
    type Output = String;
    fn run<R: Runtime>(self, client: ComputeClient<R>, _device: &str) -> Result<String> {
        let x = DeviceTensor::<R, f16>::from_slice(&client, &[f16::ONE; 8], &[2, 4])?;
        let w = DeviceTensor::<R, f32>::from_slice(&client, &[1.0; 3], &[3])?;
        let y = DeviceTensor::<R, f16>::empty(&client, &[2, 4])?;
        Ok(rms_norm(&client, &x, &w, &y, 1e-6).unwrap_err().to_string())
    }
}

#[test]
fn rmsnorm_rejects_mismatched_weight() {
    let msg = run_test(BadShape);
    assert!(msg.contains("weight must be [4]"), "{msg}");
}
