//! Choosing the compute device. Everything device-specific stays behind candle's `Device`.

use candle_core::Device;

/// Errors choosing a device.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// The name is not a device.
    #[error("unknown device {0:?}: expected auto, cpu, cuda, cuda:N or metal")]
    Unknown(String),
    /// The device exists by name but this build or machine lacks it.
    #[error("device {name} is not available: {reason}")]
    Unavailable { name: String, reason: String },
}

/// Opens `name`: `auto` (Metal, then CUDA, then CPU), `cpu`, `cuda`, `cuda:N` or `metal`.
pub fn open(name: &str) -> Result<Device, DeviceError> {
    let unavailable = |e: candle_core::Error| DeviceError::Unavailable {
        name: name.to_string(),
        reason: e.to_string(),
    };
    match name {
        "auto" => Ok(auto()),
        "cpu" => Ok(Device::Cpu),
        "metal" => {
            if !candle_core::utils::metal_is_available() {
                return Err(DeviceError::Unavailable {
                    name: name.into(),
                    reason: "this build has no Metal support (build with --features metal)".into(),
                });
            }
            Device::new_metal(0).map_err(unavailable)
        }
        _ => {
            let ordinal = match name.strip_prefix("cuda") {
                Some("") => 0,
                Some(rest) => rest
                    .strip_prefix(':')
                    .and_then(|n| n.parse().ok())
                    .ok_or_else(|| DeviceError::Unknown(name.into()))?,
                None => return Err(DeviceError::Unknown(name.into())),
            };
            if !candle_core::utils::cuda_is_available() {
                return Err(DeviceError::Unavailable {
                    name: name.into(),
                    reason: "this build has no CUDA support (build with --features cuda)".into(),
                });
            }
            open_cuda(ordinal).map_err(unavailable)
        }
    }
}

/// Opens CUDA device `ordinal` on a stream of its own. With the `cuda` feature the device is
/// set up for llmtool's single-stream use (see [`cuda_setup`]).
fn open_cuda(ordinal: usize) -> candle_core::Result<Device> {
    #[cfg(feature = "cuda")]
    {
        cuda_setup::open(ordinal)
    }
    #[cfg(not(feature = "cuda"))]
    {
        Device::new_cuda(ordinal)
    }
}

fn auto() -> Device {
    if candle_core::utils::metal_is_available() {
        if let Ok(d) = Device::new_metal(0) {
            return d;
        }
    }
    if candle_core::utils::cuda_is_available() {
        if let Ok(d) = open_cuda(0) {
            return d;
        }
    }
    Device::Cpu
}

/// The peak of device memory in use since the last [`reset_peak_memory`], in bytes: the CUDA
/// memory pool's high-water mark (what `torch.cuda.max_memory_allocated` reports for PyTorch).
/// `None` on other devices.
pub fn peak_memory(device: &Device) -> Option<u64> {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(d) = device {
        return cuda_setup::pool_attribute(d, cuda_setup::USED_HIGH).ok();
    }
    let _ = device;
    None
}

/// Starts a new peak for [`peak_memory`] (a no-op off CUDA).
pub fn reset_peak_memory(device: &Device) -> candle_core::Result<()> {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(d) = device {
        device.synchronize()?;
        return cuda_setup::reset_used_high(d);
    }
    let _ = device;
    Ok(())
}

#[cfg(feature = "cuda")]
mod cuda_setup {
    use candle_core::cuda_backend::cudarc::driver::sys;
    use candle_core::{CudaDevice, Device, Result};

    pub(super) const USED_HIGH: sys::CUmemPool_attribute =
        sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH;

    fn driver(r: sys::CUresult) -> Result<()> {
        r.result()
            .map_err(|e| candle_core::Error::Msg(format!("CUDA driver: {e:?}")))
    }

    /// Opens the device on its own stream, turns off cudarc's per-buffer event tracking, and
    /// makes the memory pool keep freed memory.
    ///
    /// llmtool issues all work for a device on that one stream, so the events cudarc records
    /// on every allocation and launch to order multiple streams only cost time. And with the
    /// pool's default release threshold of zero, every synchronization hands freed memory back
    /// to the driver and the next step allocates it again; PyTorch's caching allocator keeps
    /// it, and so does this.
    pub(super) fn open(ordinal: usize) -> Result<Device> {
        let device = CudaDevice::new_with_stream(ordinal)?;
        // SAFETY: every tensor of this device is created and used on its one stream.
        unsafe { device.disable_event_tracking() };
        let mut threshold = u64::MAX;
        let pool = default_pool(&device)?;
        // SAFETY: the attribute takes a u64 and `pool` is the device's default pool.
        driver(unsafe {
            sys::cuMemPoolSetAttribute(
                pool,
                sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
                (&mut threshold as *mut u64).cast(),
            )
        })?;
        Ok(Device::Cuda(device))
    }

    fn default_pool(device: &CudaDevice) -> Result<sys::CUmemoryPool> {
        let stream = device.cuda_stream();
        let context = stream.context();
        context
            .bind_to_thread()
            .map_err(|e| candle_core::Error::Msg(format!("CUDA driver: {e:?}")))?;
        let mut pool = std::ptr::null_mut();
        // SAFETY: writes the handle of the device's default pool into `pool`.
        driver(unsafe { sys::cuDeviceGetDefaultMemPool(&mut pool, context.cu_device()) })?;
        Ok(pool)
    }

    /// A u64 attribute of the device's default memory pool.
    pub(super) fn pool_attribute(
        device: &CudaDevice,
        attr: sys::CUmemPool_attribute,
    ) -> Result<u64> {
        let pool = default_pool(device)?;
        let mut value = 0u64;
        // SAFETY: the pool attributes read here are u64s.
        driver(unsafe { sys::cuMemPoolGetAttribute(pool, attr, (&mut value as *mut u64).cast()) })?;
        Ok(value)
    }

    /// Resets the pool's used-memory high-water mark to the memory in use now.
    pub(super) fn reset_used_high(device: &CudaDevice) -> Result<()> {
        let pool = default_pool(device)?;
        let mut zero = 0u64;
        // SAFETY: resetting USED_MEM_HIGH takes a u64 zero.
        driver(unsafe {
            sys::cuMemPoolSetAttribute(pool, USED_HIGH, (&mut zero as *mut u64).cast())
        })
    }
}

/// A short name for messages: `cpu`, `cuda:0`, `metal`.
pub fn describe(device: &Device) -> String {
    match device.location() {
        candle_core::DeviceLocation::Cpu => "cpu".into(),
        candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        candle_core::DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_names() {
        assert!(matches!(open("cpu"), Ok(Device::Cpu)));
        assert!(matches!(open("gpu"), Err(DeviceError::Unknown(_))));
        assert!(matches!(open("cuda:x"), Err(DeviceError::Unknown(_))));
        if !candle_core::utils::cuda_is_available() {
            assert!(matches!(
                open("cuda:0"),
                Err(DeviceError::Unavailable { .. })
            ));
        }
    }
}
