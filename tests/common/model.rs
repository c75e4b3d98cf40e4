//! Where integration tests find the real model and the golden data.

use std::path::PathBuf;

/// The real model: `$CUBEQWEN_MODEL`, else `$CUBEQWEN_CACHE` (default `~/.cache/cubeqwen`) /
/// `qwen2.5-coder-0.5b-instruct.gguf`. Missing is a test failure, never a skip:
/// `bash scripts/fetch-model.sh` fetches it (`scripts/test.sh` does so itself).
#[allow(dead_code)]
pub fn model_path() -> PathBuf {
    let p = if let Some(p) = std::env::var_os("CUBEQWEN_MODEL") {
        PathBuf::from(p)
    } else {
        std::env::var_os("CUBEQWEN_CACHE")
            .map(PathBuf::from)
            .unwrap_or_else(|| {
                PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/cubeqwen")
            })
            .join("qwen2.5-coder-0.5b-instruct.gguf")
    };
    assert!(
        p.is_file(),
        "the real model is not at {} — run `bash scripts/fetch-model.sh` (or set CUBEQWEN_MODEL)",
        p.display()
    );
    p
}

/// Golden outputs of the real model, copied from the project's shared golden set into `tests/data/`.
#[allow(dead_code)]
pub fn golden_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data")
}
