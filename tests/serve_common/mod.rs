#![allow(dead_code)]
//! Shared by the `cubeqwen serve` tests: the built binary started on a loopback port, an SSE
//! reader, the synthetic model and the library's `generate` as the reference.
//!
//! Every wait is bounded by [`TIMEOUT`]; every loop over events by the stream's end.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::Result;
use cubecl::prelude::*;
use cubeqwen::chat::{ChatMessage, ChatTemplate};
use cubeqwen::forward::Session;
use cubeqwen::generate::{generate, Output, Request};
use cubeqwen::model::DeviceModel;
use cubeqwen::sampling::SamplingParams;
use cubeqwen::tokenizer::Tokenizer;
use cubeqwen_kernels::runtime::RuntimeJob;
use cubeqwen_kernels::testing::run_test;
use cubeqwen_loaders::{
    random_qwen2, tiny_config, write_gguf_f16, HostModel, Qwen2Config, TensorData,
};
use futures_util::StreamExt;
use half::f16;
use serde_json::Value;

/// Bound on any one wait: a server start, a request, a stream.
pub const TIMEOUT: Duration = Duration::from_secs(180);
/// The same for the real model, whose prefill takes minutes on a busy 2-core machine.
pub const REAL_TIMEOUT: Duration = Duration::from_secs(900);

/// The synthetic model: the loaders' tiny config (2 layers, GQA 2) with a vocabulary of 512, so
/// the tokenizer has its control tokens and a ChatML template, and an untied output layer.
pub fn config() -> Qwen2Config {
    Qwen2Config {
        vocab: 512,
        tied_embeddings: false,
        ..tiny_config()
    }
}

/// Random weights (seed 7) with a sharpened output layer (×8) whose rows are zero for every
/// token but printable ASCII ones: those logits are exactly 0 while the largest of the others is
/// far above, so the text is readable ASCII and no end-of-sequence id comes (generation runs to
/// max_tokens) unless a test names another eos id ([`eos_model`]).
pub fn host_model() -> HostModel {
    let mut host = random_qwen2(&config(), 7);
    let tokenizer = Tokenizer::from_data(&host.tokenizer).unwrap();
    let keep = |id: usize| {
        let id = id as u32;
        !tokenizer.is_added(id)
            && tokenizer
                .decode(&[id])
                .unwrap()
                .bytes()
                .all(|b| (0x20..=0x7e).contains(&b))
    };
    let d = config().hidden;
    let out = host.tensors.get_mut("output.weight").unwrap();
    let TensorData::F16(w) = &mut out.data else {
        panic!("random_qwen2 writes f16 matrices")
    };
    let mut kept = 0;
    for (row, chunk) in w.chunks_mut(d).enumerate() {
        let k = keep(row);
        kept += usize::from(k);
        for v in chunk {
            *v = if k {
                f16::from_f32(v.to_f32() * 8.0)
            } else {
                f16::ZERO
            };
        }
    }
    assert!(kept > 100, "{kept} printable tokens");
    assert!(tokenizer.eos_ids().iter().all(|&e| !keep(e as usize)));
    host
}

/// Writes `host` under cargo's scratch folder for tests (the same names each run, so nothing
/// piles up; written under a temporary name and renamed, so no run reads half a file).
fn write_model(host: &HostModel, name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"));
    let path = dir.join(name);
    let tmp = dir.join(format!("{name}.{}.tmp", std::process::id()));
    write_gguf_f16(host, &tmp).unwrap();
    std::fs::rename(&tmp, &path).unwrap();
    path
}

/// [`host_model`] as a GGUF file (written once per test binary).
pub fn model_path() -> PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| write_model(&host_model(), "tiny-qwen2.gguf"))
        .clone()
}

/// [`host_model`] whose tokenizer names `eos` as its end-of-sequence id.
pub fn eos_model(eos: u32) -> PathBuf {
    let mut host = host_model();
    host.tokenizer.eos_id = Some(eos);
    write_model(&host, &format!("tiny-qwen2-eos{eos}.gguf"))
}

/// The `cubeqwen` binary: `$CUBEQWEN_BIN`, else the one cargo built for these tests.
pub fn binary() -> PathBuf {
    std::env::var_os("CUBEQWEN_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_cubeqwen")))
}

pub fn device() -> String {
    std::env::var("CUBEQWEN_TEST_DEVICE").unwrap_or_else(|_| "auto".into())
}

/// A `cubeqwen serve` process on 127.0.0.1 and a free port; killed when dropped.
pub struct Server {
    pub child: Child,
    pub base: String,
    pub log: Arc<Mutex<String>>,
}

impl Server {
    pub fn start(model: &Path, extra: &[&str]) -> Server {
        let mut child = Command::new(binary())
            .args(["serve", "--host", "127.0.0.1", "--port", "0", "--device"])
            .arg(device())
            .arg("--model")
            .arg(model)
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting cubeqwen serve");
        let stderr = child.stderr.take().unwrap();
        let log = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let l = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                eprintln!("[server] {line}");
                if let Some(addr) = line.strip_prefix("cubeqwen serve: listening on ") {
                    let _ = tx.send(addr.to_string());
                }
                let mut l = l.lock().unwrap();
                l.push_str(&line);
                l.push('\n');
            }
        });
        let base = rx
            .recv_timeout(TIMEOUT)
            .unwrap_or_else(|_| panic!("the server printed no address:\n{}", log.lock().unwrap()));
        assert!(base.starts_with("http://127.0.0.1:"), "{base}");
        Server { child, base, log }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// Polls `/health` until the model is ready; returns that answer.
    pub async fn ready(&self, client: &reqwest::Client) -> Value {
        let t0 = Instant::now();
        loop {
            let h = get_json(client, &self.url("/health")).await;
            match h["state"].as_str() {
                Some("ready") => return h,
                Some("loading") => {}
                _ => panic!("unexpected /health: {h}"),
            }
            assert!(
                t0.elapsed() < TIMEOUT,
                "not ready after {TIMEOUT:?}:\n{}",
                self.log.lock().unwrap()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([&format!("-{sig}"), &self.child.id().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -{sig} failed");
    }

    /// Waits (bounded) for the process to exit.
    pub fn wait_exit(&mut self) -> ExitStatus {
        let t0 = Instant::now();
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s;
            }
            assert!(t0.elapsed() < TIMEOUT, "the server did not exit");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn client() -> reqwest::Client {
    reqwest::Client::builder().no_proxy().build().unwrap()
}

/// Reads an SSE body one event at a time: each item is the event's `data:` (lines joined by
/// `\n`); comments and data-less events are skipped.
pub struct SseReader {
    stream: std::pin::Pin<
        Box<dyn futures_util::Stream<Item = reqwest::Result<axum::body::Bytes>> + Send>,
    >,
    buf: String,
    deadline: Instant,
}

impl SseReader {
    pub fn new(resp: reqwest::Response) -> Self {
        Self::with_timeout(resp, TIMEOUT)
    }

    pub fn with_timeout(resp: reqwest::Response, timeout: Duration) -> Self {
        assert_eq!(resp.status(), 200, "not a stream: {resp:?}");
        let ct = resp.headers()["content-type"].to_str().unwrap().to_string();
        assert!(ct.starts_with("text/event-stream"), "content-type {ct}");
        Self {
            stream: Box::pin(resp.bytes_stream()),
            buf: String::new(),
            deadline: Instant::now() + timeout,
        }
    }

    /// The next event's data, or `None` when the stream ended.
    pub async fn next(&mut self) -> Option<String> {
        loop {
            if let Some(end) = self.buf.find("\n\n") {
                let block: String = self.buf.drain(..end + 2).collect();
                let data: Vec<&str> = block
                    .lines()
                    .filter_map(|l| l.strip_prefix("data:"))
                    .map(|d| d.strip_prefix(' ').unwrap_or(d))
                    .collect();
                if data.is_empty() {
                    continue;
                }
                return Some(data.join("\n"));
            }
            let left = self.deadline.saturating_duration_since(Instant::now());
            let chunk = tokio::time::timeout(left, self.stream.next())
                .await
                .expect("the stream stalled past the test timeout");
            match chunk {
                Some(Ok(b)) => self.buf.push_str(&String::from_utf8_lossy(&b)),
                Some(Err(e)) => panic!("reading the stream: {e}"),
                None => {
                    assert!(
                        self.buf.trim().is_empty(),
                        "stream ended mid-event: {:?}",
                        self.buf
                    );
                    return None;
                }
            }
        }
    }

    /// The next event as JSON.
    pub async fn next_json(&mut self) -> Option<Value> {
        let d = self.next().await?;
        Some(serde_json::from_str(&d).unwrap_or_else(|e| panic!("event {d:?}: {e}")))
    }

    /// Every remaining event's data.
    pub async fn rest(&mut self) -> Vec<String> {
        let mut out = Vec::new();
        while let Some(d) = self.next().await {
            out.push(d);
        }
        out
    }

    pub async fn rest_json(&mut self) -> Vec<Value> {
        self.rest()
            .await
            .iter()
            .map(|d| serde_json::from_str(d).unwrap_or_else(|e| panic!("event {d:?}: {e}")))
            .collect()
    }
}

/// GETs JSON (bounded by [`TIMEOUT`]).
pub async fn get_json(client: &reqwest::Client, url: &str) -> Value {
    client
        .get(url)
        .timeout(TIMEOUT)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// POSTs JSON and returns the response (bounded by [`TIMEOUT`]).
pub async fn post(client: &reqwest::Client, url: &str, body: &Value) -> reqwest::Response {
    post_within(client, url, body, TIMEOUT).await
}

pub async fn post_within(
    client: &reqwest::Client,
    url: &str,
    body: &Value,
    timeout: Duration,
) -> reqwest::Response {
    client
        .post(url)
        .json(body)
        .timeout(timeout)
        .send()
        .await
        .unwrap()
}

/// `/execute` with `body`, every event of its stream.
pub async fn execute(client: &reqwest::Client, server: &Server, body: &Value) -> Vec<Value> {
    let resp = client
        .post(server.url("/execute"))
        .json(body)
        .send()
        .await
        .unwrap();
    SseReader::new(resp).rest_json().await
}

/// The worker protocol's rules for one job's events: `started` first, `token`s with indices
/// 0, 1, 2, ... (the last may repeat for text released at the end), an optional `metrics`, and
/// exactly one terminal event, last. Returns the text and the terminal event.
pub fn check_events(events: &[Value], job_id: &str) -> (String, Value) {
    assert!(!events.is_empty(), "no events");
    let last = events.last().unwrap().clone();
    let terminal = |e: &Value| matches!(e["type"].as_str(), Some("end") | Some("error"));
    assert!(terminal(&last), "last event is not terminal: {last}");
    assert_eq!(
        events.iter().filter(|e| terminal(e)).count(),
        1,
        "more than one terminal event: {events:?}"
    );
    assert_eq!(last["job_id"], job_id, "{last}");
    let mut text = String::new();
    let mut next_i = 0u64;
    let body = &events[..events.len() - 1];
    if body.is_empty() {
        return (text, last); // ended before it started
    }
    assert_eq!(body[0]["type"], "started", "first event: {}", body[0]);
    assert_eq!(body[0]["job_id"], job_id);
    assert!(body[0]["model"].as_str().is_some_and(|m| !m.is_empty()));
    assert!(body[0]["started_at"].as_u64().unwrap() > 1_600_000_000_000);
    let mut seen_metrics = false;
    for e in &body[1..] {
        match e["type"].as_str() {
            Some("token") => {
                assert!(!seen_metrics, "token after metrics");
                let i = e["i"].as_u64().unwrap();
                assert!(
                    i == next_i || (i + 1 == next_i && !e["t"].as_str().unwrap().is_empty()),
                    "token index {i}, expected {next_i}: {events:?}"
                );
                next_i = i + 1;
                text.push_str(e["t"].as_str().unwrap());
            }
            Some("metrics") => {
                assert!(!seen_metrics, "two metrics events");
                seen_metrics = true;
                assert!(e["tokens_per_sec"].as_f64().unwrap() >= 0.0);
            }
            _ => panic!("unexpected event {e}"),
        }
    }
    if last["type"] == "end" {
        let n = last["tokens_out"].as_u64().unwrap();
        // Every generated token but an end-of-sequence one has its event.
        let eos = u64::from(last["stop_reason"] == "eos");
        assert_eq!(next_i + eos, n, "token events vs tokens_out: {events:?}");
    }
    (text, last)
}

/// One request to the library's `generate`.
#[derive(Clone)]
pub struct LibCase {
    /// Raw text, or the user message of a chat when `chat` is set.
    pub prompt: String,
    pub chat: Option<Vec<ChatMessage>>,
    pub max_tokens: usize,
    pub params: SamplingParams,
    pub stop: Vec<String>,
}

impl LibCase {
    pub fn raw(prompt: &str, max_tokens: usize, params: SamplingParams) -> Self {
        Self {
            prompt: prompt.into(),
            chat: None,
            max_tokens,
            params,
            stop: Vec::new(),
        }
    }
}

/// Greedy, or temperature sampling with nothing else on (the settings `/execute` defaults to
/// besides `temperature` and `seed`).
pub fn params(temperature: f32, seed: u64) -> SamplingParams {
    SamplingParams {
        temperature,
        top_k: 0,
        top_p: 1.0,
        min_p: 0.0,
        repeat_penalty: 1.0,
        repeat_last_n: 64,
        seed,
    }
}

/// The library's `generate` (what `cubeqwen generate` runs) on `path`, each case in a fresh
/// session; with the prompt ids it encoded.
pub fn library_generate(path: &Path, ctx: usize, cases: &[LibCase]) -> Vec<(Vec<u32>, Output)> {
    struct Job {
        path: PathBuf,
        ctx: usize,
        cases: Vec<LibCase>,
    }
    impl RuntimeJob for Job {
        type Output = Vec<(Vec<u32>, Output)>;
        fn run<R: Runtime>(self, client: ComputeClient<R>, _: &str) -> Result<Self::Output> {
            let host = cubeqwen_loaders::load_model(&self.path)?;
            let tokenizer = Tokenizer::from_data(&host.tokenizer)?;
            let template = ChatTemplate::from_data(&host.tokenizer)?;
            let model = DeviceModel::upload(&client, &host, self.ctx)?;
            let mut out = Vec::new();
            for c in self.cases {
                let text = match &c.chat {
                    Some(msgs) => template.render(msgs, true)?,
                    None => c.prompt.clone(),
                };
                let req = Request {
                    prompt_ids: tokenizer.encode(&text)?,
                    max_tokens: c.max_tokens,
                    params: c.params.clone(),
                    stop: c.stop.clone(),
                };
                let mut session = Session::new(&client, &model, self.ctx)?;
                let o = generate(&client, &mut session, &tokenizer, &req, &mut |_| {})?;
                out.push((req.prompt_ids, o));
            }
            Ok(out)
        }
    }
    run_test(Job {
        path: path.to_path_buf(),
        ctx,
        cases: cases.to_vec(),
    })
}

/// The value of the sample `name` (with its labels, e.g. `x{a="b"}`) in Prometheus text.
pub fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| {
            let (n, v) = l.rsplit_once(' ')?;
            (n == name).then(|| v.parse().unwrap())
        })
        .unwrap_or_else(|| panic!("no sample {name} in:\n{text}"))
}
