//! The grid barrier orders memory across the cubes of one kernel: the relay (each phase reads
//! values another cube wrote one phase before) gives the reference's result after many phases,
//! in one launch and replayed as a CUDA graph, and its one-launch-a-phase twin gives the same.
//! A barrier that let a cube through early would leave a stale value (the relay's values are
//! whole numbers, so the comparison is exact). CUDA only: `#[ignore]`d here, run by
//! `scripts/run-gpu.sh` (with --include-ignored).
#![cfg(feature = "cuda")]

use anyhow::{ensure, Context, Result};
use cubecl::cuda::CudaRuntime;
use cubeqwen_kernels::gridsync::{reference, relay, relay_steps, GraphRecorder, RELAY_UNITS};
use cubeqwen_kernels::runtime::cuda_client;
use cubeqwen_kernels::testing::*;
use cubeqwen_kernels::DeviceTensor;

type R = CudaRuntime;

fn same(got: &[f32], want: &[f32], what: &str) -> Result<()> {
    let bad = got.iter().zip(want).filter(|(g, w)| g != w).count();
    let first = got.iter().zip(want).position(|(g, w)| g != w);
    ensure!(
        bad == 0,
        "{what}: {bad} of {} values differ from the reference, the first at {first:?}",
        want.len()
    );
    Ok(())
}

fn check(seed: u64) -> Result<()> {
    let (client, device) = cuda_client()?;
    println!("test device: {device}");
    let sms = client
        .properties()
        .hardware
        .num_streaming_multiprocessors
        .context("the device reports no multiprocessor count")? as usize;
    let mut rec = GraphRecorder::new(&client)?;
    let mut rng = Rng::new(seed);
    // (cubes per multiprocessor, shift, phases): the shift reaches into the next cube, or
    // seven cubes on.
    for (per_sm, shift, phases) in [(1, RELAY_UNITS + 1, 64), (4, 7 * RELAY_UNITS - 3, 100)] {
        let n = sms * per_sm * RELAY_UNITS;
        let a0: Vec<f32> = rng
            .f32_vec(n, 500.0, 200.0)
            .iter()
            .map(|x| x.round())
            .collect();
        let what = format!("{} cubes, shift {shift}, {phases} phases", n / RELAY_UNITS);
        let a = DeviceTensor::<R, f32>::from_slice(&client, &a0, &[n])?;
        let b = DeviceTensor::<R, f32>::from_slice(&client, &vec![f32::NAN; n], &[n])?;
        let bar = DeviceTensor::<R, u32>::from_slice(&client, &[0], &[1])?;
        rec.wait_for_cubecl()?;
        relay(&mut rec, &a, &b, &bar, shift, phases)?;
        rec.synchronize()?;
        same(&a.to_vec(&client)?, &reference(&a0, shift, phases), &what)?;

        // Replayed three times as a graph (the counter goes on counting across launches).
        let graph = rec.capture(|rec| relay(rec, &a, &b, &bar, shift, phases))?;
        for _ in 0..3 {
            graph.launch()?;
        }
        rec.synchronize()?;
        let want = reference(&a0, shift, 4 * phases);
        same(&a.to_vec(&client)?, &want, &format!("{what}, graph ×3"))?;

        // One launch a phase, from the same start.
        let a = DeviceTensor::<R, f32>::from_slice(&client, &a0, &[n])?;
        rec.wait_for_cubecl()?;
        relay_steps(&mut rec, &a, &b, shift, phases)?;
        rec.synchronize()?;
        same(
            &a.to_vec(&client)?,
            &reference(&a0, shift, phases),
            &format!("{what}, a launch a phase"),
        )?;
        println!("relay exact: {what}, one launch, graph ×3, a launch a phase");
    }
    Ok(())
}

#[test]
#[ignore = "needs CUDA: run on the GPU machine by scripts/run-gpu.sh"]
fn grid_barrier_orders_phases() {
    let seed = fresh_seed();
    let _report = SeedReport {
        test: "grid_barrier_orders_phases",
        seed,
    };
    check(seed).unwrap();
}
