//! Checks every fused op against its composite reference on a device, per dtype: forward output
//! and input gradients (through a fixed random projection of the output) on random inputs, as
//! the relative error `max |fused − reference| / max |reference|`, and times both directions.
//! The reference runs in f32 on the 16-bit inputs widened, so a 16-bit row measures the fused
//! kernel's error against the exact result, not against another rounded one.
//!
//! `llmtool bench --tasks ops` prints these rows; the unit tests of each op assert on them. The
//! cases themselves are in `cases.rs`.

mod cases;

use candle_core::{DType, Device, Result, Tensor, Var};
pub use cases::{edge_cases, model_cases, ModelShape};
use rand::{Rng, SeedableRng};
use std::time::Instant;

/// An op under test: the fused dispatch or its reference, on the case's inputs.
pub type OpFn = fn(&[Tensor]) -> Result<Tensor>;

/// What one input of a case is.
#[derive(Debug, Clone)]
pub enum Input {
    /// Uniform values in `[-scale, scale)` of this shape; differentiable.
    Float(Vec<usize>, f32),
    /// Uniform values in `[-1, 1)` of this shape that the op takes as constants (RoPE tables).
    Table(Vec<usize>),
    /// Token ids below the bound, of this shape; not differentiable.
    Ids(Vec<usize>, u32),
}

/// A fused op, its reference and the inputs to compare them on.
pub struct Case {
    /// The op's name in reports (`rms_norm`, `add`, ...).
    pub name: &'static str,
    /// The public dispatch, which runs the fused kernel where one exists.
    pub fused: OpFn,
    /// The composite reference it is compared with.
    pub reference: OpFn,
    /// The inputs both are run on.
    pub inputs: Vec<Input>,
}

impl Case {
    /// The shapes of the inputs, for reports.
    pub fn shapes(&self) -> Vec<Vec<usize>> {
        self.inputs
            .iter()
            .map(|i| match i {
                Input::Float(s, _) | Input::Table(s) | Input::Ids(s, _) => s.clone(),
            })
            .collect()
    }

    /// The error allowed for this case in `dtype`: [`tolerance`], doubled in a 16-bit dtype
    /// for a case with inputs scaled up (queries 40 times larger, so that scores reach a soft
    /// cap). Rounding such a rotated query to 16 bits moves each score by a fixed fraction of
    /// its size, which the softmax turns into relative error of the weights: the self-attention
    /// cases with a soft cap and window reach 2.1e-2 in bf16 at the small preset's shapes,
    /// where the same kernels in f32 stay within 2e-6.
    pub fn tolerance(&self, dtype: DType) -> f32 {
        let scaled_up = self
            .inputs
            .iter()
            .any(|i| matches!(i, Input::Float(_, scale) if *scale > 1.0));
        match (scaled_up, dtype) {
            (true, DType::BF16 | DType::F16) => 2.0 * tolerance(dtype),
            _ => tolerance(dtype),
        }
    }

    fn differentiable(&self) -> Vec<bool> {
        self.inputs
            .iter()
            .map(|i| matches!(i, Input::Float(..)))
            .collect()
    }
}

/// The result of one case in one dtype.
#[derive(Debug, Clone)]
pub struct Report {
    /// Worst relative error over the output and every gradient.
    pub error: f32,
    /// Forward plus backward, best of the timed runs, in milliseconds.
    pub fused_ms: f64,
    /// The reference's forward plus backward, best of the timed runs, in milliseconds.
    pub reference_ms: f64,
}

/// The error allowed for `dtype`: a few units in the last place of a 16-bit result, summed
/// over reductions of hundreds to thousands of terms.
pub fn tolerance(dtype: DType) -> f32 {
    match dtype {
        DType::BF16 => 2e-2,
        DType::F16 => 4e-3,
        _ => 1e-4,
    }
}

/// Uniform values in `[-1, 1)` of `shape`, reproducible from `seed`, on the CPU in f32.
pub fn uniform(shape: &[usize], seed: u64) -> Result<Tensor> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let n = shape.iter().product();
    let v: Vec<f32> = (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect();
    Tensor::from_vec(v, shape, &Device::Cpu)
}

/// `max |a − b| / max |b|` in f32: the error relative to the reference's scale, which stays
/// meaningful where individual reference values are near zero.
pub fn relative_error(got: &Tensor, want: &Tensor) -> Result<f32> {
    let got = got.to_dtype(DType::F32)?;
    let want = want.to_dtype(DType::F32)?;
    let diff = (got - &want)?
        .abs()?
        .flatten_all()?
        .max(0)?
        .to_scalar::<f32>()?;
    let scale = want.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
    Ok(diff / scale.max(f32::MIN_POSITIVE))
}

/// The case's inputs on `device`, floats in `dtype`.
fn materialize(case: &Case, seed: u64, device: &Device, dtype: DType) -> Result<Vec<Tensor>> {
    case.inputs
        .iter()
        .enumerate()
        .map(|(i, input)| match input {
            Input::Float(shape, scale) => (uniform(shape, seed + i as u64)? * *scale as f64)?
                .to_dtype(dtype)?
                .to_device(device),
            Input::Table(shape) => uniform(shape, seed + i as u64)?
                .to_dtype(dtype)?
                .to_device(device),
            Input::Ids(shape, bound) => {
                let n: usize = shape.iter().product();
                let ids: Vec<u32> = (0..n as u64)
                    .map(|j| ((j * 7919 + seed * 31) % *bound as u64) as u32)
                    .collect();
                Tensor::from_vec(ids, shape.as_slice(), device)
            }
        })
        .collect()
}

/// The inputs with those marked `differentiable` as fresh variables.
fn tracked(inputs: &[Tensor], differentiable: &[bool]) -> Result<(Vec<Option<Var>>, Vec<Tensor>)> {
    let vars: Vec<Option<Var>> = inputs
        .iter()
        .zip(differentiable)
        .map(|(t, &d)| d.then(|| Var::from_tensor(t)).transpose())
        .collect::<Result<_>>()?;
    let args = inputs
        .iter()
        .zip(&vars)
        .map(|(t, v)| v.as_ref().map_or(t.clone(), |v| v.as_tensor().clone()))
        .collect();
    Ok((vars, args))
}

/// The fixed random projection `P` of an output like `y`.
fn projection(y: &Tensor) -> Result<Tensor> {
    uniform(y.dims(), 99)?
        .to_dtype(y.dtype())?
        .to_device(y.device())
}

/// Output and gradients of `op` for the inputs marked `differentiable`: the gradients are those
/// of `Σ y ⊙ P` for a fixed random `P`.
pub fn forward_backward<F>(
    op: F,
    inputs: &[Tensor],
    differentiable: &[bool],
) -> Result<(Tensor, Vec<Tensor>)>
where
    F: Fn(&[Tensor]) -> Result<Tensor>,
{
    let (vars, args) = tracked(inputs, differentiable)?;
    let y = op(&args)?;
    let grads = (&y * projection(&y)?)?.sum_all()?.backward()?;
    let grads = vars
        .iter()
        .flatten()
        .map(|v| {
            grads
                .get(v)
                .cloned()
                .ok_or_else(|| candle_core::Error::Msg("an input received no gradient".into()))
        })
        .collect::<Result<_>>()?;
    Ok((y, grads))
}

/// The worst relative error of `case`'s fused op in `dtype` on `device` against its reference
/// in f32 on the same (rounded) inputs.
pub fn parity_error(case: &Case, seed: u64, device: &Device, dtype: DType) -> Result<f32> {
    let inputs = materialize(case, seed, device, dtype)?;
    let differentiable = case.differentiable();
    let (y, grads) = forward_backward(case.fused, &inputs, &differentiable)?;
    let wide = inputs
        .iter()
        .map(|t| match t.dtype() {
            DType::BF16 | DType::F16 => t.to_dtype(DType::F32),
            _ => Ok(t.clone()),
        })
        .collect::<Result<Vec<_>>>()?;
    let (want_y, want_grads) = forward_backward(case.reference, &wide, &differentiable)?;
    let mut worst = relative_error(&y, &want_y)?;
    for (g, w) in grads.iter().zip(&want_grads) {
        worst = worst.max(relative_error(g, w)?);
    }
    Ok(worst)
}

/// Best of `runs` timed forward + backward passes of `op`, after one untimed, in milliseconds.
/// Only the op and its backward are timed, not making the inputs or the projection.
fn millis(op: OpFn, inputs: &[Tensor], differentiable: &[bool], runs: usize) -> Result<f64> {
    let device = inputs[0].device().clone();
    let (_vars, args) = tracked(inputs, differentiable)?;
    let p = projection(&op(&args)?)?;
    let mut best = f64::INFINITY;
    for run in 0..=runs {
        device.synchronize()?;
        let start = Instant::now();
        (op(&args)? * &p)?.sum_all()?.backward()?;
        device.synchronize()?;
        if run > 0 {
            best = best.min(start.elapsed().as_secs_f64() * 1e3);
        }
    }
    Ok(best)
}

/// Checks and times `case` in `dtype` on `device` (both versions timed in `dtype`).
pub fn run_case(case: &Case, device: &Device, dtype: DType, runs: usize) -> Result<Report> {
    let error = parity_error(case, 1, device, dtype)?;
    let inputs = materialize(case, 2, device, dtype)?;
    let differentiable = case.differentiable();
    Ok(Report {
        error,
        fused_ms: millis(case.fused, &inputs, &differentiable, runs)?,
        reference_ms: millis(case.reference, &inputs, &differentiable, runs)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_cases_with_scaled_up_inputs_get_a_wider_16_bit_tolerance() {
        let widened: Vec<(&str, DType)> = edge_cases()
            .iter()
            .flat_map(|case| [DType::F32, DType::BF16, DType::F16].map(|d| (case, d)))
            .filter(|(case, dtype)| case.tolerance(*dtype) != tolerance(*dtype))
            .map(|(case, dtype)| (case.name, dtype))
            .collect();
        assert!(widened.iter().all(|(_, dtype)| *dtype != DType::F32));
        assert!(widened.contains(&("self_attention_softcap_window", DType::BF16)));
        assert!(!widened.iter().any(|(name, _)| *name == "rms_norm"));
    }

    #[test]
    fn every_edge_case_matches_on_the_cpu() {
        // 16-bit on the CPU runs the ops that take it there (the composites where no kernel
        // does), as `bench --ops --modes bf16,fp16` checks them.
        for dtype in [DType::F32, DType::BF16, DType::F16] {
            for case in edge_cases() {
                let error = parity_error(&case, 1, &Device::Cpu, dtype).unwrap();
                println!("{} {dtype:?} {:?}: {error:.2e}", case.name, case.shapes());
                assert!(
                    error < case.tolerance(dtype),
                    "{} {dtype:?}: {error:.2e}",
                    case.name
                );
            }
        }
    }

    #[test]
    fn model_cases_run_and_match_at_small_shapes() {
        let shape = ModelShape {
            hidden: 64,
            heads: 4,
            kv_heads: 2,
            head_size: 16,
            ffn: 160,
            vocab: 96,
        };
        for case in model_cases(&shape, 2, 16) {
            let report = run_case(&case, &Device::Cpu, DType::F32, 1).unwrap();
            assert!(report.error < 1e-4, "{}: {:.2e}", case.name, report.error);
            assert!(report.fused_ms > 0.0 && report.reference_ms > 0.0);
        }
    }

    #[test]
    fn a_wrong_kernel_is_caught() {
        // The check must be able to fail: an op that is off by 1% is reported as such.
        let case = Case {
            name: "swiglu, perturbed",
            fused: |t| crate::glu(&t[0], &t[1], crate::Glu::SwiGlu)? * 1.01,
            reference: |t| crate::reference::glu(&t[0], &t[1], crate::Glu::SwiGlu),
            inputs: vec![Input::Float(vec![4, 8], 1.0), Input::Float(vec![4, 8], 1.0)],
        };
        let error = parity_error(&case, 1, &Device::Cpu, DType::F32).unwrap();
        assert!((error - 0.01).abs() < 1e-3, "{error}");
    }
}
