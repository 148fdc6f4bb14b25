//! Memory planning (`llmtool estimate`) and measurement (peak resident memory).

use config::Config;
use model::LlamaConfig;

/// Bytes needed to train a model, split by what holds them.
#[derive(Debug, Clone, PartialEq)]
pub struct MemoryPlan {
    /// Parameters of the model (of the base, for a LoRA plan).
    pub parameters: usize,
    /// Bytes of the weights held on the device: f32 for full training; for LoRA, the stored base
    /// plus the f32 adapter.
    pub weights: u64,
    /// Bytes of the f32 gradients of the trained parameters.
    pub gradients: u64,
    /// Bytes of the AdamW moments: two f32 values per trained parameter.
    pub optimizer: u64,
    /// Activations kept for backward without checkpointing.
    pub activations: u64,
    /// Activations with per-block recompute.
    pub activations_checkpointed: u64,
    /// Gradient temporaries alive at the peak of the backward pass: those of the output head
    /// and of one block (the same either way).
    pub backward_workspace: u64,
    /// The compute-dtype copies of the trained f32 parameters (a LoRA plan's: the adapter's)
    /// that the optimizer keeps between steps in mixed precision without checkpointing
    /// ([`crate::optim::keep_model_copies`]), counted in the peak without checkpointing only.
    pub compute_copies: u64,
    /// Frozen weights held in host memory, outside the device's peak: a LoRA base's untied
    /// input embedding on CUDA (`Llama::keep_input_embedding_on_host`).
    pub host_weights: u64,
}

impl MemoryPlan {
    /// Total with or without checkpointing.
    pub fn total(&self, checkpointed: bool) -> u64 {
        let activations = if checkpointed {
            self.activations_checkpointed
        } else {
            self.activations + self.compute_copies
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
        compute_copies: compute_copies(p, t.dtype.dtype()),
        gradients: 4 * p as u64,
        optimizer: 8 * p as u64,
        activations,
        activations_checkpointed,
        host_weights: 0,
    }
}

/// Bytes of the copies in the compute dtype `compute` that AdamW keeps of `trained` f32
/// parameters ([`crate::optim::keep_model_copies`]): none when it computes in f32.
fn compute_copies(trained: usize, compute: candle_core::DType) -> u64 {
    match compute {
        candle_core::DType::F32 => 0,
        _ => (trained * compute.size_in_bytes()) as u64,
    }
}

/// Bytes a weight takes stored as NF4: 4 bits, an 8-bit absmax per 64, an f32 per 256 of those.
const NF4_BYTES_PER_WEIGHT: f64 = 0.5 + 1.0 / 64.0 + 4.0 / (64.0 * 256.0);

/// The plan for fine-tuning a LoRA adapter (the config's `lora` section) on `model`: the base
/// stored as `lora.base_dtype` (NF4 for the projections and the checkpoint's `stored` dtype
/// for the rest with `nf4`), f32 adapter weights, gradients and AdamW moments, activations as
/// [`plan`]'s. A 4-bit base adds the expanded copy of the largest projection, alive while its
/// product runs, to the workspace; with checkpointing, a recomputed block keeps every one of
/// its projections' copies until its backward pass (`ops::recomputing`), which the
/// checkpointed activations count, as they count the adapter's rank-sized bottlenecks that
/// the checkpointed forward pass keeps for the recomputation (`ops::checkpointed_forward`).
/// With `on_cuda`, an untied input embedding is counted in `host_weights` instead of
/// `weights` (it waits in host memory there). `parameters` counts the base; errors name a
/// target the model lacks.
pub fn plan_lora(
    model: &LlamaConfig,
    config: &Config,
    stored: candle_core::DType,
    on_cuda: bool,
) -> Result<(MemoryPlan, usize), String> {
    let counts = crate::lora::parameter_counts(&config.lora, model)?;
    let full = plan(model, config);
    let p = full.parameters;
    let dense = config.lora.base_dtype.dense();
    let t = &config.training;
    let compute = t.dtype.dtype().size_in_bytes();
    let (base, expanded, block_expanded) = match dense {
        Some(dtype) => ((p * dtype.size_in_bytes()) as u64, 0, 0),
        None => {
            let rest = (p - counts.projections.min(p)) * stored.size_in_bytes();
            let quantized = (counts.projections as f64 * NF4_BYTES_PER_WEIGHT) as u64;
            let block = counts.projections / model.num_hidden_layers.max(1);
            (
                quantized + rest as u64,
                (counts.largest_projection * compute) as u64,
                (block * compute) as u64,
            )
        }
    };
    // The embedding is stored as the base's dense dtype, or as the checkpoint with nf4.
    let embedding = dense.unwrap_or(stored).size_in_bytes();
    let host_weights = match model.frozen_embedding_on_host(on_cuda) {
        true => (model.vocab_size * model.hidden_size * embedding) as u64,
        false => 0,
    };
    let adapter = counts.adapter;
    let adapter_bytes = 4 * adapter as u64;
    let bottlenecks = (t.batch_size * t.seq_len * counts.bottleneck_width * compute) as u64;
    let plan = MemoryPlan {
        weights: base - host_weights + adapter_bytes,
        host_weights,
        gradients: adapter_bytes,
        optimizer: 2 * adapter_bytes,
        backward_workspace: full.backward_workspace + expanded,
        // The recomputed block's copies include the workspace's one.
        activations_checkpointed: full.activations_checkpointed + bottlenecks + block_expanded
            - expanded,
        // A frozen base has no masters to update: only the adapter's factors have copies.
        compute_copies: compute_copies(adapter, t.dtype.dtype()),
        ..full
    };
    Ok((plan, adapter))
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

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::DType;
    use config::BaseDtype;

    /// Llama-3.1-8B's shape, fine-tuned with r 16 on every linear layer.
    fn eight_b(base_dtype: BaseDtype) -> (LlamaConfig, Config) {
        let model: LlamaConfig = serde_json::from_value(serde_json::json!({
            "hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32,
            "num_key_value_heads": 8, "intermediate_size": 14336, "vocab_size": 128256,
        }))
        .unwrap();
        let mut config = Config::default();
        config.lora.r = 16;
        config.lora.target_modules = vec!["all-linear".into()];
        config.lora.base_dtype = base_dtype;
        (model, config)
    }

    #[test]
    fn a_4_bit_base_plans_its_projections_at_4_13_bits_and_the_rest_in_16() {
        let (model, config) = eight_b(BaseDtype::Nf4);
        let (nf4, adapter) = plan_lora(&model, &config, DType::BF16, false).unwrap();
        let (model, config) = eight_b(BaseDtype::Bf16);
        let (bf16, same_adapter) = plan_lora(&model, &config, DType::BF16, false).unwrap();
        // PEFT's count for this shape and adapter.
        assert_eq!((adapter, same_adapter), (41_943_040, 41_943_040));
        assert_eq!(
            (nf4.gradients, nf4.optimizer),
            (4 * 41_943_040, 8 * 41_943_040)
        );
        let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
        let adapter_gib = gib(4 * 41_943_040);
        // 6.98B projection weights at 0.5157 bytes, 1.05B others at 2: 5.31 GiB.
        let base = gib(nf4.weights) - adapter_gib;
        assert!((base - 5.31).abs() < 0.005, "{base}");
        assert!((gib(bf16.weights) - adapter_gib - 14.96).abs() < 0.01);
        // The expanded 14336 x 4096 projection in f32 (the compute dtype here).
        assert_eq!(
            nf4.backward_workspace - bf16.backward_workspace,
            14336 * 4096 * 4
        );
        // With checkpointing, one block's seven projections (218M weights) in f32 in all.
        let block = 4096 * (4096 + 1024 + 1024 + 4096) + 3 * 14336 * 4096;
        assert_eq!(
            nf4.activations_checkpointed - bf16.activations_checkpointed,
            (block - 14336 * 4096) * 4
        );
    }

    #[test]
    fn mixed_precision_without_checkpointing_holds_a_copy_of_every_master() {
        let (model, mut config) = eight_b(BaseDtype::Bf16);
        config.training.dtype = config::Precision::Bf16;
        let mixed = plan(&model, &config);
        let copies = 2 * model.parameter_count() as u64;
        assert_eq!(mixed.compute_copies, copies);
        assert_eq!(
            mixed.total(false) - mixed.total(true),
            mixed.activations + copies - mixed.activations_checkpointed
        );
        // A LoRA step keeps copies of the adapter's factors only.
        let (lora, adapter) = plan_lora(&model, &config, DType::BF16, false).unwrap();
        assert_eq!(lora.compute_copies, 2 * adapter as u64);
        config.training.dtype = config::Precision::F32;
        assert_eq!(plan(&model, &config).compute_copies, 0);
        let (lora, _) = plan_lora(&model, &config, DType::BF16, false).unwrap();
        assert_eq!(lora.compute_copies, 0);
    }

    #[test]
    fn checkpointing_a_lora_step_keeps_every_projections_bottleneck() {
        let (model, config) = eight_b(BaseDtype::Bf16);
        let (lora, _) = plan_lora(&model, &config, DType::BF16, false).unwrap();
        let full = plan(&model, &config);
        // r 16 on 7 projections of 32 blocks, per token of the batch, in f32.
        let tokens = (config.training.batch_size * config.training.seq_len) as u64;
        assert_eq!(
            lora.activations_checkpointed - full.activations_checkpointed,
            tokens * 32 * 7 * 16 * 4
        );
        assert_eq!(lora.activations, full.activations);
    }

    #[test]
    fn on_cuda_an_untied_input_embedding_waits_on_the_host() {
        let (mut model, config) = eight_b(BaseDtype::Nf4);
        let (device, _) = plan_lora(&model, &config, DType::BF16, false).unwrap();
        let (cuda, _) = plan_lora(&model, &config, DType::BF16, true).unwrap();
        let table = 128_256 * 4096 * 2;
        assert_eq!((device.host_weights, cuda.host_weights), (0, table));
        assert_eq!(device.weights - cuda.weights, table);
        assert_eq!(device.total(true) - cuda.total(true), table);
        // Tied to the head, the table is needed on the device.
        model.tie_word_embeddings = true;
        let (tied, _) = plan_lora(&model, &config, DType::BF16, true).unwrap();
        assert_eq!(tied.host_weights, 0);
    }
}
