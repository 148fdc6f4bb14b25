//! Models of the supported families (Llama, Mistral, Qwen2, Qwen3, Gemma 2, Gemma 3 text, Phi-3) in
//! Hugging Face format: config, family options, weights, forward pass, files.

#![warn(missing_docs)]

pub mod attention;
pub mod cache;
pub mod config;
mod decode_block;
pub mod decoder;
pub mod family;
pub mod gguf;
#[cfg(feature = "hub")]
pub mod hub;
pub mod io;
pub mod linear;
pub mod llama;
pub mod names;
pub mod quantized;
pub mod rope;
pub mod tokenizer_files;
pub mod weights;

pub use config::LlamaConfig;
pub use decoder::Decoder;
pub use family::Family;
pub use io::{load, LoadedModel};
pub use linear::{Linear, LinearAdapter, LowRank};
pub use llama::{Cache, Llama};
pub use weights::{ModelError, Weights};
