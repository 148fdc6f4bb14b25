//! A linear layer over a frozen weight that computes no weight gradient.
//!
//! candle's matmul backward computes the gradient of both operands, so `x @ w.t()` with a
//! frozen `w` still runs the weight-gradient GEMM and keeps a weight-sized tensor alive. Here
//! the product is computed on a detached input and re-attached to `x` through a custom op whose
//! backward returns only `grad @ w`.

use super::attach::attach;
use candle_core::{Result, Tensor};

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
