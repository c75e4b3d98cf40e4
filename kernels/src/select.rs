//! Choosing tokens on the device: argmax and top-k over each row of logits.
//!
//! Only finite values are candidates (NaN and ±inf never are). Ties go to the lowest id (as the
//! reference and the golden data do): the order is value descending, then id ascending.
//!
//! The work is done by groups of units, each on its own: a group takes a piece of [`CHUNK`]
//! elements of a row, held in registers, sorts it with a bitonic network and keeps its first
//! `k`. On GPUs a group is one plane (a warp of [`GROUP`] units, 8 elements a unit, exchanging
//! by plane shuffles); where the device has no plane operations (CI's lavapipe) it is a cube
//! of 256 units, one element each, exchanging through shared memory. The network's depth
//! depends on the piece's length, not on `k`. Levels of such groups reduce a
//! row: the first takes pieces of the row, each later one pieces of the candidates of the level
//! before, until one piece is left (five levels for a vocabulary of 151 936 at k = 40). Results
//! are (value, id) pairs in one f32 array, the id as its bit pattern (one read brings both
//! back).

use anyhow::{ensure, Result};
use cubecl::prelude::*;

use crate::launch::{launch, Rec};
use crate::reduce::plane_width;
use crate::{DeviceTensor, KernelError};

/// Units of a group on devices with plane operations (a plane, 32 wide or more).
pub const GROUP: usize = 32;
/// Groups of [`GROUP`] units per cube.
const GROUPS_PER_CUBE: usize = 8;
/// Elements of a row that one group takes (8 a unit in a plane). Longer pieces would mean
/// fewer levels, but their networks take minutes to compile on a CPU-emulated device (Mesa's
/// lavapipe: 9 minutes at 32 elements a unit).
pub const CHUNK: usize = 8 * GROUP;
/// The largest `k` the kernels take (a piece of 256 keeps at most half of itself).
pub const MAX_K: usize = 128;
/// The id of a candidate slot left empty (fewer than `k` finite values): above every vocabulary
/// id, and as an f32 bit pattern a finite number, so no runtime rewrites it as a NaN.
pub const NO_ID: u32 = 0x3FFF_FFFF;

/// Whether (av, ai) comes before (bv, bi) in the order (value descending, then id ascending).
#[cube]
fn before(av: f32, ai: u32, bv: f32, bi: u32) -> bool {
    av > bv || (av == bv && ai < bi)
}

/// The `k` best finite values of each `chunk`-long piece of each row of `values` (`n` per row;
/// as (value, id) pairs when `pairs`, else plain values whose ids are their index in the row),
/// one piece per group of `group` units (`groups` a cube; `pieces` per row, `total` in all). A
/// unit holds the piece's elements `lane, lane + group, ...` (`per_unit` of them, a power of two;
/// `chunk` ≤ `group · per_unit`); the group sorts them with a bitonic network and writes the first `k`
/// (value, id bits) pairs of each piece to `out`, best first; slots past the piece's finite
/// values get (`-f32::MAX`, [`NO_ID`]).
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
    #[comptime] group: usize,
    #[comptime] groups: usize,
    #[comptime] plane: bool,
) {
    let unit = UNIT_POS as usize;
    let lane = unit % group;
    // This group's piece (a group past the last piece sorts empty slots and writes nothing:
    // without plane operations its exchanges are cube-wide steps).
    let piece = CUBE_POS * groups + unit / group;
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
    // Where units exchange elements when the device has no plane operations.
    let units = comptime!(groups * group);
    let slots = comptime!(if plane { 1 } else { per_unit * units });
    let mut vslots = SharedMemory::<f32>::new(slots);
    let mut islots = SharedMemory::<u32>::new(slots);

    // This unit's elements: finite ones as they are; NaN, ±inf, empty slots and places past
    // the piece as (lowest, NO_ID), which sort after every finite value.
    let mut vals = Sequence::<f32>::new();
    let mut ids = Sequence::<u32>::new();
    #[unroll]
    for e in 0..per_unit {
        let i = start + lane + e * group;
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

    // Bitonic sort of the piece's group · per_unit places (place = e · group + lane): blocks of
    // `size` in alternating order, each merged by halving strides; the last block (the whole
    // piece) in the order itself. Strides of a group or more pair two registers of one unit;
    // shorter ones pair two units.
    let log_len = comptime!((group * per_unit).trailing_zeros() as usize);
    #[unroll]
    for s in 1..log_len + 1 {
        let size = comptime!(1usize << s);
        #[unroll]
        for t in 0..s {
            let stride = comptime!(1usize << (s - 1 - t));
            if comptime!(stride >= group) {
                let es = comptime!(stride / group);
                #[unroll]
                for e in 0..per_unit {
                    if comptime!(e & es == 0) {
                        let e2 = comptime!(e | es);
                        // In order (best first) in blocks whose place has the `size` bit clear.
                        let in_order = comptime!((e * group) & size == 0);
                        let (av, ai) = (*vals.index(e), *ids.index(e));
                        let (bv, bi) = (*vals.index(e2), *ids.index(e2));
                        // In order: the lower place takes the one that comes first.
                        let swap = if comptime!(in_order) {
                            before(bv, bi, av, ai)
                        } else {
                            before(av, ai, bv, bi)
                        };
                        // All four chosen before any is stored: `av` and the others name
                        // the registers themselves, not copies.
                        let (nav, nai) = (select(swap, bv, av), select(swap, bi, ai));
                        let (nbv, nbi) = (select(swap, av, bv), select(swap, ai, bi));
                        *vals.index_mut(e) = nav;
                        *ids.index_mut(e) = nai;
                        *vals.index_mut(e2) = nbv;
                        *ids.index_mut(e2) = nbi;
                    }
                }
            } else {
                // Without plane operations every element of the unit goes through shared
                // memory at once: two cube barriers a stage.
                if comptime!(!plane) {
                    #[unroll]
                    for e in 0..per_unit {
                        vslots[e * units + unit] = *vals.index(e);
                        islots[e * units + unit] = *ids.index(e);
                    }
                    sync_cube();
                }
                let mask = comptime!(stride as u32);
                #[unroll]
                for e in 0..per_unit {
                    let (v, id) = (*vals.index(e), *ids.index(e));
                    let (pv, pid) = if comptime!(plane) {
                        (plane_shuffle_xor(v, mask), plane_shuffle_xor(id, mask))
                    } else {
                        let other = e * units + (unit ^ stride);
                        (vslots[other], islots[other])
                    };
                    let place = e * group + lane;
                    let lower = (lane & stride) == 0;
                    let in_order = (place & size) == 0;
                    // The lower place of a pair takes the one that comes first where the block
                    // is in order, the other where it is reversed.
                    let take_first = lower == in_order;
                    let keep = if take_first {
                        !before(pv, pid, v, id)
                    } else {
                        !before(v, id, pv, pid)
                    };
                    let (nv, nid) = (select(keep, v, pv), select(keep, id, pid));
                    *vals.index_mut(e) = nv;
                    *ids.index_mut(e) = nid;
                }
                if comptime!(!plane) {
                    sync_cube();
                }
            }
        }
    }

    // The first k places, and empty slots past the piece's length.
    if piece < total {
        #[unroll]
        for e in 0..per_unit {
            let place = e * group + lane;
            if place < k {
                let at = (piece * k + place) * 2;
                out[at] = *vals.index(e);
                out[at + 1] = f32::reinterpret(*ids.index(e));
            }
        }
        let mut place = comptime!(group * per_unit) + lane;
        while place < k {
            let at = (piece * k + place) * 2;
            out[at] = lowest;
            // NO_ID's bits as a float constant (CUDA cannot reinterpret a literal in place).
            out[at + 1] = f32::new(comptime!(f32::from_bits(NO_ID)));
            place += group;
        }
    }
}

/// One launch of [`topk_kernel`]: `pieces` pieces of `chunk` elements per row of `n` (the
/// last level's one piece may be shorter than `chunk`).
#[derive(Clone, Copy, Debug)]
struct Level {
    n: usize,
    chunk: usize,
    pieces: usize,
}

/// Device buffers and launch plan of a top-k over `rows` rows of `n` values: made once, run per
/// token (no allocation in the loop).
pub struct TopK<R: Runtime> {
    pub rows: usize,
    pub n: usize,
    pub k: usize,
    levels: Vec<Level>,
    /// Groups of a plane's [`GROUP`] units where the device has plane operations; else one cube
    /// of [`CHUNK`] units, an element each (a short network, quick to compile), exchanging
    /// through shared memory.
    plane: bool,
    /// Units of a group, and groups of a cube.
    group: usize,
    groups: usize,
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
    /// [`CHUNK`]; tests use small ones to reach more levels on small rows).
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
            (1..=CHUNK).contains(&chunk),
            KernelError::invalid("top_k", format!("pieces of {chunk}: 1 to {CHUNK}"))
        );
        // Later levels take pieces of CHUNK ≥ 2k: each level at least halves the candidates.
        let later = CHUNK;
        let (mut levels, mut len, mut chunk) = (Vec::new(), n, chunk);
        loop {
            let pieces = len.div_ceil(chunk);
            levels.push(Level {
                n: len,
                chunk,
                pieces,
            });
            if pieces == 1 {
                break;
            }
            len = pieces * k;
            chunk = later;
        }
        let plane = plane_width(client).is_some_and(|w| w >= GROUP);
        let group = if plane { GROUP } else { CHUNK };
        let groups = GROUPS_PER_CUBE * GROUP / group;
        let max_cubes = client.properties().hardware.max_cube_count.0 as usize;
        ensure!(
            (rows * levels[0].pieces).div_ceil(groups) <= max_cubes,
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
            plane,
            group,
            groups,
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
        let (k, plane, group, groups) = (self.k, self.plane, self.group, self.groups);
        for (i, l) in self.levels.iter().enumerate() {
            let (n, chunk, pieces) = (l.n, l.chunk, l.pieces);
            let per_unit = chunk.min(n).div_ceil(group).next_power_of_two();
            let total = self.rows * pieces;
            // Always whole cubes (one compiled kernel per element count); the groups past the
            // last piece sort empty slots.
            let count = CubeCount::new_1d(total.div_ceil(groups) as u32);
            let dim = CubeDim::new_1d((groups * group) as u32);
            let dst = self.parts.get(i).unwrap_or(&self.out);
            if i == 0 {
                launch!(rec.as_deref_mut(), client, topk_kernel::TopkKernel<F>, count, dim;
                    sizes []; arrays [values => 1, dst => 1];
                    scalars [usize n, usize chunk, usize pieces, usize total, usize k];
                    comptime [false, per_unit, group, groups, plane])?;
            } else {
                let src = &self.parts[i - 1];
                launch!(rec.as_deref_mut(), client, topk_kernel::TopkKernel<f32>, count, dim;
                    sizes []; arrays [src => 1, dst => 1];
                    scalars [usize n, usize chunk, usize pieces, usize total, usize k];
                    comptime [true, per_unit, group, groups, plane])?;
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
