//! The index of each row's largest value: greedy decoding's next token. candle's CUDA argmax
//! reduces a whole row in one block of threads, 85 µs for a row of 128,256 logits on an H200
//! (a tenth of a Llama-3.2-1B decode step); here blocks across the row each reduce a chunk,
//! and one block per row then reduces their results (`kernels/decode.cu`).

use super::fused_op::{custom_op, CpuOperand, CpuOutput, FusedOp};
#[cfg(feature = "cuda")]
use super::fused_op::{CudaOutput, Operand};
use super::PicksLog;
#[cfg(feature = "cuda")]
use candle_core::{CpuStorage, InplaceOp2, Layout};
use candle_core::{DType, Result, Tensor, D};

/// The index of the largest value along the last dimension of `x`, as `u32` with that
/// dimension removed. Ties go to the lowest index, as candle's CPU argmax, so the CPU and
/// CUDA pick the same token.
pub fn argmax(x: &Tensor) -> Result<Tensor> {
    if x.device().is_cuda() && super::fused(&[x]) && x.rank() > 0 {
        let mut dims = x.dims().to_vec();
        dims.pop();
        let width = x.dim(D::Minus1)?;
        let rows = x.contiguous()?.reshape(((), width))?;
        return rows.apply_op1_no_bwd(&Argmax)?.reshape(dims);
    }
    x.argmax(D::Minus1)
}

/// Greedy decoding's hand-off from one one-token step to the next on the device: writes the
/// [`argmax`] of each row of `logits` `[rows, vocab]` into `step[..rows]` and into `log` at the
/// step's position, then adds one to `step[rows]` and `step[rows + 1]`, where `step` (u32
/// `[rows + 2]`) holds a step's tokens, its position and the position's slot in the window
/// layers (as `model::Decoder` keeps them). A captured step that ends with it leaves the next
/// step's input in place, so the host can replay the next step before it has read this one's
/// tokens, which it reads from the log ([`PicksLog::read`]).
pub fn greedy_step(logits: &Tensor, step: &Tensor, log: &PicksLog) -> Result<()> {
    let (rows, _) = logits.dims2()?;
    check_step(rows, step, log)?;
    #[cfg(feature = "cuda")]
    if logits.device().is_cuda() && super::fused(&[logits]) {
        let log = log.device_address()?;
        let op = GreedyStep { log, maxima: false };
        return step.inplace_op2(&logits.contiguous()?, &op);
    }
    let picks = argmax(logits)?;
    let position = step.narrow(0, rows, 1)?.to_vec1::<u32>()?[0];
    log.write(position as usize, &picks.to_vec1::<u32>()?)?;
    let one = Tensor::ones(2, DType::U32, step.device())?;
    let next = step.narrow(0, rows, 2)?.broadcast_add(&one)?;
    step.slice_set(&Tensor::cat(&[picks, next], 0)?, 0, 0)
}

/// Checks that `step` is a step tensor and `log` a picks log for `rows` rows.
fn check_step(rows: usize, step: &Tensor, log: &PicksLog) -> Result<()> {
    if log.rows() != rows {
        candle_core::bail!("greedy_step: a log of {} rows for {rows}", log.rows());
    }
    if step.dtype() != DType::U32 || step.dims() != [rows + 2] || !step.is_contiguous() {
        candle_core::bail!(
            "greedy_step: the step tensor must be u32 [{}] and contiguous, not {:?} {:?}",
            rows + 2,
            step.dtype(),
            step.dims()
        );
    }
    Ok(())
}

/// [`greedy_step`] for one row from the largest value of each block of a head's product and
/// its index, `maxima` (u32 `[2, blocks]`: the values' f32 bits, then the indices; what
/// `gemv_rms_maxima` writes, see [`super::rms_norm_head_greedy_step`]): the last of argmax's
/// two kernels alone.
#[cfg(feature = "cuda")]
pub(crate) fn greedy_step_from_maxima(
    maxima: &Tensor,
    step: &Tensor,
    log: &PicksLog,
) -> Result<()> {
    check_step(1, step, log)?;
    let log = log.device_address()?;
    step.inplace_op2(maxima, &GreedyStep { log, maxima: true })
}

/// [`greedy_step`]'s CUDA kernels, in place on the step tensor, and the device address of
/// the picks log they write; with `maxima`, from blocks' maxima of one row
/// ([`greedy_step_from_maxima`]) rather than from logits.
#[cfg(feature = "cuda")]
struct GreedyStep {
    log: u64,
    maxima: bool,
}

#[cfg(feature = "cuda")]
impl InplaceOp2 for GreedyStep {
    fn name(&self) -> &'static str {
        "greedy-step"
    }

    fn cpu_fwd(&self, _: &mut CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout) -> Result<()> {
        candle_core::bail!("greedy_step: the in-place kernel is CUDA only")
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        step: &mut candle_core::CudaStorage,
        step_layout: &Layout,
        input: &candle_core::CudaStorage,
        input_layout: &Layout,
    ) -> Result<()> {
        let rows = step_layout.shape().elem_count() - 2;
        let out = crate::launch::address((step, step_layout))?;
        // The position and slot follow the tokens: u32s, four bytes each.
        let log = cuda::Log {
            advance: out + 4 * rows as u64,
            address: self.log,
        };
        if !self.maxima {
            return cuda::argmax_into((input, input_layout), out, Some(log));
        }
        let (_, blocks) = super::rows_and_width(input_layout)?;
        let values = crate::launch::address((input, input_layout))?;
        let partial = (values, values + 4 * blocks as u64);
        cuda::finish(&input.device, partial, (blocks, 1), out, Some(log))
    }
}

/// The argmax of each row of a `[rows, width]` tensor, on CUDA only ([`argmax`] sends every
/// other device to candle's).
struct Argmax;

impl FusedOp<1> for Argmax {
    const NAME: &'static str = "argmax";

    fn cpu(&self, _: [CpuOperand; 1]) -> CpuOutput {
        candle_core::bail!("argmax: the fused kernel is CUDA only")
    }

    #[cfg(feature = "cuda")]
    fn cuda(&self, [x]: [Operand; 1]) -> CudaOutput {
        let (rows, _) = super::rows_and_width(x.1)?;
        let out = crate::launch::alloc(&x.0.device, DType::U32, rows)?;
        cuda::argmax_into(x, crate::launch::base_address(&out)?, None)?;
        Ok((out, rows.into()))
    }
}

custom_op!(Argmax: 1);

/// The CUDA launchers (`kernels/decode.cu`).
#[cfg(feature = "cuda")]
mod cuda {
    use crate::launch::constants::ARGMAX_CHUNK as CHUNK;
    use crate::launch::{
        address, alloc, base_address, common_dtype, grid, int, int_u32, launch, Arg, Operand,
    };
    use crate::rows_and_width;
    use candle_core::{DType, Result};

    /// Where greedy steps log their picks ([`super::greedy_step`]).
    pub(super) struct Log {
        /// The address of the two `u32`s that go up by one (position and slot); the first is
        /// the step's position in the log.
        pub(super) advance: u64,
        /// The log's device address.
        pub(super) address: u64,
    }

    /// Writes the `u32` index of the largest value of each row of `x` `[rows, width]` at the
    /// device address `out`, and with a `log`, into it too, and moves its position on.
    pub(super) fn argmax_into(x: Operand, out: u64, log: Option<Log>) -> Result<()> {
        let dtype = common_dtype(&[x])?;
        let (rows, width) = rows_and_width(x.1)?;
        let chunks = width.div_ceil(CHUNK).max(1);
        let device = &x.0.device;
        // argmax_chunks writes every partial value and index, argmax_finish every output.
        let partial = alloc(device, DType::F32, rows * chunks)?;
        let partial_indices = alloc(device, DType::U32, rows * chunks)?;
        let (values, indices) = (base_address(&partial)?, base_address(&partial_indices)?);
        launch(
            device,
            "argmax_chunks",
            Some(dtype),
            (int_u32(chunks)?, int_u32(rows)?),
            (256, 1),
            &[
                Arg::Address(address(x)?),
                Arg::Address(values),
                Arg::Address(indices),
                int(width)?,
                int(chunks)?,
            ],
        )?;
        finish(device, (values, indices), (chunks, rows), out, log)
    }

    /// `argmax_finish`: the index of the largest of each row's `chunks` partial maxima (the
    /// device addresses of their values and indices, `[rows, chunks]` each) written at `out`,
    /// and with a `log`, into it too, its position moved on.
    pub(super) fn finish(
        device: &candle_core::CudaDevice,
        (values, indices): (u64, u64),
        (chunks, rows): (usize, usize),
        out: u64,
        log: Option<Log>,
    ) -> Result<()> {
        // A logged step is one block: it reads the position before it moves it on.
        let (blocks, advance, address) = match log {
            Some(log) => (1, log.advance, log.address),
            None => (rows, 0, 0),
        };
        launch(
            device,
            "argmax_finish",
            None,
            grid(blocks)?,
            (256, 1),
            &[
                Arg::Address(values),
                Arg::Address(indices),
                Arg::Address(out),
                int(chunks)?,
                int(rows)?,
                Arg::Address(advance),
                Arg::Address(address),
                int(crate::PICKS_LOG_SLOTS)?,
            ],
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn greedy_step_writes_the_picks_and_moves_the_position_on() {
        let logits = [[0.1f32, 3.0, -1.0, 2.0], [5.0, 1.0, 5.0, 0.0]];
        let logits = Tensor::new(&logits, &Device::Cpu).unwrap();
        let step = Tensor::new(&[7u32, 7, 40, 12], &Device::Cpu).unwrap();
        let log = PicksLog::new(&Device::Cpu, 2).unwrap();
        greedy_step(&logits, &step, &log).unwrap();
        // Ties go to the lowest index, as `argmax`.
        assert_eq!(step.to_vec1::<u32>().unwrap(), [1, 0, 41, 13]);
        assert_eq!(log.read(40).unwrap(), [1, 0]);
        let short = Tensor::new(&[0u32, 0, 0], &Device::Cpu).unwrap();
        let message = greedy_step(&logits, &short, &log).unwrap_err().to_string();
        assert!(message.contains("u32 [4]"), "{message}");
        let one_row = PicksLog::new(&Device::Cpu, 1).unwrap();
        let message = greedy_step(&logits, &step, &one_row)
            .unwrap_err()
            .to_string();
        assert!(message.contains("a log of 1 rows for 2"), "{message}");
    }
}
