//! Linear projections ([`linear`], [`glu_projection`]) and their matrix-vector kernels for
//! decoding: `x @ w.t()` for a few rows of `x`, optionally with the gated unit (SwiGLU or
//! GeGLU) of a stacked gate/up weight applied on the way out (`kernels/decode.cu`). On CUDA one
//! kernel (cuBLAS runs these shapes as split-K GEMMs, two kernels and more host work each, and
//! a decode step is bound by launches); on the CPU a rayon loop over the weight's rows that
//! reads each row once for all rows of `x` (the GEMM crate packs the whole weight first, which
//! halves the rate of a memory-bound product). Inference only: no backward, and [`linear`]
//! picks it only for untracked operands. `gemv_fused.rs` joins these products with the norm
//! before them and the residual add after them.

use super::cpu_kernel::{f32s, output, slice};
use super::fused_op::{custom_op, CpuOperand, CpuOutput, FusedOp};
#[cfg(feature = "cuda")]
use super::fused_op::{CudaOutput, Operand};
use super::swiglu::Glu;
use candle_core::{CpuStorage, DType, Layout, Result, Storage, Tensor};
use rayon::prelude::*;

/// `x @ weight.t()` for `weight` `[out, in]` and `x` `[.., in]`, as one 2-D product over all
/// leading dimensions: its backward then computes the weight gradient as one GEMM over every
/// row, instead of a GEMM per batch element plus a reduction (what `broadcast_matmul` does).
/// For a few untracked rows (a decode step) it is a matrix-vector kernel.
pub fn linear(x: &Tensor, weight: &Tensor) -> Result<Tensor> {
    let (out, inp) = weight.dims2()?;
    if x.dims().last() != Some(&inp) {
        candle_core::bail!(
            "linear: input {:?} for a weight of [{out}, {inp}]",
            x.dims()
        );
    }
    let rows = x.reshape(((), inp))?;
    if supported(&rows, weight) {
        return gemv(&rows, weight)?.reshape(with_last_dim(x, out));
    }
    rows.matmul(&weight.t()?)?.reshape(with_last_dim(x, out))
}

/// `glu(x @ gate.t(), x @ up.t())` for the stacked projection `gate_up` `[2 ffn, in]` (gate
/// rows, then up rows) and `x` `[.., in]`. One matrix-vector kernel for a few untracked rows
/// (a decode step); elsewhere the projection, split, then [`super::glu`].
pub fn glu_projection(x: &Tensor, gate_up: &Tensor, glu: Glu) -> Result<Tensor> {
    let rows = x.reshape(((), gate_up.dim(1)?))?;
    let ffn = gate_up.dim(0)? / 2;
    if supported(&rows, gate_up) {
        let op = Gemv { glu: Some(glu) };
        return rows
            .apply_op2_no_bwd(gate_up, &op)?
            .reshape(with_last_dim(x, ffn));
    }
    let both = linear(x, gate_up)?;
    let last = both.rank() - 1;
    super::glu(
        &both.narrow(last, 0, ffn)?,
        &both.narrow(last, ffn, ffn)?,
        glu,
    )
}

/// `x`'s dimensions with the last one replaced by `last`.
pub(crate) fn with_last_dim(x: &Tensor, last: usize) -> Vec<usize> {
    let mut dims = x.dims().to_vec();
    if let Some(d) = dims.last_mut() {
        *d = last;
    }
    dims
}

/// Rows of `x` at most: each weight row is read once per row of `x`.
const MAX_ROWS: usize = 8;

/// Weight rows per rayon task on the CPU.
const CPU_ROWS_PER_TASK: usize = 64;

/// Whether [`gemv`] takes `x` `[rows, in]` and `weight` `[out, in]`: nothing tracked, both
/// contiguous, at most a few rows; one float dtype on the CPU, or CUDA operands the kernel
/// takes.
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
            x.dtype() == weight.dtype()
                && matches!(x.dtype(), DType::F32 | DType::BF16 | DType::F16)
        }
        #[cfg(feature = "cuda")]
        (Storage::Cuda(xs), Storage::Cuda(ws)) => {
            cuda::supported((xs, x.layout()), (ws, weight.layout()))
        }
        _ => false,
    }
}

/// `x @ weight.t()` for `x` `[rows, in]`; the operands must pass [`supported`].
fn gemv(x: &Tensor, weight: &Tensor) -> Result<Tensor> {
    x.apply_op2_no_bwd(weight, &Gemv { glu: None })
}

/// `x @ w.t()` for `x` `[rows, in]`; with a unit, `w` `[2 out, in]` stacks gate rows, then up
/// rows, and the result is `act(x @ gate.t()) · (x @ up.t())`. The operands must pass
/// [`supported`].
struct Gemv {
    glu: Option<Glu>,
}

/// `(rows, in, out)` of the product of `x` and `w` layouts: with a unit, `w` stacks `out` gate
/// rows and `out` up rows, so `out` is half its rows.
pub(crate) fn product_shape(
    x: &Layout,
    w: &Layout,
    glu: Option<Glu>,
) -> Result<(usize, usize, usize)> {
    let (rows, inp) = super::rows_and_width(x)?;
    let (w_rows, _) = super::rows_and_width(w)?;
    Ok((rows, inp, output_features(w_rows, glu)))
}

/// Output features of a product whose weight has `w_rows` rows: half of them with a unit.
pub(crate) fn output_features(w_rows: usize, glu: Option<Glu>) -> usize {
    match glu {
        Some(_) => w_rows / 2,
        None => w_rows,
    }
}

/// A weight element the CPU products read as it is stored, widened to f32 in registers (a
/// 16-bit weight is read at half the bytes of an f32 copy, and decoding on the CPU is bound by
/// reading the weights).
pub(crate) trait Element: Copy + Send + Sync {
    /// The element as f32 (exact).
    fn f32(self) -> f32;
    /// `x` rounded to the nearest element.
    fn from_f32(x: f32) -> Self;
    /// `x` rounded to the element's precision, as f32 (what storing it as one keeps).
    #[inline(always)]
    fn round(x: f32) -> f32 {
        Self::from_f32(x).f32()
    }
}

impl Element for f32 {
    #[inline(always)]
    fn f32(self) -> f32 {
        self
    }
    #[inline(always)]
    fn from_f32(x: f32) -> Self {
        x
    }
}

impl Element for half::bf16 {
    #[inline(always)]
    fn f32(self) -> f32 {
        // The upper half of an f32's bits: a shift the compiler vectorizes.
        f32::from_bits(u32::from(self.to_bits()) << 16)
    }
    #[inline(always)]
    fn from_f32(x: f32) -> Self {
        half::bf16::from_f32(x)
    }
}

impl Element for half::f16 {
    #[inline(always)]
    fn f32(self) -> f32 {
        self.to_f32()
    }
    #[inline(always)]
    fn from_f32(x: f32) -> Self {
        half::f16::from_f32(x)
    }
}

/// `w · x` for each of the `R` rows `xs` (each as long as `w`), every one summed as eight
/// running sums that the compiler keeps in vector registers, then the sums and the tail in
/// order: a row's product does not depend on the rows beside it. The rows' sums are
/// independent chains that the CPU overlaps, and `w` is read once for all of them.
fn dots<E: Element, const R: usize>(w: &[E], xs: [&[f32]; R]) -> [f32; R] {
    let mut sums = [[0f32; 8]; R];
    let mut rows = xs.map(|x| x.chunks_exact(8));
    let w_chunks = w.chunks_exact(8);
    let w_tail = w_chunks.remainder();
    for w in w_chunks {
        for (sums, x) in sums.iter_mut().zip(rows.iter_mut()) {
            if let Some(x) = x.next() {
                for i in 0..8 {
                    sums[i] += w[i].f32() * x[i];
                }
            }
        }
    }
    std::array::from_fn(|r| {
        let tail: f32 = w_tail
            .iter()
            .zip(rows[r].remainder())
            .map(|(a, b)| a.f32() * b)
            .sum();
        sums[r].iter().sum::<f32>() + tail
    })
}

/// `y[r] = w · xs[r]` for every row, [`dots`] over groups of up to four rows (more would
/// spill the running sums out of registers).
fn products<E: Element>(w: &[E], xs: &[&[f32]], y: &mut [f32]) {
    for (xs, y) in xs.chunks(4).zip(y.chunks_mut(4)) {
        match *xs {
            [a, b, c, d] => y.copy_from_slice(&dots(w, [a, b, c, d])),
            [a, b, c] => y.copy_from_slice(&dots(w, [a, b, c])),
            [a, b] => y.copy_from_slice(&dots(w, [a, b])),
            [a] => y.copy_from_slice(&dots(w, [a])),
            _ => {}
        }
    }
}

/// `x @ w.t()` (`[rows, out]`) for f32 `x` `[rows, inp]` on the CPU; with a unit, `w` stacks
/// `out` gate rows, then `out` up rows, and the result is `act(gate) · up`, the gate and up
/// products rounded to `E` first (as the separate projections store them).
pub(crate) fn cpu_products<E: Element>(
    x: &[f32],
    w: &[E],
    (rows, inp, out): (usize, usize, usize),
    glu: Option<Glu>,
) -> Vec<f32> {
    let weight_row = |o: usize| &w[o * inp..][..inp];
    let xs: Vec<&[f32]> = x.chunks_exact(inp.max(1)).collect();
    // Tasks split the output features, and each feature's weight row serves every row of
    // `x` at once: the weight is read from memory once, however many rows (a batch of
    // sequences decoding). The products come out feature-major, `[out, rows]`.
    let mut by_feature = vec![0f32; out * rows];
    by_feature
        .par_chunks_mut(CPU_ROWS_PER_TASK * rows.max(1))
        .enumerate()
        .for_each(|(task, features)| {
            let mut up = vec![0f32; rows];
            for (i, y) in features.chunks_mut(rows.max(1)).enumerate() {
                let o = task * CPU_ROWS_PER_TASK + i;
                products(weight_row(o), &xs, y);
                if let Some(glu) = glu {
                    products(weight_row(out + o), &xs, &mut up);
                    y.iter_mut()
                        .zip(&up)
                        .for_each(|(y, u)| *y = glu.value(E::round(*y)) * E::round(*u));
                }
            }
        });
    (0..rows * out)
        .map(|k| by_feature[(k % out) * rows + k / out])
        .collect()
}

impl Gemv {
    /// The product of 16-bit `x` and `w` on the CPU: `x` widened to f32 (a few rows), `w` read
    /// as stored, the sums in f32, the result rounded to the dtype.
    fn cpu_16_bit<E: Element>(&self, x: &[E], w: &[E], shape: (usize, usize, usize)) -> Vec<E> {
        let x: Vec<f32> = x.iter().map(|v| v.f32()).collect();
        let y = cpu_products(&x, w, shape, self.glu);
        y.into_iter().map(E::from_f32).collect()
    }
}

impl FusedOp<2> for Gemv {
    const NAME: &'static str = "gemv";

    fn name(&self) -> &'static str {
        match self.glu {
            Some(Glu::SwiGlu) => "gemv-swiglu",
            Some(Glu::GeGlu) => "gemv-geglu",
            None => Self::NAME,
        }
    }

    fn cpu(&self, [(x, x_layout), (w, w_layout)]: [CpuOperand; 2]) -> CpuOutput {
        let shape = product_shape(x_layout, w_layout, self.glu)?;
        let (rows, _, out) = shape;
        match (x, w) {
            (CpuStorage::F32(_), CpuStorage::F32(_)) => {
                let y = cpu_products(f32s(x, x_layout)?, f32s(w, w_layout)?, shape, self.glu);
                Ok(output(y, (rows, out)))
            }
            (CpuStorage::BF16(xs), CpuStorage::BF16(ws)) => {
                let y = self.cpu_16_bit(slice(xs, x_layout)?, slice(ws, w_layout)?, shape);
                Ok((CpuStorage::BF16(y), (rows, out).into()))
            }
            (CpuStorage::F16(xs), CpuStorage::F16(ws)) => {
                let y = self.cpu_16_bit(slice(xs, x_layout)?, slice(ws, w_layout)?, shape);
                Ok((CpuStorage::F16(y), (rows, out).into()))
            }
            _ => candle_core::bail!("gemv: CPU operands of one float dtype expected"),
        }
    }

    #[cfg(feature = "cuda")]
    fn cuda(&self, [x, w]: [Operand; 2]) -> CudaOutput {
        let y = cuda::gemv(x, w, self.glu)?;
        let (rows, _, out) = product_shape(x.1, w.1, self.glu)?;
        Ok((y, (rows, out).into()))
    }
}

custom_op!(Gemv: 2);

/// The CUDA launchers (`kernels/decode.cu`).
#[cfg(feature = "cuda")]
mod cuda {
    use crate::launch::{alloc, common_dtype, int, per_warp_row, run, start_aligned, Operand};
    use crate::rows_and_width;
    use crate::swiglu::Glu;
    use candle_core::backend::BackendStorage;
    use candle_core::{CudaStorage, Result};

    /// Whether [`gemv`] takes `x` `[rows, in]` and `w` `[out, in]` (few rows, checked by the
    /// caller): 16-byte aligned rows and operands, one dtype.
    pub(super) fn supported(x: Operand, w: Operand) -> bool {
        let (Ok((_, inp)), Ok((_, w_inp))) = (rows_and_width(x.1), rows_and_width(w.1)) else {
            return false;
        };
        let size = x.0.dtype().size_in_bytes();
        x.0.dtype() == w.0.dtype()
            && inp == w_inp
            && inp > 0
            && (inp * size) % 16 == 0
            && start_aligned(&[x, w]).unwrap_or(false)
    }

    /// `x @ w.t()` for `x` `[rows, in]` and `w` `[out, in]` that [`supported`] accepts; with
    /// a unit, `w` stacks gate and up rows and the result is `act(gate) · up`,
    /// `[rows, out / 2]`.
    pub(super) fn gemv(x: Operand, w: Operand, glu: Option<Glu>) -> Result<CudaStorage> {
        let dtype = common_dtype(&[x, w])?;
        let (rows, inp, out) = super::product_shape(x.1, w.1, glu)?;
        let name = match glu {
            Some(Glu::SwiGlu) => "gemv_swiglu",
            Some(Glu::GeGlu) => "gemv_geglu",
            None => "gemv",
        };
        let y = alloc(&x.0.device, dtype, rows * out)?;
        // One warp per output feature.
        run(
            (name, dtype),
            per_warp_row(out)?,
            &[x, w],
            y,
            &[int(rows)?, int(inp)?, int(out)?],
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::parity::uniform;

    /// Each row of a batch comes out bit for bit as that row alone, for every grouping of
    /// rows and a width that leaves a tail past the eight running sums.
    #[test]
    fn a_row_of_a_batch_is_the_row_alone() {
        let (inp, out) = (45, 19);
        let w = uniform(&[2 * out, inp], 1);
        for rows in 1..=MAX_ROWS {
            let x = uniform(&[rows, inp], rows as u64 + 2);
            let batch = [
                linear(&x, &w).unwrap(),
                glu_projection(&x, &w, Glu::SwiGlu).unwrap(),
            ];
            for r in 0..rows {
                let alone = x.narrow(0, r, 1).unwrap();
                let single = [
                    linear(&alone, &w).unwrap(),
                    glu_projection(&alone, &w, Glu::SwiGlu).unwrap(),
                ];
                for (batch, single) in batch.iter().zip(&single) {
                    let got = batch.narrow(0, r, 1).unwrap().flatten_all().unwrap();
                    let want = single.flatten_all().unwrap();
                    assert_eq!(
                        got.to_vec1::<f32>().unwrap(),
                        want.to_vec1::<f32>().unwrap(),
                        "row {r} of {rows}"
                    );
                }
            }
        }
    }

    /// The CPU reads 16-bit weights as stored: a product is the f32 product of the widened
    /// operands rounded to the dtype, and a gated unit takes the gate and up products rounded
    /// first, as the separate projections and `glu` store them, bit for bit; rows with a tail
    /// past the eight running sums; a row of a batch comes out as the row alone.
    #[test]
    fn sixteen_bit_cpu_products_are_the_widened_ones_rounded() {
        let (inp, ffn) = (77, 7);
        for dtype in [DType::BF16, DType::F16] {
            let round = |t: &Tensor| t.to_dtype(dtype).unwrap();
            let widen = |t: &Tensor| t.to_dtype(DType::F32).unwrap();
            let values = |t: &Tensor| widen(t).flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let rounded = |got: &Tensor, want: &Tensor| {
                assert_eq!(got.dtype(), dtype);
                assert_eq!(values(got), values(&round(want)), "{dtype:?}");
            };
            let x = round(&uniform(&[3, inp], 1));
            let w = round(&uniform(&[2 * ffn, inp], 2));
            assert!(supported(&x, &w));
            let product = linear(&widen(&x), &widen(&w)).unwrap();
            let got = linear(&x, &w).unwrap();
            rounded(&got, &product);
            let alone = linear(&x.narrow(0, 1, 1).unwrap(), &w).unwrap();
            assert_eq!(values(&alone), values(&got.narrow(0, 1, 1).unwrap()));
            let (gate, up) = (
                product.narrow(1, 0, ffn).unwrap(),
                product.narrow(1, ffn, ffn).unwrap(),
            );
            let unit = crate::glu(&widen(&round(&gate)), &widen(&round(&up)), Glu::SwiGlu).unwrap();
            rounded(&glu_projection(&x, &w, Glu::SwiGlu).unwrap(), &unit);
        }
    }
}
