//! Bad input to the `cubeqwen` binary: a clear message on stderr and a non-zero exit, never a
//! panic. (No kernel runs here: every case is refused before the device is touched.)

mod common;

use common::cli::fails_with;

#[test]
fn missing_model_file() {
    fails_with(
        &[
            "generate",
            "--model",
            "/nonexistent/model.gguf",
            "--prompt",
            "hi",
        ],
        "does not exist",
    );
}

#[test]
fn file_that_is_not_a_model() {
    let p = std::env::temp_dir().join(format!("cq-not-a-model-{}.gguf", std::process::id()));
    std::fs::write(&p, b"this is not a GGUF file at all, just text").unwrap();
    fails_with(
        &["generate", "--model", p.to_str().unwrap(), "--prompt", "hi"],
        "magic",
    );
    std::fs::remove_file(&p).unwrap();
}

#[test]
fn non_qwen2_model() {
    // A valid GGUF whose architecture is llama.
    let p = std::env::temp_dir().join(format!("cq-llama-{}.gguf", std::process::id()));
    let mut w = cubeqwen_loaders::GgufWriter::new();
    w.set_str("general.architecture", "llama");
    w.write(&p).unwrap();
    fails_with(
        &["generate", "--model", p.to_str().unwrap(), "--prompt", "hi"],
        "llama",
    );
    std::fs::remove_file(&p).unwrap();
}

#[test]
fn empty_prompt() {
    let model = common::model::model_path();
    fails_with(
        &[
            "generate",
            "--model",
            model.to_str().unwrap(),
            "--prompt",
            "",
        ],
        "prompt is empty",
    );
}

#[test]
fn prompt_longer_than_the_context() {
    let model = common::model::model_path();
    let long = "word ".repeat(50);
    fails_with(
        &[
            "generate",
            "--model",
            model.to_str().unwrap(),
            "--prompt",
            &long,
            "--ctx",
            "16",
        ],
        "context",
    );
}

#[test]
fn context_past_the_model() {
    let model = common::model::model_path();
    fails_with(
        &[
            "generate",
            "--model",
            model.to_str().unwrap(),
            "--prompt",
            "hi",
            "--ctx",
            "999999",
        ],
        "--ctx",
    );
}

#[test]
fn conflicting_and_bad_flags() {
    fails_with(
        &["generate", "--prompt", "a", "--chat", "b"],
        "cannot be used with",
    );
    fails_with(
        &["generate", "--prompt", "a", "--temperature=-1"],
        "temperature",
    );
    fails_with(
        &["generate", "--prompt", "a", "--device", "tpu"],
        "unknown device",
    );
    fails_with(
        &["generate", "--prompt", "a", "--max-tokens", "0"],
        "max-tokens",
    );
}

#[test]
fn trace_with_bad_layers() {
    let model = common::model::model_path();
    fails_with(
        &[
            "trace",
            "--model",
            model.to_str().unwrap(),
            "--prompt",
            "hi",
            "--layers",
            "3..99",
        ],
        "layers",
    );
}
