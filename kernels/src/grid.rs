//! The launch grid of the one-thread-per-element kernels (embedding, SwiGLU, residual add, row
//! copy, RoPE, KV-cache append), from cubecl's `calculate_cube_count_elemwise`: it spreads the
//! cubes over the grid's axes within the device's limits, and the kernels index with
//! `ABSOLUTE_POS` and bound-check it, since the grid may hold more threads than elements.

use cubecl::prelude::*;

/// Threads per cube.
pub const THREADS: u32 = 256;

/// Cube count and cube shape covering `n` elements, one thread each.
pub fn elementwise<R: Runtime>(client: &ComputeClient<R>, n: usize) -> (CubeCount, CubeDim) {
    let dim = CubeDim::new_1d(THREADS);
    (cubecl::calculate_cube_count_elemwise(client, n, dim), dim)
}
