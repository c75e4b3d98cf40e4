//! Decode through CUDA graphs (the recorder compiles cubecl's kernels itself and lays out their
//! arguments as cubecl does) against the same steps launched by cubecl: the logits and the
//! chosen tokens must be bit-identical, across an attention chunk boundary (a second graph, with
//! the merge kernel), with a sampled token written between steps, and after a cubecl prefill
//! that follows graph replays, and the sampling top-k computed in the step equal to the host's
//! top-k of its logits; on sm_90+ the graphs' kernels must overlap (programmatic
//! dependent launch), with the same bits. CUDA only: run by scripts/run-gpu.sh (--include-ignored).
#![cfg(feature = "cuda")]

use anyhow::{ensure, Result};
use cubecl::cuda::CudaRuntime;
use cubeqwen::forward::Session;
use cubeqwen::model::DeviceModel;
use cubeqwen_kernels::runtime::cuda_client;
use cubeqwen_kernels::select::top_k_reference;
use cubeqwen_kernels::testing::{fresh_seed, Rng};
use cubeqwen_loaders::{qwen25_config, random_qwen2, Qwen2Config};

/// Real Qwen2.5-0.5B widths (GQA 7, head_dim 64, the full vocabulary), fewer layers.
fn config() -> Qwen2Config {
    Qwen2Config {
        layers: 4,
        context_length: 4096,
        tied_embeddings: false,
        ..qwen25_config("0.5b").expect("a known shape")
    }
}

/// Logits and top-2 of each step: prefill, `steps` decode steps (every fifth token replaced, as
/// a sampler would), a second prefill after them, and two more steps.
fn run(
    client: &cubecl::prelude::ComputeClient<CudaRuntime>,
    model: &DeviceModel<CudaRuntime>,
    prompt: &[u32],
    steps: usize,
    graphs: bool,
) -> Result<Vec<(Vec<f32>, u32)>> {
    let mut s = Session::new(client, model, 1024)?;
    s.use_graphs = graphs;
    let out = steps_of(client, &mut s, prompt, steps)?;
    if graphs && hopper()? && !cubeqwen_kernels::switches::switches()?.no_pdl {
        // The kernels' grid-dependency markers survived cubecl's compiler: their launches
        // overlap (a marker lost would leave every launch serialised, and this at 0).
        ensure!(
            s.programmatic_launches() > 0,
            "no decode kernel was launched with programmatic dependent launch on sm_90+"
        );
    }
    Ok(out)
}

/// Whether the GPU is sm_90 or newer (programmatic dependent launch).
fn hopper() -> Result<bool> {
    use cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR;
    let ctx = cudarc::driver::CudaContext::new(0)?;
    Ok(ctx.attribute(CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)? >= 9)
}

fn steps_of(
    client: &cubecl::prelude::ComputeClient<CudaRuntime>,
    s: &mut Session<'_, CudaRuntime>,
    prompt: &[u32],
    steps: usize,
) -> Result<Vec<(Vec<f32>, u32)>> {
    let mut out = Vec::new();
    s.prefill(client, prompt)?;
    for i in 0..steps {
        let top = s.top2(client)?;
        // The sampling top-k, read before the logits (from the graph's stream), with k
        // changing on the way (a graph per k): the host's top-k of the same logits.
        let k = if (6..9).contains(&i) { 8 } else { 40 };
        let top_k = s.top_k(client, k)?;
        let logits = s.read_logits(client)?;
        ensure!(
            top_k == top_k_reference(&logits, k),
            "step {i}: the device top-{k} is not the top-{k} of the logits"
        );
        out.push((logits, top.id));
        if i % 5 == 4 {
            s.set_token(client, (top.id + 7) % 151936)?;
        }
        s.decode(client)?;
    }
    // cubecl work after graph replays, then graphs again.
    s.prefill(client, &prompt[..3])?;
    out.push((s.read_logits(client)?, s.top2(client)?.id));
    for _ in 0..2 {
        s.decode(client)?;
        out.push((s.read_logits(client)?, s.top2(client)?.id));
    }
    Ok(out)
}

#[test]
#[ignore = "needs CUDA: run on the GPU machine by scripts/run-gpu.sh"]
fn graph_decode_equals_cubecl_decode() -> Result<()> {
    let (client, device) = cuda_client()?;
    let seed = fresh_seed();
    println!("test device: {device}; seed {seed}");
    let host = random_qwen2(&config(), seed);
    let model = DeviceModel::upload(&client, &host, 1024)?;
    let mut rng = Rng::new(seed);
    // Prompt and steps cross an attention chunk boundary (a second graph is captured).
    let n = 2 * cubeqwen_kernels::decode::ATT_CHUNK - 6;
    let prompt: Vec<u32> = (0..n).map(|_| (rng.next_u64() % 151936) as u32).collect();
    let graph = run(&client, &model, &prompt, 12, true)?;
    let plain = run(&client, &model, &prompt, 12, false)?;
    ensure!(graph.len() == plain.len(), "step counts differ");
    for (i, ((gl, gi), (pl, pi))) in graph.iter().zip(&plain).enumerate() {
        ensure!(
            gi == pi,
            "step {i}: graph chose {gi}, cubecl {pi} (seed {seed})"
        );
        let differ = gl
            .iter()
            .zip(pl)
            .filter(|(a, b)| a.to_bits() != b.to_bits())
            .count();
        ensure!(
            differ == 0 && gl.iter().all(|v| v.is_finite()),
            "step {i}: {differ} of {} logits differ between graph and cubecl (seed {seed})",
            gl.len()
        );
    }
    println!(
        "{} steps: graph and cubecl decode bit-identical",
        graph.len()
    );
    Ok(())
}
