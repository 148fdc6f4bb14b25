//! Range-checked number fields: the type error and the range error read the same
//! (`expected a positive number, got "fast"` / `got -1`).

use serde::de::{self, Deserializer, Visitor};
use std::fmt;

struct Bounded {
    expecting: &'static str,
    accepts: fn(f64) -> bool,
    integer: bool,
}

impl<'de> Visitor<'de> for Bounded {
    type Value = f64;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str(self.expecting)
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<f64, E> {
        if (self.integer && v.fract() != 0.0) || !v.is_finite() || !(self.accepts)(v) {
            return Err(E::invalid_value(de::Unexpected::Float(v), &self));
        }
        Ok(v)
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<f64, E> {
        if !(self.accepts)(v as f64) {
            return Err(E::invalid_value(de::Unexpected::Signed(v), &self));
        }
        Ok(v as f64)
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<f64, E> {
        if !(self.accepts)(v as f64) {
            return Err(E::invalid_value(de::Unexpected::Unsigned(v), &self));
        }
        Ok(v as f64)
    }
}

fn bounded<'de, D: Deserializer<'de>>(
    d: D,
    expecting: &'static str,
    accepts: fn(f64) -> bool,
    integer: bool,
) -> Result<f64, D::Error> {
    d.deserialize_any(Bounded {
        expecting,
        accepts,
        integer,
    })
}

/// A number strictly above zero (learning rates, norms' epsilon, RoPE theta).
pub fn positive<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    bounded(d, "a positive number", |v| v > 0.0, false)
}

/// A number at or above zero (weight decay, clipping norm where 0 disables).
pub fn non_negative<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    bounded(d, "a number >= 0", |v| v >= 0.0, false)
}

/// A fraction in [0, 1) (dropout, validation share, Adam betas).
pub fn fraction<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    bounded(d, "a number in [0, 1)", |v| (0.0..1.0).contains(&v), false)
}

/// A whole number of at least one (sizes, counts, steps).
pub fn count<'de, D: Deserializer<'de>>(d: D) -> Result<usize, D::Error> {
    bounded(d, "a whole number >= 1", |v| v >= 1.0, true).map(|v| v as usize)
}

/// A whole number of at least zero.
pub fn whole<'de, D: Deserializer<'de>>(d: D) -> Result<usize, D::Error> {
    bounded(d, "a whole number >= 0", |v| v >= 0.0, true).map(|v| v as usize)
}

/// An optional whole number of at least one (`null` for none).
pub fn optional_count<'de, D: Deserializer<'de>>(d: D) -> Result<Option<usize>, D::Error> {
    struct Opt;
    impl<'de> Visitor<'de> for Opt {
        type Value = Option<usize>;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a whole number >= 1 or null")
        }
        fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
            count(d).map(Some)
        }
    }
    d.deserialize_option(Opt)
}
