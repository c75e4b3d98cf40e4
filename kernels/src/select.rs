//! Choosing tokens on the device: argmax and top-k over each row of logits.
//!
//! Only finite values are candidates (NaN and ±inf never are). Ties go to the lowest id (as the
//! reference and the golden data do): the order is value descending, then id ascending.
//!
//! The work is done by groups of [`GROUP`] units (one plane, a warp, on GPUs), each on its own:
//! a group takes a piece of a row, its units hold the piece in registers, and it finds the
//! piece's `k` best in `k` rounds. A round is one group-wide arg-max (the best value, then the
//! lowest id among the units that hold it: plane shuffles, no cube barrier where the device has
//! plane operations); after it, only the unit that held the pick looks again among its own
//! elements for its next best. Levels of such groups reduce a row: the first takes pieces of
//! [`CHUNK`] logits, each later one the candidates of the level before, until one group is left
//! (three levels for a vocabulary of 151 936 at k = 40). Results are (value, id) pairs in one
//! f32 array, the id as its bit pattern (one read brings both back).

use anyhow::{ensure, Result};
use cubecl::prelude::*;

use crate::launch::{launch, Rec};
use crate::reduce::{reduce_in_plane, ReduceOp, Reduction};
use crate::{DeviceTensor, KernelError};

/// Units of a group (a plane on GPUs whose planes are 32 wide; elsewhere a group of a cube's
/// shared-memory reduction).
pub const GROUP: usize = 32;
/// Groups per cube, at most.
const GROUPS_PER_CUBE: usize = 8;
/// Elements of a row that one group of the first level takes (8 a unit).
pub const CHUNK: usize = 8 * GROUP;
/// Elements a unit of a later level holds, at least (fewer levels; more per round).
const LATER_PER_UNIT: usize = 32;
/// The most elements a unit holds in registers.
const MAX_PER_UNIT: usize = 64;
/// The largest `k` the kernels take.
pub const MAX_K: usize = 256;
/// The id of a candidate slot left empty (fewer than `k` finite values): above every vocabulary
/// id, and as an f32 bit pattern a finite number, so no runtime rewrites it as a NaN.
pub const NO_ID: u32 = 0x3FFF_FFFF;

/// Whether (v, id) comes strictly after (pv, pid) in the order (value descending, then id
/// ascending).
#[cube]
fn after(v: f32, id: u32, pv: f32, pid: u32) -> bool {
    v < pv || (v == pv && id > pid)
}

/// A candidate: a value and its id.
#[derive(CubeType, Clone, Copy)]
struct Cand {
    v: f32,
    id: u32,
}

/// The best of a unit's elements that come after (pv, pid) (all of them when `all`); (lowest,
/// [`NO_ID`]) when none does.
#[cube]
fn unit_best(
    vals: &Sequence<f32>,
    ids: &Sequence<u32>,
    pv: f32,
    pid: u32,
    #[comptime] all: bool,
    #[comptime] per_unit: usize,
) -> Cand {
    let mut best = Cand {
        v: f32::new(-3.4028235e38),
        id: 0x3FFF_FFFFu32,
    };
    #[unroll]
    for e in 0..per_unit {
        let v = *vals.index(e);
        let id = *ids.index(e);
        let open = comptime!(all) || after(v, id, pv, pid);
        if open && (v > best.v || (v == best.v && id < best.id)) {
            best.v = v;
            best.id = id;
        }
    }
    best
}

/// The `k` best finite values of each `chunk`-long piece of each row of `values` (`n` per row;
/// as (value, id) pairs when `pairs`, else plain values whose ids are their index in the row),
/// one piece per group of `how.group` units (`pieces` per row). Writes `k` (value, id bits)
/// pairs per piece to `out`, best first; slots past the piece's finite values get
/// (`-f32::MAX`, [`NO_ID`]). Each unit holds its `per_unit` elements of the piece in registers
/// for all `k` rounds (read from memory once).
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
fn topk_kernel<F: Float>(
    values: &Array<F>,
    out: &mut Array<f32>,
    n: usize,
    chunk: usize,
    pieces: usize,
    total: usize,
    k: usize,
    #[comptime] pairs: bool,
    #[comptime] per_unit: usize,
    #[comptime] how: Reduction,
) {
    let unit = UNIT_POS as usize;
    let lane = unit % how.group;
    // This group's piece (a group past the last piece takes none, but joins every round: on
    // the shared-memory path the reductions are cube-wide steps).
    let piece = CUBE_POS as usize * comptime!(how.units / how.group) + unit / how.group;
    let row = piece / pieces;
    let start = (piece % pieces) * chunk;
    let mut end = start + chunk;
    if end > n {
        end = n;
    }
    if piece >= total {
        end = 0;
    }
    let lowest = f32::new(-3.4028235e38);
    let highest = f32::new(3.4028235e38);

    // This unit's elements: finite ones as they are; NaN, ±inf, empty slots and places past
    // the piece as (lowest, NO_ID), which no round picks (an id is never below NO_ID).
    let mut vals = Sequence::<f32>::new();
    let mut ids = Sequence::<u32>::new();
    #[unroll]
    for e in 0..per_unit {
        let i = start + lane + e * how.group;
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

    // (bv, bi): this unit's best candidate not yet picked; it changes only when it is picked.
    let first = unit_best(&vals, &ids, highest, 0u32, true, per_unit);
    let mut bv = first.v;
    let mut bi = first.id;
    for r in 0..k {
        // The best value, then the lowest id among the units that hold it.
        let pv = reduce_in_plane::<f32>(bv, ReduceOp::Max, how);
        let mut id_if_best = 0x3FFF_FFFFu32;
        if bv == pv {
            id_if_best = bi;
        }
        let pid = reduce_in_plane::<u32>(id_if_best, ReduceOp::Min, how);
        if lane == 0 && piece < total {
            let at = (piece * k + r) * 2;
            out[at] = pv;
            out[at + 1] = f32::reinterpret(pid);
        }
        if bi == pid {
            let next = unit_best(&vals, &ids, pv, pid, false, per_unit);
            bv = next.v;
            bi = next.id;
        }
    }
}

/// One launch of [`topk_kernel`]: `pieces` pieces of `chunk` elements per row of `n`.
#[derive(Clone, Copy, Debug)]
struct Level {
    n: usize,
    chunk: usize,
    pieces: usize,
}

impl Level {
    fn per_unit(&self) -> usize {
        self.chunk.div_ceil(GROUP)
    }
}

/// Device buffers and launch plan of a top-k over `rows` rows of `n` values: made once, run per
/// token (no allocation in the loop).
pub struct TopK<R: Runtime> {
    pub rows: usize,
    pub n: usize,
    pub k: usize,
    levels: Vec<Level>,
    /// Each level's candidates but the last's, `[rows, pieces, k]` pairs.
    parts: Vec<DeviceTensor<R, f32>>,
    /// The result: `[rows, k]` (value, id bits) pairs, best first.
    pub out: DeviceTensor<R, f32>,
}

impl<R: Runtime> TopK<R> {
    /// The `k` best of each of `rows` rows of `n` values, the first level in pieces of
    /// [`CHUNK`].
    pub fn new(client: &ComputeClient<R>, rows: usize, n: usize, k: usize) -> Result<Self> {
        Self::with_chunk(client, rows, n, k, CHUNK)
    }

    /// As [`TopK::new`] with the first level in pieces of `chunk` elements (at most
    /// 64 · [`GROUP`]; tests use small ones to reach more levels on small rows).
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
        ensure!(
            (1..=MAX_PER_UNIT * GROUP).contains(&chunk),
            KernelError::invalid(
                "top_k",
                format!("pieces of {chunk}: 1 to {}", MAX_PER_UNIT * GROUP)
            )
        );
        // Each level after the first holds at least 2k a group, so that it halves the
        // candidates at the least; one group takes what fits its registers.
        let later = (LATER_PER_UNIT * GROUP)
            .max(2 * k)
            .min(MAX_PER_UNIT * GROUP);
        let (mut levels, mut len, mut chunk) = (Vec::new(), n, chunk);
        loop {
            if len <= MAX_PER_UNIT * GROUP && (!levels.is_empty() || len <= chunk) {
                levels.push(Level {
                    n: len,
                    chunk: len,
                    pieces: 1,
                });
                break;
            }
            let pieces = len.div_ceil(chunk);
            levels.push(Level {
                n: len,
                chunk,
                pieces,
            });
            len = pieces * k;
            chunk = later;
        }
        let max_cubes = client.properties().hardware.max_cube_count.0 as usize;
        let groups = rows * levels[0].pieces;
        ensure!(
            groups.div_ceil(GROUPS_PER_CUBE) <= max_cubes,
            KernelError::unsupported(
                "top_k",
                format!("{rows} rows of {n}: more cubes than one launch takes on this device")
            )
        );
        let parts = levels[..levels.len() - 1]
            .iter()
            .map(|l| DeviceTensor::empty(client, &[rows, l.pieces * k, 2]))
            .collect::<Result<_>>()?;
        Ok(Self {
            rows,
            n,
            k,
            levels,
            parts,
            out: DeviceTensor::empty(client, &[rows, k, 2])?,
        })
    }

    /// Finds the top-k of `values` (`[rows, n]`) into [`TopK::out`]: one launch per level.
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
        let k = self.k;
        for (i, l) in self.levels.iter().enumerate() {
            let (n, chunk, pieces) = (l.n, l.chunk, l.pieces);
            let total = self.rows * pieces;
            let groups = total.min(GROUPS_PER_CUBE);
            let units = groups * GROUP;
            let count = CubeCount::new_1d(total.div_ceil(groups) as u32);
            let dim = CubeDim::new_1d(units as u32);
            let how = Reduction::new(client, units, GROUP);
            let dst = self.parts.get(i).unwrap_or(&self.out);
            if i == 0 {
                launch!(rec.as_deref_mut(), client, topk_kernel::TopkKernel<F>, count, dim;
                    sizes []; arrays [values => 1, dst => 1];
                    scalars [usize n, usize chunk, usize pieces, usize total, usize k];
                    comptime [false, l.per_unit(), how])?;
            } else {
                let src = &self.parts[i - 1];
                launch!(rec.as_deref_mut(), client, topk_kernel::TopkKernel<f32>, count, dim;
                    sizes []; arrays [src => 1, dst => 1];
                    scalars [usize n, usize chunk, usize pieces, usize total, usize k];
                    comptime [true, l.per_unit(), how])?;
            }
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
