// Fused CUDA kernels for llmtool's hot ops, forward and backward: the one file build.rs compiles
// (cuda feature), into one PTX module that src/launch.rs loads through candle's CudaDevice.
//
// The kernels live in a file per family, each beside nothing but common.cuh (shared helpers),
// and each op's Rust launcher names the family file it launches:
//
//   norms.cu        RMSNorm (weight w or offset + w) forward and backward, the residual add
//                   with RMSNorm
//   rope_kv.cu      RoPE (whole or partial heads), the split of packed q/k/v projections
//                   into the KV cache
//   swiglu.cu       SwiGLU and GeGLU forward and backward (separate and packed halves)
//   loss.cu         cross-entropy: per-row NLL, its logits' gradient, both in one pass
//   embedding.cu    the embedding table's gradient
//   adamw.cu        the multi-tensor AdamW step and sum of squares
//   attention.cu    the causal softmax (scale, soft-cap, window), and the flash kernels of flash_attention.cuh (f32)
//                   and flash_mma.cuh (tensor cores)
//   decode.cu       decode attention over a KV cache, the matrix-vector products
//   elementwise.cu  the head split/merge copy, add, scale, dtype casts
//   nf4.cu          NF4 (QLoRA base) dequantization and the 4-bit matrix-vector product
//   lora.cu         LoRA's products with a dropped input, the masks drawn inside

#include "norms.cu"
#include "rope_kv.cu"
#include "swiglu.cu"
#include "loss.cu"
#include "embedding.cu"
#include "adamw.cu"
#include "attention.cu"
#include "decode.cu"
#include "elementwise.cu"
#include "nf4.cu"
#include "lora.cu"
