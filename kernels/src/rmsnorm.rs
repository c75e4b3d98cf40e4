//! RMSNorm: `y = x / sqrt(mean(x²) + eps) * w`, one row per cube.
//!
//! Input `I` (the f32 residual stream, or f16), output `O` (f16 for the matmuls), weight in f32,
//! sum of squares and scaling in f32. [`residual_add_rms_norm`] fuses `x += r` before the norm.

use anyhow::{ensure, Result};
use cubecl::prelude::*;

use crate::error::same_shape;
use crate::reduce::{reduce_sum, Reduction};
use crate::{DeviceTensor, KernelError};

/// Threads per row (a power of two, as the reduction needs).
pub const BLOCK: usize = 256;

#[cube(launch)]
fn rms_norm_kernel<I: Float, O: Float, Rs: Float>(
    input: &mut Array<I>,
    residual: &Array<Rs>,
    weight: &Array<f32>,
    output: &mut Array<O>,
    cols: usize,
    eps: f32,
    #[comptime] row_sum: Reduction,
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
        i += row_sum.units;
    }
    let sum_sq = reduce_sum::<f32>(partial, row_sum);

    let scale = f32::inverse_sqrt(sum_sq / f32::cast_from(cols) + eps);
    let mut j = tid;
    while j < cols {
        let v = f32::cast_from(input[base + j]);
        output[base + j] = O::cast_from(v * scale * weight[j]);
        j += row_sum.units;
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
    same_shape("residual_add_rms_norm", ("r", &r.shape), ("x", &x.shape))?;
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
        KernelError::shape("rms_norm", "input", "[rows, cols]", &input.shape)
    );
    let (rows, cols) = (input.shape[0], input.shape[1]);
    ensure!(
        weight.shape == [cols],
        KernelError::shape("rms_norm", "weight", format!("[{cols}]"), &weight.shape)
    );
    same_shape(
        "rms_norm",
        ("output", &output.shape),
        ("input", &input.shape),
    )?;
    ensure!(
        eps.is_finite() && eps > 0.0,
        KernelError::invalid("rms_norm", format!("eps must be > 0, got {eps}"))
    );
    let max_rows = client.properties().hardware.max_cube_count.0 as usize;
    ensure!(
        rows <= max_rows,
        KernelError::unsupported(
            "rms_norm",
            format!("at most {max_rows} rows per launch on this device, got {rows}")
        )
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
        CubeCount::new_1d(rows as u32),
        CubeDim::new_1d(BLOCK as u32),
        input.arg(),
        residual_arg,
        weight.arg(),
        output.arg(),
        cols,
        eps,
        Reduction::cube(client, BLOCK),
        residual.is_some(),
    );
    Ok(())
}

/// f64 reference: rows of `x` (`[rows][cols]`, row-major) normalised and scaled by `w`.
pub fn reference(x: &[f64], w: &[f64], cols: usize, eps: f64) -> Vec<f64> {
    x.chunks(cols)
        .flat_map(|row| {
            let ms = row.iter().map(|v| v * v).sum::<f64>() / cols as f64;
            let s = 1.0 / (ms + eps).sqrt();
            row.iter().zip(w).map(move |(v, w)| v * s * w)
        })
        .collect()
}
