//! Gradient attachment: a value computed outside the autograd graph (on detached operands, in
//! chunks, or by a kernel with no backward of its own) re-enters the graph as a node whose
//! gradient to its sources is whatever a closure computes. The forward is a copy of the value.
//!
//! This is how ops avoid candle's default backward: a frozen weight gets no gradient (candle's
//! matmul backward computes both operands'), the output head's logits are recomputed in chunks
//! instead of kept, and the embedding gradient is one scatter kernel.

use candle_core::backend::{BackendDevice, BackendStorage};
use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};
use std::sync::Arc;

type Backward1 = Box<dyn Fn(&Tensor) -> Result<Option<Tensor>> + Send + Sync>;
type Backward2 = Box<dyn Fn(&Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> + Send + Sync>;

/// `value`, whose gradient flows to `source` as `backward(grad of value)`.
pub(crate) fn attach<F>(
    source: &Tensor,
    value: &Tensor,
    name: &'static str,
    backward: F,
) -> Result<Tensor>
where
    F: Fn(&Tensor) -> Result<Option<Tensor>> + Send + Sync + 'static,
{
    let op = Attach1 {
        name,
        backward: Box::new(backward),
    };
    source.apply_op2_arc(value, Arc::new(Box::new(op)))
}

/// `value`, whose gradient flows to `a` and `b` as `backward(grad of value)`.
pub(crate) fn attach2<F>(
    a: &Tensor,
    b: &Tensor,
    value: &Tensor,
    name: &'static str,
    backward: F,
) -> Result<Tensor>
where
    F: Fn(&Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> + Send + Sync + 'static,
{
    let op = Attach2 {
        name,
        backward: Box::new(backward),
    };
    a.apply_op3_arc(b, value, Arc::new(Box::new(op)))
}

/// A contiguous copy of `value` on its own backend.
fn copy_out<S>(value: &S, layout: &Layout) -> Result<(S, Shape)>
where
    S: BackendStorage,
    S::Device: BackendDevice<Storage = S>,
{
    // SAFETY: copy_strided_src writes every element of the new buffer.
    let mut out = unsafe { value.device().alloc_uninit(layout.shape(), value.dtype())? };
    value.copy_strided_src(&mut out, 0, layout)?;
    Ok((out, layout.shape().clone()))
}

struct Attach1 {
    name: &'static str,
    backward: Backward1,
}

impl CustomOp2 for Attach1 {
    fn name(&self) -> &'static str {
        self.name
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        v: &CpuStorage,
        l: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        copy_out(v, l)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _: &candle_core::CudaStorage,
        _: &Layout,
        v: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        copy_out(v, l)
    }

    #[cfg(feature = "metal")]
    fn metal_fwd(
        &self,
        _: &candle_core::MetalStorage,
        _: &Layout,
        v: &candle_core::MetalStorage,
        l: &Layout,
    ) -> Result<(candle_core::MetalStorage, Shape)> {
        copy_out(v, l)
    }

    fn bwd(
        &self,
        _: &Tensor,
        _: &Tensor,
        _: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        Ok(((self.backward)(grad)?, None))
    }
}

struct Attach2 {
    name: &'static str,
    backward: Backward2,
}

impl CustomOp3 for Attach2 {
    fn name(&self) -> &'static str {
        self.name
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        v: &CpuStorage,
        l: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        copy_out(v, l)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _: &candle_core::CudaStorage,
        _: &Layout,
        _: &candle_core::CudaStorage,
        _: &Layout,
        v: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        copy_out(v, l)
    }

    #[cfg(feature = "metal")]
    fn metal_fwd(
        &self,
        _: &candle_core::MetalStorage,
        _: &Layout,
        _: &candle_core::MetalStorage,
        _: &Layout,
        v: &candle_core::MetalStorage,
        l: &Layout,
    ) -> Result<(candle_core::MetalStorage, Shape)> {
        copy_out(v, l)
    }

    fn bwd(
        &self,
        _: &Tensor,
        _: &Tensor,
        _: &Tensor,
        _: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (a, b) = (self.backward)(grad)?;
        Ok((a, b, None))
    }
}
