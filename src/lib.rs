// `!(x <= tol)` is used on purpose throughout: a NaN must fail every check.
#![allow(clippy::neg_cmp_op_on_partial_ord)]
//! cubeqwen: Qwen2/Qwen2.5 inference with every kernel written in CubeCL.
//!
//! - kernels: crate `cubeqwen-kernels` (folder `kernels/`), one file per family with its reference.
//! - loaders: crate `cubeqwen-loaders` (folder `loaders/`): GGUF, safetensors, dequantization.
//! - this crate: the model on device, the forward pass, tokenizer, sampling and the CLI.

/// `fault!(expr)`: the fault condition `expr` (on a [`faults::Faults`]) in builds with the
/// feature `faults`, else `false`, so the release build holds no fault code.
macro_rules! fault {
    ($e:expr) => {{
        #[cfg(feature = "faults")]
        let on = $e;
        #[cfg(not(feature = "faults"))]
        let on = false;
        on
    }};
}

pub mod bench;
pub mod chat;
#[cfg(feature = "faults")]
pub mod faults;
pub mod fetch;
pub mod forward;
pub mod generate;
pub mod haiku;
pub mod hf_parity;
pub mod model;
pub mod reference;
pub mod sampling;
pub mod selftest;
pub mod serve;
pub mod tokenizer;
pub mod trace;

pub use cubeqwen_kernels::runtime::{dispatch, DeviceKind, RuntimeJob};
