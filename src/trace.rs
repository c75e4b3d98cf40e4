//! The parity tracer: run the forward pass on the device while capturing every named step,
//! run the same steps in the f64 reference (or read activations that Hugging Face
//! transformers dumped), and report where they part.
//!
//! Step names are those of [`crate::reference::trace::step_names`]: `embedding`, per layer
//! `LN.attn_norm`, `LN.q`, `LN.k`, `LN.v`, `LN.q_rope`, `LN.k_rope`, `LN.attn`, `LN.attn_out`,
//! `LN.resid1`, `LN.ffn_norm`, `LN.gate`, `LN.up`, `LN.swiglu`, `LN.down`, `LN.resid2`, then
//! `output_norm`, `logits`. Tracing costs nothing when off: the production path gets `None`.

use std::collections::{BTreeSet, HashMap};
use std::fmt::Write as _;
use std::ops::Range;
use std::path::Path;

use anyhow::{bail, ensure, Context, Result};
use cubecl::prelude::*;
use cubeqwen_kernels::testing::try_rel_err;
use cubeqwen_loaders::{HostModel, TensorData};

use crate::forward::{Session, StepObserver, StepTensor};
use crate::reference::trace::{step_names, Capture, Tracer};
use crate::reference::RefModel;

/// A [`StepObserver`] that reads each step back into a reference-style [`Capture`].
pub struct DeviceCapture {
    pub capture: Capture,
}

impl<R: Runtime> StepObserver<R> for DeviceCapture {
    fn begin(&mut self, start_pos: usize, ids: &[u32]) {
        self.capture.begin(start_pos, ids);
    }

    fn step(
        &mut self,
        client: &ComputeClient<R>,
        name: &str,
        value: StepTensor<'_, R>,
    ) -> Result<()> {
        let (shape, data) = value.to_f64(client)?;
        ensure!(shape.len() == 2, "step {name} has shape {shape:?}");
        self.capture.record(name, shape[0], shape[1], &data);
        Ok(())
    }
}

/// Every step of the device forward pass over `ids` on a fresh `session`: `ids[..prefill]`
/// prefilled (in chunks of `session.prefill_chunk`, logits at every position), then each
/// later id decoded on its own (teacher-forced), as generation runs them.
pub fn device_trace<R: Runtime>(
    client: &ComputeClient<R>,
    session: &mut Session<'_, R>,
    ids: &[u32],
    prefill: usize,
) -> Result<Capture> {
    ensure!(session.len == 0, "device_trace needs a fresh session");
    ensure!(
        (1..=ids.len()).contains(&prefill),
        "trace: prefill {prefill} must be 1..={} tokens",
        ids.len()
    );
    let mut obs = DeviceCapture {
        capture: Capture::all(),
    };
    session.forward_all(client, &ids[..prefill], Some(&mut obs))?;
    for &id in &ids[prefill..] {
        session.forward(client, &[id], Some(&mut obs))?;
    }
    Ok(obs.capture)
}

/// Every step of the f64 reference over `ids`.
pub fn reference_trace(host: &HostModel, ids: &[u32]) -> Result<Capture> {
    let model = RefModel::new(host)?;
    let mut cache = model.new_cache();
    let mut cap = Capture::all();
    model.forward_traced(&mut cache, ids, 0, &mut cap)?;
    Ok(cap)
}

/// Activations dumped by `scripts/hf_reference.py --activations`: a safetensors file with one f32
/// tensor [tokens, width] per step name, and the prompt ids as the i64 tensor `input_ids`.
pub fn file_trace(path: &Path) -> Result<(Vec<u32>, Capture)> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let st = safetensors::SafeTensors::deserialize(&bytes)
        .map_err(|e| anyhow::anyhow!("{}: not a safetensors file: {e}", path.display()))?;
    let ids_t = st
        .tensor("input_ids")
        .map_err(|_| anyhow::anyhow!("{}: no `input_ids` tensor", path.display()))?;
    ensure!(
        ids_t.dtype() == safetensors::Dtype::I64,
        "{}: input_ids must be i64",
        path.display()
    );
    let ids: Vec<u32> = ids_t
        .data()
        .chunks(8)
        .map(|b| i64::from_le_bytes(b.try_into().unwrap()) as u32)
        .collect();
    let mut cap = Capture::all();
    cap.begin(0, &ids);
    for (name, t) in st.tensors() {
        if name == "input_ids" {
            continue;
        }
        ensure!(
            t.dtype() == safetensors::Dtype::F32,
            "{}: step {name} must be f32",
            path.display()
        );
        let shape = t.shape();
        ensure!(
            shape.len() == 2 && shape[0] == ids.len(),
            "{}: step {name} has shape {shape:?}, expected [{}, width]",
            path.display(),
            ids.len()
        );
        let data: Vec<f64> = t
            .data()
            .chunks(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()) as f64)
            .collect();
        cap.record(&name, shape[0], shape[1], &data);
    }
    Ok((ids, cap))
}

/// One line of the report.
#[derive(Debug, Clone)]
pub struct StepReport {
    pub name: String,
    pub rel_err: f64,
    pub max_abs: f64,
    /// (position, column) of the largest absolute difference.
    pub worst: (usize, usize),
    pub cosine: f64,
    pub beyond: bool,
}

/// Compares the steps of `expected` and `got` (all captured positions), in the model's step
/// order, restricted to `only` layers (global steps always included). Every step `expected`
/// holds must be compared: a name this model does not have, or no step at all, is an error
/// (a trace that matches nothing must not pass). A step `expected` lacks (a file without
/// `q_rope`) is left out.
pub fn compare(
    expected: &Capture,
    got: &Capture,
    layers: usize,
    only: Option<Range<usize>>,
    tol: f64,
) -> Result<Vec<StepReport>> {
    let wanted = |name: &str| match (
        &only,
        name.strip_prefix('L')
            .and_then(|s| s.split('.').next()?.parse::<usize>().ok()),
    ) {
        (Some(r), Some(l)) => r.contains(&l),
        _ => true,
    };
    let names: Vec<String> = step_names(layers)
        .into_iter()
        .filter(|n| wanted(n))
        .collect();
    let unknown: BTreeSet<&str> = expected
        .records
        .iter()
        .map(|r| r.name.as_str())
        .filter(|n| wanted(n) && !names.iter().any(|m| m == n))
        .collect();
    ensure!(
        unknown.is_empty(),
        "the expected trace has steps this {layers}-layer model does not (so they cannot be compared): {unknown:?}"
    );
    let got_rows: HashMap<(&str, usize), &[f64]> = got
        .records
        .iter()
        .map(|r| ((r.name.as_str(), r.pos), r.data.as_slice()))
        .collect();
    let mut out = Vec::new();
    for name in names {
        let rows: Vec<_> = expected.records.iter().filter(|r| r.name == name).collect();
        if rows.is_empty() {
            continue;
        }
        let (mut e_all, mut g_all) = (Vec::new(), Vec::new());
        let (mut max_abs, mut worst) = (0.0f64, (0, 0));
        for r in rows {
            let Some(&g) = got_rows.get(&(name.as_str(), r.pos)) else {
                bail!("the device trace has no step {name} at position {}", r.pos)
            };
            ensure!(
                g.len() == r.data.len(),
                "step {name}: width {} vs {}",
                g.len(),
                r.data.len()
            );
            for (c, (a, b)) in g.iter().zip(&r.data).enumerate() {
                // The first NaN is kept (with its position): nothing after it replaces it.
                let d = (a - b).abs();
                if !max_abs.is_nan() && !(d <= max_abs) {
                    max_abs = d;
                    worst = (r.pos, c);
                }
            }
            e_all.extend_from_slice(&r.data);
            g_all.extend_from_slice(g);
        }
        let rel_err = try_rel_err(&g_all, &e_all).with_context(|| format!("step {name}"))?;
        let dot: f64 = g_all.iter().zip(&e_all).map(|(a, b)| a * b).sum();
        let norms = |v: &[f64]| v.iter().map(|x| x * x).sum::<f64>().sqrt();
        let cosine = dot / (norms(&g_all) * norms(&e_all)).max(1e-300);
        out.push(StepReport {
            name,
            rel_err,
            max_abs,
            worst,
            cosine,
            beyond: !(rel_err <= tol),
        });
    }
    ensure!(
        !out.is_empty(),
        "the expected trace has no step of this model to compare"
    );
    Ok(out)
}

/// The table the CLI prints; the first step beyond tolerance is marked.
pub fn format_report(reports: &[StepReport], tol: f64) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{:<16} {:>11} {:>11} {:>10}  {:>14}",
        "step", "rel_err", "max_abs", "cosine", "worst (pos,col)"
    );
    let first = reports.iter().position(|r| r.beyond);
    for (i, r) in reports.iter().enumerate() {
        let mark = if Some(i) == first {
            "  <== first departure"
        } else if r.beyond {
            "  !"
        } else {
            ""
        };
        let _ = writeln!(
            s,
            "{:<16} {:>11.3e} {:>11.3e} {:>10.6}  {:>14}{mark}",
            r.name,
            r.rel_err,
            r.max_abs,
            r.cosine,
            format!("({},{})", r.worst.0, r.worst.1)
        );
    }
    match first {
        Some(i) => {
            let r = &reports[i];
            let layer = r
                .name
                .strip_prefix('L')
                .and_then(|s| s.split('.').next())
                .map_or("-".to_string(), str::to_string);
            let _ = writeln!(
                s,
                "FIRST DEPARTURE: step {} (layer {layer}), rel_err {:.3e} > tol {tol:.1e}, worst element at position {} column {}",
                r.name, r.rel_err, r.worst.0, r.worst.1
            );
        }
        None => {
            let _ = writeln!(s, "all {} steps within tol {tol:.1e}", reports.len());
        }
    }
    s
}

/// The first step beyond tolerance, if any.
pub fn first_departure(reports: &[StepReport]) -> Option<&StepReport> {
    reports.iter().find(|r| r.beyond)
}

/// Test helper: a model with the square weight `name` transposed (a "transposed weight" bug).
pub fn transpose_square_weight(host: &mut HostModel, name: &str) -> Result<()> {
    let t = host
        .tensors
        .get_mut(name)
        .with_context(|| format!("no tensor {name}"))?;
    ensure!(
        t.shape.len() == 2 && t.shape[0] == t.shape[1],
        "{name} is not square: {:?}",
        t.shape
    );
    let n = t.shape[0];
    match &mut t.data {
        TensorData::F16(v) => {
            let src = v.clone();
            for i in 0..n {
                for j in 0..n {
                    v[i * n + j] = src[j * n + i];
                }
            }
        }
        TensorData::F32(v) => {
            let src = v.clone();
            for i in 0..n {
                for j in 0..n {
                    v[i * n + j] = src[j * n + i];
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A capture of `names` at positions 0 and 1, row values from `f(step index, pos, col)`.
    fn capture(names: &[String], f: impl Fn(usize, usize, usize) -> f64) -> Capture {
        let mut cap = Capture::all();
        cap.begin(0, &[0, 0]);
        for (k, name) in names.iter().enumerate() {
            let data: Vec<f64> = (0..2)
                .flat_map(|p| (0..3).map(move |c| (p, c)))
                .map(|(p, c)| f(k, p, c))
                .collect();
            cap.record(name, 2, 3, &data);
        }
        cap
    }

    fn value(k: usize, p: usize, c: usize) -> f64 {
        1.0 + (k * 7 + p * 3 + c) as f64 * 0.1
    }

    #[test]
    fn a_trace_with_foreign_or_no_steps_is_an_error() {
        let names = step_names(1);
        let got = capture(&names, value);
        // Other step names: nothing would be compared.
        let foreign: Vec<String> = ["embed_tokens", "layers.0.q_proj"].map(String::from).into();
        let err = compare(&capture(&foreign, value), &got, 1, None, 1e-3).unwrap_err();
        assert!(err.to_string().contains("embed_tokens"), "{err}");
        assert!(err.to_string().contains("layers.0.q_proj"), "{err}");
        // One foreign step among known ones is an error too, naming it.
        let mut mixed = names.clone();
        mixed.push("L7.q".into());
        let err = compare(&capture(&mixed, value), &got, 1, None, 1e-3).unwrap_err();
        assert!(err.to_string().contains("L7.q"), "{err}");
        // No step at all.
        let err = compare(&Capture::all(), &got, 1, None, 1e-3).unwrap_err();
        assert!(err.to_string().contains("no step"), "{err}");
        // Steps outside --layers are not compared, and not an error.
        let two = step_names(2);
        let reports = compare(
            &capture(&two, value),
            &capture(&two, value),
            2,
            Some(0..1),
            0.0,
        )
        .unwrap();
        assert_eq!(reports.len(), names.len());
        // The same trace compares clean at tolerance 0.
        let reports = compare(&capture(&names, value), &got, 1, None, 0.0).unwrap();
        assert_eq!(reports.len(), names.len());
        assert!(first_departure(&reports).is_none());
    }

    #[test]
    fn a_nan_is_beyond_any_tolerance_and_keeps_its_position() {
        let names = step_names(1);
        let expected = capture(&names, value);
        // A NaN at (pos 0, col 1) of L0.q, and a larger finite difference after it.
        let q = names.iter().position(|n| n == "L0.q").unwrap();
        let got = capture(&names, |k, p, c| match (k == q, p, c) {
            (true, 0, 1) => f64::NAN,
            (true, 1, 2) => 1e6,
            _ => value(k, p, c),
        });
        let reports = compare(&expected, &got, 1, None, 1e3).unwrap();
        let dep = first_departure(&reports).expect("the NaN departs");
        assert_eq!(dep.name, "L0.q");
        assert_eq!(dep.worst, (0, 1));
        assert!(dep.max_abs.is_nan() && dep.rel_err == f64::INFINITY);
        // A non-finite expected value cannot judge: an error naming the step.
        let err = compare(&got, &expected, 1, None, 1e-3).unwrap_err();
        assert!(format!("{err:#}").contains("L0.q"), "{err:#}");
    }
}
