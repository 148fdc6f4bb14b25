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
use candle_core::cuda_backend::cudarc::driver::{sys, CudaFunction, CudaStream};
use candle_core::cuda_backend::WrapErr;
use candle_core::{CudaDevice, CudaStorage, DType, Result};
use std::sync::OnceLock;

/// Whether `device` launches kernels programmatically: compute capability 9.x (the fat
/// binary's machine code for it holds the waits; the PTX for other GPUs targets compute 8.0,
/// which has none), unless `LLMTOOL_CUDA_PDL=0`.
pub(crate) fn available(device: &CudaDevice) -> Result<bool> {
    static ENABLED: OnceLock<bool> = OnceLock::new();
    let enabled = *ENABLED.get_or_init(|| std::env::var("LLMTOOL_CUDA_PDL").as_deref() != Ok("0"));
    Ok(enabled && crate::launch::compute_capability(device)?.0 == 9)
}

/// Launches `func` on `stream` with programmatic stream serialization allowed: it may start
/// while the kernel ahead of it runs.
pub(crate) fn launch(
    func: &CudaFunction,
    stream: &CudaStream,
    (grid, block, shared): ((u32, u32), (u32, u32), u32),
    args: &[Arg],
) -> Result<()> {
    step_past_frees(stream)?;
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

/// A node of the graph a capturing stream records, with the data of the edge it would give.
type Dependency = (sys::CUgraphNode, sys::CUgraphEdgeData);

/// The nodes the next node captured on `stream` would depend on, with their edges' data;
/// `None` where the stream is not capturing.
fn capture_dependencies(stream: &CudaStream) -> Result<Option<Vec<Dependency>>> {
    let mut status = sys::CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_NONE;
    let mut nodes: *const sys::CUgraphNode = std::ptr::null();
    let mut edges: *const sys::CUgraphEdgeData = std::ptr::null();
    let mut count = 0usize;
    // SAFETY: every out-pointer points at a local of the type the call writes; the id and the
    // graph are not asked for (null).
    unsafe {
        sys::cuStreamGetCaptureInfo_v3(
            stream.cu_stream(),
            &mut status,
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            &mut nodes,
            &mut edges,
            &mut count,
        )
    }
    .result()
    .w()?;
    if status != sys::CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_ACTIVE {
        return Ok(None);
    }
    Ok(Some(
        (0..count)
            // SAFETY: the driver returned `count` nodes, and as many edges' data where the
            // pointer is not null (null: every edge is a default one); both arrays stay valid
            // until the stream's next capture call.
            .map(|i| unsafe {
                let edge = if edges.is_null() {
                    std::mem::zeroed()
                } else {
                    *edges.add(i)
                };
                (*nodes.add(i), edge)
            })
            .collect(),
    ))
}

/// Makes `dependencies` the nodes the next node captured on `stream` depends on.
fn set_capture_dependencies(stream: &CudaStream, dependencies: &[Dependency]) -> Result<()> {
    let (mut nodes, edges): (Vec<_>, Vec<_>) = dependencies.iter().copied().unzip();
    let set = sys::CUstreamUpdateCaptureDependencies_flags::CU_STREAM_SET_CAPTURE_DEPENDENCIES;
    // SAFETY: both arrays hold `dependencies.len()` elements and outlive the call.
    unsafe {
        sys::cuStreamUpdateCaptureDependencies_v2(
            stream.cu_stream(),
            nodes.as_mut_ptr(),
            edges.as_ptr(),
            nodes.len(),
            set as u32,
        )
    }
    .result()
    .w()
}

/// The nodes `node` depends on, with their edges' data.
fn node_dependencies(node: sys::CUgraphNode) -> Result<Vec<Dependency>> {
    let mut count = 0usize;
    // SAFETY: with null arrays the call only writes the count.
    unsafe {
        sys::cuGraphNodeGetDependencies_v2(
            node,
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            &mut count,
        )
    }
    .result()
    .w()?;
    let mut nodes = vec![std::ptr::null_mut(); count];
    // SAFETY: an all-zero edge's data is a valid C struct (the default edge).
    let mut edges = vec![unsafe { std::mem::zeroed::<sys::CUgraphEdgeData>() }; count];
    // SAFETY: both arrays hold `count` elements, the number the driver reported.
    unsafe {
        sys::cuGraphNodeGetDependencies_v2(node, nodes.as_mut_ptr(), edges.as_mut_ptr(), &mut count)
    }
    .result()
    .w()?;
    Ok(nodes.into_iter().zip(edges).take(count).collect())
}

/// Whether `node` frees memory.
fn frees_memory(node: sys::CUgraphNode) -> Result<bool> {
    let mut kind = sys::CUgraphNodeType::CU_GRAPH_NODE_TYPE_EMPTY;
    // SAFETY: `kind` is a local the call writes.
    unsafe { sys::cuGraphNodeGetType(node, &mut kind) }
        .result()
        .w()?;
    Ok(kind == sys::CUgraphNodeType::CU_GRAPH_NODE_TYPE_MEM_FREE)
}

/// In a capturing stream, lets the next node depend on what the memory frees at the end of
/// the stream's chain depended on instead of on those frees: the frees stay in the graph,
/// ordered after the work that used their memory, and no node captured later is ordered after
/// them (so no later allocation reuses their memory). A kernel launched programmatically then
/// depends on the kernel ahead itself, the only dependency the graph makes programmatic; behind
/// the frees a captured step puts between two kernels (each tensor dropped once used), it
/// would wait for that kernel's end.
fn step_past_frees(stream: &CudaStream) -> Result<()> {
    let Some(dependencies) = capture_dependencies(stream)? else {
        return Ok(());
    };
    let mut kept: Vec<Dependency> = Vec::with_capacity(dependencies.len());
    let mut pending = dependencies.clone();
    while let Some(dependency) = pending.pop() {
        if frees_memory(dependency.0)? {
            pending.extend(node_dependencies(dependency.0)?);
        } else if !kept.iter().any(|k| k.0 == dependency.0) {
            kept.push(dependency);
        }
    }
    if kept.len() != dependencies.len() || kept.iter().any(|k| !dependencies.contains(k)) {
        set_capture_dependencies(stream, &kept)?;
    }
    Ok(())
}

/// Allocates `n` elements of `dtype` on `device` for a kernel launched programmatically: in a
/// capturing stream, the allocation's node goes in at the root of the graph instead of after
/// the kernel ahead, which the kernel's dependency on its output would otherwise make it
/// wait for. A root allocation shares memory with no other of the graph's (none is ordered
/// before it), a few kilobytes a product in a decode step.
pub(crate) fn alloc_at_root(device: &CudaDevice, dtype: DType, n: usize) -> Result<CudaStorage> {
    let stream = device.cuda_stream();
    let Some(dependencies) = capture_dependencies(&stream)? else {
        return crate::launch::alloc(device, dtype, n);
    };
    set_capture_dependencies(&stream, &[])?;
    let allocated = crate::launch::alloc(device, dtype, n);
    let allocation = capture_dependencies(&stream)?.unwrap_or_default();
    let restored = [dependencies, allocation].concat();
    set_capture_dependencies(&stream, &restored)?;
    allocated
}
