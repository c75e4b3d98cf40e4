//! Device-to-device copy bandwidth (the ceiling the kernel benches compare against), as a
//! criterion bench. A placeholder that tests the bench wiring: `cargo bench --bench copy` measures
//! 256 MiB buffers; `cargo test --benches` (scripts/test.sh) runs it once on 1 MiB buffers.

use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use cubecl::prelude::*;
use cubeqwen_kernels::bandwidth::{copy_u32, sync, DEFAULT_COPY_BYTES};
use cubeqwen_kernels::runtime::{dispatch, RuntimeJob};
use cubeqwen_kernels::testing::{fresh_seed, test_device, Rng};
use cubeqwen_kernels::DeviceTensor;

/// Criterion's test mode (`cargo test --benches`, or `cargo bench -- --test`): one run on
/// small shapes, so CI checks every bench on the software device.
fn test_mode() -> bool {
    let args: Vec<String> = std::env::args().collect();
    !args.iter().any(|a| a == "--bench") || args.iter().any(|a| a == "--test")
}

struct CopyBench<'a>(&'a mut Criterion);

impl RuntimeJob for CopyBench<'_> {
    type Output = ();
    fn run<R: Runtime>(self, client: ComputeClient<R>, device: &str) -> anyhow::Result<()> {
        let bytes = if test_mode() {
            1 << 20
        } else {
            DEFAULT_COPY_BYTES
        };
        let len = bytes / size_of::<u32>();
        let mut rng = Rng::new(fresh_seed());
        let data: Vec<u32> = (0..len).map(|_| rng.next_u64() as u32 | 1).collect();
        let src = DeviceTensor::<R, u32>::from_slice(&client, &data, &[len])?;
        let dst = DeviceTensor::<R, u32>::empty(&client, &[len])?;
        let mut g = self.0.benchmark_group(format!("copy ({device})"));
        g.throughput(Throughput::Bytes(2 * bytes as u64)); // read + written
        g.bench_function(format!("{} MiB", bytes >> 20), |b| {
            b.iter_custom(|iters| {
                sync(&client).expect("device sync");
                let t0 = Instant::now();
                for _ in 0..iters {
                    copy_u32(&client, &src, &dst).expect("copy launch");
                }
                sync(&client).expect("device sync");
                t0.elapsed()
            })
        });
        g.finish();
        Ok(())
    }
}

fn copy(c: &mut Criterion) {
    if let Err(e) = dispatch(test_device(), CopyBench(c)) {
        panic!("copy bench: {e:#}");
    }
}

criterion_group! {
    name = benches;
    config = Criterion::default().warm_up_time(Duration::from_secs(1));
    targets = copy
}
criterion_main!(benches);
