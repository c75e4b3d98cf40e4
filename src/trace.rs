//! The parity tracer: run the forward pass on the device while capturing every named step,
//! run the same steps in the f64 reference (or read activations that Hugging Face
//! transformers dumped), and report where they part.
//!
//! Step names are those of [`crate::reference::trace::step_names`]: `embedding`, per layer
//! `LN.attn_norm`, `LN.q`, `LN.k`, `LN.v`, `LN.q_rope`, `LN.k_rope`, `LN.attn`, `LN.attn_out`,
//! `LN.resid1`, `LN.ffn_norm`, `LN.gate`, `LN.up`, `LN.swiglu`, `LN.down`, `LN.resid2`, then
//! `output_norm`, `logits`. Tracing costs nothing when off: the production path gets `None`.

use std::fmt::Write as _;
use std::ops::Range;
use std::path::Path;

use anyhow::{bail, ensure, Context, Result};
use cubecl::prelude::*;
use cubeqwen_loaders::{HostModel, TensorData};

use crate::forward::{Faults, Session, StepObserver, StepTensor};
use crate::model::DeviceModel;
use crate::reference::trace::{step_names, Capture, Tracer};
use crate::reference::RefModel;

/// A [`StepObserver`] that reads each step back into a reference-style [`Capture`].
pub struct DeviceCapture {
    pub capture: Capture,
}

impl<R: Runtime> StepObserver<R> for DeviceCapture {
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

/// Every step of the device forward pass over `ids` (one prefill call, logits at all positions).
pub fn device_trace<R: Runtime>(
    client: &ComputeClient<R>,
    model: &DeviceModel<R>,
    ids: &[u32],
    faults: Faults,
) -> Result<Capture> {
    let mut session = Session::new(client, model, ids.len().max(1))?;
    session.faults = faults;
    session.prefill_chunk = ids.len().max(1);
    let mut obs = DeviceCapture {
        capture: Capture::all(),
    };
    obs.capture.begin(0, ids);
    session.forward_all(client, ids, Some(&mut obs))?;
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
/// order, restricted to `layers` (global steps always included).
pub fn compare(
    expected: &Capture,
    got: &Capture,
    layers: usize,
    only: Option<Range<usize>>,
    tol: f64,
) -> Result<Vec<StepReport>> {
    let mut out = Vec::new();
    for name in step_names(layers) {
        if let (Some(r), Some(l)) = (
            &only,
            name.strip_prefix('L')
                .and_then(|s| s.split('.').next()?.parse::<usize>().ok()),
        ) {
            if !r.contains(&l) {
                continue;
            }
        }
        let rows: Vec<_> = expected.records.iter().filter(|r| r.name == name).collect();
        if rows.is_empty() {
            continue; // not in the expected trace (e.g. a file without q_rope)
        }
        let (mut num, mut den, mut dot, mut gg) = (0.0, 0.0, 0.0, 0.0);
        let (mut max_abs, mut worst) = (0.0f64, (0, 0));
        for r in rows {
            let Some(g) = got.get(&name, r.pos) else {
                bail!("the device trace has no step {name} at position {}", r.pos)
            };
            ensure!(
                g.len() == r.data.len(),
                "step {name}: width {} vs {}",
                g.len(),
                r.data.len()
            );
            for (c, (a, b)) in g.iter().zip(&r.data).enumerate() {
                let d = a - b;
                num += d * d;
                den += b * b;
                dot += a * b;
                gg += a * a;
                if !(d.abs() <= max_abs) {
                    max_abs = d.abs();
                    worst = (r.pos, c);
                }
            }
        }
        let rel_err = if num.is_finite() {
            num.sqrt() / den.sqrt().max(1e-300)
        } else {
            f64::INFINITY
        };
        let cosine = dot / (gg.sqrt() * den.sqrt()).max(1e-300);
        out.push(StepReport {
            name,
            rel_err,
            max_abs,
            worst,
            cosine,
            beyond: !(rel_err <= tol),
        });
    }
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
