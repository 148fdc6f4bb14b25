//! 4-bit base weights (QLoRA): which tensors are quantized when a model loads with
//! [`WeightStorage::Nf4`], and reading checkpoints that bitsandbytes already quantized.
//!
//! A bitsandbytes checkpoint (`save_pretrained` of a model loaded with `load_in_4bit=True`,
//! `bnb_4bit_quant_type="nf4"`, `bnb_4bit_use_double_quant=True`) stores each quantized
//! projection `X.weight` as packed u8 codes, beside `X.weight.absmax` (u8),
//! `X.weight.quant_map` (the 16 NF4 values), `X.weight.nested_absmax`,
//! `X.weight.nested_quant_map` (the dynamic map) and `X.weight.quant_state.bitsandbytes__nf4`
//! (JSON bytes: shape, dtype, block sizes, nested offset). [`Bnb4bit`] gathers those tensors as
//! the files are read and builds [`Nf4Tensor`]s from them, bit for bit, with no pass through
//! 16 bits.

use crate::names::{Fused, Projection};
use crate::weights::ModelError;
use candle_core::{DType, Device, Shape};
use ops::nf4::{self, Nf4Parts, Nf4Tensor};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// How a model's frozen weights are held in memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightStorage {
    /// Every floating-point tensor in this dtype.
    Dense(DType),
    /// The blocks' projections as NF4, everything else (embeddings, norms, the output head)
    /// in this dtype.
    Nf4(DType),
}

impl WeightStorage {
    /// The dtype of the tensors kept dense.
    pub fn dense_dtype(self) -> DType {
        match self {
            Self::Dense(d) | Self::Nf4(d) => d,
        }
    }
}

impl From<DType> for WeightStorage {
    fn from(dtype: DType) -> Self {
        Self::Dense(dtype)
    }
}

/// Whether `name` is the weight of a block's projection (`model.layers.3.mlp.up_proj.weight`,
/// or a stacked `qkv_proj`/`gate_up_proj`): the tensors a 4-bit base quantizes.
pub fn is_projection_weight(name: &str) -> bool {
    let Some(module) = name
        .strip_prefix("model.layers.")
        .and_then(|rest| rest.split_once('.'))
        .filter(|(layer, _)| layer.parse::<usize>().is_ok())
        .and_then(|(_, rest)| rest.strip_suffix(".weight"))
    else {
        return false;
    };
    Projection::ALL.iter().any(|p| p.module() == module)
        || [Fused::Qkv, Fused::GateUp]
            .iter()
            .any(|f| f.module() == module)
}

/// The suffixes of the tensors bitsandbytes stores beside a 4-bit weight.
const ABSMAX: &str = ".absmax";
const QUANT_MAP: &str = ".quant_map";
const NESTED_ABSMAX: &str = ".nested_absmax";
const NESTED_QUANT_MAP: &str = ".nested_quant_map";
const QUANT_STATE: &str = ".quant_state.bitsandbytes__";

/// A tensor as read from a file, on the host: its dtype, shape and little-endian bytes.
#[derive(Debug, Clone)]
pub struct RawTensor {
    /// The stored element type.
    pub dtype: safetensors::Dtype,
    /// The dimensions, outermost first.
    pub shape: Vec<usize>,
    /// The elements as little-endian bytes.
    pub data: Vec<u8>,
}

/// The tensors of bitsandbytes' 4-bit weights, gathered across a checkpoint's files.
#[derive(Debug, Default)]
pub struct Bnb4bit {
    /// By the weight's name (`X.weight`), each of its tensors by suffix (`""` for the codes).
    parts: HashMap<String, HashMap<String, (RawTensor, PathBuf)>>,
}

/// The JSON bitsandbytes stores as `quant_state.bitsandbytes__nf4`.
#[derive(Debug, serde::Deserialize)]
struct QuantState {
    quant_type: String,
    blocksize: usize,
    dtype: String,
    shape: Vec<usize>,
    nested_blocksize: Option<usize>,
    nested_offset: Option<f32>,
}

impl Bnb4bit {
    /// Takes `name` if it is one of bitsandbytes' 4-bit tensors (the packed codes are any u8
    /// `*.weight`, which no unquantized model has); returns whether it did.
    pub fn take(&mut self, name: &str, raw: impl FnOnce() -> RawTensor, path: &Path) -> bool {
        let (weight, suffix) = if let Some(at) = name.find(QUANT_STATE) {
            (&name[..at], &name[at..])
        } else if let Some(w) = [ABSMAX, QUANT_MAP, NESTED_ABSMAX, NESTED_QUANT_MAP]
            .iter()
            .find_map(|s| name.strip_suffix(s).map(|w| (w, *s)))
            .filter(|(w, _)| w.ends_with(".weight"))
        {
            w
        } else {
            return false;
        };
        self.parts
            .entry(weight.to_string())
            .or_default()
            .insert(suffix.to_string(), (raw(), path.to_path_buf()));
        true
    }

    /// Takes the packed codes `name` (a u8 `*.weight`) of a 4-bit weight.
    pub fn take_codes(&mut self, name: &str, raw: RawTensor, path: &Path) {
        self.parts
            .entry(name.to_string())
            .or_default()
            .insert(String::new(), (raw, path.to_path_buf()));
    }

    /// Builds every gathered weight on `device`, by name. Fails, naming the file and tensor,
    /// on a weight with a part missing, a format other than NF4 with double quantization, or
    /// parts that do not fit the shape its quant state gives.
    pub fn build(self, device: &Device) -> Result<HashMap<String, Nf4Tensor>, ModelError> {
        let mut out = HashMap::new();
        for (weight, parts) in self.parts {
            let tensor = build_one(&weight, &parts, device)?;
            out.insert(weight, tensor);
        }
        Ok(out)
    }
}

/// One weight's [`Nf4Tensor`] from its bitsandbytes tensors.
fn build_one(
    weight: &str,
    parts: &HashMap<String, (RawTensor, PathBuf)>,
    device: &Device,
) -> Result<Nf4Tensor, ModelError> {
    let any_path = parts
        .values()
        .next()
        .map(|(_, p)| p.clone())
        .unwrap_or_default();
    let error = |path: &Path, message: String| ModelError::Config {
        path: path.to_path_buf(),
        message: format!("tensor {weight}: {message}"),
    };
    let (state_name, (state_raw, state_path)) = parts
        .iter()
        .find(|(suffix, _)| suffix.starts_with(QUANT_STATE))
        .ok_or_else(|| {
            error(
                &any_path,
                "packed 4-bit data without bitsandbytes' quant_state tensor".into(),
            )
        })?;
    let format = &state_name[QUANT_STATE.len()..];
    if format != "nf4" {
        return Err(error(
            state_path,
            format!("bitsandbytes {format} weights are not supported (nf4 only)"),
        ));
    }
    let state: QuantState = serde_json::from_slice(&state_raw.data)
        .map_err(|e| error(state_path, format!("quant_state is not valid JSON: {e}")))?;
    if state.quant_type != "nf4" || state.blocksize != nf4::BLOCK {
        return Err(error(
            state_path,
            format!(
                "quant_state: {} in blocks of {} (llmtool reads nf4 in blocks of {})",
                state.quant_type,
                state.blocksize,
                nf4::BLOCK
            ),
        ));
    }
    let (Some(nested_offset), Some(nf4::NESTED_BLOCK)) =
        (state.nested_offset, state.nested_blocksize)
    else {
        return Err(error(
            state_path,
            "quant_state: weights quantized without bnb_4bit_use_double_quant=True (or with \
             nested blocks other than 256) are not supported"
                .into(),
        ));
    };
    let dtype = match state.dtype.as_str() {
        "bfloat16" => DType::BF16,
        "float16" => DType::F16,
        "float32" => DType::F32,
        other => return Err(error(state_path, format!("quant_state: dtype {other}"))),
    };
    let part = |suffix: &str, want: safetensors::Dtype| {
        let (raw, path) = parts
            .get(suffix)
            .ok_or_else(|| error(state_path, format!("{weight}{suffix} is missing")))?;
        match raw.dtype == want {
            true => Ok((raw, path)),
            false => Err(error(
                path,
                format!("{weight}{suffix} is {:?}, expected {want:?}", raw.dtype),
            )),
        }
    };
    use safetensors::Dtype::{F32, U8};
    let f32s = |raw: &RawTensor| -> Vec<f32> {
        raw.data
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect()
    };
    let (quant_map, path) = part(QUANT_MAP, F32)?;
    if f32s(quant_map) != nf4::NF4_VALUES {
        return Err(error(path, "quant_map is not the NF4 code".into()));
    }
    let (nested_map, path) = part(NESTED_QUANT_MAP, F32)?;
    if f32s(nested_map) != nf4::dynamic_map() {
        return Err(error(
            path,
            "nested_quant_map is not bitsandbytes' dynamic map".into(),
        ));
    }
    let (codes, codes_path) = part("", U8)?;
    let parts = Nf4Parts {
        packed: codes.data.clone(),
        absmax: part(ABSMAX, U8)?.0.data.clone(),
        nested_absmax: f32s(part(NESTED_ABSMAX, F32)?.0),
        nested_offset,
    };
    let elements = state
        .shape
        .iter()
        .try_fold(1usize, |n, &d| n.checked_mul(d));
    if state.shape.len() != 2 || elements.is_none() {
        return Err(error(
            state_path,
            format!("quant_state: shape {:?} is not a matrix", state.shape),
        ));
    }
    let shape = Shape::from(state.shape.clone());
    parts
        .check(shape.elem_count())
        .map_err(|e| error(codes_path, format!("shape {:?}: {e}", state.shape)))?;
    Ok(Nf4Tensor::from_parts(parts, shape, dtype, device)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn projection_weights_are_the_blocks_linear_layers() {
        for yes in [
            "model.layers.0.self_attn.q_proj.weight",
            "model.layers.12.mlp.down_proj.weight",
            "model.layers.3.self_attn.qkv_proj.weight",
            "model.layers.3.mlp.gate_up_proj.weight",
        ] {
            assert!(is_projection_weight(yes), "{yes}");
        }
        for no in [
            "model.embed_tokens.weight",
            "lm_head.weight",
            "model.layers.0.input_layernorm.weight",
            "model.layers.0.self_attn.q_proj.bias",
            "model.layers.x.self_attn.q_proj.weight",
            "model.layers.0.self_attn.q_norm.weight",
        ] {
            assert!(!is_projection_weight(no), "{no}");
        }
    }
}
