//! The tokenizer: a byte-level BPE trained with the `tokenizers` crate (so HF `tokenizers`
//! and `transformers` load the same `tokenizer.json`), or an existing one.

use super::DataError;
use std::path::Path;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::models::TrainerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{AddedToken, Tokenizer};

fn tokenizer_error(path: &Path, message: impl ToString) -> DataError {
    DataError::Tokenizer {
        path: path.to_path_buf(),
        message: message.to_string(),
    }
}

/// Trains a byte-level BPE of `vocab_size` tokens on `texts`. The first special token is the
/// end-of-text token placed after every document; all 256 bytes are in the alphabet, so any
/// input encodes without unknown tokens.
pub fn train(
    texts: &[&str],
    vocab_size: usize,
    special_tokens: &[String],
) -> Result<Tokenizer, DataError> {
    let here = Path::new("tokenizer.json");
    if special_tokens.is_empty() {
        return Err(tokenizer_error(
            here,
            "data.special_tokens is empty: the first one marks the end of each document",
        ));
    }
    let minimum = 256 + special_tokens.len();
    if vocab_size < minimum {
        return Err(tokenizer_error(
            here,
            format!("model.vocab_size {vocab_size} is too small for a byte-level BPE: it needs at least {minimum} (256 bytes + special tokens)"),
        ));
    }
    let mut trainer = TrainerWrapper::BpeTrainer(
        BpeTrainerBuilder::new()
            .vocab_size(vocab_size)
            .min_frequency(2)
            .show_progress(false)
            .special_tokens(
                special_tokens
                    .iter()
                    .map(|t| AddedToken::from(t.clone(), true))
                    .collect(),
            )
            .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
            .build(),
    );
    let mut tokenizer = Tokenizer::new(BPE::default());
    tokenizer.with_pre_tokenizer(Some(ByteLevel::new(false, true, true)));
    tokenizer.with_decoder(Some(ByteLevelDecoder::default()));
    tokenizer
        .train(&mut trainer, texts.iter())
        .map_err(|e| tokenizer_error(here, e))?;
    Ok(tokenizer)
}

/// Loads a `tokenizer.json` and checks it fits a model with `vocab_size` embeddings (any size
/// fits when `None`: the embedding will be sized to it).
pub fn load(path: &Path, vocab_size: Option<usize>) -> Result<Tokenizer, DataError> {
    let tokenizer = Tokenizer::from_file(path).map_err(|e| tokenizer_error(path, e))?;
    let size = tokenizer.get_vocab_size(true);
    if let Some(vocab_size) = vocab_size.filter(|v| size > *v) {
        return Err(tokenizer_error(
            path,
            format!("the tokenizer has {size} tokens but model.vocab_size is {vocab_size}: raise model.vocab_size to at least {size}"),
        ));
    }
    Ok(tokenizer)
}

/// The id of the end-of-text token: the first of `special_tokens` the tokenizer knows.
pub fn eos_id(
    tokenizer: &Tokenizer,
    special_tokens: &[String],
    path: &Path,
) -> Result<u32, DataError> {
    special_tokens
        .iter()
        .find_map(|t| tokenizer.token_to_id(t))
        .ok_or_else(|| {
            tokenizer_error(
                path,
                format!(
                    "none of data.special_tokens ({}) is in the tokenizer's vocabulary",
                    special_tokens.join(", ")
                ),
            )
        })
}

/// Serializes the tokenizer as compact JSON (what `tokenizer.json` holds).
pub fn to_json(tokenizer: &Tokenizer, path: &Path) -> Result<String, DataError> {
    tokenizer
        .to_string(false)
        .map_err(|e| tokenizer_error(path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trains_byte_level_bpe_that_round_trips() {
        let texts = [
            "# Hello world\n\nHello again, world of markdown.",
            "Ünïcode ✓ and `code` blocks",
        ];
        let specials = vec!["<|endoftext|>".to_string(), "<|pad|>".to_string()];
        let tokenizer = train(&texts, 300, &specials).unwrap();
        assert!(tokenizer.get_vocab_size(true) <= 300);
        assert_eq!(eos_id(&tokenizer, &specials, Path::new("t")).unwrap(), 0);
        let unseen = "Zebra 🦓 never seen";
        let ids = tokenizer.encode(unseen, false).unwrap().get_ids().to_vec();
        assert_eq!(tokenizer.decode(&ids, false).unwrap(), unseen);
    }

    #[test]
    fn vocab_too_small_is_an_error() {
        let err = train(&["x"], 100, &["<|endoftext|>".into()]).unwrap_err();
        assert!(err.to_string().contains("at least 257"), "{err}");
    }
}
