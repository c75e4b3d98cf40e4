//! Choosing tokens on the device: argmax and top-k over each row of logits.
//!
//! Ties go to the lowest id (as the reference and the golden data do). Top-k runs k rounds of
//! a block-wide arg-max, each excluding what earlier rounds took ((value, id) ordered by value
//! descending, then id ascending), so ties and repeated values are handled exactly.

use anyhow::{ensure, Result};
use cubecl::prelude::*;

use crate::reduce::{reduce_max, reduce_min, Reduction};
use crate::{DeviceTensor, KernelError};

/// Threads per row (a power of two, as the reduction needs).
const BLOCK: usize = 256;

#[cube(launch)]
fn topk_kernel<F: Float>(
    logits: &Array<F>,
    out_ids: &mut Array<u32>,
    out_vals: &mut Array<f32>,
    vocab: usize,
    k: usize,
    #[comptime] row_best: Reduction,
) {
    let row = CUBE_POS;
    let tid = UNIT_POS as usize;
    let base = row * vocab;

    // (prev_v, prev_i): the last pick; candidates must come strictly after it in the order.
    let mut prev_v = f32::new(3.0e38);
    let mut prev_i = 0u32;
    for r in 0..k {
        // This thread's best candidate; `vocab` (past every id) when it has none.
        let mut bv = f32::new(-3.0e38);
        let mut bi = vocab as u32;
        let mut i = tid;
        while i < vocab {
            let v = f32::cast_from(logits[base + i]);
            let id = i as u32;
            let after_prev = r == 0 || v < prev_v || (v == prev_v && id > prev_i);
            // NaN compares false everywhere, so it is never picked.
            if after_prev && (v > bv || (v == bv && id < bi)) {
                bv = v;
                bi = id;
            }
            i += row_best.units;
        }
        // The row's best value, then the lowest id among the threads that hold it.
        prev_v = reduce_max::<f32>(bv, row_best);
        let mut id_if_best = vocab as u32;
        if bv == prev_v {
            id_if_best = bi;
        }
        prev_i = reduce_min::<u32>(id_if_best, row_best);
        if tid == 0 {
            out_ids[row * k + r] = prev_i;
            out_vals[row * k + r] = prev_v;
        }
    }
}

/// The `k` largest logits of each row of `logits` ([rows, vocab]), largest first (lowest id
/// first among equal values): ids [rows, k] and values [rows, k]. `k = 1` is the argmax.
pub fn top_k<R: Runtime, F: Float + CubeElement>(
    client: &ComputeClient<R>,
    logits: &DeviceTensor<R, F>,
    k: usize,
) -> Result<(DeviceTensor<R, u32>, DeviceTensor<R, f32>)> {
    ensure!(
        logits.shape.len() == 2,
        KernelError::shape("top_k", "logits", "[rows, vocab]", &logits.shape)
    );
    let (rows, vocab) = (logits.shape[0], logits.shape[1]);
    ensure!(
        k >= 1 && k <= vocab,
        KernelError::invalid("top_k", format!("k must be in 1..={vocab}, got {k}"))
    );
    ensure!(
        k <= 1024,
        KernelError::unsupported(
            "top_k",
            format!("k = {k} is more than this kernel is meant for (at most 1024)")
        )
    );
    let max_rows = client.properties().hardware.max_cube_count.0 as usize;
    ensure!(
        rows <= max_rows,
        KernelError::unsupported(
            "top_k",
            format!("at most {max_rows} rows per launch on this device, got {rows}")
        )
    );
    let ids = DeviceTensor::<R, u32>::empty(client, &[rows, k])?;
    let vals = DeviceTensor::<R, f32>::empty(client, &[rows, k])?;
    topk_kernel::launch::<F, R>(
        client,
        CubeCount::new_1d(rows as u32),
        CubeDim::new_1d(BLOCK as u32),
        logits.arg(),
        ids.arg(),
        vals.arg(),
        vocab,
        k,
        Reduction::cube(client, BLOCK),
    );
    Ok((ids, vals))
}

/// Index of the largest logit of each row (lowest id on ties).
pub fn argmax<R: Runtime, F: Float + CubeElement>(
    client: &ComputeClient<R>,
    logits: &DeviceTensor<R, F>,
) -> Result<DeviceTensor<R, u32>> {
    Ok(top_k(client, logits, 1)?.0)
}

/// Reference: the `k` best (id, value) of `row`, value descending then id ascending; NaN never.
pub fn top_k_reference(row: &[f32], k: usize) -> Vec<(u32, f32)> {
    let mut v: Vec<(u32, f32)> = row
        .iter()
        .enumerate()
        .filter(|(_, x)| !x.is_nan())
        .map(|(i, &x)| (i as u32, x))
        .collect();
    v.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    v.truncate(k);
    v
}
