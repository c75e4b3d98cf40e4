//! The copy kernel behind the bandwidth ceiling: an exact copy at every vector width, and a
//! measurement that returns positive, finite figures.

use anyhow::{ensure, Result};
use cubecl::prelude::*;
use cubeqwen_kernels::bandwidth::{copy_u32, copy_vector_size, measure_copy_bandwidth};
use cubeqwen_kernels::runtime::RuntimeJob;
use cubeqwen_kernels::testing::*;
use cubeqwen_kernels::DeviceTensor;

struct Copy(u64);
impl RuntimeJob for Copy {
    type Output = ();
    fn run<R: Runtime>(self, client: ComputeClient<R>, _device: &str) -> Result<()> {
        let mut rng = Rng::new(self.0);
        // Lengths that take the widest vector, a narrower one and scalar copies; more than
        // 65535 cubes of 256 units in the first (the grid spreads over y).
        for len in [(1 << 24) + 4096, 4 * 1000 + 2, 1_000_003] {
            let src: Vec<u32> = (0..len).map(|_| rng.next_u64() as u32).collect();
            let s = DeviceTensor::<R, u32>::from_slice(&client, &src, &[len])?;
            let d = DeviceTensor::<R, u32>::from_slice(&client, &vec![0xDEAD_BEEF; len], &[len])?;
            copy_u32(&client, &s, &d)?;
            let got = d.to_vec(&client)?;
            let bad = got.iter().zip(&src).position(|(a, b)| a != b);
            ensure!(
                bad.is_none(),
                "copy of {len} u32s (vector {}) differs at {bad:?}",
                copy_vector_size(&client, len)
            );
            println!(
                "copy of {len} u32s exact (vector size {})",
                copy_vector_size(&client, len)
            );
        }
        let d = DeviceTensor::<R, u32>::empty(&client, &[7])?;
        let s = DeviceTensor::<R, u32>::empty(&client, &[8])?;
        ensure!(
            copy_u32(&client, &s, &d).is_err(),
            "a copy between different lengths was not refused"
        );
        Ok(())
    }
}

#[test]
fn copy_is_exact_at_every_vector_width() {
    run_test(Copy(fresh_seed()));
}

struct Measure;
impl RuntimeJob for Measure {
    type Output = ();
    fn run<R: Runtime>(self, client: ComputeClient<R>, device: &str) -> Result<()> {
        let bw = measure_copy_bandwidth(&client, 8 << 20, 3, 2)?;
        ensure!(bw.samples_gbps.len() == 3, "{bw:?}");
        ensure!(
            bw.samples_gbps.iter().all(|g| g.is_finite() && *g > 0.0),
            "{bw:?}"
        );
        ensure!(bw.buffer_bytes == 8 << 20, "{bw:?}");
        println!("{device}: copy {:.1} GB/s ({bw:?})", bw.best_gbps());
        ensure!(
            measure_copy_bandwidth(&client, 16, 1, 1).is_err(),
            "a 16-byte buffer was accepted"
        );
        ensure!(
            measure_copy_bandwidth(&client, 1 << 20, 0, 1).is_err(),
            "zero samples were accepted"
        );
        Ok(())
    }
}

#[test]
fn copy_bandwidth_is_measured() {
    run_test(Measure);
}
