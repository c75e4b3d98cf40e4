//! Many-row matmul on tensor cores (a prompt's chunk): `y = x·Wᵀ (+ bias)`, x `[m, k]`, W
//! `[n, k]` (both with k innermost), f16 in, f32 accumulate, output `O` (f16, or f32 for
//! logits), written into columns `col_off..` of a `y` that may be wider (`ldy`). The
//! [`crate::matmul::MatmulVariant::Mma`] variant; reference: [`crate::matmul::reference`].
//!
//! A cube computes a `bm × bn` tile of y ([`MmaTile`]) with planes of 64 × `pn` outputs each
//! (4 × `pn / 8` `mma.m16n8k16` accumulators: 64 or 128 f32 a lane). Per step of `bk` along k
//! the cube stages the x rows and W rows of its tile in shared memory, as global memory holds
//! them (rows padded by 16 bytes, so that the 8 rows one `ldmatrix` phase reads fall in
//! distinct banks), in `stages` buffers (2 or 3): the 16-byte `cp.async` copies of the next
//! steps fly while the planes compute on the current one, each step's copies committed to a
//! barrier of its own (one wait a step, as the flash kernel's K/V tiles). Fragments come from
//! `ldmatrix` ([`crate::flash::mma_frags`]), straight into the registers the mma takes: per 32
//! of k, `.x4` of 8 W rows (B of two k-steps) for each n-tile, then per k-step and m-tile
//! `.x4` of x (A, 16 × 16) for `pn / 8` mmas. Rows past `m` or `n` read the last row and are
//! not written. The cubes run down a column of tiles first (the cube index along m is the
//! fastest), so the cubes resident at once share their W tiles and x's rows in L2.
//!
//! Speed (H200, BENCHMARKS.md "2026-11-29d"): with planes of 64 × 64 (222–255 registers a
//! unit, two cubes of 4 planes a multiprocessor, the tensor pipe 49% busy) 1.06–1.40× cubek's
//! TMA kernel in the kernel bench at the large prefill products (7B gate, m = 2048: 929 µs,
//! 299 TFLOP/s; cubek 1301, cuBLAS 419) and slower at the small ones (0.5B, few tiles). End to
//! end it lost to cubek in the same call (7B pp2048 19 502 / 19 247 tok/s against 20 476 /
//! 20 227; 1.5B 66 232 / 66 196 against 79 131 / 78 440), so `Auto` keeps cubek and this
//! kernel runs by name (`--matmul mma`). cubek's speed differs from lease to lease (the 1.5B
//! pp2048 with cubek: 61 170 in one call, 79 131 in another), this kernel's much less.
//!
//! On CUDA (sm_80+, [`crate::flash::mma_supported`]) the mma and `ldmatrix` are the
//! instructions; elsewhere the emulation runs the same code with each mma and fragment load
//! through shared memory, on small tiles (the tests on wgpu).

use anyhow::{ensure, Result};
use cubecl::ir::{ElemType, FloatKind};
use cubecl::prelude::barrier::{copy_async, Barrier};
use cubecl::prelude::*;
use half::f16;

use crate::decode::copy_barrier;
use crate::flash::{
    mma_16816, mma_commit, mma_frags, mma_supported, mma_wait_tile, Pair16, Pair32, MMA_PAD,
};
use crate::{DeviceTensor, KernelError};

/// Rows of y a plane computes: 4 m-tiles of 16.
const PLANE_M: usize = 64;

/// The tile of y a cube computes (`bm × bn`), the depth of one staged step (`bk`), the steps
/// staged at once (`stages`: 2 or 3 buffers), and the columns of y a plane computes (`pn`: 32
/// or 64, i.e. 4 or 8 n-tiles of 8; a plane's block is 64 × `pn`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MmaTile {
    pub bm: usize,
    pub bn: usize,
    pub bk: usize,
    pub stages: usize,
    pub pn: usize,
}

impl MmaTile {
    /// Planes a cube: one a 64 × `pn` block of the tile.
    pub fn planes(&self) -> usize {
        (self.bm / PLANE_M) * (self.bn / self.pn)
    }

    /// Shared memory a cube (bytes): `stages` buffers of x and W rows, a barrier a buffer,
    /// and the emulation's mma scratch.
    pub fn smem(&self, emulate: bool) -> usize {
        2 * self.stages * (self.bm + self.bn) * (self.bk + MMA_PAD)
            + if emulate {
                4 * 384 * self.planes()
            } else {
                8 * self.stages
            }
    }

    /// Whether the kernel can run this tile: whole planes, whole 32-deep steps, and every
    /// unit staging the same number of 16-byte vectors.
    fn check(&self, vec: usize) -> Result<()> {
        let threads = 32 * self.planes();
        ensure!(
            self.bm > 0
                && self.bn > 0
                && (self.pn == 32 || self.pn == 64)
                && self.bm.is_multiple_of(PLANE_M)
                && self.bn.is_multiple_of(self.pn)
                && self.bk > 0
                && self.bk.is_multiple_of(32)
                && (2..=3).contains(&self.stages)
                && (self.bm * self.bk / vec).is_multiple_of(threads)
                && (self.bn * self.bk / vec).is_multiple_of(threads),
            KernelError::unsupported("matmul (mma)", format!("tile {self:?}"))
        );
        Ok(())
    }
}

impl std::str::FromStr for MmaTile {
    type Err = anyhow::Error;

    /// `BMxBNxBK[xSTAGES[xPN]]` (`CUBEQWEN_MMA_TILE`, the kernel bench's
    /// `CUBEQWEN_BENCH_MMA_TILES`): 2 stages and planes of 32 columns where left out. Whether
    /// the kernel can run it is [`MmaTile::check`]'s to say, at launch.
    fn from_str(v: &str) -> Result<Self> {
        let n: Vec<usize> = v
            .trim()
            .split('x')
            .map(|p| p.parse::<usize>().ok())
            .collect::<Option<_>>()
            .filter(|n: &Vec<usize>| {
                (3..=5).contains(&n.len())
                    && n[..3].iter().all(|d| (16..=256).contains(d))
                    && n.get(3).is_none_or(|s| (2..=3).contains(s))
                    && n.get(4).is_none_or(|p| [32, 64].contains(p))
            })
            .ok_or_else(|| {
                anyhow::anyhow!(
                    "expected BMxBNxBK[xSTAGES[xPN]], each side from 16 to 256, 2 or 3 \
                     stages, PN (a plane's columns) 32 or 64"
                )
            })?;
        Ok(MmaTile {
            bm: n[0],
            bn: n[1],
            bk: n[2],
            stages: n.get(3).copied().unwrap_or(2),
            pn: n.get(4).copied().unwrap_or(32),
        })
    }
}

/// The tile for `m × n` on a device of `sms` multiprocessors: 128 × 128 × 64 with 2 stages and
/// planes of 64 × 64 where that gives every multiprocessor two cubes, else 64 × 128 × 64 with 2
/// stages and planes of 64 × 32 (H200, kernel bench, BENCHMARKS.md "2026-11-29d": the 64 × 64
/// planes 1.3–1.4× the 64 × 32 ones at the 7B shapes, 2 stages ahead of 3 and of 8-plane
/// tiles; with few tiles the 64-row ones). The emulation: 64 × 32 × 32, 3 stages (one plane,
/// within lavapipe's 32 KB of shared memory; the 3-buffer rotation tested).
pub fn tile_for(m: usize, n: usize, sms: usize, emulate: bool) -> MmaTile {
    if emulate {
        return MmaTile {
            bm: 64,
            bn: 32,
            bk: 32,
            stages: 3,
            pn: 32,
        };
    }
    let big = m.div_ceil(128) * n.div_ceil(128);
    if sms > 0 && big < 2 * sms {
        MmaTile {
            bm: 64,
            bn: 128,
            bk: 64,
            stages: 2,
            pn: 32,
        }
    } else {
        MmaTile {
            bm: 128,
            bn: 128,
            bk: 64,
            stages: 2,
            pn: 64,
        }
    }
}

/// Stages `rows` rows of `src` (`[valid, k_vec]` vectors), from row `row0`, vectors
/// `kv0..kv0 + bk / vec` of each, into buffer `buf` of `dst` (rows of `stride` vectors):
/// consecutive units move consecutive 16-byte vectors of a row. Rows at or past `valid` read
/// row `valid - 1` (finite; never written back). With a barrier the copies are `cp.async`,
/// committed to it; else plain loads and stores.
#[cube]
#[allow(clippy::too_many_arguments)]
fn stage_rows<V: Size>(
    src: &Array<Vector<f16, V>>,
    dst: &mut SharedMemory<Vector<f16, V>>,
    bar: &ComptimeOption<Shared<Barrier>>,
    buf: usize,
    row0: usize,
    valid: usize,
    k_vec: usize,
    kv0: usize,
    #[comptime] rows: usize,
    #[comptime] bk: usize,
    #[comptime] threads: usize,
) {
    let vec = V::value().comptime();
    let chunks = comptime!(bk / vec);
    let stride = comptime!((bk + MMA_PAD) / vec);
    #[unroll]
    for it in 0..comptime!(rows * chunks / threads) {
        let i = UNIT_POS as usize + it * threads;
        let (r, c) = (i / chunks, i % chunks);
        let from = min(row0 + r, valid - 1) * k_vec + kv0 + c;
        let at = (buf * rows + r) * stride + c;
        if comptime!(bar.is_some()) {
            copy_async(
                &src.slice(from, from + 1),
                &mut dst.slice_mut(at, at + 1),
                comptime!(vec as u32),
            );
        } else {
            dst[at] = src[from];
        }
    }
}

/// Waits on barrier `i` of the kernel's three ([`mma_wait_tile`]).
#[cube]
fn wait_on(
    b0: &ComptimeOption<Shared<Barrier>>,
    b1: &ComptimeOption<Shared<Barrier>>,
    b2: &ComptimeOption<Shared<Barrier>>,
    #[comptime] i: usize,
) {
    if comptime!(i == 0) {
        mma_wait_tile(b0);
    } else if comptime!(i == 1) {
        mma_wait_tile(b1);
    } else {
        mma_wait_tile(b2);
    }
}

/// Commits this unit's copies to barrier `i` of the kernel's three ([`mma_commit`]).
#[cube]
fn commit_on(
    b0: &ComptimeOption<Shared<Barrier>>,
    b1: &ComptimeOption<Shared<Barrier>>,
    b2: &ComptimeOption<Shared<Barrier>>,
    #[comptime] i: usize,
) {
    if comptime!(i == 0) {
        mma_commit(b0);
    } else if comptime!(i == 1) {
        mma_commit(b1);
    } else {
        mma_commit(b2);
    }
}

/// Step `s` of the k loop, the `j`-th of a round of `stages`: waits for its staged rows
/// (barrier `j`, which they were committed to; every unit is then past step `s - 1`, so that
/// step's buffer is free), stages step `s + stages - 1` into that buffer (committed to that
/// step's barrier, `(j + stages - 1) % stages`), and adds this plane's products of the step
/// into `acc`. Per 32 of k: one `ldmatrix.x4` of W a n-tile (B of two 16-deep k-steps, each
/// in two consecutive registers, as the mma takes them), then per k-step and m-tile one
/// `ldmatrix.x4` of x (A) and an mma a n-tile: `pn / 8` mmas a fragment load of A, 4 of B.
#[cube]
#[allow(clippy::too_many_arguments)]
fn mma_step<V: Size>(
    x: &Array<Vector<f16, V>>,
    w: &Array<Vector<f16, V>>,
    xs: &mut SharedMemory<Vector<f16, V>>,
    ws: &mut SharedMemory<Vector<f16, V>>,
    b0: &ComptimeOption<Shared<Barrier>>,
    b1: &ComptimeOption<Shared<Barrier>>,
    b2: &ComptimeOption<Shared<Barrier>>,
    acc: &mut Array<Pair32>,
    scratch: &mut SharedMemory<f32>,
    s: usize,
    steps: usize,
    m0: usize,
    n0: usize,
    m: usize,
    n: usize,
    k_vec: usize,
    pm: usize,
    pn: usize,
    #[comptime] bm: usize,
    #[comptime] bn: usize,
    #[comptime] bk: usize,
    #[comptime] stages: usize,
    #[comptime] plane_n: usize,
    #[comptime] j: usize,
    #[comptime] emulate: bool,
) {
    let vec = V::value().comptime();
    let nt = comptime!(plane_n / 8);
    let threads = comptime!((bm / PLANE_M) * (bn / plane_n) * 32);
    let stride = comptime!((bk + MMA_PAD) / vec);
    wait_on(b0, b1, b2, j);
    let ahead = s + stages - 1;
    if ahead < steps {
        let kv0 = ahead * comptime!(bk / vec);
        let buf = ahead % stages;
        stage_rows::<V>(x, xs, b0, buf, m0, m, k_vec, kv0, bm, bk, threads);
        stage_rows::<V>(w, ws, b0, buf, n0, n, k_vec, kv0, bn, bk, threads);
        commit_on(b0, b1, b2, comptime!((j + stages - 1) % stages));
    }
    let buf = s % stages;
    let xr = buf * bm + pm;
    let wr = buf * bn + pn;
    let mut c = Array::<Pair32>::new(2usize);
    let mut bf = Array::<Pair16>::new(2usize);
    let mut wf = Array::<Pair16>::new(comptime!(4 * nt));
    // Unrolled on CUDA (the accumulators and fragments stay in registers); loops in the
    // emulation, whose unrolled mmas would take lavapipe minutes to compile.
    #[unroll(!emulate)]
    for kk2 in 0..comptime!(bk / 32) {
        // B of n-tile jn, k-step 2·kk2 + h: registers 4jn + 2h, 4jn + 2h + 1.
        #[unroll(!emulate)]
        for jn in 0..nt {
            let f = mma_frags::<V>(ws, wr + 8 * jn, 32 * kk2, stride, false, false, emulate);
            #[unroll]
            for r in 0..4usize {
                wf[4 * jn + r] = f[r];
            }
        }
        #[unroll(!emulate)]
        for h in 0..2usize {
            #[unroll(!emulate)]
            for i in 0..4usize {
                let af = mma_frags::<V>(
                    xs,
                    xr + 16 * i,
                    16 * (2 * kk2 + h),
                    stride,
                    true,
                    false,
                    emulate,
                );
                #[unroll(!emulate)]
                for jn in 0..nt {
                    bf[0] = wf[4 * jn + 2 * h];
                    bf[1] = wf[4 * jn + 2 * h + 1];
                    c[0] = acc[2 * (nt * i + jn)];
                    c[1] = acc[2 * (nt * i + jn) + 1];
                    mma_16816(&af, &bf, &mut c, scratch, emulate);
                    acc[2 * (nt * i + jn)] = c[0];
                    acc[2 * (nt * i + jn) + 1] = c[1];
                }
            }
        }
    }
}

/// One cube: the `bm × bn` tile of y at cube (x: row tile, y: column tile), k in steps of `bk`
/// with `stages` (2 or 3) buffers, each step's copies committed to its own barrier.
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
fn matmul_mma_kernel<O: Float, V: Size>(
    x: &Array<Vector<f16, V>>,
    w: &Array<Vector<f16, V>>,
    bias: &Array<f32>,
    y: &mut Array<O>,
    m: usize,
    n: usize,
    k_vec: usize,
    ldy: usize,
    col_off: usize,
    #[comptime] has_bias: bool,
    #[comptime] bm: usize,
    #[comptime] bn: usize,
    #[comptime] bk: usize,
    #[comptime] stages: usize,
    #[comptime] plane_n: usize,
    #[comptime] emulate: bool,
) {
    let vec = V::value().comptime();
    let nt = comptime!(plane_n / 8);
    let planes_n = comptime!(bn / plane_n);
    let threads = comptime!((bm / PLANE_M) * planes_n * 32);
    let stride = comptime!((bk + MMA_PAD) / vec);
    let p = UNIT_POS as usize / 32;
    let lane = UNIT_POS as usize % 32;
    let (g, t) = (lane / 4, lane % 4);
    let m0 = CUBE_POS_X as usize * bm;
    let n0 = CUBE_POS_Y as usize * bn;
    // This plane's 64 × `plane_n` block of the tile.
    let pm = (p / planes_n) * PLANE_M;
    let pn = (p % planes_n) * plane_n;

    let mut xs = SharedMemory::<Vector<f16, V>>::new_aligned(stages * bm * stride, 16usize);
    let mut ws = SharedMemory::<Vector<f16, V>>::new_aligned(stages * bn * stride, 16usize);
    let b0 = copy_barrier(!emulate);
    let b1 = copy_barrier(!emulate);
    let b2 = copy_barrier(!emulate && stages > 2);
    let scratch_len = comptime!(if emulate { 384 * threads / 32 } else { 1usize });
    let mut scratch = SharedMemory::<f32>::new(scratch_len);

    // Accumulator of m-tile i, n-tile j: pairs 2(nt·i + j) (row g) and 2(nt·i + j) + 1 (row
    // g + 8).
    let mut acc = Array::<Pair32>::new(comptime!(8 * nt));
    #[unroll]
    for i in 0..comptime!(8 * nt) {
        let mut z = Pair32::empty();
        z[0] = 0.0;
        z[1] = 0.0;
        acc[i] = z;
    }

    let steps = k_vec / comptime!(bk / vec);
    // Steps 0..stages - 1 staged ahead, step j committed to barrier j.
    #[unroll]
    for j in 0..comptime!(stages - 1) {
        if j < steps {
            let kv0 = j * comptime!(bk / vec);
            stage_rows::<V>(x, &mut xs, &b0, j, m0, m, k_vec, kv0, bm, bk, threads);
            stage_rows::<V>(w, &mut ws, &b0, j, n0, n, k_vec, kv0, bn, bk, threads);
            commit_on(&b0, &b1, &b2, j);
        }
    }
    // Step s waits on barrier s % stages and stages step s + stages - 1 on the barrier of the
    // step before it ((s - 1) % stages), whose wait every unit has passed.
    let mut s = 0usize;
    while s < steps {
        #[unroll]
        for j in 0..stages {
            if s + j < steps {
                mma_step::<V>(
                    x,
                    w,
                    &mut xs,
                    &mut ws,
                    &b0,
                    &b1,
                    &b2,
                    &mut acc,
                    &mut scratch,
                    s + j,
                    steps,
                    m0,
                    n0,
                    m,
                    n,
                    k_vec,
                    pm,
                    pn,
                    bm,
                    bn,
                    bk,
                    stages,
                    plane_n,
                    j,
                    emulate,
                );
            }
        }
        s += stages;
    }

    // Lane (g, t) holds rows g and g + 8 of each m-tile, columns 2t and 2t + 1 of each n-tile.
    #[unroll]
    for i in 0..4usize {
        #[unroll]
        for r in 0..2usize {
            let row = m0 + pm + 16 * i + g + 8 * r;
            if row < m {
                #[unroll]
                for j in 0..nt {
                    let v = acc[2 * (nt * i + j) + r];
                    #[unroll]
                    for e in 0..2usize {
                        let col = n0 + pn + 8 * j + 2 * t + e;
                        if col < n {
                            let mut s = v[e];
                            if comptime!(has_bias) {
                                s += bias[col_off + col];
                            }
                            y[row * ldy + col_off + col] = O::cast_from(s);
                        }
                    }
                }
            }
        }
    }
}

/// How the mma matmul runs on `client`'s device: the instructions (`false`) where it has them,
/// else emulated (`true`).
pub fn emulated<R: Runtime>(client: &ComputeClient<R>) -> bool {
    !mma_supported(client)
}

/// `y[:, col_off..col_off + n] = x·Wᵀ (+ bias[col_off..])` with the mma kernel at `tile`
/// (`None`: [`tile_for`]); `bias` is the bias argument (any 4 bytes where `has_bias` is false).
/// Shapes are the caller's ([`crate::matmul::matmul_into`] checks them); here: f16 only, k a
/// multiple of the tile's depth.
#[allow(clippy::too_many_arguments)]
pub(crate) fn matmul_mma<R: Runtime, F: Float + CubeElement, O: Float + CubeElement>(
    client: &ComputeClient<R>,
    tile: Option<MmaTile>,
    x: &DeviceTensor<R, F>,
    w: &DeviceTensor<R, F>,
    bias: ArrayArg<R>,
    has_bias: bool,
    y: &DeviceTensor<R, O>,
    (m, n, k): (usize, usize, usize),
    col_off: usize,
) -> Result<()> {
    ensure!(
        F::as_type_native_unchecked().elem_type() == ElemType::Float(FloatKind::F16),
        KernelError::unsupported("matmul (mma)", "f16 tensors only")
    );
    // Native: `mma_supported` implies 32-wide planes. The emulation uses no plane operations
    // (a "lane" is a unit's position modulo 32), so any plane width serves.
    let emulate = emulated(client);
    let sms = client
        .properties()
        .hardware
        .num_streaming_multiprocessors
        .unwrap_or(0) as usize;
    let tile = tile.unwrap_or_else(|| tile_for(m, n, sms, emulate));
    let vec = crate::matmul::vector_size(client, size_of::<F>(), k).min(8);
    tile.check(vec)?;
    ensure!(
        k.is_multiple_of(tile.bk),
        KernelError::unsupported(
            "matmul (mma)",
            format!("k = {k} is not a multiple of {}", tile.bk)
        )
    );
    let smem = tile.smem(emulate);
    let max_smem = client.properties().hardware.max_shared_memory_size;
    ensure!(
        smem <= max_smem,
        KernelError::unsupported(
            "matmul (mma)",
            format!("tile {tile:?} needs {smem} bytes of shared memory, the device has {max_smem}")
        )
    );
    let (max_x, max_y, _) = client.properties().hardware.max_cube_count;
    let (tm, tn) = (m.div_ceil(tile.bm), n.div_ceil(tile.bn));
    ensure!(
        tm <= max_x as usize && tn <= max_y as usize,
        KernelError::unsupported("matmul (mma)", format!("{m}×{n} needs too many tiles"))
    );
    let ldy = y.shape[1];
    matmul_mma_kernel::launch::<O, R>(
        client,
        CubeCount::new_2d(tm as u32, tn as u32),
        CubeDim::new_1d((32 * tile.planes()) as u32),
        vec,
        // SAFETY: same buffers, viewed as vectors of `vec` elements; k % vec == 0.
        unsafe { ArrayArg::from_raw_parts(x.handle.clone(), x.len() / vec) },
        unsafe { ArrayArg::from_raw_parts(w.handle.clone(), w.len() / vec) },
        bias,
        y.arg(),
        m,
        n,
        k / vec,
        ldy,
        col_off,
        has_bias,
        tile.bm,
        tile.bn,
        tile.bk,
        tile.stages,
        tile.pn,
        emulate,
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tiles_fill_the_device_and_fit_the_kernel() {
        // H200 (132 multiprocessors): the 0.5B o projection at 2048 rows (16 × 7 = 112 tiles of
        // 128) takes 64-row tiles; the gate (16 × 38 = 608) 128-row tiles.
        assert_eq!(tile_for(2048, 896, 132, false).bm, 64);
        assert_eq!(tile_for(2048, 4864, 132, false).bm, 128);
        assert_eq!(tile_for(2048, 4864, 132, false).pn, 64);
        for m in [1, 64, 512, 2048] {
            for n in [128, 896, 4864, 151936] {
                for emulate in [false, true] {
                    let t = tile_for(m, n, 132, emulate);
                    t.check(8).unwrap();
                    assert!(t.smem(emulate) <= if emulate { 32 << 10 } else { 80 << 10 });
                }
            }
        }
        let tile = |bm, bn, bk, stages| MmaTile {
            bm,
            bn,
            bk,
            stages,
            pn: 32,
        };
        assert!(tile(64, 32, 48, 2).check(8).is_err());
        assert!(tile(96, 32, 32, 2).check(8).is_err());
        assert!(tile(64, 32, 32, 4).check(8).is_err());
        assert!(tile(128, 128, 32, 3).check(8).is_ok());
        let wide = MmaTile {
            pn: 64,
            ..tile(128, 128, 64, 3)
        };
        assert_eq!(wide.planes(), 4);
        assert!(wide.check(8).is_ok());
        // Shared memory counts every stage's buffers: 3 stages of 128 × 128 × 64 take over 100
        // KB (two such cubes fit a multiprocessor's 227 KB, three do not), 2 stages under 80 KB.
        assert!(wide.smem(false) > 100 << 10);
        assert!(MmaTile { stages: 2, ..wide }.smem(false) < 80 << 10);
        assert!(MmaTile { pn: 48, ..wide }.check(8).is_err());
        assert!(MmaTile { bn: 96, ..wide }.check(8).is_err());
    }
}
