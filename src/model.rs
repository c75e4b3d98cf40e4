//! The model's weights on the device.
//!
//! 2-D weights are f16 (as the loader dequantized them); norm weights and biases are f32.
//! The embedding table and the lm_head are kept in row chunks that fit one device buffer
//! (wgpu caps buffers near 256 MiB; the 151936×896 table is 272 MB). A model without
//! `output.weight` (tied embeddings) uses `token_embd.weight` as its lm_head.

use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use cubecl::prelude::*;
use cubeqwen_kernels::matmul::RowChunked;
use cubeqwen_kernels::rope::RopeTables;
use cubeqwen_kernels::DeviceTensor;
use cubeqwen_loaders::{HostModel, HostTensor, Qwen2Config, TensorData};
use half::f16;

pub struct Layer<R: Runtime> {
    pub attn_norm: DeviceTensor<R, f32>,
    pub wq: DeviceTensor<R, f16>,
    pub bq: DeviceTensor<R, f32>,
    pub wk: DeviceTensor<R, f16>,
    pub bk: DeviceTensor<R, f32>,
    pub wv: DeviceTensor<R, f16>,
    pub bv: DeviceTensor<R, f32>,
    pub wo: DeviceTensor<R, f16>,
    pub ffn_norm: DeviceTensor<R, f32>,
    pub w_gate: DeviceTensor<R, f16>,
    pub w_up: DeviceTensor<R, f16>,
    pub w_down: DeviceTensor<R, f16>,
}

pub struct DeviceModel<R: Runtime> {
    pub config: Qwen2Config,
    pub token_embd: RowChunked<R, f16>,
    pub lm_head: RowChunked<R, f16>,
    pub output_norm: DeviceTensor<R, f32>,
    pub layers: Vec<Layer<R>>,
    pub rope: RopeTables<R>,
    /// Bytes uploaded and the time the upload took (host side; no per-tensor synchronisation).
    pub upload_bytes: usize,
    pub upload_time: Duration,
}

fn f16_weight<R: Runtime>(
    client: &ComputeClient<R>,
    host: &HostModel,
    name: &str,
    shape: [usize; 2],
) -> Result<DeviceTensor<R, f16>> {
    let t = host.tensor(name)?;
    ensure!(
        t.shape == shape,
        "tensor `{name}` has shape {:?}, expected {shape:?}",
        t.shape
    );
    match &t.data {
        TensorData::F16(v) => DeviceTensor::from_slice(client, v, &shape),
        TensorData::F32(v) => {
            let v: Vec<f16> = v.iter().map(|&x| f16::from_f32(x)).collect();
            DeviceTensor::from_slice(client, &v, &shape)
        }
    }
}

fn f32_vector<R: Runtime>(
    client: &ComputeClient<R>,
    host: &HostModel,
    name: &str,
    len: usize,
) -> Result<DeviceTensor<R, f32>> {
    let t = host.tensor(name)?;
    ensure!(
        t.shape == [len],
        "tensor `{name}` has shape {:?}, expected [{len}]",
        t.shape
    );
    DeviceTensor::from_slice(client, &t.data.to_f32(), &[len])
}

fn f16_data(t: &HostTensor) -> std::borrow::Cow<'_, [f16]> {
    match &t.data {
        TensorData::F16(v) => std::borrow::Cow::Borrowed(v),
        TensorData::F32(v) => {
            std::borrow::Cow::Owned(v.iter().map(|&x| f16::from_f32(x)).collect())
        }
    }
}

impl<R: Runtime> DeviceModel<R> {
    /// Uploads `host` and builds RoPE tables for `max_ctx` positions.
    pub fn upload(client: &ComputeClient<R>, host: &HostModel, max_ctx: usize) -> Result<Self> {
        let c = host.config.clone();
        c.validate()?;
        c.check_ctx(max_ctx)?;
        let t0 = Instant::now();
        let (d, qd, kvd) = (c.hidden, c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim);
        let embd = host.tensor("token_embd.weight")?;
        ensure!(
            embd.shape == [c.vocab, d],
            "token_embd.weight has shape {:?}, expected [{}, {d}]",
            embd.shape,
            c.vocab
        );
        let token_embd = RowChunked::upload(client, &f16_data(embd), c.vocab, d)?;
        let lm_head = match host.tensors.get("output.weight") {
            Some(t) => {
                ensure!(
                    t.shape == [c.vocab, d],
                    "output.weight has shape {:?}, expected [{}, {d}]",
                    t.shape,
                    c.vocab
                );
                RowChunked::upload(client, &f16_data(t), c.vocab, d)?
            }
            None => token_embd.clone(),
        };
        let mut layers = Vec::with_capacity(c.layers);
        for l in 0..c.layers {
            let n = |s: &str| format!("blk.{l}.{s}");
            let layer = (|| -> Result<Layer<R>> {
                Ok(Layer {
                    attn_norm: f32_vector(client, host, &n("attn_norm.weight"), d)?,
                    wq: f16_weight(client, host, &n("attn_q.weight"), [qd, d])?,
                    bq: f32_vector(client, host, &n("attn_q.bias"), qd)?,
                    wk: f16_weight(client, host, &n("attn_k.weight"), [kvd, d])?,
                    bk: f32_vector(client, host, &n("attn_k.bias"), kvd)?,
                    wv: f16_weight(client, host, &n("attn_v.weight"), [kvd, d])?,
                    bv: f32_vector(client, host, &n("attn_v.bias"), kvd)?,
                    wo: f16_weight(client, host, &n("attn_output.weight"), [d, qd])?,
                    ffn_norm: f32_vector(client, host, &n("ffn_norm.weight"), d)?,
                    w_gate: f16_weight(client, host, &n("ffn_gate.weight"), [c.ffn, d])?,
                    w_up: f16_weight(client, host, &n("ffn_up.weight"), [c.ffn, d])?,
                    w_down: f16_weight(client, host, &n("ffn_down.weight"), [d, c.ffn])?,
                })
            })()
            .with_context(|| format!("uploading layer {l}"))?;
            layers.push(layer);
        }
        let output_norm = f32_vector(client, host, "output_norm.weight", d)?;
        let rope = RopeTables::new(client, c.rope_theta, c.head_dim, max_ctx)?;
        let upload_bytes = host
            .tensors
            .values()
            .map(|t| {
                t.data.len()
                    * if matches!(t.data, TensorData::F16(_)) {
                        2
                    } else {
                        4
                    }
            })
            .sum();
        Ok(Self {
            config: c,
            token_embd,
            lm_head,
            output_norm,
            layers,
            rope,
            upload_bytes,
            upload_time: t0.elapsed(),
        })
    }
}
