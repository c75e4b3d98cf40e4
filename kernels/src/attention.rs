//! Attention with grouped-query heads over a KV cache, and the cache append.
//!
//! Layouts: q [tokens, n_heads·hd] (after RoPE); per layer the cache holds k and v as
//! [n_kv, max_ctx, hd] (f16), so one head's positions are contiguous for decode.
//! Query head `h` reads kv head `h / (n_heads / n_kv)`. Query token `t` sits at absolute
//! position `start + t` and sees cache positions `0..=start + t` (causal, with a cache offset,
//! so chunked prefill and decode are the same call).
//!
//! One algorithm serves prefill and decode (flash-decoding): the key range is split into
//! chunks of [`CHUNK`] positions; a cube takes (chunk, head, token), computes its scores in
//! shared memory, their max and exp-sum in f32 and the unnormalised `Σ exp(s - max)·v`; a
//! second kernel merges the chunks with the online-softmax rule. Long contexts thus spread over
//! many cubes, and no [tokens × positions] matrix is ever stored.

use anyhow::{ensure, Result};
use cubecl::prelude::*;
use cubecl::server::CubeCountSelection;

use crate::error::same_shape;
use crate::reduce::{reduce_max, reduce_sum, Reduction};
use crate::{grid, DeviceTensor, KernelError};

/// Key positions per cube.
pub const CHUNK: usize = 256;
/// Threads per cube of the chunk kernel (a power of two, as the reduction needs).
const THREADS: usize = 128;
/// Threads per cube of the combine kernel (one cube per query token and head).
const COMBINE_THREADS: usize = 64;
/// Largest head_dim: the query row is staged in shared memory.
const MAX_HEAD_DIM: usize = 256;

/// Writes the new k and v rows (`[tokens, n_kv·hd]`) into the caches at positions
/// `start..start + tokens` (one launch for both).
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
fn kv_append_kernel<F: Float>(
    k_new: &Array<F>,
    v_new: &Array<F>,
    k_cache: &mut Array<F>,
    v_cache: &mut Array<F>,
    n_kv: usize,
    head_dim: usize,
    max_ctx: usize,
    start: usize,
    total: usize,
) {
    let idx = ABSOLUTE_POS;
    if idx < total {
        // new is [tokens, n_kv, hd]
        let d = idx % head_dim;
        let g = (idx / head_dim) % n_kv;
        let t = idx / (head_dim * n_kv);
        let at = (g * max_ctx + start + t) * head_dim + d;
        k_cache[at] = k_new[idx];
        v_cache[at] = v_new[idx];
    }
}

/// One cube per (key chunk, query head, query token). Writes, for its part
/// `(token, head, chunk)`, the chunk's largest score, `Σ exp(score − max)` and the
/// unnormalised output `Σ exp(score − max)·v`.
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
fn attention_chunk_kernel<F: Float>(
    q: &Array<F>,
    k_cache: &Array<F>,
    v_cache: &Array<F>,
    part_out: &mut Array<f32>,
    part_max: &mut Array<f32>,
    part_sum: &mut Array<f32>,
    n_heads: usize,
    group: usize,
    max_ctx: usize,
    start: usize,
    scale: f32,
    #[comptime] head_dim: usize,
    #[comptime] chunk_len: usize,
    #[comptime] over_cube: Reduction,
    #[comptime] wrong_gqa: bool,
    #[comptime] no_causal_mask: bool,
) {
    let chunk = CUBE_POS_X as usize;
    let h = CUBE_POS_Y as usize;
    let t = CUBE_POS_Z as usize;
    let chunks = CUBE_COUNT_X as usize;
    let tid = UNIT_POS as usize;
    let threads = over_cube.units;
    // Fault injection for the tracer's tests: interleaved instead of grouped heads.
    let g = if comptime!(wrong_gqa) {
        h % (n_heads / group)
    } else {
        h / group
    };

    let mut q_s = SharedMemory::<f32>::new(head_dim);
    let mut scores = SharedMemory::<f32>::new(chunk_len);

    let mut d = tid;
    while d < head_dim {
        q_s[d] = f32::cast_from(q[(t * n_heads + h) * head_dim + d]) * scale;
        d += threads;
    }
    sync_cube();

    // This chunk holds positions first..first + chunk_len; the query sees 0..=start + t (with
    // the `no_causal_mask` fault: every position of the call, 0..start + tokens).
    let first = chunk * chunk_len;
    let mut last = start + t;
    if comptime!(no_causal_mask) {
        last = start + CUBE_COUNT_Z as usize - 1;
    }
    let visible_end = max(min(last + 1, first + chunk_len), first);
    let n_visible = visible_end - first;
    let kv_base = g * max_ctx;

    // Scores of this chunk's visible positions, and their max.
    let mut local_max = f32::new(-1.0e30);
    let mut pos = tid;
    while pos < n_visible {
        let row = (kv_base + first + pos) * head_dim;
        let mut s = 0.0f32;
        #[unroll]
        for e in 0..head_dim {
            s += q_s[e] * f32::cast_from(k_cache[row + e]);
        }
        scores[pos] = s;
        local_max = f32::max(local_max, s);
        pos += threads;
    }
    let chunk_max = reduce_max::<f32>(local_max, over_cube);

    // Scores become exp(score − max); their sum.
    let mut local_sum = 0.0f32;
    pos = tid;
    while pos < n_visible {
        let e = f32::exp(scores[pos] - chunk_max);
        scores[pos] = e;
        local_sum += e;
        pos += threads;
    }
    // The reduction ends with a cube barrier: every thread's exp-scores are visible below.
    let chunk_sum = reduce_sum::<f32>(local_sum, over_cube);

    // Unnormalised output: each thread owns dimensions tid, tid + threads, ...
    let part = (t * n_heads + h) * chunks + chunk;
    let mut dim = tid;
    while dim < head_dim {
        let mut acc = 0.0f32;
        let mut key = 0usize;
        while key < n_visible {
            acc += scores[key] * f32::cast_from(v_cache[(kv_base + first + key) * head_dim + dim]);
            key += 1;
        }
        part_out[part * head_dim + dim] = acc;
        dim += threads;
    }
    if tid == 0 {
        part_max[part] = chunk_max;
        part_sum[part] = chunk_sum;
    }
}

/// The online-softmax rule for parts of one softmax (chunks of keys, planes of a cube), each
/// with its max `m` and sum `l` of `exp(score − m)` and its unnormalised output: the overall
/// max `mx` is the largest `m` of the parts that saw a key ([`parts_max`] folds one part in),
/// and a part counts with weight `exp(m − mx)`, 0 where it saw none (`l` = 0; its output is 0).
/// The result: `Σ w·out / Σ w·l`. Used by [`attention_combine_kernel`], the decode attention
/// kernel (its planes) and its merge kernel (`decode.rs`).
#[cube]
pub(crate) fn part_weight(m: f32, l: f32, mx: f32) -> f32 {
    let mut w = 0.0f32;
    if l > 0.0 {
        w = f32::exp(m - mx);
    }
    w
}

/// `mx` raised to the part's max `m` where the part saw a key (`l` > 0): see [`part_weight`].
#[cube]
pub(crate) fn parts_max(mx: f32, m: f32, l: f32) -> f32 {
    let mut r = mx;
    if l > 0.0 {
        r = f32::max(mx, m);
    }
    r
}

/// One cube per (query token, head): merges its chunks' parts with the online-softmax rule
/// ([`part_weight`]).
#[cube(launch)]
fn attention_combine_kernel<F: Float>(
    part_out: &Array<f32>,
    part_max: &Array<f32>,
    part_sum: &Array<f32>,
    out: &mut Array<F>,
    chunks: usize,
    token_heads: usize,
    #[comptime] head_dim: usize,
    #[comptime] threads: usize,
) {
    let th = CUBE_POS;
    if th < token_heads {
        let tid = UNIT_POS as usize;
        let base = th * chunks;
        let mut mx = f32::new(-1.0e30);
        for c in 0..chunks {
            mx = parts_max(mx, part_max[base + c], part_sum[base + c]);
        }
        let mut denom = 0.0f32;
        for c in 0..chunks {
            let l = part_sum[base + c];
            denom += part_weight(part_max[base + c], l, mx) * l;
        }
        let mut d = tid;
        while d < head_dim {
            let mut acc = 0.0f32;
            for c in 0..chunks {
                let w = part_weight(part_max[base + c], part_sum[base + c], mx);
                acc += w * part_out[(base + c) * head_dim + d];
            }
            out[th * head_dim + d] = F::cast_from(acc / denom);
            d += threads;
        }
    }
}

/// One layer's KV cache: k and v as [n_kv, max_ctx, head_dim].
pub struct KvCache<R: Runtime, F: CubeElement> {
    pub k: DeviceTensor<R, F>,
    pub v: DeviceTensor<R, F>,
    pub n_kv: usize,
    pub max_ctx: usize,
    pub head_dim: usize,
}

impl<R: Runtime, F: Float + CubeElement> KvCache<R, F> {
    pub fn new(
        client: &ComputeClient<R>,
        n_kv: usize,
        max_ctx: usize,
        head_dim: usize,
    ) -> Result<Self> {
        let shape = [n_kv, max_ctx, head_dim];
        Ok(Self {
            k: DeviceTensor::empty(client, &shape)?,
            v: DeviceTensor::empty(client, &shape)?,
            n_kv,
            max_ctx,
            head_dim,
        })
    }

    /// Writes `k`, `v` ([tokens, n_kv·hd]) at positions `start..start + tokens`.
    pub fn append(
        &self,
        client: &ComputeClient<R>,
        k: &DeviceTensor<R, F>,
        v: &DeviceTensor<R, F>,
        start: usize,
    ) -> Result<()> {
        let width = self.n_kv * self.head_dim;
        ensure!(
            k.shape.len() == 2 && k.shape[1] == width,
            KernelError::shape("kv append", "k", format!("[tokens, {width}]"), &k.shape)
        );
        same_shape("kv append", ("v", &v.shape), ("k", &k.shape))?;
        let tokens = k.shape[0];
        ensure!(
            start + tokens <= self.max_ctx,
            KernelError::PastCache {
                op: "kv append",
                start,
                end: start + tokens,
                capacity: self.max_ctx
            }
        );
        let total = tokens * width;
        let (cubes, dim) = grid::elementwise(client, total);
        kv_append_kernel::launch::<F, R>(
            client,
            cubes,
            dim,
            k.arg(),
            v.arg(),
            self.k.arg(),
            self.v.arg(),
            self.n_kv,
            self.head_dim,
            self.max_ctx,
            start,
            total,
        );
        Ok(())
    }
}

/// `out = softmax(q·Kᵀ/sqrt(hd) + causal) · V` for query tokens at positions `start..start + tokens`,
/// against cache positions `0..=start + t`. q and out are [tokens, n_heads·hd].
pub fn attention<R: Runtime, F: Float + CubeElement>(
    client: &ComputeClient<R>,
    q: &DeviceTensor<R, F>,
    cache: &KvCache<R, F>,
    n_heads: usize,
    start: usize,
    out: &DeviceTensor<R, F>,
) -> Result<()> {
    launch_attention(client, q, cache, n_heads, start, out, [false; 3])
}

/// Bugs [`attention_with_fault`] commits on purpose, so the parity tracer's tests can prove
/// they are found (feature `faults`; all off by default).
#[cfg(feature = "faults")]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AttentionFault {
    /// Query head `h` reads kv head `h % n_kv` instead of `h / (n_heads / n_kv)`.
    pub wrong_gqa: bool,
    /// Every query sees every position of the call (no causal mask within it).
    pub no_causal_mask: bool,
    /// Scores scaled by 1/hd instead of 1/sqrt(hd).
    pub scale_one_over_hd: bool,
}

/// [`attention`] with the bugs of `fault` (feature `faults`).
#[cfg(feature = "faults")]
pub fn attention_with_fault<R: Runtime, F: Float + CubeElement>(
    client: &ComputeClient<R>,
    q: &DeviceTensor<R, F>,
    cache: &KvCache<R, F>,
    n_heads: usize,
    start: usize,
    out: &DeviceTensor<R, F>,
    fault: AttentionFault,
) -> Result<()> {
    let f = [
        fault.wrong_gqa,
        fault.no_causal_mask,
        fault.scale_one_over_hd,
    ];
    launch_attention(client, q, cache, n_heads, start, out, f)
}

/// The launch behind both; the last argument is `[wrong_gqa, no_causal_mask,
/// scale_one_over_hd]` (see `AttentionFault`), all false except in the tracer's tests.
fn launch_attention<R: Runtime, F: Float + CubeElement>(
    client: &ComputeClient<R>,
    q: &DeviceTensor<R, F>,
    cache: &KvCache<R, F>,
    n_heads: usize,
    start: usize,
    out: &DeviceTensor<R, F>,
    [wrong_gqa, no_causal_mask, scale_one_over_hd]: [bool; 3],
) -> Result<()> {
    let hd = cache.head_dim;
    ensure!(
        q.shape.len() == 2 && q.shape[1] == n_heads * hd,
        KernelError::shape(
            "attention",
            "q",
            format!("[tokens, {}]", n_heads * hd),
            &q.shape
        )
    );
    same_shape("attention", ("out", &out.shape), ("q", &q.shape))?;
    ensure!(
        n_heads.is_multiple_of(cache.n_kv),
        KernelError::invalid(
            "attention",
            format!("{n_heads} query heads cannot share {} kv heads", cache.n_kv)
        )
    );
    ensure!(
        hd <= MAX_HEAD_DIM && hd.is_multiple_of(2),
        KernelError::unsupported(
            "attention",
            format!("head_dim {hd} (even, at most {MAX_HEAD_DIM})")
        )
    );
    let tokens = q.shape[0];
    let kv_len = start + tokens;
    ensure!(
        kv_len <= cache.max_ctx,
        KernelError::PastCache {
            op: "attention",
            start,
            end: kv_len,
            capacity: cache.max_ctx
        }
    );
    let chunks = kv_len.div_ceil(CHUNK);
    let (_, max_y, max_z) = client.properties().hardware.max_cube_count;
    ensure!(
        n_heads <= max_y as usize && tokens <= max_z as usize,
        KernelError::unsupported(
            "attention",
            format!("{tokens} tokens × {n_heads} heads is more than one launch allows")
        )
    );
    let parts = tokens * n_heads * chunks;
    let part_out = DeviceTensor::<R, f32>::empty(client, &[parts, hd])?;
    let part_max = DeviceTensor::<R, f32>::empty(client, &[parts])?;
    let part_sum = DeviceTensor::<R, f32>::empty(client, &[parts])?;
    attention_chunk_kernel::launch::<F, R>(
        client,
        CubeCount::new_3d(chunks as u32, n_heads as u32, tokens as u32),
        CubeDim::new_1d(THREADS as u32),
        q.arg(),
        cache.k.arg(),
        cache.v.arg(),
        part_out.arg(),
        part_max.arg(),
        part_sum.arg(),
        n_heads,
        n_heads / cache.n_kv,
        cache.max_ctx,
        start,
        if scale_one_over_hd {
            1.0 / hd as f32
        } else {
            1.0 / (hd as f32).sqrt()
        },
        hd,
        CHUNK,
        Reduction::cube(client, THREADS),
        wrong_gqa,
        no_causal_mask,
    );
    combine_parts(
        client,
        &part_out,
        &part_max,
        &part_sum,
        out,
        chunks,
        tokens * n_heads,
        hd,
    )
}

/// Merges the `parts` parts of each (token, head) row with the online-softmax rule
/// ([`part_weight`]) into `out` (`[tokens, n_heads·hd]`): part `c` of row `th` (that is
/// `token·n_heads + head`) at index `th·parts + c` of `part_max` and `part_sum`, and of
/// `part_out` (`hd` each). The chunked attention's chunks and the flash kernel's key splits.
#[allow(clippy::too_many_arguments)]
pub(crate) fn combine_parts<R: Runtime, F: Float + CubeElement>(
    client: &ComputeClient<R>,
    part_out: &DeviceTensor<R, f32>,
    part_max: &DeviceTensor<R, f32>,
    part_sum: &DeviceTensor<R, f32>,
    out: &DeviceTensor<R, F>,
    parts: usize,
    token_heads: usize,
    hd: usize,
) -> Result<()> {
    ensure!(
        part_max.len() == token_heads * parts
            && part_sum.len() == token_heads * parts
            && part_out.len() == token_heads * parts * hd
            && out.len() == token_heads * hd,
        KernelError::invalid("attention combine", "part buffers of the wrong size")
    );
    attention_combine_kernel::launch::<F, R>(
        client,
        CubeCountSelection::new(client, token_heads as u32).cube_count(),
        CubeDim::new_1d(COMBINE_THREADS as u32),
        part_out.arg(),
        part_max.arg(),
        part_sum.arg(),
        out.arg(),
        parts,
        token_heads,
        hd,
        COMBINE_THREADS,
    );
    Ok(())
}

/// f64 reference. `q`: `[tokens][n_heads·hd]`; `k`, `v`: `[kv_len][n_kv·hd]` (all positions so
/// far, token-major as the projections produce them). Query `t` is at position `start + t`.
pub fn reference(
    q: &[f64],
    k: &[f64],
    v: &[f64],
    n_heads: usize,
    n_kv: usize,
    head_dim: usize,
    start: usize,
) -> Vec<f64> {
    let qw = n_heads * head_dim;
    let kw = n_kv * head_dim;
    let tokens = q.len() / qw;
    let scale = 1.0 / (head_dim as f64).sqrt();
    let mut out = vec![0.0; q.len()];
    for t in 0..tokens {
        let last = start + t;
        for h in 0..n_heads {
            let g = h / (n_heads / n_kv);
            let qh = &q[t * qw + h * head_dim..][..head_dim];
            let scores: Vec<f64> = (0..=last)
                .map(|j| {
                    let kj = &k[j * kw + g * head_dim..][..head_dim];
                    qh.iter().zip(kj).map(|(a, b)| a * b).sum::<f64>() * scale
                })
                .collect();
            let m = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let e: Vec<f64> = scores.iter().map(|s| (s - m).exp()).collect();
            let sum: f64 = e.iter().sum();
            for d in 0..head_dim {
                out[t * qw + h * head_dim + d] = (0..=last)
                    .map(|j| e[j] * v[j * kw + g * head_dim + d])
                    .sum::<f64>()
                    / sum;
            }
        }
    }
    out
}
