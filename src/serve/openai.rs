//! OpenAI's API: `POST /v1/chat/completions` (the model's own chat template),
//! `POST /v1/completions` (raw text) and `GET /v1/models`.
//!
//! With `stream: true` the answer is server-sent events, each `data:` a chunk
//! (`chat.completion.chunk` or `text_completion`), the last chunk with `finish_reason` and
//! `usage`, then `data: [DONE]`; `stream_options.include_usage` adds OpenAI's usage-only chunk
//! (`choices: []`) before `[DONE]`. Without it, one JSON object with `usage`.
//!
//! Defaults follow OpenAI: temperature 1, top_p 1, a fresh seed per request (give `seed` for
//! repeatable text); `max_tokens` 16 for completions and what the context leaves (at most
//! 4096) for chat. `top_k`, `min_p` and `repetition_penalty` are accepted as extensions. The
//! `model` field is not checked: one model is served. The response `id` is also the job's id
//! for `/cancel`.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};

use super::api::{self, ApiError, OneOrMany, SamplingFields};
use super::engine::{Event, Summary};
use super::execute::{encode_prompt, sse_response, submit};
use super::AppState;
use crate::chat::ChatMessage;
use crate::generate::Request;

/// OpenAI's default `max_tokens` for `/v1/completions`.
const COMPLETION_MAX_TOKENS: u64 = 16;

#[derive(Deserialize, Default)]
struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
}

/// The body of both endpoints (one struct, not flattened ones, so a wrong field is named):
/// chat needs `messages`, completions `prompt`.
#[derive(Deserialize)]
pub struct OpenAiRequest {
    messages: Option<Vec<Message>>,
    prompt: Option<OneOrMany>,
    max_completion_tokens: Option<u64>,
    stream: Option<bool>,
    stream_options: Option<StreamOptions>,
    max_tokens: Option<u64>,
    temperature: Option<f64>,
    top_p: Option<f64>,
    top_k: Option<u64>,
    min_p: Option<f64>,
    repetition_penalty: Option<f64>,
    seed: Option<u64>,
    stop: Option<OneOrMany>,
    n: Option<u64>,
}

#[derive(Deserialize)]
struct Message {
    role: String,
    content: Option<Content>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Content {
    Text(String),
    Parts(Vec<Part>),
}

#[derive(Deserialize)]
struct Part {
    #[serde(rename = "type")]
    kind: String,
    text: Option<String>,
}

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Chat,
    Text,
}

pub async fn chat_completions(
    State(st): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let mut r: OpenAiRequest = api::parse_json(body, st.max_body_bytes)?;
    let msgs = r.messages.take().unwrap_or_default();
    if msgs.is_empty() {
        return Err(ApiError::field("messages", "messages is missing or empty"));
    }
    let mut messages = Vec::with_capacity(msgs.len());
    for (i, m) in msgs.into_iter().enumerate() {
        if m.role.is_empty() {
            return Err(ApiError::field(
                &format!("messages[{i}].role"),
                "role is empty",
            ));
        }
        let content = match m.content {
            None => String::new(),
            Some(Content::Text(s)) => s,
            Some(Content::Parts(parts)) => {
                let mut s = String::new();
                for (j, p) in parts.into_iter().enumerate() {
                    match (p.kind.as_str(), p.text) {
                        ("text", Some(t)) => s.push_str(&t),
                        _ => {
                            return Err(ApiError::field(
                                &format!("messages[{i}].content[{j}]"),
                                "only parts of type \"text\" with a \"text\" are supported",
                            ))
                        }
                    }
                }
                s
            }
        };
        messages.push(ChatMessage::new(m.role, content));
    }
    let max_tokens = match r.max_completion_tokens.or(r.max_tokens) {
        Some(v) => Some(api::max_tokens(
            if r.max_completion_tokens.is_some() {
                "max_completion_tokens"
            } else {
                "max_tokens"
            },
            v,
        )?),
        None => None,
    };
    let info = st.model()?;
    let text = info
        .template
        .render(&messages, true)
        .map_err(|e| ApiError::field("messages", format!("{e:#}")))?;
    let prompt_ids = encode_prompt(&info, text, "messages").await?;
    // What the context leaves, at most MAX_TOKENS.
    let max_tokens =
        max_tokens.unwrap_or_else(|| (info.ctx - prompt_ids.len()).min(api::MAX_TOKENS as usize));
    run(&st, Kind::Chat, r, prompt_ids, max_tokens).await
}

pub async fn completions(
    State(st): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let mut r: OpenAiRequest = api::parse_json(body, st.max_body_bytes)?;
    let Some(prompt) = r.prompt.take() else {
        return Err(ApiError::field("prompt", "prompt is missing"));
    };
    let mut prompts = prompt.into_vec();
    if prompts.len() != 1 {
        return Err(ApiError::field(
            "prompt",
            format!("one prompt per request, got {}", prompts.len()),
        ));
    }
    let max_tokens = api::max_tokens("max_tokens", r.max_tokens.unwrap_or(COMPLETION_MAX_TOKENS))?;
    let info = st.model()?;
    let prompt_ids = encode_prompt(&info, prompts.remove(0), "prompt").await?;
    run(&st, Kind::Text, r, prompt_ids, max_tokens).await
}

pub async fn models(State(st): State<Arc<AppState>>) -> Json<Value> {
    Json(json!({
        "object": "list",
        "data": [{
            "id": st.model_name,
            "object": "model",
            "created": st.created_unix,
            "owned_by": "cubeqwen",
        }],
    }))
}

fn finish_reason(s: &Summary) -> &'static str {
    match s.reason() {
        "eos" | "stop" => "stop",
        other => other,
    }
}

fn usage(s: &Summary) -> Value {
    json!({
        "prompt_tokens": s.prompt_tokens,
        "completion_tokens": s.tokens_out,
        "total_tokens": s.prompt_tokens + s.tokens_out,
    })
}

async fn run(
    st: &Arc<AppState>,
    kind: Kind,
    c: OpenAiRequest,
    prompt_ids: Vec<u32>,
    max_tokens: usize,
) -> Result<Response, ApiError> {
    if c.n.unwrap_or(1) != 1 {
        return Err(ApiError::field("n", "only n = 1 is supported"));
    }
    let params = api::sampling(
        &SamplingFields {
            temperature: c.temperature,
            top_p: c.top_p,
            top_k: c.top_k,
            min_p: c.min_p,
            repetition_penalty: c.repetition_penalty,
            seed: c.seed,
        },
        1.0,
        rand::random(),
    )?;
    let req = Request {
        prompt_ids,
        max_tokens,
        params,
        stop: api::stop_strings(c.stop)?,
    };
    let n = st.next_id.fetch_add(1, Ordering::Relaxed);
    let id = match kind {
        Kind::Chat => format!("chatcmpl-{n}"),
        Kind::Text => format!("cmpl-{n}"),
    };
    let (ticket, mut rx) = submit(st, id.clone(), req)?;
    let created = api::unix_secs();
    let model = st.model_name.clone();
    let object = match kind {
        Kind::Chat => "chat.completion",
        Kind::Text => "text_completion",
    };

    if c.stream.unwrap_or(false) {
        let include_usage = c.stream_options.unwrap_or_default().include_usage;
        let chunk_object = match kind {
            Kind::Chat => "chat.completion.chunk",
            Kind::Text => "text_completion",
        };
        // One chunk with the given choice (or none, for the usage chunk).
        let chunk = move |choice: Option<Value>, usage: Option<Value>| {
            json!({
                "id": id, "object": chunk_object, "created": created, "model": model,
                "choices": choice.into_iter().collect::<Vec<_>>(),
                "usage": usage,
            })
        };
        let choice = move |text: Option<&str>, finish: Option<&str>| match kind {
            Kind::Chat => {
                let delta = match text {
                    Some(t) => json!({"content": t}),
                    None => json!({}),
                };
                json!({"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish})
            }
            Kind::Text => json!({
                "index": 0, "text": text.unwrap_or(""), "logprobs": null, "finish_reason": finish,
            }),
        };
        let first = match kind {
            Kind::Chat => vec![chunk(
                Some(json!({
                    "index": 0, "delta": {"role": "assistant", "content": ""},
                    "logprobs": null, "finish_reason": null,
                })),
                None,
            )],
            Kind::Text => Vec::new(),
        };
        let map = move |ev: Event| -> Vec<Value> {
            match ev {
                Event::Started { .. } => Vec::new(),
                Event::Token { text, .. } if text.is_empty() => Vec::new(),
                Event::Token { text, .. } => vec![chunk(Some(choice(Some(&text), None)), None)],
                Event::End(s) => {
                    let mut out = vec![chunk(
                        Some(choice(None, Some(finish_reason(&s)))),
                        Some(usage(&s)),
                    )];
                    if include_usage {
                        out.push(chunk(None, Some(usage(&s))));
                    }
                    out.push(Value::String("[DONE]".into()));
                    out
                }
                Event::Error { code, message } => vec![json!({"error": {
                    "message": message, "type": "server_error", "param": null, "code": code,
                }})],
            }
        };
        return Ok(sse_response(rx, ticket, first, map));
    }

    let mut text = String::new();
    let summary = loop {
        match rx.recv().await {
            Some(Event::Started { .. }) => {}
            Some(Event::Token { text: t, .. }) => text.push_str(&t),
            Some(Event::End(s)) => break s,
            Some(Event::Error { code, message }) => {
                let status = if code == "shutting_down" {
                    StatusCode::SERVICE_UNAVAILABLE
                } else {
                    StatusCode::INTERNAL_SERVER_ERROR
                };
                return Err(ApiError::new(status, code, None, message));
            }
            None => return Err(ApiError::internal("the job vanished")),
        }
    };
    drop(ticket);
    let choice = match kind {
        Kind::Chat => json!({
            "index": 0, "message": {"role": "assistant", "content": text},
            "logprobs": null, "finish_reason": finish_reason(&summary),
        }),
        Kind::Text => json!({
            "index": 0, "text": text, "logprobs": null, "finish_reason": finish_reason(&summary),
        }),
    };
    Ok(Json(json!({
        "id": id, "object": object, "created": created, "model": st.model_name,
        "choices": [choice], "usage": usage(&summary),
    }))
    .into_response())
}
