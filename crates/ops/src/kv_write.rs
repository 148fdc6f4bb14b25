//! Splitting a step's packed q/k/v projection for inference: the queries come out rotated
//! (RoPE, as [`super::rope`] does), the keys are rotated and stored with the values at their
//! positions in the KV cache buffer. One kernel on CUDA (`kernels/rope_kv.cu`); the unfused
//! path splits the projection, rotates and copies into the cache with seven launches per layer.

use super::cpu_kernel::slice;
use super::gemv::Element;
use super::rope::rotated_pair;
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, InplaceOp3, Layout, Result, Storage, Tensor, WithDType};

/// Whether [`write_kv`] runs fused here: inference (nothing tracked) on a backend
/// [`super::fused`] accepts. Elsewhere the caller splits the projections and appends to the
/// cache itself. `x` is the input of the projection (the projection's dtype and device are
/// its).
pub fn write_kv_fused(x: &Tensor, cos: &Tensor, sin: &Tensor) -> bool {
    !x.track_op() && super::fused(&[x, cos, sin])
}

/// Head counts and positions of a [`write_kv`] call.
#[derive(Debug, Clone, Copy)]
pub struct KvLayout<'a> {
    /// Query heads.
    pub heads: usize,
    /// Key/value heads, the ones cached.
    pub kv_heads: usize,
    /// Size of one head.
    pub head_size: usize,
    /// Where the step's keys and values go.
    pub at: Position<'a>,
}

/// The first position a step writes in the KV cache.
#[derive(Debug, Clone, Copy)]
pub enum Position<'a> {
    /// Known on the host; the RoPE tables hold the rows of the step's positions only.
    Host(usize),
    /// Held on the device (u32 `[1]`) for a one-position step, and read there by the kernels,
    /// so that a step captured once (a CUDA graph) replays at whatever position the tensor
    /// then holds; the RoPE tables are whole (`[max positions, head_size / 2]`).
    Device(&'a Tensor),
}

impl<'a> Position<'a> {
    /// What a CUDA kernel takes for this position: the start as an argument (the host
    /// position, or 0 where the kernel reads it from the device) and the device-held tensor,
    /// an operand beside the others.
    #[cfg(feature = "cuda")]
    pub(crate) fn kernel_arguments(&self) -> (usize, Option<&'a Tensor>) {
        match *self {
            Position::Host(start) => (start, None),
            Position::Device(p) => (0, Some(p)),
        }
    }

    /// The position as a number, read from the device where it is held there (a
    /// synchronizing copy: the kernels that can read it in place do).
    pub fn read(&self) -> Result<usize> {
        match self {
            Position::Host(start) => Ok(*start),
            Position::Device(p) => Ok(p.flatten_all()?.to_vec1::<u32>()?[0] as usize),
        }
    }
}

/// A device-held position: one u32 on the device of `like`.
fn check_position(position: &Tensor, like: &Tensor) -> Result<()> {
    if position.dtype() != candle_core::DType::U32
        || position.elem_count() != 1
        || !position.device().same_device(like.device())
    {
        candle_core::bail!(
            "write_kv: the position must be one u32 beside the cache, not {:?} {:?}",
            position.dims(),
            position.dtype()
        );
    }
    Ok(())
}

/// Checks the operands of [`write_kv`] (and of [`crate::cached_attention`]) against each
/// other: the cache `[2, b, kv_heads, max_len, head_size]`, the projections
/// `[b, t, (heads + 2 kv_heads) · head_size]`, the tables and the position.
pub(crate) fn check_layout(
    cache: &Tensor,
    qkv: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
    layout: &KvLayout,
) -> Result<()> {
    let (two, b, kv_heads, max_len, d) = cache.dims5()?;
    let (qb, t, width) = qkv.dims3()?;
    let want = (layout.heads + 2 * layout.kv_heads) * layout.head_size;
    let rotary_half = cos.dims().last().copied().unwrap_or(0);
    let tables_fit = cos.rank() == 2
        && (1..=d / 2).contains(&rotary_half)
        && match layout.at {
            Position::Host(start) => cos.dim(0)? == t && start + t <= max_len,
            Position::Device(p) => {
                check_position(p, cache)?;
                // Rows for every position the kernel may write at (it writes none past the
                // cache).
                t == 1 && cos.dim(0)? >= max_len
            }
        };
    if two != 2
        || qb != b
        || kv_heads != layout.kv_heads
        || d != layout.head_size
        || width != want
        || d % 2 != 0
        || !tables_fit
        || sin.dims() != cos.dims()
    {
        candle_core::bail!(
            "write_kv: cache {:?}, projections {:?}, tables {:?} at position {:?}",
            cache.dims(),
            qkv.dims(),
            cos.dims(),
            layout.at
        );
    }
    Ok(())
}

/// Splits the packed projections `qkv` `[b, t, (heads + 2 kv_heads) · head_size]`: writes the
/// keys (rotated by `cos`/`sin`) and the values into `cache`
/// `[2, b, kv_heads, max_len, head_size]` (contiguous) at the positions `layout.at` names, in
/// place, and returns the rotated queries `[b, heads, t, head_size]`. The model calls it where
/// [`write_kv_fused`] holds; on the CPU it also takes 16-bit operands (rotated in f32, rounded
/// once), as `bench --ops` checks it. The tables are `[t, rotary / 2]` for a host position,
/// whole for a device one ([`Position`]): the first `rotary` elements of each head (twice the
/// tables' width, at most `head_size`) are rotated, the rest kept (partial rotary).
pub fn write_kv(
    cache: &Tensor,
    qkv: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
    layout: KvLayout,
) -> Result<Tensor> {
    check_layout(cache, qkv, cos, sin, &layout)?;
    let (_, b, kv_heads, max_len, d) = cache.dims5()?;
    let t = qkv.dim(1)?;
    let (qkv, cos, sin) = (&qkv.contiguous()?, &cos.contiguous()?, &sin.contiguous()?);
    #[cfg(feature = "cuda")]
    if matches!(cache.device(), candle_core::Device::Cuda(_)) {
        let (start, held) = layout.at.kernel_arguments();
        let mut operands = vec![cache, qkv, cos, sin];
        operands.extend(held);
        let q = crate::launch::with_operands(&operands, |o| {
            cuda::write_kv(
                o[0],
                o[1],
                (o[2], o[3]),
                (start, o.get(4).copied()),
                &layout,
            )
        })?;
        return Ok(crate::launch::tensor(q, (b, layout.heads, t, d).into()));
    }
    let start = layout.at.read()?;
    let (cos, sin) = match layout.at {
        Position::Host(_) => (cos.clone(), sin.clone()),
        Position::Device(_) => (cos.narrow(0, start, t)?, sin.narrow(0, start, t)?),
    };
    if start + t > max_len {
        candle_core::bail!("write_kv: position {start} past a cache of {max_len}");
    }
    let op = WriteKv {
        sin: sin.clone(),
        heads: layout.heads,
        kv_heads,
        start,
        batch: b,
        positions: t,
        max_len,
    };
    cache.inplace_op3(qkv, &cos, &op)?;
    let q = qkv
        .narrow(2, 0, layout.heads * d)?
        .reshape((b, t, layout.heads, d))?;
    // The queries by the fused rotation where it takes them (f32 on the CPU), else the composite.
    super::rope(&super::swap_middle(&q)?, &cos, &sin)
}

/// The CPU kernel: keys and values into the cache.
struct WriteKv {
    sin: Tensor,
    heads: usize,
    kv_heads: usize,
    start: usize,
    batch: usize,
    positions: usize,
    max_len: usize,
}

impl InplaceOp3 for WriteKv {
    fn name(&self) -> &'static str {
        "write-kv"
    }

    fn cpu_fwd(
        &self,
        cache: &mut CpuStorage,
        cache_layout: &Layout,
        qkv: &CpuStorage,
        qkv_layout: &Layout,
        cos: &CpuStorage,
        cos_layout: &Layout,
    ) -> Result<()> {
        let (sin_storage, sin_layout) = self.sin.storage_and_layout();
        let Storage::Cpu(sin) = &*sin_storage else {
            candle_core::bail!("write_kv: tables on different devices");
        };
        let Some((offset, _)) = cache_layout.contiguous_offsets() else {
            candle_core::bail!("write_kv: the cache is not contiguous");
        };
        // The head size, and the tables' width: half the rotated elements of each head.
        let d = cache_layout.dims()[4];
        let half = cos_layout.dims().last().copied().unwrap_or(0);
        let sizes = (d, half);
        let operands = [(qkv, qkv_layout), (cos, cos_layout), (sin, sin_layout)];
        match cache {
            CpuStorage::F32(cache) => self.write::<f32>(&mut cache[offset..], sizes, operands),
            CpuStorage::BF16(c) => self.write::<half::bf16>(&mut c[offset..], sizes, operands),
            CpuStorage::F16(c) => self.write::<half::f16>(&mut c[offset..], sizes, operands),
            other => candle_core::bail!("write_kv: unsupported dtype {:?}", other.dtype()),
        }
    }
}

impl WriteKv {
    /// The keys, rotated in f32 and rounded once, and the values into `cache` (from the
    /// cache's first element) of head size `d`, from the projections and tables (`half` wide)
    /// of its dtype.
    fn write<E: Element + WithDType>(
        &self,
        cache: &mut [E],
        (d, half): (usize, usize),
        [qkv, cos, sin]: [(&CpuStorage, &Layout); 3],
    ) -> Result<()> {
        let qkv = slice(qkv.0.as_slice::<E>()?, qkv.1)?;
        let (cos, sin) = (
            slice(cos.0.as_slice::<E>()?, cos.1)?,
            slice(sin.0.as_slice::<E>()?, sin.1)?,
        );
        let (heads, kv_heads, start) = (self.heads, self.kv_heads, self.start);
        let values_at = self.batch * kv_heads * self.max_len * d;
        for b in 0..self.batch {
            for t in 0..self.positions {
                let row = &qkv[(b * self.positions + t) * (heads + 2 * kv_heads) * d..];
                let (c, s) = (&cos[t * half..][..half], &sin[t * half..][..half]);
                for h in 0..kv_heads {
                    let k = &row[(heads + h) * d..][..d];
                    let v = &row[(heads + kv_heads + h) * d..][..d];
                    let slot = ((b * kv_heads + h) * self.max_len + start + t) * d;
                    let kc = &mut cache[slot..][..d];
                    for j in 0..half {
                        let (first, second) =
                            rotated_pair(k[j].f32(), k[half + j].f32(), c[j].f32(), s[j].f32());
                        kc[j] = E::from_f32(first);
                        kc[half + j] = E::from_f32(second);
                    }
                    kc[2 * half..].copy_from_slice(&k[2 * half..]);
                    cache[values_at + slot..][..d].copy_from_slice(v);
                }
            }
        }
        Ok(())
    }
}

/// The CUDA launcher (`kernels/rope_kv.cu`).
#[cfg(feature = "cuda")]
mod cuda {
    use super::KvLayout;
    use crate::launch::{
        address, alloc, base_address, common_dtype, int, launch, optional_address, per_element,
        Arg, Operand,
    };
    use candle_core::{CudaStorage, Result};

    /// Rotates the queries of packed projections `qkv` `[b, t, ..]` into a new `[b, heads, t, d]`
    /// buffer and writes the rotated keys and the values into `cache`
    /// `[2, b, kv_heads, max_len, d]` at `start`, or at `position`, the device-held one
    /// ([`Position::kernel_arguments`]; see `write_kv` in kernels/rope_kv.cu). The cache is written through its address: the
    /// caller owns it and nothing reads it meanwhile.
    pub(super) fn write_kv(
        cache: Operand,
        qkv: Operand,
        (cos, sin): (Operand, Operand),
        (start, position): (usize, Option<Operand>),
        n: &KvLayout,
    ) -> Result<CudaStorage> {
        let dtype = common_dtype(&[cache, qkv, cos, sin])?;
        let (&[_, batch, _, max_len, _], &[_, positions, _]) = (cache.1.dims(), qkv.1.dims())
        else {
            candle_core::bail!("write_kv: cache {:?}, projections {:?}", cache.1, qkv.1);
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
            int(2 * cos.1.dims().last().copied().unwrap_or(0))?,
            int(max_len)?,
            int(start)?,
            Arg::Address(optional_address(position)?),
        ];
        let threads = batch * positions * (n.heads + n.kv_heads) * n.head_size / 2;
        let (grid, block) = per_element(threads)?;
        launch(&qkv.0.device, "write_kv", Some(dtype), grid, block, &args)?;
        Ok(q)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::parity::uniform;
    use candle_core::{DType, Device, IndexOp};

    fn layout(at: Position) -> KvLayout {
        KvLayout {
            heads: 2,
            kv_heads: 1,
            head_size: 4,
            at,
        }
    }

    #[test]
    fn a_device_position_needs_one_step_and_a_table_row_per_cache_position() {
        let cache = Tensor::zeros((2, 1, 1, 6, 4), DType::F32, &Device::Cpu).unwrap();
        let position = Tensor::new(&[5u32], &Device::Cpu).unwrap();
        assert_eq!(Position::Device(&position).read().unwrap(), 5);
        let at = layout(Position::Device(&position));
        let one = uniform(&[1, 1, 16], 1);
        let table = |rows| uniform(&[rows, 2], 2);
        let short = write_kv(&cache, &one, &table(5), &table(5), at);
        assert!(short.is_err());
        let two = uniform(&[1, 2, 16], 3);
        assert!(write_kv(&cache, &two, &table(6), &table(6), at).is_err());
        let q = write_kv(&cache, &one, &table(6), &table(6), at).unwrap();
        assert_eq!(q.dims(), [1, 2, 1, 4]);
        let written = cache.i((1, 0, 0, 5)).unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(
            written,
            one.i((0, 0))
                .unwrap()
                .narrow(0, 12, 4)
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        );
        let wide = Tensor::new(&[5u32, 1], &Device::Cpu).unwrap();
        let at = layout(Position::Device(&wide));
        let message = write_kv(&cache, &one, &table(6), &table(6), at).unwrap_err();
        assert!(message.to_string().contains("one u32"), "{message}");
    }
}
