//! Text generation: prefill the prompt in one batched pass, then decode one token at a time,
//! streaming the text and ending on an end-of-sequence id, a stop string, the length limit or a
//! full context.

use std::ops::ControlFlow;
use std::time::{Duration, Instant};

use anyhow::{ensure, Result};
use cubecl::prelude::*;

use crate::forward::Session;
use crate::sampling::{Sampler, SamplingParams};
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

/// Checks that a prompt of `prompt_len` tokens leaves room to generate in a context of `ctx`
/// positions (`model_ctx`, the model's context length, is named in the error).
pub fn check_prompt_fits(prompt_len: usize, ctx: usize, model_ctx: usize) -> Result<()> {
    ensure!(
        prompt_len < ctx,
        "the prompt has {prompt_len} tokens, more than the context of {ctx} can hold with room to generate (raise --ctx, up to the model's {model_ctx})"
    );
    Ok(())
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
    check_prompt_fits(
        req.prompt_ids.len(),
        session.max_ctx,
        session.model.config.context_length,
    )?;
    let greedy = req.params.is_greedy() && !req.params.penalizes();
    let mut sampler = Sampler::new(req.params.clone())?;
    let mut stop = StopChecker::new(req.stop.clone());
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
            sample_next(client, session, &mut sampler, &history)?
        };
        if step == 0 {
            out.prefill_time = t0.elapsed();
        }
        step += 1;
        out.tokens.push(next);
        history.push(next);
        if tokenizer.is_eos(next) {
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
        session.decode(client)?;
    }
    if !matches!(
        out.stop_reason,
        StopReason::StopString | StopReason::Cancelled
    ) {
        let flushed = decoder.flush()?;
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

/// Draws the next token from the last logits of `session` with `sampler` (`history`: the ids
/// so far, for the repetition penalty) and makes it the token the next [`Session::decode`]
/// embeds. Where the settings allow ([`crate::sampling::SamplingParams::device_top_k`]) it draws
/// from the top-k found on the device, reading `k` candidates instead of the whole row.
pub fn sample_next<R: Runtime>(
    client: &ComputeClient<R>,
    session: &mut Session<'_, R>,
    sampler: &mut Sampler,
    history: &[u32],
) -> Result<u32> {
    let drawn = match sampler.params().device_top_k() {
        Some(k) => sampler.sample_top_k(&session.top_k(client, k)?),
        None => None,
    };
    let next = match drawn {
        Some(id) => id,
        None => sampler.sample(&session.read_logits(client)?, history),
    };
    session.set_token(client, next)?;
    Ok(next)
}

/// What [`StopChecker::push`] says about the text so far.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StopStatus {
    /// Go on; the string is text safe to show now (possibly empty while a possible stop
    /// string prefix is held back).
    Continue(String),
    /// A stop string was found: the string is the last text to show (everything before the stop
    /// string); generation ends.
    Stop(String),
}

/// Watches generated text for stop strings.
///
/// Feed each text piece (from a [`crate::tokenizer::StreamDecoder`]) to [`StopChecker::push`];
/// text that could be the beginning of a stop string is held back until it is known not to be
/// one, so a stop string is never shown. When generation ends without a stop string,
/// [`StopChecker::finish`] returns the held-back rest.
#[derive(Debug, Clone)]
pub struct StopChecker {
    stops: Vec<String>,
    /// Text received but not shown yet.
    pending: String,
}

impl StopChecker {
    /// `stop_strings`; empty ones are ignored.
    pub fn new(stop_strings: Vec<String>) -> Self {
        Self {
            stops: stop_strings.into_iter().filter(|s| !s.is_empty()).collect(),
            pending: String::new(),
        }
    }

    /// Adds a piece of generated text.
    pub fn push(&mut self, piece: &str) -> StopStatus {
        self.pending.push_str(piece);
        // A stop string cannot start in text already shown: its prefix would have been held back.
        let found = self
            .stops
            .iter()
            .filter_map(|s| self.pending.find(s.as_str()))
            .min();
        if let Some(pos) = found {
            let out = self.pending[..pos].to_string();
            self.pending.clear();
            return StopStatus::Stop(out);
        }
        let cut = self.pending.len() - self.held_suffix_len();
        StopStatus::Continue(self.pending.drain(..cut).collect())
    }

    /// Ends generation without a stop string: returns the held-back text.
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.pending)
    }

    /// Length of the longest suffix of `pending` that is a proper prefix of a stop string.
    fn held_suffix_len(&self) -> usize {
        self.pending
            .char_indices()
            .map(|(start, _)| &self.pending[start..])
            .find(|suffix| {
                self.stops
                    .iter()
                    .any(|s| s.len() > suffix.len() && s.starts_with(suffix))
            })
            .map_or(0, str::len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `pieces`; returns the text shown and whether a stop string ended it.
    fn drive(stops: &[&str], pieces: &[&str]) -> (String, bool) {
        let mut c = StopChecker::new(stops.iter().map(|s| s.to_string()).collect());
        let mut shown = String::new();
        for p in pieces {
            match c.push(p) {
                StopStatus::Continue(t) => {
                    // Never shows a whole stop string.
                    assert!(stops.iter().all(|s| s.is_empty() || !t.contains(s)));
                    shown.push_str(&t)
                }
                StopStatus::Stop(t) => {
                    shown.push_str(&t);
                    return (shown, true);
                }
            }
        }
        shown.push_str(&c.finish());
        (shown, false)
    }

    #[test]
    fn stop_strings_truncate_output() {
        assert_eq!(
            drive(&["STOP"], &["Hello ", "wor", "ld ST", "OP and more"]),
            ("Hello world ".to_string(), true)
        );
        // Split over many pieces and preceded by a false start.
        assert_eq!(
            drive(&["\n\n"], &["a", "\n", "b", "\n", "\n", "c"]),
            ("a\nb".to_string(), true)
        );
        // Held-back prefix released when it turns out not to be a stop string.
        let mut c = StopChecker::new(vec!["</end>".into()]);
        assert_eq!(c.push("x </e"), StopStatus::Continue("x ".into()));
        assert_eq!(c.push("nd"), StopStatus::Continue("".into()));
        assert_eq!(c.push("x"), StopStatus::Continue("</endx".into()));
        assert_eq!(c.finish(), "");
        // Earliest of several stop strings wins.
        assert_eq!(drive(&["bb", "a"], &["xxbba"]), ("xx".to_string(), true));
        // No stop: everything comes out, including a held-back tail at finish.
        assert_eq!(
            drive(&["STOP"], &["abc", " ST"]),
            ("abc ST".to_string(), false)
        );
        // Multi-byte text next to a partial match.
        assert_eq!(
            drive(&["東京!"], &["行く東", "京", "!後"]),
            ("行く".to_string(), true)
        );
        // Empty stop strings are ignored.
        assert_eq!(drive(&[""], &["abc"]), ("abc".to_string(), false));
    }

    #[test]
    fn prompt_must_leave_room_to_generate() {
        assert!(check_prompt_fits(15, 16, 32768).is_ok());
        let e = check_prompt_fits(16, 16, 32768).unwrap_err().to_string();
        assert!(e.contains("16 tokens") && e.contains("--ctx"), "{e}");
    }
}
