//! The prompt tokenizer of a diffusion export: `tokenizer/tokenizer.json` when present, otherwise
//! CLIP's BPE rebuilt from `vocab.json` + `merges.txt`; every prompt becomes exactly the text
//! encoder's sequence length of ids (bos … eos, truncated, then padded with the pad token).

use std::path::Path;

use tokenizers::models::bpe::BPE;
use tokenizers::normalizers::{Lowercase, NFC, Replace, Sequence as NormalizerSequence};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence as PreTokenizerSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{
    AddedToken, PaddingDirection, PaddingParams, PaddingStrategy, SplitDelimiterBehavior, Tokenizer,
    TruncationDirection, TruncationParams, TruncationStrategy,
};

const BOS: &str = "<|startoftext|>";
const EOS: &str = "<|endoftext|>";
/// The word pattern of CLIP's tokenizer (`CLIPTokenizer`'s `pat`, without the special tokens,
/// which are added tokens here).
const CLIP_PATTERN: &str = r"'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";

pub struct PromptTokenizer {
    tokenizer: Tokenizer,
    max_len: usize,
}

impl std::fmt::Debug for PromptTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PromptTokenizer").field("max_len", &self.max_len).finish_non_exhaustive()
    }
}

impl PromptTokenizer {
    /// Loads the tokenizer in `dir` (an export's `tokenizer/` folder) for sequences of `max_len`.
    pub fn load(dir: &Path, max_len: usize) -> Result<Self, String> {
        let json = dir.join("tokenizer.json");
        let mut tokenizer = if json.is_file() {
            Tokenizer::from_file(&json).map_err(|e| format!("{}: {e}", json.display()))?
        } else {
            clip_bpe(&dir.join("vocab.json"), &dir.join("merges.txt"))?
        };
        let pad_token = pad_token(dir)?;
        let pad_id = tokenizer
            .token_to_id(&pad_token)
            .ok_or_else(|| format!("the pad token {pad_token:?} is not in the vocabulary"))?;
        tokenizer
            .with_truncation(Some(TruncationParams {
                max_length: max_len,
                strategy: TruncationStrategy::LongestFirst,
                direction: TruncationDirection::Right,
                stride: 0,
            }))
            .map_err(|e| e.to_string())?;
        tokenizer.with_padding(Some(PaddingParams {
            strategy: PaddingStrategy::Fixed(max_len),
            direction: PaddingDirection::Right,
            pad_to_multiple_of: None,
            pad_id,
            pad_type_id: 0,
            pad_token,
        }));
        Ok(Self { tokenizer, max_len })
    }

    /// Exactly `max_len` ids for `text`.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, String> {
        let enc = self.tokenizer.encode(text, true).map_err(|e| e.to_string())?;
        let ids = enc.get_ids();
        if ids.len() != self.max_len {
            return Err(format!("the tokenizer gave {} ids where {} were expected", ids.len(), self.max_len));
        }
        Ok(ids.to_vec())
    }
}

/// CLIP's tokenizer as `CLIPTokenizerFast` builds it: NFC, whitespace collapsed, lowercased; split
/// on CLIP's word pattern, byte-level symbols, BPE with `</w>` ending each word; bos … eos.
fn clip_bpe(vocab: &Path, merges: &Path) -> Result<Tokenizer, String> {
    let path = |p: &Path| p.to_str().map(str::to_owned).ok_or_else(|| format!("{} is not UTF-8", p.display()));
    let bpe = BPE::from_file(&path(vocab)?, &path(merges)?)
        .unk_token(EOS.into())
        .end_of_word_suffix("</w>".into())
        .build()
        .map_err(|e| format!("{} / {}: {e}", vocab.display(), merges.display()))?;
    let id = |bpe: &BPE, t: &str| {
        use tokenizers::Model;
        bpe.token_to_id(t).ok_or_else(|| format!("{}: no {t} token", vocab.display()))
    };
    let (bos, eos) = (id(&bpe, BOS)?, id(&bpe, EOS)?);
    let mut tokenizer = Tokenizer::new(bpe);
    let whitespace = Replace::new(tokenizers::normalizers::replace::ReplacePattern::Regex(r"\s+".into()), " ")
        .map_err(|e| e.to_string())?;
    tokenizer.with_normalizer(Some(NormalizerSequence::new(vec![NFC.into(), whitespace.into(), Lowercase.into()])));
    let split = Split::new(SplitPattern::Regex(CLIP_PATTERN.into()), SplitDelimiterBehavior::Removed, true)
        .map_err(|e| e.to_string())?;
    tokenizer.with_pre_tokenizer(Some(PreTokenizerSequence::new(vec![
        split.into(),
        ByteLevel::new(false, true, false).into(),
    ])));
    tokenizer.with_decoder(Some(tokenizers::decoders::byte_level::ByteLevel::default()));
    let template = TemplateProcessing::builder()
        .try_single(format!("{BOS} $A {EOS}"))
        .map_err(|e| e.to_string())?
        .special_tokens(vec![(BOS, bos), (EOS, eos)])
        .build()
        .map_err(|e| e.to_string())?;
    tokenizer.with_post_processor(Some(template));
    // Typed in a prompt, they stay one token each rather than being spelt out.
    tokenizer.add_special_tokens(&[AddedToken::from(BOS, true), AddedToken::from(EOS, true)]);
    Ok(tokenizer)
}

/// The pad token named by `special_tokens_map.json` or `tokenizer_config.json`; CLIP's
/// `<|endoftext|>` when neither names one (SD 2.x's OpenCLIP tokenizer pads with `!`).
fn pad_token(dir: &Path) -> Result<String, String> {
    for file in ["special_tokens_map.json", "tokenizer_config.json"] {
        let path = dir.join(file);
        let Ok(text) = std::fs::read_to_string(&path) else { continue };
        let value: serde_json::Value = serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
        match &value["pad_token"] {
            serde_json::Value::String(s) => return Ok(s.clone()),
            serde_json::Value::Object(o) => {
                if let Some(s) = o.get("content").and_then(|c| c.as_str()) {
                    return Ok(s.to_owned());
                }
            }
            _ => {}
        }
    }
    Ok(EOS.into())
}

#[cfg(test)]
mod tests {
    use kiln_common::testing::onnx::{TinySdOptions, tiny_token_id, write_tiny_stable_diffusion};

    use super::*;

    fn tiny(max_len: usize) -> (tempdir::Dir, PromptTokenizer) {
        let dir = tempdir::Dir::new("clip");
        write_tiny_stable_diffusion(dir.path(), &TinySdOptions::default()).expect("write export");
        let tok = PromptTokenizer::load(&dir.path().join("tokenizer"), max_len).expect("tokenizer");
        (dir, tok)
    }

    fn id(t: &str) -> u32 {
        tiny_token_id(t).unwrap_or_else(|| panic!("{t} in the tiny vocab"))
    }

    #[test]
    fn clip_bpe_normalises_merges_words_and_pads_with_eos() {
        let (_dir, tok) = tiny(77);
        let ids = tok.encode("  A   Cat,\tDOG ").expect("encode");
        let mut expected = vec![id(BOS), id("a</w>"), id("cat</w>"), id(",</w>"), id("dog</w>"), id(EOS)];
        expected.resize(77, id(EOS));
        assert_eq!(ids, expected);
        // An unmerged word is spelt in byte symbols, the last one carrying `</w>`.
        let ids = tok.encode("cab").expect("encode");
        assert_eq!(ids[..5], [id(BOS), id("ca"), id("b</w>"), id(EOS), id(EOS)]);
        assert_eq!(tok.encode("").expect("encode")[..2], [id(BOS), id(EOS)]);
    }

    #[test]
    fn long_prompts_are_truncated_keeping_eos_last() {
        let (_dir, tok) = tiny(8);
        let ids = tok.encode("cat dog cat dog cat dog cat dog cat").expect("encode");
        assert_eq!(
            ids,
            [
                id(BOS),
                id("cat</w>"),
                id("dog</w>"),
                id("cat</w>"),
                id("dog</w>"),
                id("cat</w>"),
                id("dog</w>"),
                id(EOS)
            ]
        );
    }

    #[test]
    fn a_tokenizer_json_is_used_when_present() {
        let dir = tempdir::Dir::new("clip-json");
        write_tiny_stable_diffusion(dir.path(), &TinySdOptions::default()).expect("write export");
        let tok_dir = dir.path().join("tokenizer");
        let built = clip_bpe(&tok_dir.join("vocab.json"), &tok_dir.join("merges.txt")).expect("build");
        built.save(tok_dir.join("tokenizer.json"), false).expect("save tokenizer.json");
        std::fs::remove_file(tok_dir.join("vocab.json")).expect("remove vocab");
        std::fs::remove_file(tok_dir.join("merges.txt")).expect("remove merges");
        let tok = PromptTokenizer::load(&tok_dir, 10).expect("tokenizer from tokenizer.json");
        let mut expected = vec![id(BOS), id("photo</w>"), id("dog</w>"), id(EOS)];
        expected.resize(10, id(EOS));
        assert_eq!(tok.encode("Photo DOG").expect("encode"), expected);
    }

    #[test]
    fn pad_token_comes_from_the_special_tokens_map() {
        let dir = tempdir::Dir::new("clip-pad");
        write_tiny_stable_diffusion(dir.path(), &TinySdOptions::default()).expect("write export");
        std::fs::write(dir.path().join("tokenizer/special_tokens_map.json"), r#"{"pad_token": {"content": "!"}}"#)
            .expect("write map");
        let tok = PromptTokenizer::load(&dir.path().join("tokenizer"), 6).expect("tokenizer");
        assert_eq!(tok.encode("dog").expect("encode"), [id(BOS), id("dog</w>"), id(EOS), id("!"), id("!"), id("!")]);
    }
}

#[cfg(test)]
pub(crate) mod tempdir {
    //! A uniquely named folder under the system temp dir, removed on drop.
    use std::path::{Path, PathBuf};

    pub struct Dir(PathBuf);

    impl Dir {
        pub fn new(tag: &str) -> Self {
            let path = std::env::temp_dir().join(format!("kiln-{tag}-{}", uuid::Uuid::new_v4().simple()));
            std::fs::create_dir_all(&path).expect("create temp dir");
            Self(path)
        }

        pub fn path(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}
