//! Matmul parity with cuBLAS (GemmEx, f16 inputs, f32 compute) on the GPU: our variants and
//! cuBLAS on the same inputs, each against the f64 reference, at every Qwen shape; printed as
//! a table. CUDA only: `#[ignore]`d here, run by `stage/run-gpu.sh` (with --include-ignored).
#![allow(clippy::neg_cmp_op_on_partial_ord)] // `!(x <= tol)`: NaN must fail
#![cfg(feature = "cuda")]

use std::sync::Arc;

use anyhow::{ensure, Result};
use cubecl::prelude::*;
use cubeqwen_kernels::matmul::{matmul, reference, MatmulVariant, RowChunked};
use cubeqwen_kernels::runtime::RuntimeJob;
use cubeqwen_kernels::testing::*;
use cubeqwen_kernels::DeviceTensor;
use cudarc::cublas::{sys::cublasOperation_t, CudaBlas, Gemm, GemmConfig};
use cudarc::driver::CudaContext;
use half::f16;

const TOL: f64 = 2e-3;

fn cublas_matmul(
    blas: &CudaBlas,
    stream: &Arc<cudarc::driver::CudaStream>,
    x: &[f16],
    w: &[f16],
    m: usize,
    n: usize,
    k: usize,
) -> Result<Vec<f16>> {
    let xd = stream.clone_htod(x)?;
    let wd = stream.clone_htod(w)?;
    let mut yd = stream.alloc_zeros::<f16>(m * n)?;
    // Row-major y[m][n] = x[m][k]·w[n][k]ᵀ is column-major yᵀ (n×m) = w (op T of k×n) · xᵀ (k×m).
    let cfg = GemmConfig {
        transa: cublasOperation_t::CUBLAS_OP_T,
        transb: cublasOperation_t::CUBLAS_OP_N,
        m: n as i32,
        n: m as i32,
        k: k as i32,
        alpha: f16::ONE,
        lda: k as i32,
        ldb: k as i32,
        beta: f16::ZERO,
        ldc: n as i32,
    };
    unsafe { blas.gemm(cfg, &wd, &xd, &mut yd)? };
    Ok(stream.clone_dtoh(&yd)?)
}

struct Table;

impl RuntimeJob for Table {
    type Output = Vec<String>;
    fn run<R: Runtime>(self, client: ComputeClient<R>, device: &str) -> Result<Vec<String>> {
        ensure!(
            device.starts_with("cuda"),
            "cuBLAS parity needs the CUDA device, got {device}"
        );
        let ctx = CudaContext::new(0)?;
        let stream = ctx.default_stream();
        let blas = CudaBlas::new(stream.clone())?;
        let seed = fresh_seed();
        let mut rng = Rng::new(seed);
        let mut failures = Vec::new();
        println!("seed {seed}");
        println!(
            "{:>5} {:>6} {:>6} | {:>10} {:>10} {:>10} | {:>10} | {:>10}",
            "m", "n", "k", "auto", "tiled", "variant", "cuBLAS", "auto-cuBLAS"
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
        for m in [1, 7, 128, 2048] {
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
                let mut ours = Vec::new();
                let mut auto_y = Vec::new();
                for v in [MatmulVariant::Auto, MatmulVariant::Tiled] {
                    let yd = DeviceTensor::<R, f16>::from_slice(
                        &client,
                        &vec![POISON_F16; m * n],
                        &[m, n],
                    )?;
                    if wc.chunks.len() == 1 {
                        matmul(&client, v, &xd, &wc.chunks[0], None, &yd)?;
                    } else {
                        wc.matmul(&client, v, &xd, None, &yd)?;
                    }
                    let y = yd.to_vec(&client)?;
                    ours.push(rel_err(&pick(&y), &want));
                    if v == MatmulVariant::Auto {
                        auto_y = y;
                    }
                }
                let yc = cublas_matmul(&blas, &stream, &x, &w, m, n, k)?;
                let cub = rel_err(&pick(&yc), &want);
                let diff = rel_err(&f16_to_f64(&auto_y), &f16_to_f64(&yc));
                let variant =
                    cubeqwen_kernels::matmul::resolve_variant(&client, MatmulVariant::Auto, m);
                println!("{m:>5} {n:>6} {k:>6} | {:>10.3e} {:>10.3e} {:>10} | {cub:>10.3e} | {diff:>10.3e}", ours[0], ours[1], format!("{variant:?}"));
                for (name, e) in [("auto", ours[0]), ("tiled", ours[1]), ("cuBLAS", cub)] {
                    if !(e <= TOL) {
                        failures.push(format!("m={m} n={n} k={k}: {name} rel_err {e:.3e}"));
                    }
                }
            }
        }
        Ok(failures)
    }
}

#[test]
#[ignore = "needs CUDA and cuBLAS: run on the GPU machine by stage/run-gpu.sh"]
fn matmul_against_cublas_table() {
    let failures = run_test(Table);
    assert!(failures.is_empty(), "{failures:#?}");
}
