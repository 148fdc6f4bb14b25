//! Turning a growing list of token ids into text that can be printed as it arrives: only
//! complete UTF-8 is emitted (a byte-level token may hold half a character), and text that
//! could be the start of a stop string is held back until it is known not to be one.

use tokenizers::Tokenizer;

/// Incremental detokenizer: decodes a short window of recent tokens, so each step costs
/// O(1) and the output equals decoding everything at once.
pub struct TextStream<'a> {
    tokenizer: &'a Tokenizer,
    ids: Vec<u32>,
    /// Start of the window re-decoded each step (context for the decoder's spacing rules).
    prefix: usize,
    /// Tokens whose text has already been emitted.
    read: usize,
}

impl<'a> TextStream<'a> {
    /// A stream with no tokens yet.
    pub fn new(tokenizer: &'a Tokenizer) -> Self {
        Self {
            tokenizer,
            ids: Vec::new(),
            prefix: 0,
            read: 0,
        }
    }

    /// Adds a token and returns the text it completes (possibly empty).
    pub fn push(&mut self, id: u32) -> tokenizers::Result<String> {
        self.ids.push(id);
        let before = self
            .tokenizer
            .decode(&self.ids[self.prefix..self.read], true)?;
        let now = self.tokenizer.decode(&self.ids[self.prefix..], true)?;
        if now.ends_with('\u{FFFD}') || now.len() <= before.len() {
            return Ok(String::new());
        }
        match now.get(before.len()..) {
            Some(new) if now.starts_with(&before) => {
                let new = new.to_string();
                self.prefix = self.read;
                self.read = self.ids.len();
                Ok(new)
            }
            _ => Ok(String::new()),
        }
    }

    /// The text still held back at the end (bytes that never completed a character decode
    /// to U+FFFD here, as decoding everything at once would give).
    pub fn finish(&mut self) -> tokenizers::Result<String> {
        let before = self
            .tokenizer
            .decode(&self.ids[self.prefix..self.read], true)?;
        let now = self.tokenizer.decode(&self.ids[self.prefix..], true)?;
        self.prefix = self.ids.len();
        self.read = self.ids.len();
        Ok(now.get(before.len()..).unwrap_or_default().to_string())
    }
}

/// Watches streamed text for stop strings.
pub struct StopStrings {
    stops: Vec<String>,
    /// Text received but not yet released (it may begin a stop string).
    pending: String,
}

/// What [`StopStrings::feed`] decided.
#[derive(Debug, PartialEq, Eq)]
pub enum Stop {
    /// Print this text and go on.
    Continue(String),
    /// Print this text (everything before the stop string) and stop.
    Stopped(String),
}

impl StopStrings {
    /// Watches for `stops` (empty strings are ignored).
    pub fn new(stops: &[String]) -> Self {
        Self {
            stops: stops.iter().filter(|s| !s.is_empty()).cloned().collect(),
            pending: String::new(),
        }
    }

    /// Takes newly decoded text; returns what may be printed now.
    pub fn feed(&mut self, text: &str) -> Stop {
        self.pending.push_str(text);
        let found = self
            .stops
            .iter()
            .filter_map(|s| self.pending.find(s.as_str()))
            .min();
        if let Some(at) = found {
            let out = self.pending[..at].to_string();
            self.pending.clear();
            return Stop::Stopped(out);
        }
        let hold = self.longest_partial_stop();
        let out: String = self.pending[..self.pending.len() - hold].to_string();
        self.pending.drain(..self.pending.len() - hold);
        Stop::Continue(out)
    }

    /// Releases whatever is held back (generation ended without a stop string).
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.pending)
    }

    /// Length of the longest suffix of the pending text that is a proper prefix of a stop.
    fn longest_partial_stop(&self) -> usize {
        self.stops
            .iter()
            .flat_map(|s| {
                (1..s.len())
                    .filter(|&k| s.is_char_boundary(k) && self.pending.ends_with(&s[..k]))
                    .max()
            })
            .max()
            .unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokenizer() -> Tokenizer {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../tests/fixtures/tokenizer.json"
        );
        Tokenizer::from_file(path).unwrap()
    }

    #[test]
    fn multibyte_characters_split_across_tokens_stream_whole() {
        let tok = tokenizer();
        let text = "héllo → ☃ 日本 and more";
        let ids = tok.encode(text, false).unwrap().get_ids().to_vec();
        // The fixture tokenizer has no merges for these: each byte is its own token.
        assert!(ids.len() > text.chars().count());
        let mut stream = TextStream::new(&tok);
        let mut out = String::new();
        for id in ids {
            let piece = stream.push(id).unwrap();
            assert!(
                !piece.contains('\u{FFFD}'),
                "partial character emitted: {piece:?}"
            );
            out.push_str(&piece);
        }
        assert_eq!(out, text);
        // A stream cut inside a character holds the bytes back until the end.
        let ids = tok.encode("ok 日", false).unwrap().get_ids().to_vec();
        let mut stream = TextStream::new(&tok);
        let mut out = String::new();
        for id in &ids[..ids.len() - 1] {
            out.push_str(&stream.push(*id).unwrap());
        }
        assert_eq!(out, "ok ");
        let rest = stream.finish().unwrap();
        assert_eq!(
            out + &rest,
            tok.decode(&ids[..ids.len() - 1], true).unwrap()
        );
    }

    #[test]
    fn stop_strings_cut_and_hold_back() {
        let mut s = StopStrings::new(&["\n\n#".to_string(), "END".into()]);
        assert_eq!(s.feed("one\n"), Stop::Continue("one".into()));
        assert_eq!(s.feed("\n"), Stop::Continue("".into()));
        assert_eq!(s.feed("x E"), Stop::Continue("\n\nx ".into()));
        assert_eq!(s.feed("NDING"), Stop::Stopped(String::new()));
        let mut s = StopStrings::new(&["é!".to_string()]);
        assert_eq!(s.feed("caf"), Stop::Continue("caf".into()));
        assert_eq!(s.feed("é"), Stop::Continue("".into()));
        assert_eq!(s.finish(), "é");
    }
}
