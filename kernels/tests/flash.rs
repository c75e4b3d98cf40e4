//! Flash-attention prefill parity with the f64 reference: GQA 7 (and 6, 4 kv heads), head_dim
//! 64 and 128, token counts that are not multiples of the 64-row tile, cache offsets (chunked
//! prefill), poisoned outputs. The portable kernel and the mma kernel's emulated form run on
//! every device; the tensor-core form needs CUDA (`#[ignore]`d here, run by
//! scripts/run-gpu.sh with --include-ignored).
#![allow(clippy::neg_cmp_op_on_partial_ord)] // `!(e <= TOL)`: NaN must fail

use anyhow::Result;
use cubecl::prelude::*;
use cubeqwen_kernels::attention::{reference, KvCache};
use cubeqwen_kernels::flash::{attention_prefill_with, PrefillKernel, PrefillOptions};
use cubeqwen_kernels::runtime::RuntimeJob;
use cubeqwen_kernels::testing::*;
use cubeqwen_kernels::DeviceTensor;
use half::f16;

/// f16 output rounding ≈ 2.8e-4 and P rounded to f16 in the mma kernel; a wrong kv head, a
/// missing or shifted mask or a wrong scale give > 1e-2.
const TOL: f64 = 3e-3;

#[derive(Clone)]
struct Case {
    kernel: PrefillKernel,
    pack_group: bool,
    n_heads: usize,
    n_kv: usize,
    head_dim: usize,
    /// Cache positions written before the checked call (chunked prefill: start > 0).
    start: usize,
    tokens: usize,
    /// Key splits of the mma kernels (`None`: their own choice).
    splits: Option<usize>,
    seed: u64,
}

impl Case {
    fn new(kernel: PrefillKernel, n_heads: usize, n_kv: usize, head_dim: usize) -> Self {
        Self {
            kernel,
            pack_group: true,
            n_heads,
            n_kv,
            head_dim,
            start: 0,
            tokens: 1,
            splits: None,
            seed: fresh_seed(),
        }
    }
    fn at(&self, start: usize, tokens: usize) -> Self {
        Self {
            start,
            tokens,
            ..self.clone()
        }
    }
    fn split(&self, splits: usize) -> Self {
        Self {
            splits: Some(splits),
            ..self.clone()
        }
    }
}

/// The query tokens whose output is compared with the f64 reference: all of them when few,
/// else the first, the last, the tile edges 63/64 and random ones.
fn checked_tokens(tokens: usize, rng: &mut Rng) -> Vec<usize> {
    if tokens <= 64 {
        return (0..tokens).collect();
    }
    let mut t = vec![0, 63, 64, tokens - 1];
    t.extend((0..12).map(|_| (rng.next_u64() % tokens as u64) as usize));
    t
}

impl RuntimeJob for Case {
    type Output = f64;
    fn run<R: Runtime>(self, client: ComputeClient<R>, _device: &str) -> Result<f64> {
        let Case {
            kernel,
            pack_group,
            n_heads,
            n_kv,
            head_dim,
            start,
            tokens,
            splits,
            seed,
        } = self;
        let total = start + tokens;
        let mut rng = Rng::new(seed);
        let qw = n_heads * head_dim;
        let kw = n_kv * head_dim;
        let q = rng.f16_vec(tokens * qw, 0.0, 1.0);
        let k = rng.f16_vec(total * kw, 0.0, 1.0);
        let v = rng.f16_vec(total * kw, 0.0, 1.0);
        // Spare positions past the end stay unwritten: the kernel must not read them.
        let cache = KvCache::<R, f16>::new(&client, n_kv, total + 70, head_dim)?;
        let kd = DeviceTensor::<R, f16>::from_slice(&client, &k, &[total, kw])?;
        let vd = DeviceTensor::<R, f16>::from_slice(&client, &v, &[total, kw])?;
        cache.append(&client, &kd, &vd, 0)?;
        let qd = DeviceTensor::<R, f16>::from_slice(&client, &q, &[tokens, qw])?;
        let od = DeviceTensor::<R, f16>::from_slice(
            &client,
            &vec![POISON_F16; tokens * qw],
            &[tokens, qw],
        )?;
        let options = PrefillOptions {
            kernel,
            pack_group,
            splits,
        };
        attention_prefill_with(&client, options, &qd, &cache, n_heads, start, &od)?;
        let out = od.to_vec(&client)?;
        ensure_all_written(&out)?;

        let (k64, v64) = (f16_to_f64(&k), f16_to_f64(&v));
        let (mut got, mut want) = (Vec::new(), Vec::new());
        for t in checked_tokens(tokens, &mut rng) {
            let pos = start + t;
            got.extend(f16_to_f64(&out[t * qw..(t + 1) * qw]));
            want.extend(reference(
                &f16_to_f64(&q[t * qw..(t + 1) * qw]),
                &k64[..(pos + 1) * kw],
                &v64[..(pos + 1) * kw],
                n_heads,
                n_kv,
                head_dim,
                pos,
            ));
        }
        let err = rel_err(&got, &want);
        println!(
            "prefill {kernel:?} pack_group={pack_group} splits={splits:?} heads {n_heads}/{n_kv} \
             hd {head_dim}: tokens {start}..{total}: rel_err={err:.3e} (seed {seed})"
        );
        Ok(err)
    }
}

/// Every output element was written (no poison left), so the sampled check covers a kernel
/// that wrote all rows.
fn ensure_all_written(out: &[f16]) -> Result<()> {
    let left = out.iter().filter(|x| x.is_nan()).count();
    anyhow::ensure!(
        left == 0,
        "{left} output values still hold the poison (NaN)"
    );
    Ok(())
}

fn check(case: Case) {
    let seed = case.seed;
    let e = run_test(case);
    assert!(
        e <= TOL,
        "prefill rel_err {e:.3e} > {TOL:.0e} (seed {seed})"
    );
}

/// The shapes every kernel is checked on: 0.5B heads (14 on 2, hd 64) at token counts around
/// the tile sizes, with and without a cache offset; 1.5B heads (12 on 2, hd 128).
fn check_kernel(kernel: PrefillKernel) {
    let qwen05 = Case::new(kernel, 14, 2, 64);
    for tokens in [1, 37, 200] {
        check(qwen05.at(0, tokens));
    }
    // Chunked prefill: the second chunk starts mid-tile, a later one far past the first.
    check(qwen05.at(20, 17));
    check(qwen05.at(300, 45));
    let qwen15 = Case::new(kernel, 12, 2, 128);
    check(qwen15.at(0, 37));
    check(qwen15.at(70, 61));
}

#[test]
fn flash_portable_prefill() {
    check_kernel(PrefillKernel::Portable);
}

#[test]
fn flash_portable_long_prefill() {
    // 513 tokens: 9 key tiles, the last of one key; chunked with a 511-position offset.
    let c = Case::new(PrefillKernel::Portable, 14, 2, 64);
    check(c.at(0, 513));
    check(c.at(511, 66));
}

#[test]
fn flash_portable_one_head_per_cube() {
    let c = Case {
        pack_group: false,
        ..Case::new(PrefillKernel::Portable, 14, 2, 64)
    };
    check(c.at(0, 70));
    check(c.at(33, 31));
}

#[test]
fn flash_mma_emulated_prefill() {
    // The 0.5B heads only: at head_dim 128 the emulation needs 45 KB of shared memory, more
    // than lavapipe's 32 KB (the tensor-core form runs the 1.5B and 7B heads on CUDA).
    let qwen05 = Case::new(PrefillKernel::MmaEmulated, 14, 2, 64);
    for (start, tokens) in [(0, 1), (0, 37), (0, 200), (20, 17), (300, 45)] {
        check(qwen05.at(start, tokens));
    }
    let one_head = Case {
        pack_group: false,
        ..Case::new(PrefillKernel::MmaEmulated, 14, 2, 64)
    };
    check(one_head.at(10, 70));
}

#[test]
fn flash_mma_emulated_split_keys() {
    // The key tiles split over cubes, their parts merged (the emulation's tiles are 32 keys):
    // 16 tokens at depth 300 (10 tiles in 4 splits of 3, 3, 3, 1); 60 tokens at 100 in 3
    // splits of 2, 2, 1 tiles (the first 28 tokens see none of the last split's keys: parts
    // without a key); more splits asked than 37 positions have tiles (2).
    let qwen05 = Case::new(PrefillKernel::MmaEmulated, 14, 2, 64);
    check(qwen05.at(300, 16).split(4));
    check(qwen05.at(100, 60).split(3));
    check(qwen05.at(0, 37).split(2));
}

#[test]
fn flash_auto_prefill() {
    // Auto: the mma kernel where the device has f16 mma.m16n8k16 (CUDA), else the portable one.
    check_kernel(PrefillKernel::Auto);
    if full_shapes() {
        // 7B heads: 28 on 4 kv heads, hd 128; a 2048-token prefill and a chunk at depth 4096.
        let c = Case::new(PrefillKernel::Auto, 28, 4, 128);
        check(c.at(0, 2048));
        check(Case::new(PrefillKernel::Auto, 14, 2, 64).at(4096, 512));
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    use super::*;

    /// Runs on CUDA whatever `CUBEQWEN_TEST_DEVICE` says (a missing GPU fails the test).
    fn check_cuda(case: Case) {
        let seed = case.seed;
        let (client, device) = cubeqwen_kernels::runtime::cuda_client().unwrap();
        println!("test device: {device}");
        let e = case.run(client, &device).unwrap();
        assert!(
            e <= TOL,
            "prefill rel_err {e:.3e} > {TOL:.0e} (seed {seed})"
        );
    }

    #[test]
    #[ignore = "needs CUDA tensor cores: run on the GPU machine by scripts/run-gpu.sh"]
    fn flash_mma_prefill_cuda() {
        let qwen05 = Case::new(PrefillKernel::Mma, 14, 2, 64);
        for tokens in [1, 37, 200, 513, 2048] {
            check_cuda(qwen05.at(0, tokens));
        }
        check_cuda(qwen05.at(20, 17));
        check_cuda(qwen05.at(511, 66));
        check_cuda(qwen05.at(4096, 512));
        // Short chunks deep in the cache: the keys split by the kernel's own rule, and by hand.
        check_cuda(qwen05.at(4096, 16));
        check_cuda(qwen05.at(4096, 16).split(64));
        check_cuda(qwen05.at(100, 60).split(3));
        check_cuda(Case::new(PrefillKernel::Mma, 12, 2, 128).at(4000, 16));
        check_cuda(Case {
            pack_group: false,
            ..qwen05.at(10, 70)
        });
        for (heads, kv) in [(12, 2), (28, 4)] {
            let c = Case::new(PrefillKernel::Mma, heads, kv, 128);
            check_cuda(c.at(0, 37));
            check_cuda(c.at(70, 61));
            check_cuda(c.at(0, 2048));
        }
    }

    #[test]
    #[ignore = "needs CUDA: run on the GPU machine by scripts/run-gpu.sh"]
    fn flash_portable_prefill_cuda() {
        let qwen05 = Case::new(PrefillKernel::Portable, 14, 2, 64);
        check_cuda(qwen05.at(0, 2048));
        check_cuda(qwen05.at(4096, 512));
        check_cuda(Case::new(PrefillKernel::Portable, 28, 4, 128).at(0, 2048));
    }
}

struct BadInputs;
impl RuntimeJob for BadInputs {
    type Output = Vec<String>;
    fn run<R: Runtime>(self, client: ComputeClient<R>, _device: &str) -> Result<Vec<String>> {
        let cache = KvCache::<R, f16>::new(&client, 2, 16, 64)?;
        let t = |rows: usize, cols: usize| {
            DeviceTensor::<R, f16>::from_slice(&client, &vec![f16::ONE; rows * cols], &[rows, cols])
        };
        let run = |q: &DeviceTensor<R, f16>, out: &DeviceTensor<R, f16>, heads, start| {
            attention_prefill_with(
                &client,
                PrefillOptions::default(),
                q,
                &cache,
                heads,
                start,
                out,
            )
            .unwrap_err()
            .to_string()
        };
        let q = t(4, 14 * 64)?;
        let mut msgs = vec![
            run(&t(4, 13 * 64)?, &t(4, 13 * 64)?, 14, 0),
            run(&q, &t(5, 14 * 64)?, 14, 0),
            run(&t(4, 15 * 64)?, &t(4, 15 * 64)?, 15, 0),
            run(&q, &q, 14, 13),
        ];
        let odd = KvCache::<R, f16>::new(&client, 2, 16, 40)?;
        let q40 = t(4, 14 * 40)?;
        msgs.push(
            attention_prefill_with(&client, PrefillOptions::default(), &q40, &odd, 14, 0, &q40)
                .unwrap_err()
                .to_string(),
        );
        Ok(msgs)
    }
}

#[test]
fn flash_bad_inputs_are_errors() {
    let msgs = run_test(BadInputs);
    let want = [
        "q must be [tokens, 896]",
        "differs from q",
        "cannot share 2 kv heads",
        "exceed the cache of 16 positions",
        "head_dim 40 unsupported",
    ];
    for (m, w) in msgs.iter().zip(want) {
        assert!(m.contains(w), "expected an error with `{w}`, got `{m}`");
    }
}
