//! Opening the compute device a `config::DeviceSpec` names (the grammar of device names is
//! config's, shared with `training.device`), and GPU memory. Everything device-specific stays
//! behind candle's `Device`.

use candle_core::Device;
use config::DeviceSpec;

/// A device this build or machine lacks.
#[derive(Debug, thiserror::Error)]
#[error("device {name} is not available: {reason}")]
pub struct DeviceError {
    /// The device as the user named it.
    pub name: String,
    /// Why it cannot be opened.
    pub reason: String,
}

/// Opens the device `spec` names; `auto` falls back to the CPU, the others fail with the reason
/// when this build or machine lacks them.
pub fn open(spec: DeviceSpec) -> Result<Device, DeviceError> {
    let unavailable = |e: candle_core::Error| DeviceError {
        name: spec.to_string(),
        reason: e.to_string(),
    };
    match spec {
        DeviceSpec::Auto => Ok(auto()),
        DeviceSpec::Cpu => Ok(Device::Cpu),
        DeviceSpec::Metal => {
            if !candle_core::utils::metal_is_available() {
                return Err(DeviceError {
                    name: spec.to_string(),
                    reason: "this build has no Metal support (build with --features metal)".into(),
                });
            }
            Device::new_metal(0).map_err(unavailable)
        }
        DeviceSpec::Cuda(ordinal) => {
            if !candle_core::utils::cuda_is_available() {
                return Err(DeviceError {
                    name: spec.to_string(),
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

/// Whether `spec` would compute on CUDA, decided without opening a device (for plans): CUDA
/// names it; `auto` takes it where this build has CUDA and no Metal, which `auto` tries
/// first.
pub fn computes_on_cuda(spec: DeviceSpec) -> bool {
    match spec {
        DeviceSpec::Cuda(_) => true,
        DeviceSpec::Auto => {
            candle_core::utils::cuda_is_available() && !candle_core::utils::metal_is_available()
        }
        DeviceSpec::Cpu | DeviceSpec::Metal => false,
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

/// The peak of device memory in use as nvidia-smi shows it since the last
/// [`reset_peak_memory`], in bytes, measured as torch_ref.py's `peak_smi_mb` is: total minus
/// free device memory now (CUDA context, cuBLAS workspaces and the pool's reserve included;
/// device-wide, so other processes count too), plus what the memory pool reserved at its peak
/// and has released since. `None` off CUDA.
pub fn peak_device_memory(device: &Device) -> Option<u64> {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(d) = device {
        return cuda_setup::device_memory_peak(d).ok();
    }
    let _ = device;
    None
}

/// The peak of what the memory pool reserved from the driver since the last
/// [`reset_peak_memory`], in bytes: [`peak_memory`] plus the pool's fragmentation at its
/// worst. `None` off CUDA.
pub fn peak_reserved_memory(device: &Device) -> Option<u64> {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(d) = device {
        return cuda_setup::pool_attribute(d, cuda_setup::RESERVED_HIGH).ok();
    }
    let _ = device;
    None
}

/// Device memory in use now as nvidia-smi shows it (total minus free: the CUDA context, loaded
/// modules, cuBLAS workspaces and the pool's reserve; device-wide), in bytes. `None` off CUDA.
pub fn device_memory_in_use(device: &Device) -> Option<u64> {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(d) = device {
        return cuda_setup::in_use(d).ok();
    }
    let _ = device;
    None
}

/// Hands the memory pool's unused reserve back to the driver (after a large buffer is freed for
/// good, e.g. a weight moved to the host), so that it shows as free device memory again. A
/// no-op off CUDA.
pub fn release_unused_memory(device: &Device) -> candle_core::Result<()> {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(d) = device {
        device.synchronize()?;
        return cuda_setup::trim(d).map(drop);
    }
    let _ = device;
    Ok(())
}

/// Starts a new peak for [`peak_memory`] and [`peak_device_memory`], handing the memory pool's
/// unused reserve back to the driver first (as torch_ref.py's `torch.cuda.empty_cache()` at
/// the start of a row), so earlier work does not count (a no-op off CUDA).
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
    pub(super) const RESERVED_HIGH: sys::CUmemPool_attribute =
        sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RESERVED_MEM_HIGH;
    const RESERVED: sys::CUmemPool_attribute =
        sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RESERVED_MEM_CURRENT;

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

    /// Releases the pool's unused reserve and resets its used and reserved high-water marks to
    /// the memory in use now.
    pub(super) fn reset_used_high(device: &CudaDevice) -> Result<()> {
        let pool = trim(device)?;
        for attr in [USED_HIGH, RESERVED_HIGH] {
            let mut zero = 0u64;
            // SAFETY: resetting USED_MEM_HIGH or RESERVED_MEM_HIGH takes a u64 zero.
            driver(unsafe {
                sys::cuMemPoolSetAttribute(pool, attr, (&mut zero as *mut u64).cast())
            })?;
        }
        Ok(())
    }

    /// Releases the pool's unused reserve; returns the pool.
    pub(super) fn trim(device: &CudaDevice) -> Result<sys::CUmemoryPool> {
        let pool = default_pool(device)?;
        // SAFETY: `pool` is the device's default pool; trimming frees only unused memory.
        driver(unsafe { sys::cuMemPoolTrimTo(pool, 0) })?;
        Ok(pool)
    }

    /// Total minus free device memory now, plus the pool's reserve released since its peak.
    pub(super) fn device_memory_peak(device: &CudaDevice) -> Result<u64> {
        let released = pool_attribute(device, RESERVED_HIGH)?
            .saturating_sub(pool_attribute(device, RESERVED)?);
        Ok(in_use(device)? + released)
    }

    /// Total minus free device memory now.
    pub(super) fn in_use(device: &CudaDevice) -> Result<u64> {
        default_pool(device)?; // binds the device's context to this thread
        let (mut free, mut total) = (0usize, 0usize);
        // SAFETY: writes two sizes; the device's context is bound above.
        driver(unsafe { sys::cuMemGetInfo_v2(&mut free, &mut total) })?;
        Ok((total - free) as u64)
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
    fn opens_the_cpu_and_names_what_is_missing() {
        assert!(matches!(open(DeviceSpec::Cpu), Ok(Device::Cpu)));
        if !candle_core::utils::cuda_is_available() {
            let err = open(DeviceSpec::Cuda(0)).unwrap_err();
            assert!(err.to_string().contains("--features cuda"), "{err}");
        }
    }
}
