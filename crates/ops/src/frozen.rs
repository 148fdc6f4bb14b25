//! A linear layer over a frozen weight that computes no weight gradient.
//!
//! candle's matmul backward computes the gradient of both operands, so `x @ w.t()` with a
//! frozen `w` still runs the weight-gradient GEMM and keeps a weight-sized tensor alive. Here
//! the product is computed on a detached input and re-attached to `x` through a custom op whose
//! backward returns only `grad @ w`.

use super::attach::{attach, attach3};
use candle_core::{DType, Result, Tensor};

/// `x @ weight.t()` (weight `[out, in]`) where only `x` receives a gradient.
pub fn frozen_linear(x: &Tensor, weight: &Tensor) -> Result<Tensor> {
    let y = super::linear(&x.detach(), weight)?;
    if !x.track_op() {
        return Ok(y);
    }
    let weight = weight.detach();
    attach(x, &y, "frozen-linear", move |grad| {
        let w = weight.to_dtype(grad.dtype())?;
        // grad @ w is `linear` with the weight's transpose.
        Ok(Some(super::linear(grad, &w.t()?)?))
    })
}

/// `x @ weight.t() + scale · (dropout(x) @ a.t()) @ b.t()` for a frozen `weight` `[out, in]`
/// and LoRA factors `a` `[r, in]`, `b` `[out, r]`; `mask` is the dropout mask (already scaled
/// by `1 / (1 − p)`), `None` without dropout. One graph node: its backward gives `x`, `a` and
/// `b` their gradients and keeps only the mask and the rank-sized `dropout(x) @ a.t()`, where
/// separate ops would keep the base projection, the update and their sum for every layer.
///
/// Without dropout in f32, the update folds into the weight first (`weight + scale · b @ a`,
/// rank-r work): the projection and the input gradient are then one GEMM each, where the
/// separate products cost two skinny GEMMs and a full-size add each way. That pays when `x`
/// has a gradient or as many rows as the weight's `in · out / (in + out)`; a few untracked rows
/// (a decode step) take the separate products, which are smaller than the fold. In 16 bits the
/// update stays separate, since adding it to a 16-bit weight would round most of it away.
pub fn lora_linear(
    x: &Tensor,
    weight: &Tensor,
    a: &Tensor,
    b: &Tensor,
    scale: f64,
    mask: Option<&Tensor>,
) -> Result<Tensor> {
    let (xd, w, ad) = (x.detach(), weight.detach(), a.detach());
    let b_scaled = (b.detach() * scale)?;
    let dropped = match mask {
        Some(m) => (&xd * m)?,
        None => xd.clone(),
    };
    let xa = super::linear(&dropped, &ad)?;
    let (out, inp) = w.dims2()?;
    let rows = xd.elem_count() / inp.max(1);
    let fold_pays = x.track_op() || rows * (inp + out) >= inp * out;
    let folded = match mask.is_none() && xd.dtype() == DType::F32 && fold_pays {
        true => Some((&w + b_scaled.matmul(&ad)?)?),
        false => None,
    };
    let y = match &folded {
        Some(merged) => super::linear(&xd, merged)?,
        None => (super::linear(&xd, &w)? + super::linear(&xa, &b_scaled)?)?,
    };
    if !(x.track_op() || a.track_op() || b.track_op()) {
        return Ok(y);
    }
    let mask = mask.cloned();
    let x_grad = x.track_op();
    attach3([x, a, b], &y, "lora-linear", move |grad| {
        let inp = xd.dim(xd.rank() - 1)?;
        let g = grad.reshape(((), grad.dim(grad.rank() - 1)?))?;
        let xa2 = xa.reshape(((), xa.dim(xa.rank() - 1)?))?;
        let dropped2 = dropped.reshape(((), inp))?;
        // g @ (scale · B): the gradient at the rank-r bottleneck.
        let g_r = g.matmul(&b_scaled)?;
        let db = (g.t()?.matmul(&xa2)? * scale)?;
        let da = g_r.t()?.matmul(&dropped2)?;
        let dx = match (x_grad, &folded) {
            (false, _) => None,
            (true, Some(merged)) => Some(g.matmul(merged)?.reshape(xd.dims())?),
            (true, None) => {
                let through_update = g_r.matmul(&ad)?;
                let through_update = match &mask {
                    Some(m) => (through_update * m.reshape(((), inp))?)?,
                    None => through_update,
                };
                Some((g.matmul(&w)? + through_update)?.reshape(xd.dims())?)
            }
        };
        Ok((dx, Some(da), Some(db)))
    })
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
        let y = frozen_linear(&x, &w).unwrap();
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
        let mask = (uniform(&[2, 3, 8], 5)
            .ge(-0.5)
            .unwrap()
            .to_dtype(candle_core::DType::F32))
        .unwrap()
            * 1.25;
        let mask = mask.unwrap();
        for with_mask in [false, true] {
            let m = with_mask.then(|| mask.clone());
            let m2 = m.clone();
            assert_parity(
                "lora_linear",
                &[x.clone(), w.clone(), a.clone(), b.clone()],
                &[true, false, true, true],
                move |t| super::lora_linear(&t[0], &t[1], &t[2], &t[3], 2.0, m.as_ref()),
                move |t| {
                    let dropped = match &m2 {
                        Some(m) => (&t[0] * m)?,
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
    fn untracked_rows_are_the_same_folded_or_not() {
        let (w, a, b) = (
            uniform(&[6, 8], 2),
            uniform(&[4, 8], 3),
            uniform(&[6, 4], 4),
        );
        // One row takes the separate products, 40 rows (at least 6 · 8 / 14) the fold.
        for rows in [1, 40] {
            let x = uniform(&[rows, 8], 1);
            let got = super::lora_linear(&x, &w, &a, &b, 2.0, None).unwrap();
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
