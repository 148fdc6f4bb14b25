// RMSNorm: y = x * r * (offset + w) with r = 1 / sqrt(mean(x^2) + eps), per row of `width`
// (offset 0 for plain norms, 1 for Gemma's `1 + w`).
//
// Launched from src/rms_norm.rs (RMSNorm) and src/add_norm.rs (the residual add with RMSNorm).

#include "common.cuh"

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
__device__ void rms_norm_fwd(const T* x, const T* w, T* y, int rows, int width, float eps,
                             float offset) {
  using P = Pack<T, W>;
  const int row = warp_row(rows);
  if (row < 0) return;
  const size_t off = (size_t)row * width;
  const float r = warp_inverse_rms<T, W>(x + off, width, eps);
  for (int j = (threadIdx.x & 31) * W; j < width; j += 32 * W) {
    const P xv = P::load(x + off + j), wv = P::load(w + j);
    P out;
#pragma unroll
    for (int k = 0; k < W; ++k)
      out.e[k] = from_f32<T>(to_f32(xv.e[k]) * r * (offset + to_f32(wv.e[k])));
    out.store(y + off + j);
  }
}

// Residual add and RMSNorm for inference: out[0] = x + d (rounded to T, as the unfused add
// stores it) and out[1] = RMSNorm of that sum, in one pass per row. `out` is [2, rows, width].
template <typename T>
__device__ void add_rms_norm(const T* x, const T* d, const T* w, T* out, int rows, int width,
                             float eps, float offset) {
  const size_t off = (size_t)blockIdx.x * width;
  T* sum = out + off;
  T* y = out + (size_t)rows * width + off;
  // Each thread reads back only the elements it wrote.
  for (int j = threadIdx.x; j < width; j += blockDim.x)
    sum[j] = from_f32<T>(to_f32(x[off + j]) + to_f32(d[off + j]));
  const float r = inverse_rms(sum, width, eps);
  for (int j = threadIdx.x; j < width; j += blockDim.x)
    y[j] = from_f32<T>(to_f32(sum[j]) * r * (offset + to_f32(w[j])));
}

// The 16-byte form of add_rms_norm (operands aligned, width a multiple of W = WIDE<T>), for a
// decode step's single row: the old one-element loops waited for memory once per element
// of a thread, three times over (8.8 us a call for a 2048-wide bf16 row on an H200, a fifth of
// a step). Here every thread issues all its loads (x, d and w, at most ADD_NORM_PACKS packs of
// each: the launcher sizes the block for it) before the first use, keeps its sums in
// registers across the block's reduction, and writes both outputs from there. Blocks of at
// most 512 threads (__launch_bounds__): the packs take 64-96 registers a thread on sm_90, too
// many for 1024.
constexpr int ADD_NORM_PACKS = 4;

template <typename T, int W>
__device__ void add_rms_norm_wide(const T* __restrict__ x, const T* __restrict__ d,
                                  const T* __restrict__ w, T* __restrict__ out, int rows,
                                  int width, float eps, float offset) {
  using P = Pack<T, W>;
  const size_t off = (size_t)blockIdx.x * width;
  T* sum = out + off;
  T* y = out + (size_t)rows * width + off;
  P xs[ADD_NORM_PACKS], ds[ADD_NORM_PACKS], ws[ADD_NORM_PACKS];
#pragma unroll
  for (int i = 0; i < ADD_NORM_PACKS; ++i) {
    const int j = (threadIdx.x + i * blockDim.x) * W;
    if (j < width) {
      xs[i] = P::load(x + off + j);
      ds[i] = P::load(d + off + j);
      ws[i] = P::load(w + j);
    }
  }
  float ss = 0.f;
#pragma unroll
  for (int i = 0; i < ADD_NORM_PACKS; ++i) {
    const int j = (threadIdx.x + i * blockDim.x) * W;
    if (j < width) {
#pragma unroll
      for (int k = 0; k < W; ++k) {
        xs[i].e[k] = from_f32<T>(to_f32(xs[i].e[k]) + to_f32(ds[i].e[k]));
        const float v = to_f32(xs[i].e[k]);
        ss += v * v;
      }
      xs[i].store(sum + j);
    }
  }
  const float r = rsqrtf(block_sum(ss) / width + eps);
#pragma unroll
  for (int i = 0; i < ADD_NORM_PACKS; ++i) {
    const int j = (threadIdx.x + i * blockDim.x) * W;
    if (j < width) {
      P o;
#pragma unroll
      for (int k = 0; k < W; ++k)
        o.e[k] = from_f32<T>(to_f32(xs[i].e[k]) * r * (offset + to_f32(ws[i].e[k])));
      o.store(y + j);
    }
  }
}

// dx = r * (g*w' - x * r^2 * mean(g*w'*x)) with w' = offset + w, written as held + dx where
// `held` (the gradient x already has, x's shape) is not null: summed in f32, rounded once.
template <typename T, int W>
__device__ void rms_norm_dx(const T* x, const T* w, const T* g, T* dx, int rows, int width,
                            float eps, float* r_out, float offset, const T* held) {
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
    for (int k = 0; k < W; ++k)
      dot += to_f32(xv.e[k]) * to_f32(gv.e[k]) * (offset + to_f32(wv.e[k]));
  }
  const float c = warp_sum(dot) * r * r / width;
  for (int j = first; j < width; j += 32 * W) {
    const P xv = P::load(x + off + j), wv = P::load(w + j), gv = P::load(g + off + j);
    P hv, out;
    if (held != nullptr) hv = P::load(held + off + j);
#pragma unroll
    for (int k = 0; k < W; ++k) {
      float d = r * (to_f32(gv.e[k]) * (offset + to_f32(wv.e[k])) - to_f32(xv.e[k]) * c);
      if (held != nullptr) d += to_f32(hv.e[k]);
      out.e[k] = from_f32<T>(d);
    }
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

// extern "C" entry points, one per dtype.

#define NORMS_ENTRY_POINTS(S, T)                                                               \
  extern "C" __global__ void rms_norm_fwd_##S(const T* x, const T* w, T* y, int rows,         \
                                              int width, float eps, float offset) {           \
    rms_norm_fwd<T, 1>(x, w, y, rows, width, eps, offset);                                    \
  }                                                                                           \
  extern "C" __global__ void rms_norm_fwd_wide_##S(const T* x, const T* w, T* y, int rows,    \
                                                   int width, float eps, float offset) {      \
    rms_norm_fwd<T, WIDE<T>>(x, w, y, rows, width, eps, offset);                              \
  }                                                                                           \
  extern "C" __global__ void rms_norm_dx_##S(const T* x, const T* w, const T* g, T* dx,       \
                                             int rows, int width, float eps, float* r,        \
                                             float offset, const T* held) {                   \
    rms_norm_dx<T, 1>(x, w, g, dx, rows, width, eps, r, offset, held);                        \
  }                                                                                           \
  extern "C" __global__ void rms_norm_dx_wide_##S(const T* x, const T* w, const T* g, T* dx,  \
                                                  int rows, int width, float eps, float* r,   \
                                                  float offset, const T* held) {              \
    rms_norm_dx<T, WIDE<T>>(x, w, g, dx, rows, width, eps, r, offset, held);                  \
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
                                              int rows, int width, float eps, float offset) { \
    add_rms_norm<T>(x, d, w, out, rows, width, eps, offset);                                  \
  }                                                                                           \
  extern "C" __global__ void __launch_bounds__(512)                                          \
      add_rms_norm_wide_##S(const T* x, const T* d, const T* w, T* out, int rows, int width,   \
                            float eps, float offset) {                                        \
    add_rms_norm_wide<T, WIDE<T>>(x, d, w, out, rows, width, eps, offset);                    \
  }

FOR_EACH_FLOAT(NORMS_ENTRY_POINTS)
