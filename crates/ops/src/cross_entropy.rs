//! Fused cross-entropy on the CPU and on CUDA: per-row NLL (log-sum-exp and target gather in
//! one pass over the logits, f32 out), a backward that writes `(softmax − onehot) · g` per row
//! directly, with no log-softmax copy of the logits, and both at once for the training loss
//! (the log-sum-exp of each row computed once). The weighted mean over rows is left to tensor
//! ops, so nothing here synchronizes with the device.

use super::cpu_kernel::{
    self, f32s, output, u32s, written_rows, written_rows_with, MIN_ROWS_PER_TASK,
};
#[cfg(feature = "cuda")]
use super::cuda;
use super::fast_exp;
use super::rows_and_width;
use candle_core::op::BackpropOp;
#[cfg(feature = "cuda")]
use candle_core::CudaStorage;
use candle_core::{
    CpuStorage, CustomOp2, CustomOp3, DType, Device, Layout, Result, Shape, Storage, Tensor,
};
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

/// [`token_nll`] and [`token_nll_grad`] of the same logits as `(nll, gradient)`, neither
/// recording a backward: one pass per row on the CPU, one kernel on CUDA. Same contract as the
/// two ops; inputs must be contiguous, on a backend [`super::fused`] accepts.
pub(crate) fn token_nll_with_grad(
    logits: &Tensor,
    targets: &Tensor,
    g: &Tensor,
) -> Result<(Tensor, Tensor)> {
    let operands = [logits, targets, g];
    let (nll, d) = match logits.device() {
        Device::Cpu => {
            let (nll, d) =
                cpu_kernel::with_operands(&operands, |o| cpu_nll_with_grad(o[0], o[1], o[2]))?;
            (
                Storage::Cpu(CpuStorage::F32(nll)),
                Storage::Cpu(CpuStorage::F32(d)),
            )
        }
        #[cfg(feature = "cuda")]
        Device::Cuda(_) => {
            let (nll, d) =
                cuda::with_operands(&operands, |o| cuda::token_nll_with_grad(o[0], o[1], o[2]))?;
            (Storage::Cuda(nll), Storage::Cuda(d))
        }
        _ => candle_core::bail!("cross-entropy: no fused kernel for this device"),
    };
    let untracked = |storage: Storage, shape: Shape| {
        Tensor::from_storage(storage, shape, BackpropOp::none(), false)
    };
    Ok((
        untracked(nll, Shape::from(logits.dim(0)?)),
        untracked(d, logits.shape().clone()),
    ))
}

/// The CPU kernel of [`token_nll_with_grad`]: the NLLs and the gradient rows.
fn cpu_nll_with_grad(
    (logits, logits_layout): (&CpuStorage, &Layout),
    (targets, targets_layout): (&CpuStorage, &Layout),
    (g, g_layout): (&CpuStorage, &Layout),
) -> Result<(Vec<f32>, Vec<f32>)> {
    let (n, vocab, targets) = cpu_targets(logits_layout, targets, targets_layout)?;
    let (logits, g) = (
        f32s(logits, logits_layout)?,
        cpu_row_scales(g, g_layout, n)?,
    );
    // SAFETY: `write_grad_row` writes every element of the row.
    let (d, nll) = unsafe {
        written_rows_with(logits.len(), vocab, |r, d| {
            let (row, t) = (&logits[r * vocab..][..vocab], targets[r] as usize);
            let shift = log_sum_exp(row);
            write_grad_row(row, t, shift, g[r], d);
            shift - row[t]
        })
    };
    Ok((nll, d))
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

/// Row scales `g` checked against `n` rows of logits on the CPU.
fn cpu_row_scales<'a>(g: &'a CpuStorage, layout: &Layout, n: usize) -> Result<&'a [f32]> {
    let g = f32s(g, layout)?;
    if g.len() != n {
        candle_core::bail!("cross-entropy gradient: {n} rows, {} row scales", g.len());
    }
    Ok(g)
}

/// `log Σ exp(x)` of one row of logits, as `max + log Σ exp(x − max)`.
fn log_sum_exp(row: &[f32]) -> f32 {
    let max = fast_exp::max(row);
    max + fast_exp::sum_exp(row, max).ln()
}

/// Writes `(softmax(row) − onehot(t)) · g` into `d`, every element, for `shift` the row's
/// [`log_sum_exp`] (not read when `g` is 0: the row is then zeros).
fn write_grad_row(row: &[f32], t: usize, shift: f32, g: f32, d: &mut [MaybeUninit<f32>]) {
    if g == 0.0 {
        d.fill(MaybeUninit::new(0.0));
        return;
    }
    for (j, (d, &x)) in d.iter_mut().zip(row).enumerate() {
        let target = if j == t { 1.0 } else { 0.0 };
        d.write((fast_exp::exp(x - shift) - target) * g);
    }
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
            .map(|(row, &t)| log_sum_exp(row) - row[t as usize])
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
        let (logits, g) = (
            f32s(logits, logits_layout)?,
            cpu_row_scales(g, g_layout, n)?,
        );
        // SAFETY: `write_grad_row` writes every element of the row.
        let out = unsafe {
            written_rows(logits.len(), vocab, |r, d| {
                let (row, g) = (&logits[r * vocab..][..vocab], g[r]);
                // A skipped row (scale 0) is zeros: its log-sum-exp is not needed.
                let shift = if g == 0.0 { 0.0 } else { log_sum_exp(row) };
                write_grad_row(row, targets[r] as usize, shift, g, d);
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
    use crate::parity::{assert_parity, relative_error, uniform};
    use crate::reference;
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
    fn nll_with_grad_matches_the_reference_nll_and_gradient() {
        // The last shape is large enough for the parallel path; every third row has scale 0.
        for (i, &(n, vocab)) in [(1, 3), (5, 7), (4, 1), (40, 1000)].iter().enumerate() {
            let logits = (uniform(&[n, vocab], i as u64) * 4.0).unwrap();
            let targets: Vec<u32> = (0..n).map(|r| ((r * 7 + i) % vocab) as u32).collect();
            let targets = Tensor::new(targets, &Device::Cpu).unwrap();
            let scales: Vec<f32> = (0..n).map(|r| (r % 3 != 0) as u8 as f32 * 0.5).collect();
            let g = Tensor::new(scales, &Device::Cpu).unwrap();
            let (nll, d) = super::token_nll_with_grad(&logits, &targets, &g).unwrap();
            let want_nll = reference::token_nll(&logits, &targets).unwrap();
            let want_d = reference::token_nll_grad(&logits, &targets, &g).unwrap();
            let errors = [relative_error(&nll, &want_nll), relative_error(&d, &want_d)];
            assert!(
                errors.iter().all(|&e| e < 1e-5),
                "[{n}, {vocab}]: {errors:?}"
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
