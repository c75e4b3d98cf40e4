//! The haiku check on the real model, on the test device (wgpu in CI).
//!
//! Chat prompt: Write a haiku about GPU computing that includes the word "W", W = the current
//! minute in English. Greedy. The device's ids must equal the f64 reference's, token for token,
//! up to (not including) the first step where the reference's top-2 logit margin is below
//! MARGIN (0.1: below it f16 rounding may legitimately flip the choice). The device run must
//! stop on an end-of-sequence id, and no token 4-gram may occur more than twice.

mod common;

use anyhow::{ensure, Result};
use cubecl::prelude::*;
use cubeqwen::chat::render_user_prompt;
use cubeqwen::forward::Session;
use cubeqwen::generate::{generate, Request, StopReason};
use cubeqwen::haiku::{current_minute, max_4gram_repeats, minute_word, prompt};
use cubeqwen::model::DeviceModel;
use cubeqwen::reference::{greedy, RefModel};
use cubeqwen::sampling::SamplingParams;
use cubeqwen::tokenizer::Tokenizer;
use cubeqwen_kernels::runtime::RuntimeJob;
use cubeqwen_kernels::testing::run_test;

const MARGIN: f64 = 0.1;
const MAX_NEW: usize = 96;

struct Haiku;

impl RuntimeJob for Haiku {
    type Output = ();
    fn run<R: Runtime>(self, client: ComputeClient<R>, device: &str) -> Result<()> {
        let word =
            std::env::var("CUBEQWEN_HAIKU_WORD").unwrap_or_else(|_| minute_word(current_minute()));
        let host = cubeqwen_loaders::load_model(&common::model::model_path())?;
        let tokenizer = Tokenizer::from_data(&host.tokenizer)?;
        let ids = tokenizer.encode(&render_user_prompt(&host.tokenizer, &prompt(&word))?)?;

        let t0 = std::time::Instant::now();
        let model = DeviceModel::upload(&client, &host, 512)?;
        let mut session = Session::new(&client, &model, 512)?;
        let req = Request {
            prompt_ids: ids.clone(),
            max_tokens: MAX_NEW,
            params: SamplingParams::greedy(),
            stop: vec![],
        };
        let out = generate(&client, &mut session, &tokenizer, &req, &mut |_| {})?;
        let device_time = t0.elapsed();
        drop(session);
        drop(model);

        let t1 = std::time::Instant::now();
        let reference = RefModel::new(&host)?;
        drop(host);
        let (ref_ids, ref_margins) =
            greedy(&reference, &ids, out.tokens.len(), &tokenizer.eos_ids())?;
        let ref_time = t1.elapsed();

        // Steps before the first near-tie must match; the near-tie step itself may flip.
        let trusted = ref_margins
            .iter()
            .position(|&m| m < MARGIN)
            .unwrap_or(ref_ids.len());
        let same = out
            .tokens
            .iter()
            .zip(&ref_ids)
            .take_while(|(a, b)| a == b)
            .count();
        println!("word: {word:?}; device {device} ({device_time:.1?}), reference ({ref_time:.1?})");
        println!("haiku: {:?}", out.text);
        println!(
            "{} generated, stop: {}; ids equal to the reference for {same} steps (required: {}; first margin < {MARGIN} at step {:?})",
            out.tokens.len(),
            out.stop_reason.as_str(),
            trusted.min(out.tokens.len()),
            ref_margins.iter().position(|&m| m < MARGIN)
        );
        println!(
            "the word {word:?} appears: {}",
            out.text.to_lowercase().contains(&word.to_lowercase())
        );
        ensure!(
            same >= trusted.min(out.tokens.len()),
            "device ids depart from the reference at step {same}"
        );
        ensure!(
            out.stop_reason == StopReason::Eos,
            "the model did not stop on EOS within {MAX_NEW} tokens"
        );
        let reps = max_4gram_repeats(&out.tokens);
        ensure!(reps <= 2, "a token 4-gram repeats {reps} times");
        Ok(())
    }
}

#[test]
fn haiku_matches_reference_and_stops() {
    run_test(Haiku);
}
