//! A linear layer over a frozen weight that computes no weight gradient.
//!
//! candle's matmul backward computes the gradient of both operands, so `x @ w.t()` with a
//! frozen `w` still runs the weight-gradient GEMM and keeps a weight-sized tensor alive. Here
//! the product is computed on a detached input and re-attached to `x` through a custom op whose
//! backward returns only `grad @ w`.

use candle_core::backend::{BackendDevice, BackendStorage};
use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};

/// `x @ weight.t()` (weight `[out, in]`) where only `x` receives a gradient.
pub fn frozen_linear(x: &Tensor, weight: &Tensor) -> Result<Tensor> {
    let y = x.detach().broadcast_matmul(&weight.t()?)?;
    if !x.track_op() {
        return Ok(y);
    }
    x.apply_op2_arc(
        &y,
        std::sync::Arc::new(Box::new(Attach {
            weight: weight.detach(),
        })),
    )
}

struct Attach {
    weight: Tensor,
}

impl CustomOp2 for Attach {
    fn name(&self) -> &'static str {
        "frozen-linear"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        y: &CpuStorage,
        y_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        copy_out(y, y_layout)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _: &candle_core::CudaStorage,
        _: &Layout,
        y: &candle_core::CudaStorage,
        y_layout: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        copy_out(y, y_layout)
    }

    #[cfg(feature = "metal")]
    fn metal_fwd(
        &self,
        _: &candle_core::MetalStorage,
        _: &Layout,
        y: &candle_core::MetalStorage,
        y_layout: &Layout,
    ) -> Result<(candle_core::MetalStorage, Shape)> {
        copy_out(y, y_layout)
    }

    fn bwd(
        &self,
        _x: &Tensor,
        _y: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let w = self.weight.to_dtype(grad.dtype())?;
        Ok((Some(grad.broadcast_matmul(&w)?), None))
    }
}

/// A contiguous copy of `y` on its own backend: the attach op's forward is the identity on `y`.
fn copy_out<S>(y: &S, layout: &Layout) -> Result<(S, Shape)>
where
    S: BackendStorage,
    S::Device: BackendDevice<Storage = S>,
{
    let mut out = y.device().zeros_impl(layout.shape(), y.dtype())?;
    y.copy_strided_src(&mut out, 0, layout)?;
    Ok((out, layout.shape().clone()))
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
