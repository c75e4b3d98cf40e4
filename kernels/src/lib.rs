//! cubeqwen-kernels: every kernel of the Qwen2 forward pass, written once with CubeCL.
//!
//! One file per kernel family. Each file holds, in this order: the `#[cube]` kernel(s),
//! the host-side `launch` function (checks shapes, returns errors instead of panicking),
//! and a plain-Rust `reference` in f64 that the tests compare against.
//!
//! | family | file | reference |
//! |---|---|---|
//! | RMSNorm | [`rmsnorm`] | [`rmsnorm::reference`] |

pub mod attention;
pub mod bandwidth;
pub mod buffer;
pub mod elementwise;
pub mod grid;
pub mod matmul;
pub mod rmsnorm;
pub mod rope;
pub mod runtime;
pub mod select;
pub mod testing;

pub use buffer::DeviceTensor;
