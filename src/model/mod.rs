//! Llama-family models in Hugging Face format: config, weights, forward pass, files.

pub mod cache;
pub mod config;
pub mod decoder;
pub mod hub;
pub mod io;
pub mod llama;
pub mod lora;
pub mod rope;
pub mod weights;

pub use config::LlamaConfig;
pub use decoder::Decoder;
pub use io::{load, LoadedModel};
pub use llama::{Cache, Llama};
pub use lora::{Adapter, AdapterConfig};
pub use weights::{ModelError, Weights};
