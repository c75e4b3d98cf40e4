//! Matmul `y = x · Wᵀ (+ bias)`: x `[m, k]`, W `[n, k]` (GGUF row layout `[out][in]`), bias
//! `[n]` (f32), y `[m, n]`. Storage `F` (f16 in the model), accumulation in f32, output `O` (f16,
//! or f32 for logits).
//!
//! Variants behind one interface ([`matmul`] with a [`MatmulVariant`]):
//! - `Tiled`: 16×16 output tile per cube through shared memory; runs everywhere (wgpu too).
//! - `Cmma`: tensor cores (`cmma` 16×16×16, f16 in, f32 accumulate); CUDA only.
//! - `Gemv`: for few rows (decode, short prompts): a warp shares one output (up to 8 for a long
//!   k), vectorised loads along k, up to 16 rows of x per cube (each weight vector loaded once
//!   for all of them).
//! - `GemvMma`: short blocks on tensor cores, a plane a 16 × 8 tile ([`crate::gemv_mma`]).
//! - `Mma`: many rows on tensor cores, the project's own kernel (`mma.m16n8k16` from `ldmatrix`
//!   fragments, `cp.async` stages; [`crate::matmul_mma`]); by name only: faster than cubek's
//!   in the kernel bench at the large 1.5B/7B products, but slower end to end (H200,
//!   BENCHMARKS.md "2026-11-29d": 7B pp2048 −5%, 1.5B −16%).
//! - `Blocked`: one thread per BLOCK_ROWS×BLOCK_COLS outputs in registers, vectorised loads
//!   along k, no shared memory or barriers: for CPU-emulated devices, where every load is a
//!   gather and every barrier a context switch, so each loaded value must feed several outputs.
//! - `Cubek`: cubek's matmul (outside CubeCL kernels), bias added after; any runtime.
//! - `Auto`: where the device has f16 `mma.m16n8k16`, `GemvMma` for 2 to 16 rows (and up to
//!   [`GEMV_MMA_MAX_ROWS`] for weights of at most [`GEMV_SHORT_MAX_BYTES`]); else `Gemv` up to [`GEMV_MAX_ROWS`] rows; above it, where the device has f16 tensor
//!   cores, `Gemv` up to [`GEMV_SHORT_ROWS`] rows for weights of at most
//!   [`GEMV_SHORT_MAX_BYTES`] (twice that with `n < k` up to 16 rows), else `Cubek` (its TMA
//!   kernel at [`TMA_TILING`] on Hopper: H200, m = 2048, the gate/up/down projections at a third
//!   of cuBLAS's speed, BENCHMARKS.md); else `Blocked` on CPU-emulated devices (measured fastest
//!   there), else `Tiled`.

use anyhow::{bail, ensure, Result};
use cubecl::ir::features::MmaConfig;
use cubecl::ir::{ElemType, FloatKind};
use cubecl::prelude::*;
use cubecl::server::CubeCountSelection;
use half::f16;

use crate::gemv_mma::TILE_ROWS;
use crate::reduce::{reduce_in_plane, ReduceOp, Reduction};
use crate::{DeviceTensor, KernelError};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MatmulVariant {
    #[default]
    Auto,
    Tiled,
    Cmma,
    Gemv,
    /// Tensor cores for short blocks ([`crate::gemv_mma`]): `mma.m16n8k16` on CUDA (sm_80+),
    /// each mma through shared memory elsewhere (slow; tests). f16, k a multiple of 32.
    GemvMma,
    Blocked,
    /// Many rows on tensor cores, the project's own kernel ([`crate::matmul_mma`]):
    /// `mma.m16n8k16` on CUDA (sm_80+), emulated elsewhere (slow; tests). f16, k a multiple
    /// of 32 (64 on CUDA).
    Mma,
    /// cubek's matmul (tracel's CubeCL kernels; the algorithm: `cubek_strategy`), then the bias
    /// added by `add_bias_kernel`; into columns of a wider output through a scratch
    /// (`place_columns_kernel`).
    Cubek,
}

impl std::str::FromStr for MatmulVariant {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        Ok(match s {
            "auto" => Self::Auto,
            "tiled" => Self::Tiled,
            "cmma" => Self::Cmma,
            "gemv" => Self::Gemv,
            "gemv-mma" => Self::GemvMma,
            "blocked" => Self::Blocked,
            "cubek" => Self::Cubek,
            "mma" => Self::Mma,
            _ => bail!(
                "unknown matmul variant `{s}`: expected auto, tiled, cmma, gemv, gemv-mma, mma, blocked or cubek"
            ),
        })
    }
}

/// Rows up to which `Auto` takes `Gemv` for any weight (from 2 rows `GemvMma` where the
/// device has the mma).
pub const GEMV_MAX_ROWS: usize = 4;

/// Rows up to which `Auto` takes `Gemv` on tensor-core devices without f16 `mma.m16n8k16`
/// (with it, [`MatmulVariant::GemvMma`] up to [`GEMV_MMA_MAX_ROWS`]) for a weight of at most
/// [`GEMV_SHORT_MAX_BYTES`] (or, up to [`GEMV_MAX_ROWS_PER_CUBE`] rows, twice that with fewer
/// outputs than inputs: the down projection): the GEMV reads W once per
/// [`GEMV_MAX_ROWS_PER_CUBE`] rows and spreads the outputs over all multiprocessors, where
/// cubek's 128-column tiles of a short matrix are few cubes with a long k loop. H200, 0.5B:
/// pp32 5 953 tok/s with the GEMV against 3 816 with cubek; m = 16, kernel bench (µs, with the
/// launch): 1.5B gate (27.5 MB) 52.7 against cubek's 31.8, so larger weights take cubek
/// (BENCHMARKS.md, "short prompts").
pub const GEMV_SHORT_ROWS: usize = 32;

/// Rows up to which `Auto` takes [`MatmulVariant::GemvMma`] for a weight of at most
/// [`GEMV_SHORT_MAX_BYTES`] (any weight up to 16 rows).
pub const GEMV_MMA_MAX_ROWS: usize = 64;

/// The largest f16 weight (bytes) `Auto` gives to `Gemv` for 5 to [`GEMV_SHORT_ROWS`] rows on
/// tensor-core devices: the 0.5B layer's weights and the 1.5B q/k/v/o (the 1.5B and 7B gate and
/// up take cubek).
pub const GEMV_SHORT_MAX_BYTES: usize = 16 << 20;

/// Output tile side of the `Tiled` variant: a cube of TILE×TILE threads per TILE×TILE outputs.
const TILE: usize = 16;

#[cube(launch)]
fn matmul_tiled<F: Float, O: Float>(
    x: &Array<F>,
    w: &Array<F>,
    bias: &Array<f32>,
    y: &mut Array<O>,
    m: usize,
    n: usize,
    k: usize,
    ldy: usize,
    col_off: usize,
    #[comptime] has_bias: bool,
    #[comptime] tile: usize,
) {
    let tx = UNIT_POS_X as usize; // along n
    let ty = UNIT_POS_Y as usize; // along m
    let row = CUBE_POS_Y as usize * tile + ty;
    let col = CUBE_POS_X as usize * tile + tx;

    let mut xs = SharedMemory::<f32>::new(comptime!(tile * tile));
    let mut ws = SharedMemory::<f32>::new(comptime!(tile * tile));
    let mut acc = 0.0f32;
    let mut k0 = 0usize;
    while k0 < k {
        // xs[ty][tx] = x[row][k0 + tx]; ws[ty][tx] = W[CUBE_POS_X*tile + ty][k0 + tx]
        let kk = k0 + tx;
        let wrow = CUBE_POS_X as usize * tile + ty;
        let mut xv = 0.0f32;
        if row < m && kk < k {
            xv = f32::cast_from(x[row * k + kk]);
        }
        let mut wv = 0.0f32;
        if wrow < n && kk < k {
            wv = f32::cast_from(w[wrow * k + kk]);
        }
        xs[ty * tile + tx] = xv;
        ws[ty * tile + tx] = wv;
        sync_cube();
        #[unroll]
        for i in 0..tile {
            acc += xs[ty * tile + i] * ws[tx * tile + i];
        }
        sync_cube();
        k0 += tile;
    }
    if row < m && col < n {
        if comptime!(has_bias) {
            acc += bias[col_off + col];
        }
        y[row * ldy + col_off + col] = O::cast_from(acc);
    }
}

/// Threads that share one output in the GEMV kernel for `m` rows of `k_vec` vectors, and
/// outputs per cube. On GPUs a warp per output for one row (decode); for several rows, where each
/// lane multiplies a weight vector with every row's, a long k spreads over up to 8 warps an
/// output (the 0.5B down projection: 896 outputs would be 896 warps, too few to keep the
/// weights streaming), and up to 8 outputs share a cube so that the rows of x are read from L2
/// once per cube. On a CPU-emulated device (Mesa's lavapipe, plane size 8) few threads per
/// output, since every barrier of the reduction is costly there. `CUBEQWEN_GEMV_SHAPE` sets it.
pub(crate) fn gemv_shape<R: Runtime>(
    client: &ComputeClient<R>,
    m: usize,
    k_vec: usize,
) -> Result<(usize, usize)> {
    if let Some(shape) = crate::switches::switches()?.gemv_shape {
        return Ok(shape);
    }
    if client.properties().hardware.plane_size_max < 32 {
        return Ok((8, 32));
    }
    if m == 1 {
        return Ok((32, 8));
    }
    let warps = 1usize << (k_vec / 128).clamp(1, 8).ilog2();
    let threads = 32 * warps;
    Ok((threads, (1024 / threads).min(8)))
}

/// One output per group of `dot.group` threads, `dot.units / dot.group` outputs per cube, for
/// `rows` rows of x: cube `c` computes them for x rows `(c / col_groups) * rows ..` (past `m`,
/// the last row is read again and nothing written). Each weight vector is loaded once and
/// multiplied with every row's, so a short prompt reads W once per `rows` rows, not once a row.
#[cube(launch)]
fn matmul_gemv<F: Float, O: Float, V: Size>(
    x: &Array<Vector<F, V>>,
    w: &Array<Vector<F, V>>,
    bias: &Array<f32>,
    y: &mut Array<O>,
    m: usize,
    n: usize,
    k_vec: usize,
    ldy: usize,
    col_off: usize,
    col_groups: usize,
    #[comptime] has_bias: bool,
    #[comptime] dot: Reduction,
    #[comptime] rows: usize,
) {
    let tx = UNIT_POS_X as usize;
    let ty = UNIT_POS_Y as usize;
    let row0 = (CUBE_POS / col_groups) * rows; // the cube's first x row
    let col = (CUBE_POS % col_groups) * comptime!(dot.units / dot.group) + ty; // which output
    let live = row0 < m && col < n;

    let mut partial = Array::<f32>::new(rows);
    gemv_partials::<F, V>(
        x,
        w,
        col,
        row0,
        m,
        k_vec,
        live,
        &mut partial,
        dot.group,
        rows,
    );
    #[unroll]
    for r in 0..rows {
        let mut acc = reduce_in_plane::<f32>(partial[r], ReduceOp::Sum, dot);
        if tx == 0 && live && row0 + r < m {
            if comptime!(has_bias) {
                acc += bias[col_off + col];
            }
            y[(row0 + r) * ldy + col_off + col] = O::cast_from(acc);
        }
    }
}

/// This unit's partial dot products of row `col` of `w` (`[n, k_vec]` vectors) with x rows
/// `row0..row0 + rows` (`[m, k_vec]`; past `m` the last row is read again), into `partial`
/// (`rows` of them, zero where not `live`): the unit takes the vectors `UNIT_POS_X, +
/// group, ...` of the row; each weight vector is loaded once and multiplied with every row's.
/// The GEMV's loop, shared by [`matmul_gemv`] and the fused GEMVs ([`crate::fused_gemv`]).
#[cube]
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemv_partials<F: Float, V: Size>(
    x: &Array<Vector<F, V>>,
    w: &Array<Vector<F, V>>,
    col: usize,
    row0: usize,
    m: usize,
    k_vec: usize,
    live: bool,
    partial: &mut Array<f32>,
    #[comptime] group: usize,
    #[comptime] rows: usize,
) {
    #[unroll]
    for r in 0..rows {
        partial[r] = 0.0;
    }
    if live {
        let wb = col * k_vec;
        let mut i = UNIT_POS_X as usize;
        while i < k_vec {
            let wv = Vector::<f32, V>::cast_from(w[wb + i]);
            #[unroll]
            for r in 0..rows {
                let xr = min(row0 + r, m - 1);
                let p = Vector::<f32, V>::cast_from(x[xr * k_vec + i]) * wv;
                #[unroll]
                for l in 0..V::value() {
                    partial[r] += p[l];
                }
            }
            i += group;
        }
    }
}

/// Most x rows one cube of the GEMV computes (its accumulators are registers).
pub const GEMV_MAX_ROWS_PER_CUBE: usize = 16;

/// x rows per cube of the GEMV for `m` rows over `col_groups` cubes of outputs: as many as
/// [`GEMV_MAX_ROWS_PER_CUBE`] (W read once per that many rows), fewer where the grid would
/// then have less than two cubes per multiprocessor (a narrow weight: the 0.5B q/o projections
/// at m = 16 measured 14.6 µs with 112 cubes of 16 rows against 9.5 with a row a cube, H200).
pub(crate) fn gemv_rows<R: Runtime>(
    client: &ComputeClient<R>,
    m: usize,
    col_groups: usize,
) -> usize {
    let sms = client.properties().hardware.num_streaming_multiprocessors;
    gemv_rows_for(m, col_groups, sms.unwrap_or(0) as usize)
}

/// [`gemv_rows`] on a device of `sms` multiprocessors (0: unknown, no limit).
fn gemv_rows_for(m: usize, col_groups: usize, sms: usize) -> usize {
    let mut rows = m.next_power_of_two().min(GEMV_MAX_ROWS_PER_CUBE);
    while rows > 1 && m.div_ceil(rows) * col_groups < 2 * sms {
        rows /= 2;
    }
    rows
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tma_stages_past_a_box_side_are_refused() {
        // The default (pm=4, pn=4, sm=2, sn=2, pk=4 on 16×8×16 instructions): 128 × 64 × 64.
        assert!(tma_box_fits(128, 64, 64).is_ok());
        assert!(tma_box_fits(256, 256, 256).is_ok());
        // pm=8, sm=4 (H200, 2026-11-29: cubecl refused it at launch and the device was lost).
        let e = tma_box_fits(512, 64, 64).unwrap_err();
        assert!(e.contains("512 rows") && e.contains("256"), "{e}");
        assert!(tma_box_fits(128, 264, 64).is_err());
        assert!(tma_box_fits(128, 64, 512).is_err());
        assert!(tma_box_fits(0, 64, 64).is_err());
    }

    #[test]
    fn gemv_rows_keep_two_cubes_a_multiprocessor() {
        // H200 (132 multiprocessors), 16 rows: the 0.5B gate (4864 outputs, 8 a cube: 608
        // cubes) takes all 16 rows a cube; the q/o (896: 112 cubes) 4, so 448 cubes; the k/v
        // (128: 16 cubes) one row a cube, as before row blocks.
        assert_eq!(gemv_rows_for(16, 608, 132), 16);
        assert_eq!(gemv_rows_for(16, 112, 132), 4);
        assert_eq!(gemv_rows_for(16, 16, 132), 1);
        // 19 rows: blocks of at most 16; 7 rows: one block of 8; one row: 1.
        assert_eq!(gemv_rows_for(19, 608, 132), 16);
        assert_eq!(gemv_rows_for(7, 608, 132), 8);
        assert_eq!(gemv_rows_for(1, 1, 132), 1);
        // Unknown multiprocessor count (lavapipe): no limit.
        assert_eq!(gemv_rows_for(32, 1, 0), 16);
        for m in 1..=64 {
            for groups in [1, 16, 112, 608, 18992] {
                let rows = gemv_rows_for(m, groups, 132);
                assert!(rows.is_power_of_two() && rows <= GEMV_MAX_ROWS_PER_CUBE);
                assert!(
                    rows == 1 || m.div_ceil(rows) * groups >= 264,
                    "m {m} groups {groups}"
                );
            }
        }
    }
}

/// Outputs per thread of the `Blocked` variant: BLOCK_ROWS rows of x by BLOCK_COLS rows of W,
/// and threads per cube (few, so that a small product still spreads over several cubes, which
/// lavapipe runs on separate CPU threads). On lavapipe (2 cores) at m = 45, n = 4864, k = 896:
/// 4×4 395 ms, 8×8 228 ms, 16×16 100 ms (gemv 2022 ms, tiled 3060 ms). 16×16 costs lavapipe
/// about 100 s to compile (once per kernel variant and machine, Mesa caches it) against 7 s
/// for 8×8, and made a 16-token prefill only 1.5x faster (3.1 against 2.1 tok/s): 8×8.
const BLOCK_ROWS: usize = 8;
const BLOCK_COLS: usize = 8;
const BLOCK_THREADS: u32 = 32;

/// Thread `t` computes rows `r0..r0 + rows` and columns `c0..c0 + cols` of y, accumulating in
/// f32 registers; each vector of x and W it loads feeds `cols` (or `rows`) outputs. Rows and
/// columns past the edges read the last row or column and are not written.
#[cube(launch)]
fn matmul_blocked<F: Float, O: Float, V: Size>(
    x: &Array<Vector<F, V>>,
    w: &Array<Vector<F, V>>,
    bias: &Array<f32>,
    y: &mut Array<O>,
    m: usize,
    n: usize,
    k_vec: usize,
    ldy: usize,
    col_off: usize,
    #[comptime] has_bias: bool,
    #[comptime] rows: usize,
    #[comptime] cols: usize,
) {
    let col_blocks = n.div_ceil(cols);
    let t = ABSOLUTE_POS;
    let r0 = (t / col_blocks) * rows;
    let c0 = (t % col_blocks) * cols;
    if r0 < m {
        let mut acc = Array::<f32>::new(comptime!(rows * cols));
        #[unroll]
        for i in 0..rows * cols {
            acc[i] = 0.0;
        }
        let mut wv = Array::<Vector<f32, V>>::new(cols);
        let mut kk = 0usize;
        while kk < k_vec {
            #[unroll]
            for j in 0..cols {
                wv[j] = Vector::<f32, V>::cast_from(w[min(c0 + j, n - 1) * k_vec + kk]);
            }
            #[unroll]
            for i in 0..rows {
                let xv = Vector::<f32, V>::cast_from(x[min(r0 + i, m - 1) * k_vec + kk]);
                #[unroll]
                for j in 0..cols {
                    let p = xv * wv[j];
                    let mut s = 0.0f32;
                    #[unroll]
                    for l in 0..V::value() {
                        s += p[l];
                    }
                    acc[i * cols + j] += s;
                }
            }
            kk += 1;
        }
        #[unroll]
        for i in 0..rows {
            #[unroll]
            for j in 0..cols {
                let (r, c) = (r0 + i, c0 + j);
                if r < m && c < n {
                    let mut v = acc[i * cols + j];
                    if comptime!(has_bias) {
                        v += bias[col_off + c];
                    }
                    y[r * ldy + col_off + c] = O::cast_from(v);
                }
            }
        }
    }
}

/// Tensor-core shape of the `Cmma` variant: `cmma` tiles of CMMA_TILE (m = n = k), f16 inputs,
/// f32 accumulation; one plane of CMMA_LANES threads per tile.
const CMMA_TILE: usize = 16;
const CMMA_LANES: usize = 32;

/// One plane (`lanes` threads) computes a `tile`×`tile` output tile with tensor cores; operands
/// are staged through shared memory with zero padding, so any m, n, k works.
#[cube(launch)]
fn matmul_cmma<O: Float>(
    x: &Array<f16>,
    w: &Array<f16>,
    bias: &Array<f32>,
    y: &mut Array<O>,
    m: usize,
    n: usize,
    k: usize,
    ldy: usize,
    col_off: usize,
    #[comptime] has_bias: bool,
    #[comptime] tile: usize,
    #[comptime] lanes: usize,
) {
    // Each lane stages this many elements of each operand tile.
    let per_lane = comptime!(tile * tile / lanes);
    let lane = UNIT_POS as usize;
    let row0 = CUBE_POS_Y as usize * tile;
    let col0 = CUBE_POS_X as usize * tile;

    let mut a_s = SharedMemory::<f16>::new(comptime!(tile * tile));
    let mut b_s = SharedMemory::<f16>::new(comptime!(tile * tile));
    let mut c_s = SharedMemory::<f32>::new(comptime!(tile * tile));

    let acc = cmma::Matrix::<f32>::from_value(
        cmma::MatrixIdent::Accumulator,
        tile,
        tile,
        tile,
        cmma::MatrixLayout::Undefined,
        0.0,
    );
    let a = unsafe {
        cmma::Matrix::<f16>::uninitialized(
            cmma::MatrixIdent::A,
            tile,
            tile,
            tile,
            cmma::MatrixLayout::RowMajor,
        )
    };
    let b = unsafe {
        cmma::Matrix::<f16>::uninitialized(
            cmma::MatrixIdent::B,
            tile,
            tile,
            tile,
            cmma::MatrixLayout::ColMajor,
        )
    };

    let mut k0 = 0usize;
    while k0 < k {
        // lanes × per_lane elements = one tile each for A and B.
        #[unroll]
        for e in 0..per_lane {
            let idx = lane * per_lane + e;
            let r = idx / tile;
            let c = idx % tile;
            let kk = k0 + c;
            let mut av = f16::new(0.0);
            if row0 + r < m && kk < k {
                av = x[(row0 + r) * k + kk];
            }
            a_s[idx] = av;
            // B is k×n col-major: element (kk, col) at col*tile + kk, i.e. W's own row layout.
            let mut bv = f16::new(0.0);
            if col0 + r < n && kk < k {
                bv = w[(col0 + r) * k + kk];
            }
            b_s[idx] = bv;
        }
        sync_cube();
        cmma::load(&a, &a_s.to_slice(), comptime!(tile as u32));
        cmma::load(&b, &b_s.to_slice(), comptime!(tile as u32));
        cmma::execute::<f16, f16, f32, f32>(&a, &b, &acc, &acc);
        sync_cube();
        k0 += tile;
    }
    cmma::store(
        &mut c_s.to_slice_mut(),
        &acc,
        comptime!(tile as u32),
        cmma::MatrixLayout::RowMajor,
    );
    sync_cube();
    #[unroll]
    for e in 0..per_lane {
        let idx = lane * per_lane + e;
        let r = row0 + idx / tile;
        let c = col0 + idx % tile;
        if r < m && c < n {
            let mut v = c_s[idx];
            if comptime!(has_bias) {
                v += bias[col_off + c];
            }
            y[r * ldy + col_off + c] = O::cast_from(v);
        }
    }
}

/// Whether the device has the f16×f16→f32 tensor-core shape the `Cmma` variant uses
/// (`CMMA_TILE`³, 16×16×16).
pub fn cmma_supported<R: Runtime>(client: &ComputeClient<R>) -> bool {
    let t = CMMA_TILE as u32;
    client
        .features()
        .matmul
        .cmma
        .contains(&f16_f32_mma(t, t, t))
}

/// The tensor-core shape `m`×`n`×`k` with f16 inputs and f32 accumulators, as cubecl lists
/// the device's shapes (`features().matmul.cmma` and `.mma`).
pub(crate) fn f16_f32_mma(m: u32, n: u32, k: u32) -> MmaConfig {
    MmaConfig {
        a_type: ElemType::Float(FloatKind::F16).into(),
        b_type: ElemType::Float(FloatKind::F16).into(),
        cd_type: ElemType::Float(FloatKind::F32).into(),
        m,
        n,
        k,
    }
}

/// The variant `Auto` resolves to for `m` rows on this device.
pub fn resolve_variant<R: Runtime>(
    client: &ComputeClient<R>,
    variant: MatmulVariant,
    m: usize,
    n: usize,
    k: usize,
) -> MatmulVariant {
    match variant {
        // Tensor cores for 2 to 16 rows of any weight, and up to GEMV_MMA_MAX_ROWS of the
        // weights the scalar GEMV takes (each 16-row block reads W again, from L2 for them;
        // above, cubek's tiles, which read W once for all rows). H200, 0.5B, 32 rows: 13 200
        // tok/s against 7 000 with the scalar GEMV; 64 rows with cubek: 8 400–9 000.
        MatmulVariant::Auto
            if m >= 2
                && (m <= TILE_ROWS
                    || (m <= GEMV_MMA_MAX_ROWS && n * k * 2 <= GEMV_SHORT_MAX_BYTES))
                && k.is_multiple_of(32)
                && gemv_mma_auto(client) =>
        {
            MatmulVariant::GemvMma
        }
        MatmulVariant::Auto if m <= GEMV_MAX_ROWS => MatmulVariant::Gemv,
        // Above it, on tensor-core devices, cubek rather than `Cmma`: `Cmma` was 1% of cuBLAS at
        // 2048 rows and made a 16-token prompt wait 30 ms on the H100 (BENCHMARKS.md, "short
        // prompts"); but the GEMV for a short prompt's weights up to a size ([`GEMV_SHORT_ROWS`]).
        MatmulVariant::Auto if cmma_supported(client) => {
            let bytes = n * k * 2;
            let fits = bytes <= GEMV_SHORT_MAX_BYTES
                || (n < k && bytes <= 2 * GEMV_SHORT_MAX_BYTES && m <= GEMV_MAX_ROWS_PER_CUBE);
            if m <= GEMV_SHORT_ROWS && fits {
                MatmulVariant::Gemv
            } else {
                MatmulVariant::Cubek
            }
        }
        // On a CPU-emulated device (lavapipe: plane size 8) every load is a gather and every
        // barrier a context switch: register blocks, no shared memory (see BLOCK_ROWS).
        MatmulVariant::Auto if client.properties().hardware.plane_size_max < 32 => {
            MatmulVariant::Blocked
        }
        MatmulVariant::Auto => MatmulVariant::Tiled,
        v => v,
    }
}

/// Whether `Auto` may take [`MatmulVariant::GemvMma`]: the device has f16 `mma.m16n8k16` and
/// `CUBEQWEN_NO_GEMV_MMA` is not set.
fn gemv_mma_auto<R: Runtime>(client: &ComputeClient<R>) -> bool {
    crate::flash::mma_supported(client) && !crate::switches::switches().is_ok_and(|s| s.no_gemv_mma)
}

/// `y[i][j] += bias[j]` over a whole `[m, n]` output (the `Cubek` variant's bias).
#[cube(launch)]
fn add_bias_kernel<O: Float>(y: &mut Array<O>, bias: &Array<f32>, n: usize, total: usize) {
    let i = ABSOLUTE_POS;
    if i < total {
        y[i] = O::cast_from(f32::cast_from(y[i]) + bias[i % n]);
    }
}

/// `y[r][col_off + c] = src[r][c] (+ bias[col_off + c])`: a cubek result ([m, n]) placed into
/// columns of a wider output (a row chunk of the lm_head).
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
fn place_columns_kernel<O: Float>(
    src: &Array<O>,
    y: &mut Array<O>,
    bias: &Array<f32>,
    n: usize,
    ldy: usize,
    col_off: usize,
    total: usize,
    #[comptime] has_bias: bool,
) {
    let i = ABSOLUTE_POS;
    if i < total {
        let (r, c) = (i / n, i % n);
        let mut v = src[i];
        if comptime!(has_bias) {
            v = O::cast_from(f32::cast_from(v) + bias[col_off + c]);
        }
        y[r * ldy + col_off + c] = v;
    }
}

/// The tiling of cubek's TMA kernel where no switch names one: stages of 128 × 128 outputs,
/// 64 deep (cubek 0.2 picks 32 deep, and two tile rows a plane from 1024 rows), computed by
/// four planes of 64 × 64 (`pm=4,pn=4,sm=2,sn=2,pk=4`). H200, 2026-11-28, pp2048 alternated
/// in one call (BENCHMARKS.md, "Prefill matmul: the TMA kernel's tiling"): cubek's own blueprint
/// 0.5B 106 237 / 106 455 tok/s, 1.5B 48 764 / 48 717; eight planes of 16 × 128
/// (`tiles=8,rows=1,pk=4`) 137 002 / 140 016 and 58 955 / 58 957; and in a later call that
/// against this one, 0.5B 143 847 / 143 404 → 168 228 / 167 670, 1.5B 58 918 / 59 058 →
/// 70 441 / 70 465.
pub const TMA_TILING: crate::switches::CubekTiling = crate::switches::CubekTiling {
    tiles: None,
    rows: None,
    pk: Some(4),
    single_buffer: None,
    partition: Some([4, 4, 2, 2]),
};

/// cubek's algorithm, and whether it was named: `CUBEQWEN_CUBEK_STRATEGY` names one (for
/// measuring them); else, where the device has the Tensor Memory Accelerator (Hopper),
/// cubek's warp-specialized TMA kernel (`specialized_tma_mma`), elsewhere `Strategy::Auto`
/// (cubek 0.2: its simple cyclic cmma kernel). Measured on the H200 (2026-11-27, pp2048 in one
/// 2048-token chunk, two rounds): 0.5B 43 057 / 43 193 → 58 100 / 58 266 tok/s, 1.5B 15 719 /
/// 15 733 → 28 107 / 28 085; the other algorithms of the list below 36 600–50 500 on 0.5B
/// (BENCHMARKS.md). Parity with it on the H200: `production_path` and `hf-parity` (0.5B, 1.5B).
fn cubek_strategy<R: Runtime>(
    client: &ComputeClient<R>,
) -> Result<(cubek::matmul::launch::Strategy, bool)> {
    use cubek::matmul::launch::Strategy as S;
    if let Some(name) = &crate::switches::switches()?.cubek_strategy {
        return Ok((cubek_strategy_named(name)?, true));
    }
    let tma = client
        .properties()
        .features
        .tma
        .contains(cubecl::ir::features::Tma::Base);
    let s = if tma {
        S::SpecializedTmaMma(Default::default())
    } else {
        S::Auto
    };
    Ok((s, false))
}

/// cubek's matmul algorithm of this name (`CUBEQWEN_CUBEK_STRATEGY`).
pub fn cubek_strategy_named(name: &str) -> Result<cubek::matmul::launch::Strategy> {
    use cubek::matmul::launch::Strategy as S;
    Ok(match name {
        "auto" => S::Auto,
        "simple_cyclic_cmma" => S::SimpleCyclicCmma(Default::default()),
        "simple_cyclic_mma" => S::SimpleCyclicMma(Default::default()),
        "simple_tma_mma" => S::SimpleTmaMma(Default::default()),
        "double_cyclic_cmma" => S::DoubleCyclicCmma(Default::default()),
        "double_cyclic_mma" => S::DoubleCyclicMma(Default::default()),
        "double_tilewise_mma" => S::DoubleTilewiseMma(Default::default()),
        "double_hybrid_mma" => S::DoubleHybridMma(Default::default()),
        "double_async_cyclic_mma" => S::DoubleAsyncCyclicMma(Default::default()),
        "double_tma_cmma" => S::DoubleTmaCmma(Default::default()),
        "double_tma_mma" => S::DoubleTmaMma(Default::default()),
        "specialized_cyclic_mma" => S::SpecializedCyclicMma(Default::default()),
        "specialized_tma_mma" => S::SpecializedTmaMma(Default::default()),
        "ordered_double_cmma" => S::OrderedDoubleCmma(Default::default()),
        "ordered_double_mma" => S::OrderedDoubleMma(Default::default()),
        other => {
            return Err(KernelError::unsupported(
                "matmul",
                format!("CUBEQWEN_CUBEK_STRATEGY: unknown cubek strategy `{other}`"),
            )
            .into())
        }
    })
}

/// The `Cubek` variant: cubek's matmul (f32 accumulation) into the whole of y, then the bias.
fn cubek_into<R: Runtime, F: Float + CubeElement, O: Float + CubeElement>(
    client: &ComputeClient<R>,
    x: &DeviceTensor<R, F>,
    w: &DeviceTensor<R, F>,
    bias: Option<&DeviceTensor<R, f32>>,
    y: &DeviceTensor<R, O>,
) -> Result<()> {
    let (m, n) = (x.shape[0], w.shape[0]);
    let (strategy, named) = cubek_strategy(client)?;
    // A tiling a switch names is named too: an error where it does not fit, no fallback.
    let (tiling, tiling_named) = match crate::switches::switches()?.cubek_tiling {
        Some(t) => (t, true),
        None => (TMA_TILING, false),
    };
    cubek_launch(client, x, w, y, &strategy, named || tiling_named, tiling)?;
    if let Some(b) = bias {
        let (count, dim) = crate::grid::elementwise(client, m * n);
        add_bias_kernel::launch::<O, R>(client, count, dim, y.arg(), b.arg(), n, m * n);
    }
    Ok(())
}

/// cubek's warp-specialized TMA kernel with this tiling (for measuring tilings side by side:
/// `benches/kernels.rs`, `CUBEQWEN_BENCH_TILINGS`), `y [m, n] = x [m, k] · wᵀ`, no bias. An
/// error where the device has no TMA or cubek refuses the tiling.
pub fn cubek_tma<R: Runtime, F: Float + CubeElement, O: Float + CubeElement>(
    client: &ComputeClient<R>,
    x: &DeviceTensor<R, F>,
    w: &DeviceTensor<R, F>,
    y: &DeviceTensor<R, O>,
    tiling: crate::switches::CubekTiling,
) -> Result<()> {
    let (m, _, n) = product_shape(x, w)?;
    ensure!(
        y.shape == [m, n],
        KernelError::shape("matmul", "y", format!("[{m}, {n}]"), &y.shape)
    );
    let strategy = cubek::matmul::launch::Strategy::SpecializedTmaMma(Default::default());
    cubek_launch(client, x, w, y, &strategy, true, tiling)
}

/// `(m, k, n)` of `y = x · Wᵀ`, where x is `[m, k]` and W `[n, k]`; an error naming the operand
/// that is not.
pub(crate) fn product_shape<R: Runtime, F: CubeElement>(
    x: &DeviceTensor<R, F>,
    w: &DeviceTensor<R, F>,
) -> Result<(usize, usize, usize)> {
    ensure!(
        x.shape.len() == 2,
        KernelError::shape("matmul", "x", "[m, k]", &x.shape)
    );
    let (m, k) = (x.shape[0], x.shape[1]);
    ensure!(
        w.shape.len() == 2 && w.shape[1] == k,
        KernelError::shape("matmul", "W", format!("[n, {k}]"), &w.shape)
    );
    Ok((m, k, w.shape[0]))
}

/// cubek's launch of `y = x · wᵀ` with `strategy` (and, for its TMA kernel, `tiling`; all
/// `None` is cubek's own blueprint) on the client's runtime.
fn cubek_launch<R: Runtime, F: Float + CubeElement, O: Float + CubeElement>(
    client: &ComputeClient<R>,
    x: &DeviceTensor<R, F>,
    w: &DeviceTensor<R, F>,
    y: &DeviceTensor<R, O>,
    strategy: &cubek::matmul::launch::Strategy,
    named: bool,
    tiling: crate::switches::CubekTiling,
) -> Result<()> {
    let (m, k, n) = (x.shape[0], x.shape[1], w.shape[0]);
    let storage = |t: Option<cubecl::ir::Type>| -> Result<cubecl::ir::StorageType> {
        Ok(t.ok_or_else(|| {
            KernelError::unsupported("matmul", "cubek: an element type without a native type")
        })?
        .storage_type())
    };
    let problem = CubekProblem {
        x: &x.handle,
        w: &w.handle,
        y: &y.handle,
        mkn: [m, k, n],
        input: storage(F::as_type_native())?,
        output: storage(O::as_type_native())?,
    };
    // cubek's launch is generic over the runtime alone, and large: it is compiled once, in
    // this crate, for each runtime (`cubek_launch_on!`), not again in every binary that
    // instantiates this function (≈ 170 s of release build each, 2 cores, 2026-11-28).
    let any: &dyn std::any::Any = client;
    #[allow(unused_mut)]
    let mut launched = None;
    #[cfg(feature = "cuda")]
    if let Some(c) = any.downcast_ref::<ComputeClient<cubecl::cuda::CudaRuntime>>() {
        launched = Some(cubek_cuda(c, &problem, strategy, named, tiling));
    }
    if let Some(c) = any.downcast_ref::<ComputeClient<cubecl::wgpu::WgpuRuntime>>() {
        launched = Some(cubek_wgpu(c, &problem, strategy, named, tiling));
    }
    launched.ok_or_else(|| {
        KernelError::unsupported("matmul", "cubek: a runtime other than CUDA or wgpu")
    })?
}

/// One cubek matmul, `y [m, n] = x [m, k] · wᵀ` (w is [n, k]), in buffers of these element
/// types (accumulated in f32).
struct CubekProblem<'a> {
    x: &'a cubecl::server::Handle,
    w: &'a cubecl::server::Handle,
    y: &'a cubecl::server::Handle,
    mkn: [usize; 3],
    input: cubecl::ir::StorageType,
    output: cubecl::ir::StorageType,
}

/// `fn $name(client, problem, strategy, named, tiling)`: cubek's launch of `problem` on runtime
/// `$r`, with the strategy (its TMA kernel at `tiling`) or, where the default one (not `named`)
/// cannot take the problem, with cubek's own choice.
macro_rules! cubek_launch_on {
    ($name:ident, $r:ty) => {
        fn $name(
            client: &ComputeClient<$r>,
            p: &CubekProblem<'_>,
            strategy: &cubek::matmul::launch::Strategy,
            named: bool,
            tiling: crate::switches::CubekTiling,
        ) -> Result<()> {
            use cubecl::ir::StorageType;
            use cubecl::zspace::{Shape, Strides};
            use cubek::matmul::definition::{MatmulElems, MatmulGlobalElems};
            use cubek::matmul::launch::launch_ref;
            use cubek::std::InputBinding;

            let [m, k, n] = p.mkn;
            let bind = |h: &cubecl::server::Handle, shape: [usize; 2], strides: [usize; 2]| {
                // SAFETY: each buffer holds shape[0]·shape[1] values at these strides (checked
                // shapes).
                unsafe {
                    TensorBinding::<$r>::from_raw_parts(
                        h.clone(),
                        Strides::new(&strides),
                        Shape::new(shape),
                    )
                }
            };
            let mut dtypes = MatmulElems::from_globals(&MatmulGlobalElems {
                lhs: p.input,
                rhs: p.input,
                out: p.output,
            });
            let f32t = StorageType::Scalar(ElemType::Float(FloatKind::F32));
            dtypes.acc_register = f32t;
            dtypes.acc_stage = f32t;
            let launch = |s: &cubek::matmul::launch::Strategy, dtypes: &mut MatmulElems| {
                launch_ref(
                    s,
                    client,
                    InputBinding::Normal(bind(p.x, [m, k], [k, 1]), p.input),
                    InputBinding::Normal(bind(p.w, [k, n], [1, k]), p.input),
                    bind(p.y, [m, n], [n, 1]),
                    dtypes,
                )
            };
            // A tiling of the TMA kernel (a switch's, or `TMA_TILING`), forced as a blueprint
            // (`tma_blueprint`).
            let forced;
            let strategy = match strategy {
                cubek::matmul::launch::Strategy::SpecializedTmaMma(_)
                    if tiling != crate::switches::CubekTiling::default() =>
                {
                    match tma_blueprint(client, p.mkn, &dtypes, tiling) {
                        Ok(b) => {
                            forced = cubek::matmul::launch::Strategy::SpecializedTmaMma(
                                cubek::matmul::routines::BlueprintStrategy::Forced(b),
                            );
                            &forced
                        }
                        Err(e) if named => return Err(e),
                        // The default tiling does not fit this problem: cubek's own does.
                        Err(_) => strategy,
                    }
                }
                _ => strategy,
            };
            let first = dtypes.clone();
            let mut result = launch(strategy, &mut dtypes);
            if result.is_err() && !named {
                // The default TMA kernel cannot take this problem: cubek's own choice does.
                dtypes = first;
                result = launch(&cubek::matmul::launch::Strategy::Auto, &mut dtypes);
            }
            result.map_err(|e| KernelError::unsupported("matmul", format!("cubek: {e:?}")))?;
            Ok(())
        }
    };
}
/// The most elements a side of a TMA box may have (cubecl checks it only when the kernel
/// launches, and a refused launch leaves the device unusable).
const TMA_BOX_MAX: usize = 256;

/// Whether an explicit stage of `rows` × `cols` outputs, `depth` deep, fits the TMA boxes its
/// loads use (x: `rows` × `depth`, w: `cols` × `depth`); else why not.
fn tma_box_fits(rows: usize, cols: usize, depth: usize) -> std::result::Result<(), String> {
    if [rows, cols, depth]
        .iter()
        .all(|&s| (1..=TMA_BOX_MAX).contains(&s))
    {
        Ok(())
    } else {
        Err(format!(
            "a stage of {rows} rows × {cols} columns × {depth} deep: a TMA box side is 1 to {TMA_BOX_MAX} elements"
        ))
    }
}

/// cubek's blueprint for its warp-specialized TMA kernel on `[m, k, n]` (x row-major, w
/// `[n, k]`), from cubek's own selector (`infer_blueprint_plane`, as cubek calls it for this
/// kernel) with the fields of `t` in place of its choices: a stage is `16·tiles` rows by
/// `16·tiles` columns by `16·pk` deep, `tiles / rows` planes compute it.
fn tma_blueprint<R: Runtime>(
    client: &ComputeClient<R>,
    [m, k, n]: [usize; 3],
    dtypes: &cubek::matmul::definition::MatmulElems,
    t: crate::switches::CubekTiling,
) -> Result<cubek::matmul::definition::TilingBlueprint> {
    use cubecl::zspace::{Shape, Strides};
    use cubek::matmul::components::stage::PartitionBuffering;
    use cubek::matmul::components::tile::TileMatmulKind;
    use cubek::matmul::definition::{AvailableVectorSizes, MatmulProblem, MultiRowStrategy};
    use cubek::matmul::routines::{infer_blueprint_plane, PlaneTilingBlueprintOptions};
    let err = |e: cubek::matmul::definition::MatmulSetupError| {
        KernelError::unsupported("matmul", format!("cubek tiling {t:?}: {e:?}"))
    };
    let problem = MatmulProblem::from_shapes_and_strides(
        Shape::new([m, k]),
        Shape::new([k, n]),
        Shape::new([m, n]),
        Strides::new(&[k, 1]),
        Strides::new(&[1, k]),
        Strides::new(&[n, 1]),
        dtypes.as_global_elems(),
        cubecl::ir::AddressType::from_len((m * k).max(k * n).max(m * n)),
        None,
        None,
    )
    .map_err(err)?;
    let vector_sizes = AvailableVectorSizes::from_type_size_tma(client, dtypes.acc_global.size())
        .filter_lhs_with_tensor(&problem.lhs_strides, &problem.lhs_shape, problem.lhs_layout)
        .filter_rhs_with_tensor(&problem.rhs_strides, &problem.rhs_shape, problem.rhs_layout)
        .filter_out_with_tensor(&problem.out_strides, &problem.out_shape)
        .pick_max()
        .map_err(err)?;
    let kind = TileMatmulKind::Mma;
    let mut dtypes = dtypes.clone();
    dtypes.adjust_stage_dtypes();
    let plane_dim = match client.properties().hardware.plane_size_max {
        0 => 32,
        p => p,
    };
    let buffering = t.single_buffer.map(|single| match single {
        true => PartitionBuffering::Single,
        false => PartitionBuffering::Double,
    });
    let options = PlaneTilingBlueprintOptions {
        specialized: true,
        swizzled: kind.should_swizzle(client),
        row_count: t.tiles,
        partition_k: t.pk,
        multi_row_strategy: match t.rows {
            Some(r) => MultiRowStrategy::Always(r),
            None => MultiRowStrategy::Adaptive {
                minimum_stage_count: 8,
            },
        },
        partition_buffering: buffering,
        ..Default::default()
    };
    let Some([pm, pn, sm, sn]) = t.partition else {
        let (blueprint, _) = infer_blueprint_plane::<R>(
            kind,
            client,
            &problem,
            plane_dim,
            dtypes,
            &vector_sizes,
            options,
        )
        .map_err(err)?;
        return Ok(blueprint);
    };
    // An explicit stage: the selector's steps (instruction, hypercube, swizzle, load-only
    // planes) with these partition and stage sizes.
    use cubek::matmul::components::global::{InputLoadFlow, LoadFlows};
    use cubek::matmul::definition::{TilingBlueprint, TilingScheme};
    use cubek::matmul::routines::{find_instruction_size, select_swizzle};
    use cubek::std::cube_count::{
        CubeCountStrategy, GlobalOrder, HypercubeBlueprint, SmAllocation,
    };
    use cubek::std::{PartitionSize, StageSize, SwizzleModes};
    let tile = find_instruction_size::<R, _, _>(
        client,
        (
            dtypes.lhs_register,
            dtypes.rhs_register,
            dtypes.acc_register,
        ),
        (m, n, k).into(),
        (None, None, None),
        |c, cfg| kind.is_supported(c, cfg),
        |c, l, r, a| kind.supported_sizes(c, l, r, a),
    )
    .map_err(|e| err(e.into()))?;
    let pk = t.pk.unwrap_or(4);
    tma_box_fits(
        sm as usize * pm as usize * tile.m() as usize,
        sn as usize * pn as usize * tile.n() as usize,
        pk as usize * tile.k() as usize,
    )
    .map_err(|why| KernelError::unsupported("matmul", format!("cubek tiling {t:?}: {why}")))?;
    let scheme = TilingScheme::builder()
        .with_tile_size(tile)
        .with_partition_size(PartitionSize::new(pm, pn, pk))
        .with_stage_size(StageSize::new(sm, sn, 1))
        .build()
        .map_err(|e| KernelError::unsupported("matmul", format!("cubek tiling {t:?}: {e}")))?;
    // As cubek's selector: double buffering where a plane has several tiles along n.
    let buffering = buffering.unwrap_or(match pn > 1 {
        true => PartitionBuffering::Double,
        false => PartitionBuffering::Single,
    });
    let cube_count = match client.properties().hardware.num_streaming_multiprocessors {
        Some(num_sms) => CubeCountStrategy::Sm {
            num_sms,
            sm_usage: SmAllocation::Exact,
            cubes_first: true,
        },
        None => CubeCountStrategy::FromProblem,
    };
    let hypercube = HypercubeBlueprint::builder()
        .global_order(GlobalOrder::SwizzleRow(4))
        .cube_count_strategy(cube_count)
        .build();
    let mut builder = TilingBlueprint::builder(kind, scheme, plane_dim, &problem)
        .partition_buffering(buffering)
        .hypercube_blueprint(hypercube)
        .load_specialization_config(LoadFlows {
            lhs: InputLoadFlow::LoadOnly,
            rhs: InputLoadFlow::LoadOnly,
        });
    if kind.should_swizzle(client) {
        // x is row-major and w's columns are k-contiguous: both swizzle along k.
        let along_k = scheme.elements_per_stage_along_k() as usize;
        builder = builder.shared_swizzle(SwizzleModes {
            lhs: select_swizzle(along_k, dtypes.lhs_stage, vector_sizes.lhs),
            rhs: select_swizzle(along_k, dtypes.rhs_stage, vector_sizes.rhs),
            ..Default::default()
        });
    }
    Ok(builder.build())
}

cubek_launch_on!(cubek_wgpu, cubecl::wgpu::WgpuRuntime);
#[cfg(feature = "cuda")]
cubek_launch_on!(cubek_cuda, cubecl::cuda::CudaRuntime);

/// `y = x · Wᵀ (+ bias)`; see the module docs for shapes.
pub fn matmul<R: Runtime, F: Float + CubeElement, O: Float + CubeElement>(
    client: &ComputeClient<R>,
    variant: MatmulVariant,
    x: &DeviceTensor<R, F>,
    w: &DeviceTensor<R, F>,
    bias: Option<&DeviceTensor<R, f32>>,
    y: &DeviceTensor<R, O>,
) -> Result<()> {
    matmul_into(client, variant, x, w, bias, y, 0)
}

/// Like [`matmul`], but writes the `n` outputs of `w` into columns `col_off..col_off + n` of a
/// wider `y` (`[m, n_total]`); `bias` (if any) is `[n_total]` and read at the same columns.
pub fn matmul_into<R: Runtime, F: Float + CubeElement, O: Float + CubeElement>(
    client: &ComputeClient<R>,
    variant: MatmulVariant,
    x: &DeviceTensor<R, F>,
    w: &DeviceTensor<R, F>,
    bias: Option<&DeviceTensor<R, f32>>,
    y: &DeviceTensor<R, O>,
    col_off: usize,
) -> Result<()> {
    matmul_into_with(client, variant, None, x, w, bias, y, col_off)
}

/// [`matmul_into`] with the mma kernel's tile given (`None`: `CUBEQWEN_MMA_TILE`, else
/// [`crate::matmul_mma::tile_for`]); it is read where the variant resolves to `Mma` only. For
/// tests and benches that compare tiles in one process.
#[allow(clippy::too_many_arguments)]
pub fn matmul_into_with<R: Runtime, F: Float + CubeElement, O: Float + CubeElement>(
    client: &ComputeClient<R>,
    variant: MatmulVariant,
    mma_tile: Option<crate::matmul_mma::MmaTile>,
    x: &DeviceTensor<R, F>,
    w: &DeviceTensor<R, F>,
    bias: Option<&DeviceTensor<R, f32>>,
    y: &DeviceTensor<R, O>,
    col_off: usize,
) -> Result<()> {
    let (m, k, n) = product_shape(x, w)?;
    ensure!(
        y.shape.len() == 2 && y.shape[0] == m && y.shape[1] >= col_off + n,
        KernelError::shape(
            "matmul",
            "y",
            format!("[{m}, {}] or wider", col_off + n),
            &y.shape
        )
    );
    let ldy = y.shape[1];
    if let Some(b) = bias {
        ensure!(
            b.shape == [ldy],
            KernelError::shape("matmul", "bias", format!("[{ldy}]"), &b.shape)
        );
    }
    let dummy;
    let bias_arg = match bias {
        Some(b) => b.arg(),
        // Never read (`has_bias` is false), so any 4 bytes serve: W's (read-only, as x's), as
        // a short prompt's matmuls would otherwise allocate one (a cubecl server call) each.
        // SAFETY: one f32 in W's buffer, which holds at least 4 bytes.
        None if w.len() * size_of::<F>() >= 4 => unsafe {
            ArrayArg::from_raw_parts(w.handle.clone(), 1)
        },
        None => {
            dummy = DeviceTensor::<R, f32>::empty(client, &[1])?;
            dummy.arg()
        }
    };
    let has_bias = bias.is_some();
    // Output tiles along one dimension; at most the device's grid size along that axis.
    let (max_x, max_y, _) = client.properties().hardware.max_cube_count;
    let tiles = |d: usize, tile: usize, max: u32| -> Result<u32> {
        let t = d.div_ceil(tile);
        ensure!(
            t <= max as usize,
            KernelError::unsupported(
                "matmul",
                format!("dimension {d} needs {t} tiles, more than one launch allows")
            )
        );
        Ok(t as u32)
    };
    let resolved = resolve_variant(client, variant, m, n, k);
    if resolved == MatmulVariant::Cubek {
        if col_off == 0 && ldy == n {
            return cubek_into(client, x, w, bias, y);
        }
        // cubek writes whole outputs: into a scratch [m, n], then placed at the columns.
        let scratch = DeviceTensor::<R, O>::empty(client, &[m, n])?;
        cubek_into(client, x, w, None, &scratch)?;
        let (count, dim) = crate::grid::elementwise(client, m * n);
        place_columns_kernel::launch::<O, R>(
            client,
            count,
            dim,
            scratch.arg(),
            y.arg(),
            bias_arg,
            n,
            ldy,
            col_off,
            m * n,
            has_bias,
        );
        return Ok(());
    }
    match resolved {
        MatmulVariant::Mma => {
            let tile = match mma_tile {
                Some(t) => Some(t),
                None => crate::switches::switches()?.mma_tile,
            };
            crate::matmul_mma::matmul_mma(
                client,
                tile,
                x,
                w,
                bias_arg,
                has_bias,
                y,
                (m, n, k),
                col_off,
            )?;
        }
        MatmulVariant::GemvMma => {
            let how = crate::gemv_mma::GemvMma::for_device(client);
            crate::gemv_mma::gemv_mma(client, how, x, w, bias, y, col_off)?;
        }
        MatmulVariant::Tiled => {
            matmul_tiled::launch::<F, O, R>(
                client,
                CubeCount::new_2d(tiles(n, TILE, max_x)?, tiles(m, TILE, max_y)?),
                CubeDim::new_2d(TILE as u32, TILE as u32),
                x.arg(),
                w.arg(),
                bias_arg,
                y.arg(),
                m,
                n,
                k,
                ldy,
                col_off,
                has_bias,
                TILE,
            );
        }
        MatmulVariant::Cmma => {
            ensure!(
                F::as_type_native_unchecked().elem_type() == ElemType::Float(FloatKind::F16),
                KernelError::unsupported("matmul", "the cmma variant takes f16 tensors")
            );
            ensure!(cmma_supported(client), KernelError::NoTensorCores);
            ensure!(
                client.properties().hardware.plane_size_max as usize == CMMA_LANES,
                KernelError::unsupported(
                    "matmul",
                    format!("the cmma variant needs {CMMA_LANES}-wide planes")
                )
            );
            matmul_cmma::launch::<O, R>(
                client,
                CubeCount::new_2d(tiles(n, CMMA_TILE, max_x)?, tiles(m, CMMA_TILE, max_y)?),
                CubeDim::new_1d(CMMA_LANES as u32),
                x.arg(),
                w.arg(),
                bias_arg,
                y.arg(),
                m,
                n,
                k,
                ldy,
                col_off,
                has_bias,
                CMMA_TILE,
                CMMA_LANES,
            );
        }
        MatmulVariant::Gemv => {
            let vec = vector_size(client, size_of::<F>(), k);
            let (threads, rows_per_cube) = gemv_shape(client, m, k / vec)?;
            let col_groups = n.div_ceil(rows_per_cube);
            let rows = gemv_rows(client, m, col_groups);
            let cubes = u32::try_from(m.div_ceil(rows) * col_groups).map_err(|_| {
                KernelError::unsupported("matmul", format!("gemv of {m}×{n} is too large"))
            })?;
            matmul_gemv::launch::<F, O, R>(
                client,
                CubeCountSelection::new(client, cubes).cube_count(),
                CubeDim::new_2d(threads as u32, rows_per_cube as u32),
                vec,
                // SAFETY: same buffers, viewed as vectors of `vec` elements; k % vec == 0.
                unsafe { ArrayArg::from_raw_parts(x.handle.clone(), x.len() / vec) },
                unsafe { ArrayArg::from_raw_parts(w.handle.clone(), w.len() / vec) },
                bias_arg,
                y.arg(),
                m,
                n,
                k / vec,
                ldy,
                col_off,
                col_groups,
                has_bias,
                Reduction::new(client, threads * rows_per_cube, threads),
                rows,
            );
        }
        MatmulVariant::Blocked => {
            let vec = vector_size(client, size_of::<F>(), k);
            let blocks = m.div_ceil(BLOCK_ROWS) * n.div_ceil(BLOCK_COLS);
            let dim = CubeDim::new_1d(BLOCK_THREADS);
            let count = cubecl::calculate_cube_count_elemwise(client, blocks, dim);
            matmul_blocked::launch::<F, O, R>(
                client,
                count,
                dim,
                vec,
                // SAFETY: same buffers, viewed as vectors of `vec` elements; k % vec == 0.
                unsafe { ArrayArg::from_raw_parts(x.handle.clone(), x.len() / vec) },
                unsafe { ArrayArg::from_raw_parts(w.handle.clone(), w.len() / vec) },
                bias_arg,
                y.arg(),
                m,
                n,
                k / vec,
                ldy,
                col_off,
                has_bias,
                BLOCK_ROWS,
                BLOCK_COLS,
            );
        }
        MatmulVariant::Auto | MatmulVariant::Cubek => unreachable!(),
    }
    Ok(())
}

/// The widest vector (at most 8 elements) the device loads well that divides `k` (the matmul
/// and decode kernels' loads along k).
pub(crate) fn vector_size<R: Runtime>(
    client: &ComputeClient<R>,
    elem_bytes: usize,
    k: usize,
) -> usize {
    client
        .io_optimized_vector_sizes(elem_bytes)
        .filter(|v| k.is_multiple_of(*v) && *v <= 8)
        .max()
        .unwrap_or(1)
}

/// A weight [n, k] kept as row chunks that each fit one device buffer (wgpu caps a buffer at
/// its `max_storage_buffer_binding_size`; the 151936×896 f16 lm_head is 272 MB).
pub struct RowChunked<R: Runtime, F: CubeElement> {
    pub chunks: Vec<DeviceTensor<R, F>>,
    pub n: usize,
    pub k: usize,
}

impl<R: Runtime, F: CubeElement> Clone for RowChunked<R, F> {
    fn clone(&self) -> Self {
        Self {
            chunks: self.chunks.clone(),
            n: self.n,
            k: self.k,
        }
    }
}

impl<R: Runtime, F: Float + CubeElement> RowChunked<R, F> {
    /// Uploads `data` ([n, k], row-major) in chunks of at most the device's buffer size.
    pub fn upload(client: &ComputeClient<R>, data: &[F], n: usize, k: usize) -> Result<Self> {
        let max_bytes = (client.properties().memory.max_page_size as usize).min(1 << 30);
        Self::upload_rows(
            client,
            data,
            n,
            k,
            (max_bytes / (k * size_of::<F>())).max(1),
        )
    }

    /// Uploads `data` in chunks of `rows_per_chunk` rows.
    pub fn upload_rows(
        client: &ComputeClient<R>,
        data: &[F],
        n: usize,
        k: usize,
        rows_per_chunk: usize,
    ) -> Result<Self> {
        ensure!(
            data.len() == n * k,
            KernelError::shape(
                "RowChunked::upload",
                "weight",
                format!("{n}×{k} values"),
                &[data.len()]
            )
        );
        ensure!(
            rows_per_chunk > 0,
            KernelError::invalid("RowChunked::upload", "rows_per_chunk must be > 0")
        );
        let chunks = data
            .chunks(rows_per_chunk * k)
            .map(|c| DeviceTensor::from_slice(client, c, &[c.len() / k, k]))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { chunks, n, k })
    }

    /// `y = x · Wᵀ` over all chunks; y is [m, n].
    pub fn matmul<O: Float + CubeElement>(
        &self,
        client: &ComputeClient<R>,
        variant: MatmulVariant,
        x: &DeviceTensor<R, F>,
        bias: Option<&DeviceTensor<R, f32>>,
        y: &DeviceTensor<R, O>,
    ) -> Result<()> {
        ensure!(
            y.shape.len() == 2 && y.shape[1] == self.n,
            KernelError::shape("matmul", "y", format!("[m, {}]", self.n), &y.shape)
        );
        let mut off = 0;
        for c in &self.chunks {
            matmul_into(client, variant, x, c, bias, y, off)?;
            off += c.shape[0];
        }
        Ok(())
    }
}

/// f64 reference: `y[i][j] = Σ_l x[i][l]·w[j][l] + b[j]`.
pub fn reference(
    x: &[f64],
    w: &[f64],
    bias: Option<&[f64]>,
    m: usize,
    n: usize,
    k: usize,
) -> Vec<f64> {
    let mut y = vec![0.0; m * n];
    for i in 0..m {
        let xr = &x[i * k..(i + 1) * k];
        for j in 0..n {
            let wr = &w[j * k..(j + 1) * k];
            let dot: f64 = xr.iter().zip(wr).map(|(a, b)| a * b).sum();
            y[i * n + j] = dot + bias.map_or(0.0, |b| b[j]);
        }
    }
    y
}
