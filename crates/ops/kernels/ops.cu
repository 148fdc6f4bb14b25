// Fused CUDA kernels for llmtool's hot ops, forward and backward. Compiled to PTX by build.rs
// (cuda feature) and loaded through candle's CudaDevice; the Rust side is src/ops/cuda.rs.
//
// Every kernel reads and writes its tensor dtype (f32, bf16 or f16: the `_f32`/`_bf16`/`_f16`
// suffix) and accumulates in f32, as the composite references in src/ops/reference.rs do.
// Row kernels run one block per row (the causal softmax one warp per row); blockDim.x is a
// multiple of 32 and at most 1024.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>
#include <type_traits>

__device__ __forceinline__ float to_f32(float x) { return x; }
__device__ __forceinline__ float to_f32(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_f32(__half x) { return __half2float(x); }

template <typename T> __device__ __forceinline__ T from_f32(float x);
template <> __device__ __forceinline__ float from_f32<float>(float x) { return x; }
template <> __device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float x) {
  return __float2bfloat16(x);
}
template <> __device__ __forceinline__ __half from_f32<__half>(float x) { return __float2half(x); }

// W consecutive elements of T, read and written as one memory access (16 bytes when W is
// WIDE<T>). Elementwise kernels take W = WIDE<T> where the launcher found the operands aligned
// and the sizes divisible, and W = 1 elsewhere.
template <typename T, int W> struct alignas(sizeof(T) * W) Pack {
  T e[W];
  __device__ __forceinline__ static Pack load(const T* p) {
    return *reinterpret_cast<const Pack*>(p);
  }
  __device__ __forceinline__ void store(T* p) const { *reinterpret_cast<Pack*>(p) = *this; }
};
template <typename T> constexpr int WIDE = 16 / sizeof(T);

// Sum (or max) over aligned groups of W lanes of a warp (the whole warp by default); every
// lane of a group gets its group's result.
template <int W = 32> __device__ __forceinline__ float warp_sum(float v) {
  for (int o = W / 2; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffff, v, o);
  return v;
}

template <int W = 32> __device__ __forceinline__ float warp_max(float v) {
  for (int o = W / 2; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffff, v, o));
  return v;
}

// Sum (or max) over the block; every thread gets the result.
template <bool MAX> __device__ float block_reduce(float v) {
  __shared__ float partial[32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  v = MAX ? warp_max(v) : warp_sum(v);
  __syncthreads();  // the previous call's readers are done with `partial`
  if (lane == 0) partial[warp] = v;
  __syncthreads();
  if (warp == 0) {
    float w = lane < warps ? partial[lane] : (MAX ? -INFINITY : 0.f);
    w = MAX ? warp_max(w) : warp_sum(w);
    if (lane == 0) partial[0] = w;
  }
  __syncthreads();
  return partial[0];
}

// The row of this thread's warp in kernels with one warp per row (so reductions are warp
// shuffles with no shared memory or block barriers), or -1 past the last row. blockDim.x / 32
// rows per block.
__device__ __forceinline__ int warp_row(int rows) {
  const int row = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
  return row < rows ? row : -1;
}

__device__ __forceinline__ float block_sum(float v) { return block_reduce<false>(v); }
__device__ __forceinline__ float block_max(float v) { return block_reduce<true>(v); }

// ---------------------------------------------------------------------------------------------
// RMSNorm: y = x * r * w with r = 1 / sqrt(mean(x^2) + eps), per row of `width`.

template <typename T>
__device__ float inverse_rms(const T* x, int width, float eps) {
  float ss = 0.f;
  for (int j = threadIdx.x; j < width; j += blockDim.x) {
    const float v = to_f32(x[j]);
    ss += v * v;
  }
  return rsqrtf(block_sum(ss) / width + eps);
}

// The training kernels below run one warp per row and read W elements per access (W = 1, or
// WIDE<T> where the rows and operands are 16-byte aligned).
template <typename T, int W>
__device__ float warp_inverse_rms(const T* x, int width, float eps) {
  float ss = 0.f;
  for (int j = (threadIdx.x & 31) * W; j < width; j += 32 * W) {
    const Pack<T, W> v = Pack<T, W>::load(x + j);
#pragma unroll
    for (int k = 0; k < W; ++k) ss += to_f32(v.e[k]) * to_f32(v.e[k]);
  }
  return rsqrtf(warp_sum(ss) / width + eps);
}

template <typename T, int W>
__device__ void rms_norm_fwd(const T* x, const T* w, T* y, int rows, int width, float eps) {
  using P = Pack<T, W>;
  const int row = warp_row(rows);
  if (row < 0) return;
  const size_t off = (size_t)row * width;
  const float r = warp_inverse_rms<T, W>(x + off, width, eps);
  for (int j = (threadIdx.x & 31) * W; j < width; j += 32 * W) {
    const P xv = P::load(x + off + j), wv = P::load(w + j);
    P out;
#pragma unroll
    for (int k = 0; k < W; ++k) out.e[k] = from_f32<T>(to_f32(xv.e[k]) * r * to_f32(wv.e[k]));
    out.store(y + off + j);
  }
}

// Residual add and RMSNorm for inference: out[0] = x + d (rounded to T, as the unfused add
// stores it) and out[1] = RMSNorm of that sum, in one pass per row. `out` is [2, rows, width].
template <typename T>
__device__ void add_rms_norm(const T* x, const T* d, const T* w, T* out, int rows, int width,
                             float eps) {
  const size_t off = (size_t)blockIdx.x * width;
  T* sum = out + off;
  T* y = out + (size_t)rows * width + off;
  // Each thread reads back only the elements it wrote.
  for (int j = threadIdx.x; j < width; j += blockDim.x)
    sum[j] = from_f32<T>(to_f32(x[off + j]) + to_f32(d[off + j]));
  const float r = inverse_rms(sum, width, eps);
  for (int j = threadIdx.x; j < width; j += blockDim.x)
    y[j] = from_f32<T>(to_f32(sum[j]) * r * to_f32(w[j]));
}

// dx = r * (g*w - x * r^2 * mean(g*w*x)).
template <typename T, int W>
__device__ void rms_norm_dx(const T* x, const T* w, const T* g, T* dx, int rows, int width,
                            float eps, float* r_out) {
  using P = Pack<T, W>;
  const int row = warp_row(rows);
  if (row < 0) return;
  const size_t off = (size_t)row * width;
  const float r = warp_inverse_rms<T, W>(x + off, width, eps);
  if (r_out != nullptr && (threadIdx.x & 31) == 0) r_out[row] = r;  // for the weight gradient
  const int first = (threadIdx.x & 31) * W;
  float dot = 0.f;
  for (int j = first; j < width; j += 32 * W) {
    const P xv = P::load(x + off + j), wv = P::load(w + j), gv = P::load(g + off + j);
#pragma unroll
    for (int k = 0; k < W; ++k) dot += to_f32(xv.e[k]) * to_f32(gv.e[k]) * to_f32(wv.e[k]);
  }
  const float c = warp_sum(dot) * r * r / width;
  for (int j = first; j < width; j += 32 * W) {
    const P xv = P::load(x + off + j), wv = P::load(w + j), gv = P::load(g + off + j);
    P out;
#pragma unroll
    for (int k = 0; k < W; ++k)
      out.e[k] = from_f32<T>(r * (to_f32(gv.e[k]) * to_f32(wv.e[k]) - to_f32(xv.e[k]) * c));
    out.store(dx + off + j);
  }
}

// The per-row inverse RMS, for the weight gradient.
template <typename T, int W>
__device__ void rms_norm_inverse(const T* x, float* r, int rows, int width, float eps) {
  const int row = warp_row(rows);
  if (row < 0) return;
  const float v = warp_inverse_rms<T, W>(x + (size_t)row * width, width, eps);
  if ((threadIdx.x & 31) == 0) r[row] = v;
}

// dw partial sums: block (32, 8) covers 32 columns of `rows_per_chunk` rows; grid (cols/32,
// chunks). partial[chunk][col] = sum over the chunk's rows of g * x * r.
template <typename T>
__device__ void rms_norm_dw_partial(const T* x, const T* g, const float* r, float* partial,
                                    int rows, int width, int rows_per_chunk) {
  __shared__ float acc[8][33];
  const int col = blockIdx.x * 32 + threadIdx.x;
  const int row0 = blockIdx.y * rows_per_chunk;
  const int row1 = min(rows, row0 + rows_per_chunk);
  float sum = 0.f;
  if (col < width)
    for (int row = row0 + threadIdx.y; row < row1; row += 8) {
      const size_t i = (size_t)row * width + col;
      sum += to_f32(g[i]) * to_f32(x[i]) * r[row];
    }
  acc[threadIdx.y][threadIdx.x] = sum;
  __syncthreads();
  if (threadIdx.y == 0 && col < width) {
    float total = 0.f;
    for (int k = 0; k < 8; ++k) total += acc[k][threadIdx.x];
    partial[(size_t)blockIdx.y * width + col] = total;
  }
}

template <typename T>
__device__ void rms_norm_dw_finish(const float* partial, T* dw, int chunks, int width) {
  const int col = blockIdx.x * blockDim.x + threadIdx.x;
  if (col >= width) return;
  float total = 0.f;
  for (int c = 0; c < chunks; ++c) total += partial[(size_t)c * width + col];
  dw[col] = from_f32<T>(total);
}

// ---------------------------------------------------------------------------------------------
// RoPE, rotate-half layout: x is [rows, d] with row = ((b * seq + pos) * heads + h) (heads
// rows per position: [b, t, heads, d]; heads = 1 for [b, heads, t, d]); cos/sin are
// [seq, d/2]. `sign` -1 rotates backwards (the gradient).

template <typename T, int W>
__device__ void rope(const T* x, const T* cos, const T* sin, T* y, int rows, int d, int seq,
                     int heads, float sign) {
  using P = Pack<T, W>;
  const int half = d / 2, groups = half / W;
  const size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= (size_t)rows * groups) return;
  const size_t row = i / groups;
  const int j = (int)(i % groups) * W, pos = row / heads % seq;
  const P c = P::load(cos + pos * half + j), sn = P::load(sin + pos * half + j);
  const P a = P::load(x + row * d + j), b = P::load(x + row * d + half + j);
  P y1, y2;
#pragma unroll
  for (int k = 0; k < W; ++k) {
    const float ck = to_f32(c.e[k]), sk = sign * to_f32(sn.e[k]);
    const float x1 = to_f32(a.e[k]), x2 = to_f32(b.e[k]);
    y1.e[k] = from_f32<T>(x1 * ck - x2 * sk);
    y2.e[k] = from_f32<T>(x2 * ck + x1 * sk);
  }
  y1.store(y + row * d + j);
  y2.store(y + row * d + half + j);
}

// Splits packed projections for inference: rotates the queries (as `rope` does) into q_out
// [b, heads, t, d] and writes the rotated keys and the values into a KV cache. qkv is
// [b, t, (heads + 2 kv_heads) * d] (queries, then keys, then values, as the stacked projection
// outputs them); cos and sin are [t, d / 2]; cache is [2, b, kv_heads, max_len, d] (keys, then
// values), written at positions start..start + t. One thread per (batch, position, query or
// kv head, rotation pair). With `position` (a decode step replayed from a CUDA graph, t = 1)
// the start is read from it instead, and cos and sin are the whole [max positions, d / 2]
// tables; a position past the cache writes nothing.
template <typename T>
__device__ void write_kv(const T* qkv, const T* cos, const T* sin, T* q_out, T* cache, int b,
                         int t, int heads, int kv_heads, int d, int max_len, int start,
                         const uint32_t* position) {
  const int half = d / 2;
  const size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= (size_t)b * t * (heads + kv_heads) * half) return;
  if (position != nullptr) {
    if (*position + t > (uint32_t)max_len) return;
    start = *position;
    cos += (size_t)start * half;
    sin += (size_t)start * half;
  }
  const int j = i % half;
  size_t r = i / half;
  const int head = r % (heads + kv_heads);
  r /= heads + kv_heads;
  const int pos = r % t, batch = r / t;
  const T* row = qkv + ((size_t)batch * t + pos) * (heads + 2 * kv_heads) * d;
  const float c = to_f32(cos[pos * half + j]), s = to_f32(sin[pos * half + j]);
  const T* x = row + (size_t)head * d;  // a query head, or (past the queries) a key head
  const float x1 = to_f32(x[j]), x2 = to_f32(x[half + j]);
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
  dst[j] = from_f32<T>(x1 * c - x2 * s);
  dst[half + j] = from_f32<T>(x2 * c + x1 * s);
}

// ---------------------------------------------------------------------------------------------
// [a, b, c, d] -> [a, c, b, d], both contiguous: the attention head split and merge. One thread
// per output element; neighbouring threads read and write neighbouring elements of a row of d.

template <typename T>
__device__ void swap_middle(const T* x, T* y, int b, int c, int d, size_t n) {
  const size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const int k = i % d;
  size_t r = i / d;
  const int bi = r % b;
  r /= b;
  const int ci = r % c;
  const size_t ai = r / c;
  y[i] = x[((ai * b + bi) * c + ci) * d + k];
}

// The same for rows of whole 16-byte units, moved as such (d and n counted in units).
extern "C" __global__ void swap_middle_v16(const uint4* x, uint4* y, int b, int c, int d,
                                           size_t n) {
  swap_middle<uint4>(x, y, b, c, d, n);
}

// ---------------------------------------------------------------------------------------------
// Elementwise sum of two tensors of one size: 16 bytes per thread, the tail (n not a multiple
// of the vector) by the thread past the last whole vector. The operands are 16-byte aligned.
// 16-bit sums are rounded once from the exact f32 sum, as the native 16-bit add rounds.

template <typename T> __device__ void add_vec(const T* a, const T* b, T* out, size_t n) {
  using P = Pack<T, WIDE<T>>;
  const size_t i = ((size_t)blockIdx.x * blockDim.x + threadIdx.x) * WIDE<T>;
  if (i + WIDE<T> <= n) {
    const P x = P::load(a + i), y = P::load(b + i);
    P sum;
#pragma unroll
    for (int k = 0; k < WIDE<T>; ++k) sum.e[k] = from_f32<T>(to_f32(x.e[k]) + to_f32(y.e[k]));
    sum.store(out + i);
  } else {
    for (size_t j = i; j < n; ++j) out[j] = from_f32<T>(to_f32(a[j]) + to_f32(b[j]));
  }
}

// out = x converted from S to D, 8 elements per thread in two 4-element accesses per side; the
// tail by the last thread.
template <typename S, typename D> __device__ void cast_vec(const S* x, D* out, size_t n) {
  const size_t i = ((size_t)blockIdx.x * blockDim.x + threadIdx.x) * 8;
  if (i + 8 <= n) {
#pragma unroll
    for (int half = 0; half < 8; half += 4) {
      const Pack<S, 4> v = Pack<S, 4>::load(x + i + half);
      Pack<D, 4> y;
#pragma unroll
      for (int k = 0; k < 4; ++k) y.e[k] = from_f32<D>(to_f32(v.e[k]));
      y.store(out + i + half);
    }
  } else {
    for (size_t j = i; j < n; ++j) out[j] = from_f32<D>(to_f32(x[j]));
  }
}

// out = x · s[0] for a one-element f32 `s` in device memory (a gradient scaled by the incoming
// gradient of a scalar loss, with no host round trip); the same access pattern as add_vec.
template <typename T> __device__ void scale_vec(const T* x, const float* s, T* out, size_t n) {
  using P = Pack<T, WIDE<T>>;
  const float f = s[0];
  const size_t i = ((size_t)blockIdx.x * blockDim.x + threadIdx.x) * WIDE<T>;
  if (i + WIDE<T> <= n) {
    const P v = P::load(x + i);
    P y;
#pragma unroll
    for (int k = 0; k < WIDE<T>; ++k) y.e[k] = from_f32<T>(to_f32(v.e[k]) * f);
    y.store(out + i);
  } else {
    for (size_t j = i; j < n; ++j) out[j] = from_f32<T>(to_f32(x[j]) * f);
  }
}

// ---------------------------------------------------------------------------------------------
// SwiGLU: y = silu(gate) * up over n elements in rows of `width`, y contiguous. Row r of gate
// and of up starts at r · stride: separate tensors are one row (width = stride = n), the halves
// of a packed [.., 2 · width] projection have stride 2 · width with up = gate + width. The
// gradients go to the same places in d_gate and d_up ([d_gate; d_up] in one 2n buffer, or the
// halves of one packed gradient).

__device__ __forceinline__ float sigmoid(float x) { return 1.f / (1.f + __expf(-x)); }

// Elements i·W .. i·W + W − 1 for thread i; width and stride are multiples of W.
template <typename T, int W>
__device__ void swiglu_fwd(const T* gate, const T* up, T* y, size_t n, long long width,
                           long long stride) {
  using P = Pack<T, W>;
  const size_t i = ((size_t)blockIdx.x * blockDim.x + threadIdx.x) * W;
  if (i >= n) return;
  const size_t at = (i / width) * stride + i % width;
  const P g = P::load(gate + at), u = P::load(up + at);
  P out;
#pragma unroll
  for (int k = 0; k < W; ++k) {
    const float gk = to_f32(g.e[k]);
    out.e[k] = from_f32<T>(gk * sigmoid(gk) * to_f32(u.e[k]));
  }
  out.store(y + i);
}

template <typename T, int W>
__device__ void swiglu_bwd(const T* gate, const T* up, const T* grad, T* d_gate, T* d_up,
                           size_t n, long long width, long long stride) {
  using P = Pack<T, W>;
  const size_t i = ((size_t)blockIdx.x * blockDim.x + threadIdx.x) * W;
  if (i >= n) return;
  const size_t at = (i / width) * stride + i % width;
  const P g = P::load(gate + at), u = P::load(up + at), dy = P::load(grad + i);
  P dg, du;
#pragma unroll
  for (int k = 0; k < W; ++k) {
    const float gk = to_f32(g.e[k]), uk = to_f32(u.e[k]), dk = to_f32(dy.e[k]);
    const float s = sigmoid(gk);
    dg.e[k] = from_f32<T>(dk * uk * s * (1.f + gk * (1.f - s)));
    du.e[k] = from_f32<T>(dk * gk * s);
  }
  dg.store(d_gate + at);
  du.store(d_up + at);
}

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

// ---------------------------------------------------------------------------------------------
// Decode attention: one query per (batch, head) against a KV cache read in place (a view into
// the preallocated cache, so no copy of it per token). q is [b*h, d] contiguous; k and v have
// element strides (batch, kv head, position) and unit stride along d; query head h reads kv
// head h / group. `scores` is [b*h, kv_len] f32 scratch. One block per (batch, head), of 1024
// threads (a decode step has few blocks, so each is made wide): a warp per key for the scores (lanes along d, so rows are read coalesced),
// then blockDim / d groups of d threads that each sum the values of every groups-th key, and a
// final sum over the groups. Dynamic shared memory: the query (d floats), then blockDim
// partial sums.

template <typename T>
__device__ void decode_attention(const T* q, const T* k, const T* v, T* out, float* scores,
                                 int heads, int group, int kv_len, int d, long long k_sb,
                                 long long k_sh, long long k_sp, long long v_sb, long long v_sh,
                                 long long v_sp, float scale, const uint32_t* position) {
  // A replayed decode step attends to the positions up to its own, read from `position`;
  // kv_len is then the cache's capacity, which bounds it.
  if (position != nullptr) kv_len = min(kv_len, (int)*position + 1);
  extern __shared__ float shared[];
  float* query = shared;
  float* partial = shared + d;
  const int bh = blockIdx.x, b = bh / heads, kv_head = (bh % heads) / group;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  const T* kb = k + b * k_sb + kv_head * k_sh;
  const T* vb = v + b * v_sb + kv_head * v_sh;
  float* s = scores + (size_t)bh * kv_len;
  for (int i = threadIdx.x; i < d; i += blockDim.x) query[i] = to_f32(q[(size_t)bh * d + i]);
  __syncthreads();
  float m = -INFINITY;
  for (int j = warp; j < kv_len; j += warps) {
    const T* kj = kb + j * k_sp;
    float dot = 0.f;
    for (int i = lane; i < d; i += 32) dot += query[i] * to_f32(kj[i]);
    dot = warp_sum(dot) * scale;
    if (lane == 0) s[j] = dot;
    m = fmaxf(m, dot);
  }
  m = block_max(m);  // its barriers also publish the scores to the whole block
  float sum = 0.f;
  for (int j = threadIdx.x; j < kv_len; j += blockDim.x) {
    const float p = __expf(s[j] - m);
    s[j] = p;
    sum += p;
  }
  const float inv = 1.f / block_sum(sum);  // and the probabilities
  const int groups = blockDim.x / d, g = threadIdx.x / d, i = threadIdx.x % d;
  float acc = 0.f;
  if (g < groups) {
#pragma unroll 4
    for (int j = g; j < kv_len; j += groups) acc += s[j] * to_f32(vb[j * v_sp + i]);
  }
  partial[threadIdx.x] = acc;
  __syncthreads();
  if (threadIdx.x < d) {
    float total = 0.f;
    for (int gg = 0; gg < groups; ++gg) total += partial[gg * d + threadIdx.x];
    out[(size_t)bh * d + threadIdx.x] = from_f32<T>(total * inv);
  }
}

// ---------------------------------------------------------------------------------------------
// Matrix-vector products for decoding: y[r] = w · x[r] for a few rows r of x [rows, in] and a
// weight w [out, in], one warp per output feature, 16-byte loads (in must be a multiple of
// 16 / sizeof(T) and both operands 16-byte aligned: the launcher checks); one variant applies
// the SwiGLU of a stacked gate/up weight on the way out. cuBLAS runs these
// shapes as split-K GEMMs of two kernels each; a decode step is bound by launches.

// The dot products of N weight rows with one row of x, summed over the warp (every lane gets
// them). Each lane loads its next U 16-byte units of every operand before any arithmetic: a
// decode step's products are too small to hide memory latency behind other warps, so the
// rounds of dependent loads are a warp's time. Each lane sums its units in ascending order.
template <typename T, int N>
__device__ __forceinline__ void warp_dots(const T* const (&w)[N], const T* x, int in,
                                          float (&dots)[N]) {
  constexpr int V = 16 / sizeof(T), U = 8;  // elements per 16-byte unit, units per round
  const int lane = threadIdx.x & 31, units = in / V;
  const uint4* xv = reinterpret_cast<const uint4*>(x);
  float acc[N];
#pragma unroll
  for (int n = 0; n < N; ++n) acc[n] = 0.f;
  for (int first = lane; first < units; first += 32 * U) {
    uint4 b[U], a[N][U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int i = first + 32 * u;
      if (i >= units) break;
      b[u] = xv[i];
#pragma unroll
      for (int n = 0; n < N; ++n) a[n][u] = reinterpret_cast<const uint4*>(w[n])[i];
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      if (first + 32 * u >= units) break;
      const T* bp = reinterpret_cast<const T*>(&b[u]);
#pragma unroll
      for (int n = 0; n < N; ++n) {
        const T* ap = reinterpret_cast<const T*>(&a[n][u]);
#pragma unroll
        for (int k = 0; k < V; ++k) acc[n] += to_f32(ap[k]) * to_f32(bp[k]);
      }
    }
  }
#pragma unroll
  for (int n = 0; n < N; ++n) dots[n] = warp_sum(acc[n]);
}

// y[r][o] = w[o] · x[r].
template <typename T>
__device__ void gemv(const T* x, const T* w, T* y, int rows, int in, int out) {
  const int o = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
  if (o >= out) return;  // the whole warp leaves together
  const T* row[1] = {w + (size_t)o * in};
  for (int r = 0; r < rows; ++r) {
    float dot[1];
    warp_dots<T, 1>(row, x + (size_t)r * in, in, dot);
    if ((threadIdx.x & 31) == 0) y[(size_t)r * out + o] = from_f32<T>(dot[0]);
  }
}

// The SwiGLU of a stacked gate/up projection: w is [2 out, in] (gate rows, then up rows) and
// y[r][o] = silu(g) · u with g = w[o] · x[r] and u = w[out + o] · x[r], both rounded to T first
// as the separate projections store them.
template <typename T>
__device__ void gemv_swiglu(const T* x, const T* w, T* y, int rows, int in, int out) {
  const int o = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
  if (o >= out) return;
  const T* gate_up[2] = {w + (size_t)o * in, w + (size_t)(out + o) * in};
  for (int r = 0; r < rows; ++r) {
    float dots[2];
    warp_dots<T, 2>(gate_up, x + (size_t)r * in, in, dots);
    const float g = to_f32(from_f32<T>(dots[0])), u = to_f32(from_f32<T>(dots[1]));
    if ((threadIdx.x & 31) == 0) y[(size_t)r * out + o] = from_f32<T>(g * sigmoid(g) * u);
  }
}

// ---------------------------------------------------------------------------------------------
// Cross-entropy over the vocabulary, one row of logits per block. Targets are u32 and checked
// on the host side by the caller's contract; an out-of-range target yields NaN, not a read.

template <typename T>
__device__ void row_log_sum_exp(const T* x, int vocab, float* max_out, float* lse_out) {
  float m = -INFINITY;
  for (int j = threadIdx.x; j < vocab; j += blockDim.x) m = fmaxf(m, to_f32(x[j]));
  m = block_max(m);
  float sum = 0.f;
  for (int j = threadIdx.x; j < vocab; j += blockDim.x) sum += __expf(to_f32(x[j]) - m);
  *max_out = m;
  *lse_out = logf(block_sum(sum));
}

// nll[row] = logsumexp(logits[row]) - logits[row][target[row]], in f32.
template <typename T>
__device__ void token_nll(const T* logits, const uint32_t* targets, float* nll, int vocab) {
  const size_t off = (size_t)blockIdx.x * vocab;
  float m, lse;
  row_log_sum_exp(logits + off, vocab, &m, &lse);
  if (threadIdx.x == 0) {
    const uint32_t t = targets[blockIdx.x];
    nll[blockIdx.x] = t < (uint32_t)vocab ? m + lse - to_f32(logits[off + t]) : NAN;
  }
}

// d logits = (softmax - onehot(target)) * g[row]; rows with g = 0 get zeros without a pass.
template <typename T>
__device__ void token_nll_grad(const T* logits, const uint32_t* targets, const float* g, T* d,
                               int vocab) {
  const size_t off = (size_t)blockIdx.x * vocab;
  const float scale = g[blockIdx.x];
  if (scale == 0.f) {
    for (int j = threadIdx.x; j < vocab; j += blockDim.x) d[off + j] = from_f32<T>(0.f);
    return;
  }
  float m, lse;
  row_log_sum_exp(logits + off, vocab, &m, &lse);
  const uint32_t t = targets[blockIdx.x];
  for (int j = threadIdx.x; j < vocab; j += blockDim.x) {
    const float p = __expf(to_f32(logits[off + j]) - m - lse);
    d[off + j] = from_f32<T>((p - (j == (int)t ? 1.f : 0.f)) * scale);
  }
}

// The NLL of each row and its logits' gradient in one pass pair: an online max and sum over the
// row (one read), then the gradient (a second read and the write), 16 bytes at a time where the
// rows allow. The separate kernels above read the logits five times for the same results.

// Visits the row's elements of this thread as f(index, value), 16 bytes per load where `vec`.
template <typename T, typename F>
__device__ __forceinline__ void for_row_elements(const T* x, int vocab, bool vec, F f) {
  constexpr int V = 16 / sizeof(T);
  if (vec) {
    for (int j = threadIdx.x * V; j < vocab; j += blockDim.x * V) {
      const uint4 raw = *reinterpret_cast<const uint4*>(x + j);
      const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
      for (int k = 0; k < V; ++k) f(j + k, to_f32(e[k]));
    }
  } else {
    for (int j = threadIdx.x; j < vocab; j += blockDim.x) f(j, to_f32(x[j]));
  }
}

template <typename T>
__device__ void token_nll_with_grad(const T* logits, const uint32_t* targets, const float* g,
                                    float* nll, T* d, int vocab) {
  constexpr int V = 16 / sizeof(T);
  const size_t off = (size_t)blockIdx.x * vocab;
  const T* x = logits + off;
  T* dx = d + off;
  const bool vec = vocab % V == 0 && reinterpret_cast<uintptr_t>(x) % 16 == 0 &&
                   reinterpret_cast<uintptr_t>(dx) % 16 == 0;
  float m = -INFINITY, sum = 0.f;
  for_row_elements(x, vocab, vec, [&](int, float v) {
    if (v > m) {
      sum = sum * __expf(m - v) + 1.f;
      m = v;
    } else if (m != -INFINITY) {  // else v and m are both −∞: nothing to add
      sum += __expf(v - m);
    }
  });
  const float row_max = block_max(m);
  sum = block_sum(m == -INFINITY ? 0.f : sum * __expf(m - row_max));
  const float lse = row_max + logf(sum);
  const uint32_t t = targets[blockIdx.x];
  if (threadIdx.x == 0) nll[blockIdx.x] = t < (uint32_t)vocab ? lse - to_f32(x[t]) : NAN;
  const float scale = g[blockIdx.x];
  if (vec) {
    for (int j = threadIdx.x * V; j < vocab; j += blockDim.x * V) {
      const uint4 raw = *reinterpret_cast<const uint4*>(x + j);
      const T* e = reinterpret_cast<const T*>(&raw);
      uint4 out;
      T* o = reinterpret_cast<T*>(&out);
#pragma unroll
      for (int k = 0; k < V; ++k) {
        const float p = scale == 0.f ? 0.f : __expf(to_f32(e[k]) - lse);
        o[k] = from_f32<T>((p - (j + k == (int)t ? 1.f : 0.f)) * scale);
      }
      *reinterpret_cast<uint4*>(dx + j) = out;
    }
  } else {
    for (int j = threadIdx.x; j < vocab; j += blockDim.x) {
      const float p = scale == 0.f ? 0.f : __expf(to_f32(x[j]) - lse);
      dx[j] = from_f32<T>((p - (j == (int)t ? 1.f : 0.f)) * scale);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Embedding backward: d_table[ids[i]] += grad[i] for every token, accumulated in f32.

template <typename T>
__device__ void embedding_grad(const uint32_t* ids, const T* grad, float* d_table, int tokens,
                               int width, int vocab) {
  const size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= (size_t)tokens * width) return;
  const uint32_t id = ids[i / width];
  if (id < (uint32_t)vocab) atomicAdd(&d_table[(size_t)id * width + i % width], to_f32(grad[i]));
}

// ---------------------------------------------------------------------------------------------
// One AdamW step over many f32 parameters in one launch. `tensors` holds 6 words per parameter:
// weight, gradient, first and second moment addresses, element count, and the weight-decay
// keep factor (1 - lr * wd) as f32 bits. `chunks` holds one word per block: the parameter index
// in the high 24 bits and the first element in the low 40. Updates are in place.

// One parameter element's update.
__device__ __forceinline__ void adamw_update(float& w, float g, float& m, float& v, float keep,
                                             float lr, float beta1, float beta2, float eps,
                                             float bias1, float bias2, float grad_scale) {
  g *= grad_scale;
  m = m * beta1 + g * (1.f - beta1);
  v = v * beta2 + g * g * (1.f - beta2);
  w = w * keep - (m / bias1) / (sqrtf(v / bias2) + eps) * lr;
}

__device__ __forceinline__ bool aligned16(const void* p) {
  return (reinterpret_cast<uintptr_t>(p) & 15) == 0;
}

extern "C" __global__ void adamw_multi(const uint64_t* tensors, const uint64_t* chunks,
                                       int chunk_len, float lr, float beta1, float beta2,
                                       float eps, float bias1, float bias2, float grad_scale) {
  const uint64_t c = chunks[blockIdx.x];
  const uint64_t t = c >> 40, start = c & ((1ull << 40) - 1);
  const uint64_t* desc = tensors + 6 * t;
  float* w = (float*)desc[0];
  const float* g = (const float*)desc[1];
  float* m = (float*)desc[2];
  float* v = (float*)desc[3];
  const uint64_t n = desc[4];
  const float keep = __uint_as_float((uint32_t)desc[5]);
  const uint64_t end = min(n, start + (uint64_t)chunk_len);
  uint64_t scalar_from = start;
  // Chunks start at multiples of chunk_len (a multiple of 4): four elements per access where
  // all four buffers are 16-byte aligned.
  if (aligned16(w) && aligned16(g) && aligned16(m) && aligned16(v)) {
    const uint64_t vec_end = start + (end - start) / 4 * 4;
    for (uint64_t i = start + 4 * threadIdx.x; i < vec_end; i += 4 * blockDim.x) {
      float4 wi = *reinterpret_cast<float4*>(w + i), mi = *reinterpret_cast<float4*>(m + i);
      float4 vi = *reinterpret_cast<float4*>(v + i);
      const float4 gi = *reinterpret_cast<const float4*>(g + i);
      adamw_update(wi.x, gi.x, mi.x, vi.x, keep, lr, beta1, beta2, eps, bias1, bias2, grad_scale);
      adamw_update(wi.y, gi.y, mi.y, vi.y, keep, lr, beta1, beta2, eps, bias1, bias2, grad_scale);
      adamw_update(wi.z, gi.z, mi.z, vi.z, keep, lr, beta1, beta2, eps, bias1, bias2, grad_scale);
      adamw_update(wi.w, gi.w, mi.w, vi.w, keep, lr, beta1, beta2, eps, bias1, bias2, grad_scale);
      *reinterpret_cast<float4*>(w + i) = wi;
      *reinterpret_cast<float4*>(m + i) = mi;
      *reinterpret_cast<float4*>(v + i) = vi;
    }
    scalar_from = vec_end;
  }
  for (uint64_t i = scalar_from + threadIdx.x; i < end; i += blockDim.x)
    adamw_update(w[i], g[i], m[i], v[i], keep, lr, beta1, beta2, eps, bias1, bias2, grad_scale);
}

// Sum of squares of many f32 tensors (global gradient norm), in two deterministic passes: one
// partial sum per chunk (same descriptor layout as adamw_multi; only the gradient address and
// count are read), then one block sums the partials in a fixed order.
extern "C" __global__ void sum_squares_multi(const uint64_t* tensors, const uint64_t* chunks,
                                             int chunk_len, float* partial) {
  const uint64_t c = chunks[blockIdx.x];
  const uint64_t t = c >> 40, start = c & ((1ull << 40) - 1);
  const float* g = (const float*)tensors[6 * t + 1];
  const uint64_t end = min(tensors[6 * t + 4], start + (uint64_t)chunk_len);
  float sum = 0.f;
  uint64_t scalar_from = start;
  if (aligned16(g)) {  // four elements per access, as in adamw_multi
    const uint64_t vec_end = start + (end - start) / 4 * 4;
    for (uint64_t i = start + 4 * threadIdx.x; i < vec_end; i += 4 * blockDim.x) {
      const float4 x = *reinterpret_cast<const float4*>(g + i);
      sum += x.x * x.x + x.y * x.y + x.z * x.z + x.w * x.w;
    }
    scalar_from = vec_end;
  }
  for (uint64_t i = scalar_from + threadIdx.x; i < end; i += blockDim.x) sum += g[i] * g[i];
  sum = block_sum(sum);
  if (threadIdx.x == 0) partial[blockIdx.x] = sum;
}

extern "C" __global__ void sum_partials(const float* partial, int n, float* out) {
  float sum = 0.f;
  for (int i = threadIdx.x; i < n; i += blockDim.x) sum += partial[i];
  sum = block_sum(sum);
  if (threadIdx.x == 0) *out = sum;
}

#include "flash_attention.cuh"
#include "flash_mma.cuh"

// ---------------------------------------------------------------------------------------------
// extern "C" entry points, one per dtype.

#define FOR_EACH_FLOAT(M) M(f32, float) M(bf16, __nv_bfloat16) M(f16, __half)

#define ENTRY_POINTS(S, T)                                                                     \
  extern "C" __global__ void rms_norm_fwd_##S(const T* x, const T* w, T* y, int rows,         \
                                              int width, float eps) {                         \
    rms_norm_fwd<T, 1>(x, w, y, rows, width, eps);                                            \
  }                                                                                           \
  extern "C" __global__ void rms_norm_fwd_wide_##S(const T* x, const T* w, T* y, int rows,    \
                                                   int width, float eps) {                    \
    rms_norm_fwd<T, WIDE<T>>(x, w, y, rows, width, eps);                                      \
  }                                                                                           \
  extern "C" __global__ void rms_norm_dx_##S(const T* x, const T* w, const T* g, T* dx,       \
                                             int rows, int width, float eps, float* r) {      \
    rms_norm_dx<T, 1>(x, w, g, dx, rows, width, eps, r);                                      \
  }                                                                                           \
  extern "C" __global__ void rms_norm_dx_wide_##S(const T* x, const T* w, const T* g, T* dx,  \
                                                  int rows, int width, float eps, float* r) { \
    rms_norm_dx<T, WIDE<T>>(x, w, g, dx, rows, width, eps, r);                                \
  }                                                                                           \
  extern "C" __global__ void rms_norm_inverse_##S(const T* x, float* r, int rows, int width,  \
                                                  float eps) {                                \
    rms_norm_inverse<T, 1>(x, r, rows, width, eps);                                           \
  }                                                                                           \
  extern "C" __global__ void rms_norm_inverse_wide_##S(const T* x, float* r, int rows,        \
                                                       int width, float eps) {                \
    rms_norm_inverse<T, WIDE<T>>(x, r, rows, width, eps);                                     \
  }                                                                                           \
  extern "C" __global__ void rms_norm_dw_partial_##S(const T* x, const T* g, const float* r,  \
                                                     float* partial, int rows, int width,     \
                                                     int rows_per_chunk) {                    \
    rms_norm_dw_partial<T>(x, g, r, partial, rows, width, rows_per_chunk);                    \
  }                                                                                           \
  extern "C" __global__ void rms_norm_dw_finish_##S(const float* partial, T* dw, int chunks,  \
                                                    int width) {                              \
    rms_norm_dw_finish<T>(partial, dw, chunks, width);                                        \
  }                                                                                           \
  extern "C" __global__ void add_rms_norm_##S(const T* x, const T* d, const T* w, T* out,     \
                                              int rows, int width, float eps) {               \
    add_rms_norm<T>(x, d, w, out, rows, width, eps);                                          \
  }                                                                                           \
  extern "C" __global__ void write_kv_##S(const T* qkv, const T* cos, const T* sin, T* q_out, \
                                          T* cache, int b, int t, int heads, int kv_heads,    \
                                          int d, int max_len, int start,                      \
                                          const uint32_t* position) {                         \
    write_kv<T>(qkv, cos, sin, q_out, cache, b, t, heads, kv_heads, d, max_len, start,        \
                position);                                                                    \
  }                                                                                           \
  extern "C" __global__ void gemv_swiglu_##S(const T* x, const T* w, T* y, int rows, int in,  \
                                             int out) {                                       \
    gemv_swiglu<T>(x, w, y, rows, in, out);                                                   \
  }                                                                                           \
  extern "C" __global__ void gemv_##S(const T* x, const T* w, T* y, int rows, int in,         \
                                      int out) {                                              \
    gemv<T>(x, w, y, rows, in, out);                                                          \
  }                                                                                           \
  extern "C" __global__ void rope_##S(const T* x, const T* cos, const T* sin, T* y, int rows, \
                                      int d, int seq, int heads, float sign) {                \
    rope<T, 1>(x, cos, sin, y, rows, d, seq, heads, sign);                                    \
  }                                                                                           \
  extern "C" __global__ void rope_wide_##S(const T* x, const T* cos, const T* sin, T* y,      \
                                           int rows, int d, int seq, int heads, float sign) { \
    rope<T, WIDE<T>>(x, cos, sin, y, rows, d, seq, heads, sign);                              \
  }                                                                                           \
  extern "C" __global__ void swap_middle_##S(const T* x, T* y, int b, int c, int d, size_t n) { \
    swap_middle<T>(x, y, b, c, d, n);                                                         \
  }                                                                                           \
  extern "C" __global__ void add_vec_##S(const T* a, const T* b, T* out, size_t n) {          \
    add_vec<T>(a, b, out, n);                                                                 \
  }                                                                                           \
  extern "C" __global__ void cast_to_f32_##S(const T* x, float* out, size_t n) {               \
    cast_vec<T, float>(x, out, n);                                                            \
  }                                                                                           \
  extern "C" __global__ void cast_to_bf16_##S(const T* x, __nv_bfloat16* out, size_t n) {     \
    cast_vec<T, __nv_bfloat16>(x, out, n);                                                    \
  }                                                                                           \
  extern "C" __global__ void cast_to_f16_##S(const T* x, __half* out, size_t n) {             \
    cast_vec<T, __half>(x, out, n);                                                           \
  }                                                                                           \
  extern "C" __global__ void scale_vec_##S(const T* x, const float* s, T* out, size_t n) {    \
    scale_vec<T>(x, s, out, n);                                                               \
  }                                                                                           \
  extern "C" __global__ void swiglu_fwd_##S(const T* gate, const T* up, T* y, size_t n,        \
                                            long long width, long long stride) {              \
    swiglu_fwd<T, 1>(gate, up, y, n, width, stride);                                          \
  }                                                                                           \
  extern "C" __global__ void swiglu_fwd_wide_##S(const T* gate, const T* up, T* y, size_t n,   \
                                                 long long width, long long stride) {         \
    swiglu_fwd<T, WIDE<T>>(gate, up, y, n, width, stride);                                    \
  }                                                                                           \
  extern "C" __global__ void swiglu_bwd_##S(const T* gate, const T* up, const T* grad,        \
                                            T* d_gate, T* d_up, size_t n, long long width,    \
                                            long long stride) {                               \
    swiglu_bwd<T, 1>(gate, up, grad, d_gate, d_up, n, width, stride);                         \
  }                                                                                           \
  extern "C" __global__ void swiglu_bwd_wide_##S(const T* gate, const T* up, const T* grad,   \
                                                 T* d_gate, T* d_up, size_t n,                \
                                                 long long width, long long stride) {         \
    swiglu_bwd<T, WIDE<T>>(gate, up, grad, d_gate, d_up, n, width, stride);                   \
  }                                                                                           \
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
  }                                                                                           \
  extern "C" __global__ void decode_attention_##S(                                          \
      const T* q, const T* k, const T* v, T* out, float* scores, int heads, int group,        \
      int kv_len, int d, long long k_sb, long long k_sh, long long k_sp, long long v_sb,      \
      long long v_sh, long long v_sp, float scale, const uint32_t* position) {                \
    decode_attention<T>(q, k, v, out, scores, heads, group, kv_len, d, k_sb, k_sh, k_sp, v_sb, \
                        v_sh, v_sp, scale, position);                                         \
  }                                                                                           \
  extern "C" __global__ void token_nll_##S(const T* logits, const uint32_t* targets,          \
                                           float* nll, int vocab) {                           \
    token_nll<T>(logits, targets, nll, vocab);                                                \
  }                                                                                           \
  extern "C" __global__ void token_nll_grad_##S(const T* logits, const uint32_t* targets,     \
                                                const float* g, T* d, int vocab) {            \
    token_nll_grad<T>(logits, targets, g, d, vocab);                                          \
  }                                                                                           \
  extern "C" __global__ void token_nll_with_grad_##S(const T* logits, const uint32_t* targets, \
                                                     const float* g, float* nll, T* d,        \
                                                     int vocab) {                             \
    token_nll_with_grad<T>(logits, targets, g, nll, d, vocab);                                \
  }                                                                                           \
  extern "C" __global__ void embedding_grad_##S(const uint32_t* ids, const T* grad,           \
                                                float* d_table, int tokens, int width,        \
                                                int vocab) {                                  \
    embedding_grad<T>(ids, grad, d_table, tokens, width, vocab);                              \
  }

FOR_EACH_FLOAT(ENTRY_POINTS)
FOR_EACH_FLOAT(FLASH_ENTRY_POINTS)
FLASH_MMA_ENTRY_POINTS(bf16, __nv_bfloat16)
FLASH_MMA_ENTRY_POINTS(f16, __half)
