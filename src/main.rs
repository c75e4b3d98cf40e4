use std::process::ExitCode;

use anyhow::Result;
use clap::{Parser, Subcommand};
use cubeqwen::{dispatch, selftest, DeviceKind};

#[derive(Parser)]
#[command(
    name = "cubeqwen",
    version,
    about = "Qwen2/Qwen2.5 inference with CubeCL kernels"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run every kernel once on the device against its f64 reference and print the errors.
    Selftest {
        /// auto (CUDA if a GPU and driver are present, else wgpu), cuda or wgpu.
        #[arg(long, default_value = "auto")]
        device: DeviceKind,
        /// Seed of the random inputs (default: time-based, printed).
        #[arg(long)]
        seed: Option<u64>,
    },
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Command::Selftest { device, seed } => {
            let seed = seed.unwrap_or_else(cubeqwen_kernels::testing::fresh_seed);
            let (device_name, checks) = dispatch(device, Named(selftest::SelfTest { seed }))?;
            eprintln!("device: {device_name} (asked for: {device}); seed {seed}");
            let mut failed = 0;
            for c in &checks {
                let ok = c.rel_err <= c.tol;
                failed += usize::from(!ok);
                println!(
                    "{:<24} rel_err {:.3e}  (tolerance {:.0e})  {}",
                    c.name,
                    c.rel_err,
                    c.tol,
                    if ok { "ok" } else { "FAIL" }
                );
            }
            println!("{} passed, {failed} failed", checks.len() - failed);
            Ok(if failed == 0 {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
    }
}

/// Wraps a job so its output comes back with the device's name.
struct Named<J>(J);
impl<J: cubeqwen::RuntimeJob> cubeqwen::RuntimeJob for Named<J> {
    type Output = (String, J::Output);
    fn run<R: cubecl::Runtime>(
        self,
        client: cubecl::prelude::ComputeClient<R>,
        device: &str,
    ) -> Result<Self::Output> {
        Ok((device.to_string(), self.0.run(client, device)?))
    }
}
