//! The fused GEMVs of short blocks against the f64 reference, and bit for bit against the
//! unfused kernels they replace (the `Gemv` matmuls, then SwiGLU), at Qwen shapes.

use anyhow::{ensure, Result};
use cubecl::prelude::*;
use cubeqwen_kernels::elementwise::swiglu;
use cubeqwen_kernels::fused_gemv::{gemv_gate_up_swiglu, gemv_qkv, reference_gate_up_swiglu};
use cubeqwen_kernels::gemv_mma::GemvMma;
use cubeqwen_kernels::matmul::{matmul, reference, MatmulVariant};
use cubeqwen_kernels::testing::*;
use cubeqwen_kernels::{device_test, DeviceTensor, KernelError};
use half::f16;

/// f16 output rounding gives ≈ 3e-4 (≈ 1e-3 through SwiGLU's two rounded inputs); a wrong
/// row, column or weight gives > 1e-1.
const TOL: f64 = 2e-3;

/// Rows of x: one token, a block of 7 with a row past m, a whole block of 16, and 19.
const ROWS: [usize; 5] = [1, 2, 7, 16, 19];

fn poisoned<R: Runtime>(
    client: &ComputeClient<R>,
    m: usize,
    n: usize,
) -> Result<DeviceTensor<R, f16>> {
    DeviceTensor::<R, f16>::from_slice(client, &vec![POISON_F16; m * n], &[m, n])
}

/// Whole outputs equal bit for bit (NaN poison included: an unwritten output fails too).
fn same_bits(what: &str, got: &[f16], want: &[f16]) -> Result<()> {
    let differ = got
        .iter()
        .zip(want)
        .filter(|(a, b)| a.to_bits() != b.to_bits() || a.is_nan())
        .count();
    ensure!(
        differ == 0,
        "{what}: {differ} of {} outputs differ from the unfused kernels' (or are unwritten)",
        got.len()
    );
    Ok(())
}

device_test! {
    /// q/k/v of the 0.5B layer (896 → 896, 128, 128) and of a small GQA-7 layer (224 → 224,
    /// 32, 32) in one launch: each projection against f64 and against its own matmul of the
    /// same variant, the scalar GEMV and tensor cores (emulated off CUDA: the small layer).
    fn gemv_qkv_matches_reference_and_the_matmuls<R>(client, seed) {
        let mut rng = Rng::new(seed);
        let native = GemvMma::native(client).is_some();
        let mut cases = Vec::new();
        for variant in [MatmulVariant::Gemv, MatmulVariant::GemvMma] {
            for (nq, nkv, k) in [(896, 128, 896), (224, 32, 224)] {
                if variant == MatmulVariant::Gemv || native || k == 224 {
                    cases.push((variant, nq, nkv, k));
                }
            }
        }
        for (variant, nq, nkv, k) in cases {
            for m in ROWS {
                let x = rng.f16_vec(m * k, 0.0, 1.0);
                let xd = DeviceTensor::<R, f16>::from_slice(client, &x, &[m, k])?;
                let mut w = Vec::new();
                let mut b = Vec::new();
                for n in [nq, nkv, nkv] {
                    w.push(rng.f16_vec(n * k, 0.0, 1.0 / (k as f64).sqrt()));
                    b.push(rng.f32_vec(n, 0.1, 0.5));
                }
                let ns = [nq, nkv, nkv];
                let wd = (0..3)
                    .map(|i| DeviceTensor::<R, f16>::from_slice(client, &w[i], &[ns[i], k]))
                    .collect::<Result<Vec<_>>>()?;
                let bd = (0..3)
                    .map(|i| DeviceTensor::<R, f32>::from_slice(client, &b[i], &[ns[i]]))
                    .collect::<Result<Vec<_>>>()?;
                let out = (0..3).map(|i| poisoned(client, m, ns[i])).collect::<Result<Vec<_>>>()?;
                gemv_qkv(
                    client,
                    variant,
                    &xd,
                    [&wd[0], &wd[1], &wd[2]],
                    [&bd[0], &bd[1], &bd[2]],
                    [&out[0], &out[1], &out[2]],
                )?;
                for (i, name) in ["q", "k", "v"].into_iter().enumerate() {
                    let got = out[i].to_vec(client)?;
                    let want = reference(
                        &f16_to_f64(&x),
                        &f16_to_f64(&w[i]),
                        Some(&f32_to_f64(&b[i])),
                        m,
                        ns[i],
                        k,
                    );
                    let err = rel_err(&f16_to_f64(&got), &want);
                    println!(
                        "gemv q/k/v {variant:?} {name} m={m:2} n={:3} k={k}: rel_err={err:.3e}",
                        ns[i]
                    );
                    ensure!(err <= TOL, "{variant:?} {name} m={m} k={k}: rel_err {err:.3e} > {TOL:.0e}");
                    let alone = poisoned(client, m, ns[i])?;
                    matmul(client, variant, &xd, &wd[i], Some(&bd[i]), &alone)?;
                    let what = format!("{variant:?} {name} m={m} k={k}");
                    same_bits(&what, &got, &alone.to_vec(client)?)?;
                }
            }
        }
        Ok(())
    }
}

device_test! {
    /// gate/up + SwiGLU of the 0.5B layer (896 → 4864) and of a small one (224 → 384) against
    /// f64 and against two matmuls and `swiglu`, with the scalar GEMV and with tensor cores
    /// (emulated off CUDA: the small layer only there).
    fn gemv_gate_up_swiglu_matches_reference_and_the_unfused_kernels<R>(client, seed) {
        let mut rng = Rng::new(seed);
        let native = GemvMma::native(client).is_some();
        let mut cases = Vec::new();
        for variant in [MatmulVariant::Gemv, MatmulVariant::GemvMma] {
            for (n, k) in [(4864, 896), (384, 224)] {
                if variant == MatmulVariant::Gemv || native || k == 224 {
                    cases.push((variant, n, k));
                }
            }
        }
        for (variant, n, k) in cases {
            for m in ROWS {
                let x = rng.f16_vec(m * k, 0.0, 1.0);
                let wg = rng.f16_vec(n * k, 0.0, 2.0 / (k as f64).sqrt());
                let wu = rng.f16_vec(n * k, 0.0, 1.0 / (k as f64).sqrt());
                let xd = DeviceTensor::<R, f16>::from_slice(client, &x, &[m, k])?;
                let gd = DeviceTensor::<R, f16>::from_slice(client, &wg, &[n, k])?;
                let ud = DeviceTensor::<R, f16>::from_slice(client, &wu, &[n, k])?;
                let out = poisoned(client, m, n)?;
                gemv_gate_up_swiglu(client, variant, &xd, &gd, &ud, &out)?;
                let got = out.to_vec(client)?;
                let want = reference_gate_up_swiglu(
                    &f16_to_f64(&x),
                    &f16_to_f64(&wg),
                    &f16_to_f64(&wu),
                    m,
                    n,
                    k,
                );
                let err = rel_err(&f16_to_f64(&got), &want);
                println!("gemv gate/up + SwiGLU {variant:?} m={m:2} n={n} k={k}: rel_err={err:.3e}");
                ensure!(err <= TOL, "{variant:?} m={m} n={n}: rel_err {err:.3e} > {TOL:.0e}");
                let (g, u) = (poisoned(client, m, n)?, poisoned(client, m, n)?);
                matmul(client, variant, &xd, &gd, None, &g)?;
                matmul(client, variant, &xd, &ud, None, &u)?;
                swiglu(client, &g, &u, &g)?;
                same_bits(&format!("gate/up {variant:?} m={m} n={n}"), &got, &g.to_vec(client)?)?;
            }
        }
        Ok(())
    }
}

device_test! {
    fn fused_gemvs_refuse_bad_shapes<R>(client) {
        let t = |shape: &[usize]| -> Result<DeviceTensor<R, f16>> {
            DeviceTensor::<R, f16>::from_slice(client, &vec![f16::ONE; shape.iter().product()], shape)
        };
        let b = |n: usize| DeviceTensor::<R, f32>::from_slice(client, &vec![0.0; n], &[n]);
        let (x, wq, wk, w_odd) = (t(&[2, 8])?, t(&[8, 8])?, t(&[4, 8])?, t(&[4, 6])?);
        let (bq, bk, b3) = (b(8)?, b(4)?, b(3)?);
        let (q, k, v) = (t(&[2, 8])?, t(&[2, 4])?, t(&[2, 4])?);
        let refusals = [
            (
                gemv_qkv(client, MatmulVariant::Gemv, &x, [&wq, &wk, &w_odd], [&bq, &bk, &bk], [&q, &k, &v]),
                KernelError::shape("matmul", "W", "[n, 8]", &[4, 6]),
            ),
            (
                gemv_qkv(client, MatmulVariant::Gemv, &x, [&wq, &wk, &wk], [&bq, &b3, &bk], [&q, &k, &v]),
                KernelError::shape("gemv q/k/v", "bias", "[4]", &[3]),
            ),
            (
                gemv_qkv(client, MatmulVariant::Gemv, &x, [&wq, &wk, &wk], [&bq, &bk, &bk], [&q, &q, &v]),
                KernelError::shape("gemv q/k/v", "out", "[2, 4]", &[2, 8]),
            ),
            (
                gemv_qkv(client, MatmulVariant::Gemv, &x, [&wq, &wk, &wq], [&bq, &bk, &bq], [&q, &k, &q]),
                KernelError::unsupported("gemv q/k/v", "k has 4 outputs and v 8"),
            ),
            (
                gemv_qkv(client, MatmulVariant::Tiled, &x, [&wq, &wk, &wk], [&bq, &bk, &bk], [&q, &k, &v]),
                KernelError::unsupported("gemv q/k/v", "the Tiled matmul"),
            ),
            (
                gemv_gate_up_swiglu(client, MatmulVariant::Gemv, &x, &wq, &wk, &q),
                KernelError::shape("gemv gate/up + SwiGLU", "W_up", "[8, 8]", &[4, 8]),
            ),
            (
                gemv_gate_up_swiglu(client, MatmulVariant::Gemv, &x, &wq, &wq, &k),
                KernelError::shape("gemv gate/up + SwiGLU", "out", "[2, 8]", &[2, 4]),
            ),
        ];
        let tiled = gemv_gate_up_swiglu(client, MatmulVariant::Tiled, &x, &wq, &wq, &q);
        ensure!(
            tiled.as_ref().err().and_then(|e| e.downcast_ref::<KernelError>())
                == Some(&KernelError::unsupported("gemv gate/up + SwiGLU", "the Tiled matmul")),
            "the Tiled variant was not refused: {tiled:?}"
        );
        for (got, want) in refusals {
            let err = got.unwrap_err();
            ensure!(
                err.downcast_ref::<KernelError>() == Some(&want),
                "refused with `{err}`, expected `{want}`"
            );
        }
        Ok(())
    }
}
