//! Unit tests of the reference forward pass on small models.

use super::*;
use crate::faults::Faults;
use crate::reference::ops::{rope_angle, rope_head};
use crate::trace::{compare, first_departure, transpose_square_weight};
use cubeqwen_kernels::rope::inv_freq as rope_inv_freq;
use cubeqwen_kernels::testing::{rel_err, Rng};
use cubeqwen_loaders::{random_qwen2, TensorData, TokenizerData};
use half::f16;
use std::collections::BTreeMap;

const TOKENS: [u32; 9] = [5, 17, 299, 0, 42, 123, 77, 8, 250];

/// The config of a toy model: hidden 64, head_dim 16, ffn 96, vocab 300, rope theta 1e6,
/// eps 1e-6, with the given layer and head counts.
fn toy_config(layers: usize, n_heads: usize, n_kv_heads: usize, tied: bool) -> Qwen2Config {
    Qwen2Config {
        hidden: 64,
        layers,
        n_heads,
        n_kv_heads,
        head_dim: 16,
        ffn: 96,
        vocab: 300,
        rope_theta: 1e6,
        rms_eps: 1e-6,
        context_length: 4096,
        tied_embeddings: tied,
    }
}

fn toy(layers: usize, nh: usize, nkv: usize, tied: bool, seed: u64) -> (HostModel, RefModel) {
    let host = random_qwen2(&toy_config(layers, nh, nkv, tied), seed);
    let m = RefModel::new(&host).unwrap();
    (host, m)
}

fn run(m: &RefModel, tokens: &[u32]) -> Vec<Vec<f64>> {
    m.forward(&mut m.new_cache(), tokens, 0).unwrap()
}

fn run_traced(m: &RefModel, tokens: &[u32]) -> (Vec<Vec<f64>>, Capture) {
    let mut cap = Capture::all();
    let logits = m
        .forward_traced(&mut m.new_cache(), tokens, 0, &mut cap)
        .unwrap();
    (logits, cap)
}

/// max |a-b| / max |b| over a whole row.
fn rel_max(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    let num = a
        .iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max);
    let den = b.iter().map(|y| y.abs()).fold(0.0, f64::max);
    num / den.max(1e-300)
}

fn f16_tensor(shape: &[usize], v: Vec<f64>) -> HostTensor {
    assert_eq!(v.len(), shape.iter().product::<usize>());
    HostTensor {
        shape: shape.to_vec(),
        data: TensorData::F16(v.into_iter().map(f16::from_f64).collect()),
    }
}

fn f32_tensor(v: Vec<f64>) -> HostTensor {
    HostTensor {
        shape: vec![v.len()],
        data: TensorData::F32(v.into_iter().map(|x| x as f32).collect()),
    }
}

fn f16_values(t: &HostTensor) -> Vec<f64> {
    t.data.to_f32().into_iter().map(f64::from).collect()
}

// ---------------------------------------------------------------------------------------
// (a) A tiny model computed independently, loop by loop.

/// `k/32` for small integers k: exact in f16, so the hand computation sees the same weights.
fn w(i: usize, j: usize, salt: usize) -> f64 {
    (((i * 7 + j * 3 + salt * 5) % 11) as f64 - 5.0) / 32.0
}

fn hand_model() -> HostModel {
    // hidden 8, 2 q heads on 1 kv head (GQA 2:1), head_dim 4, ffn 3, vocab 6, theta 100.
    let (d, hd, nh, nkv, ffn, vocab) = (8, 4, 2, 1, 3, 6);
    let config = Qwen2Config {
        hidden: d,
        layers: 1,
        n_heads: nh,
        n_kv_heads: nkv,
        head_dim: hd,
        ffn,
        vocab,
        rope_theta: 100.0,
        rms_eps: 1e-6,
        context_length: 64,
        tied_embeddings: false,
    };
    let mat = |r: usize, c: usize, salt: usize| {
        f16_tensor(&[r, c], (0..r * c).map(|k| w(k / c, k % c, salt)).collect())
    };
    let vec = |n: usize, base: f64, salt: usize| {
        f32_tensor((0..n).map(|i| base + w(i, salt, salt) / 4.0).collect())
    };
    let mut t = BTreeMap::new();
    t.insert("token_embd.weight".into(), mat(vocab, d, 1));
    t.insert("blk.0.attn_norm.weight".into(), vec(d, 1.0, 2));
    t.insert("blk.0.attn_q.weight".into(), mat(nh * hd, d, 3));
    t.insert("blk.0.attn_q.bias".into(), vec(nh * hd, 0.0, 4));
    t.insert("blk.0.attn_k.weight".into(), mat(nkv * hd, d, 5));
    t.insert("blk.0.attn_k.bias".into(), vec(nkv * hd, 0.0, 6));
    t.insert("blk.0.attn_v.weight".into(), mat(nkv * hd, d, 7));
    t.insert("blk.0.attn_v.bias".into(), vec(nkv * hd, 0.0, 8));
    t.insert("blk.0.attn_output.weight".into(), mat(d, nh * hd, 9));
    t.insert("blk.0.ffn_norm.weight".into(), vec(d, 1.0, 10));
    t.insert("blk.0.ffn_gate.weight".into(), mat(ffn, d, 11));
    t.insert("blk.0.ffn_up.weight".into(), mat(ffn, d, 12));
    t.insert("blk.0.ffn_down.weight".into(), mat(d, ffn, 13));
    t.insert("output_norm.weight".into(), vec(d, 1.0, 14));
    t.insert("output.weight".into(), mat(vocab, d, 15));
    HostModel {
        config,
        tokenizer: TokenizerData::default(),
        tensors: t,
    }
}

/// An independent, deliberately naive evaluation of the one-layer hand model.
fn hand_forward(host: &HostModel, tokens: &[u32]) -> Vec<Vec<f64>> {
    let g = |name: &str| f16_values(host.tensor(name).unwrap());
    let (emb, wq, bq, wk, bk, wv, bv, wo) = (
        g("token_embd.weight"),
        g("blk.0.attn_q.weight"),
        g("blk.0.attn_q.bias"),
        g("blk.0.attn_k.weight"),
        g("blk.0.attn_k.bias"),
        g("blk.0.attn_v.weight"),
        g("blk.0.attn_v.bias"),
        g("blk.0.attn_output.weight"),
    );
    let (n1, n2, wg, wu, wd, n3, lm) = (
        g("blk.0.attn_norm.weight"),
        g("blk.0.ffn_norm.weight"),
        g("blk.0.ffn_gate.weight"),
        g("blk.0.ffn_up.weight"),
        g("blk.0.ffn_down.weight"),
        g("output_norm.weight"),
        g("output.weight"),
    );
    let eps = 1e-6f32 as f64;
    let norm = |x: &Vec<f64>, w: &Vec<f64>| -> Vec<f64> {
        let mut ss = 0.0;
        for v in x {
            ss += v * v;
        }
        let r = (ss / 8.0 + eps).sqrt();
        (0..8).map(|i| x[i] / r * w[i]).collect()
    };
    // y[r] = sum_c W[r][c] x[c] + b[r]
    let lin = |wt: &Vec<f64>, b: Option<&Vec<f64>>, x: &Vec<f64>, rows: usize| -> Vec<f64> {
        let cols = x.len();
        (0..rows)
            .map(|r| {
                let mut s = b.map_or(0.0, |b| b[r]);
                for c in 0..cols {
                    s += wt[r * cols + c] * x[c];
                }
                s
            })
            .collect()
    };
    // RoPE, head_dim 4: pairs (0,2) with inv 1 and (1,3) with inv 100^(-1/2) = 0.1 (f32).
    let rope = |h: &mut [f64], p: usize| {
        let a0 = (p as f32 * 1.0f32) as f64;
        let a1 = (p as f32 * 0.1f32) as f64;
        let (x0, x2) = (h[0], h[2]);
        h[0] = x0 * a0.cos() - x2 * a0.sin();
        h[2] = x2 * a0.cos() + x0 * a0.sin();
        let (x1, x3) = (h[1], h[3]);
        h[1] = x1 * a1.cos() - x3 * a1.sin();
        h[3] = x3 * a1.cos() + x1 * a1.sin();
    };
    let mut xs: Vec<Vec<f64>> = tokens
        .iter()
        .map(|&t| emb[t as usize * 8..t as usize * 8 + 8].to_vec())
        .collect();
    let mut keys: Vec<Vec<f64>> = vec![];
    let mut vals: Vec<Vec<f64>> = vec![];
    let mut qs: Vec<Vec<f64>> = vec![];
    for (p, x) in xs.iter().enumerate() {
        let h = norm(x, &n1);
        let mut q = lin(&wq, Some(&bq), &h, 8);
        let mut k = lin(&wk, Some(&bk), &h, 4);
        let v = lin(&wv, Some(&bv), &h, 4);
        rope(&mut q[0..4], p);
        rope(&mut q[4..8], p);
        rope(&mut k, p);
        qs.push(q);
        keys.push(k);
        vals.push(v);
    }
    let mut out = vec![];
    for (p, x) in xs.iter_mut().enumerate() {
        let mut o = vec![0.0; 8];
        for head in 0..2 {
            // both q heads read the single kv head
            let q = &qs[p][head * 4..head * 4 + 4];
            let s: Vec<f64> = (0..=p)
                .map(|j| (0..4).map(|i| q[i] * keys[j][i]).sum::<f64>() / 2.0)
                .collect();
            let m = s.iter().cloned().fold(f64::MIN, f64::max);
            let e: Vec<f64> = s.iter().map(|v| (v - m).exp()).collect();
            let z: f64 = e.iter().sum();
            for j in 0..=p {
                for i in 0..4 {
                    o[head * 4 + i] += e[j] / z * vals[j][i];
                }
            }
        }
        let a = lin(&wo, None, &o, 8);
        for i in 0..8 {
            x[i] += a[i];
        }
        let h = norm(x, &n2);
        let gt = lin(&wg, None, &h, 3);
        let up = lin(&wu, None, &h, 3);
        let sw: Vec<f64> = (0..3)
            .map(|i| gt[i] / (1.0 + (-gt[i]).exp()) * up[i])
            .collect();
        let dn = lin(&wd, None, &sw, 8);
        for i in 0..8 {
            x[i] += dn[i];
        }
        out.push(lin(&lm, None, &norm(x, &n3), 6));
    }
    out
}

#[test]
fn a_one_layer_matches_hand_computation() {
    let host = hand_model();
    let m = RefModel::new(&host).unwrap();
    let tokens = [3u32, 0, 5, 1];
    let (got, cap) = run_traced(&m, &tokens);
    let want = hand_forward(&host, &tokens);
    assert_eq!(got.len(), 4);
    for (p, (g, w)) in got.iter().zip(&want).enumerate() {
        let e = rel_max(g, w);
        assert!(
            e < 1e-12,
            "position {p}: rel err {e:e}\n got {g:?}\nwant {w:?}"
        );
    }
    // At position 0 a head attends only to itself: attention output = v of its kv head.
    let v0 = cap.get("L0.v", 0).unwrap();
    let a0 = cap.get("L0.attn", 0).unwrap();
    assert_eq!(&a0[0..4], v0);
    assert_eq!(&a0[4..8], v0);
    // ...and RoPE at position 0 is the identity.
    assert_eq!(cap.get("L0.q_rope", 0), cap.get("L0.q", 0));

    // The comparison can fail: a model whose single weight differs is caught.
    let mut host2 = host.clone();
    if let TensorData::F16(v) = &mut host2.tensors.get_mut("blk.0.ffn_up.weight").unwrap().data {
        v[5] = f16::from_f64(v[5].to_f64() + 1.0 / 32.0);
    }
    let got2 = run(&RefModel::new(&host2).unwrap(), &tokens);
    assert!(rel_max(&got2[3], &want[3]) > 1e-6);
}

// ---------------------------------------------------------------------------------------
// (b) Prefill == decode.

#[test]
fn b_prefill_equals_token_by_token_decode() {
    for (nh, nkv) in [(4, 2), (6, 2)] {
        let (_, m) = toy(3, nh, nkv, false, 7);
        let prefill = run(&m, &TOKENS);
        let mut cache = m.new_cache();
        for (p, &t) in TOKENS.iter().enumerate() {
            assert_eq!(cache.len(), p);
            let row = m.forward(&mut cache, &[t], p).unwrap();
            assert_eq!(row.len(), 1);
            let e = rel_max(&row[0], &prefill[p]);
            assert!(e <= 1e-12, "{nh}/{nkv} position {p}: rel err {e:e}");
        }
        // Chunked prefill (4 + 5 tokens) too.
        let mut cache = m.new_cache();
        let mut rows = m.forward(&mut cache, &TOKENS[..4], 0).unwrap();
        rows.extend(m.forward(&mut cache, &TOKENS[4..], 4).unwrap());
        for p in 0..TOKENS.len() {
            assert!(
                rel_max(&rows[p], &prefill[p]) <= 1e-12,
                "chunked, position {p}"
            );
        }
        assert_eq!(cache.len(), TOKENS.len());
    }
}

#[test]
fn rewinding_the_cache_recomputes_the_same_logits() {
    let (_, m) = toy(2, 4, 2, false, 3);
    let mut cache = m.new_cache();
    let all = m.forward(&mut cache, &TOKENS, 0).unwrap();
    // Rewind to position 5 and feed a different token, then the original one.
    m.forward(&mut cache, &[1], 5).unwrap();
    assert_eq!(cache.len(), 6);
    let again = m.forward(&mut cache, &TOKENS[5..], 5).unwrap();
    for (p, row) in again.iter().enumerate() {
        assert!(rel_max(row, &all[5 + p]) <= 1e-12);
    }
}

// ---------------------------------------------------------------------------------------
// (c) RoPE.

/// true when a unit vector e_i rotates only into e_{i+hd/2} (NEOX pairing) for every i < hd/2.
fn rope_pairs_are_neox(hd: usize, adjacent: bool) -> bool {
    let pos = 3;
    (0..hd / 2).all(|i| {
        let mut x = vec![0.0; hd];
        x[i] = 1.0;
        rope_head(&mut x, pos, 1e6, adjacent);
        let a = rope_angle(1e6, i, hd, pos) as f64;
        (0..hd).all(|j| {
            let want = if j == i {
                a.cos()
            } else if j == i + hd / 2 {
                a.sin()
            } else {
                0.0
            };
            (x[j] - want).abs() < 1e-15
        })
    })
}

#[test]
fn c_rope_identity_norm_and_pairing() {
    let hd = 16;
    let mut rng = Rng::new(11);
    let x: Vec<f64> = (0..hd).map(|_| rng.normal()).collect();
    // Position 0 is the identity, exactly.
    let mut y = x.clone();
    rope_head(&mut y, 0, 1e6, false);
    assert_eq!(y, x);
    // Every (i, i+hd/2) pair keeps its norm at any position.
    for pos in [1usize, 2, 7, 100, 4095, 32767] {
        let mut y = x.clone();
        rope_head(&mut y, pos, 1e6, false);
        assert_ne!(y, x);
        for i in 0..hd / 2 {
            let n0 = x[i].hypot(x[i + hd / 2]);
            let n1 = y[i].hypot(y[i + hd / 2]);
            assert!((n0 - n1).abs() <= 1e-14 * n0.max(1.0), "pos {pos} pair {i}");
        }
    }
    // The pairing is i with i+hd/2, with angle pos·theta^(-2i/hd); the adjacent-pair fault
    // breaks this check.
    assert!(rope_pairs_are_neox(hd, false));
    assert!(!rope_pairs_are_neox(hd, true));
    // Inverse frequencies: theta^(-2i/hd) in f32.
    assert_eq!(rope_inv_freq(1e6, 0, 64), 1.0);
    assert_eq!(rope_inv_freq(100.0, 1, 4), 0.1f32);
    assert_eq!(rope_inv_freq(1e6, 16, 64), 1e-3f32);
    // Through the model: q_rope at position 0 equals q; later positions differ.
    let (_, m) = toy(1, 4, 2, false, 5);
    let (_, cap) = run_traced(&m, &TOKENS[..3]);
    assert_eq!(cap.get("L0.q_rope", 0), cap.get("L0.q", 0));
    assert_eq!(cap.get("L0.k_rope", 0), cap.get("L0.k", 0));
    assert_ne!(cap.get("L0.q_rope", 2), cap.get("L0.q", 2));
}

// ---------------------------------------------------------------------------------------
// (d) GQA with ratio 3.

fn rows_of(t: &mut HostTensor, rows: std::ops::Range<usize>) -> Vec<&mut f16> {
    let cols = if t.shape.len() == 2 { t.shape[1] } else { 1 };
    match &mut t.data {
        TensorData::F16(v) => v[rows.start * cols..rows.end * cols].iter_mut().collect(),
        _ => panic!("not f16"),
    }
}

/// Which q heads' attention output (layer 0, any position) changes when kv head `kvh` of
/// layer 0 gets different k/v weights.
fn heads_changed_by_kv_head(host: &HostModel, kvh: usize, faults: Faults) -> Vec<usize> {
    let hd = host.config.head_dim;
    let mut host2 = host.clone();
    for name in ["blk.0.attn_k.weight", "blk.0.attn_v.weight"] {
        for x in rows_of(
            host2.tensors.get_mut(name).unwrap(),
            kvh * hd..(kvh + 1) * hd,
        ) {
            *x = f16::from_f64(x.to_f64() * -1.5 + 0.01);
        }
    }
    let a = RefModel::new(host).unwrap().with_faults(faults.clone());
    let b = RefModel::new(&host2).unwrap().with_faults(faults);
    let (_, ca) = run_traced(&a, &TOKENS[..5]);
    let (_, cb) = run_traced(&b, &TOKENS[..5]);
    (0..host.config.n_heads)
        .filter(|&h| {
            (0..5).any(|p| {
                let (x, y) = (ca.get("L0.attn", p).unwrap(), cb.get("L0.attn", p).unwrap());
                x[h * hd..(h + 1) * hd] != y[h * hd..(h + 1) * hd]
            })
        })
        .collect()
}

#[test]
fn d_gqa_ratio_3_maps_q_head_h_to_kv_head_h_div_3() {
    let host = random_qwen2(&toy_config(2, 6, 2, false), 21);
    assert_eq!(
        heads_changed_by_kv_head(&host, 0, Faults::default()),
        vec![0, 1, 2]
    );
    assert_eq!(
        heads_changed_by_kv_head(&host, 1, Faults::default()),
        vec![3, 4, 5]
    );
    // The check fails for the interleaved (h % n_kv) mapping.
    let wrong = Faults {
        wrong_gqa_mapping: true,
        ..Faults::default()
    };
    assert_eq!(heads_changed_by_kv_head(&host, 1, wrong), vec![1, 3, 5]);
}

#[test]
fn d_gqa_permuting_kv_heads_with_their_q_groups_keeps_logits() {
    let host = random_qwen2(&toy_config(2, 6, 2, false), 22);
    let (hd, d) = (16, 64);
    let base = run(&RefModel::new(&host).unwrap(), &TOKENS[..6]);
    let mut p = host.clone();
    for l in 0..2 {
        // Swap kv heads 0 and 1 (rows of k/v weights and biases).
        for name in [
            "attn_k.weight",
            "attn_v.weight",
            "attn_k.bias",
            "attn_v.bias",
        ] {
            let t = p.tensors.get_mut(&format!("blk.{l}.{name}")).unwrap();
            let cols = if t.shape.len() == 2 { t.shape[1] } else { 1 };
            swap_blocks(&mut t.data, cols * hd, 0, 1);
        }
        // Swap q head groups {0,1,2} and {3,4,5}: rows of Wq/bq, columns of Wo.
        for name in ["attn_q.weight", "attn_q.bias"] {
            let t = p.tensors.get_mut(&format!("blk.{l}.{name}")).unwrap();
            let cols = if t.shape.len() == 2 { t.shape[1] } else { 1 };
            swap_blocks(&mut t.data, cols * 3 * hd, 0, 1);
        }
        let t = p
            .tensors
            .get_mut(&format!("blk.{l}.attn_output.weight"))
            .unwrap();
        if let TensorData::F16(v) = &mut t.data {
            for r in 0..d {
                let row = &mut v[r * 96..(r + 1) * 96];
                let (a, b) = row.split_at_mut(48);
                a.swap_with_slice(b);
            }
        }
    }
    let permuted = run(&RefModel::new(&p).unwrap(), &TOKENS[..6]);
    for (x, y) in permuted.iter().zip(&base) {
        assert!(rel_max(x, y) < 1e-12);
    }
    // Swapping only the kv heads (not the q groups) does change the logits.
    let mut p2 = host.clone();
    for name in [
        "attn_k.weight",
        "attn_v.weight",
        "attn_k.bias",
        "attn_v.bias",
    ] {
        let t = p2.tensors.get_mut(&format!("blk.0.{name}")).unwrap();
        let cols = if t.shape.len() == 2 { t.shape[1] } else { 1 };
        swap_blocks(&mut t.data, cols * hd, 0, 1);
    }
    let other = run(&RefModel::new(&p2).unwrap(), &TOKENS[..6]);
    assert!(rel_max(&other[5], &base[5]) > 1e-6);
}

/// Swaps blocks `i` and `j` of `block` consecutive values.
fn swap_blocks(data: &mut TensorData, block: usize, i: usize, j: usize) {
    fn go<T>(v: &mut [T], block: usize, i: usize, j: usize) {
        let (lo, hi) = (i.min(j), i.max(j));
        let (a, b) = v.split_at_mut(hi * block);
        a[lo * block..(lo + 1) * block].swap_with_slice(&mut b[..block]);
    }
    match data {
        TensorData::F16(v) => go(v, block, i, j),
        TensorData::F32(v) => go(v, block, i, j),
    }
}

// ---------------------------------------------------------------------------------------
// (e) Causality.

#[test]
fn e_later_tokens_do_not_change_earlier_logits() {
    let (_, m) = toy(2, 6, 2, false, 9);
    let a = run(&m, &TOKENS);
    let mut changed = TOKENS;
    changed[5] = 1;
    let b = run(&m, &changed);
    for p in 0..5 {
        assert_eq!(a[p], b[p], "position {p} changed");
    }
    for p in 5..TOKENS.len() {
        assert!(rel_max(&a[p], &b[p]) > 1e-9, "position {p} did not change");
    }
}

// ---------------------------------------------------------------------------------------
// (f) Fault switches and the first departing step.

/// The first step where `other` departs from `clean` by more than `tol` (both full traces of
/// a `layers`-layer model), as the parity tracer reports it.
fn departure(clean: &Capture, other: &Capture, layers: usize, tol: f64) -> Option<String> {
    let reports = compare(clean, other, layers, None, tol).unwrap();
    first_departure(&reports).map(|r| r.name.clone())
}

#[test]
fn f_each_fault_departs_at_its_step() {
    let (host, clean) = toy(2, 4, 2, false, 13);
    let tokens = &TOKENS[..6];
    let (clean_logits, clean_cap) = run_traced(&clean, tokens);
    // Full trace: every step at every position, in order.
    let names = step_names(2);
    assert_eq!(clean_cap.records.len(), names.len() * tokens.len());
    for (k, name) in names.iter().enumerate() {
        for p in 0..tokens.len() {
            let r = &clean_cap.records[k * tokens.len() + p];
            assert_eq!((&r.name, r.pos), (name, p));
        }
    }
    assert_eq!(
        clean_cap.get("logits", 5).unwrap(),
        clean_logits[5].as_slice()
    );
    // A clean rerun departs nowhere, even at tolerance 0.
    let (_, again) = run_traced(&clean, tokens);
    assert_eq!(departure(&clean_cap, &again, 2, 0.0), None);

    let on = |f: fn(&mut Faults)| {
        let mut faults = Faults::default();
        f(&mut faults);
        faults
    };
    let cases: Vec<(Faults, &str)> = vec![
        (on(|f| f.rope_adjacent_pairs = true), "L0.q_rope"),
        (on(|f| f.drop_q_bias = true), "L0.q"),
        (on(|f| f.wrong_gqa_mapping = true), "L0.attn"),
        (on(|f| f.attention_scale_one_over_hd = true), "L0.attn"),
        (on(|f| f.no_causal_mask = true), "L0.attn"),
        (on(|f| f.norm_weight_off_by_one = true), "L1.attn_norm"),
        (on(|f| f.swap_gate_up = true), "L0.gate"),
        (on(|f| f.drop_attn_residual = Some(1)), "L1.resid1"),
    ];
    for (faults, expected) in cases {
        let faulty = RefModel::new(&host).unwrap().with_faults(faults.clone());
        let (logits, cap) = run_traced(&faulty, tokens);
        assert!(
            rel_max(&logits[5], &clean_logits[5]) > 1e-6,
            "{faults:?} did not change the logits"
        );
        let dep = departure(&clean_cap, &cap, 2, 1e-12);
        assert_eq!(dep.as_deref(), Some(expected), "{faults:?}");
    }
    // A transposed square weight (applied to the host model) departs at its projection.
    for (name, expected) in [
        ("blk.0.attn_output.weight", "L0.attn_out"),
        ("blk.1.attn_q.weight", "L1.q"),
    ] {
        let mut h = host.clone();
        transpose_square_weight(&mut h, name).unwrap();
        let (_, cap) = run_traced(&RefModel::new(&h).unwrap(), tokens);
        assert_eq!(
            departure(&clean_cap, &cap, 2, 1e-12).as_deref(),
            Some(expected)
        );
    }
}

#[test]
fn f_device_only_faults_are_refused_by_the_reference() {
    let host = random_qwen2(&toy_config(1, 4, 2, false), 1);
    for faults in [
        Faults {
            kv_write_off_by_one: true,
            ..Faults::default()
        },
        Faults {
            chunk_start_off_by_one: true,
            ..Faults::default()
        },
    ] {
        let m = RefModel::new(&host).unwrap().with_faults(faults);
        let err = m.forward(&mut m.new_cache(), &[1, 2], 0).unwrap_err();
        assert!(err.to_string().contains("device only"), "{err}");
    }
    let m = RefModel::new(&host).unwrap();
    assert!(m.forward(&mut m.new_cache(), &[1, 2], 0).is_ok());
}

#[test]
fn f_transposing_rejects_unknown_or_non_square_weights() {
    let host = random_qwen2(&toy_config(1, 6, 2, false), 1);
    for name in [
        "blk.0.attn_output.weight",
        "blk.0.ffn_up.weight",
        "blk.7.attn_q.weight",
        "nope",
    ] {
        let mut h = host.clone();
        let err = transpose_square_weight(&mut h, name)
            .unwrap_err()
            .to_string();
        assert!(err.contains(name), "{err}");
        assert!(h == host, "{name}: the model changed");
    }
}

/// Mean softmax entropy of layer 0's attention over the query positions `from..` of a
/// prefill of `tokens`, as a fraction of the uniform distribution's (ln of the number of
/// visible positions).
fn attention_entropy_ratio(host: &HostModel, tokens: &[u32], from: usize) -> f64 {
    let c = &host.config;
    let (nh, nkv, hd) = (c.n_heads, c.n_kv_heads, c.head_dim);
    let (_, cap) = run_traced(&RefModel::new(host).unwrap(), tokens);
    let (mut sum, mut count) = (0.0, 0);
    for p in from..tokens.len() {
        let q = cap.get("L0.q_rope", p).unwrap();
        for h in 0..nh {
            let g = h / (nh / nkv);
            let scores: Vec<f64> = (0..=p)
                .map(|j| {
                    let k = &cap.get("L0.k_rope", j).unwrap()[g * hd..(g + 1) * hd];
                    ops::dot_f64(&q[h * hd..(h + 1) * hd], k) / (hd as f64).sqrt()
                })
                .collect();
            let m = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let z: f64 = scores.iter().map(|s| (s - m).exp()).sum();
            let entropy: f64 = scores
                .iter()
                .map(|s| (s - m).exp() / z)
                .filter(|&pr| pr > 0.0)
                .map(|pr| -pr * pr.ln())
                .sum();
            sum += entropy / ((p + 1) as f64).ln();
            count += 1;
        }
    }
    sum / count as f64
}

#[test]
fn random_models_have_peaked_attention() {
    // The real head size and GQA ratio; entropy over the query positions 16..40.
    let cfg = Qwen2Config {
        hidden: 128,
        head_dim: 64,
        ..toy_config(1, 14, 2, false)
    };
    let host = random_qwen2(&cfg, 5);
    let tokens: Vec<u32> = (0..40).map(|i| (i * 37 + 11) % 300).collect();
    let peaked = attention_entropy_ratio(&host, &tokens, 16);
    // The same model with q and k at plain ±1/sqrt(fan_in): nearly uniform attention, where a
    // wrong attention scale or a missing causal mask would barely show.
    let gain = cubeqwen_loaders::random::QK_GAIN;
    let mut flat = host.clone();
    for name in [
        "blk.0.attn_q.weight",
        "blk.0.attn_q.bias",
        "blk.0.attn_k.weight",
        "blk.0.attn_k.bias",
    ] {
        match &mut flat.tensors.get_mut(name).unwrap().data {
            TensorData::F16(v) => v
                .iter_mut()
                .for_each(|x| *x = f16::from_f32(x.to_f32() / gain)),
            TensorData::F32(v) => v.iter_mut().for_each(|x| *x /= gain),
        }
    }
    let uniform = attention_entropy_ratio(&flat, &tokens, 16);
    println!(
        "attention entropy / uniform: random_qwen2 {peaked:.3}, plain q/k weights {uniform:.3}"
    );
    assert!(
        peaked < 0.5,
        "random_qwen2's attention is not peaked: {peaked:.3}"
    );
    assert!(
        uniform > 0.9,
        "plain weights give near-uniform attention, not {uniform:.3}"
    );
}

#[test]
fn capture_keeps_only_requested_positions_across_calls() {
    let (_, m) = toy(1, 4, 2, false, 2);
    let mut cap = Capture::at(&[1, 4]);
    let mut cache = m.new_cache();
    m.forward_traced(&mut cache, &TOKENS[..3], 0, &mut cap)
        .unwrap();
    m.forward_traced(&mut cache, &TOKENS[3..5], 3, &mut cap)
        .unwrap();
    let names = step_names(1);
    assert_eq!(cap.records.len(), 2 * names.len());
    assert!(cap.records.iter().all(|r| r.pos == 1 || r.pos == 4));
    let (_, full) = run_traced(&m, &TOKENS[..5]);
    for r in &cap.records {
        let e = rel_err(&r.data, full.get(&r.name, r.pos).unwrap());
        assert!(e <= 1e-12, "{} at {}", r.name, r.pos);
    }
}

// ---------------------------------------------------------------------------------------
// (g) Tied embeddings.

#[test]
fn g_tied_embeddings_use_token_embd_as_lm_head() {
    let (host, m) = toy(2, 4, 2, true, 17);
    assert!(!host.tensors.contains_key("output.weight"));
    assert!(m.uses_tied_embeddings());
    let (logits, cap) = run_traced(&m, &TOKENS[..4]);
    let emb = f16_values(host.tensor("token_embd.weight").unwrap());
    let lm_check = |emb: &[f64]| {
        (0..4).all(|p| {
            let h = cap.get("output_norm", p).unwrap();
            let want: Vec<f64> = (0..300)
                .map(|v| (0..64).map(|i| emb[v * 64 + i] * h[i]).sum())
                .collect();
            rel_max(&logits[p], &want) < 1e-12
        })
    };
    assert!(lm_check(&emb));

    // With an output.weight, that one is used instead (and the check above fails).
    let (host_u, mu) = toy(2, 4, 2, false, 17);
    assert!(!mu.uses_tied_embeddings());
    let (logits_u, cap_u) = run_traced(&mu, &TOKENS[..4]);
    let out = f16_values(host_u.tensor("output.weight").unwrap());
    let h = cap_u.get("output_norm", 3).unwrap();
    let want: Vec<f64> = (0..300)
        .map(|v| (0..64).map(|i| out[v * 64 + i] * h[i]).sum())
        .collect();
    assert!(rel_max(&logits_u[3], &want) < 1e-12);
    let want_tied: Vec<f64> = (0..300)
        .map(|v| (0..64).map(|i| emb[v * 64 + i] * h[i]).sum())
        .collect();
    assert!(rel_max(&logits_u[3], &want_tied) > 1e-3);

    // Removing output.weight from the untied model switches it to the tied path.
    let mut host_r = host_u.clone();
    host_r.tensors.remove("output.weight");
    let mr = RefModel::new(&host_r).unwrap();
    assert!(mr.uses_tied_embeddings());
    let (logits_r, cap_r) = run_traced(&mr, &TOKENS[..4]);
    let emb_u = f16_values(host_u.tensor("token_embd.weight").unwrap());
    let h = cap_r.get("output_norm", 3).unwrap();
    let want: Vec<f64> = (0..300)
        .map(|v| (0..64).map(|i| emb_u[v * 64 + i] * h[i]).sum())
        .collect();
    assert!(rel_max(&logits_r[3], &want) < 1e-12);
}

// ---------------------------------------------------------------------------------------
// Errors and validation.

#[test]
fn out_of_range_token_is_an_error_and_leaves_the_cache_alone() {
    let (_, m) = toy(1, 4, 2, false, 4);
    let mut cache = m.new_cache();
    m.forward(&mut cache, &[1, 2], 0).unwrap();
    let err = m.forward(&mut cache, &[3, 300], 2).unwrap_err().to_string();
    assert!(err.contains("300") && err.contains("vocab"), "{err}");
    assert_eq!(cache.len(), 2);
    assert_eq!(cache.keys(0).len(), 2 * 32);
    // start_pos past the cache end is an error too.
    let err = m.forward(&mut cache, &[3], 3).unwrap_err().to_string();
    assert!(err.contains("start_pos"), "{err}");
    // A cache of another model is rejected.
    let (_, m6) = toy(1, 6, 3, false, 4);
    assert!(m.forward(&mut m6.new_cache(), &[1], 0).is_err());
    // No tokens: no logits.
    assert!(m.forward(&mut cache, &[], 2).unwrap().is_empty());
}

#[test]
fn bad_tensors_give_errors_that_name_them() {
    let host = random_qwen2(&toy_config(2, 4, 2, false), 6);
    let mut h = host.clone();
    h.tensors.remove("blk.1.ffn_down.weight");
    let err = RefModel::new(&h).err().unwrap().to_string();
    assert!(err.contains("blk.1.ffn_down.weight"), "{err}");

    let mut h = host.clone();
    h.tensors.get_mut("blk.0.attn_k.weight").unwrap().shape = vec![64, 32];
    let err = RefModel::new(&h).err().unwrap().to_string();
    assert!(
        err.contains("blk.0.attn_k.weight") && err.contains("[64, 32]"),
        "{err}"
    );

    let mut h = host.clone();
    h.tensors.get_mut("blk.0.attn_q.bias").unwrap().data = TensorData::F32(vec![0.0; 3]);
    let err = RefModel::new(&h).err().unwrap().to_string();
    assert!(err.contains("blk.0.attn_q.bias"), "{err}");

    let mut h = host.clone();
    h.config.n_kv_heads = 3;
    assert!(RefModel::new(&h).is_err());

    let mut h = host.clone();
    h.config.layers = 1;
    let err = RefModel::new(&h).err().unwrap().to_string();
    assert!(err.contains("layer"), "{err}");
}

// ---------------------------------------------------------------------------------------
// Greedy decoding.

#[test]
fn argmax_takes_the_lowest_index_on_ties() {
    assert_eq!(top2(&[1.0, 3.0, 3.0, 2.0]), Some((1, 3.0, 3.0)));
    assert_eq!(top2(&[5.0, 3.0, 4.0]), Some((0, 5.0, 4.0)));
    assert_eq!(top2(&[f64::NAN, 2.0, 1.0]), Some((1, 2.0, 1.0)));
    assert_eq!(top2(&[2.0]), Some((0, 2.0, f64::NEG_INFINITY)));
    assert_eq!(top2::<f64>(&[]), None);
    assert_eq!(top2(&[f32::NAN, f32::NAN]), None);
    let v = [1.0f32, f32::NAN, 7.0, 7.0, 2.0, 3.0, 1.0, 0.0, 6.5, 7.5];
    assert_eq!(top2(&v), Some((9, 7.5, 7.0)));
}

#[test]
fn greedy_matches_a_manual_loop_and_stops_at_eos() {
    let (_, m) = toy(2, 6, 2, false, 31);
    let prompt = &TOKENS[..4];
    let (ids, margins) = greedy(&m, prompt, 6, &[]).unwrap();
    assert_eq!((ids.len(), margins.len()), (6, 6));
    // Manual: re-run the whole sequence each step.
    let mut seq = prompt.to_vec();
    for (step, &id) in ids.iter().enumerate() {
        let logits = run(&m, &seq);
        let last = logits.last().unwrap();
        let (best, b, s) = top2(last).unwrap();
        assert_eq!(best as u32, id, "step {step}");
        assert!((margins[step] - (b - s)).abs() < 1e-12 && margins[step] >= 0.0);
        seq.push(id);
    }
    // Stopping at an eos id includes it.
    let (ids2, m2) = greedy(&m, prompt, 6, &[ids[2]]).unwrap();
    let stop = ids.iter().position(|&i| i == ids[2]).unwrap();
    assert_eq!(ids2, ids[..=stop].to_vec());
    assert_eq!(m2.len(), ids2.len());
    assert!(greedy(&m, prompt, 0, &[]).unwrap().0.is_empty());
}
