//! One forward and backward pass over a batch, plain or with per-block recompute (gradient
//! checkpointing), giving the loss and the gradients by parameter name.

use candle_core::backprop::GradStore;
use candle_core::{Device, Result, Tensor, Var};
use model::Llama;
use std::collections::HashMap;

/// Token windows for one micro-batch.
#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    /// `[rows * seq_len]` input ids.
    pub inputs: Vec<u32>,
    /// `[rows * seq_len]` next-token ids.
    pub targets: Vec<u32>,
    /// `[rows * seq_len]` loss weights (1 scored, 0 ignored); `None` scores every token.
    pub weights: Option<Vec<f32>>,
    /// `[rows * seq_len]` where each position's example starts in its row, for rows that pack
    /// several examples (attention stays within each); `None` for one sequence a row.
    pub segments: Option<Vec<u32>>,
    /// How many positions are padding (not tokens of the data).
    pub padding: usize,
    /// Sequences in the batch.
    pub rows: usize,
    /// Positions per sequence.
    pub seq_len: usize,
}

impl Batch {
    /// Rows of `seq_len` tokens of the data each (no padding, no weights, no segments).
    pub fn windows(inputs: Vec<u32>, targets: Vec<u32>, rows: usize, seq_len: usize) -> Self {
        Self {
            inputs,
            targets,
            weights: None,
            segments: None,
            padding: 0,
            rows,
            seq_len,
        }
    }

    /// The positions that hold tokens of the data (not padding): what tokens/s counts.
    pub fn real_tokens(&self) -> usize {
        self.rows * self.seq_len - self.padding
    }
}

/// Gradients by parameter name.
pub type Gradients = HashMap<String, Tensor>;

struct Tensors {
    inputs: Tensor,
    targets: Tensor,
    weights: Tensor,
    segments: Option<ops::Segments>,
}

fn to_tensors(batch: &Batch, device: &Device) -> Result<Tensors> {
    let shape = (batch.rows, batch.seq_len);
    let n = batch.rows * batch.seq_len;
    let weights = match &batch.weights {
        Some(w) => Tensor::from_slice(w, n, device)?,
        None => Tensor::ones(n, candle_core::DType::F32, device)?,
    };
    let segments = match &batch.segments {
        Some(starts) => Some(ops::Segments::new(Tensor::from_slice(
            starts, shape, device,
        )?)?),
        None => None,
    };
    Ok(Tensors {
        inputs: Tensor::from_slice(&batch.inputs, shape, device)?,
        targets: Tensor::from_slice(&batch.targets, n, device)?,
        weights,
        segments,
    })
}

fn loss_from_hidden(model: &Llama, hidden: &Tensor, t: &Tensors) -> Result<Tensor> {
    model.mean_nll(hidden, &t.targets, &t.weights)
}

/// Mean loss over `batch` without gradients (validation).
pub fn loss_only(model: &Llama, batch: &Batch) -> Result<f64> {
    let t = to_tensors(batch, model.device())?;
    let hidden = forward_blocks(model, &t)?.detach();
    let nll = model.token_nll(&hidden, &t.targets)?;
    PendingLoss(ops::weighted_mean(&nll, &t.weights)?).read()
}

/// Where a step's gradients go: those of `vars`, times `scale`, added into `grads`.
struct GradientSink<'a> {
    vars: &'a [(String, Var)],
    scale: f64,
    grads: &'a mut Gradients,
}

impl GradientSink<'_> {
    /// Adds the gradients of the vars found in `store`.
    fn collect(&mut self, store: &GradStore) -> Result<()> {
        for (name, var) in self.vars {
            if let Some(g) = store.get(var) {
                let g = ops::times(g.clone(), self.scale)?;
                let sum = match self.grads.remove(name) {
                    Some(prev) => (prev + g)?,
                    None => g,
                };
                self.grads.insert(name.clone(), sum);
            }
        }
        Ok(())
    }
}

/// The loss of a step's micro-batch, still on the device. Reading it waits for the device to
/// finish the pass, so a step reads it only once the rest of its work is enqueued (after the
/// gradient norm, which waits anyway): read at once, the device would sit idle while the host
/// freed the pass's graph (1.3 ms a step of a 1B model on an H200) and enqueued the next work.
#[derive(Debug, Clone)]
pub struct PendingLoss(Tensor);

impl PendingLoss {
    /// The loss, read from the device: an f32 loss as it is (no conversion kernel to launch
    /// and wait for), any other converted to f64 first.
    pub fn read(&self) -> Result<f64> {
        match self.0.dtype() {
            candle_core::DType::F32 => Ok(self.0.to_scalar::<f32>()? as f64),
            _ => self.0.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>(),
        }
    }
}

/// Loss of `batch` (on the device, see [`PendingLoss`]) and the gradients of `vars` (scaled
/// by `scale`) added into `grads`. With `recompute`, only each block's input is kept during
/// the forward pass and blocks are recomputed one at a time during backward; the gradients
/// are the same. It is one [`ops::training_step`]: the masters take their `copies` (the
/// optimizer's, see [`crate::optim::AdamW::compute_copies`]) in place of casts, the LoRA
/// factors are cast to the compute dtype once, and a recomputed block takes its LoRA
/// bottlenecks from the first pass.
pub fn accumulate(
    model: &Llama,
    vars: &[(String, Var)],
    batch: &Batch,
    scale: f64,
    recompute: bool,
    copies: Option<&ops::ComputeCopies>,
    grads: &mut Gradients,
) -> Result<PendingLoss> {
    ops::install_gradient_add();
    let t = to_tensors(batch, model.device())?;
    let mut sink = GradientSink { vars, scale, grads };
    ops::training_step(copies, || match recompute {
        false => plain_step(model, &t, &mut sink),
        true => checkpointed_step(model, &t, &mut sink),
    })
    .map(PendingLoss)
}

/// The forward pass keeping every activation, and the backward pass.
fn plain_step(model: &Llama, t: &Tensors, sink: &mut GradientSink) -> Result<Tensor> {
    let loss = loss_from_hidden(model, &forward_blocks(model, t)?, t)?;
    sink.collect(&ops::backward_from_loss(&loss)?)?;
    Ok(loss.detach())
}

/// The forward pass keeping each block's input, and the backward pass recomputing the blocks
/// one at a time.
fn checkpointed_step(model: &Llama, t: &Tensors, sink: &mut GradientSink) -> Result<Tensor> {
    // Forward, keeping only detached block inputs (and the LoRA bottlenecks): each block's
    // graph is freed at once.
    let mut inputs = vec![model.embed(&t.inputs)?.detach()];
    ops::checkpointed_forward(|| {
        for i in 0..model.layers.len() {
            let out = model.training_block(i, &inputs[i], t.segments.as_ref())?;
            inputs.push(out.detach());
        }
        Ok::<_, candle_core::Error>(())
    })?;
    let last = Var::from_tensor(&inputs[model.layers.len()])?;
    let loss = loss_from_hidden(model, last.as_tensor(), t)?;
    let store = ops::backward_from_loss(&loss)?;
    sink.collect(&store)?;
    let mut grad_out = missing(store.get(&last))?.detach();
    for i in (0..model.layers.len()).rev() {
        let x = Var::from_tensor(&inputs[i])?;
        // Its backward follows at once: 4-bit weights keep their expanded copies until then.
        let out = ops::recomputing(|| model.training_block(i, x.as_tensor(), t.segments.as_ref()))?;
        let store = ops::backward_from(&out, &grad_out)?;
        sink.collect(&store)?;
        grad_out = missing(store.get(&x))?.detach();
    }
    let embedded = model.embed(&t.inputs)?;
    sink.collect(&ops::backward_from(&embedded, &grad_out)?)?;
    Ok(loss.detach())
}

fn forward_blocks(model: &Llama, t: &Tensors) -> Result<Tensor> {
    model.training_blocks(&model.embed(&t.inputs)?, t.segments.as_ref())
}

fn missing(g: Option<&Tensor>) -> Result<Tensor> {
    g.cloned().ok_or_else(|| {
        candle_core::Error::Msg("recompute: block input received no gradient".into())
    })
}
