//! NCCL, through the cudarc bindings candle's CUDA backend is built on: the sum of an f32 CUDA
//! tensor over the ranks of a communicator, enqueued on the device's one stream (so it follows
//! the backward pass that produced the tensor, and the optimizer step follows it).
//!
//! NVLink SHARP (multicast) stays off: [`NcclComm::new`] sets `NCCL_NVLS_ENABLE=0` unless the
//! environment already sets it, as the lent GPU machines require.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::nccl::{Comm, Id, ReduceOp};
use candle_core::{CpuStorage, CudaStorage, Device, InplaceOp1, Layout, Result, Tensor};
use std::sync::Mutex;

/// Bytes of an NCCL unique id, which rank 0 creates and the other ranks receive.
pub const ID_BYTES: usize = 128;

fn nccl_error(what: &str, e: impl std::fmt::Debug) -> candle_core::Error {
    candle_core::Error::Msg(format!("NCCL {what}: {e:?}"))
}

/// A new NCCL unique id for rank 0 to share with the other ranks.
pub fn unique_id() -> Result<[u8; ID_BYTES]> {
    let id = Id::new().map_err(|e| nccl_error("unique id", e))?;
    Ok(id.internal().map(|c| c as u8))
}

/// This rank's member of an NCCL communicator on one CUDA device.
pub struct NcclComm {
    comm: Mutex<Comm>,
}

// SAFETY: an NCCL communicator may be used from any thread, one call at a time, which the
// mutex ensures; cudarc leaves `Comm` !Send only because it holds a raw pointer.
unsafe impl Send for NcclComm {}
// SAFETY: as above: every use goes through the mutex.
unsafe impl Sync for NcclComm {}

impl NcclComm {
    /// Joins the communicator `id` names as `rank` of `world`, on `device`'s stream. Every rank
    /// must call it at the same time: it returns once all have joined.
    pub fn new(device: &Device, rank: usize, world: usize, id: &[u8; ID_BYTES]) -> Result<Self> {
        let Device::Cuda(cuda) = device else {
            candle_core::bail!("NCCL needs a CUDA device, not {device:?}");
        };
        if std::env::var_os("NCCL_NVLS_ENABLE").is_none() {
            // SAFETY: set before NCCL reads its environment, while no other thread of this
            // process reads or writes the environment (the ranks are still starting).
            unsafe { std::env::set_var("NCCL_NVLS_ENABLE", "0") };
        }
        let id = Id::uninit(id.map(|b| b as std::ffi::c_char));
        let comm = Comm::from_rank(cuda.cuda_stream(), rank, world, id)
            .map_err(|e| nccl_error("joining the communicator", e))?;
        Ok(Self {
            comm: Mutex::new(comm),
        })
    }

    /// The sum over the ranks of the 1-D f32 CUDA tensor `flat`, in a new tensor.
    pub fn all_reduce_sum(&self, flat: &Tensor) -> Result<Tensor> {
        let sum = flat.copy()?;
        let comm = self
            .comm
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        sum.inplace_op1(&AllReduceSum(&comm))?;
        Ok(sum)
    }
}

/// Sums a contiguous f32 CUDA buffer over the communicator's ranks, in place.
struct AllReduceSum<'a>(&'a Comm);

impl InplaceOp1 for AllReduceSum<'_> {
    fn name(&self) -> &'static str {
        "nccl-all-reduce-sum"
    }

    fn cpu_fwd(&self, _: &mut CpuStorage, _: &Layout) -> Result<()> {
        candle_core::bail!("NCCL sums CUDA tensors only")
    }

    fn cuda_fwd(&self, storage: &mut CudaStorage, layout: &Layout) -> Result<()> {
        if storage.dtype() != candle_core::DType::F32 || !layout.is_contiguous() {
            candle_core::bail!("NCCL all-reduce: needs a contiguous f32 tensor");
        }
        let range = layout.start_offset()..layout.start_offset() + layout.shape().elem_count();
        let mut view = storage.as_cuda_slice_mut::<f32>()?.slice_mut(range);
        self.0
            .all_reduce_in_place(&mut view, &ReduceOp::Sum)
            .map_err(|e| nccl_error("all-reduce", e))?;
        Ok(())
    }
}
