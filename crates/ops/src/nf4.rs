//! 4-bit NormalFloat (NF4) weights, QLoRA's frozen base, in bitsandbytes' format and numbers.
//!
//! A tensor is read as one flat run of elements cut into blocks of [`BLOCK`] (64); each element
//! is stored as the index (4 bits, two to a byte, the first in the high nibble) of the nearest of
//! the 16 [`NF4_VALUES`] to it divided by its block's absolute maximum. The absmaxes themselves
//! are quantized again ("double quantization"): their mean is subtracted, and the rest is stored
//! as 8-bit indices into bitsandbytes' signed dynamic map ([`dynamic_map`]) scaled by an f32
//! absmax per [`NESTED_BLOCK`] (256) of them. That is 4.127 bits per weight, and exactly what
//! `bnb.functional.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)`
//! computes: a trailing partial block (at either level) has its own absmax, and rounding ties
//! go to the lower value, as its bucketize does.
//!
//! [`Nf4Parts`] holds the parts on the host (what quantization produces and checkpoints
//! store); [`Nf4Tensor`] holds them on a device, where [`Nf4Tensor::dequantize`] expands them:
//! a rayon kernel on the CPU, a CUDA kernel (`kernels/nf4.cu`), and a composite of candle ops
//! on every other backend.
//!
//! The file is long because it is one op in one file: the format and its host reference, the CPU
//! kernel, the CUDA launchers and the tests against bitsandbytes' own bytes.

use super::cpu_kernel::{f32s, u8s, written_rows};
use super::fused_op::{custom_op, CpuOperand, CpuOutput, FusedOp};
#[cfg(feature = "cuda")]
use super::fused_op::{CudaOutput, Operand};
use candle_core::{CpuStorage, DType, Device, Result, Shape, Tensor};
use rayon::prelude::*;

/// Elements per block sharing one absmax.
pub const BLOCK: usize = 64;

/// Absmaxes per block of the second quantization level.
pub const NESTED_BLOCK: usize = 256;

/// Where the nested absmaxes start in an [`Nf4Tensor`]'s tables.
const TABLES: usize = 16 + 256;

/// The 16 NF4 values (bitsandbytes' `get_4bit_type("nf4")`), in code order.
pub const NF4_VALUES: [f32; 16] = [
    -1.0,
    -0.696_192_8,
    -0.525_073_05,
    -0.394_917_5,
    -0.284_441_38,
    -0.184_773_43,
    -0.091_050_036,
    0.0,
    0.079_580_3,
    0.160_930_2,
    0.246_112_3,
    0.337_915_24,
    0.440_709_83,
    0.562_617,
    0.722_956_84,
    1.0,
];

/// bitsandbytes' signed 8-bit dynamic map (`create_dynamic_map(signed=True)`, the code of
/// `quantize_blockwise`), as f32 bit patterns.
const DYNAMIC_MAP_BITS: [u32; 256] = [
    0xbf7e3333, 0xbf7a999a, 0xbf770000, 0xbf736666, 0xbf6fcccd, 0xbf6c3333, 0xbf68999a, 0xbf650000,
    0xbf616666, 0xbf5dcccd, 0xbf5a3333, 0xbf56999a, 0xbf530000, 0xbf4f6666, 0xbf4bcccd, 0xbf483333,
    0xbf44999a, 0xbf410000, 0xbf3d6666, 0xbf39cccd, 0xbf363334, 0xbf32999a, 0xbf2f0000, 0xbf2b6666,
    0xbf27cccd, 0xbf243334, 0xbf20999a, 0xbf1d0000, 0xbf196666, 0xbf15cccd, 0xbf123334, 0xbf0e999a,
    0xbf0b0000, 0xbf076666, 0xbf03cccc, 0xbf003333, 0xbef93332, 0xbef20000, 0xbeeacccc, 0xbee3999a,
    0xbedc6666, 0xbed53333, 0xbece0000, 0xbec6cccc, 0xbebf999a, 0xbeb86666, 0xbeb13333, 0xbeaa0000,
    0xbea2cccc, 0xbe9b999a, 0xbe946666, 0xbe8d3334, 0xbe860000, 0xbe7d9999, 0xbe6f3333, 0xbe60cccd,
    0xbe526666, 0xbe440000, 0xbe35999a, 0xbe273333, 0xbe18cccd, 0xbe0a6666, 0xbdf80000, 0xbddb3334,
    0xbdc9eb85, 0xbdc428f7, 0xbdbe6667, 0xbdb8a3d7, 0xbdb2e148, 0xbdad1eb8, 0xbda75c2a, 0xbda1999a,
    0xbd9bd70a, 0xbd96147b, 0xbd9051eb, 0xbd8a8f5d, 0xbd84cccd, 0xbd7e147b, 0xbd728f5d, 0xbd670a3d,
    0xbd5b851f, 0xbd500000, 0xbd447ae1, 0xbd38f5c3, 0xbd2d70a3, 0xbd21eb85, 0xbd166667, 0xbd0ae148,
    0xbcfeb852, 0xbce7ae15, 0xbcd0a3d7, 0xbcb9999a, 0xbca28f5d, 0xbc8b851f, 0xbc68f5c3, 0xbc3ae148,
    0xbc1f3b64, 0xbc160418, 0xbc0ccccd, 0xbc039581, 0xbbf4bc6a, 0xbbe24dd3, 0xbbcfdf3b, 0xbbbd70a4,
    0xbbab020d, 0xbb989374, 0xbb8624dd, 0xbb676c8a, 0xbb428f5c, 0xbb1db22d, 0xbaf1a9fc, 0xbaa7ef9d,
    0xba7765ff, 0xba59e83e, 0xba3c6a80, 0xba1eecc1, 0xba016f01, 0xb9c7e283, 0xb98ce705, 0xb923d70b,
    0xb8ba1f4b, 0xb88aefb3, 0xb8378034, 0xb7b24206, 0xb70205ff, 0xb65a1a94, 0xb513a3b7, 0x00000000,
    0x3513a3b7, 0x365a1a94, 0x370205ff, 0x37b24206, 0x38378034, 0x388aefb3, 0x38ba1f4b, 0x3923d70b,
    0x398ce705, 0x39c7e283, 0x3a016f01, 0x3a1eecc1, 0x3a3c6a80, 0x3a59e83e, 0x3a7765ff, 0x3aa7ef9d,
    0x3af1a9fc, 0x3b1db22d, 0x3b428f5c, 0x3b676c8a, 0x3b8624dd, 0x3b989374, 0x3bab020d, 0x3bbd70a4,
    0x3bcfdf3b, 0x3be24dd3, 0x3bf4bc6a, 0x3c039581, 0x3c0ccccd, 0x3c160418, 0x3c1f3b64, 0x3c3ae148,
    0x3c68f5c3, 0x3c8b851f, 0x3ca28f5d, 0x3cb9999a, 0x3cd0a3d7, 0x3ce7ae15, 0x3cfeb852, 0x3d0ae148,
    0x3d166667, 0x3d21eb85, 0x3d2d70a3, 0x3d38f5c3, 0x3d447ae1, 0x3d500000, 0x3d5b851f, 0x3d670a3d,
    0x3d728f5d, 0x3d7e147b, 0x3d84cccd, 0x3d8a8f5d, 0x3d9051eb, 0x3d96147b, 0x3d9bd70a, 0x3da1999a,
    0x3da75c2a, 0x3dad1eb8, 0x3db2e148, 0x3db8a3d7, 0x3dbe6667, 0x3dc428f7, 0x3dc9eb85, 0x3ddb3334,
    0x3df80000, 0x3e0a6666, 0x3e18cccd, 0x3e273333, 0x3e35999a, 0x3e440000, 0x3e526666, 0x3e60cccd,
    0x3e6f3333, 0x3e7d9999, 0x3e860000, 0x3e8d3334, 0x3e946666, 0x3e9b999a, 0x3ea2cccc, 0x3eaa0000,
    0x3eb13333, 0x3eb86666, 0x3ebf999a, 0x3ec6cccc, 0x3ece0000, 0x3ed53333, 0x3edc6666, 0x3ee3999a,
    0x3eeacccc, 0x3ef20000, 0x3ef93332, 0x3f003333, 0x3f03cccc, 0x3f076666, 0x3f0b0000, 0x3f0e999a,
    0x3f123334, 0x3f15cccd, 0x3f196666, 0x3f1d0000, 0x3f20999a, 0x3f243334, 0x3f27cccd, 0x3f2b6666,
    0x3f2f0000, 0x3f32999a, 0x3f363334, 0x3f39cccd, 0x3f3d6666, 0x3f410000, 0x3f44999a, 0x3f483333,
    0x3f4bcccd, 0x3f4f6666, 0x3f530000, 0x3f56999a, 0x3f5a3333, 0x3f5dcccd, 0x3f616666, 0x3f650000,
    0x3f68999a, 0x3f6c3333, 0x3f6fcccd, 0x3f736666, 0x3f770000, 0x3f7a999a, 0x3f7e3333, 0x3f800000,
];

/// The 256 values the double-quantized absmaxes index (a `nested_quant_map` of a checkpoint).
pub fn dynamic_map() -> [f32; 256] {
    DYNAMIC_MAP_BITS.map(f32::from_bits)
}

/// Why a set of NF4 parts cannot describe a tensor.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{part} holds {got} values, a tensor of {elements} elements needs {expected}")]
pub struct PartsMismatch {
    /// The part with the wrong length: `packed`, `absmax` or `nested_absmax`.
    pub part: &'static str,
    /// Elements of the tensor.
    pub elements: usize,
    /// Values the part needs for that many elements.
    pub expected: usize,
    /// Values the part holds.
    pub got: usize,
}

/// An NF4 tensor's parts as host data, in bitsandbytes' layout.
#[derive(Debug, Clone, PartialEq)]
pub struct Nf4Parts {
    /// Two codes per byte, the first element's in the high nibble: `ceil(n / 2)` bytes.
    pub packed: Vec<u8>,
    /// Each block's absmax as an index into [`dynamic_map`]: `ceil(n / 64)`.
    pub absmax: Vec<u8>,
    /// The scale of each run of 256 absmaxes: `ceil(ceil(n / 64) / 256)`.
    pub nested_absmax: Vec<f32>,
    /// The mean absmax, subtracted before they were quantized.
    pub nested_offset: f32,
}

/// The low nibble after an odd count's last element: the code of 0.0, as bitsandbytes pads
/// the values with a zero before packing.
const PADDING: u8 = 7;

/// `ceil(n / d)`.
fn blocks(n: usize, d: usize) -> usize {
    n.div_ceil(d)
}

/// Each block of `values` scaled into [-1, 1] by its absmax and rounded to the nearest entry
/// of the sorted `code`, ties to the lower one (the number of midpoints below the value, as
/// bitsandbytes' `torch.bucketize` over the midpoints counts them); returns the indices and the
/// absmaxes. A full block multiplies by the absmax's reciprocal and a partial one divides, as
/// bitsandbytes does (the two can differ in the last bit). Blocks run in parallel.
fn quantize_blocks(values: &[f32], block: usize, code: &[f32]) -> (Vec<u8>, Vec<f32>) {
    let midpoints: Vec<f32> = code.windows(2).map(|w| (w[0] + w[1]) / 2.0).collect();
    let nearest = |x: f32| midpoints.partition_point(|&m| m < x) as u8;
    let mut indices = vec![0u8; values.len()];
    let absmaxes = values
        .par_chunks(block)
        .zip(indices.par_chunks_mut(block))
        .with_min_len(64)
        .map(|(chunk, out)| {
            let absmax = chunk.iter().fold(0f32, |m, v| m.max(v.abs()));
            let safe = absmax.max(1e-38);
            let full = chunk.len() == block;
            for (o, &v) in out.iter_mut().zip(chunk) {
                let scaled = if full { v * (1.0 / safe) } else { v / safe };
                *o = nearest(scaled.clamp(-1.0, 1.0));
            }
            absmax
        })
        .collect();
    (indices, absmaxes)
}

impl Nf4Parts {
    /// Quantizes `values` (a tensor's elements in order) as bitsandbytes does.
    pub fn quantize(values: &[f32]) -> Self {
        let (codes, absmax) = quantize_blocks(values, BLOCK, &NF4_VALUES);
        let packed = codes
            .par_chunks(2)
            .map(|pair| pair[0] << 4 | pair.get(1).copied().unwrap_or(PADDING))
            .collect();
        // The mean as torch computes it for these sizes, in f32: a pairwise sum would differ
        // in the last bit for long runs, which moves no absmax code.
        let nested_offset =
            (absmax.iter().map(|&a| f64::from(a)).sum::<f64>() / absmax.len().max(1) as f64) as f32;
        let centred: Vec<f32> = absmax.iter().map(|a| a - nested_offset).collect();
        let (absmax, nested_absmax) = quantize_blocks(&centred, NESTED_BLOCK, &dynamic_map());
        Self {
            packed,
            absmax,
            nested_absmax,
            nested_offset,
        }
    }

    /// Checks that the parts have the lengths a tensor of `elements` needs.
    pub fn check(&self, elements: usize) -> std::result::Result<(), PartsMismatch> {
        let absmaxes = blocks(elements, BLOCK);
        let expected = [
            ("packed", self.packed.len(), blocks(elements, 2)),
            ("absmax", self.absmax.len(), absmaxes),
            (
                "nested_absmax",
                self.nested_absmax.len(),
                blocks(absmaxes, NESTED_BLOCK),
            ),
        ];
        match expected.into_iter().find(|(_, got, want)| got != want) {
            Some((part, got, expected)) => Err(PartsMismatch {
                part,
                elements,
                expected,
                got,
            }),
            None => Ok(()),
        }
    }

    /// The `elements` values the parts describe, in f32 (the host reference of
    /// [`Nf4Tensor::dequantize`]).
    pub fn dequantize(&self, elements: usize) -> Vec<f32> {
        let map = dynamic_map();
        (0..elements)
            .map(|i| {
                let byte = self.packed[i / 2];
                let code = if i % 2 == 0 { byte >> 4 } else { byte & 15 };
                // The map's value times its run's scale, plus the offset: bitsandbytes' order.
                let b = i / BLOCK;
                let scale = map[usize::from(self.absmax[b])] * self.nested_absmax[b / NESTED_BLOCK]
                    + self.nested_offset;
                NF4_VALUES[usize::from(code)] * scale
            })
            .collect()
    }
}

/// An NF4 tensor on a device: its parts as device tensors, the shape it stands for, and the
/// dtype it was quantized from (what a merge writes it back as).
#[derive(Debug, Clone)]
pub struct Nf4Tensor {
    /// u8: the packed codes, then the absmax codes (one operand for the kernels).
    codes: Tensor,
    /// f32: the 16 NF4 values, the 256 of the dynamic map, then the nested absmaxes.
    tables: Tensor,
    nested_offset: f32,
    shape: Shape,
    dtype: DType,
}

impl Nf4Tensor {
    /// Quantizes `t` (any float dtype, any device) into an NF4 tensor on `device`; the
    /// arithmetic runs on the host, one tensor at a time.
    pub fn quantize(t: &Tensor, device: &Device) -> Result<Self> {
        let values = t.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
        Self::from_parts(
            Nf4Parts::quantize(&values),
            t.shape().clone(),
            t.dtype(),
            device,
        )
    }

    /// The NF4 tensor of shape `shape` the host `parts` describe, on `device`; `dtype` is the
    /// dtype it was quantized from.
    pub fn from_parts(
        parts: Nf4Parts,
        shape: Shape,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        parts
            .check(shape.elem_count())
            .map_err(|e| candle_core::Error::Msg(format!("nf4: {e}")))?;
        let mut codes = parts.packed;
        codes.extend_from_slice(&parts.absmax);
        let tables: Vec<f32> = NF4_VALUES
            .iter()
            .chain(&dynamic_map())
            .chain(&parts.nested_absmax)
            .copied()
            .collect();
        let (codes_len, tables_len) = (codes.len(), tables.len());
        Ok(Self {
            codes: Tensor::from_vec(codes, codes_len, device)?,
            tables: Tensor::from_vec(tables, tables_len, device)?,
            nested_offset: parts.nested_offset,
            shape,
            dtype,
        })
    }

    /// Bytes of packed codes (the absmax codes follow them in `codes`).
    fn packed_len(&self) -> usize {
        blocks(self.shape.elem_count(), 2)
    }

    /// The parts back on the host.
    pub fn parts(&self) -> Result<Nf4Parts> {
        let mut packed: Vec<u8> = self.codes.to_vec1()?;
        let absmax = packed.split_off(self.packed_len());
        let runs = self.tables.dim(0)? - TABLES;
        Ok(Nf4Parts {
            packed,
            absmax,
            nested_absmax: self.tables.narrow(0, TABLES, runs)?.to_vec1()?,
            nested_offset: self.nested_offset,
        })
    }

    /// The shape the tensor stands for.
    pub fn shape(&self) -> &Shape {
        &self.shape
    }

    /// The dtype it was quantized from.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The device its parts live on.
    pub fn device(&self) -> &Device {
        self.codes.device()
    }

    /// Bytes its parts take on the device.
    pub fn storage_bytes(&self) -> usize {
        self.codes.elem_count() + 4 * self.tables.elem_count()
    }

    /// The tensor expanded to `dtype` (no gradient history): computed in f32 and rounded once,
    /// as bitsandbytes does. A CPU or CUDA kernel where the build has one, candle ops
    /// elsewhere.
    pub fn dequantize(&self, dtype: DType) -> Result<Tensor> {
        let op = Dequantize {
            elements: self.shape.elem_count(),
            packed_len: self.packed_len(),
            offset: self.nested_offset,
            dtype,
        };
        let device = self.device();
        let kernel = matches!(dtype, DType::F32 | DType::BF16 | DType::F16)
            && (device.is_cpu() || (cfg!(feature = "cuda") && device.is_cuda()));
        match kernel {
            true => self
                .codes
                .apply_op2_no_bwd(&self.tables, &op)?
                .reshape(self.shape.clone()),
            false => self.dequantize_composite(dtype),
        }
    }

    /// [`Self::dequantize`] from candle ops, for backends without a kernel.
    pub fn dequantize_composite(&self, dtype: DType) -> Result<Tensor> {
        let device = self.device();
        let n = self.shape.elem_count();
        let absmaxes = blocks(n, BLOCK);
        let packed_len = self.packed_len();
        // Codes: the high nibble, then the low one, of each byte.
        let bytes = self.codes.narrow(0, 0, packed_len)?.to_dtype(DType::F32)?;
        let high = (&bytes / 16.0)?.floor()?;
        let low = (&bytes - (&high * 16.0)?)?;
        let codes = Tensor::stack(&[&high, &low], 1)?
            .flatten_all()?
            .to_dtype(DType::U32)?;
        let values = self.tables.narrow(0, 0, 16)?.index_select(&codes, 0)?;
        // Absmaxes: the map's value times the run's scale, plus the offset.
        let absmax_codes = self.codes.narrow(0, packed_len, absmaxes)?;
        let map = self.tables.narrow(0, 16, 256)?;
        let runs: Vec<u32> = (0..absmaxes)
            .map(|b| (TABLES + b / NESTED_BLOCK) as u32)
            .collect();
        let scale = self
            .tables
            .index_select(&Tensor::from_vec(runs, absmaxes, device)?, 0)?;
        let absmax = ((map.index_select(&absmax_codes.to_dtype(DType::U32)?, 0)? * scale)?
            + f64::from(self.nested_offset))?;
        // Each element times its block's absmax; the last block may be partial.
        let values = values.pad_with_zeros(0, 0, absmaxes * BLOCK - values.elem_count())?;
        let out = values
            .reshape((absmaxes, BLOCK))?
            .broadcast_mul(&absmax.reshape((absmaxes, 1))?)?;
        out.flatten_all()?
            .narrow(0, 0, n)?
            .to_dtype(dtype)?
            .reshape(self.shape.clone())
    }

    /// `x @ self.t()` read straight from the codes, for a few untracked rows of `x` on CUDA
    /// (a decode step); `None` where that kernel does not apply.
    pub fn matvec(&self, x: &Tensor) -> Result<Option<Tensor>> {
        #[cfg(feature = "cuda")]
        if let Some(y) = cuda::matvec(self, x)? {
            return Ok(Some(y));
        }
        let _ = x;
        Ok(None)
    }
}

/// The dequantization kernel: operands the codes (u8: packed, then absmax) and the tables (f32);
/// output `elements` values in `dtype` (f32, bf16 or f16), computed in f32 and rounded once.
struct Dequantize {
    elements: usize,
    packed_len: usize,
    offset: f32,
    dtype: DType,
}

impl FusedOp<2> for Dequantize {
    const NAME: &'static str = "nf4-dequantize";

    fn cpu(&self, [codes, tables]: [CpuOperand; 2]) -> CpuOutput {
        let (packed, absmax) = u8s(codes.0, codes.1)?.split_at(self.packed_len);
        let tables = f32s(tables.0, tables.1)?;
        let (nf4, rest) = tables.split_at(16);
        let (map, nested) = rest.split_at(256);
        // SAFETY: each block's row is written whole.
        let values = unsafe {
            written_rows(self.elements, BLOCK, |b, row| {
                let scale = map[usize::from(absmax[b])] * nested[b / NESTED_BLOCK] + self.offset;
                let bytes = &packed[b * BLOCK / 2..];
                for (j, v) in row.iter_mut().enumerate() {
                    let byte = bytes[j / 2];
                    let code = if j % 2 == 0 { byte >> 4 } else { byte & 15 };
                    v.write(nf4[usize::from(code)] * scale);
                }
            })
        };
        let values = match self.dtype {
            DType::F32 => CpuStorage::F32(values),
            DType::BF16 => CpuStorage::BF16(values.into_iter().map(half::bf16::from_f32).collect()),
            DType::F16 => CpuStorage::F16(values.into_iter().map(half::f16::from_f32).collect()),
            other => candle_core::bail!("nf4: no CPU kernel for {other:?}"),
        };
        Ok((values, self.elements.into()))
    }

    #[cfg(feature = "cuda")]
    fn cuda(&self, [codes, tables]: [Operand; 2]) -> CudaOutput {
        let y = cuda::dequantize(codes, tables, self)?;
        Ok((y, self.elements.into()))
    }
}

custom_op!(Dequantize: 2);

/// The CUDA launchers (`kernels/nf4.cu`).
#[cfg(feature = "cuda")]
mod cuda {
    use super::{Dequantize, Nf4Tensor};
    use crate::launch::constants::{NF4_GEMV_ROWS as GEMV_ROWS, NF4_PER_THREAD as PER_THREAD};
    use crate::launch::{
        address, alloc, base_address, int, launch, per_warp_row, tensor, with_operands, Arg,
        Operand,
    };
    use candle_core::backend::BackendStorage;
    use candle_core::{CudaStorage, Device, Result, Tensor};

    /// Threads per block of the dequantization.
    const THREADS: usize = 256;

    pub(super) fn dequantize(
        codes: Operand,
        tables: Operand,
        op: &Dequantize,
    ) -> Result<CudaStorage> {
        let device = &codes.0.device;
        let y = alloc(device, op.dtype, op.elements)?;
        let grid = u32::try_from(op.elements.div_ceil(PER_THREAD).div_ceil(THREADS))
            .map_err(|_| candle_core::Error::Msg("nf4: tensor too large for one launch".into()))?;
        let packed = address(codes)?;
        launch(
            device,
            "nf4_dequantize",
            Some(op.dtype),
            (grid, 1),
            (THREADS as u32, 1),
            &[
                Arg::Address(packed),
                Arg::Address(packed + op.packed_len as u64),
                Arg::Address(address(tables)?),
                Arg::Address(base_address(&y)?),
                Arg::Float(op.offset),
                Arg::Count(op.elements as u64),
            ],
        )?;
        Ok(y)
    }

    /// `x @ w.t()` for a few untracked rows of `x` on CUDA with the weight's rows a whole number
    /// of blocks; `None` elsewhere.
    pub(super) fn matvec(w: &Nf4Tensor, x: &Tensor) -> Result<Option<Tensor>> {
        let Ok((out, inp)) = w.shape.dims2() else {
            return Ok(None);
        };
        let rows = x.elem_count() / inp.max(1);
        let applies = matches!(x.device(), Device::Cuda(_))
            && x.device().same_device(w.device())
            && !x.track_op()
            && x.dims().last() == Some(&inp)
            && inp % super::BLOCK == 0
            && (1..=GEMV_ROWS).contains(&rows)
            && crate::launch::suffix(x.dtype()).is_ok();
        if !applies {
            return Ok(None);
        }
        let x = x.contiguous()?;
        let y = with_operands(&[&x, &w.codes, &w.tables], |operands| {
            let [xs, codes, tables] = [operands[0], operands[1], operands[2]];
            let y = alloc(&xs.0.device, xs.0.dtype(), rows * out)?;
            let packed = address(codes)?;
            let (grid, block) = per_warp_row(out)?;
            launch(
                &xs.0.device,
                "nf4_gemv",
                Some(xs.0.dtype()),
                grid,
                block,
                &[
                    Arg::Address(address(xs)?),
                    Arg::Address(packed),
                    Arg::Address(packed + w.packed_len() as u64),
                    Arg::Address(address(tables)?),
                    Arg::Address(base_address(&y)?),
                    Arg::Float(w.nested_offset),
                    int(rows)?,
                    int(inp)?,
                    int(out)?,
                ],
            )?;
            Ok(y)
        })?;
        let mut dims = x.dims().to_vec();
        if let Some(last) = dims.last_mut() {
            *last = out;
        }
        Ok(Some(tensor(y, dims.into())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    /// bitsandbytes' quantization of a bf16 tensor (tests/fixtures/make_nf4_fixture.py).
    fn reference() -> std::collections::HashMap<String, Tensor> {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../tests/fixtures/nf4/reference.safetensors");
        candle_core::safetensors::load(path, &Device::Cpu).unwrap()
    }

    fn vec<T: candle_core::WithDType>(t: &Tensor) -> Vec<T> {
        t.flatten_all().unwrap().to_vec1().unwrap()
    }

    /// bitsandbytes' parts of the reference tensor.
    fn reference_parts(r: &std::collections::HashMap<String, Tensor>) -> Nf4Parts {
        Nf4Parts {
            packed: vec(&r["packed"]),
            absmax: vec(&r["absmax"]),
            nested_absmax: vec(&r["nested_absmax"]),
            nested_offset: vec::<f32>(&r["nested_offset"])[0],
        }
    }

    /// Quantization gives bitsandbytes' codes and statistics. Its absmax codes may differ only
    /// where the value sat within a hair of the midpoint between two codes: bitsandbytes'
    /// kernels search the 256-entry map differently (a lookup table on the CPU, a binary search
    /// on CUDA, `bucketize` in its torch backend), and its CPU kernel, which made the fixture,
    /// can miss the nearest there; llmtool takes the exact nearest, ties to the lower, as the
    /// torch backend does.
    #[test]
    fn quantization_equals_bitsandbytes() {
        let r = reference();
        let values = vec::<f32>(&r["weight"].to_dtype(DType::F32).unwrap());
        let (got, want) = (Nf4Parts::quantize(&values), reference_parts(&r));
        assert_eq!(vec::<f32>(&r["quant_map"]), dynamic_map());
        assert_eq!(got.packed, want.packed);
        assert_eq!(got.nested_offset, want.nested_offset);
        assert_eq!(got.nested_absmax, want.nested_absmax);
        let map = dynamic_map();
        let mut near_ties = 0;
        for (b, (&g, &w)) in got.absmax.iter().zip(&want.absmax).enumerate() {
            if g == w {
                continue;
            }
            let (g, w) = (usize::from(g), usize::from(w));
            assert_eq!(g.abs_diff(w), 1, "absmax {b}: codes {g} and {w}");
            let chunk = &values[b * BLOCK..values.len().min((b + 1) * BLOCK)];
            let absmax = chunk.iter().fold(0f32, |m, v| m.max(v.abs()));
            let run = b / NESTED_BLOCK;
            let normed = (absmax - want.nested_offset) / want.nested_absmax[run];
            let midpoint = (map[g] + map[w]) / 2.0;
            let gap = (map[g] - map[w]).abs();
            assert!(
                (normed - midpoint).abs() < 0.01 * gap,
                "absmax {b}: {normed} is no tie"
            );
            near_ties += 1;
        }
        assert!(near_ties <= 2, "{near_ties} near-ties");
    }

    /// Dequantization of bitsandbytes' own parts equals its dequantization bit for bit, by
    /// every path; quantization then dequantization in llmtool agrees with it but for the
    /// blocks of a near-tie above.
    #[test]
    fn every_dequantization_equals_bitsandbytes() {
        let r = reference();
        let weight = &r["weight"];
        let want = vec::<f32>(&r["dequantized"].to_dtype(DType::F32).unwrap());
        let n = weight.elem_count();
        let parts = reference_parts(&r);
        let t = Nf4Tensor::from_parts(
            parts.clone(),
            weight.shape().clone(),
            DType::BF16,
            &Device::Cpu,
        )
        .unwrap();
        let round = |v: Vec<f32>| -> Vec<f32> {
            let t = Tensor::from_vec(v, n, &Device::Cpu).unwrap();
            vec::<f32>(
                &t.to_dtype(DType::BF16)
                    .unwrap()
                    .to_dtype(DType::F32)
                    .unwrap(),
            )
        };
        assert_eq!(round(parts.dequantize(n)), want, "host reference");
        for (name, got) in [
            ("kernel", t.dequantize(DType::BF16).unwrap()),
            ("composite", t.dequantize_composite(DType::BF16).unwrap()),
        ] {
            assert_eq!(got.dims(), weight.dims(), "{name}");
            assert_eq!(got.dtype(), DType::BF16, "{name}");
            assert_eq!(
                vec::<f32>(&got.to_dtype(DType::F32).unwrap()),
                want,
                "{name}"
            );
        }
        let ours = Nf4Tensor::quantize(weight, &Device::Cpu).unwrap();
        assert_eq!(ours.dtype(), DType::BF16);
        let ours = ours.dequantize(DType::BF16).unwrap().to_dtype(DType::F32);
        let ours = vec::<f32>(&ours.unwrap());
        let differing = ours.iter().zip(&want).filter(|(a, b)| a != b).count();
        assert!(differing <= 2 * BLOCK, "{differing} values differ");
    }

    #[test]
    fn odd_sizes_and_zero_blocks_round_trip_within_the_format_error() {
        for n in [1, 63, 65, 64 * 256 + 1, 3 * 64 * 256 + 129] {
            let values: Vec<f32> = (0..n)
                .map(|i| match i % 97 {
                    0..=9 => 0.0,
                    k => ((i * 31 % 17) as f32 - 8.0) * 0.01 * k as f32,
                })
                .collect();
            let parts = Nf4Parts::quantize(&values);
            parts.check(n).unwrap();
            let back = parts.dequantize(n);
            for (b, (chunk, got)) in values.chunks(BLOCK).zip(back.chunks(BLOCK)).enumerate() {
                let absmax = chunk.iter().fold(0f32, |m, v| m.max(v.abs()));
                // Half the widest gap between NF4 values, plus the absmax's own 8-bit error.
                let bound = absmax * 0.16 + 1e-3;
                for (v, g) in chunk.iter().zip(got) {
                    assert!((v - g).abs() <= bound, "n {n} block {b}: {v} -> {g}");
                }
            }
        }
    }

    #[test]
    fn mismatched_parts_are_named() {
        let mut parts = Nf4Parts::quantize(&[0.5; 130]);
        parts.absmax.pop();
        let e = parts.check(130).unwrap_err();
        assert_eq!(
            e.to_string(),
            "absmax holds 2 values, a tensor of 130 elements needs 3"
        );
    }
}
