//! The index of each row's largest value: greedy decoding's next token. candle's CUDA argmax
//! reduces a whole row in one block of threads, 85 µs for a row of 128,256 logits on an H200
//! (a tenth of a Llama-3.2-1B decode step); here blocks across the row each reduce a chunk,
//! and one block per row then reduces their results (`kernels/decode.cu`).

use super::fused_op::{custom_op, CpuOperand, CpuOutput, FusedOp};
#[cfg(feature = "cuda")]
use super::fused_op::{CudaOutput, Operand};
use candle_core::{Result, Tensor, D};

/// The index of the largest value along the last dimension of `x`, as `u32` with that
/// dimension removed. Ties go to the lowest index, as candle's CPU argmax, so the CPU and
/// CUDA pick the same token.
pub fn argmax(x: &Tensor) -> Result<Tensor> {
    if x.device().is_cuda() && super::fused(&[x]) && x.rank() > 0 {
        let mut dims = x.dims().to_vec();
        dims.pop();
        let width = x.dim(D::Minus1)?;
        let rows = x.contiguous()?.reshape(((), width))?;
        return rows.apply_op1_no_bwd(&Argmax)?.reshape(dims);
    }
    x.argmax(D::Minus1)
}

/// The argmax of each row of a `[rows, width]` tensor, on CUDA only ([`argmax`] sends every
/// other device to candle's).
struct Argmax;

impl FusedOp<1> for Argmax {
    const NAME: &'static str = "argmax";

    fn cpu(&self, _: [CpuOperand; 1]) -> CpuOutput {
        candle_core::bail!("argmax: the fused kernel is CUDA only")
    }

    #[cfg(feature = "cuda")]
    fn cuda(&self, [x]: [Operand; 1]) -> CudaOutput {
        let (rows, _) = super::rows_and_width(x.1)?;
        Ok((cuda::argmax(x)?, rows.into()))
    }
}

custom_op!(Argmax: 1);

/// The CUDA launchers (`kernels/decode.cu`).
#[cfg(feature = "cuda")]
mod cuda {
    use crate::launch::{
        address, alloc, base_address, common_dtype, grid, int, int_u32, launch, Arg, Operand,
    };
    use crate::rows_and_width;
    use candle_core::{CudaStorage, DType, Result};

    /// Elements of a row that one block reduces (`ARGMAX_CHUNK` in kernels/decode.cu).
    const CHUNK: usize = 4096;

    /// `u32` indices of the largest value of each row of `x` `[rows, width]`.
    pub(super) fn argmax(x: Operand) -> Result<CudaStorage> {
        let dtype = common_dtype(&[x])?;
        let (rows, width) = rows_and_width(x.1)?;
        let chunks = width.div_ceil(CHUNK).max(1);
        let device = &x.0.device;
        // argmax_chunks writes every partial value and index, argmax_finish every output.
        let partial = alloc(device, DType::F32, rows * chunks)?;
        let partial_indices = alloc(device, DType::U32, rows * chunks)?;
        let out = alloc(device, DType::U32, rows)?;
        let (values, indices) = (base_address(&partial)?, base_address(&partial_indices)?);
        launch(
            device,
            "argmax_chunks",
            Some(dtype),
            (int_u32(chunks)?, int_u32(rows)?),
            (256, 1),
            &[
                Arg::Address(address(x)?),
                Arg::Address(values),
                Arg::Address(indices),
                int(width)?,
                int(chunks)?,
            ],
        )?;
        launch(
            device,
            "argmax_finish",
            None,
            grid(rows)?,
            (256, 1),
            &[
                Arg::Address(values),
                Arg::Address(indices),
                Arg::Address(base_address(&out)?),
                int(chunks)?,
            ],
        )?;
        Ok(out)
    }
}
