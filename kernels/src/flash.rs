//! Flash-attention prefill (FlashAttention-2 style): many query tokens against the KV cache,
//! causal with a cache offset, grouped-query heads, online softmax in f32, no
//! [tokens × positions] matrix in memory.
//!
//! Layouts as in [`crate::attention`]: q and out [tokens, n_heads·hd]; the cache holds k and v
//! as [n_kv, max_ctx, hd]. Query token `t` sits at position `start + t` and sees cache positions
//! `0..=start + t`; query head `h` reads kv head `h / (n_heads / n_kv)`.
//!
//! A cube takes [`BM`] query rows of one kv group and loops over key tiles of `bk` cache
//! positions staged in shared memory, up to the last position its last row sees (tiles above
//! the causal diagonal are skipped). A row is a (token, head) pair: with
//! [`PrefillOptions::pack_group`] the rows of a cube are all the group's heads of consecutive
//! tokens (`row = t·group + head in group`), so each K/V tile is loaded once for the group's
//! heads; without it a cube takes consecutive tokens of one head. Per tile and row the
//! kernel keeps the running max `m` and sum `l` of `exp(s − m)` and rescales its output by
//! `exp(m_old − m_new)`; the output is divided by `l` once at the end.
//!
//! Two kernels with the same tiling:
//! - [`PrefillKernel::Portable`]: plain f32 FMAs, 128 threads as 8 × 16 each own a 8-row
//!   slice of scores (`rows ty + 8a`, keys `tx + 16b`) and of the output (`rows ty + 8a`,
//!   dims `tx + 16c`); one thread per row does the softmax. Runs on every runtime.
//! - [`PrefillKernel::Mma`]: tensor cores through `mma.m16n8k16` with registers the kernel
//!   manages (FlashAttention-2): 4 planes of 32, each owning 16 rows; scores, softmax and
//!   probabilities never leave the registers (see `prefill_mma_kernel`); CUDA sm_80+.
//!   [`PrefillKernel::MmaEmulated`] runs it everywhere with each mma and each cross-lane
//!   reduction done through shared memory.

use anyhow::{bail, ensure, Result};
use cubecl::ir::features::EnumSet;
use cubecl::ir::{ElemType, FloatKind};
use cubecl::prelude::barrier::{copy_async, Barrier};
use cubecl::prelude::*;
use half::f16;

use crate::attention::{combine_parts, KvCache};
use crate::decode::copy_barrier;
use crate::matmul::f16_f32_mma;
use crate::reduce::{reduce_in_plane, ReduceOp, Reduction};
use crate::DeviceTensor;

/// Query rows per cube.
pub const BM: usize = 64;
/// Threads per cube (both kernels).
const THREADS: usize = 128;
/// A score below any real one: masked positions, and the running max before the first key.
const NEG: f32 = -1.0e30;

/// Which prefill kernel runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PrefillKernel {
    /// `Mma` for f16 where the device has `mma.m16n8k16` (H100 kernel bench, 2026-11-27, 2048
    /// tokens of 0.5B heads: 122 µs against `Portable`'s 798 and 1020 for the kernel on cubecl's
    /// opaque `cmma` fragments that it replaced), else `Portable`.
    #[default]
    Auto,
    Portable,
    /// Tensor cores with manually managed `mma.m16n8k16` fragments: scores, softmax and
    /// probabilities stay in registers (CUDA, f16, sm_80+).
    Mma,
    /// The `Mma` kernel with each mma and each cross-lane reduction done through shared memory
    /// (the same register layout and code otherwise; every runtime; slow).
    MmaEmulated,
}

impl std::str::FromStr for PrefillKernel {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        Ok(match s {
            "auto" => Self::Auto,
            "portable" => Self::Portable,
            "mma" => Self::Mma,
            "mma-emulated" => Self::MmaEmulated,
            _ => {
                bail!("unknown prefill kernel `{s}`: expected auto, portable, mma or mma-emulated")
            }
        })
    }
}

/// How [`attention_prefill_with`] runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PrefillOptions {
    pub kernel: PrefillKernel,
    /// A cube's rows are all query heads of one kv group (K/V tiles loaded once per group)
    /// rather than one head.
    pub pack_group: bool,
    /// The mma kernels' key tiles split over this many cubes a row tile, their parts merged by
    /// a second launch (`attention::combine_parts`); `None`: [`flash_splits`]'s choice. The
    /// portable kernel does not split.
    pub splits: Option<usize>,
}

impl Default for PrefillOptions {
    fn default() -> Self {
        Self {
            kernel: PrefillKernel::Auto,
            pack_group: true,
            splits: None,
        }
    }
}

/// Where a cube's rows are: the tile of rows it takes, the heads it covers, the kv head, and
/// how many key tiles of `bk` positions its last row sees. The heaviest tiles (latest tokens)
/// get the lowest cube indices, so they start first.
#[derive(CubeType)]
struct Rows {
    r0: usize,
    rows: usize,
    head0: usize,
    kv_base: usize,
    n_tiles: usize,
}

#[cube]
#[allow(arithmetic_overflow)] // the macro's type-check stand-ins for CUBE_COUNT_X / CUBE_POS_X
fn rows_of_cube(
    tokens: usize,
    heads_per_cube: usize,
    group: usize,
    max_ctx: usize,
    start: usize,
    #[comptime] bk: usize,
) -> Rows {
    let rows = tokens * heads_per_cube;
    let tile = CUBE_COUNT_X as usize - 1 - CUBE_POS_X as usize;
    let r0 = tile * BM;
    let head0 = CUBE_POS_Y as usize * heads_per_cube;
    let last_row = min(r0 + BM, rows) - 1;
    // The cube's last token sees positions 0..=start + t_last.
    let seen = start + last_row / heads_per_cube + 1;
    Rows {
        r0,
        rows,
        head0,
        kv_base: (head0 / group) * max_ctx,
        n_tiles: seen.div_ceil(bk),
    }
}

/// Offset in q/out of row `row` (< rows) of a cube whose heads start at `head0`.
#[cube]
fn row_offset(
    row: usize,
    head0: usize,
    heads_per_cube: usize,
    n_heads: usize,
    #[comptime] hd: usize,
) -> usize {
    let t = row / heads_per_cube;
    (t * n_heads + head0 + row % heads_per_cube) * hd
}

/// The last cache position row `row` sees; rows past the end (padding of the last tile) act
/// as the last token, so their (unused) softmax stays finite.
#[cube]
fn last_visible(row: usize, tokens: usize, heads_per_cube: usize, start: usize) -> usize {
    start + min(row / heads_per_cube, tokens - 1)
}

/// Copies rows `r0..r0 + BM` of q into `q_s` (row stride `stride`), zeros past the last row.
#[cube]
#[allow(clippy::too_many_arguments)]
fn stage_q<F: Float>(
    q: &Array<F>,
    q_s: &mut SharedMemory<F>,
    rows: &Rows,
    heads_per_cube: usize,
    n_heads: usize,
    #[comptime] hd: usize,
    #[comptime] stride: usize,
) {
    let mut i = UNIT_POS as usize;
    while i < BM * hd {
        let r = i / hd;
        let e = i % hd;
        let row = rows.r0 + r;
        let mut v = F::new(0.0);
        if row < rows.rows {
            v = q[row_offset(row, rows.head0, heads_per_cube, n_heads, hd) + e];
        }
        q_s[r * stride + e] = v;
        i += THREADS;
    }
}

/// Copies cache positions `j0..j0 + bk` of the cube's kv head into `k_s` and `v_s` (row
/// strides `k_stride`, `hd`); positions at or past `kv_len` (never written, maybe NaN) become
/// zeros.
#[cube]
#[allow(clippy::too_many_arguments)]
fn stage_kv<F: Float>(
    k_cache: &Array<F>,
    v_cache: &Array<F>,
    k_s: &mut SharedMemory<F>,
    v_s: &mut SharedMemory<F>,
    kv_base: usize,
    j0: usize,
    kv_len: usize,
    #[comptime] hd: usize,
    #[comptime] bk: usize,
    #[comptime] k_stride: usize,
) {
    let mut i = UNIT_POS as usize;
    while i < bk * hd {
        let j = i / hd;
        let e = i % hd;
        let mut kv = F::new(0.0);
        let mut vv = F::new(0.0);
        if j0 + j < kv_len {
            let src = (kv_base + j0 + j) * hd + e;
            kv = k_cache[src];
            vv = v_cache[src];
        }
        k_s[j * k_stride + e] = kv;
        v_s[j * hd + e] = vv;
        i += THREADS;
    }
}

/// The portable kernel (see the module docs). Cube (x: row tile, y: head block), 16 × 8 units.
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
fn prefill_portable_kernel<F: Float>(
    q: &Array<F>,
    k_cache: &Array<F>,
    v_cache: &Array<F>,
    out: &mut Array<F>,
    tokens: usize,
    n_heads: usize,
    group: usize,
    heads_per_cube: usize,
    max_ctx: usize,
    start: usize,
    scale: f32,
    #[comptime] hd: usize,
    #[comptime] bk: usize,
) {
    let tx = UNIT_POS_X as usize; // 0..16: keys tx + 16b, dims tx + 16c
    let ty = UNIT_POS_Y as usize; // 0..8: rows ty + 8a
    let tid = UNIT_POS as usize;
    let n_rows = comptime!(BM / 8); // rows per thread
    let n_keys = comptime!(bk / 16); // keys per thread
    let n_dims = comptime!(hd / 16); // output dims per thread
                                     // Padded row strides: the 16 key rows a plane reads at once fall in distinct banks.
    let qk_stride = comptime!(hd + 2);
    let s_stride = comptime!(bk + 1);
    let kv_len = start + tokens;
    let cube = rows_of_cube(tokens, heads_per_cube, group, max_ctx, start, bk);

    let mut q_s = SharedMemory::<F>::new(BM * qk_stride);
    let mut k_s = SharedMemory::<F>::new(bk * qk_stride);
    let mut v_s = SharedMemory::<F>::new(bk * hd);
    // Scores, then probabilities, of the tile: [BM][bk] (stride bk + 1).
    let mut s_s = SharedMemory::<f32>::new(BM * s_stride);
    // Per row: the rescale factor of the tile, at the end 1 / l.
    let mut a_s = SharedMemory::<f32>::new(BM);

    stage_q::<F>(q, &mut q_s, &cube, heads_per_cube, n_heads, hd, qk_stride);

    let mut o = Array::<f32>::new(n_rows * n_dims);
    let mut s = Array::<f32>::new(n_rows * n_keys);
    let mut qv = Array::<f32>::new(n_rows);
    let mut kv = Array::<f32>::new(n_keys);
    let mut vv = Array::<f32>::new(n_dims);
    #[unroll]
    for i in 0..n_rows * n_dims {
        o[i] = 0.0;
    }
    // Running max and sum of row `tid` (threads tid < BM).
    let mut m_run = f32::new(NEG);
    let mut l_run = 0.0f32;
    let my_last = last_visible(cube.r0 + tid, tokens, heads_per_cube, start);

    let mut tile = 0usize;
    while tile < cube.n_tiles {
        let j0 = tile * bk;
        stage_kv::<F>(
            k_cache,
            v_cache,
            &mut k_s,
            &mut v_s,
            cube.kv_base,
            j0,
            kv_len,
            hd,
            bk,
            qk_stride,
        );
        sync_cube();

        // S = Q·Kᵀ for this thread's rows and keys.
        #[unroll]
        for i in 0..n_rows * n_keys {
            s[i] = 0.0;
        }
        for e in 0..hd {
            #[unroll]
            for a in 0..n_rows {
                qv[a] = f32::cast_from(q_s[(ty + 8 * a) * qk_stride + e]);
            }
            #[unroll]
            for b in 0..n_keys {
                kv[b] = f32::cast_from(k_s[(tx + 16 * b) * qk_stride + e]);
            }
            #[unroll]
            for a in 0..n_rows {
                #[unroll]
                for b in 0..n_keys {
                    s[a * n_keys + b] += qv[a] * kv[b];
                }
            }
        }
        #[unroll]
        for a in 0..n_rows {
            #[unroll]
            for b in 0..n_keys {
                s_s[(ty + 8 * a) * s_stride + tx + 16 * b] = s[a * n_keys + b];
            }
        }
        sync_cube();

        // Online softmax of row `tid`: scale, causal mask, new max, probabilities, sum.
        if tid < BM {
            let base = tid * s_stride;
            let mut mx = m_run;
            for j in 0..bk {
                if j0 + j <= my_last {
                    mx = f32::max(mx, s_s[base + j] * scale);
                }
            }
            let mut sum = 0.0f32;
            for j in 0..bk {
                let mut p = 0.0f32;
                if j0 + j <= my_last {
                    p = f32::exp(s_s[base + j] * scale - mx);
                }
                s_s[base + j] = p;
                sum += p;
            }
            let alpha = f32::exp(m_run - mx);
            l_run = l_run * alpha + sum;
            m_run = mx;
            a_s[tid] = alpha;
        }
        sync_cube();

        // O = diag(alpha)·O + P·V for this thread's rows and dims.
        #[unroll]
        for a in 0..n_rows {
            let alpha = a_s[ty + 8 * a];
            #[unroll]
            for c in 0..n_dims {
                o[a * n_dims + c] *= alpha;
            }
        }
        for j in 0..bk {
            #[unroll]
            for a in 0..n_rows {
                qv[a] = s_s[(ty + 8 * a) * s_stride + j];
            }
            #[unroll]
            for c in 0..n_dims {
                vv[c] = f32::cast_from(v_s[j * hd + tx + 16 * c]);
            }
            #[unroll]
            for a in 0..n_rows {
                #[unroll]
                for c in 0..n_dims {
                    o[a * n_dims + c] += qv[a] * vv[c];
                }
            }
        }
        sync_cube();
        tile += 1;
    }

    if tid < BM {
        a_s[tid] = 1.0 / l_run;
    }
    sync_cube();
    #[unroll]
    for a in 0..n_rows {
        let r = ty + 8 * a;
        let row = cube.r0 + r;
        if row < cube.rows {
            let at = row_offset(row, cube.head0, heads_per_cube, n_heads, hd);
            let inv = a_s[r];
            #[unroll]
            for c in 0..n_dims {
                out[at + tx + 16 * c] = F::cast_from(o[a * n_dims + c] * inv);
            }
        }
    }
}

/// Rows of the `mma` kernel's tile handled by one plane (the m of `mma.m16n8k16`).
const MMA_ROWS: usize = 16;
/// Key positions per tile of the `mma` kernel.
const MMA_BK: usize = 64;

/// Key positions per tile of the mma kernel: [`MMA_BK`]; half that in the emulation, whose
/// two K/V buffers and shared-memory fragments must fit lavapipe's 32 KB.
fn mma_bk(emulate: bool) -> usize {
    if emulate {
        MMA_BK / 2
    } else {
        MMA_BK
    }
}
/// Padding of the `mma` kernel's shared K and V rows, in f16: 16 bytes, so that the 8 rows
/// of one 8 × 8 matrix that `ldmatrix` reads (or 8 units store) fall in 32 distinct banks.
pub(crate) const MMA_PAD: usize = 8;

pub(crate) type Pair16 = Vector<f16, Const<2>>;
pub(crate) type Pair32 = Vector<f32, Const<2>>;

/// `c += a · b` for one `mma.m16n8k16` (f16 in, f32 accumulate) of a plane, in the registers
/// of PTX's layout: lane `l` (`g = l / 4`, `t = l % 4`) holds
/// - of A (16 × 16, 4 pairs): rows `g` (pairs 0, 2) and `g + 8` (pairs 1, 3), columns `2t..2t+2`
///   (pairs 0, 1) and `8 + 2t..` (pairs 2, 3);
/// - of B (16 × 8, 2 pairs): rows `2t..2t+2` (pair 0) and `8 + 2t..` (pair 1), column `g`;
/// - of C (16 × 8, 2 pairs): rows `g` (pair 0) and `g + 8` (pair 1), columns `2t..2t+2`.
///
/// With `emulate` the plane's fragments go through shared memory `scratch` (384 f32 per plane)
/// and each lane computes its four sums in f32: the same layout, on every runtime. Every unit
/// of the cube must call it (the emulation synchronizes the cube).
#[cube]
pub(crate) fn mma_16816(
    a: &Array<Pair16>,
    b: &Array<Pair16>,
    c: &mut Array<Pair32>,
    scratch: &mut SharedMemory<f32>,
    #[comptime] emulate: bool,
) {
    if comptime!(emulate) {
        let lane = UNIT_POS as usize % 32;
        let base = UNIT_POS as usize / 32 * 384;
        let (g, t) = (lane / 4, lane % 4);
        // A row-major 16 × 16 at base, B row-major 16 × 8 at base + 256.
        #[unroll]
        for r in 0..4usize {
            let row = g + 8 * (r % 2);
            let col = 2 * t + 8 * (r / 2);
            scratch[base + row * 16 + col] = f32::cast_from(a[r][0]);
            scratch[base + row * 16 + col + 1] = f32::cast_from(a[r][1]);
        }
        #[unroll]
        for r in 0..2usize {
            let k = 2 * t + 8 * r;
            scratch[base + 256 + k * 8 + g] = f32::cast_from(b[r][0]);
            scratch[base + 256 + (k + 1) * 8 + g] = f32::cast_from(b[r][1]);
        }
        sync_cube();
        #[unroll]
        for r in 0..2usize {
            let row = g + 8 * r;
            let mut v = c[r];
            #[unroll]
            for h in 0..2usize {
                let col = 2 * t + h;
                let mut acc = v[h];
                for k in 0..16usize {
                    acc += scratch[base + row * 16 + k] * scratch[base + 256 + k * 8 + col];
                }
                v[h] = acc;
            }
            c[r] = v;
        }
        sync_cube();
    } else {
        let def = cmma::MmaDefinition::<f16, f16, f32>::new(16usize, 8usize, 16usize);
        def.execute_inplace(a, b, c);
    }
}

/// K/V staging items (one `vec`-wide vector of one key) per unit for a tile of `bk` keys.
fn mma_kv_items(bk: usize, hd: usize, vec: usize) -> usize {
    (bk * (hd / vec)).div_ceil(THREADS)
}

/// Stages the K/V tile at cache positions `j0..j0 + bk` into buffer `buf` of `k_s` and
/// `v_s` (a key a row of `hd + MMA_PAD` f16, as the cache holds it): item `it` of this unit is
/// dims `c·vec..` of key `i / chunks` (`i = UNIT_POS + it·THREADS`, `c = i % chunks`), so
/// consecutive units move consecutive 16-byte vectors of a row. Positions at or past `kv_len`
/// (never written, maybe NaN) read the last written position instead: their scores are
/// masked, and their values are finite, so they weigh nothing. With a barrier the copies are
/// `cp.async` (nothing held in registers while they fly), committed to it; else plain loads
/// and stores. Either way they are visible to the cube after [`mma_wait_tile`].
#[cube]
#[allow(clippy::too_many_arguments)]
fn mma_stage_kv<V: Size>(
    k_cache: &Array<Vector<f16, V>>,
    v_cache: &Array<Vector<f16, V>>,
    k_s: &mut SharedMemory<Vector<f16, V>>,
    v_s: &mut SharedMemory<Vector<f16, V>>,
    bar: &ComptimeOption<Shared<Barrier>>,
    buf: usize,
    kv_base: usize,
    j0: usize,
    kv_len: usize,
    #[comptime] bk: usize,
    #[comptime] hd: usize,
    #[comptime] vec: usize,
) {
    let chunks = comptime!(hd / vec);
    let stride = comptime!((hd + MMA_PAD) / vec);
    #[unroll]
    for it in 0..comptime!(mma_kv_items(bk, hd, vec)) {
        let i = UNIT_POS as usize + it * THREADS;
        let key = i / chunks;
        if key < bk {
            let src = (kv_base + min(j0 + key, kv_len - 1)) * chunks + i % chunks;
            let at = (buf * bk + key) * stride + i % chunks;
            if comptime!(bar.is_some()) {
                let size = comptime!(vec as u32);
                copy_async(
                    &k_cache.slice(src, src + 1),
                    &mut k_s.slice_mut(at, at + 1),
                    size,
                );
                copy_async(
                    &v_cache.slice(src, src + 1),
                    &mut v_s.slice_mut(at, at + 1),
                    size,
                );
            } else {
                k_s[at] = k_cache[src];
                v_s[at] = v_cache[src];
            }
        }
    }
    mma_commit(bar);
}

/// Commits this unit's `cp.async` copies issued since its last commit to `bar`, so that
/// [`mma_wait_tile`] on it completes only once they have landed; nothing without a barrier.
#[cube]
pub(crate) fn mma_commit(bar: &ComptimeOption<Shared<Barrier>>) {
    #[comptime]
    match bar {
        ComptimeOption::Some(b) => b.commit_copy_async(),
        ComptimeOption::None => {}
    }
}

/// Waits until every unit has finished the tile before (so its buffer may be overwritten) and
/// the tile staged last is in shared memory: the barrier's arrive-and-wait, which completes
/// only once each unit's committed copies have landed; without one, a cube sync.
#[cube]
pub(crate) fn mma_wait_tile(bar: &ComptimeOption<Shared<Barrier>>) {
    #[comptime]
    match bar {
        ComptimeOption::Some(b) => b.arrive_and_wait(),
        ComptimeOption::None => sync_cube(),
    }
}

/// Row and 8-dim block, relative to the fragment's origin, whose 16-byte row lane `l` names in
/// [`mma_frags`]: matrix `l / 8`, row `l % 8` of it. Without `rows16` the four matrices are 8
/// rows at dims +0, +8, +16, +24: B of `Q·Kᵀ` (K rows; two k-steps), B of a matmul (W rows).
/// With `rows16`, rows +0 and +8 of one 8-dim block, then of the next: B of `P·V` (V rows,
/// transposed: two output blocks), A of a matmul (x rows: one 16 × 16 fragment).
#[cube]
fn frag_row(l: usize, #[comptime] rows16: bool) -> (usize, usize) {
    if comptime!(rows16) {
        (l % 8 + 8 * ((l / 8) % 2), l / 16)
    } else {
        (l % 8, l / 8)
    }
}

/// f16 `dim` of row `row` of a staged tile (rows of `stride` vectors).
#[cube]
fn staged<V: Size>(
    s: &SharedMemory<Vector<f16, V>>,
    row: usize,
    dim: usize,
    #[comptime] stride: usize,
) -> f16 {
    let v = s[row * stride + dim / V::value()];
    v[dim % V::value()]
}

/// Four fragment registers (f16 pairs, as `mma.m16n8k16` reads them) from a staged tile
/// (rows of `stride` vectors) whose fragment origin is row `row0`, dim `dim0` ([`frag_row`]
/// with `rows16` says which 8 × 8 matrix each is): one `ldmatrix.x4` (`.trans` with `trans`)
/// on CUDA; with `emulate` each lane reads its elements (lane (g, t): of matrix j row g, dims
/// 2t, 2t + 1; transposed: rows 2t, 2t + 1, dim g). K of `Q·Kᵀ` and W of a matmul: neither
/// flag (B of two k-steps); V of `P·V`: both; x of a matmul: `rows16` (A of one k-step).
#[cube]
pub(crate) fn mma_frags<V: Size>(
    s: &SharedMemory<Vector<f16, V>>,
    row0: usize,
    dim0: usize,
    #[comptime] stride: usize,
    #[comptime] rows16: bool,
    #[comptime] trans: bool,
    #[comptime] emulate: bool,
) -> Array<Pair16> {
    let lane = UNIT_POS as usize % 32;
    if comptime!(emulate) {
        let (g, t) = (lane / 4, lane % 4);
        let mut out = Array::<Pair16>::new(4usize);
        #[unroll]
        for j in 0..4usize {
            let mut p = Pair16::empty();
            #[unroll]
            for e in 0..2usize {
                // Element (i, col) of matrix j: its row i is the one lane j·8 + i names.
                let (i, col) = if comptime!(trans) {
                    (2 * t + e, g)
                } else {
                    (g, 2 * t + e)
                };
                let (r, block) = frag_row(j * 8 + i, rows16);
                p[e] = staged::<V>(s, row0 + r, dim0 + 8 * block + col, stride);
            }
            out[j] = p;
        }
        out
    } else {
        let (r, c) = frag_row(lane, rows16);
        let at = (row0 + r) * stride + (dim0 + 8 * c) / V::value();
        let def = cmma::MmaDefinition::<f16, f16, f32>::new(16usize, 8usize, 16usize);
        def.load_matrix::<Vector<f16, V>, Const<2>>(
            &s.slice(at, at + 1),
            cmma::MatrixIdent::B,
            4usize,
            trans,
        )
    }
}

/// The tensor-core kernel with manually managed `mma.m16n8k16` fragments (FlashAttention-2's
/// register layout): cube (x: row tile, y: head block) of 4 planes; plane `w` owns rows
/// `16w..16w+16` of the tile. Q's fragments stay in registers for the whole key loop; per
/// tile of `bk` keys ([`mma_bk`]) the scores `S = Q·Kᵀ` are mma accumulators, the online
/// softmax runs on them in registers (row max and sum over the 4 lanes that share a row,
/// `quad`; the causal mask only on the tiles that cross a row's last key), and the
/// probabilities, rounded to f16, are the A fragments of `P·V` without leaving the registers:
/// an accumulator's pairs (rows g / g + 8, columns 2t..) are exactly A's pairs. K and V are
/// staged row-major as the cache holds them, in two buffers: the next tile's 16-byte
/// `cp.async` copies fly while the cube computes on the current one ([`mma_stage_kv`], one
/// barrier wait a tile); `ldmatrix` (`.trans` for V) reads four B fragments at a time
/// ([`mma_frags`]).
#[cube(launch, fast_math = exp_mode(exact_exp))]
#[allow(clippy::too_many_arguments)]
// `exact_exp` is read by the `fast_math` attribute only.
#[allow(unused_variables)]
fn prefill_mma_kernel<V: Size>(
    q: &Array<f16>,
    k_cache: &Array<Vector<f16, V>>,
    v_cache: &Array<Vector<f16, V>>,
    out: &mut Array<f16>,
    part_out: &mut Array<f32>,
    part_max: &mut Array<f32>,
    part_sum: &mut Array<f32>,
    tokens: usize,
    n_heads: usize,
    group: usize,
    heads_per_cube: usize,
    max_ctx: usize,
    start: usize,
    scale: f32,
    tiles_per_split: usize,
    #[comptime] hd: usize,
    #[comptime] vec: usize,
    #[comptime] quad: Reduction,
    #[comptime] bk: usize,
    #[comptime] emulate: bool,
    #[comptime] split: bool,
    #[comptime] exact_exp: bool,
) {
    let tid = UNIT_POS as usize;
    let w = tid / 32;
    let lane = tid % 32;
    let (g, t) = (lane / 4, lane % 4);
    let n_k = comptime!(hd / 16); // k-steps of Q·Kᵀ
    let n_d = comptime!(hd / 8); // 8-dim column blocks of the output
    let n_s = comptime!(bk / 8); // 8-key column blocks of the scores
    let stride = comptime!((hd + MMA_PAD) / vec); // K and V rows, in vectors
    let kv_len = start + tokens;
    let cube = rows_of_cube(tokens, heads_per_cube, group, max_ctx, start, bk);

    // Two buffers of K and V rows: the next tile lands in one while the cube reads the other.
    let mut k_s = SharedMemory::<Vector<f16, V>>::new_aligned(2 * bk * stride, 16usize);
    let mut v_s = SharedMemory::<Vector<f16, V>>::new_aligned(2 * bk * stride, 16usize);
    // CUDA: the K/V tiles arrive by `cp.async` and this barrier says when (see `mma_stage_kv`).
    let bar = copy_barrier(!emulate);
    let scratch_len = comptime!(if emulate { 4 * 384usize } else { 1usize });
    let mut scratch = SharedMemory::<f32>::new(scratch_len);

    // This lane's two rows of the tile (accumulator pairs 0 and 1) and what they see.
    let row_lo = cube.r0 + w * MMA_ROWS + g;
    let last_lo = last_visible(row_lo, tokens, heads_per_cube, start);
    let last_hi = last_visible(row_lo + 8, tokens, heads_per_cube, start);

    // Q's A fragments, k-step kk at 4·kk.. (rows past the last are zeros).
    let mut qf = Array::<Pair16>::new(n_k * 4);
    #[unroll]
    for r in 0..2usize {
        let row = row_lo + 8 * r;
        let at = row_offset(row, cube.head0, heads_per_cube, n_heads, hd);
        #[unroll]
        for kk in 0..n_k {
            #[unroll]
            for half in 0..2usize {
                let col = kk * 16 + 8 * half + 2 * t;
                let mut p = Pair16::empty();
                p[0] = f16::new(0.0);
                p[1] = f16::new(0.0);
                if row < cube.rows {
                    p[0] = q[at + col];
                    p[1] = q[at + col + 1];
                }
                qf[kk * 4 + 2 * half + r] = p;
            }
        }
    }

    let mut o = Array::<Pair32>::new(n_d * 2);
    #[unroll]
    for i in 0..n_d * 2 {
        let mut z = Pair32::empty();
        z[0] = 0.0;
        z[1] = 0.0;
        o[i] = z;
    }
    let mut s = Array::<Pair32>::new(n_s * 2);
    let mut m_lo = f32::new(NEG);
    let mut m_hi = f32::new(NEG);
    // Partial sums over this lane's columns; the quad's are added at the end.
    let mut l_lo = 0.0f32;
    let mut l_hi = 0.0f32;
    let mut af = Array::<Pair16>::new(4usize);
    let mut bf = Array::<Pair16>::new(2usize);
    let mut acc = Array::<Pair32>::new(2usize);

    // The key tiles of this cube's split (all of them without splits).
    let mut tile = 0usize;
    let mut end = cube.n_tiles;
    if comptime!(split) {
        tile = CUBE_POS_Z as usize * tiles_per_split;
        end = min(tile + tiles_per_split, cube.n_tiles);
    }
    let first = tile;
    if tile < end {
        let j0 = tile * bk;
        mma_stage_kv::<V>(
            k_cache,
            v_cache,
            &mut k_s,
            &mut v_s,
            &bar,
            0,
            cube.kv_base,
            j0,
            kv_len,
            bk,
            hd,
            vec,
        );
    }
    while tile < end {
        let j0 = tile * bk;
        // This tile's buffer; the next tile streams into the other one during this one.
        let buf = (tile - first) % 2;
        let row_k = buf * bk;
        mma_wait_tile(&bar);
        if tile + 1 < end {
            mma_stage_kv::<V>(
                k_cache,
                v_cache,
                &mut k_s,
                &mut v_s,
                &bar,
                1 - buf,
                cube.kv_base,
                j0 + bk,
                kv_len,
                bk,
                hd,
                vec,
            );
        }

        // S = Q·Kᵀ: 8-key block n, accumulator pairs at 2n, 2n + 1.
        #[unroll(!emulate)]
        for n in 0..n_s {
            let mut z = Pair32::empty();
            z[0] = 0.0;
            z[1] = 0.0;
            acc[0] = z;
            acc[1] = z;
            // Two k-steps a fragment load: dims 32kk2.. of keys 8n..8n + 8.
            #[unroll(!emulate)]
            for kk2 in 0..comptime!(n_k / 2) {
                let kf =
                    mma_frags::<V>(&k_s, row_k + n * 8, kk2 * 32, stride, false, false, emulate);
                #[unroll]
                for h in 0..2usize {
                    let kk = 2 * kk2 + h;
                    #[unroll]
                    for r in 0..4usize {
                        af[r] = qf[kk * 4 + r];
                    }
                    bf[0] = kf[2 * h];
                    bf[1] = kf[2 * h + 1];
                    mma_16816(&af, &bf, &mut acc, &mut scratch, emulate);
                }
            }
            s[2 * n] = acc[0];
            s[2 * n + 1] = acc[1];
        }

        // Online softmax on the registers, on unscaled scores (the scale is positive, so the
        // max is the same key's): the causal mask where the tile passes one of this lane's rows'
        // last key (the tiles on the diagonal), then the row's new max over the quad.
        if j0 + bk > min(last_lo, last_hi) + 1 {
            #[unroll]
            for n in 0..n_s {
                let mut lo = s[2 * n];
                let mut hi = s[2 * n + 1];
                #[unroll]
                for h in 0..2usize {
                    let key = j0 + n * 8 + 2 * t + h;
                    lo[h] = select(key <= last_lo, lo[h], f32::new(NEG));
                    hi[h] = select(key <= last_hi, hi[h], f32::new(NEG));
                }
                s[2 * n] = lo;
                s[2 * n + 1] = hi;
            }
        }
        let mut mx_lo = f32::new(NEG);
        let mut mx_hi = f32::new(NEG);
        #[unroll]
        for n in 0..n_s {
            let lo = s[2 * n];
            let hi = s[2 * n + 1];
            mx_lo = f32::max(mx_lo, f32::max(lo[0], lo[1]));
            mx_hi = f32::max(mx_hi, f32::max(hi[0], hi[1]));
        }
        let new_lo = f32::max(m_lo, reduce_in_plane::<f32>(mx_lo, ReduceOp::Max, quad));
        let new_hi = f32::max(m_hi, reduce_in_plane::<f32>(mx_hi, ReduceOp::Max, quad));
        let alpha_lo = f32::exp((m_lo - new_lo) * scale);
        let alpha_hi = f32::exp((m_hi - new_hi) * scale);
        m_lo = new_lo;
        m_hi = new_hi;
        // exp(s·scale − m·scale), one FMA an element. A row that has seen no key yet (its max
        // is NEG: a split may hold only keys past a row's last) subtracts 0 instead, so its
        // probabilities are exp(NEG·scale) = 0 and its sum 0, which the merge weighs 0 (not
        // NEG·scale's rounding error, which the FMA would leave where both are NEG).
        let ms_lo = select(new_lo == f32::new(NEG), 0.0f32, new_lo * scale);
        let ms_hi = select(new_hi == f32::new(NEG), 0.0f32, new_hi * scale);
        let mut sum_lo = 0.0f32;
        let mut sum_hi = 0.0f32;
        #[unroll]
        for n in 0..n_s {
            let mut lo = s[2 * n];
            let mut hi = s[2 * n + 1];
            #[unroll]
            for h in 0..2usize {
                // Masked scores are NEG: exp underflows to 0.
                lo[h] = f32::exp(lo[h] * scale - ms_lo);
                hi[h] = f32::exp(hi[h] * scale - ms_hi);
                sum_lo += lo[h];
                sum_hi += hi[h];
            }
            s[2 * n] = lo;
            s[2 * n + 1] = hi;
        }
        l_lo = l_lo * alpha_lo + sum_lo;
        l_hi = l_hi * alpha_hi + sum_hi;
        // The output rescaled only where a row's max moved (once the max settles, most tiles
        // of a long row skip it; a plane skips it when none of its rows moved).
        if alpha_lo != 1.0 || alpha_hi != 1.0 {
            #[unroll]
            for d in 0..n_d {
                let mut lo = o[2 * d];
                let mut hi = o[2 * d + 1];
                lo[0] *= alpha_lo;
                lo[1] *= alpha_lo;
                hi[0] *= alpha_hi;
                hi[1] *= alpha_hi;
                o[2 * d] = lo;
                o[2 * d + 1] = hi;
            }
        }

        // O += P·V: k-step kk covers keys 16kk..16kk + 16, i.e. score blocks 2kk and 2kk + 1.
        #[unroll(!emulate)]
        for kk in 0..comptime!(bk / 16) {
            #[unroll]
            for r in 0..4usize {
                // A pair r: rows g / g + 8 (r % 2) of score block 2kk + r / 2.
                let sv = s[2 * (2 * kk + r / 2) + r % 2];
                let mut x = Pair16::empty();
                x[0] = f16::cast_from(sv[0]);
                x[1] = f16::cast_from(sv[1]);
                af[r] = x;
            }
            // Two 8-dim output blocks a fragment load: keys 16kk.., dims 16d2...
            #[unroll(!emulate)]
            for d2 in 0..comptime!(n_d / 2) {
                let vf =
                    mma_frags::<V>(&v_s, row_k + kk * 16, d2 * 16, stride, true, true, emulate);
                #[unroll]
                for h in 0..2usize {
                    let d = 2 * d2 + h;
                    bf[0] = vf[2 * h];
                    bf[1] = vf[2 * h + 1];
                    acc[0] = o[2 * d];
                    acc[1] = o[2 * d + 1];
                    mma_16816(&af, &bf, &mut acc, &mut scratch, emulate);
                    o[2 * d] = acc[0];
                    o[2 * d + 1] = acc[1];
                }
            }
        }
        tile += 1;
    }

    let sum_lo = reduce_in_plane::<f32>(l_lo, ReduceOp::Sum, quad);
    let sum_hi = reduce_in_plane::<f32>(l_hi, ReduceOp::Sum, quad);
    #[unroll]
    for r in 0..2usize {
        let row = row_lo + 8 * r;
        if row < cube.rows {
            let at = row_offset(row, cube.head0, heads_per_cube, n_heads, hd);
            let sum = if comptime!(r == 0) { sum_lo } else { sum_hi };
            if comptime!(split) {
                // The split's part of row (token, head) `at / hd`: its unnormalised output, max
                // and sum, for `attention::combine_parts`.
                let part = (at / hd) * CUBE_COUNT_Z as usize + CUBE_POS_Z as usize;
                #[unroll]
                for d in 0..n_d {
                    let v = o[2 * d + r];
                    part_out[part * hd + d * 8 + 2 * t] = v[0];
                    part_out[part * hd + d * 8 + 2 * t + 1] = v[1];
                }
                if t == 0 {
                    // The max in scaled units, as the merge weighs parts.
                    let m = if comptime!(r == 0) { m_lo } else { m_hi };
                    part_max[part] = m * scale;
                    part_sum[part] = sum;
                }
            } else {
                let inv = 1.0 / sum;
                #[unroll]
                for d in 0..n_d {
                    let v = o[2 * d + r];
                    out[at + d * 8 + 2 * t] = f16::cast_from(v[0] * inv);
                    out[at + d * 8 + 2 * t + 1] = f16::cast_from(v[1] * inv);
                }
            }
        }
    }
}

/// The float modes of the mma kernel: where not `exact`, its exponentials are `__expf`
/// (`ex2.approx` of `x·log₂e`: 2 instructions, about 2 ulp) instead of `expf`'s range
/// reduction. They take finite arguments (masked scores are `NEG`, not −∞) and are
/// accumulated in f32. `CUBEQWEN_FLASH_EXACT_EXP` sets `exact`.
fn exp_mode(exact: bool) -> EnumSet<FastMath> {
    if exact {
        EnumSet::empty()
    } else {
        FastMath::ReducedPrecision | FastMath::NotNaN | FastMath::NotInf
    }
}

/// Most key splits of the mma kernels.
pub const MAX_SPLITS: usize = 64;
/// Fewest key tiles ([`MMA_BK`] positions) a split takes.
const MIN_TILES_PER_SPLIT: usize = 2;

/// Key splits for `cubes` row tiles that see up to `n_tiles` key tiles on a device of `sms`
/// multiprocessors (0: unknown, no split): none where the row tiles alone fill the GPU; else
/// enough for about two cubes a multiprocessor, each split at least [`MIN_TILES_PER_SPLIT`]
/// tiles. A short chunk deep in the cache (16 tokens of the 0.5B model at depth 4096: 4 row
/// tiles over 65 key tiles) otherwise walks every key in 4 cubes.
pub fn flash_splits(cubes: usize, n_tiles: usize, sms: usize) -> usize {
    if sms == 0 || cubes >= sms {
        return 1;
    }
    (2 * sms)
        .div_ceil(cubes)
        .min(n_tiles / MIN_TILES_PER_SPLIT)
        .clamp(1, MAX_SPLITS)
}

/// Shared memory of the portable kernel for key tiles of `bk`, in bytes.
fn portable_smem(elem: usize, hd: usize, bk: usize) -> usize {
    elem * (BM * (hd + 2) + bk * (hd + 2) + bk * hd) + 4 * (BM * (bk + 1) + BM)
}

/// Shared memory of the mma kernel, in bytes: two buffers of K and V rows of padded f16; with
/// the emulation its fragments and the shared-memory trees of its six quad reductions, else
/// the copies' barrier (8 bytes) and a one-float stand-in for the fragments.
fn mma_smem(hd: usize, emulate: bool) -> usize {
    2 * 2 * 2 * mma_bk(emulate) * (hd + MMA_PAD)
        + if emulate {
            4 * (4 * 384 + 6 * THREADS)
        } else {
            8 + 4
        }
}

/// Whether the device runs `mma.m16n8k16` with f16 inputs and f32 accumulators.
pub fn mma_supported<R: Runtime>(client: &ComputeClient<R>) -> bool {
    client
        .features()
        .matmul
        .mma
        .contains(&f16_f32_mma(16, 8, 16))
        && client.properties().hardware.plane_size_max == 32
}

/// The kernel [`PrefillKernel::Auto`] resolves to for `F` on this device (see there).
pub fn resolve_kernel<R: Runtime, F: CubePrimitive>(
    client: &ComputeClient<R>,
    kernel: PrefillKernel,
) -> PrefillKernel {
    match kernel {
        PrefillKernel::Auto if is_f16::<F>() && mma_supported(client) => PrefillKernel::Mma,
        PrefillKernel::Auto => PrefillKernel::Portable,
        k => k,
    }
}

fn is_f16<F: CubePrimitive>() -> bool {
    F::as_type_native_unchecked().elem_type() == ElemType::Float(FloatKind::F16)
}

/// `out = softmax(q·Kᵀ/sqrt(hd) + causal) · V` for query tokens at positions
/// `start..start + tokens` against cache positions `0..=start + t`, with the flash kernel and
/// row packing of `options` ([`PrefillOptions::default`]: `Auto`, packed). Same other arguments
/// as [`crate::attention::attention`].
pub fn attention_prefill_with<R: Runtime, F: Float + CubeElement>(
    client: &ComputeClient<R>,
    options: PrefillOptions,
    q: &DeviceTensor<R, F>,
    cache: &KvCache<R, F>,
    n_heads: usize,
    start: usize,
    out: &DeviceTensor<R, F>,
) -> Result<()> {
    let hd = cache.head_dim;
    ensure!(
        q.shape.len() == 2 && q.shape[1] == n_heads * hd,
        "attention prefill: q must be [tokens, {}], got {:?}",
        n_heads * hd,
        q.shape
    );
    ensure!(
        out.shape == q.shape,
        "attention prefill: out {:?} differs from q {:?}",
        out.shape,
        q.shape
    );
    ensure!(
        cache.n_kv > 0 && n_heads > 0 && n_heads.is_multiple_of(cache.n_kv),
        "attention prefill: {n_heads} query heads cannot share {} kv heads",
        cache.n_kv
    );
    ensure!(
        hd > 0 && hd <= 256 && hd.is_multiple_of(16),
        "attention prefill: head_dim {hd} unsupported (a multiple of 16, at most 256)"
    );
    let tokens = q.shape[0];
    ensure!(tokens > 0, "attention prefill: no query tokens");
    let kv_len = start + tokens;
    ensure!(
        kv_len <= cache.max_ctx,
        "attention prefill: positions up to {kv_len} exceed the cache of {} positions",
        cache.max_ctx
    );
    let group = n_heads / cache.n_kv;
    let heads_per_cube = if options.pack_group { group } else { 1 };
    let row_tiles = (tokens * heads_per_cube).div_ceil(BM);
    let head_blocks = n_heads / heads_per_cube;
    ensure!(
        row_tiles <= 65535 && head_blocks <= 65535,
        "attention prefill: {tokens} tokens × {n_heads} heads need more cubes than one launch allows"
    );
    let count = CubeCount::Static(row_tiles as u32, head_blocks as u32, 1);
    let scale = 1.0 / (hd as f32).sqrt();
    let max_smem = client.properties().hardware.max_shared_memory_size;
    let fits =
        |need: &dyn Fn(usize) -> usize| [64, 32, 16].into_iter().find(|&b| need(b) <= max_smem);

    match resolve_kernel::<R, F>(client, options.kernel) {
        PrefillKernel::Portable => {
            let bk = fits(&|b| portable_smem(size_of::<F>(), hd, b)).ok_or_else(|| {
                anyhow::anyhow!(
                    "attention prefill: head_dim {hd} needs {} bytes of shared memory, the device has {max_smem}",
                    portable_smem(size_of::<F>(), hd, 16)
                )
            })?;
            prefill_portable_kernel::launch::<F, R>(
                client,
                count,
                CubeDim::new_2d(16, 8),
                q.arg(),
                cache.k.arg(),
                cache.v.arg(),
                out.arg(),
                tokens,
                n_heads,
                group,
                heads_per_cube,
                cache.max_ctx,
                start,
                scale,
                hd,
                bk,
            );
        }
        kernel @ (PrefillKernel::Mma | PrefillKernel::MmaEmulated) => {
            let emulate = kernel == PrefillKernel::MmaEmulated;
            ensure!(
                is_f16::<F>(),
                "attention prefill: the mma kernels take f16 tensors"
            );
            ensure!(
                emulate || mma_supported(client),
                "attention prefill: this device has no f16 mma.m16n8k16 with 32-wide planes; use the portable kernel"
            );
            ensure!(
                hd.is_multiple_of(16) && hd <= 128,
                "attention prefill: the mma kernel takes head_dim a multiple of 16 up to 128, not {hd}"
            );
            ensure!(
                mma_smem(hd, emulate) <= max_smem,
                "attention prefill: head_dim {hd} needs {} bytes of shared memory for the mma kernel, the device has {max_smem}",
                mma_smem(hd, emulate)
            );
            // K/V loads and shared rows of `vec` f16: 16 bytes on CUDA, the row `ldmatrix`
            // reads; the emulation takes any vector that divides the 8-dim blocks.
            let vec = crate::matmul::vector_size(client, 2, hd);
            ensure!(
                if emulate {
                    MMA_PAD.is_multiple_of(vec)
                } else {
                    vec == 8
                },
                "attention prefill: the mma kernel needs 16-byte vectors of f16 (here {vec} f16)"
            );
            let bk = mma_bk(emulate);
            let n_tiles = kv_len.div_ceil(bk);
            let sms = client.properties().hardware.num_streaming_multiprocessors;
            let wanted = match options.splits {
                Some(s) => s,
                None => flash_splits(row_tiles * head_blocks, n_tiles, sms.unwrap_or(0) as usize),
            };
            ensure!(
                (1..=MAX_SPLITS).contains(&wanted),
                "attention prefill: {wanted} key splits (1 to {MAX_SPLITS})"
            );
            // Tiles a split, then as many splits as that needs (none left empty).
            let tiles_per_split = n_tiles.div_ceil(wanted);
            let splits = n_tiles.div_ceil(tiles_per_split);
            let token_heads = tokens * n_heads;
            let parts = if splits > 1 { token_heads * splits } else { 1 };
            let part_out =
                DeviceTensor::<R, f32>::empty(client, &[parts * if splits > 1 { hd } else { 1 }])?;
            let part_max = DeviceTensor::<R, f32>::empty(client, &[parts])?;
            let part_sum = DeviceTensor::<R, f32>::empty(client, &[parts])?;
            prefill_mma_kernel::launch::<R>(
                client,
                CubeCount::Static(row_tiles as u32, head_blocks as u32, splits as u32),
                CubeDim::new_1d(THREADS as u32),
                vec,
                q.arg(),
                cache.k.arg(),
                cache.v.arg(),
                out.arg(),
                part_out.arg(),
                part_max.arg(),
                part_sum.arg(),
                tokens,
                n_heads,
                group,
                heads_per_cube,
                cache.max_ctx,
                start,
                scale,
                tiles_per_split,
                hd,
                vec,
                // The 4 lanes that share a row of an mma fragment: shuffles on CUDA, the
                // shared-memory tree in the emulation.
                Reduction::with_plane(THREADS, 4, if emulate { 0 } else { 32 }),
                bk,
                emulate,
                splits > 1,
                crate::switches::switches()?.flash_exact_exp,
            );
            if splits > 1 {
                combine_parts(
                    client,
                    &part_out,
                    &part_max,
                    &part_sum,
                    out,
                    splits,
                    token_heads,
                    hd,
                )?;
            }
        }
        PrefillKernel::Auto => unreachable!("resolve_kernel never returns Auto"),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flash_splits_fill_an_idle_gpu_only() {
        // H200 (132 multiprocessors): 16 tokens of the 0.5B model at depth 4096 (4 row tiles,
        // 65 key tiles): 66 wanted, 32 at 2 tiles each; a 2048-token chunk (448 row tiles):
        // none; one key tile: none; the count unknown: none.
        assert_eq!(flash_splits(4, 65, 132), 32);
        assert_eq!(flash_splits(14, 65, 132), 19);
        assert_eq!(flash_splits(448, 65, 132), 1);
        assert_eq!(flash_splits(4, 1, 132), 1);
        assert_eq!(flash_splits(4, 65, 0), 1);
        assert_eq!(flash_splits(1, 10_000, 1000), MAX_SPLITS);
    }
}
