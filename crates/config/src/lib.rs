//! The YAML configuration: one schema with the sections `model`, `data`, `training`, `lora`,
//! `eval`, `generate` and `output`, each key with a documented default (docs/config.md).
//!
//! Loading ([`load`]) reports every problem at once, each with the file, line and key.

#![warn(missing_docs)]

mod device;
mod load;
mod locate;
mod numbers;
mod schema;
mod validate;
mod vocab;

pub use device::{DeviceSpec, UnknownDevice, DEVICE_NAMES};
pub use load::{
    load, load_str, load_str_with, load_with, read_text, Check, ConfigError, ConfigIssue, Override,
};
pub use schema::*;
pub use vocab::VocabSize;
