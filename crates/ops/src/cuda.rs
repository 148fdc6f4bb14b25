//! Launchers for the fused CUDA kernels in `kernels/ops.cu` (compiled to PTX by build.rs with
//! the `cuda` feature). The custom ops of the sibling modules call these from `cuda_fwd`; each
//! takes contiguous operands (offsets allowed), allocates its output and enqueues one kernel
//! (two or three for the RMSNorm weight gradient) on the device's stream.

use super::rows_and_width;
use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::sys::CUfunction_attribute;
use candle_core::cuda_backend::cudarc::driver::{
    CudaFunction, DevicePtr, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::DeviceId;
use candle_core::cuda_backend::{CudaStorageSlice, WrapErr};
use candle_core::{CudaDevice, CudaStorage, DType, Layout, Result, Storage, Tensor};
use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/llmtool_ops.ptx"));
const MODULE: &str = "llmtool_ops";

/// Dynamic shared memory a kernel may use without opting in to more.
const DEFAULT_SHARED_LIMIT: u32 = 48 * 1024;

/// Threads per block of the elementwise kernels.
const ELEMENT_THREADS: u32 = 256;

/// Rows per block of the warp-per-row kernels (the causal softmax).
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

fn suffix(dtype: DType) -> Result<&'static str> {
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
        _ => candle_core::bail!("fused CUDA kernel: unsupported dtype {:?}", storage.dtype()),
    };
    Ok(base)
}

/// An uninitialized buffer of `n` elements; the kernel that receives it writes all of them.
pub(crate) fn alloc(device: &CudaDevice, dtype: DType, n: usize) -> Result<CudaStorage> {
    // SAFETY: every launcher below hands the buffer to a kernel that writes each element.
    let slice = unsafe {
        match dtype {
            DType::F32 => CudaStorageSlice::F32(device.alloc::<f32>(n)?),
            DType::BF16 => CudaStorageSlice::BF16(device.alloc::<half::bf16>(n)?),
            DType::F16 => CudaStorageSlice::F16(device.alloc::<half::f16>(n)?),
            other => candle_core::bail!("fused CUDA kernel: unsupported dtype {other:?}"),
        }
    };
    Ok(CudaStorage {
        slice,
        device: device.clone(),
    })
}

fn zeros_f32(device: &CudaDevice, n: usize) -> Result<CudaStorage> {
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
fn launch(
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
    (grid, block, shared): ((u32, u32), (u32, u32), u32),
    args: &[Arg],
) -> Result<()> {
    let func = kernel(device, name, dtype, shared)?;
    let stream = device.cuda_stream();
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
    // SAFETY: the argument lists match the kernels' signatures in kernels/ops.cu, and every
    // address points at a live buffer of the size the kernel indexes.
    unsafe { builder.launch(config) }.w()?;
    Ok(())
}

/// A loaded kernel and the dynamic shared memory it has been allowed so far.
type Loaded = (CudaFunction, u32);

/// Loaded kernels by device and dtype, then name.
type KernelTable = HashMap<(DeviceId, Option<DType>), HashMap<String, Loaded>>;

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
        let func = device
            .get_or_load_custom_func(&full, MODULE, PTX)?
            .into_cuda_function();
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

/// Threads for a row kernel over rows of `width`: a multiple of 32, at most `max`.
fn row_threads(width: usize, max: u32) -> u32 {
    (width.div_ceil(32) * 32).clamp(32, max as usize) as u32
}

pub(crate) fn int(n: usize) -> Result<Arg> {
    c_int(n).map(Arg::Int)
}

/// `n` as a C `int` (kernel and cuBLAS sizes).
fn c_int(n: usize) -> Result<i32> {
    i32::try_from(n)
        .map_err(|_| candle_core::Error::Msg(format!("fused CUDA kernel: size {n} too large")))
}

fn grid(blocks: usize) -> Result<(u32, u32)> {
    Ok((int_u32(blocks)?, 1))
}

/// `n` as a grid dimension.
pub(crate) fn int_u32(n: usize) -> Result<u32> {
    u32::try_from(n).map_err(|_| candle_core::Error::Msg(format!("fused CUDA kernel: {n} blocks")))
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

/// The grid and block of a kernel launch.
pub(crate) type Shape2 = ((u32, u32), (u32, u32));

/// One block per row of `width`, with up to `max` threads.
fn per_row(rows: usize, width: usize, max: u32) -> Result<Shape2> {
    Ok((grid(rows)?, (row_threads(width, max), 1)))
}

/// One thread per element of `n`.
fn per_element(n: usize) -> Result<Shape2> {
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

/// Launches kernel `name` (suffixed for `dtype`) on `shape` with the signature most kernels in
/// ops.cu share: the addresses of the contiguous `inputs`, then of `out`, then `scalars`.
/// Returns `out`.
fn run(
    (name, dtype): (&str, DType),
    shape: Shape2,
    inputs: &[Operand],
    out: CudaStorage,
    scalars: &[Arg],
) -> Result<CudaStorage> {
    let mut args = inputs
        .iter()
        .map(|&operand| address(operand).map(Arg::Address))
        .collect::<Result<Vec<_>>>()?;
    args.push(Arg::Address(base_address(&out)?));
    args.extend_from_slice(scalars);
    launch(&out.device, name, Some(dtype), shape.0, shape.1, &args)?;
    Ok(out)
}

/// RMSNorm forward.
pub(crate) fn rms_norm(x: Operand, w: Operand, eps: f32) -> Result<CudaStorage> {
    let dtype = common_dtype(&[x, w])?;
    let (rows, width) = rows_and_width(x.1)?;
    check_weight(w, width)?;
    let y = alloc(&x.0.device, dtype, rows * width)?;
    let scalars = [int(rows)?, int(width)?, Arg::Float(eps)];
    let (name, _) = elementwise_kernel(("rms_norm_fwd", "rms_norm_fwd_wide"), &[x, w], width)?;
    run((name, dtype), per_warp_row(rows)?, &[x, w], y, &scalars)
}

/// Residual add and RMSNorm: `[sum; normed]` in one buffer of twice `x`'s size.
pub(crate) fn add_rms_norm(
    x: Operand,
    delta: Operand,
    w: Operand,
    eps: f32,
) -> Result<CudaStorage> {
    let dtype = common_dtype(&[x, delta, w])?;
    let (rows, width) = rows_and_width(x.1)?;
    check_weight(w, width)?;
    same_count(x, delta)?;
    let out = alloc(&x.0.device, dtype, 2 * rows * width)?;
    let shape = per_row(rows, width, 256)?;
    let scalars = [int(rows)?, int(width)?, Arg::Float(eps)];
    run(
        ("add_rms_norm", dtype),
        shape,
        &[x, delta, w],
        out,
        &scalars,
    )
}

/// Rotates the queries of packed projections `qkv` `[b, t, ..]` into a new `[b, heads, t, d]`
/// buffer and writes the rotated keys and the values into `cache`
/// `[2, b, kv_heads, max_len, d]` at `n.at`: a host start, or `position`, the device-held one
/// (see `write_kv` in ops.cu). The cache is written through its address: the caller owns it
/// and nothing reads it meanwhile.
pub(crate) fn write_kv(
    cache: Operand,
    qkv: Operand,
    (cos, sin): (Operand, Operand),
    position: Option<Operand>,
    n: &super::kv_write::KvLayout,
) -> Result<CudaStorage> {
    let dtype = common_dtype(&[cache, qkv, cos, sin])?;
    let (&[_, batch, _, max_len, _], &[_, positions, _]) = (cache.1.dims(), qkv.1.dims()) else {
        candle_core::bail!("write_kv: cache {:?}, projections {:?}", cache.1, qkv.1);
    };
    let start = match n.at {
        super::Position::Host(start) => start,
        super::Position::Device(_) => 0,
    };
    let q = alloc(
        &qkv.0.device,
        dtype,
        batch * n.heads * positions * n.head_size,
    )?;
    let args = [
        Arg::Address(address(qkv)?),
        Arg::Address(address(cos)?),
        Arg::Address(address(sin)?),
        Arg::Address(base_address(&q)?),
        Arg::Address(address(cache)?),
        int(batch)?,
        int(positions)?,
        int(n.heads)?,
        int(n.kv_heads)?,
        int(n.head_size)?,
        int(max_len)?,
        int(start)?,
        Arg::Address(optional_address(position)?),
    ];
    let threads = batch * positions * (n.heads + n.kv_heads) * n.head_size / 2;
    let (grid, block) = per_element(threads)?;
    launch(&qkv.0.device, "write_kv", Some(dtype), grid, block, &args)?;
    Ok(q)
}

/// The address of an optional operand, or null (0) without one.
fn optional_address(operand: Option<Operand>) -> Result<u64> {
    operand.map_or(Ok(0), address)
}

/// Whether [`gemv`] takes `x` `[rows, in]` and `w` `[out, in]` (few rows, checked by the
/// caller): 16-byte aligned rows and operands, one dtype.
pub(crate) fn gemv_supported(x: Operand, w: Operand) -> bool {
    let (Ok((_, inp)), Ok((_, w_inp))) = (rows_and_width(x.1), rows_and_width(w.1)) else {
        return false;
    };
    let size = x.0.dtype().size_in_bytes();
    x.0.dtype() == w.0.dtype()
        && inp == w_inp
        && inp > 0
        && (inp * size) % 16 == 0
        && start_aligned(&[x, w]).unwrap_or(false)
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

/// `x @ w.t()` for `x` `[rows, in]` and `w` `[out, in]` that [`gemv_supported`] accepts; with
/// `swiglu`, `w` stacks gate and up rows and the result is `silu(gate) · up`, `[rows, out / 2]`.
pub(crate) fn gemv(x: Operand, w: Operand, swiglu: bool) -> Result<CudaStorage> {
    let dtype = common_dtype(&[x, w])?;
    let (rows, inp) = rows_and_width(x.1)?;
    let (w_rows, _) = rows_and_width(w.1)?;
    let (name, out) = match swiglu {
        true => ("gemv_swiglu", w_rows / 2),
        false => ("gemv", w_rows),
    };
    let y = alloc(&x.0.device, dtype, rows * out)?;
    let shape = (
        grid(out.div_ceil(WARP_ROWS_PER_BLOCK))?,
        ((32 * WARP_ROWS_PER_BLOCK) as u32, 1),
    );
    run(
        (name, dtype),
        shape,
        &[x, w],
        y,
        &[int(rows)?, int(inp)?, int(out)?],
    )
}

fn check_weight(w: Operand, width: usize) -> Result<()> {
    if w.1.shape().elem_count() != width {
        candle_core::bail!(
            "rms_norm: weight of {} for rows of {width}",
            w.1.shape().elem_count()
        );
    }
    Ok(())
}

/// RMSNorm input gradient; with `inverse`, the kernel also writes each row's inverse RMS there
/// (f32, one per row) for [`rms_norm_weight_grad`].
pub(crate) fn rms_norm_input_grad(
    x: Operand,
    w: Operand,
    g: Operand,
    eps: f32,
    inverse: Option<&CudaStorage>,
) -> Result<CudaStorage> {
    let dtype = common_dtype(&[x, w, g])?;
    let (rows, width) = rows_and_width(x.1)?;
    check_weight(w, width)?;
    let dx = alloc(&x.0.device, dtype, rows * width)?;
    let inverse = inverse.map(base_address).transpose()?.unwrap_or(0);
    let scalars = [
        int(rows)?,
        int(width)?,
        Arg::Float(eps),
        Arg::Address(inverse),
    ];
    let kernels = ("rms_norm_dx", "rms_norm_dx_wide");
    let (name, _) = elementwise_kernel(kernels, &[x, w, g], width)?;
    run((name, dtype), per_warp_row(rows)?, &[x, w, g], dx, &scalars)
}

/// The per-row inverse RMS of `x` (f32), for [`rms_norm_weight_grad`].
pub(crate) fn rms_norm_inverse(x: Operand, eps: f32) -> Result<CudaStorage> {
    let (rows, width) = rows_and_width(x.1)?;
    let kernels = ("rms_norm_inverse", "rms_norm_inverse_wide");
    run(
        (elementwise_kernel(kernels, &[x], width)?.0, x.0.dtype()),
        per_warp_row(rows)?,
        &[x],
        rms_norm_inverse_buffer(x)?,
        &[int(rows)?, int(width)?, Arg::Float(eps)],
    )
}

/// An f32 buffer for the per-row inverse RMS of `x`.
pub(crate) fn rms_norm_inverse_buffer(x: Operand) -> Result<CudaStorage> {
    let (rows, _) = rows_and_width(x.1)?;
    alloc(&x.0.device, DType::F32, rows.max(1))
}

/// RMSNorm weight gradient from the per-row inverse RMS: column sums per chunk of rows, then
/// the sum of the chunks.
pub(crate) fn rms_norm_weight_grad(
    x: Operand,
    g: Operand,
    inverse: &CudaStorage,
) -> Result<CudaStorage> {
    const ROWS_PER_CHUNK: usize = 64;
    let dtype = common_dtype(&[x, g])?;
    let (rows, width) = rows_and_width(x.1)?;
    let dev = &x.0.device;
    let inverse_layout = Layout::contiguous(rows.max(1));
    let chunks = rows.div_ceil(ROWS_PER_CHUNK).max(1);
    // Every (chunk, column) partial sum is written by the kernel.
    let partial = run(
        ("rms_norm_dw_partial", dtype),
        ((grid(width.div_ceil(32))?.0, grid(chunks)?.0), (32, 8)),
        &[x, g, (inverse, &inverse_layout)],
        alloc(dev, DType::F32, chunks * width)?,
        &[int(rows)?, int(width)?, int(ROWS_PER_CHUNK)?],
    )?;
    let partial_layout = Layout::contiguous(chunks * width);
    run(
        ("rms_norm_dw_finish", dtype),
        per_element(width)?,
        &[(&partial, &partial_layout)],
        alloc(dev, dtype, width)?,
        &[int(chunks)?, int(width)?],
    )
}

/// RoPE (`sign` 1) or its gradient (`sign` -1) for `x` `[.., seq, heads, d]` (`heads` 1 for
/// `[.., seq, d]`) and tables `[seq, d/2]`.
pub(crate) fn rope(
    x: Operand,
    (cos, sin): (Operand, Operand),
    heads: usize,
    sign: f32,
) -> Result<CudaStorage> {
    let dtype = common_dtype(&[x, cos, sin])?;
    let (rows, d) = rows_and_width(x.1)?;
    let half = d / 2;
    let table = cos.1.shape().elem_count();
    if half == 0 || d % 2 != 0 || table % half != 0 || sin.1.shape().elem_count() != table {
        candle_core::bail!("rope: tables of {table} for head size {d}");
    }
    let y = alloc(&x.0.device, dtype, rows * d)?;
    let scalars = [
        int(rows)?,
        int(d)?,
        int(table / half)?,
        int(heads)?,
        Arg::Float(sign),
    ];
    let (name, width) = elementwise_kernel(("rope", "rope_wide"), &[x, cos, sin], half)?;
    run(
        (name, dtype),
        per_element(rows * half / width)?,
        &[x, cos, sin],
        y,
        &scalars,
    )
}

/// The 16-byte-per-access variant of a kernel and its elements per access when every operand
/// starts on a 16-byte boundary and `run` (the length of each contiguous run of elements the
/// kernel moves: a row, a half head) is a multiple of them; else the one-element kernel and 1.
fn elementwise_kernel(
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

/// `[a, b, c, d]` to `[a, c, b, d]`, contiguous.
pub(crate) fn swap_middle(x: Operand) -> Result<CudaStorage> {
    let dtype = common_dtype(&[x])?;
    let &[_, b, c, d] = x.1.dims() else {
        candle_core::bail!("swap_middle: expected 4 dimensions, got {:?}", x.1.dims());
    };
    let n = x.1.shape().elem_count();
    let y = alloc(&x.0.device, dtype, n)?;
    let row_bytes = d * dtype.size_in_bytes();
    if row_bytes % 16 == 0 && start_aligned(&[x])? {
        // Rows of whole 16-byte units: move those (the output buffer is aligned).
        let (units, unit_rows) = (n * dtype.size_in_bytes() / 16, row_bytes / 16);
        let args = [
            Arg::Address(address(x)?),
            Arg::Address(base_address(&y)?),
            int(b)?,
            int(c)?,
            int(unit_rows)?,
            Arg::Count(units as u64),
        ];
        let (grid, block) = per_element(units)?;
        launch(&x.0.device, "swap_middle_v16", None, grid, block, &args)?;
        return Ok(y);
    }
    let scalars = [int(b)?, int(c)?, int(d)?, Arg::Count(n as u64)];
    run(("swap_middle", dtype), per_element(n)?, &[x], y, &scalars)
}

/// `a + b` for contiguous, 16-byte aligned operands of one dtype and size.
pub(crate) fn add(a: Operand, b: Operand) -> Result<CudaStorage> {
    let n = same_count(a, b)?;
    run_wide("add_vec", &[a, b], &[a, b], n)
}

/// `x` (contiguous from a 16-byte boundary) converted to `dtype`, 8 elements per thread.
pub(crate) fn cast(x: Operand, dtype: DType) -> Result<CudaStorage> {
    if !start_aligned(&[x])? {
        candle_core::bail!("cast: the operand must start on a 16-byte boundary");
    }
    let n = x.1.shape().elem_count();
    let out = alloc(&x.0.device, dtype, n)?;
    let name = format!("cast_to_{}", suffix(dtype)?);
    let scalars = [Arg::Count(n as u64)];
    run(
        (&name, x.0.dtype()),
        per_element(n.div_ceil(8))?,
        &[x],
        out,
        &scalars,
    )
}

/// `x · s` for a contiguous, 16-byte aligned `x` and a one-element f32 `s`.
pub(crate) fn scale(x: Operand, s: Operand) -> Result<CudaStorage> {
    if s.0.dtype() != DType::F32 || s.1.shape().elem_count() != 1 {
        candle_core::bail!("scale: factor of {:?} {:?}", s.0.dtype(), s.1.shape());
    }
    run_wide("scale_vec", &[x, s], &[x], x.1.shape().elem_count())
}

/// Runs an elementwise kernel that moves 16 bytes per thread over `n` elements of the first
/// input's dtype (the tail by the last thread), after checking that `aligned` start on a
/// 16-byte boundary.
fn run_wide(name: &str, inputs: &[Operand], aligned: &[Operand], n: usize) -> Result<CudaStorage> {
    let dtype = common_dtype(&inputs[..1])?;
    if !start_aligned(aligned)? {
        candle_core::bail!("{name}: operands must start on a 16-byte boundary");
    }
    let out = alloc(&inputs[0].0.device, dtype, n)?;
    let vectors = n.div_ceil(16 / dtype.size_in_bytes());
    let scalars = [Arg::Count(n as u64)];
    run((name, dtype), per_element(vectors)?, inputs, out, &scalars)
}

/// SwiGLU forward of separate `gate` and `up` of one shape.
pub(crate) fn swiglu(gate: Operand, up: Operand) -> Result<CudaStorage> {
    let n = same_count(gate, up)?;
    let dtype = common_dtype(&[gate, up])?;
    let rows = GluRows::one(n);
    swiglu_forward([address(gate)?, address(up)?], &gate.0.device, dtype, rows)
}

/// SwiGLU forward of a packed projection `h` `[.., 2 · width]`: the gate half, then the up half
/// of each row.
pub(crate) fn swiglu_packed(h: Operand) -> Result<CudaStorage> {
    let (rows, halves) = GluRows::packed(h)?;
    swiglu_forward(halves, &h.0.device, h.0.dtype(), rows)
}

/// SwiGLU gradients of separate `gate` and `up`, `[d gate; d up]` in one buffer of `2n`.
pub(crate) fn swiglu_grad(gate: Operand, up: Operand, grad: Operand) -> Result<CudaStorage> {
    let n = same_count(gate, up)?;
    same_count(gate, grad)?;
    let rows = GluRows::one(n);
    swiglu_backward([address(gate)?, address(up)?], grad, rows, 2 * n, n)
}

/// SwiGLU gradient of a packed projection `h` `[.., 2 · width]` for the output gradient `grad`
/// `[.., width]`: one packed gradient like `h`.
pub(crate) fn swiglu_packed_grad(h: Operand, grad: Operand) -> Result<CudaStorage> {
    common_dtype(&[h, grad])?;
    let (rows, halves) = GluRows::packed(h)?;
    if grad.1.shape().elem_count() != rows.n {
        candle_core::bail!(
            "swiglu: a gradient of {:?} for {:?}",
            grad.1.dims(),
            h.1.dims()
        );
    }
    swiglu_backward(halves, grad, rows, 2 * rows.n, rows.width)
}

/// Where the gate and up rows of a SwiGLU are: `n` elements in rows of `width`, row r of each
/// starting `r · stride` elements from its first.
#[derive(Clone, Copy)]
struct GluRows {
    n: usize,
    width: usize,
    stride: usize,
}

impl GluRows {
    /// Separate tensors of `n` elements: one row.
    fn one(n: usize) -> Self {
        Self {
            n,
            width: n.max(1),
            stride: n.max(1),
        }
    }

    /// The halves of the packed rows `[.., 2 · width]` of `h`, and the addresses of its first
    /// gate and first up element.
    fn packed(h: Operand) -> Result<(Self, [u64; 2])> {
        let (rows, two_width) = rows_and_width(h.1)?;
        if two_width % 2 != 0 {
            candle_core::bail!("swiglu: packed rows of odd width {two_width}");
        }
        let width = two_width / 2;
        let gate = address(h)?;
        let up = gate + (width * h.0.dtype().size_in_bytes()) as u64;
        let rows = Self {
            n: rows * width,
            width,
            stride: two_width,
        };
        Ok((rows, [gate, up]))
    }

    /// The 16-byte kernel where every address and row boundary allows it: its name and the
    /// elements each thread moves.
    fn kernel(
        &self,
        names: (&'static str, &'static str),
        dtype: DType,
        addresses: &[u64],
    ) -> (&'static str, usize) {
        let vector = 16 / dtype.size_in_bytes();
        let aligned = addresses.iter().all(|a| a % 16 == 0);
        match aligned && self.width % vector == 0 && self.stride % vector == 0 {
            true => (names.1, vector),
            false => (names.0, 1),
        }
    }

    fn args(&self) -> [Arg; 3] {
        [self.n, self.width, self.stride].map(|v| Arg::Count(v as u64))
    }
}

fn swiglu_forward(
    [gate, up]: [u64; 2],
    device: &CudaDevice,
    dtype: DType,
    rows: GluRows,
) -> Result<CudaStorage> {
    let y = alloc(device, dtype, rows.n)?;
    let y_address = base_address(&y)?;
    let names = ("swiglu_fwd", "swiglu_fwd_wide");
    let (name, per_thread) = rows.kernel(names, dtype, &[gate, up, y_address]);
    let args = [
        [gate, up, y_address].map(Arg::Address).as_slice(),
        &rows.args(),
    ]
    .concat();
    let (grid, block) = per_element(rows.n / per_thread)?;
    launch(device, name, Some(dtype), grid, block, &args)?;
    Ok(y)
}

/// The gradients into a new buffer of `len` elements: d gate from its start, d up from
/// `up_offset` elements on, each at the places of gate and up in their rows.
fn swiglu_backward(
    [gate, up]: [u64; 2],
    grad: Operand,
    rows: GluRows,
    len: usize,
    up_offset: usize,
) -> Result<CudaStorage> {
    let (device, dtype) = (&grad.0.device, grad.0.dtype());
    let out = alloc(device, dtype, len)?;
    let d_gate = base_address(&out)?;
    let d_up = d_gate + (up_offset * dtype.size_in_bytes()) as u64;
    let grad = address(grad)?;
    let names = ("swiglu_bwd", "swiglu_bwd_wide");
    let (name, per_thread) = rows.kernel(names, dtype, &[gate, up, grad, d_gate, d_up]);
    let addresses = [gate, up, grad, d_gate, d_up].map(Arg::Address);
    let args = [addresses.as_slice(), &rows.args()].concat();
    let (grid, block) = per_element(rows.n / per_thread)?;
    launch(device, name, Some(dtype), grid, block, &args)?;
    Ok(out)
}

fn same_count(a: Operand, b: Operand) -> Result<usize> {
    let (n, m) = (a.1.shape().elem_count(), b.1.shape().elem_count());
    if n != m {
        candle_core::bail!("fused CUDA kernel: operands of {n} and {m} elements");
    }
    Ok(n)
}

/// Causal softmax of attention scores `[.., q_len, kv_len]`, scaled by `scale`.
pub(crate) fn causal_softmax(scores: Operand, q_len: usize, scale: f32) -> Result<CudaStorage> {
    let dtype = common_dtype(&[scores])?;
    let (rows, kv_len) = rows_and_width(scores.1)?;
    let probs = alloc(&scores.0.device, dtype, rows * kv_len)?;
    let scalars = [int(rows)?, int(q_len)?, int(kv_len)?, Arg::Float(scale)];
    let kernels = ("causal_softmax_fwd", "causal_softmax_fwd_wide");
    let (name, _) = elementwise_kernel(kernels, &[scores], kv_len)?;
    run(
        (name, dtype),
        per_warp_row(rows)?,
        &[scores],
        probs,
        &scalars,
    )
}

/// Gradient of the causal softmax with respect to the raw scores.
pub(crate) fn causal_softmax_grad(
    probs: Operand,
    grad: Operand,
    q_len: usize,
    scale: f32,
) -> Result<CudaStorage> {
    let dtype = common_dtype(&[probs, grad])?;
    let (rows, kv_len) = rows_and_width(probs.1)?;
    let ds = alloc(&probs.0.device, dtype, rows * kv_len)?;
    let scalars = [int(rows)?, int(q_len)?, int(kv_len)?, Arg::Float(scale)];
    let kernels = ("causal_softmax_bwd", "causal_softmax_bwd_wide");
    let (name, _) = elementwise_kernel(kernels, &[probs, grad], kv_len)?;
    run(
        (name, dtype),
        per_warp_row(rows)?,
        &[probs, grad],
        ds,
        &scalars,
    )
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

/// One query per (batch, head), `q` `[b, heads, 1, d]`, against `k`/`v`
/// `[b, kv_heads, kv_len, d]` read in place (views into a cache allowed).
/// With `position` (the step's own, held on the device), `k`/`v` are the whole cache and the
/// kernel attends to the positions up to it.
pub(crate) fn decode_attention(
    q: Operand,
    k: Operand,
    v: Operand,
    position: Option<Operand>,
    scale: f32,
) -> Result<CudaStorage> {
    let dtype = common_dtype(&[q, k, v])?;
    let (&[b, heads, _, d], &[_, kv_heads, kv_len, _]) = (q.1.dims(), k.1.dims()) else {
        candle_core::bail!("decode attention: expected 4-D operands");
    };
    let (k_address, ks) = strided4(k)?;
    let (v_address, vs) = strided4(v)?;
    let dev = &q.0.device;
    let out = alloc(dev, dtype, b * heads * d)?;
    let scores = alloc(dev, DType::F32, b * heads * kv_len)?;
    let args = [
        Arg::Address(address(q)?),
        Arg::Address(k_address),
        Arg::Address(v_address),
        Arg::Address(base_address(&out)?),
        Arg::Address(base_address(&scores)?),
        int(heads)?,
        int(heads / kv_heads.max(1))?,
        int(kv_len)?,
        int(d)?,
        Arg::Count(ks[0]),
        Arg::Count(ks[1]),
        Arg::Count(ks[2]),
        Arg::Count(vs[0]),
        Arg::Count(vs[1]),
        Arg::Count(vs[2]),
        Arg::Float(scale),
        Arg::Address(optional_address(position)?),
    ];
    // A decode step has one block per head: each gets the most threads a block can have
    // (at least one per element of a head).
    let threads = 1024;
    if d > threads {
        candle_core::bail!("decode attention: head size {d} above {threads}");
    }
    let shared = u32::try_from((d + threads) * 4)
        .map_err(|_| candle_core::Error::Msg("head size".into()))?;
    let config = (grid(b * heads)?, (threads as u32, 1), shared);
    launch_with_shared(dev, "decode_attention", Some(dtype), config, &args)?;
    Ok(out)
}

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
pub(crate) fn token_nll(logits: Operand, targets: Operand) -> Result<CudaStorage> {
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
pub(crate) fn token_nll_grad(logits: Operand, targets: Operand, g: Operand) -> Result<CudaStorage> {
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
/// kernel; `g` is f32 `[n]`.
pub(crate) fn token_nll_with_grad(
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
    let args = [
        Arg::Address(address(logits)?),
        Arg::Address(address(targets)?),
        Arg::Address(address(g)?),
        Arg::Address(base_address(&nll)?),
        Arg::Address(base_address(&d)?),
        int(vocab)?,
    ];
    let (grid, block) = per_row(rows, vocab, 512)?;
    launch(
        device,
        "token_nll_with_grad",
        Some(dtype),
        grid,
        block,
        &args,
    )?;
    Ok((nll, d))
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

/// Embedding gradient: `grad` rows `[tokens, width]` summed into an f32 `[vocab, width]` table
/// at the rows named by u32 `ids`.
pub(crate) fn embedding_grad(ids: Operand, grad: Operand, vocab: usize) -> Result<CudaStorage> {
    let dtype = common_dtype(&[grad])?;
    let (tokens, width) = rows_and_width(grad.1)?;
    if ids.0.dtype() != DType::U32 || ids.1.shape().elem_count() != tokens {
        candle_core::bail!(
            "embedding gradient: {tokens} rows for {:?} ids",
            ids.1.shape()
        );
    }
    // Zeroed: the kernel adds into it.
    let table = zeros_f32(&grad.0.device, vocab * width)?;
    let scalars = [int(tokens)?, int(width)?, int(vocab)?];
    let shape = per_element(tokens * width)?;
    run(
        ("embedding_grad", dtype),
        shape,
        &[ids, grad],
        table,
        &scalars,
    )
}

/// One parameter of a multi-tensor launch: f32 buffer addresses and size.
pub(crate) struct ParamBuffers {
    pub weight: u64,
    pub grad: u64,
    pub m: u64,
    pub v: u64,
    pub len: usize,
    /// `1 − lr · weight_decay` (1 without decay).
    pub keep: f32,
}

/// Elements per block of the multi-tensor kernels.
const MULTI_CHUNK: usize = 1 << 16;

/// Uploads the descriptor table of `params` (6 words each) followed by the chunk list (one word
/// per block: parameter index << 40 | first element). Returns it and the number of chunks.
fn descriptor_table(
    device: &CudaDevice,
    params: &[ParamBuffers],
) -> Result<(
    candle_core::cuda_backend::cudarc::driver::CudaSlice<u64>,
    usize,
)> {
    let mut words = Vec::with_capacity(6 * params.len());
    let mut chunks = Vec::new();
    for (i, p) in params.iter().enumerate() {
        words.extend([
            p.weight,
            p.grad,
            p.m,
            p.v,
            p.len as u64,
            p.keep.to_bits() as u64,
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

/// The scalars of an AdamW step shared by all parameters.
pub(crate) struct AdamWScalars {
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub bias1: f32,
    pub bias2: f32,
    pub grad_scale: f32,
}

/// One in-place AdamW update of every parameter in `params`, in one launch.
pub(crate) fn adamw_multi(
    device: &CudaDevice,
    params: &[ParamBuffers],
    s: &AdamWScalars,
) -> Result<()> {
    if params.is_empty() {
        return Ok(());
    }
    let (table, chunks) = descriptor_table(device, params)?;
    let table_address = table.device_ptr(&device.cuda_stream()).0;
    let args = [
        Arg::Address(table_address),
        Arg::Address(table_address + 8 * 6 * params.len() as u64),
        int(MULTI_CHUNK)?,
        Arg::Float(s.lr),
        Arg::Float(s.beta1),
        Arg::Float(s.beta2),
        Arg::Float(s.eps),
        Arg::Float(s.bias1),
        Arg::Float(s.bias2),
        Arg::Float(s.grad_scale),
    ];
    launch(device, "adamw_multi", None, grid(chunks)?, (256, 1), &args)
}

/// The sum of squares of the gradients in `params` (only `grad` and `len` are read), as an f32
/// scalar on the device. Deterministic: per-chunk partials are summed in a fixed order.
pub(crate) fn sum_squares_multi(
    device: &CudaDevice,
    params: &[ParamBuffers],
) -> Result<CudaStorage> {
    let out = zeros_f32(device, 1)?;
    if params.is_empty() {
        return Ok(out);
    }
    let (table, chunks) = descriptor_table(device, params)?;
    let table_address = table.device_ptr(&device.cuda_stream()).0;
    let partial = alloc(device, DType::F32, chunks)?;
    let args = [
        Arg::Address(table_address),
        Arg::Address(table_address + 8 * 6 * params.len() as u64),
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

/// The weight gradient `gᵀ · x` (f32 `[out, in]`) of 16-bit `g` `[n, out]` and `x` `[n, in]`,
/// both contiguous and of one dtype: one cuBLAS GEMM that accumulates in f32 and writes f32.
pub(crate) fn weight_grad_f32(g: Operand, x: Operand) -> Result<CudaStorage> {
    use candle_core::cuda_backend::cudarc::cublas::{result::gemm_ex, sys};
    let dtype = common_dtype(&[g, x])?;
    let element = match dtype {
        DType::BF16 => sys::cudaDataType_t::CUDA_R_16BF,
        DType::F16 => sys::cudaDataType_t::CUDA_R_16F,
        other => candle_core::bail!("weight gradient: {other:?} operands, 16-bit expected"),
    };
    let (n, out) = rows_and_width(g.1)?;
    let (n_x, inp) = rows_and_width(x.1)?;
    if n != n_x {
        candle_core::bail!("weight gradient: {n} gradient rows for {n_x} input rows");
    }
    let device = &g.0.device;
    let dw = alloc(device, DType::F32, out * inp)?;
    let (alpha, beta) = (1f32, 0f32);
    let blas = device.cublas_handle();
    // Column-major, this is `dwᵀ [in, out] = xᵀ [in, n] · g [n, out]`: x as stored (`in` by
    // `n`, leading dimension `in`), g transposed (stored `out` by `n`).
    // SAFETY: the addresses are of live, contiguous buffers of the sizes given, on the
    // stream the handle is bound to; `dw` has `out * inp` f32 elements.
    unsafe {
        gemm_ex(
            *blas.handle(),
            sys::cublasOperation_t::CUBLAS_OP_N,
            sys::cublasOperation_t::CUBLAS_OP_T,
            c_int(inp)?,
            c_int(out)?,
            c_int(n)?,
            &alpha as *const f32 as *const _,
            address(x)? as *const _,
            element,
            c_int(inp)?,
            address(g)? as *const _,
            element,
            c_int(out)?,
            &beta as *const f32 as *const _,
            base_address(&dw)? as *mut _,
            sys::cudaDataType_t::CUDA_R_32F,
            c_int(inp)?,
            sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
            sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
        )
    }
    .map_err(|e| candle_core::Error::Msg(format!("weight gradient GEMM: {e:?}")))?;
    Ok(dw)
}
