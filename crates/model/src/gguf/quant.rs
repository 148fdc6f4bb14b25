//! Which GGML type each tensor is stored in, for each `--quant`.

use candle_core::quantized::GgmlDType;

pub(crate) const F32: GgmlDType = GgmlDType::F32;

/// The file types `llmtool export --quant` writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Quant {
    /// Matrices in f16 (`MOSTLY_F16`).
    F16,
    /// Matrices in bf16 (`MOSTLY_BF16`).
    Bf16,
    /// Matrices in 8-bit blocks of 32 with an f16 scale (`MOSTLY_Q8_0`).
    Q8_0,
    /// Q4_K for most matrices, Q6_K where llama.cpp's `Q4_K_M` keeps more bits.
    Q4KM,
}

impl Quant {
    /// `general.file_type` (llama.cpp's `LLAMA_FTYPE_MOSTLY_*`).
    pub fn file_type(self) -> u32 {
        match self {
            Quant::F16 => 1,
            Quant::Q8_0 => 7,
            Quant::Q4KM => 15,
            Quant::Bf16 => 32,
        }
    }

    /// Whether the file holds block-quantized tensors (`general.quantization_version`).
    pub fn is_quantized(self) -> bool {
        matches!(self, Quant::Q8_0 | Quant::Q4KM)
    }
}

/// Counts of tensors seen so far that llama.cpp's choice depends on.
#[derive(Debug, Default)]
pub struct Counters {
    attn_v: usize,
}

/// llama.cpp's `use_more_bits`: the first and last eighth of the layers and every third one
/// between them.
fn use_more_bits(i: usize, n: usize) -> bool {
    let (i, n) = (i as i64, n as i64);
    i < n / 8 || i >= 7 * n / 8 || (i - n / 8) % 3 == 2
}

fn layer_of(name: &str) -> usize {
    name.strip_prefix("blk.")
        .and_then(|r| r.split('.').next())
        .and_then(|i| i.parse().ok())
        .unwrap_or(0)
}

/// The type of tensor `name` of shape `dims` in a file of `quant`, as llama.cpp's converter
/// (f16, bf16, q8_0) and `llama-quantize` (Q4_K_M) choose it: vectors stay f32; for Q4_K_M
/// the output head (the embedding when tied) is Q6_K, attn_v and ffn_down are Q6_K in the
/// layers `use_more_bits` picks, Phi-3's fused attn_qkv is Q5_K, the rest Q4_K. A row width
/// the block does not divide falls back as llama.cpp does: Q4_K to Q5_0, Q5_K to Q5_1, Q6_K
/// to Q8_0, and Q8_0 (or a fallback it does not divide either) to f16.
pub fn tensor_type(
    quant: Quant,
    name: &str,
    dims: &[usize],
    layers: usize,
    has_output: bool,
    counters: &mut Counters,
) -> GgmlDType {
    if dims.len() < 2 {
        return F32;
    }
    let ty = match quant {
        Quant::F16 => GgmlDType::F16,
        Quant::Bf16 => GgmlDType::BF16,
        Quant::Q8_0 => GgmlDType::Q8_0,
        Quant::Q4KM => {
            let output = name == "output.weight" || (!has_output && name == "token_embd.weight");
            if output {
                GgmlDType::Q6K
            } else if name.ends_with("attn_v.weight") {
                counters.attn_v += 1;
                match use_more_bits(counters.attn_v - 1, layers) {
                    true => GgmlDType::Q6K,
                    false => GgmlDType::Q4K,
                }
            } else if name.ends_with("ffn_down.weight") && use_more_bits(layer_of(name), layers) {
                GgmlDType::Q6K
            } else if name.ends_with("attn_qkv.weight") {
                GgmlDType::Q5K
            } else {
                GgmlDType::Q4K
            }
        }
    };
    let row = dims[dims.len() - 1];
    let fits = |t: GgmlDType| row % t.block_size() == 0;
    if fits(ty) {
        return ty;
    }
    let fallback = match ty {
        GgmlDType::Q4K => GgmlDType::Q5_0,
        GgmlDType::Q5K => GgmlDType::Q5_1,
        GgmlDType::Q6K => GgmlDType::Q8_0,
        _ => GgmlDType::F16,
    };
    match fits(fallback) {
        true => fallback,
        false => GgmlDType::F16,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn q4_k_m_follows_llama_quantize() {
        let mut c = Counters::default();
        let mut t = |name: &str, dims: &[usize], tied: bool| {
            tensor_type(Quant::Q4KM, name, dims, 8, !tied, &mut c)
        };
        assert_eq!(t("output.weight", &[512, 256], false), GgmlDType::Q6K);
        assert_eq!(t("token_embd.weight", &[512, 256], false), GgmlDType::Q4K);
        assert_eq!(t("token_embd.weight", &[512, 256], true), GgmlDType::Q6K);
        assert_eq!(t("blk.0.attn_norm.weight", &[256], false), GgmlDType::F32);
        assert_eq!(t("blk.0.attn_q.weight", &[256, 256], false), GgmlDType::Q4K);
        // 8 layers: use_more_bits picks 0, 3, 6, 7.
        let v: Vec<_> = (0..8)
            .map(|i| t(&format!("blk.{i}.attn_v.weight"), &[256, 256], false))
            .collect();
        let six: Vec<bool> = v.iter().map(|&d| d == GgmlDType::Q6K).collect();
        assert_eq!(six, [true, false, false, true, false, false, true, true]);
        assert_eq!(
            t("blk.3.ffn_down.weight", &[256, 512], false),
            GgmlDType::Q6K
        );
        assert_eq!(
            t("blk.4.ffn_down.weight", &[256, 512], false),
            GgmlDType::Q4K
        );
        // Rows that 256 does not divide fall back.
        assert_eq!(t("blk.1.attn_q.weight", &[64, 64], false), GgmlDType::Q5_0);
        assert_eq!(t("output.weight", &[320, 64], false), GgmlDType::Q8_0);
        assert_eq!(t("blk.1.attn_q.weight", &[16, 16], false), GgmlDType::F16);
    }

    #[test]
    fn q8_0_falls_back_to_f16() {
        let mut c = Counters::default();
        assert_eq!(
            tensor_type(
                Quant::Q8_0,
                "blk.0.attn_q.weight",
                &[64, 64],
                2,
                true,
                &mut c
            ),
            GgmlDType::Q8_0
        );
        assert_eq!(
            tensor_type(
                Quant::Q8_0,
                "blk.0.attn_q.weight",
                &[48, 16],
                2,
                true,
                &mut c
            ),
            GgmlDType::F16
        );
        assert_eq!(
            tensor_type(
                Quant::F16,
                "blk.0.attn_q.weight",
                &[48, 16],
                2,
                true,
                &mut c
            ),
            GgmlDType::F16
        );
    }
}
