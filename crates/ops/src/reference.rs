//! The composite reference of every fused op, under one path. Each is built from candle's
//! differentiable tensor ops and lives beside its op's dispatch and kernels; they run on every
//! backend and dtype, define what the fused kernels must compute, and are what the fused
//! kernels are tested against (the unit tests of each op and [`super::check`]).

use candle_core::DType;

pub use super::attention::reference as causal_attention;
pub use super::cross_entropy::{reference_grad as token_nll_grad, reference_nll as token_nll};
pub use super::embedding::reference as embedding;
pub use super::rms_norm::reference as rms_norm;
pub use super::rope::reference as rope;
pub use super::swiglu::reference as swiglu;

/// The dtype reductions run in: f32 for 16-bit inputs, the input's own otherwise.
pub(crate) fn widened(dtype: DType) -> DType {
    match dtype {
        DType::BF16 | DType::F16 => DType::F32,
        other => other,
    }
}
