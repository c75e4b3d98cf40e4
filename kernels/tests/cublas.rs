//! Matmul parity with cuBLAS (`baseline::Cublas`: GemmEx, f16 inputs and output, f32 compute)
//! on the GPU, on the same device buffers: cuBLAS reads the x and W that cubecl uploaded and writes into a
//! cubecl-allocated, poisoned y. Every variant and cuBLAS are each compared with the f64
//! reference at every Qwen shape, `auto` is compared with cuBLAS over the whole output, and all
//! of it is printed as a table. CUDA only: `#[ignore]`d here, run by `scripts/run-gpu.sh`
//! (with --include-ignored).
#![allow(clippy::neg_cmp_op_on_partial_ord)] // `!(x <= tol)`: NaN must fail
#![cfg(feature = "cuda")]

use anyhow::Result;
use cubecl::cuda::CudaRuntime;
use cubeqwen_kernels::baseline::Cublas;
use cubeqwen_kernels::flash::mma_supported;
use cubeqwen_kernels::matmul::{reference, resolve_variant, MatmulVariant, RowChunked};
use cubeqwen_kernels::runtime::cuda_client;
use cubeqwen_kernels::testing::*;
use cubeqwen_kernels::DeviceTensor;
use half::f16;

type R = CudaRuntime;
const TOL: f64 = 2e-3;

/// `auto` against cuBLAS, ‖auto − cuBLAS‖/‖cuBLAS‖ over the whole output. Measured
/// (BENCHMARKS.md, "Matmul vs cuBLAS": H100 run of 2026-11-26, and the H200 run the same
/// night): at most 2.695e-4 (m = 128, the 7B lm_head 152064×3584, where cuBLAS itself is
/// 2.546e-4 from f64), 0 wherever both round the same f32 sums to f16. About 3× the largest.
const AUTO_VS_CUBLAS_TOL: f64 = 8e-4;

fn table(seed: u64) -> Result<Vec<String>> {
    let (client, device) = cuda_client()?;
    println!("test device: {device}");
    let cublas = Cublas::new()?;
    let mut rng = Rng::new(seed);
    let mut failures = Vec::new();
    println!(
        "seed {seed}; relative error of each against f64 on sampled rows (gemv, blocked: m <= 128)"
    );
    println!(
        "{:>5} {:>6} {:>6} | {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>7} | {:>9} | {:>11}",
        "m",
        "n",
        "k",
        "tiled",
        "cmma",
        "gemv",
        "blocked",
        "cubek",
        "mma",
        "auto",
        "=",
        "cuBLAS",
        "auto-cuBLAS"
    );
    let shapes = [
        (896, 896),
        (128, 896),
        (4864, 896),
        (896, 4864),
        (151936, 896),
        (1536, 1536),
        (256, 1536),
        (8960, 1536),
        (1536, 8960),
        (3584, 3584),
        (512, 3584),
        (18944, 3584),
        (3584, 18944),
        (152064, 3584),
    ];
    // 32 rows: `auto`'s GEMV in two blocks of 16 rows (weights of at most 16 MiB).
    for m in [1, 7, 32, 128, 2048] {
        for (n, k) in shapes {
            if m == 2048 && n * k > 100_000_000 {
                continue; // the 2048-row lm_head needs > 1 GiB of output alone
            }
            let x = rng.f16_vec(m * k, 0.0, 1.0);
            let w = rng.f16_vec(n * k, 0.0, 1.0 / (k as f64).sqrt());
            let xd = DeviceTensor::<R, f16>::from_slice(&client, &x, &[m, k])?;
            let wc = RowChunked::<R, f16>::upload(&client, &w, n, k)?;
            let rows = sample_rows(m, &mut rng);
            let xs: Vec<f64> = rows
                .iter()
                .flat_map(|&r| f16_to_f64(&x[r * k..(r + 1) * k]))
                .collect();
            let want = reference(&xs, &f16_to_f64(&w), None, rows.len(), n, k);
            let pick = |y: &[f16]| -> Vec<f64> {
                rows.iter()
                    .flat_map(|&r| f16_to_f64(&y[r * n..(r + 1) * n]))
                    .collect()
            };
            let poisoned =
                || DeviceTensor::<R, f16>::from_slice(&client, &vec![POISON_F16; m * n], &[m, n]);
            let mut cells = Vec::new();
            let mut auto_y = Vec::new();
            for v in [
                MatmulVariant::Tiled,
                MatmulVariant::Cmma,
                MatmulVariant::Gemv,
                MatmulVariant::Blocked,
                MatmulVariant::Cubek,
                MatmulVariant::Mma,
                MatmulVariant::Auto,
            ] {
                if ((v == MatmulVariant::Gemv || v == MatmulVariant::Blocked) && m > 128)
                    || (v == MatmulVariant::Cubek && wc.chunks.len() > 1)
                    || (v == MatmulVariant::Mma && !mma_supported(&client))
                {
                    cells.push("-".to_string());
                    continue;
                }
                let yd = poisoned()?;
                wc.matmul(&client, v, &xd, None, &yd)?;
                let y = yd.to_vec(&client)?;
                let e = rel_err(&pick(&y), &want);
                if !(e <= TOL) {
                    failures.push(format!("m={m} n={n} k={k}: {v:?} rel_err {e:.3e}"));
                }
                cells.push(format!("{e:.3e}"));
                if v == MatmulVariant::Auto {
                    auto_y = y;
                }
            }
            let yc = poisoned()?;
            cublas.matmul(&client, &xd, &wc, &yc)?;
            let yc = yc.to_vec(&client)?;
            let cub = rel_err(&pick(&yc), &want);
            if !(cub <= TOL) {
                failures.push(format!("m={m} n={n} k={k}: cuBLAS rel_err {cub:.3e}"));
            }
            // A non-finite cuBLAS output cannot judge auto (and failed just above).
            let diff = if yc.iter().all(|v| v.is_finite()) {
                rel_err(&f16_to_f64(&auto_y), &f16_to_f64(&yc))
            } else {
                f64::NAN
            };
            if !(diff <= AUTO_VS_CUBLAS_TOL) {
                failures.push(format!(
                    "m={m} n={n} k={k}: auto vs cuBLAS {diff:.3e} > {AUTO_VS_CUBLAS_TOL:.0e}"
                ));
            }
            let auto = format!(
                "{:?}",
                resolve_variant(&client, MatmulVariant::Auto, m, n, k)
            );
            println!(
                "{m:>5} {n:>6} {k:>6} | {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {auto:>7} | {cub:>9.3e} | {diff:>11.3e}",
                cells[0], cells[1], cells[2], cells[3], cells[4], cells[5], cells[6]
            );
        }
    }
    Ok(failures)
}

#[test]
#[ignore = "needs CUDA and cuBLAS: run on the GPU machine by scripts/run-gpu.sh"]
fn matmul_against_cublas_table() {
    let seed = fresh_seed();
    let _report = SeedReport {
        test: "matmul_against_cublas_table",
        seed,
    };
    let failures = table(seed).unwrap();
    assert!(failures.is_empty(), "{failures:#?}");
}
