//! Choosing tokens on the device: argmax and top-k over each row of logits.
//!
//! Only finite values are candidates (NaN and ±inf never are). Ties go to the lowest id (as the
//! reference and the golden data do): the order is value descending, then id ascending.
//!
//! Two passes, so that a vocabulary-wide row spreads over many cubes: each cube takes a chunk
//! of [`CHUNK`] elements of a row, holds them in registers, and finds its `k` best in `k`
//! rounds of a cube-wide arg-max, each round excluding what earlier rounds took (so ties and
//! repeated values are handled exactly); then one cube per row does the same over the chunks'
//! candidates. A row of at most
//! one chunk needs only the first pass. Results are (value, id) pairs in one f32 array, the id as
//! its bit pattern (one read brings both back).

use anyhow::{ensure, Result};
use cubecl::prelude::*;

use crate::launch::{launch, Rec};
use crate::reduce::{reduce_max, reduce_min, Reduction};
use crate::{DeviceTensor, KernelError};

/// Units per cube of the first pass (a power of two, as the reduction needs).
const BLOCK: usize = 256;
/// Units of the second pass's cube, at most (the device's limit may be lower).
const MERGE_UNITS: usize = 1024;
/// Elements of a row that one cube of the first pass takes, at least.
pub const CHUNK: usize = 2048;
/// The most elements a unit holds in registers (more chunks or a larger k take longer chunks).
const MAX_PER_UNIT: usize = 64;
/// The largest `k` the kernels take.
pub const MAX_K: usize = 256;
/// The id of a candidate slot left empty (fewer than `k` finite values): above every vocabulary
/// id, and as an f32 bit pattern a finite number, so no runtime rewrites it as a NaN.
pub const NO_ID: u32 = 0x3FFF_FFFF;

/// The `k` best finite values of each `chunk`-long piece of each row of `values` (`n` per row;
/// as (value, id) pairs when `pairs`, else plain values whose ids are their index in the row).
/// Writes `k` (value, id bits) pairs per cube to `out`, best first; slots past the piece's
/// finite values get (`-f32::MAX`, [`NO_ID`]). Each unit holds its `per_unit` elements of the
/// piece in registers for all `k` rounds (read from memory once: a round costs the two
/// reductions and a few compares per element).
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
fn topk_kernel<F: Float>(
    values: &Array<F>,
    out: &mut Array<f32>,
    n: usize,
    chunk: usize,
    chunks: usize,
    k: usize,
    #[comptime] pairs: bool,
    #[comptime] per_unit: usize,
    #[comptime] row_best: Reduction,
) {
    let row = CUBE_POS / chunks;
    let start = (CUBE_POS % chunks) * chunk;
    let mut end = start + chunk;
    if end > n {
        end = n;
    }
    let tid = UNIT_POS as usize;
    let lowest = f32::new(-3.4028235e38);
    let highest = f32::new(3.4028235e38);

    // This unit's elements: finite ones as they are; NaN, ±inf, empty slots and places past
    // the piece as (lowest, NO_ID), which no round picks (an id is never below NO_ID).
    let mut vals = Sequence::<f32>::new();
    let mut ids = Sequence::<u32>::new();
    #[unroll]
    for e in 0..per_unit {
        let i = start + tid + e * row_best.units;
        let mut v = lowest;
        let mut id = 0x3FFF_FFFFu32;
        if i < end {
            let x = if comptime!(pairs) {
                f32::cast_from(values[(row * n + i) * 2])
            } else {
                f32::cast_from(values[row * n + i])
            };
            if x >= lowest && x <= highest {
                v = x;
                id = if comptime!(pairs) {
                    u32::reinterpret(f32::cast_from(values[(row * n + i) * 2 + 1]))
                } else {
                    i as u32
                };
            }
        }
        vals.push(v);
        ids.push(id);
    }

    // (prev_v, prev_i): the last pick; candidates must come strictly after it in the order.
    let mut prev_v = highest;
    let mut prev_i = 0u32;
    for r in 0..k {
        // This unit's best candidate; (lowest, NO_ID) when it has none.
        let mut bv = lowest;
        let mut bi = 0x3FFF_FFFFu32;
        #[unroll]
        for e in 0..per_unit {
            let v = *vals.index(e);
            let id = *ids.index(e);
            let after_prev = r == 0 || v < prev_v || (v == prev_v && id > prev_i);
            if after_prev && (v > bv || (v == bv && id < bi)) {
                bv = v;
                bi = id;
            }
        }
        // The best value, then the lowest id among the units that hold it.
        prev_v = reduce_max::<f32>(bv, row_best);
        let mut id_if_best = 0x3FFF_FFFFu32;
        if bv == prev_v {
            id_if_best = bi;
        }
        prev_i = reduce_min::<u32>(id_if_best, row_best);
        if tid == 0 {
            let at = (CUBE_POS * k + r) * 2;
            out[at] = prev_v;
            out[at + 1] = f32::reinterpret(prev_i);
        }
    }
}

/// Device buffers and launch plan of a top-k over `rows` rows of `n` values: made once, run per
/// token (no allocation in the loop).
pub struct TopK<R: Runtime> {
    pub rows: usize,
    pub n: usize,
    pub k: usize,
    chunk: usize,
    chunks: usize,
    /// Units of the second pass.
    merge_units: usize,
    /// The first pass's candidates, `[rows × chunks, k]` pairs (when `chunks > 1`).
    part: Option<DeviceTensor<R, f32>>,
    /// The result: `[rows, k]` (value, id bits) pairs, best first.
    pub out: DeviceTensor<R, f32>,
}

impl<R: Runtime> TopK<R> {
    /// The `k` best of each of `rows` rows of `n` values, in chunks of [`CHUNK`].
    pub fn new(client: &ComputeClient<R>, rows: usize, n: usize, k: usize) -> Result<Self> {
        Self::with_chunk(client, rows, n, k, CHUNK)
    }

    /// As [`TopK::new`] with chunks of at least `chunk` elements (longer where the merge would
    /// hold more than 64 candidates a unit; tests use small ones to reach the second pass on
    /// small rows).
    pub fn with_chunk(
        client: &ComputeClient<R>,
        rows: usize,
        n: usize,
        k: usize,
        chunk: usize,
    ) -> Result<Self> {
        ensure!(
            rows >= 1 && n >= 1,
            KernelError::invalid("top_k", format!("{rows} rows of {n} values"))
        );
        ensure!(
            k >= 1 && k <= n,
            KernelError::invalid("top_k", format!("k must be in 1..={n}, got {k}"))
        );
        ensure!(
            k <= MAX_K,
            KernelError::unsupported(
                "top_k",
                format!("k = {k} is more than this kernel is meant for (at most {MAX_K})")
            )
        );
        ensure!(chunk >= 1, KernelError::invalid("top_k", "chunk of 0"));
        let hw = &client.properties().hardware;
        let merge_units = 1 << MERGE_UNITS.min(hw.max_units_per_cube as usize).ilog2();
        // Longer chunks where the merge would hold too many candidates a unit.
        let chunk = chunk.max(n.div_ceil((MAX_PER_UNIT * merge_units / k).max(1)));
        let chunks = n.div_ceil(chunk);
        ensure!(
            chunk.div_ceil(BLOCK) <= MAX_PER_UNIT,
            KernelError::unsupported(
                "top_k",
                format!("rows of {n} values with k = {k}: too long for this kernel")
            )
        );
        let max_cubes = hw.max_cube_count.0 as usize;
        ensure!(
            rows * chunks <= max_cubes,
            KernelError::unsupported(
                "top_k",
                format!(
                    "{rows} rows of {chunks} chunks: at most {max_cubes} cubes per launch on this device"
                )
            )
        );
        let part = if chunks > 1 {
            Some(DeviceTensor::empty(client, &[rows * chunks, k, 2])?)
        } else {
            None
        };
        Ok(Self {
            rows,
            n,
            k,
            chunk,
            chunks,
            merge_units,
            part,
            out: DeviceTensor::empty(client, &[rows, k, 2])?,
        })
    }

    /// Finds the top-k of `values` (`[rows, n]`) into [`TopK::out`]: one launch, or two when a
    /// row spans several chunks.
    pub fn run<F: Float + CubeElement>(
        &self,
        client: &ComputeClient<R>,
        mut rec: Rec<'_>,
        values: &DeviceTensor<R, F>,
    ) -> Result<()> {
        ensure!(
            values.len() == self.rows * self.n,
            KernelError::shape(
                "top_k",
                "values",
                format!("[{}, {}]", self.rows, self.n),
                &values.shape
            )
        );
        let (n, chunk, chunks, k) = (self.n, self.chunk, self.chunks, self.k);
        let first = self.part.as_ref().unwrap_or(&self.out);
        launch!(rec.as_deref_mut(), client, topk_kernel::TopkKernel<F>,
            CubeCount::new_1d((self.rows * chunks) as u32), CubeDim::new_1d(BLOCK as u32);
            sizes []; arrays [values => 1, first => 1];
            scalars [usize n, usize chunk, usize chunks, usize k];
            comptime [false, chunk.div_ceil(BLOCK), Reduction::cube(client, BLOCK)])?;
        if let Some(part) = &self.part {
            let (n2, one, units) = (chunks * k, 1usize, self.merge_units);
            launch!(rec, client, topk_kernel::TopkKernel<f32>,
                CubeCount::new_1d(self.rows as u32), CubeDim::new_1d(units as u32);
                sizes []; arrays [part => 1, self.out => 1];
                scalars [usize n2, usize n2, usize one, usize k];
                comptime [true, n2.div_ceil(units), Reduction::cube(client, units)])?;
        }
        Ok(())
    }

    /// Reads [`TopK::out`]: each row's best (id, value), best first; fewer than `k` where the
    /// row has fewer finite values.
    pub fn read(&self, client: &ComputeClient<R>) -> Result<Vec<Vec<(u32, f32)>>> {
        Ok(decode_pairs(&self.out.to_vec(client)?, self.k))
    }
}

/// Splits the (value, id bits) pairs of [`TopK::out`] into rows of `k` (id, value), dropping
/// empty slots.
pub fn decode_pairs(raw: &[f32], k: usize) -> Vec<Vec<(u32, f32)>> {
    raw.chunks(2 * k)
        .map(|row| {
            row.chunks_exact(2)
                .map(|p| (p[1].to_bits(), p[0]))
                .filter(|&(id, _)| id != NO_ID)
                .collect()
        })
        .collect()
}

/// The `k` largest finite values of each row of `values` (`[rows, n]`), largest first (lowest
/// id first among equal values), as (id, value); fewer where a row has fewer finite values.
pub fn top_k<R: Runtime, F: Float + CubeElement>(
    client: &ComputeClient<R>,
    values: &DeviceTensor<R, F>,
    k: usize,
) -> Result<Vec<Vec<(u32, f32)>>> {
    ensure!(
        values.shape.len() == 2,
        KernelError::shape("top_k", "values", "[rows, n]", &values.shape)
    );
    let t = TopK::new(client, values.shape[0], values.shape[1], k)?;
    t.run(client, None, values)?;
    t.read(client)
}

/// Index of the largest finite value of each row (lowest id on ties); an error for a row
/// without one.
pub fn argmax<R: Runtime, F: Float + CubeElement>(
    client: &ComputeClient<R>,
    values: &DeviceTensor<R, F>,
) -> Result<Vec<u32>> {
    top_k(client, values, 1)?
        .iter()
        .enumerate()
        .map(|(r, best)| match best.first() {
            Some(&(id, _)) => Ok(id),
            None => {
                Err(KernelError::invalid("argmax", format!("row {r} has no finite value")).into())
            }
        })
        .collect()
}

/// Reference: the `k` best finite (id, value) of `row`, value descending then id ascending
/// (values compared as numbers: -0.0 and 0.0 are equal, as on the device).
pub fn top_k_reference(row: &[f32], k: usize) -> Vec<(u32, f32)> {
    let mut v: Vec<(u32, f32)> = row
        .iter()
        .enumerate()
        .filter(|(_, x)| x.is_finite())
        .map(|(i, &x)| (i as u32, x))
        .collect();
    v.sort_by(|a, b| {
        b.1.partial_cmp(&a.1)
            .expect("finite values")
            .then(a.0.cmp(&b.0))
    });
    v.truncate(k);
    v
}
