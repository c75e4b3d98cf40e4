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
//! [`RefCache`], [`greedy`], the [`Tracer`] hook and (feature `faults`) the fault switches.

pub mod ops;
pub mod trace;

#[cfg(test)]
mod tests;

use anyhow::{bail, ensure, Context, Result};
use cubeqwen_kernels::elementwise::swiglu_reference;
use cubeqwen_kernels::rmsnorm::reference as rmsnorm;
use cubeqwen_loaders::{HostModel, HostTensor, Qwen2Config};
use ops::{matmul, rope_rows, Mat};

use crate::sampling::top2;
pub use trace::{step_names, Capture, NoTrace, Record, Tracer};

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
    /// Bugs to commit on purpose (tests of the parity tracer only); the device-only ones are
    /// refused.
    #[cfg(feature = "faults")]
    pub faults: crate::faults::Faults,
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
            #[cfg(feature = "faults")]
            faults: Default::default(),
        })
    }

    /// Same as [`RefModel::new`] with fault switches set.
    #[cfg(feature = "faults")]
    pub fn with_faults(mut self, faults: crate::faults::Faults) -> Self {
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
        #[cfg(feature = "faults")]
        ensure!(
            !self.faults.device_only(),
            "the reference has no KV-cache or chunk faults (device only): {:?}",
            self.faults
        );
        let proj = |x: &[f64], w: &Mat| -> Vec<f64> { matmul(x, n, w) };

        cache.truncate(start_pos);
        tracer.begin(start_pos, tokens);
        if n == 0 {
            return Ok(Vec::new());
        }
        let positions: Vec<usize> = (start_pos..start_pos + n).collect();
        let eps = c.rms_eps as f64;
        let group = nh / nkv;
        let scale = if fault!(self.faults.attention_scale_one_over_hd) {
            1.0 / hd as f64
        } else {
            1.0 / (hd as f64).sqrt()
        };

        let mut x = Vec::with_capacity(n * d);
        for &t in tokens {
            x.extend(self.embed.row(t as usize).iter().map(|&v| v as f64));
        }
        tracer.record("embedding", n, d, &x);

        for (l, layer) in self.layers.iter().enumerate() {
            let name = |s: &str| format!("L{l}.{s}");
            let attn_norm = if l > 0 && fault!(self.faults.norm_weight_off_by_one) {
                &self.layers[l - 1].attn_norm
            } else {
                &layer.attn_norm
            };
            let h = rmsnorm(&x, attn_norm, d, eps);
            tracer.record(&name("attn_norm"), n, d, &h);

            let mut q = proj(&h, &layer.wq);
            if !fault!(self.faults.drop_q_bias) {
                add_bias(&mut q, &layer.bq);
            }
            tracer.record(&name("q"), n, qd, &q);
            let mut k = proj(&h, &layer.wk);
            add_bias(&mut k, &layer.bk);
            tracer.record(&name("k"), n, kvd, &k);
            let mut v = proj(&h, &layer.wv);
            add_bias(&mut v, &layer.bv);
            tracer.record(&name("v"), n, kvd, &v);

            let adjacent = fault!(self.faults.rope_adjacent_pairs);
            rope_rows(&mut q, nh, hd, &positions, c.rope_theta, adjacent);
            tracer.record(&name("q_rope"), n, qd, &q);
            rope_rows(&mut k, nkv, hd, &positions, c.rope_theta, adjacent);
            tracer.record(&name("k_rope"), n, kvd, &k);

            cache.k[l].extend_from_slice(&k);
            cache.v[l].extend_from_slice(&v);
            let (kc, vc) = (&cache.k[l], &cache.v[l]);

            // Causal attention: the token at position p sees cached positions 0..=p (with the
            // `no_causal_mask` fault, every position of this call).
            let last_pos = start_pos + n - 1;
            let mut attn = vec![0f64; n * qd];
            let mut scores = Vec::new();
            for t in 0..n {
                let p = if fault!(self.faults.no_causal_mask) {
                    last_pos
                } else {
                    positions[t]
                };
                for head in 0..nh {
                    let kvh = if fault!(self.faults.wrong_gqa_mapping) {
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

            let attn_out = proj(&attn, &layer.wo);
            tracer.record(&name("attn_out"), n, d, &attn_out);
            if !fault!(self.faults.drop_attn_residual == Some(l)) {
                for (xi, a) in x.iter_mut().zip(&attn_out) {
                    *xi += a;
                }
            }
            tracer.record(&name("resid1"), n, d, &x);

            let h = rmsnorm(&x, &layer.ffn_norm, d, eps);
            tracer.record(&name("ffn_norm"), n, d, &h);
            let (w_gate, w_up) = if fault!(self.faults.swap_gate_up) {
                (&layer.w_up, &layer.w_gate)
            } else {
                (&layer.w_gate, &layer.w_up)
            };
            let gate = proj(&h, w_gate);
            tracer.record(&name("gate"), n, c.ffn, &gate);
            let up = proj(&h, w_up);
            tracer.record(&name("up"), n, c.ffn, &up);
            let sw = swiglu_reference(&gate, &up);
            tracer.record(&name("swiglu"), n, c.ffn, &sw);
            let down = proj(&sw, &layer.w_down);
            tracer.record(&name("down"), n, d, &down);
            for (xi, a) in x.iter_mut().zip(&down) {
                *xi += a;
            }
            tracer.record(&name("resid2"), n, d, &x);
        }
        cache.len = start_pos + n;

        let h = rmsnorm(&x, &self.output_norm, d, eps);
        tracer.record("output_norm", n, d, &h);
        let logits = proj(&h, self.lm_head.as_ref().unwrap_or(&self.embed));
        tracer.record("logits", n, c.vocab, &logits);
        Ok(logits.chunks_exact(c.vocab).map(|r| r.to_vec()).collect())
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
