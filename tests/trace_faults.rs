//! The parity tracer catches real bugs: each fault injected into the device forward pass is
//! named as the first departing step, and a clean pass departs nowhere. The device runs the
//! prompt as generation does: a prefill in chunks, then one decode call per token
//! (teacher-forced), every step of every call captured; the reference prefills it all at once.
//!
//! Randomized: the model's seed is printed on failure; `CUBEQWEN_SEED=N` replays it.

use anyhow::Result;
use cubecl::prelude::*;
use cubeqwen::faults::Faults;
use cubeqwen::forward::Session;
use cubeqwen::model::DeviceModel;
use cubeqwen::trace::{
    compare, device_trace, first_departure, format_report, reference_trace, transpose_square_weight,
};
use cubeqwen_kernels::runtime::RuntimeJob;
use cubeqwen_kernels::testing::{fresh_seed, run_test};
use cubeqwen_loaders::{random_qwen2, small_gqa7_config, Qwen2Config};

/// Per-step relative error allowed. A clean pass measured on wgpu (lavapipe, seeds 1..=10):
/// worst step 2.8e-3 (always L2.swiglu or L2.down, f16 values of wide range); about 3x. The
/// faults depart by 7.9e-2 (the norm weight) to 1.4 (a transposed weight).
const TOL: f64 = 8e-3;
/// The sequence: `PREFILL` tokens prefilled in chunks of `CHUNK` (4 + 4 + 2), then the rest
/// decoded one by one.
const TOKENS: usize = 14;
const PREFILL: usize = 10;
const CHUNK: usize = 4;

fn config() -> Qwen2Config {
    small_gqa7_config(3, 300, false)
}

enum Fault {
    None,
    Device(Faults),
    Transpose(&'static str),
}

struct Case {
    fault: Fault,
    seed: u64,
}

/// The first departing step and the (position, column) of its largest difference.
type Departure = Option<(String, (usize, usize))>;

impl RuntimeJob for Case {
    type Output = Departure;
    fn run<R: Runtime>(self, client: ComputeClient<R>, _device: &str) -> Result<Departure> {
        let cfg = config();
        let host = random_qwen2(&cfg, self.seed);
        let ids: Vec<u32> = (0..TOKENS as u32)
            .map(|i| (i * 37 + 5) % cfg.vocab as u32)
            .collect();
        let expected = reference_trace(&host, &ids)?;
        let mut device_host = host.clone();
        let faults = match self.fault {
            Fault::None => Faults::default(),
            Fault::Device(f) => f,
            Fault::Transpose(name) => {
                transpose_square_weight(&mut device_host, name)?;
                Faults::default()
            }
        };
        // Two spare positions: the KV fault writes one past the end.
        let model = DeviceModel::upload(&client, &device_host, TOKENS + 2)?;
        let mut session = Session::new(&client, &model, TOKENS + 2)?;
        session.prefill_chunk = CHUNK;
        session.faults = faults;
        let got = device_trace(&client, &mut session, &ids, PREFILL)?;
        let reports = compare(&expected, &got, cfg.layers, None, TOL)?;
        print!("{}", format_report(&reports, TOL));
        Ok(first_departure(&reports).map(|r| (r.name.clone(), r.worst)))
    }
}

/// Runs the case with a fresh seed; the seed is in every failure message.
fn first(fault: Fault) -> (Departure, String) {
    let seed = fresh_seed();
    println!("seed {seed}");
    let got = run_test(Case { fault, seed });
    (
        got,
        format!("seed {seed}; replay with CUBEQWEN_SEED={seed}"),
    )
}

/// The faults `set` turns on.
fn on(set: fn(&mut Faults)) -> Faults {
    let mut f = Faults::default();
    set(&mut f);
    f
}

/// Asserts that `f` is first found at `step`, with its worst element at a position in `at`.
fn found_at(f: Faults, step: &str, at: std::ops::Range<usize>) {
    let (got, seed) = first(Fault::Device(f.clone()));
    let Some((name, (pos, _))) = got else {
        panic!("{f:?} was not found ({seed})")
    };
    assert_eq!(name, step, "{f:?} ({seed})");
    assert!(
        at.contains(&pos),
        "{f:?}: worst at position {pos}, not in {at:?} ({seed})"
    );
}

#[test]
fn clean_pass_departs_nowhere() {
    let (got, seed) = first(Fault::None);
    assert_eq!(got, None, "{seed}");
}

#[test]
fn rope_with_adjacent_pairs_is_found_at_q_rope() {
    found_at(on(|f| f.rope_adjacent_pairs = true), "L0.q_rope", 0..TOKENS);
}

#[test]
fn dropped_q_bias_is_found_at_q() {
    found_at(on(|f| f.drop_q_bias = true), "L0.q", 0..TOKENS);
}

#[test]
fn wrong_gqa_mapping_is_found_at_attn() {
    found_at(on(|f| f.wrong_gqa_mapping = true), "L0.attn", 0..TOKENS);
}

#[test]
fn wrong_attention_scale_is_found_at_attn() {
    found_at(
        on(|f| f.attention_scale_one_over_hd = true),
        "L0.attn",
        0..TOKENS,
    );
}

#[test]
fn missing_causal_mask_is_found_at_attn_in_the_prefill() {
    found_at(on(|f| f.no_causal_mask = true), "L0.attn", 0..PREFILL);
}

#[test]
fn norm_weight_off_by_one_is_found_in_layer_1() {
    found_at(
        on(|f| f.norm_weight_off_by_one = true),
        "L1.attn_norm",
        0..TOKENS,
    );
}

#[test]
fn swapped_gate_and_up_are_found_at_gate() {
    found_at(on(|f| f.swap_gate_up = true), "L0.gate", 0..TOKENS);
}

#[test]
fn dropped_residual_is_found_at_its_layer() {
    found_at(
        on(|f| f.drop_attn_residual = Some(2)),
        "L2.resid1",
        0..TOKENS,
    );
}

#[test]
fn kv_write_at_the_wrong_position_is_found_in_decode() {
    // The 2-token last prefill chunk writes where it should: only decode departs.
    let f = on(|f| f.kv_write_off_by_one = true);
    found_at(f, "L0.attn", PREFILL..TOKENS);
}

#[test]
fn chunk_boundary_off_by_one_is_found_after_the_first_chunk() {
    found_at(
        on(|f| f.chunk_start_off_by_one = true),
        "L0.q_rope",
        CHUNK..PREFILL,
    );
}

#[test]
fn transposed_weight_is_found_at_its_step() {
    for (name, step) in [
        ("blk.0.attn_output.weight", "L0.attn_out"),
        ("blk.1.attn_q.weight", "L1.q"),
    ] {
        let (got, seed) = first(Fault::Transpose(name));
        assert_eq!(got.map(|d| d.0).as_deref(), Some(step), "{name} ({seed})");
    }
}
