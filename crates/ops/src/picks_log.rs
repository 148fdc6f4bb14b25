//! Where greedy decoding's steps leave their tokens for the host. Greedy steps hand their picks
//! to the next step on the device ([`super::greedy_step`]), and the host, which only needs them
//! to print text, reads them later, while the next step runs. On CUDA the argmax kernel writes
//! them straight into page-locked host memory mapped into the device's address space, so no
//! copy stands between two steps on the stream.

use candle_core::{Device, Result};
use std::sync::Mutex;

/// Steps whose picks the log holds at once: a step's go to slot `position % SLOTS`, so at most
/// this many may be enqueued and not yet read.
pub const PICKS_LOG_SLOTS: usize = 8;

/// A ring of [`PICKS_LOG_SLOTS`] steps' picks, `rows` `u32`s a step, indexed by the step's
/// position, with a mark of when each step has run.
pub struct PicksLog {
    rows: usize,
    inner: Inner,
}

enum Inner {
    /// Written by the host, at once (the CPU, and devices without the mapped kernel).
    Host(Mutex<Vec<u32>>),
    #[cfg(feature = "cuda")]
    Mapped(cuda::Mapped),
}

impl PicksLog {
    /// An empty log of steps of `rows` picks for work on `device`.
    pub fn new(device: &Device, rows: usize) -> Result<Self> {
        let len = rows * PICKS_LOG_SLOTS;
        #[cfg(feature = "cuda")]
        if let Device::Cuda(device) = device {
            return Ok(Self {
                rows,
                inner: Inner::Mapped(cuda::Mapped::new(device, len)?),
            });
        }
        let _ = device;
        Ok(Self {
            rows,
            inner: Inner::Host(Mutex::new(vec![0; len])),
        })
    }

    /// Picks a step.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// The first index of the slot of the step at `position`.
    fn slot(&self, position: usize) -> usize {
        position % PICKS_LOG_SLOTS * self.rows
    }

    /// The device address of the log, where the CUDA argmax writes it.
    #[cfg(feature = "cuda")]
    pub(crate) fn device_address(&self) -> Result<u64> {
        match &self.inner {
            Inner::Mapped(mapped) => Ok(mapped.device_address),
            Inner::Host(_) => candle_core::bail!("picks log: not on a CUDA device"),
        }
    }

    /// Writes the picks of the step at `position` from the host (where no kernel does), once
    /// the work before has finished.
    pub(crate) fn write(&self, position: usize, picks: &[u32]) -> Result<()> {
        let at = self.slot(position);
        match &self.inner {
            Inner::Host(log) => {
                let mut log = log
                    .lock()
                    .map_err(|_| candle_core::Error::Msg("picks log".into()))?;
                log[at..at + self.rows].copy_from_slice(picks);
                Ok(())
            }
            #[cfg(feature = "cuda")]
            Inner::Mapped(mapped) => mapped.write(at, picks),
        }
    }

    /// Marks the step at `position` as enqueued, after the work that writes its picks.
    pub fn enqueued(&mut self, position: usize) -> Result<()> {
        #[cfg(not(feature = "cuda"))]
        let _ = position;
        match &mut self.inner {
            Inner::Host(_) => Ok(()),
            #[cfg(feature = "cuda")]
            Inner::Mapped(mapped) => mapped.mark(position % PICKS_LOG_SLOTS),
        }
    }

    /// The picks of the step at `position`, once it has run (waits for its mark). Valid until
    /// [`PICKS_LOG_SLOTS`] more steps have been enqueued.
    pub fn read(&self, position: usize) -> Result<Vec<u32>> {
        let at = self.slot(position);
        match &self.inner {
            Inner::Host(log) => {
                let log = log
                    .lock()
                    .map_err(|_| candle_core::Error::Msg("picks log".into()))?;
                Ok(log[at..at + self.rows].to_vec())
            }
            #[cfg(feature = "cuda")]
            Inner::Mapped(mapped) => mapped.read(position % PICKS_LOG_SLOTS, at, self.rows),
        }
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    use candle_core::cuda_backend::cudarc::driver::{sys, CudaEvent, PinnedHostSlice};
    use candle_core::cuda_backend::WrapErr;
    use candle_core::{CudaDevice, Result};

    /// Page-locked host memory the device writes through `device_address`, and an event a
    /// slot recorded after the step that writes it.
    pub(super) struct Mapped {
        host: PinnedHostSlice<u32>,
        pub(super) device_address: u64,
        marks: Vec<CudaEvent>,
        device: CudaDevice,
    }

    impl Drop for Mapped {
        /// Steps still running write the memory: they finish before it is freed.
        fn drop(&mut self) {
            for mark in &self.marks {
                let _ = mark.synchronize();
            }
        }
    }

    impl Mapped {
        pub(super) fn new(device: &CudaDevice, len: usize) -> Result<Self> {
            let context = device.cuda_stream().context().clone();
            // SAFETY: the memory is zeroed below before anything reads it.
            let host = unsafe {
                context.alloc_pinned_with_flags::<u32>(len, sys::CU_MEMHOSTALLOC_DEVICEMAP)
            }
            .w()?;
            let pointer = host.as_ptr().w()?.cast_mut();
            // SAFETY: `pointer` is `len` u32s of the allocation just made, not yet shared.
            unsafe { std::ptr::write_bytes(pointer, 0, len) };
            let mut device_address = 0;
            // SAFETY: `pointer` was allocated with CU_MEMHOSTALLOC_DEVICEMAP in this context.
            unsafe { sys::cuMemHostGetDevicePointer_v2(&mut device_address, pointer.cast(), 0) }
                .result()
                .w()?;
            let marks = (0..super::PICKS_LOG_SLOTS)
                .map(|_| context.new_event(None).w())
                .collect::<Result<_>>()?;
            Ok(Self {
                host,
                device_address,
                marks,
                device: device.clone(),
            })
        }

        pub(super) fn mark(&mut self, slot: usize) -> Result<()> {
            self.marks[slot].record(&self.device.cuda_stream()).w()
        }

        pub(super) fn write(&self, at: usize, picks: &[u32]) -> Result<()> {
            let pointer = self.host.as_ptr().w()?.cast_mut();
            for (i, &pick) in picks.iter().enumerate() {
                // SAFETY: within the allocation (the caller's slot); no kernel writes it now.
                unsafe { std::ptr::write_volatile(pointer.add(at + i), pick) };
            }
            Ok(())
        }

        pub(super) fn read(&self, slot: usize, at: usize, rows: usize) -> Result<Vec<u32>> {
            self.marks[slot].synchronize().w()?;
            let pointer = self.host.as_ptr().w()?;
            // SAFETY: the step that wrote the slot has finished (its mark), and `at + rows` is
            // within the allocation; the device wrote it, so it is read volatile.
            Ok((at..at + rows)
                .map(|i| unsafe { std::ptr::read_volatile(pointer.add(i)) })
                .collect())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_step_reads_its_slot_until_the_ring_comes_round() {
        let mut log = PicksLog::new(&Device::Cpu, 2).unwrap();
        assert_eq!(log.rows(), 2);
        log.write(3, &[7, 9]).unwrap();
        log.enqueued(3).unwrap();
        log.write(4, &[1, 2]).unwrap();
        assert_eq!(log.read(3).unwrap(), [7, 9]);
        assert_eq!(log.read(4).unwrap(), [1, 2]);
        log.write(3 + PICKS_LOG_SLOTS, &[5, 5]).unwrap();
        assert_eq!(log.read(3).unwrap(), [5, 5]);
    }
}
