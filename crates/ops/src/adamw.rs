//! Fused AdamW updates. On the CPU, one rayon pass per parameter reads the weight, gradient and
//! both moments and writes their new values, instead of ~10 tensor ops with a fresh buffer each.
//! On CUDA, one kernel launch updates every parameter in place ([`prepare_in_place`],
//! [`PreparedUpdate::run`]). The sum of the squares of every gradient ([`sum_of_squares`]) is
//! one more launch on CUDA, and one rayon pass per gradient on the CPU. The CUDA kernels are in
//! `kernels/adamw.cu`.

use super::cpu_kernel::{f32s, with_operands, ELEMENTWISE_CHUNK};
use super::fast_exp;
use candle_core::{DType, Device, Result, Storage, Tensor, Var};
use rayon::prelude::*;

/// The scalars of one AdamW update, bias corrections included.
#[derive(Debug, Clone, Copy)]
pub struct AdamWUpdate {
    /// Learning rate.
    pub lr: f64,
    /// First-moment decay.
    pub beta1: f64,
    /// Second-moment decay.
    pub beta2: f64,
    /// Added to the root of the second moment.
    pub eps: f64,
    /// `lr * weight_decay`, or 0 for parameters without decay.
    pub decay: f64,
    /// `1 - beta1^t`.
    pub bias1: f64,
    /// `1 - beta2^t`.
    pub bias2: f64,
    /// Factor applied to the gradient first (global-norm clipping), 1 for none.
    pub grad_scale: f64,
}

/// Updates `param` in place from `grad` and returns the new `(m, v)`, or `None` (nothing
/// touched) when the operands are not all f32 CPU tensors of one size.
pub fn adamw_step(
    param: &Var,
    m: &Tensor,
    v: &Tensor,
    grad: &Tensor,
    u: &AdamWUpdate,
) -> Result<Option<(Tensor, Tensor)>> {
    let operands = [param.as_tensor(), m, v, grad];
    if operands
        .iter()
        .any(|t| !t.device().is_cpu() || t.dtype() != DType::F32 || !t.is_contiguous())
    {
        return Ok(None);
    }
    let n = param.elem_count();
    // Read locks on the four storages, released before `Var::set` takes the write lock.
    let updated = with_operands(&operands, |ops| {
        let slices = ops
            .iter()
            .map(|(storage, layout)| f32s(storage, layout))
            .collect::<Result<Vec<_>>>()?;
        let [w, m, v, g] = slices[..] else {
            candle_core::bail!("adamw: four operands expected");
        };
        if [m.len(), v.len(), g.len()].iter().any(|&len| len != n) {
            return Ok(None);
        }
        // Collected straight into the new buffers (no zero-filling first: three parameter-sized
        // memsets per step otherwise).
        let step = Step::new(u);
        let new: (Vec<f32>, (Vec<f32>, Vec<f32>)) = w
            .par_iter()
            .zip(m)
            .zip(v)
            .zip(g)
            .with_min_len(ELEMENTWISE_CHUNK)
            .map(|(((&w, &m), &v), &g)| step.apply(w, m, v, g))
            .unzip();
        Ok(Some(new))
    })?;
    let Some((new_w, (new_m, new_v))) = updated else {
        return Ok(None);
    };
    param.set(&Tensor::from_vec(new_w, param.shape(), param.device())?)?;
    let shape = param.shape();
    Ok(Some((
        Tensor::from_vec(new_m, shape, param.device())?,
        Tensor::from_vec(new_v, shape, param.device())?,
    )))
}

/// The update's constants in f32.
struct Step {
    b1: f32,
    b2: f32,
    c1: f32,
    c2: f32,
    bias1: f32,
    bias2: f32,
    eps: f32,
    lr: f32,
    keep: f32,
    scale: f32,
}

impl Step {
    fn new(u: &AdamWUpdate) -> Self {
        let (b1, b2) = (u.beta1 as f32, u.beta2 as f32);
        Self {
            b1,
            b2,
            c1: 1.0 - b1,
            c2: 1.0 - b2,
            bias1: u.bias1 as f32,
            bias2: u.bias2 as f32,
            eps: u.eps as f32,
            lr: u.lr as f32,
            keep: (1.0 - u.decay) as f32,
            scale: u.grad_scale as f32,
        }
    }

    /// The new `(w, (m, v))` of one element, in the order of operations of the composite
    /// optimizer.
    #[inline]
    fn apply(&self, w: f32, m: f32, v: f32, g: f32) -> (f32, (f32, f32)) {
        let g = g * self.scale;
        let m = m * self.b1 + g * self.c1;
        let v = v * self.b2 + g * g * self.c2;
        let denom = (v / self.bias2).sqrt() + self.eps;
        (w * self.keep - (m / self.bias1) / denom * self.lr, (m, v))
    }
}

/// One parameter of an in-place update: the weight, its moments, its f32 gradient, and
/// `lr * weight_decay` (0 without decay).
pub struct InPlaceParam<'a> {
    /// The weight, updated in place.
    pub param: &'a Var,
    /// First-moment estimate, updated in place.
    pub m: &'a Tensor,
    /// Second-moment estimate, updated in place.
    pub v: &'a Tensor,
    /// The f32 gradient.
    pub grad: &'a Tensor,
    /// `lr * weight_decay`, or 0 for a parameter without decay.
    pub decay: f64,
    /// A bf16 or f16 copy of the weight (contiguous, same size, on its device) that the update
    /// overwrites with the new weight's cast, where one is kept.
    pub copy: Option<&'a Tensor>,
}

/// Whether [`prepare_in_place`] can take this parameter: every operand a contiguous f32 CUDA
/// tensor of one size, and the moments in buffers of their own (they are written in place).
pub fn in_place_supported(param: &Var, m: &Tensor, v: &Tensor, grad: &Tensor) -> bool {
    let operands = [param.as_tensor(), m, v, grad];
    cfg!(feature = "cuda")
        && operands.iter().all(|t| {
            t.device().is_cuda()
                && t.dtype() == DType::F32
                && t.is_contiguous()
                && t.elem_count() == param.elem_count()
        })
        && !shares_storage(m, v)
        && !shares_storage(m, param.as_tensor())
        && !shares_storage(v, param.as_tensor())
}

/// Whether `copy` can be the compute-dtype copy an in-place update writes for `param`: a
/// contiguous bf16 or f16 tensor of its size on its device.
pub fn copy_supported(param: &Var, copy: &Tensor) -> bool {
    matches!(copy.dtype(), DType::BF16 | DType::F16)
        && copy.is_contiguous()
        && copy.elem_count() == param.elem_count()
        && copy.device().same_device(param.device())
}

/// Whether two tensors are views of one buffer.
fn shares_storage(a: &Tensor, b: &Tensor) -> bool {
    let first: *const Storage = &*a.storage_and_layout().0;
    std::ptr::eq(first, &*b.storage_and_layout().0)
}

/// An in-place update of parameters that pass [`in_place_supported`], ready to launch: its
/// table of the parameters' buffers built and on its way to the device ([`prepare_in_place`]),
/// so a step can prepare it while the device still runs the step's passes and launch it
/// ([`PreparedUpdate::run`]) as soon as the gradient norm is known, with no host work between.
pub struct PreparedUpdate {
    #[cfg(feature = "cuda")]
    launch: cuda::PreparedLaunch,
}

/// Prepares the in-place update of every parameter (and its moments) in `params`, each with
/// its own decay; `None` for no parameters. All must pass [`in_place_supported`].
pub fn prepare_in_place(params: &[InPlaceParam]) -> Result<Option<PreparedUpdate>> {
    if params.is_empty() {
        return Ok(None);
    }
    #[cfg(feature = "cuda")]
    {
        Ok(cuda::prepare(params)?.map(|launch| PreparedUpdate { launch }))
    }
    #[cfg(not(feature = "cuda"))]
    {
        candle_core::bail!("adamw: in-place updates need the cuda feature")
    }
}

impl PreparedUpdate {
    /// Launches the update, one kernel for all its parameters, with the scalars of `u` (its
    /// `decay` is ignored: each parameter has its own).
    pub fn run(&self, u: &AdamWUpdate) -> Result<()> {
        #[cfg(feature = "cuda")]
        {
            self.launch.run(u)
        }
        #[cfg(not(feature = "cuda"))]
        {
            let _ = u;
            Ok(())
        }
    }
}

/// The sum of squares of all `tensors` when they are all contiguous f32 tensors on the CPU (a
/// rayon pass per tensor, in fixed chunks added in order, so the result does not depend on the
/// number of threads) or all on CUDA (one launch); `None` otherwise (the caller takes the
/// composite path).
pub fn sum_of_squares(tensors: &[&Tensor]) -> Result<Option<f64>> {
    let all = |on: fn(&Device) -> bool| {
        !tensors.is_empty()
            && tensors
                .iter()
                .all(|t| on(t.device()) && t.dtype() == DType::F32 && t.is_contiguous())
    };
    if all(Device::is_cpu) {
        return cpu_sum_of_squares(tensors).map(Some);
    }
    if !all(Device::is_cuda) {
        return Ok(None);
    }
    #[cfg(feature = "cuda")]
    {
        cuda::sum_of_squares(tensors).map(Some)
    }
    #[cfg(not(feature = "cuda"))]
    {
        Ok(None)
    }
}

/// [`sum_of_squares`] of CPU tensors: f32 sums per chunk, added in f64.
fn cpu_sum_of_squares(tensors: &[&Tensor]) -> Result<f64> {
    with_operands(tensors, |ops| {
        let mut total = 0f64;
        for (storage, layout) in ops {
            let chunks: Vec<f32> = f32s(storage, layout)?
                .par_chunks(ELEMENTWISE_CHUNK)
                .map(fast_exp::sum_squares)
                .collect();
            total += chunks.iter().map(|&c| c as f64).sum::<f64>();
        }
        Ok(total)
    })
}

/// The CUDA launchers (`kernels/adamw.cu`): one launch for all parameters, each described by
/// its buffers' addresses in a table the kernel reads.
#[cfg(feature = "cuda")]
mod cuda {
    use super::{AdamWUpdate, InPlaceParam};
    use crate::launch::constants::ADAMW_WORDS as WORDS;
    use crate::launch::{alloc, base_address, grid, int, launch, zeros_f32, Arg};
    use candle_core::cuda_backend::cudarc::driver::DevicePtr;
    use candle_core::{CudaDevice, CudaStorage, DType, Layout, Result, Storage, Tensor};

    /// The device and buffer address of a contiguous CUDA tensor's first element.
    fn locate(t: &Tensor) -> Result<(CudaDevice, u64)> {
        let (storage, layout): (_, &Layout) = t.storage_and_layout();
        match &*storage {
            Storage::Cuda(s) => {
                let offset = layout.start_offset() * t.dtype().size_in_bytes();
                Ok((s.device.clone(), base_address(s)? + offset as u64))
            }
            _ => candle_core::bail!("adamw: operand is not on a CUDA device"),
        }
    }

    /// The table of `params`' buffers uploaded for one `adamw_multi` launch; `None` when none
    /// is on a CUDA device.
    pub(super) fn prepare(params: &[InPlaceParam]) -> Result<Option<PreparedLaunch>> {
        let mut device = None;
        let buffers = params
            .iter()
            .map(|p| {
                let (dev, weight) = locate(p.param.as_tensor())?;
                device.get_or_insert(dev);
                let copy = match p.copy {
                    Some(copy) => (locate(copy)?.1, CopyKind::of(copy.dtype())?),
                    None => (0, CopyKind::None),
                };
                Ok(ParamBuffers {
                    weight,
                    grad: locate(p.grad)?.1,
                    m: locate(p.m)?.1,
                    v: locate(p.v)?.1,
                    len: p.param.elem_count(),
                    keep: (1.0 - p.decay) as f32,
                    copy,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let Some(device) = device else {
            return Ok(None);
        };
        let (table, chunks) = descriptor_table(&device, &buffers)?;
        // Every buffer the table points at, held until the launch has been enqueued.
        let operands = params
            .iter()
            .flat_map(|p| {
                [p.param.as_tensor(), p.grad, p.m, p.v]
                    .into_iter()
                    .chain(p.copy)
            })
            .cloned()
            .collect();
        Ok(Some(PreparedLaunch {
            device,
            table,
            params: buffers.len(),
            chunks,
            _operands: operands,
        }))
    }

    /// An `adamw_multi` launch whose descriptor table is on the device.
    pub(super) struct PreparedLaunch {
        device: CudaDevice,
        table: candle_core::cuda_backend::cudarc::driver::CudaSlice<u64>,
        params: usize,
        chunks: usize,
        _operands: Vec<Tensor>,
    }

    impl PreparedLaunch {
        /// One in-place AdamW update of every parameter of the table, in one launch.
        pub(super) fn run(&self, u: &AdamWUpdate) -> Result<()> {
            let table_address = self.table.device_ptr(&self.device.cuda_stream()).0;
            let args = [
                Arg::Address(table_address),
                Arg::Address(table_address + (8 * WORDS * self.params) as u64),
                int(MULTI_CHUNK)?,
                Arg::Float(u.lr as f32),
                Arg::Float(u.beta1 as f32),
                Arg::Float(u.beta2 as f32),
                Arg::Float(u.eps as f32),
                Arg::Float(u.bias1 as f32),
                Arg::Float(u.bias2 as f32),
                Arg::Float(u.grad_scale as f32),
            ];
            launch(
                &self.device,
                "adamw_multi",
                None,
                grid(self.chunks)?,
                (256, 1),
                &args,
            )
        }
    }

    pub(super) fn sum_of_squares(tensors: &[&Tensor]) -> Result<f64> {
        let mut device = None;
        let buffers = tensors
            .iter()
            .map(|t| {
                let (dev, grad) = locate(t)?;
                device.get_or_insert(dev);
                Ok(ParamBuffers {
                    weight: 0,
                    grad,
                    m: 0,
                    v: 0,
                    len: t.elem_count(),
                    keep: 1.0,
                    copy: (0, CopyKind::None),
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let Some(device) = device else {
            return Ok(0.0);
        };
        let total = sum_squares_multi(&device, &buffers)?;
        let host = device.clone_dtoh(total.as_cuda_slice::<f32>()?)?;
        Ok(host.first().copied().unwrap_or(0.0) as f64)
    }

    /// One parameter of a multi-tensor launch: f32 buffer addresses and size.
    struct ParamBuffers {
        weight: u64,
        grad: u64,
        m: u64,
        v: u64,
        len: usize,
        /// `1 − lr · weight_decay` (1 without decay).
        keep: f32,
        /// The address and dtype of the weight's compute-dtype copy (0 and `None`: no copy).
        copy: (u64, CopyKind),
    }

    /// The dtype of a weight's copy as the kernel reads it (`COPY_BF16`, `COPY_F16`).
    #[derive(Clone, Copy)]
    enum CopyKind {
        None = 0,
        Bf16 = 1,
        F16 = 2,
    }

    impl CopyKind {
        fn of(dtype: DType) -> Result<Self> {
            match dtype {
                DType::BF16 => Ok(Self::Bf16),
                DType::F16 => Ok(Self::F16),
                other => candle_core::bail!("adamw: a weight copy in {other:?}"),
            }
        }
    }

    /// Elements per block of the multi-tensor kernels.
    const MULTI_CHUNK: usize = 1 << 16;

    /// Uploads the descriptor table of `params` ([`WORDS`] each) followed by the chunk list (one
    /// word per block: parameter index << 40 | first element). Returns it and the number of
    /// chunks.
    fn descriptor_table(
        device: &CudaDevice,
        params: &[ParamBuffers],
    ) -> Result<(
        candle_core::cuda_backend::cudarc::driver::CudaSlice<u64>,
        usize,
    )> {
        let mut words = Vec::with_capacity(WORDS * params.len());
        let mut chunks = Vec::new();
        for (i, p) in params.iter().enumerate() {
            words.extend([
                p.weight,
                p.grad,
                p.m,
                p.v,
                p.len as u64,
                p.keep.to_bits() as u64,
                p.copy.0,
                p.copy.1 as u64,
            ]);
            chunks.extend(
                (0..p.len)
                    .step_by(MULTI_CHUNK)
                    .map(|s| (i as u64) << 40 | s as u64),
            );
        }
        let n_chunks = chunks.len();
        words.extend(chunks);
        Ok((device.clone_htod(&words)?, n_chunks))
    }

    /// The sum of squares of the gradients in `params` (only `grad` and `len` are read), as an f32
    /// scalar on the device. Deterministic: per-chunk partials are summed in a fixed order.
    fn sum_squares_multi(device: &CudaDevice, params: &[ParamBuffers]) -> Result<CudaStorage> {
        let out = zeros_f32(device, 1)?;
        if params.is_empty() {
            return Ok(out);
        }
        let (table, chunks) = descriptor_table(device, params)?;
        let table_address = table.device_ptr(&device.cuda_stream()).0;
        let partial = alloc(device, DType::F32, chunks)?;
        let args = [
            Arg::Address(table_address),
            Arg::Address(table_address + (8 * WORDS * params.len()) as u64),
            int(MULTI_CHUNK)?,
            Arg::Address(base_address(&partial)?),
        ];
        launch(
            device,
            "sum_squares_multi",
            None,
            grid(chunks)?,
            (256, 1),
            &args,
        )?;
        let args = [
            Arg::Address(base_address(&partial)?),
            int(chunks)?,
            Arg::Address(base_address(&out)?),
        ];
        launch(device, "sum_partials", None, (1, 1), (1024, 1), &args)?;
        Ok(out)
    }
}
