use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};
use cubecl::prelude::*;
use cubeqwen::chat::{ChatMessage, ChatTemplate};
use cubeqwen::forward::Session;
use cubeqwen::generate::{check_prompt_fits, generate, Request};
use cubeqwen::model::DeviceModel;
use cubeqwen::sampling::SamplingParams;
use cubeqwen::tokenizer::Tokenizer;
use cubeqwen::{dispatch, selftest, DeviceKind, RuntimeJob};
use cubeqwen_kernels::matmul::MatmulVariant;

#[derive(Parser)]
#[command(
    name = "cubeqwen",
    version,
    about = "Qwen2/Qwen2.5 inference with CubeCL kernels"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate text from a prompt (or a chat message) with a Qwen2 model.
    Generate(GenerateArgs),
    /// Run every kernel once on the device against its f64 reference and print the errors.
    Selftest {
        /// auto (CUDA if a GPU and driver are present, else wgpu), cuda or wgpu.
        #[arg(long, default_value = "auto")]
        device: DeviceKind,
        /// Seed of the random inputs (default: time-based, printed).
        #[arg(long)]
        seed: Option<u64>,
    },
    /// Run the forward pass on the device capturing every named step and compare each with the
    /// f64 reference (or a file of Hugging Face activations); exit 1 at the first departure.
    Trace(TraceArgs),
    /// Compare the device forward pass with Hugging Face transformers' outputs written by
    /// scripts/hf_reference.py into DIR.
    HfParity {
        dir: PathBuf,
        #[arg(long, default_value = "auto")]
        device: DeviceKind,
        /// Prefill the prompt in blocks of this many tokens (default: `PREFILL_CHUNK`, 2048).
        #[arg(long)]
        prefill_chunk: Option<usize>,
    },
    /// Print a model file's architecture, config, tokenizer and tensor table.
    Inspect { file: PathBuf },
    /// Measure prefill and decode tokens/s (llama-bench's tests and names) and the decode
    /// bandwidth floor, on a model file or random weights of a Qwen2.5 shape.
    Bench(cubeqwen::bench::BenchArgs),
    /// Write a random-weight F16 GGUF of a Qwen2.5 shape (or only a file's tokenizer).
    RandomGguf(cubeqwen::bench::RandomGgufArgs),
    /// Serve the model over HTTP: the worker protocol (/execute, /cancel) and OpenAI's API.
    Serve(cubeqwen::serve::ServeArgs),
    /// Convert a GGUF file or a Hugging Face checkpoint directory to an F16 GGUF.
    Convert {
        input: PathBuf,
        output: PathBuf,
        /// Output tensor type.
        #[arg(long, value_enum, default_value_t = OutDtype::F16)]
        dtype: OutDtype,
    },
}

/// KV cache size when `--ctx` is not given (capped by the model's context length).
const DEFAULT_CTX: usize = 4096;

#[derive(Args, Clone)]
struct GenerateArgs {
    /// GGUF file or Hugging Face checkpoint directory (default: the cached
    /// Qwen2.5-Coder-0.5B-Instruct, fetched when missing).
    #[arg(long)]
    model: Option<PathBuf>,
    /// Raw prompt text, tokenized as is.
    #[arg(long, conflicts_with = "chat", required_unless_present = "chat")]
    prompt: Option<String>,
    /// A user message, wrapped in the model's chat template.
    #[arg(long)]
    chat: Option<String>,
    /// System message for --chat (default: what the template says).
    #[arg(long, requires = "chat")]
    system: Option<String>,
    #[arg(long, default_value_t = 256)]
    max_tokens: usize,
    /// 0 = greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    /// 0 = off.
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    #[arg(long, default_value_t = 0.0)]
    min_p: f32,
    #[arg(long, default_value_t = 1.0)]
    repeat_penalty: f32,
    #[arg(long, default_value_t = 64)]
    repeat_last_n: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Stop when this text appears (repeatable).
    #[arg(long)]
    stop: Vec<String>,
    /// KV cache size in tokens (default: 4096, capped by the model's context length).
    #[arg(long)]
    ctx: Option<usize>,
    #[arg(long, default_value = "auto")]
    device: DeviceKind,
    /// Matmul kernel: auto, tiled, cmma, gemv, gemv-mma, mma, blocked or cubek.
    #[arg(long, default_value = "auto")]
    matmul: MatmulVariant,
    /// text: stream the reply to stdout, timings to stderr; json: one object at the end.
    #[arg(long, value_enum, default_value_t = Format::Text)]
    format: Format,
}

#[derive(ValueEnum, Clone, Copy, PartialEq, Eq)]
enum Format {
    Text,
    Json,
}

#[derive(ValueEnum, Clone, Copy, PartialEq, Eq)]
enum OutDtype {
    F16,
}

/// What `trace` compares the device with.
#[derive(Clone)]
enum Against {
    /// The plain-Rust f64 reference.
    Cpu,
    /// A safetensors file of activations (`scripts/hf_reference.py --activations`).
    File(PathBuf),
}

impl std::str::FromStr for Against {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(if s == "cpu" {
            Against::Cpu
        } else {
            Against::File(PathBuf::from(s))
        })
    }
}

#[derive(Args, Clone)]
struct TraceArgs {
    /// GGUF file or Hugging Face checkpoint directory (default: the cached real model).
    #[arg(long)]
    model: Option<PathBuf>,
    /// Prompt text (tokenized as is). With --against FILE the file's input_ids are used.
    #[arg(long)]
    prompt: Option<String>,
    #[arg(long, default_value = "auto")]
    device: DeviceKind,
    /// `cpu` (the f64 reference) or a safetensors file written by
    /// `scripts/hf_reference.py --activations`.
    #[arg(long, default_value = "cpu")]
    against: Against,
    /// Only these layers, e.g. 0..4 (global steps are always shown).
    #[arg(long)]
    layers: Option<String>,
    /// Relative-error tolerance per step.
    #[arg(long, default_value_t = 3e-2)]
    tol: f64,
}

fn parse_layers(s: &str) -> Result<std::ops::Range<usize>> {
    let (a, b) = s
        .split_once("..")
        .with_context(|| format!("--layers {s}: expected A..B"))?;
    let (a, b): (usize, usize) = (a.trim().parse()?, b.trim().parse()?);
    if a >= b {
        bail!("--layers {s}: empty range");
    }
    Ok(a..b)
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Command::Generate(args) => generate_cmd(args),
        Command::Selftest { device, seed } => selftest_cmd(device, seed),
        Command::Trace(args) => trace_cmd(args),
        Command::HfParity {
            dir,
            device,
            prefill_chunk,
        } => hf_parity_cmd(dir, device, prefill_chunk),
        Command::Bench(args) => bench(&args),
        Command::RandomGguf(args) => random_gguf(&args),
        Command::Serve(args) => serve(args),
        Command::Inspect { file } => {
            print!("{}", cubeqwen_loaders::inspect(&file)?);
            Ok(ExitCode::SUCCESS)
        }
        Command::Convert {
            input,
            output,
            dtype: OutDtype::F16,
        } => {
            let t0 = Instant::now();
            cubeqwen_loaders::convert_to_f16(&input, &output)?;
            eprintln!("wrote {} in {:.1?}", output.display(), t0.elapsed());
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Success when `ok`, else exit code 1.
fn exit_code(ok: bool) -> ExitCode {
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// `--model`, or the cached real model (fetched when missing).
fn model_path(model: &Option<PathBuf>) -> Result<PathBuf> {
    match model {
        Some(p) => Ok(p.clone()),
        None => cubeqwen::fetch::default_model(),
    }
}

/// Everything is checked (sampling settings, prompt, context) before the device is touched.
fn generate_cmd(args: GenerateArgs) -> Result<ExitCode> {
    let params = SamplingParams {
        temperature: args.temperature,
        top_k: args.top_k,
        top_p: args.top_p,
        min_p: args.min_p,
        repeat_penalty: args.repeat_penalty,
        repeat_last_n: args.repeat_last_n,
        seed: args.seed,
    };
    params.validate()?;
    if args.max_tokens == 0 {
        bail!("--max-tokens must be at least 1");
    }
    if args
        .prompt
        .as_deref()
        .or(args.chat.as_deref())
        .is_some_and(str::is_empty)
    {
        bail!("the prompt is empty");
    }
    let path = model_path(&args.model)?;
    if !path.exists() {
        bail!("model file {} does not exist", path.display());
    }
    let t0 = Instant::now();
    let host = cubeqwen_loaders::load_model(&path)
        .with_context(|| format!("loading {}", path.display()))?;
    let load_time = t0.elapsed();
    let tokenizer =
        Tokenizer::for_model(&path, &host.tokenizer).context("building the tokenizer")?;
    let text = match (&args.prompt, &args.chat) {
        (Some(p), None) => p.clone(),
        (None, Some(c)) => {
            let template = ChatTemplate::from_data(&host.tokenizer)?;
            let mut msgs = Vec::new();
            if let Some(s) = &args.system {
                msgs.push(ChatMessage::system(s.clone()));
            }
            msgs.push(ChatMessage::user(c.clone()));
            template.render(&msgs, true)?
        }
        _ => bail!("give exactly one of --prompt and --chat"),
    };
    if text.is_empty() {
        bail!("the prompt is empty");
    }
    let prompt_ids = tokenizer.encode(&text)?;
    if prompt_ids.is_empty() {
        bail!("the prompt has no tokens");
    }
    let model_ctx = host.config.context_length;
    let ctx = args.ctx.unwrap_or(DEFAULT_CTX.min(model_ctx));
    host.config.check_ctx(ctx).context("--ctx")?;
    check_prompt_fits(prompt_ids.len(), ctx, model_ctx)?;
    let req = Request {
        prompt_ids,
        max_tokens: args.max_tokens,
        params,
        stop: args.stop.clone(),
    };
    let job = GenerateJob {
        host,
        tokenizer,
        req,
        ctx,
        args: args.clone(),
        load_time,
    };
    dispatch(args.device, job)?;
    Ok(ExitCode::SUCCESS)
}

fn selftest_cmd(device: DeviceKind, seed: Option<u64>) -> Result<ExitCode> {
    let seed = seed.unwrap_or_else(cubeqwen_kernels::testing::fresh_seed);
    let (device_name, checks) = dispatch(device, Named(selftest::SelfTest { seed }))?;
    eprintln!("device: {device_name} (asked for: {device}); seed {seed}");
    let mut failed = 0;
    for c in &checks {
        let ok = c.rel_err <= c.tol;
        failed += usize::from(!ok);
        println!(
            "{:<24} rel_err {:.3e}  (tolerance {:.0e})  {}",
            c.name,
            c.rel_err,
            c.tol,
            if ok { "ok" } else { "FAIL" }
        );
    }
    println!("{} passed, {failed} failed", checks.len() - failed);
    Ok(exit_code(failed == 0))
}

fn trace_cmd(args: TraceArgs) -> Result<ExitCode> {
    let path = model_path(&args.model)?;
    let host = cubeqwen_loaders::load_model(&path)
        .with_context(|| format!("loading {}", path.display()))?;
    let layers = args.layers.as_deref().map(parse_layers).transpose()?;
    if let Some(r) = &layers {
        if r.end > host.config.layers {
            bail!(
                "--layers {}..{}: the model has {} layers",
                r.start,
                r.end,
                host.config.layers
            );
        }
    }
    let (ids, expected) = match &args.against {
        Against::Cpu => {
            let text = args
                .prompt
                .clone()
                .context("--prompt is required with --against cpu")?;
            if text.is_empty() {
                bail!("the prompt is empty");
            }
            let ids = Tokenizer::for_model(&path, &host.tokenizer)?.encode(&text)?;
            eprintln!("running the f64 reference over {} tokens...", ids.len());
            let cap = cubeqwen::trace::reference_trace(&host, &ids)?;
            (ids, cap)
        }
        Against::File(file) => {
            let (ids, cap) = cubeqwen::trace::file_trace(file)?;
            if args.prompt.is_some() {
                eprintln!(
                    "note: --prompt ignored; the file's input_ids ({} tokens) are used",
                    ids.len()
                );
            }
            (ids, cap)
        }
    };
    let n_layers = host.config.layers;
    let job = TraceJob {
        host,
        ids,
        expected,
        layers,
        tol: args.tol,
        n_layers,
    };
    let departed = dispatch(args.device, job)?;
    Ok(exit_code(!departed))
}

fn hf_parity_cmd(
    dir: PathBuf,
    device: DeviceKind,
    prefill_chunk: Option<usize>,
) -> Result<ExitCode> {
    let (report, ok) = dispatch(device, HfParityJob(dir, prefill_chunk))?;
    println!("{report}");
    Ok(exit_code(ok))
}

fn bench(args: &cubeqwen::bench::BenchArgs) -> Result<ExitCode> {
    print!("{}", cubeqwen::bench::run(args)?);
    Ok(ExitCode::SUCCESS)
}

fn random_gguf(args: &cubeqwen::bench::RandomGgufArgs) -> Result<ExitCode> {
    eprintln!("{}", cubeqwen::bench::run_random_gguf(args)?);
    Ok(ExitCode::SUCCESS)
}

fn serve(args: cubeqwen::serve::ServeArgs) -> Result<ExitCode> {
    cubeqwen::serve::run(args)?;
    Ok(ExitCode::SUCCESS)
}

struct GenerateJob {
    host: cubeqwen_loaders::HostModel,
    tokenizer: Tokenizer,
    req: Request,
    ctx: usize,
    args: GenerateArgs,
    load_time: std::time::Duration,
}

impl RuntimeJob for GenerateJob {
    type Output = ();
    fn run<R: Runtime>(self, client: ComputeClient<R>, device: &str) -> Result<()> {
        let GenerateJob {
            host,
            tokenizer,
            req,
            ctx,
            args,
            load_time,
        } = self;
        let json = args.format == Format::Json;
        let model = DeviceModel::upload(&client, &host, ctx)?;
        drop(host);
        eprintln!(
            "device: {device}; loaded in {:.2?}, uploaded {:.1} MB in {:.2?}",
            load_time,
            model.upload_bytes as f64 / 1e6,
            model.upload_time
        );
        let mut session = Session::new(&client, &model, ctx)?;
        session.variant = args.matmul;
        let mut stdout = std::io::stdout();
        let mut on_text = |s: &str| {
            if !json {
                let _ = stdout.write_all(s.as_bytes());
                let _ = stdout.flush();
            }
        };
        let out = generate(&client, &mut session, &tokenizer, &req, &mut on_text)?;
        let n = out.tokens.len();
        let prefill_tps = req.prompt_ids.len() as f64 / out.prefill_time.as_secs_f64();
        let decode_tps = (n.saturating_sub(1)) as f64 / out.decode_time.as_secs_f64().max(1e-9);
        if json {
            let v = serde_json::json!({
                "prompt_tokens": req.prompt_ids,
                "tokens": out.tokens,
                "text": out.text,
                "stop_reason": out.stop_reason.as_str(),
                "margins": out.margins,
                "timings": {
                    "load_s": load_time.as_secs_f64(),
                    "prefill_s": out.prefill_time.as_secs_f64(),
                    "decode_s": out.decode_time.as_secs_f64(),
                    "prefill_tokens_per_s": prefill_tps,
                    "decode_tokens_per_s": decode_tps,
                },
                "device": device,
            });
            println!("{v}");
        } else {
            println!();
        }
        eprintln!(
            "[{} prompt tokens, {n} generated, stop: {}] prefill {:.2?} ({prefill_tps:.1} tok/s), decode {:.2?} ({decode_tps:.2} tok/s)",
            req.prompt_ids.len(),
            out.stop_reason.as_str(),
            out.prefill_time,
            out.decode_time
        );
        Ok(())
    }
}

struct HfParityJob(PathBuf, Option<usize>);

impl RuntimeJob for HfParityJob {
    type Output = (String, bool);
    fn run<R: Runtime>(self, client: ComputeClient<R>, device: &str) -> Result<(String, bool)> {
        let (report, ok) = cubeqwen::hf_parity::run(&client, &self.0, self.1)?;
        Ok((format!("device: {device}\n{report}"), ok))
    }
}

struct TraceJob {
    host: cubeqwen_loaders::HostModel,
    ids: Vec<u32>,
    expected: cubeqwen::reference::trace::Capture,
    layers: Option<std::ops::Range<usize>>,
    tol: f64,
    n_layers: usize,
}

impl RuntimeJob for TraceJob {
    type Output = bool;
    fn run<R: Runtime>(self, client: ComputeClient<R>, device: &str) -> Result<bool> {
        eprintln!("device: {device}; tracing {} tokens", self.ids.len());
        let n = self.ids.len();
        let model = DeviceModel::upload(&client, &self.host, n.max(1))?;
        // One prefill of the whole prompt, as the expected trace was made.
        let mut session = cubeqwen::forward::Session::new(&client, &model, n.max(1))?;
        session.prefill_chunk = n.max(1);
        let got = cubeqwen::trace::device_trace(&client, &mut session, &self.ids, n)?;
        let reports =
            cubeqwen::trace::compare(&self.expected, &got, self.n_layers, self.layers, self.tol)?;
        print!("{}", cubeqwen::trace::format_report(&reports, self.tol));
        Ok(cubeqwen::trace::first_departure(&reports).is_some())
    }
}

/// Wraps a job so its output comes back with the device's name.
struct Named<J>(J);
impl<J: RuntimeJob> RuntimeJob for Named<J> {
    type Output = (String, J::Output);
    fn run<R: Runtime>(self, client: ComputeClient<R>, device: &str) -> Result<Self::Output> {
        Ok((device.to_string(), self.0.run(client, device)?))
    }
}
