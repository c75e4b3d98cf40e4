//! The grid barrier orders memory across the cubes of one kernel: the relay (each phase reads
//! values another cube wrote one phase before) gives the reference's result after many phases,
//! in one launch and replayed as a CUDA graph, and its one-launch-a-phase twin gives the same.
//! A barrier that let a cube through early would leave a stale value (the relay's values are
//! whole numbers, so the comparison is exact). The graph recorder's timeline, taken of the
//! launch-a-phase relay, records every warp and orders each launch after the one before. CUDA
//! only: `#[ignore]`d here, run by
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

fn multiprocessors(client: &cubecl::prelude::ComputeClient<R>) -> Result<usize> {
    Ok(client
        .properties()
        .hardware
        .num_streaming_multiprocessors
        .context("the device reports no multiprocessor count")? as usize)
}

fn check(seed: u64) -> Result<()> {
    let (client, device) = cuda_client()?;
    println!("test device: {device}");
    let sms = multiprocessors(&client)?;
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

/// The graph recorder's timeline (per-warp timestamps) of the relay as a launch a phase,
/// captured and replayed: every warp of every launch is recorded, the relay is still exact,
/// and no launch gets past its grid-dependency wait (or, without one, starts) before the
/// launch before it has ended: the kernel boundary the timeline measures is a real one. (With
/// one slot atomic a warp instead of a cube, the first launch's end stamps came up to 2.4 µs
/// after the second launch was past its wait, on the H100: this check failed.)
fn timeline(seed: u64) -> Result<()> {
    let (client, _) = cuda_client()?;
    let sms = multiprocessors(&client)?;
    let mut rec = GraphRecorder::with_timeline(&client, true)?;
    let mut rng = Rng::new(seed);
    let (n, shift, phases) = (2 * sms * RELAY_UNITS, RELAY_UNITS + 3, 16);
    let a0: Vec<f32> = rng
        .f32_vec(n, 0.0, 100.0)
        .iter()
        .map(|x| x.round())
        .collect();
    let a = DeviceTensor::<R, f32>::from_slice(&client, &a0, &[n])?;
    let b = DeviceTensor::<R, f32>::from_slice(&client, &vec![f32::NAN; n], &[n])?;
    rec.wait_for_cubecl()?;
    let graph = rec.capture(|rec| relay_steps(rec, &a, &b, shift, phases))?;
    let launches = rec.timeline_launches();
    ensure!(
        launches.len() == phases && launches.iter().all(|l| l.cubes as usize == n / RELAY_UNITS),
        "timeline: {} launches recorded for {phases} phases",
        launches.len()
    );
    rec.timeline_reset()?;
    graph.launch()?;
    let times = rec.timeline_read(&launches)?;
    same(
        &a.to_vec(&client)?,
        &reference(&a0, shift, phases),
        "relay with a timeline",
    )?;
    // Timestamps tick every 32 ns on the H100; a launch's own end is written just before its
    // warps return.
    const SLACK_NS: u64 = 500;
    let t0 = times[0].start;
    let rel = |t: u64| t as i64 - t0 as i64;
    for (i, t) in times.iter().enumerate() {
        println!(
            "launch {i}: start {} wait {:?} end {} (ns from the first start)",
            rel(t.start),
            t.wait.map(rel),
            rel(t.end)
        );
    }
    for (i, t) in times.iter().enumerate() {
        let past = t.wait.unwrap_or(t.start);
        ensure!(
            t.start <= past && past <= t.end,
            "launch {i}: start {}, past its wait {past}, end {}",
            t.start,
            t.end
        );
        if i > 0 {
            let before = times[i - 1].end;
            ensure!(
                past + SLACK_NS >= before,
                "launch {i} got past its wait at {past} ns, {} ns before launch {} ended",
                before - past,
                i - 1
            );
        }
    }
    let span = times[phases - 1].end - times[0].start;
    println!(
        "timeline: {phases} launches of {} cubes in order, {:.2} µs a phase",
        n / RELAY_UNITS,
        span as f64 / 1e3 / phases as f64
    );
    Ok(())
}

#[test]
#[ignore = "needs CUDA: run on the GPU machine by scripts/run-gpu.sh"]
fn timeline_orders_launches() {
    let seed = fresh_seed();
    let _report = SeedReport {
        test: "timeline_orders_launches",
        seed,
    };
    timeline(seed).unwrap();
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
