//! Several parameters multiplied as one stacked matrix: the stack's graph node, whose gradient
//! reaches each part as its block, and the block-diagonal stack of LoRA `B` factors.
//!
//! A stacked projection (gate and up; q, k and v) computes its product with one matrix built
//! from its parts each step. The matrix itself is no parameter: [`stacked_node`] puts it in the
//! graph with the parts as its sources, so the one gradient the product's backward computes
//! for it is split into the parts' gradients.

use super::attach::{attach2, attach3};
use candle_core::{Result, Tensor};

/// Where each part lies in a stack.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Blocks {
    /// Parts `[n_i, k]` one after another along the rows: `[Σ n_i, k]`.
    Rows,
    /// Parts `[n_i, k_i]` along the diagonal, zeros elsewhere: `[Σ n_i, Σ k_i]`.
    Diagonal,
}

/// `stacked` (the stack of `parts` laid out as `blocks` says, in any dtype) as a graph node of
/// `parts` (two or three): the gradient it receives (of the stack's shape, in the parts'
/// dtype) reaches each tracked part as its block.
pub(crate) fn stacked_node(parts: &[&Tensor], stacked: &Tensor, blocks: Blocks) -> Result<Tensor> {
    let spans = parts
        .iter()
        .map(|p| p.dims2())
        .collect::<Result<Vec<_>>>()?;
    let tracked: Vec<bool> = parts.iter().map(|p| p.track_op()).collect();
    let split = move |grad: &Tensor| -> Result<Vec<Option<Tensor>>> {
        let (mut row, mut column) = (0, 0);
        let mut out = Vec::with_capacity(spans.len());
        for (&(n, k), &wanted) in spans.iter().zip(&tracked) {
            let block = |g: &Tensor| match blocks {
                Blocks::Rows => g.narrow(0, row, n),
                Blocks::Diagonal => g.narrow(0, row, n)?.narrow(1, column, k),
            };
            out.push(wanted.then(|| block(grad)).transpose()?);
            row += n;
            column += k;
        }
        Ok(out)
    };
    match parts {
        [a, b] => attach2(a, b, stacked, "stacked-parts", move |grad| {
            let mut parts = split(grad)?.into_iter();
            Ok((parts.next().flatten(), parts.next().flatten()))
        }),
        [a, b, c] => attach3([a, b, c], stacked, "stacked-parts", move |grad| {
            let mut parts = split(grad)?.into_iter();
            Ok((
                parts.next().flatten(),
                parts.next().flatten(),
                parts.next().flatten(),
            ))
        }),
        _ => candle_core::bail!("a stack of {} parts, not two or three", parts.len()),
    }
}

/// `parts` (`[n_i, k_i]`, one dtype and device) as the block-diagonal `[Σ n_i, Σ k_i]`: each
/// part's rows after the earlier parts' rows and its columns after their columns, zeros
/// elsewhere. No gradient history (see [`stacked_node`]). On CUDA one zeroed buffer and one
/// copy a part.
pub(crate) fn block_diagonal(parts: &[Tensor]) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if let Some(stacked) = cuda::block_diagonal(parts)? {
        return Ok(stacked);
    }
    let width = parts.iter().map(|p| p.dim(1)).sum::<Result<usize>>()?;
    let mut column = 0;
    let mut rows = Vec::with_capacity(parts.len());
    for part in parts {
        let k = part.dim(1)?;
        rows.push(
            part.detach()
                .pad_with_zeros(1, column, width - column - k)?,
        );
        column += k;
    }
    Tensor::cat(&rows, 0)
}

#[cfg(feature = "cuda")]
mod cuda {
    use crate::launch;
    use candle_core::backend::{BackendDevice, BackendStorage};
    use candle_core::{Result, Tensor};

    /// [`super::block_diagonal`] of contiguous CUDA parts.
    pub(super) fn block_diagonal(parts: &[Tensor]) -> Result<Option<Tensor>> {
        let on_cuda = |p: &Tensor| p.device().is_cuda() && p.is_contiguous() && p.rank() == 2;
        let Some(first) = parts.first() else {
            return Ok(None);
        };
        if !parts.iter().all(on_cuda) {
            return Ok(None);
        }
        let dtype = first.dtype();
        let height = parts.iter().map(|p| p.dim(0)).sum::<Result<usize>>()?;
        let width = parts.iter().map(|p| p.dim(1)).sum::<Result<usize>>()?;
        let refs: Vec<&Tensor> = parts.iter().collect();
        let stacked = launch::with_operands(&refs, |ops| {
            let device = &ops[0].0.device;
            let mut out = device.zeros_impl(&(height, width).into(), dtype)?;
            let (mut row, mut column) = (0, 0);
            for part in ops {
                let (n, k) = part.1.shape().dims2()?;
                let (start, _) = part.1.contiguous_offsets().ok_or_else(|| {
                    candle_core::Error::Msg("block_diagonal: a part is not contiguous".into())
                })?;
                part.0
                    .copy2d(&mut out, n, k, k, width, start, row * width + column)?;
                row += n;
                column += k;
            }
            Ok(out)
        })?;
        Ok(Some(launch::tensor(stacked, (height, width).into())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn block_diagonal_places_each_part_on_the_diagonal() {
        let dev = Device::Cpu;
        let a = Tensor::new(&[[1f32, 2.], [3., 4.]], &dev).unwrap();
        let b = Tensor::new(&[[5f32], [6.], [7.]], &dev).unwrap();
        let d = block_diagonal(&[a, b]).unwrap();
        assert_eq!(
            d.to_vec2::<f32>().unwrap(),
            [
                [1., 2., 0.],
                [3., 4., 0.],
                [0., 0., 5.],
                [0., 0., 6.],
                [0., 0., 7.]
            ]
        );
    }

    /// The gradient of `Σ stack ⊙ weights` (a weight per element of the stack) reaches each
    /// of the parts of `shapes` as its block of the weights.
    fn check_split(shapes: &[(usize, usize)], blocks: Blocks) {
        let dev = Device::Cpu;
        let parts: Vec<Var> = shapes
            .iter()
            .map(|&shape| Var::ones(shape, candle_core::DType::F32, &dev).unwrap())
            .collect();
        let refs: Vec<&Tensor> = parts.iter().map(|v| v.as_tensor()).collect();
        let values: Vec<Tensor> = refs.iter().map(|p| p.detach()).collect();
        let value = match blocks {
            Blocks::Rows => Tensor::cat(&values, 0).unwrap(),
            Blocks::Diagonal => block_diagonal(&values).unwrap(),
        };
        let stacked = stacked_node(&refs, &value, blocks).unwrap();
        let (h, w) = stacked.dims2().unwrap();
        let weights = Tensor::arange(0f32, (h * w) as f32, &dev)
            .unwrap()
            .reshape((h, w))
            .unwrap();
        let grads = (stacked * &weights)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let (mut row, mut column) = (0, 0);
        for part in &refs {
            let (n, k) = part.dims2().unwrap();
            let at = if blocks == Blocks::Rows { 0 } else { column };
            let want = weights.narrow(0, row, n).unwrap().narrow(1, at, k).unwrap();
            let got = grads.get(part).unwrap();
            assert_eq!(
                got.to_vec2::<f32>().unwrap(),
                want.to_vec2::<f32>().unwrap()
            );
            row += n;
            column += k;
        }
    }

    #[test]
    fn each_part_gets_its_block_of_the_stacks_gradient() {
        check_split(&[(2, 2), (1, 3), (2, 1)], Blocks::Diagonal);
        check_split(&[(3, 2), (1, 2)], Blocks::Diagonal);
        check_split(&[(2, 3), (1, 3), (2, 3)], Blocks::Rows);
    }
}
