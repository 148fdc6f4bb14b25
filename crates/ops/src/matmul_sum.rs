//! The sum of two matrix products, `a₁ · b₁ + a₂ · b₂`: a LoRA projection (the frozen product
//! plus the rank-r update) and its input gradient.
//!
//! Through candle's ops the sum is two products and an add, and the add reads both products and
//! writes a third activation-sized tensor: on a 1B model's LoRA step (batch 4 × 2048, bf16)
//! those adds took a fifth of the GPU time (`bench/gpu_profile_step.sh`, docs/benchmarks.md).
//! On CUDA the second product is computed first, into the output, and the first product's GEMM
//! adds it as it writes its result (cuBLAS with `beta = 1`), so the sum costs no pass of its own.

use candle_core::{Result, Tensor};

/// `first.0 · first.1 + scale · second.0 · second.1` for 2-D operands: each `a` `[n, k]` (its own `k`),
/// each `b` `[k, m]`. On CUDA, with one float dtype throughout and each `b` contiguous or the
/// transpose of a contiguous matrix (a weight `[m, k]` as `w.t()`), two GEMMs write one output;
/// elsewhere two products and an add. Pass the larger product first: it absorbs the other.
/// No gradient history: callers attach their own backward.
pub fn matmul_sum(
    first: (&Tensor, &Tensor),
    second: (&Tensor, &Tensor),
    scale: f64,
) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if let Some(sum) = cuda::matmul_sum(first, second, scale as f32)? {
        return Ok(sum);
    }
    first.0.matmul(first.1)? + super::times(second.0.matmul(second.1)?, scale)?
}

#[cfg(feature = "cuda")]
mod cuda {
    use crate::launch::{self, address, alloc, base_address, GemmOperand, Operand};
    use candle_core::backend::BackendStorage;
    use candle_core::{CudaStorage, DType, Result, Tensor};

    /// A `b` operand as cuBLAS reads it: the tensor whose buffer is read, and whether that
    /// buffer holds `b` itself (row-major `[k, m]`) or its transpose (`[m, k]`).
    struct RightOperand {
        stored: Tensor,
        transposed: bool,
    }

    fn right_operand(b: &Tensor) -> Result<Option<RightOperand>> {
        if b.is_contiguous() {
            return Ok(Some(RightOperand {
                stored: b.clone(),
                transposed: false,
            }));
        }
        let t = b.t()?;
        Ok(t.is_contiguous().then_some(RightOperand {
            stored: t,
            transposed: true,
        }))
    }

    /// [`super::matmul_sum`] as two cuBLAS GEMMs into one buffer, or `None` where the operands
    /// do not allow it (not CUDA, mixed or non-float dtypes, other layouts, empty shapes).
    pub(super) fn matmul_sum(
        first: (&Tensor, &Tensor),
        second: (&Tensor, &Tensor),
        scale: f32,
    ) -> Result<Option<Tensor>> {
        let dtype = first.0.dtype();
        let operands = [first.0, first.1, second.0, second.1];
        let same = operands
            .iter()
            .all(|t| t.dtype() == dtype && t.rank() == 2 && t.device().is_cuda());
        if !same || !matches!(dtype, DType::F32 | DType::BF16 | DType::F16) {
            return Ok(None);
        }
        let (n, k1) = first.0.dims2()?;
        let (n2, k2) = second.0.dims2()?;
        let (k1b, m) = first.1.dims2()?;
        let (k2b, m2) = second.1.dims2()?;
        if (n, k1, m) != (n2, k1b, m2) || k2 != k2b {
            candle_core::bail!("matmul_sum: [{n}, {k1}]·[{k1b}, {m}] + [{n2}, {k2}]·[{k2b}, {m2}]");
        }
        if n == 0 || m == 0 || k1 == 0 || k2 == 0 {
            return Ok(None);
        }
        let (Some(b1), Some(b2)) = (right_operand(first.1)?, right_operand(second.1)?) else {
            return Ok(None);
        };
        let (a1, a2) = (first.0.contiguous()?, second.0.contiguous()?);
        let tensors = [&a1, &b1.stored, &a2, &b2.stored];
        let sum = launch::with_operands(&tensors, |ops| {
            let y = alloc(&ops[0].0.device, dtype, n * m)?;
            let gemm = |a: Operand, b: Operand, b_transposed: bool, k: usize, scales| {
                product_into(&y, (a, b, b_transposed), (n, k, m), scales)
            };
            gemm(ops[2], ops[3], b2.transposed, k2, (scale, 0.0))?;
            gemm(ops[0], ops[1], b1.transposed, k1, (1.0, 1.0))?;
            Ok(y)
        })?;
        Ok(Some(launch::tensor(sum, (n, m).into())))
    }

    /// `y = alpha · a · b + beta · y` for row-major `a` `[n, k]`, `b` `[k, m]` (stored
    /// transposed, as `[m, k]`, when `b_transposed`) and `y` `[n, m]`, accumulating in f32.
    fn product_into(
        y: &CudaStorage,
        (a, b, b_transposed): (Operand, Operand, bool),
        (n, k, m): (usize, usize, usize),
        (alpha, beta): (f32, f32),
    ) -> Result<()> {
        // Column-major, this is `yᵀ [m, n] = bᵀ [m, k] · aᵀ [k, n]`: `a` as stored is `aᵀ` with
        // leading dimension k; `b` as stored is `bᵀ` (leading dimension m), or `b` itself
        // (leading dimension k), which the transpose flag turns around.
        let b_t = GemmOperand {
            address: address(b)?,
            transposed: b_transposed,
            leading: if b_transposed { k } else { m },
        };
        let a_t = GemmOperand {
            address: address(a)?,
            transposed: false,
            leading: k,
        };
        let dtype = y.dtype();
        // SAFETY: a, b and y are live, contiguous buffers of these shapes on y's device, whose
        // stream runs the GEMM; y holds `n * m` elements, initialized where beta is not 0.
        unsafe {
            launch::gemm(
                &y.device,
                (b_t, a_t),
                (m, n, k),
                (dtype, dtype),
                (base_address(y)?, alpha, beta),
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::parity::{relative_error, uniform};

    #[test]
    fn the_scaled_sum_of_two_products_with_either_layout_of_b() {
        let (a1, a2) = (uniform(&[5, 8], 1), uniform(&[5, 3], 2));
        let (w1, b2) = (uniform(&[6, 8], 3), uniform(&[3, 6], 4));
        let w1t = w1.t().unwrap();
        let got = super::matmul_sum((&a1, &w1t), (&a2, &b2), 0.5).unwrap();
        let update = (a2.matmul(&b2).unwrap() * 0.5).unwrap();
        let want = (a1.matmul(&w1t).unwrap() + update).unwrap();
        assert!(relative_error(&got, &want) < 1e-7);
        assert_eq!(got.dims(), [5, 6]);
    }
}
