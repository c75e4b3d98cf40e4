//! [`TokenizerData`] from GGUF `tokenizer.ggml.*` metadata or a Hugging Face `tokenizer.json`.

use crate::gguf::GgufFile;
use crate::hf::{read_hf_config, read_tokenizer_files};
use crate::TokenizerData;
use anyhow::{anyhow, bail, ensure, Context, Result};
use std::path::Path;

/// GGUF token type of an ordinary token.
pub const TOKEN_NORMAL: i32 = 1;
/// GGUF token type of a control (special) token such as `<|im_end|>`.
pub const TOKEN_CONTROL: i32 = 3;
/// GGUF token type of a user-defined token (`<tool_call>`), matched whole in text.
pub const TOKEN_USER_DEFINED: i32 = 4;
/// Token type of a padding entry that no text maps to (`[PAD151936]`).
pub const TOKEN_UNUSED: i32 = 5;

/// The split regex of Qwen2's pre-tokenizer (`tokenizer.ggml.pre` = "qwen2"), as in its
/// `tokenizer.json`.
pub const QWEN2_PRETOKENIZER_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Read the tokenizer from a GGUF file's metadata (tensor data is not touched), or from a
/// Hugging Face checkpoint directory's `tokenizer.json` (+ `tokenizer_config.json`).
pub fn load_tokenizer_data(path: &Path) -> Result<TokenizerData> {
    if path.is_dir() {
        return tokenizer_from_hf_dir(path)?.ok_or_else(|| {
            anyhow!(
                "{}: no tokenizer.json in the checkpoint directory",
                path.display()
            )
        });
    }
    let g = GgufFile::open(path)?;
    tokenizer_from_gguf(&g)
}

/// Read `tokenizer.ggml.*` and `tokenizer.chat_template`. Absent keys give empty/None values;
/// present keys with the wrong type, ids out of range, or a token_type list whose length differs
/// from the token list are errors.
pub fn tokenizer_from_gguf(g: &GgufFile) -> Result<TokenizerData> {
    let file = g.path().display().to_string();
    let tokens = g
        .get_str_array("tokenizer.ggml.tokens")?
        .unwrap_or_default();
    let token_types = match g.get_i32_array("tokenizer.ggml.token_type")? {
        Some(t) => t,
        None => vec![TOKEN_NORMAL; tokens.len()],
    };
    let id = |key: &str| -> Result<Option<u32>> { g.get_u32(key) };
    let t = TokenizerData {
        model: g.get_str("tokenizer.ggml.model")?.unwrap_or("").to_string(),
        pre: g.get_str("tokenizer.ggml.pre")?.unwrap_or("").to_string(),
        token_types,
        merges: g
            .get_str_array("tokenizer.ggml.merges")?
            .unwrap_or_default(),
        eos_id: id("tokenizer.ggml.eos_token_id")?,
        bos_id: id("tokenizer.ggml.bos_token_id")?,
        pad_id: id("tokenizer.ggml.padding_token_id")?,
        add_bos: g.get_bool("tokenizer.ggml.add_bos_token")?.unwrap_or(false),
        chat_template: g.get_str("tokenizer.chat_template")?.map(String::from),
        tokens,
    };
    validate(&t).with_context(|| format!("{file}: bad tokenizer metadata"))?;
    Ok(t)
}

/// Checks lengths agree and special ids index into the token list (when there is one).
pub fn validate(t: &TokenizerData) -> Result<()> {
    ensure!(
        t.token_types.len() == t.tokens.len(),
        "{} token types for {} tokens",
        t.token_types.len(),
        t.tokens.len()
    );
    if !t.tokens.is_empty() {
        for (name, id) in [("eos", t.eos_id), ("bos", t.bos_id), ("padding", t.pad_id)] {
            if let Some(id) = id {
                ensure!(
                    (id as usize) < t.tokens.len(),
                    "{name} token id {id} is out of range ({} tokens)",
                    t.tokens.len()
                );
            }
        }
    }
    Ok(())
}

/// A short description: model, pre, sizes, special ids.
pub fn summary(t: &TokenizerData) -> String {
    let name = |id: Option<u32>| match id {
        None => "-".to_string(),
        Some(i) => match t.tokens.get(i as usize) {
            Some(s) => format!("{i} {s:?}"),
            None => i.to_string(),
        },
    };
    let n_control = t
        .token_types
        .iter()
        .filter(|&&x| x == TOKEN_CONTROL)
        .count();
    format!(
        "model {:?}, pre {:?}, {} tokens ({} control), {} merges, eos {}, bos {}, pad {}, add_bos {}, chat template {}",
        t.model,
        t.pre,
        t.tokens.len(),
        n_control,
        t.merges.len(),
        name(t.eos_id),
        name(t.bos_id),
        name(t.pad_id),
        t.add_bos,
        match &t.chat_template {
            Some(s) => format!("present ({} chars)", s.chars().count()),
            None => "absent".into(),
        }
    )
}

/// At most this many `[PAD{id}]` tokens are added to reach the model's vocab size.
pub const MAX_PADDING: usize = 1 << 16;

/// The tokenizer of a HF checkpoint directory, or None when it has no `tokenizer.json`. The
/// token list is padded to `config.json`'s `vocab_size` when that file can be read.
pub fn tokenizer_from_hf_dir(dir: &Path) -> Result<Option<TokenizerData>> {
    let Some((tokenizer_json, config_json)) = read_tokenizer_files(dir)? else {
        return Ok(None);
    };
    let vocab = read_hf_config(dir).map(|c| c.vocab_size).unwrap_or(0);
    tokenizer_from_hf_json(&tokenizer_json, config_json.as_deref(), vocab)
        .map(Some)
        .with_context(|| format!("{}: bad tokenizer", dir.join("tokenizer.json").display()))
}

/// The GGUF pre-tokenizer name of a `tokenizer.json` `pre_tokenizer`: "qwen2" when it splits
/// with [`QWEN2_PRETOKENIZER_REGEX`], else "" (not one we know).
fn pre_tokenizer_name(pre: Option<&serde_json::Value>) -> &'static str {
    fn splits_like_qwen2(v: &serde_json::Value) -> bool {
        match v.get("type").and_then(|t| t.as_str()) {
            Some("Sequence") => v
                .get("pretokenizers")
                .and_then(|p| p.as_array())
                .is_some_and(|p| p.iter().any(splits_like_qwen2)),
            Some("Split") => {
                v.pointer("/pattern/Regex").and_then(|r| r.as_str())
                    == Some(QWEN2_PRETOKENIZER_REGEX)
            }
            _ => false,
        }
    }
    if pre.is_some_and(splits_like_qwen2) {
        "qwen2"
    } else {
        ""
    }
}

/// Build [`TokenizerData`] from the text of a HF `tokenizer.json` (BPE model: vocab + merges +
/// added_tokens) and, optionally, `tokenizer_config.json` (eos/bos/pad tokens, add_bos_token,
/// chat_template). `vocab_size` pads the token list like llama.cpp's converter does
/// (`[PAD{id}]`, user-defined). `pre` is "qwen2" when the pre-tokenizer splits with Qwen2's
/// regex, else empty.
pub fn tokenizer_from_hf_json(
    tokenizer_json: &str,
    tokenizer_config_json: Option<&str>,
    vocab_size: usize,
) -> Result<TokenizerData> {
    use serde_json::Value as J;
    let tj: J = serde_json::from_str(tokenizer_json).context("tokenizer.json is not valid JSON")?;
    let model = tj
        .get("model")
        .ok_or_else(|| anyhow!("tokenizer.json has no `model`"))?;
    let kind = model.get("type").and_then(J::as_str).unwrap_or("BPE");
    ensure!(
        kind == "BPE",
        "tokenizer.json model type `{kind}` is not supported (only BPE)"
    );
    let vocab = model
        .get("vocab")
        .and_then(J::as_object)
        .ok_or_else(|| anyhow!("tokenizer.json has no model.vocab object"))?;
    let mut entries: Vec<(usize, String, i32)> = Vec::with_capacity(vocab.len());
    for (tok, id) in vocab {
        let id = id
            .as_u64()
            .ok_or_else(|| anyhow!("tokenizer.json: vocab id of {tok:?} is not an integer"))?;
        entries.push((id as usize, tok.clone(), TOKEN_NORMAL));
    }
    if let Some(added) = tj.get("added_tokens").and_then(J::as_array) {
        for a in added {
            let id = a.get("id").and_then(J::as_u64);
            let content = a.get("content").and_then(J::as_str);
            let (Some(id), Some(content)) = (id, content) else {
                bail!("tokenizer.json: added token without id/content: {a}");
            };
            let special = a.get("special").and_then(J::as_bool).unwrap_or(false);
            let ty = if special {
                TOKEN_CONTROL
            } else {
                TOKEN_USER_DEFINED
            };
            entries.push((id as usize, content.to_string(), ty));
        }
    }
    let max_id = entries.iter().map(|e| e.0).max().map_or(0, |m| m + 1);
    // The list is sized by the entries actually present (plus bounded padding), never by a raw
    // number from the file.
    let limit = entries.len() + MAX_PADDING;
    ensure!(
        max_id <= limit,
        "tokenizer.json: token id {} is far beyond the {} tokens listed",
        max_id - 1,
        entries.len()
    );
    ensure!(
        vocab_size <= limit,
        "vocab_size {vocab_size} is far beyond the {} tokens in tokenizer.json",
        entries.len()
    );
    let n = max_id.max(vocab_size);
    let mut tokens: Vec<Option<(String, i32)>> = vec![None; n];
    for (id, tok, ty) in entries {
        if let Some((old, _)) = &tokens[id] {
            ensure!(
                *old == tok,
                "tokenizer.json: id {id} is both {old:?} and {tok:?}"
            );
        }
        tokens[id] = Some((tok, ty));
    }
    let (tokens, token_types): (Vec<String>, Vec<i32>) = tokens
        .into_iter()
        .enumerate()
        .map(|(i, t)| t.unwrap_or_else(|| (format!("[PAD{i}]"), TOKEN_USER_DEFINED)))
        .unzip();
    let mut merges = Vec::new();
    if let Some(m) = model.get("merges").and_then(J::as_array) {
        merges.reserve(m.len());
        for x in m {
            match x {
                J::String(s) => merges.push(s.clone()),
                J::Array(p) if p.len() == 2 => match (p[0].as_str(), p[1].as_str()) {
                    (Some(a), Some(b)) => merges.push(format!("{a} {b}")),
                    _ => bail!("tokenizer.json: bad merge {x}"),
                },
                _ => bail!("tokenizer.json: bad merge {x}"),
            }
        }
    }
    let mut t = TokenizerData {
        model: "gpt2".into(),
        pre: pre_tokenizer_name(tj.get("pre_tokenizer")).into(),
        tokens,
        token_types,
        merges,
        ..Default::default()
    };
    if let Some(cfg) = tokenizer_config_json {
        let c: J = serde_json::from_str(cfg).context("tokenizer_config.json is not valid JSON")?;
        let lookup = |key: &str| -> Option<u32> {
            let v = c.get(key)?;
            let s = v
                .as_str()
                .or_else(|| v.get("content").and_then(J::as_str))?;
            t.tokens.iter().position(|x| x == s).map(|p| p as u32)
        };
        let (eos, bos, pad) = (
            lookup("eos_token"),
            lookup("bos_token"),
            lookup("pad_token"),
        );
        t.eos_id = eos;
        t.bos_id = bos;
        t.pad_id = pad;
        t.add_bos = c.get("add_bos_token").and_then(J::as_bool).unwrap_or(false);
        t.chat_template = c.get("chat_template").and_then(J::as_str).map(String::from);
    }
    validate(&t)?;
    Ok(t)
}
