//! Linear layers over a frozen weight that compute no weight gradient.
//!
//! candle's matmul backward computes the gradient of both operands, so `x @ w.t()` with a
//! frozen `w` still runs the weight-gradient GEMM and keeps a weight-sized tensor alive. Here
//! the product is computed on a detached input and re-attached to `x` through a custom op whose
//! backward returns only `grad @ w`.
//!
//! A frozen weight is dense or 4-bit ([`LinearWeight`]). A 4-bit one is expanded right before
//! each product and again in the backward pass, so no layer keeps its 16-bit copy between the
//! two: that is what holds a QLoRA step's memory near the 4-bit size of the model.

use super::attach::{attach, attach3};
use super::masked_lora::{add_masked_shares, masked_bottleneck, masked_factor_grad, MaskedParts};
use super::master_linear::scaled_weight_grad;
use super::nf4::Nf4Tensor;
use super::stack::{block_diagonal, stacked_node, Blocks};
use super::step_scope;
use super::Dropout;
use candle_core::{DType, Result, Tensor};
use std::ops::Range;
use std::sync::Arc;

/// A projection's weight `[out, in]`: a dense tensor, or rows of an NF4 tensor (all of them
/// unless a checkpoint stacks several projections in one weight).
#[derive(Debug, Clone)]
pub enum LinearWeight {
    /// A dense weight of any float dtype.
    Dense(Tensor),
    /// The rows `rows` of a 4-bit NF4 tensor.
    Nf4 {
        /// The NF4 tensor, shared by the projections it stacks.
        tensor: Arc<Nf4Tensor>,
        /// The rows of `tensor` that make this projection's `out` rows.
        rows: Range<usize>,
    },
}

impl LinearWeight {
    /// All rows of an NF4 weight.
    pub fn nf4(tensor: Nf4Tensor) -> Result<Self> {
        let (out, _) = tensor.shape().dims2()?;
        Ok(Self::Nf4 {
            tensor: Arc::new(tensor),
            rows: 0..out,
        })
    }

    /// `[out, in]`.
    pub fn dims2(&self) -> Result<(usize, usize)> {
        match self {
            Self::Dense(t) => t.dims2(),
            Self::Nf4 { tensor, rows } => Ok((rows.len(), tensor.shape().dims2()?.1)),
        }
    }

    /// The dense tensor, when the weight is one.
    pub fn as_dense(&self) -> Option<&Tensor> {
        match self {
            Self::Dense(t) => Some(t),
            Self::Nf4 { .. } => None,
        }
    }

    /// The dtype the weight is stored in, or was quantized from.
    pub fn dtype(&self) -> DType {
        match self {
            Self::Dense(t) => t.dtype(),
            Self::Nf4 { tensor, .. } => tensor.dtype(),
        }
    }

    /// The weight as a dense tensor in `dtype` (an NF4 weight is expanded; a dense one cast).
    pub fn dense(&self, dtype: DType) -> Result<Tensor> {
        match self {
            Self::Dense(t) => super::cast(t, dtype),
            Self::Nf4 { tensor, rows } => {
                let all = tensor.dequantize(dtype)?;
                match rows.len() == all.dim(0)? {
                    true => Ok(all),
                    false => all.narrow(0, rows.start, rows.len()),
                }
            }
        }
    }

    /// Rows `start..start + len` of the weight (a view; an NF4 weight narrows its row range).
    pub fn narrow_rows(&self, start: usize, len: usize) -> Result<Self> {
        match self {
            Self::Dense(t) => Ok(Self::Dense(t.narrow(0, start, len)?)),
            Self::Nf4 { tensor, rows } => Ok(Self::Nf4 {
                tensor: tensor.clone(),
                rows: rows.start + start..rows.start + start + len,
            }),
        }
    }

    /// What a backward pass keeps to recompute `dense`: the expanded tensor `expanded` of a
    /// dense weight (already cast, so the cast is not repeated), the 4-bit weight itself
    /// otherwise, unless this is a block's recomputation for its backward pass
    /// ([`super::recomputing`]), which follows at once.
    fn kept(&self, expanded: &Tensor) -> Self {
        match self {
            Self::Nf4 { .. } if !step_scope::keeps_expanded_weights() => self.clone(),
            _ => Self::Dense(expanded.detach()),
        }
    }

    /// `x @ self.t()` by a kernel that reads the 4-bit codes directly (a decode step on
    /// CUDA), where one applies.
    fn matvec(&self, x: &Tensor) -> Result<Option<Tensor>> {
        match self {
            Self::Nf4 { tensor, rows } if rows.len() == tensor.shape().dims()[0] => {
                tensor.matvec(x)
            }
            _ => Ok(None),
        }
    }
}

/// `x @ weight.t()` (weight `[out, in]`, computed in `x`'s dtype) where only `x` receives a
/// gradient.
pub fn frozen_linear(x: &Tensor, weight: &LinearWeight) -> Result<Tensor> {
    if let Some(y) = weight.matvec(x)? {
        return Ok(y);
    }
    let w = weight.dense(x.dtype())?;
    let y = super::linear(&x.detach(), &w)?;
    if !x.track_op() {
        return Ok(y);
    }
    let kept = weight.kept(&w);
    drop(w);
    attach(x, &y, "frozen-linear", move |grad| {
        let w = kept.dense(grad.dtype())?;
        // grad @ w is `linear` with the weight's transpose.
        Ok(Some(super::linear(grad, &w.t()?)?))
    })
}

/// `x @ weight.t() + scale · (dropout(x) @ a.t()) @ b.t()` for a frozen `weight` `[out, in]`
/// and LoRA factors `a` `[r, in]`, `b` `[out, r]` of any float dtype (f32 masters), computed in
/// `x`'s dtype; `dropout` is the mask of the update's input, `None` without dropout. One graph
/// node: its backward gives `x` its gradient in its dtype and `a` and `b` theirs in their own
/// (on CUDA one GEMM each, with 16-bit operands, the scale applied and an f32 result: no cast
/// or scaling pass), and keeps only the rank-sized `dropout(x) @ a.t()` besides `x`, where
/// separate ops would keep the base projection, the update and their sum for every layer. The
/// mask is never kept: it is drawn again wherever the dropped input is read (the bottleneck,
/// `a`'s gradient) and where the update's share of `x`'s gradient is masked, on CUDA inside
/// one kernel each (`masked_lora.rs`).
///
/// Without dropout in f32, the update folds into the weight first (`weight + scale · b @ a`,
/// rank-r work): the projection and the input gradient are then one GEMM each, where the
/// separate products cost two skinny GEMMs and a full-size add each way. That pays when `x`
/// has a gradient or as many rows as the weight's `in · out / (in + out)`; a few untracked rows
/// (a decode step) take the separate products, which are smaller than the fold. In 16 bits the
/// update stays separate, since adding it to a 16-bit weight would round most of it away. A
/// 4-bit weight never folds: it is expanded for the product and again for the backward pass.
pub fn lora_linear(
    x: &Tensor,
    weight: &LinearWeight,
    a: &Tensor,
    b: &Tensor,
    scale: f64,
    dropout: Option<Dropout>,
) -> Result<Tensor> {
    let xd = x.detach();
    let dtype = xd.dtype();
    let (ad, bd) = (
        step_scope::cast_once(a, dtype)?,
        step_scope::cast_once(b, dtype)?,
    );
    let w = weight.dense(dtype)?;
    let rank = ad.dim(0)?;
    let masks = dropout.map(|d| vec![(rank, d)]);
    let xa = step_scope::bottleneck(a, || bottleneck(&xd, &ad, masks.as_deref()))?;
    let (out, inp) = w.dims2()?;
    let rows = xd.elem_count() / inp.max(1);
    let fold_pays = x.track_op() || rows * (inp + out) >= inp * out;
    let dense = weight.as_dense().is_some();
    let folded = match dropout.is_none() && dtype == DType::F32 && fold_pays && dense {
        true => Some((&w + (bd.matmul(&ad)? * scale)?)?),
        false => None,
    };
    let y = match &folded {
        Some(merged) => super::linear(&xd, merged)?,
        None => projection_plus_update(&xd, &w, (&xa, &bd), scale)?,
    };
    if !(x.track_op() || a.track_op() || b.track_op()) {
        return Ok(y);
    }
    let kept = weight.kept(&w);
    drop(w);
    let (x_grad, dtypes) = (x.track_op(), (a.dtype(), b.dtype()));
    attach3([x, a, b], &y, "lora-linear", move |grad| {
        let g = as_rows(grad)?;
        let (g_r, da, db) = factor_grads(&g, (&xa, &xd), &bd, masks.as_deref(), dtypes, scale)?;
        let dx = match (x_grad, &folded) {
            (false, _) => None,
            (true, Some(merged)) => Some(g.matmul(merged)?.reshape(xd.dims())?),
            (true, None) => {
                let w = kept.dense(g.dtype())?;
                let dx = input_grad(&g, &w, (&g_r, &ad), masks.as_deref(), scale)?;
                Some(dx.reshape(xd.dims())?)
            }
        };
        Ok((dx, Some(da), Some(db)))
    })
}

/// [`lora_linear`] over projections of one input stacked along their rows: the frozen
/// `weight` `[Σ out_i, in]` (the parts' weights, stacked) and each part's factors
/// `(a_i [r_i, in], b_i [out_i, r_i])`, one `scale` for all, as `[.., Σ out_i]`, the parts'
/// outputs in order. The factors multiply as the stack of the `a_i` `[Σ r_i, in]` and the
/// block-diagonal matrix of the `b_i` `[Σ out_i, Σ r_i]`, so each product of the input's rows is
/// one GEMM where separate adapters take one a part, and the input's gradient is no sum of
/// the parts'. With dropout, `dropouts` holds each part's mask: each `a_i` then multiplies its
/// own dropped input (drawn again for its gradient) and its share of the input's gradient is
/// masked as it is added, while the frozen products and the `b` product stay one each. The
/// factors get their gradients in their own dtypes, as each part's block of the stacks'
/// gradients.
pub fn stacked_lora_linear(
    x: &Tensor,
    weight: &LinearWeight,
    factors: &[(&Tensor, &Tensor)],
    scale: f64,
    dropouts: Option<&[Dropout]>,
) -> Result<Tensor> {
    let xd = x.detach();
    let dtype = xd.dtype();
    let (a_parts, b_parts): (Vec<&Tensor>, Vec<&Tensor>) = factors.iter().copied().unzip();
    let (Some(first_a), Some(first_b)) = (a_parts.first(), b_parts.first()) else {
        candle_core::bail!("stacked_lora_linear: no factors");
    };
    let ad = super::stacked_cast(&a_parts, dtype)?;
    let b_casts = b_parts
        .iter()
        .map(|b| step_scope::cast_once(b, dtype))
        .collect::<Result<Vec<_>>>()?;
    let bd = block_diagonal(&b_casts)?;
    if dropouts.is_some_and(|d| d.len() != factors.len()) {
        candle_core::bail!("stacked_lora_linear: one dropout mask a part");
    }
    let ranks: Vec<usize> = a_parts.iter().map(|a| a.dim(0)).collect::<Result<_>>()?;
    let masks: Option<Vec<_>> =
        dropouts.map(|d| ranks.iter().copied().zip(d.iter().copied()).collect());
    let xa = step_scope::bottleneck(first_a, || bottleneck(&xd, &ad, masks.as_deref()))?;
    let w = weight.dense(dtype)?;
    let y = projection_plus_update(&xd, &w, (&xa, &bd), scale)?;
    let factors_tracked = factors.iter().any(|(a, b)| a.track_op() || b.track_op());
    if !(x.track_op() || factors_tracked) {
        return Ok(y);
    }
    let kept = weight.kept(&w);
    drop(w);
    let a_stack = stacked_node(&a_parts, &ad, Blocks::Rows)?;
    let b_stack = stacked_node(&b_parts, &bd, Blocks::Diagonal)?;
    let (x_grad, dtypes) = (x.track_op(), (first_a.dtype(), first_b.dtype()));
    attach3(
        [x, &a_stack, &b_stack],
        &y,
        "stacked-lora-linear",
        move |grad| {
            let g = as_rows(grad)?;
            let masks = masks.as_deref();
            let (g_r, da, db) = factor_grads(&g, (&xa, &xd), &bd, masks, dtypes, scale)?;
            let dx = match x_grad {
                true => {
                    let w = kept.dense(g.dtype())?;
                    let dx = input_grad(&g, &w, (&g_r, &ad), masks, scale)?;
                    Some(dx.reshape(xd.dims())?)
                }
                false => None,
            };
            Ok((dx, Some(da), Some(db)))
        },
    )
}

/// `x` `[.., k]` as rows `[n, k]`.
fn as_rows(x: &Tensor) -> Result<Tensor> {
    x.reshape(((), x.dim(x.rank() - 1)?))
}

/// The bottleneck `x @ a.t()` `[.., r]` of the input `x` `[.., in]` and the (stacked) factor
/// `a` `[r, in]`, each part's rows of `a` multiplying its own dropped input where there are
/// masks.
fn bottleneck(x: &Tensor, a: &Tensor, masks: Option<MaskedParts>) -> Result<Tensor> {
    match masks {
        None => super::linear(x, a),
        Some(parts) => {
            let xa = masked_bottleneck(&as_rows(x)?, a, parts)?;
            xa.reshape(super::gemv::with_last_dim(x, a.dim(0)?))
        }
    }
}

/// For the output gradient rows `g` `[n, out]` of a LoRA update `scale · xa @ b.t()` with `xa`
/// the bottleneck of the input `x` `[.., in]` (`xa` `[.., r]`, `b` `[out, r]` in `g`'s dtype),
/// through `masks` where there are: the gradient at the bottleneck before the scale, `g @ b`
/// `[n, r]`, and the factors' gradients, `a`'s `[r, in]` and `b`'s `[out, r]` in `dtypes`.
fn factor_grads(
    g: &Tensor,
    (xa, x): (&Tensor, &Tensor),
    b: &Tensor,
    masks: Option<MaskedParts>,
    (a_dtype, b_dtype): (DType, DType),
    scale: f64,
) -> Result<(Tensor, Tensor, Tensor)> {
    let g_r = g.matmul(b)?;
    let db = scaled_weight_grad(g, &as_rows(xa)?, b_dtype, scale)?;
    let x = as_rows(x)?;
    let da = match masks {
        None => scaled_weight_grad(&g_r, &x, a_dtype, scale)?,
        Some(parts) => masked_factor_grad(&g_r, &x, parts, a_dtype, scale)?,
    };
    Ok((g_r, da, db))
}

/// The input's gradient rows `g @ w + scale · g_r @ a` for the output gradient rows `g`, the
/// frozen weight `w` `[out, in]`, the gradient at the bottleneck `g_r` and the (stacked) factor
/// `a`, each part's share through its mask where there are masks.
fn input_grad(
    g: &Tensor,
    w: &Tensor,
    (g_r, a): (&Tensor, &Tensor),
    masks: Option<MaskedParts>,
    scale: f64,
) -> Result<Tensor> {
    match masks {
        None => super::matmul_sum((g, w), (g_r, a), scale),
        Some(parts) => add_masked_shares(&g.matmul(w)?, g_r, a, parts, scale),
    }
}

/// `x @ w.t() + scale · xa @ b.t()` for `x` `[.., in]`, `w` `[out, in]`, `xa` `[.., r]` and `b`
/// `[out, r]`: the frozen product and the LoRA update written into one output by two GEMMs
/// ([`super::matmul_sum`]), or, for a decode step's few rows, two matrix-vector products and
/// an add.
fn projection_plus_update(
    x: &Tensor,
    w: &Tensor,
    (xa, b): (&Tensor, &Tensor),
    scale: f64,
) -> Result<Tensor> {
    let (out, inp) = w.dims2()?;
    let rows = x.reshape(((), inp))?;
    if super::gemv::supported(&rows, w) {
        return super::linear(x, w)? + (super::linear(xa, b)? * scale)?;
    }
    let xa_rows = xa.reshape(((), b.dim(1)?))?;
    let y = super::matmul_sum((&rows, &w.t()?), (&xa_rows, &b.t()?), scale)?;
    y.reshape(super::gemv::with_last_dim(x, out))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn input_gradient_matches_plain_matmul_and_weight_gets_none() {
        let dev = Device::Cpu;
        let x = Var::from_tensor(
            &Tensor::arange(0f32, 12., &dev)
                .unwrap()
                .reshape((2, 2, 3))
                .unwrap(),
        )
        .unwrap();
        let w = (Tensor::arange(0f32, 12., &dev)
            .unwrap()
            .reshape((4, 3))
            .unwrap()
            * 0.1)
            .unwrap();
        let y = frozen_linear(&x, &LinearWeight::Dense(w.clone())).unwrap();
        let plain = x.broadcast_matmul(&w.t().unwrap()).unwrap();
        assert_eq!(y.to_vec3::<f32>().unwrap(), plain.to_vec3::<f32>().unwrap());
        let g1 = (y.sqr().unwrap().sum_all().unwrap()).backward().unwrap();
        let g2 = (plain.sqr().unwrap().sum_all().unwrap())
            .backward()
            .unwrap();
        assert_eq!(
            g1.get(&x).unwrap().to_vec3::<f32>().unwrap(),
            g2.get(&x).unwrap().to_vec3::<f32>().unwrap()
        );
        assert!(g1.get(&w).is_none());
    }
}

#[cfg(test)]
mod lora_tests {
    use crate::parity::{assert_parity, uniform};

    #[test]
    fn lora_linear_matches_separate_ops_with_and_without_dropout() {
        let (x, w, a, b) = (
            uniform(&[2, 3, 8], 1),
            uniform(&[6, 8], 2),
            uniform(&[4, 8], 3),
            uniform(&[6, 4], 4),
        );
        for dropout in [None, Some(crate::Dropout::new(0.2, 5).unwrap())] {
            assert_parity(
                "lora_linear",
                &[x.clone(), w.clone(), a.clone(), b.clone()],
                &[true, false, true, true],
                move |t| {
                    let w = super::LinearWeight::Dense(t[1].clone());
                    super::lora_linear(&t[0], &w, &t[2], &t[3], 2.0, dropout)
                },
                move |t| {
                    let dropped = match dropout {
                        Some(d) => (&t[0] * d.mask(t[0].dims(), t[0].device())?)?,
                        None => t[0].clone(),
                    };
                    let update = dropped.broadcast_matmul(&t[2].t()?)?;
                    let update = (update.broadcast_matmul(&t[3].t()?)? * 2.0)?;
                    t[0].broadcast_matmul(&t[1].t()?)? + update
                },
                1e-5,
            );
        }
    }

    #[test]
    fn stacked_lora_linear_matches_each_parts_own_update() {
        // q, k and v of a block (6, 2 and 2 rows, ranks 4), then gate and up with ranks 3 and
        // 2: inputs x, the stacked weight, then each part's a and b; without dropout and with
        // a mask of its own for each part.
        let cases = [(&[6, 2, 2][..], &[4, 4, 4][..]), (&[5, 5][..], &[3, 2][..])];
        for ((outs, ranks), dropout) in cases.into_iter().flat_map(|c| [(c, false), (c, true)]) {
            let total: usize = outs.iter().sum();
            let mut inputs = vec![uniform(&[2, 3, 8], 1), uniform(&[total, 8], 2)];
            for (i, (&out, &r)) in outs.iter().zip(ranks).enumerate() {
                inputs.push(uniform(&[r, 8], 3 + 2 * i as u64));
                inputs.push(uniform(&[out, r], 4 + 2 * i as u64));
            }
            let dropouts: Option<Vec<_>> = dropout.then(|| {
                let mask = |i| crate::Dropout::new(0.3, 40 + i).unwrap();
                (0..outs.len() as u64).map(mask).collect()
            });
            let each_dropouts = dropouts.clone();
            let mut tracked = vec![true, false];
            tracked.extend(std::iter::repeat_n(true, 2 * outs.len()));
            assert_parity(
                "stacked_lora_linear",
                &inputs,
                &tracked,
                move |t| {
                    let w = super::LinearWeight::Dense(t[1].clone());
                    let factors: Vec<_> = t[2..].chunks(2).map(|f| (&f[0], &f[1])).collect();
                    super::stacked_lora_linear(&t[0], &w, &factors, 0.5, dropouts.as_deref())
                },
                move |t| {
                    let mut row = 0;
                    let mut outputs = Vec::new();
                    for (i, f) in t[2..].chunks(2).enumerate() {
                        let out = f[1].dim(0)?;
                        let w = super::LinearWeight::Dense(t[1].narrow(0, row, out)?);
                        let d = each_dropouts.as_ref().map(|d| d[i]);
                        outputs.push(super::lora_linear(&t[0], &w, &f[0], &f[1], 0.5, d)?);
                        row += out;
                    }
                    candle_core::Tensor::cat(&outputs, 2)
                },
                1e-5,
            );
        }
    }

    #[test]
    fn untracked_rows_are_the_same_folded_or_not() {
        let (w, a, b) = (
            uniform(&[6, 8], 2),
            uniform(&[4, 8], 3),
            uniform(&[6, 4], 4),
        );
        // One row takes the separate products, 40 rows (at least 6 · 8 / 14) the fold.
        for rows in [1, 40] {
            let x = uniform(&[rows, 8], 1);
            let dense = super::LinearWeight::Dense(w.clone());
            let got = super::lora_linear(&x, &dense, &a, &b, 2.0, None).unwrap();
            let update = (x
                .matmul(&a.t().unwrap())
                .unwrap()
                .matmul(&b.t().unwrap())
                .unwrap()
                * 2.0)
                .unwrap();
            let want = (x.matmul(&w.t().unwrap()).unwrap() + update).unwrap();
            let error = crate::parity::relative_error(&got, &want);
            assert!(error < 1e-6, "{rows} rows: {error:.2e}");
        }
    }
}

#[cfg(test)]
mod nf4_tests {
    use super::{frozen_linear, lora_linear, LinearWeight};
    use crate::nf4::Nf4Tensor;
    use crate::parity::{relative_error, uniform};
    use candle_core::{Device, Var};

    /// A 4-bit weight computes what its dequantized copy computes, forward and backward, with
    /// and without an adapter, on whole and narrowed rows.
    #[test]
    fn nf4_weights_compute_as_their_dequantized_copy() {
        let w = uniform(&[6, 128], 2);
        let nf4 = LinearWeight::nf4(Nf4Tensor::quantize(&w, &Device::Cpu).unwrap()).unwrap();
        let dense = LinearWeight::Dense(nf4.dense(candle_core::DType::F32).unwrap());
        let (a, b) = (uniform(&[4, 128], 3), uniform(&[6, 4], 4));
        for (quantized, plain) in [
            (nf4.clone(), dense.clone()),
            (
                nf4.narrow_rows(2, 3).unwrap(),
                dense.narrow_rows(2, 3).unwrap(),
            ),
        ] {
            let rows = quantized.dims2().unwrap().0;
            let b = b.narrow(0, 0, rows).unwrap();
            let run = |w: &LinearWeight, lora: bool| {
                let x = Var::from_tensor(&uniform(&[2, 3, 128], 1)).unwrap();
                let y = match lora {
                    false => frozen_linear(&x, w).unwrap(),
                    true => lora_linear(&x, w, &a, &b, 0.5, None).unwrap(),
                };
                let grads = y.sqr().unwrap().sum_all().unwrap().backward().unwrap();
                (y, grads.get(&x).unwrap().clone())
            };
            for lora in [false, true] {
                let ((y1, g1), (y2, g2)) = (run(&quantized, lora), run(&plain, lora));
                assert!(relative_error(&y1, &y2) < 1e-6, "lora {lora}: forward");
                assert!(
                    relative_error(&g1, &g2) < 1e-6,
                    "lora {lora}: input gradient"
                );
                // Keeping the expanded copy for backward changes nothing but the work.
                let (y3, g3) = crate::recomputing(|| run(&quantized, lora));
                assert_eq!(y3.to_vec3::<f32>().unwrap(), y1.to_vec3::<f32>().unwrap());
                assert_eq!(g3.to_vec3::<f32>().unwrap(), g1.to_vec3::<f32>().unwrap());
            }
        }
    }
}
