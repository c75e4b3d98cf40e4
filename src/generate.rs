//! Text generation: prefill the prompt in one batched pass, then decode one token at a time.

use std::ops::ControlFlow;
use std::time::{Duration, Instant};

use anyhow::{ensure, Result};
use cubecl::prelude::*;
use cubeqwen_kernels::select::top_k;

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
    /// The caller's callback asked to stop (see [`generate_with`]).
    Cancelled,
}

impl StopReason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Eos => "eos",
            Self::StopString => "stop_string",
            Self::Length => "length",
            Self::Context => "context_full",
            Self::Cancelled => "cancelled",
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
    generate_with(client, session, tokenizer, req, &mut |_, s| {
        on_text(s);
        ControlFlow::Continue(())
    })
}

/// [`generate`] with a per-token callback: `on_token(i, text)` is called once after every
/// generated token but an end-of-sequence one, with the token's index `i` (from 0) and the text
/// it completed (possibly empty); text held back until the end comes in one more call with the
/// index of the last such token. Returning `Break` stops generation with [`StopReason::Cancelled`] (held-back
/// text is then dropped).
pub fn generate_with<R: Runtime>(
    client: &ComputeClient<R>,
    session: &mut Session<'_, R>,
    tokenizer: &Tokenizer,
    req: &Request,
    on_token: &mut dyn FnMut(usize, &str) -> ControlFlow<()>,
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
    let mut logits = session.forward(client, &req.prompt_ids, None)?;
    let mut step = 0;
    loop {
        if step >= req.max_tokens {
            out.stop_reason = StopReason::Length;
            break;
        }
        let next = if greedy {
            let (ids, vals) = top_k(client, &logits, 2)?;
            let (ids, vals) = (ids.to_vec(client)?, vals.to_vec(client)?);
            out.margins.push(vals[0] - vals[1]);
            ids[0]
        } else {
            sampler.sample(&logits.to_vec(client)?, &history)
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
                out.text.push_str(&s);
                if on_token(step - 1, &s).is_break() {
                    out.stop_reason = StopReason::Cancelled;
                    break;
                }
            }
            StopStatus::Stop(s) => {
                let _ = on_token(step - 1, &s);
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
        logits = session.forward(client, &[next], None)?;
    }
    if !matches!(
        out.stop_reason,
        StopReason::StopString | StopReason::Cancelled
    ) {
        let flushed = decoder.flush();
        let rest = match stop.push(&flushed) {
            StopStatus::Continue(s) => s + &stop.finish(),
            StopStatus::Stop(s) => {
                out.stop_reason = StopReason::StopString;
                s
            }
        };
        if !rest.is_empty() {
            // The index of the last token that was not an end-of-sequence id.
            let eos = usize::from(out.stop_reason == StopReason::Eos);
            let _ = on_token(step.saturating_sub(1 + eos), &rest);
            out.text.push_str(&rest);
        }
    }
    out.decode_time = t0.elapsed().saturating_sub(out.prefill_time);
    Ok(out)
}
