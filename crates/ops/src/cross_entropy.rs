//! Cross-entropy: its dispatch, composite references, and fused kernels on the CPU and on CUDA
//! (`kernels/loss.cu`): per-row NLL (log-sum-exp and target gather in one pass over the logits,
//! f32 out), a backward that writes `(softmax − onehot) · g` per row directly, with no
//! log-softmax copy of the logits, and both at once for the training loss (the log-sum-exp of
//! each row computed once). The weighted mean over rows is left to tensor ops, so nothing here
//! synchronizes with the device.

use super::cpu_kernel::{
    self, f32s, output, u32s, written_rows, written_rows_with, MIN_ROWS_PER_TASK,
};
use super::fast_exp;
use super::fused_op::{custom_op, CpuOperand, CpuOutput, FusedOp};
#[cfg(feature = "cuda")]
use super::fused_op::{CudaOutput, Operand};
#[cfg(feature = "cuda")]
use super::launch;
use super::reference::{log_softmax, one_hot, softmax, widened};
use super::{ids_beside, rows_and_width};
use candle_core::op::BackpropOp;
use candle_core::{CpuStorage, DType, Device, Layout, Result, Shape, Storage, Tensor, D};
use rayon::prelude::*;
use std::mem::MaybeUninit;

/// Negative log-likelihood of each target under `logits` (`[n, vocab]`, targets `[n]` u32),
/// computed in at least f32. Returns `[n]`.
pub fn token_nll(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    if super::fused(&[logits]) && ids_beside(targets, logits) {
        return logits
            .contiguous()?
            .apply_op2(&targets.contiguous()?, TokenNll);
    }
    reference_nll(logits, targets)
}

/// `(softmax(logits) − onehot(targets)) · g[row]` in the logits' dtype (f32 row scales `g`):
/// the gradient of `Σ g · token_nll` with respect to the logits.
pub fn token_nll_grad(logits: &Tensor, targets: &Tensor, g: &Tensor) -> Result<Tensor> {
    if super::fused(&[logits]) && ids_beside(targets, logits) && g.dtype() == DType::F32 {
        let (logits, targets) = (logits.contiguous()?, targets.contiguous()?);
        return fused_grad(&logits, &targets, &g.contiguous()?);
    }
    reference_grad(logits, targets, g)
}

/// [`token_nll`] and [`token_nll_grad`] of the same logits together, as `(nll, gradient)`.
/// Fused, it is one pass per row that computes the row's log-sum-exp once (a rayon kernel on the
/// CPU, one kernel that reads the logits twice on CUDA; the two ops read them five times), and
/// neither result records a backward; elsewhere it is the two ops.
pub fn token_nll_with_grad(
    logits: &Tensor,
    targets: &Tensor,
    g: &Tensor,
) -> Result<(Tensor, Tensor)> {
    if super::fused(&[logits]) && ids_beside(targets, logits) && g.dtype() == DType::F32 {
        let (logits, targets, g) = (logits.contiguous()?, targets.contiguous()?, g.contiguous()?);
        return fused_with_grad(&logits, &targets, &g);
    }
    Ok((
        token_nll(logits, targets)?,
        token_nll_grad(logits, targets, g)?,
    ))
}

/// `Σ values · weights / max(Σ weights, 1)` as a scalar, computed on the device (no host
/// synchronization).
pub fn weighted_mean(values: &Tensor, weights: &Tensor) -> Result<Tensor> {
    let weights = weights.to_dtype(values.dtype())?;
    let count = weights.sum_all()?.maximum(1.0)?;
    (values * &weights)?.sum_all()?.div(&count)
}

/// Mean NLL over the positions where `weights` (`[n]` f32, 1 to score, 0 to skip) is set, for
/// `logits` `[n, vocab]` and u32 `targets` `[n]`; computed in at least f32.
pub fn masked_mean_nll(logits: &Tensor, targets: &Tensor, weights: &Tensor) -> Result<Tensor> {
    weighted_mean(&token_nll(logits, targets)?, weights)
}

/// [`token_nll`] from candle's differentiable ops, any backend and dtype.
pub fn reference_nll(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let logits = logits.to_dtype(widened(logits.dtype()))?;
    let log_probs = log_softmax(&logits, D::Minus1)?;
    log_probs
        .gather(&targets.unsqueeze(1)?, 1)?
        .squeeze(1)?
        .neg()
}

/// [`token_nll_grad`] from candle's ops, computed in f32, any backend and dtype.
pub fn reference_grad(logits: &Tensor, targets: &Tensor, g: &Tensor) -> Result<Tensor> {
    let dtype = logits.dtype();
    let probs = softmax(&logits.to_dtype(DType::F32)?, D::Minus1)?;
    let vocab = logits.dim(1)?;
    let onehot = one_hot(targets, vocab)?;
    (probs - onehot)?
        .broadcast_mul(&g.unsqueeze(1)?)?
        .to_dtype(dtype)
}

/// The fused [`token_nll_grad`]; inputs must be contiguous, on a backend [`super::fused`]
/// accepts.
fn fused_grad(logits: &Tensor, targets: &Tensor, g: &Tensor) -> Result<Tensor> {
    logits.apply_op3_no_bwd(targets, g, &TokenNllGrad)
}

/// The fused [`token_nll_with_grad`]: one pass per row on the CPU, one kernel on CUDA. Inputs
/// must be contiguous, on a backend [`super::fused`] accepts.
fn fused_with_grad(logits: &Tensor, targets: &Tensor, g: &Tensor) -> Result<(Tensor, Tensor)> {
    let operands = [logits, targets, g];
    let (nll, d) = match logits.device() {
        Device::Cpu => {
            let (nll, d) =
                cpu_kernel::with_operands(&operands, |o| cpu_nll_with_grad(o[0], o[1], o[2]))?;
            (
                Storage::Cpu(CpuStorage::F32(nll)),
                Storage::Cpu(CpuStorage::F32(d)),
            )
        }
        #[cfg(feature = "cuda")]
        Device::Cuda(_) => {
            let (nll, d) =
                launch::with_operands(&operands, |o| cuda::token_nll_with_grad(o[0], o[1], o[2]))?;
            (Storage::Cuda(nll), Storage::Cuda(d))
        }
        _ => candle_core::bail!("cross-entropy: no fused kernel for this device"),
    };
    let untracked = |storage: Storage, shape: Shape| {
        Tensor::from_storage(storage, shape, BackpropOp::none(), false)
    };
    Ok((
        untracked(nll, Shape::from(logits.dim(0)?)),
        untracked(d, logits.shape().clone()),
    ))
}

/// The CPU kernel of [`fused_with_grad`]: the NLLs and the gradient rows.
fn cpu_nll_with_grad(
    (logits, logits_layout): (&CpuStorage, &Layout),
    (targets, targets_layout): (&CpuStorage, &Layout),
    (g, g_layout): (&CpuStorage, &Layout),
) -> Result<(Vec<f32>, Vec<f32>)> {
    let (n, vocab, targets) = cpu_targets(logits_layout, targets, targets_layout)?;
    let (logits, g) = (
        f32s(logits, logits_layout)?,
        cpu_row_scales(g, g_layout, n)?,
    );
    // SAFETY: `write_grad_row` writes every element of the row.
    let (d, nll) = unsafe {
        written_rows_with(logits.len(), vocab, |r, d| {
            let (row, t) = (&logits[r * vocab..][..vocab], targets[r] as usize);
            let shift = log_sum_exp(row);
            write_grad_row(row, t, shift, g[r], d);
            shift - row[t]
        })
    };
    Ok((nll, d))
}

/// Targets checked against the logits on the CPU.
fn cpu_targets<'a>(
    logits: &Layout,
    targets: &'a CpuStorage,
    targets_layout: &Layout,
) -> Result<(usize, usize, &'a [u32])> {
    let (n, vocab) = rows_and_width(logits)?;
    let targets = u32s(targets, targets_layout)?;
    if targets.len() != n {
        candle_core::bail!(
            "cross-entropy: {n} rows of logits, {} targets",
            targets.len()
        );
    }
    if let Some(t) = targets.iter().find(|&&t| t as usize >= vocab) {
        candle_core::bail!("cross-entropy: target id {t} outside the vocabulary of {vocab}");
    }
    Ok((n, vocab, targets))
}

/// Row scales `g` checked against `n` rows of logits on the CPU.
fn cpu_row_scales<'a>(g: &'a CpuStorage, layout: &Layout, n: usize) -> Result<&'a [f32]> {
    let g = f32s(g, layout)?;
    if g.len() != n {
        candle_core::bail!("cross-entropy gradient: {n} rows, {} row scales", g.len());
    }
    Ok(g)
}

/// `log Σ exp(x)` of one row of logits, as `max + log Σ exp(x − max)`.
fn log_sum_exp(row: &[f32]) -> f32 {
    let max = fast_exp::max(row);
    max + fast_exp::sum_exp(row, max).ln()
}

/// Writes `(softmax(row) − onehot(t)) · g` into `d`, every element, for `shift` the row's
/// [`log_sum_exp`] (not read when `g` is 0: the row is then zeros).
fn write_grad_row(row: &[f32], t: usize, shift: f32, g: f32, d: &mut [MaybeUninit<f32>]) {
    if g == 0.0 {
        d.fill(MaybeUninit::new(0.0));
        return;
    }
    for (j, (d, &x)) in d.iter_mut().zip(row).enumerate() {
        let target = if j == t { 1.0 } else { 0.0 };
        d.write((fast_exp::exp(x - shift) - target) * g);
    }
}

struct TokenNll;

impl FusedOp<2> for TokenNll {
    const NAME: &'static str = "token-nll";

    fn cpu(
        &self,
        [(logits, logits_layout), (targets, targets_layout)]: [CpuOperand; 2],
    ) -> CpuOutput {
        let (n, vocab, targets) = cpu_targets(logits_layout, targets, targets_layout)?;
        let logits = f32s(logits, logits_layout)?;
        let nll: Vec<f32> = logits
            .par_chunks(vocab.max(1))
            .zip(targets.par_iter())
            .with_min_len(MIN_ROWS_PER_TASK)
            .map(|(row, &t)| log_sum_exp(row) - row[t as usize])
            .collect();
        Ok(output(nll, n))
    }

    #[cfg(feature = "cuda")]
    fn cuda(&self, [logits, targets]: [Operand; 2]) -> CudaOutput {
        let (n, _) = rows_and_width(logits.1)?;
        Ok((cuda::token_nll(logits, targets)?, n.into()))
    }

    fn backward(
        &self,
        [logits, targets]: [&Tensor; 2],
        _nll: &Tensor,
        grad: &Tensor,
    ) -> Result<[Option<Tensor>; 2]> {
        let g = grad.to_dtype(DType::F32)?.contiguous()?;
        let dlogits = fused_grad(&logits.detach(), targets, &g)?;
        Ok([Some(dlogits), None])
    }
}

custom_op!(TokenNll: 2);

struct TokenNllGrad;

impl FusedOp<3> for TokenNllGrad {
    const NAME: &'static str = "token-nll-grad";

    fn cpu(
        &self,
        [(logits, logits_layout), (targets, targets_layout), (g, g_layout)]: [CpuOperand; 3],
    ) -> CpuOutput {
        let (n, vocab, targets) = cpu_targets(logits_layout, targets, targets_layout)?;
        let (logits, g) = (
            f32s(logits, logits_layout)?,
            cpu_row_scales(g, g_layout, n)?,
        );
        // SAFETY: `write_grad_row` writes every element of the row.
        let out = unsafe {
            written_rows(logits.len(), vocab, |r, d| {
                let (row, g) = (&logits[r * vocab..][..vocab], g[r]);
                // A skipped row (scale 0) is zeros: its log-sum-exp is not needed.
                let shift = if g == 0.0 { 0.0 } else { log_sum_exp(row) };
                write_grad_row(row, targets[r] as usize, shift, g, d);
            })
        };
        Ok(output(out, logits_layout.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda(&self, [logits, targets, g]: [Operand; 3]) -> CudaOutput {
        let d = cuda::token_nll_grad(logits, targets, g)?;
        Ok((d, logits.1.shape().clone()))
    }
}

custom_op!(TokenNllGrad: 3);

/// The CUDA launchers (`kernels/loss.cu`).
#[cfg(feature = "cuda")]
mod cuda {
    use crate::launch::constants::{HELD_THREADS, HELD_WORDS};
    use crate::launch::{
        address, alloc, base_address, common_dtype, grid, int, launch, per_row, run, Arg, Operand,
    };
    use crate::rows_and_width;
    use candle_core::backend::BackendStorage;
    use candle_core::{CudaStorage, DType, Result};

    fn check_targets(targets: Operand, rows: usize) -> Result<()> {
        if targets.0.dtype() != DType::U32 || targets.1.shape().elem_count() != rows {
            candle_core::bail!(
                "cross-entropy: {rows} rows of logits, {} {:?} targets",
                targets.1.shape().elem_count(),
                targets.0.dtype()
            );
        }
        Ok(())
    }

    /// Per-row NLL (f32) of u32 `targets` under `logits` `[n, vocab]`.
    pub(super) fn token_nll(logits: Operand, targets: Operand) -> Result<CudaStorage> {
        let dtype = common_dtype(&[logits])?;
        let (rows, vocab) = rows_and_width(logits.1)?;
        check_targets(targets, rows)?;
        let nll = alloc(&logits.0.device, DType::F32, rows)?;
        let shape = per_row(rows, vocab, 512)?;
        run(
            ("token_nll", dtype),
            shape,
            &[logits, targets],
            nll,
            &[int(vocab)?],
        )
    }

    /// `(softmax(logits) − onehot(targets)) · g` per row, in the logits' dtype; `g` is f32 `[n]`.
    pub(super) fn token_nll_grad(
        logits: Operand,
        targets: Operand,
        g: Operand,
    ) -> Result<CudaStorage> {
        let dtype = common_dtype(&[logits])?;
        let (rows, vocab) = rows_and_width(logits.1)?;
        check_targets(targets, rows)?;
        check_row_scales(g, rows)?;
        let d = alloc(&logits.0.device, dtype, rows * vocab)?;
        let shape = per_row(rows, vocab, 512)?;
        run(
            ("token_nll_grad", dtype),
            shape,
            &[logits, targets, g],
            d,
            &[int(vocab)?],
        )
    }

    /// Per-row NLL (f32 `[n]`) and `(softmax − onehot) · g` per row (the logits' dtype) in one
    /// kernel; `g` is f32 `[n]`. Rows that fit [`held_cluster`] are read once, others twice.
    pub(super) fn token_nll_with_grad(
        logits: Operand,
        targets: Operand,
        g: Operand,
    ) -> Result<(CudaStorage, CudaStorage)> {
        let dtype = common_dtype(&[logits])?;
        let (rows, vocab) = rows_and_width(logits.1)?;
        check_targets(targets, rows)?;
        check_row_scales(g, rows)?;
        let device = &logits.0.device;
        let nll = alloc(device, DType::F32, rows)?;
        let d = alloc(device, dtype, rows * vocab)?;
        let logits_address = address(logits)?;
        let args = [
            Arg::Address(logits_address),
            Arg::Address(address(targets)?),
            Arg::Address(address(g)?),
            Arg::Address(base_address(&nll)?),
            Arg::Address(base_address(&d)?),
            int(vocab)?,
        ];
        let aligned = logits_address % 16 == 0;
        let (name, grid, block) = match held_cluster(device, dtype, vocab, aligned)? {
            Some(cluster) => (
                format!("token_nll_with_grad_held{cluster}"),
                grid(rows * cluster)?,
                (HELD_THREADS as u32, 1),
            ),
            None => {
                let (grid, block) = per_row(rows, vocab, 512)?;
                ("token_nll_with_grad".to_string(), grid, block)
            }
        };
        launch(device, &name, Some(dtype), grid, block, &args)?;
        Ok((nll, d))
    }

    /// The blocks (1, 2, 4 or 8: a cluster) over which `kernels/loss.cu`'s held kernel spreads
    /// a row of `vocab` logits of `dtype`, each thread holding its share in registers so the
    /// row is read once; `None` where it does not apply: rows not of whole 16-byte words from
    /// an `aligned` start, rows wider than 8 blocks hold (262,144 16-bit logits), and rows of
    /// several blocks on a GPU or build without clusters (compute capability 9.0, and its
    /// machine code in the build: build.rs's `llmtool_wgmma`).
    fn held_cluster(
        device: &candle_core::CudaDevice,
        dtype: DType,
        vocab: usize,
        aligned: bool,
    ) -> Result<Option<usize>> {
        let per_word = 16 / dtype.size_in_bytes();
        if !aligned || vocab % per_word != 0 {
            return Ok(None);
        }
        let per_block = HELD_THREADS * HELD_WORDS * per_word;
        let Some(cluster) = [1, 2, 4, 8].into_iter().find(|&c| c * per_block >= vocab) else {
            return Ok(None);
        };
        Ok((cluster == 1 || crate::launch::runs_hopper_code(device)?).then_some(cluster))
    }

    /// Checks that `g` holds one f32 scale per row.
    fn check_row_scales(g: Operand, rows: usize) -> Result<()> {
        if g.0.dtype() != DType::F32 || g.1.shape().elem_count() != rows {
            candle_core::bail!(
                "cross-entropy gradient: {rows} rows, {:?} row scales",
                g.1.shape()
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use crate::parity::{assert_parity, relative_error, uniform};
    use candle_core::{Device, Tensor};

    #[test]
    fn matches_the_reference_forward_and_backward() {
        for (i, &(n, vocab)) in [(1, 3), (5, 7), (13, 1000), (4, 1)].iter().enumerate() {
            let logits = (uniform(&[n, vocab], i as u64) * 4.0).unwrap();
            let targets: Vec<u32> = (0..n).map(|r| ((r * 7 + i) % vocab) as u32).collect();
            let inputs = [logits, Tensor::new(targets, &Device::Cpu).unwrap()];
            assert_parity(
                "token_nll",
                &inputs,
                &[true, false],
                |t| t[0].apply_op2(&t[1], super::TokenNll),
                |t| super::reference_nll(&t[0], &t[1]),
                1e-5,
            );
        }
    }

    #[test]
    fn nll_with_grad_matches_the_reference_nll_and_gradient() {
        // The last shape is large enough for the parallel path; every third row has scale 0.
        for (i, &(n, vocab)) in [(1, 3), (5, 7), (4, 1), (40, 1000)].iter().enumerate() {
            let logits = (uniform(&[n, vocab], i as u64) * 4.0).unwrap();
            let targets: Vec<u32> = (0..n).map(|r| ((r * 7 + i) % vocab) as u32).collect();
            let targets = Tensor::new(targets, &Device::Cpu).unwrap();
            let scales: Vec<f32> = (0..n).map(|r| (r % 3 != 0) as u8 as f32 * 0.5).collect();
            let g = Tensor::new(scales, &Device::Cpu).unwrap();
            let (nll, d) = super::fused_with_grad(&logits, &targets, &g).unwrap();
            let want_nll = super::reference_nll(&logits, &targets).unwrap();
            let want_d = super::reference_grad(&logits, &targets, &g).unwrap();
            let errors = [relative_error(&nll, &want_nll), relative_error(&d, &want_d)];
            assert!(
                errors.iter().all(|&e| e < 1e-5),
                "[{n}, {vocab}]: {errors:?}"
            );
        }
    }

    #[test]
    fn rejects_targets_outside_the_vocabulary() {
        let logits = uniform(&[2, 4], 1);
        let targets = Tensor::new(&[1u32, 4], &Device::Cpu).unwrap();
        let err = logits.apply_op2(&targets, super::TokenNll).unwrap_err();
        assert!(err.to_string().contains("target id 4"), "{err}");
    }
}
