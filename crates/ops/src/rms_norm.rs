//! Fused RMSNorm: one pass per row forward, one pass per row for the input gradient and a
//! row-parallel reduction for the weight gradient, on the CPU (rayon) and on CUDA
//! (`kernels/ops.cu`). The per-row inverse RMS is recomputed in backward rather than stored: it
//! costs one dot product per row (on CUDA the input gradient's kernel hands it on to the weight
//! gradient).

use super::cpu_kernel::{f32s, output, written_rows, MIN_ROWS_PER_TASK};
#[cfg(feature = "cuda")]
use super::cuda;
use super::rows_and_width;
#[cfg(feature = "cuda")]
use candle_core::CudaStorage;
use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// `x / sqrt(mean(x²) + eps) * weight` over the last dimension. Same contract as
/// [`super::reference::rms_norm`]; inputs must be contiguous, on a backend [`super::fused`]
/// accepts.
pub(crate) fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    x.apply_op2(weight, RmsNorm { eps: eps as f32 })
}

pub(super) fn inverse_rms(row: &[f32], eps: f32) -> f32 {
    let mean_square = row.iter().map(|x| x * x).sum::<f32>() / row.len() as f32;
    1.0 / (mean_square + eps).sqrt()
}

/// Checks that `weight` has one entry per column of `x`.
pub(super) fn check_width(x: &Layout, weight: &[f32]) -> Result<(usize, usize)> {
    let (rows, width) = rows_and_width(x)?;
    if weight.len() != width {
        candle_core::bail!("rms_norm: weight of {} for rows of {width}", weight.len());
    }
    Ok((rows, width))
}

struct RmsNorm {
    eps: f32,
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "rms-norm"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        x_layout: &Layout,
        w: &CpuStorage,
        w_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, w) = (f32s(x, x_layout)?, f32s(w, w_layout)?);
        let (_, width) = check_width(x_layout, w)?;
        // SAFETY: every element of each row is written.
        let y = unsafe {
            written_rows(x.len(), width, |row, y| {
                let x = &x[row * width..][..width];
                let r = inverse_rms(x, self.eps);
                for ((y, &x), &w) in y.iter_mut().zip(x).zip(w) {
                    y.write(x * r * w);
                }
            })
        };
        Ok(output(y, x_layout.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &CudaStorage,
        x_layout: &Layout,
        w: &CudaStorage,
        w_layout: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let y = cuda::rms_norm((x, x_layout), (w, w_layout), self.eps)?;
        Ok((y, x_layout.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        // candle stores whatever gradient is returned, so a frozen operand must get `None`
        // (which also skips its kernel).
        let grad = grad.contiguous()?;
        let (x_data, w_data) = (x.detach(), w.detach());
        #[cfg(feature = "cuda")]
        if x.device().is_cuda() && x.track_op() && w.track_op() {
            let (dx, dw) = cuda_grads(&x_data, &w_data, &grad, self.eps)?;
            return Ok((Some(dx), Some(dw)));
        }
        let dx = x
            .track_op()
            .then(|| x_data.apply_op3(&w_data, &grad, RmsNormInputGrad { eps: self.eps }))
            .transpose()?;
        let dw = w
            .track_op()
            .then(|| x_data.apply_op2(&grad, RmsNormWeightGrad { eps: self.eps }))
            .transpose()?;
        Ok((dx, dw))
    }
}

/// Both gradients on CUDA, the input gradient's kernel writing the per-row inverse RMS that the
/// weight gradient reads (instead of a third kernel recomputing it).
#[cfg(feature = "cuda")]
fn cuda_grads(x: &Tensor, w: &Tensor, grad: &Tensor, eps: f32) -> Result<(Tensor, Tensor)> {
    let (dx, dw) = cuda::with_operands(&[x, w, grad], |ops| {
        let inverse = cuda::rms_norm_inverse_buffer(ops[0])?;
        let dx = cuda::rms_norm_input_grad(ops[0], ops[1], ops[2], eps, Some(&inverse))?;
        let dw = cuda::rms_norm_weight_grad(ops[0], ops[2], &inverse)?;
        Ok((dx, dw))
    })?;
    Ok((
        cuda::tensor(dx, x.shape().clone()),
        cuda::tensor(dw, w.shape().clone()),
    ))
}

/// `dx = r · (g⊙w − x̂ · mean(g⊙w⊙x̂))` with `x̂ = x · r`.
struct RmsNormInputGrad {
    eps: f32,
}

impl CustomOp3 for RmsNormInputGrad {
    fn name(&self) -> &'static str {
        "rms-norm-input-grad"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        x_layout: &Layout,
        w: &CpuStorage,
        w_layout: &Layout,
        g: &CpuStorage,
        g_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, w, g) = (f32s(x, x_layout)?, f32s(w, w_layout)?, f32s(g, g_layout)?);
        let (_, width) = check_width(x_layout, w)?;
        // SAFETY: every element of each row is written.
        let dx = unsafe {
            written_rows(x.len(), width, |row, dx| {
                let (x, g) = (&x[row * width..][..width], &g[row * width..][..width]);
                let r = inverse_rms(x, self.eps);
                let dot: f32 = x.iter().zip(g).zip(w).map(|((x, g), w)| x * g * w).sum();
                let k = dot * r * r / width as f32;
                for (((dx, &x), &g), &w) in dx.iter_mut().zip(x).zip(g).zip(w) {
                    dx.write(r * (g * w - x * k));
                }
            })
        };
        Ok(output(dx, x_layout.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &CudaStorage,
        x_layout: &Layout,
        w: &CudaStorage,
        w_layout: &Layout,
        g: &CudaStorage,
        g_layout: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let (x, w, g) = ((x, x_layout), (w, w_layout), (g, g_layout));
        let dx = cuda::rms_norm_input_grad(x, w, g, self.eps, None)?;
        Ok((dx, x_layout.shape().clone()))
    }
}

/// `dw = Σ_rows g ⊙ x̂`, summed per fixed chunk of rows and then across chunks in order.
struct RmsNormWeightGrad {
    eps: f32,
}

impl CustomOp2 for RmsNormWeightGrad {
    fn name(&self) -> &'static str {
        "rms-norm-weight-grad"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        x_layout: &Layout,
        g: &CpuStorage,
        g_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, g) = (f32s(x, x_layout)?, f32s(g, g_layout)?);
        let (_, width) = rows_and_width(x_layout)?;
        // Fixed chunks summed in order: the result does not depend on how rayon splits the
        // work, so a resumed run reproduces an uninterrupted one bit for bit.
        let chunk = MIN_ROWS_PER_TASK * width.max(1);
        let partials: Vec<Vec<f32>> = x
            .par_chunks(chunk)
            .zip(g.par_chunks(chunk))
            .map(|(x, g)| {
                let mut acc = vec![0f32; width];
                for (x, g) in x.chunks(width.max(1)).zip(g.chunks(width.max(1))) {
                    let r = inverse_rms(x, self.eps);
                    for ((a, &x), &g) in acc.iter_mut().zip(x).zip(g) {
                        *a += g * x * r;
                    }
                }
                acc
            })
            .collect();
        let mut dw = vec![0f32; width];
        for partial in partials {
            dw.iter_mut().zip(&partial).for_each(|(d, p)| *d += p);
        }
        Ok(output(dw, width))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &CudaStorage,
        x_layout: &Layout,
        g: &CudaStorage,
        g_layout: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let (_, width) = rows_and_width(x_layout)?;
        let inverse = cuda::rms_norm_inverse((x, x_layout), self.eps)?;
        let dw = cuda::rms_norm_weight_grad((x, x_layout), (g, g_layout), &inverse)?;
        Ok((dw, width.into()))
    }
}

#[cfg(test)]
mod tests {
    use crate::parity::{assert_parity, uniform};
    use crate::reference;
    use candle_core::Var;

    #[test]
    fn gradients_of_vars_hold_no_graph() {
        // The model passes norm weights (Vars) straight in; their gradients must not keep the
        // forward graph alive (see cpu_kernel.rs).
        let x = Var::from_tensor(&uniform(&[3, 8], 1)).unwrap();
        let w = Var::from_tensor(&uniform(&[8], 2)).unwrap();
        let y = super::rms_norm(&x, &w, 1e-6).unwrap();
        let grads = y.sum_all().unwrap().backward().unwrap();
        assert!(!grads.get(&x).unwrap().track_op());
        assert!(!grads.get(&w).unwrap().track_op());
    }

    #[test]
    fn matches_the_reference_forward_and_backward() {
        // Width 1 is left out: there dx ≈ 0 is pure cancellation noise in both versions.
        for (i, shape) in [vec![1, 1, 3], vec![2, 3, 8], vec![5, 17], vec![1, 50, 384]]
            .iter()
            .enumerate()
        {
            let s = 10 * i as u64;
            let width = *shape.last().unwrap();
            let inputs = [uniform(shape, s), uniform(&[width], s + 1)];
            assert_parity(
                "rms_norm",
                &inputs,
                &[true, true],
                |t| super::rms_norm(&t[0], &t[1], 1e-5),
                |t| reference::rms_norm(&t[0], &t[1], 1e-5),
                1e-5,
            );
        }
    }
}
