//! RoPE parity: NEOX pairs, f32 angles from tables, positions past 2048 and near 32k.

use anyhow::{ensure, Result};
use cubecl::prelude::*;
use cubeqwen_kernels::rope::{inv_freq, reference, rope, RopeTables};
use cubeqwen_kernels::testing::*;
use cubeqwen_kernels::{device_test, DeviceTensor, KernelError};
use half::f16;

/// f16 storage of the rotated values: ≈ 2.8e-4. Adjacent pairs or a wrong angle give ≫ 1e-2.
const TOL: f64 = 1e-3;

/// Rotates `positions.len()` tokens of `heads` heads on the device and compares with the f64
/// reference, and with the same data rotated with adjacent pairs (which must not match).
fn check<R: Runtime>(
    client: &ComputeClient<R>,
    heads: usize,
    head_dim: usize,
    positions: &[usize],
    seed: u64,
) -> Result<()> {
    let theta = 1_000_000.0f32;
    let max_pos = positions.iter().max().unwrap() + 1;
    let tables = RopeTables::new(client, theta, head_dim, max_pos)?;
    let mut rng = Rng::new(seed);
    let t = positions.len();
    let x = rng.f16_vec(t * heads * head_dim, 0.0, 1.0);
    let xd = DeviceTensor::<R, f16>::from_slice(client, &x, &[t, heads * head_dim])?;
    let pos_u32: Vec<u32> = positions.iter().map(|&p| p as u32).collect();
    let pd = DeviceTensor::<R, u32>::from_slice(client, &pos_u32, &[t])?;
    rope(client, &xd, &pd, max_pos - 1, &tables)?;
    let got = f16_to_f64(&xd.to_vec(client)?);
    let want = reference(&f16_to_f64(&x), positions, head_dim, theta);
    // The same data rotated with adjacent pairs (the GPT-J convention) must not match.
    let mut adjacent = f16_to_f64(&x);
    for (ti, &p) in positions.iter().enumerate() {
        for h in 0..heads {
            let b = (ti * heads + h) * head_dim;
            for i in 0..head_dim / 2 {
                let a = (p as f32 * inv_freq(theta, i, head_dim)) as f64;
                let (x0, x1) = (adjacent[b + 2 * i], adjacent[b + 2 * i + 1]);
                adjacent[b + 2 * i] = x0 * a.cos() - x1 * a.sin();
                adjacent[b + 2 * i + 1] = x1 * a.cos() + x0 * a.sin();
            }
        }
    }
    let err = rel_err(&got, &want);
    let err_adjacent = rel_err(&got, &adjacent);
    println!(
        "rope heads={heads} hd={head_dim} positions {:?}..: rel_err={err:.3e} (vs adjacent pairs {err_adjacent:.2e}) seed {seed}",
        &positions[..positions.len().min(4)]
    );
    ensure!(
        err <= TOL,
        "rope rel_err {err:.3e} > {TOL:.0e} (seed {seed})"
    );
    ensure!(
        err_adjacent > 0.1,
        "adjacent-pair rotation was not told apart ({err_adjacent:.3e})"
    );
    Ok(())
}

device_test! {
    fn rope_q_and_k_prefill_positions<R>(client, seed) {
        // 14 query heads and 2 kv heads of head_dim 64; positions 0..37.
        let positions: Vec<usize> = (0..37).collect();
        check(client, 14, 64, &positions, seed)?;
        check(client, 2, 64, &positions, seed)
    }
}

device_test! {
    fn rope_positions_past_f16_range<R>(client, seed) {
        // f16 holds integers exactly only up to 2048; these must still be exact.
        check(client, 14, 64, &[2047, 2048, 2049, 4099, 10001, 30000, 32767], seed)?;
        check(client, 12, 128, &[5000, 32767, 1], seed)
    }
}

device_test! {
    fn rope_rejects_position_past_tables<R>(client) {
        let tables = RopeTables::new(client, 1e6, 64, 16)?;
        let x = DeviceTensor::<R, f16>::from_slice(client, &[f16::ONE; 64], &[1, 64])?;
        let p = DeviceTensor::<R, u32>::from_slice(client, &[16], &[1])?;
        let err = rope(client, &x, &p, 16, &tables).unwrap_err();
        ensure!(
            err.downcast_ref::<KernelError>()
                == Some(&KernelError::PastRopeTables {
                    position: 16,
                    table: 16
                }),
            "wrong refusal: {err}"
        );
        Ok(())
    }
}
