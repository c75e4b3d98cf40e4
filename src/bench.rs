//! `cubeqwen bench`: end-to-end prefill and decode throughput, in the manner of llama-bench,
//! and `cubeqwen random-gguf`: the random-weight GGUF files both engines are measured on.
//!
//! Tests carry llama-bench's names: `ppP` prefills P random tokens with one
//! [`Session::forward`] call; `tgN` decodes N tokens greedily as [`crate::generate::generate`]
//! does: one [`Session::decode`] step and one read of its top two logits per token; `@ dD` means D random tokens were
//! prefilled into the cache first, untimed. Each test runs once to warm up (kernels compile
//! then) and `repetitions` times timed; the clock is read after a device synchronisation.
//! The device-to-device copy bandwidth is measured in the same run, which gives each decode
//! test its bandwidth floor: (bytes of weights + KV cache read per token) ÷ copy bandwidth.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, ensure, Context, Result};
use cubecl::prelude::*;
use cubeqwen_kernels::bandwidth::{measure_copy_bandwidth, sync, CopyBandwidth};
use cubeqwen_kernels::matmul::MatmulVariant;
use cubeqwen_loaders::{HostModel, Qwen2Config};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::json;

use crate::forward::Session;
use crate::generate::sample_next;
use crate::model::DeviceModel;
use crate::sampling::{Sampler, SamplingParams};
use crate::{dispatch, DeviceKind, RuntimeJob};

/// Arguments of `cubeqwen bench`.
#[derive(clap::Args, Clone)]
pub struct BenchArgs {
    /// GGUF file or Hugging Face checkpoint directory.
    #[arg(long, conflicts_with = "random", required_unless_present = "random")]
    pub model: Option<PathBuf>,
    /// Random weights of a Qwen2.5 shape instead of a file: 0.5b, 1.5b or 7b.
    #[arg(long)]
    pub random: Option<String>,
    /// Prefill lengths, comma-separated (0: no prefill test).
    #[arg(short = 'p', long = "n-prompt", default_value = "512,2048")]
    pub n_prompt: String,
    /// Decode lengths, comma-separated (0: no decode test).
    #[arg(short = 'n', long = "n-gen", default_value = "128")]
    pub n_gen: String,
    /// Tokens already in the cache before each test, comma-separated.
    #[arg(short = 'd', long = "n-depth", default_value = "0")]
    pub n_depth: String,
    /// Timed runs of each test (after one warm-up run).
    #[arg(short = 'r', long = "repetitions", default_value_t = 5)]
    pub repetitions: usize,
    /// KV cache size in tokens (default: the largest depth + test length).
    #[arg(long)]
    pub ctx: Option<usize>,
    /// auto (CUDA if a GPU and driver are present, else wgpu), cuda or wgpu.
    #[arg(long, default_value = "auto")]
    pub device: DeviceKind,
    /// Matmul kernel: auto, tiled, cmma, gemv, gemv-mma, mma, blocked or cubek.
    #[arg(long, default_value = "auto")]
    pub matmul: MatmulVariant,
    /// Tokens per prefill block (llama-bench's ubatch; default `forward::PREFILL_CHUNK`, 2048).
    #[arg(long = "ubatch-size", visible_alias = "ub")]
    pub ubatch: Option<usize>,
    /// Seed of the random weights and token ids.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// md (a markdown table) or json (one object, with every sample).
    #[arg(short = 'o', long = "format", default_value = "md", value_parser = ["md", "json"])]
    pub format: String,
    /// Decode tests draw each token with llama.cpp's default sampler (temperature 0.8, top-k 40,
    /// top-p 0.95, min-p 0.05; seed --seed) instead of taking the greedy one. `device`: as
    /// `run` does, from the top-k found on the device (a read of 40 candidates per step);
    /// `host`: from the whole row of logits read back each step (the path without a device
    /// top-k, for before/after).
    #[arg(long, value_parser = ["device", "host"])]
    pub sample: Option<String>,
    /// Size of each of the two buffers of the copy-bandwidth measurement, in MiB.
    #[arg(long, default_value_t = 256)]
    pub copy_mib: usize,
}

/// Arguments of `cubeqwen random-gguf`.
#[derive(clap::Args, Clone)]
pub struct RandomGgufArgs {
    /// Output GGUF file.
    pub output: PathBuf,
    /// Qwen2.5 shape: 0.5b, 1.5b or 7b.
    #[arg(long, required_unless_present = "tokenizer_only")]
    pub shape: Option<String>,
    /// Take the tokenizer from this GGUF file (a tokenizer-only one too) or HF checkpoint
    /// directory (default: a synthetic byte-level tokenizer).
    #[arg(long)]
    pub tokenizer_from: Option<PathBuf>,
    /// Write only the tokenizer of --tokenizer-from (metadata, no tensors: a few MB).
    #[arg(long, conflicts_with = "shape", requires = "tokenizer_from")]
    pub tokenizer_only: bool,
    /// Seed of the random weights.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

/// One test: prefill `n_prompt` or decode `n_gen` tokens (one of them is 0) after `n_depth`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Test {
    pub n_prompt: usize,
    pub n_gen: usize,
    pub n_depth: usize,
}

impl Test {
    /// llama-bench's name: `pp512`, `tg128`, `pp512 @ d4096`.
    pub fn name(&self) -> String {
        let base = if self.n_prompt > 0 {
            format!("pp{}", self.n_prompt)
        } else {
            format!("tg{}", self.n_gen)
        };
        if self.n_depth > 0 {
            format!("{base} @ d{}", self.n_depth)
        } else {
            base
        }
    }

    /// Tokens processed in the timed part.
    pub fn tokens(&self) -> usize {
        self.n_prompt + self.n_gen
    }
}

/// What to run: the tests (depth by depth) and the KV cache size they need.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub tests: Vec<Test>,
    pub ctx: usize,
    pub repetitions: usize,
}

/// Parses a comma-separated list of token counts given to `flag`.
pub fn parse_list(flag: &str, s: &str) -> Result<Vec<usize>> {
    let items: Vec<&str> = s.split(',').map(str::trim).collect();
    ensure!(
        !s.trim().is_empty(),
        "{flag}: the list is empty (give one or more token counts, e.g. 512,2048)"
    );
    items
        .iter()
        .map(|v| {
            v.parse::<usize>()
                .with_context(|| format!("{flag} {s}: `{v}` is not a token count"))
        })
        .collect()
}

/// Checks the lists and builds the tests. Zeros in `prompts` or `gens` drop that kind of
/// test (as in llama-bench); the cache must hold each depth plus its test, within `--ctx`
/// when given and within the model's context length.
pub fn plan(
    prompts: &[usize],
    gens: &[usize],
    depths: &[usize],
    repetitions: usize,
    ctx: Option<usize>,
    model_ctx: usize,
) -> Result<Plan> {
    ensure!(
        !prompts.is_empty() && !gens.is_empty() && !depths.is_empty(),
        "-p, -n and -d each need at least one value"
    );
    ensure!(repetitions > 0, "-r: at least one repetition is needed");
    let unique = |v: &[usize]| {
        let mut out: Vec<usize> = Vec::new();
        for &x in v {
            if !out.contains(&x) {
                out.push(x);
            }
        }
        out
    };
    let (prompts, gens) = (unique(prompts), unique(gens));
    let mut tests = Vec::new();
    for n_depth in unique(depths) {
        for &n_prompt in prompts.iter().filter(|&&p| p > 0) {
            tests.push(Test {
                n_prompt,
                n_gen: 0,
                n_depth,
            });
        }
        for &n_gen in gens.iter().filter(|&&n| n > 0) {
            tests.push(Test {
                n_prompt: 0,
                n_gen,
                n_depth,
            });
        }
    }
    ensure!(
        !tests.is_empty(),
        "nothing to run: every prefill (-p) and decode (-n) length is 0"
    );
    let need = tests
        .iter()
        .map(|t| t.n_depth + t.tokens())
        .max()
        .unwrap_or(0);
    let worst = tests
        .iter()
        .max_by_key(|t| t.n_depth + t.tokens())
        .expect("tests is not empty");
    let ctx = match ctx {
        Some(c) => {
            ensure!(
                c > 0 && c <= model_ctx,
                "--ctx {c} is outside 1..={model_ctx} (the model's context length)"
            );
            ensure!(
                need <= c,
                "{}: depth {} + {} tokens = {need} is over the context of {c} (--ctx)",
                worst.name(),
                worst.n_depth,
                worst.tokens()
            );
            c
        }
        None => {
            ensure!(
                need <= model_ctx,
                "{}: depth {} + {} tokens = {need} is over the model's context length of {model_ctx}",
                worst.name(),
                worst.n_depth,
                worst.tokens()
            );
            need
        }
    };
    Ok(Plan {
        tests,
        ctx,
        repetitions,
    })
}

/// Bytes of parameters on the device: 2-D weights in f16, norms and biases in f32, the
/// embedding counted once when the lm_head is tied to it.
pub fn weight_bytes(c: &Qwen2Config) -> u64 {
    let (d, q, kv, f) = (c.hidden, c.q_dim(), c.kv_dim(), c.ffn);
    let layer = 2 * (q * d + 2 * kv * d + d * q + 3 * f * d) + 4 * (q + 2 * kv + 2 * d);
    let tables = if c.tied_embeddings { 1 } else { 2 };
    (c.layers * layer + tables * 2 * c.vocab * d + 4 * d) as u64
}

/// Parameter count (the embedding once when tied).
pub fn param_count(c: &Qwen2Config) -> u64 {
    let (d, q, kv, f) = (c.hidden, c.q_dim(), c.kv_dim(), c.ffn);
    let layer = q * d + 2 * kv * d + d * q + 3 * f * d + q + 2 * kv + 2 * d;
    let tables = if c.tied_embeddings { 1 } else { 2 };
    (c.layers * layer + tables * c.vocab * d + d) as u64
}

/// Bytes of weights one decode step reads: every layer's weights, norms and biases, the
/// lm_head, the output norm and one embedding row.
pub fn decode_bytes_per_token(c: &Qwen2Config) -> u64 {
    let lm_head = 2 * c.vocab * c.hidden;
    let layers = weight_bytes(c) - if c.tied_embeddings { 1 } else { 2 } * lm_head as u64;
    layers + lm_head as u64 + 2 * c.hidden as u64
}

/// Bytes of f16 K and V cache one decode step reads per position of context.
pub fn kv_bytes_per_position(c: &Qwen2Config) -> u64 {
    (c.layers * 2 * c.kv_dim() * 2) as u64
}

/// One test's result.
#[derive(Debug, Clone)]
pub struct TestResult {
    pub test: Test,
    pub samples_s: Vec<f64>,
    /// tok/s the copy bandwidth allows (decode tests).
    pub floor_ts: Option<f64>,
}

impl TestResult {
    pub fn samples_ts(&self) -> Vec<f64> {
        let n = self.test.tokens() as f64;
        self.samples_s.iter().map(|s| n / s).collect()
    }

    /// Mean and sample standard deviation of the tok/s samples.
    pub fn mean_sd(&self) -> (f64, f64) {
        let v = self.samples_ts();
        let n = v.len() as f64;
        let mean = v.iter().sum::<f64>() / n;
        let var = if v.len() > 1 {
            v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0)
        } else {
            0.0
        };
        (mean, var.sqrt())
    }
}

/// A whole run.
pub struct BenchReport {
    pub model: String,
    pub device: String,
    pub config: Qwen2Config,
    pub matmul: MatmulVariant,
    pub plan: Plan,
    pub seed: u64,
    /// Where decode tests sampled (`--sample device|host`); `None`: greedy.
    pub sampled: Option<String>,
    pub copy: CopyBandwidth,
    pub results: Vec<TestResult>,
}

fn human(v: f64, units: &[&str], base: f64) -> String {
    let mut v = v;
    let mut i = 0;
    while v >= base && i + 1 < units.len() {
        v /= base;
        i += 1;
    }
    format!("{v:.2} {}", units[i])
}

impl BenchReport {
    pub fn to_markdown(&self) -> String {
        let c = &self.config;
        let size = human(weight_bytes(c) as f64, &["B", "KiB", "MiB", "GiB"], 1024.0);
        let params = human(param_count(c) as f64, &["", "K", "M", "B"], 1000.0);
        let bw = self.copy.best_gbps();
        let mut s = format!(
            "device: {}; matmul {}; decode {}; copy bandwidth {bw:.1} GB/s (read + write, best of {} samples of {} copies of {} MiB)\n\n",
            self.device,
            format!("{:?}", self.matmul).to_lowercase(),
            match &self.sampled {
                Some(on) =>
                    format!("sampled on the {on} (temperature 0.8, top-k 40, top-p 0.95, min-p 0.05)"),
                None => "greedy".to_string(),
            },
            self.copy.samples_gbps.len(),
            self.copy.launches,
            self.copy.buffer_bytes >> 20
        );
        s += "| model | size | params | test | t/s | floor t/s |\n";
        s += "| --- | ---: | ---: | --- | ---: | ---: |\n";
        for r in &self.results {
            let (mean, sd) = r.mean_sd();
            let floor = r.floor_ts.map(|f| format!("{f:.1}")).unwrap_or_default();
            s += &format!(
                "| {} | {size} | {params} | {} | {mean:.2} ± {sd:.2} | {floor} |\n",
                self.model,
                r.test.name()
            );
        }
        s += &format!(
            "\nfloor t/s: the decode bandwidth floor, (weights read per token {:.1} MB + KV cache {:.1} kB per position of context) ÷ {bw:.1} GB/s\n",
            decode_bytes_per_token(c) as f64 / 1e6,
            kv_bytes_per_position(c) as f64 / 1e3
        );
        s
    }

    pub fn to_json(&self) -> serde_json::Value {
        let c = &self.config;
        let tests: Vec<_> = self
            .results
            .iter()
            .map(|r| {
                let (mean, sd) = r.mean_sd();
                json!({
                    "name": r.test.name(),
                    "n_prompt": r.test.n_prompt,
                    "n_gen": r.test.n_gen,
                    "n_depth": r.test.n_depth,
                    "samples_ns": r.samples_s.iter().map(|s| (s * 1e9).round() as u64).collect::<Vec<_>>(),
                    "samples_ts": r.samples_ts(),
                    "avg_ts": mean,
                    "stddev_ts": sd,
                    "floor_ts": r.floor_ts,
                })
            })
            .collect();
        json!({
            "model": self.model,
            "device": self.device,
            "config": {
                "hidden": c.hidden, "layers": c.layers, "n_heads": c.n_heads,
                "n_kv_heads": c.n_kv_heads, "head_dim": c.head_dim, "ffn": c.ffn,
                "vocab": c.vocab, "tied_embeddings": c.tied_embeddings,
                "rope_theta": c.rope_theta, "rms_eps": c.rms_eps,
                "context_length": c.context_length,
            },
            "params": param_count(c),
            "size_bytes": weight_bytes(c),
            "matmul": format!("{:?}", self.matmul).to_lowercase(),
            "ctx": self.plan.ctx,
            "repetitions": self.plan.repetitions,
            "seed": self.seed,
            "sampled": self.sampled,
            "copy_bandwidth": {
                "best_gbps": self.copy.best_gbps(),
                "samples_gbps": self.copy.samples_gbps,
                "buffer_bytes": self.copy.buffer_bytes,
                "launches": self.copy.launches,
                "vector_size": self.copy.vector_size,
            },
            "decode_bytes_per_token": decode_bytes_per_token(c),
            "kv_bytes_per_position": kv_bytes_per_position(c),
            "tests": tests,
        })
    }
}

/// Runs `cubeqwen bench` and returns what it prints on stdout.
pub fn run(args: &BenchArgs) -> Result<String> {
    let prompts = parse_list("-p", &args.n_prompt)?;
    let gens = parse_list("-n", &args.n_gen)?;
    let depths = parse_list("-d", &args.n_depth)?;
    ensure!(args.copy_mib > 0, "--copy-mib must be at least 1");
    let plan_for = |c: &Qwen2Config| {
        plan(
            &prompts,
            &gens,
            &depths,
            args.repetitions,
            args.ctx,
            c.context_length,
        )
    };
    let (host, label, plan) = match (&args.model, &args.random) {
        (Some(p), None) => {
            ensure!(p.exists(), "model file {} does not exist", p.display());
            let host = cubeqwen_loaders::load_model(p)
                .with_context(|| format!("loading {}", p.display()))?;
            let plan = plan_for(&host.config)?;
            let name = p.file_name().unwrap_or_default().to_string_lossy();
            (host, name.into_owned(), plan)
        }
        (None, Some(shape)) => {
            let config = cubeqwen_loaders::qwen25_config(shape)?;
            let plan = plan_for(&config)?;
            eprintln!(
                "bench: random weights of the {shape} shape (seed {})",
                args.seed
            );
            // No tokenizer: the bench feeds token ids.
            let host = cubeqwen_loaders::random_qwen2_with_tokenizer(
                &config,
                args.seed,
                Default::default(),
            );
            (host, format!("random {}", shape.to_ascii_lowercase()), plan)
        }
        _ => bail!("give --model PATH or --random 0.5b|1.5b|7b"),
    };
    let job = BenchJob {
        host,
        label,
        plan,
        args: args.clone(),
    };
    let report = dispatch(args.device, job)?;
    Ok(if args.format == "json" {
        format!("{}\n", report.to_json())
    } else {
        report.to_markdown()
    })
}

/// Runs `cubeqwen random-gguf`; returns a line saying what was written.
pub fn run_random_gguf(args: &RandomGgufArgs) -> Result<String> {
    let t0 = Instant::now();
    if args.tokenizer_only {
        let src = args
            .tokenizer_from
            .as_deref()
            .context("--tokenizer-only needs --tokenizer-from FILE")?;
        cubeqwen_loaders::write_tokenizer_gguf(src, &args.output)?;
    } else {
        let shape = args.shape.as_deref().context("give --shape 0.5b|1.5b|7b")?;
        let config = cubeqwen_loaders::qwen25_config(shape)?;
        eprintln!(
            "writing random {shape} weights ({:.2} GB of f16)...",
            weight_bytes(&config) as f64 / 1e9
        );
        cubeqwen_loaders::write_random_gguf(
            &config,
            args.seed,
            args.tokenizer_from.as_deref(),
            &args.output,
        )?;
    }
    let bytes = std::fs::metadata(&args.output)
        .with_context(|| format!("reading back {}", args.output.display()))?
        .len();
    Ok(format!(
        "wrote {} ({:.1} MB) in {:.1?}",
        args.output.display(),
        bytes as f64 / 1e6,
        t0.elapsed()
    ))
}

struct BenchJob {
    host: HostModel,
    label: String,
    plan: Plan,
    args: BenchArgs,
}

impl RuntimeJob for BenchJob {
    type Output = BenchReport;
    fn run<R: Runtime>(self, client: ComputeClient<R>, device: &str) -> Result<BenchReport> {
        let BenchJob {
            host,
            label,
            plan,
            args,
        } = self;
        let model = DeviceModel::upload(&client, &host, plan.ctx)?;
        let config = host.config.clone();
        drop(host);
        eprintln!(
            "bench: {label} on {device}; uploaded {:.1} MB in {:.2?}",
            model.upload_bytes as f64 / 1e6,
            model.upload_time
        );
        let copy = measure_copy_bandwidth(&client, args.copy_mib << 20, 5, 10)?;
        let mut results = Vec::with_capacity(plan.tests.len());
        run_tests(
            &client,
            &model,
            &plan,
            &args,
            copy.best_gbps(),
            &mut results,
        )?;
        Ok(BenchReport {
            model: label,
            device: device.to_string(),
            config,
            matmul: args.matmul,
            plan,
            seed: args.seed,
            sampled: args.sample.clone(),
            copy,
            results,
        })
    }
}

fn progress_bar(len: u64) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(len);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "bench {elapsed_precise} [{bar:30}] {pos}/{len} {msg}",
        )
        .expect("valid template")
        .progress_chars("=> "),
    );
    bar
}

/// A line for the user: above the progress bar, or on stderr when the bar is hidden (not a
/// terminal), so logs keep it.
fn say(bar: &indicatif::ProgressBar, line: String) {
    if bar.is_hidden() {
        eprintln!("{line}");
    } else {
        bar.println(line);
    }
}

fn run_tests<R: Runtime>(
    client: &ComputeClient<R>,
    model: &DeviceModel<R>,
    plan: &Plan,
    args: &BenchArgs,
    copy_gbps: f64,
    results: &mut Vec<TestResult>,
) -> Result<()> {
    let c = &model.config;
    let mut rng = ChaCha8Rng::seed_from_u64(args.seed ^ 0x0062_656e_6368);
    let vocab = c.vocab as u32;
    let mut ids = |n: usize| -> Vec<u32> { (0..n).map(|_| rng.random_range(0..vocab)).collect() };
    let mut sampler = match &args.sample {
        Some(on) => Some((
            Sampler::new(SamplingParams {
                seed: args.seed,
                ..SamplingParams::default()
            })?,
            on == "host",
        )),
        None => None,
    };
    let mut depths: Vec<usize> = plan.tests.iter().map(|t| t.n_depth).collect();
    depths.dedup();
    let runs = plan.tests.len() * (plan.repetitions + 1) + depths.len();
    let bar = progress_bar(runs as u64);
    for depth in depths {
        let mut session = Session::new(client, model, plan.ctx)?;
        session.variant = args.matmul;
        if let Some(n) = args.ubatch {
            ensure!(n > 0, "--ubatch-size must be at least 1");
            session.prefill_chunk = n;
        }
        bar.set_message(format!("prefilling the depth of {depth} tokens"));
        if depth > 0 {
            session.forward(client, &ids(depth), None)?;
            sync(client)?;
        }
        bar.inc(1);
        for test in plan.tests.iter().filter(|t| t.n_depth == depth) {
            let mut samples_s = Vec::with_capacity(plan.repetitions);
            for rep in 0..=plan.repetitions {
                bar.set_message(if rep == 0 {
                    format!("{} (warm-up)", test.name())
                } else {
                    format!("{} ({rep}/{})", test.name(), plan.repetitions)
                });
                session.truncate(depth)?;
                let secs = if test.n_prompt > 0 {
                    let prompt = ids(test.n_prompt);
                    let t0 = Instant::now();
                    session.forward(client, &prompt, None)?;
                    sync(client)?;
                    t0.elapsed().as_secs_f64()
                } else {
                    let token = ids(1)[0];
                    let t0 = Instant::now();
                    for _ in 0..test.n_gen {
                        if session.len == 0 {
                            // An empty cache (depth 0): the first token is a one-token prefill,
                            // as llama-bench's first tg step is.
                            session.prefill(client, &[token])?;
                        } else {
                            if session.len == depth {
                                session.set_token(client, token)?;
                            }
                            session.decode(client)?;
                        }
                        match sampler.as_mut() {
                            None => {
                                session.top2(client)?;
                            }
                            Some((s, false)) => {
                                sample_next(client, &mut session, s, &[])?;
                            }
                            Some((s, true)) => {
                                let next = s.sample(&session.read_logits(client)?, &[]);
                                session.set_token(client, next)?;
                            }
                        }
                    }
                    t0.elapsed().as_secs_f64()
                };
                if rep > 0 {
                    samples_s.push(secs);
                }
                bar.inc(1);
            }
            let floor_ts = (test.n_gen > 0).then(|| {
                // Step i attends over depth + i + 1 positions: on average depth + (n + 1) / 2.
                let positions = test.n_depth as f64 + (test.n_gen as f64 + 1.0) / 2.0;
                let bytes =
                    decode_bytes_per_token(c) as f64 + kv_bytes_per_position(c) as f64 * positions;
                copy_gbps * 1e9 / bytes
            });
            let r = TestResult {
                test: *test,
                samples_s,
                floor_ts,
            };
            #[cfg(feature = "cuda")]
            if test.n_gen > 0 {
                if let Some(t) = session.decode_timeline()? {
                    say(
                        &bar,
                        format!("bench: timeline of the last {} step\n{t}", test.name()),
                    );
                }
            }
            let (mean, sd) = r.mean_sd();
            say(
                &bar,
                format!("bench: {:<16} {mean:>10.2} ± {sd:.2} tok/s", test.name()),
            );
            results.push(r);
        }
    }
    bar.finish_and_clear();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_and_plans() {
        assert_eq!(parse_list("-p", "512, 2048").unwrap(), [512, 2048]);
        for (bad, msg) in [
            ("", "the list is empty"),
            ("512,x", "`x` is not a token count"),
        ] {
            let e = parse_list("-p", bad).unwrap_err();
            assert!(format!("{e:#}").contains(msg), "{bad:?}: {e:#}");
        }
        let p = plan(&[512, 0, 512], &[128], &[0, 4096, 0], 3, None, 32768).unwrap();
        let names: Vec<_> = p.tests.iter().map(Test::name).collect();
        assert_eq!(names, ["pp512", "tg128", "pp512 @ d4096", "tg128 @ d4096"]);
        assert_eq!((p.ctx, p.repetitions), (4096 + 512, 3));
        let p = plan(&[0], &[16], &[8], 1, Some(100), 4096).unwrap();
        assert_eq!((p.tests.len(), p.ctx), (1, 100));
        for (args, msg) in [
            ((vec![], vec![1], vec![0], 1, None), "at least one value"),
            ((vec![1], vec![1], vec![0], 0, None), "at least one repetition"),
            ((vec![0], vec![0], vec![0], 1, None), "nothing to run"),
            ((vec![64], vec![1], vec![64], 1, Some(100)), "pp64 @ d64: depth 64 + 64 tokens = 128 is over the context of 100"),
            ((vec![64], vec![1], vec![0], 1, Some(5000)), "--ctx 5000 is outside 1..=4096"),
            ((vec![1], vec![4000], vec![200], 1, None), "tg4000 @ d200: depth 200 + 4000 tokens = 4200 is over the model's context length of 4096"),
        ] {
            let (pp, tg, d, r, ctx) = args;
            let e = plan(&pp, &tg, &d, r, ctx, 4096).unwrap_err().to_string();
            assert!(e.contains(msg), "{e}");
        }
    }

    #[test]
    fn sizes_of_the_0_5b_shape() {
        let c = cubeqwen_loaders::qwen25_config("0.5b").unwrap();
        // 494.03 M parameters (Qwen2.5-0.5B's model card: 0.49B), 942.4 MiB in f16.
        assert_eq!(param_count(&c), 494_032_768);
        // 2-D weights in f16, the 1-D norms and biases in f32.
        let one_d = 24 * (896 + 2 * 128 + 2 * 896) + 896;
        assert_eq!(weight_bytes(&c), 2 * 494_032_768 + 2 * one_d);
        // Tied: the lm_head is the embedding, read once per token (plus one embedding row).
        assert_eq!(decode_bytes_per_token(&c), weight_bytes(&c) + 2 * 896);
        assert_eq!(kv_bytes_per_position(&c), 24 * 2 * 128 * 2);
        let u = cubeqwen_loaders::qwen25_config("7b").unwrap();
        let lm = 2 * 152064 * 3584;
        assert_eq!(decode_bytes_per_token(&u), weight_bytes(&u) - lm + 2 * 3584);
    }

    #[test]
    fn mean_and_sample_sd() {
        let r = TestResult {
            test: Test {
                n_prompt: 10,
                n_gen: 0,
                n_depth: 0,
            },
            samples_s: vec![1.0, 0.5, 0.25],
            floor_ts: None,
        };
        assert_eq!(r.samples_ts(), [10.0, 20.0, 40.0]);
        let (m, sd) = r.mean_sd();
        assert!((m - 70.0 / 3.0).abs() < 1e-9);
        assert!(
            (sd - (((10.0 - m).powi(2) + (20.0 - m).powi(2) + (40.0 - m).powi(2)) / 2.0).sqrt())
                .abs()
                < 1e-9
        );
    }
}
