//! The Qwen2 forward pass: named kernels chained as the model's definition reads
//! (see `shared` spec: one layer = RMSNorm → q/k/v (+bias) → RoPE → cache → GQA attention →
//! o-proj → residual → RMSNorm → SwiGLU MLP → residual; then the output norm and lm_head).
//!
//! The residual stream `x` is f32; everything the matmuls read or write is f16 with f32
//! accumulation; logits are f32. Each step's output can be observed by a [`StepObserver`]
//! (the parity tracer); without one, nothing is read back.

use anyhow::{ensure, Result};
use cubecl::prelude::*;
use cubeqwen_kernels::attention::{attention_with_fault, KvCache};
use cubeqwen_kernels::buffer::check_launches;
use cubeqwen_kernels::elementwise::{copy_rows, embedding, swiglu};
use cubeqwen_kernels::matmul::{matmul, MatmulVariant};
use cubeqwen_kernels::rmsnorm::{residual_add_rms_norm, rms_norm};
use cubeqwen_kernels::rope::rope_with_fault;
use cubeqwen_kernels::DeviceTensor;
use half::f16;

use crate::model::DeviceModel;

/// A step's output, as the forward pass holds it.
pub enum StepTensor<'a, R: Runtime> {
    F16(&'a DeviceTensor<R, f16>),
    F32(&'a DeviceTensor<R, f32>),
    /// Already on the host (the logits of every row, read back block by block).
    Host {
        shape: [usize; 2],
        data: &'a [f32],
    },
}

impl<R: Runtime> StepTensor<'_, R> {
    /// The values, read back and widened to f64, with the tensor's shape.
    pub fn to_f64(&self, client: &ComputeClient<R>) -> Result<(Vec<usize>, Vec<f64>)> {
        Ok(match self {
            Self::F16(t) => (
                t.shape.clone(),
                t.to_vec(client)?.iter().map(|v| v.to_f64()).collect(),
            ),
            Self::F32(t) => (
                t.shape.clone(),
                t.to_vec(client)?.iter().map(|&v| v as f64).collect(),
            ),
            Self::Host { shape, data } => {
                (shape.to_vec(), data.iter().map(|&v| v as f64).collect())
            }
        })
    }
}

/// Sees every named step (`embedding`, `L3.q_rope`, `logits`, ...; names as in
/// `reference::trace::step_names`) of a forward call.
pub trait StepObserver<R: Runtime> {
    fn step(
        &mut self,
        client: &ComputeClient<R>,
        name: &str,
        value: StepTensor<'_, R>,
    ) -> Result<()>;
}

/// Last-row logits on the device, and every row's logits on the host (whichever were asked for).
type LogitsOut<R> = (Option<DeviceTensor<R, f32>>, Vec<f32>);

/// Rows of logits computed per block when every row's logits are wanted.
const LOGIT_ROWS: usize = 32;

/// Which rows get logits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Logits {
    /// Only the last token (generation).
    Last,
    /// Every token of the call (prompt checks, tracing).
    All,
}

/// Known bugs the forward pass can be told to commit, so tests can prove the parity tracer
/// finds them (never set in production; all off by default).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Faults {
    /// RoPE with adjacent pairs (2i, 2i+1) instead of halves (i, i + hd/2).
    pub rope_adjacent_pairs: bool,
    /// The q projection without its bias.
    pub drop_q_bias: bool,
    /// Query head h reads kv head h % n_kv instead of h / (n_heads / n_kv).
    pub wrong_gqa_mapping: bool,
}

/// A sequence in progress: its KV cache and how many positions it holds.
pub struct Session<'m, R: Runtime> {
    pub model: &'m DeviceModel<R>,
    pub caches: Vec<KvCache<R, f16>>,
    pub len: usize,
    pub max_ctx: usize,
    pub variant: MatmulVariant,
    /// Prompts longer than this are prefilled in chunks of this many tokens.
    pub prefill_chunk: usize,
    pub faults: Faults,
}

impl<'m, R: Runtime> Session<'m, R> {
    pub fn new(
        client: &ComputeClient<R>,
        model: &'m DeviceModel<R>,
        max_ctx: usize,
    ) -> Result<Self> {
        let c = &model.config;
        ensure!(
            max_ctx <= model.rope.max_pos,
            "context {max_ctx} is longer than the model was uploaded for ({})",
            model.rope.max_pos
        );
        let caches = (0..c.layers)
            .map(|_| KvCache::new(client, c.n_kv_heads, max_ctx, c.head_dim))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            model,
            caches,
            len: 0,
            max_ctx,
            variant: MatmulVariant::Auto,
            prefill_chunk: 512,
            faults: Faults::default(),
        })
    }

    /// Keeps the first `len` positions of the cache and forgets the rest: the next forward
    /// call writes at position `len`, so a prefilled prefix can be reused.
    pub fn truncate(&mut self, len: usize) -> Result<()> {
        ensure!(
            len <= self.len,
            "cannot truncate a session of {} positions to {len}",
            self.len
        );
        self.len = len;
        Ok(())
    }

    /// Runs `ids` (at positions `len..len + ids.len()`) through the model, appending to the
    /// cache, and returns the logits of the last token ([1, vocab], f32, on the device).
    pub fn forward(
        &mut self,
        client: &ComputeClient<R>,
        ids: &[u32],
        obs: Option<&mut dyn StepObserver<R>>,
    ) -> Result<DeviceTensor<R, f32>> {
        let (last, _) = self.run(client, ids, Logits::Last, obs)?;
        last.ok_or_else(|| anyhow::anyhow!("forward: no logits"))
    }

    /// Like [`Session::forward`], but returns the logits of every token, read back to the host
    /// ([ids.len() × vocab], row-major). They are computed a block of rows at a time, so a long
    /// prompt never needs a [tokens, vocab] buffer on the device.
    pub fn forward_all(
        &mut self,
        client: &ComputeClient<R>,
        ids: &[u32],
        obs: Option<&mut dyn StepObserver<R>>,
    ) -> Result<Vec<f32>> {
        Ok(self.run(client, ids, Logits::All, obs)?.1)
    }

    fn run(
        &mut self,
        client: &ComputeClient<R>,
        ids: &[u32],
        which: Logits,
        mut obs: Option<&mut dyn StepObserver<R>>,
    ) -> Result<LogitsOut<R>> {
        ensure!(!ids.is_empty(), "forward: no tokens");
        ensure!(
            self.len + ids.len() <= self.max_ctx,
            "the context is full: {} tokens so far + {} new > {} (raise --ctx, up to the model's {})",
            self.len,
            ids.len(),
            self.max_ctx,
            self.model.config.context_length
        );
        let mut last = None;
        let mut all = Vec::new();
        let n_chunks = ids.len().div_ceil(self.prefill_chunk.max(1));
        for (i, chunk) in ids.chunks(self.prefill_chunk.max(1)).enumerate() {
            let want = match which {
                Logits::All => Some(Logits::All),
                Logits::Last if i + 1 == n_chunks => Some(Logits::Last),
                Logits::Last => None,
            };
            let (l, mut a) = self.forward_chunk(client, chunk, want, &mut obs)?;
            last = l.or(last);
            all.append(&mut a);
        }
        Ok((last, all))
    }

    fn forward_chunk(
        &mut self,
        client: &ComputeClient<R>,
        ids: &[u32],
        which: Option<Logits>,
        obs: &mut Option<&mut dyn StepObserver<R>>,
    ) -> Result<LogitsOut<R>> {
        let m = self.model;
        let c = &m.config;
        let (t, d) = (ids.len(), c.hidden);
        let (qd, kvd) = (c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim);
        let start = self.len;
        let v = self.variant;
        let eps = c.rms_eps;
        let mut see = |name: &str, value: StepTensor<'_, R>| -> Result<()> {
            match obs.as_deref_mut() {
                Some(o) => o.step(client, name, value),
                None => Ok(()),
            }
        };

        let ids_d = DeviceTensor::<R, u32>::from_slice(client, ids, &[t])?;
        let positions: Vec<u32> = (start..start + t).map(|p| p as u32).collect();
        let pos_d = DeviceTensor::<R, u32>::from_slice(client, &positions, &[t])?;

        let x = DeviceTensor::<R, f32>::empty(client, &[t, d])?; // residual stream
        let h = DeviceTensor::<R, f16>::empty(client, &[t, d])?; // normed input of a block
        let q = DeviceTensor::<R, f16>::empty(client, &[t, qd])?;
        let k = DeviceTensor::<R, f16>::empty(client, &[t, kvd])?;
        let vv = DeviceTensor::<R, f16>::empty(client, &[t, kvd])?;
        let att = DeviceTensor::<R, f16>::empty(client, &[t, qd])?;
        let proj = DeviceTensor::<R, f16>::empty(client, &[t, d])?; // o-proj and down outputs
        let gate = DeviceTensor::<R, f16>::empty(client, &[t, c.ffn])?;
        let up = DeviceTensor::<R, f16>::empty(client, &[t, c.ffn])?;

        embedding(client, &ids_d, ids, &m.token_embd, &x)?;
        see("embedding", StepTensor::F32(&x))?;

        for (l, (layer, cache)) in m.layers.iter().zip(&self.caches).enumerate() {
            let name = |s: &str| format!("L{l}.{s}");
            if l == 0 {
                rms_norm(client, &x, &layer.attn_norm, &h, eps)?;
            } else {
                residual_add_rms_norm(client, &x, &proj, &layer.attn_norm, &h, eps)?;
                see(&format!("L{}.resid2", l - 1), StepTensor::F32(&x))?;
            }
            see(&name("attn_norm"), StepTensor::F16(&h))?;

            let bq = (!self.faults.drop_q_bias).then_some(&layer.bq);
            matmul(client, v, &h, &layer.wq, bq, &q)?;
            matmul(client, v, &h, &layer.wk, Some(&layer.bk), &k)?;
            matmul(client, v, &h, &layer.wv, Some(&layer.bv), &vv)?;
            see(&name("q"), StepTensor::F16(&q))?;
            see(&name("k"), StepTensor::F16(&k))?;
            see(&name("v"), StepTensor::F16(&vv))?;

            let adjacent = self.faults.rope_adjacent_pairs;
            rope_with_fault(client, &q, &pos_d, start + t - 1, &m.rope, adjacent)?;
            rope_with_fault(client, &k, &pos_d, start + t - 1, &m.rope, adjacent)?;
            see(&name("q_rope"), StepTensor::F16(&q))?;
            see(&name("k_rope"), StepTensor::F16(&k))?;

            cache.append(client, &k, &vv, start)?;
            let wrong_gqa = self.faults.wrong_gqa_mapping;
            attention_with_fault(client, &q, cache, c.n_heads, start, &att, wrong_gqa)?;
            see(&name("attn"), StepTensor::F16(&att))?;

            matmul(client, v, &att, &layer.wo, None, &proj)?;
            see(&name("attn_out"), StepTensor::F16(&proj))?;

            residual_add_rms_norm(client, &x, &proj, &layer.ffn_norm, &h, eps)?;
            see(&name("resid1"), StepTensor::F32(&x))?;
            see(&name("ffn_norm"), StepTensor::F16(&h))?;

            matmul(client, v, &h, &layer.w_gate, None, &gate)?;
            matmul(client, v, &h, &layer.w_up, None, &up)?;
            see(&name("gate"), StepTensor::F16(&gate))?;
            see(&name("up"), StepTensor::F16(&up))?;
            swiglu(client, &gate, &up, &gate)?;
            see(&name("swiglu"), StepTensor::F16(&gate))?;

            matmul(client, v, &gate, &layer.w_down, None, &proj)?;
            see(&name("down"), StepTensor::F16(&proj))?;
        }
        let last = m.layers.len() - 1;
        residual_add_rms_norm(client, &x, &proj, &m.output_norm, &h, eps)?;
        see(&format!("L{last}.resid2"), StepTensor::F32(&x))?;
        see("output_norm", StepTensor::F16(&h))?;
        self.len += t;

        let mut last = None;
        let mut all = Vec::new();
        match which {
            None => {}
            Some(Logits::Last) => {
                let row = copy_rows(client, &h, t - 1, 1)?;
                let logits = DeviceTensor::<R, f32>::empty(client, &[1, c.vocab])?;
                m.lm_head.matmul(client, v, &row, None, &logits)?;
                see("logits", StepTensor::F32(&logits))?;
                last = Some(logits);
            }
            Some(Logits::All) => {
                // LOGIT_ROWS rows at a time: 32 × 151936 f32 is 19 MB on the device.
                all.reserve(t * c.vocab);
                for r0 in (0..t).step_by(LOGIT_ROWS) {
                    let n = LOGIT_ROWS.min(t - r0);
                    let rows = copy_rows(client, &h, r0, n)?;
                    let logits = DeviceTensor::<R, f32>::empty(client, &[n, c.vocab])?;
                    m.lm_head.matmul(client, v, &rows, None, &logits)?;
                    all.extend(logits.to_vec(client)?);
                }
                see(
                    "logits",
                    StepTensor::Host {
                        shape: [t, c.vocab],
                        data: &all,
                    },
                )?;
            }
        }
        check_launches(client)?;
        Ok((last, all))
    }
}
