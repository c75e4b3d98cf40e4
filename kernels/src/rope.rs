//! RoPE, NEOX style (Qwen2): in each head, element `i` rotates with `i + head_dim/2`.
//!
//! The angles `pos · theta^(-2i/hd)` are formed in f32 on the host (the inverse frequency
//! rounded to f32, then an f32 product, as the reference does) and their cos/sin tables
//! ([max_pos, hd/2], f32) are computed once in f64 and uploaded. The kernel only looks them up,
//! so positions past 2048 (which f16 cannot hold) and long contexts are as exact as position 0.

use anyhow::{ensure, Result};
use cubecl::prelude::*;

use crate::attention::KvCache;
use crate::{grid, DeviceTensor, KernelError};

/// Where a rotated pair lies: token `t`, head `h`, and the pair's two offsets in the head.
#[derive(CubeType, Clone, Copy)]
struct PairAt {
    t: usize,
    h: usize,
    i0: usize,
    i1: usize,
}

/// Rotates pair `idx` of `x` (`heads` heads of `half` pairs a token); returns where it lies.
#[cube]
#[allow(clippy::too_many_arguments)]
fn rotate_pair<F: Float>(
    x: &mut Array<F>,
    positions: &Array<u32>,
    cos: &Array<f32>,
    sin: &Array<f32>,
    idx: usize,
    heads: usize,
    half: usize,
    #[comptime] adjacent_pairs: bool,
) -> PairAt {
    let per_token = heads * half;
    let t = idx / per_token;
    let rem = idx % per_token;
    let h = rem / half;
    let i = rem % half;
    let base = t * per_token * 2 + h * half * 2;
    let p = positions[t] as usize;
    let c = cos[p * half + i];
    let s = sin[p * half + i];
    // Fault injection for the tracer's tests: GPT-J pairs (2i, 2i+1) instead of NEOX halves.
    let mut i0 = i;
    let mut i1 = i + half;
    if comptime!(adjacent_pairs) {
        i0 = 2 * i;
        i1 = 2 * i + 1;
    }
    let a = f32::cast_from(x[base + i0]);
    let b = f32::cast_from(x[base + i1]);
    x[base + i0] = F::cast_from(a * c - b * s);
    x[base + i1] = F::cast_from(b * c + a * s);
    PairAt { t, h, i0, i1 }
}

/// Rotates q (`q_heads` heads) and k (`k_heads`) in one launch: units below `q_pairs` take q's
/// pairs, the rest k's. With `append`, each unit of k also writes its rotated pair and the same
/// elements of `v` into the caches at position `start + t` (`[k_heads, max_ctx, hd]`).
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
fn rope_kernel<F: Float>(
    q: &mut Array<F>,
    k: &mut Array<F>,
    v: &Array<F>,
    positions: &Array<u32>,
    cos: &Array<f32>,
    sin: &Array<f32>,
    k_cache: &mut Array<F>,
    v_cache: &mut Array<F>,
    q_heads: usize,
    k_heads: usize,
    half: usize,
    q_pairs: usize,
    total: usize,
    max_ctx: usize,
    start: usize,
    #[comptime] adjacent_pairs: bool,
    #[comptime] append: bool,
) {
    let idx = ABSOLUTE_POS;
    if idx < q_pairs {
        rotate_pair::<F>(q, positions, cos, sin, idx, q_heads, half, adjacent_pairs);
    } else if idx < total {
        let j = idx - q_pairs;
        let at = rotate_pair::<F>(k, positions, cos, sin, j, k_heads, half, adjacent_pairs);
        if comptime!(append) {
            let hd = 2 * half;
            let src = (at.t * k_heads + at.h) * hd;
            let dst = (at.h * max_ctx + start + at.t) * hd;
            k_cache[dst + at.i0] = k[src + at.i0];
            k_cache[dst + at.i1] = k[src + at.i1];
            v_cache[dst + at.i0] = v[src + at.i0];
            v_cache[dst + at.i1] = v[src + at.i1];
        }
    }
}

/// The inverse frequency of pair `i`, rounded to f32 (as `reference` and the Qwen2 spec do).
pub fn inv_freq(theta: f32, i: usize, head_dim: usize) -> f32 {
    (theta as f64).powf(-((2 * i) as f64) / head_dim as f64) as f32
}

/// cos/sin tables on the device for positions `0..max_pos`.
pub struct RopeTables<R: Runtime> {
    pub cos: DeviceTensor<R, f32>,
    pub sin: DeviceTensor<R, f32>,
    pub head_dim: usize,
    pub max_pos: usize,
}

impl<R: Runtime> RopeTables<R> {
    pub fn new(
        client: &ComputeClient<R>,
        theta: f32,
        head_dim: usize,
        max_pos: usize,
    ) -> Result<Self> {
        ensure!(
            head_dim.is_multiple_of(2) && head_dim > 0,
            KernelError::invalid("rope", format!("head_dim must be even, got {head_dim}"))
        );
        ensure!(
            theta.is_finite() && theta > 1.0,
            KernelError::invalid("rope", format!("theta must be > 1, got {theta}"))
        );
        ensure!(
            max_pos > 0,
            KernelError::invalid("rope", "max_pos must be > 0")
        );
        let half = head_dim / 2;
        let mut cos = Vec::with_capacity(max_pos * half);
        let mut sin = Vec::with_capacity(max_pos * half);
        for p in 0..max_pos {
            for i in 0..half {
                let a = (p as f32 * inv_freq(theta, i, head_dim)) as f64;
                cos.push(a.cos() as f32);
                sin.push(a.sin() as f32);
            }
        }
        Ok(Self {
            cos: DeviceTensor::from_slice(client, &cos, &[max_pos, half])?,
            sin: DeviceTensor::from_slice(client, &sin, &[max_pos, half])?,
            head_dim,
            max_pos,
        })
    }
}

/// Rotates `x` ([tokens, heads·head_dim]) in place; token `t` is at `positions[t]`.
/// `max_position` is the largest value in `positions` (checked on the host by the caller that
/// made them; passed so a bad position is an error, not an out-of-bounds read).
pub fn rope<R: Runtime, F: Float + CubeElement>(
    client: &ComputeClient<R>,
    x: &DeviceTensor<R, F>,
    positions: &DeviceTensor<R, u32>,
    max_position: usize,
    tables: &RopeTables<R>,
) -> Result<()> {
    launch_rope(
        client,
        x,
        None,
        positions,
        max_position,
        tables,
        None,
        false,
    )
}

/// [`rope`] of q and k (the same tokens; any head counts) in one launch.
pub fn rope_qk<R: Runtime, F: Float + CubeElement>(
    client: &ComputeClient<R>,
    q: &DeviceTensor<R, F>,
    k: &DeviceTensor<R, F>,
    positions: &DeviceTensor<R, u32>,
    max_position: usize,
    tables: &RopeTables<R>,
) -> Result<()> {
    launch_rope(
        client,
        q,
        Some(k),
        positions,
        max_position,
        tables,
        None,
        false,
    )
}

/// What [`rope_qk_append`] writes into a KV cache: v (k's shape) and k rotated, at positions
/// `start..start + tokens` of `cache`.
pub struct Append<'a, R: Runtime, F: CubeElement> {
    pub v: &'a DeviceTensor<R, F>,
    pub cache: &'a KvCache<R, F>,
    pub start: usize,
}

/// [`rope_qk`], and the rotated k and `append.v` written into `append.cache` at positions
/// `append.start..` in the same launch (what [`KvCache::append`] does), as a layer needs: q and
/// k stay rotated in place.
pub fn rope_qk_append<R: Runtime, F: Float + CubeElement>(
    client: &ComputeClient<R>,
    q: &DeviceTensor<R, F>,
    k: &DeviceTensor<R, F>,
    positions: &DeviceTensor<R, u32>,
    max_position: usize,
    tables: &RopeTables<R>,
    append: Append<'_, R, F>,
) -> Result<()> {
    launch_rope(
        client,
        q,
        Some(k),
        positions,
        max_position,
        tables,
        Some(append),
        false,
    )
}

/// [`rope_qk_append`], or with `adjacent_pairs` the wrong (GPT-J) pairing: a fault the parity
/// tracer's tests inject on purpose (feature `faults`).
#[cfg(feature = "faults")]
#[allow(clippy::too_many_arguments)]
pub fn rope_qk_append_with_fault<R: Runtime, F: Float + CubeElement>(
    client: &ComputeClient<R>,
    q: &DeviceTensor<R, F>,
    k: &DeviceTensor<R, F>,
    positions: &DeviceTensor<R, u32>,
    max_position: usize,
    tables: &RopeTables<R>,
    append: Append<'_, R, F>,
    adjacent_pairs: bool,
) -> Result<()> {
    let append = Some(append);
    launch_rope(
        client,
        q,
        Some(k),
        positions,
        max_position,
        tables,
        append,
        adjacent_pairs,
    )
}

/// Rotates `q` and, when given, `k` (both [tokens, heads·head_dim], their own head counts),
/// and with `append` (k given) writes k and v into the cache.
#[allow(clippy::too_many_arguments)]
fn launch_rope<R: Runtime, F: Float + CubeElement>(
    client: &ComputeClient<R>,
    q: &DeviceTensor<R, F>,
    k: Option<&DeviceTensor<R, F>>,
    positions: &DeviceTensor<R, u32>,
    max_position: usize,
    tables: &RopeTables<R>,
    append: Option<Append<'_, R, F>>,
    adjacent_pairs: bool,
) -> Result<()> {
    let hd = tables.head_dim;
    let heads_of = |name: &'static str, x: &DeviceTensor<R, F>| -> Result<(usize, usize)> {
        ensure!(
            x.shape.len() == 2 && x.shape[1].is_multiple_of(hd),
            KernelError::shape("rope", name, format!("[tokens, heads·{hd}]"), &x.shape)
        );
        Ok((x.shape[0], x.shape[1] / hd))
    };
    let (tokens, q_heads) = heads_of("q", q)?;
    let k_heads = match k {
        Some(k) => {
            let (k_tokens, heads) = heads_of("k", k)?;
            ensure!(
                k_tokens == tokens,
                KernelError::shape("rope", "k", format!("[{tokens}, heads·{hd}]"), &k.shape)
            );
            heads
        }
        None => 0,
    };
    ensure!(
        positions.shape == [tokens],
        KernelError::shape("rope", "positions", format!("[{tokens}]"), &positions.shape)
    );
    ensure!(
        max_position < tables.max_pos,
        KernelError::PastRopeTables {
            position: max_position,
            table: tables.max_pos
        }
    );
    let half = hd / 2;
    let q_pairs = tokens * q_heads * half;
    let total = q_pairs + tokens * k_heads * half;
    // Without k, a one-element stand-in that no unit reaches (units past q's pairs stop at
    // `total`); separate buffers, since the same one may not be bound twice for writing.
    let stand_in;
    let k = match k {
        Some(k) => k,
        None => {
            stand_in = DeviceTensor::<R, F>::empty(client, &[1])?;
            &stand_in
        }
    };
    let (v, k_cache, v_cache, max_ctx, start, stand_ins);
    match &append {
        Some(a) => {
            let c = a.cache;
            ensure!(
                k_heads == c.n_kv && c.head_dim == hd,
                KernelError::shape(
                    "rope + kv append",
                    "k",
                    format!("[tokens, {}]", c.n_kv * c.head_dim),
                    &k.shape
                )
            );
            crate::error::same_shape("rope + kv append", ("v", &a.v.shape), ("k", &k.shape))?;
            ensure!(
                a.start + tokens <= c.max_ctx,
                KernelError::PastCache {
                    op: "rope + kv append",
                    start: a.start,
                    end: a.start + tokens,
                    capacity: c.max_ctx
                }
            );
            (v, k_cache, v_cache) = (a.v.arg(), c.k.arg(), c.v.arg());
            (max_ctx, start) = (c.max_ctx, a.start);
        }
        None => {
            // Never read or written (`append` is false): v as 4 bytes of the (read-only)
            // tables, the caches as two one-element buffers.
            stand_ins = [
                DeviceTensor::<R, F>::empty(client, &[1])?,
                DeviceTensor::<R, F>::empty(client, &[1])?,
            ];
            // SAFETY: one element of the cos table's buffer, which holds at least 4 bytes.
            v = unsafe { ArrayArg::from_raw_parts(tables.cos.handle.clone(), 1) };
            (k_cache, v_cache) = (stand_ins[0].arg(), stand_ins[1].arg());
            (max_ctx, start) = (1, 0);
        }
    }
    let (cubes, dim) = grid::elementwise(client, total);
    rope_kernel::launch::<F, R>(
        client,
        cubes,
        dim,
        q.arg(),
        k.arg(),
        v,
        positions.arg(),
        tables.cos.arg(),
        tables.sin.arg(),
        k_cache,
        v_cache,
        q_heads,
        k_heads.max(1),
        half,
        q_pairs,
        total,
        max_ctx,
        start,
        adjacent_pairs,
        append.is_some(),
    );
    Ok(())
}

/// f64 reference: rotates `x` (`[tokens][heads·hd]`) with angles formed as in [`RopeTables`].
pub fn reference(x: &[f64], positions: &[usize], head_dim: usize, theta: f32) -> Vec<f64> {
    let half = head_dim / 2;
    let width = x.len() / positions.len();
    let mut out = x.to_vec();
    for (t, &p) in positions.iter().enumerate() {
        for h in 0..width / head_dim {
            let base = t * width + h * head_dim;
            for i in 0..half {
                let a = (p as f32 * inv_freq(theta, i, head_dim)) as f64;
                let (s, c) = a.sin_cos();
                let (x0, x1) = (x[base + i], x[base + i + half]);
                out[base + i] = x0 * c - x1 * s;
                out[base + i + half] = x1 * c + x0 * s;
            }
        }
    }
    out
}
