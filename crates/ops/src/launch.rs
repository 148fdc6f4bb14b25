//! The launch plumbing every CUDA launcher shares (with the `cuda` feature): the module of
//! `kernels/ops.cu` (a fat binary compiled by build.rs: machine code for the common GPUs, PTX
//! for the others) loaded once per device, its kernels once each,
//! kernel arguments, operand addresses, output buffers, grid shapes, and [`run`], the launch of
//! the signature most kernels share. Each op's own launchers live beside its CPU kernel, in the
//! op's file (a `cuda` module), and take contiguous operands (offsets allowed), allocate their
//! outputs and enqueue their kernels on the device's stream.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::sys::{CUdevice_attribute, CUfunction_attribute};
use candle_core::cuda_backend::cudarc::driver::{
    CudaFunction, CudaModule, DevicePtr, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::cudarc::nvrtc::Ptx;
use candle_core::cuda_backend::DeviceId;
use candle_core::cuda_backend::{CudaStorageSlice, WrapErr};
use candle_core::{CudaDevice, CudaStorage, DType, Layout, Result, Storage, Tensor};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

/// The kernels as build.rs compiled them. Loading machine code for the device takes
/// milliseconds; PTX (for a GPU the fat binary has no code for) is compiled by the driver, whole
/// module at once, seconds on a fresh machine.
const FATBIN: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/llmtool_ops.fatbin"));

/// The sizes a kernel and its launcher agree on, written once in `kernels/launch_constants.h`
/// (build.rs turns them into these constants).
pub(crate) mod constants {
    include!(concat!(env!("OUT_DIR"), "/launch_constants.rs"));
}

/// Dynamic shared memory a kernel may use without opting in to more.
pub(crate) const DEFAULT_SHARED_LIMIT: u32 = 48 * 1024;

/// Threads per block of the elementwise kernels.
const ELEMENT_THREADS: u32 = 256;

/// Rows per block of the warp-per-row kernels (the causal softmax, RMSNorm in training, gemv).
const WARP_ROWS_PER_BLOCK: usize = 8;

/// One kernel argument. Addresses are passed as plain 64-bit words, which is what a device
/// pointer is to the kernel; this keeps the launchers independent of the element type.
#[derive(Clone, Copy)]
pub(crate) enum Arg {
    Address(u64),
    Int(i32),
    Float(f32),
    Count(u64),
}

/// An operand: a storage and the layout the op received it with.
pub(crate) type Operand<'a> = (&'a CudaStorage, &'a Layout);

pub(crate) fn suffix(dtype: DType) -> Result<&'static str> {
    match dtype {
        DType::F32 => Ok("f32"),
        DType::BF16 => Ok("bf16"),
        DType::F16 => Ok("f16"),
        other => candle_core::bail!("fused CUDA kernel: unsupported dtype {other:?}"),
    }
}

/// The device address of an operand's first element; it must be contiguous.
pub(crate) fn address((storage, layout): Operand) -> Result<u64> {
    let (start, _) = layout.contiguous_offsets().ok_or_else(|| {
        candle_core::Error::Msg("fused CUDA kernel: operand is not contiguous".into())
    })?;
    Ok(base_address(storage)? + (start * storage.dtype().size_in_bytes()) as u64)
}

/// The device address where a storage's buffer begins.
pub(crate) fn base_address(storage: &CudaStorage) -> Result<u64> {
    let stream = storage.device.cuda_stream();
    let base = match &storage.slice {
        CudaStorageSlice::F32(s) => s.device_ptr(&stream).0,
        CudaStorageSlice::BF16(s) => s.device_ptr(&stream).0,
        CudaStorageSlice::F16(s) => s.device_ptr(&stream).0,
        CudaStorageSlice::U32(s) => s.device_ptr(&stream).0,
        CudaStorageSlice::U8(s) => s.device_ptr(&stream).0,
        _ => candle_core::bail!("fused CUDA kernel: unsupported dtype {:?}", storage.dtype()),
    };
    Ok(base)
}

/// The address of an optional operand, or null (0) without one.
pub(crate) fn optional_address(operand: Option<Operand>) -> Result<u64> {
    operand.map_or(Ok(0), address)
}

/// Whether every operand's first element sits on a 16-byte boundary (operands must be
/// contiguous), as kernels that move 16 bytes per access need.
pub(crate) fn start_aligned(operands: &[Operand]) -> Result<bool> {
    for &operand in operands {
        if address(operand)? % 16 != 0 {
            return Ok(false);
        }
    }
    Ok(true)
}

/// An uninitialized buffer of `n` elements; the kernel that receives it writes all of them.
pub(crate) fn alloc(device: &CudaDevice, dtype: DType, n: usize) -> Result<CudaStorage> {
    // SAFETY: every launcher below hands the buffer to a kernel that writes each element.
    let slice = unsafe {
        match dtype {
            DType::F32 => CudaStorageSlice::F32(device.alloc::<f32>(n)?),
            DType::BF16 => CudaStorageSlice::BF16(device.alloc::<half::bf16>(n)?),
            DType::F16 => CudaStorageSlice::F16(device.alloc::<half::f16>(n)?),
            DType::U32 => CudaStorageSlice::U32(device.alloc::<u32>(n)?),
            other => candle_core::bail!("fused CUDA kernel: unsupported dtype {other:?}"),
        }
    };
    Ok(CudaStorage {
        slice,
        device: device.clone(),
    })
}

pub(crate) fn zeros_f32(device: &CudaDevice, n: usize) -> Result<CudaStorage> {
    Ok(CudaStorage {
        slice: CudaStorageSlice::F32(device.alloc_zeros::<f32>(n)?),
        device: device.clone(),
    })
}

/// A new tensor (no gradient history) owning `storage`, for launchers with several outputs.
pub(crate) fn tensor(storage: CudaStorage, shape: candle_core::Shape) -> Tensor {
    Tensor::from_storage(
        Storage::Cuda(storage),
        shape,
        candle_core::op::BackpropOp::none(),
        false,
    )
}

/// Launches `name` (with the dtype suffix when `dtype` is given) on `grid` × `block`.
pub(crate) fn launch(
    device: &CudaDevice,
    name: &str,
    dtype: Option<DType>,
    grid: (u32, u32),
    block: (u32, u32),
    args: &[Arg],
) -> Result<()> {
    launch_with_shared(device, name, dtype, (grid, block, 0), args)
}

/// [`launch`] with `shared` bytes of dynamic shared memory per block.
pub(crate) fn launch_with_shared(
    device: &CudaDevice,
    name: &str,
    dtype: Option<DType>,
    config: ((u32, u32), (u32, u32), u32),
    args: &[Arg],
) -> Result<()> {
    launch_ordered(device, name, dtype, config, args, Order::Stream)
}

/// When a launched kernel may start: after the kernel ahead of it in the stream has ended, or
/// while it still runs ([`crate::programmatic`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Order {
    Stream,
    Programmatic,
}

impl Order {
    /// Programmatic where `allowed` (nothing the kernel reads before its wait is written by a
    /// kernel of the step) and `device` launches that way ([`crate::programmatic::available`]),
    /// else in stream order.
    pub(crate) fn when(device: &CudaDevice, allowed: bool) -> Result<Order> {
        Ok(match allowed && crate::programmatic::available(device)? {
            true => Order::Programmatic,
            false => Order::Stream,
        })
    }
}

/// The `n`-element output of a kernel launched in `order`: for a programmatic launch,
/// allocated where it does not hold the launch back ([`crate::programmatic::alloc_at_root`]).
pub(crate) fn alloc_for(
    device: &CudaDevice,
    dtype: DType,
    n: usize,
    order: Order,
) -> Result<CudaStorage> {
    match order {
        Order::Programmatic => crate::programmatic::alloc_at_root(device, dtype, n),
        Order::Stream => alloc(device, dtype, n),
    }
}

/// [`launch_with_shared`] in `order`.
pub(crate) fn launch_ordered(
    device: &CudaDevice,
    name: &str,
    dtype: Option<DType>,
    (grid, block, shared): ((u32, u32), (u32, u32), u32),
    args: &[Arg],
    order: Order,
) -> Result<()> {
    let func = kernel(device, name, dtype, shared)?;
    let stream = device.cuda_stream();
    if order == Order::Programmatic {
        return crate::programmatic::launch(&func, &stream, (grid, block, shared), args);
    }
    let mut builder = stream.launch_builder(&func);
    for arg in args {
        match arg {
            Arg::Address(a) | Arg::Count(a) => builder.arg(a),
            Arg::Int(i) => builder.arg(i),
            Arg::Float(f) => builder.arg(f),
        };
    }
    let config = LaunchConfig {
        grid_dim: (grid.0, grid.1, 1),
        block_dim: (block.0, block.1, 1),
        shared_mem_bytes: shared,
    };
    // SAFETY: the argument lists match the kernels' signatures in kernels/*.cu, and every
    // address points at a live buffer of the size the kernel indexes.
    unsafe { builder.launch(config) }.w()?;
    Ok(())
}

/// A loaded kernel and the dynamic shared memory it has been allowed so far.
type Loaded = (CudaFunction, u32);

/// Loaded kernels by device and dtype, then name.
type KernelTable = HashMap<(DeviceId, Option<DType>), HashMap<String, Loaded>>;

/// The module of [`FATBIN`] on `device`, loaded once per device.
fn module(device: &CudaDevice) -> Result<Arc<CudaModule>> {
    static MODULES: OnceLock<Mutex<HashMap<DeviceId, Arc<CudaModule>>>> = OnceLock::new();
    let mut modules = MODULES
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    if let Some(module) = modules.get(&device.id()) {
        return Ok(module.clone());
    }
    let stream = device.cuda_stream();
    let module = stream
        .context()
        .load_module(Ptx::from_binary(FATBIN.to_vec()))
        .w()?;
    modules.insert(device.id(), module.clone());
    Ok(module)
}

/// The kernel `name` (suffixed for `dtype`) on `device`, loaded once (looking it up in the
/// module formats a name and calls the driver, which a decode step's hundred launches feel),
/// and allowed `shared` bytes of dynamic shared memory where that is above the default limit
/// (once per kernel and size, not per launch).
fn kernel(
    device: &CudaDevice,
    name: &str,
    dtype: Option<DType>,
    shared: u32,
) -> Result<CudaFunction> {
    static KERNELS: OnceLock<Mutex<KernelTable>> = OnceLock::new();
    let table = KERNELS.get_or_init(Default::default);
    let mut table = table
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let loaded = table.entry((device.id(), dtype)).or_default();
    if !loaded.contains_key(name) {
        let full = match dtype {
            Some(d) => format!("{name}_{}", suffix(d)?),
            None => name.to_string(),
        };
        let func = module(device)?.load_function(&full).w()?;
        loaded.insert(name.to_string(), (func, DEFAULT_SHARED_LIMIT));
    }
    let Some((func, allowed)) = loaded.get_mut(name) else {
        candle_core::bail!("fused CUDA kernel {name}: not loaded");
    };
    if shared > *allowed {
        func.set_attribute(
            CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
            shared as i32,
        )
        .w()?;
        *allowed = shared;
    }
    Ok(func.clone())
}

/// The compute capability (major, minor) of `device`, asked of the driver once per device.
pub(crate) fn compute_capability(device: &CudaDevice) -> Result<(i32, i32)> {
    static CAPABILITIES: OnceLock<Mutex<HashMap<DeviceId, (i32, i32)>>> = OnceLock::new();
    let mut known = CAPABILITIES
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    if let Some(&capability) = known.get(&device.id()) {
        return Ok(capability);
    }
    let capability = device.cuda_stream().context().compute_capability().w()?;
    known.insert(device.id(), capability);
    Ok(capability)
}

/// Whether the kernels `device` runs are this build's machine code for compute capability 9.0
/// (`sm_90a`, built where `LLMTOOL_CUDA_SASS` names 90: build.rs's `llmtool_wgmma`), which
/// thread block clusters and the warpgroup instructions need. On a 9.0 GPU without it the
/// driver compiles the PTX of an older target, where those kernels trap.
pub(crate) fn runs_hopper_code(device: &CudaDevice) -> Result<bool> {
    Ok(cfg!(llmtool_wgmma) && compute_capability(device)? == (9, 0))
}

/// How many blocks of `threads` threads and `shared` bytes of dynamic shared memory each the
/// device runs of kernel `name` (suffixed for `dtype`) at once: its multiprocessors times the
/// blocks one of them holds (at least one each). Asked of the driver once per kernel and shape,
/// so a captured decode step's launches make no driver query.
pub(crate) fn resident_blocks(
    device: &CudaDevice,
    name: &str,
    dtype: Option<DType>,
    (threads, shared): (u32, u32),
) -> Result<usize> {
    type Key = (DeviceId, Option<DType>, String, u32, u32);
    static RESIDENT: OnceLock<Mutex<HashMap<Key, usize>>> = OnceLock::new();
    let key = (device.id(), dtype, name.to_string(), threads, shared);
    let mut known = RESIDENT
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    if let Some(&blocks) = known.get(&key) {
        return Ok(blocks);
    }
    let func = kernel(device, name, dtype, shared)?;
    let per_multiprocessor = func
        .occupancy_max_active_blocks_per_multiprocessor(threads, shared as usize, None)
        .w()?;
    let multiprocessors = device
        .cuda_stream()
        .context()
        .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
        .w()?;
    let blocks = per_multiprocessor.max(1) as usize * multiprocessors.max(1) as usize;
    known.insert(key, blocks);
    Ok(blocks)
}

/// Threads for a row kernel over rows of `width`: a multiple of 32, at most `max`.
fn row_threads(width: usize, max: u32) -> u32 {
    (width.div_ceil(32) * 32).clamp(32, max as usize) as u32
}

pub(crate) fn int(n: usize) -> Result<Arg> {
    c_int(n).map(Arg::Int)
}

/// `n` as a C `int` (kernel and cuBLAS sizes).
pub(crate) fn c_int(n: usize) -> Result<i32> {
    i32::try_from(n)
        .map_err(|_| candle_core::Error::Msg(format!("fused CUDA kernel: size {n} too large")))
}

pub(crate) fn grid(blocks: usize) -> Result<(u32, u32)> {
    Ok((int_u32(blocks)?, 1))
}

/// `n` as a grid dimension.
pub(crate) fn int_u32(n: usize) -> Result<u32> {
    u32::try_from(n).map_err(|_| candle_core::Error::Msg(format!("fused CUDA kernel: {n} blocks")))
}

/// A matrix operand of [`gemm`]: the device address of its first element, whether cuBLAS
/// reads it transposed, and its leading dimension as stored (column-major).
pub(crate) struct GemmOperand {
    pub address: u64,
    pub transposed: bool,
    pub leading: usize,
}

/// One cuBLAS GEMM in its column-major terms, `c = alpha · op(a) · op(b) + beta · c`, with `op(a)`
/// `[m, k]`, `op(b)` `[k, n]` and `c` `[m, n]` (leading dimension m), accumulating in f32: `a`
/// and `b` hold `inputs`, `c` holds `output`. Enqueued on the device's stream.
///
/// # Safety
/// The addresses must be of live device buffers on `device` holding the operands at the
/// shapes and leading dimensions given, until the stream has run the GEMM; with `beta = 0`
/// `c` may be uninitialized.
pub(crate) unsafe fn gemm(
    device: &CudaDevice,
    (a, b): (GemmOperand, GemmOperand),
    (m, n, k): (usize, usize, usize),
    (inputs, output): (DType, DType),
    (c, alpha, beta): (u64, f32, f32),
) -> Result<()> {
    use candle_core::cuda_backend::cudarc::cublas::{result::gemm_ex, sys};
    let element = |dtype| match dtype {
        DType::F32 => Ok(sys::cudaDataType_t::CUDA_R_32F),
        DType::BF16 => Ok(sys::cudaDataType_t::CUDA_R_16BF),
        DType::F16 => Ok(sys::cudaDataType_t::CUDA_R_16F),
        other => Err(candle_core::Error::Msg(format!("GEMM: {other:?} operands"))),
    };
    let op = |transposed| match transposed {
        true => sys::cublasOperation_t::CUBLAS_OP_T,
        false => sys::cublasOperation_t::CUBLAS_OP_N,
    };
    let blas = device.cublas_handle();
    // SAFETY: the caller's contract; alpha and beta are f32 as CUBLAS_COMPUTE_32F reads them.
    unsafe {
        gemm_ex(
            *blas.handle(),
            op(a.transposed),
            op(b.transposed),
            c_int(m)?,
            c_int(n)?,
            c_int(k)?,
            &alpha as *const f32 as *const _,
            a.address as *const _,
            element(inputs)?,
            c_int(a.leading)?,
            b.address as *const _,
            element(inputs)?,
            c_int(b.leading)?,
            &beta as *const f32 as *const _,
            c as *mut _,
            element(output)?,
            c_int(m)?,
            sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
            sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
        )
    }
    .map_err(|e| candle_core::Error::Msg(format!("GEMM: {e:?}")))
}

/// The CUDA storages and layouts of `tensors`, read-locked while `f` runs: for kernels with
/// more operands than a candle custom op takes.
pub(crate) fn with_operands<R>(
    tensors: &[&Tensor],
    f: impl FnOnce(&[Operand]) -> Result<R>,
) -> Result<R> {
    let guards: Vec<_> = tensors.iter().map(|t| t.storage_and_layout()).collect();
    let operands = guards
        .iter()
        .map(|(storage, layout)| match &**storage {
            Storage::Cuda(s) => Ok((s, *layout)),
            _ => candle_core::bail!("fused CUDA kernel: operand is not on a CUDA device"),
        })
        .collect::<Result<Vec<_>>>()?;
    f(&operands)
}

/// Checks that all operands share the first one's dtype and returns it.
pub(crate) fn common_dtype(operands: &[Operand]) -> Result<DType> {
    let dtype = operands[0].0.dtype();
    if let Some((s, _)) = operands.iter().find(|(s, _)| s.dtype() != dtype) {
        candle_core::bail!(
            "fused CUDA kernel: mixed dtypes {dtype:?} and {:?}",
            s.dtype()
        );
    }
    Ok(dtype)
}

pub(crate) fn same_count(a: Operand, b: Operand) -> Result<usize> {
    let (n, m) = (a.1.shape().elem_count(), b.1.shape().elem_count());
    if n != m {
        candle_core::bail!("fused CUDA kernel: operands of {n} and {m} elements");
    }
    Ok(n)
}

/// The element strides of a 4-D operand's first three dimensions, and the address of its first
/// element; the last dimension must have unit stride.
pub(crate) fn strided4((storage, layout): Operand) -> Result<(u64, [u64; 3])> {
    let stride = layout.stride();
    let [s0, s1, s2, 1] = *stride else {
        candle_core::bail!("attention: unsupported strides {stride:?}");
    };
    let start = (layout.start_offset() * storage.dtype().size_in_bytes()) as u64;
    Ok((
        base_address(storage)? + start,
        [s0 as u64, s1 as u64, s2 as u64],
    ))
}

/// The grid and block of a kernel launch.
pub(crate) type Shape2 = ((u32, u32), (u32, u32));

/// One block per row of `width`, with up to `max` threads.
pub(crate) fn per_row(rows: usize, width: usize, max: u32) -> Result<Shape2> {
    Ok((grid(rows)?, (row_threads(width, max), 1)))
}

/// One thread per element of `n`.
pub(crate) fn per_element(n: usize) -> Result<Shape2> {
    Ok((
        grid(n.div_ceil(ELEMENT_THREADS as usize))?,
        (ELEMENT_THREADS, 1),
    ))
}

/// One warp per row (the causal softmax).
pub(crate) fn per_warp_row(rows: usize) -> Result<Shape2> {
    Ok((
        grid(rows.div_ceil(WARP_ROWS_PER_BLOCK))?,
        ((32 * WARP_ROWS_PER_BLOCK) as u32, 1),
    ))
}

/// Launches kernel `name` (suffixed for `dtype`) on `shape` with the signature most kernels
/// share: the addresses of the contiguous `inputs`, then of `out`, then `scalars`.
/// Returns `out`.
pub(crate) fn run(
    kernel: (&str, DType),
    shape: Shape2,
    inputs: &[Operand],
    out: CudaStorage,
    scalars: &[Arg],
) -> Result<CudaStorage> {
    run_ordered(kernel, shape, inputs, out, scalars, Order::Stream)
}

/// [`run`] in `order`.
pub(crate) fn run_ordered(
    (name, dtype): (&str, DType),
    (grid, block): Shape2,
    inputs: &[Operand],
    out: CudaStorage,
    scalars: &[Arg],
    order: Order,
) -> Result<CudaStorage> {
    let mut args = inputs
        .iter()
        .map(|&operand| address(operand).map(Arg::Address))
        .collect::<Result<Vec<_>>>()?;
    args.push(Arg::Address(base_address(&out)?));
    args.extend_from_slice(scalars);
    launch_ordered(
        &out.device,
        name,
        Some(dtype),
        (grid, block, 0),
        &args,
        order,
    )?;
    Ok(out)
}

/// The 16-byte-per-access variant of a kernel and its elements per access when every operand
/// starts on a 16-byte boundary and `run` (the length of each contiguous run of elements the
/// kernel moves: a row, a half head) is a multiple of them; else the one-element kernel and 1.
pub(crate) fn elementwise_kernel(
    (narrow, wide): (&'static str, &'static str),
    operands: &[Operand],
    run: usize,
) -> Result<(&'static str, usize)> {
    let width = 16 / common_dtype(operands)?.size_in_bytes();
    Ok(match start_aligned(operands)? && run % width == 0 {
        true => (wide, width),
        false => (narrow, 1),
    })
}
