//! Token embedding with a fused backward: the lookup is candle's `index_select`; the gradient of
//! the table is one scatter-add of the output gradient's rows (f32 accumulation) instead of
//! candle's `index_add` backward through a zero table (`kernels/embedding.cu` on CUDA).

use super::attach::attach;
use super::cpu_kernel::{f32s, output, slice, u32s};
use super::fused_op::{custom_op, CpuOperand, CpuOutput, FusedOp};
#[cfg(feature = "cuda")]
use super::fused_op::{CudaOutput, Operand};
use super::{ids_beside, rows_and_width};
use candle_core::{CpuStorage, Device, Result, Storage, Tensor, WithDType};
use rayon::prelude::*;

/// Token embedding lookup: rows of `table` for `ids` (any shape of u32 ids). The fused backward
/// where [`super::fused`] accepts the table, else the [`fn@reference`].
///
/// A frozen table may live on another device than the ids (a LoRA base's input embedding kept
/// in host memory while the model runs on a GPU): its rows are gathered where it lives and
/// moved to the ids' device. A table that trains must be beside the ids.
pub fn embedding(ids: &Tensor, table: &Tensor) -> Result<Tensor> {
    if !ids.device().same_device(table.device()) {
        if table.track_op() {
            candle_core::bail!("embedding: a table that trains must be on the ids' device");
        }
        let rows = match table.device() {
            Device::Cpu => host_rows(&ids.to_device(&Device::Cpu)?, table)?,
            other => reference(&ids.to_device(other)?, table)?,
        };
        return rows.to_device(ids.device());
    }
    if super::fused(&[table]) && ids_beside(ids, table) {
        return fused_embedding(ids, table);
    }
    reference(ids, table)
}

/// The rows of a host `table` for host `ids`, copied in parallel (no gradient): candle's
/// `index_select` copies them one at a time, which cost the 8b QLoRA step 5% on an H200's
/// host (docs/benchmarks.md).
fn host_rows(ids: &Tensor, table: &Tensor) -> Result<Tensor> {
    let mut dims = ids.dims().to_vec();
    let (vocab, width) = table.dims2()?;
    dims.push(width);
    let ids = ids.flatten_all()?.to_vec1::<u32>()?;
    let table = table.contiguous()?;
    let gathered = {
        let (storage, layout) = table.storage_and_layout();
        let Storage::Cpu(storage) = &*storage else {
            candle_core::bail!("embedding: the table is not on the host");
        };
        let shape = (vocab, width);
        match storage {
            CpuStorage::BF16(all) => Some(gather_rows(slice(all, layout)?, &ids, shape, &dims)),
            CpuStorage::F16(all) => Some(gather_rows(slice(all, layout)?, &ids, shape, &dims)),
            CpuStorage::F32(all) => Some(gather_rows(slice(all, layout)?, &ids, shape, &dims)),
            _ => None,
        }
    };
    // Other dtypes take the lookup, once the table's storage is no longer borrowed.
    match gathered {
        Some(rows) => rows,
        None => reference(&Tensor::new(ids.as_slice(), &Device::Cpu)?, &table)?.reshape(dims),
    }
}

/// Rows `ids` of a `[vocab, width]` row-major `table`, as a tensor of `dims`.
fn gather_rows<T: WithDType>(
    table: &[T],
    ids: &[u32],
    (vocab, width): (usize, usize),
    dims: &[usize],
) -> Result<Tensor> {
    if let Some(&id) = ids.iter().find(|&&id| id as usize >= vocab) {
        candle_core::bail!("embedding: id {id} outside the table of {vocab}");
    }
    let mut out: Vec<T> = Vec::with_capacity(ids.len() * width);
    out.spare_capacity_mut()
        .par_chunks_mut(width.max(1))
        .zip(ids)
        .for_each(|(dst, &id)| {
            let src = &table[id as usize * width..(id as usize + 1) * width];
            for (d, s) in dst.iter_mut().zip(src) {
                d.write(*s);
            }
        });
    // SAFETY: every row of the capacity was written above (one chunk of `width` per id).
    unsafe { out.set_len(ids.len() * width) };
    Tensor::from_vec(out, dims, &Device::Cpu)
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
    use candle_core::{DType, Device, Tensor};

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

    #[test]
    fn host_rows_are_the_lookups_rows_in_every_float_dtype() {
        let ids = Tensor::new(&[[0u32, 3, 3, 9], [1, 0, 9, 3]], &Device::Cpu).unwrap();
        for dtype in [DType::F32, DType::BF16, DType::F16] {
            let table = uniform(&[10, 6], 2).to_dtype(dtype).unwrap();
            let got = super::host_rows(&ids, &table).unwrap();
            let want = super::reference(&ids, &table).unwrap();
            assert_eq!((got.dims(), got.dtype()), (want.dims(), dtype));
            let diff = (got.to_dtype(DType::F32).unwrap() - want.to_dtype(DType::F32).unwrap())
                .unwrap()
                .abs()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert_eq!(diff, 0.0, "{dtype:?}");
        }
        let outside = Tensor::new(&[10u32], &Device::Cpu).unwrap();
        let err = super::host_rows(&outside, &uniform(&[10, 6], 2)).unwrap_err();
        assert!(
            err.to_string().contains("id 10 outside the table of 10"),
            "{err}"
        );
    }
}
