//! Fused AdamW update on the CPU: one rayon pass per parameter reads the weight, gradient and
//! both moments and writes their new values, instead of ~10 tensor ops with a fresh buffer each.

use super::cpu_kernel::{f32s, ELEMENTWISE_CHUNK};
use candle_core::{DType, Result, Storage, Tensor, Var};
use rayon::prelude::*;

/// The scalars of one AdamW update, bias corrections included.
#[derive(Debug, Clone, Copy)]
pub struct AdamWUpdate {
    /// Learning rate.
    pub lr: f64,
    /// First-moment decay.
    pub beta1: f64,
    /// Second-moment decay.
    pub beta2: f64,
    /// Added to the root of the second moment.
    pub eps: f64,
    /// `lr * weight_decay`, or 0 for parameters without decay.
    pub decay: f64,
    /// `1 - beta1^t`.
    pub bias1: f64,
    /// `1 - beta2^t`.
    pub bias2: f64,
}

/// Updates `param` in place from `grad` and returns the new `(m, v)`, or `None` (nothing
/// touched) when the operands are not all f32 CPU tensors of one size.
pub fn adamw_step(
    param: &Var,
    m: &Tensor,
    v: &Tensor,
    grad: &Tensor,
    u: &AdamWUpdate,
) -> Result<Option<(Tensor, Tensor)>> {
    let operands = [param.as_tensor(), m, v, grad];
    if operands
        .iter()
        .any(|t| !t.device().is_cpu() || t.dtype() != DType::F32 || !t.is_contiguous())
    {
        return Ok(None);
    }
    let n = param.elem_count();
    let mut new_w = vec![0f32; n];
    let mut new_m = vec![0f32; n];
    let mut new_v = vec![0f32; n];
    {
        // Read guards on the four storages; released before `Var::set` takes the write lock.
        let guards: Vec<_> = operands.iter().map(|t| t.storage_and_layout()).collect();
        let slices = guards
            .iter()
            .map(|(storage, layout)| match &**storage {
                Storage::Cpu(s) => f32s(s, layout),
                _ => candle_core::bail!("adamw: operand left the CPU"),
            })
            .collect::<Result<Vec<_>>>()?;
        let [w, m, v, g] = slices[..] else {
            candle_core::bail!("adamw: four operands expected");
        };
        if [m.len(), v.len(), g.len()].iter().any(|&len| len != n) {
            return Ok(None);
        }
        let c = ELEMENTWISE_CHUNK;
        new_w
            .par_chunks_mut(c)
            .zip(new_m.par_chunks_mut(c).zip(new_v.par_chunks_mut(c)))
            .zip(w.par_chunks(c).zip(m.par_chunks(c)))
            .zip(v.par_chunks(c).zip(g.par_chunks(c)))
            .for_each(|(((nw, (nm, nv)), (w, m)), (v, g))| update(nw, nm, nv, (w, m, v, g), u));
    }
    param.set(&Tensor::from_vec(new_w, param.shape(), param.device())?)?;
    let shape = param.shape();
    Ok(Some((
        Tensor::from_vec(new_m, shape, param.device())?,
        Tensor::from_vec(new_v, shape, param.device())?,
    )))
}

/// One chunk of the update, in the order of operations of the composite optimizer.
fn update(
    nw: &mut [f32],
    nm: &mut [f32],
    nv: &mut [f32],
    (w, m, v, g): (&[f32], &[f32], &[f32], &[f32]),
    u: &AdamWUpdate,
) {
    let (b1, b2) = (u.beta1 as f32, u.beta2 as f32);
    let (c1, c2) = (1.0 - b1, 1.0 - b2);
    let (bias1, bias2, eps) = (u.bias1 as f32, u.bias2 as f32, u.eps as f32);
    let (lr, keep) = (u.lr as f32, (1.0 - u.decay) as f32);
    for i in 0..w.len() {
        nm[i] = m[i] * b1 + g[i] * c1;
        nv[i] = v[i] * b2 + g[i] * g[i] * c2;
        let denom = (nv[i] / bias2).sqrt() + eps;
        nw[i] = w[i] * keep - (nm[i] / bias1) / denom * lr;
    }
}
