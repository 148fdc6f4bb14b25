//! Token embedding with a fused backward: the lookup is candle's `index_select`; the gradient of
//! the table is one scatter-add of the output gradient's rows (f32 accumulation) instead of
//! candle's `index_add` backward through a zero table.

use super::attach::attach;
use super::cpu_kernel::{f32s, output, u32s};
#[cfg(feature = "cuda")]
use super::cuda;
use super::rows_and_width;
#[cfg(feature = "cuda")]
use candle_core::CudaStorage;
use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};

/// Rows of `table` for u32 `ids` (any shape). Same contract as
/// [`super::reference::embedding`]; the table must be on a backend [`super::fused`] accepts.
pub(crate) fn embedding(ids: &Tensor, table: &Tensor) -> Result<Tensor> {
    let y = super::reference::embedding(ids, &table.detach())?;
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

impl CustomOp2 for EmbeddingGrad {
    fn name(&self) -> &'static str {
        "embedding-grad"
    }

    fn cpu_fwd(
        &self,
        grad: &CpuStorage,
        grad_layout: &Layout,
        ids: &CpuStorage,
        ids_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
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
    fn cuda_fwd(
        &self,
        grad: &CudaStorage,
        grad_layout: &Layout,
        ids: &CudaStorage,
        ids_layout: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let (_, width) = rows_and_width(grad_layout)?;
        let table = cuda::embedding_grad((ids, ids_layout), (grad, grad_layout), self.vocab)?;
        Ok((table, (self.vocab, width).into()))
    }
}

#[cfg(test)]
mod tests {
    use crate::parity::{assert_parity, uniform};
    use crate::reference;
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
            |t| super::embedding(&t[0], &t[1]),
            |t| reference::embedding(&t[0], &t[1]),
            1e-6,
        );
    }
}
