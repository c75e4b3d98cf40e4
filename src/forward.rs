//! The Qwen2 forward pass: named kernels chained as the model's definition reads
//! (one layer = RMSNorm → q/k/v (+bias) → RoPE → cache → GQA attention →
//! o-proj → residual → RMSNorm → SwiGLU MLP → residual; then the output norm and lm_head).
//!
//! The residual stream `x` is f32; everything the matmuls read or write is f16 with f32
//! accumulation; logits are f32. Each step's output can be observed by a [`StepObserver`]
//! (the parity tracer); without one, nothing is read back.

use anyhow::{ensure, Result};
#[cfg(feature = "cuda")]
use cubecl::cuda::CudaRuntime;
use cubecl::prelude::*;
use cubeqwen_kernels::attention::attention;
use cubeqwen_kernels::attention::KvCache;
use cubeqwen_kernels::buffer::check_launches;
use cubeqwen_kernels::decode::{self, AttentionScratch, AttnInWeights, DecodeState, Rec};
use cubeqwen_kernels::elementwise::{copy_rows, embedding, swiglu};
use cubeqwen_kernels::flash::{attention_prefill_with, PrefillKernel, PrefillOptions};
use cubeqwen_kernels::fused_gemv::{gemv_gate_up_swiglu, gemv_qkv};
#[cfg(feature = "cuda")]
use cubeqwen_kernels::graph::GraphRecorder;
use cubeqwen_kernels::matmul::{matmul, resolve_variant, MatmulVariant};
use cubeqwen_kernels::rmsnorm::{residual_add_rms_norm, rms_norm};
#[cfg(not(feature = "faults"))]
use cubeqwen_kernels::rope::rope_qk_append;
use cubeqwen_kernels::rope::{Append, RopeTables};
use cubeqwen_kernels::select::{decode_pairs, TopK};
use cubeqwen_kernels::DeviceTensor;
#[cfg(feature = "faults")]
use cubeqwen_kernels::{
    attention::{attention_with_fault, AttentionFault},
    rope::rope_qk_append_with_fault,
};
#[cfg(feature = "cuda")]
use cudarc::driver::CudaGraph;
use half::f16;
use std::collections::HashMap;

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
    /// Called before the steps of each block of tokens the pass runs at once (a whole
    /// prompt, each prefill chunk, each decode token): row `t` of the steps that follow is the
    /// token at sequence position `start_pos + t`.
    fn begin(&mut self, _start_pos: usize, _ids: &[u32]) {}
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
    /// Only the last token, into the decode buffers with its top two and greedy next token.
    Top2,
}

/// What the fused decode step keeps on the device between tokens: made once per session.
struct DecodeBuffers<R: Runtime> {
    st: DecodeState<R>,
    /// The residual stream of the token, f32 [1, d].
    x: DeviceTensor<R, f32>,
    q: DeviceTensor<R, f16>,
    att: DeviceTensor<R, f16>,
    /// SwiGLU output [1, ffn].
    s: DeviceTensor<R, f16>,
    logits: DeviceTensor<R, f32>,
    partial: DeviceTensor<R, f32>,
    parts: usize,
    scratch: AttentionScratch<R>,
    /// The position `st.state` holds (the host's copy, to know when to set it).
    state_pos: usize,
    /// Device top-k buffers for sampling ([`Session::top_k`]) by k: made at the first call
    /// with that k and kept, since recorded decode graphs hold their addresses.
    top_ks: HashMap<usize, TopK<R>>,
    /// The k each decode step computes after its logits: the last one [`Session::top_k`] was
    /// asked for.
    step_k: Option<usize>,
    /// Whether `top_ks[step_k]` holds the top-k of the logits now in `logits`.
    top_k_fresh: bool,
}

impl<R: Runtime> DecodeBuffers<R> {
    fn new(client: &ComputeClient<R>, model: &DeviceModel<R>, max_ctx: usize) -> Result<Self> {
        let c = &model.config;
        let qd = c.n_heads * c.head_dim;
        let parts = decode::top2_parts(&model.lm_head);
        Ok(Self {
            st: DecodeState::new(client, 0, 0)?,
            x: DeviceTensor::empty(client, &[1, c.hidden])?,
            q: DeviceTensor::empty(client, &[1, qd])?,
            att: DeviceTensor::empty(client, &[1, qd])?,
            s: DeviceTensor::empty(client, &[1, c.ffn])?,
            logits: DeviceTensor::empty(client, &[1, c.vocab])?,
            partial: DeviceTensor::empty(client, &[parts * 4])?,
            parts,
            scratch: AttentionScratch::new(client, c.n_heads, c.head_dim, max_ctx)?,
            state_pos: 0,
            top_ks: HashMap::new(),
            step_k: None,
            top_k_fresh: false,
        })
    }
}

/// The top two logits of the last position and the id of the first (ties: the lower id).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Top2 {
    pub id: u32,
    pub first: f32,
    pub second: f32,
}

/// Default prefill chunk (tokens). On the H200 (2026-11-27, 0.5B, `bench -p 2048 -n 0`), one
/// 2048-token chunk prefilled 2048 tokens at 43 084 tok/s against 15 261 in 512-token chunks
/// (the many-row matmuls and the flash attention fill the GPU only from about 2048 rows). The
/// activations of a chunk grow with it: for the 7B shape's FFN (18 944) about 78 MB a buffer.
pub const PREFILL_CHUNK: usize = 2048;

/// A sequence in progress: its KV cache and how many positions it holds.
pub struct Session<'m, R: Runtime> {
    pub model: &'m DeviceModel<R>,
    pub caches: Vec<KvCache<R, f16>>,
    pub len: usize,
    pub max_ctx: usize,
    pub variant: MatmulVariant,
    /// Prompts longer than this are prefilled in chunks of this many tokens ([`PREFILL_CHUNK`]
    /// unless set).
    pub prefill_chunk: usize,
    /// Decode with the fused single-token kernels (`decode` module of the kernels crate);
    /// off, [`Session::decode`] runs the same step through the general kernels.
    pub fused_decode: bool,
    /// On CUDA, replay each decode step as a CUDA graph (default on; `CUBEQWEN_NO_GRAPHS=1`
    /// turns it off): one launch per token instead of one per kernel.
    pub use_graphs: bool,
    /// Prefill attention (more than one token) with the flash kernel (`flash` module of the
    /// kernels crate; the kernel: `flash_kernel`); off (`CUBEQWEN_NO_FLASH=1`), with the chunked
    /// attention kernel that decode steps of the general path use.
    pub flash_prefill: bool,
    /// The flash kernel (`CUBEQWEN_FLASH_KERNEL`: auto, portable, mma, mma-emulated; default
    /// auto: mma for f16 where the device has `mma.m16n8k16`, else portable).
    pub flash_kernel: PrefillKernel,
    /// Key splits of the mma flash kernels (`CUBEQWEN_FLASH_SPLITS`; `None`: by grid and device).
    pub flash_splits: Option<usize>,
    /// A chunk's q/k/v projections in one launch, and gate/up with SwiGLU in one, where `Auto`
    /// gives each of their weights to the GEMV (short chunks; `fused_gemv` module of the kernels
    /// crate); off (`CUBEQWEN_NO_FUSED_GEMV=1`), a launch each. Their values are the same bits.
    pub fused_gemv: bool,
    decode: DecodeBuffers<R>,
    #[cfg(feature = "cuda")]
    graphs: Option<Graphs>,
    /// Bugs to commit on purpose (tests of the parity tracer only).
    #[cfg(feature = "faults")]
    pub faults: crate::faults::Faults,
}

/// A per-token value of the decode step on the device.
#[derive(Clone, Copy)]
enum DecodeValue {
    Token,
    Position,
}

/// The decode step's CUDA graphs, one per attention chunk count and sampling top-k (0 for
/// none), and the stream bookkeeping.
#[cfg(feature = "cuda")]
struct Graphs {
    rec: GraphRecorder,
    by_shape: HashMap<(usize, usize), CudaGraph>,
    /// Whether our stream (graph replays) wrote the decode buffers last; cubecl must wait.
    ours: bool,
    /// Device addresses of the token, position and top-2 buffers.
    token: u64,
    position: u64,
    top2: u64,
    /// Device addresses of the sampling top-k results, by k.
    top_k: HashMap<usize, u64>,
    /// With a timeline (`CUBEQWEN_TIMELINE`): each graph's launches, and the last graph
    /// replayed.
    launches: HashMap<(usize, usize), Vec<cubeqwen_kernels::graph::TimelineLaunch>>,
    last: Option<(usize, usize)>,
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
        let switches = cubeqwen_kernels::switches::switches()?;
        Ok(Self {
            model,
            caches,
            len: 0,
            max_ctx,
            variant: MatmulVariant::Auto,
            prefill_chunk: PREFILL_CHUNK,
            fused_decode: true,
            use_graphs: !switches.no_graphs,
            flash_prefill: !switches.no_flash,
            flash_kernel: switches.flash_kernel,
            flash_splits: switches.flash_splits,
            fused_gemv: !switches.no_fused_gemv,
            decode: DecodeBuffers::new(client, model, max_ctx)?,
            #[cfg(feature = "cuda")]
            graphs: None,
            #[cfg(feature = "faults")]
            faults: Default::default(),
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

    /// Runs the prompt `ids` through the model (chunked), then the lm_head on its last token:
    /// the logits ([`Session::read_logits`]), their top two ([`Session::top2`]) and, on the device,
    /// the greedy next token, which [`Session::decode`] embeds unless [`Session::set_token`]
    /// replaces it.
    pub fn prefill(&mut self, client: &ComputeClient<R>, ids: &[u32]) -> Result<()> {
        self.run(client, ids, Logits::Top2, None)?;
        Ok(())
    }

    /// One decode step: the token on the device (the last step's greedy choice, or the one
    /// [`Session::set_token`] gave) at position `len`; then its logits and top two, as
    /// [`Session::prefill`] leaves them. Nothing is read back. On CUDA the step is a CUDA graph
    /// of the same kernels, captured once per attention chunk count and replayed.
    pub fn decode(&mut self, client: &ComputeClient<R>) -> Result<()> {
        ensure!(self.len > 0, "decode: prefill a prompt first");
        ensure!(
            self.len < self.max_ctx,
            "the context is full: {} tokens (raise --ctx, up to the model's {})",
            self.len,
            self.model.config.context_length
        );
        #[cfg(feature = "faults")]
        let faulty = self.faults != Default::default();
        #[cfg(not(feature = "faults"))]
        let faulty = false;
        if !self.fused_decode || faulty {
            // The general kernels (and the fault switches) take the id from the host.
            let id = self.read_u32(client, DecodeValue::Token)?;
            return self.run(client, &[id], Logits::Top2, None).map(|_| ());
        }
        let pos = self.len;
        if self.decode.state_pos != pos {
            // A forward call since the last prefill/decode moved the sequence on.
            self.write_u32(client, DecodeValue::Position, pos as u32)?;
        }
        #[cfg(feature = "cuda")]
        if let Some(graphs) = self.graph_recorder(client)? {
            let mut g = graphs;
            let replayed = self.replay(client, &mut g, pos);
            self.graphs = Some(g);
            replayed?;
        } else {
            self.cubecl_turn()?;
            self.decode_kernels(client, None, pos)?;
        }
        #[cfg(not(feature = "cuda"))]
        self.decode_kernels(client, None, pos)?;
        self.decode.top_k_fresh = self.decode.step_k.is_some();
        self.decode.state_pos = pos + 1;
        self.len += 1;
        Ok(())
    }

    /// The kernels of one decode step (the model's layers, as `forward_chunk` chains them, for a
    /// single token at `pos` with its id and position on the device).
    fn decode_kernels(
        &self,
        client: &ComputeClient<R>,
        mut rec: Rec<'_>,
        pos: usize,
    ) -> Result<()> {
        let m = self.model;
        let c = &m.config;
        let b = &self.decode;
        let eps = c.rms_eps;
        decode::embed_token(client, rec.as_deref_mut(), &b.st.token, &m.token_embd, &b.x)?;
        for (layer, cache) in m.layers.iter().zip(&self.caches) {
            let w = AttnInWeights {
                norm: &layer.attn_norm,
                wq: &layer.wq,
                wk: &layer.wk,
                wv: &layer.wv,
                bq: &layer.bq,
                bk: &layer.bk,
                bv: &layer.bv,
            };
            let (st, heads) = (&b.st, c.n_heads);
            decode::attn_in(
                client,
                rec.as_deref_mut(),
                &b.x,
                &w,
                &m.rope,
                st,
                eps,
                heads,
                &b.q,
                cache,
            )?;
            let (q, att, scratch) = (&b.q, &b.att, &b.scratch);
            decode::attention(
                client,
                rec.as_deref_mut(),
                q,
                cache,
                st,
                pos,
                heads,
                scratch,
                att,
            )?;
            decode::gemv_residual(client, rec.as_deref_mut(), &layer.wo, &b.att, &b.x)?;
            let (gate, up) = (&layer.w_gate, &layer.w_up);
            decode::ffn_in(
                client,
                rec.as_deref_mut(),
                &b.x,
                &layer.ffn_norm,
                gate,
                up,
                eps,
                &b.s,
            )?;
            decode::gemv_residual(client, rec.as_deref_mut(), &layer.w_down, &b.s, &b.x)?;
        }
        let (logits, partial) = (&b.logits, &b.partial);
        let r = rec.as_deref_mut();
        decode::lm_head_top2(
            client,
            r,
            &m.lm_head,
            &b.x,
            &m.output_norm,
            eps,
            logits,
            partial,
        )?;
        decode::top2_finish(client, rec.as_deref_mut(), &b.partial, b.parts, &b.st, true)?;
        if let Some(k) = b.step_k {
            b.top_ks[&k].run(client, rec, logits)?;
        }
        Ok(())
    }

    /// The graph recorder, made at the first decode on CUDA (`None` elsewhere, or with
    /// `use_graphs` off). Taken out of the session while it is used.
    #[cfg(feature = "cuda")]
    fn graph_recorder(&mut self, client: &ComputeClient<R>) -> Result<Option<Graphs>> {
        if !self.use_graphs {
            return Ok(None);
        }
        if let Some(g) = self.graphs.take() {
            return Ok(Some(g));
        }
        let Some(cuda) =
            (client as &dyn std::any::Any).downcast_ref::<ComputeClient<CudaRuntime>>()
        else {
            return Ok(None);
        };
        let mut rec = GraphRecorder::new(cuda)?;
        let b = &self.decode;
        let address = |rec: &mut GraphRecorder, h| rec.address(h);
        let token = address(&mut rec, &b.st.token.handle)?;
        let position = address(&mut rec, &b.st.state.handle)?;
        let top2 = address(&mut rec, &b.st.top2.handle)?;
        Ok(Some(Graphs {
            rec,
            by_shape: HashMap::new(),
            ours: false,
            token,
            position,
            top2,
            top_k: HashMap::new(),
            launches: HashMap::new(),
            last: None,
        }))
    }

    #[cfg(feature = "cuda")]
    fn replay(&self, client: &ComputeClient<R>, g: &mut Graphs, pos: usize) -> Result<()> {
        if !g.ours {
            g.rec.wait_for_cubecl()?;
            g.ours = true;
        }
        let shape = (
            decode::attention_chunks(pos),
            self.decode.step_k.unwrap_or(0),
        );
        if !g.by_shape.contains_key(&shape) {
            let graph = g
                .rec
                .capture(|rec| self.decode_kernels(client, Some(rec), pos))?;
            g.by_shape.insert(shape, graph);
            g.launches.insert(shape, g.rec.timeline_launches());
        }
        g.rec.timeline_reset()?;
        g.by_shape[&shape].launch()?;
        g.last = Some(shape);
        Ok(())
    }

    /// With `CUBEQWEN_TIMELINE` set (CUDA graphs): the last decode step's timeline, a table
    /// of its kernels' start, wait and end times (see the graph recorder's `Timeline`);
    /// `None` without one.
    #[cfg(feature = "cuda")]
    pub fn decode_timeline(&self) -> Result<Option<String>> {
        let Some(g) = self.graphs.as_ref() else {
            return Ok(None);
        };
        let Some(launches) = g.last.and_then(|s| g.launches.get(&s)) else {
            return Ok(None);
        };
        if launches.is_empty() {
            return Ok(None);
        }
        let times = g.rec.timeline_read(launches)?;
        Ok(Some(cubeqwen_kernels::graph::timeline_summary(&times)))
    }

    /// Kernel launches recorded into this session's decode graphs with programmatic dependent
    /// launch (0 without graphs, before sm_90, or with `CUBEQWEN_NO_PDL` set).
    #[cfg(feature = "cuda")]
    pub fn programmatic_launches(&self) -> usize {
        self.graphs
            .as_ref()
            .map_or(0, |g| g.rec.programmatic_launches())
    }

    /// Before cubecl touches the caches or decode buffers: waits for graph replays on our
    /// stream (cubecl's stream does not know of them).
    fn cubecl_turn(&mut self) -> Result<()> {
        #[cfg(feature = "cuda")]
        if let Some(g) = self.graphs.as_mut() {
            if g.ours {
                g.rec.synchronize()?;
                g.ours = false;
            }
        }
        Ok(())
    }

    /// Writes a per-token value in place, on the stream that last wrote the decode buffers.
    fn write_u32(&mut self, client: &ComputeClient<R>, what: DecodeValue, v: u32) -> Result<()> {
        #[cfg(feature = "cuda")]
        if let Some(g) = self.graphs.as_ref().filter(|g| g.ours) {
            let at = match what {
                DecodeValue::Token => g.token,
                DecodeValue::Position => g.position,
            };
            // SAFETY: the address of a live one-element u32 buffer of this session.
            return unsafe { g.rec.set_u32(at, v) };
        }
        let t = match what {
            DecodeValue::Token => &self.decode.st.token,
            DecodeValue::Position => &self.decode.st.state,
        };
        decode::set_u32(client, None, t, v)
    }

    fn read_u32(&mut self, client: &ComputeClient<R>, what: DecodeValue) -> Result<u32> {
        self.cubecl_turn()?;
        let t = match what {
            DecodeValue::Token => &self.decode.st.token,
            DecodeValue::Position => &self.decode.st.state,
        };
        Ok(t.to_vec(client)?[0])
    }

    /// Reads the logits of the last position that [`Session::prefill`] or [`Session::decode`]
    /// ran (`[vocab]`, f32).
    pub fn read_logits(&mut self, client: &ComputeClient<R>) -> Result<Vec<f32>> {
        self.cubecl_turn()?;
        self.decode.logits.to_vec(client)
    }

    /// Reads the top two of the last logits (waits for the device).
    pub fn top2(&mut self, client: &ComputeClient<R>) -> Result<Top2> {
        let mut t = [0f32; 3];
        #[cfg(feature = "cuda")]
        if let Some(g) = self.graphs.as_ref().filter(|g| g.ours) {
            // SAFETY: the address of this session's live three-element f32 buffer.
            unsafe { g.rec.read_f32(g.top2, &mut t)? };
            return Ok(Top2 {
                id: t[0].to_bits(),
                first: t[1],
                second: t[2],
            });
        }
        self.cubecl_turn()?;
        t.copy_from_slice(&self.decode.st.top2.to_vec(client)?);
        Ok(Top2 {
            id: t[0].to_bits(),
            first: t[1],
            second: t[2],
        })
    }

    /// The `k` best logits of the last position that [`Session::prefill`] or
    /// [`Session::decode`] ran, as (id, value): value descending, lowest id first among equal
    /// values, finite values only (fewer than `k` where fewer are finite). What a sampler draws
    /// from ([`crate::sampling::Sampler::sample_top_k`]) without reading the whole row: from the
    /// call after the first with this `k`, each decode step computes it on the device (inside its
    /// CUDA graph where there is one), and this call reads `k` pairs. The steps go on computing
    /// it (tens of µs a step) for the rest of the session, which greedy callers should not
    /// share.
    pub fn top_k(&mut self, client: &ComputeClient<R>, k: usize) -> Result<Vec<(u32, f32)>> {
        let vocab = self.model.config.vocab;
        if let std::collections::hash_map::Entry::Vacant(slot) = self.decode.top_ks.entry(k) {
            slot.insert(TopK::new(client, 1, vocab, k)?);
        }
        if self.decode.step_k != Some(k) {
            self.decode.step_k = Some(k);
            self.decode.top_k_fresh = false;
        }
        if !self.decode.top_k_fresh {
            self.cubecl_turn()?;
            self.decode.top_ks[&k].run(client, None, &self.decode.logits)?;
            self.decode.top_k_fresh = true;
        }
        #[cfg(feature = "cuda")]
        if let Some(g) = self.graphs.as_mut().filter(|g| g.ours) {
            let out = &self.decode.top_ks[&k].out;
            let at = match g.top_k.get(&k) {
                Some(&at) => at,
                None => {
                    let at = g.rec.address(&out.handle)?;
                    g.top_k.insert(k, at);
                    at
                }
            };
            let mut raw = vec![0f32; out.len()];
            // SAFETY: the address of this session's live `[1, k, 2]` f32 buffer.
            unsafe { g.rec.read_f32(at, &mut raw)? };
            return Ok(decode_pairs(&raw, k).swap_remove(0));
        }
        self.cubecl_turn()?;
        let raw = self.decode.top_ks[&k].out.to_vec(client)?;
        Ok(decode_pairs(&raw, k).swap_remove(0))
    }

    /// The token the next [`Session::decode`] embeds (a sampled one, instead of the greedy
    /// choice already on the device).
    pub fn set_token(&mut self, client: &ComputeClient<R>, id: u32) -> Result<()> {
        ensure!(
            (id as usize) < self.model.config.vocab,
            "token id {id} is outside the vocabulary of {}",
            self.model.config.vocab
        );
        self.write_u32(client, DecodeValue::Token, id)
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
        self.cubecl_turn()?;
        self.decode.top_k_fresh = false;
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
                _ if i + 1 == n_chunks => Some(which),
                _ => None,
            };
            let (l, mut a) = self.forward_chunk(client, chunk, i == 0, want, &mut obs)?;
            last = l.or(last);
            all.append(&mut a);
        }
        Ok((last, all))
    }

    /// Runs one block of `ids` (a whole prompt, a prefill chunk, one decode token) at
    /// positions `len..len + ids.len()`; `first` is false for the later chunks of a prompt.
    fn forward_chunk(
        &mut self,
        client: &ComputeClient<R>,
        ids: &[u32],
        first: bool,
        which: Option<Logits>,
        obs: &mut Option<&mut dyn StepObserver<R>>,
    ) -> Result<LogitsOut<R>> {
        let m = self.model;
        let c = &m.config;
        let (t, d) = (ids.len(), c.hidden);
        let (qd, kvd) = (c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim);
        if let Some(o) = obs.as_deref_mut() {
            o.begin(self.len, ids);
        }
        let start = if !first && fault!(self.faults.chunk_start_off_by_one) {
            self.len - 1
        } else {
            self.len
        };
        let v = self.variant;
        let eps = c.rms_eps;
        let tracing = obs.is_some();
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
        let v_proj = DeviceTensor::<R, f16>::empty(client, &[t, kvd])?;
        let att = DeviceTensor::<R, f16>::empty(client, &[t, qd])?;
        let proj = DeviceTensor::<R, f16>::empty(client, &[t, d])?; // o-proj and down outputs
        let gate = DeviceTensor::<R, f16>::empty(client, &[t, c.ffn])?;
        let up = DeviceTensor::<R, f16>::empty(client, &[t, c.ffn])?;

        embedding(client, &ids_d, ids, &m.token_embd, &x)?;
        see("embedding", StepTensor::F32(&x))?;

        for (l, (layer, cache)) in m.layers.iter().zip(&self.caches).enumerate() {
            let name = |s: &str| format!("L{l}.{s}");
            let attn_norm = if l > 0 && fault!(self.faults.norm_weight_off_by_one) {
                &m.layers[l - 1].attn_norm
            } else {
                &layer.attn_norm
            };
            if l == 0 {
                rms_norm(client, &x, attn_norm, &h, eps)?;
            } else {
                residual_add_rms_norm(client, &x, &proj, attn_norm, &h, eps)?;
                see(&format!("L{}.resid2", l - 1), StepTensor::F32(&x))?;
            }
            see(&name("attn_norm"), StepTensor::F16(&h))?;

            let bq = (!fault!(self.faults.drop_q_bias)).then_some(&layer.bq);
            let qkv = [&layer.wq, &layer.wk, &layer.wv];
            match (bq, self.gemv_fuses(client, t, &qkv)) {
                (Some(bq), Some(variant)) => {
                    let b = [bq, &layer.bk, &layer.bv];
                    gemv_qkv(client, variant, &h, qkv, b, [&q, &k, &v_proj])?
                }
                _ => {
                    matmul(client, v, &h, &layer.wq, bq, &q)?;
                    matmul(client, v, &h, &layer.wk, Some(&layer.bk), &k)?;
                    matmul(client, v, &h, &layer.wv, Some(&layer.bv), &v_proj)?;
                }
            }
            see(&name("q"), StepTensor::F16(&q))?;
            see(&name("k"), StepTensor::F16(&k))?;
            see(&name("v"), StepTensor::F16(&v_proj))?;

            let kv_at = if t == 1 && fault!(self.faults.kv_write_off_by_one) {
                start + 1
            } else {
                start
            };
            let append = Append {
                v: &v_proj,
                cache,
                start: kv_at,
            };
            self.rope_append(client, &q, &k, &pos_d, start + t - 1, &m.rope, append)?;
            see(&name("q_rope"), StepTensor::F16(&q))?;
            see(&name("k_rope"), StepTensor::F16(&k))?;
            self.attention(client, &q, cache, start, &att)?;
            see(&name("attn"), StepTensor::F16(&att))?;

            matmul(client, v, &att, &layer.wo, None, &proj)?;
            see(&name("attn_out"), StepTensor::F16(&proj))?;

            if fault!(self.faults.drop_attn_residual == Some(l)) {
                rms_norm(client, &x, &layer.ffn_norm, &h, eps)?;
            } else {
                residual_add_rms_norm(client, &x, &proj, &layer.ffn_norm, &h, eps)?;
            }
            see(&name("resid1"), StepTensor::F32(&x))?;
            see(&name("ffn_norm"), StepTensor::F16(&h))?;

            let (w_gate, w_up) = if fault!(self.faults.swap_gate_up) {
                (&layer.w_up, &layer.w_gate)
            } else {
                (&layer.w_gate, &layer.w_up)
            };
            // The tracer sees gate and up: the unfused kernels (the same bits) while it looks.
            let fused = self
                .gemv_fuses(client, t, &[w_gate, w_up])
                .filter(|_| !tracing);
            if let Some(variant) = fused {
                gemv_gate_up_swiglu(client, variant, &h, w_gate, w_up, &gate)?;
            } else {
                matmul(client, v, &h, w_gate, None, &gate)?;
                matmul(client, v, &h, w_up, None, &up)?;
                see(&name("gate"), StepTensor::F16(&gate))?;
                see(&name("up"), StepTensor::F16(&up))?;
                swiglu(client, &gate, &up, &gate)?;
            }
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
            Some(Logits::Top2) => {
                let b = &mut self.decode;
                // The last row of the residual stream; the lm_head kernel applies the output norm.
                let row = copy_rows(client, &x, t - 1, 1)?;
                let (logits, partial) = (&b.logits, &b.partial);
                decode::lm_head_top2(
                    client,
                    None,
                    &m.lm_head,
                    &row,
                    &m.output_norm,
                    eps,
                    logits,
                    partial,
                )?;
                if b.state_pos != self.len {
                    decode::set_u32(client, None, &b.st.state, self.len as u32)?;
                    b.state_pos = self.len;
                }
                decode::top2_finish(client, None, &b.partial, b.parts, &b.st, false)?;
                see("logits", StepTensor::F32(&b.logits))?;
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

    /// Whether the fused GEMVs take the products of `t` rows with `weights`, and with which
    /// GEMV: where they are on and the matmul variant gives each weight to the same GEMV
    /// (`Gemv` or `GemvMma`) at `t` rows.
    fn gemv_fuses(
        &self,
        client: &ComputeClient<R>,
        t: usize,
        weights: &[&DeviceTensor<R, f16>],
    ) -> Option<MatmulVariant> {
        let of = |w: &DeviceTensor<R, f16>| {
            resolve_variant(client, self.variant, t, w.shape[0], w.shape[1])
        };
        let first = of(weights.first()?);
        let gemv = matches!(first, MatmulVariant::Gemv | MatmulVariant::GemvMma);
        (self.fused_gemv && gemv && weights.iter().all(|w| of(w) == first)).then_some(first)
    }

    /// RoPE on `q` and `k` and the cache append of k and v, in one launch (with the
    /// `rope_adjacent_pairs` fault where the build has faults).
    #[allow(clippy::too_many_arguments)]
    fn rope_append(
        &self,
        client: &ComputeClient<R>,
        q: &DeviceTensor<R, f16>,
        k: &DeviceTensor<R, f16>,
        positions: &DeviceTensor<R, u32>,
        max_position: usize,
        tables: &RopeTables<R>,
        append: Append<'_, R, f16>,
    ) -> Result<()> {
        #[cfg(feature = "faults")]
        let done = rope_qk_append_with_fault(
            client,
            q,
            k,
            positions,
            max_position,
            tables,
            append,
            self.faults.rope_adjacent_pairs,
        );
        #[cfg(not(feature = "faults"))]
        let done = rope_qk_append(client, q, k, positions, max_position, tables, append);
        done
    }

    /// Attention of `q` over `cache` (with the attention faults where the build has them).
    fn attention(
        &self,
        client: &ComputeClient<R>,
        q: &DeviceTensor<R, f16>,
        cache: &KvCache<R, f16>,
        start: usize,
        out: &DeviceTensor<R, f16>,
    ) -> Result<()> {
        let n_heads = self.model.config.n_heads;
        #[cfg(feature = "faults")]
        if self.faults.attention_faults() {
            let f = AttentionFault {
                wrong_gqa: self.faults.wrong_gqa_mapping,
                no_causal_mask: self.faults.no_causal_mask,
                scale_one_over_hd: self.faults.attention_scale_one_over_hd,
            };
            return attention_with_fault(client, q, cache, n_heads, start, out, f);
        }
        if self.flash_prefill && q.shape[0] > 1 {
            let options = PrefillOptions {
                kernel: self.flash_kernel,
                splits: self.flash_splits,
                ..Default::default()
            };
            attention_prefill_with(client, options, q, cache, n_heads, start, out)
        } else {
            attention(client, q, cache, n_heads, start, out)
        }
    }
}
