//! Ranks on GPUs: NCCL sums the gradient buckets in device memory, on the device's stream;
//! the TCP connections of the rendezvous carry NCCL's unique id and the small messages (losses,
//! token counts, stop signals), which also notice a rank that died before any wait on the GPU.

use super::tcp::TcpCollective;
use super::{broadcast, Collective, CollectiveError, ReduceError};
use candle_core::{Device, Tensor};
use ops::nccl::{unique_id, NcclComm, ID_BYTES};

/// A rank of a GPU run: NCCL for tensors, TCP for the rest.
pub struct NcclCollective {
    control: TcpCollective,
    comm: NcclComm,
}

impl NcclCollective {
    /// Rank 0 makes an NCCL unique id and sends it over `control`; every rank then joins the
    /// communicator on `device`.
    pub fn connect(control: TcpCollective, device: &Device) -> Result<Self, ReduceError> {
        let id = match control.rank() {
            0 => unique_id()?,
            _ => [0; ID_BYTES],
        };
        let shared = broadcast(&control, &id)?;
        let id: [u8; ID_BYTES] =
            shared
                .as_slice()
                .try_into()
                .map_err(|_| CollectiveError::OutOfStep {
                    rank: 0,
                    got: format!("an NCCL id of {} bytes", shared.len()),
                    expected: format!("{ID_BYTES} bytes"),
                })?;
        let comm = NcclComm::new(device, control.rank(), control.world_size(), &id)?;
        Ok(Self { control, comm })
    }
}

impl Collective for NcclCollective {
    fn rank(&self) -> usize {
        self.control.rank()
    }

    fn world_size(&self) -> usize {
        self.control.world_size()
    }

    fn all_gather(&self, message: &[u8]) -> Result<Vec<Vec<u8>>, CollectiveError> {
        self.control.all_gather(message)
    }

    fn all_reduce_sum(&self, values: &mut [f32]) -> Result<(), CollectiveError> {
        self.control.all_reduce_sum(values)
    }

    fn all_reduce_tensor(&self, flat: &Tensor) -> Result<Tensor, ReduceError> {
        match flat.device() {
            Device::Cuda(_) => Ok(self.comm.all_reduce_sum(flat)?),
            _ => self.control.all_reduce_tensor(flat),
        }
    }
}
