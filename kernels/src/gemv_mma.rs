//! Short matmuls (2 to 32 rows of x: a short prompt's chunk) on tensor cores: `y = x·Wᵀ (+ b)`
//! and the fused gate/up + SwiGLU, f16 in, f32 accumulate.
//!
//! The scalar GEMV ([`crate::matmul`]'s `Gemv`) multiplies each weight vector with every row
//! in f32 FMAs after converting both: at 16 rows its instructions, not the weights' bytes, set
//! the time (ncu, H200, 0.5B: the down projection 30.7 µs and gate/up 41.9 µs for 8.7 and 17.4
//! MB). Here a plane computes a 16 × 8 tile (16 rows of x, 8 outputs) with `mma.m16n8k16`:
//! per 32 values of k each lane loads 16 bytes of its weight row and of x rows `g` and `g + 8`
//! (`g = lane / 4`, `t = lane % 4`), and two mmas consume them. The mma's k order is free (a
//! dot product does not care), so lane `t`'s fragment columns `2t, 2t+1, 8+2t, 9+2t` are
//! taken as the 8 contiguous values `8t..8t+8` of the chunk, split in two mmas: one 16-byte
//! load per lane and operand, the same mapping for A and B. `planes` planes of a cube share
//! the k chunks of one tile (every plane runs the same comptime number of steps, out-of-range
//! chunks as zeros) and add their tiles in shared memory.
//!
//! On CUDA (sm_80+, [`crate::flash::mma_supported`]) the mma is the instruction; elsewhere
//! [`GemvMma::Emulated`] runs the same code with each mma through shared memory (the tests on
//! wgpu). References: [`crate::matmul::reference`],
//! [`crate::fused_gemv::reference_gate_up_swiglu`].

use anyhow::{ensure, Result};
use cubecl::ir::{ElemType, FloatKind};
use cubecl::prelude::*;
use half::f16;

use crate::elementwise::silu_mul;
use crate::flash::{mma_16816, mma_supported, Pair16, Pair32};
use crate::matmul::{product_shape, vector_size};
use crate::{DeviceTensor, KernelError};

/// k values a plane consumes per step (two mmas of 16).
const CHUNK: usize = 32;
/// Most planes sharing one tile's k.
const MAX_PLANES: usize = 8;
/// Steps a plane takes at least before another plane joins a tile.
const STEPS_PER_PLANE: usize = 8;
/// x rows of one mma tile.
pub const TILE_ROWS: usize = 16;
/// Outputs of one mma tile.
const TILE_COLS: usize = 8;

/// How the tensor-core GEMV runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GemvMma {
    /// `mma.m16n8k16` (CUDA, sm_80+).
    Native,
    /// Each mma through shared memory: any runtime, slow (tests).
    Emulated,
}

impl GemvMma {
    /// `Native` where the device has the instruction, else `None`.
    pub fn native<R: Runtime>(client: &ComputeClient<R>) -> Option<Self> {
        mma_supported(client).then_some(Self::Native)
    }

    /// How `client`'s device runs the tensor-core GEMV: `Native` where it has the
    /// instruction, else `Emulated`.
    pub fn for_device<R: Runtime>(client: &ComputeClient<R>) -> Self {
        Self::native(client).unwrap_or(Self::Emulated)
    }
}

/// The 8 f16 values `e0..e0 + 8` of row `row` of `a` (`[rows, k_vec]` vectors of `V`), zeros
/// where `live` is false.
#[cube]
fn load8<V: Size>(
    a: &Array<Vector<f16, V>>,
    row: usize,
    e0: usize,
    live: bool,
    #[comptime] k_vec: usize,
) -> Array<f16> {
    let per = V::value().comptime();
    let mut out = Array::<f16>::new(8usize);
    #[unroll]
    for j in 0..comptime!(8 / per) {
        let mut v = Vector::<f16, V>::new(f16::new(0.0));
        if live {
            v = a[row * k_vec + e0 / per + j];
        }
        #[unroll]
        for l in 0..per {
            out[j * per + l] = v[l];
        }
    }
    out
}

/// Elements `i, i + 1` of `e` as a fragment pair.
#[cube]
fn pair(e: &Array<f16>, #[comptime] i: usize) -> Pair16 {
    let mut p = Pair16::empty();
    p[0] = e[i];
    p[1] = e[i + 1];
    p
}

/// This plane's share of the 16 × 8 tile `x[row0..row0 + 16] · w[col0..col0 + 8]ᵀ` (rows past
/// `m`, outputs past `n` as zeros) added into `acc` (C layout of [`mma_16816`]): the k chunks
/// `plane, plane + planes, ...`, `steps` of them.
#[cube]
#[allow(clippy::too_many_arguments)]
fn tile_partial<V: Size>(
    x: &Array<Vector<f16, V>>,
    w: &Array<Vector<f16, V>>,
    row0: usize,
    m: usize,
    col0: usize,
    n: usize,
    acc: &mut Array<Pair32>,
    scratch: &mut SharedMemory<f32>,
    #[comptime] k_vec: usize,
    #[comptime] planes: usize,
    #[comptime] steps: usize,
    #[comptime] emulate: bool,
) {
    let lane = UNIT_POS_X as usize;
    let plane = UNIT_POS_Y as usize;
    let (g, t) = (lane / 4, lane % 4);
    let per = V::value().comptime();
    let chunks = comptime!(k_vec * per / CHUNK);
    let mut a = Array::<Pair16>::new(4usize);
    let mut b = Array::<Pair16>::new(2usize);
    #[unroll]
    for s in 0..steps {
        let chunk = plane + s * planes;
        let live = chunk < chunks;
        let e0 = chunk * CHUNK + 8 * t;
        let xa = load8::<V>(x, row0 + g, e0, live && row0 + g < m, k_vec);
        let xb = load8::<V>(x, row0 + g + 8, e0, live && row0 + g + 8 < m, k_vec);
        let wv = load8::<V>(w, col0 + g, e0, live && col0 + g < n, k_vec);
        #[unroll]
        for h in 0..2usize {
            a[0] = pair(&xa, 4 * h);
            a[1] = pair(&xb, 4 * h);
            a[2] = pair(&xa, 4 * h + 2);
            a[3] = pair(&xb, 4 * h + 2);
            b[0] = pair(&wv, 4 * h);
            b[1] = pair(&wv, 4 * h + 2);
            mma_16816(&a, &b, acc, scratch, emulate);
        }
    }
}

/// A zeroed accumulator tile.
#[cube]
fn zero_tile() -> Array<Pair32> {
    let mut acc = Array::<Pair32>::new(2usize);
    #[unroll]
    for r in 0..2usize {
        let mut z = Pair32::empty();
        z[0] = 0.0;
        z[1] = 0.0;
        acc[r] = z;
    }
    acc
}

/// Adds the planes' tiles: afterwards plane 0's `acc` holds the sum (the others' are stale).
#[cube]
fn sum_planes(acc: &mut Array<Pair32>, red: &mut SharedMemory<f32>, #[comptime] planes: usize) {
    if comptime!(planes > 1) {
        let lane = UNIT_POS_X as usize;
        let plane = UNIT_POS_Y as usize;
        #[unroll]
        for r in 0..2usize {
            let v = acc[r];
            red[(plane * 32 + lane) * 4 + 2 * r] = v[0];
            red[(plane * 32 + lane) * 4 + 2 * r + 1] = v[1];
        }
        sync_cube();
        if plane == 0 {
            #[unroll]
            for p in 1..planes {
                #[unroll]
                for r in 0..2usize {
                    let mut v = acc[r];
                    v[0] += red[(p * 32 + lane) * 4 + 2 * r];
                    v[1] += red[(p * 32 + lane) * 4 + 2 * r + 1];
                    acc[r] = v;
                }
            }
        }
        sync_cube();
    }
}

/// `y[.., col_off + j] = x·Wᵀ (+ bias)`: cube (`CUBE_POS_X`, `CUBE_POS_Y`) computes outputs
/// `8·CUBE_POS_X..` of x rows `16·CUBE_POS_Y..`.
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
fn gemv_mma_kernel<O: Float, V: Size>(
    x: &Array<Vector<f16, V>>,
    w: &Array<Vector<f16, V>>,
    bias: &Array<f32>,
    y: &mut Array<O>,
    m: usize,
    n: usize,
    ldy: usize,
    col_off: usize,
    #[comptime] k_vec: usize,
    #[comptime] planes: usize,
    #[comptime] steps: usize,
    #[comptime] has_bias: bool,
    #[comptime] emulate: bool,
) {
    let col0 = CUBE_POS_X as usize * TILE_COLS;
    let row0 = CUBE_POS_Y as usize * TILE_ROWS;
    let acc = summed_tile::<V>(x, w, row0, m, col0, n, k_vec, planes, steps, emulate);
    store_tile::<O>(&acc, bias, y, row0, col0, m, n, ldy, col_off, has_bias);
}

/// Writes plane 0's tile (after [`sum_planes`]), plus `bias` at the same columns where
/// `has_bias`, into columns `col_off + col0..` of rows `row0..` of `y` (`[m, ldy]`; the tile's
/// `n` outputs are `col_off..col_off + n`).
#[cube]
#[allow(clippy::too_many_arguments)]
fn store_tile<O: Float>(
    acc: &Array<Pair32>,
    bias: &Array<f32>,
    y: &mut Array<O>,
    row0: usize,
    col0: usize,
    m: usize,
    n: usize,
    ldy: usize,
    col_off: usize,
    #[comptime] has_bias: bool,
) {
    let lane = UNIT_POS_X as usize;
    let (g, t) = (lane / 4, lane % 4);
    if UNIT_POS_Y == 0 {
        #[unroll]
        for r in 0..2usize {
            let row = row0 + g + 8 * r;
            let v = acc[r];
            #[unroll]
            for h in 0..2usize {
                let col = col0 + 2 * t + h;
                if row < m && col < n {
                    let mut s = v[h];
                    if comptime!(has_bias) {
                        s += bias[col_off + col];
                    }
                    y[row * ldy + col_off + col] = O::cast_from(s);
                }
            }
        }
    }
}

/// The whole 16 × 8 tile `x[row0..] · w[col0..]ᵀ` of a cube: its planes' partial tiles
/// ([`tile_partial`]) added ([`sum_planes`]); complete in plane 0.
#[cube]
#[allow(clippy::too_many_arguments)]
fn summed_tile<V: Size>(
    x: &Array<Vector<f16, V>>,
    w: &Array<Vector<f16, V>>,
    row0: usize,
    m: usize,
    col0: usize,
    n: usize,
    #[comptime] k_vec: usize,
    #[comptime] planes: usize,
    #[comptime] steps: usize,
    #[comptime] emulate: bool,
) -> Array<Pair32> {
    let mut scratch = SharedMemory::<f32>::new(comptime!(if emulate { 384 * planes } else { 1 }));
    let mut red = SharedMemory::<f32>::new(comptime!(planes * 32 * 4));
    let mut acc = zero_tile();
    tile_partial::<V>(
        x,
        w,
        row0,
        m,
        col0,
        n,
        &mut acc,
        &mut scratch,
        k_vec,
        planes,
        steps,
        emulate,
    );
    sum_planes(&mut acc, &mut red, planes);
    acc
}

/// q, k, v = `x·Wᵀ + b` of the three projections: cubes `CUBE_POS_X < tiles_q` take q's
/// 8-output tiles, then `tiles_kv` k's, then v's.
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
fn qkv_mma_kernel<V: Size>(
    x: &Array<Vector<f16, V>>,
    wq: &Array<Vector<f16, V>>,
    wk: &Array<Vector<f16, V>>,
    wv: &Array<Vector<f16, V>>,
    bq: &Array<f32>,
    bk: &Array<f32>,
    bv: &Array<f32>,
    q_out: &mut Array<f16>,
    k_out: &mut Array<f16>,
    v_out: &mut Array<f16>,
    m: usize,
    nq: usize,
    nkv: usize,
    tiles_q: usize,
    tiles_kv: usize,
    #[comptime] k_vec: usize,
    #[comptime] planes: usize,
    #[comptime] steps: usize,
    #[comptime] emulate: bool,
) {
    let tile = CUBE_POS_X as usize;
    let row0 = CUBE_POS_Y as usize * TILE_ROWS;
    // Each cube takes one branch, all its units alike.
    if tile < tiles_q {
        let col0 = tile * TILE_COLS;
        qkv_tile::<V>(
            x, wq, bq, q_out, row0, m, col0, nq, k_vec, planes, steps, emulate,
        );
    } else if tile < tiles_q + tiles_kv {
        let col0 = (tile - tiles_q) * TILE_COLS;
        qkv_tile::<V>(
            x, wk, bk, k_out, row0, m, col0, nkv, k_vec, planes, steps, emulate,
        );
    } else {
        let col0 = (tile - tiles_q - tiles_kv) * TILE_COLS;
        qkv_tile::<V>(
            x, wv, bv, v_out, row0, m, col0, nkv, k_vec, planes, steps, emulate,
        );
    }
}

/// One 16 × 8 tile of a projection with its bias, into `y` (`[m, n]`).
#[cube]
#[allow(clippy::too_many_arguments)]
fn qkv_tile<V: Size>(
    x: &Array<Vector<f16, V>>,
    w: &Array<Vector<f16, V>>,
    bias: &Array<f32>,
    y: &mut Array<f16>,
    row0: usize,
    m: usize,
    col0: usize,
    n: usize,
    #[comptime] k_vec: usize,
    #[comptime] planes: usize,
    #[comptime] steps: usize,
    #[comptime] emulate: bool,
) {
    let acc = summed_tile::<V>(x, w, row0, m, col0, n, k_vec, planes, steps, emulate);
    store_tile::<f16>(&acc, bias, y, row0, col0, m, n, n, 0, true);
}

/// `out = F(silu(F(x·W_gateᵀ))·F(x·W_upᵀ))`, both tiles of a cube's 8 columns in its registers.
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
fn gate_up_swiglu_mma_kernel<V: Size>(
    x: &Array<Vector<f16, V>>,
    w_gate: &Array<Vector<f16, V>>,
    w_up: &Array<Vector<f16, V>>,
    out: &mut Array<f16>,
    m: usize,
    n: usize,
    #[comptime] k_vec: usize,
    #[comptime] planes: usize,
    #[comptime] steps: usize,
    #[comptime] emulate: bool,
) {
    let col0 = CUBE_POS_X as usize * TILE_COLS;
    let row0 = CUBE_POS_Y as usize * TILE_ROWS;
    let mut scratch = SharedMemory::<f32>::new(comptime!(if emulate { 384 * planes } else { 1 }));
    let mut red = SharedMemory::<f32>::new(comptime!(planes * 32 * 4));
    let mut gate = zero_tile();
    let mut up = zero_tile();
    tile_partial::<V>(
        x,
        w_gate,
        row0,
        m,
        col0,
        n,
        &mut gate,
        &mut scratch,
        k_vec,
        planes,
        steps,
        emulate,
    );
    tile_partial::<V>(
        x,
        w_up,
        row0,
        m,
        col0,
        n,
        &mut up,
        &mut scratch,
        k_vec,
        planes,
        steps,
        emulate,
    );
    sum_planes(&mut gate, &mut red, planes);
    sum_planes(&mut up, &mut red, planes);
    let lane = UNIT_POS_X as usize;
    let (g, t) = (lane / 4, lane % 4);
    if UNIT_POS_Y == 0 {
        #[unroll]
        for r in 0..2usize {
            let row = row0 + g + 8 * r;
            let gv = gate[r];
            let uv = up[r];
            #[unroll]
            for h in 0..2usize {
                let col = col0 + 2 * t + h;
                if row < m && col < n {
                    // Rounded as the unfused matmuls store gate and up.
                    let gs = f32::cast_from(f16::cast_from(gv[h]));
                    let us = f32::cast_from(f16::cast_from(uv[h]));
                    out[row * n + col] = f16::cast_from(silu_mul(gs, us));
                }
            }
        }
    }
}

/// The launch shape for k: (vector size, planes a tile, steps a plane).
fn shape<R: Runtime>(
    client: &ComputeClient<R>,
    op: &'static str,
    k: usize,
) -> Result<(usize, usize, usize)> {
    ensure!(
        k.is_multiple_of(CHUNK),
        KernelError::unsupported(
            op,
            format!("the tensor-core GEMV takes k a multiple of {CHUNK}, not {k}")
        )
    );
    let vec = vector_size(client, 2, k);
    ensure!(
        8 % vec == 0,
        KernelError::unsupported(op, format!("vectors of {vec} f16"))
    );
    let chunks = k / CHUNK;
    let planes = chunks.div_ceil(STEPS_PER_PLANE).clamp(1, MAX_PLANES);
    Ok((vec, planes, chunks.div_ceil(planes)))
}

/// The grid: 8 outputs by 16 rows a cube.
fn grid(op: &'static str, m: usize, n: usize) -> Result<CubeCount> {
    let (cols, rows) = (n.div_ceil(TILE_COLS), m.div_ceil(TILE_ROWS));
    ensure!(
        cols <= 65535 && rows <= 65535,
        KernelError::unsupported(
            op,
            format!("{m} × {n} needs more cubes than one launch allows")
        )
    );
    Ok(CubeCount::Static(cols as u32, rows as u32, 1))
}

/// The tensor-core GEMV takes f16 tensors.
fn f16_only<F: CubePrimitive>(op: &'static str) -> Result<()> {
    ensure!(
        F::as_type_native_unchecked().elem_type() == ElemType::Float(FloatKind::F16),
        KernelError::unsupported(op, "the tensor-core GEMV takes f16 tensors")
    );
    Ok(())
}

fn vectors<R: Runtime, F: CubeElement>(t: &DeviceTensor<R, F>, vec: usize) -> ArrayArg<R> {
    // SAFETY: the same buffer as `len / vec` vectors; `shape` checked k % 32 == 0.
    unsafe { ArrayArg::from_raw_parts(t.handle.clone(), t.len() / vec) }
}

/// `y[:, col_off..col_off + n] = x·Wᵀ (+ bias)` on tensor cores: x `[m, k]` f16, W `[n, k]`,
/// bias `[ldy]` read at the same columns, y `[m, ldy]`.
#[allow(clippy::too_many_arguments)]
pub fn gemv_mma<R: Runtime, F: Float + CubeElement, O: Float + CubeElement>(
    client: &ComputeClient<R>,
    how: GemvMma,
    x: &DeviceTensor<R, F>,
    w: &DeviceTensor<R, F>,
    bias: Option<&DeviceTensor<R, f32>>,
    y: &DeviceTensor<R, O>,
    col_off: usize,
) -> Result<()> {
    let op = "matmul";
    f16_only::<F>(op)?;
    let (m, k, n) = product_shape(x, w)?;
    ensure!(
        y.shape.len() == 2 && y.shape[0] == m && y.shape[1] >= col_off + n,
        KernelError::shape(
            op,
            "y",
            format!("[{m}, {}] or wider", col_off + n),
            &y.shape
        )
    );
    let ldy = y.shape[1];
    if let Some(b) = bias {
        ensure!(
            b.shape == [ldy],
            KernelError::shape(op, "bias", format!("[{ldy}]"), &b.shape)
        );
    }
    let (vec, planes, steps) = shape(client, op, k)?;
    // Without bias, 4 bytes of W stand in (never read).
    let bias_arg = match bias {
        Some(b) => b.arg(),
        // SAFETY: one f32 of W's buffer, which holds at least 64 bytes (k ≥ 32).
        None => unsafe { ArrayArg::from_raw_parts(w.handle.clone(), 1) },
    };
    gemv_mma_kernel::launch::<O, R>(
        client,
        grid(op, m, n)?,
        CubeDim::new_2d(32, planes as u32),
        vec,
        vectors(x, vec),
        vectors(w, vec),
        bias_arg,
        y.arg(),
        m,
        n,
        ldy,
        col_off,
        k / vec,
        planes,
        steps,
        bias.is_some(),
        how == GemvMma::Emulated,
    );
    Ok(())
}

/// `out = silu(x·W_gateᵀ)·(x·W_upᵀ)` on tensor cores, each product rounded to f16 first: x
/// `[m, k]`, the weights `[n, k]`, out `[m, n]`; shapes checked by the caller
/// ([`crate::fused_gemv::gemv_gate_up_swiglu`]).
pub(crate) fn gate_up_swiglu_mma<R: Runtime, F: Float + CubeElement>(
    client: &ComputeClient<R>,
    how: GemvMma,
    x: &DeviceTensor<R, F>,
    w_gate: &DeviceTensor<R, F>,
    w_up: &DeviceTensor<R, F>,
    out: &DeviceTensor<R, F>,
) -> Result<()> {
    let op = "gemv gate/up + SwiGLU";
    f16_only::<F>(op)?;
    let (m, k, n) = product_shape(x, w_gate)?;
    let (vec, planes, steps) = shape(client, op, k)?;
    gate_up_swiglu_mma_kernel::launch::<R>(
        client,
        grid(op, m, n)?,
        CubeDim::new_2d(32, planes as u32),
        vec,
        vectors(x, vec),
        vectors(w_gate, vec),
        vectors(w_up, vec),
        out.arg(),
        m,
        n,
        k / vec,
        planes,
        steps,
        how == GemvMma::Emulated,
    );
    Ok(())
}

/// q, k, v = `x·Wᵀ + b` of three projections in one launch on tensor cores (k and v of one
/// width): x `[m, k]` f16, `w[i]` `[n_i, k]`, `b[i]` `[n_i]`, `out[i]` `[m, n_i]`; shapes
/// checked by the caller ([`crate::fused_gemv::gemv_qkv`]).
pub(crate) fn qkv_mma<R: Runtime, F: Float + CubeElement>(
    client: &ComputeClient<R>,
    how: GemvMma,
    x: &DeviceTensor<R, F>,
    w: [&DeviceTensor<R, F>; 3],
    b: [&DeviceTensor<R, f32>; 3],
    out: [&DeviceTensor<R, F>; 3],
) -> Result<()> {
    let op = "gemv q/k/v";
    f16_only::<F>(op)?;
    let (m, k, nq) = product_shape(x, w[0])?;
    let nkv = w[1].shape[0];
    let (vec, planes, steps) = shape(client, op, k)?;
    let (tiles_q, tiles_kv) = (nq.div_ceil(TILE_COLS), nkv.div_ceil(TILE_COLS));
    let count = grid(op, m, (tiles_q + 2 * tiles_kv) * TILE_COLS)?;
    qkv_mma_kernel::launch::<R>(
        client,
        count,
        CubeDim::new_2d(32, planes as u32),
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
        nq,
        nkv,
        tiles_q,
        tiles_kv,
        k / vec,
        planes,
        steps,
        how == GemvMma::Emulated,
    );
    Ok(())
}
