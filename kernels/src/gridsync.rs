//! A barrier across all cubes of one kernel (CUDA graph launches only), and the relay kernels
//! that test it and time it against the kernel boundary it would replace.
//!
//! A decode layer is five kernels because each one reads all of what the one before wrote (the
//! attention needs every head's q, k and v; the o-projection every head's output; ...). With
//! programmatic dependent launch, each boundary still costs the last cubes' drain and the next
//! kernel's start. A kernel whose cubes are all resident at once can instead wait for each other
//! in [`grid_barrier`]: each cube counts itself in on one atomic counter and spins until all
//! have. cubecl 0.10 has no memory fence in its IR, so the barrier places
//! `// cubeqwen:fence` comments that the graph recorder compiles to `__threadfence()` (as it
//! compiles the decode kernels' grid-dependency marker); launched any other way the barrier
//! would not order memory, which is why this module takes a [`GraphRecorder`].
//!
//! [`relay`] runs `phases` phases in one launch, a barrier after each; [`relay_steps`] runs
//! them as `phases` launches. In both, phase p writes `dst[i] = src[(i + shift) % n] + 1` with
//! `src` the buffer phase p − 1 wrote, so a unit reads what another cube wrote one phase
//! earlier: a barrier that lets a cube through early leaves a stale value behind
//! (`kernels/tests/gridsync.rs`). The kernel benches (`sync/`) time both per phase: on the H100
//! the barrier measured 1.7–2.3 µs a phase against 0.9–1.1 µs for a launch a phase with
//! programmatic dependent launch (BENCHMARKS.md, 2026-11-28).
//!
//! A kernel built on the barrier must take every buffer that one phase writes and a later one
//! reads as `&mut`: cubecl declares read-only buffers `const __restrict__`, which lets the
//! compiler read them through the non-coherent cache.

use anyhow::{ensure, Result};
use cubecl::prelude::*;

use crate::decode::grid_dependency;
use crate::launch::launch;
use crate::DeviceTensor;

pub use crate::graph::GraphRecorder;

/// Units per cube of the relay kernels.
pub const RELAY_UNITS: usize = 256;
/// Relay cubes per multiprocessor, at most: 4 × 256 units, half of the 2048 an NVIDIA
/// multiprocessor holds since Volta (the kernel needs few registers and no shared memory).
const MAX_RESIDENT: u32 = 4;

/// Where the graph recorder places `__threadfence()` (see the module docs).
#[cube]
fn fence() {
    comment!("cubeqwen:fence");
}

/// Waits until every cube of the launch (`cubes` of them, all resident at once) has called it
/// as often as this one; writes made before the call by any cube are visible to every unit
/// after it. `bar[0]` must start at a multiple of `cubes` (0) and be used by this launch only:
/// each call adds `cubes` to it.
#[cube]
pub fn grid_barrier(bar: &Array<Atomic<u32>>, cubes: u32) {
    sync_cube();
    if UNIT_POS == 0 {
        fence();
        let arrived = bar[0].fetch_add(1u32);
        let target = (arrived / cubes + 1) * cubes;
        loop {
            if bar[0].load() >= target {
                break;
            }
        }
        fence();
    }
    sync_cube();
}

/// One phase of the relay: `dst[i] = src[(i + shift) % n] + 1`.
#[cube]
fn relay_phase(src: &Array<f32>, dst: &mut Array<f32>, n: usize, shift: usize) {
    let i = ABSOLUTE_POS;
    if i < n {
        dst[i] = src[(i + shift) % n] + 1.0;
    }
}

/// One phase per launch, after the launches before it (their grid dependency).
#[cube(launch)]
fn relay_step_kernel(src: &Array<f32>, dst: &mut Array<f32>, n: usize, shift: usize) {
    grid_dependency();
    relay_phase(src, dst, n, shift);
}

/// `phases` phases in one launch, alternating `a → b` and `b → a`, a [`grid_barrier`] after
/// each.
#[cube(launch)]
fn relay_kernel(
    a: &mut Array<f32>,
    b: &mut Array<f32>,
    bar: &Array<Atomic<u32>>,
    n: usize,
    shift: usize,
    phases: usize,
) {
    grid_dependency();
    let cubes = CUBE_COUNT as u32;
    for p in 0..phases {
        if p % 2 == 0 {
            relay_phase(a, b, n, shift);
        } else {
            relay_phase(b, a, n, shift);
        }
        grid_barrier(bar, cubes);
    }
}

/// The cube count of a relay over `n` values: one unit a value.
fn relay_cubes(n: usize) -> Result<u32> {
    ensure!(
        n > 0 && n.is_multiple_of(RELAY_UNITS),
        "relay: {n} values, not a multiple of {RELAY_UNITS}"
    );
    Ok((n / RELAY_UNITS) as u32)
}

/// `phases` phases of the relay over `a` and `b` (`n` values each; the result is in `a` after
/// an even number of phases) as one launch with a grid barrier after each phase. The launch's
/// `n / RELAY_UNITS` cubes must all fit the device at once (at most a few per multiprocessor);
/// `bar` is a one-value counter, zero before the first call, that only this relay uses.
pub fn relay(
    rec: &mut GraphRecorder,
    a: &DeviceTensor<cubecl::cuda::CudaRuntime, f32>,
    b: &DeviceTensor<cubecl::cuda::CudaRuntime, f32>,
    bar: &DeviceTensor<cubecl::cuda::CudaRuntime, u32>,
    shift: usize,
    phases: usize,
) -> Result<()> {
    let n = a.len();
    ensure!(b.len() == n && bar.len() == 1, "relay: buffers do not fit");
    let cubes = relay_cubes(n)?;
    // All cubes must be resident at once, or the first ones spin for ever: the relay kernel
    // is small enough for MAX_RESIDENT a multiprocessor on any CUDA GPU this runs on.
    let sms = rec
        .client()
        .properties()
        .hardware
        .num_streaming_multiprocessors;
    ensure!(
        sms.is_some_and(|sms| cubes <= sms * MAX_RESIDENT),
        "relay: {cubes} cubes may not all be resident on {sms:?} multiprocessors"
    );
    let count = CubeCount::new_1d(cubes);
    type R = cubecl::cuda::CudaRuntime; // the macro's cubecl arm, never taken here
    let client = rec.client().clone();
    launch!(Some(rec), &client, relay_kernel::RelayKernel<>, count, CubeDim::new_1d(RELAY_UNITS as u32);
        sizes []; arrays [a => 1, b => 1, bar => 1];
        scalars [usize n, usize shift, usize phases];
        comptime [])
}

/// The same phases as [`relay`], one launch each.
pub fn relay_steps(
    rec: &mut GraphRecorder,
    a: &DeviceTensor<cubecl::cuda::CudaRuntime, f32>,
    b: &DeviceTensor<cubecl::cuda::CudaRuntime, f32>,
    shift: usize,
    phases: usize,
) -> Result<()> {
    let n = a.len();
    ensure!(b.len() == n, "relay: buffers do not fit");
    let cubes = relay_cubes(n)?;
    type R = cubecl::cuda::CudaRuntime; // the macro's cubecl arm, never taken here
    let client = rec.client().clone();
    for p in 0..phases {
        let (src, dst) = if p % 2 == 0 { (a, b) } else { (b, a) };
        launch!(Some(&mut *rec), &client, relay_step_kernel::RelayStepKernel<>,
            CubeCount::new_1d(cubes), CubeDim::new_1d(RELAY_UNITS as u32);
            sizes []; arrays [src => 1, dst => 1];
            scalars [usize n, usize shift];
            comptime [])?;
    }
    Ok(())
}

/// Reference: the relay's `a` after an even number of `phases` from `a0`.
pub fn reference(a0: &[f32], shift: usize, phases: usize) -> Vec<f32> {
    let n = a0.len();
    let mut cur = a0.to_vec();
    for _ in 0..phases {
        cur = (0..n).map(|i| cur[(i + shift) % n] + 1.0).collect();
    }
    cur
}
