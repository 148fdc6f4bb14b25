//! Llama-family models in Hugging Face format: config, weights, forward pass, files.

pub mod cache;
pub mod config;
pub mod decoder;
pub mod hub;
pub mod io;
pub mod linear;
pub mod llama;
pub mod names;
pub mod rope;
pub mod weights;

pub use config::LlamaConfig;
pub use decoder::Decoder;
pub use io::{load, LoadedModel};
pub use linear::{Linear, LinearAdapter};
pub use llama::{Cache, Llama};
pub use weights::{ModelError, Weights};
