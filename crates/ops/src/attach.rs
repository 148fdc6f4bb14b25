//! Gradient attachment: a value computed outside the autograd graph (on detached operands, in
//! chunks, or by a kernel with no backward of its own) re-enters the graph as a node whose
//! gradient to its sources is whatever a closure computes.
//!
//! This is how ops avoid candle's default backward: a frozen weight gets no gradient (candle's
//! matmul backward computes both operands'), the output head's gradients are computed while its
//! logits are at hand, and the embedding gradient is one scatter kernel.
//!
//! The node shares the value's memory (nothing is copied), and it keeps its sources only as
//! data-less stand-ins ([`Tensor::graph_handle`]): the closure captures whatever its backward
//! reads, so a source nothing else needs (a frozen projection's input, a residual branch) is
//! freed after the forward pass instead of living until backward, as candle's own ops would
//! keep it.

use candle_core::backprop::GradStore;
use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor, TensorId,
};
use std::cell::Cell;
use std::sync::Arc;

/// A one-source node's backward: the source's gradient from the value's, and optionally the
/// same given the gradient the source already holds ([`attach_onto`]).
struct Backward1 {
    gradient: Gradient,
    onto: Option<Onto>,
}
/// `gradient(grad of value)`: the source's gradient.
type Gradient = Box<dyn Fn(&Tensor) -> Result<Option<Tensor>> + Send + Sync>;
/// `onto(grad of value, held)`: the source's gradient including `held`, or `None` to decline.
type Onto = Box<dyn Fn(&Tensor, &Tensor) -> Result<Option<Tensor>> + Send + Sync>;
type Backward2 = Box<dyn Fn(&Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> + Send + Sync>;
/// Gradients for three sources.
pub(crate) type Grads3 = (Option<Tensor>, Option<Tensor>, Option<Tensor>);
type Backward3 = Box<dyn Fn(&Tensor) -> Result<Grads3> + Send + Sync>;

/// `value`, whose gradient flows to `source` as `backward(grad of value)`.
pub(crate) fn attach<F>(
    source: &Tensor,
    value: &Tensor,
    name: &'static str,
    backward: F,
) -> Result<Tensor>
where
    F: Fn(&Tensor) -> Result<Option<Tensor>> + Send + Sync + 'static,
{
    attach_with(source, value, name, Box::new(backward), None)
}

/// [`attach`], whose backward is first offered the gradient `source` already holds (out of the
/// gradient store for the call: [`Tensor::is_sole_handle`] says whether it may be written in
/// place): `onto(grad of value, held)` returns the source's whole gradient, `held` included,
/// or `None`, and then `backward`'s is added to `held` as [`attach`]'s would be.
pub(crate) fn attach_onto<F, G>(
    source: &Tensor,
    value: &Tensor,
    name: &'static str,
    backward: F,
    onto: G,
) -> Result<Tensor>
where
    F: Fn(&Tensor) -> Result<Option<Tensor>> + Send + Sync + 'static,
    G: Fn(&Tensor, &Tensor) -> Result<Option<Tensor>> + Send + Sync + 'static,
{
    attach_with(
        source,
        value,
        name,
        Box::new(backward),
        Some(Box::new(onto)),
    )
}

fn attach_with(
    source: &Tensor,
    value: &Tensor,
    name: &'static str,
    gradient: Gradient,
    onto: Option<Onto>,
) -> Result<Tensor> {
    let op = Attach {
        name,
        backward: Backward1 { gradient, onto },
    };
    let source = source.graph_handle()?;
    Ok(Tensor::attach_op1(value, &source, Arc::new(Box::new(op))))
}

/// `value`, whose gradient flows to `a` and `b` as `backward(grad of value)`.
pub(crate) fn attach2<F>(
    a: &Tensor,
    b: &Tensor,
    value: &Tensor,
    name: &'static str,
    backward: F,
) -> Result<Tensor>
where
    F: Fn(&Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> + Send + Sync + 'static,
{
    let op = Attach {
        name,
        backward: Box::new(backward) as Backward2,
    };
    let sources = [a.graph_handle()?, b.graph_handle()?];
    let [a, b] = &sources;
    Ok(Tensor::attach_op2(value, [a, b], Arc::new(Box::new(op))))
}

/// `value`, whose gradient flows to `a`, `b` and `c` as `backward(grad of value)`.
pub(crate) fn attach3<F>(
    sources: [&Tensor; 3],
    value: &Tensor,
    name: &'static str,
    backward: F,
) -> Result<Tensor>
where
    F: Fn(&Tensor) -> Result<Grads3> + Send + Sync + 'static,
{
    let op = Attach {
        name,
        backward: Box::new(backward) as Backward3,
    };
    let [a, b, c] = sources;
    let handles = [a.graph_handle()?, b.graph_handle()?, c.graph_handle()?];
    let [a, b, c] = &handles;
    Ok(Tensor::attach_op3(value, [a, b, c], Arc::new(Box::new(op))))
}

/// The gradients of every tracked tensor that `out` depends on, for `grad_out` as the gradient
/// of some loss at `out`: the backward pass of a block recomputed under gradient checkpointing.
///
/// The pass starts from a scalar attached to `out` whose backward hands `out` exactly
/// `grad_out`. Backward from `(out * grad_out).sum_all()` gives the same gradients but first
/// multiplies and sums two activation-sized tensors and then broadcasts and multiplies again
/// (a millisecond a block on a 1B model's batch), all to recover `grad_out`.
pub fn backward_from(out: &Tensor, grad_out: &Tensor) -> Result<GradStore> {
    if out.shape() != grad_out.shape() {
        candle_core::bail!(
            "backward_from: gradient {:?} for a tensor {:?}",
            grad_out.shape(),
            out.shape()
        );
    }
    let root = Tensor::zeros((), out.dtype(), out.device())?;
    let grad_out = grad_out.detach();
    attach(out, &root, "backward-from", move |_| {
        Ok(Some(grad_out.clone()))
    })?
    .backward()
}

thread_local! {
    /// The loss a running [`backward_from_loss`] on this thread started from.
    static SEEDED_LOSS: Cell<Option<TensorId>> = const { Cell::new(None) };
}

/// `loss.backward()` for a training loss, the root of its pass: the gradient that reaches
/// `loss` itself is candle's seed, 1, and the op that computed `loss` may rely on that to
/// scale nothing by it. The output head's loss ([`crate::head_mean_nll`]) then hands over the
/// gradients it computed in its forward pass as they are, where it would otherwise read and
/// write them all once more (the head's f32 gradient: 1 GB of a 1B model, 0.5% of its step).
pub fn backward_from_loss(loss: &Tensor) -> Result<GradStore> {
    struct Restore(Option<TensorId>);
    impl Drop for Restore {
        fn drop(&mut self) {
            SEEDED_LOSS.set(self.0);
        }
    }
    let _restore = Restore(SEEDED_LOSS.replace(Some(loss.id())));
    loss.backward()
}

/// Whether the gradient that `output` receives in the backward pass running on this thread is
/// the seed 1: `output` is the loss a [`backward_from_loss`] started from.
pub(crate) fn receives_unit_seed(output: TensorId) -> bool {
    SEEDED_LOSS.get() == Some(output)
}

/// An attach node over one, two or three sources (`B` is the backward closure's type). It is
/// only ever recorded in the graph with its value ([`Tensor::attach_op1`] and kin), never run.
struct Attach<B> {
    name: &'static str,
    backward: B,
}

/// The forward every attach node has in name only: candle's trait asks for one, and nothing
/// calls it, since the node is created with its value.
macro_rules! no_forward {
    ($($s:ident $l:ident),+) => {
        fn cpu_fwd(&self, $($s: &CpuStorage, $l: &Layout),+) -> Result<(CpuStorage, Shape)> {
            $(let _ = ($s, $l);)+
            candle_core::bail!("{}: an attached value has no forward of its own", self.name)
        }
    };
}

impl CustomOp1 for Attach<Backward1> {
    fn name(&self) -> &'static str {
        self.name
    }

    no_forward!(s1 l1);

    fn bwd(&self, _: &Tensor, _: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        (self.backward.gradient)(grad)
    }

    fn bwd_onto(
        &self,
        _: &Tensor,
        _: &Tensor,
        grad: &Tensor,
        held: &Tensor,
    ) -> Result<Option<Tensor>> {
        match &self.backward.onto {
            Some(onto) => onto(grad, held),
            None => Ok(None),
        }
    }
}

impl CustomOp2 for Attach<Backward2> {
    fn name(&self) -> &'static str {
        self.name
    }

    no_forward!(s1 l1, s2 l2);

    fn bwd(
        &self,
        _: &Tensor,
        _: &Tensor,
        _: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        (self.backward)(grad)
    }
}

impl CustomOp3 for Attach<Backward3> {
    fn name(&self) -> &'static str {
        self.name
    }

    no_forward!(s1 l1, s2 l2, s3 l3);

    fn bwd(&self, _: &Tensor, _: &Tensor, _: &Tensor, _: &Tensor, grad: &Tensor) -> Result<Grads3> {
        (self.backward)(grad)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Var};

    #[test]
    fn the_closure_gives_the_gradient_and_the_value_is_shared_not_copied() {
        let x = Var::from_slice(&[1f32, 2., 3.], 3, &Device::Cpu).unwrap();
        let value = (x.as_tensor().detach() * 10.0).unwrap();
        let y = attach(x.as_tensor(), &value, "test", |g| Ok(Some((g * 2.0)?))).unwrap();
        assert_eq!(y.to_vec1::<f32>().unwrap(), [10., 20., 30.]);
        let grads = (y * 3.0).unwrap().sum_all().unwrap().backward().unwrap();
        assert_eq!(
            grads.get(&x).unwrap().to_vec1::<f32>().unwrap(),
            [6., 6., 6.]
        );
    }

    #[test]
    fn onto_is_offered_the_held_gradient_and_a_decline_adds_as_attach_does() {
        let x = Var::from_slice(&[1f32, 2., 3.], 3, &Device::Cpu).unwrap();
        for accept in [true, false] {
            let value = x.as_tensor().detach();
            let y = attach_onto(
                x.as_tensor(),
                &value,
                "test",
                |g| Ok(Some((g * 2.0)?)),
                move |g, held| {
                    assert_eq!(held.to_vec1::<f32>()?, [3., 3., 3.]);
                    assert!(held.is_sole_handle());
                    // A sum unlike `held + backward` shows which path gave the gradient.
                    accept.then(|| held + (g * 10.0)?).transpose()
                },
            )
            .unwrap();
            // A node over y and x, as a tied head is over the lookup's rows and the table:
            // x's gradient from it (3 each) is held before y's node runs.
            let head = attach2(&y, x.as_tensor(), &y.detach(), "head", |g| {
                Ok((Some(g.clone()), Some((g.ones_like()? * 3.0)?)))
            })
            .unwrap();
            let grads = head.sum_all().unwrap().backward().unwrap();
            let want = if accept { [13f32; 3] } else { [5f32; 3] };
            assert_eq!(grads.get(&x).unwrap().to_vec1::<f32>().unwrap(), want);
        }
    }

    #[test]
    fn backward_from_gives_what_backward_of_the_dot_product_gives() {
        let x = Var::from_slice(&[1f32, -2., 3., 0.5], (2, 2), &Device::Cpu).unwrap();
        let out = (x.as_tensor().exp().unwrap() * x.as_tensor()).unwrap();
        let grad_out = Tensor::new(&[[0.25f32, -1.], [2., 4.]], &Device::Cpu).unwrap();
        let seeded = backward_from(&out, &grad_out).unwrap();
        let dot = (&out * &grad_out).unwrap().sum_all().unwrap();
        let plain = dot.backward().unwrap();
        let got = seeded.get(&x).unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(got, plain.get(&x).unwrap().to_vec2::<f32>().unwrap());
        let wrong = Tensor::zeros(4, DType::F32, &Device::Cpu).unwrap();
        assert!(backward_from(&out, &wrong).is_err());
    }

    /// Elements in a tensor's storage.
    fn stored(t: &Tensor) -> usize {
        match &*t.storage_and_layout().0 {
            candle_core::Storage::Cpu(s) => s.as_slice::<f32>().unwrap().len(),
            _ => unreachable!("CPU test"),
        }
    }

    #[test]
    fn sources_are_kept_as_data_less_stand_ins_where_that_is_safe() {
        let x = Var::from_slice(&[1f32, 2., 3.], 3, &Device::Cpu).unwrap();
        let middle = (x.as_tensor() * 2.0).unwrap();
        let handle = middle.graph_handle().unwrap();
        assert_eq!((handle.id(), handle.dims()), (middle.id(), middle.dims()));
        assert_eq!((stored(&middle), stored(&handle)), (3, 1));
        // Gradients reach x through a node whose source was dropped.
        let value = (middle.detach() + 1.0).unwrap();
        let y = attach(&middle, &value, "test", |g| Ok(Some(g.clone()))).unwrap();
        drop(middle);
        let grads = y.sum_all().unwrap().backward().unwrap();
        assert_eq!(
            grads.get(&x).unwrap().to_vec1::<f32>().unwrap(),
            [2., 2., 2.]
        );
        // exp's backward reads its own output, and a variable is its own node: both kept whole.
        let e = x.as_tensor().exp().unwrap();
        assert_eq!(stored(&e.graph_handle().unwrap()), 3);
        assert_eq!(stored(&x.as_tensor().graph_handle().unwrap()), 3);
    }
}
