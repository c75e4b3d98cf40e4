//! The fused decode-step kernels against their f64 references at Qwen shapes (0.5B; the 1.5B
//! head_dim of 128 with `CUBEQWEN_FULL_SHAPES=1`): poisoned outputs and caches, positions in
//! one and in several attention chunks, lm_head ties, NaN logits and weight chunks.
#![allow(clippy::neg_cmp_op_on_partial_ord)] // `!(x <= tol)`: NaN must fail

use anyhow::{ensure, Result};
use cubecl::prelude::*;
use cubeqwen_kernels::attention::KvCache;
use cubeqwen_kernels::decode::*;
use cubeqwen_kernels::matmul::RowChunked;
use cubeqwen_kernels::rope::RopeTables;
use cubeqwen_kernels::runtime::RuntimeJob;
use cubeqwen_kernels::select::top_k_reference;
use cubeqwen_kernels::testing::*;
use cubeqwen_kernels::DeviceTensor;
use half::f16;

/// Outputs rounded to f16 (≈ 2.8e-4 relative) from f16-rounded inputs: 2e-3 leaves room for
/// the f32 sums, yet a wrong row, bias, pair or position gives > 1e-1.
const TOL_F16: f64 = 2e-3;
/// f32 outputs of f16 inputs, f32 sums: only summation order differs from f64.
const TOL_F32: f64 = 1e-5;
/// Attention with f16 output; a wrong kv head, scale or mask gives > 1e-1 (as attention.rs).
const TOL_ATT: f64 = 3e-3;

struct Shape {
    d: usize,
    ffn: usize,
    n_heads: usize,
    n_kv: usize,
    hd: usize,
    vocab: usize,
}

const QWEN_05B: Shape = Shape {
    d: 896,
    ffn: 4864,
    n_heads: 14,
    n_kv: 2,
    hd: 64,
    vocab: 151936,
};
/// The heads of the random `tiny` model (`cubeqwen bench --random tiny`): head dimension 16,
/// below a plane's 32 lanes (its vocabulary is 256; 1000 here for the lm_head tie at id 777).
const TINY: Shape = Shape {
    d: 64,
    ffn: 128,
    n_heads: 4,
    n_kv: 2,
    hd: 16,
    vocab: 1000,
};
const QWEN_15B: Shape = Shape {
    d: 1536,
    ffn: 8960,
    n_heads: 12,
    n_kv: 2,
    hd: 128,
    vocab: 151936,
};

fn check(what: &str, err: f64, tol: f64, seed: u64) -> Result<()> {
    println!("{what}: rel_err {err:.3e} (tol {tol:.0e})");
    ensure!(
        err <= tol,
        "{what}: rel_err {err:.3e} > {tol:.0e} (seed {seed}; replay with CUBEQWEN_SEED={seed})"
    );
    Ok(())
}

fn reference_norm(x: &[f64], w: &[f64], eps: f64) -> Vec<f64> {
    cubeqwen_kernels::rmsnorm::reference(x, w, x.len(), eps)
}

fn widen(v: &[f16]) -> Vec<f64> {
    f16_to_f64(v)
}

struct Fused {
    shape: &'static Shape,
    seed: u64,
}

impl RuntimeJob for Fused {
    type Output = ();
    fn run<R: Runtime>(self, client: ComputeClient<R>, device: &str) -> Result<()> {
        let Shape {
            d,
            ffn,
            n_heads,
            n_kv,
            hd,
            vocab,
        } = *self.shape;
        let seed = self.seed;
        println!("decode kernels on {device}, d={d} heads={n_heads}/{n_kv}x{hd}, seed {seed}");
        let mut rng = Rng::new(seed);
        let (qd, kvd) = (n_heads * hd, n_kv * hd);
        let w_std = 1.0 / (d as f64).sqrt();
        let eps = 1e-6f32;
        let theta = 1_000_000f32;
        let max_ctx = 1100;
        let up = |v: &[f16], s: &[usize]| DeviceTensor::<R, f16>::from_slice(&client, v, s);
        let up32 = |v: &[f32], s: &[usize]| DeviceTensor::<R, f32>::from_slice(&client, v, s);

        // --- attn_in: norm → q/k/v + bias → RoPE → cache at pos.
        let x = rng.f32_vec(d, 0.3, 2.0);
        let norm = rng.f32_vec(d, 1.0, 0.25);
        let (wq, wk, wv) = (
            rng.f16_vec(qd * d, 0.0, w_std),
            rng.f16_vec(kvd * d, 0.0, w_std),
            rng.f16_vec(kvd * d, 0.0, w_std),
        );
        let (bq, bk, bv) = (
            rng.f32_vec(qd, 0.0, 0.5),
            rng.f32_vec(kvd, 0.0, 0.5),
            rng.f32_vec(kvd, 0.0, 0.5),
        );
        let rope = RopeTables::new(&client, theta, hd, max_ctx)?;
        let (xd, nd) = (up32(&x, &[1, d])?, up32(&norm, &[d])?);
        let (wqd, wkd, wvd) = (up(&wq, &[qd, d])?, up(&wk, &[kvd, d])?, up(&wv, &[kvd, d])?);
        let (bqd, bkd, bvd) = (up32(&bq, &[qd])?, up32(&bk, &[kvd])?, up32(&bv, &[kvd])?);
        let weights = AttnInWeights {
            norm: &nd,
            wq: &wqd,
            wk: &wkd,
            wv: &wvd,
            bq: &bqd,
            bk: &bkd,
            bv: &bvd,
        };
        // stages 0: the one-shot kernel; else streamed (attn_in_with), on every device.
        for (pos, stages) in [0usize, 37, 1023]
            .into_iter()
            .flat_map(|p| [0, 1, 2, MAX_GEMV_STAGES].map(|s| (p, s)))
        {
            let cache = KvCache::<R, f16>::new(&client, n_kv, max_ctx, hd)?;
            let poison = vec![POISON_F16; n_kv * max_ctx * hd];
            let cache = KvCache {
                k: up(&poison, &[n_kv, max_ctx, hd])?,
                v: up(&poison, &[n_kv, max_ctx, hd])?,
                ..cache
            };
            let st = DecodeState::new(&client, pos as u32, 0)?;
            let q = up(&vec![POISON_F16; qd], &[1, qd])?;
            attn_in_with(
                &client, None, &xd, &weights, &rope, &st, eps, n_heads, &q, &cache, stages,
            )?;
            let (rq, rk, rv) = reference_attn_in(
                &f32_to_f64(&x),
                &f32_to_f64(&norm),
                &widen(&wq),
                &widen(&wk),
                &widen(&wv),
                (&f32_to_f64(&bq), &f32_to_f64(&bk), &f32_to_f64(&bv)),
                eps as f64,
                hd,
                theta,
                pos,
            );
            let (kc, vc) = (cache.k.to_vec(&client)?, cache.v.to_vec(&client)?);
            // Row `pos` of every kv head, as [kvd]; the rows beside it must stay untouched.
            let row = |c: &[f16], p: usize| -> Vec<f64> {
                (0..n_kv)
                    .flat_map(|g| widen(&c[(g * max_ctx + p) * hd..][..hd]))
                    .collect()
            };
            check(
                &format!("attn_in q   pos {pos} stages {stages}"),
                rel_err(&widen(&q.to_vec(&client)?), &rq),
                TOL_F16,
                seed,
            )?;
            check(
                &format!("attn_in k   pos {pos} stages {stages}"),
                rel_err(&row(&kc, pos), &rk),
                TOL_F16,
                seed,
            )?;
            check(
                &format!("attn_in v   pos {pos} stages {stages}"),
                rel_err(&row(&vc, pos), &rv),
                TOL_F16,
                seed,
            )?;
            for p in [pos.wrapping_sub(1), pos + 1] {
                if p < max_ctx {
                    ensure!(
                        row(&kc, p).iter().chain(&row(&vc, p)).all(|v| v.is_nan()),
                        "attn_in ({stages} stages) wrote cache row {p} (only {pos} is this \
                         token's); seed {seed}"
                    );
                }
            }
        }

        {
            let (cache, st) = (
                KvCache::<R, f16>::new(&client, n_kv, max_ctx, hd)?,
                DecodeState::new(&client, 0, 0)?,
            );
            let q = up(&vec![POISON_F16; qd], &[1, qd])?;
            let too_many = attn_in_with(
                &client,
                None,
                &xd,
                &weights,
                &rope,
                &st,
                eps,
                n_heads,
                &q,
                &cache,
                MAX_GEMV_STAGES + 1,
            );
            ensure!(
                too_many
                    .as_ref()
                    .is_err_and(|e| e.to_string().contains("at most")),
                "attn_in: {} stages were not refused",
                MAX_GEMV_STAGES + 1
            );
        }

        // --- attention of one token over positions 0..=pos (one chunk, several chunks).
        // Chunks of ATT_CHUNK = 128 keys, 32 per plane: one key, part of a plane, part of a
        // cube, exactly one chunk, one key into the second, several chunks.
        for pos in [0usize, 37, 64, 127, 128, 300, 1023] {
            let keys = pos + 1;
            let q = rng.f16_vec(qd, 0.0, 1.0);
            let k = rng.f16_vec(keys * kvd, 0.0, 1.0);
            let v = rng.f16_vec(keys * kvd, 0.0, 1.0);
            let cache = KvCache::<R, f16>::new(&client, n_kv, max_ctx, hd)?;
            // Positions past `pos` hold NaN: a kernel that reads them fails.
            let nan = vec![f16::NAN; (max_ctx - keys) * kvd];
            let nan = up(&nan, &[max_ctx - keys, kvd])?;
            cache.append(&client, &nan, &nan, keys)?;
            cache.append(&client, &up(&k, &[keys, kvd])?, &up(&v, &[keys, kvd])?, 0)?;
            let st = DecodeState::new(&client, pos as u32, 0)?;
            let scratch = AttentionScratch::new(&client, n_heads, hd, max_ctx)?;
            let out = up(&vec![POISON_F16; qd], &[1, qd])?;
            attention(
                &client,
                None,
                &up(&q, &[1, qd])?,
                &cache,
                &st,
                pos,
                n_heads,
                &scratch,
                &out,
            )?;
            let want = cubeqwen_kernels::attention::reference(
                &widen(&q),
                &widen(&k),
                &widen(&v),
                n_heads,
                n_kv,
                hd,
                pos,
            );
            let got = widen(&out.to_vec(&client)?);
            check(
                &format!("attention   pos {pos}"),
                rel_err(&got, &want),
                TOL_ATT,
                seed,
            )?;
        }

        // --- ffn_in: norm → gate, up → SwiGLU.
        let (wg, wu) = (
            rng.f16_vec(ffn * d, 0.0, w_std),
            rng.f16_vec(ffn * d, 0.0, w_std),
        );
        let s = up(&vec![POISON_F16; ffn], &[1, ffn])?;
        ffn_in(
            &client,
            None,
            &xd,
            &nd,
            &up(&wg, &[ffn, d])?,
            &up(&wu, &[ffn, d])?,
            eps,
            &s,
        )?;
        let want = reference_ffn_in(
            &f32_to_f64(&x),
            &f32_to_f64(&norm),
            &widen(&wg),
            &widen(&wu),
            ffn,
            eps as f64,
        );
        check(
            "ffn_in",
            rel_err(&widen(&s.to_vec(&client)?), &want),
            TOL_F16,
            seed,
        )?;

        // --- gemv_residual: o-proj (k = d) and down (k = ffn) shapes.
        for k in [qd, ffn] {
            let w = rng.f16_vec(d * k, 0.0, 1.0 / (k as f64).sqrt());
            let a = rng.f16_vec(k, 0.0, 1.0);
            let x0 = rng.f32_vec(d, 0.0, 1.0);
            let xd = up32(&x0, &[1, d])?;
            gemv_residual(&client, None, &up(&w, &[d, k])?, &up(&a, &[1, k])?, &xd)?;
            let want = reference_gemv_residual(&widen(&w), &widen(&a), &f32_to_f64(&x0));
            check(
                &format!("gemv_residual k={k}"),
                rel_err(&f32_to_f64(&xd.to_vec(&client)?), &want),
                TOL_F32,
                seed,
            )?;
        }

        // --- embedding of the device-side token, from the second of three table chunks.
        let table = rng.f16_vec(3000 * d, 0.0, 1.0);
        let chunked = RowChunked::upload_rows(&client, &table, 3000, d, 1100)?;
        let st = DecodeState::new(&client, 0, 1500)?;
        let xe = up32(&vec![f32::NAN; d], &[1, d])?;
        embed_token(&client, None, &st.token, &chunked, &xe)?;
        let got = xe.to_vec(&client)?;
        ensure!(
            got.iter()
                .zip(&table[1500 * d..1501 * d])
                .all(|(a, b)| *a == b.to_f32()),
            "embed_token: x is not row 1500 of the table (seed {seed})"
        );
        println!("embed_token: row 1500 of 3 chunks exact");

        // --- output norm + lm_head and its top 2 over chunks; a planted tie and a NaN row.
        let mut w = rng.f16_vec(vocab * d, 0.0, w_std);
        let h = reference_norm(&f32_to_f64(&x), &f32_to_f64(&norm), eps as f64);
        let h16: Vec<f16> = h.iter().map(|&v| f16::from_f64(v)).collect();
        // Rows 777 and 90001 equal the normed x: the largest logit (≈ d), tied; the lower id
        // must win. Row 5 is NaN: never picked.
        for r in [777, 90001.min(vocab - 1)] {
            w[r * d..(r + 1) * d].copy_from_slice(&h16);
        }
        w[5 * d] = f16::NAN;
        let head = RowChunked::upload_rows(&client, &w, vocab, d, 60000)?;
        let parts = top2_parts(&head);
        let partial = up32(&vec![f32::NAN; parts * 4], &[parts * 4])?;
        let logits = up32(&vec![f32::NAN; vocab], &[1, vocab])?;
        let st = DecodeState::new(&client, 41, 0)?;
        lm_head_top2(&client, None, &head, &xd, &nd, eps, &logits, &partial)?;
        top2_finish(&client, None, &partial, parts, &st, true)?;
        let got = logits.to_vec(&client)?;
        let mut want = cubeqwen_kernels::matmul::reference(&h, &widen(&w), None, 1, vocab, d);
        ensure!(got[5].is_nan() && want[5].is_nan(), "row 5 must be NaN");
        want[5] = 0.0;
        let mut got64 = f32_to_f64(&got);
        got64[5] = 0.0;
        check("lm_head logits", rel_err(&got64, &want), TOL_F16, seed)?;
        let top = top_k_reference(&got, 2);
        let (id, v1, v2) = {
            let t = st.top2.to_vec(&client)?;
            (t[0].to_bits(), t[1], t[2])
        };
        ensure!(
            id == 777 && top[0].0 == 777 && v1 == top[0].1 && v2 == top[1].1 && v1 == v2,
            "top2: got id {id} ({v1}, {v2}), want 777 tied with 90001: {top:?} (seed {seed})"
        );
        ensure!(
            st.token.to_vec(&client)? == [777],
            "top2_finish: token buffer not 777"
        );
        ensure!(
            st.state.to_vec(&client)? == [42],
            "top2_finish: position not advanced to 42"
        );
        println!("lm_head top2: tie → 777, NaN row skipped, position advanced");
        Ok(())
    }
}

#[test]
fn fused_decode_kernels_qwen_05b() {
    run_test(Fused {
        shape: &QWEN_05B,
        seed: fresh_seed(),
    });
}

#[test]
fn fused_decode_kernels_tiny_head_dim_16() {
    run_test(Fused {
        shape: &TINY,
        seed: fresh_seed(),
    });
}

#[test]
fn fused_decode_kernels_qwen_15b() {
    if !full_shapes() {
        println!("1.5B shapes run with CUBEQWEN_FULL_SHAPES=1 (the GPU runner)");
        return;
    }
    run_test(Fused {
        shape: &QWEN_15B,
        seed: fresh_seed(),
    });
}

/// How many values of `a` and `b` differ, and by how many f16 steps at most (same sign: the
/// difference of their bit patterns; a sign change counts as far apart).
fn ulp_diff(a: &[f16], b: &[f16]) -> (usize, u32) {
    let steps = |x: f16, y: f16| {
        let (x, y) = (x.to_bits(), y.to_bits());
        if (x ^ y) & 0x8000 != 0 {
            u32::MAX
        } else {
            (x as i32 - y as i32).unsigned_abs()
        }
    };
    let d: Vec<u32> = a
        .iter()
        .zip(b)
        .map(|(x, y)| steps(*x, *y))
        .filter(|&s| s > 0)
        .collect();
    (d.len(), d.into_iter().max().unwrap_or(0))
}

/// Runs the launches `body` makes once as a CUDA graph (after cubecl's own work, and waits for
/// it): the graph tests' path through the recorder, where the streamed kernels' `cp.async`
/// groups are compiled.
#[cfg(feature = "cuda")]
fn once_in_a_graph(
    rec: &mut GraphRecorder,
    body: impl FnOnce(&mut GraphRecorder) -> Result<()>,
) -> Result<()> {
    rec.wait_for_cubecl()?;
    rec.capture(body)?.launch()?;
    rec.synchronize()
}

/// The streamed `ffn_in` (row pairs in flight a plane, 1 to 4 stages, rings shrunk to what the
/// device's shared memory holds) against the f64 reference and against the one-shot kernel
/// (stages 0): the same sums in the same order, so the same bits but where a compiler contracts
/// a multiply-add differently (lavapipe: up to 2 f16 steps in 3 of 1000 values, as gate and up
/// are each rounded before SwiGLU; allowed: ≤ 4 steps in ≤ 1% of the values; on the H200 all
/// bits equal), at the 0.5B shape (1.5B with `CUBEQWEN_FULL_SHAPES=1`) and a
/// small one whose last cube has rows past `ffn`; outputs poisoned before each run.
struct Streamed {
    seed: u64,
}

impl RuntimeJob for Streamed {
    type Output = ();
    fn run<R: Runtime>(self, client: ComputeClient<R>, device: &str) -> Result<()> {
        let seed = self.seed;
        let mut rng = Rng::new(seed);
        let mut shapes = vec![(896usize, 4864usize), (256, 1000)];
        if full_shapes() {
            shapes.push((1536, 8960));
        }
        for (d, ffn) in shapes {
            let x = rng.f32_vec(d, 0.3, 2.0);
            let norm = rng.f32_vec(d, 1.0, 0.25);
            let w_std = 1.0 / (d as f64).sqrt();
            let (wg, wu) = (
                rng.f16_vec(ffn * d, 0.0, w_std),
                rng.f16_vec(ffn * d, 0.0, w_std),
            );
            let xd = DeviceTensor::<R, f32>::from_slice(&client, &x, &[1, d])?;
            let nd = DeviceTensor::<R, f32>::from_slice(&client, &norm, &[d])?;
            let wgd = DeviceTensor::<R, f16>::from_slice(&client, &wg, &[ffn, d])?;
            let wud = DeviceTensor::<R, f16>::from_slice(&client, &wu, &[ffn, d])?;
            let want = reference_ffn_in(
                &f32_to_f64(&x),
                &f32_to_f64(&norm),
                &widen(&wg),
                &widen(&wu),
                ffn,
                1e-6,
            );
            let s = DeviceTensor::<R, f16>::from_slice(&client, &vec![POISON_F16; ffn], &[1, ffn])?;
            let too_many = ffn_in_with(
                &client,
                None,
                &xd,
                &nd,
                &wgd,
                &wud,
                1e-6,
                &s,
                MAX_FFN_STAGES + 1,
            );
            ensure!(
                too_many
                    .as_ref()
                    .is_err_and(|e| e.to_string().contains("at most")),
                "ffn_in: {} stages were not refused: {too_many:?}",
                MAX_FFN_STAGES + 1
            );
            let mut one_shot: Option<Vec<f16>> = None;
            for stages in 0..=MAX_FFN_STAGES {
                let s =
                    DeviceTensor::<R, f16>::from_slice(&client, &vec![POISON_F16; ffn], &[1, ffn])?;
                let plan = ffn_stream_plan(&client, ffn, d, d * 2, stages);
                println!("stages {stages}: {plan:?}");
                ffn_in_with(&client, None, &xd, &nd, &wgd, &wud, 1e-6, &s, stages)?;
                let got = s.to_vec(&client)?;
                check(
                    &format!("ffn_in d={d} ffn={ffn} stages {stages} on {device}: {plan:?}"),
                    rel_err(&widen(&got), &want),
                    TOL_F16,
                    seed,
                )?;
                match &one_shot {
                    None => one_shot = Some(got),
                    Some(o) => {
                        let (differ, ulps) = ulp_diff(o, &got);
                        println!("  against the one-shot kernel: {differ} values differ, by ≤ {ulps} ulp");
                        ensure!(
                            ulps <= 4 && differ * 100 <= ffn,
                            "ffn_in d={d} ffn={ffn}: {stages} stages differ from the one-shot \
                             kernel in {differ} values, by up to {ulps} ulp (seed {seed})"
                        )
                    }
                }
            }
        }
        Ok(())
    }
}

#[test]
fn ffn_in_streamed_matches_one_shot() {
    run_test(Streamed { seed: fresh_seed() });
}

/// On CUDA, the streamed `ffn_in` inside a CUDA graph (its copies as `cp.async` groups, the
/// only place they are) gives the bits of the same kernel launched by cubecl (plain loads and
/// stores), for every stage count, at the 0.5B and 1.5B shapes. CUDA only: `#[ignore]`d here, run by
/// `scripts/run-gpu.sh` (with --include-ignored).
#[cfg(feature = "cuda")]
#[test]
#[ignore = "needs CUDA: run on the GPU machine by scripts/run-gpu.sh"]
fn ffn_in_streamed_in_a_graph() -> Result<()> {
    let (client, device) = cubeqwen_kernels::runtime::cuda_client()?;
    println!("test device: {device}");
    let seed = fresh_seed();
    let mut rng = Rng::new(seed);
    let mut rec = GraphRecorder::new(&client)?;
    for (d, ffn) in [(896usize, 4864usize), (1536, 8960), (256, 1000)] {
        type T<E> = DeviceTensor<cubecl::cuda::CudaRuntime, E>;
        let xd = T::<f32>::from_slice(&client, &rng.f32_vec(d, 0.3, 2.0), &[1, d])?;
        let nd = T::<f32>::from_slice(&client, &rng.f32_vec(d, 1.0, 0.25), &[d])?;
        let w_std = 1.0 / (d as f64).sqrt();
        let wg = T::<f16>::from_slice(&client, &rng.f16_vec(ffn * d, 0.0, w_std), &[ffn, d])?;
        let wu = T::<f16>::from_slice(&client, &rng.f16_vec(ffn * d, 0.0, w_std), &[ffn, d])?;
        for stages in 1..=MAX_FFN_STAGES {
            let want = T::<f16>::from_slice(&client, &vec![POISON_F16; ffn], &[1, ffn])?;
            ffn_in_with(&client, None, &xd, &nd, &wg, &wu, 1e-6, &want, stages)?;
            let want = want.to_vec(&client)?;
            ensure!(
                want.iter().all(|v| v.is_finite()),
                "ffn_in d={d}: a value not written"
            );
            let s = T::<f16>::from_slice(&client, &vec![POISON_F16; ffn], &[1, ffn])?;
            once_in_a_graph(&mut rec, |rec| {
                ffn_in_with(&client, Some(rec), &xd, &nd, &wg, &wu, 1e-6, &s, stages)
            })?;
            let got = s.to_vec(&client)?;
            let same = want
                .iter()
                .zip(&got)
                .all(|(a, b)| a.to_bits() == b.to_bits());
            println!("ffn_in d={d} ffn={ffn} stages {stages} in a graph: same bits {same}");
            ensure!(
                same,
                "ffn_in d={d} ffn={ffn}: {stages} stages in a graph differ (seed {seed})"
            );
        }
    }
    Ok(())
}

/// The streamed GEMV + residual (rows in flight a plane group, 1 to 4 stages, rings shrunk to
/// what the device's shared memory holds) against the f64 reference and against the one-shot
/// kernel (stages 0; planes share a row differently, so f32 sums in another order: within
/// [`TOL_F32`] of each other), at the 0.5B o and down shapes, a shape whose rows are shorter
/// than a plane's pass and outnumber the grid (several steps, rows past `n` in the last), and
/// the 7B down shape with `CUBEQWEN_FULL_SHAPES=1`.
struct StreamedGemv {
    seed: u64,
}

impl RuntimeJob for StreamedGemv {
    type Output = ();
    fn run<R: Runtime>(self, client: ComputeClient<R>, device: &str) -> Result<()> {
        let seed = self.seed;
        let mut rng = Rng::new(seed);
        let mut shapes = vec![(896usize, 896usize), (896, 4864), (1000, 160)];
        if full_shapes() {
            shapes.push((3584, 18944));
        }
        for (n, k) in shapes {
            let w = rng.f16_vec(n * k, 0.0, 1.0 / (k as f64).sqrt());
            let a = rng.f16_vec(k, 0.0, 1.0);
            let x0 = rng.f32_vec(n, 0.0, 1.0);
            let wd = DeviceTensor::<R, f16>::from_slice(&client, &w, &[n, k])?;
            let ad = DeviceTensor::<R, f16>::from_slice(&client, &a, &[1, k])?;
            let want = reference_gemv_residual(&widen(&w), &widen(&a), &f32_to_f64(&x0));
            let xd = DeviceTensor::<R, f32>::from_slice(&client, &x0, &[1, n])?;
            let too_many = gemv_residual_with(&client, None, &wd, &ad, &xd, MAX_GEMV_STAGES + 1);
            ensure!(
                too_many
                    .as_ref()
                    .is_err_and(|e| e.to_string().contains("at most")),
                "gemv_residual: {} stages were not refused: {too_many:?}",
                MAX_GEMV_STAGES + 1
            );
            let mut one_shot: Option<Vec<f64>> = None;
            for stages in 0..=MAX_GEMV_STAGES {
                let xd = DeviceTensor::<R, f32>::from_slice(&client, &x0, &[1, n])?;
                let plan = gemv_stream_plan(&client, n, k / 8, 16, stages);
                gemv_residual_with(&client, None, &wd, &ad, &xd, stages)?;
                let got = f32_to_f64(&xd.to_vec(&client)?);
                check(
                    &format!("gemv_residual n={n} k={k} stages {stages} on {device}: {plan:?}"),
                    rel_err(&got, &want),
                    TOL_F32,
                    seed,
                )?;
                match &one_shot {
                    None => one_shot = Some(got),
                    Some(o) => check(
                        &format!("  against the one-shot kernel ({stages} stages)"),
                        rel_err(&got, o),
                        TOL_F32,
                        seed,
                    )?,
                }
            }
        }
        Ok(())
    }
}

#[test]
fn gemv_residual_streamed_matches_one_shot() {
    run_test(StreamedGemv { seed: fresh_seed() });
}

/// On CUDA: the streamed GEMV + residual inside a CUDA graph (`cp.async` groups) gives the bits
/// of the same kernel launched by cubecl (plain loads), for every stage count, at the 0.5B down,
/// 7B down and a many-step shape; and `gemv_residual` streams exactly where the one-shot grid
/// takes more than one wave (the 7B down projection, not the 0.5B or 1.5B ones). CUDA only:
/// `#[ignore]`d here, run by `scripts/run-gpu.sh` (with --include-ignored).
#[cfg(feature = "cuda")]
#[test]
#[ignore = "needs CUDA: run on the GPU machine by scripts/run-gpu.sh"]
fn gemv_residual_streamed_in_a_graph() -> Result<()> {
    let (client, device) = cubeqwen_kernels::runtime::cuda_client()?;
    println!("test device: {device}");
    for (n, k, streams) in [
        (896usize, 4864usize, false),
        (1536, 8960, false),
        (3584, 3584, false),
        (3584, 18944, true),
    ] {
        let waves = gemv_one_shot_waves(&client, n, k, 2)?;
        println!("gemv_residual n={n} k={k}: one-shot grid {waves:.2} waves");
        ensure!(
            (waves > 1.0) == streams,
            "gemv_residual n={n} k={k}: {waves:.2} waves of the one-shot kernel"
        );
    }
    let seed = fresh_seed();
    let mut rng = Rng::new(seed);
    let mut rec = GraphRecorder::new(&client)?;
    for (n, k) in [(896usize, 4864usize), (3584, 18944), (1000, 160)] {
        type T<E> = DeviceTensor<cubecl::cuda::CudaRuntime, E>;
        let wd = T::<f16>::from_slice(&client, &rng.f16_vec(n * k, 0.0, 0.02), &[n, k])?;
        let ad = T::<f16>::from_slice(&client, &rng.f16_vec(k, 0.0, 1.0), &[1, k])?;
        let x0 = rng.f32_vec(n, 0.0, 1.0);
        for stages in 1..=MAX_GEMV_STAGES {
            let want = T::<f32>::from_slice(&client, &x0, &[1, n])?;
            gemv_residual_with(&client, None, &wd, &ad, &want, stages)?;
            let want = want.to_vec(&client)?;
            let xd = T::<f32>::from_slice(&client, &x0, &[1, n])?;
            once_in_a_graph(&mut rec, |rec| {
                gemv_residual_with(&client, Some(rec), &wd, &ad, &xd, stages)
            })?;
            let got = xd.to_vec(&client)?;
            let same = want
                .iter()
                .zip(&got)
                .all(|(a, b)| a.to_bits() == b.to_bits());
            println!("gemv_residual n={n} k={k} stages {stages} in a graph: same bits {same}");
            ensure!(
                same,
                "gemv_residual n={n} k={k}: {stages} stages in a graph differ (seed {seed})"
            );
        }
    }
    Ok(())
}

/// On CUDA: the streamed `attn_in` inside a CUDA graph (`cp.async` groups) writes the bits of the
/// same kernel launched by cubecl (plain loads) into q and the cache, for every stage count, at
/// the 0.5B and 7B shapes; and `attn_in` streams exactly where the one-shot grid takes more than
/// one wave by its register estimate (the 7B shape). CUDA only: `#[ignore]`d here, run by
/// `scripts/run-gpu.sh` (with --include-ignored).
#[cfg(feature = "cuda")]
#[test]
#[ignore = "needs CUDA: run on the GPU machine by scripts/run-gpu.sh"]
fn attn_in_streamed_in_a_graph() -> Result<()> {
    let (client, device) = cubeqwen_kernels::runtime::cuda_client()?;
    println!("test device: {device}");
    // (d, heads, kv heads, head_dim, streams by default)
    let shapes = [
        (896usize, 14usize, 2usize, 64usize, false),
        (1536, 12, 2, 128, false),
        (3584, 28, 4, 128, true),
    ];
    for (d, nh, nkv, hd, streams) in shapes {
        let waves = attn_in_one_shot_waves(&client, (nh + 2 * nkv) * hd / 2, d, 2);
        println!("attn_in d={d}: one-shot grid {waves:.2} waves");
        ensure!(
            (waves > 1.0) == streams,
            "attn_in d={d}: {waves:.2} waves of the one-shot kernel"
        );
    }
    let seed = fresh_seed();
    let mut rng = Rng::new(seed);
    let mut rec = GraphRecorder::new(&client)?;
    type T<E> = DeviceTensor<cubecl::cuda::CudaRuntime, E>;
    let (max_ctx, pos) = (64usize, 17u32);
    for (d, nh, nkv, hd, _) in [shapes[0], shapes[2]] {
        let (qd, kvd) = (nh * hd, nkv * hd);
        let w_std = 1.0 / (d as f64).sqrt();
        let xd = T::<f32>::from_slice(&client, &rng.f32_vec(d, 0.3, 2.0), &[1, d])?;
        let nd = T::<f32>::from_slice(&client, &rng.f32_vec(d, 1.0, 0.25), &[d])?;
        let wq = T::<f16>::from_slice(&client, &rng.f16_vec(qd * d, 0.0, w_std), &[qd, d])?;
        let wk = T::<f16>::from_slice(&client, &rng.f16_vec(kvd * d, 0.0, w_std), &[kvd, d])?;
        let wv = T::<f16>::from_slice(&client, &rng.f16_vec(kvd * d, 0.0, w_std), &[kvd, d])?;
        let bq = T::<f32>::from_slice(&client, &rng.f32_vec(qd, 0.0, 0.5), &[qd])?;
        let bk = T::<f32>::from_slice(&client, &rng.f32_vec(kvd, 0.0, 0.5), &[kvd])?;
        let bv = T::<f32>::from_slice(&client, &rng.f32_vec(kvd, 0.0, 0.5), &[kvd])?;
        let weights = AttnInWeights {
            norm: &nd,
            wq: &wq,
            wk: &wk,
            wv: &wv,
            bq: &bq,
            bk: &bk,
            bv: &bv,
        };
        let rope = RopeTables::new(&client, 1_000_000.0, hd, max_ctx)?;
        let st = DecodeState::new(&client, pos, 0)?;
        let fresh = || -> Result<(T<f16>, KvCache<cubecl::cuda::CudaRuntime, f16>)> {
            let poison = vec![POISON_F16; nkv * max_ctx * hd];
            let cache = KvCache::<cubecl::cuda::CudaRuntime, f16>::new(&client, nkv, max_ctx, hd)?;
            let cache = KvCache {
                k: T::<f16>::from_slice(&client, &poison, &[nkv, max_ctx, hd])?,
                v: T::<f16>::from_slice(&client, &poison, &[nkv, max_ctx, hd])?,
                ..cache
            };
            Ok((
                T::<f16>::from_slice(&client, &vec![POISON_F16; qd], &[1, qd])?,
                cache,
            ))
        };
        let bits = |q: &T<f16>, c: &KvCache<cubecl::cuda::CudaRuntime, f16>| -> Result<Vec<u16>> {
            Ok([
                q.to_vec(&client)?,
                c.k.to_vec(&client)?,
                c.v.to_vec(&client)?,
            ]
            .concat()
            .iter()
            .map(|v| v.to_bits())
            .collect())
        };
        for stages in 1..=MAX_GEMV_STAGES {
            let (q, cache) = fresh()?;
            attn_in_with(
                &client, None, &xd, &weights, &rope, &st, 1e-6, nh, &q, &cache, stages,
            )?;
            let want = bits(&q, &cache)?;
            let (q, cache) = fresh()?;
            once_in_a_graph(&mut rec, |rec| {
                attn_in_with(
                    &client,
                    Some(rec),
                    &xd,
                    &weights,
                    &rope,
                    &st,
                    1e-6,
                    nh,
                    &q,
                    &cache,
                    stages,
                )
            })?;
            let same = bits(&q, &cache)? == want;
            println!("attn_in d={d} stages {stages} in a graph: same bits {same}");
            ensure!(
                same,
                "attn_in d={d}: {stages} stages in a graph differ (seed {seed})"
            );
        }
    }
    Ok(())
}
