//! Training: the loop, AdamW, schedules, gradient checkpointing, resumable state, metrics.

#![warn(missing_docs)]

pub mod compute_copies;
pub mod dataset_source;
pub mod distributed;
pub mod example_source;
pub mod gradients;
pub mod init;
pub mod lora;
pub mod memory;
pub mod metrics;
pub mod optim;
pub mod run;
pub mod schedule;
pub mod state;
pub mod trainer;

pub use gradients::Batch;
pub use lora::{Adapter, AdapterConfig};
pub use trainer::{BatchSource, Event, Reporter, TrainError, TrainOptions, TrainSummary, Trainer};
