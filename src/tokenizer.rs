//! Byte-level BPE tokenizer (GPT-2 / Qwen2 style) on Hugging Face `tokenizers`.
//!
//! - A Hugging Face checkpoint directory: its `tokenizer.json`, loaded by `tokenizers` as is
//!   ([`Tokenizer::from_hf_file`]).
//! - A GGUF file: [`Tokenizer::from_data`] builds from `tokenizer.ggml.*` the pipeline Qwen2's
//!   `tokenizer.json` describes: BPE over the byte-level alphabet (vocabulary = `tokens`,
//!   `merges` by priority), NFC, `Split(QWEN2_PRETOKENIZER_REGEX, Isolated)` then
//!   `ByteLevel(add_prefix_space = false, use_regex = false)`, the ByteLevel decoder; tokens of
//!   GGUF type 3 (control, `<|im_end|>`) and 4 (user-defined, `<tool_call>`) are added tokens,
//!   matched whole in the raw text. Only `tokenizer.ggml.pre = "qwen2"` is known.
//!
//! No BOS is added, no post-processing. [`StreamDecoder`] turns generated ids into text one id
//! at a time (on `tokenizers`' `DecodeStream`) without ever cutting a UTF-8 character in half.

use std::path::Path;

use anyhow::{anyhow, bail, Result};
use cubeqwen_loaders::tokenizer::{QWEN2_PRETOKENIZER_REGEX, TOKEN_CONTROL, TOKEN_USER_DEFINED};
use cubeqwen_loaders::TokenizerData;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::normalizers::unicode::NFC;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{
    AddedToken, DecoderWrapper, ModelWrapper, NormalizerWrapper, PostProcessorWrapper,
    PreTokenizerWrapper, SplitDelimiterBehavior,
};

/// Names of end-of-turn / end-of-text tokens that also stop generation when present.
const EXTRA_EOS_TOKENS: [&str; 2] = ["<|im_end|>", "<|endoftext|>"];

/// A byte-level BPE tokenizer for Qwen2-family models.
#[derive(Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    /// Size of the vocabulary, added tokens included (`tokenizers` counts it by building the
    /// whole vocabulary map, so it is counted once).
    vocab_size: usize,
    eos_ids: Vec<u32>,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab_size", &self.vocab_size())
            .field("eos_ids", &self.eos_ids)
            .finish()
    }
}

impl Tokenizer {
    /// The tokenizer of the model at `path`: a checkpoint directory's `tokenizer.json`
    /// ([`Tokenizer::from_hf_file`]), else the GGUF metadata in `data` ([`Tokenizer::from_data`]).
    /// `data` is what the loader read from `path`.
    pub fn for_model(path: &Path, data: &TokenizerData) -> Result<Self> {
        if path.is_dir() {
            Self::from_hf_file(&path.join("tokenizer.json"), data.eos_id)
        } else {
            Self::from_data(data)
        }
    }

    /// Loads a Hugging Face `tokenizer.json`; `eos_id` is the end-of-sequence id of
    /// `tokenizer_config.json`, if any.
    pub fn from_hf_file(path: &Path, eos_id: Option<u32>) -> Result<Self> {
        let inner = tokenizers::Tokenizer::from_file(path)
            .map_err(|e| anyhow!("{}: cannot load the tokenizer: {e}", path.display()))?;
        Self::with_eos(inner, eos_id)
    }

    /// Builds the tokenizer from GGUF-style metadata.
    ///
    /// Errors when the model is not byte-level BPE (`gpt2`), the pre-tokenizer is not `qwen2`
    /// (also when it is missing), the token types do not match the tokens, a merge is malformed
    /// or names unknown tokens, or a token appears twice.
    pub fn from_data(data: &TokenizerData) -> Result<Self> {
        if data.model != "gpt2" {
            bail!(
                "unsupported tokenizer model `{}`: only byte-level BPE (`gpt2`, as used by Qwen2) is supported",
                data.model
            );
        }
        if data.pre != "qwen2" {
            bail!(
                "unsupported BPE pre-tokenizer `{}` (tokenizer.ggml.pre): only `qwen2` is supported",
                data.pre
            );
        }
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

        let mut vocab = Vocab::with_capacity(data.tokens.len());
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
            .vocab_and_merges(vocab, merges)
            .build()
            .map_err(|e| anyhow!("building the BPE model failed: {e}"))?;

        let split = Split::new(
            SplitPattern::Regex(QWEN2_PRETOKENIZER_REGEX.to_string()),
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
            .filter(|(_, &t)| t == TOKEN_CONTROL || t == TOKEN_USER_DEFINED)
            .map(|(tok, &t)| AddedToken::from(tok.clone(), t == TOKEN_CONTROL).normalized(false))
            .collect();
        inner.add_special_tokens(&added);
        // The added tokens must keep their GGUF ids (they are in the model vocabulary).
        for (id, (tok, &t)) in data.tokens.iter().zip(&data.token_types).enumerate() {
            if t == TOKEN_CONTROL || t == TOKEN_USER_DEFINED {
                let got = inner.token_to_id(tok);
                if got != Some(id as u32) {
                    bail!("added token {tok:?} got id {got:?}, expected {id}");
                }
            }
        }
        Self::with_eos(inner, data.eos_id)
    }

    /// `eos_id` (checked against the vocabulary), then `<|im_end|>` and `<|endoftext|>` when
    /// present, end generation.
    fn with_eos(inner: tokenizers::Tokenizer, eos_id: Option<u32>) -> Result<Self> {
        let mut t = Self {
            vocab_size: inner.get_vocab_size(true),
            inner,
            eos_ids: Vec::new(),
        };
        if let Some(eos) = eos_id {
            t.check_id(eos).map_err(|e| anyhow!("eos id {eos}: {e}"))?;
            t.eos_ids.push(eos);
        }
        for name in EXTRA_EOS_TOKENS {
            if let Some(id) = t.inner.token_to_id(name) {
                if !t.eos_ids.contains(&id) {
                    t.eos_ids.push(id);
                }
            }
        }
        Ok(t)
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
    pub fn token_str(&self, id: u32) -> Result<String> {
        self.check_id(id)?;
        self.inner
            .id_to_token(id)
            .ok_or_else(|| anyhow!("token id {id} has no vocabulary entry"))
    }

    /// The id of the vocabulary entry `token` (as stored, e.g. `<|im_end|>` or `Ġthe`).
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// Number of tokens in the vocabulary, added tokens included (151936 for Qwen2.5 GGUFs).
    pub fn vocab_size(&self) -> usize {
        self.vocab_size
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

    /// Whether `id` is a special (control) token: `<|endoftext|>`, `<|im_start|>`, ...
    /// User-defined tokens such as `<tool_call>` are not special (see [`Tokenizer::is_added`]).
    pub fn is_special(&self, id: u32) -> bool {
        let added = self.inner.get_added_vocabulary();
        added
            .simple_id_to_token(id)
            .is_some_and(|t| added.is_special_token(&t))
    }

    /// Whether `id` is matched whole in text: a control or user-defined (added) token.
    pub fn is_added(&self, id: u32) -> bool {
        self.inner
            .get_added_vocabulary()
            .simple_id_to_token(id)
            .is_some()
    }

    /// A [`StreamDecoder`] over this tokenizer.
    pub fn stream_decoder(&self) -> StreamDecoder<'_> {
        StreamDecoder {
            tokenizer: self,
            stream: self.inner.decode_stream(false),
            held: Vec::new(),
        }
    }

    fn check_id(&self, id: u32) -> Result<()> {
        if self.inner.id_to_token(id).is_some() {
            Ok(())
        } else {
            Err(anyhow!(
                "token id {id} is outside the vocabulary ({} tokens)",
                self.vocab_size
            ))
        }
    }
}

/// Incremental detokenizer: feed generated ids one at a time, get text pieces that never end in
/// the middle of a UTF-8 character (`tokenizers`' `DecodeStream` holds incomplete bytes back).
pub struct StreamDecoder<'a> {
    tokenizer: &'a Tokenizer,
    stream: tokenizers::DecodeStream<
        'a,
        ModelWrapper,
        NormalizerWrapper,
        PreTokenizerWrapper,
        PostProcessorWrapper,
        DecoderWrapper,
    >,
    /// Ids pushed since the stream last produced text.
    held: Vec<u32>,
}

impl StreamDecoder<'_> {
    /// Adds `id`; returns the text completed by it (often the whole token, empty while a
    /// multi-byte character is incomplete). Invalid byte sequences become U+FFFD.
    pub fn push(&mut self, id: u32) -> Result<String> {
        self.tokenizer.check_id(id)?;
        match self
            .stream
            .step(id)
            .map_err(|e| anyhow!("stream decoding failed: {e}"))?
        {
            Some(text) => {
                self.held.clear();
                Ok(text)
            }
            None => {
                self.held.push(id);
                Ok(String::new())
            }
        }
    }

    /// Ends the stream: returns what is held back (an incomplete character becomes U+FFFD).
    pub fn flush(self) -> Result<String> {
        self.tokenizer.decode(&self.held)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cubeqwen_loaders::tokenizer::TOKEN_NORMAL;

    /// The 256 byte-level characters, in char order (the first 256 tokens of the tiny vocabulary).
    fn byte_chars() -> Vec<char> {
        let mut a: Vec<char> = ByteLevel::alphabet().into_iter().collect();
        a.sort_unstable();
        a
    }

    /// A tiny byte-level vocabulary: the 256 byte tokens, a few merges, then control tokens and
    /// one user-defined token.
    fn tiny_data() -> TokenizerData {
        let mut tokens: Vec<String> = byte_chars().iter().map(|c| c.to_string()).collect();
        let merges: Vec<String> = ["h e", "l l", "he ll", "hell o", "Ġ w", "Ġw o", "' M"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        for m in &merges {
            tokens.push(m.replace(' ', ""));
        }
        let mut token_types = vec![TOKEN_NORMAL; tokens.len()];
        for (t, ty) in [
            ("<|endoftext|>", TOKEN_CONTROL),
            ("<|im_start|>", TOKEN_CONTROL),
            ("<|im_end|>", TOKEN_CONTROL),
            ("<tool_call>", TOKEN_USER_DEFINED),
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

    /// The ids of the single-byte tokens `s` is made of (the tiny vocabulary merges no
    /// non-ASCII bytes).
    fn byte_ids(t: &Tokenizer, s: &str) -> Vec<u32> {
        let ids = t.encode(s).unwrap();
        assert_eq!(ids.len(), s.len(), "{s:?} is not all single-byte tokens");
        ids
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
                id(&t, "r"),
                id(&t, "l"),
                id(&t, "d")
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
        assert_eq!(t.encode("I'M").unwrap(), vec![id(&t, "I"), id(&t, "'M")]);
        assert!(t.encode("").unwrap().is_empty());
    }

    #[test]
    fn nfc_normalizes_input() {
        let t = tiny();
        // "e" + combining acute -> "é" (U+00E9, bytes C3 A9: two byte tokens).
        assert_eq!(t.encode("e\u{301}").unwrap(), byte_ids(&t, "\u{e9}"));
        assert_eq!(t.decode(&t.encode("e\u{301}").unwrap()).unwrap(), "\u{e9}");
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
        assert_eq!(t.token_str(id(&t, "Ġ")).unwrap(), "Ġ");
        assert_eq!(t.decode(&[id(&t, "Ġwo")]).unwrap(), " wo");
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
        assert!(!t.is_eos(id(&t, "a")));
        assert!(t.is_special(id(&t, "<|im_start|>")));
        assert!(!t.is_special(id(&t, "<tool_call>")));
        assert!(t.is_added(id(&t, "<tool_call>")));
        assert!(!t.is_added(id(&t, "a")));
        assert!(!t.is_special(id(&t, "a")));
        assert!(!t.is_special(u32::MAX));
    }

    #[test]
    fn rejects_bad_metadata() {
        let mut d = tiny_data();
        d.model = "llama".into();
        let e = Tokenizer::from_data(&d).unwrap_err().to_string();
        assert!(e.contains("unsupported tokenizer model `llama`"), "{e}");

        // An unknown or missing pre-tokenizer is an error, never taken as qwen2.
        for pre in ["deepseek-llm", ""] {
            let mut d = tiny_data();
            d.pre = pre.into();
            let e = Tokenizer::from_data(&d).unwrap_err().to_string();
            assert!(e.contains(&format!("pre-tokenizer `{pre}`")), "{e}");
        }

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
        d.token_types.push(TOKEN_NORMAL);
        assert!(Tokenizer::from_data(&d).is_err());

        let mut d = tiny_data();
        d.eos_id = Some(100_000);
        assert!(Tokenizer::from_data(&d).is_err());
    }

    /// Streams `ids` through a decoder, checking no piece holds half a character.
    fn stream(t: &Tokenizer, ids: &[u32]) -> (String, usize) {
        let mut dec = t.stream_decoder();
        let mut out = String::new();
        let mut empty = 0;
        for &i in ids {
            let piece = dec.push(i).unwrap();
            assert!(!piece.contains(char::REPLACEMENT_CHARACTER), "{piece:?}");
            empty += usize::from(piece.is_empty());
            out.push_str(&piece);
        }
        out.push_str(&dec.flush().unwrap());
        (out, empty)
    }

    #[test]
    fn stream_decoder_holds_back_partial_characters() {
        let t = tiny();
        let text = "hello 東京 😀 naïve!";
        let (out, held) = stream(&t, &t.encode(text).unwrap());
        assert_eq!(out, text);
        // The tiny vocabulary has single-byte tokens only, so multi-byte chars were held back.
        assert!(held >= 5, "held back {held} times");
    }

    #[test]
    fn stream_decoder_replaces_invalid_bytes() {
        let t = tiny();
        let lead_e6 = byte_ids(&t, "東")[0]; // starts a 3-byte char
        let lead_f0 = byte_ids(&t, "😀")[0]; // starts a 4-byte char
        let mut dec = t.stream_decoder();
        // 'a' breaks the 3-byte char.
        assert_eq!(dec.push(lead_e6).unwrap(), "");
        assert_eq!(dec.push(id(&t, "a")).unwrap(), "\u{FFFD}a");
        assert!(dec.push(1_000_000).is_err());
        // Special tokens come out as their text.
        assert_eq!(dec.push(id(&t, "<|im_end|>")).unwrap(), "<|im_end|>");
        // A dangling lead byte at the end is flushed as U+FFFD.
        assert_eq!(dec.push(lead_f0).unwrap(), "");
        assert_eq!(dec.flush().unwrap(), "\u{FFFD}");
    }

    #[test]
    fn tokenizer_json_loads_like_the_gguf_pipeline() {
        let t = tiny();
        let dir = std::env::temp_dir().join(format!("cq-tokjson-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("tokenizer.json");
        t.inner.save(&path, false).unwrap();
        // Metadata the GGUF path would refuse: only the file can have built `h`.
        let data = TokenizerData {
            pre: "not-qwen2".into(),
            ..tiny_data()
        };
        let h = Tokenizer::for_model(&dir, &data).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        for s in [
            "hello world",
            "<|im_start|>x 東京 😀<|im_end|><tool_call>",
            "I'M\r\n 12",
        ] {
            let ids = t.encode(s).unwrap();
            assert_eq!(h.encode(s).unwrap(), ids, "{s:?}");
            assert_eq!(h.decode(&ids).unwrap(), s);
            assert_eq!(stream(&h, &ids).0, s);
        }
        assert_eq!(h.eos_ids(), t.eos_ids());
        assert_eq!(h.vocab_size(), t.vocab_size());
        assert!(h.is_special(id(&t, "<|im_end|>")) && !h.is_special(id(&t, "<tool_call>")));
        assert!(Tokenizer::from_hf_file(Path::new("/nonexistent/tokenizer.json"), None).is_err());
    }

    #[test]
    fn random_test_tokenizer_is_usable() {
        // The loaders' synthetic tokenizer (random models) encodes and decodes any text.
        let t = Tokenizer::from_data(&cubeqwen_loaders::byte_level_tokenizer(400, 3)).unwrap();
        let s = "<|im_start|>user\nnaïve 東京 😀 x<|im_end|>";
        assert_eq!(t.decode(&t.encode(s).unwrap()).unwrap(), s);
        assert_eq!(t.eos_ids().len(), 2);
    }
}
