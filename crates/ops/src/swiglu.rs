//! Fused SwiGLU on the CPU and on CUDA: `silu(gate) · up` in one elementwise pass, and both
//! gradients in one pass that writes them side by side (the op returns one tensor, so
//! `[2, ..]`, split by views). The packed form takes one projection `[.., 2 · width]` whose rows
//! hold the gate, then the up half (a stacked gate/up projection), and its gradient is one
//! tensor of the same layout, so the projection's backward gets one gradient and no sum.

use super::cpu_kernel::{f32s, output, written_row_pairs, written_rows, ELEMENTWISE_CHUNK};
#[cfg(feature = "cuda")]
use super::cuda;
#[cfg(feature = "cuda")]
use candle_core::CudaStorage;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};

/// `silu(gate) * up`. Same contract as [`super::reference::swiglu`]; inputs must be contiguous
/// tensors of one shape on a backend [`super::fused`] accepts.
pub(crate) fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    gate.apply_op2(up, SwiGlu)
}

/// `silu(gate) · up` for the packed projection `h` `[.., 2 · width]` (each row: gate, then up),
/// `[.., width]`; `h` contiguous on a backend [`super::fused`] accepts.
pub(crate) fn swiglu_packed(h: &Tensor) -> Result<Tensor> {
    h.apply_op1(SwiGluPacked)
}

/// The logistic function.
pub(super) fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + super::fast_exp::exp(-x))
}

fn same_len(a: &[f32], b: &[f32]) -> Result<()> {
    if a.len() != b.len() {
        candle_core::bail!("swiglu: gate of {} and up of {} elements", a.len(), b.len());
    }
    Ok(())
}

struct SwiGlu;

impl CustomOp2 for SwiGlu {
    fn name(&self) -> &'static str {
        "swiglu"
    }

    fn cpu_fwd(
        &self,
        gate: &CpuStorage,
        gate_layout: &Layout,
        up: &CpuStorage,
        up_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (gate, up) = (f32s(gate, gate_layout)?, f32s(up, up_layout)?);
        same_len(gate, up)?;
        // SAFETY: every element of each chunk is written.
        let y = unsafe {
            written_rows(gate.len(), ELEMENTWISE_CHUNK, |chunk, y| {
                let start = chunk * ELEMENTWISE_CHUNK;
                let (g, u) = (&gate[start..][..y.len()], &up[start..][..y.len()]);
                for ((y, &g), &u) in y.iter_mut().zip(g).zip(u) {
                    y.write(g * sigmoid(g) * u);
                }
            })
        };
        Ok(output(y, gate_layout.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        gate: &CudaStorage,
        gate_layout: &Layout,
        up: &CudaStorage,
        up_layout: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let y = cuda::swiglu((gate, gate_layout), (up, up_layout))?;
        Ok((y, gate_layout.shape().clone()))
    }

    fn bwd(
        &self,
        gate: &Tensor,
        up: &Tensor,
        _y: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let both = gate
            .detach()
            .apply_op3(&up.detach(), &grad.contiguous()?, SwiGluGrad)?;
        // candle stores whatever gradient is returned: a frozen operand must get `None`.
        let d_gate = gate.track_op().then(|| both.get(0)).transpose()?;
        let d_up = up.track_op().then(|| both.get(1)).transpose()?;
        Ok((d_gate, d_up))
    }
}

/// `[d gate, d up]` stacked on a new leading dimension:
/// `d gate = g · up · σ(gate) · (1 + gate · (1 − σ(gate)))`, `d up = g · silu(gate)`.
struct SwiGluGrad;

impl CustomOp3 for SwiGluGrad {
    fn name(&self) -> &'static str {
        "swiglu-grad"
    }

    fn cpu_fwd(
        &self,
        gate: &CpuStorage,
        gate_layout: &Layout,
        up: &CpuStorage,
        up_layout: &Layout,
        grad: &CpuStorage,
        grad_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (gate, up) = (f32s(gate, gate_layout)?, f32s(up, up_layout)?);
        let grad = f32s(grad, grad_layout)?;
        same_len(gate, up)?;
        same_len(gate, grad)?;
        // SAFETY: every element of both chunks is written.
        let out = unsafe {
            written_row_pairs(gate.len(), ELEMENTWISE_CHUNK, |chunk, d_gate, d_up| {
                let start = chunk * ELEMENTWISE_CHUNK;
                let len = d_gate.len();
                let (g, u, dy) = (
                    &gate[start..][..len],
                    &up[start..][..len],
                    &grad[start..][..len],
                );
                for i in 0..len {
                    let s = sigmoid(g[i]);
                    d_up[i].write(dy[i] * g[i] * s);
                    d_gate[i].write(dy[i] * u[i] * s * (1.0 + g[i] * (1.0 - s)));
                }
            })
        };
        Ok(output(out, stacked_shape(gate_layout)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        gate: &CudaStorage,
        gate_layout: &Layout,
        up: &CudaStorage,
        up_layout: &Layout,
        grad: &CudaStorage,
        grad_layout: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let out = cuda::swiglu_grad((gate, gate_layout), (up, up_layout), (grad, grad_layout))?;
        Ok((out, stacked_shape(gate_layout).into()))
    }
}

/// Rows and half width of a packed projection.
fn packed_rows(layout: &Layout) -> Result<(usize, usize)> {
    let (rows, two_width) = super::rows_and_width(layout)?;
    if two_width % 2 != 0 {
        candle_core::bail!("swiglu: packed rows of odd width {two_width}");
    }
    Ok((rows, two_width / 2))
}

/// `h`'s dims with the last halved: the output of a packed SwiGLU.
fn half_shape(layout: &Layout) -> Shape {
    let mut dims = layout.dims().to_vec();
    if let Some(last) = dims.last_mut() {
        *last /= 2;
    }
    dims.into()
}

struct SwiGluPacked;

impl CustomOp1 for SwiGluPacked {
    fn name(&self) -> &'static str {
        "swiglu-packed"
    }

    fn cpu_fwd(&self, h: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let h = f32s(h, layout)?;
        let (rows, width) = packed_rows(layout)?;
        // SAFETY: every element of each row is written.
        let y = unsafe {
            written_rows(rows * width, width.max(1), |row, y| {
                let (gate, up) = h[row * 2 * width..][..2 * width].split_at(width);
                for ((y, &g), &u) in y.iter_mut().zip(gate).zip(up) {
                    y.write(g * sigmoid(g) * u);
                }
            })
        };
        Ok(output(y, half_shape(layout)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, h: &CudaStorage, layout: &Layout) -> Result<(CudaStorage, Shape)> {
        Ok((cuda::swiglu_packed((h, layout))?, half_shape(layout)))
    }

    fn bwd(&self, h: &Tensor, _y: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(
            h.detach()
                .apply_op2(&grad.contiguous()?, SwiGluPackedGrad)?,
        ))
    }
}

/// The gradient of a packed SwiGLU, laid out like its input: each row d gate, then d up.
struct SwiGluPackedGrad;

impl CustomOp2 for SwiGluPackedGrad {
    fn name(&self) -> &'static str {
        "swiglu-packed-grad"
    }

    fn cpu_fwd(
        &self,
        h: &CpuStorage,
        h_layout: &Layout,
        grad: &CpuStorage,
        grad_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (h, grad) = (f32s(h, h_layout)?, f32s(grad, grad_layout)?);
        let (rows, width) = packed_rows(h_layout)?;
        if grad.len() != rows * width {
            candle_core::bail!(
                "swiglu: a gradient of {} elements for {rows} packed rows of {width}",
                grad.len()
            );
        }
        // SAFETY: every element of each packed row is written.
        let out = unsafe {
            written_rows(2 * rows * width, 2 * width.max(1), |row, out| {
                let (gate, up) = h[row * 2 * width..][..2 * width].split_at(width);
                let dy = &grad[row * width..][..width];
                let (d_gate, d_up) = out.split_at_mut(width);
                for i in 0..width {
                    let s = sigmoid(gate[i]);
                    d_up[i].write(dy[i] * gate[i] * s);
                    d_gate[i].write(dy[i] * up[i] * s * (1.0 + gate[i] * (1.0 - s)));
                }
            })
        };
        Ok(output(out, h_layout.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        h: &CudaStorage,
        h_layout: &Layout,
        grad: &CudaStorage,
        grad_layout: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let out = cuda::swiglu_packed_grad((h, h_layout), (grad, grad_layout))?;
        Ok((out, h_layout.shape().clone()))
    }
}

/// `[2, ..gate's dims]`: the two gradients stacked.
fn stacked_shape(gate_layout: &Layout) -> Vec<usize> {
    let mut dims = vec![2];
    dims.extend_from_slice(gate_layout.dims());
    dims
}

#[cfg(test)]
mod tests {
    use crate::parity::{assert_parity, uniform};
    use crate::reference;

    #[test]
    fn matches_the_reference_forward_and_backward() {
        for (i, shape) in [vec![1], vec![3, 5, 7], vec![2, 20000]].iter().enumerate() {
            let s = 10 * i as u64;
            let inputs = [(uniform(shape, s) * 4.0).unwrap(), uniform(shape, s + 1)];
            assert_parity(
                "swiglu",
                &inputs,
                &[true, true],
                |t| super::swiglu(&t[0], &t[1]),
                |t| reference::swiglu(&t[0], &t[1]),
                1e-5,
            );
        }
    }

    #[test]
    fn packed_halves_match_the_reference_forward_and_backward() {
        for (i, shape) in [vec![1, 2], vec![3, 5, 14], vec![2, 4096]]
            .iter()
            .enumerate()
        {
            let h = (uniform(shape, 7 + i as u64) * 4.0).unwrap();
            assert_parity(
                "swiglu_packed",
                &[h],
                &[true],
                |t| super::swiglu_packed(&t[0]),
                |t| {
                    let half = t[0].dim(candle_core::D::Minus1)? / 2;
                    let last = t[0].rank() - 1;
                    reference::swiglu(
                        &t[0].narrow(last, 0, half)?,
                        &t[0].narrow(last, half, half)?,
                    )
                },
                1e-5,
            );
        }
    }
}
