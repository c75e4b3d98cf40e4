// `!(x <= tol)` is used on purpose throughout: a NaN must fail every check.
#![allow(clippy::neg_cmp_op_on_partial_ord)]
//! cubeqwen: Qwen2/Qwen2.5 inference with every kernel written in CubeCL.
//!
//! - kernels: crate `cubeqwen-kernels` (folder `kernels/`), one file per family with its reference.
//! - loaders: crate `cubeqwen-loaders` (folder `loaders/`): GGUF, safetensors, dequantization.
//! - this crate: the model on device, the forward pass, tokenizer, sampling and the CLI.

pub mod chat;
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
