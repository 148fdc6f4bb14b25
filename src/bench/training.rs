//! The training steps a `train` or `lora` row times: the LoRA model over a base held either way,
//! a full optimizer step, and the random batch.

use super::rows::{LoraBase, LoraShape, Settings};
use super::timed;
use candle_core::{DType, Device, Var};
use model::{Llama, LlamaConfig, Weights};
use rand::{Rng, SeedableRng};
use train::distributed::buckets::BucketPlan;
use train::distributed::Collective;
use train::gradients::{self, Batch, Gradients};
use train::optim::{clip_scale, global_norm, keep_model_copies, AdamW, AdamWParams};
use train::Adapter;

/// The model over `weights` held as `base` says, with a fresh adapter of `shape` attached
/// (torch_ref.py's: alpha twice the rank), and the adapter's vars: the only ones the optimizer
/// gets.
pub(super) fn lora_model(
    cfg: &LlamaConfig,
    weights: Weights,
    base: LoraBase,
    shape: LoraShape,
    dtype: DType,
    device: &Device,
) -> anyhow::Result<(Llama, Vec<(String, Var)>)> {
    let weights = match base {
        LoraBase::Frozen => weights,
        // One tensor at a time, so the row's peak never holds the base in both dtypes.
        LoraBase::Frozen16 => weights.into_dtype(dtype)?,
        // The vars of the base are dropped here: the model holds their tensors, which is all
        // candle needs to compute and keep their gradients.
        LoraBase::Plain => weights.into_trainable()?.0,
        // Drawn on the host (see `measure`): quantized there, the rest moved over.
        LoraBase::Nf4 => weights
            .to_dtype(dtype)?
            .quantize_projections(device)?
            .to_device(device)?,
    };
    let mut model = Llama::new(cfg, &weights, dtype)?;
    // As `finetune --lora`: a frozen untied input embedding waits on the host on CUDA (once
    // the weights' own handle on its device copy is gone).
    drop(weights);
    model.keep_input_embedding_on_host()?;
    let adapter = Adapter::init(&shape.section(), cfg, 0, device)?;
    adapter.attach(&mut model)?;
    Ok((model, adapter.vars()))
}

/// Seconds per full training step of `vars` and the last step's loss (two builds' rows agree
/// on it where their numerics do): forward, backward, clipping to norm 1, AdamW
/// (lr 3e-4, weight decay 0.1 as the reference). On several ranks (`collective`), each rank
/// steps on its own random batch and the gradients are summed in buckets before clipping, as
/// `llmtool train --gpus N` does.
pub(super) fn time_training(
    model: &Llama,
    vars: &[(String, Var)],
    s: &Settings,
    recompute: bool,
    device: &Device,
    collective: &dyn Collective,
) -> candle_core::Result<(f64, f64)> {
    let params = AdamWParams {
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.1,
    };
    let mut optimizer = AdamW::new(vars, params)?;
    keep_model_copies(&mut optimizer, model, recompute)?;
    let batch = random_batch(&model.config, s, collective.rank() as u64);
    let buckets = BucketPlan::for_vars(vars);
    let mut last_loss = f64::NAN;
    let mut step = 0;
    let step_s = timed(device, s.warmup, s.steps, || {
        // Adapter dropout (none without adapters or at 0) draws new masks every step, as
        // `finetune` does.
        step += 1;
        model.set_adapter_dropout_seed(Some(step));
        let mut grads = Gradients::new();
        let copies = optimizer.compute_copies()?;
        let loss = gradients::accumulate(
            model,
            vars,
            &batch,
            1.0,
            recompute,
            copies.as_ref(),
            &mut grads,
        )?;
        buckets
            .all_reduce(vars, &mut grads, collective)
            .map_err(candle_core::Error::wrap)?;
        // Prepared, the norm and the loss read, and applied as `llmtool train` does.
        let update = optimizer.prepare(&grads, 3e-4)?;
        let norm = global_norm(&grads)?;
        last_loss = loss.read()?;
        optimizer.step_prepared(update, clip_scale(norm, 1.0))
    })?;
    model.set_adapter_dropout_seed(None);
    Ok((step_s, last_loss))
}

/// `batch × seq` uniformly random inputs and targets, every position scored.
pub(super) fn random_batch(cfg: &LlamaConfig, s: &Settings, seed: u64) -> Batch {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let n = s.batch * s.seq;
    let mut ids = || -> Vec<u32> {
        (0..n)
            .map(|_| rng.random_range(0..cfg.vocab_size as u32))
            .collect()
    };
    Batch::windows(ids(), ids(), s.batch, s.seq)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Tensor;
    use serde_json::json;
    use train::init::random_weights;

    /// A model small enough for exact checks, with every base matrix shape unique: q/k/v/o
    /// 16x16, gate/up 40x16, down 16x40, embedding (tied head) 50x16.
    fn small_config() -> LlamaConfig {
        serde_json::from_value(json!({
            "hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2,
            "num_key_value_heads": 2, "intermediate_size": 40, "vocab_size": 50,
            "max_position_embeddings": 16, "tie_word_embeddings": true,
        }))
        .unwrap()
    }

    /// The LoRA model of `small_config` over the same seeded base, held as `base` says, with
    /// every B set to the same nonzero values (a fresh B is zero, which makes A's gradient zero).
    fn small_lora(base: LoraBase) -> (Llama, Vec<(String, Var)>) {
        let cfg = small_config();
        let weights = random_weights(&cfg, 3, &Device::Cpu).unwrap();
        let (model, vars) = lora_model(
            &cfg,
            weights,
            base,
            LoraShape::default(),
            DType::F32,
            &Device::Cpu,
        )
        .unwrap();
        for (name, var) in &vars {
            if name.ends_with("lora_B.weight") {
                let n = var.elem_count() as f32;
                let values = Tensor::arange(0f32, n, &Device::Cpu)
                    .and_then(|t| t.affine(1.0 / n as f64, -0.5))
                    .and_then(|t| t.reshape(var.shape()))
                    .unwrap();
                var.set(&values).unwrap();
            }
        }
        (model, vars)
    }

    /// The gradient store of one plain backward pass of `model` over a 2 x 3 batch.
    fn backward(model: &Llama) -> candle_core::backprop::GradStore {
        let ids = Tensor::new(&[[1u32, 7, 30], [49, 0, 12]], &Device::Cpu).unwrap();
        let targets = Tensor::new(&[7u32, 30, 2, 0, 12, 5], &Device::Cpu).unwrap();
        let weights = Tensor::ones(6, DType::F32, &Device::Cpu).unwrap();
        let logits = model.forward(&ids, None).unwrap().reshape((6, 50)).unwrap();
        let loss = ops::masked_mean_nll(&logits, &targets, &weights).unwrap();
        loss.backward().unwrap()
    }

    /// Values held by gradients in `store` shaped like a base weight (or, as candle keys a
    /// plain matmul's weight gradient, its broadcast transpose): `[.., out, in]` or `[.., in,
    /// out]` for a base matrix `[out, in]`.
    fn base_shaped_gradient_values(store: &candle_core::backprop::GradStore) -> usize {
        let base = [(16, 16), (40, 16), (16, 40), (50, 16)];
        store
            .get_ids()
            .filter_map(|&id| store.get_id(id))
            .filter(|g| {
                let d = g.dims();
                d.len() >= 2 && {
                    let last = (d[d.len() - 2], d[d.len() - 1]);
                    base.iter().any(|&(o, i)| last == (o, i) || last == (i, o))
                }
            })
            .map(Tensor::elem_count)
            .sum()
    }

    #[test]
    fn plain_base_stores_weight_gradients_and_frozen_base_computes_none() {
        let (plain, _) = small_lora(LoraBase::Plain);
        let store = backward(&plain);
        for (name, w) in plain.named_parameters().unwrap() {
            if w.rank() == 2 {
                let g = store.get(&w);
                assert!(
                    g.is_some_and(|g| g.dims() == w.dims()),
                    "{name}: no gradient"
                );
            }
        }
        // q/k/v/o, gate/up/down of 2 layers and the embedding.
        let per_layer = 4 * 16 * 16 + 3 * 40 * 16;
        assert!(base_shaped_gradient_values(&store) >= 2 * per_layer + 50 * 16);

        let (frozen, _) = small_lora(LoraBase::Frozen);
        let store = backward(&frozen);
        for (name, w) in frozen.named_parameters().unwrap() {
            assert!(store.get(&w).is_none(), "{name} got a gradient");
        }
        assert_eq!(base_shaped_gradient_values(&store), 0);
    }

    #[test]
    fn adapter_gradients_are_the_same_over_a_plain_and_a_frozen_base() {
        let cfg = small_config();
        let s = Settings {
            batch: 2,
            seq: 5,
            steps: 1,
            warmup: 0,
            gen_tokens: 1,
            sampling: None,
            lora: Default::default(),
        };
        let batch = random_batch(&cfg, &s, 4);
        let (plain, plain_vars) = small_lora(LoraBase::Plain);
        let (frozen, frozen_vars) = small_lora(LoraBase::Frozen);
        for recompute in [false, true] {
            let (mut a, mut b) = (Gradients::new(), Gradients::new());
            let loss_a =
                gradients::accumulate(&plain, &plain_vars, &batch, 1.0, recompute, None, &mut a)
                    .and_then(|loss| loss.read())
                    .unwrap();
            let loss_b =
                gradients::accumulate(&frozen, &frozen_vars, &batch, 1.0, recompute, None, &mut b)
                    .and_then(|loss| loss.read())
                    .unwrap();
            assert!((loss_a - loss_b).abs() < 1e-6, "{loss_a} vs {loss_b}");
            // Every adapter tensor, and nothing else: the base's gradients are not collected.
            assert_eq!(a.len(), 2 * 4 * 2);
            for (name, ga) in &a {
                let gb = &b[name];
                let diff = (ga - gb).unwrap().abs().unwrap().max_all().unwrap();
                let diff = diff.to_scalar::<f32>().unwrap();
                let size = ga.abs().unwrap().max_all().unwrap();
                assert!(size.to_scalar::<f32>().unwrap() > 0.0, "{name} is zero");
                assert!(
                    diff <= 1e-6,
                    "{name}: differs by {diff} (recompute {recompute})"
                );
            }
        }
    }
}
