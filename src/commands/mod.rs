//! One module per command: each turns parsed arguments into work and a summary.

pub mod bench;
pub mod config;
pub mod data;
pub mod estimate;
pub mod eval;
pub mod export;
pub mod finetune;
pub mod generate;
mod launch;
pub mod merge;
mod runtime;
mod session;
pub mod tokenizer;
pub mod train;
