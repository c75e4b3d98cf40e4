#![allow(dead_code)]
//! Teacher-forced checks of a device run against the f64 reference on the real model.
//!
//! The reference prefills the device's whole sequence once (prompt and generated tokens),
//! with logits at every position, and judges every token the device picked at that same
//! prefix: it must be the reference's first choice, or within [`NEAR_TIE`] of it (where f16
//! rounding may legitimately flip the order). So every step of every case is checked, not
//! only the prefix before the first near-tie.

use anyhow::{ensure, Context, Result};
use cubeqwen::reference::RefModel;
use cubeqwen::sampling::top2;
use cubeqwen_kernels::testing::rel_err;

/// A device pick is accepted when the reference's logit for it is within this of the
/// reference's largest logit. The device's logits differ from the reference's by at most
/// 0.03 absolute on the real model (golden_device on wgpu, all cases): 3x that, rounded up.
pub const NEAR_TIE: f64 = 0.1;

/// What the teacher-forced check saw.
#[derive(Debug, Default)]
pub struct Forced {
    /// Positions judged.
    pub checked: usize,
    /// Positions where the device's pick was not the reference's first choice (near-ties).
    pub near_ties: Vec<(usize, u32, u32, f64)>,
    /// Largest reference gap (top logit minus the pick's) among the picks.
    pub worst_gap: f64,
    /// Per-position relative logit error of the device against the reference, when the
    /// device's logits were given: the worst and its position.
    pub worst_rel: Option<(f64, usize)>,
    /// Every violation, one line each.
    pub failures: Vec<String>,
}

/// Judges `picks` (the device's choice at positions `from..from + picks.len()` of `seq`)
/// with the reference's logits over `seq`, which must reach at least the last judged
/// position. With `device_logits` (`[from + picks.len()][vocab]`, row p the device's logits
/// at position p, or empty), each row is also compared by relative error, limit `max_rel`.
pub fn judge(
    reference: &RefModel,
    seq: &[u32],
    from: usize,
    picks: &[u32],
    device_logits: &[Vec<f32>],
    max_rel: f64,
) -> Result<Forced> {
    let end = from + picks.len();
    ensure!(
        end <= seq.len(),
        "picks reach position {end}, the sequence has {}",
        seq.len()
    );
    let logits = reference.forward(&mut reference.new_cache(), &seq[..end], 0)?;
    let mut out = Forced::default();
    for (i, &pick) in picks.iter().enumerate() {
        let p = from + i;
        let row = &logits[p];
        let (top, best, _) = top2(row).context("reference logits are all NaN")?;
        let gap = best - row[pick as usize];
        out.checked += 1;
        if !(gap <= out.worst_gap) {
            out.worst_gap = gap;
        }
        if top as u32 != pick {
            out.near_ties.push((p, pick, top as u32, gap));
        }
        if !(gap < NEAR_TIE) {
            out.failures.push(format!(
                "position {p}: the device picked {pick}, the reference's top is {top} by {gap:.4} (near-tie limit {NEAR_TIE})"
            ));
        }
    }
    for (p, d) in device_logits.iter().enumerate() {
        let d: Vec<f64> = d.iter().map(|&v| v as f64).collect();
        let e = rel_err(&d, &logits[p]);
        if out.worst_rel.is_none_or(|(w, _)| !(e <= w)) {
            out.worst_rel = Some((e, p));
        }
        if !(e <= max_rel) {
            out.failures.push(format!(
                "position {p}: logit rel err {e:.3e} > {max_rel:.0e}"
            ));
        }
    }
    Ok(out)
}
