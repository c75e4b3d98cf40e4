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
//! shared memory, their max and exp-sum in f32 and the unnormalised `Σ exp(s - m)·v`; a second
//! kernel merges the chunks with the online-softmax rule. Long contexts thus spread over many
//! cubes, and no [tokens × positions] matrix is ever stored.

use anyhow::{ensure, Result};
use cubecl::prelude::*;

use crate::DeviceTensor;

/// Key positions per cube.
pub const CHUNK: usize = 256;
/// Threads per cube.
const THREADS: usize = 128;

#[cube(launch)]
fn kv_append_kernel<F: Float>(
    new: &Array<F>,
    cache: &mut Array<F>,
    n_kv: usize,
    head_dim: usize,
    max_ctx: usize,
    start: usize,
    total: usize,
) {
    let idx = (CUBE_POS_Y as usize * CUBE_COUNT_X as usize + CUBE_POS_X as usize) * 256
        + UNIT_POS as usize;
    if idx < total {
        // new is [tokens, n_kv, hd]
        let d = idx % head_dim;
        let g = (idx / head_dim) % n_kv;
        let t = idx / (head_dim * n_kv);
        cache[(g * max_ctx + start + t) * head_dim + d] = new[idx];
    }
}

#[cube(launch)]
#[allow(clippy::too_many_arguments)]
fn attention_chunk_kernel<F: Float>(
    q: &Array<F>,
    k_cache: &Array<F>,
    v_cache: &Array<F>,
    part_o: &mut Array<f32>,
    part_ml: &mut Array<f32>,
    n_heads: usize,
    group: usize,
    max_ctx: usize,
    start: usize,
    scale: f32,
    #[comptime] head_dim: usize,
    #[comptime] wrong_gqa: bool,
    #[comptime] no_causal_mask: bool,
) {
    let chunk = CUBE_POS_X as usize;
    let h = CUBE_POS_Y as usize;
    let t = CUBE_POS_Z as usize;
    let chunks = CUBE_COUNT_X as usize;
    let tid = UNIT_POS as usize;
    // Fault injection for the tracer's tests: interleaved instead of grouped heads.
    let g = if comptime!(wrong_gqa) {
        h % (n_heads / group)
    } else {
        h / group
    };

    let mut q_s = SharedMemory::<f32>::new(head_dim);
    let mut scores = SharedMemory::<f32>::new(256usize);
    let mut red = SharedMemory::<f32>::new(128usize);

    let mut d = tid;
    while d < head_dim {
        q_s[d] = f32::cast_from(q[(t * n_heads + h) * head_dim + d]) * scale;
        d += 128;
    }
    sync_cube();

    // This chunk holds positions j0..j0 + 256; the query sees 0..=start + t (with the
    // `no_causal_mask` fault: every position of the call, 0..start + tokens).
    let j0 = chunk * 256;
    let mut last = start + t;
    if comptime!(no_causal_mask) {
        last = start + CUBE_COUNT_Z as usize - 1;
    }
    let visible_end = max(min(last + 1, j0 + 256), j0);
    let n_valid = visible_end - j0;

    // Scores of this chunk's positions.
    let kbase = g * max_ctx;
    let mut local_max = f32::new(-1.0e30);
    let mut j = tid;
    while j < n_valid {
        let row = (kbase + j0 + j) * head_dim;
        let mut s = 0.0f32;
        #[unroll]
        for e in 0..head_dim {
            s += q_s[e] * f32::cast_from(k_cache[row + e]);
        }
        scores[j] = s;
        local_max = f32::max(local_max, s);
        j += 128;
    }
    red[tid] = local_max;
    sync_cube();
    let mut stride = CUBE_DIM as usize / 2;
    while stride > 0 {
        if tid < stride {
            red[tid] = f32::max(red[tid], red[tid + stride]);
        }
        sync_cube();
        stride /= 2;
    }
    let m = red[0];
    sync_cube();

    let mut local_sum = 0.0f32;
    let mut j2 = tid;
    while j2 < n_valid {
        let e = f32::exp(scores[j2] - m);
        scores[j2] = e;
        local_sum += e;
        j2 += 128;
    }
    red[tid] = local_sum;
    sync_cube();
    let mut stride2 = CUBE_DIM as usize / 2;
    while stride2 > 0 {
        if tid < stride2 {
            red[tid] = red[tid] + red[tid + stride2];
        }
        sync_cube();
        stride2 /= 2;
    }
    let l = red[0];

    // Unnormalised output: each thread owns dimensions tid, tid + 128, ...
    let part = (t * n_heads + h) * chunks + chunk;
    let mut dd = tid;
    while dd < head_dim {
        let mut acc = 0.0f32;
        let mut jj = 0usize;
        while jj < n_valid {
            acc += scores[jj] * f32::cast_from(v_cache[(kbase + j0 + jj) * head_dim + dd]);
            jj += 1;
        }
        part_o[part * head_dim + dd] = acc;
        dd += 128;
    }
    if tid == 0 {
        part_ml[part * 2] = m;
        part_ml[part * 2 + 1] = l;
    }
}

#[cube(launch)]
fn attention_combine_kernel<F: Float>(
    part_o: &Array<f32>,
    part_ml: &Array<f32>,
    out: &mut Array<F>,
    chunks: usize,
    #[comptime] head_dim: usize,
) {
    // One cube per (token, head) = CUBE_POS_X + CUBE_POS_Y * CUBE_COUNT_X; threads over dims.
    let th = CUBE_POS_Y as usize * CUBE_COUNT_X as usize + CUBE_POS_X as usize;
    let tid = UNIT_POS as usize;
    let base = th * chunks;
    let mut mx = f32::new(-1.0e30);
    for c in 0..chunks {
        if part_ml[(base + c) * 2 + 1] > 0.0 && part_ml[(base + c) * 2] > mx {
            mx = part_ml[(base + c) * 2];
        }
    }
    let mut denom = 0.0f32;
    for c in 0..chunks {
        let l = part_ml[(base + c) * 2 + 1];
        if l > 0.0 {
            denom += f32::exp(part_ml[(base + c) * 2] - mx) * l;
        }
    }
    let mut d = tid;
    while d < head_dim {
        let mut acc = 0.0f32;
        for c in 0..chunks {
            if part_ml[(base + c) * 2 + 1] > 0.0 {
                acc += f32::exp(part_ml[(base + c) * 2] - mx) * part_o[(base + c) * head_dim + d];
            }
        }
        out[th * head_dim + d] = F::cast_from(acc / denom);
        d += 64;
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
            k.shape.len() == 2 && k.shape[1] == width && v.shape == k.shape,
            "kv append: k {:?} and v {:?} must both be [tokens, {width}]",
            k.shape,
            v.shape
        );
        let tokens = k.shape[0];
        ensure!(
            start + tokens <= self.max_ctx,
            "kv append: positions {start}..{} exceed the cache of {} positions",
            start + tokens,
            self.max_ctx
        );
        let total = tokens * width;
        let count = crate::grid::cube_count_1d(total.div_ceil(256), 1)?;
        for (new, cache) in [(k, &self.k), (v, &self.v)] {
            kv_append_kernel::launch::<F, R>(
                client,
                count.clone(),
                CubeDim::new_1d(256),
                new.arg(),
                cache.arg(),
                self.n_kv,
                self.head_dim,
                self.max_ctx,
                start,
                total,
            );
        }
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
        "attention: q must be [tokens, {}], got {:?}",
        n_heads * hd,
        q.shape
    );
    ensure!(
        out.shape == q.shape,
        "attention: out {:?} differs from q {:?}",
        out.shape,
        q.shape
    );
    ensure!(
        n_heads.is_multiple_of(cache.n_kv),
        "attention: {n_heads} query heads cannot share {} kv heads",
        cache.n_kv
    );
    ensure!(
        hd <= 256 && hd.is_multiple_of(2),
        "attention: head_dim {hd} unsupported (even, at most 256)"
    );
    let tokens = q.shape[0];
    let kv_len = start + tokens;
    ensure!(
        kv_len <= cache.max_ctx,
        "attention: positions up to {kv_len} exceed the cache of {} positions",
        cache.max_ctx
    );
    ensure!(
        tokens <= 65535 && n_heads <= 65535,
        "attention: too many tokens or heads for one launch"
    );
    let chunks = kv_len.div_ceil(CHUNK);
    let parts = tokens * n_heads * chunks;
    let part_o = DeviceTensor::<R, f32>::empty(client, &[parts, hd])?;
    let part_ml = DeviceTensor::<R, f32>::empty(client, &[parts, 2])?;
    attention_chunk_kernel::launch::<F, R>(
        client,
        CubeCount::Static(chunks as u32, n_heads as u32, tokens as u32),
        CubeDim::new_1d(THREADS as u32),
        q.arg(),
        cache.k.arg(),
        cache.v.arg(),
        part_o.arg(),
        part_ml.arg(),
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
        wrong_gqa,
        no_causal_mask,
    );
    attention_combine_kernel::launch::<F, R>(
        client,
        crate::grid::cube_count_1d(tokens * n_heads, 1)?,
        CubeDim::new_1d(64),
        part_o.arg(),
        part_ml.arg(),
        out.arg(),
        chunks,
        hd,
    );
    Ok(())
}

/// f64 reference. `q`: [tokens][n_heads·hd]; `k`, `v`: [kv_len][n_kv·hd] (all positions so far,
/// token-major as the projections produce them). Query `t` is at position `start + t`.
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
