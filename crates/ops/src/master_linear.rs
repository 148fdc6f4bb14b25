//! A trainable linear layer whose weight is kept in a wider dtype than the layer computes in:
//! the f32 master weight of bf16 mixed-precision training.
//!
//! Through candle's own ops, `x @ w.to_dtype(bf16).t()` hands the master its gradient as the
//! transpose of `xᵀ · grad` (a strided view), which the cast's backward then widens to f32
//! element by element through those strides. Here the weight gradient is `gradᵀ · x`, computed
//! directly in the weight's `[out, in]` layout; on CUDA one cuBLAS GEMM reads the 16-bit
//! operands and writes it in f32, so no cast runs at all.

use super::attach::attach2;
use super::stack::{stacked_node, Blocks};
use super::step_scope;
use candle_core::{DType, Result, Tensor};

/// `x @ weight.t()` computed in `x`'s dtype for a `weight` `[out, in]` of any float dtype, with
/// gradients for `x` (in its dtype) and for `weight` (in the weight's dtype) where tracked.
pub fn master_linear(x: &Tensor, weight: &Tensor) -> Result<Tensor> {
    let (xd, w) = (x.detach(), step_scope::copy_or_cast(weight, x.dtype())?);
    let y = super::linear(&xd, &w)?;
    let (x_grad, w_grad) = (x.track_op(), weight.track_op());
    if !x_grad && !w_grad {
        return Ok(y);
    }
    let master = weight.dtype();
    attach2(x, weight, &y, "master-linear", move |grad| {
        gradients(grad, (&xd, x_grad), (&w, w_grad), master)
    })
}

/// [`master_linear`] over weights `parts` (two or three, `[out_i, in]`, one dtype) stacked
/// along their rows: `[.., Σ out_i]`, the parts' outputs in order (a block's gate and up, or
/// its q, k and v). One GEMM each way where separate projections of the same input take one
/// each and sum their input gradients; each weight's gradient is its rows of one
/// weight-gradient GEMM.
pub fn stacked_master_linear(x: &Tensor, parts: &[&Tensor]) -> Result<Tensor> {
    let (xd, w) = (x.detach(), super::stacked_cast(parts, x.dtype())?);
    let y = super::linear(&xd, &w)?;
    let (x_grad, w_grad) = (x.track_op(), parts.iter().any(|p| p.track_op()));
    if !x_grad && !w_grad {
        return Ok(y);
    }
    let master = parts.first().map_or(DType::F32, |p| p.dtype());
    let stacked = stacked_node(parts, &w, Blocks::Rows)?;
    attach2(x, &stacked, &y, "stacked-master-linear", move |grad| {
        gradients(grad, (&xd, x_grad), (&w, w_grad), master)
    })
}

/// The gradients of `x @ w.t()` for the output gradient `grad`, each only where wanted: `x`'s
/// in its dtype, `w`'s (`[out, in]`) in `master`.
fn gradients(
    grad: &Tensor,
    (x, x_wanted): (&Tensor, bool),
    (w, w_wanted): (&Tensor, bool),
    master: DType,
) -> Result<(Option<Tensor>, Option<Tensor>)> {
    let (out, inp) = w.dims2()?;
    let g = grad.reshape(((), out))?;
    let dx = match x_wanted {
        true => Some(g.matmul(w)?.reshape(x.shape())?),
        false => None,
    };
    let dw = match w_wanted {
        true => Some(weight_grad(&g, &x.reshape(((), inp))?, master)?),
        false => None,
    };
    Ok((dx, dw))
}

/// `gᵀ · x` in `dtype` for `g` `[n, out]` and `x` `[n, in]`: the gradient of a weight
/// `[out, in]` that was applied to `x` and received `g`.
pub(super) fn weight_grad(g: &Tensor, x: &Tensor, dtype: DType) -> Result<Tensor> {
    scaled_weight_grad(g, x, dtype, 1.0)
}

/// `scale · gᵀ · x` in `dtype` ([`weight_grad`] with a factor): on CUDA the GEMM applies it.
pub(super) fn scaled_weight_grad(
    g: &Tensor,
    x: &Tensor,
    dtype: DType,
    scale: f64,
) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if let Some(dw) = cuda::widening_weight_grad(None, g, x, dtype, scale as f32)? {
        return Ok(dw);
    }
    super::times(g.t()?.matmul(x)?, scale)?.to_dtype(dtype)
}

/// `total + gᵀ · x` in f32 (`total` `None` before the first term): a weight gradient summed
/// over chunks of rows. On CUDA with 16-bit `g` and `x` the GEMM adds its product to `total`
/// as it writes (cuBLAS `beta = 1`), so no chunk's gradient exists on its own. `total` must be
/// what an earlier call returned, held nowhere else: its buffer is written in place.
pub(super) fn add_weight_grad(total: Option<Tensor>, g: &Tensor, x: &Tensor) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if let Some(sum) = cuda::widening_weight_grad(total.as_ref(), g, x, DType::F32, 1.0)? {
        return Ok(sum);
    }
    let part = g.t()?.matmul(x)?.to_dtype(DType::F32)?;
    match total {
        Some(total) => super::add::gradient_add(&total, &part),
        None => Ok(part),
    }
}

/// The weight gradient on CUDA: one cuBLAS GEMM.
#[cfg(feature = "cuda")]
mod cuda {
    use crate::launch::{self, address, alloc, base_address, common_dtype, GemmOperand, Operand};
    use crate::rows_and_width;
    use candle_core::{CudaStorage, DType, Result, Tensor};

    /// `total + scale · gᵀ · x` (without a total, `scale · gᵀ · x`) in f32 as one GEMM, where
    /// that applies: 16-bit `g` and `x` of one dtype on CUDA, `dtype` f32, and a `total` (if
    /// any) that is a contiguous f32 `[out, in]` tensor (see `add_weight_grad` for whose buffer
    /// it must be).
    pub(super) fn widening_weight_grad(
        total: Option<&Tensor>,
        g: &Tensor,
        x: &Tensor,
        dtype: DType,
        scale: f32,
    ) -> Result<Option<Tensor>> {
        let half = matches!(g.dtype(), DType::BF16 | DType::F16);
        if !(g.device().is_cuda() && half && dtype == DType::F32 && g.dtype() == x.dtype()) {
            return Ok(None);
        }
        let (g, x) = (g.contiguous()?, x.contiguous()?);
        let (out, inp) = (g.dim(1)?, x.dim(1)?);
        let Some(total) = total else {
            let dw = launch::with_operands(&[&g, &x], |ops| {
                let dw = alloc(&ops[0].0.device, DType::F32, out * inp)?;
                weight_grad_f32(ops[0], ops[1], (&dw, scale, 0.0))?;
                Ok(dw)
            })?;
            return Ok(Some(launch::tensor(dw, (out, inp).into())));
        };
        let fits = total.dtype() == DType::F32 && total.dims() == [out, inp];
        if !(fits && total.is_contiguous() && total.layout().start_offset() == 0) {
            return Ok(None);
        }
        launch::with_operands(&[&g, &x, total], |ops| {
            weight_grad_f32(ops[0], ops[1], (ops[2].0, scale, 1.0))
        })?;
        Ok(Some(total.clone()))
    }

    /// `dw = alpha · gᵀ · x + beta · dw` (f32 `[out, in]`) of 16-bit `g` `[n, out]` and `x`
    /// `[n, in]`, both contiguous and of one dtype: one cuBLAS GEMM that accumulates in f32 and
    /// writes f32. `dw` holds `out * in` f32 values from its start, initialized unless `beta`
    /// is 0.
    fn weight_grad_f32(
        g: Operand,
        x: Operand,
        (dw, alpha, beta): (&CudaStorage, f32, f32),
    ) -> Result<()> {
        let dtype = common_dtype(&[g, x])?;
        if !matches!(dtype, DType::BF16 | DType::F16) {
            candle_core::bail!("weight gradient: {dtype:?} operands, 16-bit expected");
        }
        let (n, out) = rows_and_width(g.1)?;
        let (n_x, inp) = rows_and_width(x.1)?;
        if n != n_x {
            candle_core::bail!("weight gradient: {n} gradient rows for {n_x} input rows");
        }
        let device = &g.0.device;
        // Column-major, this is `dwᵀ [in, out] = xᵀ [in, n] · g [n, out]`: x as stored (`in` by
        // `n`, leading dimension `in`), g transposed (stored `out` by `n`).
        let x_t = GemmOperand {
            address: address(x)?,
            transposed: false,
            leading: inp,
        };
        let g_t = GemmOperand {
            address: address(g)?,
            transposed: true,
            leading: out,
        };
        // SAFETY: x, g and dw are live, contiguous buffers of these shapes on `device`, whose
        // stream runs the GEMM; dw holds `out * inp` f32 values, initialized where beta is not
        // 0 (the caller's contract).
        unsafe {
            launch::gemm(
                device,
                (x_t, g_t),
                (inp, out, n),
                (dtype, DType::F32),
                (base_address(dw)?, alpha, beta),
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::parity::{assert_parity, uniform};
    use candle_core::{DType, Tensor, Var};

    #[test]
    fn gradients_match_candles_matmul() {
        assert_parity(
            "master_linear",
            &[uniform(&[2, 5, 8], 1), uniform(&[6, 8], 2)],
            &[true, true],
            |t| super::master_linear(&t[0], &t[1]),
            |t| t[0].broadcast_matmul(&t[1].t()?),
            1e-6,
        );
    }

    #[test]
    fn stacked_gradients_match_separate_products() {
        // q, k and v of a block (6, 2 and 2 rows), then gate and up; the last case with k
        // frozen, which gets no gradient while the others get theirs.
        for (rows, wanted) in [
            (&[6, 2, 2][..], &[true, true, true, true][..]),
            (&[6, 6][..], &[true, true, true][..]),
            (&[6, 2, 2][..], &[true, true, false, true][..]),
        ] {
            let mut inputs = vec![uniform(&[2, 5, 8], 1)];
            inputs.extend(
                rows.iter()
                    .enumerate()
                    .map(|(i, &r)| uniform(&[r, 8], 2 + i as u64)),
            );
            assert_parity(
                "stacked_master_linear",
                &inputs,
                wanted,
                |t| {
                    let parts: Vec<&Tensor> = t[1..].iter().collect();
                    super::stacked_master_linear(&t[0], &parts)
                },
                |t| {
                    let products = t[1..]
                        .iter()
                        .map(|w| t[0].broadcast_matmul(&w.t()?))
                        .collect::<candle_core::Result<Vec<_>>>()?;
                    Tensor::cat(&products, 2)
                },
                1e-6,
            );
        }
    }

    #[test]
    fn a_wide_master_gets_its_gradient_in_its_own_dtype() {
        let x = Var::from_tensor(&uniform(&[4, 8], 3).to_dtype(DType::BF16).unwrap()).unwrap();
        let w = Var::from_tensor(&uniform(&[6, 8], 4)).unwrap();
        let y = super::master_linear(x.as_tensor(), w.as_tensor()).unwrap();
        assert_eq!(y.dtype(), DType::BF16);
        let grads = y
            .to_dtype(DType::F32)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let dw = grads.get(&w).unwrap();
        assert_eq!(dw.dtype(), DType::F32);
        // d(sum y)/dW = column sums of x, for every output row.
        let col_sums = x.as_tensor().to_dtype(DType::F32).unwrap().sum(0).unwrap();
        let want = col_sums.unsqueeze(0).unwrap().broadcast_as((6, 8)).unwrap();
        let err = crate::parity::relative_error(dw, &want.contiguous().unwrap());
        assert!(err < 1e-2, "{err}");
        assert_eq!(grads.get(&x).unwrap().dtype(), DType::BF16);
    }
}
