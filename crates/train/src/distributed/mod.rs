//! Data-parallel training: N ranks (processes, or threads in tests) each train on their own
//! windows of every step's batch, and their gradients are summed before one identical
//! optimizer step on every rank.
//!
//! - [`Collective`] is what the training loop needs from the ranks' transport: an all-gather of
//!   small messages and sums of f32 buffers and of flat tensors, with the same bits on every
//!   rank.
//! - [`Single`] is the one-rank world of an ordinary run; [`local::LocalGroup`] runs N ranks
//!   as threads of one process (the stand-in the tests train with); [`tcp::TcpCollective`]
//!   connects processes, on one machine or several, through a TCP rendezvous at rank 0; with
//!   the `nccl` feature, `nccl::NcclCollective` sums CUDA tensors with NCCL. [`join`] picks.
//! - [`window_start`] is the data sharding, [`buckets::BucketPlan`] the gradient buckets, and
//!   [`env::WorldEnv`] the torchrun environment (`RANK`, `WORLD_SIZE`, ...).

pub mod buckets;
pub mod env;
pub mod local;
#[cfg(feature = "nccl")]
pub mod nccl;
pub mod tcp;

use candle_core::Tensor;

/// Why a collective operation failed: every rank stops with it rather than wait forever.
#[derive(Debug, thiserror::Error)]
pub enum CollectiveError {
    /// A rank closed its connection (it stopped, failed or was killed).
    #[error("rank {rank} of {world} stopped (its connection closed); stopping too")]
    PeerLost {
        /// The rank that went away.
        rank: usize,
        /// Ranks in the run.
        world: usize,
    },
    /// No answer within the timeout.
    #[error("rank {rank} of {world} sent nothing for {seconds} s (LLMTOOL_COLLECTIVE_TIMEOUT); stopping")]
    TimedOut {
        /// The rank waited for.
        rank: usize,
        /// Ranks in the run.
        world: usize,
        /// The timeout in seconds.
        seconds: u64,
    },
    /// The ranks are not running the same step: a rank sent another operation or size.
    #[error("rank {rank} is out of step: it sent {got} where {expected} was expected (do all ranks run the same config?)")]
    OutOfStep {
        /// The rank whose message did not fit.
        rank: usize,
        /// What it sent.
        got: String,
        /// What this rank expected.
        expected: String,
    },
    /// The rendezvous could not be made.
    #[error("rendezvous at {address}: {message}")]
    Rendezvous {
        /// `MASTER_ADDR:MASTER_PORT`.
        address: String,
        /// What went wrong.
        message: String,
    },
    /// Reading or writing a connection failed.
    #[error("connection to rank {rank}: {source}")]
    Io {
        /// The other end.
        rank: usize,
        /// The I/O error.
        source: std::io::Error,
    },
}

/// Why summing tensors over the ranks failed.
#[derive(Debug, thiserror::Error)]
pub enum ReduceError {
    /// The transport failed.
    #[error(transparent)]
    Collective(#[from] CollectiveError),
    /// Packing, moving or unpacking the tensors failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// The operations data-parallel training needs from the ranks. Every rank calls the same
/// operations in the same order (the training loop is the same program on every rank); a rank
/// that stops makes the others' next call fail with [`CollectiveError::PeerLost`].
pub trait Collective: Send + Sync {
    /// This rank, from 0.
    fn rank(&self) -> usize;
    /// Ranks in the run.
    fn world_size(&self) -> usize;
    /// Every rank's `message`, in rank order.
    fn all_gather(&self, message: &[u8]) -> Result<Vec<Vec<u8>>, CollectiveError>;
    /// Replaces `values` by their elementwise sum over the ranks, added in rank order, so that
    /// every rank ends with the same bits. Every rank passes the same length.
    fn all_reduce_sum(&self, values: &mut [f32]) -> Result<(), CollectiveError>;

    /// The sum over the ranks of a 1-D f32 tensor, with the same bits on every rank. By
    /// default through host memory ([`Collective::all_reduce_sum`]); a GPU transport sums
    /// device memory.
    fn all_reduce_tensor(&self, flat: &Tensor) -> Result<Tensor, ReduceError> {
        let mut values = flat.to_vec1::<f32>()?;
        self.all_reduce_sum(&mut values)?;
        Ok(Tensor::from_vec(values, flat.shape(), flat.device())?)
    }
}

/// The world of one process: every operation gives back this rank's own values.
#[derive(Debug, Clone, Copy, Default)]
pub struct Single;

impl Collective for Single {
    fn rank(&self) -> usize {
        0
    }
    fn world_size(&self) -> usize {
        1
    }
    fn all_gather(&self, message: &[u8]) -> Result<Vec<Vec<u8>>, CollectiveError> {
        Ok(vec![message.to_vec()])
    }
    fn all_reduce_sum(&self, _values: &mut [f32]) -> Result<(), CollectiveError> {
        Ok(())
    }
}

/// The ranks of this process's world (`None`: an ordinary run, [`Single`]): connected over
/// TCP, and with the `nccl` feature, ranks on CUDA devices sum tensors with NCCL.
pub fn join(
    world: Option<&env::WorldEnv>,
    device: &candle_core::Device,
) -> Result<Box<dyn Collective>, ReduceError> {
    let Some(world) = world else {
        return Ok(Box::new(Single));
    };
    let control = tcp::TcpCollective::connect(world)?;
    #[cfg(feature = "nccl")]
    if device.is_cuda() {
        return Ok(Box::new(nccl::NcclCollective::connect(control, device)?));
    }
    let _ = device; // only NCCL needs it
    Ok(Box::new(control))
}

/// Rank 0's `message` on every rank.
pub fn broadcast(collective: &dyn Collective, message: &[u8]) -> Result<Vec<u8>, CollectiveError> {
    let mine = if collective.rank() == 0 { message } else { &[] };
    Ok(collective.all_gather(mine)?.swap_remove(0))
}

/// Rank 0's `tensor` on every rank, in f32 and `tensor`'s shape: the other ranks contribute
/// zeros to a sum (through [`Collective::all_reduce_tensor`], so on GPUs in device memory).
pub fn broadcast_tensor(
    collective: &dyn Collective,
    tensor: &Tensor,
) -> Result<Tensor, ReduceError> {
    let flat = match collective.rank() {
        0 => tensor.to_dtype(candle_core::DType::F32)?.flatten_all()?,
        _ => Tensor::zeros(
            tensor.elem_count(),
            candle_core::DType::F32,
            tensor.device(),
        )?,
    };
    Ok(collective
        .all_reduce_tensor(&flat)?
        .reshape(tensor.shape())?)
}

/// The elementwise sums of small `f64` vectors (losses, token counts) over the ranks, added in
/// rank order; exact for counts below 2^53.
pub fn sum_f64(collective: &dyn Collective, values: &[f64]) -> Result<Vec<f64>, CollectiveError> {
    sum_gathered(&collective.all_gather(&encode(values))?, values.len())
}

/// A number the ranks exchange as little-endian bytes.
trait Wire: Copy + Default + std::ops::AddAssign {
    const BYTES: usize;
    fn put(self, out: &mut Vec<u8>);
    fn get(bytes: &[u8]) -> Self;
}

impl Wire for f32 {
    const BYTES: usize = 4;
    fn put(self, out: &mut Vec<u8>) {
        out.extend(self.to_le_bytes());
    }
    fn get(bytes: &[u8]) -> Self {
        Self::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]])
    }
}

impl Wire for f64 {
    const BYTES: usize = 8;
    fn put(self, out: &mut Vec<u8>) {
        out.extend(self.to_le_bytes());
    }
    fn get(bytes: &[u8]) -> Self {
        let mut raw = [0; 8];
        raw.copy_from_slice(&bytes[..8]);
        Self::from_le_bytes(raw)
    }
}

/// `values` as the bytes the ranks exchange.
fn encode<T: Wire>(values: &[T]) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(values.len() * T::BYTES);
    for v in values {
        v.put(&mut bytes);
    }
    bytes
}

/// Overwrites `values` with the numbers `bytes` holds.
fn decode_into<T: Wire>(bytes: &[u8], values: &mut [T]) {
    for (v, chunk) in values.iter_mut().zip(bytes.chunks_exact(T::BYTES)) {
        *v = T::get(chunk);
    }
}

/// The elementwise sums of every rank's `len` numbers (`messages` in rank order), added in rank
/// order.
fn sum_gathered<T: Wire>(messages: &[Vec<u8>], len: usize) -> Result<Vec<T>, CollectiveError> {
    let mut sums = vec![T::default(); len];
    for (rank, message) in messages.iter().enumerate() {
        if message.len() != len * T::BYTES {
            return Err(CollectiveError::OutOfStep {
                rank,
                got: format!("{} values", message.len() / T::BYTES),
                expected: format!("{len} values"),
            });
        }
        for (sum, chunk) in sums.iter_mut().zip(message.chunks_exact(T::BYTES)) {
            *sum += T::get(chunk);
        }
    }
    Ok(sums)
}

/// The first window of micro-batch `micro` of a step whose windows start at `cursor`, on
/// `rank` of `world` ranks with `rows` windows a micro-batch. Micro-batch `micro` of rank `r`
/// takes the step's window group `micro × world + r`, so the ranks' windows are disjoint and
/// together are the windows one rank with `grad_accum × world` micro-batches takes, in the
/// same groups: the global batch, and so the run, does not depend on how it is split.
pub fn window_start(cursor: u64, micro: u64, rank: u64, world: u64, rows: u64) -> u64 {
    cursor + (micro * world + rank) * rows
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    #[test]
    fn the_ranks_windows_are_disjoint_and_make_the_one_rank_batch() {
        let (cursor, rows, accum) = (40, 3, 2);
        for world in 1..=4 {
            let mut taken = BTreeSet::new();
            for rank in 0..world {
                for micro in 0..accum {
                    let first = window_start(cursor, micro, rank, world, rows);
                    for w in first..first + rows {
                        assert!(taken.insert(w), "window {w} taken twice at world {world}");
                    }
                }
            }
            let single: BTreeSet<u64> = (0..accum * world)
                .flat_map(|m| {
                    let first = window_start(cursor, m, 0, 1, rows);
                    first..first + rows
                })
                .collect();
            assert_eq!(taken, single, "world {world}");
        }
    }

    #[test]
    fn one_rank_gives_back_its_own_values() {
        let mut values = [1.5f32, -2.0];
        Single.all_reduce_sum(&mut values).unwrap();
        assert_eq!(values, [1.5, -2.0]);
        assert_eq!(broadcast(&Single, b"fp").unwrap(), b"fp");
        let t = Tensor::new(&[[1.5f32, 2.0]], &candle_core::Device::Cpu).unwrap();
        let shared = broadcast_tensor(&Single, &t).unwrap();
        assert_eq!(shared.to_vec2::<f32>().unwrap(), [[1.5, 2.0]]);
        assert_eq!(sum_f64(&Single, &[0.25, 7.0]).unwrap(), [0.25, 7.0]);
    }
}
