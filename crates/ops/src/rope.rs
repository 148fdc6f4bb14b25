//! Fused rotary position embedding (Hugging Face rotate-half layout) on the CPU and on CUDA.
//! The backward of a rotation by θ is the rotation by −θ, so one kernel does both directions.

use super::attach::attach;
use super::cpu_kernel::{f32s, output, written_rows};
#[cfg(feature = "cuda")]
use super::cuda;
#[cfg(feature = "cuda")]
use candle_core::CudaStorage;
use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};

/// Whether the fused kernel handles these shapes: `x` `[b, h, t, d]` with even `d`, tables
/// `[t, d / 2]`. Others (e.g. batched tables) take the composite path.
pub(crate) fn supports(x: &Tensor, cos: &Tensor, sin: &Tensor) -> bool {
    match (x.dims4(), cos.dims2()) {
        (Ok((_, _, t, d)), Ok(table)) => {
            d % 2 == 0 && table == (t, d / 2) && sin.dims() == cos.dims()
        }
        _ => false,
    }
}

/// Rotates `x` by the angles whose cosines and sines are `cos`/`sin`. Same contract as
/// [`super::reference::rope`]; inputs must be contiguous tensors that [`supports`], on a backend
/// [`super::fused`] accepts. The graph node keeps only the tables: its backward (the inverse
/// rotation) does not read `x`.
pub(crate) fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let y = rotate(&x.detach(), cos, sin, false)?;
    if !x.track_op() {
        return Ok(y);
    }
    let (cos, sin) = (cos.detach(), sin.detach());
    attach(x, &y, "rope", move |grad| {
        Ok(Some(rotate(&grad.contiguous()?, &cos, &sin, true)?))
    })
}

/// `x` rotated by θ (or by −θ with `inverse`), outside the autograd graph.
fn rotate(x: &Tensor, cos: &Tensor, sin: &Tensor, inverse: bool) -> Result<Tensor> {
    x.apply_op3_no_bwd(cos, sin, &Rope { inverse })
}

struct Rope {
    /// Rotate by −θ (the backward pass) instead of θ.
    inverse: bool,
}

impl CustomOp3 for Rope {
    fn name(&self) -> &'static str {
        "rope"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        x_layout: &Layout,
        cos: &CpuStorage,
        cos_layout: &Layout,
        sin: &CpuStorage,
        sin_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x_values = f32s(x, x_layout)?;
        let (cos, sin) = (f32s(cos, cos_layout)?, f32s(sin, sin_layout)?);
        let d = *x_layout.dims().last().unwrap_or(&0);
        let half = d / 2;
        if d % 2 != 0 || half == 0 || cos.len() % half != 0 || sin.len() != cos.len() {
            candle_core::bail!("rope: tables of {} for head size {d}", cos.len());
        }
        let seq = cos.len() / half;
        let sign = if self.inverse { -1.0 } else { 1.0 };
        // SAFETY: rows are d = 2 · half long, and both halves are written in full.
        let y = unsafe {
            written_rows(x_values.len(), d, |row, y| {
                let x = &x_values[row * d..][..d];
                let pos = row % seq;
                let (c, s) = (&cos[pos * half..][..half], &sin[pos * half..][..half]);
                let (x1, x2) = x.split_at(half);
                let (y1, y2) = y.split_at_mut(half);
                for j in 0..half {
                    let s = sign * s[j];
                    y1[j].write(x1[j] * c[j] - x2[j] * s);
                    y2[j].write(x2[j] * c[j] + x1[j] * s);
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
        cos: &CudaStorage,
        cos_layout: &Layout,
        sin: &CudaStorage,
        sin_layout: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let sign = if self.inverse { -1.0 } else { 1.0 };
        let tables = ((cos, cos_layout), (sin, sin_layout));
        let y = cuda::rope((x, x_layout), tables, 1, sign)?;
        Ok((y, x_layout.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use crate::parity::{assert_parity, uniform};
    use crate::reference;

    #[test]
    fn matches_the_reference_forward_and_backward() {
        for (i, &(b, h, t, d)) in [
            (1, 1, 1, 2),
            (2, 3, 5, 8),
            (1, 2, 7, 6),
            (3, 1, 4, 64),
            (2, 4, 40, 64),
        ]
        .iter()
        .enumerate()
        {
            let s = 10 * i as u64;
            let angles = (uniform(&[t, d / 2], s) * 3.0).unwrap();
            let inputs = [
                uniform(&[b, h, t, d], s + 1),
                angles.cos().unwrap(),
                angles.sin().unwrap(),
            ];
            assert!(super::supports(&inputs[0], &inputs[1], &inputs[2]));
            assert_parity(
                "rope",
                &inputs,
                &[true, false, false],
                |t| super::rope(&t[0], &t[1], &t[2]),
                |t| reference::rope(&t[0], &t[1], &t[2]),
                1e-5,
            );
        }
    }
}
