//! The cube reduction (`cubeqwen_kernels::reduce`) behind RMSNorm, GEMV, attention and top-k:
//! sums, maxima and minima over groups of every width the kernels use, through the
//! shared-memory tree on every device and through plane operations where the device has them
//! (CUDA), each unit's result checked, not just the first unit's. On software Vulkan the plane
//! path runs too (see [`plane_to_check`]), so CI checks the code the GPU runs.

use anyhow::{ensure, Result};
use cubecl::prelude::*;
use cubeqwen_kernels::reduce::{plane_width, reduce_max, reduce_min, reduce_sum, Reduction};
use cubeqwen_kernels::testing::*;
use cubeqwen_kernels::{device_test, DeviceTensor};

/// Every unit writes what the reductions of its group gave it.
#[cube(launch)]
fn reduce_kernel(
    values: &Array<f32>,
    ids: &Array<u32>,
    sums: &mut Array<f32>,
    maxima: &mut Array<f32>,
    minima: &mut Array<u32>,
    #[comptime] how: Reduction,
) {
    let idx = CUBE_POS * how.units + UNIT_POS as usize;
    let sum = reduce_sum::<f32>(values[idx], how);
    let max = reduce_max::<f32>(values[idx], how);
    // Twice in a loop, as top-k does: the second round must not see the first's values.
    let mut min = 0u32;
    for round in 0..2u32 {
        min = reduce_min::<u32>(ids[idx] + round, how);
    }
    sums[idx] = sum;
    maxima[idx] = max;
    minima[idx] = min - 1;
}

/// Sums of f32 values ~ N(0.3, 2²) in any order agree with the f64 sum to a few f32 ulps of
/// the group's magnitudes; 1e-5 relative to Σ|v| is ≫ that and ≪ one value left out.
const SUM_TOL: f64 = 1e-5;

fn check<R: Runtime>(client: &ComputeClient<R>, how: Reduction, seed: u64) -> Result<()> {
    let cubes = 3;
    let n = cubes * how.units;
    let mut rng = Rng::new(seed ^ (how.units * 1000 + how.group * 10 + how.plane) as u64);
    let values = rng.f32_vec(n, 0.3, 2.0);
    let ids: Vec<u32> = (0..n)
        .map(|_| (rng.next_u64() % 1_000_000) as u32 + 1)
        .collect();
    let vd = DeviceTensor::<R, f32>::from_slice(client, &values, &[n])?;
    let idd = DeviceTensor::<R, u32>::from_slice(client, &ids, &[n])?;
    let sums = DeviceTensor::<R, f32>::from_slice(client, &vec![f32::NAN; n], &[n])?;
    let maxima = DeviceTensor::<R, f32>::from_slice(client, &vec![f32::NAN; n], &[n])?;
    let minima = DeviceTensor::<R, u32>::from_slice(client, &vec![u32::MAX; n], &[n])?;
    reduce_kernel::launch::<R>(
        client,
        CubeCount::new_1d(cubes as u32),
        CubeDim::new_1d(how.units as u32),
        vd.arg(),
        idd.arg(),
        sums.arg(),
        maxima.arg(),
        minima.arg(),
        how,
    );
    let (sums, maxima, minima) = (
        sums.to_vec(client)?,
        maxima.to_vec(client)?,
        minima.to_vec(client)?,
    );
    let mut worst = 0.0f64;
    for (g, group) in values.chunks(how.group).enumerate() {
        let ids = &ids[g * how.group..][..how.group];
        let want_sum: f64 = group.iter().map(|&v| v as f64).sum();
        let scale: f64 = group.iter().map(|&v| (v as f64).abs()).sum();
        let want_max = group.iter().cloned().fold(f32::MIN, f32::max);
        let want_min = *ids.iter().min().unwrap();
        for u in g * how.group..(g + 1) * how.group {
            let err = (sums[u] as f64 - want_sum).abs() / scale;
            ensure!(
                err <= SUM_TOL,
                "{how:?} unit {u}: sum {} vs {want_sum} (error {err:.2e} of Σ|v|)",
                sums[u]
            );
            worst = worst.max(err);
            ensure!(
                maxima[u] == want_max,
                "{how:?} unit {u}: max {} vs {want_max}",
                maxima[u]
            );
            ensure!(
                minima[u] == want_min,
                "{how:?} unit {u}: min {} vs {want_min}",
                minima[u]
            );
        }
    }
    println!("{how:?}: max, min exact; sum error {worst:.2e} of Σ|v| (seed {seed})");
    Ok(())
}

device_test! {
    fn reduce_sum_max_min_over_groups<R>(client, seed) {
        // (units, group): RMSNorm and top-k (256 as one), attention (128), the flash mma
        // kernel's quads (128 in groups of 4), the GEMV shapes
        // (8×32 and 32×8 units in groups of 8 and 32), and the edges (2, a cube of 32, of 8,
        // cubes that are not a power of two as CUBEQWEN_GEMV_SHAPE allows: 32×3, 8×3).
        let shapes = [
            (256, 256),
            (128, 128),
            (256, 8),
            (256, 32),
            (256, 2),
            (128, 4),
            (32, 32),
            (8, 8),
            (96, 32),
            (24, 8),
        ];
        let plane = plane_to_check(client);
        match (plane, plane_width(client)) {
            (Some(width), Some(_)) => println!("planes of {width}: both paths checked"),
            (Some(width), None) => println!(
                "planes of {width} (not used by the kernels here, checked for the GPU's sake): \
                 both paths checked"
            ),
            (None, _) => println!("no fixed plane width: only the shared-memory tree checked"),
        }
        for plane in [Some(0), plane].into_iter().flatten() {
            for (units, group) in shapes {
                check(client, Reduction::with_plane(units, group, plane), seed)?;
            }
        }
        Ok(())
    }
}

/// The plane width to check the plane path with: the device's where the kernels use planes;
/// else one fixed width the hardware reports. cubecl uses no plane operations on a
/// CPU-emulated device (lavapipe reports planes of 8), but the shaders run there, so CI checks
/// the path that CUDA takes.
fn plane_to_check<R: Runtime>(client: &ComputeClient<R>) -> Option<usize> {
    plane_width(client).or_else(|| {
        let hw = &client.properties().hardware;
        let width = hw.plane_size_max as usize;
        (hw.plane_size_min == hw.plane_size_max && width.is_power_of_two() && width > 1)
            .then_some(width)
    })
}
