//! [`load_model`]: a GGUF file or HF checkpoint directory to a [`HostModel`], dequantized on
//! all cores with a progress bar when it takes more than a second. The readers
//! ([`crate::gguf`], [`crate::hf`]) only read; config, tokenizer and tensors are put together here.

use crate::config::{config_from_gguf, config_from_hf};
use crate::gguf::GgufFile;
use crate::hf::{read_hf_config, HfCheckpoint};
use crate::quant::{dequantize, dequantize_to_f16, GgmlType};
use crate::tokenizer::{tokenizer_from_gguf, tokenizer_from_hf_dir};
use crate::{HostModel, HostTensor, RawTensor, TensorData};
use anyhow::{anyhow, ensure, Context, Result};
use half::f16;
use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Load a Qwen2 model: a GGUF file, or a Hugging Face checkpoint directory (`config.json` +
/// `*.safetensors`, tokenizer from `tokenizer.json` when present, else an empty
/// [`crate::TokenizerData`]). Every tensor is returned under its GGUF name; tensors with two or more
/// dims as f16, 1-D tensors as f32. Required tensors and their shapes are checked first.
pub fn load_model(path: &Path) -> Result<HostModel> {
    if path.is_dir() {
        return load_hf_dir(path);
    }
    model_from_gguf(&GgufFile::open(path)?)
}

/// The model in an open GGUF file (see [`load_model`]).
pub fn model_from_gguf(g: &GgufFile) -> Result<HostModel> {
    let file = g.path().display().to_string();
    let config = config_from_gguf(g)?;
    config.check_tensors(&file, |n| g.tensor_info(n).map(|t| t.shape()))?;
    let tokenizer = tokenizer_from_gguf(g)?;
    let raw = g
        .tensors()
        .iter()
        .map(|t| RawTensor {
            name: t.name.clone(),
            shape: t.shape(),
            ty: t.ty,
            bytes: g.tensor_bytes(t),
        })
        .collect();
    let tensors = dequantize_all(raw, &file)?;
    Ok(HostModel {
        config,
        tokenizer,
        tensors,
    })
}

/// Load a HF Qwen2 checkpoint directory (see [`load_model`]). Without `tokenizer.json` the
/// tokenizer is empty ([`crate::TokenizerData::default`]).
pub fn load_hf_dir(dir: &Path) -> Result<HostModel> {
    let hc = read_hf_config(dir)?;
    let checkpoint = HfCheckpoint::open(dir)?;
    let raw = checkpoint.tensors()?;
    let label = dir.display().to_string();
    let shapes: HashMap<&str, &Vec<usize>> =
        raw.iter().map(|t| (t.name.as_str(), &t.shape)).collect();
    let config = config_from_hf(&hc, &label, |n| shapes.get(n).map(|s| s.to_vec()))?;
    let tokenizer = tokenizer_from_hf_dir(dir)?.unwrap_or_default();
    let tensors = dequantize_all(raw, &label)?;
    Ok(HostModel {
        config,
        tokenizer,
        tensors,
    })
}

enum Out<'a> {
    F16(&'a mut [f16]),
    F32(&'a mut [f32]),
}

struct Job<'a> {
    name: &'a str,
    ty: GgmlType,
    src: &'a [u8],
    dst: Out<'a>,
}

/// Elements per work item (a multiple of every block size).
const CHUNK: usize = 1 << 16;

/// Dequantize every tensor (2+ dims → f16, 1 dim → f32) using all cores.
pub(crate) fn dequantize_all(
    raw: Vec<RawTensor<'_>>,
    file: &str,
) -> Result<BTreeMap<String, HostTensor>> {
    // Check sizes before allocating anything.
    for t in &raw {
        ensure!(
            t.ty.can_dequantize(),
            "{file}: tensor `{}` has type {}, which cannot be dequantized",
            t.name,
            t.ty
        );
        let n = t
            .shape
            .iter()
            .try_fold(1u64, |a, &d| a.checked_mul(d as u64))
            .ok_or_else(|| anyhow!("{file}: tensor `{}`: element count overflows", t.name))?;
        let want =
            t.ty.bytes_for(n)
                .with_context(|| format!("{file}: tensor `{}`", t.name))?;
        ensure!(
            t.bytes.len() as u64 == want,
            "{file}: tensor `{}` ({} {:?}) has {} bytes of data, expected {want}",
            t.name,
            t.ty,
            t.shape,
            t.bytes.len()
        );
    }
    let mut outs: Vec<(String, Vec<usize>, TensorData)> = raw
        .iter()
        .map(|t| {
            let n: usize = t.shape.iter().product();
            let data = if t.shape.len() >= 2 {
                TensorData::F16(vec![f16::ZERO; n])
            } else {
                TensorData::F32(vec![0f32; n])
            };
            (t.name.clone(), t.shape.clone(), data)
        })
        .collect();
    let total_bytes: u64 = raw.iter().map(|t| t.bytes.len() as u64).sum();
    let mut jobs: Vec<Job> = Vec::new();
    for (t, (name, _, data)) in raw.iter().zip(outs.iter_mut()) {
        let (bs, ts) = t.ty.block_layout();
        let elems = CHUNK / bs * bs;
        let src = t.bytes.chunks(elems / bs * ts);
        match data {
            TensorData::F16(v) => jobs.extend(src.zip(v.chunks_mut(elems)).map(|(s, d)| Job {
                name,
                ty: t.ty,
                src: s,
                dst: Out::F16(d),
            })),
            TensorData::F32(v) => jobs.extend(src.zip(v.chunks_mut(elems)).map(|(s, d)| Job {
                name,
                ty: t.ty,
                src: s,
                dst: Out::F32(d),
            })),
        }
    }
    run_jobs(jobs, total_bytes, file)?;
    Ok(outs
        .into_iter()
        .map(|(name, shape, data)| (name, HostTensor { shape, data }))
        .collect())
}

/// Below this many source bytes the work is done on the calling thread (no threads, no bar).
const PARALLEL_THRESHOLD: u64 = 1 << 22;

fn run_job(job: Job<'_>, file: &str) -> Result<()> {
    let r = match job.dst {
        Out::F16(d) => dequantize_to_f16(job.ty, job.src, d),
        Out::F32(d) => dequantize(job.ty, job.src, d),
    };
    r.with_context(|| format!("{file}: tensor `{}`", job.name))
}

fn run_jobs(jobs: Vec<Job<'_>>, total_bytes: u64, file: &str) -> Result<()> {
    if total_bytes < PARALLEL_THRESHOLD {
        return jobs.into_iter().try_for_each(|j| run_job(j, file));
    }
    let n_threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(jobs.len().max(1));
    let queue = Mutex::new(jobs.into_iter());
    let first_error: Mutex<Option<anyhow::Error>> = Mutex::new(None);
    let done = AtomicBool::new(false);
    let bar = indicatif::ProgressBar::with_draw_target(
        Some(total_bytes),
        indicatif::ProgressDrawTarget::hidden(),
    );
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "dequantizing {bar:40} {binary_bytes}/{binary_total_bytes} ({eta})",
        )
        .expect("valid template"),
    );
    let start = Instant::now();
    std::thread::scope(|s| {
        let workers: Vec<_> = (0..n_threads)
            .map(|_| {
                s.spawn(|| loop {
                    let job = queue.lock().unwrap_or_else(|e| e.into_inner()).next();
                    let Some(job) = job else { break };
                    let n = job.src.len() as u64;
                    if let Err(e) = run_job(job, file) {
                        let mut slot = first_error.lock().unwrap_or_else(|e| e.into_inner());
                        slot.get_or_insert(e);
                        break;
                    }
                    bar.inc(n);
                })
            })
            .collect();
        // Shows the bar once the work has taken a second (woken early when it ends).
        let monitor = s.spawn(|| {
            let show_at = start + Duration::from_secs(1);
            while !done.load(Ordering::Acquire) {
                let now = Instant::now();
                if now >= show_at {
                    bar.set_draw_target(indicatif::ProgressDrawTarget::stderr());
                    return;
                }
                std::thread::park_timeout(show_at - now);
            }
        });
        for w in workers {
            if w.join().is_err() {
                let mut slot = first_error.lock().unwrap_or_else(|e| e.into_inner());
                slot.get_or_insert(anyhow!("{file}: a dequantization thread panicked"));
            }
        }
        done.store(true, Ordering::Release);
        monitor.thread().unpark();
    });
    bar.finish_and_clear();
    match first_error.into_inner().unwrap_or_else(|e| e.into_inner()) {
        Some(e) => Err(e),
        None => Ok(()),
    }
}
