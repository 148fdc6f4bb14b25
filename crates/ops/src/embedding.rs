//! Token embedding with a fused backward: the lookup is candle's `index_select`; the gradient of
//! the table is one scatter-add of the output gradient's rows (f32 accumulation) instead of
//! candle's `index_add` backward through a zero table (`kernels/embedding.cu` on CUDA). Where
//! the table already holds an f32 gradient (a tied output head's, which reaches it first), the
//! rows are added into that one instead of into a zero table that the gradient store would then
//! add to it.

use super::attach::attach_onto;
use super::cpu_kernel::{f32s, output, slice, u32s};
use super::fused_op::{custom_op, CpuOperand, CpuOutput, FusedOp};
#[cfg(feature = "cuda")]
use super::fused_op::{CudaOutput, Operand};
use super::{ids_beside, rows_and_width};
use candle_core::{
    CpuStorage, DType, Device, InplaceOp3, Layout, Result, Storage, Tensor, WithDType,
};
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
    let onto_ids = ids.clone();
    let rows = move |grad: &Tensor| grad.reshape(((), width))?.contiguous();
    attach_onto(
        table,
        &y,
        "embedding",
        move |grad| {
            let d_table = rows(grad)?.apply_op2_no_bwd(&ids, &EmbeddingGrad { vocab })?;
            Ok(Some(d_table.to_dtype(dtype)?))
        },
        move |grad, held| add_rows_onto(held, &rows(grad)?, &onto_ids),
    )
}

/// `held` with `rows[i]` added at row `ids[i]`, where `held` is a contiguous f32 table beside
/// the rows (in place where nothing else holds it, else into a copy); `None` otherwise.
fn add_rows_onto(held: &Tensor, rows: &Tensor, ids: &Tensor) -> Result<Option<Tensor>> {
    let (Ok((_, width)), Ok((_, rows_width))) = (held.dims2(), rows.dims2()) else {
        return Ok(None);
    };
    let fits = held.dtype() == DType::F32
        && width == rows_width
        && held.is_contiguous()
        && held.device().same_device(rows.device());
    if !fits {
        return Ok(None);
    }
    let table = match held.is_sole_handle() {
        true => held.clone(),
        false => held.copy()?,
    };
    #[cfg(feature = "cuda")]
    if matches!(table.device(), Device::Cuda(_)) {
        crate::launch::with_operands(&[&table, ids, rows], |o| {
            cuda::add_rows(o[0], o[1], o[2], held.dim(0)?)
        })?;
        return Ok(Some(table));
    }
    table.inplace_op3(ids, &rows.to_dtype(DType::F32)?, &AddRows)?;
    Ok(Some(table))
}

/// `table[ids[i]] += rows[i]` over f32 rows of `table`'s width.
fn add_rows(table: &mut [f32], width: usize, rows: &[f32], ids: &[u32]) -> Result<()> {
    let vocab = table.len() / width.max(1);
    if ids.len() * width != rows.len() {
        candle_core::bail!(
            "embedding gradient: {} rows for {} ids",
            rows.len() / width.max(1),
            ids.len()
        );
    }
    for (row, &id) in rows.chunks(width.max(1)).zip(ids) {
        let Some(dst) = table.get_mut(id as usize * width..(id as usize + 1) * width) else {
            candle_core::bail!("embedding: id {id} outside the table of {vocab}");
        };
        dst.iter_mut().zip(row).for_each(|(d, g)| *d += g);
    }
    Ok(())
}

/// `d_table[ids[i]] += grad[i]`, an f32 `[vocab, width]` table.
struct EmbeddingGrad {
    vocab: usize,
}

impl FusedOp<2> for EmbeddingGrad {
    const NAME: &'static str = "embedding-grad";

    fn cpu(&self, [(grad, grad_layout), (ids, ids_layout)]: [CpuOperand; 2]) -> CpuOutput {
        let (_, width) = rows_and_width(grad_layout)?;
        let mut table = vec![0f32; self.vocab * width];
        add_rows(
            &mut table,
            width,
            f32s(grad, grad_layout)?,
            u32s(ids, ids_layout)?,
        )?;
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

/// [`add_rows`] in place on the CPU: the table, then the ids and the f32 rows.
struct AddRows;

impl InplaceOp3 for AddRows {
    fn name(&self) -> &'static str {
        "embedding-add-rows"
    }

    fn cpu_fwd(
        &self,
        table: &mut CpuStorage,
        table_layout: &Layout,
        ids: &CpuStorage,
        ids_layout: &Layout,
        rows: &CpuStorage,
        rows_layout: &Layout,
    ) -> Result<()> {
        let (start, end) = table_layout.contiguous_offsets().ok_or_else(|| {
            candle_core::Error::Msg("embedding gradient: the table is not contiguous".into())
        })?;
        let CpuStorage::F32(table) = table else {
            candle_core::bail!("embedding gradient: the table is not f32");
        };
        let width = rows_layout.dims().last().copied().unwrap_or(0);
        let (ids, rows) = (u32s(ids, ids_layout)?, f32s(rows, rows_layout)?);
        add_rows(&mut table[start..end], width, rows, ids)
    }
}

/// The CUDA launcher (`kernels/embedding.cu`).
#[cfg(feature = "cuda")]
mod cuda {
    use crate::launch::{
        address, base_address, common_dtype, int, launch, per_element, zeros_f32, Arg, Operand,
    };
    use crate::rows_and_width;
    use candle_core::backend::BackendStorage;
    use candle_core::{CudaStorage, DType, Result};

    /// Embedding gradient: `grad` rows `[tokens, width]` summed into an f32 `[vocab, width]` table
    /// at the rows named by u32 `ids`.
    pub(super) fn embedding_grad(ids: Operand, grad: Operand, vocab: usize) -> Result<CudaStorage> {
        let (_, width) = rows_and_width(grad.1)?;
        // Zeroed: the kernel adds into it.
        let table = zeros_f32(&grad.0.device, vocab * width)?;
        scatter(ids, grad, (base_address(&table)?, vocab))?;
        Ok(table)
    }

    /// `grad` rows added in place into the contiguous f32 `[vocab, width]` `table` at `ids`.
    pub(super) fn add_rows(
        table: Operand,
        ids: Operand,
        grad: Operand,
        vocab: usize,
    ) -> Result<()> {
        let (_, width) = rows_and_width(grad.1)?;
        if table.0.dtype() != DType::F32 || table.1.shape().elem_count() != vocab * width {
            candle_core::bail!(
                "embedding gradient: a table {:?} of {:?} for rows of {width}",
                table.1.shape(),
                table.0.dtype()
            );
        }
        scatter(ids, grad, (address(table)?, vocab))
    }

    /// Launches the kernel adding `grad`'s rows into the f32 table at `table` (`vocab` rows).
    fn scatter(ids: Operand, grad: Operand, (table, vocab): (u64, usize)) -> Result<()> {
        let dtype = common_dtype(&[grad])?;
        let (tokens, width) = rows_and_width(grad.1)?;
        if ids.0.dtype() != DType::U32 || ids.1.shape().elem_count() != tokens {
            candle_core::bail!(
                "embedding gradient: {tokens} rows for {:?} ids",
                ids.1.shape()
            );
        }
        let args = [
            Arg::Address(address(ids)?),
            Arg::Address(address(grad)?),
            Arg::Address(table),
            int(tokens)?,
            int(width)?,
            int(vocab)?,
        ];
        let (grid, block) = per_element(tokens * width)?;
        launch(
            &grad.0.device,
            "embedding_grad",
            Some(dtype),
            grid,
            block,
            &args,
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
    fn a_tied_tables_rows_are_added_into_the_heads_gradient() {
        // The lookup's rows feed a head over the same table, whose gradient reaches it first.
        let ids = Tensor::new(&[[0u32, 3, 3, 9], [1, 0, 9, 3]], &Device::Cpu).unwrap();
        let inputs = [ids, uniform(&[10, 6], 3)];
        let head = |rows: candle_core::Result<Tensor>, table: &Tensor| {
            let logits = rows?.broadcast_matmul(&table.t()?)?;
            (logits.sqr()? * 0.5)?.sum_all()
        };
        assert_parity(
            "tied embedding",
            &inputs,
            &[false, true],
            |t| head(super::fused_embedding(&t[0], &t[1]), &t[1]),
            |t| head(super::reference(&t[0], &t[1]), &t[1]),
            1e-5,
        );
    }

    #[test]
    fn rows_go_into_a_held_gradient_in_place_only_where_nothing_else_holds_it() {
        let ids = Tensor::new(&[2u32, 0, 2], &Device::Cpu).unwrap();
        let rows = Tensor::new(&[[1f32, 2.], [3., 4.], [5., 6.]], &Device::Cpu).unwrap();
        let want = [[4f32, 5.], [1., 1.], [7., 9.]];
        let held = Tensor::ones((3, 2), DType::F32, &Device::Cpu).unwrap();
        let shared = held.clone();
        let sum = super::add_rows_onto(&held, &rows, &ids).unwrap().unwrap();
        assert_eq!(sum.to_vec2::<f32>().unwrap(), want);
        assert_eq!(shared.to_vec2::<f32>().unwrap(), [[1f32; 2]; 3]);
        drop(shared);
        let sum = super::add_rows_onto(&held, &rows, &ids).unwrap().unwrap();
        assert_eq!(held.to_vec2::<f32>().unwrap(), want, "written in place");
        assert_eq!(sum.to_vec2::<f32>().unwrap(), want);
        // A gradient the rows cannot go into (another dtype or width) is declined.
        for other in [
            held.to_dtype(DType::BF16).unwrap(),
            held.narrow(1, 0, 1).unwrap(),
        ] {
            assert!(super::add_rows_onto(&other, &rows, &ids).unwrap().is_none());
        }
        let outside = Tensor::new(&[2u32, 0, 3], &Device::Cpu).unwrap();
        let err = super::add_rows_onto(&held, &rows, &outside).unwrap_err();
        assert!(
            err.to_string().contains("id 3 outside the table of 3"),
            "{err}"
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
