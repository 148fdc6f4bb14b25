//! AdamW with decoupled weight decay, f32 moments, a decay mask, global-norm clipping and
//! state that saves and loads by parameter name.

use crate::ops::{adamw_step, AdamWUpdate};
use candle_core::{DType, Result, Tensor, Var};
use std::collections::HashMap;

/// Whether a parameter gets weight decay: not norms, biases or embeddings.
pub fn decays(name: &str) -> bool {
    !(name.contains("norm") || name.ends_with(".bias") || name.contains("embed_tokens"))
}

/// AdamW hyper-parameters.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWParams {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
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
}

impl AdamW {
    /// Fresh state (zero moments) for `vars`.
    pub fn new(vars: &[(String, Var)], params: AdamWParams) -> Result<Self> {
        let slots = vars
            .iter()
            .map(|(name, var)| {
                let zeros = Tensor::zeros(var.shape(), DType::F32, var.device())?;
                Ok(Slot {
                    name: name.clone(),
                    var: var.clone(),
                    decay: decays(name),
                    m: zeros.clone(),
                    v: zeros,
                })
            })
            .collect::<Result<_>>()?;
        Ok(Self {
            slots,
            params,
            steps: 0,
        })
    }

    /// Updates applied so far.
    pub fn steps(&self) -> u64 {
        self.steps
    }

    /// One update with learning rate `lr` from `grads` (by parameter name). Parameters with
    /// no gradient are left unchanged.
    pub fn step(&mut self, grads: &HashMap<String, Tensor>, lr: f64) -> Result<()> {
        self.steps += 1;
        let p = self.params;
        let t = self.steps as i32;
        for slot in &mut self.slots {
            let Some(g) = grads.get(&slot.name) else {
                continue;
            };
            // Detached so the moments never hold a gradient's graph across steps.
            let g = g.to_dtype(DType::F32)?.detach();
            let u = AdamWUpdate {
                lr,
                beta1: p.beta1,
                beta2: p.beta2,
                eps: p.eps,
                decay: if slot.decay { lr * p.weight_decay } else { 0.0 },
                bias1: 1.0 - p.beta1.powi(t),
                bias2: 1.0 - p.beta2.powi(t),
            };
            // The fused kernel on CPU f32; the composite below everywhere else.
            let (m, v) = match adamw_step(&slot.var, &slot.m, &slot.v, &g, &u)? {
                Some(moments) => moments,
                None => composite_step(&slot.var, &slot.m, &slot.v, &g, &u)?,
            };
            slot.m = m;
            slot.v = v;
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
        Ok(())
    }
}

/// The reference AdamW update from tensor ops (any device and dtype): sets `param` and returns
/// the new `(m, v)`.
fn composite_step(
    param: &Var,
    m: &Tensor,
    v: &Tensor,
    g: &Tensor,
    u: &AdamWUpdate,
) -> Result<(Tensor, Tensor)> {
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

/// The global L2 norm of all gradients.
pub fn global_norm(grads: &HashMap<String, Tensor>) -> Result<f64> {
    let mut total = 0f64;
    for g in grads.values() {
        total += g
            .to_dtype(DType::F32)?
            .sqr()?
            .sum_all()?
            .to_scalar::<f32>()? as f64;
    }
    Ok(total.sqrt())
}

/// Scales all gradients so their global norm is at most `max_norm`; returns the norm
/// before clipping.
pub fn clip_global_norm(grads: &mut HashMap<String, Tensor>, max_norm: f64) -> Result<f64> {
    let norm = global_norm(grads)?;
    if max_norm > 0.0 && norm > max_norm {
        let scale = max_norm / (norm + 1e-6);
        for g in grads.values_mut() {
            *g = (&*g * scale)?;
        }
    }
    Ok(norm)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn one_step_matches_the_adamw_formula() {
        let dev = Device::Cpu;
        let w = Var::from_slice(&[1.0f32, -2.0], 2, &dev).unwrap();
        let vars = vec![("layer.weight".to_string(), w.clone())];
        let p = AdamWParams {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.1,
        };
        let mut opt = AdamW::new(&vars, p).unwrap();
        let grads = HashMap::from([(
            "layer.weight".to_string(),
            Tensor::new(&[0.5f32, -0.25], &dev).unwrap(),
        )]);
        opt.step(&grads, 0.01).unwrap();
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
    fn fused_cpu_step_matches_the_composite_step() {
        use crate::ops::parity::{relative_error, uniform};
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
        let mut grads = HashMap::from([
            ("a".to_string(), Tensor::new(&[3.0f32], &dev).unwrap()),
            ("b".to_string(), Tensor::new(&[4.0f32], &dev).unwrap()),
        ]);
        let before = clip_global_norm(&mut grads, 1.0).unwrap();
        assert!((before - 5.0).abs() < 1e-9);
        assert!((global_norm(&grads).unwrap() - 1.0).abs() < 1e-5);
    }
}
