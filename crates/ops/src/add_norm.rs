//! The residual add and the RMSNorm that follows it, in one pass per row, for inference: a
//! decode step is bound by kernel launches, and this joins two of them at each of the two norms
//! of every block. The sum is rounded to the tensor dtype before it is normalized, as the
//! separate add stores it, so the result equals `rms_norm(x + delta)` exactly.

use super::cpu_kernel::{f32s, for_each_row, output};
#[cfg(feature = "cuda")]
use super::cuda;
use super::rms_norm::{check_width, inverse_rms};
#[cfg(feature = "cuda")]
use candle_core::CudaStorage;
use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};

/// `(x + delta, rms_norm(x + delta, weight))` for contiguous operands of one shape on a backend
/// [`super::fused`] accepts; no backward.
pub(crate) fn add_rms_norm(
    x: &Tensor,
    delta: &Tensor,
    weight: &Tensor,
    eps: f64,
) -> Result<(Tensor, Tensor)> {
    let both = x.apply_op3_no_bwd(delta, weight, &AddRmsNorm { eps: eps as f32 })?;
    Ok((both.get(0)?, both.get(1)?))
}

struct AddRmsNorm {
    eps: f32,
}

/// `[2, ..dims]`: the sum, then the normalized sum.
fn pair_shape(layout: &Layout) -> Shape {
    let mut dims = vec![2];
    dims.extend_from_slice(layout.dims());
    dims.into()
}

impl CustomOp3 for AddRmsNorm {
    fn name(&self) -> &'static str {
        "add-rms-norm"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        x_layout: &Layout,
        delta: &CpuStorage,
        delta_layout: &Layout,
        w: &CpuStorage,
        w_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, delta, w) = (
            f32s(x, x_layout)?,
            f32s(delta, delta_layout)?,
            f32s(w, w_layout)?,
        );
        let (_, width) = check_width(x_layout, w)?;
        if delta.len() != x.len() {
            candle_core::bail!("add_rms_norm: {} and {} elements", x.len(), delta.len());
        }
        let mut out = vec![0f32; 2 * x.len()];
        let (sum, normed) = out.split_at_mut(x.len());
        for (s, (&a, &b)) in sum.iter_mut().zip(x.iter().zip(delta)) {
            *s = a + b;
        }
        let sum = &*sum;
        for_each_row(normed, width, |row, y| {
            let s = &sum[row * width..][..width];
            let r = inverse_rms(s, self.eps);
            for ((y, &s), &w) in y.iter_mut().zip(s).zip(w) {
                *y = s * r * w;
            }
        });
        Ok(output(out, pair_shape(x_layout)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &CudaStorage,
        x_layout: &Layout,
        delta: &CudaStorage,
        delta_layout: &Layout,
        w: &CudaStorage,
        w_layout: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let out = cuda::add_rms_norm(
            (x, x_layout),
            (delta, delta_layout),
            (w, w_layout),
            self.eps,
        )?;
        Ok((out, pair_shape(x_layout)))
    }
}
