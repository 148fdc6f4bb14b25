//! `model.vocab_size`: a number of embedding rows, or `auto` to size the embedding to the
//! tokenizer the dataset build trains.

use serde::de::{self, Deserializer, Visitor};
use serde::{Deserialize, Serialize, Serializer};
use std::fmt;

/// How many token embeddings a model built from scratch has.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum VocabSize {
    /// As many as the trained tokenizer has tokens (it is trained to at most
    /// [`VocabSize::AUTO_TOKENIZER`]), rounded up to a multiple of [`VocabSize::ROUNDING`].
    #[default]
    Auto,
    /// Exactly this many; a trained tokenizer gets at most this many tokens.
    Tokens(usize),
}

impl VocabSize {
    /// The most tokens a tokenizer trained for `auto` gets.
    pub const AUTO_TOKENIZER: usize = 16384;
    /// `auto` embeddings are a multiple of this many rows (GPU kernels like aligned shapes).
    pub const ROUNDING: usize = 64;

    /// The vocabulary size a tokenizer is trained to.
    pub fn tokenizer_target(self) -> usize {
        match self {
            Self::Auto => Self::AUTO_TOKENIZER,
            Self::Tokens(n) => n,
        }
    }

    /// The largest tokenizer the model can embed, if there is a limit.
    pub fn limit(self) -> Option<usize> {
        match self {
            Self::Auto => None,
            Self::Tokens(n) => Some(n),
        }
    }

    /// The embedding rows of a model whose tokenizer has `tokenizer_tokens` tokens.
    pub fn embedding_rows(self, tokenizer_tokens: usize) -> usize {
        match self {
            Self::Auto => tokenizer_tokens.next_multiple_of(Self::ROUNDING),
            Self::Tokens(n) => n,
        }
    }
}

impl fmt::Display for VocabSize {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        match self {
            Self::Auto => f.write_str("auto"),
            Self::Tokens(n) => write!(f, "{n}"),
        }
    }
}

impl Serialize for VocabSize {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            Self::Auto => serializer.serialize_str("auto"),
            Self::Tokens(n) => serializer.serialize_u64(*n as u64),
        }
    }
}

impl<'de> Deserialize<'de> for VocabSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Either;
        impl Visitor<'_> for Either {
            type Value = VocabSize;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("`auto` or a whole number >= 1")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<VocabSize, E> {
                match v {
                    "auto" => Ok(VocabSize::Auto),
                    _ => Err(E::invalid_value(de::Unexpected::Str(v), &self)),
                }
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<VocabSize, E> {
                match usize::try_from(v) {
                    Ok(n) if n >= 1 => Ok(VocabSize::Tokens(n)),
                    _ => Err(E::invalid_value(de::Unexpected::Unsigned(v), &self)),
                }
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<VocabSize, E> {
                match u64::try_from(v) {
                    Ok(v) => self.visit_u64(v),
                    Err(_) => Err(E::invalid_value(de::Unexpected::Signed(v), &self)),
                }
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<VocabSize, E> {
                match v.fract() == 0.0 && v >= 1.0 && v <= u32::MAX as f64 {
                    true => Ok(VocabSize::Tokens(v as usize)),
                    false => Err(E::invalid_value(de::Unexpected::Float(v), &self)),
                }
            }
        }
        d.deserialize_any(Either)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_follows_the_tokenizer_rounded_up_and_a_number_is_kept() {
        assert_eq!(VocabSize::Auto.embedding_rows(5_201), 5_248);
        assert_eq!(VocabSize::Auto.embedding_rows(5_248), 5_248);
        assert_eq!(VocabSize::Auto.tokenizer_target(), 16384);
        assert_eq!(VocabSize::Tokens(300).embedding_rows(290), 300);
        assert_eq!(VocabSize::Tokens(300).limit(), Some(300));
    }

    #[test]
    fn reads_auto_or_a_whole_number() {
        let read = |s: &str| serde_norway::from_str::<VocabSize>(s).map_err(|e| e.to_string());
        assert_eq!(read("auto"), Ok(VocabSize::Auto));
        assert_eq!(read("512"), Ok(VocabSize::Tokens(512)));
        for bad in ["0", "-3", "2.5", "big"] {
            let e = read(bad).unwrap_err();
            assert!(e.contains("`auto` or a whole number >= 1"), "{bad}: {e}");
        }
        assert_eq!(
            serde_norway::to_string(&VocabSize::Tokens(7)).unwrap(),
            "7\n"
        );
        assert_eq!(serde_norway::to_string(&VocabSize::Auto).unwrap(), "auto\n");
    }
}
