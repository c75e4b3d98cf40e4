//! The numeric building blocks: matrix-vector products and NEOX RoPE (RMSNorm, the RoPE
//! frequencies and SwiGLU are the kernels' own f64 references).
//!
//! Everything is computed in f64. Weights are stored as f32 (exact for f16 sources) and
//! widened element by element inside the dot product.

use cubeqwen_kernels::rope::inv_freq;

/// A row-major 2-D weight `[rows][cols]`, stored as f32.
#[derive(Debug, Clone, PartialEq)]
pub struct Mat {
    pub rows: usize,
    pub cols: usize,
    pub data: Vec<f32>,
}

impl Mat {
    pub fn row(&self, r: usize) -> &[f32] {
        &self.data[r * self.cols..(r + 1) * self.cols]
    }
}

/// `sum_i w[i] * x[i]` in f64, with 8 independent accumulators (so the compiler can vectorize)
/// summed in a fixed order. The result depends only on the two slices, never on how a
/// matmul was batched, so prefill and decode give bit-identical rows.
#[inline]
pub fn dot_f32_f64(w: &[f32], x: &[f64]) -> f64 {
    debug_assert_eq!(w.len(), x.len());
    let mut acc = [0f64; 8];
    let wc = w.chunks_exact(8);
    let xc = x.chunks_exact(8);
    let (wr, xr) = (wc.remainder(), xc.remainder());
    for (w8, x8) in wc.zip(xc) {
        for k in 0..8 {
            acc[k] += w8[k] as f64 * x8[k];
        }
    }
    let mut s = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    for (a, b) in wr.iter().zip(xr) {
        s += *a as f64 * *b;
    }
    s
}

/// Plain f64 dot product (attention scores), same accumulation pattern as [`dot_f32_f64`].
#[inline]
pub fn dot_f64(a: &[f64], b: &[f64]) -> f64 {
    debug_assert_eq!(a.len(), b.len());
    let mut acc = [0f64; 8];
    let ac = a.chunks_exact(8);
    let bc = b.chunks_exact(8);
    let (ar, br) = (ac.remainder(), bc.remainder());
    for (a8, b8) in ac.zip(bc) {
        for k in 0..8 {
            acc[k] += a8[k] * b8[k];
        }
    }
    let mut s = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    for (x, y) in ar.iter().zip(br) {
        s += x * y;
    }
    s
}

/// Number of worker threads for the big matmuls.
pub fn threads() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .clamp(1, 64)
}

/// `out[t][r] = sum_c w[r][c] * x[t][c]` for `n` rows of `x` (`x` is `[n][w.cols]`),
/// returning `[n][w.rows]`. Work is split over the weight rows across all cores.
pub fn matmul(x: &[f64], n: usize, w: &Mat) -> Vec<f64> {
    assert_eq!(x.len(), n * w.cols, "matmul: input is not [n][cols]");
    let (rows, cols) = (w.rows, w.cols);
    let mut out = vec![0f64; n * rows];
    if n == 0 || rows == 0 {
        return out;
    }
    let nt = threads();
    // Small products are not worth a thread spawn.
    if nt == 1 || (rows * cols * n) < (1 << 16) {
        for r in 0..rows {
            let wr = w.row(r);
            for t in 0..n {
                out[t * rows + r] = dot_f32_f64(wr, &x[t * cols..(t + 1) * cols]);
            }
        }
        return out;
    }
    let chunk = rows.div_ceil(nt);
    let parts: Vec<(usize, Vec<f64>)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..nt)
            .map(|i| {
                let r0 = (i * chunk).min(rows);
                let r1 = ((i + 1) * chunk).min(rows);
                s.spawn(move || {
                    let m = r1 - r0;
                    let mut part = vec![0f64; n * m];
                    for r in r0..r1 {
                        let wr = w.row(r);
                        for t in 0..n {
                            part[t * m + (r - r0)] = dot_f32_f64(wr, &x[t * cols..(t + 1) * cols]);
                        }
                    }
                    (r0, part)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("matmul worker panicked"))
            .collect()
    });
    for (r0, part) in parts {
        let m = part.len() / n;
        for t in 0..n {
            out[t * rows + r0..t * rows + r0 + m].copy_from_slice(&part[t * m..(t + 1) * m]);
        }
    }
    out
}

/// The RoPE angle of pair `i` at position `pos`: `pos · inv_freq` as an f32 product.
pub fn rope_angle(theta: f32, i: usize, hd: usize, pos: usize) -> f32 {
    pos as f32 * inv_freq(theta, i, hd)
}

/// Rotates one head vector in place for position `pos`.
///
/// NEOX pairing (the Qwen2 convention): element `i` rotates with `i + hd/2`.
/// With `adjacent` (a fault-injection switch) element `2i` rotates with `2i+1` instead
/// (the GPT-J / "normal" llama.cpp convention), using the same angles.
/// The angle is formed in f32; its sin/cos are taken in f64.
pub fn rope_head(x: &mut [f64], pos: usize, theta: f32, adjacent: bool) {
    let hd = x.len();
    let half = hd / 2;
    for i in 0..half {
        let a = rope_angle(theta, i, hd, pos) as f64;
        let (s, c) = a.sin_cos();
        let (j0, j1) = if adjacent {
            (2 * i, 2 * i + 1)
        } else {
            (i, i + half)
        };
        let (x0, x1) = (x[j0], x[j1]);
        x[j0] = x0 * c - x1 * s;
        x[j1] = x1 * c + x0 * s;
    }
}

/// Applies [`rope_head`] to every head of every row; row `t` is at position `positions[t]`.
pub fn rope_rows(
    x: &mut [f64],
    heads: usize,
    hd: usize,
    positions: &[usize],
    theta: f32,
    adjacent: bool,
) {
    let width = heads * hd;
    for (row, &pos) in x.chunks_exact_mut(width).zip(positions) {
        for head in row.chunks_exact_mut(hd) {
            rope_head(head, pos, theta, adjacent);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dot_matches_naive() {
        for n in [0usize, 1, 7, 8, 9, 31, 64, 100] {
            let w: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin()).collect();
            let x: Vec<f64> = (0..n).map(|i| (i as f64 * 0.11).cos()).collect();
            let naive: f64 = w.iter().zip(&x).map(|(a, b)| *a as f64 * b).sum();
            assert!((dot_f32_f64(&w, &x) - naive).abs() < 1e-13, "n={n}");
            let w64: Vec<f64> = w.iter().map(|&v| v as f64).collect();
            assert!((dot_f64(&w64, &x) - naive).abs() < 1e-13, "n={n}");
        }
    }

    #[test]
    fn threaded_matmul_matches_sequential() {
        let (rows, cols, n) = (301, 130, 5); // large enough to take the threaded path
        let w = Mat {
            rows,
            cols,
            data: (0..rows * cols)
                .map(|i| ((i * 7919) % 1000) as f32 / 1000.0 - 0.5)
                .collect(),
        };
        let x: Vec<f64> = (0..n * cols).map(|i| (i as f64 * 0.013).sin()).collect();
        let out = matmul(&x, n, &w);
        for t in 0..n {
            for r in 0..rows {
                let want = dot_f32_f64(w.row(r), &x[t * cols..(t + 1) * cols]);
                assert_eq!(out[t * rows + r], want, "t={t} r={r}");
            }
        }
    }
}
