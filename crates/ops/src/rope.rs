//! Rotary position embedding (Hugging Face rotate-half layout): its dispatch, composite
//! reference, and fused kernels on the CPU and on CUDA (`kernels/rope_kv.cu`). The backward of a
//! rotation by θ is the rotation by −θ, so one kernel does both directions.

use super::attach::attach;
use super::cpu_kernel::{f32s, output, written_rows};
use super::fused_op::{custom_op, CpuOperand, CpuOutput, FusedOp};
#[cfg(feature = "cuda")]
use super::fused_op::{CudaOutput, Operand};
use super::reference::rotate_half;
use candle_core::{Result, Tensor, D};

/// Rotary position embedding in the Hugging Face rotate-half layout. `x` is
/// `[batch, heads, seq, head_dim]`; `cos`/`sin` are `[seq, head_dim / 2]` for these positions.
/// Fused where [`super::fused`] accepts the operands and [`supports`] their shapes, else the
/// [`reference`].
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    if super::fused(&[x, cos, sin]) && supports(x, cos, sin) {
        return fused_rope(&x.contiguous()?, &cos.contiguous()?, &sin.contiguous()?);
    }
    reference(x, cos, sin)
}

/// [`rope`] from candle's differentiable ops, any backend and dtype.
pub fn reference(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let (_, _, seq, _) = x.dims4()?;
    let table = |half: &Tensor| -> Result<Tensor> {
        Tensor::cat(&[half, half], D::Minus1)?
            .narrow(0, 0, seq)?
            .unsqueeze(0)?
            .unsqueeze(0)
    };
    x.broadcast_mul(&table(cos)?)? + rotate_half(x)?.broadcast_mul(&table(sin)?)?
}

/// Whether the fused kernel handles these shapes: `x` `[b, h, t, d]` with even `d`, tables
/// `[t, d / 2]`. Others (e.g. batched tables) take the composite path.
pub(crate) fn supports(x: &Tensor, cos: &Tensor, sin: &Tensor) -> bool {
    match (x.dims4(), cos.dims2()) {
        (Ok((_, _, t, d)), Ok(table)) => {
            d % 2 == 0 && table == (t, d / 2) && sin.dims() == cos.dims()
        }
        _ => false,
    }
}

/// The fused [`rope`]: inputs must be contiguous tensors that [`supports`], on a backend
/// [`super::fused`] accepts. The graph node keeps only the tables: its backward (the inverse
/// rotation) does not read `x`.
pub(crate) fn fused_rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let y = rotate(&x.detach(), cos, sin, false)?;
    if !x.track_op() {
        return Ok(y);
    }
    let (cos, sin) = (cos.detach(), sin.detach());
    attach(x, &y, "rope", move |grad| {
        Ok(Some(rotate(&grad.contiguous()?, &cos, &sin, true)?))
    })
}

/// `x` rotated by θ (or by −θ with `inverse`), outside the autograd graph.
fn rotate(x: &Tensor, cos: &Tensor, sin: &Tensor, inverse: bool) -> Result<Tensor> {
    x.apply_op3_no_bwd(cos, sin, &Rope { inverse })
}

struct Rope {
    /// Rotate by −θ (the backward pass) instead of θ.
    inverse: bool,
}

impl FusedOp<3> for Rope {
    const NAME: &'static str = "rope";

    fn cpu(
        &self,
        [(x, x_layout), (cos, cos_layout), (sin, sin_layout)]: [CpuOperand; 3],
    ) -> CpuOutput {
        let x_values = f32s(x, x_layout)?;
        let (cos, sin) = (f32s(cos, cos_layout)?, f32s(sin, sin_layout)?);
        let d = *x_layout.dims().last().unwrap_or(&0);
        let half = d / 2;
        if d % 2 != 0 || half == 0 || cos.len() % half != 0 || sin.len() != cos.len() {
            candle_core::bail!("rope: tables of {} for head size {d}", cos.len());
        }
        let seq = cos.len() / half;
        let sign = if self.inverse { -1.0 } else { 1.0 };
        // SAFETY: rows are d = 2 · half long, and both halves are written in full.
        let y = unsafe {
            written_rows(x_values.len(), d, |row, y| {
                let x = &x_values[row * d..][..d];
                let pos = row % seq;
                let (c, s) = (&cos[pos * half..][..half], &sin[pos * half..][..half]);
                let (x1, x2) = x.split_at(half);
                let (y1, y2) = y.split_at_mut(half);
                for j in 0..half {
                    let s = sign * s[j];
                    y1[j].write(x1[j] * c[j] - x2[j] * s);
                    y2[j].write(x2[j] * c[j] + x1[j] * s);
                }
            })
        };
        Ok(output(y, x_layout.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda(&self, [x, cos, sin]: [Operand; 3]) -> CudaOutput {
        let sign = if self.inverse { -1.0 } else { 1.0 };
        let y = cuda::rope(x, (cos, sin), 1, sign)?;
        Ok((y, x.1.shape().clone()))
    }
}

custom_op!(Rope: 3);

/// The CUDA launcher (`kernels/rope_kv.cu`), also for the projections' rows of
/// `attention/flash.rs`.
#[cfg(feature = "cuda")]
pub(crate) mod cuda {
    use crate::launch::{
        alloc, common_dtype, elementwise_kernel, int, per_element, run, Arg, Operand,
    };
    use crate::rows_and_width;
    use candle_core::{CudaStorage, Result};

    /// RoPE (`sign` 1) or its gradient (`sign` -1) for `x` `[.., seq, heads, d]` (`heads` 1 for
    /// `[.., seq, d]`) and tables `[seq, d/2]`.
    pub(crate) fn rope(
        x: Operand,
        (cos, sin): (Operand, Operand),
        heads: usize,
        sign: f32,
    ) -> Result<CudaStorage> {
        let dtype = common_dtype(&[x, cos, sin])?;
        let (rows, d) = rows_and_width(x.1)?;
        let half = d / 2;
        let table = cos.1.shape().elem_count();
        if half == 0 || d % 2 != 0 || table % half != 0 || sin.1.shape().elem_count() != table {
            candle_core::bail!("rope: tables of {table} for head size {d}");
        }
        let y = alloc(&x.0.device, dtype, rows * d)?;
        let scalars = [
            int(rows)?,
            int(d)?,
            int(table / half)?,
            int(heads)?,
            Arg::Float(sign),
        ];
        let (name, width) = elementwise_kernel(("rope", "rope_wide"), &[x, cos, sin], half)?;
        run(
            (name, dtype),
            per_element(rows * half / width)?,
            &[x, cos, sin],
            y,
            &scalars,
        )
    }
}

#[cfg(test)]
mod tests {
    use crate::parity::{assert_parity, uniform};

    #[test]
    fn matches_the_reference_forward_and_backward() {
        for (i, &(b, h, t, d)) in [
            (1, 1, 1, 2),
            (2, 3, 5, 8),
            (1, 2, 7, 6),
            (3, 1, 4, 64),
            (2, 4, 40, 64),
        ]
        .iter()
        .enumerate()
        {
            let s = 10 * i as u64;
            let angles = (uniform(&[t, d / 2], s) * 3.0).unwrap();
            let inputs = [
                uniform(&[b, h, t, d], s + 1),
                angles.cos().unwrap(),
                angles.sin().unwrap(),
            ];
            assert!(super::supports(&inputs[0], &inputs[1], &inputs[2]));
            assert_parity(
                "rope",
                &inputs,
                &[true, false, false],
                |t| super::fused_rope(&t[0], &t[1], &t[2]),
                |t| super::reference(&t[0], &t[1], &t[2]),
                1e-5,
            );
        }
    }
}
