//! cubeqwen-reference: a plain-Rust f64 reference forward pass of Qwen2 / Qwen2.5.
//!
//! This is the oracle every GPU result of cubeqwen is compared against, so it favours
//! clarity and precision over speed:
//! - all activations, norms, RoPE sin/cos, softmax and every accumulation are f64;
//! - 2-D weights are *stored* as f32 (exact for the f16 weights [`HostModel`] carries; halves
//!   memory: the 0.5B model takes ~2.5 GB instead of ~5 GB) and widened to f64 inside each
//!   dot product; 1-D tensors (norm weights, biases) are widened to f64 once;
//! - RoPE angles follow the spec: `inv = theta^(-2i/hd)` rounded to f32, `a = pos·inv` as an
//!   f32 product, then `sin`/`cos` of `a` in f64 (NEOX pairing `i` ↔ `i + hd/2`).
//!
//! Checked against the project's golden outputs (`tests/golden.rs`, release builds): with the
//! oracle's own f32 weights (a gguf-py dump, done once by hand) the france last-position
//! logits agree to relative L2 4.9e-7; with `load_model`'s f16 weights to 2.1e-4; all greedy
//! ids of the france and haiku cases are equal.
//!
//! Speed (2 cores, release, idle machine): a 0.5B-shaped model prefills 45 tokens in ~3 s and
//! decodes ~2.6 tokens/s (memory-bound: 2 GB of f32 weights per token).
//!
//! Entry points: [`RefModel::new`], [`RefModel::forward`] / [`RefModel::forward_traced`],
//! [`RefCache`], [`greedy`], the [`Tracer`] hook and the [`Faults`] switches.

pub mod ops;
pub mod toy;
pub mod trace;

#[cfg(test)]
mod tests;

use anyhow::{bail, ensure, Context, Result};
use cubeqwen_loaders::{HostModel, HostTensor, Qwen2Config};
use ops::{matmul, rmsnorm, rope_rows, silu, Mat};
pub use trace::{first_departure, step_names, Capture, Departure, NoTrace, Record, Tracer};

/// Deliberate mistakes the reference can make, so that a parity tracer can be tested:
/// a faulty run compared against a clean one must name the first step that departs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Faults {
    /// RoPE rotates adjacent pairs `(2i, 2i+1)` instead of NEOX `(i, i+hd/2)`.
    /// First departing step: `L0.q_rope`.
    pub rope_adjacent_pairs: bool,
    /// The q bias is not added. First departing step: `L0.q`.
    pub drop_q_bias: bool,
    /// q head `h` reads kv head `h % n_kv` instead of `h / (n_heads/n_kv)`.
    /// First departing step: `L0.attn`.
    pub wrong_gqa_mapping: bool,
    /// The named 2-D weight (GGUF name, e.g. `blk.0.attn_output.weight`) is used transposed.
    /// It must exist and be square. For `blk.0.attn_output.weight` the first departing step
    /// is `L0.attn_out`.
    pub transpose_weight: Option<String>,
}

struct Layer {
    attn_norm: Vec<f64>,
    wq: Mat,
    bq: Vec<f64>,
    wk: Mat,
    bk: Vec<f64>,
    wv: Mat,
    bv: Vec<f64>,
    wo: Mat,
    ffn_norm: Vec<f64>,
    w_gate: Mat,
    w_up: Mat,
    w_down: Mat,
}

/// The reference model: weights widened once (2-D to f32, 1-D to f64), shapes validated.
pub struct RefModel {
    config: Qwen2Config,
    embed: Mat,
    layers: Vec<Layer>,
    output_norm: Vec<f64>,
    /// `None`: tied embeddings, the lm_head is `embed`.
    lm_head: Option<Mat>,
    /// Fault-injection switches; all off by default.
    pub faults: Faults,
}

/// The per-layer K (after RoPE) and V cache, f64, `[pos][n_kv·hd]` per layer.
#[derive(Debug, Clone)]
pub struct RefCache {
    k: Vec<Vec<f64>>,
    v: Vec<Vec<f64>>,
    kv_dim: usize,
    len: usize,
}

impl RefCache {
    /// Number of cached positions.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Forgets every position from `len` on.
    pub fn truncate(&mut self, len: usize) {
        if len < self.len {
            for l in 0..self.k.len() {
                self.k[l].truncate(len * self.kv_dim);
                self.v[l].truncate(len * self.kv_dim);
            }
            self.len = len;
        }
    }

    pub fn clear(&mut self) {
        self.truncate(0);
    }

    /// Cached keys of layer `layer`, `[len][n_kv·hd]` (after RoPE).
    pub fn keys(&self, layer: usize) -> &[f64] {
        &self.k[layer]
    }

    /// Cached values of layer `layer`, `[len][n_kv·hd]`.
    pub fn values(&self, layer: usize) -> &[f64] {
        &self.v[layer]
    }
}

fn expect_shape(name: &str, t: &HostTensor, shape: &[usize]) -> Result<()> {
    ensure!(
        t.shape == shape,
        "tensor `{name}` has shape {:?}, expected {:?}",
        t.shape,
        shape
    );
    ensure!(
        t.data.len() == shape.iter().product::<usize>(),
        "tensor `{name}` holds {} values, its shape {:?} needs {}",
        t.data.len(),
        t.shape,
        shape.iter().product::<usize>()
    );
    Ok(())
}

fn load_mat(host: &HostModel, name: &str, rows: usize, cols: usize) -> Result<Mat> {
    let t = host.tensor(name)?;
    expect_shape(name, t, &[rows, cols])?;
    Ok(Mat {
        rows,
        cols,
        data: t.data.to_f32(),
    })
}

fn load_vec(host: &HostModel, name: &str, len: usize) -> Result<Vec<f64>> {
    let t = host.tensor(name)?;
    expect_shape(name, t, &[len])?;
    Ok(t.data.to_f32().into_iter().map(f64::from).collect())
}

/// Index of the largest value, the lowest index on ties; NaNs are never chosen.
/// `None` for an empty or all-NaN slice.
pub fn argmax(v: &[f64]) -> Option<usize> {
    top2(v).map(|(i, _, _)| i)
}

/// `(argmax, max, second-largest value)` (lowest index on ties; NaNs skipped). The second
/// value is `-inf` for a one-element slice.
pub fn top2(v: &[f64]) -> Option<(usize, f64, f64)> {
    let mut best: Option<(usize, f64)> = None;
    let mut second = f64::NEG_INFINITY;
    for (i, &x) in v.iter().enumerate() {
        if x.is_nan() {
            continue;
        }
        match best {
            None => best = Some((i, x)),
            Some((_, b)) if x > b => {
                second = b;
                best = Some((i, x));
            }
            Some(_) => {
                if x > second {
                    second = x;
                }
            }
        }
    }
    best.map(|(i, b)| (i, b, second))
}

impl RefModel {
    /// Builds the reference from a host model: validates the config and every tensor shape
    /// (errors name the offending tensor) and widens the weights once.
    ///
    /// The lm_head is `output.weight` when the model has one, else `token_embd.weight`
    /// (tied embeddings).
    pub fn new(host: &HostModel) -> Result<Self> {
        let c = host.config.clone();
        c.validate()?;
        let (d, qd, kvd, ffn) = (
            c.hidden,
            c.n_heads * c.head_dim,
            c.n_kv_heads * c.head_dim,
            c.ffn,
        );

        let embed = load_mat(host, "token_embd.weight", c.vocab, d)?;
        let mut layers = Vec::with_capacity(c.layers);
        for l in 0..c.layers {
            let n = |s: &str| format!("blk.{l}.{s}");
            layers.push(Layer {
                attn_norm: load_vec(host, &n("attn_norm.weight"), d)?,
                wq: load_mat(host, &n("attn_q.weight"), qd, d)?,
                bq: load_vec(host, &n("attn_q.bias"), qd)?,
                wk: load_mat(host, &n("attn_k.weight"), kvd, d)?,
                bk: load_vec(host, &n("attn_k.bias"), kvd)?,
                wv: load_mat(host, &n("attn_v.weight"), kvd, d)?,
                bv: load_vec(host, &n("attn_v.bias"), kvd)?,
                wo: load_mat(host, &n("attn_output.weight"), d, qd)?,
                ffn_norm: load_vec(host, &n("ffn_norm.weight"), d)?,
                w_gate: load_mat(host, &n("ffn_gate.weight"), ffn, d)?,
                w_up: load_mat(host, &n("ffn_up.weight"), ffn, d)?,
                w_down: load_mat(host, &n("ffn_down.weight"), d, ffn)?,
            });
        }
        if host
            .tensors
            .contains_key(&format!("blk.{}.attn_norm.weight", c.layers))
        {
            bail!(
                "model has tensors for layer {} but config says {} layers",
                c.layers,
                c.layers
            );
        }
        let output_norm = load_vec(host, "output_norm.weight", d)?;
        let lm_head = if host.tensors.contains_key("output.weight") {
            Some(load_mat(host, "output.weight", c.vocab, d)?)
        } else {
            None
        };
        Ok(Self {
            config: c,
            embed,
            layers,
            output_norm,
            lm_head,
            faults: Faults::default(),
        })
    }

    /// Same as [`RefModel::new`] with fault switches set.
    pub fn with_faults(mut self, faults: Faults) -> Self {
        self.faults = faults;
        self
    }

    pub fn config(&self) -> &Qwen2Config {
        &self.config
    }

    /// true when the lm_head is `token_embd.weight` (no `output.weight` in the model).
    pub fn uses_tied_embeddings(&self) -> bool {
        self.lm_head.is_none()
    }

    /// An empty KV cache for this model.
    pub fn new_cache(&self) -> RefCache {
        let n = self.config.layers;
        RefCache {
            k: vec![Vec::new(); n],
            v: vec![Vec::new(); n],
            kv_dim: self.config.n_kv_heads * self.config.head_dim,
            len: 0,
        }
    }

    /// The 2-D weight with GGUF name `name`, if the model has it.
    fn weight_by_name(&self, name: &str) -> Option<&Mat> {
        match name {
            "token_embd.weight" => return Some(&self.embed),
            "output.weight" => return self.lm_head.as_ref(),
            _ => {}
        }
        let rest = name.strip_prefix("blk.")?;
        let (l, w) = rest.split_once('.')?;
        let layer = self.layers.get(l.parse::<usize>().ok()?)?;
        Some(match w {
            "attn_q.weight" => &layer.wq,
            "attn_k.weight" => &layer.wk,
            "attn_v.weight" => &layer.wv,
            "attn_output.weight" => &layer.wo,
            "ffn_gate.weight" => &layer.w_gate,
            "ffn_up.weight" => &layer.w_up,
            "ffn_down.weight" => &layer.w_down,
            _ => return None,
        })
    }

    /// Logits for each of `tokens` (`[tokens.len()][vocab]`), which sit at positions
    /// `start_pos..start_pos + tokens.len()`. `start_pos` must not exceed `cache.len()`; the
    /// cache is truncated to `start_pos` first (so a prefill is `start_pos = 0` on a fresh
    /// cache and a decode step is `start_pos = cache.len()`), then extended by the tokens.
    pub fn forward(
        &self,
        cache: &mut RefCache,
        tokens: &[u32],
        start_pos: usize,
    ) -> Result<Vec<Vec<f64>>> {
        self.forward_traced(cache, tokens, start_pos, &mut NoTrace)
    }

    /// [`RefModel::forward`] that also hands every named step's output to `tracer`
    /// (see [`trace`] for the names). Applies the fault switches in `self.faults`.
    pub fn forward_traced(
        &self,
        cache: &mut RefCache,
        tokens: &[u32],
        start_pos: usize,
        tracer: &mut dyn Tracer,
    ) -> Result<Vec<Vec<f64>>> {
        let c = &self.config;
        let (d, hd, nh, nkv) = (c.hidden, c.head_dim, c.n_heads, c.n_kv_heads);
        let (qd, kvd) = (nh * hd, nkv * hd);
        let n = tokens.len();

        // Validate everything before touching the cache.
        ensure!(
            cache.k.len() == c.layers && cache.kv_dim == kvd,
            "cache was not made for this model ({} layers × {} kv values, model has {} × {})",
            cache.k.len(),
            cache.kv_dim,
            c.layers,
            kvd
        );
        ensure!(
            start_pos <= cache.len(),
            "start_pos {start_pos} is past the end of the cache ({} positions)",
            cache.len()
        );
        if let Some(&bad) = tokens.iter().find(|&&t| t as usize >= c.vocab) {
            bail!("token id {bad} is out of range (vocab {})", c.vocab);
        }
        let transposed = match &self.faults.transpose_weight {
            None => None,
            Some(name) => {
                let w = self.weight_by_name(name).with_context(|| {
                    format!("fault transpose_weight: model has no 2-D weight `{name}`")
                })?;
                ensure!(
                    w.rows == w.cols,
                    "fault transpose_weight: `{name}` is {}×{}, only square weights can be transposed",
                    w.rows,
                    w.cols
                );
                Some((name.as_str(), w.transposed()))
            }
        };
        let proj = |x: &[f64], name: String, w: &Mat| -> Vec<f64> {
            matmul(x, n, pick(&transposed, &name, w))
        };

        cache.truncate(start_pos);
        tracer.begin(start_pos, tokens);
        if n == 0 {
            return Ok(Vec::new());
        }
        let positions: Vec<usize> = (start_pos..start_pos + n).collect();
        let eps = c.rms_eps as f64;
        let group = nh / nkv;
        let scale = 1.0 / (hd as f64).sqrt();

        let mut x = Vec::with_capacity(n * d);
        for &t in tokens {
            x.extend(self.embed.row(t as usize).iter().map(|&v| v as f64));
        }
        tracer.record("embedding", n, d, &x);

        for (l, layer) in self.layers.iter().enumerate() {
            let name = |s: &str| format!("L{l}.{s}");
            let wname = |s: &str| format!("blk.{l}.{s}.weight");

            let h = rmsnorm(&x, &layer.attn_norm, eps);
            tracer.record(&name("attn_norm"), n, d, &h);

            let mut q = proj(&h, wname("attn_q"), &layer.wq);
            if !self.faults.drop_q_bias {
                add_bias(&mut q, &layer.bq);
            }
            tracer.record(&name("q"), n, qd, &q);
            let mut k = proj(&h, wname("attn_k"), &layer.wk);
            add_bias(&mut k, &layer.bk);
            tracer.record(&name("k"), n, kvd, &k);
            let mut v = proj(&h, wname("attn_v"), &layer.wv);
            add_bias(&mut v, &layer.bv);
            tracer.record(&name("v"), n, kvd, &v);

            let adjacent = self.faults.rope_adjacent_pairs;
            rope_rows(&mut q, nh, hd, &positions, c.rope_theta, adjacent);
            tracer.record(&name("q_rope"), n, qd, &q);
            rope_rows(&mut k, nkv, hd, &positions, c.rope_theta, adjacent);
            tracer.record(&name("k_rope"), n, kvd, &k);

            cache.k[l].extend_from_slice(&k);
            cache.v[l].extend_from_slice(&v);
            let (kc, vc) = (&cache.k[l], &cache.v[l]);

            // Causal attention: the token at position p sees cached positions 0..=p.
            let mut attn = vec![0f64; n * qd];
            let mut scores = Vec::new();
            for t in 0..n {
                let p = positions[t];
                for head in 0..nh {
                    let kvh = if self.faults.wrong_gqa_mapping {
                        head % nkv
                    } else {
                        head / group
                    };
                    let qh = &q[t * qd + head * hd..t * qd + (head + 1) * hd];
                    scores.clear();
                    scores.extend((0..=p).map(|j| {
                        ops::dot_f64(qh, &kc[j * kvd + kvh * hd..j * kvd + (kvh + 1) * hd]) * scale
                    }));
                    let m = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let mut sum = 0.0;
                    for s in scores.iter_mut() {
                        *s = (*s - m).exp();
                        sum += *s;
                    }
                    let out = &mut attn[t * qd + head * hd..t * qd + (head + 1) * hd];
                    for (j, &w) in scores.iter().enumerate() {
                        let w = w / sum;
                        let vj = &vc[j * kvd + kvh * hd..j * kvd + (kvh + 1) * hd];
                        for (o, vv) in out.iter_mut().zip(vj) {
                            *o += w * vv;
                        }
                    }
                }
            }
            tracer.record(&name("attn"), n, qd, &attn);

            let attn_out = proj(&attn, wname("attn_output"), &layer.wo);
            tracer.record(&name("attn_out"), n, d, &attn_out);
            for (xi, a) in x.iter_mut().zip(&attn_out) {
                *xi += a;
            }
            tracer.record(&name("resid1"), n, d, &x);

            let h = rmsnorm(&x, &layer.ffn_norm, eps);
            tracer.record(&name("ffn_norm"), n, d, &h);
            let gate = proj(&h, wname("ffn_gate"), &layer.w_gate);
            tracer.record(&name("gate"), n, c.ffn, &gate);
            let up = proj(&h, wname("ffn_up"), &layer.w_up);
            tracer.record(&name("up"), n, c.ffn, &up);
            let sw: Vec<f64> = gate.iter().zip(&up).map(|(g, u)| silu(*g) * u).collect();
            tracer.record(&name("swiglu"), n, c.ffn, &sw);
            let down = proj(&sw, wname("ffn_down"), &layer.w_down);
            tracer.record(&name("down"), n, d, &down);
            for (xi, a) in x.iter_mut().zip(&down) {
                *xi += a;
            }
            tracer.record(&name("resid2"), n, d, &x);
        }
        cache.len = start_pos + n;

        let h = rmsnorm(&x, &self.output_norm, eps);
        tracer.record("output_norm", n, d, &h);
        let logits = match &self.lm_head {
            Some(w) => proj(&h, "output.weight".into(), w),
            None => proj(&h, "token_embd.weight".into(), &self.embed),
        };
        tracer.record("logits", n, c.vocab, &logits);
        Ok(logits.chunks_exact(c.vocab).map(|r| r.to_vec()).collect())
    }
}

/// The weight to use for `name`: its transposed copy when the `transpose_weight` fault names it.
fn pick<'a>(transposed: &'a Option<(&str, Mat)>, name: &str, w: &'a Mat) -> &'a Mat {
    match transposed {
        Some((tn, tw)) if *tn == name => tw,
        _ => w,
    }
}

fn add_bias(x: &mut [f64], b: &[f64]) {
    for row in x.chunks_exact_mut(b.len()) {
        for (v, bb) in row.iter_mut().zip(b) {
            *v += bb;
        }
    }
}

/// Greedy decoding: prefills `prompt_ids`, then repeatedly takes the argmax (lowest id on
/// ties) and feeds it back, for at most `max_new` tokens, stopping after (and including) the
/// first token in `eos_ids`. Returns the generated ids and, per step, the margin between the
/// largest and second-largest logit of the distribution that step was chosen from.
pub fn greedy(
    model: &RefModel,
    prompt_ids: &[u32],
    max_new: usize,
    eos_ids: &[u32],
) -> Result<(Vec<u32>, Vec<f64>)> {
    ensure!(!prompt_ids.is_empty(), "greedy: empty prompt");
    let mut cache = model.new_cache();
    let mut ids = Vec::with_capacity(max_new);
    let mut margins = Vec::with_capacity(max_new);
    if max_new == 0 {
        return Ok((ids, margins));
    }
    let mut logits = model
        .forward(&mut cache, prompt_ids, 0)?
        .pop()
        .expect("non-empty prompt gives logits");
    loop {
        let (id, best, second) = top2(&logits).context("greedy: logits are all NaN")?;
        let id = id as u32;
        ids.push(id);
        margins.push(best - second);
        if ids.len() == max_new || eos_ids.contains(&id) {
            break;
        }
        let pos = cache.len();
        logits = model
            .forward(&mut cache, &[id], pos)?
            .pop()
            .expect("one token gives one row");
    }
    Ok((ids, margins))
}
