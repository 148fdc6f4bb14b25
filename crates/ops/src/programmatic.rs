//! Programmatic dependent launch (Hopper, compute capability 9.x): a kernel launched this way
//! may start while the kernel ahead of it in the stream still runs. A decode step is a chain of
//! short kernels, each waiting on the last; a product launched this way loads its first round
//! of weights and has its blocks resident while the kernel ahead ends, and waits for that
//! kernel's output only then (`kernels/decode.cu`'s `start_product`, `kernels/common.cuh`'s
//! `dependents_may_launch` and `wait_for_previous`).
//!
//! A kernel reading before its wait must read nothing a kernel ahead may still be writing, and
//! since each kernel lets the next launch at its start, that is any kernel of the chain of
//! programmatic launches ahead, not only the one just ahead. So only a product whose weight the
//! caller knows nothing in the step writes ([`crate::WeightSource::Held`]) is launched this
//! way. `LLMTOOL_CUDA_PDL=0` launches every kernel in stream order.

use crate::launch::Arg;
use candle_core::cuda_backend::cudarc::driver::{CudaFunction, CudaStream};
use candle_core::cuda_backend::{DeviceId, WrapErr};
use candle_core::{CudaDevice, Result};
use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};

/// Whether `device` launches kernels programmatically: compute capability 9.x (the fat
/// binary's machine code for it holds the waits; the PTX for other GPUs targets compute 8.0,
/// which has none), unless `LLMTOOL_CUDA_PDL=0`. Asked of the driver once per device.
pub(crate) fn available(device: &CudaDevice) -> Result<bool> {
    static ENABLED: OnceLock<bool> = OnceLock::new();
    static CAPABLE: OnceLock<Mutex<HashMap<DeviceId, bool>>> = OnceLock::new();
    let enabled = *ENABLED.get_or_init(|| std::env::var("LLMTOOL_CUDA_PDL").as_deref() != Ok("0"));
    if !enabled {
        return Ok(false);
    }
    let mut capable = CAPABLE
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    if let Some(&yes) = capable.get(&device.id()) {
        return Ok(yes);
    }
    let (major, _) = device.cuda_stream().context().compute_capability().w()?;
    capable.insert(device.id(), major == 9);
    Ok(major == 9)
}

/// Launches `func` on `stream` with programmatic stream serialization allowed: it may start
/// while the kernel ahead of it runs.
pub(crate) fn launch(
    func: &CudaFunction,
    stream: &CudaStream,
    (grid, block, shared): ((u32, u32), (u32, u32), u32),
    args: &[Arg],
) -> Result<()> {
    use candle_core::cuda_backend::cudarc::driver::sys;
    let mut values: Vec<Arg> = args.to_vec();
    let mut params: Vec<*mut std::ffi::c_void> = values
        .iter_mut()
        .map(|arg| match arg {
            Arg::Address(a) | Arg::Count(a) => a as *mut u64 as *mut std::ffi::c_void,
            Arg::Int(i) => i as *mut i32 as *mut std::ffi::c_void,
            Arg::Float(f) => f as *mut f32 as *mut std::ffi::c_void,
        })
        .collect();
    // SAFETY: an all-zero launch attribute is a valid C struct; its id and value are set next.
    let mut attribute: sys::CUlaunchAttribute = unsafe { std::mem::zeroed() };
    attribute.id = sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION;
    attribute.value.programmaticStreamSerializationAllowed = 1;
    let config = sys::CUlaunchConfig {
        gridDimX: grid.0,
        gridDimY: grid.1,
        gridDimZ: 1,
        blockDimX: block.0,
        blockDimY: block.1,
        blockDimZ: 1,
        sharedMemBytes: shared,
        hStream: stream.cu_stream(),
        attrs: &mut attribute,
        numAttrs: 1,
    };
    stream.context().bind_to_thread().w()?;
    // SAFETY: `params` points at one value per kernel parameter, typed as the kernel declares
    // them (the same `Arg`s the launch builder pushes), alive until the call returns; the
    // function belongs to the stream's context, bound to this thread above.
    unsafe {
        sys::cuLaunchKernelEx(
            &config,
            func.cu_function(),
            params.as_mut_ptr(),
            std::ptr::null_mut(),
        )
    }
    .result()
    .w()?;
    Ok(())
}
