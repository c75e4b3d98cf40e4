//! RoPE parity: NEOX pairs, f32 angles from tables, positions past 2048 and near 32k.

use anyhow::Result;
use cubecl::prelude::*;
use cubeqwen_kernels::rope::{reference, rope, RopeTables};
use cubeqwen_kernels::runtime::RuntimeJob;
use cubeqwen_kernels::testing::*;
use cubeqwen_kernels::DeviceTensor;
use half::f16;

/// f16 storage of the rotated values: ≈ 2.8e-4. Adjacent pairs or a wrong angle give ≫ 1e-2.
const TOL: f64 = 1e-3;

struct Case {
    heads: usize,
    head_dim: usize,
    positions: Vec<usize>,
    seed: u64,
}

impl RuntimeJob for Case {
    type Output = (f64, f64);
    fn run<R: Runtime>(self, client: ComputeClient<R>, _device: &str) -> Result<(f64, f64)> {
        let Case {
            heads,
            head_dim,
            positions,
            seed,
        } = self;
        let theta = 1_000_000.0f32;
        let max_pos = positions.iter().max().unwrap() + 1;
        let tables = RopeTables::new(&client, theta, head_dim, max_pos)?;
        let mut rng = Rng::new(seed);
        let t = positions.len();
        let x = rng.f16_vec(t * heads * head_dim, 0.0, 1.0);
        let xd = DeviceTensor::<R, f16>::from_slice(&client, &x, &[t, heads * head_dim])?;
        let pos_u32: Vec<u32> = positions.iter().map(|&p| p as u32).collect();
        let pd = DeviceTensor::<R, u32>::from_slice(&client, &pos_u32, &[t])?;
        rope(&client, &xd, &pd, max_pos - 1, &tables)?;
        let got = f16_to_f64(&xd.to_vec(&client)?);
        let want = reference(&f16_to_f64(&x), &positions, head_dim, theta);
        // The same data rotated with adjacent pairs (the GPT-J convention) must not match.
        let mut adjacent = f16_to_f64(&x);
        for (ti, &p) in positions.iter().enumerate() {
            for h in 0..heads {
                let b = (ti * heads + h) * head_dim;
                for i in 0..head_dim / 2 {
                    let a =
                        (p as f32 * cubeqwen_kernels::rope::inv_freq(theta, i, head_dim)) as f64;
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
        Ok((err, err_adjacent))
    }
}

fn check(heads: usize, head_dim: usize, positions: Vec<usize>) {
    let seed = fresh_seed();
    let (err, err_adj) = run_test(Case {
        heads,
        head_dim,
        positions,
        seed,
    });
    assert!(
        err <= TOL,
        "rope rel_err {err:.3e} > {TOL:.0e} (seed {seed})"
    );
    assert!(
        err_adj > 0.1,
        "adjacent-pair rotation was not told apart ({err_adj:.3e})"
    );
}

#[test]
fn rope_q_and_k_prefill_positions() {
    // 14 query heads and 2 kv heads of head_dim 64; positions 0..37.
    check(14, 64, (0..37).collect());
    check(2, 64, (0..37).collect());
}

#[test]
fn rope_positions_past_f16_range() {
    // f16 holds integers exactly only up to 2048; these must still be exact.
    check(14, 64, vec![2047, 2048, 2049, 4099, 10001, 30000, 32767]);
    check(12, 128, vec![5000, 32767, 1]);
}

struct PastTable;
impl RuntimeJob for PastTable {
    type Output = String;
    fn run<R: Runtime>(self, client: ComputeClient<R>, _device: &str) -> Result<String> {
        let tables = RopeTables::new(&client, 1e6, 64, 16)?;
        let x = DeviceTensor::<R, f16>::from_slice(&client, &[f16::ONE; 64], &[1, 64])?;
        let p = DeviceTensor::<R, u32>::from_slice(&client, &[16], &[1])?;
        Ok(rope(&client, &x, &p, 16, &tables).unwrap_err().to_string())
    }
}

#[test]
fn rope_rejects_position_past_tables() {
    let msg = run_test(PastTable);
    assert!(msg.contains("past the tables"), "{msg}");
}
