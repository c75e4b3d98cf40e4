//! Golden tests against the real Qwen2.5-Coder-0.5B-Instruct tokenizer and the reference outputs
//! in `tests/data/golden.json`.
//!
//! Needs the real model (`common::model::model_path`: a missing model fails the test).

use std::sync::OnceLock;

use cubeqwen::chat::{render_user_prompt, ChatMessage, ChatTemplate};
use cubeqwen::sampling::{argmax, Sampler, SamplingParams};
use cubeqwen::tokenizer::Tokenizer;
use cubeqwen_loaders::TokenizerData;
use serde_json::Value;

mod common;

use common::model::{golden_dir, model_path};

struct Fixture {
    data: TokenizerData,
    tok: Tokenizer,
    golden: Value,
}

/// Built once per test binary.
fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let gguf = model_path();
        let data =
            cubeqwen_loaders::load_tokenizer_data(&gguf).expect("reading the GGUF tokenizer");
        let tok = Tokenizer::from_data(&data).expect("building the tokenizer");
        let text = std::fs::read_to_string(golden_dir().join("golden.json")).unwrap();
        let golden = serde_json::from_str(&text).unwrap();
        Fixture { data, tok, golden }
    })
}

fn cases(f: &Fixture) -> &Vec<Value> {
    f.golden["cases"].as_array().unwrap()
}

fn ids_of(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

fn case<'a>(f: &'a Fixture, name: &str) -> &'a Value {
    cases(f)
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no golden case {name}"))
}

#[test]
fn metadata_facts() {
    let f = fixture();
    assert_eq!(f.tok.vocab_size(), 151936);
    assert_eq!(f.tok.eos_ids(), vec![151645, 151643]);
    assert!(f.tok.is_special(151643) && f.tok.is_special(151644) && f.tok.is_special(151645));
    assert!(!f.tok.is_special(151657)); // <tool_call>: user-defined
    assert!(f.tok.is_added(151657));
    assert_eq!(f.tok.token_str(151645).unwrap(), "<|im_end|>");
    assert!(f.tok.token_str(151936).is_err());
    assert!(f.tok.decode(&[151936]).is_err());
}

#[test]
fn golden_prompt_ids_all_cases() {
    let f = fixture();
    let template = ChatTemplate::from_data(&f.data).unwrap();
    assert!(!template.is_fallback());
    let mut checked = 0;
    for c in cases(f) {
        let name = c["name"].as_str().unwrap();
        let prompt = c["prompt"].as_str().unwrap();
        let rendered = c["rendered"].as_str().unwrap();
        let text = if c["chat"].as_bool().unwrap() {
            let r = render_user_prompt(&f.data, prompt).unwrap();
            assert_eq!(r, rendered, "case {name}: chat rendering");
            r
        } else {
            assert_eq!(prompt, rendered, "case {name}");
            prompt.to_string()
        };
        let ids = f.tok.encode(&text).unwrap();
        assert_eq!(ids, ids_of(&c["prompt_ids"]), "case {name}: prompt ids");
        checked += 1;
    }
    assert_eq!(checked, 6, "golden.json should hold 6 cases");
}

#[test]
fn real_template_multi_turn() {
    let f = fixture();
    let t = ChatTemplate::from_data(&f.data).unwrap();
    let msgs = [
        ChatMessage::system("Answer in French."),
        ChatMessage::user("Hello?"),
        ChatMessage::assistant("Bonjour !"),
        ChatMessage::user("2+2?"),
    ];
    let want = "<|im_start|>system\nAnswer in French.<|im_end|>\n\
                <|im_start|>user\nHello?<|im_end|>\n\
                <|im_start|>assistant\nBonjour !<|im_end|>\n\
                <|im_start|>user\n2+2?<|im_end|>\n";
    assert_eq!(t.render(&msgs, false).unwrap(), want);
    assert_eq!(
        t.render(&msgs, true).unwrap(),
        format!("{want}<|im_start|>assistant\n")
    );
    // The rendered specials encode as single control tokens.
    let ids = f.tok.encode(&t.render(&msgs, true).unwrap()).unwrap();
    assert_eq!(ids[0], 151644);
    assert_eq!(ids.iter().filter(|&&i| i == 151645).count(), 4);
}

#[test]
fn decode_roundtrips_golden_texts() {
    let f = fixture();
    for c in cases(f) {
        let name = c["name"].as_str().unwrap();
        let rendered = c["rendered"].as_str().unwrap();
        let ids = ids_of(&c["prompt_ids"]);
        assert_eq!(f.tok.decode(&ids).unwrap(), rendered, "case {name}");
        assert_eq!(
            f.tok.decode(&f.tok.encode(rendered).unwrap()).unwrap(),
            rendered,
            "case {name}"
        );
    }
    for name in ["tokenizer_mix", "tokenizer_code"] {
        let s = case(f, name)["prompt"].as_str().unwrap();
        assert_eq!(f.tok.decode(&f.tok.encode(s).unwrap()).unwrap(), s);
    }
}

#[test]
fn greedy_texts_decode() {
    let f = fixture();
    for c in cases(f).iter().filter(|c| c.get("greedy_ids").is_some()) {
        let mut ids = ids_of(&c["greedy_ids"]);
        while ids.last().is_some_and(|&i| f.tok.is_eos(i)) {
            ids.pop();
        }
        assert_eq!(
            f.tok.decode(&ids).unwrap(),
            c["greedy_text"].as_str().unwrap(),
            "case {}",
            c["name"]
        );
    }
}

fn stream(tok: &Tokenizer, ids: &[u32]) -> String {
    let mut dec = tok.stream_decoder();
    let mut out = String::new();
    for &id in ids {
        let piece = dec.push(id).unwrap();
        assert!(
            !piece.contains(char::REPLACEMENT_CHARACTER),
            "piece {piece:?} of id {id}"
        );
        out.push_str(&piece);
    }
    out.push_str(&dec.flush().unwrap());
    out
}

#[test]
fn stream_decoder_multibyte() {
    let f = fixture();
    let mut partial_tokens = 0;
    for s in [
        case(f, "tokenizer_mix")["prompt"].as_str().unwrap(),
        "東京都の天気は晴れ 😀🎉👩‍💻 naïve Ünïcödé ∑∫ 🇯🇵 한국어 العربية",
        "emoji only: 🦀🦀🦀🧪",
    ] {
        let ids = f.tok.encode(s).unwrap();
        partial_tokens += ids
            .iter()
            .filter(|&&i| {
                // A token that is part of a character decodes alone to U+FFFD.
                f.tok
                    .decode(&[i])
                    .unwrap()
                    .contains(char::REPLACEMENT_CHARACTER)
            })
            .count();
        assert_eq!(stream(&f.tok, &ids), s);
    }
    // Some tokens must be partial characters, or the test proves nothing.
    assert!(
        partial_tokens >= 3,
        "only {partial_tokens} partial-character tokens"
    );
    for c in cases(f).iter().filter(|c| c.get("greedy_ids").is_some()) {
        let ids = ids_of(&c["greedy_ids"]);
        assert_eq!(stream(&f.tok, &ids), f.tok.decode(&ids).unwrap());
    }
}

#[test]
fn greedy_sampler_matches_golden_first_token() {
    let f = fixture();
    let dir = golden_dir();
    for c in cases(f).iter().filter(|c| c.get("greedy_ids").is_some()) {
        let name = c["name"].as_str().unwrap();
        let bytes = std::fs::read(dir.join(format!("{name}.last_logits.f32"))).unwrap();
        let logits: Vec<f32> = bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
            .collect();
        assert_eq!(logits.len(), 151936);
        let first = ids_of(&c["greedy_ids"])[0];
        assert_eq!(argmax(&logits), first, "case {name}");
        let mut greedy = Sampler::new(SamplingParams::greedy()).unwrap();
        let prompt = ids_of(&c["prompt_ids"]);
        assert_eq!(greedy.sample(&logits, &prompt), first, "case {name}");
        // Default sampling (top-k 40 etc.) on real logits only yields plausible tokens.
        let mut s = Sampler::new(SamplingParams {
            seed: 7,
            ..Default::default()
        })
        .unwrap();
        let top: Vec<u32> = c["step_topk"][0]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p[0].as_u64().unwrap() as u32)
            .collect();
        for _ in 0..50 {
            let t = s.sample(&logits, &prompt);
            assert!(
                top.contains(&t),
                "case {name}: sampled {t} outside the top 32"
            );
        }
    }
}
