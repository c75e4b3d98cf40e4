//! Launch-grid helpers: more cubes than one grid axis allows (65535 on wgpu) are spread over x and y.

use anyhow::{ensure, Result};
use cubecl::prelude::*;

/// A grid of at least `cubes` cubes over x and y (z = `z`); kernels recover the index with
/// [`linear_cube_pos`] and must bound-check it.
pub fn cube_count_1d(cubes: usize, z: u32) -> Result<CubeCount> {
    const MAX: usize = 65535;
    ensure!(cubes > 0, "empty launch");
    let x = cubes.min(MAX);
    let y = cubes.div_ceil(MAX);
    ensure!(y <= MAX, "launch of {cubes} cubes is too large");
    Ok(CubeCount::Static(x as u32, y as u32, z))
}

/// The cube's index in a grid made by [`cube_count_1d`].
#[cube]
pub fn linear_cube_pos() -> usize {
    CUBE_POS_Y as usize * CUBE_COUNT_X as usize + CUBE_POS_X as usize
}
