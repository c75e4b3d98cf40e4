//! The small kernels: embedding gather, SwiGLU, residual add.

use anyhow::{ensure, Result};
use cubecl::prelude::*;

use crate::error::same_shape;
use crate::grid;
use crate::matmul::RowChunked;
use crate::{DeviceTensor, KernelError};

#[cube(launch)]
fn embedding_kernel<F: Float, O: Float>(
    ids: &Array<u32>,
    table: &Array<F>,
    out: &mut Array<O>,
    row0: usize,
    rows: usize,
    dim: usize,
    total: usize,
) {
    let idx = ABSOLUTE_POS;
    if idx < total {
        let t = idx / dim;
        let d = idx % dim;
        let id = ids[t] as usize;
        if id >= row0 && id < row0 + rows {
            out[idx] = O::cast_from(table[(id - row0) * dim + d]);
        }
    }
}

/// `out[t] = table[ids[t]]` (rows of a possibly row-chunked [vocab, d] table).
/// `ids_host` are the same ids, checked here against the vocabulary before any launch.
pub fn embedding<R: Runtime, F: Float + CubeElement, O: Float + CubeElement>(
    client: &ComputeClient<R>,
    ids: &DeviceTensor<R, u32>,
    ids_host: &[u32],
    table: &RowChunked<R, F>,
    out: &DeviceTensor<R, O>,
) -> Result<()> {
    let tokens = ids_host.len();
    ensure!(
        ids.shape == [tokens],
        KernelError::shape(
            "embedding",
            "ids",
            format!("[{tokens}] (one per host id)"),
            &ids.shape
        )
    );
    ensure!(
        out.shape == [tokens, table.k],
        KernelError::shape(
            "embedding",
            "out",
            format!("[{tokens}, {}]", table.k),
            &out.shape
        )
    );
    if let Some(&id) = ids_host.iter().find(|&&i| i as usize >= table.n) {
        return Err(KernelError::TokenOutsideVocab { id, vocab: table.n }.into());
    }
    let total = tokens * table.k;
    let (cubes, dim) = grid::elementwise(client, total);
    let mut row0 = 0;
    for chunk in &table.chunks {
        let rows = chunk.shape[0];
        embedding_kernel::launch::<F, O, R>(
            client,
            cubes.clone(),
            dim,
            ids.arg(),
            chunk.arg(),
            out.arg(),
            row0,
            rows,
            table.k,
            total,
        );
        row0 += rows;
    }
    Ok(())
}

/// `silu(g) · u` in f32: SwiGLU of one value, as every kernel that fuses it computes it (the
/// same expression, so the same bits as [`swiglu`]).
#[cube]
pub fn silu_mul(g: f32, u: f32) -> f32 {
    g / (1.0 + f32::exp(-g)) * u
}

#[cube(launch)]
fn swiglu_kernel<F: Float>(gate: &Array<F>, up: &Array<F>, out: &mut Array<F>, total: usize) {
    let idx = ABSOLUTE_POS;
    if idx < total {
        let g = f32::cast_from(gate[idx]);
        let u = f32::cast_from(up[idx]);
        out[idx] = F::cast_from(silu_mul(g, u));
    }
}

/// `out = silu(gate) · up`, computed in f32. `out` may be `gate` itself.
pub fn swiglu<R: Runtime, F: Float + CubeElement>(
    client: &ComputeClient<R>,
    gate: &DeviceTensor<R, F>,
    up: &DeviceTensor<R, F>,
    out: &DeviceTensor<R, F>,
) -> Result<()> {
    same_shape("swiglu", ("gate", &gate.shape), ("up", &up.shape))?;
    same_shape("swiglu", ("out", &out.shape), ("up", &up.shape))?;
    let total = up.len();
    let (cubes, dim) = grid::elementwise(client, total);
    swiglu_kernel::launch::<F, R>(client, cubes, dim, gate.arg(), up.arg(), out.arg(), total);
    Ok(())
}

#[cube(launch)]
fn add_kernel<X: Float, Y: Float>(x: &mut Array<X>, y: &Array<Y>, total: usize) {
    let idx = ABSOLUTE_POS;
    if idx < total {
        x[idx] = X::cast_from(f32::cast_from(x[idx]) + f32::cast_from(y[idx]));
    }
}

/// `x += y` (the residual add), in f32.
pub fn add_assign<R: Runtime, X: Float + CubeElement, Y: Float + CubeElement>(
    client: &ComputeClient<R>,
    x: &DeviceTensor<R, X>,
    y: &DeviceTensor<R, Y>,
) -> Result<()> {
    same_shape("add", ("y", &y.shape), ("x", &x.shape))?;
    let total = x.len();
    let (cubes, dim) = grid::elementwise(client, total);
    add_kernel::launch::<X, Y, R>(client, cubes, dim, x.arg(), y.arg(), total);
    Ok(())
}

/// f64 reference of SwiGLU.
pub fn swiglu_reference(gate: &[f64], up: &[f64]) -> Vec<f64> {
    gate.iter()
        .zip(up)
        .map(|(g, u)| g / (1.0 + (-g).exp()) * u)
        .collect()
}

#[cube(launch)]
fn copy_rows_kernel<F: Float>(src: &Array<F>, dst: &mut Array<F>, offset: usize, total: usize) {
    let idx = ABSOLUTE_POS;
    if idx < total {
        dst[idx] = src[offset + idx];
    }
}

/// Rows `first..first + count` of `src` ([rows, cols]) as a new [count, cols] tensor.
pub fn copy_rows<R: Runtime, F: Float + CubeElement>(
    client: &ComputeClient<R>,
    src: &DeviceTensor<R, F>,
    first: usize,
    count: usize,
) -> Result<DeviceTensor<R, F>> {
    ensure!(
        src.shape.len() == 2,
        KernelError::shape("copy_rows", "src", "[rows, cols]", &src.shape)
    );
    let (rows, cols) = (src.shape[0], src.shape[1]);
    ensure!(
        count > 0 && first + count <= rows,
        KernelError::invalid(
            "copy_rows",
            format!("rows {first}..{} of {rows}", first + count)
        )
    );
    let dst = DeviceTensor::<R, F>::empty(client, &[count, cols])?;
    let total = count * cols;
    let (cubes, dim) = grid::elementwise(client, total);
    copy_rows_kernel::launch::<F, R>(
        client,
        cubes,
        dim,
        src.arg(),
        dst.arg(),
        first * cols,
        total,
    );
    Ok(dst)
}
