//! One decode step of the Qwen2.5-0.5B shape (random weights), three ways, in one run:
//! `general` (the prefill kernels on one token, launched by cubecl: the engine before the
//! fused kernels), `fused` (the fused decode kernels, launched by cubecl) and `graphs` (the
//! fused kernels replayed as a CUDA graph; CUDA only). A step is what generation does per
//! token: the step, then reading the chosen id back. Context depths 5 and 4000.
//!
//! `cargo bench --bench decode`; on a CPU-emulated device (CI, `--test`) a 2-layer model of the
//! same widths stands in for the 24 layers, at depth 5 only.

use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion};
use cubecl::prelude::*;
use cubeqwen::forward::Session;
use cubeqwen::model::DeviceModel;
use cubeqwen_kernels::runtime::{dispatch, RuntimeJob};
use cubeqwen_kernels::testing::{full_shapes, test_device, Rng};
use cubeqwen_loaders::{qwen25_config, random_qwen2, Qwen2Config};

fn config(layers: usize) -> Qwen2Config {
    Qwen2Config {
        layers,
        ..qwen25_config("0.5b").expect("a known shape")
    }
}

struct Bench<'a>(&'a mut Criterion);

impl RuntimeJob for Bench<'_> {
    type Output = ();
    fn run<R: Runtime>(self, client: ComputeClient<R>, device: &str) -> anyhow::Result<()> {
        let is_cuda = device.starts_with("cuda");
        let full = is_cuda || full_shapes();
        let cfg = config(if full { 24 } else { 2 });
        eprintln!(
            "decode bench on {device}: {} layers of the 0.5B shape",
            cfg.layers
        );
        let host = random_qwen2(&cfg, 7);
        let max_ctx = 4200;
        let model = DeviceModel::upload(&client, &host, max_ctx)?;
        drop(host);
        let mut rng = Rng::new(11);
        let prompt: Vec<u32> = (0..4000)
            .map(|_| (rng.next_u64() % 151936) as u32)
            .collect();
        let mut group = self.0.benchmark_group("decode_step_0.5b");
        group
            .sample_size(10)
            .measurement_time(Duration::from_secs(3));
        let depths: &[usize] = if full { &[5, 4000] } else { &[5] };
        for &depth in depths {
            for way in ["general", "fused", "graphs"] {
                if way == "graphs" && !is_cuda {
                    eprintln!("decode bench: `graphs` needs CUDA; not run on {device}");
                    continue;
                }
                let mut s = Session::new(&client, &model, max_ctx)?;
                s.fused_decode = way != "general";
                s.use_graphs = way == "graphs";
                s.prefill(&client, &prompt[..depth])?;
                // Warm up (compilation, graph capture), then time whole steps.
                for _ in 0..3 {
                    s.decode(&client)?;
                    s.top2(&client)?;
                }
                let start_len = s.len;
                group.bench_function(format!("{way}/depth{depth}"), |b| {
                    b.iter_custom(|iters| {
                        let t = Instant::now();
                        for _ in 0..iters {
                            if s.len + 1 >= max_ctx {
                                // Start over at the same depth.
                                s.len = start_len;
                            }
                            s.decode(&client).unwrap();
                            s.top2(&client).unwrap();
                        }
                        t.elapsed()
                    })
                });
            }
        }
        group.finish();
        Ok(())
    }
}

fn decode(c: &mut Criterion) {
    if let Err(e) = dispatch(test_device(), Bench(c)) {
        panic!("decode bench: {e:#}");
    }
}

criterion_group!(benches, decode);
criterion_main!(benches);
