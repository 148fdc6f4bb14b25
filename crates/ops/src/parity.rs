//! Test support: checks a fused op against its composite reference on the same CPU inputs,
//! forward and gradients, through [`super::check`], and asserts on the error.

use super::check;
use candle_core::{Result, Tensor};

/// Uniform values in [-1, 1) of `shape`, reproducible from `seed`.
pub fn uniform(shape: &[usize], seed: u64) -> Tensor {
    check::uniform(shape, seed).expect("shape matches the data")
}

/// `max |a − b| / max |b|` (see [`check::relative_error`]).
pub fn relative_error(got: &Tensor, want: &Tensor) -> f32 {
    check::relative_error(got, want).expect("same shapes")
}

/// Runs `fused` and `reference` on `inputs` (gradients are checked for those marked in
/// `differentiable`) and asserts every relative error is below `tolerance`. Prints the largest.
pub fn assert_parity<F, R>(
    name: &str,
    inputs: &[Tensor],
    differentiable: &[bool],
    fused: F,
    reference: R,
    tolerance: f32,
) where
    F: Fn(&[Tensor]) -> Result<Tensor>,
    R: Fn(&[Tensor]) -> Result<Tensor>,
{
    let (y_fused, g_fused) =
        check::forward_backward(fused, inputs, differentiable).expect("fused op runs");
    let (y_ref, g_ref) =
        check::forward_backward(reference, inputs, differentiable).expect("reference runs");
    let mut worst = relative_error(&y_fused, &y_ref);
    for (g, r) in g_fused.iter().zip(&g_ref) {
        worst = worst.max(relative_error(g, r));
    }
    let dims: Vec<Vec<usize>> = inputs.iter().map(|t| t.dims().to_vec()).collect();
    println!("{name} f32 {dims:?}: max relative error {worst:.2e} (forward and gradients)");
    assert!(
        worst < tolerance,
        "{name}: relative error {worst:.2e} over {tolerance:.0e}"
    );
}
