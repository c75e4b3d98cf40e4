//! Argmax and top-k over vocabulary-wide rows: finite values only, ties to the lowest id;
//! every level (pieces of a row, then their candidates, until one group is left) against the
//! sorting reference.

use anyhow::{ensure, Result};
use cubecl::prelude::*;
use cubeqwen_kernels::select::{argmax, top_k, top_k_reference, TopK, MAX_K};
use cubeqwen_kernels::testing::*;
use cubeqwen_kernels::{device_test, DeviceTensor};

/// Every row of `got` equals the reference's top-k of that row of `values` (ids and values).
fn same(got: &[Vec<(u32, f32)>], values: &[f32], n: usize, k: usize, what: &str) -> Result<()> {
    ensure!(got.len() * n == values.len(), "{what}: {} rows", got.len());
    for (r, row) in got.iter().enumerate() {
        let want = top_k_reference(&values[r * n..(r + 1) * n], k);
        let at = row
            .iter()
            .zip(&want)
            .position(|(a, b)| a != b)
            .unwrap_or(row.len().min(want.len()));
        ensure!(
            *row == want,
            "{what} row {r} k {k}: {} results, {} wanted; from rank {at}: got {:?}… want {:?}…",
            row.len(),
            want.len(),
            &row[at..row.len().min(at + 6)],
            &want[at..want.len().min(at + 6)]
        );
    }
    Ok(())
}

fn check<R: Runtime>(client: &ComputeClient<R>, seed: u64) -> Result<()> {
    let mut rng = Rng::new(seed);
    let (rows, vocab) = (5, 151936);
    let mut logits = rng.f32_vec(rows * vocab, 0.0, 3.0);
    // Row 1: a tie for the maximum (lowest id must win) and repeated values in the top-k.
    let top = 50.0;
    logits[vocab + 90000] = top;
    logits[vocab + 70000] = top;
    logits[vocab + 5] = 40.0;
    logits[vocab + 4] = 40.0;
    logits[vocab + 1256] = 45.0;
    logits[vocab + 1000] = 45.0;
    // Equal values 32, 256 and 2048 ids apart: in one unit's registers for pieces of any of
    // those strides, so the unit's own tie rule is tested, not only the reduction's.
    for id in [3000, 3032, 3256, 5048] {
        logits[vocab + id] = 44.0;
    }
    // Row 2: NaNs and infinities, where the maximum and the minimum would be.
    logits[2 * vocab + 17] = f32::NAN;
    logits[2 * vocab + 151935] = f32::NAN;
    logits[2 * vocab + 60000] = f32::INFINITY;
    logits[2 * vocab + 60001] = f32::NEG_INFINITY;
    // Row 3: the whole top 60 in one piece (a later level must take more than one per piece), with
    // the largest finite value among them.
    for j in 0..60 {
        logits[3 * vocab + 4100 + j] = 10.0 + j as f32 * 0.25;
    }
    logits[3 * vocab + 4159] = f32::MAX;
    // Row 4: negative values only, one of them the lowest finite f32.
    for v in &mut logits[4 * vocab..] {
        *v = -1.0 - *v;
    }
    logits[4 * vocab + 3] = -f32::MAX;
    let ld = DeviceTensor::<R, f32>::from_slice(client, &logits, &[rows, vocab])?;
    let am = argmax(client, &ld)?;
    for r in 0..rows {
        let want = top_k_reference(&logits[r * vocab..(r + 1) * vocab], 1)[0].0;
        ensure!(
            am[r] == want,
            "row {r}: argmax {} != {want} (seed {seed})",
            am[r]
        );
    }
    ensure!(am[1] == 70000, "tie must go to the lowest id");
    ensure!(am[2] != 60000, "+inf must not be chosen");
    for k in [1, 2, 5, 40, 128] {
        same(&top_k(client, &ld, k)?, &logits, vocab, k, "vocab rows")?;
    }

    // Small first-level pieces: k above the piece length (empty slots in the first level), a
    // short last piece, up to four levels, and rows with fewer finite values than k.
    let (rows, n) = (3, 1000);
    let mut v = rng.f32_vec(rows * n, -2.0, 2.0);
    // Row 1: 17 distinct values, so ties meet inside each unit and each pass.
    for x in &mut v[n..2 * n] {
        *x = (*x * 4.0).round() / 4.0;
    }
    for x in &mut v[2 * n + 30..3 * n] {
        *x = f32::NAN;
    }
    let vd = DeviceTensor::<R, f32>::from_slice(client, &v, &[rows, n])?;
    let flipped: Vec<f32> = v.iter().map(|x| 100.0 - x).collect();
    let other = DeviceTensor::<R, f32>::from_slice(client, &flipped, &[rows, n])?;
    // (120, 8): nine levels (15 000 candidates, then 7 080, 3 360, ...: 120 of each 256 kept).
    for (k, chunk) in [(40, 16), (7, 96), (100, 256), (25, 33), (120, 8)] {
        let t = TopK::with_chunk(client, rows, n, k, chunk)?;
        // A run on other values first: nothing of it may survive in the buffers.
        t.run(client, None, &other)?;
        t.run(client, None, &vd)?;
        let got = t.read(client)?;
        same(&got, &v, n, k, &format!("chunk {chunk}"))?;
        ensure!(got[2].len() == k.min(30), "row of 30 finite values, k {k}");
    }
    // f16 input.
    let h: Vec<half::f16> = v.iter().map(|&x| half::f16::from_f32(x)).collect();
    let hd = DeviceTensor::<R, half::f16>::from_slice(client, &h, &[rows, n])?;
    let back: Vec<f32> = h.iter().map(|x| x.to_f32()).collect();
    same(&top_k(client, &hd, 12)?, &back, n, 12, "f16")?;

    // Bad arguments are errors.
    ensure!(top_k(client, &vd, 0).is_err() && top_k(client, &vd, n + 1).is_err());
    ensure!(top_k(client, &ld, MAX_K + 1).is_err(), "k above MAX_K");
    let all_nan = DeviceTensor::<R, f32>::from_slice(client, &[f32::NAN; 8], &[1, 8])?;
    ensure!(
        argmax(client, &all_nan).is_err(),
        "a row without finite values"
    );
    println!("argmax and top-k exact on 5×{vocab} and {rows}×{n} in small chunks (seed {seed})");
    Ok(())
}

device_test! {
    fn argmax_and_top_k_match_reference<R>(client, seed) {
        check(client, seed)
    }
}
