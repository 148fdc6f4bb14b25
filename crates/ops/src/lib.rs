//! The hot operations of the model, in one place. The model calls these, never candle's
//! composite ops directly, so that faster fused versions can replace them per backend without
//! touching the model. Every function here records a backward pass (candle's fused
//! `rms_norm`/`rope`/`softmax_last_dim` do not: see CANDLE_NOTES).
//!
//! Each op is one file (the attention ops one folder) holding, side by side, its public
//! dispatch, its composite reference (any backend, any dtype; [`mod@reference`] gathers them under
//! one path), its fused CPU kernel and, in a `cuda` module, its CUDA launcher. The dispatch runs
//! the fused kernels with their own backward where [`fused`] says one exists: rayon kernels on
//! the CPU in f32, and with the `cuda` feature CUDA kernels (`kernels/`, one `.cu` file per
//! family, launched through the shared plumbing of `launch.rs`) in f32, bf16 and f16. Everything
//! else (Metal, f64, 16-bit on the CPU) takes the reference. The fused kernels are candle custom
//! ops written as a `FusedOp` (`fused_op.rs`). The AdamW update has fused CPU and multi-tensor CUDA
//! kernels too ([`adamw`]); its composite lives with the optimizer.

#![warn(missing_docs)]

pub mod adamw;
mod add;
mod add_norm;
mod argmax;
mod attach;
mod attention;
mod cast;
pub mod check;
mod cpu_kernel;
mod cross_entropy;
pub mod device;
mod dropout;
mod embedding;
mod fast_exp;
mod frozen;
mod fused_op;
mod gemv;
mod gemv_fused;
mod graph;
mod head_loss;
mod kv_write;
#[cfg(feature = "cuda")]
mod launch;
mod masked_lora;
mod master_linear;
mod matmul_sum;
#[cfg(feature = "nccl")]
pub mod nccl;
pub mod nf4;
pub mod parity;
mod picks_log;
#[cfg(feature = "cuda")]
mod programmatic;
pub mod reference;
mod rms_norm;
mod rope;
mod stack;
mod step_scope;
mod swap;
mod swiglu;

pub use adamw::{adamw_step, AdamWUpdate};
pub use add::{add, install_gradient_add};
pub use add_norm::add_rms_norm;
pub use argmax::{argmax, greedy_step};
pub use attach::{backward_from, backward_from_loss};
pub use attention::{
    cached_attention, causal_attention, decode_attention_at, flash_attention, grouped_attention,
    packed_self_attention, packed_self_attention_fuses, self_attention, windowed_attention,
    AttentionOptions, Segments,
};
pub use cast::{cast, stacked_cast};
pub use cross_entropy::{
    masked_mean_nll, token_nll, token_nll_grad, token_nll_with_grad, weighted_mean,
};
pub use dropout::{splitmix64, Dropout};
pub use embedding::embedding;
pub use fast_exp::softmax_in_place;
pub use frozen::{frozen_linear, lora_linear, stacked_lora_linear, LinearWeight};
pub use gemv::{glu_projection, linear};
pub use gemv_fused::{
    linear_residual, rms_norm_glu_projection, rms_norm_head_greedy_step, rms_norm_linear,
    InputNorm, WeightSource,
};
pub use graph::{can_capture, with_capture_cache, write_u32s, Graph};
pub use head_loss::{head_mean_nll, head_nll};
pub use kv_write::{write_kv, write_kv_fused, KvLayout, Position};
pub use master_linear::{master_linear, stacked_master_linear};
pub use matmul_sum::matmul_sum;
pub use picks_log::{PicksLog, PICKS_LOG_SLOTS};
pub use rms_norm::{rms_norm, rms_norm_offset};
pub use rope::rope;
pub use step_scope::{checkpointed_forward, recomputing, training_step, ComputeCopies};
pub use swap::{merge_heads, split_heads, swap_middle};
pub use swiglu::{glu, glu_master_projection, glu_packed, glu_packed_fuses, Glu};

use candle_core::{DType, Device, Layout, Result, Tensor};

/// Whether the fused kernels handle these tensors: all on one device and of one dtype, f32 on
/// the CPU, or f32/bf16/f16 on CUDA (in builds with the `cuda` feature).
pub fn fused(tensors: &[&Tensor]) -> bool {
    let Some(first) = tensors.first() else {
        return false;
    };
    let dtype = first.dtype();
    let alike = tensors
        .iter()
        .all(|t| t.dtype() == dtype && t.device().same_device(first.device()));
    alike
        && match first.device() {
            Device::Cpu => dtype == DType::F32,
            Device::Cuda(_) => {
                cfg!(feature = "cuda") && matches!(dtype, DType::F32 | DType::BF16 | DType::F16)
            }
            _ => false,
        }
}

/// `x · factor`, `x` itself for a factor of 1 (no pass over it): the composite paths of ops
/// whose CUDA GEMMs apply a scale as `alpha`, and gradients scaled for accumulation.
pub fn times(x: Tensor, factor: f64) -> Result<Tensor> {
    match factor == 1.0 {
        true => Ok(x),
        false => x * factor,
    }
}

/// The size of the last dimension and the number of rows before it.
pub(crate) fn rows_and_width(layout: &Layout) -> Result<(usize, usize)> {
    let width = *layout
        .dims()
        .last()
        .ok_or_else(|| candle_core::Error::Msg("fused kernel: scalar operand".into()))?;
    let rows = layout.shape().elem_count().checked_div(width).unwrap_or(0);
    Ok((rows, width))
}

/// Whether `ids` are u32 on the same device as `like`, as the fused kernels need.
fn ids_beside(ids: &Tensor, like: &Tensor) -> bool {
    ids.dtype() == DType::U32 && ids.device().same_device(like.device())
}

#[cfg(test)]
mod tests {
    use super::reference::token_nll;
    use super::*;
    use candle_core::{Device, Var};

    fn randn(shape: &[usize], seed: u64) -> Tensor {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let n = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    #[test]
    fn rms_norm_matches_definition_and_has_gradients() {
        let x = Var::from_tensor(&randn(&[2, 3, 8], 1)).unwrap();
        let w = Var::from_tensor(&randn(&[8], 2)).unwrap();
        let y = rms_norm(&x, &w, 1e-5).unwrap();
        let xs = x.to_vec3::<f32>().unwrap();
        let ws = w.to_vec1::<f32>().unwrap();
        let row = &xs[1][2];
        let rms = (row.iter().map(|v| v * v).sum::<f32>() / 8.0 + 1e-5).sqrt();
        let got = y.to_vec3::<f32>().unwrap()[1][2][3];
        assert!((got - row[3] / rms * ws[3]).abs() < 1e-5);
        let grads = y.sum_all().unwrap().backward().unwrap();
        assert!(grads.get(&x).is_some() && grads.get(&w).is_some());
    }

    #[test]
    fn attention_is_causal_and_cache_consistent() {
        let q = randn(&[1, 2, 5, 4], 3);
        let k = randn(&[1, 2, 5, 4], 4);
        let v = randn(&[1, 2, 5, 4], 5);
        let full = causal_attention(&q, &k, &v).unwrap();
        // The last query alone against all keys equals the last row of the full pass.
        let last = causal_attention(&q.narrow(2, 4, 1).unwrap(), &k, &v).unwrap();
        let a = full.narrow(2, 4, 1).unwrap().flatten_all().unwrap();
        let diff = (a - last.flatten_all().unwrap()).unwrap().abs().unwrap();
        assert!(diff.max(0).unwrap().to_scalar::<f32>().unwrap() < 1e-6);
        // The first query only sees the first value.
        let first = full.narrow(2, 0, 1).unwrap().flatten_all().unwrap();
        let v0 = v.narrow(2, 0, 1).unwrap().flatten_all().unwrap();
        let diff = (first - v0).unwrap().abs().unwrap();
        assert!(diff.max(0).unwrap().to_scalar::<f32>().unwrap() < 1e-6);
    }

    #[test]
    fn nll_matches_log_softmax() {
        let logits = randn(&[3, 5], 6);
        let targets = Tensor::new(&[1u32, 4, 0], &Device::Cpu).unwrap();
        let nll = token_nll(&logits, &targets)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let rows = logits.to_vec2::<f32>().unwrap();
        for (i, t) in [1usize, 4, 0].iter().enumerate() {
            let lse = rows[i].iter().map(|v| v.exp()).sum::<f32>().ln();
            assert!((nll[i] - (lse - rows[i][*t])).abs() < 1e-5);
        }
        let w = Tensor::new(&[1f32, 0.0, 1.0], &Device::Cpu).unwrap();
        let mean = masked_mean_nll(&logits, &targets, &w)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!((mean - (nll[0] + nll[2]) / 2.0).abs() < 1e-6);
    }
}
