//! Elementwise `a + b` for tensors of one shape: the residual adds of the forward pass, and the
//! sums where two gradients meet in backward (candle's gradient store adds through
//! `gradient_add` once [`install_gradient_add`] has run). Also `x · s` for a scalar tensor
//! `s`: gradients scaled by the incoming gradient of a scalar loss.
//!
//! candle's CUDA add moves one element per thread through a strided-index kernel; in bf16 that
//! ran at about 1.1 TB/s and was the largest non-GEMM kernel of a base training step (84 calls
//! per step). This one moves 16 bytes per thread (`kernels/elementwise.cu`).

use super::attach::attach2;
use super::cpu_kernel::{f32s, output, written_rows, ELEMENTWISE_CHUNK};
use super::fused_op::{custom_op, CpuOperand, CpuOutput, FusedOp};
#[cfg(feature = "cuda")]
use super::fused_op::{CudaOutput, Operand};
use candle_core::{DType, Result, Tensor};

/// `a + b`, with a backward; the fused kernel where [`super::fused`] accepts both, they have
/// one shape and are contiguous from a 16-byte boundary, candle's add elsewhere. The fused
/// sum's graph node does not keep `a` and `b` (its backward needs neither), so a branch that
/// ends here (an attention or MLP output) is freed after the forward pass.
pub fn add(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    if !applies(a, b) {
        return a + b;
    }
    let sum = a.detach().apply_op2_no_bwd(&b.detach(), &Add)?;
    if !(a.track_op() || b.track_op()) {
        return Ok(sum);
    }
    attach2(a, b, &sum, "add", |grad| {
        Ok((Some(grad.clone()), Some(grad.clone())))
    })
}

/// [`add`] without a backward: what candle's gradient store calls to sum gradients.
pub fn gradient_add(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    if !applies(a, b) {
        return a + b;
    }
    a.apply_op2_no_bwd(b, &Add)
}

/// Makes candle's backward sum gradients with `gradient_add` (once per process; later calls
/// do nothing).
pub fn install_gradient_add() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        candle_core::backprop::set_gradient_add(gradient_add);
    });
}

/// `x · factor` for a one-element f32 `factor` on `x`'s device, without reading the factor back
/// to the host; the fused kernel where [`super::fused`] accepts `x` and it is contiguous from a
/// 16-byte boundary, candle's broadcast multiply elsewhere. No backward.
pub fn scaled(x: &Tensor, factor: &Tensor) -> Result<Tensor> {
    let scalar = factor.dtype() == DType::F32 && factor.elem_count() == 1;
    let x = x.detach();
    if !(scalar && aligned(&x) && super::fused(&[&x]) && x.device().same_device(factor.device())) {
        return x.broadcast_mul(&factor.to_dtype(x.dtype())?);
    }
    x.apply_op2_no_bwd(&factor.contiguous()?, &Scale)
}

/// Contiguous from a 16-byte boundary, as the 16-bytes-a-thread kernels read their operands.
pub(crate) fn aligned(t: &Tensor) -> bool {
    t.is_contiguous() && (t.layout().start_offset() * t.dtype().size_in_bytes()) % 16 == 0
}

fn applies(a: &Tensor, b: &Tensor) -> bool {
    super::fused(&[a, b]) && a.shape() == b.shape() && aligned(a) && aligned(b)
}

struct Add;

impl FusedOp<2> for Add {
    const NAME: &'static str = "add";

    fn cpu(&self, [(a, a_layout), (b, b_layout)]: [CpuOperand; 2]) -> CpuOutput {
        let (a, b) = (f32s(a, a_layout)?, f32s(b, b_layout)?);
        if a.len() != b.len() {
            candle_core::bail!("add: operands of {} and {} elements", a.len(), b.len());
        }
        // SAFETY: every element of each chunk is written.
        let sum = unsafe {
            written_rows(a.len(), ELEMENTWISE_CHUNK, |chunk, s| {
                let start = chunk * ELEMENTWISE_CHUNK;
                let (a, b) = (&a[start..][..s.len()], &b[start..][..s.len()]);
                for ((s, &a), &b) in s.iter_mut().zip(a).zip(b) {
                    s.write(a + b);
                }
            })
        };
        Ok(output(sum, a_layout.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda(&self, [a, b]: [Operand; 2]) -> CudaOutput {
        Ok((cuda::add(a, b)?, a.1.shape().clone()))
    }
}

custom_op!(Add: 2);

struct Scale;

impl FusedOp<2> for Scale {
    const NAME: &'static str = "scale";

    fn cpu(&self, [(x, x_layout), (factor, factor_layout)]: [CpuOperand; 2]) -> CpuOutput {
        let x = f32s(x, x_layout)?;
        let &[f] = f32s(factor, factor_layout)? else {
            candle_core::bail!("scale: the factor must have one element");
        };
        // SAFETY: every element of each chunk is written.
        let out = unsafe {
            written_rows(x.len(), ELEMENTWISE_CHUNK, |chunk, o| {
                let x = &x[chunk * ELEMENTWISE_CHUNK..][..o.len()];
                o.iter_mut().zip(x).for_each(|(o, &x)| {
                    o.write(x * f);
                });
            })
        };
        Ok(output(out, x_layout.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda(&self, [x, factor]: [Operand; 2]) -> CudaOutput {
        Ok((cuda::scale(x, factor)?, x.1.shape().clone()))
    }
}

custom_op!(Scale: 2);

/// The CUDA launchers (`kernels/elementwise.cu`).
#[cfg(feature = "cuda")]
mod cuda {
    use crate::launch::{
        alloc, common_dtype, per_element, run, same_count, start_aligned, Arg, Operand,
    };
    use candle_core::backend::BackendStorage;
    use candle_core::{CudaStorage, DType, Result};

    /// `a + b` for contiguous, 16-byte aligned operands of one dtype and size.
    pub(super) fn add(a: Operand, b: Operand) -> Result<CudaStorage> {
        let n = same_count(a, b)?;
        run_wide("add_vec", &[a, b], &[a, b], n)
    }

    /// `x · s` for a contiguous, 16-byte aligned `x` and a one-element f32 `s`.
    pub(super) fn scale(x: Operand, s: Operand) -> Result<CudaStorage> {
        if s.0.dtype() != DType::F32 || s.1.shape().elem_count() != 1 {
            candle_core::bail!("scale: factor of {:?} {:?}", s.0.dtype(), s.1.shape());
        }
        run_wide("scale_vec", &[x, s], &[x], x.1.shape().elem_count())
    }

    /// Runs an elementwise kernel that moves 16 bytes per thread over `n` elements of the first
    /// input's dtype (the tail by the last thread), after checking that `aligned` start on a
    /// 16-byte boundary.
    fn run_wide(
        name: &str,
        inputs: &[Operand],
        aligned: &[Operand],
        n: usize,
    ) -> Result<CudaStorage> {
        let dtype = common_dtype(&inputs[..1])?;
        if !start_aligned(aligned)? {
            candle_core::bail!("{name}: operands must start on a 16-byte boundary");
        }
        let out = alloc(&inputs[0].0.device, dtype, n)?;
        let vectors = n.div_ceil(16 / dtype.size_in_bytes());
        let scalars = [Arg::Count(n as u64)];
        run((name, dtype), per_element(vectors)?, inputs, out, &scalars)
    }
}

#[cfg(test)]
mod tests {
    use crate::parity::{assert_parity, uniform};

    #[test]
    fn matches_candles_add_forward_and_backward() {
        assert_parity(
            "add",
            &[uniform(&[3, 70_000], 1), uniform(&[3, 70_000], 2)],
            &[true, true],
            |t| super::add(&t[0], &t[1]),
            |t| &t[0] + &t[1],
            1e-7,
        );
    }

    #[test]
    fn scaling_by_a_scalar_tensor_matches_broadcast_multiply() {
        let x = uniform(&[3, 1000], 4);
        let factor = candle_core::Tensor::new(-2.5f32, x.device()).unwrap();
        let want = x.broadcast_mul(&factor).unwrap();
        let got = super::scaled(&x, &factor).unwrap();
        assert_eq!(crate::parity::relative_error(&got, &want), 0.0);
    }

    #[test]
    fn gradients_summed_by_the_installed_add_are_right() {
        super::install_gradient_add();
        let x = candle_core::Var::from_tensor(&uniform(&[5, 7], 3)).unwrap();
        // x is used three times, so its gradient is a sum.
        let y = ((x.as_tensor() * 2.0).unwrap() + x.as_tensor().sqr().unwrap()).unwrap();
        let y = (y + x.as_tensor()).unwrap();
        let g = y.sum_all().unwrap().backward().unwrap();
        let want = ((x.as_tensor() * 2.0).unwrap() + 3.0).unwrap();
        let err = crate::parity::relative_error(g.get(&x).unwrap(), &want);
        assert!(err < 1e-7, "{err}");
    }
}
