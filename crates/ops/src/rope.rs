//! Rotary position embedding (Hugging Face rotate-half layout), over whole heads or over the
//! first `rotary` dimensions of each head with the rest passed through (partial rotary, Phi-3):
//! its dispatch, composite reference, and fused kernels on the CPU and on CUDA
//! (`kernels/rope_kv.cu`). The backward of a rotation by θ is the rotation by −θ, so one kernel
//! does both directions.

use super::attach::attach;
use super::cpu_kernel::{f32s, output, written_rows};
use super::fused_op::{custom_op, CpuOperand, CpuOutput, FusedOp};
#[cfg(feature = "cuda")]
use super::fused_op::{CudaOutput, Operand};
use super::reference::rotate_half;
use candle_core::{Result, Tensor, D};

/// Rotary position embedding in the Hugging Face rotate-half layout. `x` is
/// `[batch, heads, seq, head_dim]`; `cos`/`sin` are `[seq, rotary / 2]` for these positions,
/// which rotates the first `rotary` dimensions of each head (all of them, or fewer for partial
/// rotary) and passes the rest through. Fused where [`super::fused`] accepts the operands and
/// `supports` their shapes, else the [`fn@reference`].
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    if super::fused(&[x, cos, sin]) && supports(x, cos, sin) {
        return fused_rope(&x.contiguous()?, &cos.contiguous()?, &sin.contiguous()?);
    }
    reference(x, cos, sin)
}

/// [`rope`] from candle's differentiable ops, any backend and dtype.
pub fn reference(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let (_, _, seq, d) = x.dims4()?;
    let rotary = 2 * cos.dim(D::Minus1)?;
    if rotary < d {
        let rotated = reference(&x.narrow(D::Minus1, 0, rotary)?, cos, sin)?;
        let rest = x.narrow(D::Minus1, rotary, d - rotary)?;
        return Tensor::cat(&[&rotated, &rest], D::Minus1);
    }
    let table = |half: &Tensor| -> Result<Tensor> {
        Tensor::cat(&[half, half], D::Minus1)?
            .narrow(0, 0, seq)?
            .unsqueeze(0)?
            .unsqueeze(0)
    };
    x.broadcast_mul(&table(cos)?)? + rotate_half(x)?.broadcast_mul(&table(sin)?)?
}

/// Whether the fused kernel handles these shapes: `x` `[b, h, t, d]`, tables `[t, r / 2]`
/// with `0 < r ≤ d`. Others (e.g. batched tables) take the composite path.
pub(crate) fn supports(x: &Tensor, cos: &Tensor, sin: &Tensor) -> bool {
    match (x.dims4(), cos.dims2()) {
        (Ok((_, _, t, d)), Ok((rows, half))) => {
            rows == t && half > 0 && 2 * half <= d && sin.dims() == cos.dims()
        }
        _ => false,
    }
}

/// The rotated share `r` of rows of `d` for tables of `table` elements `[.., r / 2]` of
/// which `half` (`r / 2`) per row, and the table's rows.
fn rotated_share(d: usize, half: usize, table: usize) -> Result<(usize, usize)> {
    if half == 0 || 2 * half > d || table % half != 0 {
        candle_core::bail!("rope: tables of {table} in rows of {half} for head size {d}");
    }
    Ok((2 * half, table / half))
}

/// The fused [`rope`]: inputs must be contiguous tensors that [`supports`], on a backend
/// [`super::fused`] accepts. The graph node keeps only the tables: its backward (the inverse
/// rotation) does not read `x`.
pub(crate) fn fused_rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let y = rotate(&x.detach(), cos, sin, false)?;
    if !x.track_op() {
        return Ok(y);
    }
    let (cos, sin) = (cos.detach(), sin.detach());
    attach(x, &y, "rope", move |grad| {
        Ok(Some(rotate(&grad.contiguous()?, &cos, &sin, true)?))
    })
}

/// `x` rotated by θ (or by −θ with `inverse`), outside the autograd graph.
fn rotate(x: &Tensor, cos: &Tensor, sin: &Tensor, inverse: bool) -> Result<Tensor> {
    x.apply_op3_no_bwd(cos, sin, &Rope { inverse })
}

struct Rope {
    /// Rotate by −θ (the backward pass) instead of θ.
    inverse: bool,
}

impl FusedOp<3> for Rope {
    const NAME: &'static str = "rope";

    fn cpu(
        &self,
        [(x, x_layout), (cos, cos_layout), (sin, sin_layout)]: [CpuOperand; 3],
    ) -> CpuOutput {
        let x_values = f32s(x, x_layout)?;
        let (cos, sin) = (f32s(cos, cos_layout)?, f32s(sin, sin_layout)?);
        let d = *x_layout.dims().last().unwrap_or(&0);
        let half = *cos_layout.dims().last().unwrap_or(&0);
        let (rotary, seq) = rotated_share(d, half, cos.len())?;
        if sin.len() != cos.len() {
            candle_core::bail!("rope: cos of {} and sin of {}", cos.len(), sin.len());
        }
        let sign = if self.inverse { -1.0 } else { 1.0 };
        // SAFETY: rows are d long; both rotated halves and the rest are written in full.
        let y = unsafe {
            written_rows(x_values.len(), d, |row, y| {
                let x = &x_values[row * d..][..d];
                let pos = row % seq;
                let (c, s) = (&cos[pos * half..][..half], &sin[pos * half..][..half]);
                let (rotated, rest) = x.split_at(rotary);
                let (x1, x2) = rotated.split_at(half);
                let (y_rotated, y_rest) = y.split_at_mut(rotary);
                let (y1, y2) = y_rotated.split_at_mut(half);
                for j in 0..half {
                    let (first, second) = rotated_pair(x1[j], x2[j], c[j], sign * s[j]);
                    y1[j].write(first);
                    y2[j].write(second);
                }
                for (y, &x) in y_rest.iter_mut().zip(rest) {
                    y.write(x);
                }
            })
        };
        Ok(output(y, x_layout.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda(&self, [x, cos, sin]: [Operand; 3]) -> CudaOutput {
        let sign = if self.inverse { -1.0 } else { 1.0 };
        let y = cuda::rope(x, (cos, sin), 1, sign)?;
        Ok((y, x.1.shape().clone()))
    }
}

custom_op!(Rope: 3);

/// One rotated pair of a row: `(x1 cos - x2 sin, x2 cos + x1 sin)`, the pair `half` apart.
pub(crate) fn rotated_pair(x1: f32, x2: f32, cos: f32, sin: f32) -> (f32, f32) {
    (x1 * cos - x2 * sin, x2 * cos + x1 * sin)
}

/// The CUDA launcher (`kernels/rope_kv.cu`), also for the projections' rows of
/// `attention/flash.rs`.
#[cfg(feature = "cuda")]
pub(crate) mod cuda {
    use crate::launch::{
        address, alloc, base_address, common_dtype, elementwise_kernel, int, launch, per_element,
        Arg, Operand,
    };
    use crate::rows_and_width;
    use candle_core::{CudaDevice, CudaStorage, DType, Result};

    /// RoPE (`sign` 1) or its gradient (`sign` -1) for `x` `[.., seq, heads, d]` (`heads` 1 for
    /// `[.., seq, d]`) and tables `[seq, r / 2]`: the first `r` of each head rotated, the rest
    /// copied.
    pub(crate) fn rope(
        x: Operand,
        tables: (Operand, Operand),
        heads: usize,
        sign: f32,
    ) -> Result<CudaStorage> {
        let dtype = common_dtype(&[x, tables.0, tables.1])?;
        let (rows, d) = rows_and_width(x.1)?;
        let y = alloc(&x.0.device, dtype, rows * d)?;
        let contiguous = |address| HeadRows {
            address,
            token_stride: heads * d,
        };
        let run = HeadRun {
            from: contiguous(address(x)?),
            to: contiguous(base_address(&y)?),
            heads,
        };
        let positions = rows / heads.max(1);
        rope_rows(
            &x.0.device,
            dtype,
            &[run],
            (positions, d),
            tables,
            heads,
            sign,
        )?;
        Ok(y)
    }

    /// Where rows of heads lie: from `address`, `heads` rows of `d` elements a position,
    /// `token_stride` elements from one position's first to the next one's (`heads · d` where
    /// contiguous; the width of a packed q/k/v projection's rows in one of its column blocks).
    #[derive(Debug, Clone, Copy)]
    pub(crate) struct HeadRows {
        pub address: u64,
        pub token_stride: usize,
    }

    /// A run of `heads` heads of each position that a launch of [`rope_rows`] reads at `from`
    /// and writes at `to` (which may be `from`: each thread reads only what it writes).
    #[derive(Debug, Clone, Copy)]
    pub(crate) struct HeadRun {
        pub from: HeadRows,
        pub to: HeadRows,
        pub heads: usize,
    }

    /// [`rope`] over `positions` positions of the heads of `runs` (one or two, a position's
    /// heads in their order), each of `d` elements, for `dtype` tables: the first `rotated`
    /// heads of each position rotated, the rest copied whole. One launch for all of them.
    pub(crate) fn rope_rows(
        device: &CudaDevice,
        dtype: DType,
        runs: &[HeadRun],
        (positions, d): (usize, usize),
        (cos, sin): (Operand, Operand),
        rotated: usize,
        sign: f32,
    ) -> Result<()> {
        let (first, second) = match runs {
            [only] => (*only, *only),
            [first, second] => (*first, *second),
            _ => candle_core::bail!("rope: {} runs of heads in one launch", runs.len()),
        };
        let heads: usize = runs.iter().map(|run| run.heads).sum();
        let rows = positions * heads;
        let half = *cos.1.dims().last().unwrap_or(&0);
        let table = cos.1.shape().elem_count();
        let (rotary, seq) = super::rotated_share(d, half, table)?;
        if sin.1.shape().elem_count() != table {
            candle_core::bail!(
                "rope: cos of {table} and sin of {}",
                sin.1.shape().elem_count()
            );
        }
        // Each thread moves `width` elements of one half or of the copied rest: 16 bytes where
        // every row of both sides starts on a 16-byte boundary.
        let run_length = gcd(half, d - rotary);
        let (name, width) = elementwise_kernel(("rope", "rope_wide"), &[cos, sin], run_length)?;
        let bytes = dtype.size_in_bytes();
        let ends = runs.iter().flat_map(|run| [run.from, run.to]);
        let aligned = ends.into_iter().all(|rows| {
            rows.address % 16 == 0 && (rows.token_stride * bytes) % 16 == 0 && (d * bytes) % 16 == 0
        });
        let (name, width) = match aligned {
            true => (name, width),
            false => ("rope", 1),
        };
        let args = [
            Arg::Address(first.from.address),
            Arg::Address(address(cos)?),
            Arg::Address(address(sin)?),
            Arg::Address(first.to.address),
            int(rows)?,
            int(d)?,
            int(rotary)?,
            int(seq)?,
            int(heads)?,
            int(rotated)?,
            Arg::Count(first.from.token_stride as u64),
            Arg::Count(first.to.token_stride as u64),
            Arg::Float(sign),
            // With one run, `split` is past every head and the second run is never read.
            int(first.heads.min(heads))?,
            Arg::Address(second.from.address),
            Arg::Address(second.to.address),
            Arg::Count(second.from.token_stride as u64),
            Arg::Count(second.to.token_stride as u64),
        ];
        let (grid, block) = per_element(rows * (d - half) / width)?;
        launch(device, name, Some(dtype), grid, block, &args)
    }

    fn gcd(a: usize, b: usize) -> usize {
        match b {
            0 => a,
            _ => gcd(b, a % b),
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::parity::{assert_parity, uniform};

    #[test]
    fn matches_the_reference_forward_and_backward() {
        // (b, h, t, d, rotated share r): partial rotary where r < d.
        for (i, &(b, h, t, d, r)) in [
            (1, 1, 1, 2, 2),
            (2, 3, 5, 8, 8),
            (1, 2, 7, 6, 6),
            (3, 1, 4, 64, 64),
            (2, 4, 40, 64, 64),
            (2, 3, 5, 8, 4),
            (1, 2, 7, 10, 6),
            (2, 2, 9, 96, 64),
        ]
        .iter()
        .enumerate()
        {
            let s = 10 * i as u64;
            let angles = (uniform(&[t, r / 2], s) * 3.0).unwrap();
            let inputs = [
                uniform(&[b, h, t, d], s + 1),
                angles.cos().unwrap(),
                angles.sin().unwrap(),
            ];
            assert!(super::supports(&inputs[0], &inputs[1], &inputs[2]));
            assert_parity(
                "rope",
                &inputs,
                &[true, false, false],
                |t| super::fused_rope(&t[0], &t[1], &t[2]),
                |t| super::reference(&t[0], &t[1], &t[2]),
                1e-5,
            );
        }
    }
}
