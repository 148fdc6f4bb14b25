//! Matrix-vector products for decoding: `x @ w.t()` for a few rows of `x`, optionally with the
//! SwiGLU of a stacked gate/up weight applied on the way out. On CUDA one kernel (cuBLAS runs
//! these shapes as split-K GEMMs, two kernels and more host work each, and a decode step is
//! bound by launches); on the CPU a rayon loop over the weight's rows that reads each row once
//! (the GEMM crate packs the whole weight first, which halves the rate of a memory-bound
//! product). Inference only: no backward, and [`super::linear`] picks it only for untracked
//! operands.

use super::cpu_kernel::{f32s, output};
#[cfg(feature = "cuda")]
use super::cuda;
#[cfg(feature = "cuda")]
use candle_core::CudaStorage;
use candle_core::{CpuStorage, CustomOp2, DType, Layout, Result, Shape, Storage, Tensor};
use rayon::prelude::*;

/// Rows of `x` at most: each weight row is read once per row of `x`.
const MAX_ROWS: usize = 8;

/// Weight rows per rayon task on the CPU.
const CPU_ROWS_PER_TASK: usize = 64;

/// Whether [`gemv`] takes `x` `[rows, in]` and `weight` `[out, in]`: nothing tracked, both
/// contiguous, at most a few rows; f32 on the CPU, or CUDA operands the kernel takes.
pub(crate) fn supported(x: &Tensor, weight: &Tensor) -> bool {
    if x.track_op() || weight.track_op() || !x.is_contiguous() || !weight.is_contiguous() {
        return false;
    }
    let inp = x.dim(x.rank() - 1).unwrap_or(0);
    if inp == 0 || x.elem_count() > MAX_ROWS * inp || weight.dims().last() != Some(&inp) {
        return false;
    }
    let (xs, _) = x.storage_and_layout();
    let (ws, _) = weight.storage_and_layout();
    match (&*xs, &*ws) {
        (Storage::Cpu(_), Storage::Cpu(_)) => {
            x.dtype() == DType::F32 && weight.dtype() == DType::F32
        }
        #[cfg(feature = "cuda")]
        (Storage::Cuda(xs), Storage::Cuda(ws)) => {
            cuda::gemv_supported((xs, x.layout()), (ws, weight.layout()))
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

impl Gemv {
    /// `[rows, out]` of the result for `x` and `w` layouts.
    fn shape(&self, x: &Layout, w: &Layout) -> Result<(usize, usize, usize)> {
        let (rows, inp) = super::rows_and_width(x)?;
        let (w_rows, _) = super::rows_and_width(w)?;
        Ok((rows, inp, if self.swiglu { w_rows / 2 } else { w_rows }))
    }
}

/// `Σ a·b` with eight running sums, which the compiler keeps in vector registers.
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut sums = [0f32; 8];
    let (a8, b8) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = a8
        .remainder()
        .iter()
        .zip(b8.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (a, b) in a8.zip(b8) {
        for i in 0..8 {
            sums[i] += a[i] * b[i];
        }
    }
    sums.iter().sum::<f32>() + tail
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
        x: &CpuStorage,
        x_layout: &Layout,
        w: &CpuStorage,
        w_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, w) = (f32s(x, x_layout)?, f32s(w, w_layout)?);
        let (rows, inp, out) = self.shape(x_layout, w_layout)?;
        let weight_row = |o: usize| &w[o * inp..][..inp];
        let mut y = vec![0f32; rows * out];
        for (r, y) in y.chunks_mut(out.max(1)).enumerate() {
            let x = &x[r * inp..][..inp];
            y.par_chunks_mut(CPU_ROWS_PER_TASK)
                .enumerate()
                .for_each(|(task, y)| {
                    for (i, y) in y.iter_mut().enumerate() {
                        let o = task * CPU_ROWS_PER_TASK + i;
                        *y = match self.swiglu {
                            false => dot(weight_row(o), x),
                            true => {
                                let (g, u) = (dot(weight_row(o), x), dot(weight_row(out + o), x));
                                g * super::swiglu::sigmoid(g) * u
                            }
                        };
                    }
                });
        }
        Ok(output(y, (rows, out)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &CudaStorage,
        x_layout: &Layout,
        w: &CudaStorage,
        w_layout: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let y = cuda::gemv((x, x_layout), (w, w_layout), self.swiglu)?;
        let (rows, _, out) = self.shape(x_layout, w_layout)?;
        Ok((y, (rows, out).into()))
    }
}
