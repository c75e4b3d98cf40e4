//! GEMVs fused for a short block of rows (a short prompt's chunk, or one token through the
//! general kernels): fewer launches where the time of a short prefill goes to launching.
//!
//! | kernel | does | replaces |
//! |---|---|---|
//! | [`gemv_qkv`] | q, k, v = `F(h·Wᵀ + b)` of three weights in one launch | 3 `matmul` |
//! | [`gemv_gate_up_swiglu`] | `F(silu(F(h·W_gateᵀ))·F(h·W_upᵀ))` in one launch | 2 `matmul`, `swiglu` |
//!
//! Both are the `Gemv` matmul variant's dot product ([`crate::matmul::gemv_partials`], the
//! same threads an output and rows a cube) and round where the unfused kernels store, so they
//! compute the same values as those, bit for bit (the tests check it, and against f64); the
//! gate/up kernel also runs on tensor cores ([`crate::gemv_mma`], the same bits as
//! `GemvMma` matmuls). The forward pass takes them where `Auto` gives every weight involved
//! to a GEMV.
//!
//! References: [`crate::matmul::reference`] for each projection, [`reference_gate_up_swiglu`].

use anyhow::{bail, ensure, Result};
use cubecl::prelude::*;
use cubecl::server::CubeCountSelection;

use crate::elementwise::silu_mul;
use crate::gemv_mma::{gate_up_swiglu_mma, qkv_mma, GemvMma};
use crate::matmul::{
    gemv_partials, gemv_rows, gemv_shape, product_shape, vector_size, MatmulVariant,
};
use crate::reduce::{reduce_in_plane, ReduceOp, Reduction};
use crate::{DeviceTensor, KernelError};

/// q, k and v of x rows: cubes `[0, groups_q)` of a block of rows compute q's outputs
/// (`dot.units / dot.group` a cube, one per plane row), then `groups_kv` cubes k's, then
/// `groups_kv` v's; each output plus its bias, rounded to `F`.
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
fn gemv_qkv_kernel<F: Float, V: Size>(
    x: &Array<Vector<F, V>>,
    wq: &Array<Vector<F, V>>,
    wk: &Array<Vector<F, V>>,
    wv: &Array<Vector<F, V>>,
    bq: &Array<f32>,
    bk: &Array<f32>,
    bv: &Array<f32>,
    q_out: &mut Array<F>,
    k_out: &mut Array<F>,
    v_out: &mut Array<F>,
    m: usize,
    nq: usize,
    nkv: usize,
    k_vec: usize,
    groups_q: usize,
    groups_kv: usize,
    #[comptime] dot: Reduction,
    #[comptime] rows: usize,
) {
    let per_cube = comptime!(dot.units / dot.group);
    let groups = groups_q + 2 * groups_kv;
    let row0 = (CUBE_POS / groups) * rows;
    let g = CUBE_POS % groups;
    // Which projection (0 q, 1 k, 2 v) and which of its outputs this plane row computes.
    let mut sec: u32 = 2u32;
    let mut first: usize = groups_q + groups_kv;
    let mut n: usize = nkv;
    if g < groups_q {
        sec = 0u32;
        first = 0;
        n = nq;
    } else if g < groups_q + groups_kv {
        sec = 1u32;
        first = groups_q;
    }
    let col = (g - first) * per_cube + UNIT_POS_Y as usize;
    let live = row0 < m && col < n;

    let mut partial = Array::<f32>::new(rows);
    if sec == 0u32 {
        gemv_partials::<F, V>(
            x,
            wq,
            col,
            row0,
            m,
            k_vec,
            live,
            &mut partial,
            dot.group,
            rows,
        );
    } else if sec == 1u32 {
        gemv_partials::<F, V>(
            x,
            wk,
            col,
            row0,
            m,
            k_vec,
            live,
            &mut partial,
            dot.group,
            rows,
        );
    } else {
        gemv_partials::<F, V>(
            x,
            wv,
            col,
            row0,
            m,
            k_vec,
            live,
            &mut partial,
            dot.group,
            rows,
        );
    }
    #[unroll]
    for r in 0..rows {
        let acc = reduce_in_plane::<f32>(partial[r], ReduceOp::Sum, dot);
        if UNIT_POS_X == 0 && live && row0 + r < m {
            let at = (row0 + r) * n + col;
            if sec == 0u32 {
                q_out[at] = F::cast_from(acc + bq[col]);
            } else if sec == 1u32 {
                k_out[at] = F::cast_from(acc + bk[col]);
            } else {
                v_out[at] = F::cast_from(acc + bv[col]);
            }
        }
    }
}

/// `out = F(silu(g)·u)` with g, u = `F(x·Wᵀ)` of the gate and up weights: plane row `2j` of a
/// cube computes the gate output of its column `j`, row `2j + 1` the up output; the cube meets
/// in shared memory for the product.
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
fn gemv_gate_up_swiglu_kernel<F: Float, V: Size>(
    x: &Array<Vector<F, V>>,
    w_gate: &Array<Vector<F, V>>,
    w_up: &Array<Vector<F, V>>,
    out: &mut Array<F>,
    m: usize,
    n: usize,
    k_vec: usize,
    groups: usize,
    #[comptime] dot: Reduction,
    #[comptime] rows: usize,
) {
    let cols = comptime!(dot.units / dot.group / 2);
    let row0 = (CUBE_POS / groups) * rows;
    let ty = UNIT_POS_Y as usize;
    let col = (CUBE_POS % groups) * cols + ty / 2;
    let live = row0 < m && col < n;

    let mut partial = Array::<f32>::new(rows);
    if ty.is_multiple_of(2) {
        gemv_partials::<F, V>(
            x,
            w_gate,
            col,
            row0,
            m,
            k_vec,
            live,
            &mut partial,
            dot.group,
            rows,
        );
    } else {
        gemv_partials::<F, V>(
            x,
            w_up,
            col,
            row0,
            m,
            k_vec,
            live,
            &mut partial,
            dot.group,
            rows,
        );
    }
    // [plane row][x row]: the rounded gate and up outputs.
    let mut meet = SharedMemory::<f32>::new(comptime!(2 * cols * rows));
    #[unroll]
    for r in 0..rows {
        let acc = reduce_in_plane::<f32>(partial[r], ReduceOp::Sum, dot);
        if UNIT_POS_X == 0 {
            meet[ty * rows + r] = f32::cast_from(F::cast_from(acc));
        }
    }
    sync_cube();
    let mut i = UNIT_POS as usize;
    while i < comptime!(cols * rows) {
        let (c, r) = (i / rows, i % rows);
        let col = (CUBE_POS % groups) * cols + c;
        if row0 + r < m && col < n {
            let g = meet[2 * c * rows + r];
            let u = meet[(2 * c + 1) * rows + r];
            out[(row0 + r) * n + col] = F::cast_from(silu_mul(g, u));
        }
        i += comptime!(dot.units);
    }
}

/// The GEMV's launch shape for `m` rows of k (`vec`-element vectors): (threads an output,
/// outputs a cube), the latter even where `pair` (gate and up outputs side by side).
fn shape<R: Runtime>(
    client: &ComputeClient<R>,
    m: usize,
    k_vec: usize,
    pair: bool,
) -> Result<(usize, usize)> {
    let (mut threads, per_cube) = gemv_shape(client, m, k_vec)?;
    if !pair {
        return Ok((threads, per_cube));
    }
    let per_cube = (per_cube & !1).max(2);
    while threads * per_cube > 1024 {
        threads /= 2;
    }
    Ok((threads, per_cube))
}

/// Cubes for `m` rows over `groups` cubes of outputs, `rows` x rows a cube.
fn cube_count<R: Runtime>(
    client: &ComputeClient<R>,
    op: &'static str,
    m: usize,
    groups: usize,
    rows: usize,
) -> Result<CubeCount> {
    let cubes = u32::try_from(m.div_ceil(rows) * groups)
        .map_err(|_| KernelError::unsupported(op, format!("{m} rows are too many")))?;
    Ok(CubeCountSelection::new(client, cubes).cube_count())
}

/// `t` viewed as vectors of `vec` elements (its last dimension a multiple of `vec`).
fn vectors<R: Runtime, F: CubeElement>(t: &DeviceTensor<R, F>, vec: usize) -> ArrayArg<R> {
    // SAFETY: the same buffer, `len / vec` vectors of `vec` elements; callers check that the
    // row length (k) is a multiple of `vec`.
    unsafe { ArrayArg::from_raw_parts(t.handle.clone(), t.len() / vec) }
}

/// Which kernel a fused GEMV of `variant` runs: `None` for `Gemv` (this module's), the
/// tensor-core kernel's mode for `GemvMma` ([`crate::gemv_mma`]); any other variant is an error
/// of `op`.
fn tensor_cores<R: Runtime>(
    client: &ComputeClient<R>,
    variant: MatmulVariant,
    op: &'static str,
) -> Result<Option<GemvMma>> {
    match variant {
        MatmulVariant::Gemv => Ok(None),
        MatmulVariant::GemvMma => Ok(Some(GemvMma::for_device(client))),
        v => bail!(KernelError::unsupported(op, format!("the {v:?} matmul"))),
    }
}

/// `q, k, v = x·Wᵀ + b` for the three projections in one launch: x `[m, k]`, `w[i]` `[n_i, k]`
/// (k and v of one width), `b[i]` `[n_i]` (f32), `out[i]` `[m, n_i]`; with the products of
/// `variant`: `Gemv` (this module's kernel) or `GemvMma` (tensor cores, [`crate::gemv_mma`]).
pub fn gemv_qkv<R: Runtime, F: Float + CubeElement>(
    client: &ComputeClient<R>,
    variant: MatmulVariant,
    x: &DeviceTensor<R, F>,
    w: [&DeviceTensor<R, F>; 3],
    b: [&DeviceTensor<R, f32>; 3],
    out: [&DeviceTensor<R, F>; 3],
) -> Result<()> {
    let op = "gemv q/k/v";
    let mut n = [0; 3];
    let (mut m, mut k) = (0, 0);
    for i in 0..3 {
        (m, k, n[i]) = product_shape(x, w[i])?;
        ensure!(
            b[i].shape == [n[i]],
            KernelError::shape(op, "bias", format!("[{}]", n[i]), &b[i].shape)
        );
        ensure!(
            out[i].shape == [m, n[i]],
            KernelError::shape(op, "out", format!("[{m}, {}]", n[i]), &out[i].shape)
        );
    }
    ensure!(
        n[1] == n[2],
        KernelError::unsupported(op, format!("k has {} outputs and v {}", n[1], n[2]))
    );
    if let Some(how) = tensor_cores(client, variant, op)? {
        return qkv_mma(client, how, x, w, b, out);
    }
    let vec = vector_size(client, size_of::<F>(), k);
    let (threads, per_cube) = shape(client, m, k / vec, false)?;
    let (groups_q, groups_kv) = (n[0].div_ceil(per_cube), n[1].div_ceil(per_cube));
    let rows = gemv_rows(client, m, groups_q + 2 * groups_kv);
    gemv_qkv_kernel::launch::<F, R>(
        client,
        cube_count(client, op, m, groups_q + 2 * groups_kv, rows)?,
        CubeDim::new_2d(threads as u32, per_cube as u32),
        vec,
        vectors(x, vec),
        vectors(w[0], vec),
        vectors(w[1], vec),
        vectors(w[2], vec),
        b[0].arg(),
        b[1].arg(),
        b[2].arg(),
        out[0].arg(),
        out[1].arg(),
        out[2].arg(),
        m,
        n[0],
        n[1],
        k / vec,
        groups_q,
        groups_kv,
        Reduction::new(client, threads * per_cube, threads),
        rows,
    );
    Ok(())
}

/// `out = silu(x·W_gateᵀ)·(x·W_upᵀ)`, each product rounded to `F` first (as the unfused
/// matmuls store them): x `[m, k]`, the weights `[n, k]`, out `[m, n]`; with the products of
/// `variant`: `Gemv` (this module's kernel) or `GemvMma` (tensor cores,
/// [`crate::gemv_mma::gate_up_swiglu_mma`]; emulated where the device has no mma).
pub fn gemv_gate_up_swiglu<R: Runtime, F: Float + CubeElement>(
    client: &ComputeClient<R>,
    variant: MatmulVariant,
    x: &DeviceTensor<R, F>,
    w_gate: &DeviceTensor<R, F>,
    w_up: &DeviceTensor<R, F>,
    out: &DeviceTensor<R, F>,
) -> Result<()> {
    let op = "gemv gate/up + SwiGLU";
    let (m, k, n) = product_shape(x, w_gate)?;
    ensure!(
        w_up.shape == w_gate.shape,
        KernelError::shape(op, "W_up", format!("{:?}", w_gate.shape), &w_up.shape)
    );
    ensure!(
        out.shape == [m, n],
        KernelError::shape(op, "out", format!("[{m}, {n}]"), &out.shape)
    );
    if let Some(how) = tensor_cores(client, variant, op)? {
        return gate_up_swiglu_mma(client, how, x, w_gate, w_up, out);
    }
    let vec = vector_size(client, size_of::<F>(), k);
    let (threads, per_cube) = shape(client, m, k / vec, true)?;
    let groups = n.div_ceil(per_cube / 2);
    let rows = gemv_rows(client, m, groups);
    gemv_gate_up_swiglu_kernel::launch::<F, R>(
        client,
        cube_count(client, op, m, groups, rows)?,
        CubeDim::new_2d(threads as u32, per_cube as u32),
        vec,
        vectors(x, vec),
        vectors(w_gate, vec),
        vectors(w_up, vec),
        out.arg(),
        m,
        n,
        k / vec,
        groups,
        Reduction::new(client, threads * per_cube, threads),
        rows,
    );
    Ok(())
}

/// f64 reference of [`gemv_gate_up_swiglu`] (no rounding): x `[m, k]`, weights `[n, k]`.
pub fn reference_gate_up_swiglu(
    x: &[f64],
    w_gate: &[f64],
    w_up: &[f64],
    m: usize,
    n: usize,
    k: usize,
) -> Vec<f64> {
    let gate = crate::matmul::reference(x, w_gate, None, m, n, k);
    let up = crate::matmul::reference(x, w_up, None, m, n, k);
    crate::elementwise::swiglu_reference(&gate, &up)
}
