//! Helpers for parity tests: seeded random inputs, poisoned outputs, error norms.

use half::f16;
use rand::{Rng as _, RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::StandardNormal;

/// The seeded generator of every test and random model (ChaCha8 from `rand_chacha`: the same
/// stream on every platform), with the few distributions the tests draw from.
pub struct Rng(ChaCha8Rng);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(ChaCha8Rng::seed_from_u64(seed))
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0.next_u64()
    }
    /// Uniform in [0, 1).
    pub fn uniform(&mut self) -> f64 {
        self.0.random()
    }
    /// Uniform in `0..n` (n > 0).
    pub fn below(&mut self, n: usize) -> usize {
        self.0.random_range(0..n)
    }
    /// Standard normal.
    pub fn normal(&mut self) -> f64 {
        self.0.sample(StandardNormal)
    }
    /// `n` values ~ N(mean, std²), rounded to f16.
    pub fn f16_vec(&mut self, n: usize, mean: f64, std: f64) -> Vec<f16> {
        (0..n)
            .map(|_| f16::from_f64(mean + std * self.normal()))
            .collect()
    }
    pub fn f32_vec(&mut self, n: usize, mean: f64, std: f64) -> Vec<f32> {
        (0..n)
            .map(|_| (mean + std * self.normal()) as f32)
            .collect()
    }
}

/// A seed that differs on every run unless `CUBEQWEN_SEED` pins it (to replay a failed test:
/// [`device_test!`](crate::device_test) prints the seed of a test that fails).
pub fn fresh_seed() -> u64 {
    if let Some(s) = std::env::var("CUBEQWEN_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
    {
        return s;
    }
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(1)
}

/// A value no correct kernel writes: NaN in f16.
pub const POISON_F16: f16 = f16::NAN;

/// ‖out − ref‖ / ‖ref‖. Any non-finite output gives +inf, so NaN never passes. Panics (the
/// test fails) on a length mismatch or a reference that cannot judge: see [`try_rel_err`].
pub fn rel_err(out: &[f64], reference: &[f64]) -> f64 {
    try_rel_err(out, reference).unwrap_or_else(|e| panic!("{e}"))
}

/// [`rel_err`] as a `Result`, for callers that report instead of panicking (the parity
/// tracer): an error when the lengths differ, when the reference has a non-finite value (it
/// cannot judge anything) or is all zeros (the comparison would prove nothing).
pub fn try_rel_err(out: &[f64], reference: &[f64]) -> anyhow::Result<f64> {
    anyhow::ensure!(
        out.len() == reference.len(),
        "length mismatch: {} values against a reference of {}",
        out.len(),
        reference.len()
    );
    if let Some(i) = reference.iter().position(|v| !v.is_finite()) {
        anyhow::bail!(
            "reference has non-finite values (NaN or inf; the first at index {i}): it cannot judge anything"
        );
    }
    if out.iter().any(|v| !v.is_finite()) {
        return Ok(f64::INFINITY);
    }
    let num: f64 = out
        .iter()
        .zip(reference)
        .map(|(a, b)| (a - b) * (a - b))
        .sum();
    let den: f64 = reference.iter().map(|b| b * b).sum();
    anyhow::ensure!(
        den > 0.0,
        "reference is all zeros: the test would prove nothing"
    );
    Ok((num / den).sqrt())
}

/// Largest |out − ref| and its index; the first NaN wins (nothing after it replaces it).
pub fn max_abs_err(out: &[f64], reference: &[f64]) -> (f64, usize) {
    out.iter()
        .zip(reference)
        .enumerate()
        .map(|(i, (a, b))| ((a - b).abs(), i))
        .fold((0.0, 0), |m, x| {
            if !m.0.is_nan() && (x.0 > m.0 || x.0.is_nan()) {
                x
            } else {
                m
            }
        })
}

pub fn f16_to_f64(v: &[f16]) -> Vec<f64> {
    v.iter().map(|x| x.to_f64()).collect()
}

pub fn f32_to_f64(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| x as f64).collect()
}

/// The device tests run on: `$CUBEQWEN_TEST_DEVICE` (auto, cuda, wgpu), default auto.
/// An explicit `cuda` that cannot start fails the test; it never falls back silently.
pub fn test_device() -> crate::runtime::DeviceKind {
    std::env::var("CUBEQWEN_TEST_DEVICE")
        .ok()
        .map(|s| {
            s.parse()
                .expect("CUBEQWEN_TEST_DEVICE must be auto, cuda or wgpu")
        })
        .unwrap_or_default()
}

/// Runs `job` on the test device, printing which one, and fails the test on any error.
pub fn run_test<J: crate::runtime::RuntimeJob>(job: J) -> J::Output {
    struct Announce<J>(J);
    impl<J: crate::runtime::RuntimeJob> crate::runtime::RuntimeJob for Announce<J> {
        type Output = J::Output;
        fn run<R: cubecl::Runtime>(
            self,
            client: cubecl::prelude::ComputeClient<R>,
            device: &str,
        ) -> anyhow::Result<J::Output> {
            eprintln!("test device: {device}");
            self.0.run(client, device)
        }
    }
    match crate::runtime::dispatch(test_device(), Announce(job)) {
        Ok(v) => v,
        Err(e) => panic!("{e:#}"),
    }
}

/// Held by a randomized test: when the test fails (panics) it prints the test's seed and how
/// to replay it (`CUBEQWEN_SEED`, read by [`fresh_seed`]).
pub struct SeedReport {
    pub test: &'static str,
    pub seed: u64,
}

impl Drop for SeedReport {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "{} failed with seed {}; replay: CUBEQWEN_SEED={} cargo test --release {}",
                self.test, self.seed, self.seed, self.test
            );
        }
    }
}

#[doc(hidden)]
pub mod macro_support {
    pub use anyhow::Result;
    pub use cubecl::prelude::{ComputeClient, Runtime};
}

/// A kernel test written once for every runtime: the body runs on the test device
/// ([`test_device`]: CUDA or wgpu), generic over the runtime type it names, with `client`
/// a `&ComputeClient<R>`, and returns `anyhow::Result<()>`; an error fails the test.
/// A randomized test also names a seed (fresh each run, pinned by `CUBEQWEN_SEED`), derives
/// every random input from it, and prints it when it fails.
///
/// ```ignore
/// device_test! {
///     fn rmsnorm_hidden_896<R>(client, seed) {
///         for rows in [1, 7] { check::<R>(client, rows, 896, seed)?; }
///         Ok(())
///     }
/// }
/// ```
#[macro_export]
macro_rules! device_test {
    ($(#[$meta:meta])* fn $name:ident<$R:ident>($client:ident) $body:block) => {
        $(#[$meta])*
        #[test]
        fn $name() {
            $crate::testing::run_test($crate::device_test!(@job $R, $client, _, $body, 0));
        }
    };
    ($(#[$meta:meta])* fn $name:ident<$R:ident>($client:ident, $seed:ident) $body:block) => {
        $(#[$meta])*
        #[test]
        fn $name() {
            let seed = $crate::testing::fresh_seed();
            let _report = $crate::testing::SeedReport {
                test: stringify!($name),
                seed,
            };
            $crate::testing::run_test($crate::device_test!(@job $R, $client, $seed, $body, seed));
        }
    };
    // The job that runs `$body` with `$seed` bound to `$value`.
    (@job $R:ident, $client:ident, $seed:pat, $body:block, $value:expr) => {{
        struct Job(u64);
        impl $crate::runtime::RuntimeJob for Job {
            type Output = ();
            fn run<$R: $crate::testing::macro_support::Runtime>(
                self,
                client: $crate::testing::macro_support::ComputeClient<$R>,
                _device: &str,
            ) -> $crate::testing::macro_support::Result<()> {
                let $client = &client;
                let $seed: u64 = self.0;
                $body
            }
        }
        Job($value)
    }};
}

/// Whether the big shapes run (row counts 128/2048, 1.5B/7B widths): on with
/// `CUBEQWEN_FULL_SHAPES=1` (the GPU runner sets it); CI on software Vulkan runs the rest.
pub fn full_shapes() -> bool {
    std::env::var("CUBEQWEN_FULL_SHAPES").is_ok_and(|v| v == "1")
}

/// Rows to compare against an f64 reference: all of them when few, else the first, the
/// last and 14 random ones (the reference of a 2048-row matmul would take minutes).
pub fn sample_rows(m: usize, rng: &mut Rng) -> Vec<usize> {
    if m <= 32 {
        return (0..m).collect();
    }
    let mut rows = vec![0, m - 1];
    rows.extend((0..14).map(|_| rng.below(m)));
    rows
}
