//! The engine: one thread that owns the device and the model and runs one job at a time, taken
//! from a bounded FIFO queue. HTTP handlers submit jobs and read each job's [`Event`]s from its
//! own channel, so streams never mix.
//!
//! A job stops at the next token once its cancel flag is set (`/cancel`, shutdown) or its
//! event channel has no reader (the client went away); a job still waiting is taken out of the
//! queue at once.

use std::collections::{HashMap, VecDeque};
use std::ops::ControlFlow;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use cubecl::prelude::*;
use tokio::sync::mpsc;

use super::AppState;
use crate::chat::ChatTemplate;
use crate::forward::Session;
use crate::generate::{generate_with, Request, StopReason};
use crate::model::DeviceModel;
use crate::tokenizer::Tokenizer;
use crate::{dispatch, DeviceKind, RuntimeJob};

/// What handlers need of the loaded model.
pub struct ModelInfo {
    pub tokenizer: Tokenizer,
    pub template: ChatTemplate,
    pub ctx: usize,
    pub device: String,
    /// Weights plus the KV cache of one sequence.
    pub vram_bytes: usize,
}

/// How a job ended.
#[derive(Debug, Clone)]
pub struct Summary {
    pub prompt_tokens: usize,
    /// Generated ids, an end-of-sequence id included.
    pub tokens_out: usize,
    pub stop_reason: StopReason,
    pub queue_time: Duration,
    pub prefill_time: Duration,
    pub decode_time: Duration,
}

impl Summary {
    /// The protocol's name of the stop reason: `eos`, `length` (max_tokens or a full context),
    /// `stop` (a stop string) or `cancelled`.
    pub fn reason(&self) -> &'static str {
        match self.stop_reason {
            StopReason::Eos => "eos",
            StopReason::Length | StopReason::Context => "length",
            StopReason::StopString => "stop",
            StopReason::Cancelled => "cancelled",
        }
    }

    pub fn prefill_tps(&self) -> f64 {
        self.prompt_tokens as f64 / self.prefill_time.as_secs_f64().max(1e-9)
    }

    /// Tokens after the first over the time after the first, as `cubeqwen generate` reports.
    pub fn decode_tps(&self) -> f64 {
        self.tokens_out.saturating_sub(1) as f64 / self.decode_time.as_secs_f64().max(1e-9)
    }
}

/// What a job reports, in order: `Started`, `Token`s, then one of `End` and `Error`. A job
/// that ends before it started (cancelled or refused while queued) reports only the last.
#[derive(Debug, Clone)]
pub enum Event {
    Started { at_unix_ms: u64 },
    Token { i: usize, text: String },
    End(Summary),
    Error { code: &'static str, message: String },
}

impl Event {
    pub fn is_terminal(&self) -> bool {
        matches!(self, Event::End(_) | Event::Error { .. })
    }
}

pub struct Job {
    pub id: String,
    pub req: Request,
    cancel: AtomicBool,
    events: mpsc::UnboundedSender<Event>,
    accepted: Instant,
}

impl Job {
    fn send(&self, ev: Event) {
        // A closed channel means the client left; the job then stops at its next token.
        let _ = self.events.send(ev);
    }

    fn abandoned(&self) -> bool {
        self.cancel.load(Ordering::Relaxed) || self.events.is_closed()
    }

    fn cancelled_summary(&self) -> Summary {
        Summary {
            prompt_tokens: self.req.prompt_ids.len(),
            tokens_out: 0,
            stop_reason: StopReason::Cancelled,
            queue_time: self.accepted.elapsed(),
            prefill_time: Duration::ZERO,
            decode_time: Duration::ZERO,
        }
    }
}

#[derive(Debug, PartialEq, Eq)]
pub enum SubmitError {
    Full,
    Duplicate,
    Closed,
}

pub enum CancelOutcome {
    /// It was waiting: taken out of the queue; its stream got its `end` event.
    Queued,
    /// It is running: it stops at its next token.
    Running,
    NotFound,
}

#[derive(Default)]
struct QueueInner {
    waiting: VecDeque<Arc<Job>>,
    running: Option<Arc<Job>>,
    /// Waiting and running jobs by id.
    ids: HashMap<String, Arc<Job>>,
    closed: bool,
}

/// The bounded FIFO queue between the handlers and the engine.
pub struct Queue {
    inner: Mutex<QueueInner>,
    wake: Condvar,
    cap: usize,
}

impl Queue {
    pub fn new(cap: usize) -> Self {
        Self {
            inner: Mutex::new(QueueInner::default()),
            wake: Condvar::new(),
            cap,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, QueueInner> {
        // A panic while holding the lock cannot leave the queue inconsistent (each method
        // changes it in one step), so a poisoned lock is used as is.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues a job; its events come through `events`.
    pub fn submit(
        &self,
        id: String,
        req: Request,
        events: mpsc::UnboundedSender<Event>,
    ) -> Result<Arc<Job>, SubmitError> {
        let mut q = self.lock();
        if q.closed {
            return Err(SubmitError::Closed);
        }
        if q.ids.contains_key(&id) {
            return Err(SubmitError::Duplicate);
        }
        if q.waiting.len() >= self.cap {
            return Err(SubmitError::Full);
        }
        let job = Arc::new(Job {
            id: id.clone(),
            req,
            cancel: AtomicBool::new(false),
            events,
            accepted: Instant::now(),
        });
        q.ids.insert(id, job.clone());
        q.waiting.push_back(job.clone());
        self.wake.notify_one();
        Ok(job)
    }

    /// The next job for the engine (blocking); `None` once the queue is closed.
    fn next(&self) -> Option<Arc<Job>> {
        let mut q = self.lock();
        loop {
            if q.closed {
                return None;
            }
            if let Some(job) = q.waiting.pop_front() {
                q.running = Some(job.clone());
                return Some(job);
            }
            q = self.wake.wait(q).unwrap_or_else(|e| e.into_inner());
        }
    }

    fn finish(&self, job: &Arc<Job>) {
        let mut q = self.lock();
        q.running = None;
        if q.ids.get(&job.id).is_some_and(|j| Arc::ptr_eq(j, job)) {
            q.ids.remove(&job.id);
        }
    }

    /// Takes `job` out of the waiting line; whether it was there.
    fn remove_waiting(q: &mut QueueInner, job: &Arc<Job>) -> bool {
        let Some(pos) = q.waiting.iter().position(|j| Arc::ptr_eq(j, job)) else {
            return false;
        };
        q.waiting.remove(pos);
        q.ids.remove(&job.id);
        true
    }

    /// `/cancel`.
    pub fn cancel(&self, id: &str) -> CancelOutcome {
        let mut q = self.lock();
        let Some(job) = q.ids.get(id).cloned() else {
            return CancelOutcome::NotFound;
        };
        job.cancel.store(true, Ordering::Relaxed);
        if Self::remove_waiting(&mut q, &job) {
            drop(q);
            job.send(Event::End(job.cancelled_summary()));
            CancelOutcome::Queued
        } else {
            CancelOutcome::Running
        }
    }

    /// The client of `job` went away: stop it, and free its place if it is still waiting.
    /// Whether it was still waiting.
    pub fn abandon(&self, job: &Arc<Job>) -> bool {
        job.cancel.store(true, Ordering::Relaxed);
        Self::remove_waiting(&mut self.lock(), job)
    }

    /// Stops taking jobs: the waiting ones end with a `shutting_down` error, the running one is
    /// cancelled (and ends with the same error), the engine stops after it.
    pub fn close(&self) {
        let drained: Vec<Arc<Job>> = {
            let mut q = self.lock();
            if q.closed {
                return;
            }
            q.closed = true;
            if let Some(r) = &q.running {
                r.cancel.store(true, Ordering::Relaxed);
            }
            let drained: Vec<_> = q.waiting.drain(..).collect();
            for j in &drained {
                q.ids.remove(&j.id);
            }
            drained
        };
        self.wake.notify_all();
        for j in drained {
            j.send(shutting_down(0));
        }
    }

    /// The engine died: the job it was running ends with an error.
    fn abort_running(&self, message: String) {
        let job = self.lock().running.take();
        if let Some(job) = job {
            job.send(Event::Error {
                code: "engine_failed",
                message,
            });
        }
    }

    pub fn is_closed(&self) -> bool {
        self.lock().closed
    }

    /// Jobs waiting.
    pub fn depth(&self) -> usize {
        self.lock().waiting.len()
    }

    /// (waiting, running) jobs.
    pub fn load(&self) -> (usize, usize) {
        let q = self.lock();
        (q.waiting.len(), usize::from(q.running.is_some()))
    }
}

fn shutting_down(tokens: usize) -> Event {
    Event::Error {
        code: "shutting_down",
        message: format!("the server is shutting down (the job had generated {tokens} tokens)"),
    }
}

/// A submitted job as its handler holds it: dropping it (the client went away, or the stream
/// ended) cancels the job if it still runs and frees its place if it still waits.
pub struct Ticket {
    state: Arc<AppState>,
    pub job: Arc<Job>,
}

impl Ticket {
    pub fn new(state: Arc<AppState>, job: Arc<Job>) -> Self {
        Self { state, job }
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if self.state.queue.abandon(&self.job) {
            self.state.metrics.job_done("cancelled");
        }
    }
}

/// Starts the engine thread: it loads the model, then serves the queue until it is closed.
/// A load failure (or a panic) is recorded in `state.failed` and stops the server.
pub fn spawn(
    state: Arc<AppState>,
    path: Option<PathBuf>,
    device: DeviceKind,
    ctx: Option<usize>,
) -> Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name("engine".into())
        .spawn(move || {
            let job = EngineJob {
                state: state.clone(),
                path,
                ctx,
            };
            let r =
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| dispatch(device, job)))
                    .unwrap_or_else(|p| {
                        let what = p
                            .downcast_ref::<String>()
                            .cloned()
                            .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                            .unwrap_or_default();
                        Err(anyhow::anyhow!("the engine panicked: {what}"))
                    });
            if let Err(e) = &r {
                let msg = format!("{e:#}");
                eprintln!("cubeqwen serve: the engine stopped: {msg}");
                *state.failed.lock().unwrap_or_else(|e| e.into_inner()) = Some(msg.clone());
                state.queue.abort_running(msg);
                state.queue.close();
                state.stop.notify_one();
            }
        })
        .context("starting the engine thread")
}

struct EngineJob {
    state: Arc<AppState>,
    path: Option<PathBuf>,
    ctx: Option<usize>,
}

impl RuntimeJob for EngineJob {
    type Output = ();
    fn run<R: Runtime>(self, client: ComputeClient<R>, device: &str) -> Result<()> {
        let state = self.state;
        let path = match self.path {
            Some(p) => p,
            None => crate::fetch::default_model()?,
        };
        let t0 = Instant::now();
        let host = cubeqwen_loaders::load_model(&path)
            .with_context(|| format!("loading {}", path.display()))?;
        let tokenizer = Tokenizer::from_data(&host.tokenizer).context("building the tokenizer")?;
        let template = ChatTemplate::from_data(&host.tokenizer)?;
        let c = &host.config;
        let ctx = self.ctx.unwrap_or(4096.min(c.context_length));
        if ctx == 0 || ctx > c.context_length {
            bail!(
                "--ctx {ctx} is outside 1..={} (the model's context length)",
                c.context_length
            );
        }
        let kv_bytes = c.layers * 2 * c.n_kv_heads * ctx * c.head_dim * 2;
        let model = DeviceModel::upload(&client, &host, ctx)?;
        drop(host);
        let info = Arc::new(ModelInfo {
            tokenizer,
            template,
            ctx,
            device: device.to_string(),
            vram_bytes: model.upload_bytes + kv_bytes,
        });
        eprintln!(
            "cubeqwen serve: {} ready on {device} in {:.2?} (ctx {ctx}, {:.1} MB on the device)",
            state.model_name,
            t0.elapsed(),
            info.vram_bytes as f64 / 1e6
        );
        let _ = state.ready.set(info.clone());
        while let Some(job) = state.queue.next() {
            let last = run_job(&client, &model, &info, &state, &job);
            // Off the queue before the client hears the end, so its next request finds the
            // job_id free and the engine idle.
            state.queue.finish(&job);
            job.send(last);
        }
        Ok(())
    }
}

/// Runs `job`, sending its events but the last, which it returns.
fn run_job<R: Runtime>(
    client: &ComputeClient<R>,
    model: &DeviceModel<R>,
    info: &ModelInfo,
    state: &AppState,
    job: &Job,
) -> Event {
    let m = &state.metrics;
    if job.abandoned() {
        // Cancelled between leaving the queue and starting.
        m.job_done("cancelled");
        return Event::End(job.cancelled_summary());
    }
    let queue_time = job.accepted.elapsed();
    job.send(Event::Started {
        at_unix_ms: super::api::unix_millis(),
    });
    m.prompt_tokens.inc_by(job.req.prompt_ids.len() as u64);
    let mut on_token = |i: usize, text: &str| {
        job.send(Event::Token {
            i,
            text: text.to_string(),
        });
        if job.abandoned() {
            ControlFlow::Break(())
        } else {
            ControlFlow::Continue(())
        }
    };
    let result = Session::new(client, model, info.ctx)
        .and_then(|mut s| generate_with(client, &mut s, &info.tokenizer, &job.req, &mut on_token));
    match result {
        Ok(out) => {
            m.generated_tokens.inc_by(out.tokens.len() as u64);
            let summary = Summary {
                prompt_tokens: job.req.prompt_ids.len(),
                tokens_out: out.tokens.len(),
                stop_reason: out.stop_reason,
                queue_time,
                prefill_time: out.prefill_time,
                decode_time: out.decode_time,
            };
            m.record_speed(&summary);
            eprintln!(
                "job {}: {} prompt tokens, {} generated, stop: {}; prefill {:.2?} ({:.1} tok/s), decode {:.2?} ({:.2} tok/s)",
                job.id,
                summary.prompt_tokens,
                summary.tokens_out,
                summary.reason(),
                summary.prefill_time,
                summary.prefill_tps(),
                summary.decode_time,
                summary.decode_tps()
            );
            if out.stop_reason == StopReason::Cancelled && state.queue.is_closed() {
                m.job_done("error");
                shutting_down(summary.tokens_out)
            } else {
                m.job_done(summary.reason());
                Event::End(summary)
            }
        }
        Err(e) => {
            let message = format!("{e:#}");
            eprintln!("job {}: failed: {message}", job.id);
            m.job_done("error");
            Event::Error {
                code: "generation_failed",
                message,
            }
        }
    }
}
