//! Gated linear units, SwiGLU and GeGLU ([`Glu`]): their dispatch, composite reference, and
//! fused kernels on the CPU and on CUDA (`kernels/swiglu.cu`, one kernel body per direction
//! with the activation as a parameter): `act(gate) · up` in one elementwise pass, and both
//! gradients in one pass that writes them side by side (the op returns one tensor, so
//! `[2, ..]`, split by views).
//! The packed form takes one projection `[.., 2 · width]` whose rows hold the gate, then the up
//! half (a stacked gate/up projection), and its gradient is one tensor of the same layout, so
//! the projection's backward gets one gradient and no sum.

use super::cpu_kernel::{f32s, output, written_row_pairs, written_rows, ELEMENTWISE_CHUNK};
use super::fused_op::{custom_op, CpuOperand, CpuOutput, FusedOp};
#[cfg(feature = "cuda")]
use super::fused_op::{CudaOutput, Operand};
use candle_core::{Layout, Result, Shape, Tensor};

/// Which gated linear unit a feed-forward computes: `act(gate) · up`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Glu {
    /// `silu(gate) · up` (Llama, Mistral, Qwen, Phi-3).
    SwiGlu,
    /// `gelu_tanh(gate) · up`: PyTorch's tanh-approximated GELU (Gemma).
    GeGlu,
}

/// `√(2/π)` and the cubic coefficient of the tanh-approximated GELU.
const GELU_SCALE: f32 = 0.797_884_6;
const GELU_CUBIC: f32 = 0.044_715;

impl Glu {
    /// The activation of `g` and its derivative.
    #[inline(always)]
    pub(super) fn activation(self, g: f32) -> (f32, f32) {
        match self {
            Glu::SwiGlu => {
                let s = sigmoid(g);
                (g * s, s * (1.0 + g * (1.0 - s)))
            }
            Glu::GeGlu => {
                let t = tanh(GELU_SCALE * g * (1.0 + GELU_CUBIC * g * g));
                let inner = GELU_SCALE * (1.0 + 3.0 * GELU_CUBIC * g * g);
                (
                    0.5 * g * (1.0 + t),
                    0.5 * (1.0 + t) + 0.5 * g * (1.0 - t * t) * inner,
                )
            }
        }
    }

    /// The activation of `g`.
    #[inline(always)]
    pub(super) fn value(self, g: f32) -> f32 {
        match self {
            Glu::SwiGlu => g * sigmoid(g),
            Glu::GeGlu => 0.5 * g * (1.0 + tanh(GELU_SCALE * g * (1.0 + GELU_CUBIC * g * g))),
        }
    }

    fn op_name(self, swiglu: &'static str, geglu: &'static str) -> &'static str {
        match self {
            Glu::SwiGlu => swiglu,
            Glu::GeGlu => geglu,
        }
    }
}

/// The gated unit `act(gate) · up` of [`Glu`]. Fused where [`super::fused`] accepts both and
/// they have one shape, else the [`fn@reference`].
pub fn glu(gate: &Tensor, up: &Tensor, glu: Glu) -> Result<Tensor> {
    if super::fused(&[gate, up]) && gate.shape() == up.shape() {
        return gate
            .contiguous()?
            .apply_op2(&up.contiguous()?, Gated { glu });
    }
    reference(gate, up, glu)
}

/// [`glu`] from candle's differentiable ops, any backend and dtype (candle's `gelu` is the
/// tanh approximation).
pub fn reference(gate: &Tensor, up: &Tensor, glu: Glu) -> Result<Tensor> {
    match glu {
        Glu::SwiGlu => gate.silu()? * up,
        Glu::GeGlu => gate.gelu()? * up,
    }
}

/// `act(gate) · up` for a packed projection `h` `[.., 2 · width]` whose rows hold the gate,
/// then the up half; its gradient comes back in the same layout.
pub fn glu_packed(h: &Tensor, glu: Glu) -> Result<Tensor> {
    if super::fused(&[h]) {
        return h.contiguous()?.apply_op1(GatedPacked { glu });
    }
    let last = h.rank().max(1) - 1;
    let half = h.dim(last)? / 2;
    reference(&h.narrow(last, 0, half)?, &h.narrow(last, half, half)?, glu)
}

/// `glu(master_linear(x, gate), master_linear(x, up))` for master weights `gate` and `up`
/// `[ffn, in]`: a block's gated projection in training. On CUDA the two run as one stacked
/// projection into a packed unit whose gradient comes back packed: one GEMM each way, and
/// the input's gradient needs no sum of two (measured there; elsewhere the two projections).
pub fn glu_master_projection(x: &Tensor, gate: &Tensor, up: &Tensor, kind: Glu) -> Result<Tensor> {
    let alike = gate.dims() == up.dims() && gate.dtype() == up.dtype();
    if alike && glu_packed_fuses(x) {
        let packed = super::stacked_master_linear(x, &[gate, up])?;
        return glu_packed(&packed, kind);
    }
    glu(
        &super::master_linear(x, gate)?,
        &super::master_linear(x, up)?,
        kind,
    )
}

/// Whether a stacked gate/up projection of `x` into [`glu_packed`] pays over two projections:
/// on CUDA, where the fused kernels take `x` (measured there).
pub fn glu_packed_fuses(x: &Tensor) -> bool {
    x.device().is_cuda() && super::fused(&[x])
}

/// The logistic function.
fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + super::fast_exp::exp(-x))
}

/// `tanh` from the vectorizable `exp` (±1 where `e^2x` leaves the float range).
fn tanh(x: f32) -> f32 {
    1.0 - 2.0 / (super::fast_exp::exp(2.0 * x) + 1.0)
}

fn same_len(a: &[f32], b: &[f32]) -> Result<()> {
    if a.len() != b.len() {
        candle_core::bail!("glu: gate of {} and up of {} elements", a.len(), b.len());
    }
    Ok(())
}

/// `act(gate) · up` of separate gate and up tensors of one shape.
struct Gated {
    glu: Glu,
}

impl FusedOp<2> for Gated {
    const NAME: &'static str = "swiglu";

    fn name(&self) -> &'static str {
        self.glu.op_name(Self::NAME, "geglu")
    }

    fn cpu(&self, [(gate, gate_layout), (up, up_layout)]: [CpuOperand; 2]) -> CpuOutput {
        let (gate, up) = (f32s(gate, gate_layout)?, f32s(up, up_layout)?);
        same_len(gate, up)?;
        // SAFETY: every element of each chunk is written.
        let y = unsafe {
            written_rows(gate.len(), ELEMENTWISE_CHUNK, |chunk, y| {
                let start = chunk * ELEMENTWISE_CHUNK;
                let (g, u) = (&gate[start..][..y.len()], &up[start..][..y.len()]);
                for ((y, &g), &u) in y.iter_mut().zip(g).zip(u) {
                    y.write(self.glu.value(g) * u);
                }
            })
        };
        Ok(output(y, gate_layout.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda(&self, [gate, up]: [Operand; 2]) -> CudaOutput {
        Ok((cuda::glu(gate, up, self.glu)?, gate.1.shape().clone()))
    }

    fn backward(
        &self,
        [gate, up]: [&Tensor; 2],
        _y: &Tensor,
        grad: &Tensor,
    ) -> Result<[Option<Tensor>; 2]> {
        let both = gate.detach().apply_op3(
            &up.detach(),
            &grad.contiguous()?,
            GatedGrad { glu: self.glu },
        )?;
        // candle stores whatever gradient is returned: a frozen operand must get `None`.
        let d_gate = gate.track_op().then(|| both.get(0)).transpose()?;
        let d_up = up.track_op().then(|| both.get(1)).transpose()?;
        Ok([d_gate, d_up])
    }
}

custom_op!(Gated: 2);

/// `[d gate, d up]` stacked on a new leading dimension:
/// `d gate = g · up · act'(gate)`, `d up = g · act(gate)`.
struct GatedGrad {
    glu: Glu,
}

impl FusedOp<3> for GatedGrad {
    const NAME: &'static str = "swiglu-grad";

    fn name(&self) -> &'static str {
        self.glu.op_name(Self::NAME, "geglu-grad")
    }

    fn cpu(
        &self,
        [(gate, gate_layout), (up, up_layout), (grad, grad_layout)]: [CpuOperand; 3],
    ) -> CpuOutput {
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
                    let (a, da) = self.glu.activation(g[i]);
                    d_up[i].write(dy[i] * a);
                    d_gate[i].write(dy[i] * u[i] * da);
                }
            })
        };
        Ok(output(out, stacked_shape(gate_layout)))
    }

    #[cfg(feature = "cuda")]
    fn cuda(&self, [gate, up, grad]: [Operand; 3]) -> CudaOutput {
        let out = cuda::glu_grad(gate, up, grad, self.glu)?;
        Ok((out, stacked_shape(gate.1).into()))
    }
}

custom_op!(GatedGrad: 3);

/// Rows and half width of a packed projection.
fn packed_rows(layout: &Layout) -> Result<(usize, usize)> {
    let (rows, two_width) = super::rows_and_width(layout)?;
    if two_width % 2 != 0 {
        candle_core::bail!("glu: packed rows of odd width {two_width}");
    }
    Ok((rows, two_width / 2))
}

/// `h`'s dims with the last halved: the output of a packed unit.
fn half_shape(layout: &Layout) -> Shape {
    let mut dims = layout.dims().to_vec();
    if let Some(last) = dims.last_mut() {
        *last /= 2;
    }
    dims.into()
}

/// `act(gate) · up` of a packed projection.
struct GatedPacked {
    glu: Glu,
}

impl FusedOp<1> for GatedPacked {
    const NAME: &'static str = "swiglu-packed";

    fn name(&self) -> &'static str {
        self.glu.op_name(Self::NAME, "geglu-packed")
    }

    fn cpu(&self, [(h, layout)]: [CpuOperand; 1]) -> CpuOutput {
        let h = f32s(h, layout)?;
        let (rows, width) = packed_rows(layout)?;
        // SAFETY: every element of each row is written.
        let y = unsafe {
            written_rows(rows * width, width.max(1), |row, y| {
                let (gate, up) = h[row * 2 * width..][..2 * width].split_at(width);
                for ((y, &g), &u) in y.iter_mut().zip(gate).zip(up) {
                    y.write(self.glu.value(g) * u);
                }
            })
        };
        Ok(output(y, half_shape(layout)))
    }

    #[cfg(feature = "cuda")]
    fn cuda(&self, [h]: [Operand; 1]) -> CudaOutput {
        Ok((cuda::glu_packed(h, self.glu)?, half_shape(h.1)))
    }

    fn backward(
        &self,
        [h]: [&Tensor; 1],
        _y: &Tensor,
        grad: &Tensor,
    ) -> Result<[Option<Tensor>; 1]> {
        let op = GatedPackedGrad { glu: self.glu };
        Ok([Some(h.detach().apply_op2(&grad.contiguous()?, op)?)])
    }
}

custom_op!(GatedPacked: 1);

/// The gradient of a packed unit, laid out like its input: each row d gate, then d up.
struct GatedPackedGrad {
    glu: Glu,
}

impl FusedOp<2> for GatedPackedGrad {
    const NAME: &'static str = "swiglu-packed-grad";

    fn name(&self) -> &'static str {
        self.glu.op_name(Self::NAME, "geglu-packed-grad")
    }

    fn cpu(&self, [(h, h_layout), (grad, grad_layout)]: [CpuOperand; 2]) -> CpuOutput {
        let (h, grad) = (f32s(h, h_layout)?, f32s(grad, grad_layout)?);
        let (rows, width) = packed_rows(h_layout)?;
        if grad.len() != rows * width {
            candle_core::bail!(
                "glu: a gradient of {} elements for {rows} packed rows of {width}",
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
                    let (a, da) = self.glu.activation(gate[i]);
                    d_up[i].write(dy[i] * a);
                    d_gate[i].write(dy[i] * up[i] * da);
                }
            })
        };
        Ok(output(out, h_layout.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda(&self, [h, grad]: [Operand; 2]) -> CudaOutput {
        let out = cuda::glu_packed_grad(h, grad, self.glu)?;
        Ok((out, h.1.shape().clone()))
    }
}

custom_op!(GatedPackedGrad: 2);

/// `[2, ..gate's dims]`: the two gradients stacked.
fn stacked_shape(gate_layout: &Layout) -> Vec<usize> {
    let mut dims = vec![2];
    dims.extend_from_slice(gate_layout.dims());
    dims
}

/// The CUDA launchers (`kernels/swiglu.cu`).
#[cfg(feature = "cuda")]
mod cuda {
    use super::Glu;
    use crate::launch::{
        address, alloc, base_address, common_dtype, launch, per_element, same_count, Arg, Operand,
    };
    use crate::rows_and_width;
    use candle_core::backend::BackendStorage;
    use candle_core::{CudaDevice, CudaStorage, DType, Result};

    /// The forward (`true`) or backward kernels of a unit: the one-element and the 16-byte
    /// kernel's names.
    fn kernels(glu: Glu, forward: bool) -> (&'static str, &'static str) {
        match (glu, forward) {
            (Glu::SwiGlu, true) => ("swiglu_fwd", "swiglu_fwd_wide"),
            (Glu::SwiGlu, false) => ("swiglu_bwd", "swiglu_bwd_wide"),
            (Glu::GeGlu, true) => ("geglu_fwd", "geglu_fwd_wide"),
            (Glu::GeGlu, false) => ("geglu_bwd", "geglu_bwd_wide"),
        }
    }

    /// Forward of separate `gate` and `up` of one shape.
    pub(super) fn glu(gate: Operand, up: Operand, glu: Glu) -> Result<CudaStorage> {
        let n = same_count(gate, up)?;
        let dtype = common_dtype(&[gate, up])?;
        let rows = GluRows::one(n);
        let halves = [address(gate)?, address(up)?];
        forward(halves, &gate.0.device, dtype, rows, glu)
    }

    /// Forward of a packed projection `h` `[.., 2 · width]`: the gate half, then the up half
    /// of each row.
    pub(super) fn glu_packed(h: Operand, glu: Glu) -> Result<CudaStorage> {
        let (rows, halves) = GluRows::packed(h)?;
        forward(halves, &h.0.device, h.0.dtype(), rows, glu)
    }

    /// Gradients of separate `gate` and `up`, `[d gate; d up]` in one buffer of `2n`.
    pub(super) fn glu_grad(
        gate: Operand,
        up: Operand,
        grad: Operand,
        glu: Glu,
    ) -> Result<CudaStorage> {
        let n = same_count(gate, up)?;
        same_count(gate, grad)?;
        let rows = GluRows::one(n);
        backward([address(gate)?, address(up)?], grad, rows, (2 * n, n), glu)
    }

    /// Gradient of a packed projection `h` `[.., 2 · width]` for the output gradient `grad`
    /// `[.., width]`: one packed gradient like `h`.
    pub(super) fn glu_packed_grad(h: Operand, grad: Operand, glu: Glu) -> Result<CudaStorage> {
        common_dtype(&[h, grad])?;
        let (rows, halves) = GluRows::packed(h)?;
        if grad.1.shape().elem_count() != rows.n {
            candle_core::bail!(
                "glu: a gradient of {:?} for {:?}",
                grad.1.dims(),
                h.1.dims()
            );
        }
        backward(halves, grad, rows, (2 * rows.n, rows.width), glu)
    }

    /// Where the gate and up rows of a unit are: `n` elements in rows of `width`, row r of
    /// each starting `r · stride` elements from its first.
    #[derive(Clone, Copy)]
    struct GluRows {
        n: usize,
        width: usize,
        stride: usize,
    }

    impl GluRows {
        /// Separate tensors of `n` elements: one row.
        fn one(n: usize) -> Self {
            Self {
                n,
                width: n.max(1),
                stride: n.max(1),
            }
        }

        /// The halves of the packed rows `[.., 2 · width]` of `h`, and the addresses of its first
        /// gate and first up element.
        fn packed(h: Operand) -> Result<(Self, [u64; 2])> {
            let (rows, two_width) = rows_and_width(h.1)?;
            if two_width % 2 != 0 {
                candle_core::bail!("glu: packed rows of odd width {two_width}");
            }
            let width = two_width / 2;
            let gate = address(h)?;
            let up = gate + (width * h.0.dtype().size_in_bytes()) as u64;
            let rows = Self {
                n: rows * width,
                width,
                stride: two_width,
            };
            Ok((rows, [gate, up]))
        }

        /// The 16-byte kernel where every address and row boundary allows it: its name and the
        /// elements each thread moves.
        fn kernel(
            &self,
            names: (&'static str, &'static str),
            dtype: DType,
            addresses: &[u64],
        ) -> (&'static str, usize) {
            let vector = 16 / dtype.size_in_bytes();
            let aligned = addresses.iter().all(|a| a % 16 == 0);
            match aligned && self.width % vector == 0 && self.stride % vector == 0 {
                true => (names.1, vector),
                false => (names.0, 1),
            }
        }

        fn args(&self) -> [Arg; 3] {
            [self.n, self.width, self.stride].map(|v| Arg::Count(v as u64))
        }
    }

    fn forward(
        [gate, up]: [u64; 2],
        device: &CudaDevice,
        dtype: DType,
        rows: GluRows,
        glu: Glu,
    ) -> Result<CudaStorage> {
        let y = alloc(device, dtype, rows.n)?;
        let y_address = base_address(&y)?;
        let (name, per_thread) = rows.kernel(kernels(glu, true), dtype, &[gate, up, y_address]);
        let args = [
            [gate, up, y_address].map(Arg::Address).as_slice(),
            &rows.args(),
        ]
        .concat();
        let (grid, block) = per_element(rows.n / per_thread)?;
        launch(device, name, Some(dtype), grid, block, &args)?;
        Ok(y)
    }

    /// The gradients into a new buffer of `len` elements: d gate from its start, d up from
    /// `up_offset` elements on, each at the places of gate and up in their rows.
    fn backward(
        [gate, up]: [u64; 2],
        grad: Operand,
        rows: GluRows,
        (len, up_offset): (usize, usize),
        glu: Glu,
    ) -> Result<CudaStorage> {
        let (device, dtype) = (&grad.0.device, grad.0.dtype());
        let out = alloc(device, dtype, len)?;
        let d_gate = base_address(&out)?;
        let d_up = d_gate + (up_offset * dtype.size_in_bytes()) as u64;
        let grad = address(grad)?;
        let addresses = [gate, up, grad, d_gate, d_up];
        let (name, per_thread) = rows.kernel(kernels(glu, false), dtype, &addresses);
        let args = [addresses.map(Arg::Address).as_slice(), &rows.args()].concat();
        let (grid, block) = per_element(rows.n / per_thread)?;
        launch(device, name, Some(dtype), grid, block, &args)?;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::Glu;
    use crate::parity::{assert_parity, uniform};

    #[test]
    fn matches_the_reference_forward_and_backward() {
        for glu in [Glu::SwiGlu, Glu::GeGlu] {
            for (i, shape) in [vec![1], vec![3, 5, 7], vec![2, 20000]].iter().enumerate() {
                let s = 10 * i as u64;
                let inputs = [(uniform(shape, s) * 4.0).unwrap(), uniform(shape, s + 1)];
                assert_parity(
                    &format!("{glu:?}"),
                    &inputs,
                    &[true, true],
                    |t| t[0].apply_op2(&t[1], super::Gated { glu }),
                    |t| super::reference(&t[0], &t[1], glu),
                    1e-5,
                );
            }
        }
    }

    #[test]
    fn packed_halves_match_the_reference_forward_and_backward() {
        for glu in [Glu::SwiGlu, Glu::GeGlu] {
            for (i, shape) in [vec![1, 2], vec![3, 5, 14], vec![2, 4096]]
                .iter()
                .enumerate()
            {
                let h = (uniform(shape, 7 + i as u64) * 4.0).unwrap();
                assert_parity(
                    &format!("{glu:?} packed"),
                    &[h],
                    &[true],
                    |t| t[0].apply_op1(super::GatedPacked { glu }),
                    |t| {
                        let half = t[0].dim(candle_core::D::Minus1)? / 2;
                        let last = t[0].rank() - 1;
                        super::reference(
                            &t[0].narrow(last, 0, half)?,
                            &t[0].narrow(last, half, half)?,
                            glu,
                        )
                    },
                    1e-5,
                );
            }
        }
    }
}
