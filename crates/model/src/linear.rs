//! One projection of a block, and the interface through which an adapter (LoRA, defined in the
//! training layer) adds its update to it without the model knowing what the adapter is.

use crate::weights::{ModelError, Weights};
use candle_core::{DType, Result, Tensor};
use std::sync::Arc;

/// A trainable update attached to a projection from outside the model, as mlx-lm's
/// `LoRALinear.from_base` wraps a layer: the model calls it, the adapter owns its tensors.
pub trait LinearAdapter: std::fmt::Debug + Send + Sync {
    /// The update alone for input `x`, computed in `dtype`.
    fn update(&self, x: &Tensor, dtype: DType) -> Result<Tensor>;

    /// `x @ weight.t()` for a frozen `weight` (already in `dtype`) plus the update, where a
    /// fused kernel can compute both at once.
    fn forward_with_frozen(&self, x: &Tensor, weight: &Tensor, dtype: DType) -> Result<Tensor>;

    /// Turns the adapter's dropout on with masks drawn from `seed`, or off with `None`. The
    /// same seed must replay the same masks (checkpointed recomputation relies on it).
    fn set_dropout_seed(&self, seed: Option<u64>);
}

/// A projection `x @ weight.t() + bias`, plus an adapter's update when one is attached.
/// Weights that are not trainable go through [`ops::frozen_linear`], so no gradient is
/// computed for them.
#[derive(Debug, Clone)]
pub struct Linear {
    pub weight: Tensor,
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
        let weight = w.get(&format!("{name}.weight"), &[out, inp])?;
        let bias = if bias {
            Some(w.get(&format!("{name}.bias"), &[out])?)
        } else {
            None
        };
        Ok(Self {
            trainable: weight.is_variable(),
            weight,
            bias,
            adapter: None,
        })
    }

    /// One projection computing `parts` side by side (their outputs concatenated along the last
    /// dimension), each part's weight and bias becoming a view into it so that nothing is
    /// stored twice. `None` (and nothing changed) when a part trains or has an adapter.
    pub(crate) fn stack(parts: &mut [&mut Linear]) -> Result<Option<Linear>> {
        let with_bias = parts.iter().filter(|p| p.bias.is_some()).count();
        if parts.iter().any(|p| p.trainable || p.adapter.is_some())
            || (with_bias != 0 && with_bias != parts.len())
        {
            return Ok(None);
        }
        let weights: Vec<&Tensor> = parts.iter().map(|p| &p.weight).collect();
        let weight = Tensor::cat(&weights, 0)?;
        let biases: Vec<&Tensor> = parts.iter().filter_map(|p| p.bias.as_ref()).collect();
        let bias = match biases.is_empty() {
            true => None,
            false => Some(Tensor::cat(&biases, 0)?),
        };
        let mut offset = 0;
        for part in parts.iter_mut() {
            let rows = part.weight.dim(0)?;
            part.weight = weight.narrow(0, offset, rows)?;
            if let (Some(b), Some(all)) = (&mut part.bias, &bias) {
                *b = all.narrow(0, offset, rows)?;
            }
            offset += rows;
        }
        Ok(Some(Linear {
            weight,
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
                let weight = self.weight.narrow(0, offset, n)?;
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
        (self.trainable && self.adapter.is_none() && self.bias.is_none()).then_some(&self.weight)
    }

    /// Applies the projection (and the adapter's update, if any), computing in `dtype`.
    pub fn forward(&self, x: &Tensor, dtype: DType) -> Result<Tensor> {
        let y = match (&self.adapter, self.trainable) {
            (None, true) => ops::master_linear(x, &self.weight)?,
            (Some(adapter), true) => {
                (ops::master_linear(x, &self.weight)? + adapter.update(x, dtype)?)?
            }
            (Some(adapter), false) => {
                adapter.forward_with_frozen(x, &ops::cast(&self.weight, dtype)?, dtype)?
            }
            (None, false) => ops::frozen_linear(x, &ops::cast(&self.weight, dtype)?)?,
        };
        match &self.bias {
            Some(b) => y.broadcast_add(&ops::cast(b, dtype)?),
            None => Ok(y),
        }
    }
}
