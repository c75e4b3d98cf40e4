#![allow(dead_code)]
//! The `cubeqwen` binary run as a user runs it, for the command-line tests (`cli`, `bench_cli`).

use std::process::{Command, Output};

/// Runs the binary that cargo built for these tests with `args`.
pub fn cubeqwen(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_cubeqwen"))
        .args(args)
        .output()
        .expect("running cubeqwen")
}

/// `args` fail with a message on stderr that contains `needle`, and never with a panic.
pub fn fails_with(args: &[&str], needle: &str) {
    let out = cubeqwen(args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{args:?} succeeded");
    assert!(!stderr.contains("panicked"), "{args:?} panicked: {stderr}");
    assert!(
        stderr.contains(needle),
        "{args:?}: stderr lacks {needle:?}:\n{stderr}"
    );
}
