//! What the passes of one training step share, opened as nested scopes on the thread that
//! drives the step (the trainer's `gradients::accumulate`):
//!
//! - [`training_step`]: the weights do not change until the step ends, so each LoRA factor is
//!   cast to the compute dtype once (16-bit copies of 22 MB for r = 16 on every projection of
//!   a 1B model), however many passes use it.
//! - [`checkpointed_forward`]: the first forward pass under gradient checkpointing, which
//!   keeps each block's input and, here, each LoRA projection's rank-sized bottleneck
//!   `dropout(x) @ aᵀ` (`[tokens, r]`: 29 MB a step for r = 16 on every projection of a 1B
//!   model at 8,192 tokens) and each flash attention's output and row log-sum-exps.
//! - [`recomputing`]: a block run again for its backward pass, which follows at once. Its
//!   LoRA projections take the bottlenecks the first pass kept instead of computing them
//!   again, its attention takes the output and row statistics the first pass kept (the flash
//!   kernels' forward is not run again: 5 of a checkpointed 1B LoRA step's 139 ms, for 34 MB a
//!   block), and its 4-bit weights keep their expanded 16-bit copies for the backward pass
//!   (one block's: 436 MB at Llama-3.1-8B's shape), so each is expanded twice a step, not
//!   three times.
//!
//! Outside them (evaluation, generation, a plain backward pass) nothing is kept.
//!
//! A step may open with [`ComputeCopies`]: the compute-dtype copies of master weights that the
//! optimizer wrote beside the masters at its last update (so mixed precision casts no weight
//! at all); every cast of such a master in the step is its copy.

use candle_core::{DType, Result, Tensor, TensorId};
use std::cell::{Cell, RefCell};
use std::collections::{HashMap, VecDeque};

/// What an open [`training_step`] keeps.
#[derive(Default)]
struct Kept {
    /// [`cast_once`]'s casts, by source tensor and dtype.
    casts: HashMap<(TensorId, DType), Tensor>,
    /// The bottlenecks of the checkpointed forward pass by LoRA `a` factor, in the order the
    /// pass computed them.
    bottlenecks: HashMap<TensorId, VecDeque<Tensor>>,
    /// The attention results (output, row statistics) of the checkpointed forward pass, in
    /// the order its blocks computed them.
    attention: Vec<(Tensor, Tensor)>,
    /// Stacked copies of masters (their rows, in order), from [`ComputeCopies`].
    stacks: HashMap<(Vec<TensorId>, DType), Tensor>,
}

/// Compute-dtype copies of master weights, each equal to the master's cast (an optimizer
/// writes them as it updates the masters), for a [`training_step`] to use instead of casting.
/// A copy is valid only until its master changes: build a new set after every update.
#[derive(Debug, Clone, Default)]
pub struct ComputeCopies {
    singles: Vec<(TensorId, Tensor)>,
    stacks: Vec<(Vec<TensorId>, Tensor)>,
}

impl ComputeCopies {
    /// `copy` is `master` cast to `copy`'s dtype.
    pub fn add(&mut self, master: &Tensor, copy: Tensor) {
        self.singles.push((master.id(), copy));
    }

    /// `stacked` is the rows of `parts` in order, cast to `stacked`'s dtype: what
    /// [`crate::cast::stacked_cast`] makes of them.
    pub fn add_stacked(&mut self, parts: &[&Tensor], stacked: Tensor) {
        let ids = parts.iter().map(|p| p.id()).collect();
        self.stacks.push((ids, stacked));
    }

    /// How many copies (single or stacked) the set holds.
    pub fn len(&self) -> usize {
        self.singles.len() + self.stacks.len()
    }

    /// Whether the set holds none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// What a step opened with this set keeps from its start.
    fn kept(&self) -> Kept {
        let casts = self
            .singles
            .iter()
            .map(|(id, t)| ((*id, t.dtype()), t.clone()));
        let stacks = self.stacks.iter();
        Kept {
            casts: casts.collect(),
            stacks: stacks
                .map(|(ids, t)| ((ids.clone(), t.dtype()), t.clone()))
                .collect(),
            ..Kept::default()
        }
    }
}

/// The pass the thread is running.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Pass {
    Plain,
    Checkpointed,
    Recomputing,
}

thread_local! {
    static KEPT: RefCell<Option<Kept>> = const { RefCell::new(None) };
    static PASS: Cell<Pass> = const { Cell::new(Pass::Plain) };
}

/// Runs `f`, one training step (its forward and backward passes), with what its passes share
/// kept until `f` returns, and the masters' `copies` (if any) in place of their casts. A step
/// opened inside another shares the outer one's (and ignores `copies`).
pub fn training_step<R>(copies: Option<&ComputeCopies>, f: impl FnOnce() -> R) -> R {
    /// Closes the step it opened, also when `f` unwinds.
    struct Close(bool);
    impl Drop for Close {
        fn drop(&mut self) {
            if self.0 {
                KEPT.with(|k| k.borrow_mut().take());
            }
        }
    }
    let opened = KEPT.with(|k| {
        let mut kept = k.borrow_mut();
        let open = kept.is_none();
        if open {
            *kept = Some(copies.map(ComputeCopies::kept).unwrap_or_default());
        }
        open
    });
    let _close = Close(opened);
    f()
}

/// Runs `f` as the first forward pass of gradient checkpointing (see the module's notes).
pub fn checkpointed_forward<R>(f: impl FnOnce() -> R) -> R {
    in_pass(Pass::Checkpointed, f)
}

/// Runs `f` as a block's recomputation for its backward pass (see the module's notes).
pub fn recomputing<R>(f: impl FnOnce() -> R) -> R {
    in_pass(Pass::Recomputing, f)
}

/// Runs `f` in `pass`, restoring the pass before it afterwards, also when `f` unwinds.
fn in_pass<R>(pass: Pass, f: impl FnOnce() -> R) -> R {
    struct Restore(Pass);
    impl Drop for Restore {
        fn drop(&mut self) {
            PASS.set(self.0);
        }
    }
    let _restore = Restore(PASS.replace(pass));
    f()
}

/// Whether a 4-bit weight's expanded copy is kept for the backward pass ([`recomputing`]).
pub(crate) fn keeps_expanded_weights() -> bool {
    PASS.get() == Pass::Recomputing
}

/// `x` in `dtype` without a backward (no gradient flows to `x` through it); inside a
/// [`training_step`], cast once per tensor and dtype. The tensor must not change in place
/// before the step ends.
pub(crate) fn cast_once(x: &Tensor, dtype: DType) -> Result<Tensor> {
    if let Some(hit) = kept_cast(x, dtype) {
        return Ok(hit);
    }
    let y = super::cast(&x.detach(), dtype)?;
    KEPT.with(|k| {
        if let Some(kept) = k.borrow_mut().as_mut() {
            kept.casts.insert((x.id(), dtype), y.clone());
        }
    });
    Ok(y)
}

/// `x` in `dtype` without a backward: the step's copy where it has one (a master's copy from
/// [`ComputeCopies`], or a [`cast_once`]), else a fresh cast that is not kept.
pub(crate) fn copy_or_cast(x: &Tensor, dtype: DType) -> Result<Tensor> {
    match kept_cast(x, dtype) {
        Some(hit) => Ok(hit),
        None => super::cast::fresh_cast(x, dtype),
    }
}

/// The open step's cast of `x` to `dtype`, where it has one.
pub(crate) fn kept_cast(x: &Tensor, dtype: DType) -> Option<Tensor> {
    let key = (x.id(), dtype);
    KEPT.with(|k| k.borrow().as_ref().and_then(|k| k.casts.get(&key).cloned()))
}

/// The open step's stacked copy of `parts` in `dtype`, where it has one.
pub(crate) fn kept_stack(parts: &[&Tensor], dtype: DType) -> Option<Tensor> {
    let key = (parts.iter().map(|p| p.id()).collect(), dtype);
    KEPT.with(|k| {
        k.borrow()
            .as_ref()
            .and_then(|k| k.stacks.get(&key).cloned())
    })
}

/// The LoRA bottleneck of the projection whose `a` factor is `a`: what the checkpointed
/// forward pass computed for it where this is that projection's recomputation, else
/// `compute()` (kept for the recomputation in a checkpointed forward pass).
pub(crate) fn bottleneck(a: &Tensor, compute: impl FnOnce() -> Result<Tensor>) -> Result<Tensor> {
    let pass = PASS.get();
    if pass == Pass::Recomputing {
        let kept = KEPT.with(|k| {
            let mut kept = k.borrow_mut();
            let queue = kept.as_mut()?.bottlenecks.get_mut(&a.id())?;
            queue.pop_front()
        });
        if let Some(xa) = kept {
            return Ok(xa);
        }
    }
    let xa = compute()?;
    if pass == Pass::Checkpointed {
        KEPT.with(|k| {
            if let Some(kept) = k.borrow_mut().as_mut() {
                kept.bottlenecks
                    .entry(a.id())
                    .or_default()
                    .push_back(xa.clone());
            }
        });
    }
    Ok(xa)
}

/// A block's attention result (its output and per-row statistics, as the flash kernels return
/// them): in a recomputation, what the checkpointed forward pass computed for the block, where
/// `fits` accepts it (the recomputation runs the blocks last first, so the last one kept is
/// the one taken); else `compute()`, kept when this is the checkpointed forward pass. (Only
/// the CUDA flash kernels' path has such results.)
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
pub(crate) fn attention_result(
    fits: impl Fn(&(Tensor, Tensor)) -> bool,
    compute: impl FnOnce() -> Result<(Tensor, Tensor)>,
) -> Result<(Tensor, Tensor)> {
    let pass = PASS.get();
    if pass == Pass::Recomputing {
        let kept = KEPT.with(|k| k.borrow_mut().as_mut()?.attention.pop());
        if let Some(result) = kept.filter(&fits) {
            return Ok(result);
        }
    }
    let result = compute()?;
    if pass == Pass::Checkpointed {
        KEPT.with(|k| {
            if let Some(kept) = k.borrow_mut().as_mut() {
                kept.attention.push(result.clone());
            }
        });
    }
    Ok(result)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::parity::uniform;
    use candle_core::Device;

    fn values(t: &Tensor) -> Vec<f32> {
        t.to_dtype(DType::F32)
            .and_then(|t| t.flatten_all())
            .and_then(|t| t.to_vec1())
            .unwrap()
    }

    #[test]
    fn a_cast_is_made_once_inside_a_step_and_each_time_outside() {
        let x = uniform(&[4, 6], 3);
        let twice = |x| {
            let first = cast_once(x, DType::F16).unwrap();
            let second = cast_once(x, DType::F16).unwrap();
            (first.id() == second.id(), first)
        };
        let (shared, inside) = training_step(None, || training_step(None, || twice(&x)));
        assert!(shared, "one cast in the step, nested or not");
        let (shared, outside) = twice(&x);
        assert!(!shared, "nothing kept once the step is over");
        assert_eq!(values(&inside), values(&outside));
        assert_eq!(values(&inside), values(&x.to_dtype(DType::F16).unwrap()));
    }

    #[test]
    fn each_recomputed_block_takes_its_attention_from_the_checkpointed_pass() {
        let result = |v: f32| {
            move || {
                Ok((
                    Tensor::full(v, 2, &Device::Cpu)?,
                    Tensor::full(v, 1, &Device::Cpu)?,
                ))
            }
        };
        let any = |_: &(Tensor, Tensor)| true;
        let output = |r: (Tensor, Tensor)| values(&r.0);
        training_step(None, || {
            checkpointed_forward(|| {
                for block in 0..3 {
                    attention_result(any, result(block as f32)).unwrap();
                }
            });
            // A plain pass neither takes nor keeps one.
            assert_eq!(
                output(attention_result(any, result(9.0)).unwrap()),
                [9.0; 2]
            );
            // Last block first; one that does not fit is computed again.
            let taken = recomputing(|| {
                let two = output(attention_result(any, result(0.0)).unwrap());
                let misfit = |r: &(Tensor, Tensor)| r.0.dims() == [5];
                let one = output(attention_result(misfit, result(7.0)).unwrap());
                let zero = output(attention_result(any, result(8.0)).unwrap());
                let none_left = output(attention_result(any, result(6.0)).unwrap());
                [two, one, zero, none_left]
            });
            assert_eq!(taken, [[2.0; 2], [7.0; 2], [0.0; 2], [6.0; 2]]);
        });
        // Outside a step nothing is kept for a recomputation.
        checkpointed_forward(|| attention_result(any, result(1.0)).unwrap());
        let again = recomputing(|| attention_result(any, result(5.0)).unwrap());
        assert_eq!(output(again), [5.0; 2]);
    }

    #[test]
    fn a_step_opened_with_copies_takes_them_for_the_masters_casts() {
        let (w, first, second) = (
            candle_core::Var::from_tensor(&uniform(&[2, 3], 1)).unwrap(),
            uniform(&[2, 3], 2),
            uniform(&[1, 3], 3),
        );
        // Marked copies (not the casts), so that taking them shows.
        let marked = |t: &Tensor| (t.to_dtype(DType::F16).unwrap() + 100.0).unwrap();
        let mut copies = ComputeCopies::default();
        copies.add(w.as_tensor(), marked(w.as_tensor()));
        let stacked = Tensor::cat(&[&first, &second], 0).unwrap();
        copies.add_stacked(&[&first, &second], marked(&stacked));
        assert_eq!(copies.len(), 2);
        let casts = || {
            let single = crate::cast(w.as_tensor(), DType::F16).unwrap();
            // The gradient still reaches the master, in its dtype.
            let grads = single.sum_all().unwrap().backward().unwrap();
            let grad = grads.get(w.as_tensor()).unwrap();
            assert_eq!((grad.dtype(), values(grad)), (DType::F32, vec![1.0; 6]));
            let untracked = copy_or_cast(w.as_tensor(), DType::F16).unwrap();
            assert_eq!(values(&single), values(&untracked));
            let stack = crate::cast::stacked_cast(&[&first, &second], DType::F16).unwrap();
            // Another dtype has no copy.
            let other = crate::cast(w.as_tensor(), DType::BF16).unwrap();
            [single, stack, other].map(|t| values(&t))
        };
        let [single, stack, other] = training_step(Some(&copies), casts);
        assert_eq!(single, values(&marked(w.as_tensor())));
        assert_eq!(stack, values(&marked(&stacked)));
        assert_eq!(other, values(&w.as_tensor().to_dtype(DType::BF16).unwrap()));
        let [single, stack, _] = casts();
        assert_eq!(single, values(&w.as_tensor().to_dtype(DType::F16).unwrap()));
        assert_eq!(stack, values(&stacked.to_dtype(DType::F16).unwrap()));
    }

    #[test]
    fn the_recomputation_takes_the_checkpointed_pass_bottlenecks_in_order() {
        let (a, other) = (uniform(&[2, 3], 1), uniform(&[2, 3], 2));
        let constant = |v: f32| move || Tensor::full(v, 2, &Device::Cpu);
        training_step(None, || {
            checkpointed_forward(|| {
                bottleneck(&a, constant(1.0)).unwrap();
                bottleneck(&a, constant(2.0)).unwrap();
                bottleneck(&other, constant(3.0)).unwrap();
            });
            // A plain pass neither takes nor keeps any.
            assert_eq!(values(&bottleneck(&a, constant(9.0)).unwrap()), [9.0; 2]);
            let taken = recomputing(|| {
                assert!(keeps_expanded_weights());
                [&a, &a, &a, &other].map(|t| values(&bottleneck(t, constant(0.0)).unwrap()))
            });
            assert_eq!(taken, [[1.0; 2], [2.0; 2], [0.0; 2], [3.0; 2]]);
            assert!(!keeps_expanded_weights(), "the pass is restored");
        });
        // Outside a step the checkpointed pass keeps nothing for a recomputation.
        checkpointed_forward(|| bottleneck(&a, constant(1.0)).unwrap());
        let again = recomputing(|| bottleneck(&a, constant(5.0)).unwrap());
        assert_eq!(values(&again), [5.0; 2]);
    }
}
