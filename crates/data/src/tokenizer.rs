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

/// Texts longer than this are encoded a piece at a time: one encoding call holds about 270
/// bytes per token (the token strings, offsets and masks beside the ids), so a 15 MB document
/// encoded whole took 3 GB.
const PIECE_BYTES: usize = 256 * 1024;

/// Bytes on each side of a cut that must encode the same cut as whole.
const CUT_CONTEXT: usize = 1024;

/// Cuts tried per piece before the rest of the text is encoded whole.
const CUT_TRIES: usize = 16;

/// The token ids of `text` (no special tokens added), the same as one `encode` call gives, with
/// memory bounded by the piece size rather than the text's length. A long text is cut just
/// after a newline where encoding the surrounding bytes cut gives the same ids as encoding them
/// whole: pre-tokenizers and BPE merges only look that far, so the pieces' ids concatenate to
/// the whole text's. A tokenizer for which no such cut exists (one that marks the start of every
/// call, say) encodes the text whole.
pub fn encode_ids(tokenizer: &Tokenizer, text: &str) -> tokenizers::Result<Vec<u32>> {
    let encode = |t: &str| -> tokenizers::Result<Vec<u32>> {
        Ok(tokenizer.encode_fast(t, false)?.get_ids().to_vec())
    };
    let mut ids = Vec::new();
    let mut rest = text;
    while rest.len() > PIECE_BYTES {
        let Some(cut) = safe_cut(rest, &encode)? else {
            break;
        };
        ids.extend(encode(&rest[..cut])?);
        rest = &rest[cut..];
    }
    ids.extend(encode(rest)?);
    Ok(ids)
}

/// The first cut after [`PIECE_BYTES`] (just after a newline) where `encode` gives the same
/// ids cut as whole over [`CUT_CONTEXT`] bytes on each side.
fn safe_cut(
    text: &str,
    encode: &dyn Fn(&str) -> tokenizers::Result<Vec<u32>>,
) -> tokenizers::Result<Option<usize>> {
    let bytes = text.as_bytes();
    let mut from = PIECE_BYTES;
    for _ in 0..CUT_TRIES {
        let Some(newline) = bytes[from..].iter().position(|b| *b == b'\n') else {
            return Ok(None);
        };
        // Just after a newline: always a character boundary.
        let cut = from + newline + 1;
        if cut >= text.len() {
            return Ok(None);
        }
        let mut start = cut.saturating_sub(CUT_CONTEXT);
        while !text.is_char_boundary(start) {
            start -= 1;
        }
        let mut end = (cut + CUT_CONTEXT).min(text.len());
        while !text.is_char_boundary(end) {
            end += 1;
        }
        let mut pieces = encode(&text[start..cut])?;
        pieces.extend(encode(&text[cut..end])?);
        if pieces == encode(&text[start..end])? {
            return Ok(Some(cut));
        }
        from = cut;
    }
    Ok(None)
}

/// `text` cut just after newlines into pieces of about [`PIECE_BYTES`], for the BPE trainer:
/// it counts pre-tokens, which a cut after a newline leaves as they were, but it holds every
/// pre-token of one text at once (a 15 MB document took 1.3 GB).
fn pieces(text: &str) -> impl Iterator<Item = &str> {
    let mut rest = text;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let cut = match rest.as_bytes().get(PIECE_BYTES..) {
            Some(tail) => tail
                .iter()
                .position(|b| *b == b'\n')
                .map_or(rest.len(), |at| PIECE_BYTES + at + 1),
            None => rest.len(),
        };
        let (piece, tail) = rest.split_at(cut);
        rest = tail;
        Some(piece)
    })
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
        .train(&mut trainer, texts.iter().flat_map(|t| pieces(t)))
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

    /// A long markdown text: paragraphs, headings, lists, code, blank-line runs, non-ASCII.
    fn long_text() -> String {
        let mut text = String::new();
        for i in 0..6000 {
            text.push_str(&format!(
                "## Part {i}\n\nThe river ran past the mill {i} times; café naïve — “quoted”.\n\n\n- item {i}\n  - nested\n```\nfn f() {{ {i} }}\n```\n",
            ));
        }
        text
    }

    #[test]
    fn long_texts_encode_in_pieces_to_the_same_ids() {
        let text = long_text();
        assert!(text.len() > 3 * PIECE_BYTES);
        let trained = train(&[text.as_str()], 400, &["<|endoftext|>".to_string()]).unwrap();
        let whole = trained
            .encode(text.as_str(), false)
            .unwrap()
            .get_ids()
            .to_vec();
        assert_eq!(encode_ids(&trained, &text).unwrap(), whole);
        // A real model's tokenizer (GPT-2 style byte level, from the fixtures).
        let fixture =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/tokenizer.json");
        let loaded = Tokenizer::from_file(fixture).unwrap();
        let whole = loaded
            .encode(text.as_str(), false)
            .unwrap()
            .get_ids()
            .to_vec();
        assert_eq!(encode_ids(&loaded, &text).unwrap(), whole);
    }

    #[test]
    fn training_pieces_cover_the_text_and_end_after_newlines() {
        let text = long_text();
        let cut: Vec<&str> = pieces(&text).collect();
        assert_eq!(cut.concat(), text);
        assert!(cut.len() > 3);
        assert!(cut[..cut.len() - 1]
            .iter()
            .all(|p| p.ends_with('\n') && p.len() > PIECE_BYTES));
        assert_eq!(pieces("short").collect::<Vec<_>>(), ["short"]);
        assert_eq!(pieces("").count(), 0);
    }

    #[test]
    fn a_cut_that_would_change_the_ids_is_not_taken() {
        // Cutting changes these ids everywhere (each piece gets a start marker): no cut is safe.
        let text = "line\n".repeat(PIECE_BYTES / 5 + 100);
        let marker = |t: &str| -> tokenizers::Result<Vec<u32>> {
            Ok(std::iter::once(0).chain(t.bytes().map(u32::from)).collect())
        };
        assert_eq!(safe_cut(&text, &marker).unwrap(), None);
        let plain =
            |t: &str| -> tokenizers::Result<Vec<u32>> { Ok(t.bytes().map(u32::from).collect()) };
        let cut = safe_cut(&text, &plain).unwrap().unwrap();
        assert!(cut > PIECE_BYTES && text[..cut].ends_with('\n'));
    }

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
