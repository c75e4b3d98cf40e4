//! RoPE parity: NEOX pairs, f32 angles from tables, positions past 2048 and near 32k.

use anyhow::{ensure, Result};
use cubecl::prelude::*;
use cubeqwen_kernels::attention::KvCache;
use cubeqwen_kernels::rope::{
    inv_freq, reference, rope, rope_qk, rope_qk_append, Append, RopeTables,
};
use cubeqwen_kernels::testing::*;
use cubeqwen_kernels::{device_test, DeviceTensor, KernelError};
use half::f16;

/// f16 storage of the rotated values: ≈ 2.8e-4. Adjacent pairs or a wrong angle give ≫ 1e-2.
const TOL: f64 = 1e-3;

/// Rotates `positions.len()` tokens of each tensor in `heads` on the device (one: `rope`; two,
/// as q and k: `rope_qk`, one launch) and compares each with the f64 reference, and with the
/// same data rotated with adjacent pairs (which must not match).
fn check<R: Runtime>(
    client: &ComputeClient<R>,
    heads: &[usize],
    head_dim: usize,
    positions: &[usize],
    seed: u64,
) -> Result<()> {
    let theta = 1_000_000.0f32;
    let max_pos = positions.iter().max().unwrap() + 1;
    let tables = RopeTables::new(client, theta, head_dim, max_pos)?;
    let mut rng = Rng::new(seed);
    let t = positions.len();
    let xs: Vec<Vec<f16>> = heads
        .iter()
        .map(|h| rng.f16_vec(t * h * head_dim, 0.0, 1.0))
        .collect();
    let xds = xs
        .iter()
        .zip(heads)
        .map(|(x, h)| DeviceTensor::<R, f16>::from_slice(client, x, &[t, h * head_dim]))
        .collect::<Result<Vec<_>>>()?;
    let pos_u32: Vec<u32> = positions.iter().map(|&p| p as u32).collect();
    let pd = DeviceTensor::<R, u32>::from_slice(client, &pos_u32, &[t])?;
    match &xds[..] {
        [x] => rope(client, x, &pd, max_pos - 1, &tables)?,
        [q, k] => rope_qk(client, q, k, &pd, max_pos - 1, &tables)?,
        _ => anyhow::bail!("check takes one tensor or q and k"),
    }
    for ((x, xd), &heads) in xs.iter().zip(&xds).zip(heads) {
        let got = f16_to_f64(&xd.to_vec(client)?);
        let want = reference(&f16_to_f64(x), positions, head_dim, theta);
        // The same data rotated with adjacent pairs (the GPT-J convention) must not match.
        let mut adjacent = f16_to_f64(x);
        for (ti, &p) in positions.iter().enumerate() {
            for h in 0..heads {
                let b = (ti * heads + h) * head_dim;
                for i in 0..head_dim / 2 {
                    let a = (p as f32 * inv_freq(theta, i, head_dim)) as f64;
                    let (x0, x1) = (adjacent[b + 2 * i], adjacent[b + 2 * i + 1]);
                    adjacent[b + 2 * i] = x0 * a.cos() - x1 * a.sin();
                    adjacent[b + 2 * i + 1] = x1 * a.cos() + x0 * a.sin();
                }
            }
        }
        let err = rel_err(&got, &want);
        let err_adjacent = rel_err(&got, &adjacent);
        println!(
            "rope heads={heads} (of {:?}) hd={head_dim} positions {:?}..: rel_err={err:.3e} (vs adjacent pairs {err_adjacent:.2e}) seed {seed}",
            xds.iter().map(|x| x.shape[1] / head_dim).collect::<Vec<_>>(),
            &positions[..positions.len().min(4)]
        );
        ensure!(
            err <= TOL,
            "rope rel_err {err:.3e} > {TOL:.0e} (seed {seed})"
        );
        ensure!(
            err_adjacent > 0.1,
            "adjacent-pair rotation was not told apart ({err_adjacent:.3e})"
        );
    }
    Ok(())
}

device_test! {
    fn rope_q_and_k_prefill_positions<R>(client, seed) {
        // 14 query heads and 2 kv heads of head_dim 64, in one launch as a layer does, and
        // each alone; positions 0..37.
        let positions: Vec<usize> = (0..37).collect();
        check(client, &[14, 2], 64, &positions, seed)?;
        check(client, &[14], 64, &positions, seed)?;
        check(client, &[2], 64, &positions, seed)
    }
}

device_test! {
    fn rope_positions_past_f16_range<R>(client, seed) {
        // f16 holds integers exactly only up to 2048; these must still be exact.
        check(client, &[14, 2], 64, &[2047, 2048, 2049, 4099, 10001, 30000, 32767], seed)?;
        check(client, &[12], 128, &[5000, 32767, 1], seed)
    }
}

device_test! {
    fn rope_rejects_position_past_tables<R>(client) {
        let tables = RopeTables::new(client, 1e6, 64, 16)?;
        let x = DeviceTensor::<R, f16>::from_slice(client, &[f16::ONE; 64], &[1, 64])?;
        let p = DeviceTensor::<R, u32>::from_slice(client, &[16], &[1])?;
        // k must have q's tokens.
        let k = DeviceTensor::<R, f16>::from_slice(client, &[f16::ONE; 128], &[2, 64])?;
        let p0 = DeviceTensor::<R, u32>::from_slice(client, &[0], &[1])?;
        let err = rope_qk(client, &x, &k, &p0, 0, &tables).unwrap_err();
        ensure!(
            err.downcast_ref::<KernelError>().is_some_and(|e| e.to_string().contains("k")),
            "wrong refusal of k's tokens: {err}"
        );
        let err = rope(client, &x, &p, 16, &tables).unwrap_err();
        ensure!(
            err.downcast_ref::<KernelError>()
                == Some(&KernelError::PastRopeTables {
                    position: 16,
                    table: 16
                }),
            "wrong refusal: {err}"
        );
        Ok(())
    }
}

device_test! {
    /// RoPE of q and k with the KV-cache append in the same launch: q and k rotated as
    /// `rope_qk` rotates them (bit for bit), the cache rows `start..start + t` of each kv head
    /// hold the rotated k and the v given, and every other row keeps what it held.
    fn rope_qk_append_writes_rotated_k_and_v_into_the_cache<R>(client, seed) {
        let (hd, nq, nkv, t, start, max_ctx) = (64, 14, 2, 5, 3, 12);
        let mut rng = Rng::new(seed);
        let tables = RopeTables::new(client, 1e6, hd, max_ctx)?;
        let pos: Vec<u32> = (start..start + t).map(|p| p as u32).collect();
        let pd = DeviceTensor::<R, u32>::from_slice(client, &pos, &[t])?;
        let (q, k, v) = (
            rng.f16_vec(t * nq * hd, 0.0, 1.0),
            rng.f16_vec(t * nkv * hd, 0.0, 1.0),
            rng.f16_vec(t * nkv * hd, 0.0, 1.0),
        );
        let tensor = |x: &[f16], w: usize| DeviceTensor::<R, f16>::from_slice(client, x, &[t, w]);
        let (qd, kd, vd) = (tensor(&q, nq * hd)?, tensor(&k, nkv * hd)?, tensor(&v, nkv * hd)?);
        let (q_alone, k_alone) = (tensor(&q, nq * hd)?, tensor(&k, nkv * hd)?);
        let old_k = rng.f16_vec(nkv * max_ctx * hd, 0.0, 1.0);
        let old_v = rng.f16_vec(nkv * max_ctx * hd, 0.0, 1.0);
        let cache = KvCache {
            k: DeviceTensor::<R, f16>::from_slice(client, &old_k, &[nkv, max_ctx, hd])?,
            v: DeviceTensor::<R, f16>::from_slice(client, &old_v, &[nkv, max_ctx, hd])?,
            n_kv: nkv,
            max_ctx,
            head_dim: hd,
        };
        let append = Append { v: &vd, cache: &cache, start };
        rope_qk_append(client, &qd, &kd, &pd, start + t - 1, &tables, append)?;
        rope_qk(client, &q_alone, &k_alone, &pd, start + t - 1, &tables)?;
        let bits = |x: Vec<f16>| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
        ensure!(bits(qd.to_vec(client)?) == bits(q_alone.to_vec(client)?), "q differs from rope_qk's");
        let k_rot = k_alone.to_vec(client)?;
        ensure!(bits(kd.to_vec(client)?) == bits(k_rot.clone()), "k differs from rope_qk's");
        let (got_k, got_v) = (cache.k.to_vec(client)?, cache.v.to_vec(client)?);
        for g in 0..nkv {
            for p in 0..max_ctx {
                for d in 0..hd {
                    let at = (g * max_ctx + p) * hd + d;
                    let (want_k, want_v) = if (start..start + t).contains(&p) {
                        let src = ((p - start) * nkv + g) * hd + d;
                        (k_rot[src], v[src])
                    } else {
                        (old_k[at], old_v[at])
                    };
                    ensure!(
                        got_k[at].to_bits() == want_k.to_bits() && got_v[at].to_bits() == want_v.to_bits(),
                        "cache head {g} position {p} dim {d}: k {} v {}, expected {want_k} {want_v}",
                        got_k[at],
                        got_v[at]
                    );
                }
            }
        }
        // Refused: positions past the cache, and a v that is not k's shape.
        let past = Append { v: &vd, cache: &cache, start: max_ctx - t + 1 };
        let err = rope_qk_append(client, &qd, &kd, &pd, start + t - 1, &tables, past).unwrap_err();
        ensure!(
            matches!(err.downcast_ref::<KernelError>(), Some(KernelError::PastCache { .. })),
            "an append past the cache was refused with `{err}`"
        );
        let short_v = Append { v: &qd, cache: &cache, start };
        let err = rope_qk_append(client, &qd, &kd, &pd, start + t - 1, &tables, short_v).unwrap_err();
        ensure!(
            err.downcast_ref::<KernelError>().is_some_and(|e| e.to_string().contains("v")),
            "a v of q's shape was refused with `{err}`"
        );
        println!("rope + kv append: {t} tokens at {start}..{} of {max_ctx}: exact", start + t);
        Ok(())
    }
}
