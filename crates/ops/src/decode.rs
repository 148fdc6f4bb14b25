//! Attention for a decode step: one new query per sequence against the keys and values of a
//! KV cache read in place. The cache hands out views into its preallocated buffer; the general
//! path copies both to contiguous tensors, repeats grouped kv heads, and runs three kernels.
//! This op reads the views directly (any strides, unit stride along the head dimension), maps
//! each query head to its kv head, and does scores, softmax and the weighted sum in one kernel.
//! Inference only: it has no backward, and the dispatch never picks it for tracked tensors.

use super::cpu_kernel::{f32s, for_each_row, output};
#[cfg(feature = "cuda")]
use super::cuda;
use super::GroupedDims;
use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};

/// The largest head size the kernel takes (one CUDA block holds a thread per element).
const MAX_HEAD_SIZE: usize = 1024;

/// Whether [`decode_attention`] handles these operands.
pub(crate) fn supported(q: &Tensor, k: &Tensor, v: &Tensor) -> bool {
    let unit_last = |t: &Tensor| t.stride().last() == Some(&1);
    GroupedDims::of(q, k, v).is_some_and(|g| g.q_len == 1 && g.head_size <= MAX_HEAD_SIZE)
        && q.is_contiguous()
        && unit_last(k)
        && unit_last(v)
        && !(q.track_op() || k.track_op() || v.track_op())
}

/// `softmax(q kᵀ / √d) v` for `q` `[b, heads, 1, d]` and `k`/`v` `[b, kv_heads, kv_len, d]`;
/// the operands must pass [`supported`] and be on a backend [`super::fused`] accepts.
pub(crate) fn decode_attention(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
    let scale = 1.0 / (q.dim(3)? as f32).sqrt();
    q.apply_op3_no_bwd(k, v, &DecodeAttention { scale })
}

/// [`decode_attention`] on CUDA of a step at the position `position` holds (u32 `[1]`):
/// `k`/`v` are the cache's whole buffers and the kernel reads the position in place, so a
/// step captured once replays at the next one.
#[cfg(feature = "cuda")]
pub(crate) fn decode_attention_at(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    position: &Tensor,
) -> Result<Tensor> {
    let scale = 1.0 / (q.dim(3)? as f32).sqrt();
    let out = cuda::with_operands(&[q, k, v, position], |o| {
        cuda::decode_attention(o[0], o[1], o[2], Some(o[3]), scale)
    })?;
    Ok(cuda::tensor(out, q.shape().clone()))
}

struct DecodeAttention {
    scale: f32,
}

/// The strides of a cache view's first three dimensions and its offset, checked against the
/// length of the buffer it indexes.
fn view(layout: &Layout, len: usize) -> Result<(usize, [usize; 3])> {
    let (&[b, h, n, d], &[s0, s1, s2, 1]) = (layout.dims(), layout.stride()) else {
        candle_core::bail!("decode attention: unsupported layout {layout:?}");
    };
    let last =
        layout.start_offset() + (b.max(1) - 1) * s0 + (h.max(1) - 1) * s1 + (n.max(1) - 1) * s2 + d;
    if last > len {
        candle_core::bail!("decode attention: view {layout:?} beyond its buffer of {len}");
    }
    Ok((layout.start_offset(), [s0, s1, s2]))
}

impl CustomOp3 for DecodeAttention {
    fn name(&self) -> &'static str {
        "decode-attention"
    }

    fn cpu_fwd(
        &self,
        q: &CpuStorage,
        q_layout: &Layout,
        k: &CpuStorage,
        k_layout: &Layout,
        v: &CpuStorage,
        v_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let q = f32s(q, q_layout)?;
        let (k, v) = (k.as_slice::<f32>()?, v.as_slice::<f32>()?);
        let (k_start, ks) = view(k_layout, k.len())?;
        let (v_start, vs) = view(v_layout, v.len())?;
        let (&[_, heads, _, d], &[_, kv_heads, kv_len, _]) = (q_layout.dims(), k_layout.dims())
        else {
            candle_core::bail!("decode attention: expected 4-D operands");
        };
        let group = heads / kv_heads.max(1);
        let mut out = vec![0f32; q.len()];
        for_each_row(&mut out, d, |row, o| {
            let (b, kv_head) = (row / heads, (row % heads) / group);
            let query = &q[row * d..][..d];
            let k_base = k_start + b * ks[0] + kv_head * ks[1];
            let v_base = v_start + b * vs[0] + kv_head * vs[1];
            let scores: Vec<f32> = (0..kv_len)
                .map(|j| {
                    let key = &k[k_base + j * ks[2]..][..d];
                    query.iter().zip(key).map(|(a, b)| a * b).sum::<f32>() * self.scale
                })
                .collect();
            let max = scores.iter().fold(f32::NEG_INFINITY, |m, &s| m.max(s));
            let mut sum = 0f32;
            for (j, s) in scores.iter().enumerate() {
                let p = (s - max).exp();
                sum += p;
                let value = &v[v_base + j * vs[2]..][..d];
                o.iter_mut().zip(value).for_each(|(o, v)| *o += p * v);
            }
            o.iter_mut().for_each(|o| *o /= sum);
        });
        Ok(output(out, q_layout.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        q: &candle_core::CudaStorage,
        q_layout: &Layout,
        k: &candle_core::CudaStorage,
        k_layout: &Layout,
        v: &candle_core::CudaStorage,
        v_layout: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (q, k, v) = ((q, q_layout), (k, k_layout), (v, v_layout));
        let out = cuda::decode_attention(q, k, v, None, self.scale)?;
        Ok((out, q_layout.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use crate::parity::{relative_error, uniform};
    use crate::reference;

    #[test]
    fn matches_repeated_heads_and_reads_cache_views_in_place() {
        // A cache of 9 positions holding 6, 2 kv heads for 4 query heads, batch 2.
        let cache_k = uniform(&[2, 2, 9, 8], 1);
        let cache_v = uniform(&[2, 2, 9, 8], 2);
        let (k, v) = (
            cache_k.narrow(2, 0, 6).unwrap(),
            cache_v.narrow(2, 0, 6).unwrap(),
        );
        assert!(!k.is_contiguous());
        let q = uniform(&[2, 4, 1, 8], 3);
        assert!(super::supported(&q, &k, &v));
        let got = super::decode_attention(&q, &k, &v).unwrap();
        let (k_all, v_all) = super::super::repeat_kv_heads(&q, &k, &v).unwrap();
        let want = reference::causal_attention(&q, &k_all, &v_all).unwrap();
        let error = relative_error(&got, &want);
        assert!(error < 1e-6, "{error:.2e}");
    }

    #[test]
    fn tracked_or_multi_query_inputs_are_not_taken() {
        let (k, v) = (uniform(&[1, 2, 5, 4], 1), uniform(&[1, 2, 5, 4], 2));
        let q = uniform(&[1, 2, 2, 4], 3);
        assert!(!super::supported(&q, &k, &v));
        let q = candle_core::Var::from_tensor(&uniform(&[1, 2, 1, 4], 4)).unwrap();
        assert!(!super::supported(q.as_tensor(), &k, &v));
    }
}
