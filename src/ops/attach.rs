//! Gradient attachment: a value computed outside the autograd graph (on detached operands, in
//! chunks, or by a kernel with no backward of its own) re-enters the graph as a node whose
//! gradient to its sources is whatever a closure computes. The forward is a copy of the value.
//!
//! This is how ops avoid candle's default backward: a frozen weight gets no gradient (candle's
//! matmul backward computes both operands'), the output head's logits are recomputed in chunks
//! instead of kept, and the embedding gradient is one scatter kernel.

use candle_core::backend::{BackendDevice, BackendStorage};
use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Result, Shape, Storage, Tensor,
};
use std::sync::{Arc, Mutex};

type Backward1 = Box<dyn Fn(&Tensor) -> Result<Option<Tensor>> + Send + Sync>;
type Backward2 = Box<dyn Fn(&Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> + Send + Sync>;
/// Gradients for three sources.
pub(crate) type Grads3 = (Option<Tensor>, Option<Tensor>, Option<Tensor>);
type Backward3 = Box<dyn Fn(&Tensor) -> Result<Grads3> + Send + Sync>;

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
    let op = Attach {
        name,
        value: Pending::new(value),
        backward: Box::new(backward) as Backward1,
    };
    source.apply_op1_arc(Arc::new(Box::new(op)))
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
    let op = Attach {
        name,
        value: Pending::new(value),
        backward: Box::new(backward) as Backward2,
    };
    a.apply_op2_arc(b, Arc::new(Box::new(op)))
}

/// `value`, whose gradient flows to `a`, `b` and `c` as `backward(grad of value)`.
pub(crate) fn attach3<F>(
    sources: [&Tensor; 3],
    value: &Tensor,
    name: &'static str,
    backward: F,
) -> Result<Tensor>
where
    F: Fn(&Tensor) -> Result<Grads3> + Send + Sync + 'static,
{
    let op = Attach {
        name,
        value: Pending::new(value),
        backward: Box::new(backward) as Backward3,
    };
    let [a, b, c] = sources;
    a.apply_op3_arc(b, c, Arc::new(Box::new(op)))
}

/// The value an attach op outputs, held only until its forward has copied it: the graph keeps
/// the op (for its backward), and must not keep a second copy of the output through it.
struct Pending(Mutex<Option<Tensor>>);

impl Pending {
    fn new(value: &Tensor) -> Self {
        Self(Mutex::new(Some(value.clone())))
    }

    fn take(&self) -> Result<Tensor> {
        let taken = match self.0.lock() {
            Ok(mut guard) => guard.take(),
            Err(poisoned) => poisoned.into_inner().take(),
        };
        taken.ok_or_else(|| candle_core::Error::Msg("attach: forward ran twice".into()))
    }

    /// A contiguous copy of the value, on the backend the op runs on.
    fn copy_out<S>(&self, pick: fn(&Storage) -> Option<&S>) -> Result<(S, Shape)>
    where
        S: BackendStorage,
        S::Device: BackendDevice<Storage = S>,
    {
        let value = self.take()?;
        let (storage, layout) = value.storage_and_layout();
        let Some(storage) = pick(&storage) else {
            candle_core::bail!("attach: the value is on another device than its source");
        };
        // SAFETY: copy_strided_src writes every element of the new buffer.
        let mut out = unsafe {
            storage
                .device()
                .alloc_uninit(layout.shape(), storage.dtype())?
        };
        storage.copy_strided_src(&mut out, 0, layout)?;
        Ok((out, layout.shape().clone()))
    }
}

fn cpu(s: &Storage) -> Option<&CpuStorage> {
    match s {
        Storage::Cpu(s) => Some(s),
        _ => None,
    }
}

#[cfg(feature = "cuda")]
fn cuda(s: &Storage) -> Option<&candle_core::CudaStorage> {
    match s {
        Storage::Cuda(s) => Some(s),
        _ => None,
    }
}

#[cfg(feature = "metal")]
fn metal(s: &Storage) -> Option<&candle_core::MetalStorage> {
    match s {
        Storage::Metal(s) => Some(s),
        _ => None,
    }
}

/// An attach op over one, two or three sources (`B` is the backward closure's type).
struct Attach<B> {
    name: &'static str,
    value: Pending,
    backward: B,
}

/// The forward of an attach op on every backend, whatever its sources: the pending value,
/// copied. Takes one `storage layout` name pair per source.
macro_rules! copy_forwards {
    ($($s:ident $l:ident),+) => {
        fn cpu_fwd(&self, $($s: &CpuStorage, $l: &Layout),+) -> Result<(CpuStorage, Shape)> {
            $(let _ = ($s, $l);)+
            self.value.copy_out(cpu)
        }

        #[cfg(feature = "cuda")]
        fn cuda_fwd(
            &self,
            $($s: &candle_core::CudaStorage, $l: &Layout),+
        ) -> Result<(candle_core::CudaStorage, Shape)> {
            $(let _ = ($s, $l);)+
            self.value.copy_out(cuda)
        }

        #[cfg(feature = "metal")]
        fn metal_fwd(
            &self,
            $($s: &candle_core::MetalStorage, $l: &Layout),+
        ) -> Result<(candle_core::MetalStorage, Shape)> {
            $(let _ = ($s, $l);)+
            self.value.copy_out(metal)
        }
    };
}

impl CustomOp1 for Attach<Backward1> {
    fn name(&self) -> &'static str {
        self.name
    }

    copy_forwards!(s1 l1);

    fn bwd(&self, _: &Tensor, _: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        (self.backward)(grad)
    }
}

impl CustomOp2 for Attach<Backward2> {
    fn name(&self) -> &'static str {
        self.name
    }

    copy_forwards!(s1 l1, s2 l2);

    fn bwd(
        &self,
        _: &Tensor,
        _: &Tensor,
        _: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        (self.backward)(grad)
    }
}

impl CustomOp3 for Attach<Backward3> {
    fn name(&self) -> &'static str {
        self.name
    }

    copy_forwards!(s1 l1, s2 l2, s3 l3);

    fn bwd(&self, _: &Tensor, _: &Tensor, _: &Tensor, _: &Tensor, grad: &Tensor) -> Result<Grads3> {
        (self.backward)(grad)
    }
}
