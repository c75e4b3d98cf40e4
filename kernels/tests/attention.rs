//! Attention parity: GQA (14 q heads on 2 kv heads, ratio 7), causal mask with a cache offset,
//! chunked prefill, and decode against prefill of the same tokens.

use anyhow::{ensure, Result};
use cubecl::prelude::*;
use cubeqwen_kernels::attention::{attention, reference, KvCache, CHUNK};
use cubeqwen_kernels::testing::*;
use cubeqwen_kernels::{device_test, DeviceTensor, KernelError};
use half::f16;

/// f16 output rounding ≈ 2.8e-4; a wrong kv head, a missing mask or a wrong scale give > 1e-1.
const TOL: f64 = 3e-3;

struct Case {
    n_heads: usize,
    n_kv: usize,
    head_dim: usize,
    /// Token counts of successive calls (e.g. [37] prefill; [20, 17] chunked; [5, 1, 1] decode).
    calls: Vec<usize>,
    /// The first call only fills the cache (no attention, no check): a long context whose
    /// full f64 prefill reference would take minutes.
    fill_first: bool,
}

/// Runs the calls of `case` against one cache, each checked against the f64 reference.
fn check<R: Runtime>(client: &ComputeClient<R>, case: Case, seed: u64) -> Result<()> {
    let Case {
        n_heads,
        n_kv,
        head_dim,
        calls,
        fill_first,
    } = case;
    let total: usize = calls.iter().sum();
    let mut rng = Rng::new(seed);
    let qw = n_heads * head_dim;
    let kw = n_kv * head_dim;
    let q = rng.f16_vec(total * qw, 0.0, 1.0);
    let k = rng.f16_vec(total * kw, 0.0, 1.0);
    let v = rng.f16_vec(total * kw, 0.0, 1.0);
    let cache = KvCache::<R, f16>::new(client, n_kv, total + 3, head_dim)?;
    let mut checked = 0;
    let mut start = 0;
    for &n in &calls {
        let sl = |a: &[f16], w: usize| a[start * w..(start + n) * w].to_vec();
        let kd = DeviceTensor::<R, f16>::from_slice(client, &sl(&k, kw), &[n, kw])?;
        let vd = DeviceTensor::<R, f16>::from_slice(client, &sl(&v, kw), &[n, kw])?;
        cache.append(client, &kd, &vd, start)?;
        if fill_first && start == 0 {
            start += n;
            continue;
        }
        let qd = DeviceTensor::<R, f16>::from_slice(client, &sl(&q, qw), &[n, qw])?;
        let od = DeviceTensor::<R, f16>::from_slice(client, &vec![POISON_F16; n * qw], &[n, qw])?;
        attention(client, &qd, &cache, n_heads, start, &od)?;
        let got = f16_to_f64(&od.to_vec(client)?);
        let want = reference(
            &f16_to_f64(&sl(&q, qw)),
            &f16_to_f64(&k[..(start + n) * kw]),
            &f16_to_f64(&v[..(start + n) * kw]),
            n_heads,
            n_kv,
            head_dim,
            start,
        );
        let err = rel_err(&got, &want);
        println!(
            "attention heads {n_heads}/{n_kv} hd {head_dim}: tokens {start}..{}: rel_err={err:.3e} (seed {seed})",
            start + n
        );
        ensure!(
            err <= TOL,
            "attention heads {n_heads}/{n_kv} hd {head_dim} tokens {start}..{}: rel_err {err:.3e} > {TOL:.0e} (seed {seed})",
            start + n
        );
        checked += 1;
        start += n;
    }
    ensure!(checked > 0, "nothing was checked");
    Ok(())
}

fn gqa7(calls: Vec<usize>) -> Case {
    Case {
        n_heads: 14,
        n_kv: 2,
        head_dim: 64,
        calls,
        fill_first: false,
    }
}

device_test! {
    fn attention_prefill_gqa7<R>(client, seed) {
        check(client, gqa7(vec![37]), seed)
    }
}

device_test! {
    fn attention_prefill_longer_than_one_chunk<R>(client, seed) {
        // 300 positions span two key chunks.
        const { assert!(300 > CHUNK && 300 < 2 * CHUNK) };
        check(client, gqa7(vec![300]), seed)
    }
}

device_test! {
    fn attention_chunked_prefill_with_offset<R>(client, seed) {
        check(client, gqa7(vec![20, 17, 9]), seed)
    }
}

device_test! {
    fn attention_decode_steps_after_prefill<R>(client, seed) {
        // Decode: one query token against a cache that crosses a chunk boundary.
        check(client, gqa7(vec![CHUNK - 2, 1, 1, 1, 1]), seed)
    }
}

device_test! {
    fn attention_head_dim_128_gqa6<R>(client, seed) {
        // 1.5B-style heads: 12 q heads on 2 kv heads, head_dim 128.
        let case = Case {
            n_heads: 12,
            n_kv: 2,
            head_dim: 128,
            calls: vec![19, 1, 1],
            fill_first: false,
        };
        check(client, case, seed)
    }
}

device_test! {
    fn attention_long_context_decode<R>(client, seed) {
        // Decode after a long prefill (3 key chunks merged); with CUBEQWEN_FULL_SHAPES=1 also
        // at 32k.
        check(client, gqa7(vec![700, 1]), seed)?;
        if full_shapes() {
            // 32k-class context: 32767 cached positions (128 key chunks), two decode steps.
            let case = Case {
                fill_first: true,
                ..gqa7(vec![32766, 1, 1])
            };
            check(client, case, seed)?;
        }
        Ok(())
    }
}

device_test! {
    fn attention_cache_overflow_is_an_error<R>(client) {
        let cache = KvCache::<R, f16>::new(client, 2, 8, 64)?;
        let k = DeviceTensor::<R, f16>::from_slice(client, &vec![f16::ONE; 3 * 128], &[3, 128])?;
        let err = cache.append(client, &k, &k, 6).unwrap_err();
        ensure!(
            err.downcast_ref::<KernelError>()
                == Some(&KernelError::PastCache {
                    op: "kv append",
                    start: 6,
                    end: 9,
                    capacity: 8
                }),
            "wrong refusal: {err}"
        );
        // The same positions asked of attention.
        let q = DeviceTensor::<R, f16>::from_slice(client, &vec![f16::ONE; 3 * 896], &[3, 896])?;
        let out = DeviceTensor::<R, f16>::empty(client, &[3, 896])?;
        let err = attention(client, &q, &cache, 14, 6, &out).unwrap_err();
        ensure!(
            matches!(
                err.downcast_ref::<KernelError>(),
                Some(KernelError::PastCache { op: "attention", end: 9, capacity: 8, .. })
            ),
            "wrong refusal: {err}"
        );
        Ok(())
    }
}
