//! The reference against the project's golden outputs of Qwen2.5-Coder-0.5B-Instruct.
//!
//! Needs the real model (see `common::model`); a release build (the README's test command),
//! since the f64 forward pass of a 0.5B model is slow in debug builds.

mod common;

#[test]
fn golden_qwen25_coder_05b() -> anyhow::Result<()> {
    let path = common::model::model_path();
    let t = std::time::Instant::now();
    let host = cubeqwen_loaders::load_model(&path)?;
    let model = cubeqwen::reference::RefModel::new(&host)?;
    drop(host);
    println!("loaded {} in {:.2?}", path.display(), t.elapsed());
    common::golden_ref::check_all(&model)
}
