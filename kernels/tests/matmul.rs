//! Matmul parity: every variant against the f64 reference at Qwen shapes.

use anyhow::{ensure, Result};
use cubecl::prelude::*;
use cubeqwen_kernels::matmul::{
    cmma_supported, cubek_tma, matmul, matmul_into, matmul_into_with, reference, MatmulVariant,
    RowChunked, TMA_TILING,
};
use cubeqwen_kernels::matmul_mma::MmaTile;
use cubeqwen_kernels::switches::CubekTiling;
use cubeqwen_kernels::testing::*;
use cubeqwen_kernels::{device_test, DeviceTensor, KernelError};
use half::f16;

/// f16 output rounding alone gives ≈ 2.8e-4; a wrong index or a dropped bias gives > 1e-1.
const TOL: f64 = 2e-3;

/// (n, k) of Qwen2.5-0.5B: q/o, k/v, gate/up, down, lm_head.
const SHAPES_05B: [(usize, usize); 5] = [
    (896, 896),
    (128, 896),
    (4864, 896),
    (896, 4864),
    (151936, 896),
];

/// One product `y = x · Wᵀ (+ bias)` at (m, n, k) against the f64 reference on sampled rows.
fn check<R: Runtime>(
    client: &ComputeClient<R>,
    variant: MatmulVariant,
    mnk: (usize, usize, usize),
    bias: bool,
    seed: u64,
) -> Result<()> {
    check_with(
        client,
        &format!("{variant:?}"),
        mnk,
        bias,
        seed,
        |x, w, b, y| {
            // Weights over 64 MiB go in row chunks: they exercise the chunked path on every
            // device, and wgpu could not hold the lm_head in one buffer.
            let (n, k) = (mnk.1, mnk.2);
            if n * k * 2 > 64 << 20 {
                let wc = RowChunked::<R, f16>::upload_rows(client, w, n, k, (32 << 20) / k)?;
                println!("  ({} row chunks)", wc.chunks.len());
                wc.matmul(client, variant, x, b, y)
            } else {
                let wd = DeviceTensor::<R, f16>::from_slice(client, w, &[n, k])?;
                matmul(client, variant, x, &wd, b, y)
            }
        },
    )
}

/// `product(x, w (host), bias, y)` at (m, n, k) against the f64 reference on sampled rows.
fn check_with<R: Runtime>(
    client: &ComputeClient<R>,
    label: &str,
    (m, n, k): (usize, usize, usize),
    bias: bool,
    seed: u64,
    product: impl FnOnce(
        &DeviceTensor<R, f16>,
        &[f16],
        Option<&DeviceTensor<R, f32>>,
        &DeviceTensor<R, f16>,
    ) -> Result<()>,
) -> Result<()> {
    let mut rng = Rng::new(seed);
    let x = rng.f16_vec(m * k, 0.0, 1.0);
    let w = rng.f16_vec(n * k, 0.0, 1.0 / (k as f64).sqrt());
    let b = rng.f32_vec(n, 0.1, 0.5);
    let xd = DeviceTensor::<R, f16>::from_slice(client, &x, &[m, k])?;
    let bd = DeviceTensor::<R, f32>::from_slice(client, &b, &[n])?;
    let yd = DeviceTensor::<R, f16>::from_slice(client, &vec![POISON_F16; m * n], &[m, n])?;
    product(&xd, &w, bias.then_some(&bd), &yd)?;
    let y = yd.to_vec(client)?;

    let rows = sample_rows(m, &mut rng);
    let xs: Vec<f64> = rows
        .iter()
        .flat_map(|&r| f16_to_f64(&x[r * k..(r + 1) * k]))
        .collect();
    let bf = f32_to_f64(&b);
    let want = reference(
        &xs,
        &f16_to_f64(&w),
        bias.then_some(&bf[..]),
        rows.len(),
        n,
        k,
    );
    let got: Vec<f64> = rows
        .iter()
        .flat_map(|&r| f16_to_f64(&y[r * n..(r + 1) * n]))
        .collect();
    let err = rel_err(&got, &want);
    // Rows not compared must still have been written (poison).
    let unwritten = y.iter().filter(|v| v.is_nan()).count();
    println!(
        "matmul {label} m={m:5} n={n:6} k={k:5} bias={bias}: rel_err={err:.3e} (rows checked {}, seed {seed})",
        rows.len()
    );
    ensure!(unwritten == 0, "{unwritten} outputs left unwritten");
    ensure!(
        err <= TOL,
        "{label} m={m} n={n} k={k} seed={seed}: rel_err {err:.3e} > {TOL:.0e}"
    );
    Ok(())
}

fn run_shapes<R: Runtime>(
    client: &ComputeClient<R>,
    variant: MatmulVariant,
    rows: &[usize],
    seed: u64,
) -> Result<()> {
    let mut rows = rows.to_vec();
    if full_shapes() {
        // On the GPU: long row counts. The 1.5B/7B widths are in the cuBLAS table
        // (tests/cublas.rs), which runs there too.
        rows.extend([128, 2048]);
    }
    for &m in &rows {
        for (n, k) in SHAPES_05B {
            // The software Vulkan device of CI is slow: the full lm_head only for few rows there;
            // on the GPU the products past 2e10 multiply-adds are left to the cuBLAS table.
            let work = n * k * m;
            if (work > 400_000_000 && !full_shapes()) || work > 20_000_000_000 {
                continue;
            }
            for bias in [true, false] {
                let seed = seed ^ (m * 1_000_003 + n * 7 + k) as u64;
                check(client, variant, (m, n, k), bias, seed)?;
            }
        }
    }
    Ok(())
}

device_test! {
    fn matmul_tiled_qwen_shapes<R>(client, seed) {
        run_shapes(client, MatmulVariant::Tiled, &[1, 7, 33], seed)
    }
}

device_test! {
    fn matmul_cubek_qwen_shapes<R>(client, seed) {
        run_shapes(client, MatmulVariant::Cubek, &[7, 33], seed)
    }
}

device_test! {
    /// 7 rows: one block of 8 with a row past m; 16: a whole block; 19: a block and 3 rows.
    fn matmul_gemv_qwen_shapes<R>(client, seed) {
        run_shapes(client, MatmulVariant::Gemv, &[1, 2, 7, 16, 19], seed)
    }
}

device_test! {
    /// The tensor-core GEMV: 2 rows, 7 (a tile with 9 rows past m), 16 (a whole tile), 19 (a
    /// tile and 3 rows). Off CUDA each mma is emulated through shared memory: there the
    /// narrow 0.5B shapes only (q/o and k/v), on CUDA all of them.
    fn matmul_gemv_mma_qwen_shapes<R>(client, seed) {
        if cubeqwen_kernels::gemv_mma::GemvMma::native(client).is_some() {
            return run_shapes(client, MatmulVariant::GemvMma, &[2, 7, 16, 19], seed);
        }
        for m in [2, 7, 19] {
            for (n, k) in [(896, 896), (128, 896)] {
                for bias in [true, false] {
                    check(client, MatmulVariant::GemvMma, (m, n, k), bias, seed ^ (m * 31 + n) as u64)?;
                }
            }
        }
        Ok(())
    }
}

device_test! {
    /// The many-row tensor-core matmul. On CUDA every 0.5B shape from 1 row (a tile with 63
    /// rows past m) to 100 (a whole tile and a ragged one), and 128 and 2048 rows with
    /// `CUBEQWEN_FULL_SHAPES` (the 128-row tiles); elsewhere each mma and fragment load is
    /// emulated: a ragged row tile and column tiles of 32 at a few shapes. Both write into the
    /// columns of a wider output (q/k/v into one buffer), leaving the others alone.
    fn matmul_mma_qwen_shapes<R>(client, seed) {
        let native = cubeqwen_kernels::flash::mma_supported(client);
        if native {
            run_shapes(client, MatmulVariant::Mma, &[1, 7, 33, 100], seed)?;
        } else {
            for (m, n, k) in [(70, 96, 256), (7, 128, 896), (33, 896, 128)] {
                for bias in [true, false] {
                    check(client, MatmulVariant::Mma, (m, n, k), bias, seed ^ (m * 31 + n) as u64)?;
                }
            }
        }
        let (m, n, k, wide, col_off) = if native { (300, 896, 896, 1152, 128) } else { (70, 96, 128, 160, 32) };
        let mut rng = Rng::new(seed ^ 0x5eed);
        let x = rng.f16_vec(m * k, 0.0, 1.0);
        let w = rng.f16_vec(n * k, 0.0, 1.0 / (k as f64).sqrt());
        let b = rng.f32_vec(wide, 0.1, 0.5);
        let xd = DeviceTensor::<R, f16>::from_slice(client, &x, &[m, k])?;
        let wd = DeviceTensor::<R, f16>::from_slice(client, &w, &[n, k])?;
        let bd = DeviceTensor::<R, f32>::from_slice(client, &b, &[wide])?;
        let want = reference(
            &f16_to_f64(&x),
            &f16_to_f64(&w),
            Some(&f32_to_f64(&b)[col_off..col_off + n]),
            m,
            n,
            k,
        );
        // The default tile, then planes of 64 × 64 (8 n-tiles a plane; column tiles of 64
        // emulated, so that the second of n = 96 is ragged).
        let wide_tile = if native {
            MmaTile { bm: 128, bn: 128, bk: 64, stages: 3, pn: 64 }
        } else {
            MmaTile { bm: 64, bn: 64, bk: 32, stages: 3, pn: 64 }
        };
        for tile in [None, Some(wide_tile)] {
            let yd = DeviceTensor::<R, f16>::from_slice(client, &vec![POISON_F16; m * wide], &[m, wide])?;
            matmul_into_with(client, MatmulVariant::Mma, tile, &xd, &wd, Some(&bd), &yd, col_off)?;
            let y = yd.to_vec(client)?;
            let got: Vec<f64> = (0..m)
                .flat_map(|r| f16_to_f64(&y[r * wide + col_off..r * wide + col_off + n]))
                .collect();
            let err = rel_err(&got, &want);
            let outside = (0..m * wide)
                .filter(|i| !(col_off..col_off + n).contains(&(i % wide)))
                .filter(|&i| !y[i].is_nan())
                .count();
            println!("matmul Mma ({tile:?}) into columns {col_off}..{} of {wide}, m={m} k={k}: rel_err={err:.3e}", col_off + n);
            ensure!(err <= TOL, "mma ({tile:?}) into columns: rel_err {err:.3e} > {TOL:.0e}");
            ensure!(outside == 0, "mma ({tile:?}) into columns wrote {outside} outputs outside its columns");
        }
        Ok(())
    }
}

device_test! {
    /// Row counts that are not multiples of the block (1, 7, 33) exercise the edge clamps.
    fn matmul_blocked_qwen_shapes<R>(client, seed) {
        run_shapes(client, MatmulVariant::Blocked, &[1, 7, 33], seed)
    }
}

device_test! {
    fn matmul_auto_qwen_shapes<R>(client, seed) {
        run_shapes(client, MatmulVariant::Auto, &[1, 7], seed)
    }
}

device_test! {
    /// Tensor cores exist on CUDA only: there the variant must match the reference; on a device
    /// without them it must refuse with a clear error (run on the H100 by stage/run-gpu.sh).
    fn matmul_cmma_qwen_shapes<R>(client, seed) {
        if cmma_supported(client) {
            return run_shapes(client, MatmulVariant::Cmma, &[1, 7, 33], seed);
        }
        let x = DeviceTensor::<R, f16>::from_slice(client, &[f16::ONE; 16], &[1, 16])?;
        let y = DeviceTensor::<R, f16>::empty(client, &[1, 1])?;
        let w = DeviceTensor::<R, f16>::from_slice(client, &[f16::ONE; 16], &[1, 16])?;
        let err = matmul(client, MatmulVariant::Cmma, &x, &w, None, &y).unwrap_err();
        println!("cmma not available on this device; refused with: {err}");
        ensure!(
            err.downcast_ref::<KernelError>() == Some(&KernelError::NoTensorCores),
            "wrong refusal: {err}"
        );
        Ok(())
    }
}

device_test! {
    fn matmul_rejects_bad_shapes<R>(client) {
        let x = DeviceTensor::<R, f16>::from_slice(client, &[f16::ONE; 8], &[2, 4])?;
        let w = DeviceTensor::<R, f16>::from_slice(client, &[f16::ONE; 15], &[3, 5])?;
        let w_ok = DeviceTensor::<R, f16>::from_slice(client, &[f16::ONE; 12], &[3, 4])?;
        let y = DeviceTensor::<R, f16>::empty(client, &[2, 3])?;
        let b = DeviceTensor::<R, f32>::from_slice(client, &[1.0; 4], &[4])?;
        let refusals = [
            (
                matmul(client, MatmulVariant::Tiled, &x, &w, None, &y),
                KernelError::shape("matmul", "W", "[n, 4]", &[3, 5]),
            ),
            (
                matmul(client, MatmulVariant::Gemv, &x, &w_ok, Some(&b), &y),
                KernelError::shape("matmul", "bias", "[3]", &[4]),
            ),
            (
                matmul_into(client, MatmulVariant::Tiled, &x, &w_ok, None, &y, 1),
                KernelError::shape("matmul", "y", "[2, 4] or wider", &[2, 3]),
            ),
            (
                // k = 4: the mma kernel steps k by 32 (64 on CUDA).
                matmul(client, MatmulVariant::Mma, &x, &w_ok, None, &y),
                KernelError::unsupported(
                    "matmul (mma)",
                    format!(
                        "k = 4 is not a multiple of {}",
                        if cubeqwen_kernels::flash::mma_supported(client) { 64 } else { 32 }
                    ),
                ),
            ),
            (
                cubek_tma(client, &x, &w, &y, TMA_TILING),
                KernelError::shape("matmul", "W", "[n, 4]", &[3, 5]),
            ),
            (
                cubek_tma(client, &x, &w_ok, &b, TMA_TILING),
                KernelError::shape("matmul", "y", "[2, 3]", &[4]),
            ),
        ];
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

device_test! {
    /// cubek's TMA kernel at the default tiling and at the others BENCHMARKS.md measured, at the
    /// 0.5B layer's shapes (a full and a ragged prefill chunk); on a device without the Tensor
    /// Memory Accelerator it must refuse with an error, not panic (run on the GPU by
    /// stage/run-gpu.sh; CI checks the refusal).
    fn cubek_tma_tilings_match_the_reference<R>(client, seed) {
        let tma = client
            .properties()
            .features
            .tma
            .contains(cubecl::ir::features::Tma::Base);
        let named: Vec<CubekTiling> = ["tiles=8,rows=1,pk=4", "pm=4,pn=4,sm=2,sn=4", "cubek"]
            .iter()
            .map(|t| t.parse())
            .collect::<Result<_>>()?;
        let tilings: Vec<CubekTiling> = std::iter::once(TMA_TILING).chain(named).collect();
        if !tma {
            let x = DeviceTensor::<R, f16>::from_slice(client, &[f16::ONE; 16], &[1, 16])?;
            let w = DeviceTensor::<R, f16>::from_slice(client, &[f16::ONE; 16], &[1, 16])?;
            let y = DeviceTensor::<R, f16>::empty(client, &[1, 1])?;
            for t in tilings {
                let err = cubek_tma(client, &x, &w, &y, t).unwrap_err();
                println!("no TMA on this device; {t:?} refused with: {err:#}");
            }
            return Ok(());
        }
        for t in tilings {
            for m in [2048, 91] {
                for (n, k) in &SHAPES_05B[..4] {
                    check_with(client, &format!("tma {t:?}"), (m, *n, *k), false, seed, |x, w, _, y| {
                        let wd = DeviceTensor::<R, f16>::from_slice(client, w, &[*n, *k])?;
                        cubek_tma(client, x, &wd, y, t)
                    })?;
                }
            }
        }
        Ok(())
    }
}
