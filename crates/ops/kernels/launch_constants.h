// Sizes that a kernel and its Rust launcher must agree on, written once. build.rs turns each
// `constexpr int NAME = VALUE;` line below into `pub(crate) const NAME: usize = VALUE;` of
// `launch::constants` (src/launch.rs), with the `//` lines right above it as its doc comment,
// so the launchers read these values instead of repeating them. A value is an integer literal;
// build.rs stops on any other line that starts with `constexpr`.

#pragma once

// Threads of a block of the one-kernel decode step (decode.cu): one block a head, as many
// threads as a block can have.
constexpr int DECODE_THREADS = 1024;

// Elements of a row that one block of greedy decoding's argmax reduces (decode.cu).
constexpr int ARGMAX_CHUNK = 4096;

// Words per parameter in AdamW's descriptor table (adamw.cu).
constexpr int ADAMW_WORDS = 8;

// The most parts one launch of the masked LoRA kernels takes (lora.cu).
constexpr int LORA_PARTS = 4;

// Threads of a block of the loss kernel that holds its rows in registers (loss.cu).
constexpr int HELD_THREADS = 512;
// 16-byte words of a row each thread of that kernel holds.
constexpr int HELD_WORDS = 8;

// 16-byte packs a thread of `add_rms_norm_wide` holds at most (norms.cu).
constexpr int ADD_NORM_PACKS = 4;
// That kernel's most threads a block (its `__launch_bounds__`): with 1,024 the packs'
// registers, 64-96 a thread on sm_90, exceed a block's.
constexpr int ADD_NORM_WIDE_THREADS = 512;

// Warps of a block of the RMSNorm gradients' kernel that holds its rows in registers
// (norms.cu).
constexpr int HELD_NORM_WARPS = 12;

// Query rows (and keys) a tile of the flash attention kernels (flash_attention.cuh).
constexpr int FA_TILE = 64;
// Threads of a block of the tensor-core flash kernels (flash_mma.cuh) and of the masked LoRA
// kernels (lora.cu): four warps.
constexpr int FM_THREADS = 128;

// Elements each thread of the NF4 dequantization expands (nf4.cu).
constexpr int NF4_PER_THREAD = 16;
// The most rows of x the NF4 matrix-vector kernel takes (nf4.cu).
constexpr int NF4_GEMV_ROWS = 8;
