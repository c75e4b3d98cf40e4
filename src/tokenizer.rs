//! Byte-level BPE tokenizer (GPT-2 / Qwen2 style) built from GGUF tokenizer metadata.
//!
//! [`Tokenizer::from_data`] turns a [`TokenizerData`] (`tokenizer.ggml.*`) into a Hugging Face
//! `tokenizers` pipeline equivalent to Qwen2's `tokenizer.json`:
//! - model: BPE over the byte-level alphabet, vocabulary = `tokens`, `merges` ("a b", by priority);
//! - normalizer: NFC;
//! - pre-tokenizer: `Split(QWEN2_PRETOKENIZER_REGEX, Isolated)` then
//!   `ByteLevel(add_prefix_space = false, use_regex = false)`;
//! - decoder: ByteLevel;
//! - tokens of GGUF type 3 (control, e.g. `<|im_end|>`) and 4 (user-defined, e.g. `<tool_call>`)
//!   are added tokens, matched whole in the raw text (before normalization);
//! - no BOS is added, no post-processing.
//!
//! [`StreamDecoder`] turns generated ids into text pieces one id at a time without ever cutting a
//! UTF-8 character in half.

use std::collections::HashMap;

use anyhow::{anyhow, bail, Context, Result};
use cubeqwen_loaders::TokenizerData;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::normalizers::unicode::NFC;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, PreTokenizerWrapper, SplitDelimiterBehavior};

/// The Qwen2 pre-tokenizer split regex (`tokenizer.ggml.pre` = "qwen2").
pub const QWEN2_PRETOKENIZER_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// GGUF token type: normal token.
pub const TOKEN_TYPE_NORMAL: i32 = 1;
/// GGUF token type: control token (`<|endoftext|>`, `<|im_start|>`, `<|im_end|>`, ...).
pub const TOKEN_TYPE_CONTROL: i32 = 3;
/// GGUF token type: user-defined token (`<tool_call>`, ...).
pub const TOKEN_TYPE_USER_DEFINED: i32 = 4;

/// Names of end-of-turn / end-of-text tokens that also stop generation when present.
const EXTRA_EOS_TOKENS: [&str; 2] = ["<|im_end|>", "<|endoftext|>"];

/// GPT-2 `bytes_to_unicode`: the printable character standing for each byte.
fn byte_to_char_table() -> [char; 256] {
    let mut table = ['\0'; 256];
    let mut extra = 0u32;
    for b in 0..256u32 {
        let printable =
            (0x21..=0x7E).contains(&b) || (0xA1..=0xAC).contains(&b) || (0xAE..=0xFF).contains(&b);
        let c = if printable {
            b
        } else {
            extra += 1;
            255 + extra
        };
        table[b as usize] = char::from_u32(c).expect("byte-level chars are valid");
    }
    table
}

/// Inverse of [`byte_to_char_table`], indexed by char code (all codes are < 324).
fn char_to_byte_table() -> Vec<Option<u8>> {
    let mut inv = vec![None; 324];
    for (b, c) in byte_to_char_table().iter().enumerate() {
        inv[*c as usize] = Some(b as u8);
    }
    inv
}

/// A byte-level BPE tokenizer for Qwen2-family models.
#[derive(Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    tokens: Vec<String>,
    token_types: Vec<i32>,
    token_ids: HashMap<String, u32>,
    char_to_byte: Vec<Option<u8>>,
    eos_ids: Vec<u32>,
    bos_id: Option<u32>,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab_size", &self.tokens.len())
            .field("eos_ids", &self.eos_ids)
            .field("bos_id", &self.bos_id)
            .finish()
    }
}

impl Tokenizer {
    /// Builds the tokenizer from GGUF-style metadata.
    ///
    /// Errors when the model is not byte-level BPE (`gpt2`), the pre-tokenizer is unknown, the
    /// token types do not match the tokens, a merge is malformed or names unknown tokens, or a
    /// token appears twice.
    pub fn from_data(data: &TokenizerData) -> Result<Self> {
        if data.model != "gpt2" {
            bail!(
                "unsupported tokenizer model `{}`: only byte-level BPE (`gpt2`, as used by Qwen2) is supported",
                data.model
            );
        }
        // An empty `pre` (e.g. metadata without `tokenizer.ggml.pre`) is taken as Qwen2's.
        let regex = match data.pre.as_str() {
            "qwen2" | "" => QWEN2_PRETOKENIZER_REGEX,
            other => bail!("unsupported BPE pre-tokenizer `{other}`: only `qwen2` is supported"),
        };
        if data.tokens.is_empty() {
            bail!("tokenizer has no tokens");
        }
        if data.tokens.len() > u32::MAX as usize {
            bail!("tokenizer has too many tokens ({})", data.tokens.len());
        }
        if data.token_types.len() != data.tokens.len() {
            bail!(
                "tokenizer has {} tokens but {} token types",
                data.tokens.len(),
                data.token_types.len()
            );
        }

        let mut vocab: HashMap<String, u32> = HashMap::with_capacity(data.tokens.len());
        for (id, tok) in data.tokens.iter().enumerate() {
            if let Some(prev) = vocab.insert(tok.clone(), id as u32) {
                bail!("token {tok:?} appears twice in the vocabulary (ids {prev} and {id})");
            }
        }

        let mut merges = Vec::with_capacity(data.merges.len());
        for (i, m) in data.merges.iter().enumerate() {
            let (a, b) = m
                .split_once(' ')
                .ok_or_else(|| anyhow!("merge #{i} {m:?} is not of the form \"a b\""))?;
            if a.is_empty() || b.is_empty() || b.contains(' ') {
                bail!("merge #{i} {m:?} is not of the form \"a b\"");
            }
            merges.push((a.to_string(), b.to_string()));
        }

        let bpe = BPE::builder()
            .vocab_and_merges(
                vocab
                    .iter()
                    .map(|(k, &v)| (k.clone(), v))
                    .collect::<Vocab>(),
                merges,
            )
            .build()
            .map_err(|e| anyhow!("building the BPE model failed: {e}"))?;

        let split = Split::new(
            SplitPattern::Regex(regex.to_string()),
            SplitDelimiterBehavior::Isolated,
            false,
        )
        .map_err(|e| anyhow!("compiling the pre-tokenizer regex failed: {e}"))?;
        let pre = Sequence::new(vec![
            PreTokenizerWrapper::Split(split),
            PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, false, false)),
        ]);

        let mut inner = tokenizers::Tokenizer::new(bpe);
        inner
            .with_normalizer(Some(NFC))
            .with_pre_tokenizer(Some(pre))
            .with_decoder(Some(ByteLevelDecoder::default()));

        let added: Vec<AddedToken> = data
            .tokens
            .iter()
            .zip(&data.token_types)
            .filter(|(_, &t)| t == TOKEN_TYPE_CONTROL || t == TOKEN_TYPE_USER_DEFINED)
            .map(|(tok, &t)| {
                AddedToken::from(tok.clone(), t == TOKEN_TYPE_CONTROL).normalized(false)
            })
            .collect();
        inner.add_special_tokens(&added);
        // The added tokens must keep their GGUF ids (they are in the model vocabulary).
        for tok in &added {
            let want = vocab[&tok.content];
            let got = inner.token_to_id(&tok.content);
            if got != Some(want) {
                bail!(
                    "added token {:?} got id {got:?}, expected {want}",
                    tok.content
                );
            }
        }

        let mut eos_ids = Vec::new();
        if let Some(eos) = data.eos_id {
            if eos as usize >= data.tokens.len() {
                bail!(
                    "eos id {eos} is outside the vocabulary ({})",
                    data.tokens.len()
                );
            }
            eos_ids.push(eos);
        }
        for name in EXTRA_EOS_TOKENS {
            if let Some(&id) = vocab.get(name) {
                if !eos_ids.contains(&id) {
                    eos_ids.push(id);
                }
            }
        }
        let bos_id = data.bos_id.filter(|&b| (b as usize) < data.tokens.len());

        Ok(Self {
            inner,
            tokens: data.tokens.clone(),
            token_types: data.token_types.clone(),
            token_ids: vocab,
            char_to_byte: char_to_byte_table(),
            eos_ids,
            bos_id,
        })
    }

    /// Token ids of `text`. Control and user-defined tokens written in the text (e.g.
    /// `<|im_start|>`) become their single ids. No BOS is added.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode_fast(text, false)
            .map_err(|e| anyhow!("tokenizing failed: {e}"))?;
        Ok(enc.get_ids().to_vec())
    }

    /// The text of `ids`. Special tokens are written as their text (`<|im_end|>`); byte sequences
    /// that are not valid UTF-8 become U+FFFD. Errors on an id outside the vocabulary.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        for &id in ids {
            self.check_id(id)?;
        }
        self.inner
            .decode(ids, false)
            .map_err(|e| anyhow!("decoding failed: {e}"))
    }

    /// The vocabulary entry of `id`, as stored (byte-level characters, e.g. `Ġthe`).
    pub fn token_str(&self, id: u32) -> Result<&str> {
        self.check_id(id)?;
        Ok(&self.tokens[id as usize])
    }

    /// The raw bytes `id` stands for: the text of control/user-defined tokens, else the bytes
    /// behind the byte-level characters (possibly part of a UTF-8 character).
    pub fn token_bytes(&self, id: u32) -> Result<Vec<u8>> {
        self.check_id(id)?;
        let tok = &self.tokens[id as usize];
        if self.is_added(id) {
            return Ok(tok.as_bytes().to_vec());
        }
        let mut out = Vec::with_capacity(tok.len());
        for c in tok.chars() {
            match self.char_to_byte.get(c as usize).copied().flatten() {
                Some(b) => out.push(b),
                // Not a byte-level token: its text as-is (like the HF ByteLevel decoder).
                None => return Ok(tok.as_bytes().to_vec()),
            }
        }
        Ok(out)
    }

    /// The id of the vocabulary entry `token` (as stored, e.g. `<|im_end|>` or `Ġthe`).
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.token_ids.get(token).copied()
    }

    /// Number of tokens in the vocabulary (151936 for Qwen2.5 GGUFs).
    pub fn vocab_size(&self) -> usize {
        self.tokens.len()
    }

    /// Ids that end generation: `eos_id`, then `<|im_end|>` and `<|endoftext|>` when present
    /// (Qwen2.5: `[151645, 151643]`).
    pub fn eos_ids(&self) -> Vec<u32> {
        self.eos_ids.clone()
    }

    /// Whether `id` ends generation (see [`Tokenizer::eos_ids`]).
    pub fn is_eos(&self, id: u32) -> bool {
        self.eos_ids.contains(&id)
    }

    /// The BOS id from the metadata, if any. Qwen2 adds no BOS when encoding.
    pub fn bos_id(&self) -> Option<u32> {
        self.bos_id
    }

    /// Whether `id` is a control token (GGUF type 3: `<|endoftext|>`, `<|im_start|>`, ...).
    /// User-defined tokens such as `<tool_call>` are not special (see [`Tokenizer::is_added`]).
    pub fn is_special(&self, id: u32) -> bool {
        self.token_types.get(id as usize) == Some(&TOKEN_TYPE_CONTROL)
    }

    /// Whether `id` is matched whole in text: control (3) or user-defined (4) token.
    pub fn is_added(&self, id: u32) -> bool {
        matches!(
            self.token_types.get(id as usize),
            Some(&TOKEN_TYPE_CONTROL) | Some(&TOKEN_TYPE_USER_DEFINED)
        )
    }

    /// A [`StreamDecoder`] over this tokenizer.
    pub fn stream_decoder(&self) -> StreamDecoder<'_> {
        StreamDecoder::new(self)
    }

    fn check_id(&self, id: u32) -> Result<()> {
        if (id as usize) < self.tokens.len() {
            Ok(())
        } else {
            Err(anyhow!(
                "token id {id} is outside the vocabulary ({} tokens)",
                self.tokens.len()
            ))
        }
    }
}

/// Incremental detokenizer: feed generated ids one at a time, get text pieces that never end in
/// the middle of a UTF-8 character (incomplete bytes are held back until completed).
#[derive(Debug, Clone)]
pub struct StreamDecoder<'a> {
    tokenizer: &'a Tokenizer,
    pending: Vec<u8>,
}

impl<'a> StreamDecoder<'a> {
    pub fn new(tokenizer: &'a Tokenizer) -> Self {
        Self {
            tokenizer,
            pending: Vec::new(),
        }
    }

    /// Adds `id`; returns the text completed by it (often the whole token, possibly empty while a
    /// multi-byte character is incomplete). Invalid byte sequences become U+FFFD.
    pub fn push(&mut self, id: u32) -> Result<String> {
        let bytes = self
            .tokenizer
            .token_bytes(id)
            .with_context(|| "stream decoding")?;
        self.pending.extend_from_slice(&bytes);
        let mut out = String::new();
        loop {
            match std::str::from_utf8(&self.pending) {
                Ok(s) => {
                    out.push_str(s);
                    self.pending.clear();
                    break;
                }
                Err(e) => {
                    let valid = e.valid_up_to();
                    out.push_str(
                        std::str::from_utf8(&self.pending[..valid]).expect("valid prefix"),
                    );
                    match e.error_len() {
                        // Incomplete character at the end: hold it back.
                        None => {
                            self.pending.drain(..valid);
                            break;
                        }
                        Some(n) => {
                            out.push(char::REPLACEMENT_CHARACTER);
                            self.pending.drain(..valid + n);
                        }
                    }
                }
            }
        }
        Ok(out)
    }

    /// Whether bytes of an incomplete character are held back.
    pub fn has_pending(&self) -> bool {
        !self.pending.is_empty()
    }

    /// Ends the stream: returns what is held back (an incomplete character becomes U+FFFD).
    pub fn flush(&mut self) -> String {
        let s = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending.clear();
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tiny byte-level vocabulary: the 256 byte tokens (id = byte value), a few merges, then
    /// control tokens and one user-defined token.
    fn tiny_data() -> TokenizerData {
        let table = byte_to_char_table();
        let mut tokens: Vec<String> = table.iter().map(|c| c.to_string()).collect();
        let merges: Vec<String> = ["h e", "l l", "he ll", "hell o", "Ġ w", "Ġw o", "' M"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        for m in &merges {
            tokens.push(m.replace(' ', ""));
        }
        let mut token_types = vec![TOKEN_TYPE_NORMAL; tokens.len()];
        for (t, ty) in [
            ("<|endoftext|>", TOKEN_TYPE_CONTROL),
            ("<|im_start|>", TOKEN_TYPE_CONTROL),
            ("<|im_end|>", TOKEN_TYPE_CONTROL),
            ("<tool_call>", TOKEN_TYPE_USER_DEFINED),
        ] {
            tokens.push(t.to_string());
            token_types.push(ty);
        }
        TokenizerData {
            model: "gpt2".into(),
            pre: "qwen2".into(),
            tokens,
            token_types,
            merges,
            eos_id: Some(265), // <|im_end|>
            bos_id: Some(263),
            pad_id: None,
            add_bos: false,
            chat_template: None,
        }
    }

    fn tiny() -> Tokenizer {
        Tokenizer::from_data(&tiny_data()).unwrap()
    }

    fn id(t: &Tokenizer, s: &str) -> u32 {
        t.token_to_id(s).unwrap()
    }

    #[test]
    fn byte_table_is_a_bijection() {
        let table = byte_to_char_table();
        assert_eq!(table[b'a' as usize], 'a');
        assert_eq!(table[b' ' as usize], 'Ġ');
        assert_eq!(table[b'\n' as usize], 'Ċ');
        let inv = char_to_byte_table();
        for (b, c) in table.iter().enumerate() {
            assert_eq!(inv[*c as usize], Some(b as u8));
        }
        assert_eq!(inv.iter().filter(|x| x.is_some()).count(), 256);
    }

    #[test]
    fn encodes_with_merges_and_specials() {
        let t = tiny();
        assert_eq!(t.encode("hello").unwrap(), vec![id(&t, "hello")]);
        // " world": the pre-tokenizer keeps the space with the word; "Ġw o" merges.
        let ids = t.encode("hello world").unwrap();
        assert_eq!(
            ids,
            vec![
                id(&t, "hello"),
                id(&t, "Ġwo"),
                b'r' as u32,
                b'l' as u32,
                b'd' as u32
            ]
        );
        // Specials are matched whole, even glued to text.
        let ids = t.encode("<|im_start|>hello<|im_end|><tool_call>").unwrap();
        assert_eq!(
            ids,
            vec![
                id(&t, "<|im_start|>"),
                id(&t, "hello"),
                id(&t, "<|im_end|>"),
                id(&t, "<tool_call>")
            ]
        );
        // Case matters for BPE; the contraction 'M is one pre-token and merges.
        assert_eq!(t.encode("I'M").unwrap(), vec![b'I' as u32, id(&t, "'M")]);
        assert!(t.encode("").unwrap().is_empty());
    }

    #[test]
    fn nfc_normalizes_input() {
        let t = tiny();
        // "e" + combining acute -> "é" (U+00E9, bytes C3 A9).
        assert_eq!(t.encode("e\u{301}").unwrap(), vec![0xC3, 0xA9]);
    }

    #[test]
    fn decode_roundtrip_and_errors() {
        let t = tiny();
        for s in [
            "hello world",
            "naïve café 東京 😀\n\t  x",
            "a<|im_end|>b<tool_call>",
        ] {
            let ids = t.encode(s).unwrap();
            assert_eq!(t.decode(&ids).unwrap(), s);
        }
        assert!(t.decode(&[1_000_000]).is_err());
        assert!(t.token_str(1_000_000).is_err());
        assert!(t.token_bytes(u32::MAX).is_err());
        assert_eq!(t.token_str(b' ' as u32).unwrap(), "Ġ");
        assert_eq!(t.token_bytes(id(&t, "Ġwo")).unwrap(), b" wo");
    }

    #[test]
    fn eos_special_and_vocab() {
        let t = tiny();
        assert_eq!(t.vocab_size(), 256 + 7 + 4);
        assert_eq!(
            t.eos_ids(),
            vec![id(&t, "<|im_end|>"), id(&t, "<|endoftext|>")]
        );
        assert!(t.is_eos(id(&t, "<|endoftext|>")));
        assert!(!t.is_eos(b'a' as u32));
        assert!(t.is_special(id(&t, "<|im_start|>")));
        assert!(!t.is_special(id(&t, "<tool_call>")));
        assert!(t.is_added(id(&t, "<tool_call>")));
        assert!(!t.is_special(b'a' as u32));
        assert!(!t.is_special(u32::MAX));
    }

    #[test]
    fn rejects_bad_metadata() {
        let mut d = tiny_data();
        d.model = "llama".into();
        let e = Tokenizer::from_data(&d).unwrap_err().to_string();
        assert!(e.contains("unsupported tokenizer model `llama`"), "{e}");

        let mut d = tiny_data();
        d.pre = "deepseek-llm".into();
        assert!(Tokenizer::from_data(&d).is_err());

        let mut d = tiny_data();
        d.merges.push("q".into());
        assert!(Tokenizer::from_data(&d).is_err());

        let mut d = tiny_data();
        d.merges.push("x y".into()); // "xy" is not in the vocabulary
        assert!(Tokenizer::from_data(&d).is_err());

        let mut d = tiny_data();
        d.token_types.pop();
        assert!(Tokenizer::from_data(&d).is_err());

        let mut d = tiny_data();
        d.tokens.push("a".into());
        d.token_types.push(TOKEN_TYPE_NORMAL);
        assert!(Tokenizer::from_data(&d).is_err());

        let mut d = tiny_data();
        d.eos_id = Some(100_000);
        assert!(Tokenizer::from_data(&d).is_err());
    }

    #[test]
    fn stream_decoder_holds_back_partial_characters() {
        let t = tiny();
        let text = "hello 東京 😀 naïve!";
        let ids = t.encode(text).unwrap();
        let mut dec = t.stream_decoder();
        let mut out = String::new();
        let mut held = 0;
        for &i in &ids {
            let piece = dec.push(i).unwrap();
            assert!(!piece.contains(char::REPLACEMENT_CHARACTER));
            if dec.has_pending() {
                held += 1;
            }
            out.push_str(&piece);
        }
        out.push_str(&dec.flush());
        assert_eq!(out, text);
        // The tiny vocabulary has single-byte tokens only, so multi-byte chars were held back.
        assert!(held >= 5, "held back {held} times");
    }

    #[test]
    fn stream_decoder_replaces_invalid_bytes() {
        let t = tiny();
        let mut dec = t.stream_decoder();
        // 0xE6 starts a 3-byte char; 'a' breaks it.
        assert_eq!(dec.push(0xE6).unwrap(), "");
        assert_eq!(dec.push(b'a' as u32).unwrap(), "\u{FFFD}a");
        // A dangling lead byte at the end is flushed as U+FFFD.
        assert_eq!(dec.push(0xF0).unwrap(), "");
        assert_eq!(dec.flush(), "\u{FFFD}");
        assert!(dec.push(1_000_000).is_err());
        // Special tokens come out as their text.
        let im_end = id(&t, "<|im_end|>");
        assert_eq!(dec.push(im_end).unwrap(), "<|im_end|>");
    }
}
