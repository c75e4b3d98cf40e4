//! cubeqwen-kernels: every kernel of the Qwen2 forward pass, written once with CubeCL.
//!
//! One file per kernel family. Each file holds, in this order: the `#[cube]` kernel(s),
//! the host-side launch functions (check shapes, return a [`KernelError`] instead of
//! panicking), and a plain-Rust `reference` in f64 that the tests compare against. The tests
//! are in `kernels/tests/<family>.rs`.
//!
//! | family | file | launch | reference | tests |
//! |---|---|---|---|---|
//! | RMSNorm, residual add + RMSNorm | [`rmsnorm`] | [`rmsnorm::rms_norm`], [`rmsnorm::residual_add_rms_norm`] | [`rmsnorm::reference`] | `rmsnorm.rs`, `elementwise.rs` |
//! | matmul (tiled, cmma, GEMV, blocked, cubek) | [`matmul`] | [`matmul::matmul`], [`matmul::matmul_into`], [`matmul::RowChunked::matmul`] | [`matmul::reference`] | `matmul.rs`, `cublas.rs` (CUDA) |
//! | many-row matmul on tensor cores (`mma.m16n8k16`, `ldmatrix`, `cp.async` stages) | [`matmul_mma`] | [`matmul::matmul`] with [`matmul::MatmulVariant::Mma`] | [`matmul::reference`] | `matmul.rs`, `cublas.rs` (CUDA) |
//! | attention, KV-cache append | [`attention`] | [`attention::attention`], [`attention::KvCache::append`] | [`attention::reference`] | `attention.rs` |
//! | flash-attention prefill (portable; `mma.m16n8k16` tensor cores on CUDA) | [`flash`] | [`flash::attention_prefill_with`] | [`attention::reference`] | `flash.rs` |
//! | fused decode step (norm + q/k/v + RoPE + append, attention, GEMV + residual, norm + gate/up + SwiGLU, lm_head + top-2) | [`decode`] | [`decode::attn_in`], [`decode::attention`], [`decode::gemv_residual`], [`decode::ffn_in`], [`decode::lm_head_top2`] | [`decode::reference_attn_in`], [`decode::reference_gemv_residual`], [`decode::reference_ffn_in`], [`attention::reference`] | `decode.rs` |
//! | fused GEMVs of short blocks (q/k/v in one launch; gate/up + SwiGLU) | [`fused_gemv`] | [`fused_gemv::gemv_qkv`], [`fused_gemv::gemv_gate_up_swiglu`] | [`matmul::reference`], [`fused_gemv::reference_gate_up_swiglu`] | `fused_gemv.rs` |
//! | RoPE (NEOX) | [`rope`] | [`rope::rope`], [`rope::rope_qk_append`] (q and k, and the KV append, in one launch) with [`rope::RopeTables`] | [`rope::reference`] | `rope.rs` |
//! | SwiGLU | [`elementwise`] | [`elementwise::swiglu`] | [`elementwise::swiglu_reference`] | `elementwise.rs` |
//! | embedding gather, residual add, row copy | [`elementwise`] | [`elementwise::embedding`], [`elementwise::add_assign`], [`elementwise::copy_rows`] | exact: the table rows, the f64 sum | `elementwise.rs` |
//! | argmax, top-k (bitonic sorts of 256-element pieces, in levels; in the decode step for sampling) | [`select`] | [`select::argmax`], [`select::top_k`], [`select::TopK::run`] | [`select::top_k_reference`] | `select.rs` |
//! | cube reduction (sum, max, min) used by the above | [`reduce`] | [`reduce::reduce()`] (inside kernels) | f64 sums, exact max/min | `reduce.rs` |
//!
//! Beside them: [`buffer`] (the typed device tensor), [`launch`] (one launch path through
//! cubecl or a CUDA graph recorder), `gridsync` (CUDA: a barrier across the cubes of one
//! kernel, and the relay kernels that test and time it; `gridsync.rs`), [`grid`] (launch grid of the
//! one-thread-per-element kernels), [`runtime`] (picking CUDA or wgpu), [`switches`] (the environment's speed switches, read
//! once), [`error`] and
//! [`testing`] (helpers for the parity tests, and the [`device_test!`] macro).

pub mod attention;
pub mod bandwidth;
pub mod baseline;
pub mod buffer;
pub mod decode;
pub mod elementwise;
pub mod error;
pub mod flash;
pub mod fused_gemv;
pub mod gemv_mma;
#[cfg(feature = "cuda")]
pub mod graph;
pub mod grid;
#[cfg(feature = "cuda")]
pub mod gridsync;
pub mod launch;
pub mod matmul;
pub mod matmul_mma;
pub mod reduce;
pub mod rmsnorm;
pub mod rope;
pub mod runtime;
pub mod select;
pub mod switches;
pub mod testing;

pub use buffer::DeviceTensor;
pub use error::KernelError;
