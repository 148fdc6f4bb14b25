//! CUDA graphs: the work a closure enqueues on a device's stream, captured once and replayed
//! with one launch. A decode step is about ten small kernels per layer, and each costs a few
//! microseconds of host work (candle's dispatch, the driver's launch) for a few microseconds
//! of GPU work; replayed as a graph, the host launches the whole step once.
//!
//! A replay reuses every address the capture saw: the work must read its changing inputs from
//! tensors written in place ([`write_u32s`]), and everything it read or wrote must outlive
//! the graph at the same address. Buffers the work allocates and frees during the capture
//! become part of the graph.

use candle_core::{CpuStorage, Device, InplaceOp1, Layout, Result, Tensor};

/// Whether work on `device` can be captured: a CUDA device, with the `cuda` feature.
pub fn can_capture(device: &Device) -> bool {
    cfg!(feature = "cuda") && device.is_cuda()
}

/// Captured work, replayed by [`Graph::launch`].
pub struct Graph {
    inner: Inner,
}

#[cfg(feature = "cuda")]
type Inner = candle_core::cuda_backend::cudarc::driver::CudaGraph;

/// Without CUDA no graph can be captured: the type has no values.
#[cfg(not(feature = "cuda"))]
enum Inner {}

impl Graph {
    /// Captures what `work` enqueues on `device`'s stream; nothing runs until
    /// [`Graph::launch`]. `work` must not copy between host and device (small host constants
    /// that candle uploads for its kernels are served from its capture cache, which holds
    /// those of earlier uncaptured runs of the same work on this thread: run it once first),
    /// and must free everything it allocates before it returns.
    pub fn capture(device: &Device, work: impl FnOnce() -> Result<()>) -> Result<Self> {
        #[cfg(feature = "cuda")]
        if let Device::Cuda(dev) = device {
            return capture_cuda(dev, work);
        }
        let _ = work;
        candle_core::bail!(
            "CUDA graphs need a CUDA device, not {:?}",
            device.location()
        )
    }

    /// Enqueues one replay of the captured work on the stream it was captured from.
    pub fn launch(&self) -> Result<()> {
        #[cfg(feature = "cuda")]
        {
            use candle_core::cuda_backend::WrapErr;
            self.inner.launch().w()
        }
        #[cfg(not(feature = "cuda"))]
        match self.inner {}
    }
}

#[cfg(feature = "cuda")]
fn capture_cuda(dev: &candle_core::CudaDevice, work: impl FnOnce() -> Result<()>) -> Result<Graph> {
    use candle_core::cuda_backend::cudarc::driver::sys;
    use candle_core::cuda_backend::WrapErr;
    let _cached_uploads = dev.enable_cuda_graph_htod_cache();
    let stream = dev.cuda_stream();
    stream
        .begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
        .w()?;
    let worked = work();
    // The capture ends whatever happened, so that the stream runs work again.
    let graph = stream.end_capture(sys::CUgraphInstantiate_flags(0));
    let error = match (worked, graph) {
        (Ok(()), Ok(Some(inner))) => {
            write_dot(&inner)?;
            return Ok(Graph { inner });
        }
        (Err(e), _) => e,
        (Ok(()), Err(e)) => candle_core::Error::wrap(e),
        (Ok(()), Ok(None)) => candle_core::Error::Msg("the capture recorded nothing".into()),
    };
    // Frees that failed inside the broken capture left their error on the context, where the
    // next call would report it; the work runs uncaptured from here on.
    let _ = stream.context().check_err();
    Err(error.context("capturing a CUDA graph"))
}

/// Writes the captured graph's nodes and edges, as the driver describes them (Graphviz), to
/// the file `LLMTOOL_CUDA_GRAPH_DOT` names, when it names one: each capture overwrites it.
#[cfg(feature = "cuda")]
fn write_dot(graph: &candle_core::cuda_backend::cudarc::driver::CudaGraph) -> Result<()> {
    use candle_core::cuda_backend::cudarc::driver::sys;
    use candle_core::cuda_backend::WrapErr;
    let Some(path) = std::env::var_os("LLMTOOL_CUDA_GRAPH_DOT") else {
        return Ok(());
    };
    let path = std::ffi::CString::new(path.as_encoded_bytes())
        .map_err(|_| candle_core::Error::Msg("LLMTOOL_CUDA_GRAPH_DOT holds a NUL byte".into()))?;
    let verbose = sys::CUgraphDebugDot_flags::CU_GRAPH_DEBUG_DOT_FLAGS_VERBOSE as u32;
    // SAFETY: the graph is alive, and the path a NUL-terminated string that outlives the call.
    unsafe { sys::cuGraphDebugDotPrint(graph.cu_graph(), path.as_ptr(), verbose) }
        .result()
        .w()
        .map_err(|e| {
            e.context(format!(
                "writing the graph to {path:?} (LLMTOOL_CUDA_GRAPH_DOT)"
            ))
        })
}

/// Runs `work` with candle's capture cache of host uploads on, so that a later [`Graph::capture`]
/// of the same work finds them.
pub fn with_capture_cache<R>(device: &Device, work: impl FnOnce() -> Result<R>) -> Result<R> {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(dev) = device {
        let _cached_uploads = dev.enable_cuda_graph_htod_cache();
        return work();
    }
    let _ = device;
    work()
}

/// Overwrites the u32 tensor `t` (contiguous, `values.len()` elements) with `values`, in place:
/// its address stays, so work captured reading it sees the new values at its next replay.
pub fn write_u32s(t: &Tensor, values: &[u32]) -> Result<()> {
    if t.dtype() != candle_core::DType::U32 || t.elem_count() != values.len() {
        candle_core::bail!(
            "write_u32s: {} values for a {:?} {:?} tensor",
            values.len(),
            t.dims(),
            t.dtype()
        );
    }
    t.inplace_op1(&WriteU32s(values))
}

struct WriteU32s<'a>(&'a [u32]);

impl WriteU32s<'_> {
    fn range(&self, layout: &Layout) -> Result<std::ops::Range<usize>> {
        match layout.contiguous_offsets() {
            Some((start, end)) if end - start == self.0.len() => Ok(start..end),
            _ => candle_core::bail!("write_u32s: the tensor is not contiguous"),
        }
    }
}

impl InplaceOp1 for WriteU32s<'_> {
    fn name(&self) -> &'static str {
        "write-u32s"
    }

    fn cpu_fwd(&self, storage: &mut CpuStorage, layout: &Layout) -> Result<()> {
        let CpuStorage::U32(values) = storage else {
            candle_core::bail!("write_u32s: not a u32 tensor");
        };
        values[self.range(layout)?].copy_from_slice(self.0);
        Ok(())
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, storage: &mut candle_core::CudaStorage, layout: &Layout) -> Result<()> {
        use candle_core::cuda_backend::WrapErr;
        let range = self.range(layout)?;
        let stream = storage.device.cuda_stream();
        let mut view = storage.as_cuda_slice_mut::<u32>()?.slice_mut(range);
        // Straight to the stream: candle's own upload would go through its capture cache.
        stream.memcpy_htod(self.0, &mut view).w()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_in_place_and_refuses_a_wrong_count() {
        let t = Tensor::new(&[0u32, 0, 0], &Device::Cpu).unwrap();
        let view = t.narrow(0, 1, 2).unwrap();
        write_u32s(&view, &[7, 9]).unwrap();
        assert_eq!(t.to_vec1::<u32>().unwrap(), [0, 7, 9]);
        let message = write_u32s(&t, &[1]).unwrap_err().to_string();
        assert!(message.contains("1 values for a [3] U32"), "{message}");
    }

    #[test]
    fn only_cuda_captures() {
        assert!(!can_capture(&Device::Cpu));
        let message = Graph::capture(&Device::Cpu, || Ok(()))
            .err()
            .map(|e| e.to_string());
        assert!(message.is_some_and(|m| m.contains("need a CUDA device")));
    }
}
