//! One module per command: each turns parsed arguments into work and a summary.

pub mod config;
pub mod data;
pub mod eval;
pub mod generate;
mod runtime;
pub mod estimate;
pub mod finetune;
pub mod merge;
pub mod tokenizer;
pub mod train;
