//! Test support: checks a fused op against its composite reference on the same inputs, forward
//! and gradients (through a random projection of the output), and reports the error.

use candle_core::{Device, Result, Tensor, Var};
use rand::{Rng, SeedableRng};

/// Uniform values in [-1, 1) of `shape`, reproducible from `seed`.
pub(crate) fn uniform(shape: &[usize], seed: u64) -> Tensor {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let n = shape.iter().product();
    let v: Vec<f32> = (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect();
    Tensor::from_vec(v, shape, &Device::Cpu).expect("shape matches the data")
}

/// `max |a − b| / max |b|`: the error relative to the reference's scale, which stays meaningful
/// where individual reference values are near zero.
pub(crate) fn relative_error(got: &Tensor, want: &Tensor) -> f32 {
    let diff = (got - want)
        .and_then(|d| d.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>())
        .expect("same shapes");
    let scale = want
        .abs()
        .and_then(|w| w.flatten_all()?.max(0)?.to_scalar::<f32>())
        .expect("reference is finite");
    diff / scale.max(f32::MIN_POSITIVE)
}

/// Runs `fused` and `reference` on `inputs` (gradients are checked for those marked in
/// `differentiable`) and asserts every relative error is below `tolerance`. Prints the largest.
pub(crate) fn assert_parity<F, R>(
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
    let run = |op: &dyn Fn(&[Tensor]) -> Result<Tensor>| {
        let vars: Vec<Option<Var>> = inputs
            .iter()
            .zip(differentiable)
            .map(|(t, &d)| d.then(|| Var::from_tensor(t).expect("copy")))
            .collect();
        let args: Vec<Tensor> = inputs
            .iter()
            .zip(&vars)
            .map(|(t, v)| v.as_ref().map_or(t.clone(), |v| v.as_tensor().clone()))
            .collect();
        let y = op(&args).expect("op runs");
        let projection = uniform(y.dims(), 99);
        let grads = (&y * projection)
            .and_then(|p| p.sum_all()?.backward())
            .expect("backward runs");
        let grads: Vec<Tensor> = vars
            .iter()
            .flatten()
            .map(|v| grads.get(v).expect("every input gets a gradient").clone())
            .collect();
        (y, grads)
    };
    let (y_fused, g_fused) = run(&fused);
    let (y_ref, g_ref) = run(&reference);
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
