//! Flash-style causal attention on CUDA (`kernels/flash_attention.cuh`): the forward keeps an
//! online softmax per query row and saves only the output and one log-sum-exp per row; the
//! backward recomputes the probabilities tile by tile. No T×T tensor exists at any point, so
//! attention memory grows with the sequence length, not its square. Grouped-query attention is
//! native (each query head reads its kv head; the key and value gradients sum over the group),
//! and keys and values may be views into a KV cache.
//!
//! The whole attention is one autograd node; its backward is three kernels (row deltas, key and
//! value gradients, query gradients) with no atomics, so results repeat bit for bit.

use super::attach::attach3;
use super::cuda::{self, Arg, Operand};
use super::GroupedDims;
use candle_core::backend::BackendStorage;
use candle_core::{DType, Device, Result, Shape, Tensor};

/// Head sizes the kernels are compiled for.
const HEAD_SIZES: [usize; 2] = [64, 128];

/// Query rows (and keys) per tile, as in the kernels.
const TILE: usize = 64;

/// Threads per block, as in the kernels.
const THREADS: u32 = 256;

/// Whether [`flash_attention`] handles these operands: CUDA, one float dtype, a head size the
/// kernels are compiled for, `heads` a multiple of `kv_heads`, no more queries than keys.
pub(crate) fn supported(q: &Tensor, k: &Tensor, v: &Tensor) -> bool {
    let Some(g) = GroupedDims::of(q, k, v) else {
        return false;
    };
    matches!(q.device(), Device::Cuda(_))
        && super::fused(&[q, k, v])
        && HEAD_SIZES.contains(&g.head_size)
        && g.q_len > 0
        && g.q_len <= g.kv_len
}

/// Causal attention of `q` `[b, heads, q_len, d]` against `k`/`v` `[b, kv_heads, kv_len, d]`
/// (query `i` at position `kv_len − q_len + i`); the operands must pass [`supported`].
pub(crate) fn flash_attention(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
    let q = q.contiguous()?;
    let (k, v) = (unit_last(k)?, unit_last(v)?);
    let dims = GroupedDims::of(&q, &k, &v).ok_or_else(|| {
        candle_core::Error::Msg("flash attention: operands of mismatched shapes".into())
    })?;
    let (qd, kd, vd) = (q.detach(), k.detach(), v.detach());
    let (out, lse) = forward(&qd, &kd, &vd, &dims)?;
    if !(q.track_op() || k.track_op() || v.track_op()) {
        return Ok(out);
    }
    let saved = out.clone();
    attach3([&q, &k, &v], &out, "flash-attention", move |grad| {
        let (dq, dk, dv) = backward(&qd, &kd, &vd, &saved, &grad.contiguous()?, &lse, &dims)?;
        Ok((Some(dq), Some(dk), Some(dv)))
    })
}

/// `t` itself when its last dimension has unit stride, else a contiguous copy.
fn unit_last(t: &Tensor) -> Result<Tensor> {
    if t.stride().last() == Some(&1) {
        Ok(t.clone())
    } else {
        t.contiguous()
    }
}

impl GroupedDims {
    fn q_shape(&self) -> Shape {
        (self.batch, self.heads, self.q_len, self.head_size).into()
    }

    fn kv_shape(&self) -> Shape {
        (self.batch, self.kv_heads, self.kv_len, self.head_size).into()
    }

    fn query_rows(&self) -> usize {
        self.batch * self.heads * self.q_len
    }

    /// Kernel arguments shared by the three tiled kernels after their buffers: heads, group,
    /// lengths, the key and value strides, and the base-2 score scale.
    fn common_args(&self, k: Operand, v: Operand) -> Result<Vec<Arg>> {
        let (_, ks) = cuda::strided4(k)?;
        let (_, vs) = cuda::strided4(v)?;
        let mut args = vec![
            cuda::int(self.heads)?,
            cuda::int(self.heads / self.kv_heads)?,
            cuda::int(self.q_len)?,
            cuda::int(self.kv_len)?,
        ];
        args.extend(ks.iter().chain(&vs).map(|&s| Arg::Count(s)));
        args.push(Arg::Float(self.scale() * std::f32::consts::LOG2_E));
        Ok(args)
    }

    fn scale(&self) -> f32 {
        1.0 / (self.head_size as f32).sqrt()
    }

    /// `name` for this head size (the dtype suffix is added at launch).
    fn kernel(&self, name: &str) -> String {
        format!("{name}_d{}", self.head_size)
    }

    /// Dynamic shared memory of a kernel holding `tiles` f32 tiles of `[64][d + 4]`,
    /// `score_tiles` of `[64][68]` and `rows` per-row vectors of 64 (rows padded by 4 floats,
    /// as in the kernels).
    fn shared_bytes(&self, tiles: usize, score_tiles: usize, rows: usize) -> Result<u32> {
        let floats =
            tiles * TILE * (self.head_size + 4) + score_tiles * TILE * (TILE + 4) + rows * TILE;
        u32::try_from(floats * 4)
            .map_err(|_| candle_core::Error::Msg("flash attention: shared memory".into()))
    }
}

/// The address of an operand's first element (contiguous, or keys and values with unit stride
/// along the head dimension).
fn start(operand: Operand) -> Result<Arg> {
    let address = match operand.1.is_contiguous() {
        true => cuda::address(operand)?,
        false => cuda::strided4(operand)?.0,
    };
    Ok(Arg::Address(address))
}

/// The output `[b, heads, q_len, d]` and the base-2 log-sum-exp of each query row (f32).
fn forward(q: &Tensor, k: &Tensor, v: &Tensor, dims: &GroupedDims) -> Result<(Tensor, Tensor)> {
    let rows = dims.query_rows();
    let (out, lse) = cuda::with_operands(&[q, k, v], |ops| {
        let [q, k, v] = [ops[0], ops[1], ops[2]];
        let device = &q.0.device;
        let out = cuda::alloc(device, q.0.dtype(), rows * dims.head_size)?;
        let lse = cuda::alloc(device, DType::F32, rows)?;
        let mut args = vec![
            start(q)?,
            start(k)?,
            start(v)?,
            Arg::Address(cuda::base_address(&out)?),
            Arg::Address(cuda::base_address(&lse)?),
        ];
        args.extend(dims.common_args(k, v)?);
        let grid = (tiles(dims.q_len)?, cuda::int_u32(dims.batch * dims.heads)?);
        let shared = dims.shared_bytes(2, 1, 0)?;
        let name = dims.kernel("flash_attention_fwd");
        let config = (grid, (THREADS, 1), shared);
        cuda::launch_with_shared(device, &name, Some(q.0.dtype()), config, &args)?;
        Ok((out, lse))
    })?;
    Ok((
        cuda::tensor(out, dims.q_shape()),
        cuda::tensor(lse, rows.into()),
    ))
}

/// `dq`, `dk`, `dv` for the output gradient `dout` (contiguous, like `out`).
fn backward(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    out: &Tensor,
    dout: &Tensor,
    lse: &Tensor,
    dims: &GroupedDims,
) -> Result<(Tensor, Tensor, Tensor)> {
    let rows = dims.query_rows();
    let kv_elems = dims.kv_shape().elem_count();
    let (dq, dk, dv) = cuda::with_operands(&[q, k, v, out, dout, lse], |ops| {
        let [q, k, v, out, dout, lse] = [ops[0], ops[1], ops[2], ops[3], ops[4], ops[5]];
        let (device, dtype) = (&q.0.device, q.0.dtype());
        let delta = cuda::alloc(device, DType::F32, rows)?;
        let args = [
            start(out)?,
            start(dout)?,
            Arg::Address(cuda::base_address(&delta)?),
            cuda::int(rows)?,
            cuda::int(dims.head_size)?,
        ];
        let (grid, block) = cuda::per_warp_row(rows)?;
        cuda::launch_with_shared(
            device,
            "flash_attention_delta",
            Some(dtype),
            (grid, block, 0),
            &args,
        )?;
        let dq = cuda::alloc(device, dtype, rows * dims.head_size)?;
        let dk = cuda::alloc(device, dtype, kv_elems)?;
        let dv = cuda::alloc(device, dtype, kv_elems)?;
        let inputs = [
            start(q)?,
            start(k)?,
            start(v)?,
            start(dout)?,
            start(lse)?,
            Arg::Address(cuda::base_address(&delta)?),
        ];
        let scale = Arg::Float(dims.scale());
        let mut args = inputs.to_vec();
        args.extend([
            Arg::Address(cuda::base_address(&dk)?),
            Arg::Address(cuda::base_address(&dv)?),
        ]);
        args.extend(dims.common_args(k, v)?);
        args.push(scale);
        let grid = (
            tiles(dims.kv_len)?,
            cuda::int_u32(dims.batch * dims.kv_heads)?,
        );
        let config = (grid, (THREADS, 1), dims.shared_bytes(4, 2, 2)?);
        let name = dims.kernel("flash_attention_bwd_kv");
        cuda::launch_with_shared(device, &name, Some(dtype), config, &args)?;
        let mut args = inputs.to_vec();
        args.push(Arg::Address(cuda::base_address(&dq)?));
        args.extend(dims.common_args(k, v)?);
        args.push(scale);
        let grid = (tiles(dims.q_len)?, cuda::int_u32(dims.batch * dims.heads)?);
        let config = (grid, (THREADS, 1), dims.shared_bytes(4, 1, 2)?);
        let name = dims.kernel("flash_attention_bwd_q");
        cuda::launch_with_shared(device, &name, Some(dtype), config, &args)?;
        Ok((dq, dk, dv))
    })?;
    Ok((
        cuda::tensor(dq, dims.q_shape()),
        cuda::tensor(dk, dims.kv_shape()),
        cuda::tensor(dv, dims.kv_shape()),
    ))
}

/// Tiles of 64 covering `n`.
fn tiles(n: usize) -> Result<u32> {
    cuda::int_u32(n.div_ceil(TILE))
}
