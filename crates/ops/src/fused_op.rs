//! The shape every fused custom op shares. candle's `CustomOp1`, `CustomOp2` and `CustomOp3`
//! spell out each operand's storage and layout as separate arguments, once for the CPU and once
//! for CUDA, and return gradients as a tuple of the arity. A fused op here implements
//! [`FusedOp`] instead: its CPU kernel and its CUDA launcher over arrays of `(storage, layout)`
//! operands, and where it has one, a backward over an array of inputs. [`custom_op!`] then
//! implements candle's trait of that arity for it, so every op writes its kernels and none of
//! the per-arity plumbing.
//!
//! Ops whose shape differs keep candle's traits: the in-place writes (`kv_write.rs`,
//! `graph.rs`) and the attach nodes (`attach.rs`, which have no forward).

#[cfg(feature = "cuda")]
pub(crate) use super::launch::Operand;
#[cfg(feature = "cuda")]
use candle_core::CudaStorage;
use candle_core::{CpuStorage, Layout, Result, Shape, Tensor};

/// A CPU operand: a storage and the layout the op received it with.
pub(crate) type CpuOperand<'a> = (&'a CpuStorage, &'a Layout);

/// What a CPU kernel returns: its output and the output's shape.
pub(crate) type CpuOutput = Result<(CpuStorage, Shape)>;

/// What a CUDA launcher returns: its output and the output's shape.
#[cfg(feature = "cuda")]
pub(crate) type CudaOutput = Result<(CudaStorage, Shape)>;

/// A fused op of `N` operands (1 to 3), made a candle custom op by [`custom_op!`].
pub(crate) trait FusedOp<const N: usize> {
    /// The op's name in candle's errors.
    const NAME: &'static str;

    /// [`Self::NAME`], unless the op's name depends on its parameters.
    fn name(&self) -> &'static str {
        Self::NAME
    }

    /// The CPU kernel: the output and its shape.
    fn cpu(&self, operands: [CpuOperand; N]) -> CpuOutput;

    /// The CUDA launcher: the output and its shape.
    #[cfg(feature = "cuda")]
    fn cuda(&self, operands: [Operand; N]) -> CudaOutput;

    /// The gradients of the inputs (`None` for one that gets none) for the output `output` and
    /// its gradient `grad`. By default there is no backward, as in candle's traits.
    fn backward(
        &self,
        inputs: [&Tensor; N],
        output: &Tensor,
        grad: &Tensor,
    ) -> Result<[Option<Tensor>; N]> {
        let _ = (inputs, output, grad);
        Err(candle_core::Error::BackwardNotSupported { op: self.name() })
    }

    /// The gradients of the inputs given the gradient each already holds in the store (`held`,
    /// `None` where none has arrived): `Some` gradients include the held ones and replace them
    /// (an op that writes `held + its gradient` in one pass saves the add that would sum them).
    /// By default `None`: [`Self::backward`] runs and the store adds. Offered to ops of two
    /// operands, the arity whose candle trait has `bwd_onto` (vendor/README.md).
    fn backward_onto(
        &self,
        inputs: [&Tensor; N],
        output: &Tensor,
        grad: &Tensor,
        held: [Option<&Tensor>; N],
    ) -> Result<Option<[Option<Tensor>; N]>> {
        let _ = (inputs, output, grad, held);
        Ok(None)
    }
}

/// `custom_op!(Op: N)` implements candle's `CustomOpN` for a type that implements
/// [`FusedOp<N>`](FusedOp), forwarding each method.
macro_rules! custom_op {
    (
        @impl $op:ty, $n:literal, $custom:ident, $tuple:ident, [$($s:ident $l:ident $a:ident),+]
        $($more:tt)*
    ) => {
        impl candle_core::$custom for $op {
            fn name(&self) -> &'static str {
                $crate::fused_op::FusedOp::<$n>::name(self)
            }

            fn cpu_fwd(
                &self,
                $($s: &candle_core::CpuStorage, $l: &candle_core::Layout),+
            ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
                $crate::fused_op::FusedOp::<$n>::cpu(self, [$(($s, $l)),+])
            }

            #[cfg(feature = "cuda")]
            fn cuda_fwd(
                &self,
                $($s: &candle_core::CudaStorage, $l: &candle_core::Layout),+
            ) -> candle_core::Result<(candle_core::CudaStorage, candle_core::Shape)> {
                $crate::fused_op::FusedOp::<$n>::cuda(self, [$(($s, $l)),+])
            }

            fn bwd(
                &self,
                $($a: &candle_core::Tensor,)+
                output: &candle_core::Tensor,
                grad: &candle_core::Tensor,
            ) -> candle_core::Result<$crate::fused_op::$tuple> {
                let inputs = [$($a),+];
                let grads = $crate::fused_op::FusedOp::<$n>::backward(self, inputs, output, grad)?;
                Ok($crate::fused_op::Tuple::tuple(grads))
            }

            $($more)*
        }
    };
    ($op:ty: 1) => {
        $crate::fused_op::custom_op!(@impl $op, 1, CustomOp1, Grads1, [s1 l1 a1]);
    };
    ($op:ty: 2) => {
        $crate::fused_op::custom_op!(
            @impl $op, 2, CustomOp2, Grads2, [s1 l1 a1, s2 l2 a2]
            fn bwd_onto(
                &self,
                a1: &candle_core::Tensor,
                a2: &candle_core::Tensor,
                output: &candle_core::Tensor,
                grad: &candle_core::Tensor,
                held: [Option<&candle_core::Tensor>; 2],
            ) -> candle_core::Result<Option<$crate::fused_op::Grads2>> {
                let grads = $crate::fused_op::FusedOp::<2>::backward_onto(
                    self, [a1, a2], output, grad, held
                )?;
                Ok(grads.map($crate::fused_op::Tuple::tuple))
            }
        );
    };
    ($op:ty: 3) => {
        $crate::fused_op::custom_op!(
            @impl $op, 3, CustomOp3, Grads3, [s1 l1 a1, s2 l2 a2, s3 l3 a3]
        );
    };
}
pub(crate) use custom_op;

/// The gradients candle's `CustomOp1::bwd` returns.
pub(crate) type Grads1 = Option<Tensor>;
/// The gradients candle's `CustomOp2::bwd` returns.
pub(crate) type Grads2 = (Option<Tensor>, Option<Tensor>);
/// The gradients candle's `CustomOp3::bwd` returns.
pub(crate) type Grads3 = (Option<Tensor>, Option<Tensor>, Option<Tensor>);

/// An array of gradients as the tuple candle's traits return.
pub(crate) trait Tuple<T> {
    fn tuple(self) -> T;
}

impl Tuple<Grads1> for [Option<Tensor>; 1] {
    fn tuple(self) -> Grads1 {
        let [a] = self;
        a
    }
}

impl Tuple<Grads2> for [Option<Tensor>; 2] {
    fn tuple(self) -> Grads2 {
        let [a, b] = self;
        (a, b)
    }
}

impl Tuple<Grads3> for [Option<Tensor>; 3] {
    fn tuple(self) -> Grads3 {
        let [a, b, c] = self;
        (a, b, c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{CustomOp1, Device};

    /// Doubles its operand on the CPU; no backward.
    struct Double;

    impl FusedOp<1> for Double {
        const NAME: &'static str = "double";

        fn cpu(&self, [(x, layout)]: [CpuOperand; 1]) -> CpuOutput {
            let x = crate::cpu_kernel::f32s(x, layout)?;
            let y = x.iter().map(|v| 2.0 * v).collect();
            Ok(crate::cpu_kernel::output(y, layout.shape().clone()))
        }

        #[cfg(feature = "cuda")]
        fn cuda(&self, _: [Operand; 1]) -> CudaOutput {
            candle_core::bail!("double: CPU only")
        }
    }

    custom_op!(Double: 1);

    /// `a ⊙ b` on the CPU, whose backward writes `a`'s gradient onto a held one and counts
    /// the calls that were offered one.
    struct Product;

    static OFFERED: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

    impl FusedOp<2> for Product {
        const NAME: &'static str = "product";

        fn cpu(&self, [(a, la), (b, lb)]: [CpuOperand; 2]) -> CpuOutput {
            let (a, b) = (
                crate::cpu_kernel::f32s(a, la)?,
                crate::cpu_kernel::f32s(b, lb)?,
            );
            let y = a.iter().zip(b).map(|(a, b)| a * b).collect();
            Ok(crate::cpu_kernel::output(y, la.shape().clone()))
        }

        #[cfg(feature = "cuda")]
        fn cuda(&self, _: [Operand; 2]) -> CudaOutput {
            candle_core::bail!("product: CPU only")
        }

        fn backward(
            &self,
            [a, b]: [&Tensor; 2],
            _: &Tensor,
            g: &Tensor,
        ) -> Result<[Option<Tensor>; 2]> {
            Ok([Some((g * b.detach())?), Some((g * a.detach())?)])
        }

        fn backward_onto(
            &self,
            [a, b]: [&Tensor; 2],
            _: &Tensor,
            g: &Tensor,
            held: [Option<&Tensor>; 2],
        ) -> Result<Option<[Option<Tensor>; 2]>> {
            let [Some(held_a), None] = held else {
                return Ok(None);
            };
            OFFERED.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let da = (held_a + (g * b.detach())?)?;
            Ok(Some([Some(da), Some((g * a.detach())?)]))
        }
    }

    custom_op!(Product: 2);

    #[test]
    fn a_gradient_written_onto_the_held_one_replaces_it() {
        let dev = &Device::Cpu;
        let x = candle_core::Var::new(&[1f32, -2.0, 3.0], dev).unwrap();
        let w = candle_core::Var::new(&[0.5f32, 4.0, -1.0], dev).unwrap();
        // y = x + x ⊙ w: the residual path's gradient (ones) reaches x before the product's.
        let before = OFFERED.load(std::sync::atomic::Ordering::SeqCst);
        let y = (x.as_tensor() + x.apply_op2(&w, Product).unwrap()).unwrap();
        let grads = y.sum_all().unwrap().backward().unwrap();
        assert_eq!(
            OFFERED.load(std::sync::atomic::Ordering::SeqCst),
            before + 1
        );
        let dx = grads.get(&x).unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(dx, [1.5, 5.0, 0.0]);
        let dw = grads.get(&w).unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(dw, [1.0, -2.0, 3.0]);
        // One tensor as both operands is offered nothing: y = x ⊙ x + x, dy/dx = 2x + 1.
        let y = (x.apply_op2(x.as_tensor(), Product).unwrap() + x.as_tensor()).unwrap();
        let grads = y.sum_all().unwrap().backward().unwrap();
        let dx = grads.get(&x).unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(dx, [3.0, -3.0, 7.0]);
    }

    #[test]
    fn forwards_to_the_kernel_and_has_no_backward_by_default() {
        let x = Tensor::new(&[1f32, -2.5], &Device::Cpu).unwrap();
        let y = x.apply_op1_no_bwd(&Double).unwrap();
        assert_eq!(y.to_vec1::<f32>().unwrap(), [2.0, -5.0]);
        assert_eq!(CustomOp1::name(&Double), "double");
        let err = CustomOp1::bwd(&Double, &x, &y, &y).unwrap_err();
        assert!(err.to_string().contains("double"), "{err}");
    }
}
