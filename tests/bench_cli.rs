//! `cubeqwen bench` and `cubeqwen random-gguf` as a user runs them: a tiny random model on the
//! test device (`CUBEQWEN_TEST_DEVICE`), the real tokenizer carried into a random GGUF, and bad
//! input refused with a clear message (never a panic). Speed is never asserted.

mod common;

use common::cli::{cubeqwen, fails_with};
use std::path::Path;

fn ok(args: &[&str]) -> String {
    let out = cubeqwen(args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{args:?} failed:\n{stderr}");
    String::from_utf8(out.stdout).expect("utf-8 stdout")
}

fn device() -> String {
    std::env::var("CUBEQWEN_TEST_DEVICE").unwrap_or_else(|_| "auto".into())
}

/// Checks one `--format json` report: the tests asked for, `reps` positive finite samples
/// each, mean and sd consistent with them, a floor for decode tests only.
fn check_report(v: &serde_json::Value, names: &[&str], reps: usize) {
    let tests = v["tests"].as_array().expect("tests array");
    let got: Vec<&str> = tests.iter().map(|t| t["name"].as_str().unwrap()).collect();
    assert_eq!(got, names);
    assert!(
        v["copy_bandwidth"]["best_gbps"].as_f64().unwrap() > 0.0,
        "{v}"
    );
    assert!(v["decode_bytes_per_token"].as_u64().unwrap() > 0);
    for t in tests {
        let ts: Vec<f64> = t["samples_ts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap())
            .collect();
        assert_eq!(ts.len(), reps, "{t}");
        assert_eq!(t["samples_ns"].as_array().unwrap().len(), reps, "{t}");
        assert!(ts.iter().all(|x| x.is_finite() && *x > 0.0), "{t}");
        let mean = ts.iter().sum::<f64>() / reps as f64;
        assert!(
            (t["avg_ts"].as_f64().unwrap() - mean).abs() <= 1e-9 * mean,
            "{t}"
        );
        assert!(t["stddev_ts"].as_f64().unwrap() >= 0.0, "{t}");
        let decode = t["n_gen"].as_u64().unwrap() > 0;
        assert_eq!(t["floor_ts"].is_f64(), decode, "{t}");
    }
}

#[test]
fn bench_random_tiny_model_json_and_table() {
    let dev = device();
    let common = ["--random", "tiny", "--device", &dev, "--copy-mib", "1"];
    let json = ok(&[
        &[
            "bench", "-p", "8", "-n", "2", "-d", "0,4", "-r", "2", "--format", "json",
        ],
        &common[..],
    ]
    .concat());
    let v: serde_json::Value = serde_json::from_str(json.trim()).expect("one JSON object");
    check_report(&v, &["pp8", "tg2", "pp8 @ d4", "tg2 @ d4"], 2);
    assert_eq!(v["model"], "random tiny");
    assert_eq!(v["ctx"], 12);
    assert_eq!(v["config"]["vocab"], 151936);

    assert_eq!(v["sampled"], serde_json::Value::Null);
    // Sampled decode, from the device top-k and from the whole row.
    for on in ["device", "host"] {
        let args = [
            "bench", "-p", "0", "-n", "3", "-d", "0,4", "-r", "1", "--format", "json",
        ];
        let json = ok(&[&args[..], &["--sample", on], &common[..]].concat());
        let v: serde_json::Value = serde_json::from_str(json.trim()).expect("one JSON object");
        check_report(&v, &["tg3", "tg3 @ d4"], 1);
        assert_eq!(v["sampled"], on);
    }

    let md = ok(&[&["bench", "-p", "4", "-n", "0", "-r", "1"], &common[..]].concat());
    assert!(
        md.contains("| model | size | params | test | t/s | floor t/s |"),
        "{md}"
    );
    assert!(md.contains("| random tiny | "), "{md}");
    assert!(md.contains(" | pp4 | "), "{md}");
    assert!(!md.contains("tg"), "-n 0 still ran a decode test:\n{md}");
    assert!(md.contains("copy bandwidth"), "{md}");
}

#[test]
fn random_gguf_with_the_real_tokenizer_then_bench_on_it() {
    let dir = std::env::temp_dir().join(format!("cq-bench-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let real = common::model::model_path();
    let tok = dir.join("tok.gguf");
    let tok_s = tok.to_str().unwrap();
    ok(&[
        "random-gguf",
        "--tokenizer-only",
        "--tokenizer-from",
        real.to_str().unwrap(),
        tok_s,
    ]);
    let size = std::fs::metadata(&tok).unwrap().len();
    assert!(size < 10_000_000, "tokenizer-only file is {size} bytes");
    let real_tok = cubeqwen_loaders::load_tokenizer_data(&real).unwrap();
    assert_eq!(
        cubeqwen_loaders::load_tokenizer_data(&tok).unwrap(),
        real_tok
    );

    let model = dir.join("tiny.gguf");
    let model_s = model.to_str().unwrap();
    ok(&[
        "random-gguf",
        "--shape",
        "tiny",
        "--tokenizer-from",
        tok_s,
        model_s,
    ]);
    let m = cubeqwen_loaders::load_model(&model).unwrap();
    assert_eq!(m.config, cubeqwen_loaders::qwen25_config("tiny").unwrap());
    assert_eq!(m.tokenizer, real_tok);
    let w = m.tensor("blk.0.attn_q.weight").unwrap().data.to_f32();
    assert!(w.iter().filter(|x| **x != 0.0).count() > w.len() * 9 / 10);

    let dev = device();
    let json = ok(&[
        "bench",
        "--model",
        model_s,
        "-p",
        "4",
        "-n",
        "2",
        "-r",
        "1",
        "--device",
        &dev,
        "--copy-mib",
        "1",
        "-o",
        "json",
    ]);
    let v: serde_json::Value = serde_json::from_str(json.trim()).unwrap();
    check_report(&v, &["pp4", "tg2"], 1);
    assert_eq!(v["model"], "tiny.gguf");
    // A missing tokenizer file is named.
    fails_with(
        &[
            "random-gguf",
            "--shape",
            "tiny",
            "--tokenizer-from",
            "/nonexistent.gguf",
            model_s,
        ],
        "/nonexistent.gguf",
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn bench_bad_input() {
    let tiny = ["bench", "--random", "tiny", "--device", "wgpu"];
    let with = |extra: &[&'static str]| [&tiny[..], extra].concat();
    fails_with(&["bench", "--random", "3b"], "unknown model shape `3b`");
    fails_with(&with(&["-p", ""]), "-p: the list is empty");
    fails_with(&with(&["-d", "0,,4"]), "`` is not a token count");
    fails_with(&with(&["-n", "12x"]), "`12x` is not a token count");
    fails_with(&with(&["-r", "0"]), "at least one repetition");
    fails_with(&with(&["-p", "0", "-n", "0"]), "nothing to run");
    fails_with(
        &with(&["-p", "4000", "-d", "200"]),
        "pp4000 @ d200: depth 200 + 4000 tokens = 4200 is over the model's context length of 4096",
    );
    fails_with(
        &with(&["-p", "64", "-n", "16", "-d", "64", "--ctx", "100"]),
        "depth 64 + 64 tokens = 128 is over the context of 100",
    );
    fails_with(&with(&["--copy-mib", "0"]), "--copy-mib must be at least 1");
    fails_with(&with(&["--format", "csv"]), "invalid value 'csv'");
    fails_with(&with(&["--sample", "gpu"]), "invalid value 'gpu'");
    fails_with(&["bench"], "--model");
    fails_with(
        &["bench", "--random", "tiny", "--model", "x.gguf"],
        "cannot be used with",
    );
    fails_with(
        &["bench", "--model", "/nonexistent/model.gguf"],
        "does not exist",
    );
    let p = std::env::temp_dir().join(format!("cq-bench-not-gguf-{}", std::process::id()));
    std::fs::write(&p, b"not a GGUF file").unwrap();
    fails_with(&["bench", "--model", p.to_str().unwrap()], "magic");
    std::fs::remove_file(&p).unwrap();
}

#[test]
fn random_gguf_bad_input() {
    let out = std::env::temp_dir().join(format!("cq-rg-{}.gguf", std::process::id()));
    let out = out.to_str().unwrap();
    fails_with(
        &["random-gguf", "--shape", "13b", out],
        "unknown model shape `13b`",
    );
    fails_with(&["random-gguf", out], "--shape");
    fails_with(
        &["random-gguf", "--tokenizer-only", out],
        "--tokenizer-from",
    );
    fails_with(
        &[
            "random-gguf",
            "--shape",
            "0.5b",
            "--tokenizer-only",
            "--tokenizer-from",
            "x",
            out,
        ],
        "cannot be used with",
    );
    fails_with(
        &[
            "random-gguf",
            "--tokenizer-only",
            "--tokenizer-from",
            "/nonexistent.gguf",
            out,
        ],
        "/nonexistent.gguf",
    );
    fails_with(
        &[
            "random-gguf",
            "--shape",
            "tiny",
            "/nonexistent-dir/out.gguf",
        ],
        "/nonexistent-dir/out.gguf",
    );
    assert!(!Path::new(out).exists());
}
