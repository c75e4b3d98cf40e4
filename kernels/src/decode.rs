//! Fused kernels for one decode step (a single token), so that a layer is five launches
//! instead of sixteen, and no per-token value travels from the host: the token's position
//! lives in a device buffer `state` (`state[0]` = position) that the last kernel of a step
//! advances, and the sampled id stays on the device for the next step's embedding.
//!
//! | kernel | does | replaces |
//! |---|---|---|
//! | [`embed_token`] | `x = table[token]` (f32 residual stream) | `embedding` |
//! | [`attn_in`] | RMSNorm(x) → q/k/v (+bias) → RoPE → k, v appended to the cache at `pos` (streamed where one wave would not hold it: [`attn_in_with`]) | `rms_norm`, `gemv_qkv` (or 3 `matmul`), `rope_qk_append` |
//! | [`attention`] | GQA attention of the token over cache positions `0..=pos` | `attention` |
//! | [`gemv_residual`] | `x += W·a` (o-proj, down; streamed where one wave would not hold it: [`gemv_residual_with`]) | `matmul` + `residual_add` |
//! | [`ffn_in`] | RMSNorm(x) → gate, up → SwiGLU (streamed: [`ffn_in_with`]) | `rms_norm`, `gemv_gate_up_swiglu` (or 2 `matmul`, `swiglu`) |
//! | [`lm_head_top2`] + [`top2_finish`] | output norm → logits, their top 2 → next token; `pos += 1` | `rms_norm`, `matmul`, `top_k` |
//!
//! Each kernel rounds its intermediates to the storage type `F` where the unfused path stores
//! them (the normed input, q/k/v before RoPE, gate and up), so both paths compute the same
//! function up to the order of f32 additions. A dot product is shared by [`LANES`] units that
//! read 16-byte vectors along k; `split` planes share one row when k is long.
//!
//! References: [`reference_attn_in`], [`reference_ffn_in`], [`reference_gemv_residual`]; the
//! attention and top-2 references are [`crate::attention::reference`] and
//! [`crate::select::top_k_reference`].

use anyhow::{ensure, Result};
use cubecl::ir::{BarrierLevel, OpaqueType};
use cubecl::prelude::barrier::{copy_async, Barrier, BarrierToken};
use cubecl::prelude::*;

use crate::attention::{part_weight, parts_max, KvCache};
use crate::elementwise::silu_mul;
use crate::launch::launch;
pub use crate::launch::{GraphRecorder, Rec};
use crate::matmul::{vector_size, RowChunked};
use crate::reduce::{reduce_max, reduce_sum, Reduction};
use crate::rope::RopeTables;
use crate::DeviceTensor;

/// Units that share one dot product (one plane on GPUs).
pub const LANES: usize = 32;
/// Planes per cube of the decode attention (one per 32 keys of its chunk).
const ATT_PLANES: usize = 4;
/// Key positions per cube of the decode attention: a context of up to 128 tokens needs no merge
/// kernel, and 4096 keys still spread over 32 chunks × 14 heads = 448 cubes (0.5B).
pub const ATT_CHUNK: usize = LANES * ATT_PLANES;
/// Units of the decode attention's merge kernel (a multiple of the head dimension).
const MERGE_UNITS: usize = 256;
/// Units per cube of the decode attention.
const ATT_THREADS: usize = ATT_CHUNK;
/// Planes per cube of the fused GEMVs; `split` of them share a row (a row pair for
/// `attn_in`/`ffn_in`), so a cube computes `PLANES / split` rows.
const PLANES: usize = 8;
/// Rows of the lm_head each plane computes (all their loads in flight); even.
const HEAD_ROWS_PER_PLANE: usize = 4;
/// Rows of the lm_head per cube.
const HEAD_ROWS: usize = PLANES * HEAD_ROWS_PER_PLANE;
/// Bytes of a weight vector when the decode GEMVs prefetch their rows with asynchronous
/// copies (`cp.async` moves 4, 8 or 16 bytes; 16 bypasses L1).
const ASYNC_COPY_BYTES: usize = 16;
/// Units of the top-2 reduction.
const FINISH_THREADS: usize = 1024;

/// Sum of the two accumulators of a row pair.
#[derive(CubeType, Clone, Copy)]
struct Pair {
    a: f32,
    b: f32,
}

/// Where a kernel of the decode step starts to read what the kernels before it wrote. In a
/// CUDA graph on Hopper (sm_90+) the graph recorder turns this marker into
/// `griddepcontrol.wait` + `griddepcontrol.launch_dependents` and launches the kernel with
/// programmatic stream serialization: the kernel is scheduled while the one before it still
/// runs and waits here. Elsewhere it is a comment. Before it a kernel may read only weights,
/// and write nothing (but its own shared memory).
#[cube]
pub(crate) fn grid_dependency() {
    comment!("cubeqwen:grid-dependency");
}

/// RMSNorm of `x[0..d]` (f32) with weight `nw`, rounded to `F`, into `h` (every unit of the
/// cube helps; `cube` is the whole cube as one reduction group).
#[cube]
fn norm_to_shared<F: Float>(
    x: &Array<f32>,
    nw: &Array<f32>,
    h: &mut SharedMemory<f32>,
    eps: f32,
    #[comptime] d: usize,
    #[comptime] cube: Reduction,
) {
    let tid = UNIT_POS as usize;
    let mut ss = 0.0f32;
    let mut i = tid;
    while i < d {
        let v = x[i];
        ss += v * v;
        i += cube.units;
    }
    let scale = f32::inverse_sqrt(reduce_sum::<f32>(ss, cube) / f32::cast_from(d) + eps);
    let mut j = tid;
    while j < d {
        h[j] = f32::cast_from(F::cast_from(x[j] * scale * nw[j]));
        j += cube.units;
    }
    sync_cube();
}

/// Partial dot products of rows `r0` and `r1` of `w0`/`w1` ([rows, k_vec] vectors) with `h`
/// (shared, scalar), over the vectors `first, first + stride, ...` below `k_vec`: `iters`
/// steps, unrolled so that every load of a unit is in flight at once (a loop bounded at run
/// time waits one memory latency per step).
#[cube]
fn dot2_rows<F: Float, V: Size>(
    w0: &Slice<Vector<F, V>>,
    w1: &Slice<Vector<F, V>>,
    h: &SharedMemory<f32>,
    first: usize,
    #[comptime] k_vec: usize,
    #[comptime] stride: usize,
    #[comptime] iters: usize,
) -> Pair {
    let mut a = 0.0f32;
    let mut b = 0.0f32;
    #[unroll]
    for j in 0..iters {
        let i = first + j * stride;
        if i < k_vec {
            let va = Vector::<f32, V>::cast_from(w0[i]);
            let vb = Vector::<f32, V>::cast_from(w1[i]);
            let base = i * V::value();
            #[unroll]
            for l in 0..V::value() {
                let hv = h[base + l];
                a += va[l] * hv;
                b += vb[l] * hv;
            }
        }
    }
    Pair { a, b }
}

/// Partial dot product of the row `w` (a slice of `k_vec` vectors, in global or shared memory)
/// with the vector `a` (global), as [`dot2_rows`].
#[cube]
fn dot_row<F: Float, V: Size>(
    w: &Slice<Vector<F, V>>,
    a: &Array<Vector<F, V>>,
    first: usize,
    #[comptime] k_vec: usize,
    #[comptime] stride: usize,
    #[comptime] iters: usize,
) -> f32 {
    let mut acc = 0.0f32;
    #[unroll]
    for j in 0..iters {
        let i = first + j * stride;
        if i < k_vec {
            let p = Vector::<f32, V>::cast_from(w[i]) * Vector::<f32, V>::cast_from(a[i]);
            #[unroll]
            for l in 0..V::value() {
                acc += p[l];
            }
        }
    }
    acc
}

/// This unit's vectors of `a` (`first, first + stride, ...` below `k_vec`; zero past it), held
/// in registers for [`dot_held`]: a streamed GEMV reads them for every row it computes.
#[cube]
fn load_vectors<F: Float, V: Size>(
    a: &Array<Vector<F, V>>,
    first: usize,
    #[comptime] k_vec: usize,
    #[comptime] stride: usize,
    #[comptime] iters: usize,
) -> Sequence<Vector<F, V>> {
    let mut out = Sequence::new();
    #[unroll]
    for j in 0..iters {
        let i = first + j * stride;
        let mut v = Vector::<F, V>::new(F::new(0.0));
        if i < k_vec {
            v = a[i];
        }
        out.push(v);
    }
    out
}

/// [`dot_row`] with this unit's vectors of `a` held in registers ([`load_vectors`]): the same
/// products summed in the same order.
#[cube]
fn dot_held<F: Float, V: Size>(
    w: &Slice<Vector<F, V>>,
    a: &Sequence<Vector<F, V>>,
    first: usize,
    #[comptime] k_vec: usize,
    #[comptime] stride: usize,
    #[comptime] iters: usize,
) -> f32 {
    let mut acc = 0.0f32;
    #[unroll]
    for j in 0..iters {
        let i = first + j * stride;
        if i < k_vec {
            let p = Vector::<f32, V>::cast_from(w[i]) * Vector::<f32, V>::cast_from(*a.index(j));
            #[unroll]
            for l in 0..V::value() {
                acc += p[l];
            }
        }
    }
    acc
}

/// The cube's barrier for asynchronous weight-row copies into shared memory, with `prefetch`
/// (none without). A fused GEMV starts its copies before [`grid_dependency`], so that its
/// weights stream while the kernel before finishes: [`copy_row_async`] for each row, then
/// [`arrive_copies`]; after the wait and its own pre-work, [`wait_copies`]; its dot products
/// read [`weight_row`] (the staged copy, or the row in global memory without a barrier).
#[cube]
pub(crate) fn copy_barrier(#[comptime] prefetch: bool) -> ComptimeOption<Shared<Barrier>> {
    if comptime!(prefetch) {
        ComptimeOption::new_Some(Barrier::shared(CUBE_DIM, UNIT_POS == 0))
    } else {
        ComptimeOption::new_None()
    }
}

/// This unit's vectors of row `row` of `w` (`first, first + stride, ...` below `k_vec`, as the
/// dot products read them) copied into row `local` of `dst` with asynchronous 16-byte copies
/// (`cp.async`: no registers held while they fly), where there is a barrier and `valid`.
#[cube]
#[allow(clippy::too_many_arguments)]
fn copy_row_async<F: Float, V: Size>(
    bar: &ComptimeOption<Shared<Barrier>>,
    w: &Array<Vector<F, V>>,
    row: usize,
    valid: bool,
    dst: &mut SharedMemory<Vector<F, V>>,
    local: usize,
    first: usize,
    #[comptime] k_vec: usize,
    #[comptime] stride: usize,
    #[comptime] iters: usize,
) {
    if comptime!(bar.is_some()) {
        let vec = V::value().comptime() as u32;
        if valid {
            #[unroll]
            for j in 0..iters {
                let i = first + j * stride;
                if i < k_vec {
                    let (src, at) = (row * k_vec + i, local * k_vec + i);
                    copy_async(&w.slice(src, src + 1), &mut dst.slice_mut(at, at + 1), vec);
                }
            }
        }
    }
}

/// Commits this unit's row copies to the barrier and arrives on it (nothing without one).
#[cube]
fn arrive_copies(bar: &ComptimeOption<Shared<Barrier>>) -> ComptimeOption<BarrierToken> {
    #[comptime]
    match bar {
        ComptimeOption::Some(b) => {
            b.commit_copy_async();
            ComptimeOption::new_Some(b.arrive())
        }
        ComptimeOption::None => ComptimeOption::new_None(),
    }
}

/// Waits until every unit's row copies have landed (nothing without a barrier).
#[cube]
fn wait_copies(bar: &ComptimeOption<Shared<Barrier>>, token: ComptimeOption<BarrierToken>) {
    #[comptime]
    match bar {
        ComptimeOption::Some(b) =>
        {
            #[comptime]
            match token {
                ComptimeOption::Some(t) => b.wait(t),
                ComptimeOption::None => {}
            }
        }
        ComptimeOption::None => {}
    }
}

/// Row `row` of `w` ([rows, `k_vec`] vectors) as the dot products read it: with a barrier, its
/// staged copy (row `local` of `staged`, after [`wait_copies`]), else the row in global memory.
#[cube]
fn weight_row<F: Float, V: Size>(
    bar: &ComptimeOption<Shared<Barrier>>,
    w: &Array<Vector<F, V>>,
    staged: &SharedMemory<Vector<F, V>>,
    row: usize,
    local: usize,
    #[comptime] k_vec: usize,
) -> Slice<Vector<F, V>> {
    if comptime!(bar.is_some()) {
        staged.slice(local * k_vec, local * k_vec + k_vec)
    } else {
        w.slice(row * k_vec, row * k_vec + k_vec)
    }
}

/// The vectors of row `r` of the q (`sec` 0), k (1) or v (2) projection that a unit reads for
/// its part of a dot product (`first, first + stride, ...` below `k_vec`, `iters` of them; zero
/// past `k_vec` or where `valid` is false), held in registers (a [`Sequence`] is one variable per
/// element, unlike a local array). [`attn_in_kernel`] loads its weights so before
/// [`grid_dependency`]: under programmatic dependent launch they stream while the kernel before
/// it finishes. (The same in `ffn_in` and the GEMVs measured slower on the H100, 2026-11-27:
/// `ffn_in` took 60 registers a unit, so its 608 cubes no longer fitted the GPU at once; they
/// prefetch into shared memory with [`copy_row_async`] instead.)
#[cube]
#[allow(clippy::too_many_arguments)]
fn load_qkv_row<F: Float, V: Size>(
    wq: &Array<Vector<F, V>>,
    wk: &Array<Vector<F, V>>,
    wv: &Array<Vector<F, V>>,
    sec: u32,
    r: usize,
    valid: bool,
    first: usize,
    #[comptime] k_vec: usize,
    #[comptime] stride: usize,
    #[comptime] iters: usize,
) -> Sequence<Vector<F, V>> {
    let mut out = Sequence::new();
    #[unroll]
    for j in 0..iters {
        let i = first + j * stride;
        let mut v = Vector::<F, V>::new(F::new(0.0));
        if valid && i < k_vec {
            if sec == 0u32 {
                v = wq[r * k_vec + i];
            } else if sec == 1u32 {
                v = wk[r * k_vec + i];
            } else {
                v = wv[r * k_vec + i];
            }
        }
        out.push(v);
    }
    out
}

/// Partial dot products of the rows `wa` and `wb` (as [`load_qkv_row`] loaded them) with `h`
/// (shared, scalar): [`dot2_shared`]'s arithmetic on rows already in registers. The two stay
/// apart on purpose: loading whole rows first costs registers, which only `attn_in` can spare.
#[cube]
fn dot2_loaded<F: Float, V: Size>(
    wa: &Sequence<Vector<F, V>>,
    wb: &Sequence<Vector<F, V>>,
    h: &SharedMemory<f32>,
    first: usize,
    #[comptime] k_vec: usize,
    #[comptime] stride: usize,
    #[comptime] iters: usize,
) -> Pair {
    let mut a = 0.0f32;
    let mut b = 0.0f32;
    #[unroll]
    for j in 0..iters {
        let i = first + j * stride;
        if i < k_vec {
            let va = Vector::<f32, V>::cast_from(*wa.index(j));
            let vb = Vector::<f32, V>::cast_from(*wb.index(j));
            let base = i * V::value();
            #[unroll]
            for l in 0..V::value() {
                let hv = h[base + l];
                a += va[l] * hv;
                b += vb[l] * hv;
            }
        }
    }
    Pair { a, b }
}

/// `x = f32(table[token[0]])`, one row of the embedding table (a chunk of it: rows
/// `row0..row0 + rows`; units of other chunks write nothing).
#[cube(launch)]
fn embed_token_kernel<F: Float>(
    token: &Array<u32>,
    table: &Array<F>,
    x: &mut Array<f32>,
    row0: usize,
    rows: usize,
    #[comptime] d: usize,
) {
    grid_dependency();
    let i = ABSOLUTE_POS;
    let id = token[0] as usize;
    if i < d && id >= row0 && id < row0 + rows {
        x[i] = f32::cast_from(table[(id - row0) * d + i]);
    }
}

/// One pair-row of [`attn_in_kernel`]: rows `r0` and `r1 = r0 + hd/2` of the q (`sec` 0), k (1)
/// or v (2) projection, pair index `i` of head `head`; `valid` false past the last pair.
#[derive(CubeType, Clone, Copy)]
struct QkvPair {
    sec: u32,
    head: usize,
    i: usize,
    r0: usize,
    r1: usize,
    valid: bool,
}

/// The pair-row `p` of the q pairs, then the k pairs, then the v pairs.
#[cube]
#[allow(unused_assignments)]
fn qkv_pair(
    p: usize,
    #[comptime] n_heads: usize,
    #[comptime] n_kv: usize,
    #[comptime] head_dim: usize,
) -> QkvPair {
    let half = comptime!(head_dim / 2);
    let q_pairs = comptime!(n_heads * head_dim / 2);
    let kv_pairs = comptime!(n_kv * head_dim / 2);
    let mut sec: u32 = 2u32;
    let mut local: usize = 0usize;
    if p < q_pairs {
        sec = 0u32;
        local = p;
    } else if p < q_pairs + kv_pairs {
        sec = 1u32;
        local = p - q_pairs;
    } else if p < q_pairs + 2 * kv_pairs {
        local = p - q_pairs - kv_pairs;
    }
    let head = local / half;
    let i = local % half;
    let r0 = head * head_dim + i;
    QkvPair {
        sec,
        head,
        i,
        r0,
        r1: r0 + half,
        valid: p < q_pairs + 2 * kv_pairs,
    }
}

/// The biases of a pair-row (0 past the last pair).
#[cube]
#[allow(unused_assignments)]
fn qkv_bias(bq: &Array<f32>, bk: &Array<f32>, bv: &Array<f32>, pair: &QkvPair) -> Pair {
    let mut a = 0.0f32;
    let mut b = 0.0f32;
    if pair.valid {
        if pair.sec == 0u32 {
            a = bq[pair.r0];
            b = bq[pair.r1];
        } else if pair.sec == 1u32 {
            a = bk[pair.r0];
            b = bk[pair.r1];
        } else {
            a = bv[pair.r0];
            b = bv[pair.r1];
        }
    }
    Pair { a, b }
}

/// A pair-row's two sums `a`, `b` plus biases out: v into the cache at `pos`; q and k rounded to
/// `F`, rotated by (`c`, `s`), q to `q`, k into the cache.
#[cube]
#[allow(clippy::too_many_arguments)]
fn write_qkv_pair<F: Float>(
    pair: &QkvPair,
    a: f32,
    b: f32,
    bias: &Pair,
    c: f32,
    s: f32,
    pos: usize,
    max_ctx: usize,
    q: &mut Array<F>,
    k_cache: &mut Array<F>,
    v_cache: &mut Array<F>,
    #[comptime] head_dim: usize,
) {
    let half = comptime!(head_dim / 2);
    let at = (pair.head * max_ctx + pos) * head_dim;
    if pair.sec == 2u32 {
        v_cache[at + pair.i] = F::cast_from(a + bias.a);
        v_cache[at + pair.i + half] = F::cast_from(b + bias.b);
    } else {
        let x0 = f32::cast_from(F::cast_from(a + bias.a));
        let x1 = f32::cast_from(F::cast_from(b + bias.b));
        let o0 = F::cast_from(x0 * c - x1 * s);
        let o1 = F::cast_from(x1 * c + x0 * s);
        if pair.sec == 0u32 {
            q[pair.r0] = o0;
            q[pair.r1] = o1;
        } else {
            k_cache[at + pair.i] = o0;
            k_cache[at + pair.i + half] = o1;
        }
    }
}

/// Attention input of one token: `h = F(RMSNorm(x))`; q, k, v = `F(h·Wᵀ + b)`; q and k rotated
/// (NEOX pairs i, i + hd/2) at position `state[0]`; q written out, k and v written into the
/// cache at that position. One plane pair-row per (head, i < hd/2): the pair (i, i + hd/2).
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
fn attn_in_kernel<F: Float, V: Size>(
    x: &Array<f32>,
    norm_w: &Array<f32>,
    wq: &Array<Vector<F, V>>,
    wk: &Array<Vector<F, V>>,
    wv: &Array<Vector<F, V>>,
    bq: &Array<f32>,
    bk: &Array<f32>,
    bv: &Array<f32>,
    cos: &Array<f32>,
    sin: &Array<f32>,
    state: &Array<u32>,
    q: &mut Array<F>,
    k_cache: &mut Array<F>,
    v_cache: &mut Array<F>,
    max_ctx: usize,
    eps: f32,
    #[comptime] d: usize,
    #[comptime] n_heads: usize,
    #[comptime] n_kv: usize,
    #[comptime] head_dim: usize,
    #[comptime] k_vec: usize,
    #[comptime] split: usize,
    #[comptime] row_sum: Reduction,
    #[comptime] cube: Reduction,
) {
    let stride = comptime!(LANES * split);
    let iters = comptime!(k_vec.div_ceil(LANES * split));
    let lane = UNIT_POS_X as usize;
    let y = UNIT_POS_Y as usize;
    let p = CUBE_POS * (PLANES / split) + y / split;
    let first = (y % split) * LANES + lane;
    let pair = qkv_pair(p, n_heads, n_kv, head_dim);
    let (sec, r0, r1, valid) = (pair.sec, pair.r0, pair.r1, pair.valid);
    let wa = load_qkv_row::<F, V>(wq, wk, wv, sec, r0, valid, first, k_vec, stride, iters);
    let wb = load_qkv_row::<F, V>(wq, wk, wv, sec, r1, valid, first, k_vec, stride, iters);
    // The pair's biases are weights too.
    let bias = qkv_bias(bq, bk, bv, &pair);
    grid_dependency();
    // The position and its rotation, loaded while the norm and the dot product run.
    let pos = state[0] as usize;
    let half = comptime!(head_dim / 2);
    let c = cos[pos * half + pair.i];
    let s = sin[pos * half + pair.i];
    let mut h = SharedMemory::<f32>::new(d);
    norm_to_shared::<F>(x, norm_w, &mut h, eps, d, cube);
    let acc = dot2_loaded::<F, V>(&wa, &wb, &h, first, k_vec, stride, iters);
    let a = reduce_sum::<f32>(acc.a, row_sum);
    let b = reduce_sum::<f32>(acc.b, row_sum);
    if valid && lane == 0 && y.is_multiple_of(split) {
        write_qkv_pair::<F>(
            &pair, a, b, &bias, c, s, pos, max_ctx, q, k_cache, v_cache, head_dim,
        );
    }
}

/// Rows `r0` and `r1` of the pair-row's projection into one ring slot (`dst[at..at + 2·k_vec]`)
/// as [`stage_row`] stages them, committed as one copy group.
#[cube]
#[allow(clippy::too_many_arguments)]
fn stage_qkv_pair<F: Float, V: Size>(
    wq: &Array<Vector<F, V>>,
    wk: &Array<Vector<F, V>>,
    wv: &Array<Vector<F, V>>,
    pair: &QkvPair,
    valid: bool,
    dst: &mut SharedMemory<Vector<F, V>>,
    at: usize,
    first: usize,
    #[comptime] k_vec: usize,
    #[comptime] stride: usize,
    #[comptime] async_copy: bool,
) {
    let (r0, r1, b) = (pair.r0, pair.r1, at + k_vec);
    if pair.sec == 0u32 {
        stage_row::<F, V>(wq, r0, valid, dst, at, first, k_vec, stride, async_copy);
        stage_row::<F, V>(wq, r1, valid, dst, b, first, k_vec, stride, async_copy);
    } else if pair.sec == 1u32 {
        stage_row::<F, V>(wk, r0, valid, dst, at, first, k_vec, stride, async_copy);
        stage_row::<F, V>(wk, r1, valid, dst, b, first, k_vec, stride, async_copy);
    } else {
        stage_row::<F, V>(wv, r0, valid, dst, at, first, k_vec, stride, async_copy);
        stage_row::<F, V>(wv, r1, valid, dst, b, first, k_vec, stride, async_copy);
    }
    commit_copy_group(async_copy);
}

/// [`attn_in_kernel`]'s function, streamed as [`gemv_residual_stream_kernel`] is (for grids the
/// one-shot kernel cannot hold at once: the 7B shape's rows, held in registers, allow 2 cubes a
/// multiprocessor, 2.2 waves): each group of `split` planes computes the pair-rows `g, g +
/// groups, ...` (`steps` of them) with `stages` of them in flight in its shared-memory ring; the
/// norm is computed once a cube.
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
fn attn_in_stream_kernel<F: Float, V: Size>(
    x: &Array<f32>,
    norm_w: &Array<f32>,
    wq: &Array<Vector<F, V>>,
    wk: &Array<Vector<F, V>>,
    wv: &Array<Vector<F, V>>,
    bq: &Array<f32>,
    bk: &Array<f32>,
    bv: &Array<f32>,
    cos: &Array<f32>,
    sin: &Array<f32>,
    state: &Array<u32>,
    q: &mut Array<F>,
    k_cache: &mut Array<F>,
    v_cache: &mut Array<F>,
    max_ctx: usize,
    eps: f32,
    #[comptime] d: usize,
    #[comptime] n_heads: usize,
    #[comptime] n_kv: usize,
    #[comptime] head_dim: usize,
    #[comptime] k_vec: usize,
    #[comptime] split: usize,
    #[comptime] stages: usize,
    #[comptime] steps: usize,
    #[comptime] groups: usize,
    #[comptime] row_sum: Reduction,
    #[comptime] cube: Reduction,
    #[comptime] async_copy: bool,
) {
    let lane = UNIT_POS_X as usize;
    let y = UNIT_POS_Y as usize;
    let rows = comptime!(PLANES / split);
    let group = CUBE_POS * rows + y / split;
    let (stride, iters) = comptime!((LANES * split, k_vec.div_ceil(LANES * split)));
    let first = (y % split) * LANES + lane;
    let slot = comptime!(2 * k_vec);
    let mut ring = SharedMemory::<Vector<F, V>>::new(comptime!(rows * stages * 2 * k_vec));
    let mine = (y / split) * comptime!(stages * 2 * k_vec);
    #[unroll]
    for t in 0..stages {
        let pair = qkv_pair(group + t * groups, n_heads, n_kv, head_dim);
        stage_qkv_pair::<F, V>(
            wq,
            wk,
            wv,
            &pair,
            pair.valid,
            &mut ring,
            mine + t * slot,
            first,
            k_vec,
            stride,
            async_copy,
        );
    }
    grid_dependency();
    let pos = state[0] as usize;
    let half = comptime!(head_dim / 2);
    let mut h = SharedMemory::<f32>::new(d);
    norm_to_shared::<F>(x, norm_w, &mut h, eps, d, cube);
    // Not unrolled: without plane operations (wgpu) each reduction is a shared array of its own.
    for t in 0..steps {
        let pair = qkv_pair(group + t * groups, n_heads, n_kv, head_dim);
        // Biases and rotation, loaded while the pair's copies land.
        let bias = qkv_bias(bq, bk, bv, &pair);
        let c = cos[pos * half + pair.i];
        let s = sin[pos * half + pair.i];
        wait_copy_groups(async_copy, comptime!(stages - 1));
        let at = mine + (t % stages) * slot;
        let r = dot2_rows::<F, V>(
            &ring.slice(at, at + k_vec),
            &ring.slice(at + k_vec, at + slot),
            &h,
            first,
            k_vec,
            stride,
            iters,
        );
        let a = reduce_sum::<f32>(r.a, row_sum);
        let b = reduce_sum::<f32>(r.b, row_sum);
        if pair.valid && lane == 0 && y.is_multiple_of(split) {
            write_qkv_pair::<F>(
                &pair, a, b, &bias, c, s, pos, max_ctx, q, k_cache, v_cache, head_dim,
            );
        }
        let next = qkv_pair(group + (t + stages) * groups, n_heads, n_kv, head_dim);
        stage_qkv_pair::<F, V>(
            wq,
            wk,
            wv,
            &next,
            t + stages < steps && next.valid,
            &mut ring,
            at,
            first,
            k_vec,
            stride,
            async_copy,
        );
    }
}

/// Attention of one query token at position `state[0]` over a chunk of [`ATT_CHUNK`] cache
/// positions, one cube per (chunk, query head). Plane `y` of the cube takes the chunk's keys
/// `32y..32y + 32`: for the scores each unit takes one key (its row in `k_vecs = head_dim / KV`
/// vector loads); for the values each of the first `v_lanes = head_dim / VV` units takes `VV`
/// dimensions of all 32 keys (coalesced along the row); both loops are unrolled, so a unit's
/// loads are in flight together. Each plane's softmax is combined across the cube's planes with
/// the online-softmax rule ([`crate::attention::part_weight`]). With `single`
/// (one chunk covers every position) the cube writes the normalised output; otherwise its
/// unnormalised output and (max, sum) for [`attention_merge_kernel`]. Positions past `pos`
/// (inside the cache) are loaded with the rest but never used: the cache there may hold anything.
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
fn attention_kernel<F: Float, KV: Size, VV: Size>(
    q: &Array<F>,
    k_cache: &Array<Vector<F, KV>>,
    v_cache: &Array<Vector<F, VV>>,
    state: &Array<u32>,
    out: &mut Array<F>,
    part_out: &mut Array<f32>,
    part_max_sum: &mut Array<f32>,
    max_ctx: usize,
    scale: f32,
    #[comptime] group: usize,
    #[comptime] head_dim: usize,
    #[comptime] single: bool,
    #[comptime] k_vecs: usize,
    #[comptime] v_lanes: usize,
    #[comptime] keys: Reduction,
) {
    grid_dependency();
    let chunk = CUBE_POS_X as usize;
    let head = CUBE_POS_Y as usize;
    let chunks = CUBE_COUNT_X as usize;
    let lane = UNIT_POS_X as usize;
    let plane = UNIT_POS_Y as usize;
    let tid = UNIT_POS as usize;
    let pos = state[0] as usize;
    let base = (head / group) * max_ctx;
    let first = chunk * ATT_CHUNK + plane * LANES;
    let key = first + lane;

    // Every global load at once, right after the wait: q, the position, this unit's key row and
    // its value slices of the plane's 32 keys. Rows inside the cache but past `pos` are loaded
    // and never used (masked below: they may hold anything, even NaN).
    let mut k_row = Sequence::<Vector<F, KV>>::new();
    #[unroll]
    for e in 0..k_vecs {
        let mut kv = Vector::<F, KV>::new(F::new(0.0));
        if key < max_ctx {
            kv = k_cache[(base + key) * k_vecs + e];
        }
        k_row.push(kv);
    }
    let mut v_rows = Sequence::<Vector<F, VV>>::new();
    #[unroll]
    for j in 0..LANES {
        let mut vv = Vector::<F, VV>::new(F::new(0.0));
        if lane < v_lanes && first + j < max_ctx {
            vv = v_cache[(base + first + j) * v_lanes + lane];
        }
        v_rows.push(vv);
    }
    let mut q_s = SharedMemory::<f32>::new(head_dim);
    if tid < head_dim {
        q_s[tid] = f32::cast_from(q[head * head_dim + tid]) * scale;
    }
    sync_cube();

    // This unit's key: its score, then the plane's softmax.
    let mut score = f32::new(-1.0e30);
    if key <= pos {
        let mut acc = 0.0f32;
        #[unroll]
        for e in 0..k_vecs {
            let kv = Vector::<f32, KV>::cast_from(*k_row.index(e));
            #[unroll]
            for l in 0..KV::value() {
                acc += q_s[e * KV::value() + l] * kv[l];
            }
        }
        score = acc;
    }
    let m = reduce_max::<f32>(score, keys);
    let mut p = 0.0f32;
    if key <= pos {
        p = f32::exp(score - m);
    }
    let mut probs = SharedMemory::<f32>::new(ATT_CHUNK);
    probs[plane * LANES + lane] = p;
    // reduce_sum ends on a cube barrier: the probabilities are visible after it.
    let l = reduce_sum::<f32>(p, keys);

    // This unit's dimensions of the weighted sum over the plane's keys (a head dimension
    // below 32 leaves the lanes past `v_lanes` idle).
    let mut acc = Vector::<f32, VV>::new(0.0f32);
    if lane < v_lanes {
        #[unroll]
        for j in 0..LANES {
            if first + j <= pos {
                let v = Vector::<f32, VV>::cast_from(*v_rows.index(j));
                acc += Vector::<f32, VV>::new(probs[plane * LANES + j]) * v;
            }
        }
    }
    let mut sums = SharedMemory::<f32>::new(comptime!(ATT_PLANES * head_dim));
    let mut stats = SharedMemory::<f32>::new(comptime!(ATT_PLANES * 2));
    if lane < v_lanes {
        #[unroll]
        for d in 0..VV::value() {
            sums[plane * head_dim + lane * VV::value() + d] = acc[d];
        }
    }
    if lane == 0 {
        stats[plane * 2] = m;
        stats[plane * 2 + 1] = l;
    }
    sync_cube();

    // The planes combined: one unit per dimension.
    if tid < head_dim {
        let mut mx = f32::new(-1.0e30);
        #[unroll]
        for pl in 0..ATT_PLANES {
            mx = parts_max(mx, stats[pl * 2], stats[pl * 2 + 1]);
        }
        let mut total = 0.0f32;
        let mut a = 0.0f32;
        #[unroll]
        for pl in 0..ATT_PLANES {
            let lp = stats[pl * 2 + 1];
            let f = part_weight(stats[pl * 2], lp, mx);
            total += f * lp;
            a += f * sums[pl * head_dim + tid];
        }
        if comptime!(single) {
            out[head * head_dim + tid] = F::cast_from(a / total);
        } else {
            let part = head * chunks + chunk;
            part_out[part * head_dim + tid] = a;
            if tid == 0 {
                part_max_sum[part * 2] = mx;
                part_max_sum[part * 2 + 1] = total;
            }
        }
    }
}

/// Merges the chunk parts of [`attention_kernel`] with the online-softmax rule
/// ([`crate::attention::part_weight`]); one cube per
/// query head. The cube's [`MERGE_UNITS`] units take the chunks in turn for the maximum and the
/// denominator; then each of its `MERGE_UNITS / head_dim` groups sums every so-many chunk's
/// output for its dimension, and the groups' sums are added.
#[cube(launch)]
fn attention_merge_kernel<F: Float>(
    part_out: &Array<f32>,
    part_max_sum: &Array<f32>,
    out: &mut Array<F>,
    chunks: usize,
    #[comptime] head_dim: usize,
    #[comptime] all: Reduction,
) {
    grid_dependency();
    let head = CUBE_POS;
    let base = head * chunks;
    let tid = UNIT_POS as usize;
    let mut mx = f32::new(-1.0e30);
    let mut c = tid;
    while c < chunks {
        mx = parts_max(
            mx,
            part_max_sum[(base + c) * 2],
            part_max_sum[(base + c) * 2 + 1],
        );
        c += MERGE_UNITS;
    }
    let mx = reduce_max::<f32>(mx, all);
    let mut denom = 0.0f32;
    let mut c = tid;
    while c < chunks {
        let l = part_max_sum[(base + c) * 2 + 1];
        denom += part_weight(part_max_sum[(base + c) * 2], l, mx) * l;
        c += MERGE_UNITS;
    }
    let denom = reduce_sum::<f32>(denom, all);

    let groups = comptime!(MERGE_UNITS / head_dim);
    let dim = tid % head_dim;
    let g = tid / head_dim;
    let mut acc = 0.0f32;
    let mut c = g;
    while c < chunks {
        let w = part_weight(
            part_max_sum[(base + c) * 2],
            part_max_sum[(base + c) * 2 + 1],
            mx,
        );
        acc += w * part_out[(base + c) * head_dim + dim];
        c += groups;
    }
    let mut sums = SharedMemory::<f32>::new(MERGE_UNITS);
    sums[tid] = acc;
    sync_cube();
    if g == 0 {
        let mut total = 0.0f32;
        #[unroll]
        for i in 0..groups {
            total += sums[i * head_dim + dim];
        }
        out[head * head_dim + dim] = F::cast_from(total / denom);
    }
}

/// `x[r] += Σ_k W[r][k]·a[k]` for every row r of W ([n, k]): the o-projection and the down
/// projection with their residual add. With `prefetch` each unit copies its vectors of the row
/// into shared memory asynchronously before [`grid_dependency`] (they stream while the kernel
/// before finishes); otherwise it reads them from global memory after it.
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
fn gemv_residual_kernel<F: Float, V: Size>(
    w: &Array<Vector<F, V>>,
    a: &Array<Vector<F, V>>,
    x: &mut Array<f32>,
    n: usize,
    #[comptime] k_vec: usize,
    #[comptime] split: usize,
    #[comptime] row_sum: Reduction,
    #[comptime] prefetch: bool,
) {
    let lane = UNIT_POS_X as usize;
    let y = UNIT_POS_Y as usize;
    let rows = comptime!(PLANES / split);
    let (row, local) = (CUBE_POS * rows + y / split, y / split);
    let (stride, iters) = comptime!((LANES * split, k_vec.div_ceil(LANES * split)));
    let first = (y % split) * LANES + lane;
    let writer = row < n && lane == 0 && y.is_multiple_of(split);
    let mut ws = SharedMemory::<Vector<F, V>>::new(comptime!(staged_len(prefetch, rows, k_vec)));
    let bar = copy_barrier(prefetch);
    copy_row_async::<F, V>(
        &bar,
        w,
        row,
        row < n,
        &mut ws,
        local,
        first,
        k_vec,
        stride,
        iters,
    );
    let token = arrive_copies(&bar);
    grid_dependency();
    // The residual, loaded while the weights arrive.
    let mut xr = 0.0f32;
    if writer {
        xr = x[row];
    }
    wait_copies(&bar, token);
    let mut acc = 0.0f32;
    if row < n {
        let w_row = weight_row::<F, V>(&bar, w, &ws, row, local, k_vec);
        acc = dot_row::<F, V>(&w_row, a, first, k_vec, stride, iters);
    }
    let sum = reduce_sum::<f32>(acc, row_sum);
    if writer {
        x[row] = xr + sum;
    }
}

/// Shared-memory vectors a fused GEMV's cube stages: `rows` rows of `k_vec` with `prefetch`,
/// else one (unused).
fn staged_len(prefetch: bool, rows: usize, k_vec: usize) -> usize {
    if prefetch {
        rows * k_vec
    } else {
        1
    }
}

/// FFN input of one token: `h = F(RMSNorm(x))`, gate and up = `F(h·Wᵀ)`,
/// `s = F(silu(gate)·up)`; one plane row per output i (rows i of W_gate and W_up). With
/// `prefetch` the gate and up rows are copied into shared memory asynchronously before
/// [`grid_dependency`], as in [`gemv_residual_kernel`].
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
fn ffn_in_kernel<F: Float, V: Size>(
    x: &Array<f32>,
    norm_w: &Array<f32>,
    w_gate: &Array<Vector<F, V>>,
    w_up: &Array<Vector<F, V>>,
    s: &mut Array<F>,
    ffn: usize,
    eps: f32,
    #[comptime] d: usize,
    #[comptime] k_vec: usize,
    #[comptime] split: usize,
    #[comptime] row_sum: Reduction,
    #[comptime] cube: Reduction,
    #[comptime] prefetch: bool,
) {
    let lane = UNIT_POS_X as usize;
    let y = UNIT_POS_Y as usize;
    let rows = comptime!(PLANES / split);
    let (row, local) = (CUBE_POS * rows + y / split, y / split);
    let (stride, iters) = comptime!((LANES * split, k_vec.div_ceil(LANES * split)));
    let first = (y % split) * LANES + lane;
    let mut h = SharedMemory::<f32>::new(d);
    let staged = comptime!(staged_len(prefetch, rows, k_vec));
    let mut gs = SharedMemory::<Vector<F, V>>::new(staged);
    let mut us = SharedMemory::<Vector<F, V>>::new(staged);
    let bar = copy_barrier(prefetch);
    let valid = row < ffn;
    copy_row_async::<F, V>(
        &bar, w_gate, row, valid, &mut gs, local, first, k_vec, stride, iters,
    );
    copy_row_async::<F, V>(
        &bar, w_up, row, valid, &mut us, local, first, k_vec, stride, iters,
    );
    let token = arrive_copies(&bar);
    grid_dependency();
    norm_to_shared::<F>(x, norm_w, &mut h, eps, d, cube);
    wait_copies(&bar, token);
    let mut acc_g = 0.0f32;
    let mut acc_u = 0.0f32;
    if valid {
        let g = weight_row::<F, V>(&bar, w_gate, &gs, row, local, k_vec);
        let u = weight_row::<F, V>(&bar, w_up, &us, row, local, k_vec);
        let r = dot2_rows::<F, V>(&g, &u, &h, first, k_vec, stride, iters);
        acc_g = r.a;
        acc_u = r.b;
    }
    let g = reduce_sum::<f32>(acc_g, row_sum);
    let u = reduce_sum::<f32>(acc_u, row_sum);
    if valid && lane == 0 && y.is_multiple_of(split) {
        s[row] = swiglu_value::<F>(g, u);
    }
}

/// Commits this unit's `cp.async` copies since the last commit as one group (`async_copy`: a
/// graph launch, where the recorder compiles the marker to `cp.async.commit_group`; nothing
/// else, where the copies were plain stores).
#[cube]
fn commit_copy_group(#[comptime] async_copy: bool) {
    if comptime!(async_copy) {
        comment!("cubeqwen:cp-async-commit");
    }
}

/// Waits until at most `pending` (≤ 3) of this unit's committed copy groups are still in
/// flight (`cp.async.wait_group`; nothing without `async_copy`). A unit waits for its own
/// copies only: the kernels that use it read back just the vectors each unit copied itself.
#[cube]
fn wait_copy_groups(#[comptime] async_copy: bool, #[comptime] pending: usize) {
    if comptime!(async_copy) {
        if comptime!(pending == 0) {
            comment!("cubeqwen:cp-async-wait-0");
        } else if comptime!(pending == 1) {
            comment!("cubeqwen:cp-async-wait-1");
        } else if comptime!(pending == 2) {
            comment!("cubeqwen:cp-async-wait-2");
        } else {
            comment!("cubeqwen:cp-async-wait-3");
        }
    }
}

/// This unit's vectors (`first, first + stride, ...` below `k_vec`) of row `row` of `w` into
/// the same places of `dst[at..at + k_vec]`, where `valid`: `cp.async` 16-byte copies with
/// `async_copy`, else plain loads and stores.
#[cube]
#[allow(clippy::too_many_arguments)]
fn stage_row<F: Float, V: Size>(
    w: &Array<Vector<F, V>>,
    row: usize,
    valid: bool,
    dst: &mut SharedMemory<Vector<F, V>>,
    at: usize,
    first: usize,
    #[comptime] k_vec: usize,
    #[comptime] stride: usize,
    #[comptime] async_copy: bool,
) {
    if valid {
        #[unroll]
        for j in 0..comptime!(k_vec.div_ceil(stride)) {
            let i = first + j * stride;
            if i < k_vec {
                let src = row * k_vec + i;
                if comptime!(async_copy) {
                    let vec = V::value().comptime() as u32;
                    copy_async(
                        &w.slice(src, src + 1),
                        &mut dst.slice_mut(at + i, at + i + 1),
                        vec,
                    );
                } else {
                    dst[at + i] = w[src];
                }
            }
        }
    }
}

/// Row `row` of the gate and of the up projection into one ring slot (`dst[at..at + 2·k_vec]`,
/// gate first) as [`stage_row`] stages them, committed as one copy group.
#[cube]
#[allow(clippy::too_many_arguments)]
fn stage_pair<F: Float, V: Size>(
    w_gate: &Array<Vector<F, V>>,
    w_up: &Array<Vector<F, V>>,
    row: usize,
    valid: bool,
    dst: &mut SharedMemory<Vector<F, V>>,
    at: usize,
    lane: usize,
    #[comptime] k_vec: usize,
    #[comptime] async_copy: bool,
) {
    stage_row::<F, V>(w_gate, row, valid, dst, at, lane, k_vec, LANES, async_copy);
    stage_row::<F, V>(
        w_up,
        row,
        valid,
        dst,
        at + k_vec,
        lane,
        k_vec,
        LANES,
        async_copy,
    );
    commit_copy_group(async_copy);
}

/// SwiGLU of one output, as the unfused path stores it: gate and up rounded to `F`, then
/// `F(silu(gate)·up)`.
#[cube]
fn swiglu_value<F: Float>(g: f32, u: f32) -> F {
    let g = f32::cast_from(F::cast_from(g));
    let u = f32::cast_from(F::cast_from(u));
    F::cast_from(silu_mul(g, u))
}

/// [`ffn_in_kernel`]'s function, streamed: each plane computes the row pairs `p, p + planes,
/// p + 2·planes, ...` (`steps` of them; `planes` = every plane of the grid, which is sized to be
/// resident at once) and keeps `stages` of them in flight in its own shared-memory ring. The
/// first `stages` are issued before [`grid_dependency`]; after the RMSNorm each step waits for
/// its oldest pair only (each lane its own copies: a lane reads back just the vectors it
/// copied), computes it, and refills the slot with the pair `stages` steps ahead. So the dot
/// products start when the first rows land instead of when a cube's last row does, and the
/// rows of a grid larger than the GPU stream through instead of coming in waves.
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
fn ffn_in_stream_kernel<F: Float, V: Size>(
    x: &Array<f32>,
    norm_w: &Array<f32>,
    w_gate: &Array<Vector<F, V>>,
    w_up: &Array<Vector<F, V>>,
    s: &mut Array<F>,
    ffn: usize,
    eps: f32,
    #[comptime] d: usize,
    #[comptime] k_vec: usize,
    #[comptime] stages: usize,
    #[comptime] steps: usize,
    #[comptime] planes: usize,
    #[comptime] row_sum: Reduction,
    #[comptime] cube: Reduction,
    #[comptime] async_copy: bool,
) {
    let lane = UNIT_POS_X as usize;
    let y = UNIT_POS_Y as usize;
    let plane = CUBE_POS * PLANES + y;
    let slot = comptime!(2 * k_vec);
    let mut h = SharedMemory::<f32>::new(d);
    let mut ring = SharedMemory::<Vector<F, V>>::new(comptime!(PLANES * stages * 2 * k_vec));
    let mine = y * comptime!(stages * 2 * k_vec);
    #[unroll]
    for t in 0..stages {
        let row = plane + t * planes;
        let at = mine + t * slot;
        stage_pair::<F, V>(
            w_gate,
            w_up,
            row,
            row < ffn,
            &mut ring,
            at,
            lane,
            k_vec,
            async_copy,
        );
    }
    grid_dependency();
    norm_to_shared::<F>(x, norm_w, &mut h, eps, d, cube);
    let iters = comptime!(k_vec.div_ceil(LANES));
    // Not unrolled: without plane operations (wgpu) each reduction is a shared array of its own.
    for t in 0..steps {
        wait_copy_groups(async_copy, comptime!(stages - 1));
        let row = plane + t * planes;
        let at = mine + (t % stages) * slot;
        let r = dot2_rows::<F, V>(
            &ring.slice(at, at + k_vec),
            &ring.slice(at + k_vec, at + slot),
            &h,
            lane,
            k_vec,
            LANES,
            iters,
        );
        let g = reduce_sum::<f32>(r.a, row_sum);
        let u = reduce_sum::<f32>(r.b, row_sum);
        if row < ffn && lane == 0 {
            s[row] = swiglu_value::<F>(g, u);
        }
        let next = row + stages * planes;
        let valid = t + stages < steps && next < ffn;
        stage_pair::<F, V>(
            w_gate, w_up, next, valid, &mut ring, at, lane, k_vec, async_copy,
        );
    }
}

/// [`gemv_residual_kernel`]'s function, streamed as [`ffn_in_stream_kernel`] is: the grid is
/// one wave (as many cubes as the device holds at once); each group of `split` planes computes
/// the rows `g, g + groups, g + 2·groups, ...` (`steps` of them; `groups` = every group of the
/// grid) and keeps `stages` of them in flight in its own shared-memory ring. The first `stages`
/// rows are issued before [`grid_dependency`]; then each step waits for its oldest row only (each
/// unit for its own copies), computes it, and refills the slot with the row `stages` steps
/// ahead. This unit's vectors of `a` stay in registers across the rows. For the GEMVs whose
/// one-shot grid takes several waves (the 7B down projection: 4 rows of 38 KB a cube, one cube a
/// multiprocessor, 6.8 waves on an H100 or H200).
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
fn gemv_residual_stream_kernel<F: Float, V: Size>(
    w: &Array<Vector<F, V>>,
    a: &Array<Vector<F, V>>,
    x: &mut Array<f32>,
    n: usize,
    #[comptime] k_vec: usize,
    #[comptime] split: usize,
    #[comptime] stages: usize,
    #[comptime] steps: usize,
    #[comptime] groups: usize,
    #[comptime] row_sum: Reduction,
    #[comptime] async_copy: bool,
) {
    let lane = UNIT_POS_X as usize;
    let y = UNIT_POS_Y as usize;
    let rows = comptime!(PLANES / split);
    let group = CUBE_POS * rows + y / split;
    let (stride, iters) = comptime!((LANES * split, k_vec.div_ceil(LANES * split)));
    let first = (y % split) * LANES + lane;
    let writer = lane == 0 && y.is_multiple_of(split);
    let mut ring = SharedMemory::<Vector<F, V>>::new(comptime!(rows * stages * k_vec));
    let mine = (y / split) * comptime!(stages * k_vec);
    #[unroll]
    for t in 0..stages {
        let row = group + t * groups;
        stage_row::<F, V>(
            w,
            row,
            row < n,
            &mut ring,
            mine + t * k_vec,
            first,
            k_vec,
            stride,
            async_copy,
        );
        commit_copy_group(async_copy);
    }
    grid_dependency();
    let held = load_vectors::<F, V>(a, first, k_vec, stride, iters);
    // Not unrolled: without plane operations (wgpu) each reduction is a shared array of its own.
    for t in 0..steps {
        let row = group + t * groups;
        // The residual, loaded while the row's copies land and its sum is formed.
        let mut xr = 0.0f32;
        if writer && row < n {
            xr = x[row];
        }
        wait_copy_groups(async_copy, comptime!(stages - 1));
        let at = mine + (t % stages) * k_vec;
        let acc = dot_held::<F, V>(
            &ring.slice(at, at + k_vec),
            &held,
            first,
            k_vec,
            stride,
            iters,
        );
        let sum = reduce_sum::<f32>(acc, row_sum);
        if writer && row < n {
            x[row] = xr + sum;
        }
        let next = row + stages * groups;
        let valid = t + stages < steps && next < n;
        stage_row::<F, V>(
            w, next, valid, &mut ring, at, first, k_vec, stride, async_copy,
        );
        commit_copy_group(async_copy);
    }
}

/// Logits of one token for rows `row0..row0 + n` of the lm_head (a chunk `w` of it): the
/// output norm of the residual stream `x` (rounded to `F`, recomputed by every cube) times each
/// row; and each cube's best two (value, id) into `partial` (4 values per cube: v1, id1, v2,
/// id2; ids as f32 bit patterns). A plane computes [`HEAD_ROWS_PER_PLANE`] rows with all their
/// loads in flight. Ties go to the lower id; NaN is never picked.
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
fn lm_head_top2_kernel<F: Float, V: Size>(
    x: &Array<f32>,
    norm_w: &Array<f32>,
    w: &Array<Vector<F, V>>,
    logits: &mut Array<f32>,
    partial: &mut Array<f32>,
    n: usize,
    row0: usize,
    part0: usize,
    eps: f32,
    #[comptime] d: usize,
    #[comptime] k_vec: usize,
    #[comptime] row_sum: Reduction,
    #[comptime] cube: Reduction,
) {
    grid_dependency();
    let mut h = SharedMemory::<f32>::new(d);
    let mut vals = SharedMemory::<f32>::new(PLANES * HEAD_ROWS_PER_PLANE);
    norm_to_shared::<F>(x, norm_w, &mut h, eps, d, cube);
    let lane = UNIT_POS_X as usize;
    let y = UNIT_POS_Y as usize;
    let rows_per_cube = comptime!(PLANES * HEAD_ROWS_PER_PLANE);
    let first_row = CUBE_POS * rows_per_cube + y * HEAD_ROWS_PER_PLANE;
    let iters = comptime!(k_vec.div_ceil(LANES));
    #[unroll]
    for r in 0..HEAD_ROWS_PER_PLANE / 2 {
        let ra = first_row + 2 * r;
        let rb = ra + 1;
        // Rows past the chunk read row 0 instead (their result is dropped).
        let mut ia = 0usize;
        let mut ib = 0usize;
        if ra < n {
            ia = ra;
        }
        if rb < n {
            ib = rb;
        }
        let (wa, wb) = (
            w.slice(ia * k_vec, (ia + 1) * k_vec),
            w.slice(ib * k_vec, (ib + 1) * k_vec),
        );
        let acc = dot2_rows::<F, V>(&wa, &wb, &h, lane, k_vec, LANES, iters);
        let sa = reduce_sum::<f32>(acc.a, row_sum);
        let sb = reduce_sum::<f32>(acc.b, row_sum);
        if lane == 0 {
            let mut va = f32::new(-3.0e38);
            let mut vb = f32::new(-3.0e38);
            if ra < n {
                logits[row0 + ra] = sa;
                // NaN compares false: it never beats the sentinel.
                if sa > va {
                    va = sa;
                }
            }
            if rb < n {
                logits[row0 + rb] = sb;
                if sb > vb {
                    vb = sb;
                }
            }
            vals[y * HEAD_ROWS_PER_PLANE + 2 * r] = va;
            vals[y * HEAD_ROWS_PER_PLANE + 2 * r + 1] = vb;
        }
    }
    sync_cube();
    if UNIT_POS == 0 {
        let base = CUBE_POS * rows_per_cube;
        let mut b1 = f32::new(-3.0e38);
        let mut i1 = 4294967295u32;
        let mut b2 = f32::new(-3.0e38);
        let mut i2 = 4294967295u32;
        // In id order: strict comparisons keep the lower id of a tie.
        for r in 0..rows_per_cube {
            let v = vals[r];
            let id = (row0 + base + r) as u32;
            if base + r < n {
                if v > b1 {
                    b2 = b1;
                    i2 = i1;
                    b1 = v;
                    i1 = id;
                } else if v > b2 {
                    b2 = v;
                    i2 = id;
                }
            }
        }
        let at = (part0 + CUBE_POS) * 4;
        partial[at] = b1;
        partial[at + 1] = f32::reinterpret(i1);
        partial[at + 2] = b2;
        partial[at + 3] = f32::reinterpret(i2);
    }
}

/// Reduces the per-cube best two of [`lm_head_top2_kernel`]: writes the winner to `token[0]`
/// (the next step's input), `(id1, v1, v2)` to `out` (`out[0]` the id bits), and with
/// `advance` moves `state[0]` on by one position.
#[cube(launch)]
fn top2_finish_kernel(
    partial: &Array<f32>,
    token: &mut Array<u32>,
    out: &mut Array<f32>,
    state: &mut Array<u32>,
    parts: usize,
    #[comptime] threads: usize,
    #[comptime] advance: bool,
) {
    grid_dependency();
    let tid = UNIT_POS as usize;
    let mut v1s = SharedMemory::<f32>::new(threads);
    let mut i1s = SharedMemory::<u32>::new(threads);
    let mut v2s = SharedMemory::<f32>::new(threads);
    let mut i2s = SharedMemory::<u32>::new(threads);
    let mut b1 = f32::new(-3.0e38);
    let mut i1 = 4294967295u32;
    let mut b2 = f32::new(-3.0e38);
    let mut i2 = 4294967295u32;
    let mut p = tid;
    while p < parts {
        // Candidates in id order within a thread: strict comparisons keep the lower id.
        for c in 0..2usize {
            let v = partial[p * 4 + c * 2];
            let id = u32::reinterpret(partial[p * 4 + c * 2 + 1]);
            if v > b1 || (v == b1 && id < i1) {
                b2 = b1;
                i2 = i1;
                b1 = v;
                i1 = id;
            } else if v > b2 || (v == b2 && id < i2) {
                b2 = v;
                i2 = id;
            }
        }
        p += threads;
    }
    v1s[tid] = b1;
    i1s[tid] = i1;
    v2s[tid] = b2;
    i2s[tid] = i2;
    sync_cube();
    let mut stride = CUBE_DIM as usize / 2;
    while stride > 0 {
        if tid < stride {
            // Merge the two sorted pairs (a1 ≥ a2) and (c1 ≥ c2) into the best two.
            let a1 = v1s[tid];
            let ai1 = i1s[tid];
            let a2 = v2s[tid];
            let ai2 = i2s[tid];
            let c1 = v1s[tid + stride];
            let ci1 = i1s[tid + stride];
            let c2 = v2s[tid + stride];
            let ci2 = i2s[tid + stride];
            let c_first = c1 > a1 || (c1 == a1 && ci1 < ai1);
            if c_first {
                v1s[tid] = c1;
                i1s[tid] = ci1;
                // second: better of a1 and c2
                if a1 > c2 || (a1 == c2 && ai1 < ci2) {
                    v2s[tid] = a1;
                    i2s[tid] = ai1;
                } else {
                    v2s[tid] = c2;
                    i2s[tid] = ci2;
                }
            } else if c1 > a2 || (c1 == a2 && ci1 < ai2) {
                v2s[tid] = c1;
                i2s[tid] = ci1;
            }
        }
        sync_cube();
        stride /= 2;
    }
    if tid == 0 {
        token[0] = i1s[0];
        out[0] = f32::reinterpret(i1s[0]);
        out[1] = v1s[0];
        out[2] = v2s[0];
        if comptime!(advance) {
            state[0] = state[0] + 1;
        }
    }
}

/// `t[0] = value`.
#[cube(launch)]
fn set_u32_kernel(t: &mut Array<u32>, value: u32) {
    if UNIT_POS == 0 {
        t[0] = value;
    }
}

/// The sum over the `split` planes (of [`LANES`] units) that share a row of a fused GEMV.
fn row_sum<R: Runtime>(client: &ComputeClient<R>, split: usize) -> Reduction {
    Reduction::new(client, LANES * PLANES, LANES * split)
}

/// The whole cube of a fused GEMV as one reduction group (the RMSNorm before it).
fn gemv_cube<R: Runtime>(client: &ComputeClient<R>) -> Reduction {
    Reduction::cube(client, LANES * PLANES)
}

/// Planes per row (a power of two ≤ [`PLANES`]): enough that `rows` rows keep ~4096 planes
/// (32 per multiprocessor of an H100) busy, but never so many that a plane's lanes would
/// share less than one full pass over the row's `k_vec` vectors.
fn split_for(k_vec: usize, rows: usize) -> usize {
    let fill = 4096usize.div_ceil(rows.max(1)).next_power_of_two();
    let pass = (k_vec / LANES).max(1);
    let pass = 1 << pass.ilog2();
    fill.min(pass).clamp(1, PLANES)
}

/// Whether a fused GEMV prefetches its weight rows (`smem_bytes` of shared memory a cube) with
/// asynchronous copies: where cubecl has cube barriers (CUDA, sm_80+), for 16-byte weight
/// vectors, when they fit the cube's shared memory; not with `CUBEQWEN_NO_ASYNC_COPY` set (for
/// before/after runs of one binary).
fn async_prefetch<R: Runtime>(
    client: &ComputeClient<R>,
    vec_bytes: usize,
    smem_bytes: usize,
) -> Result<bool> {
    let props = client.properties();
    Ok(props.supports_type(OpaqueType::Barrier(BarrierLevel::Cube))
        && vec_bytes == ASYNC_COPY_BYTES
        && smem_bytes + 1024 <= props.hardware.max_shared_memory_size
        && !crate::switches::switches()?.no_async_copy)
}

/// Row pairs in flight a plane of the streamed `ffn_in` by default (`CUBEQWEN_FFN_STAGES`
/// overrides; 0 is the one-shot kernel). Measured on an H200 (2026-11-28, tg128 alternated
/// twice, tok/s): one-shot 0.5B 1411 / 1392, 1.5B 692 / 691; 1 stage 1442 / 1453, 740 / 743;
/// 2 stages 1451 / 1443, 734 / 740; 3 stages 1436 / 1453, 729 / 731 (BENCHMARKS.md).
pub const FFN_STAGES: usize = 1;
/// The most row pairs a plane of the streamed `ffn_in` keeps in flight (`cp.async.wait_group`
/// counts to 3 pending behind the oldest).
pub const MAX_FFN_STAGES: usize = 4;
/// Cubes of the streamed kernels where the device does not say how many multiprocessors it
/// has (wgpu): enough planes that the 0.5B shapes take several steps a plane.
const STREAM_CUBES_UNKNOWN: usize = 32;

/// The grid of the streamed `ffn_in`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FfnStreamPlan {
    /// Cubes of [`PLANES`] planes, all resident at once where the device's size is known.
    pub cubes: usize,
    /// Row pairs a plane computes.
    pub steps: usize,
    /// Row pairs in flight a plane (≤ `steps`).
    pub stages: usize,
    /// Shared-memory bytes a cube.
    pub smem: usize,
}

/// The streamed `ffn_in`'s grid for `ffn` row pairs of `row_bytes` each (one row of gate or
/// up) and a norm of `d` f32s, with `stages` row pairs in flight a plane: as many cubes as fit
/// the device's multiprocessors at once (by shared memory), no more than the rows need.
/// Fewer stages where `stages` would not fit a cube's shared memory; `None` for `stages` 0 (the
/// one-shot kernel) or where not even one row pair a plane fits.
pub fn ffn_stream_plan<R: Runtime>(
    client: &ComputeClient<R>,
    ffn: usize,
    d: usize,
    row_bytes: usize,
    stages: usize,
) -> Option<FfnStreamPlan> {
    // The kernel's three reductions (the norm's, gate's and up's): a shared array of a value a
    // unit each without plane operations, of a value a plane each with them.
    let per = if row_sum(client, 1).plane == 0 {
        1
    } else {
        LANES
    };
    let scratch = 3 * (LANES * PLANES / per) * size_of::<f32>();
    ffn_stream_grid(
        ffn,
        d * size_of::<f32>() + scratch,
        row_bytes,
        stages,
        hw_smem(client),
        sms(client),
    )
}

/// [`ffn_stream_plan`] for a device with `max_smem` bytes of shared memory a cube (a
/// multiprocessor holds that plus 1 KiB a resident cube) and `sms` multiprocessors; `fixed`:
/// the cube's shared bytes besides the ring (the normed input, the reductions).
pub fn ffn_stream_grid(
    ffn: usize,
    fixed: usize,
    row_bytes: usize,
    stages: usize,
    max_smem: usize,
    sms: Option<usize>,
) -> Option<FfnStreamPlan> {
    let smem_for = |stages: usize| PLANES * stages * 2 * row_bytes + fixed;
    let (cubes, steps, stages, smem) = fit_stream(ffn, PLANES, stages, smem_for, max_smem, sms)?;
    Some(FfnStreamPlan {
        cubes,
        steps,
        stages,
        smem,
    })
}

/// What the streamed kernels' plans share: `n` items over cubes of `groups` plane groups (an
/// item a group a step), `smem_for(s)` a cube's shared bytes with `s` items in flight a group.
/// The most stages up to `stages` that fit a cube (fewer where the ring would not: small shared
/// memories, wgpu), as many cubes as fit the device at once and no more than the items need,
/// the steps, and no more stages than steps: `(cubes, steps, stages, smem)`; `None` for
/// `stages` 0, no items, or not one stage that fits.
fn fit_stream(
    n: usize,
    groups: usize,
    stages: usize,
    smem_for: impl Fn(usize) -> usize,
    max_smem: usize,
    sms: Option<usize>,
) -> Option<(usize, usize, usize, usize)> {
    if stages == 0 || n == 0 {
        return None;
    }
    let stages = (1..=stages).rev().find(|&s| smem_for(s) <= max_smem)?;
    let need = n.div_ceil(groups);
    let cubes = match sms {
        Some(sms) => need.min(sms * resident_cubes(max_smem, smem_for(stages))),
        None => need.min(STREAM_CUBES_UNKNOWN),
    };
    let steps = n.div_ceil(cubes * groups);
    let stages = stages.min(steps);
    Some((cubes, steps, stages, smem_for(stages)))
}

/// Rows in flight a plane group of the streamed GEMV + residual by default
/// (`CUBEQWEN_GEMV_STAGES` overrides; 0: the one-shot kernel always). H200, 7B down
/// projection, 2026-11-28/29: 34.7 µs with 3 against 39.9 with 2 (kernel bench), tg128 234.2
/// against 222.0 tok/s (one call, alternated).
pub const GEMV_STAGES: usize = 3;
/// Pair-rows in flight a plane group of the streamed `attn_in` by default
/// (`CUBEQWEN_ATTN_IN_STAGES` overrides; 0: the one-shot kernel always).
pub const ATTN_IN_STAGES: usize = 2;
/// The most rows a plane group of the streamed GEMV keeps in flight (`cp.async.wait_group`
/// counts to 3 pending behind the oldest).
pub const MAX_GEMV_STAGES: usize = 4;
/// Units a multiprocessor holds (NVIDIA since Volta: 2048; fewer on some, where the extra
/// cubes of a "resident" grid then wait: slower, not wrong).
const UNITS_PER_SM: usize = 2048;
/// Shared memory a multiprocessor keeps per resident cube besides the cube's own.
const SMEM_RESERVED: usize = 1024;

/// Cubes of [`PLANES`] planes a multiprocessor holds at once with `smem` bytes of shared
/// memory each, in a device with `max_smem` a cube.
fn resident_cubes(max_smem: usize, smem: usize) -> usize {
    let by_units = UNITS_PER_SM / (LANES * PLANES);
    let by_smem = (max_smem + SMEM_RESERVED) / (smem + SMEM_RESERVED);
    by_units.min(by_smem).max(1)
}

/// The grid of a streamed GEMV (GEMV + residual; `attn_in`, whose items are pair-rows).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GemvStreamPlan {
    /// Cubes of [`PLANES`] planes, all resident at once where the device's size is known.
    pub cubes: usize,
    /// Planes that share a row (a cube holds `PLANES / split` plane groups).
    pub split: usize,
    /// Items (rows, pair-rows) a plane group computes.
    pub steps: usize,
    /// Items in flight a plane group (≤ `steps`).
    pub stages: usize,
    /// Shared-memory bytes a cube.
    pub smem: usize,
}

/// The streamed GEMV + residual's grid for `n` rows of `k_vec` vectors of `vec_bytes`, with
/// `stages` rows in flight a plane group ([`gemv_stream_grid`]).
pub fn gemv_stream_plan<R: Runtime>(
    client: &ComputeClient<R>,
    n: usize,
    k_vec: usize,
    vec_bytes: usize,
    stages: usize,
) -> Option<GemvStreamPlan> {
    gemv_stream_grid(n, k_vec, vec_bytes, stages, hw_smem(client), sms(client))
}

/// [`gemv_stream_plan`] for a device with `max_smem` bytes of shared memory a cube and `sms`
/// multiprocessors ([`stream_grid`] with items of one row).
pub fn gemv_stream_grid(
    n: usize,
    k_vec: usize,
    vec_bytes: usize,
    stages: usize,
    max_smem: usize,
    sms: Option<usize>,
) -> Option<GemvStreamPlan> {
    stream_grid(n, 1, k_vec, vec_bytes, 0, stages, max_smem, sms)
}

/// The grid of a streamed GEMV ([`gemv_residual_stream_kernel`], [`attn_in_stream_kernel`]) for
/// `n` items of `item_rows` rows of `k_vec` vectors of `vec_bytes` each, with `stages` items in
/// flight a plane group and `fixed` shared bytes a cube besides the ring and a reduction's
/// partials: as many planes share a row as give each of their units a vector of it (at most
/// [`PLANES`]: long rows are read by whole cubes, so that a cube's ring is few rows deep); as
/// many cubes as fit the device at once, no more than the items need. Fewer stages where
/// `stages` would not fit a cube; `None` for `stages` 0 or where not one item fits.
#[allow(clippy::too_many_arguments)]
pub fn stream_grid(
    n: usize,
    item_rows: usize,
    k_vec: usize,
    vec_bytes: usize,
    fixed: usize,
    stages: usize,
    max_smem: usize,
    sms: Option<usize>,
) -> Option<GemvStreamPlan> {
    if k_vec == 0 {
        return None;
    }
    let split = (1usize << (k_vec / LANES).max(1).ilog2()).min(PLANES);
    let groups = PLANES / split;
    let fixed = fixed + LANES * PLANES * size_of::<f32>();
    let smem_for = |s: usize| groups * s * item_rows * k_vec * vec_bytes + fixed;
    let (cubes, steps, stages, smem) = fit_stream(n, groups, stages, smem_for, max_smem, sms)?;
    Some(GemvStreamPlan {
        cubes,
        split,
        steps,
        stages,
        smem,
    })
}

fn cube_count(n: usize) -> Result<CubeCount> {
    ensure!(
        n > 0 && n <= 65535,
        "decode: {n} cubes do not fit one launch axis"
    );
    Ok(CubeCount::Static(n as u32, 1, 1))
}

/// The per-token state of a decode step on the device.
pub struct DecodeState<R: Runtime> {
    /// `[position]`: where this step's token sits; [`top2_finish`] advances it.
    pub state: DeviceTensor<R, u32>,
    /// `[id]`: the token this step embeds; [`top2_finish`] writes the next one.
    pub token: DeviceTensor<R, u32>,
    /// `[id bits, top-1 logit, top-2 logit]` of the last step.
    pub top2: DeviceTensor<R, f32>,
}

impl<R: Runtime> DecodeState<R> {
    pub fn new(client: &ComputeClient<R>, position: u32, token: u32) -> Result<Self> {
        Ok(Self {
            state: DeviceTensor::from_slice(client, &[position], &[1])?,
            token: DeviceTensor::from_slice(client, &[token], &[1])?,
            top2: DeviceTensor::from_slice(client, &[0.0, 0.0, 0.0], &[3])?,
        })
    }
}

/// `t[0] = value` in place (the buffer a captured graph reads keeps its address).
pub fn set_u32<R: Runtime>(
    client: &ComputeClient<R>,
    rec: Rec<'_>,
    t: &DeviceTensor<R, u32>,
    value: u32,
) -> Result<()> {
    launch!(rec, client, set_u32_kernel::SetU32Kernel<>, CubeCount::Static(1, 1, 1), CubeDim::new_1d(1);
        sizes []; arrays [t => 1]; scalars [u32 value]; comptime [])
}

/// `x = table[token[0]]` as f32.
pub fn embed_token<R: Runtime, F: Float + CubeElement>(
    client: &ComputeClient<R>,
    mut rec: Rec<'_>,
    token: &DeviceTensor<R, u32>,
    table: &RowChunked<R, F>,
    x: &DeviceTensor<R, f32>,
) -> Result<()> {
    let d = table.k;
    ensure!(
        x.len() == d,
        "embed_token: x must hold {d} values, got {:?}",
        x.shape
    );
    let mut row0 = 0;
    for chunk in &table.chunks {
        let rows = chunk.shape[0];
        launch!(rec.as_deref_mut(), client, embed_token_kernel::EmbedTokenKernel<F>,
            cube_count(d.div_ceil(256))?, CubeDim::new_1d(256);
            sizes []; arrays [token => 1, chunk => 1, x => 1]; scalars [usize row0, usize rows];
            comptime [d])?;
        row0 += rows;
    }
    Ok(())
}

/// The weights [`attn_in`] reads.
pub struct AttnInWeights<'a, R: Runtime, F: CubeElement> {
    pub norm: &'a DeviceTensor<R, f32>,
    pub wq: &'a DeviceTensor<R, F>,
    pub wk: &'a DeviceTensor<R, F>,
    pub wv: &'a DeviceTensor<R, F>,
    pub bq: &'a DeviceTensor<R, f32>,
    pub bk: &'a DeviceTensor<R, f32>,
    pub bv: &'a DeviceTensor<R, f32>,
}

/// RMSNorm → q/k/v + bias → RoPE → cache append for the token at `state[0]`; writes q [1, qd].
/// Streamed ([`attn_in_with`], `CUBEQWEN_ATTN_IN_STAGES`, default [`ATTN_IN_STAGES`] pair-rows
/// in flight a plane group) where
/// the one-shot kernel's grid would not be resident at once ([`attn_in_one_shot_waves`] > 1: the
/// 7B shape); else the one-shot kernel.
#[allow(clippy::too_many_arguments)]
pub fn attn_in<R: Runtime, F: Float + CubeElement>(
    client: &ComputeClient<R>,
    rec: Rec<'_>,
    x: &DeviceTensor<R, f32>,
    w: &AttnInWeights<'_, R, F>,
    rope: &RopeTables<R>,
    st: &DecodeState<R>,
    eps: f32,
    n_heads: usize,
    q: &DeviceTensor<R, F>,
    cache: &KvCache<R, F>,
) -> Result<()> {
    // Shapes are checked in attn_in_with; here only the grid is estimated.
    let pairs = (w.wq.len() + w.wk.len() + w.wv.len())
        .checked_div(2 * x.len())
        .unwrap_or(0);
    let waves = attn_in_one_shot_waves(client, pairs, x.len(), size_of::<F>());
    let chosen = crate::switches::switches()?.attn_in_stages;
    let stages = stages_for(waves, chosen.unwrap_or(ATTN_IN_STAGES));
    attn_in_with(client, rec, x, w, rope, st, eps, n_heads, q, cache, stages)
}

/// [`attn_in`] with `stages` pair-rows in flight a plane group: the streamed kernel
/// ([`stream_grid`]; fewer stages where they do not fit); 0 (or not one pair fits): the one-shot
/// kernel, each unit's part of its rows in registers.
#[allow(clippy::too_many_arguments)]
pub fn attn_in_with<R: Runtime, F: Float + CubeElement>(
    client: &ComputeClient<R>,
    rec: Rec<'_>,
    x: &DeviceTensor<R, f32>,
    w: &AttnInWeights<'_, R, F>,
    rope: &RopeTables<R>,
    st: &DecodeState<R>,
    eps: f32,
    n_heads: usize,
    q: &DeviceTensor<R, F>,
    cache: &KvCache<R, F>,
    stages: usize,
) -> Result<()> {
    ensure!(
        stages <= MAX_GEMV_STAGES,
        "attn_in: {stages} pair-rows in flight a plane group; at most {MAX_GEMV_STAGES}"
    );
    let d = x.len();
    let hd = cache.head_dim;
    let (qd, kvd) = (n_heads * hd, cache.n_kv * hd);
    ensure!(
        w.wq.shape == [qd, d] && w.wk.shape == [kvd, d] && w.wv.shape == [kvd, d],
        "attn_in: weights q {:?}, k {:?}, v {:?} do not match [{qd}|{kvd}, {d}]",
        w.wq.shape,
        w.wk.shape,
        w.wv.shape
    );
    ensure!(
        w.bq.shape == [qd] && w.bk.shape == [kvd] && w.bv.shape == [kvd] && w.norm.shape == [d],
        "attn_in: bias or norm shapes do not match"
    );
    ensure!(q.len() == qd, "attn_in: q must hold {qd} values");
    ensure!(
        rope.head_dim == hd && hd.is_multiple_of(2),
        "attn_in: RoPE tables are for head_dim {}, not {hd}",
        rope.head_dim
    );
    let vec = vector_size(client, size_of::<F>(), d);
    let pairs = (qd + 2 * kvd) / 2;
    let k_vec = d / vec;
    let vec_bytes = vec * size_of::<F>();
    let (n_kv, max_ctx) = (cache.n_kv, cache.max_ctx);
    let h_bytes = d * size_of::<f32>();
    let plan = stream_grid(
        pairs,
        2,
        k_vec,
        vec_bytes,
        h_bytes,
        stages,
        hw_smem(client),
        sms(client),
    );
    if let Some(plan) = plan {
        let async_copy = rec.is_some() && async_prefetch(client, vec_bytes, plan.smem)?;
        let groups = plan.cubes * (PLANES / plan.split);
        return launch!(rec, client, attn_in_stream_kernel::AttnInStreamKernel<F>,
            cube_count(plan.cubes)?, CubeDim::new_2d(LANES as u32, PLANES as u32);
            sizes [vec];
            arrays [x => 1, w.norm => 1, w.wq => vec, w.wk => vec, w.wv => vec, w.bq => 1,
                w.bk => 1, w.bv => 1, rope.cos => 1, rope.sin => 1, st.state => 1, q => 1,
                cache.k => 1, cache.v => 1];
            scalars [usize max_ctx, f32 eps];
            comptime [d, n_heads, n_kv, hd, k_vec, plan.split, plan.stages, plan.steps, groups,
                row_sum(client, plan.split), gemv_cube(client), async_copy]);
    }
    let split = split_for(k_vec, pairs);
    launch!(rec, client, attn_in_kernel::AttnInKernel<F>,
        cube_count(pairs.div_ceil(PLANES / split))?, CubeDim::new_2d(LANES as u32, PLANES as u32);
        sizes [vec];
        arrays [x => 1, w.norm => 1, w.wq => vec, w.wk => vec, w.wv => vec, w.bq => 1, w.bk => 1,
            w.bv => 1, rope.cos => 1, rope.sin => 1, st.state => 1, q => 1, cache.k => 1, cache.v => 1];
        scalars [usize max_ctx, f32 eps];
        comptime [d, n_heads, n_kv, hd, k_vec, split, row_sum(client, split), gemv_cube(client)])
}

/// Waves of the one-shot `attn_in` for `pairs` pair-rows of `k` values of `elem` bytes: its
/// cubes over those the device holds at once, by an estimate of its registers (each unit holds
/// its vectors of both rows: `2·iters` vectors, plus ~32 registers; 48 measured at the 0.5B
/// shape, 2026-11-28) against 64 K registers a multiprocessor; 0 where the device does not say
/// how many multiprocessors it has (wgpu).
pub fn attn_in_one_shot_waves<R: Runtime>(
    client: &ComputeClient<R>,
    pairs: usize,
    k: usize,
    elem: usize,
) -> f64 {
    const REGISTERS_PER_SM: usize = 65_536;
    let Some(sms) = sms(client) else {
        return 0.0;
    };
    let vec = vector_size(client, elem, k);
    let k_vec = k / vec;
    let split = split_for(k_vec, pairs);
    let iters = k_vec.div_ceil(LANES * split);
    let registers = 32 + 2 * iters * (vec * elem).div_ceil(4);
    let per_sm =
        (REGISTERS_PER_SM / (registers * LANES * PLANES)).clamp(1, UNITS_PER_SM / (LANES * PLANES));
    pairs.div_ceil(PLANES / split) as f64 / (sms * per_sm) as f64
}

fn hw_smem<R: Runtime>(client: &ComputeClient<R>) -> usize {
    client.properties().hardware.max_shared_memory_size
}

fn sms<R: Runtime>(client: &ComputeClient<R>) -> Option<usize> {
    client
        .properties()
        .hardware
        .num_streaming_multiprocessors
        .map(|n| n as usize)
}

/// Scratch for [`attention`] over up to `max_ctx` positions.
pub struct AttentionScratch<R: Runtime> {
    part_out: DeviceTensor<R, f32>,
    part_max_sum: DeviceTensor<R, f32>,
}

impl<R: Runtime> AttentionScratch<R> {
    pub fn new(
        client: &ComputeClient<R>,
        n_heads: usize,
        head_dim: usize,
        max_ctx: usize,
    ) -> Result<Self> {
        let parts = n_heads * max_ctx.div_ceil(ATT_CHUNK);
        Ok(Self {
            part_out: DeviceTensor::empty(client, &[parts, head_dim])?,
            part_max_sum: DeviceTensor::empty(client, &[parts, 2])?,
        })
    }
}

/// Attention chunks a token at `pos` spans: the kernels' grid, and the key of a captured
/// decode graph.
pub fn attention_chunks(pos: usize) -> usize {
    (pos + 1).div_ceil(ATT_CHUNK)
}

/// Attention of the token at `state[0]` (which the host knows as `pos`, to size the grid):
/// out [1, n_heads·hd] from q and the cache positions `0..=pos`.
#[allow(clippy::too_many_arguments)]
pub fn attention<R: Runtime, F: Float + CubeElement>(
    client: &ComputeClient<R>,
    mut rec: Rec<'_>,
    q: &DeviceTensor<R, F>,
    cache: &KvCache<R, F>,
    st: &DecodeState<R>,
    pos: usize,
    n_heads: usize,
    scratch: &AttentionScratch<R>,
    out: &DeviceTensor<R, F>,
) -> Result<()> {
    let hd = cache.head_dim;
    ensure!(
        q.len() == n_heads * hd && out.len() == q.len(),
        "attention: q and out must hold {} values",
        n_heads * hd
    );
    ensure!(
        n_heads.is_multiple_of(cache.n_kv) && [16, 32, 64, 128].contains(&hd),
        "attention: {n_heads} heads on {} kv heads of dim {hd} unsupported (the head dimension \
         must be 16, 32, 64 or 128)",
        cache.n_kv
    );
    ensure!(
        pos < cache.max_ctx,
        "attention: position {pos} is outside the cache of {}",
        cache.max_ctx
    );
    let chunks = attention_chunks(pos);
    ensure!(
        chunks * n_heads * hd <= scratch.part_out.len(),
        "attention: scratch too small"
    );
    let single = chunks == 1;
    let (max_ctx, scale, group) = (
        cache.max_ctx,
        1.0 / (hd as f32).sqrt(),
        n_heads / cache.n_kv,
    );
    let (part_out, part_max_sum) = (&scratch.part_out, &scratch.part_max_sum);
    let k_vec = vector_size(client, size_of::<F>(), hd);
    // Value dimensions per unit: the row spread over the plane's 32 units (fewer below 32).
    let v_vec = (hd / LANES).max(1);
    let keys = Reduction::new(client, ATT_THREADS, LANES);
    launch!(rec.as_deref_mut(), client, attention_kernel::AttentionKernel<F>,
        CubeCount::Static(chunks as u32, n_heads as u32, 1),
        CubeDim::new_2d(LANES as u32, ATT_PLANES as u32);
        sizes [k_vec, v_vec];
        arrays [q => 1, cache.k => k_vec, cache.v => v_vec, st.state => 1, out => 1,
            part_out => 1, part_max_sum => 1];
        scalars [usize max_ctx, f32 scale];
        comptime [group, hd, single, hd / k_vec, hd / v_vec, keys])?;
    if !single {
        launch!(rec, client, attention_merge_kernel::AttentionMergeKernel<F>,
            cube_count(n_heads)?, CubeDim::new_1d(MERGE_UNITS as u32);
            sizes []; arrays [part_out => 1, part_max_sum => 1, out => 1]; scalars [usize chunks];
            comptime [hd, Reduction::cube(client, MERGE_UNITS)])?;
    }
    Ok(())
}

/// `x += W·a`: W `[n, k]`, a `[k]` (f16 storage), x `[n]` f32. Streamed
/// ([`gemv_residual_with`], `CUBEQWEN_GEMV_STAGES`, default [`GEMV_STAGES`] rows in flight a
/// plane group) where the one-shot kernel's grid would not be resident at once
/// ([`gemv_one_shot_waves`] > 1: the 7B down projection); else the one-shot kernel.
pub fn gemv_residual<R: Runtime, F: Float + CubeElement>(
    client: &ComputeClient<R>,
    rec: Rec<'_>,
    w: &DeviceTensor<R, F>,
    a: &DeviceTensor<R, F>,
    x: &DeviceTensor<R, f32>,
) -> Result<()> {
    let waves = match w.shape.as_slice() {
        [n, k] => gemv_one_shot_waves(client, *n, *k, size_of::<F>())?,
        _ => 0.0, // refused by gemv_residual_with
    };
    let chosen = crate::switches::switches()?.gemv_stages;
    gemv_residual_with(
        client,
        rec,
        w,
        a,
        x,
        stages_for(waves, chosen.unwrap_or(GEMV_STAGES)),
    )
}

/// Items in flight for a streamed kernel whose one-shot grid takes `waves` waves: `stages`
/// where that is more than one, else 0 (the one-shot kernel).
fn stages_for(waves: f64, stages: usize) -> usize {
    if waves > 1.0 {
        stages
    } else {
        0
    }
}

/// [`gemv_residual`] with `stages` rows in flight a plane group: the streamed kernel
/// ([`gemv_stream_plan`]; fewer stages where they do not fit); 0 (or not one row fits): the
/// one-shot kernel, where each cube stages its rows and waits once.
pub fn gemv_residual_with<R: Runtime, F: Float + CubeElement>(
    client: &ComputeClient<R>,
    rec: Rec<'_>,
    w: &DeviceTensor<R, F>,
    a: &DeviceTensor<R, F>,
    x: &DeviceTensor<R, f32>,
    stages: usize,
) -> Result<()> {
    ensure!(w.shape.len() == 2, "gemv_residual: W must be 2-D");
    let (n, k) = (w.shape[0], w.shape[1]);
    ensure!(
        a.len() == k && x.len() == n,
        "gemv_residual: W {:?}, a {:?}, x {:?} do not fit",
        w.shape,
        a.shape,
        x.shape
    );
    ensure!(
        stages <= MAX_GEMV_STAGES,
        "gemv_residual: {stages} rows in flight a plane group; at most {MAX_GEMV_STAGES}"
    );
    let vec = vector_size(client, size_of::<F>(), k);
    let k_vec = k / vec;
    let vec_bytes = vec * size_of::<F>();
    if let Some(plan) = gemv_stream_plan(client, n, k_vec, vec_bytes, stages) {
        // cp.async only where the graph recorder compiles the group markers (as ffn_in).
        let async_copy = rec.is_some() && async_prefetch(client, vec_bytes, plan.smem)?;
        let groups = plan.cubes * (PLANES / plan.split);
        return launch!(rec, client, gemv_residual_stream_kernel::GemvResidualStreamKernel<F>,
            cube_count(plan.cubes)?, CubeDim::new_2d(LANES as u32, PLANES as u32);
            sizes [vec]; arrays [w => vec, a => vec, x => 1]; scalars [usize n];
            comptime [k_vec, plan.split, plan.stages, plan.steps, groups,
                row_sum(client, plan.split), async_copy]);
    }
    let split = split_for(k_vec, n);
    let prefetch = async_prefetch(client, vec_bytes, PLANES / split * k_vec * vec_bytes)?;
    launch!(rec, client, gemv_residual_kernel::GemvResidualKernel<F>,
        cube_count(n.div_ceil(PLANES / split))?, CubeDim::new_2d(LANES as u32, PLANES as u32);
        sizes [vec]; arrays [w => vec, a => vec, x => 1]; scalars [usize n];
        comptime [k_vec, split, row_sum(client, split), prefetch])
}

/// Waves of the one-shot GEMV + residual for W `[n, k]` of `elem` bytes: its cubes over those
/// the device holds at once (by shared memory and [`UNITS_PER_SM`]); 0 where the device does not
/// say how many multiprocessors it has (wgpu).
pub fn gemv_one_shot_waves<R: Runtime>(
    client: &ComputeClient<R>,
    n: usize,
    k: usize,
    elem: usize,
) -> Result<f64> {
    let Some(sms) = sms(client) else {
        return Ok(0.0);
    };
    let vec = vector_size(client, elem, k);
    let (k_vec, vec_bytes) = (k / vec, vec * elem);
    let rows = PLANES / split_for(k_vec, n);
    let smem = rows * k_vec * vec_bytes;
    let staged = async_prefetch(client, vec_bytes, smem)?;
    let per_sm = resident_cubes(hw_smem(client), if staged { smem } else { 0 });
    Ok(n.div_ceil(rows) as f64 / (sms * per_sm) as f64)
}

/// RMSNorm → gate, up → SwiGLU: s `[ffn]` from x `[d]`; streamed with
/// `CUBEQWEN_FFN_STAGES` (default [`FFN_STAGES`]) row pairs in flight a plane ([`ffn_in_with`]).
#[allow(clippy::too_many_arguments)]
pub fn ffn_in<R: Runtime, F: Float + CubeElement>(
    client: &ComputeClient<R>,
    rec: Rec<'_>,
    x: &DeviceTensor<R, f32>,
    norm: &DeviceTensor<R, f32>,
    w_gate: &DeviceTensor<R, F>,
    w_up: &DeviceTensor<R, F>,
    eps: f32,
    s: &DeviceTensor<R, F>,
) -> Result<()> {
    let stages = crate::switches::switches()?
        .ffn_stages
        .unwrap_or(FFN_STAGES);
    ffn_in_with(client, rec, x, norm, w_gate, w_up, eps, s, stages)
}

/// [`ffn_in`] with `stages` row pairs in flight a plane ([`ffn_stream_plan`]; fewer where they
/// do not fit): the streamed kernel; 0 (or not even one stage fits): the one-shot kernel, where
/// each cube stages all its rows and waits once. Both give the same bits where the one-shot
/// kernel gives a row one plane (the shapes of Qwen2.5).
#[allow(clippy::too_many_arguments)]
pub fn ffn_in_with<R: Runtime, F: Float + CubeElement>(
    client: &ComputeClient<R>,
    rec: Rec<'_>,
    x: &DeviceTensor<R, f32>,
    norm: &DeviceTensor<R, f32>,
    w_gate: &DeviceTensor<R, F>,
    w_up: &DeviceTensor<R, F>,
    eps: f32,
    s: &DeviceTensor<R, F>,
    stages: usize,
) -> Result<()> {
    let d = x.len();
    ensure!(
        w_gate.shape.len() == 2 && w_gate.shape[1] == d && w_up.shape == w_gate.shape,
        "ffn_in: gate {:?} and up {:?} must be [ffn, {d}]",
        w_gate.shape,
        w_up.shape
    );
    let ffn = w_gate.shape[0];
    ensure!(
        s.len() == ffn && norm.shape == [d],
        "ffn_in: s must hold {ffn} values"
    );
    ensure!(
        stages <= MAX_FFN_STAGES,
        "ffn_in: {stages} row pairs in flight a plane; at most {MAX_FFN_STAGES}"
    );
    let vec = vector_size(client, size_of::<F>(), d);
    let k_vec = d / vec;
    let vec_bytes = vec * size_of::<F>();
    if let Some(plan) = ffn_stream_plan(client, ffn, d, k_vec * vec_bytes, stages) {
        // cp.async only where the graph recorder compiles the kernel (it turns the group
        // markers into instructions); cubecl's own launches stage with plain loads.
        let async_copy = rec.is_some() && async_prefetch(client, vec_bytes, plan.smem)?;
        return launch!(rec, client, ffn_in_stream_kernel::FfnInStreamKernel<F>,
            cube_count(plan.cubes)?, CubeDim::new_2d(LANES as u32, PLANES as u32);
            sizes [vec]; arrays [x => 1, norm => 1, w_gate => vec, w_up => vec, s => 1];
            scalars [usize ffn, f32 eps];
            comptime [d, k_vec, plan.stages, plan.steps, plan.cubes * PLANES,
                row_sum(client, 1), gemv_cube(client), async_copy]);
    }
    let split = split_for(k_vec, ffn);
    let smem = 2 * (PLANES / split) * k_vec * vec_bytes + d * size_of::<f32>();
    let prefetch = async_prefetch(client, vec_bytes, smem)?;
    launch!(rec, client, ffn_in_kernel::FfnInKernel<F>,
        cube_count(ffn.div_ceil(PLANES / split))?, CubeDim::new_2d(LANES as u32, PLANES as u32);
        sizes [vec]; arrays [x => 1, norm => 1, w_gate => vec, w_up => vec, s => 1];
        scalars [usize ffn, f32 eps];
        comptime [d, k_vec, split, row_sum(client, split), gemv_cube(client), prefetch])
}

/// Per-cube candidates [`lm_head_top2`] writes for a vocabulary of `n` rows.
pub fn top2_parts(lm_head: &RowChunked<impl Runtime, impl CubeElement>) -> usize {
    lm_head
        .chunks
        .iter()
        .map(|c| c.shape[0].div_ceil(HEAD_ROWS))
        .sum()
}

/// Logits [1, vocab] (f32) of the output-normed residual stream x [1, k] (norm weight `norm`),
/// and the per-cube best two into `partial` ([`top2_parts`] × 4).
#[allow(clippy::too_many_arguments)]
pub fn lm_head_top2<R: Runtime, F: Float + CubeElement>(
    client: &ComputeClient<R>,
    mut rec: Rec<'_>,
    lm_head: &RowChunked<R, F>,
    x: &DeviceTensor<R, f32>,
    norm: &DeviceTensor<R, f32>,
    eps: f32,
    logits: &DeviceTensor<R, f32>,
    partial: &DeviceTensor<R, f32>,
) -> Result<()> {
    let d = lm_head.k;
    ensure!(
        x.len() == d && norm.shape == [d] && logits.len() == lm_head.n,
        "lm_head_top2: x {:?}, norm {:?}, logits {:?} do not fit [{}, {d}]",
        x.shape,
        norm.shape,
        logits.shape,
        lm_head.n
    );
    ensure!(
        partial.len() >= top2_parts(lm_head) * 4,
        "lm_head_top2: partial too small"
    );
    let vec = vector_size(client, size_of::<F>(), d);
    let k_vec = d / vec;
    let (mut row0, mut part0) = (0, 0);
    for chunk in &lm_head.chunks {
        let n = chunk.shape[0];
        let cubes = n.div_ceil(HEAD_ROWS);
        launch!(rec.as_deref_mut(), client, lm_head_top2_kernel::LmHeadTop2Kernel<F>,
            cube_count(cubes)?, CubeDim::new_2d(LANES as u32, PLANES as u32);
            sizes [vec]; arrays [x => 1, norm => 1, chunk => vec, logits => 1, partial => 1];
            scalars [usize n, usize row0, usize part0, f32 eps]; comptime [d, k_vec, row_sum(client, 1), gemv_cube(client)])?;
        row0 += n;
        part0 += cubes;
    }
    Ok(())
}

/// The winner of the candidates into `st.token`, `(id bits, v1, v2)` into `st.top2`, and
/// with `advance`, `state[0] += 1` (the end of a decode step; a prefill sets the position).
pub fn top2_finish<R: Runtime>(
    client: &ComputeClient<R>,
    rec: Rec<'_>,
    partial: &DeviceTensor<R, f32>,
    parts: usize,
    st: &DecodeState<R>,
    advance: bool,
) -> Result<()> {
    ensure!(
        parts > 0 && partial.len() >= parts * 4,
        "top2_finish: {parts} parts do not fit"
    );
    let threads = FINISH_THREADS.min(client.properties().hardware.max_units_per_cube as usize);
    let threads = 1 << threads.ilog2();
    launch!(rec, client, top2_finish_kernel::Top2FinishKernel<>,
        CubeCount::Static(1, 1, 1), CubeDim::new_1d(threads as u32);
        sizes []; arrays [partial => 1, st.token => 1, st.top2 => 1, st.state => 1];
        scalars [usize parts]; comptime [threads, advance])
}

/// f64 reference of [`attn_in`]: returns (q roped `[qd]`, k roped `[kvd]`, v `[kvd]`) for `x` at
/// position `pos` (`inv_freq` as [`crate::rope::inv_freq`]; f16 rounding where the kernel
/// rounds is not modelled).
#[allow(clippy::too_many_arguments)]
pub fn reference_attn_in(
    x: &[f64],
    norm: &[f64],
    wq: &[f64],
    wk: &[f64],
    wv: &[f64],
    b: (&[f64], &[f64], &[f64]),
    eps: f64,
    head_dim: usize,
    theta: f32,
    pos: usize,
) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let d = x.len();
    let h = crate::rmsnorm::reference(x, norm, d, eps);
    let q = crate::matmul::reference(&h, wq, Some(b.0), 1, b.0.len(), d);
    let k = crate::matmul::reference(&h, wk, Some(b.1), 1, b.1.len(), d);
    let v = crate::matmul::reference(&h, wv, Some(b.2), 1, b.2.len(), d);
    let rope = |t: &[f64]| crate::rope::reference(t, &[pos], head_dim, theta);
    (rope(&q), rope(&k), v)
}

/// f64 reference of [`ffn_in`].
pub fn reference_ffn_in(
    x: &[f64],
    norm: &[f64],
    w_gate: &[f64],
    w_up: &[f64],
    ffn: usize,
    eps: f64,
) -> Vec<f64> {
    let d = x.len();
    let h = crate::rmsnorm::reference(x, norm, d, eps);
    let g = crate::matmul::reference(&h, w_gate, None, 1, ffn, d);
    let u = crate::matmul::reference(&h, w_up, None, 1, ffn, d);
    crate::elementwise::swiglu_reference(&g, &u)
}

/// f64 reference of [`gemv_residual`]: `x + W·a`.
pub fn reference_gemv_residual(w: &[f64], a: &[f64], x: &[f64]) -> Vec<f64> {
    let y = crate::matmul::reference(a, w, None, 1, x.len(), a.len());
    x.iter().zip(y).map(|(x, y)| x + y).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An H100's or H200's shared memory: 227 KiB a cube, 228 a multiprocessor; 132 of them.
    const SMEM: usize = 232_448;

    #[test]
    fn ffn_stream_grid_fills_the_gpu_once() {
        // 0.5B: 1792-byte rows, 2 stages: 60 928 bytes a cube, 3 a multiprocessor, 396 cubes
        // (3 168 planes), 2 steps.
        let p = ffn_stream_grid(4864, 3584, 1792, 2, SMEM, Some(132)).unwrap();
        assert_eq!((p.cubes, p.steps, p.stages, p.smem), (396, 2, 2, 60_928));
        // 1.5B: 3072-byte rows: 2 a multiprocessor, 264 cubes, 5 steps.
        let p = ffn_stream_grid(8960, 6144, 3072, 2, SMEM, Some(132)).unwrap();
        assert_eq!((p.cubes, p.steps, p.stages), (264, 5, 2));
        // More stages than steps: as many as there are steps.
        let p = ffn_stream_grid(4864, 3584, 1792, 4, SMEM, Some(132)).unwrap();
        assert_eq!((p.cubes, p.steps, p.stages), (132, 5, 4));
        let p = ffn_stream_grid(1000, 1024, 512, 4, SMEM, Some(132)).unwrap();
        assert_eq!((p.cubes, p.steps, p.stages), (125, 1, 1));
        // A small shared memory: fewer stages; none fits: the one-shot kernel.
        let p = ffn_stream_grid(4864, 3584, 1792, 4, 32_768, None).unwrap();
        assert_eq!((p.cubes, p.steps, p.stages), (STREAM_CUBES_UNKNOWN, 19, 1));
        assert_eq!(ffn_stream_grid(8960, 6144, 3072, 2, 32_768, None), None);
        assert_eq!(ffn_stream_grid(4864, 3584, 1792, 0, SMEM, Some(132)), None);
    }

    #[test]
    fn gemv_stream_grid_fills_the_gpu_once() {
        // 7B down: 2368 vectors a row (37 888 bytes), a cube a row; 2 stages: 76 800 bytes a
        // cube, 3 a multiprocessor, 396 cubes, 10 steps.
        let p = gemv_stream_grid(3584, 2368, 16, 2, SMEM, Some(132)).unwrap();
        assert_eq!(
            (p.cubes, p.split, p.steps, p.stages, p.smem),
            (396, 8, 10, 2, 76_800)
        );
        // 1 stage: 5 a multiprocessor; 3 stages: 2; 4 stages: 1.
        let p = gemv_stream_grid(3584, 2368, 16, 1, SMEM, Some(132)).unwrap();
        assert_eq!((p.cubes, p.steps, p.stages), (660, 6, 1));
        let p = gemv_stream_grid(3584, 2368, 16, 3, SMEM, Some(132)).unwrap();
        assert_eq!((p.cubes, p.steps, p.stages), (264, 14, 3));
        let p = gemv_stream_grid(3584, 2368, 16, 4, SMEM, Some(132)).unwrap();
        assert_eq!((p.cubes, p.steps, p.stages), (132, 28, 4));
        // Short rows: planes share fewer of them (0.5B o: 112 vectors, 2 planes a row, 4 rows
        // a cube); at most 8 cubes a multiprocessor by units; one step: one stage.
        let p = gemv_stream_grid(896, 112, 16, 2, SMEM, Some(132)).unwrap();
        assert_eq!((p.cubes, p.split, p.steps, p.stages), (224, 2, 1, 1));
        let p = gemv_stream_grid(896, 20, 16, 2, SMEM, Some(2)).unwrap();
        assert_eq!((p.cubes, p.split, p.steps, p.stages), (16, 1, 7, 2));
        // Unknown device: a fixed grid; small shared memory: fewer stages, or none.
        // (0.5B down: 9 728-byte rows, 3 of them and the partials fit 32 KiB).
        let p = gemv_stream_grid(896, 608, 16, 4, 32_768, None).unwrap();
        assert_eq!((p.cubes, p.steps, p.stages), (STREAM_CUBES_UNKNOWN, 28, 3));
        assert_eq!(gemv_stream_grid(3584, 4096, 16, 1, 32_768, None), None);
        assert_eq!(gemv_stream_grid(3584, 2368, 16, 0, SMEM, Some(132)), None);
    }

    #[test]
    fn attn_in_stream_grid_fills_the_gpu_once() {
        // 7B: 2304 pair-rows of 2 × 7168 bytes, the normed input (14 336 bytes) a cube; 2
        // stages: 44 032 bytes a cube, 5 a multiprocessor, 660 cubes, 4 steps.
        let p = stream_grid(2304, 2, 448, 16, 14_336, 2, SMEM, Some(132)).unwrap();
        assert_eq!(
            (p.cubes, p.split, p.steps, p.stages, p.smem),
            (660, 8, 4, 2, 44_032)
        );
    }
}
