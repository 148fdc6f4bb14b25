//! Plumbing shared by the fused CPU kernels: borrowing contiguous f32/u32 slices out of candle's
//! CPU storage, wrapping results, and deciding when the fused path applies.
//!
//! Backward kernels run on `detach()`ed operands. candle detaches the gradient of every
//! intermediate node but never that of a `Var`; a gradient computed from a tracked operand would
//! keep the whole forward graph alive through the gradient store, and through AdamW's moments
//! from one step to the next.

use candle_core::{CpuStorage, Layout, Result, Shape, Storage, Tensor};
use rayon::prelude::*;
use std::mem::MaybeUninit;

/// Rows handed to one rayon task at least: below this the scheduling costs more than the work.
pub(crate) const MIN_ROWS_PER_TASK: usize = 16;

/// Elements per rayon task for purely elementwise kernels.
pub(crate) const ELEMENTWISE_CHUNK: usize = 1 << 14;

/// Outputs smaller than this are computed on the calling thread. Handing work to the rayon pool
/// from a thread outside it costs a cross-thread wake-up, which on a busy machine is longer than
/// a decode step's whole RMSNorm or softmax row.
const SERIAL_BELOW: usize = 1 << 14;

/// Calls `f(row, out_row)` for each `width`-sized row of `out` (the last may be shorter), in
/// parallel unless `out` is small. The kernel reads its inputs at the same row index.
pub(crate) fn for_each_row<F>(out: &mut [f32], width: usize, f: F)
where
    F: Fn(usize, &mut [f32]) + Sync + Send,
{
    let width = width.max(1);
    if out.len() < SERIAL_BELOW {
        out.chunks_mut(width).enumerate().for_each(|(i, r)| f(i, r));
    } else {
        out.par_chunks_mut(width)
            .with_min_len(MIN_ROWS_PER_TASK)
            .enumerate()
            .for_each(|(i, r)| f(i, r));
    }
}

/// A new buffer of `n` values whose row `r` (of `width`; the last may be shorter) is written by
/// `fill(r, row)`, in parallel unless the buffer is small: [`for_each_row`] without zeroing the
/// buffer first (a memset per kernel output was 5% of a CPU training step).
///
/// # Safety
/// `fill` must write every element of each row it is given.
pub(crate) unsafe fn written_rows<F>(n: usize, width: usize, fill: F) -> Vec<f32>
where
    F: Fn(usize, &mut [MaybeUninit<f32>]) + Sync + Send,
{
    // SAFETY: the caller's promise about `fill` is the one `written_rows_with` needs.
    unsafe { written_rows_with(n, width, fill).0 }
}

/// [`written_rows`] for kernels that also reduce each row to a value: returns the buffer and
/// `fill`'s result for each row, in row order.
///
/// # Safety
/// `fill` must write every element of each row it is given.
pub(crate) unsafe fn written_rows_with<T, F>(n: usize, width: usize, fill: F) -> (Vec<f32>, Vec<T>)
where
    T: Send,
    F: Fn(usize, &mut [MaybeUninit<f32>]) -> T + Sync + Send,
{
    let width = width.max(1);
    let mut out = Vec::with_capacity(n);
    let rows = &mut out.spare_capacity_mut()[..n];
    let per_row = if n < SERIAL_BELOW {
        rows.chunks_mut(width)
            .enumerate()
            .map(|(i, r)| fill(i, r))
            .collect()
    } else {
        rows.par_chunks_mut(width)
            .with_min_len(MIN_ROWS_PER_TASK)
            .enumerate()
            .map(|(i, r)| fill(i, r))
            .collect()
    };
    // SAFETY: the rows cover the first `n` elements, and the caller's `fill` wrote all of them.
    unsafe { out.set_len(n) };
    (out, per_row)
}

/// [`written_rows`] for kernels with two outputs of `n` values each, returned one after the
/// other in a buffer of `2 n`: `fill(r, first, second)` writes row `r` of both.
///
/// # Safety
/// `fill` must write every element of both rows it is given.
pub(crate) unsafe fn written_row_pairs<F>(n: usize, width: usize, fill: F) -> Vec<f32>
where
    F: Fn(usize, &mut [MaybeUninit<f32>], &mut [MaybeUninit<f32>]) + Sync + Send,
{
    let width = width.max(1);
    let mut out = Vec::with_capacity(2 * n);
    let (first, second) = out.spare_capacity_mut()[..2 * n].split_at_mut(n);
    if n < SERIAL_BELOW {
        let pairs = first.chunks_mut(width).zip(second.chunks_mut(width));
        pairs.enumerate().for_each(|(i, (a, b))| fill(i, a, b));
    } else {
        let pairs = first
            .par_chunks_mut(width)
            .zip(second.par_chunks_mut(width));
        pairs
            .with_min_len(MIN_ROWS_PER_TASK)
            .enumerate()
            .for_each(|(i, (a, b))| fill(i, a, b));
    }
    // SAFETY: the row pairs cover the first `2 n` elements, and `fill` wrote all of them.
    unsafe { out.set_len(2 * n) };
    out
}

/// The values of `row`, for a kernel that reads back what it wrote.
///
/// # Safety
/// Every element of `row` must have been written.
pub(crate) unsafe fn assume_written(row: &mut [MaybeUninit<f32>]) -> &mut [f32] {
    // SAFETY: `MaybeUninit<f32>` has the layout of `f32`, and the caller wrote every element.
    unsafe { &mut *(row as *mut [MaybeUninit<f32>] as *mut [f32]) }
}

/// Calls `f` with the CPU storage and layout of each of `tensors`, holding their read locks
/// meanwhile (ops that are not a candle custom op, such as those with several outputs).
pub(crate) fn with_operands<R>(
    tensors: &[&Tensor],
    f: impl FnOnce(&[(&CpuStorage, &Layout)]) -> Result<R>,
) -> Result<R> {
    let guards: Vec<_> = tensors.iter().map(|t| t.storage_and_layout()).collect();
    let operands = guards
        .iter()
        .map(|(storage, layout)| match &**storage {
            Storage::Cpu(s) => Ok((s, *layout)),
            _ => candle_core::bail!("fused CPU kernel: operand is not on the CPU"),
        })
        .collect::<Result<Vec<_>>>()?;
    f(&operands)
}

/// The f32 elements of a contiguous CPU operand.
pub(crate) fn f32s<'a>(storage: &'a CpuStorage, layout: &Layout) -> Result<&'a [f32]> {
    slice(storage.as_slice::<f32>()?, layout)
}

/// The u32 elements of a contiguous CPU operand.
pub(crate) fn u32s<'a>(storage: &'a CpuStorage, layout: &Layout) -> Result<&'a [u32]> {
    slice(storage.as_slice::<u32>()?, layout)
}

/// The bytes of a contiguous CPU operand.
pub(crate) fn u8s<'a>(storage: &'a CpuStorage, layout: &Layout) -> Result<&'a [u8]> {
    slice(storage.as_slice::<u8>()?, layout)
}

/// The elements of a contiguous CPU operand, of any element type.
pub(crate) fn slice<'a, T>(all: &'a [T], layout: &Layout) -> Result<&'a [T]> {
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&all[start..end]),
        None => candle_core::bail!("fused CPU kernel: operand is not contiguous"),
    }
}

/// Wraps a kernel's output buffer as candle CPU storage of `shape`.
pub(crate) fn output(values: Vec<f32>, shape: impl Into<Shape>) -> (CpuStorage, Shape) {
    (CpuStorage::F32(values), shape.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_and_row_pairs_are_written_in_order_serially_and_in_parallel() {
        for (n, width) in [(10, 3), (SERIAL_BELOW * 3 + 5, 100)] {
            let value = |i: usize| i as f32;
            // SAFETY: every element of each row is written.
            let (rows, firsts) = unsafe {
                written_rows_with(n, width, |r, row| {
                    for (j, v) in row.iter_mut().enumerate() {
                        v.write(value(r * width + j));
                    }
                    r * width
                })
            };
            assert!(rows.iter().enumerate().all(|(i, &v)| v == value(i)));
            assert!(firsts.iter().enumerate().all(|(r, &f)| f == r * width));
            // SAFETY: every element of both rows is written.
            let pairs = unsafe {
                written_row_pairs(n, width, |r, a, b| {
                    for (j, (a, b)) in a.iter_mut().zip(b).enumerate() {
                        a.write(value(r * width + j));
                        b.write(-value(r * width + j));
                    }
                })
            };
            let (a, b) = pairs.split_at(n);
            assert!(a
                .iter()
                .zip(b)
                .enumerate()
                .all(|(i, (&a, &b))| a == value(i) && b == -a));
        }
    }
}
