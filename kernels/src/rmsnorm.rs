//! RMSNorm: `y = x / sqrt(mean(x²) + eps) * w`, one row per cube.
//!
//! Input `I` (the f32 residual stream, or f16), output `O` (f16 for the matmuls), weight in f32,
//! sum of squares and scaling in f32. [`residual_add_rms_norm`] fuses `x += r` before the norm.

use anyhow::{ensure, Result};
use cubecl::prelude::*;

use crate::DeviceTensor;

/// Threads per row. A power of two (the tree reduction halves it).
pub const BLOCK: usize = 256;

#[cube(launch)]
fn rms_norm_kernel<I: Float, O: Float, Rs: Float>(
    input: &mut Array<I>,
    residual: &Array<Rs>,
    weight: &Array<f32>,
    output: &mut Array<O>,
    cols: usize,
    eps: f32,
    #[comptime] block: usize,
    #[comptime] add_residual: bool,
) {
    let row = CUBE_POS;
    let tid = UNIT_POS as usize;
    let base = row * cols;

    let mut partial = 0.0f32;
    let mut i = tid;
    while i < cols {
        let mut v = f32::cast_from(input[base + i]);
        if comptime!(add_residual) {
            v += f32::cast_from(residual[base + i]);
            input[base + i] = I::cast_from(v);
        }
        partial += v * v;
        i += block;
    }

    let mut sums = SharedMemory::<f32>::new(block);
    sums[tid] = partial;
    sync_cube();

    // CUBE_DIM == block; a runtime value so the loop variable is mutable.
    let mut stride = CUBE_DIM as usize / 2;
    while stride > 0 {
        if tid < stride {
            sums[tid] = sums[tid] + sums[tid + stride];
        }
        sync_cube();
        stride /= 2;
    }

    let scale = f32::inverse_sqrt(sums[0] / f32::cast_from(cols) + eps);
    let mut j = tid;
    while j < cols {
        let v = f32::cast_from(input[base + j]);
        output[base + j] = O::cast_from(v * scale * weight[j]);
        j += block;
    }
}

/// RMSNorm over the last dimension of `input` ([rows, cols]) into `output` (same shape).
pub fn rms_norm<R: Runtime, I: Float + CubeElement, O: Float + CubeElement>(
    client: &ComputeClient<R>,
    input: &DeviceTensor<R, I>,
    weight: &DeviceTensor<R, f32>,
    output: &DeviceTensor<R, O>,
    eps: f32,
) -> Result<()> {
    launch::<R, I, O, f32>(client, input, None, weight, output, eps)
}

/// `x += r` (the residual add, stored back into `x`), then `output = rmsnorm(x)`.
pub fn residual_add_rms_norm<
    R: Runtime,
    I: Float + CubeElement,
    Rs: Float + CubeElement,
    O: Float + CubeElement,
>(
    client: &ComputeClient<R>,
    x: &DeviceTensor<R, I>,
    r: &DeviceTensor<R, Rs>,
    weight: &DeviceTensor<R, f32>,
    output: &DeviceTensor<R, O>,
    eps: f32,
) -> Result<()> {
    ensure!(
        r.shape == x.shape,
        "residual_add_rms_norm: r {:?} differs from x {:?}",
        r.shape,
        x.shape
    );
    launch::<R, I, O, Rs>(client, x, Some(r), weight, output, eps)
}

fn launch<R: Runtime, I: Float + CubeElement, O: Float + CubeElement, Rs: Float + CubeElement>(
    client: &ComputeClient<R>,
    input: &DeviceTensor<R, I>,
    residual: Option<&DeviceTensor<R, Rs>>,
    weight: &DeviceTensor<R, f32>,
    output: &DeviceTensor<R, O>,
    eps: f32,
) -> Result<()> {
    ensure!(
        input.shape.len() == 2,
        "rms_norm: input must be [rows, cols], got {:?}",
        input.shape
    );
    let (rows, cols) = (input.shape[0], input.shape[1]);
    ensure!(
        weight.shape == [cols],
        "rms_norm: weight must be [{cols}], got {:?}",
        weight.shape
    );
    ensure!(
        output.shape == input.shape,
        "rms_norm: output shape {:?} differs from input {:?}",
        output.shape,
        input.shape
    );
    ensure!(
        eps.is_finite() && eps > 0.0,
        "rms_norm: eps must be > 0, got {eps}"
    );
    ensure!(
        rows <= 65535,
        "rms_norm: at most 65535 rows per launch, got {rows}"
    );
    let dummy;
    let residual_arg = match residual {
        Some(r) => r.arg(),
        None => {
            dummy = DeviceTensor::<R, Rs>::empty(client, &[1])?;
            dummy.arg()
        }
    };
    rms_norm_kernel::launch::<I, O, Rs, R>(
        client,
        CubeCount::Static(rows as u32, 1, 1),
        CubeDim::new_1d(BLOCK as u32),
        input.arg(),
        residual_arg,
        weight.arg(),
        output.arg(),
        cols,
        eps,
        BLOCK,
        residual.is_some(),
    );
    Ok(())
}

/// f64 reference: rows of `x` ([rows][cols], row-major) normalised and scaled by `w`.
pub fn reference(x: &[f64], w: &[f64], cols: usize, eps: f64) -> Vec<f64> {
    x.chunks(cols)
        .flat_map(|row| {
            let ms = row.iter().map(|v| v * v).sum::<f64>() / cols as f64;
            let s = 1.0 / (ms + eps).sqrt();
            row.iter().zip(w).map(move |(v, w)| v * s * w)
        })
        .collect()
}
