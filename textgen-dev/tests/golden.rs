//! Golden tests against the real Qwen2.5-Coder-0.5B-Instruct tokenizer and the reference outputs
//! in `shared/golden/qwen2.5-coder-0.5b-instruct/golden.json`.
//!
//! Skipped (with a message) when the model GGUF is not on this machine; otherwise every check
//! must pass. Paths: `CUBEQWEN_MODEL` (default `$CUBEQWEN_CACHE` or `~/.cache/cubeqwen`, file
//! `qwen2.5-coder-0.5b-instruct.gguf`), `CUBEQWEN_GOLDEN` (default: the first
//! `shared/golden/qwen2.5-coder-0.5b-instruct` above this crate).

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use cubeqwen_loaders::TokenizerData;
use serde_json::Value;
use textgen_dev::chat::{render_user_prompt, ChatMessage, ChatTemplate};
use textgen_dev::sampling::{argmax, Sampler, SamplingParams};
use textgen_dev::tokenizer::Tokenizer;

const MODEL_FILE: &str = "qwen2.5-coder-0.5b-instruct.gguf";
const GOLDEN_SUBDIR: &str = "shared/golden/qwen2.5-coder-0.5b-instruct";

fn model_path() -> PathBuf {
    if let Ok(p) = std::env::var("CUBEQWEN_MODEL") {
        return PathBuf::from(p);
    }
    let cache = std::env::var("CUBEQWEN_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            PathBuf::from(std::env::var("HOME").unwrap_or_default()).join(".cache/cubeqwen")
        });
    cache.join(MODEL_FILE)
}

fn golden_dir() -> PathBuf {
    if let Ok(p) = std::env::var("CUBEQWEN_GOLDEN") {
        return PathBuf::from(p);
    }
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .ancestors()
        .map(|a| a.join(GOLDEN_SUBDIR))
        .find(|p| p.join("golden.json").is_file())
        .expect("golden.json not found: set CUBEQWEN_GOLDEN")
}

/// THE one place that loads the model's tokenizer metadata.
///
/// For now: a JSON dump of the GGUF's `tokenizer.*` keys made by `scripts/dump_tokdata.py`
/// (Python `gguf` package), cached at `$CUBEQWEN_TOKDATA_JSON` or `/tmp/tokdata.json`.
/// Once the Rust GGUF reader lands, replace the body with
/// `cubeqwen_loaders::load_tokenizer_data(gguf).expect("reading the GGUF tokenizer")`.
fn load_tokenizer_data(gguf: &Path) -> TokenizerData {
    let json_path = std::env::var("CUBEQWEN_TOKDATA_JSON")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from("/tmp/tokdata.json"));
    if !json_path.is_file() {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/dump_tokdata.py");
        let status = std::process::Command::new("python3")
            .arg(&script)
            .arg(gguf)
            .arg(&json_path)
            .status()
            .expect("running python3 (needs `pip install gguf`)");
        assert!(status.success(), "{} failed", script.display());
    }
    let text = std::fs::read_to_string(&json_path).expect("reading the tokenizer JSON");
    tokenizer_data_from_json(&serde_json::from_str(&text).expect("tokenizer JSON"))
}

fn tokenizer_data_from_json(j: &Value) -> TokenizerData {
    let s = |k: &str| j[k].as_str().map(str::to_string);
    let id = |k: &str| j[k].as_u64().map(|v| v as u32);
    let strings = |k: &str| -> Vec<String> {
        j[k].as_array()
            .unwrap_or_else(|| panic!("{k} missing"))
            .iter()
            .map(|v| v.as_str().unwrap().to_string())
            .collect()
    };
    TokenizerData {
        model: s("model").unwrap_or_default(),
        pre: s("pre").unwrap_or_default(),
        tokens: strings("tokens"),
        token_types: j["token_type"]
            .as_array()
            .expect("token_type missing")
            .iter()
            .map(|v| v.as_i64().unwrap() as i32)
            .collect(),
        merges: strings("merges"),
        eos_id: id("eos_id"),
        bos_id: id("bos_id"),
        pad_id: id("pad_id"),
        add_bos: j["add_bos"].as_bool().unwrap_or(false),
        chat_template: s("chat_template"),
    }
}

struct Fixture {
    data: TokenizerData,
    tok: Tokenizer,
    golden: Value,
}

/// Built once per test binary; `None` when the model is not on this machine.
fn fixture() -> Option<&'static Fixture> {
    static F: OnceLock<Option<Fixture>> = OnceLock::new();
    F.get_or_init(|| {
        let gguf = model_path();
        if !gguf.is_file() {
            eprintln!(
                "SKIP: {} not found (scripts/fetch-model.sh fetches it)",
                gguf.display()
            );
            return None;
        }
        let data = load_tokenizer_data(&gguf);
        let tok = Tokenizer::from_data(&data).expect("building the tokenizer");
        let text = std::fs::read_to_string(golden_dir().join("golden.json")).unwrap();
        let golden = serde_json::from_str(&text).unwrap();
        Some(Fixture { data, tok, golden })
    })
    .as_ref()
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
    let Some(f) = fixture() else { return };
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
    let Some(f) = fixture() else { return };
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
    let Some(f) = fixture() else { return };
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
    let Some(f) = fixture() else { return };
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
    let Some(f) = fixture() else { return };
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
    out.push_str(&dec.flush());
    out
}

#[test]
fn stream_decoder_multibyte() {
    let Some(f) = fixture() else { return };
    let mut partial_tokens = 0;
    for s in [
        case(f, "tokenizer_mix")["prompt"].as_str().unwrap(),
        "東京都の天気は晴れ 😀🎉👩‍💻 naïve Ünïcödé ∑∫ 🇯🇵 한국어 العربية",
        "emoji only: 🦀🦀🦀🧪",
    ] {
        let ids = f.tok.encode(s).unwrap();
        partial_tokens += ids
            .iter()
            .filter(|&&i| std::str::from_utf8(&f.tok.token_bytes(i).unwrap()).is_err())
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
    let Some(f) = fixture() else { return };
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
