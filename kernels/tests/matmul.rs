//! Matmul parity: every variant against the f64 reference at Qwen shapes.

use anyhow::Result;
use cubecl::prelude::*;
use cubeqwen_kernels::matmul::{cmma_supported, matmul, reference, MatmulVariant, RowChunked};
use cubeqwen_kernels::runtime::RuntimeJob;
use cubeqwen_kernels::testing::*;
use cubeqwen_kernels::DeviceTensor;
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
struct Case {
    variant: MatmulVariant,
    m: usize,
    n: usize,
    k: usize,
    bias: bool,
    seed: u64,
}

impl RuntimeJob for Case {
    type Output = f64;
    fn run<R: Runtime>(self, client: ComputeClient<R>, _device: &str) -> Result<f64> {
        let Case {
            variant,
            m,
            n,
            k,
            bias,
            seed,
        } = self;
        let mut rng = Rng::new(seed);
        let x = rng.f16_vec(m * k, 0.0, 1.0);
        let w = rng.f16_vec(n * k, 0.0, 1.0 / (k as f64).sqrt());
        let b = rng.f32_vec(n, 0.1, 0.5);
        let xd = DeviceTensor::<R, f16>::from_slice(&client, &x, &[m, k])?;
        let bd = DeviceTensor::<R, f32>::from_slice(&client, &b, &[n])?;
        let yd = DeviceTensor::<R, f16>::from_slice(&client, &vec![POISON_F16; m * n], &[m, n])?;
        // Weights over 64 MiB go in row chunks: they exercise the chunked path on every device,
        // and wgpu could not hold the lm_head in one buffer.
        if n * k * 2 > 64 << 20 {
            let wc = RowChunked::<R, f16>::upload_rows(&client, &w, n, k, (32 << 20) / k)?;
            println!("  ({} row chunks)", wc.chunks.len());
            wc.matmul(&client, variant, &xd, bias.then_some(&bd), &yd)?;
        } else {
            let wd = DeviceTensor::<R, f16>::from_slice(&client, &w, &[n, k])?;
            matmul(&client, variant, &xd, &wd, bias.then_some(&bd), &yd)?;
        }
        let y = yd.to_vec(&client)?;

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
            "matmul {variant:?} m={m:5} n={n:6} k={k:5} bias={bias}: rel_err={err:.3e} (rows checked {}, seed {seed})",
            rows.len()
        );
        anyhow::ensure!(unwritten == 0, "{unwritten} outputs left unwritten");
        Ok(err)
    }
}

fn run_shapes(variant: MatmulVariant, rows: &[usize]) {
    let shapes: Vec<(usize, usize)> = SHAPES_05B.to_vec();
    let mut rows = rows.to_vec();
    if full_shapes() {
        // On the GPU: long row counts. The 1.5B/7B widths are in the cuBLAS table
        // (tests/cublas.rs), which runs there too.
        rows.extend([128, 2048]);
    }
    for &m in &rows {
        for &(n, k) in &shapes {
            // The software Vulkan device of CI is slow: the full lm_head only for few rows there;
            // on the GPU the products past 2e10 multiply-adds are left to the cuBLAS table.
            let work = n * k * m;
            if (work > 400_000_000 && !full_shapes()) || work > 20_000_000_000 {
                continue;
            }
            for bias in [true, false] {
                let seed = fresh_seed() ^ (m * 1_000_003 + n * 7 + k) as u64;
                let err = run_test(Case {
                    variant,
                    m,
                    n,
                    k,
                    bias,
                    seed,
                });
                assert!(
                    err <= TOL,
                    "{variant:?} m={m} n={n} k={k} seed={seed}: rel_err {err:.3e} > {TOL:.0e}"
                );
            }
        }
    }
}

#[test]
fn matmul_tiled_qwen_shapes() {
    run_shapes(MatmulVariant::Tiled, &[1, 7, 33]);
}

#[test]
fn matmul_gemv_qwen_shapes() {
    run_shapes(MatmulVariant::Gemv, &[1, 2, 7]);
}

#[test]
fn matmul_auto_qwen_shapes() {
    run_shapes(MatmulVariant::Auto, &[1, 7]);
}

struct CmmaProbe;
impl RuntimeJob for CmmaProbe {
    type Output = bool;
    fn run<R: Runtime>(self, client: ComputeClient<R>, _device: &str) -> Result<bool> {
        Ok(cmma_supported(&client))
    }
}

struct CmmaRefused;
impl RuntimeJob for CmmaRefused {
    type Output = String;
    fn run<R: Runtime>(self, client: ComputeClient<R>, _device: &str) -> Result<String> {
        let x = DeviceTensor::<R, f16>::from_slice(&client, &[f16::ONE; 16], &[1, 16])?;
        let y = DeviceTensor::<R, f16>::empty(&client, &[1, 1])?;
        let w = DeviceTensor::<R, f16>::from_slice(&client, &[f16::ONE; 16], &[1, 16])?;
        Ok(matmul(&client, MatmulVariant::Cmma, &x, &w, None, &y)
            .unwrap_err()
            .to_string())
    }
}

/// Tensor cores exist on CUDA only: there the variant must match the reference; on a device
/// without them it must refuse with a clear error (run on the H100 by stage/run-gpu.sh).
#[test]
fn matmul_cmma_qwen_shapes() {
    if run_test(CmmaProbe) {
        run_shapes(MatmulVariant::Cmma, &[1, 7, 33]);
    } else {
        let msg = run_test(CmmaRefused);
        println!("cmma not available on this device; refused with: {msg}");
        assert!(msg.contains("no f16 tensor cores"), "{msg}");
    }
}

struct BadShapes;
impl RuntimeJob for BadShapes {
    type Output = Vec<String>;
    fn run<R: Runtime>(self, client: ComputeClient<R>, _device: &str) -> Result<Vec<String>> {
        let x = DeviceTensor::<R, f16>::from_slice(&client, &[f16::ONE; 8], &[2, 4])?;
        let w = DeviceTensor::<R, f16>::from_slice(&client, &[f16::ONE; 15], &[3, 5])?;
        let w_ok = DeviceTensor::<R, f16>::from_slice(&client, &[f16::ONE; 12], &[3, 4])?;
        let y = DeviceTensor::<R, f16>::empty(&client, &[2, 3])?;
        let b = DeviceTensor::<R, f32>::from_slice(&client, &[1.0; 4], &[4])?;
        Ok(vec![
            matmul(&client, MatmulVariant::Tiled, &x, &w, None, &y)
                .unwrap_err()
                .to_string(),
            matmul(&client, MatmulVariant::Gemv, &x, &w_ok, Some(&b), &y)
                .unwrap_err()
                .to_string(),
            cubeqwen_kernels::matmul::matmul_into(
                &client,
                MatmulVariant::Tiled,
                &x,
                &w_ok,
                None,
                &y,
                1,
            )
            .unwrap_err()
            .to_string(),
        ])
    }
}

#[test]
fn matmul_rejects_bad_shapes() {
    let msgs = run_test(BadShapes);
    assert!(msgs[0].contains("W must be [n, 4]"), "{}", msgs[0]);
    assert!(msgs[1].contains("bias must be [3]"), "{}", msgs[1]);
    assert!(msgs[2].contains("y must be [2, 4]"), "{}", msgs[2]);
}
