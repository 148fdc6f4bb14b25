// Attention kernels: the causal softmax of the matmul path (one warp per row, below), and the
// flash kernels, which never hold the T×T probabilities: f32 SIMT (flash_attention.cuh) and
// tensor cores for bf16 and f16 (flash_mma.cuh).
//
// Launched from src/attention/softmax.rs (the causal softmax) and src/attention/flash.rs.

#include "common.cuh"

// ---------------------------------------------------------------------------------------------
// Causal softmax over attention scores [.., q_len, kv_len]: row r is query r % q_len at
// position kv_len - q_len + r % q_len and sees keys up to it. p = softmax(s * scale), 0 beyond.

__device__ __forceinline__ int visible_keys(int row, int q_len, int kv_len) {
  return kv_len - q_len + row % q_len + 1;
}

// W elements per access (W = WIDE<T> where rows are 16-byte aligned). The forward takes the
// row's max and sum in one online pass and writes in a second.
template <typename T, int W>
__device__ void causal_softmax_fwd(const T* s, T* p, int rows, int q_len, int kv_len,
                                   float scale) {
  using P = Pack<T, W>;
  const int row = warp_row(rows);
  if (row < 0) return;  // the whole warp leaves together
  const int lane = threadIdx.x & 31;
  const size_t off = (size_t)row * kv_len;
  const int n = visible_keys(row, q_len, kv_len);
  // Online max and sum of exp over the scaled scores of the visible keys.
  float m = -INFINITY, sum = 0.f;
  for (int j = lane * W; j < n; j += 32 * W) {
    const P v = P::load(s + off + j);
#pragma unroll
    for (int k = 0; k < W; ++k) {
      if (j + k >= n) break;
      const float x = to_f32(v.e[k]) * scale;
      if (x > m) {
        sum = sum * __expf(m - x) + 1.f;
        m = x;
      } else {
        sum += __expf(x - m);
      }
    }
  }
  const float row_max = warp_max(m);
  // Key 0 is visible to every row, so row_max is finite; lanes that saw no key add nothing.
  const float inv = 1.f / warp_sum(m == -INFINITY ? 0.f : sum * __expf(m - row_max));
  for (int j = lane * W; j < kv_len; j += 32 * W) {
    const P v = P::load(s + off + j);
    P out;
#pragma unroll
    for (int k = 0; k < W; ++k)
      out.e[k] = from_f32<T>(j + k < n ? __expf(to_f32(v.e[k]) * scale - row_max) * inv : 0.f);
    out.store(p + off + j);
  }
}

// ds = p * (dp - sum(p * dp)) * scale.
template <typename T, int W>
__device__ void causal_softmax_bwd(const T* p, const T* dp, T* ds, int rows, int q_len,
                                   int kv_len, float scale) {
  using P = Pack<T, W>;
  const int row = warp_row(rows);
  if (row < 0) return;
  const int lane = threadIdx.x & 31;
  const size_t off = (size_t)row * kv_len;
  const int n = visible_keys(row, q_len, kv_len);
  float dot = 0.f;
  for (int j = lane * W; j < n; j += 32 * W) {
    const P pv = P::load(p + off + j), dv = P::load(dp + off + j);
#pragma unroll
    for (int k = 0; k < W; ++k)
      if (j + k < n) dot += to_f32(pv.e[k]) * to_f32(dv.e[k]);
  }
  dot = warp_sum(dot);
  for (int j = lane * W; j < kv_len; j += 32 * W) {
    const P pv = P::load(p + off + j), dv = P::load(dp + off + j);
    P out;
#pragma unroll
    for (int k = 0; k < W; ++k) {
      const float pk = to_f32(pv.e[k]);
      out.e[k] = from_f32<T>(j + k < n ? pk * (to_f32(dv.e[k]) - dot) * scale : 0.f);
    }
    out.store(ds + off + j);
  }
}

#include "flash_attention.cuh"
#include "flash_mma.cuh"

// extern "C" entry points, one per dtype.

#define ATTENTION_ENTRY_POINTS(S, T)                                                           \
  extern "C" __global__ void causal_softmax_fwd_##S(const T* s, T* p, int rows, int q_len,    \
                                                    int kv_len, float scale) {                \
    causal_softmax_fwd<T, 1>(s, p, rows, q_len, kv_len, scale);                               \
  }                                                                                           \
  extern "C" __global__ void causal_softmax_fwd_wide_##S(const T* s, T* p, int rows,          \
                                                         int q_len, int kv_len, float scale) { \
    causal_softmax_fwd<T, WIDE<T>>(s, p, rows, q_len, kv_len, scale);                         \
  }                                                                                           \
  extern "C" __global__ void causal_softmax_bwd_##S(const T* p, const T* dp, T* ds, int rows, \
                                                    int q_len, int kv_len, float scale) {     \
    causal_softmax_bwd<T, 1>(p, dp, ds, rows, q_len, kv_len, scale);                          \
  }                                                                                           \
  extern "C" __global__ void causal_softmax_bwd_wide_##S(const T* p, const T* dp, T* ds,      \
                                                         int rows, int q_len, int kv_len,     \
                                                         float scale) {                       \
    causal_softmax_bwd<T, WIDE<T>>(p, dp, ds, rows, q_len, kv_len, scale);                    \
  }

FOR_EACH_FLOAT(ATTENTION_ENTRY_POINTS)
FOR_EACH_FLOAT(FLASH_ENTRY_POINTS)
FLASH_MMA_ENTRY_POINTS(bf16, __nv_bfloat16)
FLASH_MMA_ENTRY_POINTS(f16, __half)
