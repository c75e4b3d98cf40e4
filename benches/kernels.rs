//! Kernel benches: each group runs the variants of one kernel family side by side at the
//! Qwen2.5 shapes and prints what each achieved against the ceilings measured in the same run
//! on the same device: the device-to-device copy bandwidth
//! (`cubeqwen_kernels::bandwidth`, 512 MiB buffers, bytes read + written) and, on CUDA, cuBLAS on an 8192³ f16 GEMM.
//!
//! - `matmul`: tiled, cmma, gemv, blocked, auto, cubek (tracel's cubecl matmul), cuBLAS (CUDA), at the
//!   q, k/v, o, gate/up, down and lm_head shapes of 0.5B, 1.5B and 7B, m = 1, 16, 64, 128, 512, 2048;
//!   with `CUBEQWEN_BENCH_TILINGS="tiles=8,rows=1,pk=4;pm=4,pn=4,sm=2,sn=2;cubek"` (CUDA) also
//!   cubek's TMA kernel at each of these tilings (`tma[...]`, from 64 rows); with
//!   `CUBEQWEN_BENCH_MMA_TILES="128x128x64x3;128x128x64x3x64"` the mma kernel at each of these
//!   tiles (`mma[...]`, from 64 rows);
//! - `attention`: prefill of 512/2048/8192 tokens (chunked kernel, flash portable, flash mma), decode at cache 128/4096/32768 (general and
//!   fused decode kernel), against the bytes-moved and FLOP floors;
//! - `small`: RMSNorm (+residual), RoPE, SwiGLU, embedding, top-k, and the fused decode kernels
//!   (at 1.5B and 7B too with `CUBEQWEN_FULL_SHAPES`), against the bandwidth floor;
//! - `sync` (CUDA): a grid barrier inside one kernel against a kernel boundary, µs per phase.
//!
//! Every timed call reads inputs from one of several sets rotated so that a pass touches more
//! than the 50 MB L2; inputs are random, never zeros. Timing: warm-up, then wall clock around
//! many calls with the device synchronised before reading the clock. On CUDA the kernels that
//! the graph recorder can launch (the fused decode kernels) are also timed as graph replays of
//! 20 calls, which leaves out cubecl's ~6 µs launch cost: the `graph` column. A cubecl-launched
//! kernel shorter than that launch cost is timed at the launch cost, and the table says so.
//!
//! Results: a table on stdout at the end, and one JSON record per measurement (fields group,
//! variant, shape, m, n, k, tokens, seconds, gbps, tflops, ceiling_ratio, device) appended to
//! `$CUBEQWEN_BENCH_JSON` when set. `cargo bench --bench kernels [-- FILTER]`; on a CPU-emulated
//! device (`--test` in CI) only the 0.5B shapes with few rows run, once each.

use std::io::Write as _;
use std::time::{Duration, Instant};

use anyhow::Result;
use criterion::{criterion_group, criterion_main, Criterion};
use cubecl::prelude::*;
use cubeqwen_kernels::attention::{attention, KvCache};
use cubeqwen_kernels::bandwidth::measure_copy_bandwidth;
use cubeqwen_kernels::baseline::cubek_matmul;
use cubeqwen_kernels::decode;
use cubeqwen_kernels::elementwise::{embedding, swiglu};
use cubeqwen_kernels::flash::{attention_prefill_with, PrefillKernel, PrefillOptions};
use cubeqwen_kernels::fused_gemv::{gemv_gate_up_swiglu, gemv_qkv};
use cubeqwen_kernels::gemv_mma::GemvMma;
use cubeqwen_kernels::matmul::{
    cmma_supported, cubek_tma, matmul_into_with, MatmulVariant, RowChunked, GEMV_SHORT_ROWS,
};
use cubeqwen_kernels::matmul_mma::MmaTile;
use cubeqwen_kernels::rmsnorm::{residual_add_rms_norm, rms_norm};
use cubeqwen_kernels::rope::{rope_qk_append, Append, RopeTables};
use cubeqwen_kernels::runtime::{dispatch, RuntimeJob};
use cubeqwen_kernels::select::top_k;
use cubeqwen_kernels::switches::CubekTiling;
use cubeqwen_kernels::testing::{full_shapes, test_device, Rng};
use cubeqwen_kernels::DeviceTensor;
use half::f16;

/// Bytes a pass over the rotated input sets must exceed (the H100's L2 is 50 MB).
const ROTATE_BYTES: usize = 128 << 20;

struct Shape {
    model: &'static str,
    d: usize,
    ffn: usize,
    n_heads: usize,
    n_kv: usize,
    hd: usize,
    vocab: usize,
}

const SHAPES: [Shape; 3] = [
    Shape {
        model: "0.5B",
        d: 896,
        ffn: 4864,
        n_heads: 14,
        n_kv: 2,
        hd: 64,
        vocab: 151936,
    },
    Shape {
        model: "1.5B",
        d: 1536,
        ffn: 8960,
        n_heads: 12,
        n_kv: 2,
        hd: 128,
        vocab: 151936,
    },
    Shape {
        model: "7B",
        d: 3584,
        ffn: 18944,
        n_heads: 28,
        n_kv: 4,
        hd: 128,
        vocab: 152064,
    },
];

/// One measurement.
struct Record {
    group: &'static str,
    variant: String,
    shape: String,
    m: usize,
    n: usize,
    k: usize,
    tokens: usize,
    seconds: f64,
    bytes: f64,
    flops: f64,
}

struct Ctx<'c, R: Runtime> {
    client: &'c ComputeClient<R>,
    device: String,
    cuda: bool,
    full: bool,
    copy_gbps: f64,
    gemm_tflops: Option<f64>,
    records: Vec<Record>,
    /// Criterion's filter (the first argument that is not a flag): what it filters out is not
    /// warmed up, and weights no bench will read are not made.
    filter: Option<regex::Regex>,
}

impl<R: Runtime> Ctx<'_, R> {
    fn sync(&self) {
        cubecl::future::block_on(self.client.sync()).expect("device sync");
    }

    /// Whether criterion's filter lets the bench `id` run.
    fn wanted(&self, id: &str) -> bool {
        self.filter
            .as_ref()
            .is_none_or(|f| f.is_match(&format!("kernels/{id}")))
    }

    /// Median seconds per call of `f(i)` (i rotates over the input sets) after a warm-up; NaN
    /// where the filter leaves `id` out.
    fn time(&self, c: &mut Criterion, id: &str, sets: usize, mut f: impl FnMut(usize)) -> f64 {
        if !self.wanted(id) {
            return f64::NAN;
        }
        for i in 0..sets.max(2) {
            f(i % sets);
        }
        self.sync();
        criterion_median(c, id, 1, |iters| {
            self.sync();
            let t = Instant::now();
            for i in 0..iters as usize {
                f(i % sets);
            }
            self.sync();
            t.elapsed()
        })
    }

    /// [`Ctx::time`] of a launch that may be refused (a tiling cubek or the TMA box refuses, a
    /// tile the mma kernel refuses): `None` where the bench is not wanted, or where the first
    /// call fails, which is reported rather than timed.
    fn time_or_skip(
        &self,
        c: &mut Criterion,
        id: &str,
        sets: usize,
        f: impl Fn(usize) -> Result<()>,
    ) -> Option<f64> {
        if !self.wanted(id) {
            return None;
        }
        if let Err(e) = f(0) {
            println!("{id}: skipped: {e:#}");
            return None;
        }
        Some(self.time(c, id, sets, |i| f(i).unwrap()))
    }

    #[allow(clippy::too_many_arguments)]
    fn record(
        &mut self,
        group: &'static str,
        variant: &str,
        shape: String,
        (m, n, k, tokens): (usize, usize, usize, usize),
        seconds: f64,
        bytes: f64,
        flops: f64,
    ) {
        if !seconds.is_finite() {
            return; // filtered out on the command line
        }
        eprintln!(
            "record: {group} | {shape} | m {m} | {variant} | {:.2} µs | {:.0} GB/s | {:.1} TFLOP/s",
            seconds * 1e6,
            bytes / seconds / 1e9,
            flops / seconds / 1e12
        );
        self.records.push(Record {
            group,
            variant: variant.to_string(),
            shape,
            m,
            n,
            k,
            tokens,
            seconds,
            bytes,
            flops,
        });
    }
}

/// Median seconds per unit of work under criterion (its filter applies: NaN when filtered
/// out): `run(iters)` does `iters` iterations of `per_iter` units each, waits for the device,
/// and returns the time it measured.
fn criterion_median(
    c: &mut Criterion,
    id: &str,
    per_iter: usize,
    mut run: impl FnMut(u64) -> Duration,
) -> f64 {
    let mut samples = Vec::new();
    let mut group = c.benchmark_group("kernels");
    group
        .sample_size(10)
        .warm_up_time(Duration::from_millis(200))
        .measurement_time(Duration::from_millis(600));
    group.bench_function(id, |b| {
        b.iter_custom(|iters| {
            let e = run(iters);
            samples.push(e.as_secs_f64() / (iters as usize * per_iter) as f64);
            e
        })
    });
    group.finish();
    median(&mut samples)
}

fn median(v: &mut [f64]) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// How many copies of an input of `bytes` make a pass exceed [`ROTATE_BYTES`].
fn sets_for(bytes: usize) -> usize {
    ROTATE_BYTES.div_ceil(bytes.max(1)).clamp(1, 64)
}

fn f16s<R: Runtime>(
    c: &ComputeClient<R>,
    rng: &mut Rng,
    shape: &[usize],
    std: f64,
) -> DeviceTensor<R, f16> {
    let n = shape.iter().product();
    DeviceTensor::from_slice(c, &rng.f16_vec(n, 0.0, std), shape).unwrap()
}

fn f32s<R: Runtime>(
    c: &ComputeClient<R>,
    rng: &mut Rng,
    shape: &[usize],
    mean: f64,
    std: f64,
) -> DeviceTensor<R, f32> {
    let n = shape.iter().product();
    DeviceTensor::from_slice(c, &rng.f32_vec(n, mean, std), shape).unwrap()
}

fn matmul_group<R: Runtime>(ctx: &mut Ctx<R>, c: &mut Criterion) -> Result<()> {
    #[cfg(feature = "cuda")]
    let cublas = if ctx.cuda {
        Some(cubeqwen_kernels::baseline::Cublas::new()?)
    } else {
        None
    };
    let cmma = cmma_supported(ctx.client);
    let mma = cubeqwen_kernels::flash::mma_supported(ctx.client);
    // cubek's TMA kernel at these tilings, side by side (CUDA, from 64 rows):
    // CUBEQWEN_BENCH_TILINGS="tiles=8,rows=2,pk=4;tiles=8,rows=1,pk=2" (`cubek`: cubek's own
    // blueprint).
    let tilings: Vec<(String, CubekTiling)> =
        bench_list("CUBEQWEN_BENCH_TILINGS", "tma", ctx.cuda)?;
    // The mma matmul at these tiles, side by side (from 64 rows):
    // CUBEQWEN_BENCH_MMA_TILES="128x128x64x3;128x128x64x3x64".
    let mma_tiles: Vec<(String, MmaTile)> = bench_list("CUBEQWEN_BENCH_MMA_TILES", "mma", mma)?;
    let mut rng = Rng::new(5);
    let shapes: &[Shape] = if ctx.full { &SHAPES } else { &SHAPES[..1] };
    for s in shapes {
        let qd = s.n_heads * s.hd;
        let layers: [(&str, usize, usize); 6] = [
            ("q", qd, s.d),
            ("k", s.n_kv * s.hd, s.d), // and v: few outputs, many rows (m ≥ 4n)
            ("o", s.d, qd),
            ("gate", s.ffn, s.d),
            ("down", s.d, s.ffn),
            ("lm_head", s.vocab, s.d),
        ];
        let ms: &[usize] = if ctx.full {
            &[1, 16, 64, 128, 512, 2048]
        } else {
            &[1, 16]
        };
        for &(name, n, k) in &layers {
            if !ctx.full && name != "q" {
                continue;
            }
            let names = [
                "auto", "gemv", "tiled", "blocked", "cmma", "cubek", "mma", "cublas",
            ];
            let names = names
                .iter()
                .copied()
                .chain(tilings.iter().map(|t| t.0.as_str()))
                .chain(mma_tiles.iter().map(|t| t.0.as_str()));
            if !names.into_iter().any(|v| {
                ms.iter()
                    .any(|m| ctx.wanted(&format!("matmul/{} {name}/m{m}/{v}", s.model)))
            }) {
                continue; // no bench reads these weights
            }
            let w_bytes = n * k * 2;
            let sets = sets_for(w_bytes);
            let ws: Vec<RowChunked<R, f16>> = (0..sets)
                .map(|_| {
                    let w = rng.f16_vec(n * k, 0.0, 1.0 / (k as f64).sqrt());
                    RowChunked::upload(ctx.client, &w, n, k).unwrap()
                })
                .collect();
            for &m in ms {
                if m * n * 2 > 1 << 30 {
                    continue; // a 2048-row lm_head output alone is 600 MiB
                }
                let x = f16s(ctx.client, &mut rng, &[m, k], 1.0);
                let y = DeviceTensor::<R, f16>::empty(ctx.client, &[m, n])?;
                let shape = format!("{} {name}", s.model);
                let bytes = (w_bytes + m * k * 2 + m * n * 2) as f64;
                let flops = 2.0 * (m * n * k) as f64;
                let mut variants = vec!["auto"];
                if m <= 64 {
                    variants.push("gemv");
                }
                if m <= 128 && (n * k) < 100_000_000 {
                    variants.push("tiled");
                    variants.push("blocked");
                }
                if cmma {
                    variants.push("cmma");
                }
                if ws[0].chunks.len() == 1 {
                    variants.push("cubek");
                }
                // The project's tensor-core matmul (CUBEQWEN_MMA_TILE sets its tile).
                if mma && m >= 64 {
                    variants.push("mma");
                }
                // The tilings and tiles named in the environment, from 64 rows.
                let client = ctx.client;
                for (v, t) in tilings.iter().filter(|_| m >= 64) {
                    let id = format!("matmul/{shape}/m{m}/{v}");
                    let run = |i: usize| cubek_tma(client, &x, &ws[i].chunks[0], &y, *t);
                    if let Some(secs) = ctx.time_or_skip(c, &id, sets, run) {
                        ctx.record("matmul", v, shape.clone(), (m, n, k, 0), secs, bytes, flops);
                    }
                }
                for (v, t) in mma_tiles.iter().filter(|_| m >= 64) {
                    let id = format!("matmul/{shape}/m{m}/{v}");
                    let run = |i: usize| {
                        let w = &ws[i].chunks[0];
                        matmul_into_with(client, MatmulVariant::Mma, Some(*t), &x, w, None, &y, 0)
                    };
                    if let Some(secs) = ctx.time_or_skip(c, &id, sets, run) {
                        ctx.record("matmul", v, shape.clone(), (m, n, k, 0), secs, bytes, flops);
                    }
                }
                for v in variants {
                    let id = format!("matmul/{shape}/m{m}/{v}");
                    let secs = match v {
                        "cubek" => ctx.time(c, &id, sets, |i| {
                            cubek_matmul(ctx.client, &x, &ws[i].chunks[0], &y).unwrap()
                        }),
                        _ => {
                            let variant: MatmulVariant = v.parse()?;
                            ctx.time(c, &id, sets, |i| {
                                ws[i].matmul(ctx.client, variant, &x, None, &y).unwrap()
                            })
                        }
                    };
                    ctx.record("matmul", v, shape.clone(), (m, n, k, 0), secs, bytes, flops);
                }
                #[cfg(feature = "cuda")]
                if let Some(cb) = cublas
                    .as_ref()
                    .filter(|_| ctx.wanted(&format!("matmul/{shape}/m{m}/cublas")))
                {
                    // Same device buffers; cuBLAS runs on its own stream after cubecl's work.
                    let client = (ctx.client as &dyn std::any::Any)
                        .downcast_ref::<ComputeClient<cubecl::cuda::CudaRuntime>>()
                        .expect("a CUDA client");
                    let cx =
                        DeviceTensor::from_slice(client, &rng.f16_vec(m * k, 0.0, 1.0), &[m, k])?;
                    let cy =
                        DeviceTensor::<cubecl::cuda::CudaRuntime, f16>::empty(client, &[m, n])?;
                    let cws = (&ws as &dyn std::any::Any)
                        .downcast_ref::<Vec<RowChunked<cubecl::cuda::CudaRuntime, f16>>>()
                        .expect("CUDA weights");
                    ctx.sync();
                    let id = format!("matmul/{shape}/m{m}/cublas");
                    for i in 0..sets.max(2) {
                        cb.enqueue(client, &cx, &cws[i % sets], &cy)?;
                    }
                    cb.synchronize()?;
                    let secs = criterion_median(c, &id, 1, |iters| {
                        let t = Instant::now();
                        for i in 0..iters as usize {
                            cb.enqueue(client, &cx, &cws[i % sets], &cy).unwrap();
                        }
                        cb.synchronize().unwrap();
                        t.elapsed()
                    });
                    ctx.record(
                        "matmul",
                        "cublas",
                        shape.clone(),
                        (m, n, k, 0),
                        secs,
                        bytes,
                        flops,
                    );
                }
            }
        }
    }
    Ok(())
}

/// The `;`-separated values of the environment variable `var` (none where it is unset or `on`
/// is false), each parsed and named `prefix[value]` as the bench ids show it; a value that does
/// not parse is an error naming the variable.
fn bench_list<T: std::str::FromStr>(var: &str, prefix: &str, on: bool) -> Result<Vec<(String, T)>>
where
    anyhow::Error: From<T::Err>,
{
    match std::env::var(var) {
        Ok(v) if on => v
            .split(';')
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .map(|t| {
                let v = t
                    .parse()
                    .map_err(|e| anyhow::Error::from(e).context(format!("{var}={t}")))?;
                Ok((format!("{prefix}[{t}]"), v))
            })
            .collect(),
        _ => Ok(Vec::new()),
    }
}

fn attention_group<R: Runtime>(ctx: &mut Ctx<R>, c: &mut Criterion) -> Result<()> {
    let mut rng = Rng::new(9);
    let s = &SHAPES[0];
    let (qd, kvd) = (s.n_heads * s.hd, s.n_kv * s.hd);
    let prefill: &[usize] = if ctx.full { &[512, 2048, 8192] } else { &[64] };
    for &t in prefill {
        let cache = KvCache::<R, f16>::new(ctx.client, s.n_kv, t, s.hd)?;
        cache.append(
            ctx.client,
            &f16s(ctx.client, &mut rng, &[t, kvd], 1.0),
            &f16s(ctx.client, &mut rng, &[t, kvd], 1.0),
            0,
        )?;
        let q = f16s(ctx.client, &mut rng, &[t, qd], 1.0);
        let out = DeviceTensor::<R, f16>::empty(ctx.client, &[t, qd])?;
        // Causal: each query sees (t + 1) / 2 keys on average; q·k and p·v are 2·hd flops each.
        let flops = 4.0 * (s.n_heads * s.hd) as f64 * (t as f64) * (t as f64 + 1.0) / 2.0;
        let bytes = (2 * t * kvd * 2 + 2 * t * qd * 2) as f64;
        let mut variants = vec![
            ("general", None),
            ("flash portable", Some(PrefillKernel::Portable)),
        ];
        if ctx.cuda {
            variants.push(("flash mma", Some(PrefillKernel::Mma)));
        }
        for (name, kernel) in variants {
            let secs = ctx.time(
                c,
                &format!("attention/prefill{t}/{name}"),
                1,
                |_| match kernel {
                    None => attention(ctx.client, &q, &cache, s.n_heads, 0, &out).unwrap(),
                    Some(kernel) => {
                        let options = PrefillOptions {
                            kernel,
                            pack_group: true,
                            splits: None,
                        };
                        attention_prefill_with(ctx.client, options, &q, &cache, s.n_heads, 0, &out)
                            .unwrap()
                    }
                },
            );
            ctx.record(
                "attention",
                name,
                format!("0.5B prefill {t}"),
                (t, 0, 0, t),
                secs,
                bytes,
                flops,
            );
        }
    }
    let depths: &[usize] = if ctx.full {
        &[128, 4096, 32768]
    } else {
        &[128]
    };
    for &len in depths {
        let pos = len - 1;
        let cache = KvCache::<R, f16>::new(ctx.client, s.n_kv, len, s.hd)?;
        cache.append(
            ctx.client,
            &f16s(ctx.client, &mut rng, &[len, kvd], 1.0),
            &f16s(ctx.client, &mut rng, &[len, kvd], 1.0),
            0,
        )?;
        let q = f16s(ctx.client, &mut rng, &[1, qd], 1.0);
        let out = DeviceTensor::<R, f16>::empty(ctx.client, &[1, qd])?;
        let st = decode::DecodeState::new(ctx.client, pos as u32, 0)?;
        let scratch = decode::AttentionScratch::new(ctx.client, s.n_heads, s.hd, len)?;
        let bytes = (2 * len * kvd * 2 + 2 * qd * 2) as f64;
        let flops = 4.0 * (s.n_heads * s.hd * len) as f64;
        let shape = format!("0.5B decode @{len}");
        let secs = ctx.time(c, &format!("attention/decode{len}/general"), 1, |_| {
            attention(ctx.client, &q, &cache, s.n_heads, pos, &out).unwrap()
        });
        ctx.record(
            "attention",
            "general",
            shape.clone(),
            (1, 0, 0, len),
            secs,
            bytes,
            flops,
        );
        let secs = ctx.time(c, &format!("attention/decode{len}/fused"), 1, |_| {
            decode::attention(
                ctx.client, None, &q, &cache, &st, pos, s.n_heads, &scratch, &out,
            )
            .unwrap()
        });
        ctx.record(
            "attention",
            "fused",
            shape.clone(),
            (1, 0, 0, len),
            secs,
            bytes,
            flops,
        );
        #[cfg(feature = "cuda")]
        if ctx.cuda {
            let secs = graph_time(ctx, |rec| {
                decode::attention(
                    ctx.client,
                    Some(rec),
                    &q,
                    &cache,
                    &st,
                    pos,
                    s.n_heads,
                    &scratch,
                    &out,
                )
            })?;
            ctx.record(
                "attention",
                "fused (graph)",
                shape,
                (1, 0, 0, len),
                secs,
                bytes,
                flops,
            );
        }
    }
    Ok(())
}

/// Device seconds per call of `f`, from replays of a CUDA graph of 20 calls (no launch cost).
#[cfg(feature = "cuda")]
fn graph_time<R: Runtime>(
    ctx: &Ctx<R>,
    mut f: impl FnMut(&mut decode::GraphRecorder) -> Result<()>,
) -> Result<f64> {
    let client = (ctx.client as &dyn std::any::Any)
        .downcast_ref::<ComputeClient<cubecl::cuda::CudaRuntime>>()
        .expect("a CUDA client");
    let mut rec = decode::GraphRecorder::new(client)?;
    rec.wait_for_cubecl()?;
    const CALLS: usize = 20;
    let graph = rec.capture(|rec| (0..CALLS).try_for_each(|_| f(rec)))?;
    for _ in 0..3 {
        graph.launch()?;
    }
    rec.synchronize()?;
    let mut samples = Vec::new();
    for _ in 0..15 {
        let t = Instant::now();
        for _ in 0..10 {
            graph.launch()?;
        }
        rec.synchronize()?;
        samples.push(t.elapsed().as_secs_f64() / (10 * CALLS) as f64);
    }
    Ok(median(&mut samples))
}

/// The grid barrier against the kernel boundary it would replace (`cubeqwen_kernels::gridsync`):
/// `PHASES` phases of the relay as one launch with a barrier after each, and as one launch a
/// phase (programmatic dependent launch on sm_90+, as the decode graphs), each captured once as
/// a CUDA graph and replayed; µs per phase, with one cube and four cubes per multiprocessor.
#[cfg(feature = "cuda")]
fn sync_group<R: Runtime>(ctx: &mut Ctx<R>, c: &mut Criterion) -> Result<()> {
    use anyhow::Context as _;
    use cubeqwen_kernels::gridsync::{relay, relay_steps, GraphRecorder, RELAY_UNITS};
    type C = cubecl::cuda::CudaRuntime;
    const PHASES: usize = 32;
    let client = (ctx.client as &dyn std::any::Any)
        .downcast_ref::<ComputeClient<C>>()
        .expect("a CUDA client");
    let sms = client
        .properties()
        .hardware
        .num_streaming_multiprocessors
        .context("no multiprocessor count")? as usize;
    for per_sm in [1, 4] {
        let n = sms * per_sm * RELAY_UNITS;
        let cubes = n / RELAY_UNITS;
        let mut rng = Rng::new(per_sm as u64);
        let a = DeviceTensor::<C, f32>::from_slice(client, &rng.f32_vec(n, 0.0, 1.0), &[n])?;
        let b = DeviceTensor::<C, f32>::from_slice(client, &rng.f32_vec(n, 0.0, 1.0), &[n])?;
        let bar = DeviceTensor::<C, u32>::from_slice(client, &[0], &[1])?;
        for variant in ["barrier", "launch a phase"] {
            let id = format!("sync/{}/{cubes} cubes", variant.replace(' ', "_"));
            let mut rec = GraphRecorder::new(client)?;
            rec.wait_for_cubecl()?;
            let graph = rec.capture(|rec| match variant {
                "barrier" => relay(rec, &a, &b, &bar, RELAY_UNITS + 1, PHASES),
                _ => relay_steps(rec, &a, &b, RELAY_UNITS + 1, PHASES),
            })?;
            let secs = criterion_median(c, &id, PHASES, |iters| {
                rec.synchronize().expect("sync");
                let t = Instant::now();
                for _ in 0..iters {
                    graph.launch().expect("graph launch");
                }
                rec.synchronize().expect("sync");
                t.elapsed()
            });
            ctx.record(
                "sync",
                variant,
                format!("{cubes} cubes × {RELAY_UNITS}"),
                (0, 0, 0, 0),
                secs,
                0.0,
                0.0,
            );
        }
    }
    Ok(())
}

fn small_group<R: Runtime>(ctx: &mut Ctx<R>, c: &mut Criterion) -> Result<()> {
    let mut rng = Rng::new(13);
    let s = &SHAPES[0];
    let (d, ffn, qd, kvd) = (s.d, s.ffn, s.n_heads * s.hd, s.n_kv * s.hd);
    let rows: &[usize] = if ctx.full { &[1, 16, 2048] } else { &[1, 16] };
    for &m in rows {
        let x = f32s(ctx.client, &mut rng, &[m, d], 0.0, 1.0);
        let r = f16s(ctx.client, &mut rng, &[m, d], 1.0);
        let w = f32s(ctx.client, &mut rng, &[d], 1.0, 0.2);
        let h = DeviceTensor::<R, f16>::empty(ctx.client, &[m, d])?;
        let secs = ctx.time(c, &format!("small/rmsnorm/m{m}"), 1, |_| {
            rms_norm(ctx.client, &x, &w, &h, 1e-6).unwrap()
        });
        ctx.record(
            "small",
            "rmsnorm",
            format!("0.5B m{m}"),
            (m, d, 0, 0),
            secs,
            (m * d * 6 + d * 4) as f64,
            0.0,
        );
        let secs = ctx.time(c, &format!("small/residual_rmsnorm/m{m}"), 1, |_| {
            residual_add_rms_norm(ctx.client, &x, &r, &w, &h, 1e-6).unwrap()
        });
        ctx.record(
            "small",
            "residual+rmsnorm",
            format!("0.5B m{m}"),
            (m, d, 0, 0),
            secs,
            (m * d * 12 + d * 4) as f64,
            0.0,
        );
        let tables = RopeTables::new(ctx.client, 1e6, s.hd, m.max(2))?;
        let qx = f16s(ctx.client, &mut rng, &[m, qd], 1.0);
        let kx = f16s(ctx.client, &mut rng, &[m, kvd], 1.0);
        let pos = DeviceTensor::<R, u32>::from_slice(
            ctx.client,
            &(0..m as u32).collect::<Vec<_>>(),
            &[m],
        )?;
        let vx = f16s(ctx.client, &mut rng, &[m, kvd], 1.0);
        let kv = KvCache::<R, f16>::new(ctx.client, s.n_kv, m, s.hd)?;
        // q and k rotated and k, v appended in one launch, as a layer does.
        let secs = ctx.time(c, &format!("small/rope_qk_append/m{m}"), 1, |_| {
            let append = Append {
                v: &vx,
                cache: &kv,
                start: 0,
            };
            rope_qk_append(ctx.client, &qx, &kx, &pos, m - 1, &tables, append).unwrap()
        });
        ctx.record(
            "small",
            "rope+append",
            format!("0.5B q+k, k/v m{m}"),
            (m, qd + kvd, 0, 0),
            secs,
            (m * (qd + kvd) * 4 + m * kvd * 6) as f64,
            0.0,
        );
        let g = f16s(ctx.client, &mut rng, &[m, ffn], 1.0);
        let u = f16s(ctx.client, &mut rng, &[m, ffn], 1.0);
        let o = DeviceTensor::<R, f16>::empty(ctx.client, &[m, ffn])?;
        let secs = ctx.time(c, &format!("small/swiglu/m{m}"), 1, |_| {
            swiglu(ctx.client, &g, &u, &o).unwrap()
        });
        ctx.record(
            "small",
            "swiglu",
            format!("0.5B m{m}"),
            (m, ffn, 0, 0),
            secs,
            (m * ffn * 6) as f64,
            0.0,
        );
        if m <= GEMV_SHORT_ROWS {
            // The fused GEMVs of a short chunk (one launch for q/k/v, one for gate/up + SwiGLU).
            let ws = [qd, kvd, kvd].map(|n| f16s(ctx.client, &mut rng, &[n, d], 0.03));
            let bs = [qd, kvd, kvd].map(|n| f32s(ctx.client, &mut rng, &[n], 0.0, 0.1));
            let [qo, ko, vo] =
                [qd, kvd, kvd].map(|n| DeviceTensor::<R, f16>::empty(ctx.client, &[m, n]));
            let (qo, ko, vo) = (qo?, ko?, vo?);
            let secs = ctx.time(c, &format!("small/gemv_qkv/m{m}"), 1, |_| {
                let (w, b) = ([&ws[0], &ws[1], &ws[2]], [&bs[0], &bs[1], &bs[2]]);
                gemv_qkv(ctx.client, MatmulVariant::Gemv, &h, w, b, [&qo, &ko, &vo]).unwrap()
            });
            let n = qd + 2 * kvd;
            ctx.record(
                "small",
                "gemv q/k/v",
                format!("0.5B m{m}"),
                (m, n, d, 0),
                secs,
                (n * d * 2 + m * (d + n) * 2) as f64,
                (2 * m * n * d) as f64,
            );
            let (wg, wu) = (
                f16s(ctx.client, &mut rng, &[ffn, d], 0.03),
                f16s(ctx.client, &mut rng, &[ffn, d], 0.03),
            );
            let mut variants = vec![MatmulVariant::Gemv];
            if m >= 2 && GemvMma::native(ctx.client).is_some() {
                variants.push(MatmulVariant::GemvMma);
            }
            for v in variants {
                let secs = ctx.time(c, &format!("small/gate_up_swiglu_{v:?}/m{m}"), 1, |_| {
                    gemv_gate_up_swiglu(ctx.client, v, &h, &wg, &wu, &o).unwrap()
                });
                ctx.record(
                    "small",
                    &format!("{v:?} gate/up + swiglu"),
                    format!("0.5B m{m}"),
                    (m, ffn, d, 0),
                    secs,
                    (2 * ffn * d * 2 + m * (d + ffn) * 2) as f64,
                    (4 * m * ffn * d) as f64,
                );
            }
        }
    }
    // Embedding of 2048 tokens and top-k over one vocabulary row.
    let table = RowChunked::upload(ctx.client, &rng.f16_vec(s.vocab * d, 0.0, 1.0), s.vocab, d)?;
    let ids: Vec<u32> = (0..2048)
        .map(|_| (rng.next_u64() % s.vocab as u64) as u32)
        .collect();
    let idd = DeviceTensor::<R, u32>::from_slice(ctx.client, &ids, &[ids.len()])?;
    let out = DeviceTensor::<R, f32>::empty(ctx.client, &[ids.len(), d])?;
    let secs = ctx.time(c, "small/embedding/2048", 1, |_| {
        embedding(ctx.client, &idd, &ids, &table, &out).unwrap()
    });
    ctx.record(
        "small",
        "embedding",
        "0.5B 2048 tokens".into(),
        (2048, d, 0, 0),
        secs,
        (2048 * d * 6) as f64,
        0.0,
    );
    let logits = f32s(ctx.client, &mut rng, &[1, s.vocab], 0.0, 3.0);
    for k in [1, 2] {
        let secs = ctx.time(c, &format!("small/top_k{k}"), 1, |_| {
            top_k(ctx.client, &logits, k).unwrap();
        });
        ctx.record(
            "small",
            &format!("top_k (k={k})"),
            "vocab row".into(),
            (1, s.vocab, 0, 0),
            secs,
            (s.vocab * 4) as f64,
            0.0,
        );
    }
    // The fused decode kernels (one token), cubecl-launched and, on CUDA, as graph replays; the
    // 1.5B and 7B shapes with CUBEQWEN_FULL_SHAPES.
    let shapes: &[Shape] = if ctx.full { &SHAPES } else { &SHAPES[..1] };
    for s in shapes {
        decode_kernels(ctx, c, s, &mut rng)?;
    }
    Ok(())
}

/// The fused decode kernels of one token at shape `s`, cubecl-launched and, on CUDA, as graph
/// replays (their names: `small/decode/{model} {kernel}`).
fn decode_kernels<R: Runtime>(
    ctx: &mut Ctx<R>,
    c: &mut Criterion,
    s: &Shape,
    rng: &mut Rng,
) -> Result<()> {
    let (d, ffn, qd, kvd) = (s.d, s.ffn, s.n_heads * s.hd, s.n_kv * s.hd);
    let xs = f32s(ctx.client, rng, &[1, d], 0.0, 1.0);
    let nw = f32s(ctx.client, rng, &[d], 1.0, 0.2);
    let sets = sets_for((qd + 2 * kvd + d) * d * 2 + 2 * ffn * d * 2 + d * ffn * 2);
    struct L<R: Runtime> {
        wq: DeviceTensor<R, f16>,
        wk: DeviceTensor<R, f16>,
        wv: DeviceTensor<R, f16>,
        bq: DeviceTensor<R, f32>,
        bk: DeviceTensor<R, f32>,
        bv: DeviceTensor<R, f32>,
        wo: DeviceTensor<R, f16>,
        wg: DeviceTensor<R, f16>,
        wu: DeviceTensor<R, f16>,
        wd: DeviceTensor<R, f16>,
    }
    let ls: Vec<L<R>> = (0..sets)
        .map(|_| {
            let sd = 1.0 / (d as f64).sqrt();
            L {
                wq: f16s(ctx.client, rng, &[qd, d], sd),
                wk: f16s(ctx.client, rng, &[kvd, d], sd),
                wv: f16s(ctx.client, rng, &[kvd, d], sd),
                bq: f32s(ctx.client, rng, &[qd], 0.0, 0.5),
                bk: f32s(ctx.client, rng, &[kvd], 0.0, 0.5),
                bv: f32s(ctx.client, rng, &[kvd], 0.0, 0.5),
                wo: f16s(ctx.client, rng, &[d, qd], sd),
                wg: f16s(ctx.client, rng, &[ffn, d], sd),
                wu: f16s(ctx.client, rng, &[ffn, d], sd),
                wd: f16s(ctx.client, rng, &[d, ffn], 1.0 / (ffn as f64).sqrt()),
            }
        })
        .collect();
    let tables = RopeTables::new(ctx.client, 1e6, s.hd, 64)?;
    let cache = KvCache::<R, f16>::new(ctx.client, s.n_kv, 64, s.hd)?;
    let st = decode::DecodeState::new(ctx.client, 17, 0)?;
    let q = DeviceTensor::<R, f16>::empty(ctx.client, &[1, qd])?;
    let a = f16s(ctx.client, rng, &[1, qd], 1.0);
    let sv = f16s(ctx.client, rng, &[1, ffn], 1.0);
    let so = DeviceTensor::<R, f16>::empty(ctx.client, &[1, ffn])?;
    let attn_in = |l: &L<R>, rec: decode::Rec<'_>| {
        let w = decode::AttnInWeights {
            norm: &nw,
            wq: &l.wq,
            wk: &l.wk,
            wv: &l.wv,
            bq: &l.bq,
            bk: &l.bk,
            bv: &l.bv,
        };
        decode::attn_in(
            ctx.client, rec, &xs, &w, &tables, &st, 1e-6, s.n_heads, &q, &cache,
        )
    };
    type Launch<'a, R> = Box<dyn Fn(&L<R>, decode::Rec<'_>) -> Result<()> + 'a>;
    let fused: [(&str, usize, Launch<'_, R>); 4] = [
        (
            "attn_in (norm+qkv+rope+append)",
            (qd + 2 * kvd) * d * 2,
            Box::new(attn_in),
        ),
        (
            "gemv_residual (o)",
            d * qd * 2,
            Box::new(|l: &L<R>, rec: decode::Rec<'_>| {
                decode::gemv_residual(ctx.client, rec, &l.wo, &a, &xs)
            }),
        ),
        (
            "ffn_in (norm+gate/up+swiglu)",
            2 * ffn * d * 2,
            Box::new(|l: &L<R>, rec: decode::Rec<'_>| {
                decode::ffn_in(ctx.client, rec, &xs, &nw, &l.wg, &l.wu, 1e-6, &so)
            }),
        ),
        (
            "gemv_residual (down)",
            d * ffn * 2,
            Box::new(|l: &L<R>, rec: decode::Rec<'_>| {
                decode::gemv_residual(ctx.client, rec, &l.wd, &sv, &xs)
            }),
        ),
    ];
    for (name, bytes, f) in fused.iter() {
        let name = format!("{} {name}", s.model);
        let secs = ctx.time(c, &format!("small/decode/{name}"), sets, |i| {
            f(&ls[i], None).unwrap()
        });
        ctx.record(
            "decode",
            "cubecl launch",
            name.clone(),
            (1, 0, 0, 0),
            secs,
            *bytes as f64,
            0.0,
        );
        #[cfg(feature = "cuda")]
        if ctx.cuda {
            let mut i = 0;
            let secs = graph_time(ctx, |rec| {
                i += 1;
                f(&ls[i % sets], Some(rec))
            })?;
            ctx.record(
                "decode",
                "graph",
                name.clone(),
                (1, 0, 0, 0),
                secs,
                *bytes as f64,
                0.0,
            );
        }
    }
    Ok(())
}

struct Job<'a>(&'a mut Criterion);

impl RuntimeJob for Job<'_> {
    type Output = ();
    fn run<R: Runtime>(self, client: ComputeClient<R>, device: &str) -> Result<()> {
        let c = self.0;
        let cuda = device.starts_with("cuda");
        let mut ctx = Ctx {
            client: &client,
            device: device.to_string(),
            cuda,
            full: cuda || full_shapes(),
            copy_gbps: 0.0,
            gemm_tflops: None,
            records: Vec::new(),
            filter: std::env::args()
                .skip(1)
                .find(|a| !a.starts_with('-'))
                .map(|f| regex::Regex::new(&f))
                .transpose()?,
        };
        eprintln!("kernel benches on {device}");
        let copy_bytes = if ctx.full { 512 << 20 } else { 16 << 20 };
        ctx.copy_gbps = measure_copy_bandwidth(&client, copy_bytes, 5, 10)?.best_gbps();
        #[cfg(feature = "cuda")]
        if cuda {
            ctx.gemm_tflops = Some(cublas_ceiling(&ctx)?);
        }
        matmul_group(&mut ctx, c)?;
        attention_group(&mut ctx, c)?;
        small_group(&mut ctx, c)?;
        #[cfg(feature = "cuda")]
        if cuda {
            sync_group(&mut ctx, c)?;
        }
        report(&ctx)
    }
}

/// cuBLAS on an 8192³ f16 GEMM (f32 compute): the matrix ceiling of this run.
#[cfg(feature = "cuda")]
fn cublas_ceiling<R: Runtime>(ctx: &Ctx<R>) -> Result<f64> {
    let client = (ctx.client as &dyn std::any::Any)
        .downcast_ref::<ComputeClient<cubecl::cuda::CudaRuntime>>()
        .expect("a CUDA client");
    let n = 8192;
    let mut rng = Rng::new(21);
    let x = DeviceTensor::from_slice(client, &rng.f16_vec(n * n, 0.0, 1.0), &[n, n])?;
    let w = RowChunked::upload(client, &rng.f16_vec(n * n, 0.0, 0.01), n, n)?;
    let y = DeviceTensor::<cubecl::cuda::CudaRuntime, f16>::empty(client, &[n, n])?;
    let cb = cubeqwen_kernels::baseline::Cublas::new()?;
    cb.matmul(client, &x, &w, &y)?;
    let mut samples = Vec::new();
    for _ in 0..5 {
        let t = Instant::now();
        for _ in 0..5 {
            cb.enqueue(client, &x, &w, &y)?;
        }
        cb.synchronize()?;
        samples.push(t.elapsed().as_secs_f64() / 5.0);
    }
    Ok(2.0 * (n as f64).powi(3) / median(&mut samples) / 1e12)
}

fn report<R: Runtime>(ctx: &Ctx<R>) -> Result<()> {
    println!("\n## Kernel benches on {}", ctx.device);
    println!(
        "ceilings measured in this run: copy {:.0} GB/s (read + write){}",
        ctx.copy_gbps,
        ctx.gemm_tflops
            .map(|t| format!("; cuBLAS 8192³ f16 GEMM {t:.0} TFLOP/s"))
            .unwrap_or_default()
    );
    println!("\n| group | shape | m | variant | µs | GB/s | % copy | TFLOP/s | % cuBLAS |");
    println!("|---|---|---|---|---|---|---|---|---|");
    let mut json = std::env::var_os("CUBEQWEN_BENCH_JSON").map(|p| {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(p)
            .expect("CUBEQWEN_BENCH_JSON")
    });
    for r in &ctx.records {
        let gbps = r.bytes / r.seconds / 1e9;
        let tflops = r.flops / r.seconds / 1e12;
        let bw = gbps / ctx.copy_gbps;
        let mx = ctx.gemm_tflops.map(|t| tflops / t);
        println!(
            "| {} | {} | {} | {} | {:.1} | {:.0} | {:.0}% | {} | {} |",
            r.group,
            r.shape,
            r.m,
            r.variant,
            r.seconds * 1e6,
            gbps,
            100.0 * bw,
            if r.flops > 0.0 {
                format!("{tflops:.1}")
            } else {
                "-".into()
            },
            mx.filter(|_| r.flops > 0.0)
                .map(|v| format!("{:.0}%", 100.0 * v))
                .unwrap_or("-".into()),
        );
        if let Some(f) = json.as_mut() {
            let rec = serde_json::json!({
                "group": r.group, "variant": r.variant, "shape": r.shape, "m": r.m, "n": r.n,
                "k": r.k, "tokens": r.tokens, "seconds": r.seconds, "gbps": gbps,
                "tflops": tflops, "ceiling_ratio": mx.filter(|_| r.flops > 0.0).unwrap_or(bw),
                "copy_gbps": ctx.copy_gbps, "gemm_tflops": ctx.gemm_tflops, "device": ctx.device,
            });
            writeln!(f, "{rec}")?;
        }
    }
    Ok(())
}

fn kernels(c: &mut Criterion) {
    if let Err(e) = dispatch(test_device(), Job(c)) {
        panic!("kernel benches: {e:#}");
    }
}

criterion_group!(benches, kernels);
criterion_main!(benches);
