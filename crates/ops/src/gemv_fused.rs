//! A decode step's projections fused with their neighbours: the RMSNorm before the q/k/v and
//! gate/up projections taken on the way in ([`rms_norm_linear`], [`rms_norm_glu_projection`])
//! and the residual add after the output and down projections on the way out
//! ([`linear_residual`]). A decode step is bound by kernel launches, and these take a block's
//! two norms into its projections: five kernels a block instead of seven
//! (`kernels/decode.cu`). Each falls back to the separate ops where the matrix-vector kernel
//! does not apply ([`super::gemv`]'s conditions, a norm weight that is not aligned, rows too
//! long for a block's shared memory), and computes what they compute: on the CPU bit for bit.
//!
//! Each takes the [`WeightSource`] of its weight: on Hopper a product whose weight no kernel of
//! the step writes starts loading it while the kernel ahead of it still runs
//! ([`crate::programmatic`]).

use super::cpu_kernel::{f32s, output};
use super::fused_op::{custom_op, CpuOperand, CpuOutput, FusedOp};
#[cfg(feature = "cuda")]
use super::fused_op::{CudaOutput, Operand};
use super::gemv::{cpu_products, output_features, product_shape, supported, with_last_dim};
use super::rms_norm::inverse_rms;
use super::swiglu::Glu;
use candle_core::{DType, Result, Storage, Tensor};

/// The RMSNorm a projection's input takes on the way in: each row `x` becomes
/// `x · r · (offset + weight)` with `r = 1 / sqrt(mean(x²) + eps)`, as
/// [`super::rms_norm_offset`] computes it.
#[derive(Debug, Clone, Copy)]
pub struct InputNorm<'a> {
    /// `[in]`, in the input's dtype.
    pub weight: &'a Tensor,
    /// 0 for a plain norm, 1 for Gemma's `1 + w`.
    pub offset: f64,
    /// Added to the mean square before its inverse square root.
    pub eps: f64,
}

impl InputNorm<'_> {
    /// The norm of `x` as its own op.
    fn apply(&self, x: &Tensor) -> Result<Tensor> {
        super::rms_norm_offset(x, self.weight, self.offset, self.eps)
    }

    /// Whether the fused kernels take this norm for the rows `x` `[rows, in]` (which the
    /// matrix-vector kernel takes): an untracked contiguous weight of `[in]` in `x`'s dtype on
    /// its device; f32 on the CPU, and on CUDA starting on 16 bytes with the rows fitting in
    /// shared memory.
    fn fits(&self, x: &Tensor) -> bool {
        let w = self.weight;
        let width = x.dims().last();
        let alike = w.dtype() == x.dtype() && w.device().same_device(x.device());
        if w.track_op() || !w.is_contiguous() || !alike || w.dims().last() != width {
            return false;
        }
        let (xs, _) = x.storage_and_layout();
        let (ws, _) = w.storage_and_layout();
        match (&*xs, &*ws) {
            // The CPU's norm-taking products are f32 ones.
            (Storage::Cpu(_), Storage::Cpu(_)) => w.rank() == 1 && x.dtype() == DType::F32,
            #[cfg(feature = "cuda")]
            (Storage::Cuda(xs), Storage::Cuda(ws)) => {
                w.rank() == 1 && cuda::norm_fits((xs, x.layout()), (ws, w.layout()))
            }
            _ => false,
        }
    }
}

/// Where a product's weight comes from, which decides whether its kernel may start reading it
/// while the kernel ahead of it in the stream still runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightSource {
    /// A tensor the model holds as the product takes it: no kernel of the step writes it.
    Held,
    /// A tensor a kernel of the step may just have written (a cast, an expanded 4-bit weight).
    Computed,
}

impl WeightSource {
    /// A weight the model holds, in `dtype` ([`super::cast`]), and its source:
    /// [`WeightSource::Held`] where it is the held tensor itself (already in `dtype`), else
    /// [`WeightSource::Computed`] (a cast made it).
    pub fn cast(held: &Tensor, dtype: DType) -> Result<(Tensor, Self)> {
        let used = super::cast(held, dtype)?;
        let source = match used.id() == held.id() {
            true => Self::Held,
            false => Self::Computed,
        };
        Ok((used, source))
    }
}

/// `linear(rms_norm(x), weight)` for `weight` `[out, in]` and `x` `[.., in]`: one kernel for
/// a few untracked rows (a decode step's q/k/v projection).
pub fn rms_norm_linear(
    x: &Tensor,
    norm: InputNorm,
    weight: (&Tensor, WeightSource),
) -> Result<Tensor> {
    normed_projection(x, norm, weight, None)
}

/// `glu_projection(rms_norm(x), gate_up, glu)` for the stacked projection `gate_up`
/// `[2 ffn, in]` and `x` `[.., in]`: one kernel for a few untracked rows (a decode step's MLP
/// up to its down projection).
pub fn rms_norm_glu_projection(
    x: &Tensor,
    norm: InputNorm,
    gate_up: (&Tensor, WeightSource),
    glu: Glu,
) -> Result<Tensor> {
    normed_projection(x, norm, gate_up, Some(glu))
}

/// [`rms_norm_linear`], or with a unit [`rms_norm_glu_projection`].
fn normed_projection(
    x: &Tensor,
    norm: InputNorm,
    (weight, source): (&Tensor, WeightSource),
    glu: Option<Glu>,
) -> Result<Tensor> {
    let (w_rows, inp) = weight.dims2()?;
    if x.dims().last() == Some(&inp) {
        let rows = x.reshape(((), inp))?;
        if supported(&rows, weight) && norm.fits(&rows) {
            let out = output_features(w_rows, glu);
            let op = NormedGemv {
                glu,
                eps: norm.eps as f32,
                offset: norm.offset as f32,
                source,
            };
            return rows
                .apply_op3_no_bwd(weight, norm.weight, &op)?
                .reshape(with_last_dim(x, out));
        }
    }
    let normed = norm.apply(x)?;
    match glu {
        Some(glu) => super::glu_projection(&normed, weight, glu),
        None => super::linear(&normed, weight),
    }
}

/// [`super::greedy_step`] on `rms_norm_linear(x, norm, head)` for one row `x` `[1, in]` and
/// the output head `[vocab, in]` (a greedy decode step's last kernels). On CUDA the head's
/// product keeps, in each block, the largest logit it computed and its index, and the step's
/// pick comes from those: the logits are neither stored nor read again, and argmax's first
/// kernel is not run. The pick is the separate ops' (the same rounded logits compared in the
/// same order). Elsewhere, and for more rows, the separate ops.
pub fn rms_norm_head_greedy_step(
    x: &Tensor,
    norm: InputNorm,
    (head, source): (&Tensor, WeightSource),
    step: &Tensor,
    log: &super::PicksLog,
) -> Result<()> {
    #[cfg(feature = "cuda")]
    if x.device().is_cuda() {
        let (_, inp) = head.dims2()?;
        let row = x.reshape(((), inp))?;
        if row.dim(0)? == 1 && supported(&row, head) && norm.fits(&row) {
            let op = NormedHeadMaxima {
                eps: norm.eps as f32,
                offset: norm.offset as f32,
                source,
            };
            let maxima = row.apply_op3_no_bwd(head, norm.weight, &op)?;
            return super::argmax::greedy_step_from_maxima(&maxima, step, log);
        }
    }
    let logits = rms_norm_linear(x, norm, (head, source))?;
    let vocab = logits.dim(candle_core::D::Minus1)?;
    super::greedy_step(&logits.reshape(((), vocab))?, step, log)
}

/// `residual + linear(x, weight)` for `weight` `[out, in]`, `x` `[.., in]` and `residual`
/// `[.., out]`, the product rounded to the dtype before the add as the separate ops store it:
/// one kernel for a few untracked rows (a decode step's output and down projections).
pub fn linear_residual(
    x: &Tensor,
    (weight, source): (&Tensor, WeightSource),
    residual: &Tensor,
) -> Result<Tensor> {
    let (out, inp) = weight.dims2()?;
    let fits = x.dims().last() == Some(&inp)
        && residual.dims() == with_last_dim(x, out).as_slice()
        && !residual.track_op()
        && residual.is_contiguous()
        && super::fused(&[x, residual]);
    if fits {
        let rows = x.reshape(((), inp))?;
        if supported(&rows, weight) {
            let residual_rows = residual.reshape(((), out))?;
            return rows
                .apply_op3_no_bwd(weight, &residual_rows, &ResidualGemv { source })?
                .reshape(residual.shape());
        }
    }
    super::add(residual, &super::linear(x, weight)?)
}

/// `x @ w.t()` (through the unit where there is one) of the rows of `x` normalized by the
/// weight `nw`: operands `x` `[rows, in]`, `w`, `nw` `[in]`.
struct NormedGemv {
    glu: Option<Glu>,
    eps: f32,
    offset: f32,
    /// Read by the CUDA launchers only.
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    source: WeightSource,
}

impl NormedGemv {
    /// The kernel's name (`kernels/decode.cu`), without the dtype.
    #[cfg(feature = "cuda")]
    fn kernel(&self) -> &'static str {
        match self.glu {
            Some(Glu::SwiGlu) => "gemv_swiglu_rms",
            Some(Glu::GeGlu) => "gemv_geglu_rms",
            None => "gemv_rms",
        }
    }
}

impl FusedOp<3> for NormedGemv {
    const NAME: &'static str = "rms-norm-gemv";

    fn cpu(&self, [(x, x_layout), (w, w_layout), (nw, nw_layout)]: [CpuOperand; 3]) -> CpuOutput {
        let (x, w, nw) = (f32s(x, x_layout)?, f32s(w, w_layout)?, f32s(nw, nw_layout)?);
        let (rows, inp, out) = product_shape(x_layout, w_layout, self.glu)?;
        if nw.len() != inp {
            candle_core::bail!(
                "rms_norm_linear: norm weight of {} for rows of {inp}",
                nw.len()
            );
        }
        // Each row as the CPU's RMSNorm computes it.
        let mut normed = Vec::with_capacity(x.len());
        for row in x.chunks_exact(inp.max(1)) {
            let r = inverse_rms(row, self.eps);
            normed.extend(row.iter().zip(nw).map(|(&x, &w)| x * r * (self.offset + w)));
        }
        let y = cpu_products(&normed, w, (rows, inp, out), self.glu);
        Ok(output(y, (rows, out)))
    }

    #[cfg(feature = "cuda")]
    fn cuda(&self, [x, w, nw]: [Operand; 3]) -> CudaOutput {
        let shape = product_shape(x.1, w.1, self.glu)?;
        let norm = (self.eps, self.offset);
        let y = cuda::normed_gemv(self.kernel(), [x, w, nw], shape, norm, self.source)?;
        Ok((y, (shape.0, shape.2).into()))
    }
}

custom_op!(NormedGemv: 3);

/// The largest output of each block of the product `x @ w.t()` of one row `x` normalized by
/// the weight `nw`, and its index: operands `x` `[1, in]`, `w` `[out, in]`, `nw` `[in]`; u32
/// `[2, blocks]` (the values' f32 bits, then the indices). CUDA only
/// ([`rms_norm_head_greedy_step`]).
#[cfg(feature = "cuda")]
struct NormedHeadMaxima {
    eps: f32,
    offset: f32,
    source: WeightSource,
}

#[cfg(feature = "cuda")]
impl FusedOp<3> for NormedHeadMaxima {
    const NAME: &'static str = "rms-norm-head-maxima";

    fn cpu(&self, _: [CpuOperand; 3]) -> CpuOutput {
        candle_core::bail!("rms_norm_head_greedy_step: the fused kernel is CUDA only")
    }

    fn cuda(&self, [x, w, nw]: [Operand; 3]) -> CudaOutput {
        let shape = product_shape(x.1, w.1, None)?;
        let norm = (self.eps, self.offset);
        let (maxima, blocks) = cuda::head_maxima([x, w, nw], shape, norm, self.source)?;
        Ok((maxima, (2, blocks).into()))
    }
}

#[cfg(feature = "cuda")]
custom_op!(NormedHeadMaxima: 3);

/// `residual + x @ w.t()`: operands `x` `[rows, in]`, `w` `[out, in]`, `residual`
/// `[rows, out]`.
struct ResidualGemv {
    /// Read by the CUDA launchers only.
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    source: WeightSource,
}

impl FusedOp<3> for ResidualGemv {
    const NAME: &'static str = "gemv-residual";

    fn cpu(&self, [(x, x_layout), (w, w_layout), (res, res_layout)]: [CpuOperand; 3]) -> CpuOutput {
        let (x, w, res) = (
            f32s(x, x_layout)?,
            f32s(w, w_layout)?,
            f32s(res, res_layout)?,
        );
        let (rows, inp) = super::rows_and_width(x_layout)?;
        let (out, _) = super::rows_and_width(w_layout)?;
        if res.len() != rows * out {
            candle_core::bail!(
                "linear_residual: residual of {} for [{rows}, {out}]",
                res.len()
            );
        }
        let mut y = cpu_products(x, w, (rows, inp, out), None);
        y.iter_mut().zip(res).for_each(|(y, r)| *y += r);
        Ok(output(y, (rows, out)))
    }

    #[cfg(feature = "cuda")]
    fn cuda(&self, [x, w, res]: [Operand; 3]) -> CudaOutput {
        let (rows, _) = super::rows_and_width(x.1)?;
        let (out, _) = super::rows_and_width(w.1)?;
        Ok((
            cuda::residual_gemv([x, w, res], self.source)?,
            (rows, out).into(),
        ))
    }
}

custom_op!(ResidualGemv: 3);

/// The CUDA launchers (`kernels/decode.cu`).
#[cfg(feature = "cuda")]
mod cuda {
    use super::WeightSource;
    use crate::launch::{
        address, alloc_for, base_address, common_dtype, int, int_u32, launch_ordered, per_warp_row,
        resident_blocks, run_ordered, start_aligned, Arg, Operand, Order, DEFAULT_SHARED_LIMIT,
    };
    use crate::rows_and_width;
    use candle_core::backend::BackendStorage;
    use candle_core::{CudaDevice, CudaStorage, DType, Result};

    /// How a product of a weight from `source` is launched on `device`: programmatically
    /// where no kernel of the step writes the weight and the device can.
    fn order(device: &CudaDevice, source: WeightSource) -> Result<Order> {
        Order::when(device, source == WeightSource::Held)
    }

    /// Bytes of shared memory the normalized rows `x` `[rows, in]` take in a block.
    fn normed_bytes(x: Operand) -> Result<usize> {
        let (rows, inp) = rows_and_width(x.1)?;
        Ok(rows * inp * x.0.dtype().size_in_bytes())
    }

    /// Whether the norm-taking kernels take rows `x` (which the matrix-vector kernel takes)
    /// normalized by `nw`: both start on 16 bytes, and the normalized rows fit in the shared
    /// memory a kernel has without opting in to more.
    pub(super) fn norm_fits(x: Operand, nw: Operand) -> bool {
        let fits = normed_bytes(x).is_ok_and(|n| n <= DEFAULT_SHARED_LIMIT as usize);
        fits && start_aligned(&[x, nw]).unwrap_or(false)
    }

    /// The norm-taking product `name` of `x` `[rows, in]`, `w` and the norm weight `nw`,
    /// `[rows, out]`.
    pub(super) fn normed_gemv(
        name: &str,
        operands: [Operand; 3],
        sizes: (usize, usize, usize),
        norm: (f32, f32),
        source: WeightSource,
    ) -> Result<CudaStorage> {
        let ((rows, _, out), [x, ..]) = (sizes, operands);
        let dtype = common_dtype(&operands)?;
        let order = order(&x.0.device, source)?;
        let y = alloc_for(&x.0.device, dtype, rows * out, order)?;
        let outputs = [Arg::Address(base_address(&y)?), int(rows)?];
        let blocks = match order {
            Order::Programmatic => programmatic_grid(name, x, dtype, out)?,
            Order::Stream => normed_grid(name, x, dtype, out)?,
        };
        let launch = (dtype, blocks, order);
        launch_normed(name, operands, sizes, norm, launch, &outputs)?;
        Ok(y)
    }

    /// Blocks of a norm-taking product launched programmatically: [`normed_grid`]'s where that
    /// leaves a warp at most two features, else one warp a feature. A kernel lets the next one
    /// launch once every block of it has started, so on the capped grid the kernel after it (a
    /// decode step's attention after its q/k/v product) launches as the product starts, not
    /// when the product's last blocks find room after its first ones end; but a warp's later
    /// features load their weights only after the wait. On an H100 (bench/decode_chain.cu) the
    /// cap took 31 µs a step off the 1b's q/k/v products (two features a warp at most) and
    /// added 8.5 µs to its gate/up products (four).
    fn programmatic_grid(name: &str, x: Operand, dtype: DType, out: usize) -> Result<usize> {
        let capped = normed_grid(name, x, dtype, out)?;
        let ((one_a_feature, _), _) = per_warp_row(out)?;
        let one_a_feature = one_a_feature as usize;
        Ok(if one_a_feature <= 2 * capped {
            capped
        } else {
            one_a_feature
        })
    }

    /// `gemv_rms_maxima` on one row `x` `[1, in]`, `w` `[out, in]` and the norm weight `nw`:
    /// u32 `[2, blocks]`, each block's largest output's f32 bits, then its index; and the
    /// blocks.
    pub(super) fn head_maxima(
        operands: [Operand; 3],
        sizes: (usize, usize, usize),
        norm: (f32, f32),
        source: WeightSource,
    ) -> Result<(CudaStorage, usize)> {
        let ((_, _, out), [x, ..]) = (sizes, operands);
        let name = "gemv_rms_maxima";
        let dtype = common_dtype(&operands)?;
        let blocks = normed_grid(name, x, dtype, out)?;
        let order = order(&x.0.device, source)?;
        let maxima = alloc_for(&x.0.device, DType::U32, 2 * blocks, order)?;
        let values = base_address(&maxima)?;
        let outputs = [
            Arg::Address(values),
            Arg::Address(values + 4 * blocks as u64),
        ];
        let launch = (dtype, blocks, order);
        launch_normed(name, operands, sizes, norm, launch, &outputs)?;
        Ok((maxima, blocks))
    }

    /// Blocks of a norm-taking product `name` of `x` with `out` output features: one warp per
    /// feature, as the plain product, but no more blocks than the device runs at once; each
    /// block normalizes the rows once, then its warps go on to further features.
    fn normed_grid(name: &str, x: Operand, dtype: DType, out: usize) -> Result<usize> {
        let ((blocks, _), block) = per_warp_row(out)?;
        let resident = resident_blocks(&x.0.device, name, Some(dtype), (block.0, shared(x)?))?;
        Ok(resident.min(blocks as usize))
    }

    /// The shared memory a norm-taking product's block needs for the normalized rows `x`.
    fn shared(x: Operand) -> Result<u32> {
        u32::try_from(normed_bytes(x)?)
            .map_err(|_| candle_core::Error::Msg("rms_norm_linear: rows too long".into()))
    }

    /// Launches the norm-taking product `name` of `x` `[rows, in]`, `w` and the norm weight
    /// `nw` (`sizes`: rows, in, out; `norm`: eps, offset) in `dtype` on `blocks` blocks in
    /// `order`, with `outputs` (its output addresses and anything between them and the sizes)
    /// as arguments after the operands.
    fn launch_normed(
        name: &str,
        [x, w, nw]: [Operand; 3],
        (_, inp, out): (usize, usize, usize),
        (eps, offset): (f32, f32),
        (dtype, blocks, order): (DType, usize, Order),
        outputs: &[Arg],
    ) -> Result<()> {
        let mut args = [x, w, nw]
            .into_iter()
            .map(|o| address(o).map(Arg::Address))
            .collect::<Result<Vec<_>>>()?;
        args.extend_from_slice(outputs);
        args.extend([int(inp)?, int(out)?, Arg::Float(eps), Arg::Float(offset)]);
        let (_, block) = per_warp_row(out)?;
        let grid = (int_u32(blocks)?, 1);
        let config = (grid, block, shared(x)?);
        launch_ordered(&x.0.device, name, Some(dtype), config, &args, order)
    }

    /// `residual + x @ w.t()` for `x` `[rows, in]`, `w` `[out, in]` and `residual`
    /// `[rows, out]`.
    pub(super) fn residual_gemv(
        [x, w, residual]: [Operand; 3],
        source: WeightSource,
    ) -> Result<CudaStorage> {
        let dtype = common_dtype(&[x, w, residual])?;
        let (rows, inp) = rows_and_width(x.1)?;
        let (out, _) = rows_and_width(w.1)?;
        let order = order(&x.0.device, source)?;
        let y = alloc_for(&x.0.device, dtype, rows * out, order)?;
        let scalars = [int(rows)?, int(inp)?, int(out)?];
        let kernel = ("gemv_residual", dtype);
        run_ordered(
            kernel,
            per_warp_row(out)?,
            &[x, w, residual],
            y,
            &scalars,
            order,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::parity::uniform;
    use WeightSource::Held;

    /// A weight already in the step's dtype is the held tensor itself; a cast one is made in
    /// the step.
    #[test]
    fn weight_source_says_whether_a_cast_made_the_weight() {
        let w = uniform(&[4, 8], 1);
        let (same, source) = WeightSource::cast(&w, DType::F32).unwrap();
        assert_eq!((source, same.id()), (Held, w.id()));
        let (cast, source) = WeightSource::cast(&w, DType::BF16).unwrap();
        assert_eq!(
            (source, cast.dtype()),
            (WeightSource::Computed, DType::BF16)
        );
    }

    /// Each fused projection equals the separate ops bit for bit on the CPU, for one row and
    /// a batch, with a plain and an offset norm weight.
    #[test]
    fn fused_projections_are_the_separate_ops() {
        let (inp, ffn, out) = (40, 9, 13);
        let nw = uniform(&[inp], 7);
        let w = uniform(&[out, inp], 8);
        let gate_up = uniform(&[2 * ffn, inp], 9);
        let down = uniform(&[out, ffn], 10);
        for rows in [1, 3] {
            let x = uniform(&[rows, 1, inp], 11);
            let residual = uniform(&[rows, 1, out], 12);
            let hidden = uniform(&[rows, 1, ffn], 13);
            for offset in [0.0, 1.0] {
                let norm = InputNorm {
                    weight: &nw,
                    offset,
                    eps: 1e-5,
                };
                let normed = crate::rms_norm_offset(&x, &nw, offset, 1e-5).unwrap();
                let pairs = [
                    (
                        rms_norm_linear(&x, norm, (&w, Held)).unwrap(),
                        crate::linear(&normed, &w).unwrap(),
                    ),
                    (
                        rms_norm_glu_projection(&x, norm, (&gate_up, Held), Glu::SwiGlu).unwrap(),
                        crate::glu_projection(&normed, &gate_up, Glu::SwiGlu).unwrap(),
                    ),
                    (
                        rms_norm_glu_projection(&x, norm, (&gate_up, Held), Glu::GeGlu).unwrap(),
                        crate::glu_projection(&normed, &gate_up, Glu::GeGlu).unwrap(),
                    ),
                    (
                        linear_residual(&hidden, (&down, Held), &residual).unwrap(),
                        crate::add(&residual, &crate::linear(&hidden, &down).unwrap()).unwrap(),
                    ),
                ];
                for (i, (fused, separate)) in pairs.iter().enumerate() {
                    assert_eq!(fused.dims(), separate.dims(), "pair {i}");
                    let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                    assert_eq!(flat(fused), flat(separate), "pair {i}, {rows} rows");
                }
            }
        }
    }

    /// A norm weight of the wrong width is refused by the fused path and then by the separate
    /// norm, not read past its end.
    #[test]
    fn a_norm_weight_of_another_width_is_an_error() {
        let (x, w, nw) = (uniform(&[1, 8], 1), uniform(&[3, 8], 2), uniform(&[5], 3));
        let norm = InputNorm {
            weight: &nw,
            offset: 0.0,
            eps: 1e-5,
        };
        assert!(rms_norm_linear(&x, norm, (&w, Held)).is_err());
    }
}
