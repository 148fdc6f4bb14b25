// Rotary position embedding, and the split of a decode step's packed q/k/v projection into
// rotated queries and the KV cache.
//
// Launched from src/rope.rs (also for the self-attention of src/attention/flash.rs) and
// src/kv_write.rs (write_kv).

#include "common.cuh"

// ---------------------------------------------------------------------------------------------
// RoPE, rotate-half layout: x is rows of d with row = ((b * seq + pos) * heads + h) (heads
// rows per position: [b, t, heads, d]; heads = 1 for [b, heads, t, d]), a position's rows
// x_tok elements after the last one's (heads * d where contiguous; wider in the columns of a
// packed q/k/v projection), and y likewise with y_tok; cos/sin are [seq, rotary/2]. The first
// `rotary` elements of each row are rotated, the rest copied (partial rotary; rotary = d
// rotates whole rows). Only the first `rotated` heads of a position rotate; the rest are copied
// whole (a packed projection's values beside its keys). `sign` -1 rotates backwards (the
// gradient). Each thread takes W rotation pairs (copied as they are in a copied head), or W
// copied elements past the rotated ones; each reads only what it writes, so y may be x.
// Heads from `split` on are read from rest_x and written to rest_y instead (their own first
// head at head `split`, positions rest_x_tok and rest_y_tok apart): one launch for two runs of heads that lie
// apart, as a packed projection's queries and keys do from their gradients.

template <typename T, int W>
__device__ void rope(const T* x, const T* cos, const T* sin, T* y, int rows, int d, int rotary,
                     int seq, int heads, int rotated, long long x_tok, long long y_tok,
                     float sign, int split, const T* rest_x, T* rest_y,
                     long long rest_x_tok, long long rest_y_tok) {
  using P = Pack<T, W>;
  const int half = rotary / 2, groups = half / W, items = groups + (d - rotary) / W;
  const size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= (size_t)rows * items) return;
  const size_t row = i / items;
  const int item = (int)(i % items);
  const size_t position = row / heads, head = row % heads;
  if (head < (size_t)split) {
    x += position * x_tok + head * d;
    y += position * y_tok + head * d;
  } else {
    x = rest_x + position * rest_x_tok + (head - split) * d;
    y = rest_y + position * rest_y_tok + (head - split) * d;
  }
  if (item >= groups) {
    const size_t at = rotary + (size_t)(item - groups) * W;
    P::load(x + at).store(y + at);
    return;
  }
  const int j = item * W, pos = position % seq;
  const P a = P::load(x + j), b = P::load(x + half + j);
  if (head >= (size_t)rotated) {
    a.store(y + j);
    b.store(y + half + j);
    return;
  }
  const P c = P::load(cos + pos * half + j), sn = P::load(sin + pos * half + j);
  P y1, y2;
#pragma unroll
  for (int k = 0; k < W; ++k) {
    const float ck = to_f32(c.e[k]), sk = sign * to_f32(sn.e[k]);
    const float x1 = to_f32(a.e[k]), x2 = to_f32(b.e[k]);
    y1.e[k] = from_f32<T>(x1 * ck - x2 * sk);
    y2.e[k] = from_f32<T>(x2 * ck + x1 * sk);
  }
  y1.store(y + j);
  y2.store(y + half + j);
}

// Splits packed projections for inference: rotates the queries (as `rope` does) into q_out
// [b, heads, t, d] and writes the rotated keys and the values into a KV cache. qkv is
// [b, t, (heads + 2 kv_heads) * d] (queries, then keys, then values, as the stacked projection
// outputs them); the first `rotary` elements of each query and key head are rotated (partial
// rotary; rotary = d rotates whole heads), the rest copied; cos and sin are [t, rotary / 2];
// cache is [2, b, kv_heads, max_len, d] (keys, then values), written at positions
// start..start + t. One thread per (batch, position, query or kv head, pair of elements: a
// rotation pair, or two copied elements past the rotated ones). With `position` (a decode step
// replayed from a CUDA graph, t = 1) the start is read from it instead, and cos and sin are the
// whole [max positions, rotary / 2] tables; a position past the cache writes nothing.
template <typename T>
__device__ void write_kv(const T* qkv, const T* cos, const T* sin, T* q_out, T* cache, int b,
                         int t, int heads, int kv_heads, int d, int rotary, int max_len,
                         int start, const uint32_t* position) {
  const int half = d / 2, rhalf = rotary / 2;
  const size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= (size_t)b * t * (heads + kv_heads) * half) return;
  if (position != nullptr) {
    if (*position + t > (uint32_t)max_len) return;
    start = *position;
    cos += (size_t)start * rhalf;
    sin += (size_t)start * rhalf;
  }
  const int j = i % half;
  size_t r = i / half;
  const int head = r % (heads + kv_heads);
  r /= heads + kv_heads;
  const int pos = r % t, batch = r / t;
  const T* row = qkv + ((size_t)batch * t + pos) * (heads + 2 * kv_heads) * d;
  const T* x = row + (size_t)head * d;  // a query head, or (past the queries) a key head
  T* dst;
  if (head < heads) {
    dst = q_out + (((size_t)batch * heads + head) * t + pos) * d;
  } else {
    const int kv = head - heads;
    const size_t slot = (((size_t)batch * kv_heads + kv) * max_len + start + pos) * d;
    dst = cache + slot;
    T* vc = cache + (size_t)b * kv_heads * max_len * d + slot;
    const T* v = row + (size_t)(heads + kv_heads + kv) * d;
    vc[j] = v[j];
    vc[half + j] = v[half + j];
  }
  if (j < rhalf) {
    const T *c = cos + pos * rhalf, *s = sin + pos * rhalf;
    dst[j] = rope_element(x, c, s, j, rhalf);
    dst[rhalf + j] = rope_element(x, c, s, rhalf + j, rhalf);
  } else {  // past the rotated elements: 2j and 2j + 1 are in [rotary, d)
    dst[2 * j] = x[2 * j];
    dst[2 * j + 1] = x[2 * j + 1];
  }
}

// extern "C" entry points, one per dtype.

#define ROPE_KV_ENTRY_POINTS(S, T)                                                             \
  extern "C" __global__ void write_kv_##S(const T* qkv, const T* cos, const T* sin, T* q_out, \
                                          T* cache, int b, int t, int heads, int kv_heads,    \
                                          int d, int rotary, int max_len, int start,          \
                                          const uint32_t* position) {                         \
    write_kv<T>(qkv, cos, sin, q_out, cache, b, t, heads, kv_heads, d, rotary, max_len,       \
                start, position);                                                             \
  }                                                                                           \
  extern "C" __global__ void rope_##S(const T* x, const T* cos, const T* sin, T* y, int rows, \
                                      int d, int rotary, int seq, int heads, int rotated,     \
                                      long long x_tok, long long y_tok, float sign,           \
                                      int split, const T* rest_x, T* rest_y,                  \
                                      long long rest_x_tok, long long rest_y_tok) {           \
    rope<T, 1>(x, cos, sin, y, rows, d, rotary, seq, heads, rotated, x_tok, y_tok, sign,      \
               split, rest_x, rest_y, rest_x_tok, rest_y_tok);                                \
  }                                                                                           \
  extern "C" __global__ void rope_wide_##S(const T* x, const T* cos, const T* sin, T* y,      \
                                           int rows, int d, int rotary, int seq, int heads,   \
                                           int rotated, long long x_tok, long long y_tok,     \
                                           float sign, int split, const T* rest_x,            \
                                           T* rest_y, long long rest_x_tok,                   \
                                           long long rest_y_tok) {                            \
    rope<T, WIDE<T>>(x, cos, sin, y, rows, d, rotary, seq, heads, rotated, x_tok, y_tok,      \
                     sign, split, rest_x, rest_y, rest_x_tok, rest_y_tok);                    \
  }

FOR_EACH_FLOAT(ROPE_KV_ENTRY_POINTS)
