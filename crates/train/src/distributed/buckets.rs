//! Gradient buckets: parameters grouped into buffers of about [`BUCKET_BYTES`], in the
//! reverse of their order (the order backward produces their gradients), each summed over the
//! ranks as one flat f32 buffer, as PyTorch DDP does.

use super::{Collective, ReduceError};
use crate::gradients::Gradients;
use candle_core::{DType, Tensor, Var};

/// PyTorch DDP's default bucket size (`bucket_cap_mb=25`).
pub const BUCKET_BYTES: usize = 25 << 20;

/// Which parameters share a bucket: indices into the trained parameters, the last ones first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BucketPlan {
    buckets: Vec<Vec<usize>>,
}

impl BucketPlan {
    /// Buckets of parameters with `elements[i]` f32 values each, at most `cap_bytes` a bucket
    /// (a larger parameter gets a bucket of its own), filled from the last parameter back.
    pub fn new(elements: &[usize], cap_bytes: usize) -> Self {
        let mut buckets: Vec<Vec<usize>> = Vec::new();
        let mut bytes = 0;
        for i in (0..elements.len()).rev() {
            let size = elements[i] * 4;
            match buckets.last_mut() {
                Some(bucket) if bytes + size <= cap_bytes => {
                    bucket.push(i);
                    bytes += size;
                }
                _ => {
                    buckets.push(vec![i]);
                    bytes = size;
                }
            }
        }
        Self { buckets }
    }

    /// The plan for `vars` with [`BUCKET_BYTES`] buckets.
    pub fn for_vars(vars: &[(String, Var)]) -> Self {
        let elements: Vec<usize> = vars.iter().map(|(_, v)| v.elem_count()).collect();
        Self::new(&elements, BUCKET_BYTES)
    }

    /// The buckets, as indices into the parameters.
    pub fn buckets(&self) -> &[Vec<usize>] {
        &self.buckets
    }

    /// Replaces each gradient of `vars` in `grads` by its sum over the ranks, a bucket at a
    /// time. A parameter with no gradient on this rank counts as zeros, so the ranks always
    /// exchange the same buffers; every parameter then has its summed gradient (in f32).
    pub fn all_reduce(
        &self,
        vars: &[(String, Var)],
        grads: &mut Gradients,
        collective: &dyn Collective,
    ) -> Result<(), ReduceError> {
        if collective.world_size() == 1 {
            return Ok(());
        }
        for bucket in &self.buckets {
            let parts = bucket
                .iter()
                .map(|&i| {
                    let (name, var) = &vars[i];
                    match grads.get(name) {
                        Some(g) => g.to_dtype(DType::F32)?.flatten_all(),
                        None => Tensor::zeros(var.elem_count(), DType::F32, var.device()),
                    }
                })
                .collect::<candle_core::Result<Vec<_>>>()?;
            let sum = collective.all_reduce_tensor(&Tensor::cat(&parts, 0)?)?;
            let mut offset = 0;
            for &i in bucket {
                let (name, var) = &vars[i];
                let n = var.elem_count();
                grads.insert(
                    name.clone(),
                    sum.narrow(0, offset, n)?.reshape(var.shape())?,
                );
                offset += n;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::local::LocalGroup;
    use super::*;
    use candle_core::Device;

    #[test]
    fn buckets_fill_from_the_last_parameter_and_never_split_one() {
        let plan = BucketPlan::new(&[10, 20, 5, 100, 3, 4], 40 * 4);
        assert_eq!(plan.buckets(), [vec![5, 4], vec![3], vec![2, 1, 0]]);
        let every: usize = plan.buckets().iter().map(Vec::len).sum();
        assert_eq!(every, 6);
    }

    #[test]
    fn summed_gradients_are_the_sum_on_every_rank() {
        let vars: Vec<(String, Var)> = [("a", 3), ("b", 5), ("c", 2)]
            .iter()
            .map(|(name, n)| {
                let v = Var::zeros(*n, DType::F32, &Device::Cpu).unwrap();
                (name.to_string(), v)
            })
            .collect();
        let plan = BucketPlan::new(&[3, 5, 2], 7 * 4);
        let ranks = LocalGroup::ranks(2);
        let sums: Vec<Gradients> = std::thread::scope(|s| {
            let handles: Vec<_> = ranks
                .iter()
                .map(|rank| {
                    let (vars, plan) = (&vars, &plan);
                    s.spawn(move || {
                        let r = rank.rank() as f32;
                        let mut grads = Gradients::new();
                        for (name, var) in vars {
                            // Rank 1 has no gradient for "b": it counts as zeros.
                            if rank.rank() == 1 && name == "b" {
                                continue;
                            }
                            let n = var.elem_count();
                            let g: Vec<f32> = (0..n).map(|i| i as f32 + 10.0 * r).collect();
                            grads.insert(name.clone(), Tensor::new(g, &Device::Cpu).unwrap());
                        }
                        plan.all_reduce(vars, &mut grads, rank).unwrap();
                        grads
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for grads in &sums {
            let get = |name: &str| grads[name].to_vec1::<f32>().unwrap();
            assert_eq!(get("a"), [10.0, 12.0, 14.0]);
            assert_eq!(get("b"), [0.0, 1.0, 2.0, 3.0, 4.0]);
            assert_eq!(get("c"), [10.0, 12.0]);
        }
    }
}
