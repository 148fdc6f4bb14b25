// Attention kernels: the causal softmax of the matmul path (one warp per row, below), and the
// flash kernels, which never hold the T×T probabilities: f32 SIMT (flash_attention.cuh) and
// tensor cores for bf16 and f16 (flash_mma.cuh), and on Hopper for bf16 (flash_wgmma.cuh).
//
// Launched from src/attention/softmax.rs (the causal softmax) and src/attention/flash.rs.

#include "common.cuh"

// ---------------------------------------------------------------------------------------------
// Causal softmax over attention scores [.., q_len, kv_len]: row r is query r % q_len at
// position kv_len - q_len + r % q_len and sees keys up to it, the last `window` of them where
// window > 0, and from its segment's start where `starts` is not null (packed rows: starts is
// u32 [batch, kv_len], each position's segment start, `per_batch` score rows per batch row).
// p = softmax(attention_logit(s)), 0 for the keys not seen; `cap` > 0 soft-caps the scaled
// scores (common.cuh).

__device__ __forceinline__ int visible_keys(int row, int q_len, int kv_len) {
  return kv_len - q_len + row % q_len + 1;
}

// The first key row `row`, which sees keys up to n − 1, attends to. The same for every lane
// of the row's warp.
__device__ __forceinline__ int first_key(int row, int n, int kv_len, int window,
                                         const unsigned* starts, int per_batch) {
  const int first = window > 0 ? max(0, n - window) : 0;
  if (starts == nullptr) return first;
  const int start = (int)starts[(size_t)(row / per_batch) * kv_len + n - 1];
  return min(max(first, start), n - 1);
}

#define SEGMENT_ARGS const unsigned *starts, int per_batch

// The first element of this lane's first access: accesses start at multiples of 32 · W (from
// the block of them that holds key `first`) plus lane · W.
template <int W> __device__ __forceinline__ int first_access(int first) {
  return first / (32 * W) * (32 * W) + (threadIdx.x & 31) * W;
}

// W elements per access (W = WIDE<T> where rows are 16-byte aligned). The forward takes the
// row's max and sum in one online pass and writes in a second.
template <typename T, int W>
__device__ void causal_softmax_fwd(const T* s, T* p, int rows, int q_len, int kv_len,
                                   float scale, float cap, int window, SEGMENT_ARGS) {
  using P = Pack<T, W>;
  const int row = warp_row(rows);
  if (row < 0) return;  // the whole warp leaves together
  const int lane = threadIdx.x & 31;
  const size_t off = (size_t)row * kv_len;
  const int n = visible_keys(row, q_len, kv_len);
  const int first = first_key(row, n, kv_len, window, starts, per_batch);
  // Online max and sum of exp over the logits of the visible keys.
  float m = -INFINITY, sum = 0.f;
  for (int j = first_access<W>(first); j < n; j += 32 * W) {
    const P v = P::load(s + off + j);
#pragma unroll
    for (int k = 0; k < W; ++k) {
      if (j + k >= n) break;
      if (j + k < first) continue;
      const float x = attention_logit(to_f32(v.e[k]), scale, cap);
      if (x > m) {
        sum = sum * __expf(m - x) + 1.f;
        m = x;
      } else {
        sum += __expf(x - m);
      }
    }
  }
  const float row_max = warp_max(m);
  // Key first is visible to every row, so row_max is finite; lanes that saw no key add
  // nothing.
  const float inv = 1.f / warp_sum(m == -INFINITY ? 0.f : sum * __expf(m - row_max));
  for (int j = lane * W; j < kv_len; j += 32 * W) {
    const P v = P::load(s + off + j);
    P out;
#pragma unroll
    for (int k = 0; k < W; ++k) {
      const bool seen = j + k < n && j + k >= first;
      const float x = seen ? attention_logit(to_f32(v.e[k]), scale, cap) : 0.f;
      out.e[k] = from_f32<T>(seen ? __expf(x - row_max) * inv : 0.f);
    }
    out.store(p + off + j);
  }
}

// ds = p * (dp - sum(p * dp)) * scale, times the soft-cap's slope 1 − tanh² of the raw score
// s where cap > 0 (s is read only then).
template <typename T, int W>
__device__ void causal_softmax_bwd(const T* p, const T* dp, const T* s, T* ds, int rows,
                                   int q_len, int kv_len, float scale, float cap, int window,
                                   SEGMENT_ARGS) {
  using P = Pack<T, W>;
  const int row = warp_row(rows);
  if (row < 0) return;
  const int lane = threadIdx.x & 31;
  const size_t off = (size_t)row * kv_len;
  const int n = visible_keys(row, q_len, kv_len);
  const int first = first_key(row, n, kv_len, window, starts, per_batch);
  float dot = 0.f;
  for (int j = first_access<W>(first); j < n; j += 32 * W) {
    const P pv = P::load(p + off + j), dv = P::load(dp + off + j);
#pragma unroll
    for (int k = 0; k < W; ++k)
      if (j + k < n && j + k >= first) dot += to_f32(pv.e[k]) * to_f32(dv.e[k]);
  }
  dot = warp_sum(dot);
  for (int j = lane * W; j < kv_len; j += 32 * W) {
    const P pv = P::load(p + off + j), dv = P::load(dp + off + j);
    P slope;
    if (cap > 0.f) slope = P::load(s + off + j);
    P out;
#pragma unroll
    for (int k = 0; k < W; ++k) {
      const float pk = to_f32(pv.e[k]);
      float g = pk * (to_f32(dv.e[k]) - dot) * scale;
      if (cap > 0.f) {
        const float t = tanhf(to_f32(slope.e[k]) * scale / cap);
        g *= 1.f - t * t;
      }
      out.e[k] = from_f32<T>(j + k < n && j + k >= first ? g : 0.f);
    }
    out.store(ds + off + j);
  }
}

#include "flash_attention.cuh"
#include "flash_mma.cuh"
#include "flash_wgmma.cuh"

// extern "C" entry points, one per dtype.

#define ATTENTION_ENTRY_POINTS(S, T)                                                           \
  extern "C" __global__ void causal_softmax_fwd_##S(const T* s, T* p, int rows, int q_len,    \
                                                    int kv_len, float scale, float cap,       \
                                                    int window, SEGMENT_ARGS) {               \
    causal_softmax_fwd<T, 1>(s, p, rows, q_len, kv_len, scale, cap, window, starts,           \
                             per_batch);                                                      \
  }                                                                                           \
  extern "C" __global__ void causal_softmax_fwd_wide_##S(const T* s, T* p, int rows,          \
                                                         int q_len, int kv_len, float scale,  \
                                                         float cap, int window,               \
                                                         SEGMENT_ARGS) {                      \
    causal_softmax_fwd<T, WIDE<T>>(s, p, rows, q_len, kv_len, scale, cap, window, starts,     \
                                   per_batch);                                                \
  }                                                                                           \
  extern "C" __global__ void causal_softmax_bwd_##S(const T* p, const T* dp, const T* s,      \
                                                    T* ds, int rows, int q_len, int kv_len,   \
                                                    float scale, float cap, int window,       \
                                                    SEGMENT_ARGS) {                           \
    causal_softmax_bwd<T, 1>(p, dp, s, ds, rows, q_len, kv_len, scale, cap, window, starts,   \
                             per_batch);                                                      \
  }                                                                                           \
  extern "C" __global__ void causal_softmax_bwd_wide_##S(                                   \
      const T* p, const T* dp, const T* s, T* ds, int rows, int q_len, int kv_len,            \
      float scale, float cap, int window, SEGMENT_ARGS) {                                     \
    causal_softmax_bwd<T, WIDE<T>>(p, dp, s, ds, rows, q_len, kv_len, scale, cap, window,     \
                                   starts, per_batch);                                        \
  }

FOR_EACH_FLOAT(ATTENTION_ENTRY_POINTS)
FOR_EACH_FLOAT(FLASH_ENTRY_POINTS)
FLASH_MMA_ENTRY_POINTS(bf16, __nv_bfloat16)
FLASH_MMA_ENTRY_POINTS(f16, __half)
