//! Text generation: prefill the prompt in one batched pass, then decode one token at a time.

use std::time::{Duration, Instant};

use anyhow::{ensure, Result};
use cubecl::prelude::*;

use crate::forward::Session;
use crate::sampling::{Sampler, SamplingParams, StopChecker, StopStatus};
use crate::tokenizer::Tokenizer;

#[derive(Debug, Clone)]
pub struct Request {
    pub prompt_ids: Vec<u32>,
    pub max_tokens: usize,
    pub params: SamplingParams,
    pub stop: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    /// An end-of-sequence id (151645 or 151643 for Qwen) was generated.
    Eos,
    /// A user stop string appeared.
    StopString,
    /// `max_tokens` were generated.
    Length,
    /// The context (`--ctx`) is full.
    Context,
}

impl StopReason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Eos => "eos",
            Self::StopString => "stop_string",
            Self::Length => "length",
            Self::Context => "context_full",
        }
    }
}

#[derive(Debug, Clone)]
pub struct Output {
    /// Generated ids, the end-of-sequence id included when generation stopped on one.
    pub tokens: Vec<u32>,
    pub text: String,
    pub stop_reason: StopReason,
    /// Top-1 minus top-2 logit at each greedy step (empty when sampling).
    pub margins: Vec<f32>,
    pub prefill_time: Duration,
    pub decode_time: Duration,
}

/// Generates from `req.prompt_ids` in a fresh `session`; `on_text` receives each piece of text
/// as soon as it is complete (never half a UTF-8 character, never part of a stop string).
pub fn generate<R: Runtime>(
    client: &ComputeClient<R>,
    session: &mut Session<'_, R>,
    tokenizer: &Tokenizer,
    req: &Request,
    on_text: &mut dyn FnMut(&str),
) -> Result<Output> {
    ensure!(!req.prompt_ids.is_empty(), "the prompt is empty");
    ensure!(session.len == 0, "generate needs a fresh session");
    ensure!(
        req.prompt_ids.len() < session.max_ctx,
        "the prompt has {} tokens but the context holds {} (raise --ctx, up to the model's {})",
        req.prompt_ids.len(),
        session.max_ctx,
        session.model.config.context_length
    );
    let greedy = req.params.is_greedy() && req.params.repeat_penalty == 1.0;
    let mut sampler = Sampler::new(req.params.clone())?;
    let eos = tokenizer.eos_ids();
    let mut stop = StopChecker::new(req.stop.clone(), eos.clone());
    let mut decoder = tokenizer.stream_decoder();
    let mut history = req.prompt_ids.clone();
    let mut out = Output {
        tokens: Vec::new(),
        text: String::new(),
        stop_reason: StopReason::Length,
        margins: Vec::new(),
        prefill_time: Duration::ZERO,
        decode_time: Duration::ZERO,
    };

    let t0 = Instant::now();
    session.prefill(client, &req.prompt_ids)?;
    let mut step = 0;
    loop {
        if step >= req.max_tokens {
            out.stop_reason = StopReason::Length;
            break;
        }
        // Greedy: the device already holds the next token; sampling replaces it.
        let next = if greedy {
            let top = session.top2(client)?;
            out.margins.push(top.first - top.second);
            top.id
        } else {
            let next = sampler.sample(&session.read_logits(client)?, &history);
            session.set_token(client, next)?;
            next
        };
        if step == 0 {
            out.prefill_time = t0.elapsed();
        }
        step += 1;
        out.tokens.push(next);
        history.push(next);
        if eos.contains(&next) {
            out.stop_reason = StopReason::Eos;
            break;
        }
        let piece = decoder.push(next)?;
        match stop.push(&piece) {
            StopStatus::Continue(s) => {
                on_text(&s);
                out.text.push_str(&s);
            }
            StopStatus::Stop(s) => {
                on_text(&s);
                out.text.push_str(&s);
                out.stop_reason = StopReason::StopString;
                break;
            }
        }
        if step >= req.max_tokens {
            out.stop_reason = StopReason::Length;
            break;
        }
        if session.len >= session.max_ctx {
            out.stop_reason = StopReason::Context;
            break;
        }
        session.decode(client)?;
    }
    if out.stop_reason != StopReason::StopString {
        let flushed = decoder.flush();
        let rest = match stop.push(&flushed) {
            StopStatus::Continue(s) => s + &stop.finish(),
            StopStatus::Stop(s) => {
                out.stop_reason = StopReason::StopString;
                s
            }
        };
        on_text(&rest);
        out.text.push_str(&rest);
    }
    out.decode_time = t0.elapsed().saturating_sub(out.prefill_time);
    Ok(out)
}
