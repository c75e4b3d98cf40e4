//! `cubeqwen selftest`: runs each kernel once on the picked device against its f64 reference.

use anyhow::{ensure, Result};
use cubecl::prelude::*;
use cubeqwen_kernels::testing::{f16_to_f64, f32_to_f64, rel_err, Rng, POISON_F16};
use cubeqwen_kernels::{rmsnorm, DeviceTensor};
use half::f16;

/// One line of the report.
pub struct Check {
    pub name: String,
    pub rel_err: f64,
    pub tol: f64,
}

pub struct SelfTest {
    pub seed: u64,
}

impl crate::RuntimeJob for SelfTest {
    type Output = Vec<Check>;
    fn run<R: Runtime>(self, client: ComputeClient<R>, _device: &str) -> Result<Vec<Check>> {
        let mut rng = Rng::new(self.seed);
        let mut checks = Vec::new();
        for (rows, cols) in [(1, 896), (7, 896), (5, 4864)] {
            let x = rng.f16_vec(rows * cols, 0.2, 1.5);
            let w = rng.f32_vec(cols, 1.0, 0.25);
            let xd = DeviceTensor::<R, f16>::from_slice(&client, &x, &[rows, cols])?;
            let wd = DeviceTensor::<R, f32>::from_slice(&client, &w, &[cols])?;
            let yd = DeviceTensor::<R, f16>::from_slice(
                &client,
                &vec![POISON_F16; rows * cols],
                &[rows, cols],
            )?;
            rmsnorm::rms_norm(&client, &xd, &wd, &yd, 1e-6)?;
            let y = f16_to_f64(&yd.to_vec(&client)?);
            let want = rmsnorm::reference(&f16_to_f64(&x), &f32_to_f64(&w), cols, 1e-6);
            checks.push(Check {
                name: format!("rmsnorm [{rows}x{cols}]"),
                rel_err: rel_err(&y, &want),
                tol: 1e-3,
            });
        }
        ensure!(!checks.is_empty());
        Ok(checks)
    }
}
