//! Where each key of a YAML document stands (line and column), so that errors found after
//! deserializing can still point at the text.

use std::collections::HashMap;
use yaml_rust2::parser::{Event, MarkedEventReceiver, Parser};
use yaml_rust2::scanner::Marker;

/// A 1-based line and column.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Position {
    pub line: usize,
    pub column: usize,
}

/// Dotted key paths (`training.lr`, `data.roots.0`) to the position of their key.
#[derive(Debug, Default)]
pub struct KeyPositions(HashMap<String, Position>);

impl KeyPositions {
    /// Positions of every mapping key and sequence item in `text`; empty if the text does not
    /// parse (the YAML parser then reports the syntax error itself).
    pub fn of(text: &str) -> Self {
        let mut walker = Walker::default();
        if Parser::new_from_str(text).load(&mut walker, false).is_err() {
            return Self::default();
        }
        Self(walker.found)
    }

    /// The position of `path`, or of its closest ancestor that has one.
    pub fn find(&self, path: &str) -> Option<Position> {
        let mut path = path;
        loop {
            if let Some(p) = self.0.get(path) {
                return Some(*p);
            }
            path = &path[..path.rfind('.')?];
        }
    }
}

enum Frame {
    /// In a mapping; `Some(key)` once its key is read and its value is awaited.
    Mapping(Option<String>),
    /// In a sequence, at the given index.
    Sequence(usize),
}

#[derive(Default)]
struct Walker {
    stack: Vec<Frame>,
    path: Vec<String>,
    found: HashMap<String, Position>,
}

impl Walker {
    /// Called when a value (scalar or collection start) begins; returns whether it is a key.
    fn begin_value(&mut self, event_is_scalar: bool, scalar: &str, mark: Marker) -> bool {
        let position = Position {
            line: mark.line(),
            column: mark.col() + 1,
        };
        match self.stack.last_mut() {
            Some(Frame::Mapping(key @ None)) if event_is_scalar => {
                *key = Some(scalar.to_string());
                self.path.push(scalar.to_string());
                self.found.insert(self.path.join("."), position);
                true
            }
            Some(Frame::Sequence(i)) => {
                self.path.push(i.to_string());
                self.found.insert(self.path.join("."), position);
                *i += 1;
                false
            }
            _ => false,
        }
    }

    /// Called when a value ends; pops the key or index it was stored under.
    fn end_value(&mut self) {
        match self.stack.last_mut() {
            Some(Frame::Mapping(key @ Some(_))) => {
                *key = None;
                self.path.pop();
            }
            Some(Frame::Sequence(_)) => {
                self.path.pop();
            }
            _ => {}
        }
    }
}

impl MarkedEventReceiver for Walker {
    fn on_event(&mut self, ev: Event, mark: Marker) {
        match ev {
            Event::Scalar(value, ..) if !self.begin_value(true, &value, mark) => self.end_value(),
            Event::Alias(_) => self.end_value(),
            Event::MappingStart(..) => {
                self.begin_value(false, "", mark);
                self.stack.push(Frame::Mapping(None));
            }
            Event::SequenceStart(..) => {
                self.begin_value(false, "", mark);
                self.stack.push(Frame::Sequence(0));
            }
            Event::MappingEnd | Event::SequenceEnd => {
                self.stack.pop();
                self.end_value();
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_nested_keys_and_items() {
        let text =
            "model:\n  hidden_size: 64\ndata:\n  roots:\n    - a\n    - b\ntraining: {lr: 1}\n";
        let p = KeyPositions::of(text);
        assert_eq!(
            p.find("model.hidden_size"),
            Some(Position { line: 2, column: 3 })
        );
        assert_eq!(
            p.find("data.roots.1"),
            Some(Position { line: 6, column: 7 })
        );
        assert_eq!(p.find("training.lr").map(|p| p.line), Some(7));
        assert_eq!(
            p.find("model.missing"),
            Some(Position { line: 1, column: 1 })
        );
        assert_eq!(p.find("nothing"), None);
    }
}
