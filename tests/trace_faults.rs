//! The parity tracer catches real bugs: each fault injected into the device forward pass is
//! named as the first departing step, and a clean pass departs nowhere.

use anyhow::Result;
use cubecl::prelude::*;
use cubeqwen::forward::Faults;
use cubeqwen::model::DeviceModel;
use cubeqwen::trace::{
    compare, device_trace, first_departure, format_report, reference_trace, transpose_square_weight,
};
use cubeqwen_kernels::runtime::RuntimeJob;
use cubeqwen_kernels::testing::{fresh_seed, run_test};
use cubeqwen_loaders::{random_qwen2, Qwen2Config};

const TOL: f64 = 1e-2;

fn config() -> Qwen2Config {
    Qwen2Config {
        hidden: 224,
        layers: 2,
        n_heads: 14,
        n_kv_heads: 2,
        head_dim: 16,
        ffn: 384,
        vocab: 300,
        rope_theta: 1_000_000.0,
        rms_eps: 1e-6,
        context_length: 4096,
        tied_embeddings: false,
    }
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

impl RuntimeJob for Case {
    type Output = Option<String>;
    fn run<R: Runtime>(self, client: ComputeClient<R>, _device: &str) -> Result<Option<String>> {
        let cfg = config();
        let host = random_qwen2(&cfg, self.seed);
        let ids: Vec<u32> = (0..9).map(|i| (i * 37 + 5) % cfg.vocab as u32).collect();
        let expected = reference_trace(&host, &ids)?;
        let (mut device_host, faults) = (host.clone(), Faults::default());
        let faults = match self.fault {
            Fault::None => faults,
            Fault::Device(f) => f,
            Fault::Transpose(name) => {
                transpose_square_weight(&mut device_host, name)?;
                faults
            }
        };
        let model = DeviceModel::upload(&client, &device_host, 64)?;
        let got = device_trace(&client, &model, &ids, faults)?;
        let reports = compare(&expected, &got, cfg.layers, None, TOL)?;
        print!("{}", format_report(&reports, TOL));
        Ok(first_departure(&reports).map(|r| r.name.clone()))
    }
}

fn first(fault: Fault) -> Option<String> {
    run_test(Case {
        fault,
        seed: fresh_seed(),
    })
}

#[test]
fn clean_pass_departs_nowhere() {
    assert_eq!(first(Fault::None), None);
}

#[test]
fn rope_with_adjacent_pairs_is_found_at_q_rope() {
    let f = Faults {
        rope_adjacent_pairs: true,
        ..Faults::default()
    };
    assert_eq!(first(Fault::Device(f)).as_deref(), Some("L0.q_rope"));
}

#[test]
fn dropped_q_bias_is_found_at_q() {
    let f = Faults {
        drop_q_bias: true,
        ..Faults::default()
    };
    assert_eq!(first(Fault::Device(f)).as_deref(), Some("L0.q"));
}

#[test]
fn wrong_gqa_mapping_is_found_at_attn() {
    let f = Faults {
        wrong_gqa_mapping: true,
        ..Faults::default()
    };
    assert_eq!(first(Fault::Device(f)).as_deref(), Some("L0.attn"));
}

#[test]
fn transposed_weight_is_found_at_its_step() {
    assert_eq!(
        first(Fault::Transpose("blk.0.attn_output.weight")).as_deref(),
        Some("L0.attn_out")
    );
    assert_eq!(
        first(Fault::Transpose("blk.1.attn_q.weight")).as_deref(),
        Some("L1.q")
    );
}
