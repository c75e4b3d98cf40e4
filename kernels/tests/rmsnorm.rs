//! RMSNorm parity: the cubecl kernel against the f64 reference at Qwen hidden sizes.

use anyhow::{ensure, Result};
use cubecl::prelude::*;
use cubeqwen_kernels::rmsnorm::{reference, rms_norm};
use cubeqwen_kernels::testing::*;
use cubeqwen_kernels::{device_test, DeviceTensor, KernelError};
use half::f16;

/// f16 output has a relative rounding error of ≤ 2^-11 per element (≈ 4.9e-4); 1e-3 leaves
/// room for f32 accumulation yet fails on a wrong index or a missing weight. A wrong eps
/// shows only on rows whose mean square is near eps: `rmsnorm_eps_on_tiny_rows`.
const TOL: f64 = 1e-3;

/// Qwen2's eps.
const EPS: f32 = 1e-6;

/// `rows` rows of `cols` values ~ N(mean, std²) (f16), normalised on the device and compared
/// with the f64 reference; returns the relative error.
fn rel_err_of<R: Runtime>(
    client: &ComputeClient<R>,
    rows: usize,
    cols: usize,
    (mean, std): (f64, f64),
    seed: u64,
) -> Result<f64> {
    let mut rng = Rng::new(seed);
    let x = rng.f16_vec(rows * cols, mean, std);
    // Weights around 1 but not 1.
    let w = rng.f32_vec(cols, 1.0, 0.25);

    let xd = DeviceTensor::<R, f16>::from_slice(client, &x, &[rows, cols])?;
    let wd = DeviceTensor::<R, f32>::from_slice(client, &w, &[cols])?;
    let yd =
        DeviceTensor::<R, f16>::from_slice(client, &vec![POISON_F16; rows * cols], &[rows, cols])?;
    rms_norm(client, &xd, &wd, &yd, EPS)?;
    let y = f16_to_f64(&yd.to_vec(client)?);

    let want = reference(&f16_to_f64(&x), &f32_to_f64(&w), cols, EPS as f64);
    let err = rel_err(&y, &want);
    let (max_abs, at) = max_abs_err(&y, &want);
    println!(
        "rmsnorm rows={rows:5} cols={cols:5} x~N({mean}, {std}²) seed={seed}: rel_err={err:.3e} max_abs={max_abs:.3e} at {at}"
    );
    Ok(err)
}

fn check<R: Runtime>(client: &ComputeClient<R>, rows: usize, cols: usize, seed: u64) -> Result<()> {
    // Offset mean so rows are not zero-centred.
    let seed = seed.wrapping_add((rows * 31 + cols) as u64);
    let err = rel_err_of(client, rows, cols, (0.3, 2.0), seed)?;
    ensure!(
        err <= TOL,
        "rmsnorm rows={rows} cols={cols} seed={seed}: rel_err {err:.3e} > {TOL:.0e}"
    );
    Ok(())
}

device_test! {
    fn rmsnorm_hidden_896<R>(client, seed) {
        for rows in [1, 7, 33, 128] {
            check(client, rows, 896, seed)?;
        }
        Ok(())
    }
}

device_test! {
    fn rmsnorm_ffn_4864<R>(client, seed) {
        for rows in [1, 3, 17] {
            check(client, rows, 4864, seed)?;
        }
        Ok(())
    }
}

device_test! {
    fn rmsnorm_odd_widths<R>(client, seed) {
        // Widths that are not a multiple of the block size, and one smaller than it.
        for (rows, cols) in [(5, 100), (2, 1537), (9, 64)] {
            check(client, rows, cols, seed)?;
        }
        Ok(())
    }
}

device_test! {
    /// Rows whose mean square is near eps (|x| ~ 1e-3 against eps 1e-6), where eps moves the
    /// output: dropping eps changes it by ~40 %, eps outside the square root or eps 1e-5 by
    /// more; at |x| ~ 1e-2 eps still moves it by 0.5 %, five times the tolerance.
    fn rmsnorm_eps_on_tiny_rows<R>(client, seed) {
        for (i, std) in [1e-3, 3e-3, 1e-2].into_iter().enumerate() {
            let seed = seed.wrapping_add(i as u64);
            let err = rel_err_of(client, 4, 896, (0.0, std), seed)?;
            ensure!(
                err <= TOL,
                "rmsnorm with |x| ~ {std:.0e}, eps {EPS:.0e}, seed {seed}: rel_err {err:.3e} > {TOL:.0e}"
            );
        }
        Ok(())
    }
}

device_test! {
    fn rmsnorm_rejects_mismatched_weight<R>(client) {
        let x = DeviceTensor::<R, f16>::from_slice(client, &[f16::ONE; 8], &[2, 4])?;
        let w = DeviceTensor::<R, f32>::from_slice(client, &[1.0; 3], &[3])?;
        let y = DeviceTensor::<R, f16>::empty(client, &[2, 4])?;
        let err = rms_norm(client, &x, &w, &y, 1e-6).unwrap_err();
        ensure!(
            err.downcast_ref::<KernelError>()
                == Some(&KernelError::Shape {
                    op: "rms_norm",
                    arg: "weight",
                    expected: "[4]".into(),
                    got: vec![3],
                }),
            "wrong refusal: {err}"
        );
        Ok(())
    }
}
