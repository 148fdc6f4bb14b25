//! Memory planning (`llmtool estimate`) and measurement (peak resident memory).

use config::Config;
use model::LlamaConfig;

/// Bytes needed to train a model, split by what holds them.
#[derive(Debug, Clone, PartialEq)]
pub struct MemoryPlan {
    pub parameters: usize,
    pub weights: u64,
    pub gradients: u64,
    pub optimizer: u64,
    /// Activations kept for backward without checkpointing.
    pub activations: u64,
    /// Activations with per-block recompute.
    pub activations_checkpointed: u64,
    /// Gradient temporaries alive at the peak of the backward pass: those of the output head
    /// and of one block (the same either way).
    pub backward_workspace: u64,
}

impl MemoryPlan {
    /// Total with or without checkpointing.
    pub fn total(&self, checkpointed: bool) -> u64 {
        let activations = if checkpointed {
            self.activations_checkpointed
        } else {
            self.activations
        };
        self.weights + self.gradients + self.optimizer + activations + self.backward_workspace
    }
}

/// The plan for training `model` with the batch and precision of `config`. Weights, gradients
/// and AdamW moments are f32; activations use the compute dtype. The activation counts follow
/// the tensors this implementation's autograd graph keeps per token and layer.
pub fn plan(model: &LlamaConfig, config: &Config) -> MemoryPlan {
    let p = model.parameter_count();
    let t = &config.training;
    let tokens = (t.batch_size * t.seq_len) as u64;
    let act_bytes = t.dtype.dtype().size_in_bytes() as u64;
    let h = model.hidden_size as u64;
    let kv = (model.kv_heads() * model.head_size()) as u64;
    let ffn = model.intermediate_size as u64;
    let heads = model.num_attention_heads as u64;
    let seq = t.seq_len as u64;
    // Norms (2 x ~4h), projections and RoPE (~8h + 10kv), attention outputs and residuals (~6h),
    // MLP (5 x ffn), and six [heads, seq] score-sized tensors from the masked softmax.
    let per_token_layer = 14 * h + 10 * kv + 5 * ffn + 6 * heads * seq;
    // Logits and the f32 log-softmax intermediates of the loss.
    let per_token_head = 4 * model.vocab_size as u64 + 4 * h;
    let layers = model.num_hidden_layers as u64;
    let activations = tokens * act_bytes * (layers * per_token_layer + per_token_head);
    let activations_checkpointed =
        tokens * act_bytes * (layers * h + per_token_layer + per_token_head);
    MemoryPlan {
        backward_workspace: tokens * act_bytes * (per_token_layer + per_token_head),
        parameters: p,
        weights: 4 * p as u64,
        gradients: 4 * p as u64,
        optimizer: 8 * p as u64,
        activations,
        activations_checkpointed,
    }
}

/// Peak resident memory of this process in bytes, where the OS reports it (Linux).
pub fn peak_resident_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// `bytes` as MiB or GiB for people.
pub fn human(bytes: u64) -> String {
    let mib = bytes as f64 / (1024.0 * 1024.0);
    if mib >= 1024.0 {
        format!("{:.2} GiB", mib / 1024.0)
    } else {
        format!("{mib:.0} MiB")
    }
}

/// A parameter count for people: `31.2K`, `46.9M`, `1.24B`.
pub fn count(n: usize) -> String {
    let n = n as f64;
    if n >= 1e9 {
        format!("{:.2}B", n / 1e9)
    } else if n >= 1e6 {
        format!("{:.1}M", n / 1e6)
    } else {
        format!("{:.1}K", n / 1e3)
    }
}
