//! Dequantization compared bit-exactly with llama.cpp's Python `gguf` package
//! (fixtures made by `tests/fixtures/make_fixtures.py`: real-model blocks and random blocks).

use cubeqwen_loaders::quant::{dequantize, dequantize_to_f16, GgmlType};
use half::f16;
use std::path::PathBuf;

fn fixture_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

struct Fixture {
    name: String,
    ty: GgmlType,
    raw: Vec<u8>,
    expected: Vec<f32>,
}

fn fixtures() -> Vec<Fixture> {
    let dir = fixture_dir();
    let manifest = std::fs::read_to_string(dir.join("manifest.txt")).expect("manifest.txt");
    manifest
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            let ty = GgmlType::from_name(f[1]).unwrap_or_else(|| panic!("type {}", f[1]));
            let n: usize = f[2].parse().unwrap();
            let raw = std::fs::read(dir.join(format!("{}.raw", f[0]))).unwrap();
            let expected: Vec<f32> = std::fs::read(dir.join(format!("{}.f32", f[0])))
                .unwrap()
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
                .collect();
            assert_eq!(expected.len(), n, "{line}");
            Fixture {
                name: f[0].to_string(),
                ty,
                raw,
                expected,
            }
        })
        .collect()
}

#[test]
fn manifest_covers_every_type_of_the_real_model_and_the_extra_types() {
    let names: Vec<String> = fixtures().into_iter().map(|f| f.name).collect();
    for want in [
        "real_q4_k",
        "real_q5_0",
        "real_q6_k",
        "real_q8_0",
        "real_f32",
        "random_q4_0",
        "random_q5_k",
        "random_bf16",
        "random_f16",
    ] {
        assert!(names.iter().any(|n| n == want), "missing fixture {want}");
    }
}

#[test]
fn dequantize_matches_gguf_py_bit_exactly() {
    for f in fixtures() {
        assert!(f.expected.iter().any(|&x| x != 0.0), "{}: all zero", f.name);
        let mut got = vec![f32::NAN; f.expected.len()];
        dequantize(f.ty, &f.raw, &mut got).unwrap_or_else(|e| panic!("{}: {e:#}", f.name));
        for (i, (g, e)) in got.iter().zip(&f.expected).enumerate() {
            assert_eq!(
                g.to_bits(),
                e.to_bits(),
                "{} ({}): element {i}: got {g}, gguf-py {e}",
                f.name,
                f.ty
            );
        }
    }
}

#[test]
fn dequantize_to_f16_is_f32_then_round_to_nearest_even() {
    for f in fixtures() {
        let mut got = vec![f16::NAN; f.expected.len()];
        dequantize_to_f16(f.ty, &f.raw, &mut got).unwrap();
        for (i, (g, e)) in got.iter().zip(&f.expected).enumerate() {
            assert_eq!(
                g.to_bits(),
                f16::from_f32(*e).to_bits(),
                "{}: element {i}",
                f.name
            );
        }
    }
}

#[test]
fn a_flipped_bit_changes_the_result() {
    // Guards against a comparison that cannot fail: corrupt one quant byte, expect a mismatch.
    let f = fixtures()
        .into_iter()
        .find(|f| f.name == "real_q4_k")
        .unwrap();
    let mut raw = f.raw.clone();
    raw[20] ^= 0x11;
    let mut got = vec![0f32; f.expected.len()];
    dequantize(f.ty, &raw, &mut got).unwrap();
    assert!(got
        .iter()
        .zip(&f.expected)
        .any(|(g, e)| g.to_bits() != e.to_bits()));
}
