//! AdamW with decoupled weight decay, f32 moments, a decay mask, global-norm clipping and
//! state that saves and loads by parameter name.

use crate::compute_copies::KeptCopies;
use candle_core::{DType, Device, Result, Tensor, Var};
use model::Llama;
use ops::adamw::{
    copy_supported, in_place_supported, prepare_in_place, sum_of_squares, InPlaceParam,
    PreparedUpdate,
};
use ops::{adamw_step, AdamWUpdate};
use std::collections::HashMap;

/// Whether a parameter gets weight decay: not norms, biases or embeddings.
pub fn decays(name: &str) -> bool {
    !(name.contains("norm") || name.ends_with(".bias") || name.contains("embed_tokens"))
}

/// AdamW hyper-parameters.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWParams {
    /// Decay of the first-moment (mean) estimate, in [0, 1).
    pub beta1: f64,
    /// Decay of the second-moment (uncentred variance) estimate, in [0, 1).
    pub beta2: f64,
    /// Added to the square root of the second moment in the update's denominator.
    pub eps: f64,
    /// Decoupled weight decay, scaled by the learning rate; applied only where [`decays`] says.
    pub weight_decay: f64,
}

struct Slot {
    name: String,
    var: Var,
    decay: bool,
    m: Tensor,
    v: Tensor,
}

/// The optimizer over a fixed, named set of parameters.
pub struct AdamW {
    slots: Vec<Slot>,
    params: AdamWParams,
    steps: u64,
    /// Compute-dtype copies of the masters, written with each update, where kept.
    copies: Option<KeptCopies>,
}

/// An update [`AdamW::prepare`] prepared, waiting for its gradient scale.
pub struct PreparedStep {
    lr: f64,
    /// The optimizer's step count when prepared.
    after: u64,
    /// The slots the multi-tensor kernel updates in place.
    in_place: Vec<usize>,
    /// The other slots with a gradient: their gradients (f32) and decays.
    others: Vec<(usize, Tensor, f64)>,
    update: Option<PreparedUpdate>,
}

impl AdamW {
    /// Fresh state (zero moments) for `vars`.
    pub fn new(vars: &[(String, Var)], params: AdamWParams) -> Result<Self> {
        let slots = vars
            .iter()
            .map(|(name, var)| {
                // Two buffers: the CUDA update writes the moments in place.
                let zeros = || Tensor::zeros(var.shape(), DType::F32, var.device());
                Ok(Slot {
                    name: name.clone(),
                    var: var.clone(),
                    decay: decays(name),
                    m: zeros()?,
                    v: zeros()?,
                })
            })
            .collect::<Result<_>>()?;
        Ok(Self {
            slots,
            params,
            steps: 0,
            copies: None,
        })
    }

    /// From the next update on, writes a copy in `dtype` of each f32 master as it updates it
    /// (see [`crate::compute_copies`]), the pairs in `stacked` (a stacked projection's two
    /// masters) into one buffer; [`AdamW::compute_copies`] hands them to the next step. The
    /// masters must then change only through [`AdamW::step`] and [`AdamW::load_state`].
    pub fn keep_compute_copies(&mut self, dtype: DType, stacked: &[Vec<Tensor>]) -> Result<()> {
        self.copies = Some(KeptCopies::new(&self.vars(), dtype, stacked)?);
        Ok(())
    }

    /// The copies the last update wrote, for the next step's passes
    /// ([`crate::gradients::accumulate`]); `None` when none are kept.
    pub fn compute_copies(&self) -> Result<Option<ops::ComputeCopies>> {
        let vars = self.vars();
        self.copies.as_ref().map(|c| c.published(&vars)).transpose()
    }

    /// The parameters, in slot order (the order [`KeptCopies`] indexes them in).
    fn vars(&self) -> Vec<&Var> {
        self.slots.iter().map(|s| &s.var).collect()
    }

    /// Updates applied so far.
    pub fn steps(&self) -> u64 {
        self.steps
    }

    /// One update with learning rate `lr` from `grads` (by parameter name), each multiplied by
    /// `grad_scale` first (see [`clip_scale`]). Parameters with no gradient are left unchanged.
    pub fn step(
        &mut self,
        grads: &HashMap<String, Tensor>,
        lr: f64,
        grad_scale: f64,
    ) -> Result<()> {
        let prepared = self.prepare(grads, lr)?;
        self.step_prepared(prepared, grad_scale)
    }

    /// The work of [`AdamW::step`] that does not wait for the gradient scale, done ahead: which
    /// parameters the multi-tensor CUDA kernel updates in place, and that kernel's table of
    /// their buffers, built and uploaded. A training step prepares its update before it reads
    /// the gradient norm, so that the device, done with the step's passes, waits for nothing
    /// but that read before the update runs (on an H100 the 1B shape's table took 0.26 ms a
    /// step after the read). The update is applied by [`AdamW::step_prepared`], before any
    /// other change to the optimizer.
    pub fn prepare(&self, grads: &HashMap<String, Tensor>, lr: f64) -> Result<PreparedStep> {
        let mut in_place = Vec::new();
        let mut others = Vec::new();
        for (i, slot) in self.slots.iter().enumerate() {
            let Some(g) = grads.get(&slot.name) else {
                continue;
            };
            // Detached so the moments never hold a gradient's graph across steps.
            let g = g.to_dtype(DType::F32)?.detach();
            let decay = match slot.decay {
                true => lr * self.params.weight_decay,
                false => 0.0,
            };
            let copy = self.copies.as_ref().and_then(|c| c.buffer(i));
            match in_place_supported(&slot.var, &slot.m, &slot.v, &g)
                && copy.is_none_or(|c| copy_supported(&slot.var, c))
            {
                true => in_place.push((i, g, decay)),
                false => others.push((i, g, decay)),
            }
        }
        let params: Vec<InPlaceParam> = in_place
            .iter()
            .map(|(i, g, decay)| InPlaceParam {
                param: &self.slots[*i].var,
                m: &self.slots[*i].m,
                v: &self.slots[*i].v,
                grad: g,
                decay: *decay,
                copy: self.copies.as_ref().and_then(|c| c.buffer(*i)),
            })
            .collect();
        let update = prepare_in_place(&params)?;
        Ok(PreparedStep {
            lr,
            after: self.steps,
            in_place: in_place.into_iter().map(|(i, ..)| i).collect(),
            others,
            update,
        })
    }

    /// Applies the update `prepared` ([`AdamW::prepare`]), each gradient multiplied by
    /// `grad_scale` first (see [`clip_scale`]). An error, changing nothing, if the optimizer
    /// has stepped or loaded state since.
    pub fn step_prepared(&mut self, prepared: PreparedStep, grad_scale: f64) -> Result<()> {
        if prepared.after != self.steps {
            candle_core::bail!(
                "adamw: an update prepared after step {} applied after step {}",
                prepared.after,
                self.steps
            );
        }
        self.steps += 1;
        let p = self.params;
        let t = self.steps as i32;
        let shared = AdamWUpdate {
            lr: prepared.lr,
            beta1: p.beta1,
            beta2: p.beta2,
            eps: p.eps,
            decay: 0.0,
            bias1: 1.0 - p.beta1.powi(t),
            bias2: 1.0 - p.beta2.powi(t),
            grad_scale,
        };
        for (i, g, decay) in &prepared.others {
            let slot = &mut self.slots[*i];
            let u = AdamWUpdate {
                decay: *decay,
                ..shared
            };
            // The fused kernel on CPU f32; the composite below everywhere else.
            let (m, v) = match adamw_step(&slot.var, &slot.m, &slot.v, g, &u)? {
                Some(moments) => moments,
                None => composite_step(&slot.var, &slot.m, &slot.v, g, &u)?,
            };
            slot.m = m;
            slot.v = v;
            if let Some(copies) = &mut self.copies {
                copies.updated(*i, &slot.var)?;
            }
        }
        if let Some(update) = &prepared.update {
            update.run(&shared)?;
        }
        if let Some(copies) = &mut self.copies {
            prepared
                .in_place
                .iter()
                .for_each(|i| copies.written_in_place(*i));
        }
        Ok(())
    }

    /// The moments as named tensors (`m.NAME`, `v.NAME`) for a checkpoint.
    pub fn state(&self) -> Vec<(String, Tensor)> {
        self.slots
            .iter()
            .flat_map(|s| {
                [
                    (format!("m.{}", s.name), s.m.clone()),
                    (format!("v.{}", s.name), s.v.clone()),
                ]
            })
            .collect()
    }

    /// Restores moments saved by [`AdamW::state`] after `steps` updates. Returns the name of
    /// the first parameter whose moments are missing or mis-shaped.
    pub fn load_state(
        &mut self,
        tensors: &HashMap<String, Tensor>,
        steps: u64,
    ) -> std::result::Result<(), String> {
        for slot in &mut self.slots {
            let get = |prefix: &str| {
                tensors
                    .get(&format!("{prefix}.{}", slot.name))
                    .filter(|t| t.shape() == slot.var.shape())
                    .cloned()
                    .ok_or_else(|| format!("{prefix}.{}", slot.name))
            };
            slot.m = get("m")?;
            slot.v = get("v")?;
        }
        self.steps = steps;
        // The masters were restored beside the moments.
        if let Some(copies) = &mut self.copies {
            copies.forget();
        }
        Ok(())
    }
}

/// Has `optimizer` keep compute-dtype copies of `model`'s masters where that removes work for
/// little memory: in mixed precision (f32 masters, 16-bit compute), without recomputation.
/// Every weight's cast is alive at the end of a plain forward pass anyway, so only the update,
/// where the casts used to be gone, holds them beside the gradients (the 1b shape's peak rose
/// 7% on an H200, for 1.3% more tokens/s); with recomputation only a block's casts are alive
/// at a time, and copies of all of them would raise the peak throughout.
pub fn keep_model_copies(optimizer: &mut AdamW, model: &Llama, recompute: bool) -> Result<()> {
    if recompute || model.dtype() == DType::F32 {
        return Ok(());
    }
    optimizer.keep_compute_copies(model.dtype(), &model.stacked_masters())
}

/// The reference AdamW update from tensor ops (any device and dtype): sets `param` and returns
/// the new `(m, v)`.
pub fn composite_step(
    param: &Var,
    m: &Tensor,
    v: &Tensor,
    g: &Tensor,
    u: &AdamWUpdate,
) -> Result<(Tensor, Tensor)> {
    let g = &(g * u.grad_scale)?;
    let m = ((m * u.beta1)? + (g * (1.0 - u.beta1))?)?;
    let v = ((v * u.beta2)? + (g.sqr()? * (1.0 - u.beta2))?)?;
    let m_hat = (&m / u.bias1)?;
    let denom = ((&v / u.bias2)?.sqrt()? + u.eps)?;
    let w = param.as_tensor().to_dtype(DType::F32)?;
    let decayed = if u.decay > 0.0 {
        (&w * (1.0 - u.decay))?
    } else {
        w
    };
    let updated = (decayed - (m_hat / denom)? * u.lr)?;
    param.set(&updated.to_dtype(param.dtype())?)?;
    Ok((m, v))
}

/// The global L2 norm of all gradients: one kernel and one device synchronization on CUDA, a
/// rayon pass per gradient on the CPU (f32), one synchronization elsewhere.
pub fn global_norm(grads: &HashMap<String, Tensor>) -> Result<f64> {
    // By name, so the sum's rounding (and through clipping the run) does not depend on the
    // map's iteration order.
    let mut named: Vec<(&String, &Tensor)> = grads.iter().collect();
    named.sort_by_key(|(name, _)| *name);
    let tensors: Vec<&Tensor> = named.into_iter().map(|(_, g)| g).collect();
    if let Some(total) = sum_of_squares(&tensors)? {
        return Ok(total.sqrt());
    }
    if tensors.is_empty() {
        return Ok(0.0);
    }
    let sums = tensors
        .iter()
        .map(|g| g.to_dtype(DType::F32)?.sqr()?.sum_all())
        .collect::<Result<Vec<_>>>()?;
    let total = Tensor::stack(&sums, 0)?
        .to_dtype(DType::F64)?
        .sum_all()?
        .to_scalar::<f64>()?;
    Ok(total.sqrt())
}

/// The factor that brings gradients of global norm `norm` down to at most `max_norm` (1 when
/// they are within it, or when `max_norm` is 0: no clipping).
pub fn clip_scale(norm: f64, max_norm: f64) -> f64 {
    if max_norm > 0.0 && norm > max_norm {
        max_norm / (norm + 1e-6)
    } else {
        1.0
    }
}

/// The AdamW paths of the optimizer on `device` (fused CPU or multi-tensor CUDA kernel, plus
/// the fused gradient norm) against the composite update, over three steps on
/// parameters of awkward sizes (one spans several kernel chunks). Returns the worst relative
/// error of weights, moments and norm, and of the bf16 copies the fused optimizer keeps (two
/// of them stacked) against the casts of its weights, which must be equal.
pub fn adamw_error(device: &Device) -> Result<f32> {
    use ops::check::{relative_error, uniform};
    let sizes = [vec![3], vec![37, 129], vec![70_001], vec![11, 129]];
    let params = AdamWParams {
        beta1: 0.9,
        beta2: 0.95,
        eps: 1e-8,
        weight_decay: 0.1,
    };
    let named = |i: usize| format!("layers.{i}.weight");
    let fused_vars = sizes
        .iter()
        .enumerate()
        .map(|(i, s)| {
            Ok((
                named(i),
                Var::from_tensor(&uniform(s, i as u64)?.to_device(device)?)?,
            ))
        })
        .collect::<Result<Vec<_>>>()?;
    let reference_vars = fused_vars
        .iter()
        .map(|(n, v)| Ok((n.clone(), Var::from_tensor(&v.as_tensor().copy()?)?)))
        .collect::<Result<Vec<_>>>()?;
    let mut optimizer = AdamW::new(&fused_vars, params)?;
    let stacked = vec![
        fused_vars[1].1.as_tensor().clone(),
        fused_vars[3].1.as_tensor().clone(),
    ];
    optimizer.keep_compute_copies(DType::BF16, std::slice::from_ref(&stacked))?;
    let mut moments: Vec<(Tensor, Tensor)> = reference_vars
        .iter()
        .map(|(_, v)| Ok((v.zeros_like()?, v.zeros_like()?)))
        .collect::<Result<_>>()?;
    let mut worst = 0f32;
    for t in 1..=3 {
        let grads: HashMap<String, Tensor> = sizes
            .iter()
            .enumerate()
            .map(|(i, s)| Ok((named(i), uniform(s, 10 * t + i as u64)?.to_device(device)?)))
            .collect::<Result<_>>()?;
        let norm = global_norm(&grads)?;
        let want: f64 = grads
            .values()
            .map(|g| Ok(g.sqr()?.sum_all()?.to_scalar::<f32>()? as f64))
            .sum::<Result<f64>>()?
            .sqrt();
        worst = worst.max(((norm - want).abs() / want) as f32);
        let scale = 0.5;
        optimizer.step(&grads, 1e-2, scale)?;
        for (i, (name, var)) in reference_vars.iter().enumerate() {
            let u = AdamWUpdate {
                lr: 1e-2,
                beta1: params.beta1,
                beta2: params.beta2,
                eps: params.eps,
                decay: 1e-2 * params.weight_decay,
                bias1: 1.0 - params.beta1.powi(t as i32),
                bias2: 1.0 - params.beta2.powi(t as i32),
                grad_scale: scale,
            };
            let (m, v) = &moments[i];
            moments[i] = composite_step(var, m, v, &grads[name], &u)?;
        }
    }
    // Each cast in a step opened with the copies is the copy.
    let copies = optimizer.compute_copies()?;
    let kept = copies.as_ref().map_or(0, ops::ComputeCopies::len);
    if kept != sizes.len() + 1 {
        candle_core::bail!("adamw: {kept} copies kept, not one a weight and the stack");
    }
    let (copied, stack) = ops::training_step(copies.as_ref(), || {
        let copied = fused_vars
            .iter()
            .map(|(_, v)| ops::cast(v.as_tensor(), DType::BF16))
            .collect::<Result<Vec<_>>>()?;
        let stack = ops::stacked_cast(&[&stacked[0], &stacked[1]], DType::BF16)?;
        Ok::<_, candle_core::Error>((copied, stack))
    })?;
    let casts = fused_vars
        .iter()
        .map(|(_, v)| v.as_tensor().to_dtype(DType::BF16))
        .collect::<Result<Vec<_>>>()?;
    for (copy, cast) in copied.iter().zip(&casts) {
        worst = worst.max(relative_error(copy, cast)?);
    }
    let stacked_casts = Tensor::cat(&[&casts[1], &casts[3]], 0)?;
    worst = worst.max(relative_error(&stack, &stacked_casts)?);
    let state: HashMap<String, Tensor> = optimizer.state().into_iter().collect();
    for (i, ((name, fused), (_, reference))) in fused_vars.iter().zip(&reference_vars).enumerate() {
        worst = worst.max(relative_error(fused.as_tensor(), reference.as_tensor())?);
        worst = worst.max(relative_error(&state[&format!("m.{name}")], &moments[i].0)?);
        worst = worst.max(relative_error(&state[&format!("v.{name}")], &moments[i].1)?);
    }
    Ok(worst)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn optimizer_paths_match_the_composite_update() {
        let error = adamw_error(&Device::Cpu).unwrap();
        assert!(error < 1e-5, "{error:.2e}");
    }
    use candle_core::Device;

    /// β1 0.9, eps 1e-8 and the given β2 and weight decay.
    fn params(beta2: f64, weight_decay: f64) -> AdamWParams {
        AdamWParams {
            beta1: 0.9,
            beta2,
            eps: 1e-8,
            weight_decay,
        }
    }

    #[test]
    fn one_step_matches_the_adamw_formula() {
        let dev = Device::Cpu;
        let w = Var::from_slice(&[1.0f32, -2.0], 2, &dev).unwrap();
        let vars = vec![("layer.weight".to_string(), w.clone())];
        let p = params(0.999, 0.1);
        let mut opt = AdamW::new(&vars, p).unwrap();
        let grads = HashMap::from([(
            "layer.weight".to_string(),
            Tensor::new(&[0.5f32, -0.25], &dev).unwrap(),
        )]);
        opt.step(&grads, 0.01, 1.0).unwrap();
        // First step: m_hat = g, v_hat = g^2, so the update is lr * sign(g) (up to eps).
        let got = w.to_vec1::<f32>().unwrap();
        let want = [1.0 * (1.0 - 0.001) - 0.01, -2.0 * (1.0 - 0.001) + 0.01];
        for (g, w) in got.iter().zip(want) {
            assert!((g - w).abs() < 1e-6, "{g} vs {w}");
        }
        assert!(!decays("model.norm.weight") && !decays("model.embed_tokens.weight"));
        assert!(decays("model.layers.0.mlp.up_proj.weight"));
    }

    #[test]
    fn a_prepared_update_applies_as_a_step_and_only_before_the_next() {
        let dev = Device::Cpu;
        let p = params(0.999, 0.1);
        let fresh = || {
            let w = Var::from_slice(&[1.0f32, -2.0, 0.5], 3, &dev).unwrap();
            let opt = AdamW::new(&[("layer.weight".to_string(), w.clone())], p).unwrap();
            (w, opt)
        };
        let grads = HashMap::from([(
            "layer.weight".to_string(),
            Tensor::new(&[0.5f32, -0.25, 2.0], &dev).unwrap(),
        )]);
        let (stepped, mut a) = fresh();
        a.step(&grads, 0.01, 0.5).unwrap();
        let (prepared, mut b) = fresh();
        let update = b.prepare(&grads, 0.01).unwrap();
        // Nothing changes until the update is applied.
        assert_eq!(prepared.to_vec1::<f32>().unwrap(), [1.0, -2.0, 0.5]);
        b.step_prepared(update, 0.5).unwrap();
        assert_eq!(
            prepared.to_vec1::<f32>().unwrap(),
            stepped.to_vec1::<f32>().unwrap()
        );
        assert_eq!(b.steps(), 1);
        // One prepared before another step is refused, and changes nothing.
        let stale = b.prepare(&grads, 0.01).unwrap();
        b.step(&grads, 0.01, 1.0).unwrap();
        let before = prepared.to_vec1::<f32>().unwrap();
        let err = b.step_prepared(stale, 1.0).unwrap_err().to_string();
        assert!(
            err.contains("prepared after step 1 applied after step 2"),
            "{err}"
        );
        assert_eq!(prepared.to_vec1::<f32>().unwrap(), before);
        assert_eq!(b.steps(), 2);
    }

    #[test]
    fn fused_cpu_step_matches_the_composite_step() {
        use ops::parity::{relative_error, uniform};
        let init = uniform(&[37, 129], 1);
        let (fused, reference) = (
            Var::from_tensor(&init).unwrap(),
            Var::from_tensor(&init).unwrap(),
        );
        let zeros = Tensor::zeros(init.shape(), DType::F32, &Device::Cpu).unwrap();
        let (mut fm, mut fv) = (zeros.clone(), zeros.clone());
        let (mut rm, mut rv) = (zeros.clone(), zeros);
        for t in 1..=3 {
            let g = uniform(&[37, 129], 10 + t as u64);
            let u = AdamWUpdate {
                lr: 1e-2,
                beta1: 0.9,
                beta2: 0.95,
                eps: 1e-8,
                decay: 1e-3,
                bias1: 1.0 - 0.9f64.powi(t),
                bias2: 1.0 - 0.95f64.powi(t),
                grad_scale: 0.5,
            };
            (fm, fv) = adamw_step(&fused, &fm, &fv, &g, &u).unwrap().unwrap();
            (rm, rv) = composite_step(&reference, &rm, &rv, &g, &u).unwrap();
        }
        let errors = [
            relative_error(fused.as_tensor(), reference.as_tensor()),
            relative_error(&fm, &rm),
            relative_error(&fv, &rv),
        ];
        let [w, m, v] = errors;
        println!(
            "adamw f32 [37, 129], 3 steps: max relative error w {w:.2e}, m {m:.2e}, v {v:.2e}"
        );
        assert!(errors.iter().all(|&e| e < 1e-6), "{errors:?}");
    }

    #[test]
    fn clipping_bounds_the_norm() {
        let dev = Device::Cpu;
        let grads = HashMap::from([
            ("a".to_string(), Tensor::new(&[3.0f32], &dev).unwrap()),
            ("b".to_string(), Tensor::new(&[4.0f32, 0.0], &dev).unwrap()),
        ]);
        let norm = global_norm(&grads).unwrap();
        assert!((norm - 5.0).abs() < 1e-6);
        assert!((clip_scale(norm, 1.0) * norm - 1.0).abs() < 1e-5);
        assert_eq!(clip_scale(norm, 10.0), 1.0);
        assert_eq!(clip_scale(norm, 0.0), 1.0);
    }

    #[test]
    fn gradient_scale_equals_scaling_the_gradient() {
        // Clipping is applied inside the update: scale 0.5 on g equals an unscaled step on g/2.
        let dev = Device::Cpu;
        let p = params(0.99, 0.0);
        let g = Tensor::new(&[0.4f32, -1.0, 3.0], &dev).unwrap();
        let run = |g: &Tensor, scale: f64| {
            let w = Var::from_slice(&[1.0f32, 2.0, 3.0], 3, &dev).unwrap();
            let mut opt = AdamW::new(&[("w".to_string(), w.clone())], p).unwrap();
            for _ in 0..3 {
                let grads = HashMap::from([("w".to_string(), g.clone())]);
                opt.step(&grads, 0.1, scale).unwrap();
            }
            w.to_vec1::<f32>().unwrap()
        };
        let scaled = run(&g, 0.5);
        let halved = run(&(&g * 0.5).unwrap(), 1.0);
        for (a, b) in scaled.iter().zip(&halved) {
            assert!((a - b).abs() < 1e-6, "{scaled:?} vs {halved:?}");
        }
    }
}
