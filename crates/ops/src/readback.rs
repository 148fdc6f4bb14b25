//! Reading a few `u32`s back from the device without waiting for the work queued after them:
//! greedy decoding enqueues the next step before the host has seen this step's tokens, and
//! reads them while the next one runs.

use candle_core::{DType, Device, Result, Tensor};

/// A copy of a small `u32` tensor to the host, enqueued on the device's stream behind the work
/// that writes it ([`Readback::start`]) and waited for only when read ([`Readback::wait`]). On
/// CUDA it lands in page-locked memory, so the copy is asynchronous and later work on the
/// stream runs on; elsewhere it is made at once.
#[derive(Default)]
pub struct Readback {
    copy: Copy,
}

#[derive(Default)]
enum Copy {
    /// Nothing started.
    #[default]
    None,
    /// Made at once.
    Host(Vec<u32>),
    /// Enqueued on a CUDA stream.
    #[cfg(feature = "cuda")]
    Cuda(cuda::Pending),
}

impl Readback {
    /// Enqueues a copy of `t` (u32, contiguous, one dimension) to the host; a copy started
    /// before is forgotten (its buffer is reused once that copy has landed).
    pub fn start(&mut self, t: &Tensor) -> Result<()> {
        if t.dtype() != DType::U32 || t.rank() != 1 || !t.is_contiguous() {
            candle_core::bail!(
                "readback: a contiguous u32 vector, not {:?} {:?}",
                t.dtype(),
                t.dims()
            );
        }
        #[cfg(feature = "cuda")]
        if t.device().is_cuda() {
            let reused = match std::mem::take(&mut self.copy) {
                Copy::Cuda(pending) => Some(pending),
                _ => None,
            };
            self.copy = Copy::Cuda(cuda::Pending::start(t, reused)?);
            return Ok(());
        }
        self.copy = Copy::Host(t.to_vec1::<u32>()?);
        Ok(())
    }

    /// The values of the copy started last, once it has landed.
    pub fn wait(&self) -> Result<Vec<u32>> {
        match &self.copy {
            Copy::None => candle_core::bail!("readback: no copy was started"),
            Copy::Host(values) => Ok(values.clone()),
            #[cfg(feature = "cuda")]
            Copy::Cuda(pending) => pending.wait(),
        }
    }
}

/// Whether the host reading from a readback may have to wait: copies from `device` are
/// asynchronous.
pub fn reads_back_later(device: &Device) -> bool {
    cfg!(feature = "cuda") && device.is_cuda()
}

#[cfg(feature = "cuda")]
mod cuda {
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::{CudaEvent, PinnedHostSlice};
    use candle_core::cuda_backend::WrapErr;
    use candle_core::{Result, Storage, Tensor};

    /// A copy in flight into page-locked memory, and an event recorded after it.
    pub(super) struct Pending {
        host: PinnedHostSlice<u32>,
        len: usize,
        landed: CudaEvent,
    }

    impl Pending {
        /// Enqueues the copy of `t` (on a CUDA device) on its device's stream, into
        /// `reuse`'s buffer where it is large enough.
        pub(super) fn start(t: &Tensor, reuse: Option<Self>) -> Result<Self> {
            let len = t.elem_count();
            let (storage, layout) = t.storage_and_layout();
            let Storage::Cuda(storage) = &*storage else {
                candle_core::bail!("readback: the tensor is not on a CUDA device");
            };
            let stream = storage.device().cuda_stream();
            let (mut host, landed) = match reuse {
                Some(p) if p.host.len() >= len => (p.host, p.landed),
                _ => {
                    let context = stream.context();
                    // SAFETY: the buffer is only read after a copy into it has landed.
                    let host = unsafe { context.alloc_pinned_with_flags::<u32>(len, 0) }.w()?;
                    (host, context.new_event(None).w()?)
                }
            };
            let start = layout.start_offset();
            let view = storage.as_cuda_slice::<u32>()?.slice(start..start + len);
            // The pinned buffer's own event makes the copy wait for any earlier read of it.
            stream.memcpy_dtoh(&view, &mut host).w()?;
            landed.record(&stream).w()?;
            Ok(Self { host, len, landed })
        }

        /// The copied values, once the copy has landed.
        pub(super) fn wait(&self) -> Result<Vec<u32>> {
            self.landed.synchronize().w()?;
            Ok(self.host.as_slice().w()?[..self.len].to_vec())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_what_was_there_when_the_copy_started() {
        let t = Tensor::new(&[3u32, 1, 4, 1, 5], &Device::Cpu).unwrap();
        let mut readback = Readback::default();
        assert!(readback.wait().is_err());
        readback.start(&t.narrow(0, 1, 3).unwrap()).unwrap();
        t.slice_set(&Tensor::new(&[9u32], &Device::Cpu).unwrap(), 0, 1)
            .unwrap();
        assert_eq!(readback.wait().unwrap(), [1, 4, 1]);
        let floats = Tensor::new(&[1f32], &Device::Cpu).unwrap();
        let message = readback.start(&floats).unwrap_err().to_string();
        assert!(message.contains("u32 vector"), "{message}");
        assert!(!reads_back_later(&Device::Cpu));
    }
}
