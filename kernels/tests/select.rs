//! Argmax and top-k over vocabulary-sized rows: ties to the lowest id, NaN never chosen.

use anyhow::{ensure, Result};
use cubecl::prelude::*;
use cubeqwen_kernels::select::{argmax, top_k, top_k_reference};
use cubeqwen_kernels::testing::*;
use cubeqwen_kernels::{device_test, DeviceTensor};

fn check<R: Runtime>(client: &ComputeClient<R>, seed: u64) -> Result<()> {
    let mut rng = Rng::new(seed);
    let (rows, vocab) = (3, 151936);
    let mut logits = rng.f32_vec(rows * vocab, 0.0, 3.0);
    // Row 1: a tie for the maximum (lowest id must win) and repeated values in the top-k.
    let top = 50.0;
    logits[vocab + 90000] = top;
    logits[vocab + 70000] = top;
    logits[vocab + 5] = 40.0;
    logits[vocab + 4] = 40.0;
    // Row 2: NaNs, one where the maximum would be.
    logits[2 * vocab + 17] = f32::NAN;
    logits[2 * vocab + 151935] = f32::NAN;
    let ld = DeviceTensor::<R, f32>::from_slice(client, &logits, &[rows, vocab])?;
    let am = argmax(client, &ld)?.to_vec(client)?;
    for r in 0..rows {
        let want = top_k_reference(&logits[r * vocab..(r + 1) * vocab], 1)[0].0;
        ensure!(
            am[r] == want,
            "row {r}: argmax {} != {want} (seed {seed})",
            am[r]
        );
    }
    ensure!(am[1] == 70000, "tie must go to the lowest id");
    for k in [1, 2, 5, 40] {
        let (ids, vals) = top_k(client, &ld, k)?;
        let (ids, vals) = (ids.to_vec(client)?, vals.to_vec(client)?);
        for r in 0..rows {
            let want = top_k_reference(&logits[r * vocab..(r + 1) * vocab], k);
            for (j, (wi, wv)) in want.iter().enumerate() {
                ensure!(
                    ids[r * k + j] == *wi && vals[r * k + j] == *wv,
                    "row {r} k {k} rank {j}: got ({}, {}) want ({wi}, {wv}) (seed {seed})",
                    ids[r * k + j],
                    vals[r * k + j]
                );
            }
        }
    }
    println!("argmax and top-k (k = 1, 2, 5, 40) exact on {rows}×{vocab} (seed {seed})");
    Ok(())
}

device_test! {
    fn argmax_and_top_k_match_reference<R>(client, seed) {
        check(client, seed)
    }
}
