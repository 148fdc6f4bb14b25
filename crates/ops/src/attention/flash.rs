//! Flash-style causal attention on CUDA: the forward keeps an online softmax per query row and
//! saves only the output and one log-sum-exp per row; the backward recomputes the probabilities
//! tile by tile. No T×T tensor exists at any point, so attention memory grows with the sequence
//! length, not its square. Grouped-query attention is native (each query head reads its kv head;
//! the key and value gradients sum over the group), and keys and values may be views into a KV
//! cache.
//!
//! Two implementations share the grid, the arguments and the saved log-sum-exp
//! ([`Kernels`]): tensor-core kernels for bf16 and f16 (`kernels/flash_mma.cuh`; on Hopper, for
//! bf16, those of `kernels/flash_wgmma.cuh` where compiled: [`hopper_kernels`]) and f32 SIMT
//! kernels for everything else (`kernels/flash_attention.cuh`).
//!
//! Scores may have their own scale, a soft cap and a sliding window ([`Scoring`]): the kernels
//! skip the tiles a window hides and mask the rest, and a capped score's gradient takes the
//! cap's slope. Packed rows' [`Segments`] (self-attention) mask every tile by each query's
//! segment start.
//!
//! The whole attention is one autograd node. Its backward has no atomics, so results repeat bit
//! for bit: on tensor cores two kernels (query gradients, which also take each row's delta from
//! their tiles, then key and value gradients), in f32 three (row deltas, key and value
//! gradients, query gradients).

use super::{GroupedDims, Scoring, Segments};
use crate::attach::{attach, attach3};
use crate::launch::constants::FA_TILE as TILE;
use crate::launch::{self, Arg, Operand};
use crate::rope::cuda::{rope_rows, HeadRows, HeadRun};
use crate::step_scope;
use candle_core::backend::BackendStorage;
use candle_core::{CudaStorage, DType, Device, Result, Shape, Tensor};

/// Head sizes the kernels are compiled for.
const HEAD_SIZES: [usize; 2] = [64, 128];

/// How the kernels mask and score: the options' scoring, and packed rows' segments.
type Masks = (Scoring, Option<Segments>);

/// The window the kernels take for none: wider than any sequence, and small enough that their
/// position arithmetic (a window added to a position) stays within `int`.
const NO_WINDOW: usize = 1 << 30;

/// The kernels' stages, one launch each (besides the row deltas of the backward).
#[derive(Clone, Copy)]
enum Stage {
    Forward,
    KeyValueGrads,
    QueryGrads,
}

/// Which implementation of the tiled kernels a launch uses.
#[derive(Clone, Copy)]
enum Kernels {
    /// f32 math on f32 copies of the tiles, 256 threads: any dtype, any alignment.
    Simt,
    /// `mma` on 16-bit tiles copied 16 bytes at a time, 128 threads: bf16 and f16 operands
    /// whose rows all start 16-byte aligned.
    TensorCores,
}

/// How the query side (q, out, dout, dq) and the key/value gradients lay out their heads.
#[derive(Clone, Copy, PartialEq)]
enum Rows {
    /// `[b, heads, t, d]`, contiguous.
    HeadMajor,
    /// `[b, t, heads · d]`: the rows of the projections themselves (tensor cores only).
    TokenMajor,
}

impl Rows {
    /// Element strides (batch, head, position) of `heads` heads of `len` positions of `d`.
    fn strides(self, heads: usize, len: usize, d: usize) -> [Arg; 3] {
        let (h, l, d) = (heads as u64, len as u64, d as u64);
        let strides = match self {
            Self::HeadMajor => [h * l * d, l * d, d],
            Self::TokenMajor => [l * h * d, d, h * d],
        };
        strides.map(Arg::Count)
    }

    /// The shape of `heads` heads of `len` positions of `d` in this layout.
    fn shape(self, batch: usize, heads: usize, len: usize, d: usize) -> Shape {
        match self {
            Self::HeadMajor => (batch, heads, len, d).into(),
            Self::TokenMajor => (batch, len, heads * d).into(),
        }
    }

    /// `kernels`, which must be the tensor-core ones for token-major rows.
    fn check(self, kernels: Kernels) -> Result<Kernels> {
        match (self, kernels) {
            (Self::TokenMajor, Kernels::Simt) => {
                candle_core::bail!("flash attention: token-major rows need bf16 or f16 operands on 16-byte boundaries")
            }
            _ => Ok(kernels),
        }
    }
}

impl Kernels {
    /// Tensor cores where the operands allow them; `kv` are the keys and values among them.
    fn for_operands(operands: &[Operand], kv: [Operand; 2]) -> Result<Self> {
        let dtype = launch::common_dtype(operands)?;
        if !matches!(dtype, DType::BF16 | DType::F16) {
            return Ok(Self::Simt);
        }
        // 16 bytes are 8 elements: each row of a key or value view must start on a multiple.
        let mut aligned = true;
        for operand in kv {
            aligned &= launch::strided4(operand)?.1.iter().all(|s| s % 8 == 0);
        }
        for &operand in operands {
            aligned &= start_address(operand)? % 16 == 0;
        }
        Ok(if aligned {
            Self::TensorCores
        } else {
            Self::Simt
        })
    }

    /// The kernel of `stage` for these dims (the dtype suffix is added at launch); `hopper`:
    /// the tensor-core kernels of `kernels/flash_wgmma.cuh`.
    fn name(self, dims: &GroupedDims, stage: Stage, hopper: bool) -> String {
        let family = match (self, hopper) {
            (Self::Simt, _) => "flash_attention",
            (Self::TensorCores, false) => "flash_mma",
            (Self::TensorCores, true) => "flash_wgmma",
        };
        let stage = match stage {
            Stage::Forward => "fwd",
            Stage::KeyValueGrads => "bwd_kv",
            Stage::QueryGrads => "bwd_q",
        };
        format!("{family}_{stage}_d{}", dims.head_size)
    }

    fn threads(self) -> u32 {
        match self {
            Self::Simt => 256,
            Self::TensorCores => 128,
        }
    }

    /// Dynamic shared memory of `stage`, laid out as in the kernels (`hopper` as in
    /// [`Kernels::name`]).
    fn shared_bytes(self, dims: &GroupedDims, stage: Stage, hopper: bool) -> Result<u32> {
        let d = dims.head_size;
        let bytes = match self {
            // 1,024 bytes to align the swizzled [64][d] 16-bit tiles (queries or keys and values,
            // two key/value or query buffers among them), then the 32-bit per-row vectors as
            // flash_mma's.
            Self::TensorCores if hopper => {
                let (tiles, floats) = match stage {
                    Stage::Forward => (5, 0),
                    Stage::QueryGrads => (7, TILE),
                    Stage::KeyValueGrads => (6, 2 * 3 * TILE),
                };
                1024 + 2 * tiles * TILE * d + 4 * floats
            }
            // f32 [64][d + 4] tiles, [64][68] score tiles and per-row vectors of 64.
            Self::Simt => {
                let (tiles, scores, rows) = match stage {
                    Stage::Forward => (2, 1, 0),
                    Stage::KeyValueGrads => (4, 2, 2),
                    Stage::QueryGrads => (4, 1, 2),
                };
                4 * (tiles * TILE * (d + 4) + scores * TILE * (TILE + 4) + rows * TILE)
            }
            // 16-bit [64][d + 8] tiles (two key/value or query buffers among them), then 32-bit
            // per-row vectors: the query gradients' deltas; the key/value gradients' log-sum-exp,
            // delta and segment start of each query buffer's rows.
            Self::TensorCores => {
                let (units, floats) = match stage {
                    Stage::Forward => (5, 0),
                    Stage::QueryGrads => (6, TILE),
                    Stage::KeyValueGrads => (6, 2 * 3 * TILE),
                };
                2 * units * TILE * (d + 8) + 4 * floats
            }
        };
        u32::try_from(bytes)
            .map_err(|_| candle_core::Error::Msg("flash attention: shared memory".into()))
    }

    /// The grid of `stage`: tiles of 64 queries (or keys) by batch × heads (or kv heads).
    fn grid(dims: &GroupedDims, stage: Stage) -> Result<(u32, u32)> {
        let (len, heads) = match stage {
            Stage::KeyValueGrads => (dims.kv_len, dims.kv_heads),
            _ => (dims.q_len, dims.heads),
        };
        Ok((
            launch::int_u32(len.div_ceil(TILE))?,
            launch::int_u32(dims.batch * heads)?,
        ))
    }

    /// Launches `stage`.
    fn launch(
        self,
        device: &candle_core::CudaDevice,
        dtype: DType,
        dims: &GroupedDims,
        stage: Stage,
        args: &[Arg],
    ) -> Result<()> {
        let hopper =
            matches!(self, Self::TensorCores) && hopper_kernels(device, dtype, dims, stage)?;
        let config = (
            Self::grid(dims, stage)?,
            (self.threads(), 1),
            self.shared_bytes(dims, stage, hopper)?,
        );
        let name = self.name(dims, stage, hopper);
        launch::launch_with_shared(device, &name, Some(dtype), config, args)
    }
}

/// Whether [`flash_attention`] handles these operands: CUDA, one float dtype, a head size the
/// kernels are compiled for, `heads` a multiple of `kv_heads`, no more queries than keys.
pub(crate) fn supported(q: &Tensor, k: &Tensor, v: &Tensor) -> bool {
    let Some(g) = GroupedDims::of(q, k, v) else {
        return false;
    };
    matches!(q.device(), Device::Cuda(_))
        && crate::fused(&[q, k, v])
        && HEAD_SIZES.contains(&g.head_size)
        && g.q_len > 0
        && g.q_len <= g.kv_len
}

/// Causal attention of `q` `[b, heads, q_len, d]` against `k`/`v` `[b, kv_heads, kv_len, d]`
/// (query `i` at position `kv_len − q_len + i`) with `scoring` and `segments` (which need
/// `q_len == kv_len`); the operands must pass [`supported`].
pub(crate) fn flash_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scoring: Scoring,
    segments: Option<Segments>,
) -> Result<Tensor> {
    let q = q.contiguous()?;
    let (k, v) = (unit_last(k)?, unit_last(v)?);
    let dims = GroupedDims::of(&q, &k, &v).ok_or_else(|| {
        candle_core::Error::Msg("flash attention: operands of mismatched shapes".into())
    })?;
    let (qd, kd, vd) = (q.detach(), k.detach(), v.detach());
    let rows = Rows::HeadMajor;
    let masks = (scoring, segments);
    let (out, lse) = forward(&qd, &kd, &vd, &dims, &masks, rows)?;
    if !(q.track_op() || k.track_op() || v.track_op()) {
        return Ok(out);
    }
    let saved = out.clone();
    attach3([&q, &k, &v], &out, "flash-attention", move |grad| {
        let dout = grad.contiguous()?;
        let inputs = [&qd, &kd, &vd];
        let layout = (rows, KvGradLayout::Apart);
        let (dq, kv) = backward(inputs, &saved, &dout, &lse, &dims, &masks, layout)?;
        let (dk, dv) = kv.apart()?;
        Ok((Some(dq), Some(dk), Some(dv)))
    })
}

/// Whether [`self_attention`] handles these projections: CUDA, bf16 or f16, contiguous from
/// 16-byte boundaries, `q` `[b, t, heads · d]` and `k`/`v` `[b, t, kv_heads · d]` with a head
/// size the kernels are compiled for, RoPE tables `[t, d / 2]`.
pub(crate) fn self_attention_supported(
    [q, k, v]: [&Tensor; 3],
    tables: (&Tensor, &Tensor),
    heads: usize,
    kv_heads: usize,
) -> Result<bool> {
    let (Ok((b, t, width)), Ok(kd)) = (q.dims3(), k.dims3()) else {
        return Ok(false);
    };
    let d = width / heads.max(1);
    let fits = width == heads * d
        && kd == (b, t, kv_heads * d)
        && v.dims() == k.dims()
        && projection_fits(q, tables, (heads, kv_heads), d)
        && crate::fused(&[k, v])
        && [q, k, v].iter().all(|x| x.is_contiguous());
    if !fits {
        return Ok(false);
    }
    launch::with_operands(&[q, k, v], launch::start_aligned)
}

/// `merge(attention(rope(split(q)), rope(split(k)), split(v)))` with `scoring` and `segments` for
/// projections `q` `[b, t, heads · d]` and `k`/`v` `[b, t, kv_heads · d]` that pass
/// [`self_attention_supported`], as `[b, t, heads · d]`: the kernels read and write the
/// projections' rows in place, so no head split or merge copies exist in either direction.
pub(crate) fn self_attention(
    [q, k, v]: [&Tensor; 3],
    (cos, sin): (&Tensor, &Tensor),
    heads: usize,
    kv_heads: usize,
    scoring: Scoring,
    segments: Option<Segments>,
) -> Result<Tensor> {
    let (batch, t, width) = q.dims3()?;
    let dims = GroupedDims::self_attention(batch, t, (heads, kv_heads), width / heads);
    let tables = (cos.detach(), sin.detach());
    let qr = rotate(&q.detach(), &tables, heads, 1.0)?;
    let kr = heads_view(&rotate(&k.detach(), &tables, kv_heads, 1.0)?, kv_heads)?;
    let vd = heads_view(&v.detach(), kv_heads)?;
    let masks = (scoring, segments);
    let (out, lse) = rotated_attention([&qr, &kr, &vd], &dims, &masks)?;
    if !(q.track_op() || k.track_op() || v.track_op()) {
        return Ok(out);
    }
    let saved = out.clone();
    attach3([q, k, v], &out, "self-attention", move |grad| {
        let dout = grad.contiguous()?;
        let inputs = [&qr, &kr, &vd];
        let rows = Rows::TokenMajor;
        let layout = (rows, KvGradLayout::Apart);
        let (dq, kv) = backward(inputs, &saved, &dout, &lse, &dims, &masks, layout)?;
        let (dk, dv) = kv.apart()?;
        let dq = rotate(&dq, &tables, heads, -1.0)?;
        let dk = rotate(&dk, &tables, kv_heads, -1.0)?;
        Ok((Some(dq), Some(dk), Some(dv)))
    })
}

/// The forward pass of [`self_attention`] on rotated queries `qr` `[b, t, heads · d]` and keys
/// and values `[b, kv_heads, t, d]` views: the output in `qr`'s layout and the rows' base-2
/// log-sum-exps. A block recomputed for its backward pass takes its first forward pass's.
fn rotated_attention(
    [qr, kr, vd]: [&Tensor; 3],
    dims: &GroupedDims,
    masks: &Masks,
) -> Result<(Tensor, Tensor)> {
    let fits = |(out, lse): &(Tensor, Tensor)| {
        out.dims() == qr.dims()
            && out.dtype() == qr.dtype()
            && lse.elem_count() == dims.query_rows()
    };
    step_scope::attention_result(fits, || forward(qr, kr, vd, dims, masks, Rows::TokenMajor))
}

/// Whether the self-attention kernels take projections of `x` (its dtype and device,
/// `[b, t, ..]`) into `heads` query and `kv_heads` key/value heads of `d`, with tables
/// `cos`/`sin` `[t, d / 2]` (RoPE over whole heads): the conditions [`self_attention`] and
/// [`self_attention_packed`] share.
pub(crate) fn projection_fits(
    x: &Tensor,
    (cos, sin): (&Tensor, &Tensor),
    (heads, kv_heads): (usize, usize),
    d: usize,
) -> bool {
    let (Ok(t), Ok(table)) = (x.dim(1), cos.dims2()) else {
        return false;
    };
    heads > 0
        && kv_heads > 0
        && heads % kv_heads == 0
        && HEAD_SIZES.contains(&d)
        && table == (t, d / 2)
        && sin.dims() == cos.dims()
        && matches!(x.dtype(), DType::BF16 | DType::F16)
        && matches!(x.device(), Device::Cuda(_))
        && crate::fused(&[x, cos, sin])
        && [cos, sin].iter().all(|x| x.is_contiguous())
}

/// Whether [`self_attention_packed`] takes `qkv`, the packed q/k/v projection
/// `[b, t, (heads + 2 · kv_heads) · d]`, with tables `cos`/`sin` `[t, d / 2]`.
pub(crate) fn self_attention_packed_supported(
    qkv: &Tensor,
    tables: (&Tensor, &Tensor),
    heads: (usize, usize),
) -> Result<bool> {
    let Ok((_, _, width)) = qkv.dims3() else {
        return Ok(false);
    };
    let parts = heads.0 + 2 * heads.1;
    let d = width / parts.max(1);
    if width != parts * d || !qkv.is_contiguous() || !projection_fits(qkv, tables, heads, d) {
        return Ok(false);
    }
    launch::with_operands(&[qkv], launch::start_aligned)
}

/// [`self_attention`] of the packed projection `qkv` `[b, t, (heads + 2 · kv_heads) · d]`
/// (each row's queries, then keys, then values, as a stacked q/k/v projection writes them)
/// that passes [`self_attention_packed_supported`], as `[b, t, heads · d]`. RoPE reads the
/// queries and keys in place; the gradient comes back as one packed tensor (the rotated-back
/// query and key gradients and the value gradients written into its columns), so the stacked
/// projection's backward is one product each way.
pub(crate) fn self_attention_packed(
    qkv: &Tensor,
    (cos, sin): (&Tensor, &Tensor),
    (heads, kv_heads): (usize, usize),
    scoring: Scoring,
    segments: Option<Segments>,
) -> Result<Tensor> {
    let (batch, t, width) = qkv.dims3()?;
    let d = width / (heads + 2 * kv_heads);
    let dims = GroupedDims::self_attention(batch, t, (heads, kv_heads), d);
    let tables = (cos.detach(), sin.detach());
    // The keys rotated with the values copied beside them (a 1b layer's: 16 MB), so the
    // backward pass keeps those and not the whole projection.
    let (qr, kv) = rotate_packed(&qkv.detach(), &tables, (heads, kv_heads))?;
    let kv = kv.reshape((batch, t, 2 * kv_heads, d))?;
    let kr = kv.narrow(2, 0, kv_heads)?.transpose(1, 2)?;
    let vd = kv.narrow(2, kv_heads, kv_heads)?.transpose(1, 2)?;
    let masks = (scoring, segments);
    let (out, lse) = rotated_attention([&qr, &kr, &vd], &dims, &masks)?;
    if !qkv.track_op() {
        return Ok(out);
    }
    let saved = out.clone();
    attach(qkv, &out, "packed-self-attention", move |grad| {
        let dout = grad.contiguous()?;
        let inputs = [&qr, &kr, &vd];
        let rows = Rows::TokenMajor;
        let layout = (rows, KvGradLayout::Packed);
        let (dq, kv) = backward(inputs, &saved, &dout, &lse, &dims, &masks, layout)?;
        Ok(Some(packed_gradient(&dq, kv.packed()?, &tables, &dims)?))
    })
}

/// The packed projection `packed` `[b, t, (heads + 2 · kv_heads) · d]` split by one launch into
/// the rotated queries `[b, t, heads · d]` and the rotated keys with the values copied beside
/// them `[b, t, 2 · kv_heads · d]`.
fn rotate_packed(
    packed: &Tensor,
    (cos, sin): &(Tensor, Tensor),
    (heads, kv_heads): (usize, usize),
) -> Result<(Tensor, Tensor)> {
    let (b, t, width) = packed.dims3()?;
    let d = width / (heads + 2 * kv_heads);
    let (q, kv) = launch::with_operands(&[packed, cos, sin], |ops| {
        let [x, cos, sin] = [ops[0], ops[1], ops[2]];
        let dtype = x.0.dtype();
        let q = launch::alloc(&x.0.device, dtype, b * t * heads * d)?;
        let kv = launch::alloc(&x.0.device, dtype, b * t * 2 * kv_heads * d)?;
        let packed_rows = |head: usize| -> Result<HeadRows> {
            let offset = (head * d * dtype.size_in_bytes()) as u64;
            Ok(HeadRows {
                address: start_address(x)? + offset,
                token_stride: width,
            })
        };
        let rows_of = |buffer: &CudaStorage, count: usize| -> Result<HeadRows> {
            Ok(HeadRows {
                address: launch::base_address(buffer)?,
                token_stride: count * d,
            })
        };
        let runs = [
            HeadRun {
                from: packed_rows(0)?,
                to: rows_of(&q, heads)?,
                heads,
            },
            HeadRun {
                from: packed_rows(heads)?,
                to: rows_of(&kv, 2 * kv_heads)?,
                heads: 2 * kv_heads,
            },
        ];
        let rotated = heads + kv_heads;
        rope_rows(
            &x.0.device,
            dtype,
            &runs,
            (b * t, d),
            (cos, sin),
            rotated,
            1.0,
        )?;
        Ok((q, kv))
    })?;
    Ok((
        launch::tensor(q, (b, t, heads * d).into()),
        launch::tensor(kv, (b, t, 2 * kv_heads * d).into()),
    ))
}

/// The packed projection's gradient `[b, t, (heads + 2 · kv_heads) · d]` from `packed`, whose
/// key and value columns hold the gradients of the rotated keys and of the values, and the
/// rotated queries' gradient `dq` `[b, t, heads · d]`: the keys' rotated back in place, the
/// queries' rotated back into their columns.
fn packed_gradient(
    dq: &Tensor,
    packed: Tensor,
    (cos, sin): &(Tensor, Tensor),
    dims: &GroupedDims,
) -> Result<Tensor> {
    let (b, t, d) = (dims.batch, dims.q_len, dims.head_size);
    let (heads, kv_heads) = (dims.heads, dims.kv_heads);
    let width = (heads + 2 * kv_heads) * d;
    launch::with_operands(&[dq, &packed, cos, sin], |ops| {
        let [dq, packed, cos, sin] = [ops[0], ops[1], ops[2], ops[3]];
        let (device, dtype) = (&dq.0.device, dq.0.dtype());
        let keys = launch::address(packed)? + (heads * d * dtype.size_in_bytes()) as u64;
        let packed_rows = |address| HeadRows {
            address,
            token_stride: width,
        };
        let queries = HeadRows {
            address: launch::address(dq)?,
            token_stride: heads * d,
        };
        // The queries' gradient rotated back into its columns and the keys' in place, by one
        // launch.
        let runs = [
            HeadRun {
                from: queries,
                to: packed_rows(launch::address(packed)?),
                heads,
            },
            HeadRun {
                from: packed_rows(keys),
                to: packed_rows(keys),
                heads: kv_heads,
            },
        ];
        let rotated = heads + kv_heads;
        rope_rows(device, dtype, &runs, (b * t, d), (cos, sin), rotated, -1.0)
    })?;
    Ok(packed)
}

/// Rows `[b, t, heads · d]` rotated by RoPE (`sign` 1) or back (`sign` −1), same layout.
fn rotate(x: &Tensor, (cos, sin): &(Tensor, Tensor), heads: usize, sign: f32) -> Result<Tensor> {
    let (b, t, width) = x.dims3()?;
    let rows = x.reshape((b, t, heads, width / heads))?;
    let y = launch::with_operands(&[&rows, cos, sin], |ops| {
        crate::rope::cuda::rope(ops[0], (ops[1], ops[2]), heads, sign)
    })?;
    Ok(launch::tensor(y, x.shape().clone()))
}

/// `[b, t, heads · d]` rows as a `[b, heads, t, d]` view (no copy).
fn heads_view(x: &Tensor, heads: usize) -> Result<Tensor> {
    let (b, t, width) = x.dims3()?;
    x.reshape((b, t, heads, width / heads))?.transpose(1, 2)
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
    /// The dims of a self-attention over `t` positions: queries and keys alike.
    fn self_attention(batch: usize, t: usize, (heads, kv_heads): (usize, usize), d: usize) -> Self {
        Self {
            batch,
            heads,
            kv_heads,
            q_len: t,
            kv_len: t,
            head_size: d,
        }
    }

    fn kv_shape(&self) -> Shape {
        (self.batch, self.kv_heads, self.kv_len, self.head_size).into()
    }

    fn query_rows(&self) -> usize {
        self.batch * self.heads * self.q_len
    }

    /// The query side's strides in `rows`' layout, as the tensor-core kernels take them.
    fn query_strides(&self, rows: Rows) -> [Arg; 3] {
        rows.strides(self.heads, self.q_len, self.head_size)
    }

    /// Kernel arguments shared by the three tiled kernels after their buffers: heads, group,
    /// lengths, the key and value strides, and the masks (base-2 scale and cap, window, the
    /// segment starts' address or 0).
    fn common_args(&self, k: Operand, v: Operand, masks: &Masks) -> Result<Vec<Arg>> {
        let (scoring, segments) = masks;
        let (_, ks) = launch::strided4(k)?;
        let (_, vs) = launch::strided4(v)?;
        let mut args = vec![
            launch::int(self.heads)?,
            launch::int(self.heads / self.kv_heads)?,
            launch::int(self.q_len)?,
            launch::int(self.kv_len)?,
        ];
        args.extend(ks.iter().chain(&vs).map(|&s| Arg::Count(s)));
        let log2_e = std::f32::consts::LOG2_E;
        let window = match scoring.window {
            0 => NO_WINDOW,
            w => w.min(NO_WINDOW),
        };
        args.extend([
            Arg::Float(scoring.scale * log2_e),
            Arg::Float(scoring.softcap * log2_e),
            launch::int(window)?,
        ]);
        args.push(Arg::Address(match segments {
            Some(segments) if self.q_len == self.kv_len => segments.address(self.q_len)?,
            Some(_) => candle_core::bail!("flash attention: segments need q_len = kv_len"),
            None => 0,
        }));
        Ok(args)
    }
}

/// Whether a tensor-core launch of `stage` takes the Hopper kernels (`kernels/flash_wgmma.cuh`,
/// 1.1–1.5x flash_mma's on an H100: docs/benchmarks.md): a build with their machine code
/// (build.rs's `llmtool_wgmma`: compute capability 9.0 among `LLMTOOL_CUDA_SASS`), a device
/// of compute capability 9.0, bf16, and a head size and stage they are compiled for (heads of
/// 64, and the forward at 128), unless `LLMTOOL_FLASH_WGMMA=0`.
fn hopper_kernels(
    device: &candle_core::CudaDevice,
    dtype: DType,
    dims: &GroupedDims,
    stage: Stage,
) -> Result<bool> {
    static ENABLED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let enabled =
        *ENABLED.get_or_init(|| std::env::var("LLMTOOL_FLASH_WGMMA").as_deref() != Ok("0"));
    let compiled = matches!((dims.head_size, stage), (64, _) | (128, Stage::Forward));
    if !(enabled && dtype == DType::BF16 && compiled) {
        return Ok(false);
    }
    launch::runs_hopper_code(device)
}

/// The address of an operand's first element (contiguous, or keys and values with unit stride
/// along the head dimension).
fn start_address(operand: Operand) -> Result<u64> {
    match operand.1.is_contiguous() {
        true => launch::address(operand),
        false => Ok(launch::strided4(operand)?.0),
    }
}

/// [`start_address`] as a kernel argument.
fn start(operand: Operand) -> Result<Arg> {
    Ok(Arg::Address(start_address(operand)?))
}

/// The output (in `rows`' layout, like `q`) and the base-2 log-sum-exp of each query row (f32).
/// `q` is contiguous; `k` and `v` are `[b, kv_heads, kv_len, d]` with unit stride along `d`.
fn forward(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    dims: &GroupedDims,
    masks: &Masks,
    rows: Rows,
) -> Result<(Tensor, Tensor)> {
    let n = dims.query_rows();
    let (out, lse) = launch::with_operands(&[q, k, v], |ops| {
        let [q, k, v] = [ops[0], ops[1], ops[2]];
        let device = &q.0.device;
        let out = launch::alloc(device, q.0.dtype(), n * dims.head_size)?;
        let lse = launch::alloc(device, DType::F32, n)?;
        let mut args = vec![
            start(q)?,
            start(k)?,
            start(v)?,
            Arg::Address(launch::base_address(&out)?),
            Arg::Address(launch::base_address(&lse)?),
        ];
        args.extend(dims.common_args(k, v, masks)?);
        let kernels = rows.check(Kernels::for_operands(&[q, k, v], [k, v])?)?;
        if let Kernels::TensorCores = kernels {
            args.extend(dims.query_strides(rows));
        }
        kernels.launch(device, q.0.dtype(), dims, Stage::Forward, &args)?;
        Ok((out, lse))
    })?;
    Ok((
        launch::tensor(out, q.shape().clone()),
        launch::tensor(lse, n.into()),
    ))
}

/// Where [`backward`] writes the key and value gradients.
#[derive(Clone, Copy, PartialEq)]
enum KvGradLayout {
    /// Tensors of their own, in the query side's rows' layout.
    Apart,
    /// The key and value columns of one packed q/k/v gradient
    /// `[b, t, (heads + 2 · kv_heads) · d]` (token-major rows of a self-attention), its query
    /// columns left to the caller.
    Packed,
}

/// The key and value gradients of [`backward`] (tensors, or their buffers inside it), as its
/// [`KvGradLayout`] asked.
enum KvGrads<T = Tensor> {
    Apart(T, T),
    Packed(T),
}

impl KvGrads {
    /// The key and value gradients of [`KvGradLayout::Apart`].
    fn apart(self) -> Result<(Tensor, Tensor)> {
        match self {
            Self::Apart(dk, dv) => Ok((dk, dv)),
            Self::Packed(_) => candle_core::bail!("flash attention: packed key/value gradients"),
        }
    }

    /// The packed gradient of [`KvGradLayout::Packed`].
    fn packed(self) -> Result<Tensor> {
        match self {
            Self::Packed(packed) => Ok(packed),
            Self::Apart(..) => candle_core::bail!("flash attention: key/value gradients apart"),
        }
    }
}

/// `dq` (like `q`) and the key and value gradients (in `rows`' layout, or packed as `kv_layout`
/// says) for the output gradient `dout` (laid out like `out` and `q`).
fn backward(
    [q, k, v]: [&Tensor; 3],
    out: &Tensor,
    dout: &Tensor,
    lse: &Tensor,
    dims: &GroupedDims,
    masks: &Masks,
    (rows, kv_layout): (Rows, KvGradLayout),
) -> Result<(Tensor, KvGrads)> {
    let n = dims.query_rows();
    let (b, kvh, len, d) = (dims.batch, dims.kv_heads, dims.kv_len, dims.head_size);
    let packed_width = (dims.heads + 2 * kvh) * d;
    let (dq, kv) = launch::with_operands(&[q, k, v, out, dout, lse], |ops| {
        let [q, k, v, out, dout, lse] = [ops[0], ops[1], ops[2], ops[3], ops[4], ops[5]];
        let (device, dtype) = (&q.0.device, q.0.dtype());
        let kernels = rows.check(Kernels::for_operands(&[q, k, v, out, dout], [k, v])?)?;
        let delta = launch::alloc(device, DType::F32, n)?;
        let delta_arg = Arg::Address(launch::base_address(&delta)?);
        let dq = launch::alloc(device, dtype, n * dims.head_size)?;
        // The key and value gradients' buffers, their first elements and their strides.
        let (kv, [dk_at, dv_at], kv_strides) = match kv_layout {
            KvGradLayout::Apart => {
                let elems = dims.kv_shape().elem_count();
                let dk = launch::alloc(device, dtype, elems)?;
                let dv = launch::alloc(device, dtype, elems)?;
                let starts = [launch::base_address(&dk)?, launch::base_address(&dv)?];
                (KvGrads::Apart(dk, dv), starts, rows.strides(kvh, len, d))
            }
            KvGradLayout::Packed => {
                if rows != Rows::TokenMajor || !matches!(kernels, Kernels::TensorCores) {
                    candle_core::bail!("flash attention: packed gradients need token-major rows");
                }
                let packed = launch::alloc(device, dtype, b * len * packed_width)?;
                let keys = launch::base_address(&packed)?
                    + (dims.heads * d * dtype.size_in_bytes()) as u64;
                let values = keys + (kvh * d * dtype.size_in_bytes()) as u64;
                let strides = [len * packed_width, d, packed_width].map(|s| Arg::Count(s as u64));
                (KvGrads::Packed(packed), [keys, values], strides)
            }
        };
        let inputs = [start(q)?, start(k)?, start(v)?, start(dout)?, start(lse)?];
        let tail = |mut args: Vec<Arg>| -> Result<Vec<Arg>> {
            args.extend(dims.common_args(k, v, masks)?);
            args.push(Arg::Float(masks.0.scale));
            Ok(args)
        };
        let dq_arg = Arg::Address(launch::base_address(&dq)?);
        let kv_outputs = [delta_arg, Arg::Address(dk_at), Arg::Address(dv_at)];
        let mut kv_args = tail([&inputs[..], &kv_outputs].concat())?;
        match kernels {
            // The query gradients take the deltas from their own tiles, for the key/value
            // gradients after them.
            Kernels::TensorCores => {
                let extra = [start(out)?, delta_arg, dq_arg];
                let mut q_args = tail([&inputs[..], &extra].concat())?;
                q_args.extend(dims.query_strides(rows));
                kernels.launch(device, dtype, dims, Stage::QueryGrads, &q_args)?;
                kv_args.extend(dims.query_strides(rows));
                kv_args.extend(kv_strides);
                kernels.launch(device, dtype, dims, Stage::KeyValueGrads, &kv_args)?;
            }
            Kernels::Simt => {
                let args = [start(out)?, start(dout)?, delta_arg];
                let sizes = [launch::int(n)?, launch::int(dims.head_size)?];
                let (grid, block) = launch::per_warp_row(n)?;
                let config = (grid, block, 0);
                let args = [&args[..], &sizes].concat();
                launch::launch_with_shared(
                    device,
                    "flash_attention_delta",
                    Some(dtype),
                    config,
                    &args,
                )?;
                kernels.launch(device, dtype, dims, Stage::KeyValueGrads, &kv_args)?;
                let q_args = tail([&inputs[..], &[delta_arg, dq_arg]].concat())?;
                kernels.launch(device, dtype, dims, Stage::QueryGrads, &q_args)?;
            }
        }
        Ok((dq, kv))
    })?;
    let kv = match kv {
        KvGrads::Apart(dk, dv) => {
            let shape = rows.shape(b, kvh, len, d);
            KvGrads::Apart(launch::tensor(dk, shape.clone()), launch::tensor(dv, shape))
        }
        KvGrads::Packed(packed) => {
            KvGrads::Packed(launch::tensor(packed, (b, len, packed_width).into()))
        }
    };
    Ok((launch::tensor(dq, q.shape().clone()), kv))
}
