//! The worker protocol: `POST /execute` streams a job's events, `POST /cancel` stops one.
//!
//! Every event's `data:` is one JSON object with a `type`:
//! `{"type":"started","job_id","model","started_at"}` (unix milliseconds) when the engine
//! begins the job, `{"type":"token","t","i"}` per generated token (`t` the text it completed,
//! possibly empty while a multi-byte character or a possible stop string is held back; `i` the
//! token's index from 0; held-back text that is released at the end comes with the last index),
//! `{"type":"metrics",...}` with the job's speeds, then exactly one of
//! `{"type":"end","tokens_out","decode_time_ms","stop_reason",...}` (`eos`, `length`, `stop`,
//! `cancelled`) and `{"type":"error","code","message"}`. A job that ends while still queued
//! (cancelled, or the server shutting down) sends only its terminal event.

use std::convert::Infallible;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::sse::{self, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures_util::stream::{self, Stream};
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::mpsc;

use super::api::{self, ApiError, OneOrMany, SamplingFields};
use super::engine::{CancelOutcome, Event, ModelInfo, SubmitError, Ticket};
use super::AppState;
use crate::generate::Request;

/// How often an idle stream sends an SSE comment, so a client that went away is noticed.
const KEEP_ALIVE: Duration = Duration::from_secs(2);
/// Longest `job_id`, in bytes.
const MAX_JOB_ID: usize = 128;
/// `max_tokens` when the request gives none (as `cubeqwen generate`).
const DEFAULT_MAX_TOKENS: u64 = 256;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExecuteRequest {
    job_id: Option<String>,
    prompt: String,
    max_tokens: Option<u64>,
    temperature: Option<f64>,
    top_p: Option<f64>,
    top_k: Option<u64>,
    min_p: Option<f64>,
    repetition_penalty: Option<f64>,
    seed: Option<u64>,
    stop: Option<OneOrMany>,
}

pub async fn execute(
    State(st): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let r: ExecuteRequest = api::parse_json(body, st.max_body_bytes)?;
    let job_id = match r.job_id {
        Some(id) if id.is_empty() || id.len() > MAX_JOB_ID || id.chars().any(char::is_control) => {
            return Err(ApiError::field(
                "job_id",
                format!("job_id must be 1..={MAX_JOB_ID} bytes without control characters"),
            ))
        }
        Some(id) => id,
        None => format!("job-{}", st.next_id.fetch_add(1, Ordering::Relaxed)),
    };
    // Defaults as `cubeqwen generate`: greedy, seed 0.
    let params = api::sampling(
        &SamplingFields {
            temperature: r.temperature,
            top_p: r.top_p,
            top_k: r.top_k,
            min_p: r.min_p,
            repetition_penalty: r.repetition_penalty,
            seed: r.seed,
        },
        0.0,
        0,
    )?;
    let max_tokens = api::max_tokens("max_tokens", r.max_tokens.unwrap_or(DEFAULT_MAX_TOKENS))?;
    let stop = api::stop_strings(r.stop)?;
    let info = st.model()?;
    let prompt_ids = encode_prompt(&info, r.prompt, "prompt").await?;
    let req = Request {
        prompt_ids,
        max_tokens,
        params,
        stop,
    };
    let (ticket, rx) = submit(&st, job_id.clone(), req)?;
    let model = st.model_name.clone();
    let map = move |ev: Event| -> Vec<Value> {
        match ev {
            Event::Started { at_unix_ms } => vec![json!({
                "type": "started", "job_id": job_id, "model": model, "started_at": at_unix_ms,
            })],
            Event::Token { i, text } => vec![json!({"type": "token", "t": text, "i": i})],
            Event::End(s) => {
                let ms = |d: Duration| d.as_secs_f64() * 1e3;
                let mut out = Vec::new();
                if s.tokens_out > 0 {
                    out.push(json!({
                        "type": "metrics",
                        "tokens_per_sec": s.decode_tps(),
                        "prefill_tokens_per_sec": s.prefill_tps(),
                        "prompt_tokens": s.prompt_tokens,
                        "queue_time_ms": ms(s.queue_time),
                        "prefill_time_ms": ms(s.prefill_time),
                    }));
                }
                out.push(json!({
                    "type": "end",
                    "job_id": job_id,
                    "tokens_out": s.tokens_out,
                    "prompt_tokens": s.prompt_tokens,
                    "prefill_time_ms": ms(s.prefill_time),
                    "decode_time_ms": ms(s.decode_time),
                    "stop_reason": s.reason(),
                }));
                out
            }
            Event::Error { code, message } => vec![json!({
                "type": "error", "job_id": job_id, "code": code, "message": message,
            })],
        }
    };
    Ok(sse_response(rx, ticket, Vec::new(), map))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CancelRequest {
    job_id: String,
}

pub async fn cancel(
    State(st): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, ApiError> {
    let r: CancelRequest = api::parse_json(body, st.max_body_bytes)?;
    let was = match st.queue.cancel(&r.job_id) {
        CancelOutcome::Queued => {
            st.metrics.job_done("cancelled");
            "queued"
        }
        CancelOutcome::Running => "running",
        CancelOutcome::NotFound => {
            return Err(ApiError::not_found(
                "job_id",
                format!("no queued or running job has job_id {:?}", r.job_id),
            ))
        }
    };
    Ok(Json(
        json!({"job_id": r.job_id, "cancelled": true, "state": was}),
    ))
}

/// Tokenizes a prompt off the async threads; an empty prompt or one that leaves no room in the
/// context is a 400 on `field`.
pub async fn encode_prompt(
    info: &Arc<ModelInfo>,
    text: String,
    field: &str,
) -> Result<Vec<u32>, ApiError> {
    if text.is_empty() {
        return Err(ApiError::field(field, format!("{field} is empty")));
    }
    let i = info.clone();
    let ids = tokio::task::spawn_blocking(move || i.tokenizer.encode(&text))
        .await
        .map_err(|e| ApiError::internal(format!("tokenizing: {e}")))?
        .map_err(|e| ApiError::field(field, format!("{e:#}")))?;
    if ids.is_empty() {
        return Err(ApiError::field(field, format!("{field} has no tokens")));
    }
    if ids.len() >= info.ctx {
        return Err(ApiError::field(
            field,
            format!(
                "{field} has {} tokens but the context holds {} with room to generate (--ctx)",
                ids.len(),
                info.ctx
            ),
        ));
    }
    Ok(ids)
}

/// Queues a job; a full queue or a shutting-down server is 503, a job_id in use 409.
pub fn submit(
    st: &Arc<AppState>,
    id: String,
    req: Request,
) -> Result<(Ticket, mpsc::UnboundedReceiver<Event>), ApiError> {
    let (tx, rx) = mpsc::unbounded_channel();
    let job = st.queue.submit(id.clone(), req, tx).map_err(|e| match e {
        SubmitError::Full => {
            ApiError::unavailable("queue_full", "the queue is full (see --queue); retry later")
        }
        SubmitError::Duplicate => ApiError::new(
            StatusCode::CONFLICT,
            "duplicate_job_id",
            Some("job_id"),
            format!("a job with job_id {id:?} is already queued or running"),
        ),
        SubmitError::Closed => {
            ApiError::unavailable("shutting_down", "the server is shutting down")
        }
    })?;
    Ok((Ticket::new(st.clone(), job), rx))
}

/// The SSE response of a job: `first`, then `map` of each event (each value one `data:` line;
/// a string is sent as is), ending after the terminal event. Dropping the response (the client
/// went away) drops the ticket, which stops the job.
pub fn sse_response<F>(
    rx: mpsc::UnboundedReceiver<Event>,
    ticket: Ticket,
    first: Vec<Value>,
    map: F,
) -> Response
where
    F: FnMut(Event) -> Vec<Value> + Send + 'static,
{
    Sse::new(job_stream(rx, ticket, first, map))
        .keep_alive(KeepAlive::new().interval(KEEP_ALIVE))
        .into_response()
}

fn job_stream<F>(
    rx: mpsc::UnboundedReceiver<Event>,
    ticket: Ticket,
    first: Vec<Value>,
    map: F,
) -> impl Stream<Item = Result<sse::Event, Infallible>> + Send + 'static
where
    F: FnMut(Event) -> Vec<Value> + Send + 'static,
{
    struct St<F> {
        rx: mpsc::UnboundedReceiver<Event>,
        _ticket: Ticket,
        map: F,
        pending: std::collections::VecDeque<Value>,
        done: bool,
    }
    let st = St {
        rx,
        _ticket: ticket,
        map,
        pending: first.into(),
        done: false,
    };
    stream::unfold(st, |mut st| async move {
        loop {
            if let Some(v) = st.pending.pop_front() {
                let data = match v {
                    Value::String(s) => s,
                    v => v.to_string(),
                };
                return Some((Ok(sse::Event::default().data(data)), st));
            }
            if st.done {
                return None;
            }
            // The ticket keeps the job (and its sender) alive, so `None` cannot come first;
            // should it, the stream still ends with an error event.
            let ev = st.rx.recv().await.unwrap_or(Event::Error {
                code: "internal_error",
                message: "the job vanished".into(),
            });
            st.done = ev.is_terminal();
            let values = (st.map)(ev);
            st.pending.extend(values);
        }
    })
}
