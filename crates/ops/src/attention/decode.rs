//! Attention for a decode step: one new query per sequence against the keys and values of a
//! KV cache read in place. The cache hands out views into its preallocated buffer; the general
//! path copies both to contiguous tensors, repeats grouped kv heads, and runs three kernels.
//! This op reads the views directly (any strides, unit stride along the head dimension), maps
//! each query head to its kv head, and does scores, softmax and the weighted sum in one kernel.
//! Scores are taken as a [`Scoring`] says: a scale, soft-capping, and a sliding window (only
//! the last `window` positions attended to).
//! Inference only: it has no backward, and the dispatch never picks it for tracked tensors.
//! On CUDA the kernel is in `kernels/decode.cu`, beside the decode step's kernels
//! ([`decode_step`]: the rotation and cache write of the step's own key and value too, from
//! the packed projections; heads of 64 or 128 over a short cache take its warp-tiled form).

use super::{GroupedDims, Scoring};
use crate::cpu_kernel::{for_each_row, output, slice};
use crate::fused_op::{custom_op, CpuOperand, CpuOutput, FusedOp};
#[cfg(feature = "cuda")]
use crate::fused_op::{CudaOutput, Operand};
use crate::gemv::Element;
#[cfg(feature = "cuda")]
use crate::launch;
use candle_core::{CpuStorage, DType, Layout, Result, Tensor};

/// The largest head size the kernels take (a CUDA block holds a thread per element).
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

/// Whether [`decode_attention`] runs on `q`, `k`, `v`: they pass [`supported`] on a backend
/// [`crate::fused`] accepts, or they are 16-bit on the CPU (read as stored and widened to f32,
/// as `ops::gemv` reads its weights).
pub(crate) fn runs(q: &Tensor, k: &Tensor, v: &Tensor) -> bool {
    let cpu_16_bit = matches!(q.dtype(), DType::BF16 | DType::F16)
        && [q, k, v]
            .iter()
            .all(|t| t.dtype() == q.dtype() && t.device().is_cpu());
    supported(q, k, v) && (crate::fused(&[q, k, v]) || cpu_16_bit)
}

/// `softmax(q kᵀ · scale) v` for `q` `[b, heads, 1, d]` and `k`/`v` `[b, kv_heads, kv_len, d]`
/// with the scores taken as `scoring` says; the operands must pass [`runs`].
pub(crate) fn decode_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scoring: Scoring,
) -> Result<Tensor> {
    q.apply_op3_no_bwd(k, v, &DecodeAttention { scoring })
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
    scoring: Scoring,
) -> Result<Tensor> {
    let out = launch::with_operands(&[q, k, v, position], |o| {
        cuda::decode_attention(o[0], o[1], o[2], Some(o[3]), scoring)
    })?;
    Ok(launch::tensor(out, q.shape().clone()))
}

/// [`crate::cached_attention`] of a one-position step as one CUDA kernel, or `None` where that
/// does not apply (another backend, several positions, a head above [`MAX_HEAD_SIZE`], a
/// cache that is not contiguous: the caller then runs [`crate::write_kv`], which checks the
/// operands itself). On CUDA the operands are checked first, whichever path runs.
#[cfg(feature = "cuda")]
pub(crate) fn decode_step(
    cache: &Tensor,
    qkv: &Tensor,
    (cos, sin): (&Tensor, &Tensor),
    layout: crate::KvLayout,
    scoring: Scoring,
) -> Result<Option<Tensor>> {
    if !cache.device().is_cuda() {
        return Ok(None);
    }
    crate::kv_write::check_layout(cache, qkv, cos, sin, &layout)?;
    let (b, t, _) = qkv.dims3()?;
    let d = layout.head_size;
    if t != 1 || d > MAX_HEAD_SIZE || !cache.is_contiguous() {
        return Ok(None);
    }
    let (qkv, cos, sin) = (&qkv.contiguous()?, &cos.contiguous()?, &sin.contiguous()?);
    let (start, held) = layout.at.kernel_arguments();
    let mut operands = vec![cache, qkv, cos, sin];
    operands.extend(held);
    let out = launch::with_operands(&operands, |o| {
        let position = (start, o.get(4).copied());
        cuda::decode_step(o[0], o[1], (o[2], o[3]), position, &layout, scoring)
    })?;
    Ok(Some(launch::tensor(out, (b, layout.heads, 1, d).into())))
}

/// A tiled step kernel (`decode_step_tiles` in kernels/decode.cu) as it is launched.
#[derive(Debug, PartialEq)]
struct Tiles {
    /// The entry point, without the dtype.
    name: &'static str,
    /// Warps a block.
    warps: usize,
    /// Blocks a (batch, head): a thread block cluster where more than one.
    cluster: usize,
}

/// The most (batch, head)s of a step that the clustered tiles take. On an H100
/// (bench/decode_chain.cu, session 46) clusters of four blocks of four warps took 0.7 µs a
/// layer off base's 12 heads and added 0.7 to the 1b's 32; base's generate row then decoded
/// 1.3% faster (session 48, docs/benchmarks.md); counts between are not measured.
const CLUSTERED_HEADS: usize = 16;

/// The tiled step kernel for heads of `d` elements of `dtype` whose cache rows are read `width`
/// elements at once, `heads` (batch, head)s and a cache of `max_len` positions, where it
/// applies: heads of 64 or 128 elements read 16 bytes at once, whose keys fit a lane's
/// registers (at most 256 bytes; 16 warps where a lane's tile fits 128 registers), and a cache
/// of at most three tiles of 32 positions a warp (at four, an H100 timed the two kernels alike;
/// past that, the 1,024-thread kernel reads a long cache in fewer rounds). With `clusters`
/// (the device runs Hopper's machine code: `launch::runs_hopper_code`), 16-bit heads of 64
/// over at most [`CLUSTERED_HEADS`] (batch, head)s take clusters of four blocks of four warps,
/// small enough to be resident beside the q/k/v product's blocks.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
fn tiles_kernel(
    (d, dtype, width): (usize, DType, usize),
    max_len: usize,
    heads: usize,
    clusters: bool,
) -> Option<Tiles> {
    let wide = width == 16 / dtype.size_in_bytes();
    let sixteen_bit = matches!(dtype, DType::BF16 | DType::F16);
    let (name, warps, cluster) = match (d, dtype) {
        _ if !wide => return None,
        (64, _) if sixteen_bit && clusters && heads <= CLUSTERED_HEADS => {
            ("decode_step_tiles64c4", 4, 4)
        }
        (64, _) if sixteen_bit => ("decode_step_tiles64", 16, 1),
        (64, DType::F32) => ("decode_step_tiles64", 8, 1),
        (128, _) if sixteen_bit => ("decode_step_tiles128", 8, 1),
        _ => return None,
    };
    (max_len <= 3 * 32 * warps * cluster).then_some(Tiles {
        name,
        warps,
        cluster,
    })
}

struct DecodeAttention {
    scoring: Scoring,
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

impl DecodeAttention {
    /// The attention on the CPU over `q`, `k`, `v` as stored (16-bit elements widened to f32 as
    /// they are read), the scores, softmax and weighted sums in f32: `[b, heads, 1, d]` in f32.
    fn cpu_attention<E: Element>(
        &self,
        [q, k, v]: [&[E]; 3],
        [q_layout, k_layout, v_layout]: [&Layout; 3],
    ) -> Result<Vec<f32>> {
        let q: Vec<f32> = slice(q, q_layout)?.iter().map(|x| x.f32()).collect();
        let (k_start, ks) = view(k_layout, k.len())?;
        let (v_start, vs) = view(v_layout, v.len())?;
        let (&[_, heads, _, d], &[_, kv_heads, kv_len, _]) = (q_layout.dims(), k_layout.dims())
        else {
            candle_core::bail!("decode attention: expected 4-D operands");
        };
        let group = heads / kv_heads.max(1);
        let Scoring { scale, softcap, .. } = self.scoring;
        let first = self.scoring.first_key(kv_len);
        let mut out = vec![0f32; q.len()];
        for_each_row(&mut out, d, |row, o| {
            let (b, kv_head) = (row / heads, (row % heads) / group);
            let query = &q[row * d..][..d];
            let k_base = k_start + b * ks[0] + kv_head * ks[1];
            let v_base = v_start + b * vs[0] + kv_head * vs[1];
            let scores: Vec<f32> = (first..kv_len)
                .map(|j| {
                    let key = &k[k_base + j * ks[2]..][..d];
                    let s = query.iter().zip(key).map(|(a, b)| a * b.f32()).sum::<f32>() * scale;
                    match softcap > 0.0 {
                        true => softcap * (s / softcap).tanh(),
                        false => s,
                    }
                })
                .collect();
            let max = scores.iter().fold(f32::NEG_INFINITY, |m, &s| m.max(s));
            let mut sum = 0f32;
            for (j, s) in (first..).zip(&scores) {
                let p = (s - max).exp();
                sum += p;
                let value = &v[v_base + j * vs[2]..][..d];
                o.iter_mut().zip(value).for_each(|(o, v)| *o += p * v.f32());
            }
            o.iter_mut().for_each(|o| *o /= sum);
        });
        Ok(out)
    }
}

/// `values` rounded to the element type `E`.
fn rounded<E: Element>(values: Vec<f32>) -> Vec<E> {
    values.into_iter().map(E::from_f32).collect()
}

impl FusedOp<3> for DecodeAttention {
    const NAME: &'static str = "decode-attention";

    fn cpu(&self, [(q, q_layout), (k, k_layout), (v, v_layout)]: [CpuOperand; 3]) -> CpuOutput {
        let shape = q_layout.shape().clone();
        let layouts = [q_layout, k_layout, v_layout];
        match (q, k, v) {
            (CpuStorage::F32(q), CpuStorage::F32(k), CpuStorage::F32(v)) => {
                let out = self.cpu_attention([q, k, v], layouts)?;
                Ok(output(out, shape))
            }
            (CpuStorage::BF16(q), CpuStorage::BF16(k), CpuStorage::BF16(v)) => {
                let out = self.cpu_attention([q, k, v], layouts)?;
                Ok((CpuStorage::BF16(rounded(out)), shape))
            }
            (CpuStorage::F16(q), CpuStorage::F16(k), CpuStorage::F16(v)) => {
                let out = self.cpu_attention([q, k, v], layouts)?;
                Ok((CpuStorage::F16(rounded(out)), shape))
            }
            _ => candle_core::bail!("decode attention: CPU operands of one float dtype expected"),
        }
    }

    #[cfg(feature = "cuda")]
    fn cuda(&self, [q, k, v]: [Operand; 3]) -> CudaOutput {
        let out = cuda::decode_attention(q, k, v, None, self.scoring)?;
        Ok((out, q.1.shape().clone()))
    }
}

custom_op!(DecodeAttention: 3);

/// The CUDA launchers (`kernels/decode.cu`).
#[cfg(feature = "cuda")]
mod cuda {
    use super::{tiles_kernel, Scoring};
    use crate::launch::constants::DECODE_THREADS as THREADS;
    use crate::launch::{
        address, alloc, alloc_for, base_address, common_dtype, elementwise_kernel, grid, int,
        int_u32, launch_ordered, launch_with_shared, optional_address, strided4, Arg, Operand,
        Order,
    };
    use crate::KvLayout;
    use candle_core::{CudaDevice, CudaStorage, DType, Result};

    /// The kernel `name` for one block per (batch, head) on `heads` of `d` elements, reading
    /// `width` elements at once; `extra` floats of shared memory before the kernel's work
    /// space.
    fn launch_heads(
        dev: &CudaDevice,
        (name, dtype, width): (&str, DType, usize),
        (heads, d, extra): (usize, usize, usize),
        args: &[Arg],
    ) -> Result<()> {
        if d > THREADS {
            candle_core::bail!("decode attention: head size {d} above {THREADS}");
        }
        let shared = u32::try_from((extra + THREADS * (width + 1)) * 4)
            .map_err(|_| candle_core::Error::Msg("head size".into()))?;
        let config = (grid(heads)?, (THREADS as u32, 1), shared);
        launch_with_shared(dev, name, Some(dtype), config, args)
    }

    /// One query per (batch, head), `q` `[b, heads, 1, d]`, against `k`/`v`
    /// `[b, kv_heads, kv_len, d]` read in place (views into a cache allowed).
    /// With `position` (the step's own, held on the device), `k`/`v` are the whole cache and the
    /// kernel attends to the positions up to it (the last `window` of them with a window).
    pub(super) fn decode_attention(
        q: Operand,
        k: Operand,
        v: Operand,
        position: Option<Operand>,
        scoring: Scoring,
    ) -> Result<CudaStorage> {
        let dtype = common_dtype(&[q, k, v])?;
        let (&[b, heads, _, d], &[_, kv_heads, kv_len, _]) = (q.1.dims(), k.1.dims()) else {
            candle_core::bail!("decode attention: expected 4-D operands");
        };
        let (k_address, ks) = strided4(k)?;
        let (v_address, vs) = strided4(v)?;
        // 16 bytes at once where every row of k and v starts on a 16-byte boundary.
        let wide = 16 / dtype.size_in_bytes();
        let aligned = k_address % 16 == 0 && v_address % 16 == 0;
        let kernel =
            match aligned && d % wide == 0 && ks.iter().chain(&vs).all(|&s| s % wide as u64 == 0) {
                true => ("decode_attention_wide", dtype, wide),
                false => ("decode_attention", dtype, 1),
            };
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
            Arg::Float(scoring.scale),
            Arg::Address(optional_address(position)?),
            Arg::Float(scoring.softcap),
            int(scoring.window.min(kv_len))?,
        ];
        launch_heads(dev, kernel, (b * heads, d, d), &args)?;
        Ok(out)
    }

    /// A one-position step from its packed projections `qkv` `[b, 1, ..]`: the rotated key and
    /// the value of each kv head into `cache` `[2, b, kv_heads, max_len, d]` at `start`, or at
    /// `position`, the device-held one ([`crate::Position::kernel_arguments`]), and the
    /// attention of the rotated queries to the cache up to them (`decode_step_tiles` in
    /// kernels/decode.cu where [`tiles_kernel`] gives one, else `decode_step`). The cache is
    /// written through its address: the caller owns it and nothing reads it meanwhile.
    pub(super) fn decode_step(
        cache: Operand,
        qkv: Operand,
        (cos, sin): (Operand, Operand),
        (start, position): (usize, Option<Operand>),
        n: &KvLayout,
        scoring: Scoring,
    ) -> Result<CudaStorage> {
        let dtype = common_dtype(&[cache, qkv, cos, sin])?;
        let &[_, batch, kv_heads, max_len, d] = cache.1.dims() else {
            candle_core::bail!("decode step: cache {:?}", cache.1);
        };
        // The cache's rows (of d, from its start) are read 16 bytes at once where aligned.
        let (name, width) = elementwise_kernel(("decode_step", "decode_step_wide"), &[cache], d)?;
        let dev = &qkv.0.device;
        let clusters = crate::launch::runs_hopper_code(dev)?;
        let tiles = tiles_kernel((d, dtype, width), max_len, batch * n.heads, clusters);
        // The tiled kernel loads its first tile of the cache (rows no kernel of the step
        // writes before it) and then waits for the kernel ahead, the projections.
        let order = Order::when(dev, tiles.is_some())?;
        let out = alloc_for(dev, dtype, batch * n.heads * d, order)?;
        let rotary = int(2 * cos.1.dims().last().copied().unwrap_or(0))?;
        let addresses = [qkv, cos, sin, cache].map(|o| address(o).map(Arg::Address));
        let mut args = addresses.into_iter().collect::<Result<Vec<_>>>()?;
        args.push(Arg::Address(base_address(&out)?));
        let heads = [int(batch)?, int(n.heads)?, int(kv_heads)?];
        let rest = [
            rotary,
            int(max_len)?,
            int(start)?,
            Arg::Address(optional_address(position)?),
            Arg::Float(scoring.scale),
            Arg::Float(scoring.softcap),
            int(scoring.window.min(max_len))?,
        ];
        match tiles {
            Some(tiles) => {
                args.extend(heads.into_iter().chain(rest));
                let blocks = grid(batch * n.heads * tiles.cluster)?;
                let config = (blocks, (int_u32(tiles.warps * 32)?, 1), 0);
                launch_ordered(dev, tiles.name, Some(dtype), config, &args, order)?;
            }
            None => {
                // The 1,024-thread kernel also takes a scores scratch and the head size.
                let scores = alloc(dev, DType::F32, batch * n.heads * max_len)?;
                args.push(Arg::Address(base_address(&scores)?));
                args.extend(heads.into_iter().chain([int(d)?]).chain(rest));
                let kernel = (name, dtype, width);
                launch_heads(dev, kernel, (batch * n.heads, d, 3 * d), &args)?;
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use crate::parity::{relative_error, uniform};
    use candle_core::{DType, Tensor};

    /// The tiles take heads of 64 (16 warps in 16 bits, 8 in f32) and 16-bit heads of 128 (8
    /// warps) read 16 bytes at once, over caches of at most three 32-position tiles a warp;
    /// with clusters, 16-bit heads of 64 over at most 16 (batch, head)s take clusters of four
    /// blocks of four warps, over as many positions.
    #[test]
    fn tiles_take_short_caches_of_heads_whose_keys_fit_a_lane() {
        let tiles = |d, dtype: DType, max_len, heads, clusters| {
            let width = 16 / dtype.size_in_bytes();
            super::tiles_kernel((d, dtype, width), max_len, heads, clusters)
                .map(|t| (t.name, t.warps, t.cluster))
        };
        let plain64 = Some(("decode_step_tiles64", 16, 1));
        assert_eq!(tiles(64, DType::BF16, 1536, 32, true), plain64);
        assert_eq!(tiles(64, DType::F16, 272, 12, false), plain64);
        assert_eq!(tiles(64, DType::BF16, 1537, 32, true), None);
        let clustered = Some(("decode_step_tiles64c4", 4, 4));
        assert_eq!(tiles(64, DType::BF16, 272, 12, true), clustered);
        assert_eq!(tiles(64, DType::F16, 1536, 16, true), clustered);
        assert_eq!(tiles(64, DType::BF16, 1537, 16, true), None);
        assert_eq!(tiles(64, DType::BF16, 272, 17, true), plain64);
        let f32_64 = Some(("decode_step_tiles64", 8, 1));
        assert_eq!(tiles(64, DType::F32, 768, 12, true), f32_64);
        assert_eq!(tiles(64, DType::F32, 769, 12, true), None);
        let plain128 = Some(("decode_step_tiles128", 8, 1));
        assert_eq!(tiles(128, DType::BF16, 768, 8, true), plain128);
        assert_eq!(tiles(128, DType::F32, 16, 8, true), None);
        for d in [16, 96, 256] {
            assert_eq!(tiles(d, DType::BF16, 16, 8, true), None, "{d}");
        }
        assert_eq!(super::tiles_kernel((64, DType::BF16, 1), 16, 8, true), None);
    }

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
        let got = super::decode_attention(&q, &k, &v, super::Scoring::plain(8)).unwrap();
        let (k_all, v_all) = super::super::repeat_kv_heads(&q, &k, &v).unwrap();
        let want = super::super::reference(&q, &k_all, &v_all).unwrap();
        let error = relative_error(&got, &want);
        assert!(error < 1e-6, "{error:.2e}");
    }

    #[test]
    fn soft_capped_windowed_steps_match_the_reference() {
        let cache_k = (uniform(&[1, 2, 9, 8], 4) * 3.0).unwrap();
        let cache_v = uniform(&[1, 2, 9, 8], 5);
        let (k, v) = (
            cache_k.narrow(2, 0, 7).unwrap(),
            cache_v.narrow(2, 0, 7).unwrap(),
        );
        let q = (uniform(&[1, 4, 1, 8], 6) * 3.0).unwrap();
        for window in [Some(1), Some(3), Some(7), Some(20), None] {
            let options = super::super::AttentionOptions {
                scale: 0.3,
                softcap: Some(2.0),
                window,
                segments: None,
            };
            let got = super::decode_attention(&q, &k, &v, super::Scoring::of(&options)).unwrap();
            let want = super::super::windowed_reference(&q, &k, &v, options).unwrap();
            let error = relative_error(&got, &want);
            assert!(error < 1e-5, "window {window:?}: {error:.2e}");
        }
    }

    #[test]
    fn sixteen_bit_steps_on_the_cpu_are_the_f32_kernel_on_widened_operands() {
        let cache_k = (uniform(&[2, 2, 9, 8], 7) * 2.0).unwrap();
        let cache_v = uniform(&[2, 2, 9, 8], 8);
        let q = (uniform(&[2, 4, 1, 8], 9) * 2.0).unwrap();
        let options = super::super::AttentionOptions {
            scale: 0.4,
            softcap: Some(3.0),
            window: Some(4),
            segments: None,
        };
        for dtype in [DType::BF16, DType::F16] {
            let [q, cache_k, cache_v] =
                [&q, &cache_k, &cache_v].map(|t| t.to_dtype(dtype).unwrap());
            let (k, v) = (
                cache_k.narrow(2, 0, 6).unwrap(),
                cache_v.narrow(2, 0, 6).unwrap(),
            );
            assert!(super::runs(&q, &k, &v), "{dtype:?}");
            // Through the dispatch, as a decode step asks.
            let got = super::super::windowed_attention(&q, &k, &v, options.clone()).unwrap();
            assert_eq!(got.dtype(), dtype);
            let [q32, k32, v32] = [&q, &k, &v].map(|t| t.to_dtype(DType::F32).unwrap());
            let scoring = super::Scoring::of(&options);
            let want = super::decode_attention(&q32, &k32, &v32, scoring).unwrap();
            let want = want.to_dtype(dtype).unwrap();
            let bits = |t: &Tensor| {
                let t = t.to_dtype(DType::F32).unwrap().flatten_all().unwrap();
                t.to_vec1::<f32>().unwrap()
            };
            assert_eq!(bits(&got), bits(&want), "{dtype:?}");
            let reference = super::super::windowed_reference(&q, &k, &v, options.clone()).unwrap();
            let error = relative_error(&got, &reference.to_dtype(DType::F32).unwrap());
            assert!(error < 1e-2, "{dtype:?}: {error:.2e}");
        }
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
