//! A Hugging Face [`tokenizers::Tokenizer`] rebuilt from the `tokenizer.*` metadata of a GGUF file.
//!
//! The build mirrors what `transformers` does for `AutoTokenizer.from_pretrained(dir,
//! gguf_file=...)` (transformers 5.x, `integrations/gguf/gguf_tokenizer_mapping.py`) for a
//! byte-level BPE vocabulary (`tokenizer.ggml.model == "gpt2"`), so ids match that tokenizer:
//!
//! * vocabulary = `tokenizer.ggml.tokens` (a token not spelled in the GPT-2 byte alphabet is
//!   re-spelled byte by byte), merges = `tokenizer.ggml.merges`; BPE with no unk token, no
//!   dropout, no byte fallback;
//! * pre-tokenizer: for the `tokenizer.ggml.pre` values transformers knows (llama3 / llama-bpe,
//!   qwen2, tekken, gpt-4o, ...) a `Split` on that model's regex followed by `ByteLevel` without
//!   regex; otherwise GPT-2's `ByteLevel` (with its built-in regex). Note: llama.cpp splits digits
//!   one by one for `smollm` / `starcoder`; transformers does not, and neither do we (the SmolLM2
//!   vocabulary has no multi-digit tokens, so this only matters for rare numerals like `²³`);
//! * decoder: `ByteLevel`; no normalizer;
//! * added tokens, in transformers' order: `<|endoftext|>` (the default special token of
//!   transformers' `GPT2Tokenizer`, appended as a new id when the vocabulary lacks it), the
//!   tokens typed CONTROL (3) and spelled in the byte alphabet (special), the tokens typed
//!   USER_DEFINED (4) that are in the vocabulary (not special), then the bos / eos / unk / pad
//!   tokens (special);
//! * post-processor: `TemplateProcessing` adding bos when `tokenizer.ggml.add_bos_token` is true
//!   and eos when `tokenizer.ggml.add_eos_token` is true (both default to false).
//!
//! Other tokenizer models (`llama` sentencepiece, `t5`, ...) are reported as
//! [`GgufError::Tokenizer`].

use std::collections::HashMap;

use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{BPE, Vocab};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{AddedToken, PreTokenizerWrapper, SplitDelimiterBehavior, Tokenizer};

use super::{GgufError, GgufFile, GgufValue};

/// Tokens to add, usable with both `tokenizers` 0.22 (`&[AddedToken]`, returns `usize`) and
/// 0.23+ (`impl IntoIterator<Item = AddedToken>`, returns `Result<usize>`).
struct TokenList(Vec<AddedToken>);

impl std::ops::Deref for TokenList {
    type Target = [AddedToken];
    fn deref(&self) -> &[AddedToken] {
        &self.0
    }
}

impl<'a> IntoIterator for &'a TokenList {
    type Item = AddedToken;
    type IntoIter = std::iter::Cloned<std::slice::Iter<'a, AddedToken>>;
    fn into_iter(self) -> Self::IntoIter {
        self.0.iter().cloned()
    }
}

/// The result of `add_tokens` / `add_special_tokens` in either `tokenizers` version.
trait AddOutcome {
    fn into_result(self) -> Result<usize, String>;
}

impl AddOutcome for usize {
    fn into_result(self) -> Result<usize, String> {
        Ok(self)
    }
}

impl<E: std::fmt::Display> AddOutcome for Result<usize, E> {
    fn into_result(self) -> Result<usize, String> {
        self.map_err(|e| e.to_string())
    }
}

/// `tokenizer.ggml.token_type` values (llama.cpp `llama_token_type`).
pub mod token_type {
    pub const NORMAL: i64 = 1;
    pub const UNKNOWN: i64 = 2;
    pub const CONTROL: i64 = 3;
    pub const USER_DEFINED: i64 = 4;
    pub const UNUSED: i64 = 5;
    pub const BYTE: i64 = 6;
}

/// A tokenizer built from GGUF metadata, with the special-token settings the file declares.
#[derive(Clone)]
pub struct GgufTokenizer {
    /// The Hugging Face tokenizer. `encode(text, true)` adds bos/eos as transformers does.
    pub tokenizer: Tokenizer,
    /// `tokenizer.chat_template` (Jinja2), if present.
    pub chat_template: Option<String>,
    /// `tokenizer.ggml.model` (e.g. `"gpt2"`).
    pub model: String,
    /// `tokenizer.ggml.pre` (e.g. `"smollm"`, `"llama-bpe"`), if present.
    pub pre: Option<String>,
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    pub unk_token: Option<String>,
    pub pad_token: Option<String>,
    /// Ids of the tokens above, looked up by content in the built tokenizer (as transformers does;
    /// equal to the `tokenizer.ggml.*_token_id` values for well-formed files).
    pub bos_token_id: Option<u32>,
    pub eos_token_id: Option<u32>,
    pub unk_token_id: Option<u32>,
    pub pad_token_id: Option<u32>,
    /// `tokenizer.ggml.eot_token_id` (end of turn), if present.
    pub eot_token_id: Option<u32>,
    /// Whether `encode(_, true)` prepends bos / appends eos.
    pub add_bos_token: bool,
    pub add_eos_token: bool,
}

impl std::fmt::Debug for GgufTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufTokenizer")
            .field("model", &self.model)
            .field("pre", &self.pre)
            .field("vocab_size", &self.tokenizer.get_vocab_size(true))
            .field("bos", &(&self.bos_token, self.bos_token_id))
            .field("eos", &(&self.eos_token, self.eos_token_id))
            .field("add_bos_token", &self.add_bos_token)
            .field("add_eos_token", &self.add_eos_token)
            .field("chat_template", &self.chat_template.as_ref().map(|t| t.len()))
            .finish()
    }
}

impl GgufTokenizer {
    /// Token ids of `text`; with `add_special_tokens`, bos/eos are added per `add_bos_token` /
    /// `add_eos_token` (what `tokenizer(text)` does in transformers).
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>, tokenizers::Error> {
        Ok(self.tokenizer.encode(text, add_special_tokens)?.get_ids().to_vec())
    }

    /// Text of `ids`.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String, tokenizers::Error> {
        self.tokenizer.decode(ids, skip_special_tokens)
    }

    /// Vocabulary size including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.tokenizer.get_vocab_size(true)
    }
}

/// GPT-2's `bytes_to_unicode`: the printable character standing for each byte.
pub fn bytes_to_unicode() -> [char; 256] {
    let mut map = ['\0'; 256];
    let mut n = 0u32;
    for b in 0..256u32 {
        let printable =
            (b'!' as u32..=b'~' as u32).contains(&b) || (0xA1..=0xAC).contains(&b) || (0xAE..=0xFF).contains(&b);
        map[b as usize] = if printable {
            char::from_u32(b).unwrap_or('\0')
        } else {
            let c = char::from_u32(256 + n).unwrap_or('\0');
            n += 1;
            c
        };
    }
    map
}

const LLAMA3_SPLIT: &str = concat!(
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}",
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
);

const TEKKEN_SPLIT: &str = concat!(
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+",
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*",
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
);

const GPT4O_SPLIT: &str = concat!(
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
);

/// transformers' `models/qwen2/tokenization_qwen2.py` PRETOKENIZE_REGEX.
const QWEN2_SPLIT: &str = concat!(
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}",
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
);

/// transformers' `models/qwen3_5/tokenization_qwen3_5.py` PRETOKENIZE_REGEX.
const QWEN35_SPLIT: &str = concat!(
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}",
    r"| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
);

/// The split regex transformers uses for a `tokenizer.ggml.pre` value (`GGUF_PRE_TOKENIZER_SPLITS`).
pub fn pre_tokenizer_split(pre: &str) -> Option<&'static str> {
    Some(match pre {
        "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "falcon-h1" | "pixtral" | "midm-2.0" | "lfm2"
        | "jina-v5-nano" | "dbrx" | "smaug-bpe" => LLAMA3_SPLIT,
        "tekken" => TEKKEN_SPLIT,
        "qwen2" | "deepseek-r1-qwen" | "kormo" | "f2llmv2" | "megrez" => QWEN2_SPLIT,
        "qwen35" => QWEN35_SPLIT,
        "gpt-4o" | "llama4" | "kanana2" | "talkie" | "minimax-m2" => GPT4O_SPLIT,
        _ => return None,
    })
}

/// Builds the tokenizer described by the file's `tokenizer.*` metadata.
pub fn tokenizer_from_gguf(file: &GgufFile) -> Result<GgufTokenizer, GgufError> {
    let path = file.path().to_path_buf();
    let err = |what: String| GgufError::Tokenizer { path: path.clone(), what };
    let model = file.get_str("tokenizer.ggml.model")?.to_string();
    if model != "gpt2" {
        return Err(err(format!("tokenizer model `{model}` is not supported (only byte-level BPE, `gpt2`)")));
    }
    let pre = match file.get("tokenizer.ggml.pre") {
        Some(_) => Some(file.get_str("tokenizer.ggml.pre")?.to_string()),
        None => None,
    };
    let tokens = file.get_str_array("tokenizer.ggml.tokens")?;
    let merges_raw = match file.get("tokenizer.ggml.merges") {
        Some(_) => file.get_str_array("tokenizer.ggml.merges")?,
        None => return Err(err("byte-level BPE without `tokenizer.ggml.merges`".into())),
    };
    let token_types: Vec<i64> = match file.get("tokenizer.ggml.token_type") {
        Some(v) => v.as_i64_array().ok_or_else(|| GgufError::InvalidMetadata {
            path: path.clone(),
            key: "tokenizer.ggml.token_type".into(),
            what: "expected an array of integers".into(),
        })?,
        None => Vec::new(),
    };
    let opt_bool = |key: &str| -> Result<Option<bool>, GgufError> {
        match file.get(key) {
            Some(_) => file.get_bool(key).map(Some),
            None => Ok(None),
        }
    };
    let opt_id = |key: &str| -> Result<Option<u32>, GgufError> {
        match file.get(key) {
            None => Ok(None),
            Some(v) => v.as_u32().map(Some).ok_or_else(|| GgufError::InvalidMetadata {
                path: path.clone(),
                key: key.into(),
                what: format!("expected a token id, found {v}"),
            }),
        }
    };
    let special = |key: &str| -> Result<Option<String>, GgufError> {
        match opt_id(key)? {
            None => Ok(None),
            Some(id) => {
                tokens.get(id as usize).map(|t| Some(t.to_string())).ok_or_else(|| GgufError::InvalidMetadata {
                    path: path.clone(),
                    key: key.into(),
                    what: format!("token id {id} is out of range for {} tokens", tokens.len()),
                })
            }
        }
    };
    let bos_token = special("tokenizer.ggml.bos_token_id")?;
    let eos_token = special("tokenizer.ggml.eos_token_id")?;
    let unk_token = special("tokenizer.ggml.unknown_token_id")?;
    let pad_token = special("tokenizer.ggml.padding_token_id")?;
    let eot_token_id = opt_id("tokenizer.ggml.eot_token_id")?;
    let mut add_bos_token = opt_bool("tokenizer.ggml.add_bos_token")?.unwrap_or(false);
    let mut add_eos_token = opt_bool("tokenizer.ggml.add_eos_token")?.unwrap_or(false);
    let chat_template = match file.get("tokenizer.chat_template") {
        Some(GgufValue::String(s)) => Some(s.clone()),
        Some(_) => {
            return Err(GgufError::InvalidMetadata {
                path: path.clone(),
                key: "tokenizer.chat_template".into(),
                what: "expected a string".into(),
            });
        }
        None => None,
    };

    // Vocabulary, in the GPT-2 byte alphabet. Later duplicates win, as in a Python dict.
    let spelling = bytes_to_unicode();
    let mut alphabet = [false; 0x180];
    for &c in &spelling {
        alphabet[c as usize] = true;
    }
    let in_alphabet = |t: &str| t.chars().all(|c| (c as usize) < alphabet.len() && alphabet[c as usize]);
    let mut vocab_map: HashMap<String, u32> = HashMap::with_capacity(tokens.len());
    for (id, &t) in tokens.iter().enumerate() {
        let key = if in_alphabet(t) { t.to_string() } else { t.bytes().map(|b| spelling[b as usize]).collect() };
        let id = u32::try_from(id).map_err(|_| err("more than 2^32 tokens".into()))?;
        vocab_map.insert(key, id);
    }
    let mut merges = Vec::with_capacity(merges_raw.len());
    for (i, m) in merges_raw.iter().enumerate() {
        let mut parts = m.split(' ');
        match (parts.next(), parts.next(), parts.next()) {
            (Some(a), Some(b), None) => merges.push((a.to_string(), b.to_string())),
            _ => {
                return Err(err(format!("merge #{i} `{m}` is not two tokens separated by one space")));
            }
        }
    }
    let vocab: Vocab = vocab_map.into_iter().collect();
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .continuing_subword_prefix(String::new())
        .end_of_word_suffix(String::new())
        .fuse_unk(false)
        .byte_fallback(false)
        .ignore_merges(false)
        .build()
        .map_err(|e| err(format!("invalid BPE vocabulary/merges: {e}")))?;

    let mut tokenizer = Tokenizer::new(bpe);
    let pre_tokenizer: PreTokenizerWrapper = match pre.as_deref().and_then(pre_tokenizer_split) {
        Some(regex) => {
            let split = Split::new(SplitPattern::Regex(regex.to_string()), SplitDelimiterBehavior::Isolated, false)
                .map_err(|e| err(format!("bad split regex: {e}")))?;
            Sequence::new(vec![split.into(), ByteLevel::new(false, true, false).into()]).into()
        }
        None => ByteLevel::new(false, true, true).into(),
    };
    tokenizer.with_pre_tokenizer(Some(pre_tokenizer));
    tokenizer.with_decoder(Some(ByteLevelDecoder::default()));

    let special_token = |content: &str| AddedToken::from(content, true).normalized(false);
    // 1. transformers' GPT2Tokenizer registers its default special token `<|endoftext|>`.
    tokenizer.add_special_tokens(&TokenList(vec![special_token("<|endoftext|>")])).into_result().map_err(err)?;
    // 2. CONTROL tokens spelled in the byte alphabet, as special tokens.
    let control: Vec<AddedToken> = tokens
        .iter()
        .zip(&token_types)
        .filter(|&(t, &ty)| ty == token_type::CONTROL && in_alphabet(t))
        .map(|(t, _)| special_token(t))
        .collect();
    if !control.is_empty() {
        tokenizer.add_special_tokens(&TokenList(control)).into_result().map_err(err)?;
    }
    // 3. USER_DEFINED tokens present in the vocabulary, as plain added tokens.
    let user_defined: Vec<AddedToken> = tokens
        .iter()
        .zip(&token_types)
        .filter(|&(t, &ty)| ty == token_type::USER_DEFINED && tokenizer.token_to_id(t).is_some())
        .map(|(t, _)| AddedToken::from(*t, false).normalized(false))
        .collect();
    if !user_defined.is_empty() {
        tokenizer.add_tokens(&TokenList(user_defined)).into_result().map_err(err)?;
    }
    // 4. The named special tokens.
    let named: Vec<AddedToken> =
        [&bos_token, &eos_token, &unk_token, &pad_token].into_iter().flatten().map(|t| special_token(t)).collect();
    tokenizer.add_special_tokens(&TokenList(named)).into_result().map_err(err)?;

    let id_of = |t: &Option<String>| t.as_deref().and_then(|t| tokenizer.token_to_id(t));
    let (bos_token_id, eos_token_id) = (id_of(&bos_token), id_of(&eos_token));
    let (unk_token_id, pad_token_id) = (id_of(&unk_token), id_of(&pad_token));
    if bos_token_id.is_none() {
        add_bos_token = false;
    }
    if eos_token_id.is_none() {
        add_eos_token = false;
    }

    // Post-processor, as transformers' `TokenizersBackend.update_post_processor`.
    let (bos, eos) = (bos_token.clone().unwrap_or_default(), eos_token.clone().unwrap_or_default());
    let mut single = Vec::new();
    if add_bos_token {
        single.push(format!("{bos}:0"));
    }
    single.push("$A:0".to_string());
    if add_eos_token {
        single.push(format!("{eos}:0"));
    }
    let mut pair = single.clone();
    if add_bos_token {
        pair.push(format!("{bos}:1"));
    }
    pair.push("$B:1".to_string());
    if add_eos_token {
        pair.push(format!("{eos}:1"));
    }
    let mut specials: Vec<(String, u32)> = Vec::new();
    if let (true, Some(id)) = (add_bos_token, bos_token_id) {
        specials.push((bos.clone(), id));
    }
    if let (true, Some(id)) = (add_eos_token, eos_token_id)
        && !(add_bos_token && bos == eos)
    {
        specials.push((eos.clone(), id));
    }
    let processor = TemplateProcessing::builder()
        .try_single(single)
        .and_then(|b| b.try_pair(pair))
        .map_err(|e| err(format!("post-processor template: {e}")))?
        .special_tokens(specials)
        .build()
        .map_err(|e| err(format!("post-processor: {e}")))?;
    tokenizer.with_post_processor(Some(processor));

    Ok(GgufTokenizer {
        tokenizer,
        chat_template,
        model,
        pre,
        bos_token,
        eos_token,
        unk_token,
        pad_token,
        bos_token_id,
        eos_token_id,
        unk_token_id,
        pad_token_id,
        eot_token_id,
        add_bos_token,
        add_eos_token,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gguf::test_support::{Writer, fixture, parse, smollm2_gguf};

    fn s(v: &str) -> GgufValue {
        GgufValue::String(v.into())
    }

    fn strs(v: &[&str]) -> GgufValue {
        GgufValue::Array(v.iter().map(|x| s(x)).collect())
    }

    /// A tiny byte-level vocabulary: the 256 byte symbols, then a few merges, then specials.
    fn tiny(pre: Option<&str>, add_bos: Option<bool>) -> Writer {
        let spelling = bytes_to_unicode();
        let mut tokens: Vec<String> = spelling.iter().map(|c| c.to_string()).collect();
        let merges =
            ["Ġ t", "h e", "Ġt he", "l l", "ll o", "he llo", "Ġ w", "o r", "Ġw or", "l d", "Ġwor ld", "1 2", "12 3"];
        for m in merges {
            tokens.push(m.replace(' ', ""));
        }
        let n_normal = tokens.len();
        tokens.extend(["<s>", "</s>", "<think>", "<|endoftext|>", "<ctrl with space>"].map(String::from));
        let mut types = vec![GgufValue::I32(1); n_normal];
        types.extend([3, 3, 4, 3, 3].map(GgufValue::I32));
        let token_refs: Vec<&str> = tokens.iter().map(String::as_str).collect();
        let mut w = Writer::new()
            .kv("general.architecture", s("llama"))
            .kv("tokenizer.ggml.model", s("gpt2"))
            .kv("tokenizer.ggml.tokens", strs(&token_refs))
            .kv("tokenizer.ggml.token_type", GgufValue::Array(types))
            .kv("tokenizer.ggml.merges", strs(&merges))
            .kv("tokenizer.ggml.bos_token_id", GgufValue::U32(n_normal as u32))
            .kv("tokenizer.ggml.eos_token_id", GgufValue::U32(n_normal as u32 + 1))
            .kv("tokenizer.chat_template", s("{{ messages }}"));
        if let Some(p) = pre {
            w = w.kv("tokenizer.ggml.pre", s(p));
        }
        if let Some(b) = add_bos {
            w = w.kv("tokenizer.ggml.add_bos_token", GgufValue::Bool(b));
        }
        w
    }

    #[test]
    fn tiny_vocab_encodes_like_gpt2_bpe() {
        let f = parse(tiny(None, None).build()).unwrap();
        let t = tokenizer_from_gguf(&f).unwrap();
        let n = 256 + 13;
        assert_eq!(t.chat_template.as_deref(), Some("{{ messages }}"));
        assert_eq!(t.bos_token_id, Some(n as u32));
        assert_eq!(t.eos_token_id, Some(n as u32 + 1));
        assert!(!t.add_bos_token);
        let ids = t.encode("hello world", true).unwrap();
        let id = |s: &str| t.tokenizer.token_to_id(s).unwrap();
        assert_eq!(ids, vec![id("hello"), id("Ġworld")]);
        // Specials and user-defined tokens stay whole.
        let ids = t.encode("<s>hello<think></s>", true).unwrap();
        assert_eq!(ids, vec![n as u32, id("hello"), n as u32 + 2, n as u32 + 1]);
        // GPT-2 regex keeps " 123" as one piece: Ġ + 123.
        assert_eq!(t.encode(" 123", false).unwrap(), vec![id("Ġ"), id("123")]);
        assert_eq!(t.decode(&t.encode("hello world", false).unwrap(), false).unwrap(), "hello world");
        // A CONTROL token outside the byte alphabet is not an added token: it is split.
        let ids = t.encode("<ctrl with space>", false).unwrap();
        assert!(ids.len() > 1, "{ids:?}");
    }

    #[test]
    fn add_bos_and_llama3_split() {
        let f = parse(tiny(Some("llama-bpe"), Some(true)).build()).unwrap();
        let t = tokenizer_from_gguf(&f).unwrap();
        let bos = t.bos_token_id.unwrap();
        let id = |s: &str| t.tokenizer.token_to_id(s).unwrap();
        assert_eq!(t.encode("hello", true).unwrap(), vec![bos, id("hello")]);
        assert_eq!(t.encode("hello", false).unwrap(), vec![id("hello")]);
        // llama3 regex splits numbers in groups of at most 3 and detaches the space.
        assert_eq!(t.encode(" 1231", false).unwrap(), vec![id("Ġ"), id("123"), id("1")]);
    }

    #[test]
    fn unsupported_and_broken_metadata() {
        let f = parse(tiny(None, None).kv("tokenizer.ggml.model", s("llama")).build());
        // Duplicate key: the writer appends, so the parser rejects it; build a clean one instead.
        assert!(f.is_err());
        let mut w = tiny(None, None);
        w.kv.retain(|(k, _)| k != "tokenizer.ggml.model");
        let f = parse(w.kv("tokenizer.ggml.model", s("llama")).build()).unwrap();
        assert!(matches!(tokenizer_from_gguf(&f), Err(GgufError::Tokenizer { .. })));
        let mut w = tiny(None, None);
        w.kv.retain(|(k, _)| k != "tokenizer.ggml.bos_token_id");
        let f = parse(w.kv("tokenizer.ggml.bos_token_id", GgufValue::U32(1 << 20)).build()).unwrap();
        let e = tokenizer_from_gguf(&f).unwrap_err();
        assert!(e.to_string().contains("bos_token_id"), "{e}");
        let mut w = tiny(None, None);
        w.kv.retain(|(k, _)| k != "tokenizer.ggml.merges");
        let f = parse(w.kv("tokenizer.ggml.merges", strs(&["a b c"])).build()).unwrap();
        assert!(tokenizer_from_gguf(&f).is_err());
        let mut w = tiny(None, None);
        w.kv.retain(|(k, _)| k != "tokenizer.ggml.tokens");
        let f = parse(w.build()).unwrap();
        assert!(matches!(tokenizer_from_gguf(&f), Err(GgufError::MissingMetadata { .. })));
    }

    #[test]
    fn bytes_to_unicode_matches_gpt2() {
        let m = bytes_to_unicode();
        assert_eq!(m[b'!' as usize], '!');
        assert_eq!(m[b' ' as usize], 'Ġ');
        assert_eq!(m[b'\n' as usize], 'Ċ');
        assert_eq!(m[0], 'Ā');
        assert_eq!(m[0xA0], 'ł');
        assert_eq!(m[0xAD], 'Ń');
        assert_eq!(m[0xFF], 'ÿ');
        let mut sorted: Vec<char> = m.to_vec();
        sorted.sort();
        sorted.dedup();
        assert_eq!(sorted.len(), 256);
    }

    #[test]
    fn smollm2_matches_transformers_tokenizer() {
        let cases = fixture("tokenizer_cases.json");
        let f = GgufFile::open(&smollm2_gguf()).unwrap();
        let t = tokenizer_from_gguf(&f).unwrap();
        assert_eq!(t.vocab_size(), 49152);
        assert_eq!(
            (t.bos_token_id, t.eos_token_id, t.pad_token_id, t.unk_token_id),
            (Some(1), Some(2), Some(2), Some(0))
        );
        assert!(t.chat_template.as_deref().unwrap_or("").contains("<|im_start|>"));
        let cases: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(cases).unwrap()).unwrap();
        let cases = cases["cases"].as_array().unwrap();
        assert!(cases.len() >= 20);
        let ids = |v: &serde_json::Value| -> Vec<u32> {
            v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
        };
        let mut failures = Vec::new();
        for case in cases {
            let text = case["text"].as_str().unwrap();
            let with = t.encode(text, true).unwrap();
            let without = t.encode(text, false).unwrap();
            if with != ids(&case["ids"]) || without != ids(&case["ids_no_special"]) {
                failures.push(format!("{text:?}: got {with:?}, expected {:?}", case["ids"]));
            }
            if let Some(decoded) = case.get("decoded").and_then(|d| d.as_str()) {
                let got = t.decode(&with, false).unwrap();
                if got != decoded {
                    failures.push(format!("decode {text:?}: got {got:?}, expected {decoded:?}"));
                }
            }
        }
        assert!(failures.is_empty(), "{} mismatches:\n{}", failures.len(), failures.join("\n"));
    }
}
