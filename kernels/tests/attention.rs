//! Attention parity: GQA (14 q heads on 2 kv heads, ratio 7), causal mask with a cache offset,
//! chunked prefill, and decode against prefill of the same tokens.

use anyhow::Result;
use cubecl::prelude::*;
use cubeqwen_kernels::attention::{attention, reference, KvCache};
use cubeqwen_kernels::runtime::RuntimeJob;
use cubeqwen_kernels::testing::*;
use cubeqwen_kernels::DeviceTensor;
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
    seed: u64,
}

impl RuntimeJob for Case {
    type Output = Vec<f64>;
    fn run<R: Runtime>(self, client: ComputeClient<R>, _device: &str) -> Result<Vec<f64>> {
        let Case {
            n_heads,
            n_kv,
            head_dim,
            calls,
            fill_first,
            seed,
        } = self;
        let total: usize = calls.iter().sum();
        let mut rng = Rng::new(seed);
        let qw = n_heads * head_dim;
        let kw = n_kv * head_dim;
        let q = rng.f16_vec(total * qw, 0.0, 1.0);
        let k = rng.f16_vec(total * kw, 0.0, 1.0);
        let v = rng.f16_vec(total * kw, 0.0, 1.0);
        let cache = KvCache::<R, f16>::new(&client, n_kv, total + 3, head_dim)?;
        let mut errs = Vec::new();
        let mut start = 0;
        for &n in &calls {
            let sl = |a: &[f16], w: usize| a[start * w..(start + n) * w].to_vec();
            let kd = DeviceTensor::<R, f16>::from_slice(&client, &sl(&k, kw), &[n, kw])?;
            let vd = DeviceTensor::<R, f16>::from_slice(&client, &sl(&v, kw), &[n, kw])?;
            cache.append(&client, &kd, &vd, start)?;
            if fill_first && start == 0 {
                start += n;
                continue;
            }
            let qd = DeviceTensor::<R, f16>::from_slice(&client, &sl(&q, qw), &[n, qw])?;
            let od =
                DeviceTensor::<R, f16>::from_slice(&client, &vec![POISON_F16; n * qw], &[n, qw])?;
            attention(&client, &qd, &cache, n_heads, start, &od)?;
            let got = f16_to_f64(&od.to_vec(&client)?);
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
            errs.push(err);
            start += n;
        }
        Ok(errs)
    }
}

fn check(n_heads: usize, n_kv: usize, head_dim: usize, calls: Vec<usize>) {
    check_case(n_heads, n_kv, head_dim, calls, false);
}

fn check_case(n_heads: usize, n_kv: usize, head_dim: usize, calls: Vec<usize>, fill_first: bool) {
    let seed = fresh_seed();
    let errs = run_test(Case {
        n_heads,
        n_kv,
        head_dim,
        calls,
        fill_first,
        seed,
    });
    assert!(!errs.is_empty(), "nothing was checked");
    for e in errs {
        assert!(
            e <= TOL,
            "attention rel_err {e:.3e} > {TOL:.0e} (seed {seed})"
        );
    }
}

#[test]
fn attention_prefill_gqa7() {
    check(14, 2, 64, vec![37]);
}

#[test]
fn attention_prefill_longer_than_one_chunk() {
    // 300 positions span two key chunks of 256.
    check(14, 2, 64, vec![300]);
}

#[test]
fn attention_chunked_prefill_with_offset() {
    check(14, 2, 64, vec![20, 17, 9]);
}

#[test]
fn attention_decode_steps_after_prefill() {
    // Decode: one query token against a cache that crosses a chunk boundary.
    check(14, 2, 64, vec![254, 1, 1, 1, 1]);
}

#[test]
fn attention_head_dim_128_gqa6() {
    // 1.5B-style heads: 12 q heads on 2 kv heads, head_dim 128.
    check(12, 2, 128, vec![19, 1, 1]);
}

#[test]
fn attention_long_context_decode() {
    // Decode after a long prefill (3 key chunks merged); with CUBEQWEN_FULL_SHAPES=1 also at 32k.
    check(14, 2, 64, vec![700, 1]);
    if full_shapes() {
        // 32k-class context: 32767 cached positions (128 key chunks), two decode steps.
        check_case(14, 2, 64, vec![32766, 1, 1], true);
    }
}

struct Overflow;
impl RuntimeJob for Overflow {
    type Output = String;
    fn run<R: Runtime>(self, client: ComputeClient<R>, _device: &str) -> Result<String> {
        let cache = KvCache::<R, f16>::new(&client, 2, 8, 64)?;
        let k = DeviceTensor::<R, f16>::from_slice(&client, &vec![f16::ONE; 3 * 128], &[3, 128])?;
        Ok(cache.append(&client, &k, &k, 6).unwrap_err().to_string())
    }
}

#[test]
fn attention_cache_overflow_is_an_error() {
    let msg = run_test(Overflow);
    assert!(msg.contains("exceed the cache"), "{msg}");
}
