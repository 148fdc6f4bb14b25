//! Token embedding with a fused backward: the lookup is candle's `index_select`; the gradient of
//! the table is one scatter-add of the output gradient's rows (f32 accumulation) instead of
//! candle's `index_add` backward through a zero table (`kernels/embedding.cu` on CUDA).

use super::attach::attach;
use super::cpu_kernel::{f32s, output, u32s};
use super::fused_op::{custom_op, CpuOperand, CpuOutput, FusedOp};
#[cfg(feature = "cuda")]
use super::fused_op::{CudaOutput, Operand};
use super::{ids_beside, rows_and_width};
use candle_core::{Result, Tensor};

/// Token embedding lookup: rows of `table` for `ids` (any shape of u32 ids). The fused backward
/// where [`super::fused`] accepts the table, else the [`reference`].
pub fn embedding(ids: &Tensor, table: &Tensor) -> Result<Tensor> {
    if super::fused(&[table]) && ids_beside(ids, table) {
        return fused_embedding(ids, table);
    }
    reference(ids, table)
}

/// [`embedding`] from candle's differentiable ops, any backend and dtype.
pub fn reference(ids: &Tensor, table: &Tensor) -> Result<Tensor> {
    let mut dims = ids.dims().to_vec();
    dims.push(table.dim(1)?);
    table.index_select(&ids.flatten_all()?, 0)?.reshape(dims)
}

/// The lookup with the fused backward; the table must be on a backend [`super::fused`]
/// accepts.
fn fused_embedding(ids: &Tensor, table: &Tensor) -> Result<Tensor> {
    let y = reference(ids, &table.detach())?;
    if !table.track_op() {
        return Ok(y);
    }
    let (vocab, width) = table.dims2()?;
    let dtype = table.dtype();
    let ids = ids.flatten_all()?.contiguous()?;
    attach(table, &y, "embedding", move |grad| {
        let rows = grad.reshape(((), width))?.contiguous()?;
        let d_table = rows.apply_op2_no_bwd(&ids, &EmbeddingGrad { vocab })?;
        Ok(Some(d_table.to_dtype(dtype)?))
    })
}

/// `d_table[ids[i]] += grad[i]`, an f32 `[vocab, width]` table.
struct EmbeddingGrad {
    vocab: usize,
}

impl FusedOp<2> for EmbeddingGrad {
    const NAME: &'static str = "embedding-grad";

    fn cpu(&self, [(grad, grad_layout), (ids, ids_layout)]: [CpuOperand; 2]) -> CpuOutput {
        let (tokens, width) = rows_and_width(grad_layout)?;
        let ids = u32s(ids, ids_layout)?;
        if ids.len() != tokens {
            candle_core::bail!("embedding gradient: {tokens} rows for {} ids", ids.len());
        }
        let grad = f32s(grad, grad_layout)?;
        let mut table = vec![0f32; self.vocab * width];
        for (row, &id) in grad.chunks(width.max(1)).zip(ids) {
            let Some(dst) = table.get_mut(id as usize * width..(id as usize + 1) * width) else {
                candle_core::bail!("embedding: id {id} outside the table of {}", self.vocab);
            };
            dst.iter_mut().zip(row).for_each(|(d, g)| *d += g);
        }
        Ok(output(table, (self.vocab, width)))
    }

    #[cfg(feature = "cuda")]
    fn cuda(&self, [grad, ids]: [Operand; 2]) -> CudaOutput {
        let (_, width) = rows_and_width(grad.1)?;
        let table = cuda::embedding_grad(ids, grad, self.vocab)?;
        Ok((table, (self.vocab, width).into()))
    }
}

custom_op!(EmbeddingGrad: 2);

/// The CUDA launcher (`kernels/embedding.cu`).
#[cfg(feature = "cuda")]
mod cuda {
    use crate::launch::{common_dtype, int, per_element, run, zeros_f32, Operand};
    use crate::rows_and_width;
    use candle_core::backend::BackendStorage;
    use candle_core::{CudaStorage, DType, Result};

    /// Embedding gradient: `grad` rows `[tokens, width]` summed into an f32 `[vocab, width]` table
    /// at the rows named by u32 `ids`.
    pub(super) fn embedding_grad(ids: Operand, grad: Operand, vocab: usize) -> Result<CudaStorage> {
        let dtype = common_dtype(&[grad])?;
        let (tokens, width) = rows_and_width(grad.1)?;
        if ids.0.dtype() != DType::U32 || ids.1.shape().elem_count() != tokens {
            candle_core::bail!(
                "embedding gradient: {tokens} rows for {:?} ids",
                ids.1.shape()
            );
        }
        // Zeroed: the kernel adds into it.
        let table = zeros_f32(&grad.0.device, vocab * width)?;
        let scalars = [int(tokens)?, int(width)?, int(vocab)?];
        let shape = per_element(tokens * width)?;
        run(
            ("embedding_grad", dtype),
            shape,
            &[ids, grad],
            table,
            &scalars,
        )
    }
}

#[cfg(test)]
mod tests {
    use crate::parity::{assert_parity, uniform};
    use candle_core::{Device, Tensor};

    #[test]
    fn matches_the_reference_forward_and_backward() {
        // Repeated ids accumulate; id 0 and the last row are both used.
        let ids = Tensor::new(&[[0u32, 3, 3, 9], [1, 0, 9, 3]], &Device::Cpu).unwrap();
        let inputs = [ids, uniform(&[10, 6], 1)];
        assert_parity(
            "embedding",
            &inputs,
            &[false, true],
            |t| super::fused_embedding(&t[0], &t[1]),
            |t| super::reference(&t[0], &t[1]),
            1e-6,
        );
    }
}
