//! Fused cross-entropy on the CPU and on CUDA: per-row NLL (log-sum-exp and target gather in
//! one pass over the logits, f32 out) and a backward that writes `(softmax − onehot) · g` per
//! row directly, with no log-softmax copy of the logits. The weighted mean over rows is left to
//! tensor ops, so nothing here synchronizes with the device.

use super::cpu_kernel::{f32s, output, u32s, written_rows, MIN_ROWS_PER_TASK};
#[cfg(feature = "cuda")]
use super::cuda;
use super::fast_exp;
use super::rows_and_width;
#[cfg(feature = "cuda")]
use candle_core::CudaStorage;
use candle_core::{CpuStorage, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;
use std::mem::MaybeUninit;

/// NLL `[n]` (f32) of u32 `targets` `[n]` under `logits` `[n, vocab]`, with a backward. Same
/// contract as [`super::reference::token_nll`]; inputs must be contiguous, on a backend
/// [`super::fused`] accepts.
pub(crate) fn token_nll(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    logits.apply_op2(targets, TokenNll)
}

/// `(softmax(logits) − onehot(targets)) · g[row]` in the logits' dtype, for f32 row scales `g`
/// `[n]`: the gradient of `Σ g · nll` with respect to the logits. Same contract as
/// [`super::reference::token_nll_grad`].
pub(crate) fn token_nll_grad(logits: &Tensor, targets: &Tensor, g: &Tensor) -> Result<Tensor> {
    logits.apply_op3_no_bwd(targets, g, &TokenNllGrad)
}

/// Targets checked against the logits on the CPU.
fn cpu_targets<'a>(
    logits: &Layout,
    targets: &'a CpuStorage,
    targets_layout: &Layout,
) -> Result<(usize, usize, &'a [u32])> {
    let (n, vocab) = rows_and_width(logits)?;
    let targets = u32s(targets, targets_layout)?;
    if targets.len() != n {
        candle_core::bail!(
            "cross-entropy: {n} rows of logits, {} targets",
            targets.len()
        );
    }
    if let Some(t) = targets.iter().find(|&&t| t as usize >= vocab) {
        candle_core::bail!("cross-entropy: target id {t} outside the vocabulary of {vocab}");
    }
    Ok((n, vocab, targets))
}

/// `(max, log Σ exp(x − max))` of one row of logits.
fn log_sum_exp(row: &[f32]) -> (f32, f32) {
    let max = fast_exp::max(row);
    (max, fast_exp::sum_exp(row, max).ln())
}

struct TokenNll;

impl CustomOp2 for TokenNll {
    fn name(&self) -> &'static str {
        "token-nll"
    }

    fn cpu_fwd(
        &self,
        logits: &CpuStorage,
        logits_layout: &Layout,
        targets: &CpuStorage,
        targets_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (n, vocab, targets) = cpu_targets(logits_layout, targets, targets_layout)?;
        let logits = f32s(logits, logits_layout)?;
        let nll: Vec<f32> = logits
            .par_chunks(vocab.max(1))
            .zip(targets.par_iter())
            .with_min_len(MIN_ROWS_PER_TASK)
            .map(|(row, &t)| {
                let (max, lse) = log_sum_exp(row);
                max + lse - row[t as usize]
            })
            .collect();
        Ok(output(nll, n))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        logits: &CudaStorage,
        logits_layout: &Layout,
        targets: &CudaStorage,
        targets_layout: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let (n, _) = rows_and_width(logits_layout)?;
        let nll = cuda::token_nll((logits, logits_layout), (targets, targets_layout))?;
        Ok((nll, n.into()))
    }

    fn bwd(
        &self,
        logits: &Tensor,
        targets: &Tensor,
        _nll: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let g = grad.to_dtype(DType::F32)?.contiguous()?;
        let dlogits = token_nll_grad(&logits.detach(), targets, &g)?;
        Ok((Some(dlogits), None))
    }
}

struct TokenNllGrad;

impl CustomOp3 for TokenNllGrad {
    fn name(&self) -> &'static str {
        "token-nll-grad"
    }

    fn cpu_fwd(
        &self,
        logits: &CpuStorage,
        logits_layout: &Layout,
        targets: &CpuStorage,
        targets_layout: &Layout,
        g: &CpuStorage,
        g_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (n, vocab, targets) = cpu_targets(logits_layout, targets, targets_layout)?;
        let (logits, g) = (f32s(logits, logits_layout)?, f32s(g, g_layout)?);
        if g.len() != n {
            candle_core::bail!("cross-entropy gradient: {n} rows, {} row scales", g.len());
        }
        // SAFETY: every element of each row is written (zeros where the row's scale is 0).
        let out = unsafe {
            written_rows(logits.len(), vocab, |r, d| {
                let (t, g) = (targets[r] as usize, g[r]);
                if g == 0.0 {
                    d.fill(MaybeUninit::new(0.0));
                    return;
                }
                let row = &logits[r * vocab..][..vocab];
                let (max, lse) = log_sum_exp(row);
                let shift = max + lse;
                for (j, (d, &x)) in d.iter_mut().zip(row).enumerate() {
                    let target = if j == t { 1.0 } else { 0.0 };
                    d.write((fast_exp::exp(x - shift) - target) * g);
                }
            })
        };
        Ok(output(out, logits_layout.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        logits: &CudaStorage,
        logits_layout: &Layout,
        targets: &CudaStorage,
        targets_layout: &Layout,
        g: &CudaStorage,
        g_layout: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let d = cuda::token_nll_grad(
            (logits, logits_layout),
            (targets, targets_layout),
            (g, g_layout),
        )?;
        Ok((d, logits_layout.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use crate::ops::parity::{assert_parity, uniform};
    use crate::ops::reference;
    use candle_core::{Device, Tensor};

    #[test]
    fn matches_the_reference_forward_and_backward() {
        for (i, &(n, vocab)) in [(1, 3), (5, 7), (13, 1000), (4, 1)].iter().enumerate() {
            let logits = (uniform(&[n, vocab], i as u64) * 4.0).unwrap();
            let targets: Vec<u32> = (0..n).map(|r| ((r * 7 + i) % vocab) as u32).collect();
            let inputs = [logits, Tensor::new(targets, &Device::Cpu).unwrap()];
            assert_parity(
                "token_nll",
                &inputs,
                &[true, false],
                |t| super::token_nll(&t[0], &t[1]),
                |t| reference::token_nll(&t[0], &t[1]),
                1e-5,
            );
        }
    }

    #[test]
    fn rejects_targets_outside_the_vocabulary() {
        let logits = uniform(&[2, 4], 1);
        let targets = Tensor::new(&[1u32, 4], &Device::Cpu).unwrap();
        let err = super::token_nll(&logits, &targets).unwrap_err();
        assert!(err.to_string().contains("target id 4"), "{err}");
    }
}
