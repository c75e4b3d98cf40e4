//! The reference against the project's golden outputs of Qwen2.5-Coder-0.5B-Instruct.
//!
//! Needs the GGUF at `$CUBEQWEN_MODEL` or `~/.cache/cubeqwen/qwen2.5-coder-0.5b-instruct.gguf`
//! (skipped with a message when absent). Runs in release builds only (ignored in debug, where
//! the f64 forward pass of a 0.5B model is far too slow):
//! `cargo test --release -p cubeqwen-reference --test golden -- --nocapture`.

mod common;

use std::path::PathBuf;

fn model_path() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("CUBEQWEN_MODEL") {
        return Some(PathBuf::from(p));
    }
    let home = std::env::var_os("HOME")?;
    Some(PathBuf::from(home).join(".cache/cubeqwen/qwen2.5-coder-0.5b-instruct.gguf"))
}

#[test]
#[cfg_attr(debug_assertions, ignore = "slow in debug builds: run with --release")]
fn golden_qwen25_coder_05b() -> anyhow::Result<()> {
    let Some(path) = model_path().filter(|p| p.exists()) else {
        eprintln!("golden: model file not found (set CUBEQWEN_MODEL); skipping");
        return Ok(());
    };
    let t = std::time::Instant::now();
    let host = cubeqwen_loaders::load_model(&path)?;
    let model = cubeqwen_reference::RefModel::new(&host)?;
    drop(host);
    println!("loaded {} in {:.2?}", path.display(), t.elapsed());
    common::check_all(&model)
}
