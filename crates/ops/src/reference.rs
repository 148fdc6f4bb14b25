//! The composite reference of every fused op, under one path. Each is built from candle's
//! differentiable tensor ops and lives beside its op's dispatch and kernels; they run on every
//! backend and dtype, define what the fused kernels must compute, and are what the fused
//! kernels are tested against (the unit tests of each op and [`super::check`]).

use candle_core::{DType, Result, Tensor, D};

pub use super::attention::reference as causal_attention;
pub use super::attention::windowed_reference as windowed_attention;
pub use super::cross_entropy::{reference_grad as token_nll_grad, reference_nll as token_nll};
pub use super::embedding::reference as embedding;
pub use super::rms_norm::reference as rms_norm;
pub use super::rope::reference as rope;
pub use super::swiglu::reference as glu;

/// The dtype reductions run in: f32 for 16-bit inputs, the input's own otherwise.
pub(crate) fn widened(dtype: DType) -> DType {
    match dtype {
        DType::BF16 | DType::F16 => DType::F32,
        other => other,
    }
}

/// `exp(x - max) / sum(exp(x - max))` along `dim`, from differentiable ops (the composite
/// candle-nn's `softmax` was; on the CPU its values equal the fused `softmax_last_dim`'s, since
/// both sum the row with candle's `vec_reduce_sum`).
pub fn softmax<Dim: candle_core::shape::Dim>(xs: &Tensor, dim: Dim) -> Result<Tensor> {
    let dim = dim.to_index(xs.shape(), "softmax")?;
    let max = xs.max_keepdim(dim)?;
    let num = xs.broadcast_sub(&max)?.exp()?;
    let den = num.sum_keepdim(dim)?;
    num.broadcast_div(&den)
}

/// `x - max - log(sum(exp(x - max)))` along `dim`, from differentiable ops.
pub fn log_softmax<Dim: candle_core::shape::Dim>(xs: &Tensor, dim: Dim) -> Result<Tensor> {
    let dim = dim.to_index(xs.shape(), "log-softmax")?;
    let max = xs.max_keepdim(dim)?;
    let diff = xs.broadcast_sub(&max)?;
    let log_sum_exp = diff.exp()?.sum_keepdim(dim)?.log()?;
    diff.broadcast_sub(&log_sum_exp)
}

/// f32 one-hot rows `[n, depth]` for u32 `indices` `[n]`: 1 at each index, 0 elsewhere (an
/// index at or past `depth` gives a row of zeros).
pub(crate) fn one_hot(indices: &Tensor, depth: usize) -> Result<Tensor> {
    let classes = Tensor::arange(0u32, depth as u32, indices.device())?;
    indices
        .unsqueeze(1)?
        .broadcast_eq(&classes.unsqueeze(0)?)?
        .to_dtype(DType::F32)
}

/// The last dimension's halves swapped, the new first half negated: `[-x2, x1]`.
pub(crate) fn rotate_half(xs: &Tensor) -> Result<Tensor> {
    let last = xs.dim(D::Minus1)?;
    let first = xs.narrow(D::Minus1, 0, last / 2)?;
    let second = xs.narrow(D::Minus1, last / 2, last - last / 2)?;
    Tensor::cat(&[&second.neg()?, &first], D::Minus1)
}

/// `xs` `[batch, kv_heads, seq, head_size]` with each head repeated `n` times in place,
/// `[batch, kv_heads * n, seq, head_size]` (grouped-query attention's keys and values per query
/// head). One concatenation, not a strided broadcast copy.
pub(crate) fn repeat_kv(xs: &Tensor, n: usize) -> Result<Tensor> {
    if n == 1 {
        return Ok(xs.clone());
    }
    let (batch, kv_heads, seq, head_size) = xs.dims4()?;
    Tensor::cat(&vec![xs; n], 2)?.reshape((batch, kv_heads * n, seq, head_size))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn softmax_and_log_softmax_agree_and_normalise() {
        let x = Tensor::new(&[[1.0f32, 2.0, 3.0], [-1.0, 0.0, 50.0]], &Device::Cpu).unwrap();
        let p = softmax(&x, D::Minus1).unwrap();
        let sums: Vec<f32> = p.sum(1).unwrap().to_vec1().unwrap();
        assert!(sums.iter().all(|s| (s - 1.0).abs() < 1e-6));
        let lp: Vec<Vec<f32>> = log_softmax(&x, D::Minus1)
            .unwrap()
            .exp()
            .unwrap()
            .to_vec2()
            .unwrap();
        let p: Vec<Vec<f32>> = p.to_vec2().unwrap();
        for (a, b) in lp.iter().flatten().zip(p.iter().flatten()) {
            assert!((a - b).abs() < 1e-6, "{a} vs {b}");
        }
        let first = p[0].clone();
        let e: Vec<f32> = [1.0f32, 2.0, 3.0].iter().map(|v| (v - 3.0).exp()).collect();
        let total: f32 = e.iter().sum();
        for (a, b) in first.iter().zip(e.iter().map(|v| v / total)) {
            assert!((a - b).abs() < 1e-7);
        }
    }

    #[test]
    fn one_hot_rotate_half_and_repeat_kv() {
        let idx = Tensor::new(&[2u32, 0, 5], &Device::Cpu).unwrap();
        let oh: Vec<Vec<f32>> = one_hot(&idx, 3).unwrap().to_vec2().unwrap();
        assert_eq!(oh, [[0.0, 0.0, 1.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0]]);
        let x = Tensor::new(&[[1.0f32, 2.0, 3.0, 4.0]], &Device::Cpu).unwrap();
        let r: Vec<Vec<f32>> = rotate_half(&x).unwrap().to_vec2().unwrap();
        assert_eq!(r, [[-3.0, -4.0, 1.0, 2.0]]);
        // Two kv heads of one row each, repeated twice: heads 0, 0, 1, 1.
        let kv = Tensor::new(&[1.0f32, 2.0], &Device::Cpu)
            .unwrap()
            .reshape((1, 2, 1, 1))
            .unwrap();
        let rep: Vec<f32> = repeat_kv(&kv, 2)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(rep, [1.0, 1.0, 2.0, 2.0]);
    }
}
