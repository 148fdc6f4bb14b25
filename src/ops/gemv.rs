//! Matrix-vector products on CUDA for decoding: `x @ w.t()` for a few rows of `x`, one kernel
//! (cuBLAS runs these shapes as split-K GEMMs, two kernels and more host work each, and a
//! decode step is bound by launches). Inference only: no backward, and [`super::linear`] picks
//! it only for untracked operands.

use super::cuda;
use candle_core::{CpuStorage, CudaStorage, CustomOp2, Layout, Result, Shape, Tensor};

/// Whether [`gemv`] takes `x` `[.., in]` and `weight` `[out, in]`: CUDA, nothing tracked,
/// contiguous and aligned, at most a few rows.
pub(crate) fn supported(x: &Tensor, weight: &Tensor) -> bool {
    if x.track_op() || weight.track_op() || !x.is_contiguous() || !weight.is_contiguous() {
        return false;
    }
    if x.elem_count() > cuda::GEMV_MAX_ROWS * x.dim(x.rank() - 1).unwrap_or(usize::MAX) {
        return false;
    }
    let (xs, xl) = x.storage_and_layout();
    let (ws, wl) = weight.storage_and_layout();
    match (&*xs, &*ws) {
        (candle_core::Storage::Cuda(xs), candle_core::Storage::Cuda(ws)) => {
            cuda::gemv_supported((xs, xl), (ws, wl))
        }
        _ => false,
    }
}

/// `x @ weight.t()` for `x` `[rows, in]`; the operands must pass [`supported`].
pub(crate) fn gemv(x: &Tensor, weight: &Tensor) -> Result<Tensor> {
    x.apply_op2_no_bwd(weight, &Gemv { swiglu: false })
}

/// `silu(x @ gate.t()) · (x @ up.t())` for `x` `[rows, in]` and `gate_up` `[2 out, in]` (gate
/// rows, then up rows); the operands must pass [`supported`].
pub(crate) fn gemv_swiglu(x: &Tensor, gate_up: &Tensor) -> Result<Tensor> {
    x.apply_op2_no_bwd(gate_up, &Gemv { swiglu: true })
}

struct Gemv {
    swiglu: bool,
}

impl CustomOp2 for Gemv {
    fn name(&self) -> &'static str {
        match self.swiglu {
            true => "gemv-swiglu",
            false => "gemv",
        }
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        candle_core::bail!("gemv: CUDA only")
    }

    fn cuda_fwd(
        &self,
        x: &CudaStorage,
        x_layout: &Layout,
        w: &CudaStorage,
        w_layout: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let y = cuda::gemv((x, x_layout), (w, w_layout), self.swiglu)?;
        let rows = x_layout.shape().elem_count() / x_layout.dims()[x_layout.dims().len() - 1];
        let out = w_layout.dims()[0] / if self.swiglu { 2 } else { 1 };
        Ok((y, (rows, out).into()))
    }
}
