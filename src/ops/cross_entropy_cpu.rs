//! Fused masked cross-entropy on the CPU: log-sum-exp, target gather and weighted mean in one
//! pass over the logits, and a backward that writes `(softmax − onehot) · weight / count`
//! directly, with no log-softmax copy of the logits.

use super::cpu_kernel::{f32s, output, rows_and_width, u32s, MIN_ROWS_PER_TASK};
use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// Mean NLL of `targets` under `logits` over the positions where `weights` is set. Same contract
/// as [`super::reference::masked_mean_nll`]; inputs must be contiguous CPU tensors (f32 logits
/// and weights, u32 targets).
pub(crate) fn masked_mean_nll(
    logits: &Tensor,
    targets: &Tensor,
    weights: &Tensor,
) -> Result<Tensor> {
    logits.apply_op3(targets, weights, MaskedMeanNll)
}

/// The operands of one call, checked against each other.
struct Rows<'a> {
    logits: &'a [f32],
    targets: &'a [u32],
    weights: &'a [f32],
    vocab: usize,
}

impl<'a> Rows<'a> {
    fn new(
        (logits, l1): (&'a CpuStorage, &Layout),
        (targets, l2): (&'a CpuStorage, &Layout),
        (weights, l3): (&'a CpuStorage, &Layout),
    ) -> Result<Self> {
        let (n, vocab) = rows_and_width(l1)?;
        let rows = Self {
            logits: f32s(logits, l1)?,
            targets: u32s(targets, l2)?,
            weights: f32s(weights, l3)?,
            vocab,
        };
        if rows.targets.len() != n || rows.weights.len() != n {
            candle_core::bail!(
                "cross-entropy: {n} rows of logits, {} targets, {} weights",
                rows.targets.len(),
                rows.weights.len()
            );
        }
        if let Some(t) = rows.targets.iter().find(|&&t| t as usize >= vocab) {
            candle_core::bail!("cross-entropy: target id {t} outside the vocabulary of {vocab}");
        }
        Ok(rows)
    }

    /// The divisor of the mean: the total weight, at least 1 (as in the reference).
    fn count(&self) -> f32 {
        self.weights.iter().map(|&w| w as f64).sum::<f64>().max(1.0) as f32
    }
}

/// `(max, log Σ exp(x − max))` of one row of logits.
fn log_sum_exp(row: &[f32]) -> (f32, f32) {
    let max = row.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
    let sum: f32 = row.iter().map(|&x| (x - max).exp()).sum();
    (max, sum.ln())
}

struct MaskedMeanNll;

impl CustomOp3 for MaskedMeanNll {
    fn name(&self) -> &'static str {
        "masked-mean-nll"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let r = Rows::new((s1, l1), (s2, l2), (s3, l3))?;
        let total: f64 = r
            .logits
            .par_chunks(r.vocab)
            .zip(r.targets.par_iter().zip(r.weights.par_iter()))
            .with_min_len(MIN_ROWS_PER_TASK)
            .filter(|(_, (_, &w))| w != 0.0)
            .map(|(row, (&t, &w))| {
                let (max, lse) = log_sum_exp(row);
                (w * (max + lse - row[t as usize])) as f64
            })
            .sum();
        Ok(output(vec![total as f32 / r.count()], ()))
    }

    fn bwd(
        &self,
        logits: &Tensor,
        targets: &Tensor,
        weights: &Tensor,
        _loss: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let scale = grad.to_dtype(candle_core::DType::F32)?.to_scalar::<f32>()?;
        let op = MaskedMeanNllGrad { scale };
        let dlogits = logits.detach().apply_op3(targets, weights, op)?;
        Ok((Some(dlogits), None, None))
    }
}

/// Gradient of the loss times `scale` with respect to the logits.
struct MaskedMeanNllGrad {
    scale: f32,
}

impl CustomOp3 for MaskedMeanNllGrad {
    fn name(&self) -> &'static str {
        "masked-mean-nll-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let r = Rows::new((s1, l1), (s2, l2), (s3, l3))?;
        let per_weight = self.scale / r.count();
        let mut out = vec![0f32; r.logits.len()];
        out.par_chunks_mut(r.vocab)
            .zip(r.logits.par_chunks(r.vocab))
            .zip(r.targets.par_iter().zip(r.weights.par_iter()))
            .with_min_len(MIN_ROWS_PER_TASK)
            .filter(|(_, (_, &w))| w != 0.0)
            .for_each(|((d, row), (&t, &w))| {
                let (max, lse) = log_sum_exp(row);
                let coef = w * per_weight;
                let shift = max + lse;
                for (d, &x) in d.iter_mut().zip(row) {
                    *d = (x - shift).exp() * coef;
                }
                d[t as usize] -= coef;
            });
        Ok(output(out, l1.shape().clone()))
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
            // Every third position is masked out.
            let weights: Vec<f32> = (0..n).map(|r| (r % 3 != 2) as u8 as f32).collect();
            let inputs = [
                logits,
                Tensor::new(targets, &Device::Cpu).unwrap(),
                Tensor::new(weights, &Device::Cpu).unwrap(),
            ];
            assert_parity(
                "masked_mean_nll",
                &inputs,
                &[true, false, false],
                |t| super::masked_mean_nll(&t[0], &t[1], &t[2]),
                |t| reference::masked_mean_nll(&t[0], &t[1], &t[2]),
                1e-5,
            );
        }
    }

    #[test]
    fn rejects_targets_outside_the_vocabulary() {
        let logits = uniform(&[2, 4], 1);
        let targets = Tensor::new(&[1u32, 4], &Device::Cpu).unwrap();
        let weights = Tensor::new(&[1f32, 1.0], &Device::Cpu).unwrap();
        let err = super::masked_mean_nll(&logits, &targets, &weights).unwrap_err();
        assert!(err.to_string().contains("target id 4"), "{err}");
    }
}
