//! One projection of a block, and the interface through which an adapter (LoRA, defined in the
//! training layer) adds its update to it without the model knowing what the adapter is.

use crate::weights::{ModelError, Weights};
use candle_core::{DType, Result, Tensor};
use ops::LinearWeight;
use std::sync::Arc;

/// A trainable update attached to a projection from outside the model, as mlx-lm's
/// `LoRALinear.from_base` wraps a layer: the model calls it, the adapter owns its tensors.
pub trait LinearAdapter: std::fmt::Debug + Send + Sync {
    /// The update alone for input `x`, computed in `dtype`.
    fn update(&self, x: &Tensor, dtype: DType) -> Result<Tensor>;

    /// `x @ weight.t()` for a frozen `weight` (dense or 4-bit, computed in `dtype`) plus the
    /// update, where a fused kernel can compute both at once.
    fn forward_with_frozen(
        &self,
        x: &Tensor,
        weight: &LinearWeight,
        dtype: DType,
    ) -> Result<Tensor>;

    /// Turns the adapter's dropout on with masks drawn from `seed`, or off with `None`. The
    /// same seed must replay the same masks (checkpointed recomputation relies on it).
    fn set_dropout_seed(&self, seed: Option<u64>);

    /// Where the update is `scale · dropout(x) @ a.t() @ b.t()`: its factors `a` `[r, in]`
    /// and `b` `[out, r]` (whose gradients train it), `scale` and this step's dropout mask
    /// (`None` while dropout is off). What lets the model compute the updates of projections
    /// it stacks as one product ([`ops::stacked_lora_linear`]); `None` (the default) keeps
    /// each update its own.
    fn low_rank(&self) -> Result<Option<LowRank<'_>>> {
        Ok(None)
    }
}

/// An update `scale · dropout(x) @ a.t() @ b.t()` ([`LinearAdapter::low_rank`]).
#[derive(Debug, Clone, Copy)]
pub struct LowRank<'a> {
    /// `[r, in]`.
    pub a: &'a Tensor,
    /// `[out, r]`.
    pub b: &'a Tensor,
    /// The factor the product is scaled by.
    pub scale: f64,
    /// This step's dropout mask of the input, if any.
    pub dropout: Option<ops::Dropout>,
}

/// `x` through the frozen `stack` (the weights of `parts`, stacked by rows) and the parts'
/// low-rank updates as one product ([`ops::stacked_lora_linear`]), where the stack has nothing
/// else to it and every part has such an update, one scale for all, no bias, and a dropout
/// mask each or none: `[.., Σ out]`, the parts' outputs in order. `None` elsewhere (each part
/// then computes on its own).
pub(crate) fn stacked_low_rank(
    stack: Option<&Linear>,
    parts: &[&Linear],
    x: &Tensor,
) -> Result<Option<Tensor>> {
    let Some(stack) = stack.filter(|s| s.adapter.is_none() && s.bias.is_none() && !s.trainable)
    else {
        return Ok(None);
    };
    let mut updates = Vec::with_capacity(parts.len());
    for part in parts {
        let adapter = part.adapter.as_ref().filter(|_| part.bias.is_none());
        match adapter.map(|a| a.low_rank()).transpose()?.flatten() {
            Some(update) => updates.push(update),
            None => return Ok(None),
        }
    }
    let scale = updates.first().map_or(1.0, |u| u.scale);
    if updates.iter().any(|u| u.scale != scale) {
        return Ok(None);
    }
    let dropouts: Option<Vec<ops::Dropout>> = updates.iter().map(|u| u.dropout).collect();
    if dropouts.is_none() && updates.iter().any(|u| u.dropout.is_some()) {
        return Ok(None);
    }
    let factors: Vec<(&Tensor, &Tensor)> = updates.iter().map(|u| (u.a, u.b)).collect();
    ops::stacked_lora_linear(x, &stack.weight, &factors, scale, dropouts.as_deref()).map(Some)
}

/// A projection `x @ weight.t() + bias`, plus an adapter's update when one is attached.
/// Weights that are not trainable go through [`ops::frozen_linear`], so no gradient is
/// computed for them; only those can be 4-bit.
#[derive(Debug, Clone)]
pub struct Linear {
    /// The weight, `out × in`, dense or 4-bit.
    pub weight: LinearWeight,
    /// The bias, `out`, where the projection has one.
    pub bias: Option<Tensor>,
    /// An update added from outside the model (a LoRA adapter), if one is attached.
    pub adapter: Option<Arc<dyn LinearAdapter>>,
    trainable: bool,
}

impl Linear {
    pub(crate) fn load(
        w: &Weights,
        name: &str,
        out: usize,
        inp: usize,
        bias: bool,
    ) -> std::result::Result<Self, ModelError> {
        let weight = w.linear(&format!("{name}.weight"), &[out, inp])?;
        let bias = if bias {
            Some(w.get(&format!("{name}.bias"), &[out])?)
        } else {
            None
        };
        Ok(Self {
            trainable: weight.as_dense().is_some_and(Tensor::is_variable),
            weight,
            bias,
            adapter: None,
        })
    }

    /// One projection computing `parts` side by side (their outputs concatenated along the last
    /// dimension), each part's weight and bias becoming a view into it so that nothing is
    /// stored twice. `None` (and nothing changed) when a part trains, has an adapter or is
    /// 4-bit.
    pub(crate) fn stack(parts: &mut [&mut Linear]) -> Result<Option<Linear>> {
        let with_bias = parts.iter().filter(|p| p.bias.is_some()).count();
        let weights: Option<Vec<&Tensor>> = parts.iter().map(|p| p.weight.as_dense()).collect();
        let Some(weights) = weights else {
            return Ok(None);
        };
        if parts.iter().any(|p| p.trainable || p.adapter.is_some())
            || (with_bias != 0 && with_bias != parts.len())
        {
            return Ok(None);
        }
        let weight = Tensor::cat(&weights, 0)?;
        let biases: Vec<&Tensor> = parts.iter().filter_map(|p| p.bias.as_ref()).collect();
        let bias = match biases.is_empty() {
            true => None,
            false => Some(Tensor::cat(&biases, 0)?),
        };
        let mut offset = 0;
        for part in parts.iter_mut() {
            let rows = part.weight.dims2()?.0;
            part.weight = LinearWeight::Dense(weight.narrow(0, offset, rows)?);
            if let (Some(b), Some(all)) = (&mut part.bias, &bias) {
                *b = all.narrow(0, offset, rows)?;
            }
            offset += rows;
        }
        Ok(Some(Linear {
            weight: LinearWeight::Dense(weight),
            bias,
            adapter: None,
            trainable: false,
        }))
    }

    /// The parts of a weight that stacks projections by rows (`rows` of each, first rows
    /// first, no bias), as views into it that train with it when it trains.
    pub(crate) fn split(&self, rows: &[usize]) -> Result<Vec<Linear>> {
        let mut offset = 0;
        rows.iter()
            .map(|&n| {
                let weight = self.weight.narrow_rows(offset, n)?;
                offset += n;
                Ok(Linear {
                    weight,
                    bias: None,
                    adapter: None,
                    trainable: self.trainable,
                })
            })
            .collect()
    }

    /// The weight of a trained projection with nothing else to it (no adapter, no bias): what
    /// [`ops::master_linear`] alone computes.
    pub(crate) fn bare_master(&self) -> Option<&Tensor> {
        let bare = self.trainable && self.adapter.is_none() && self.bias.is_none();
        self.weight.as_dense().filter(|_| bare)
    }

    /// The weight of a frozen dense projection with nothing else to it (no adapter, no
    /// bias): what a decode step's fused kernels take in its place.
    pub(crate) fn plain_weight(&self) -> Option<&Tensor> {
        let plain = !self.trainable && self.adapter.is_none() && self.bias.is_none();
        self.weight.as_dense().filter(|_| plain)
    }

    /// `[out, in]`.
    pub fn dims(&self) -> Result<(usize, usize)> {
        self.weight.dims2()
    }

    /// The weight as stored (a 4-bit one expanded to the dtype it was quantized from).
    pub fn stored_weight(&self) -> Result<Tensor> {
        self.weight.dense(self.weight.dtype())
    }

    /// Applies the projection (and the adapter's update, if any), computing in `dtype`.
    pub fn forward(&self, x: &Tensor, dtype: DType) -> Result<Tensor> {
        let y = match (
            &self.adapter,
            self.weight.as_dense().filter(|_| self.trainable),
        ) {
            (None, Some(master)) => ops::master_linear(x, master)?,
            (Some(adapter), Some(master)) => {
                (ops::master_linear(x, master)? + adapter.update(x, dtype)?)?
            }
            (Some(adapter), None) => adapter.forward_with_frozen(x, &self.weight, dtype)?,
            (None, None) => ops::frozen_linear(x, &self.weight)?,
        };
        match &self.bias {
            Some(b) => y.broadcast_add(&ops::cast(b, dtype)?),
            None => Ok(y),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ops::parity::{relative_error, uniform};

    /// `scale · dropout(x) @ a.t() @ b.t()`, offered for stacking unless it `declines`.
    #[derive(Debug)]
    struct Update {
        a: Tensor,
        b: Tensor,
        scale: f64,
        dropout: Option<ops::Dropout>,
        declines: bool,
    }

    impl LinearAdapter for Update {
        fn update(&self, x: &Tensor, _: DType) -> Result<Tensor> {
            let x = match self.dropout {
                Some(d) => (x * d.mask(x.dims(), x.device())?)?,
                None => x.clone(),
            };
            let xa = x.broadcast_matmul(&self.a.t()?)?;
            xa.broadcast_matmul(&self.b.t()?)? * self.scale
        }

        fn forward_with_frozen(
            &self,
            x: &Tensor,
            weight: &LinearWeight,
            dtype: DType,
        ) -> Result<Tensor> {
            ops::frozen_linear(x, weight)? + self.update(x, dtype)?
        }

        fn set_dropout_seed(&self, _: Option<u64>) {}

        fn low_rank(&self) -> Result<Option<LowRank<'_>>> {
            Ok((!self.declines).then_some(LowRank {
                a: &self.a,
                b: &self.b,
                scale: self.scale,
                dropout: self.dropout,
            }))
        }
    }

    fn frozen(rows: usize, seed: u64) -> Linear {
        Linear {
            weight: LinearWeight::Dense(uniform(&[rows, 8], seed)),
            bias: None,
            adapter: None,
            trainable: false,
        }
    }

    /// An update of `scale` (declining to be stacked where `declines`), with a dropout mask
    /// where `dropout`.
    fn adapt(part: &mut Linear, seed: u64, scale: f64, declines: bool, dropout: bool) {
        let rows = part.dims().unwrap().0;
        part.adapter = Some(Arc::new(Update {
            a: uniform(&[4, 8], seed),
            b: uniform(&[rows, 4], seed + 1),
            scale,
            dropout: dropout.then(|| ops::Dropout::new(0.25, seed).unwrap()),
            declines,
        }));
    }

    #[test]
    fn a_stack_whose_parts_all_have_low_rank_updates_computes_them_as_one_product() {
        // q, k and v of 6, 2 and 2 rows, stacked before their adapters are attached.
        let (mut q, mut k, mut v) = (frozen(6, 1), frozen(2, 2), frozen(2, 3));
        let stack = Linear::stack(&mut [&mut q, &mut k, &mut v]).unwrap();
        let x = uniform(&[2, 3, 8], 4);
        let each = |parts: [&Linear; 3]| {
            let outputs = parts.map(|p| p.forward(&x, DType::F32).unwrap());
            Tensor::cat(&outputs, 2).unwrap()
        };
        // Without dropout, and with a mask of its own for each part.
        for dropout in [false, true] {
            for (i, part) in [&mut q, &mut k, &mut v].into_iter().enumerate() {
                adapt(part, 10 + 2 * i as u64, 0.5, false, dropout);
            }
            let stacked = stacked_low_rank(stack.as_ref(), &[&q, &k, &v], &x).unwrap();
            let error = relative_error(&stacked.unwrap(), &each([&q, &k, &v]));
            assert!(error < 1e-5, "{error:.2e}");
        }

        let alone = |v: &Linear| {
            stacked_low_rank(stack.as_ref(), &[&q, &k, v], &x)
                .unwrap()
                .is_none()
        };
        // A part whose update declines, scales otherwise, or alone has no mask leaves each
        // part to itself.
        adapt(&mut v, 20, 0.5, true, true);
        assert!(alone(&v));
        adapt(&mut v, 20, 0.25, false, true);
        assert!(alone(&v));
        adapt(&mut v, 20, 0.5, false, false);
        assert!(alone(&v));
        // So does a part without one.
        v.adapter = None;
        assert!(alone(&v));
    }
}
