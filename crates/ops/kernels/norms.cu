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

// x + d for a 16-byte word of each held in registers, every sum rounded to T as the unfused add
// stores it, written over x's word; returns the sum of the rounded sums' squares.
template <typename T>
__device__ __forceinline__ float add_word(uint4& x, const uint4& d) {
  Pack<T, WIDE<T>> sum;
  float ss = 0.f;
#pragma unroll
  for (int k = 0; k < WIDE<T>; ++k) {
    sum.e[k] = from_f32<T>(held_f32<T>(x, k) + held_f32<T>(d, k));
    const float v = to_f32(sum.e[k]);
    ss += v * v;
  }
  x = *reinterpret_cast<const uint4*>(&sum);
  return ss;
}

// A 16-byte word of the normalized row from the sum's word s and the weight's w:
// s * r * (offset + w).
template <typename T>
__device__ __forceinline__ uint4 norm_word(const uint4& s, const uint4& w, float r, float offset) {
  Pack<T, WIDE<T>> out;
#pragma unroll
  for (int k = 0; k < WIDE<T>; ++k)
    out.e[k] = from_f32<T>(held_f32<T>(s, k) * r * (offset + held_f32<T>(w, k)));
  return *reinterpret_cast<const uint4*>(&out);
}

// The 16-byte form of add_rms_norm (operands aligned, width a multiple of WIDE<T>), for a
// decode step's single row: the old one-element loops waited for memory once per element
// of a thread, three times over (8.8 us a call for a 2048-wide bf16 row on an H200, a fifth of
// a step). Here every thread issues all its loads (x, d and w, at most ADD_NORM_PACKS packs of
// each: the launcher sizes the block for it) before the first use, keeps its sums in
// registers across the block's reduction, and writes both outputs from there. Blocks of at
// most 512 threads (__launch_bounds__): the packs take 64-96 registers a thread on sm_90, too
// many for 1024 (ADD_NORM_PACKS and ADD_NORM_WIDE_THREADS: launch_constants.h).

template <typename T>
__device__ void add_rms_norm_wide(const T* __restrict__ x, const T* __restrict__ d,
                                  const T* __restrict__ w, T* __restrict__ out, int rows,
                                  int width, float eps, float offset) {
  constexpr int W = WIDE<T>;
  const size_t off = (size_t)blockIdx.x * width;
  T* sum = out + off;
  T* y = out + (size_t)rows * width + off;
  uint4 xs[ADD_NORM_PACKS], ds[ADD_NORM_PACKS], ws[ADD_NORM_PACKS];
#pragma unroll
  for (int i = 0; i < ADD_NORM_PACKS; ++i) {
    const int j = (threadIdx.x + i * blockDim.x) * W;
    if (j < width) {
      xs[i] = *reinterpret_cast<const uint4*>(x + off + j);
      ds[i] = *reinterpret_cast<const uint4*>(d + off + j);
      ws[i] = *reinterpret_cast<const uint4*>(w + j);
    }
  }
  float ss = 0.f;
#pragma unroll
  for (int i = 0; i < ADD_NORM_PACKS; ++i) {
    const int j = (threadIdx.x + i * blockDim.x) * W;
    if (j < width) {
      ss += add_word<T>(xs[i], ds[i]);
      *reinterpret_cast<uint4*>(sum + j) = xs[i];
    }
  }
  const float r = rsqrtf(block_sum(ss) / width + eps);
#pragma unroll
  for (int i = 0; i < ADD_NORM_PACKS; ++i) {
    const int j = (threadIdx.x + i * blockDim.x) * W;
    if (j < width) *reinterpret_cast<uint4*>(y + j) = norm_word<T>(xs[i], ws[i], r, offset);
  }
}

// The residual add and RMSNorm of many rows (a training step's blocks): a warp a row, each
// lane loading its at most PACKS 16-byte words of x and of d at once, so the row is read once
// and a warp has all of it in flight; the rounded sum goes to `sum` and its norm to `y` (two
// buffers, each [rows, width]). Rows of at most 32 · WIDE<T> · PACKS elements, a multiple of
// WIDE<T>, every operand 16-byte aligned.
template <typename T, int PACKS>
__device__ void add_rms_norm_rows(const T* __restrict__ x, const T* __restrict__ d,
                                  const T* __restrict__ w, T* __restrict__ sum,
                                  T* __restrict__ y, int rows, int width, float eps,
                                  float offset) {
  constexpr int W = WIDE<T>;
  const int row = warp_row(rows), lane = threadIdx.x & 31;
  if (row < 0) return;
  const size_t off = (size_t)row * width;
  uint4 xs[PACKS], ds[PACKS];
#pragma unroll
  for (int p = 0; p < PACKS; ++p) {
    const int j = (p * 32 + lane) * W;
    if (j < width) {
      xs[p] = *reinterpret_cast<const uint4*>(x + off + j);
      ds[p] = *reinterpret_cast<const uint4*>(d + off + j);
    }
  }
  float ss = 0.f;
#pragma unroll
  for (int p = 0; p < PACKS; ++p) {
    const int j = (p * 32 + lane) * W;
    if (j < width) {
      ss += add_word<T>(xs[p], ds[p]);
      *reinterpret_cast<uint4*>(sum + off + j) = xs[p];
    }
  }
  const float r = rsqrtf(warp_sum(ss) / width + eps);
#pragma unroll
  for (int p = 0; p < PACKS; ++p) {
    const int j = (p * 32 + lane) * W;
    if (j < width) {
      const uint4 wv = *reinterpret_cast<const uint4*>(w + j);
      *reinterpret_cast<uint4*>(y + off + j) = norm_word<T>(xs[p], wv, r, offset);
    }
  }
}

// The weight gradient's per-warp sums in shared memory: a warp's slice holds a float for each
// column (padded to whole rounds of 32 lanes), column col = it * 32W + lane * W + k at
// (it * W + k) * 32 + lane, so each lane touches only its own columns' floats and a warp's
// accesses fall on 32 distinct banks.
template <int W>
__device__ __forceinline__ int dw_slot(int col) {
  const int it = col / (32 * W), lane = (col / W) & 31, k = col % W;
  return (it * W + k) * 32 + lane;
}

template <int W>
__device__ __forceinline__ int dw_slice_floats(int width) {
  return (width + 32 * W - 1) / (32 * W) * 32 * W;
}

// dx = r * (g*w' - x * r^2 * mean(g*w'*x)) with w' = offset + w for one row (a warp's), written
// as held + dx where `held` (the gradient x already has, x's shape) is not null: summed in f32,
// rounded once. Where `acc` (the warp's slice, above) is not null, the row's g * x * r is added
// to it. Returns the row's inverse RMS r.
template <typename T, int W>
__device__ float rms_norm_dx_row(const T* x, const T* w, const T* g, T* dx, int row, int width,
                                 float eps, float offset, const T* held, float* acc) {
  using P = Pack<T, W>;
  const size_t off = (size_t)row * width;
  const float r = warp_inverse_rms<T, W>(x + off, width, eps);
  const int lane = threadIdx.x & 31, first = lane * W;
  float dot = 0.f;
  for (int j = first; j < width; j += 32 * W) {
    const P xv = P::load(x + off + j), wv = P::load(w + j), gv = P::load(g + off + j);
#pragma unroll
    for (int k = 0; k < W; ++k)
      dot += to_f32(xv.e[k]) * to_f32(gv.e[k]) * (offset + to_f32(wv.e[k]));
  }
  const float c = warp_sum(dot) * r * r / width;
  for (int j = first, it = 0; j < width; j += 32 * W, ++it) {
    const P xv = P::load(x + off + j), wv = P::load(w + j), gv = P::load(g + off + j);
    P hv, out;
    if (held != nullptr) hv = P::load(held + off + j);
#pragma unroll
    for (int k = 0; k < W; ++k) {
      float d = r * (to_f32(gv.e[k]) * (offset + to_f32(wv.e[k])) - to_f32(xv.e[k]) * c);
      if (held != nullptr) d += to_f32(hv.e[k]);
      out.e[k] = from_f32<T>(d);
      if (acc != nullptr)
        acc[(it * W + k) * 32 + lane] += to_f32(gv.e[k]) * to_f32(xv.e[k]) * r;
    }
    out.store(dx + off + j);
  }
  return r;
}

// A block's partial row of the weight gradient, after its warps have summed their rows into
// their slices (`warps` of `floats` floats each, laid out as dw_slot's): each column's sum over
// the slices in warp order, written as partial[block][col], so a run repeats its sums.
template <int W>
__device__ __forceinline__ void write_block_partial(const float* slices, int warps, int floats,
                                                    float* partial, int width) {
  __syncthreads();
  for (int col = threadIdx.x; col < width; col += blockDim.x) {
    float total = 0.f;
    for (int k = 0; k < warps; ++k) total += slices[(size_t)k * floats + dw_slot<W>(col)];
    partial[(size_t)blockIdx.x * width + col] = total;
  }
}

// The input gradient, a warp per row; with `r_out`, each row's inverse RMS is written there for
// the weight gradient's kernels.
template <typename T, int W>
__device__ void rms_norm_dx(const T* x, const T* w, const T* g, T* dx, int rows, int width,
                            float eps, float* r_out, float offset, const T* held) {
  const int row = warp_row(rows);
  if (row < 0) return;
  const float r = rms_norm_dx_row<T, W>(x, w, g, dx, row, width, eps, offset, held, nullptr);
  if (r_out != nullptr && (threadIdx.x & 31) == 0) r_out[row] = r;
}

// The input gradient and the weight gradient's partial sums in one pass: each warp takes
// `rows_per_warp` consecutive rows (a block's warps consecutive runs), sums their g * x * r in
// its slice of shared memory, and the block writes the sum of its warps' slices, in warp order,
// as partial[block][col]: the order depends on the shapes only, so a run repeats its sums.
template <typename T, int W>
__device__ void rms_norm_dx_dw(const T* x, const T* w, const T* g, T* dx, float* partial,
                               int rows, int width, float eps, float offset, const T* held,
                               int rows_per_warp) {
  extern __shared__ float slices[];
  const int warps = blockDim.x >> 5, warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int floats = dw_slice_floats<W>(width);
  float* acc = slices + (size_t)warp * floats;
  for (int i = lane; i < floats; i += 32) acc[i] = 0.f;
  const int first = (blockIdx.x * warps + warp) * rows_per_warp;
  for (int row = first; row < min(rows, first + rows_per_warp); ++row)
    rms_norm_dx_row<T, W>(x, w, g, dx, row, width, eps, offset, held, acc);
  write_block_partial<W>(slices, warps, floats, partial, width);
}

// The input gradient and the weight gradient's partial sums in one pass, for rows of exactly
// WIDTH = 32 · WIDE<T> · PACKS elements (a lane's PACKS 16-byte words), too wide for the kernel
// above to keep its warps' slices within 24 KiB a block: each warp loads a row's x, g and held
// gradient into registers at once (so x is read once, not for its RMS, its dot product and the
// gradient in turn, and a warp has a whole row in flight), and adds its g · x · r into its
// slice of shared memory (laid out as dw_slot's). A block's warps take interleaved rows of the
// block's run of `rows_per_block` (the launcher gives each multiprocessor one run), and the
// block writes the sum of its warps' slices, in warp order, as partial[block][col].
// HELD_NORM_WARPS warps a block (launch_constants.h).

template <typename T, int PACKS>
__device__ void rms_norm_dx_dw_held(const T* x, const T* w, const T* g, T* dx, float* partial,
                                    int rows, float eps, float offset, const T* held,
                                    int rows_per_block) {
  constexpr int W = WIDE<T>, WIDTH = 32 * W * PACKS;
  using P = Pack<T, W>;
  extern __shared__ float slices[];  // [HELD_NORM_WARPS][WIDTH]
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  float* acc = slices + warp * WIDTH + lane;  // float (p, k) of this lane at (p * W + k) * 32
  for (int i = 0; i < PACKS * W; ++i) acc[i * 32] = 0.f;
  const int begin = blockIdx.x * rows_per_block, end = min(rows, begin + rows_per_block);
  for (int row = begin + warp; row < end; row += HELD_NORM_WARPS) {
    const size_t off = (size_t)row * WIDTH;
    uint4 xs[PACKS], gs[PACKS];
#pragma unroll
    for (int p = 0; p < PACKS; ++p) {
      const int j = (p * 32 + lane) * W;
      xs[p] = *reinterpret_cast<const uint4*>(x + off + j);
      gs[p] = *reinterpret_cast<const uint4*>(g + off + j);
    }
    float ss = 0.f, dot = 0.f;
#pragma unroll
    for (int p = 0; p < PACKS; ++p) {
      const P wv = P::load(w + (p * 32 + lane) * W);
#pragma unroll
      for (int k = 0; k < W; ++k) {
        const float xf = held_f32<T>(xs[p], k);
        ss += xf * xf;
        dot += xf * held_f32<T>(gs[p], k) * (offset + to_f32(wv.e[k]));
      }
    }
    const float r = rsqrtf(warp_sum(ss) / WIDTH + eps);
    const float c = warp_sum(dot) * r * r / WIDTH;
#pragma unroll
    for (int p = 0; p < PACKS; ++p) {
      const int j = (p * 32 + lane) * W;
      const P wv = P::load(w + j);
      P hv, out;
      if (held != nullptr) hv = P::load(held + off + j);
#pragma unroll
      for (int k = 0; k < W; ++k) {
        const float xf = held_f32<T>(xs[p], k), gf = held_f32<T>(gs[p], k);
        float d = r * (gf * (offset + to_f32(wv.e[k])) - xf * c);
        if (held != nullptr) d += to_f32(hv.e[k]);
        out.e[k] = from_f32<T>(d);
        acc[(p * W + k) * 32] += gf * xf * r;
      }
      out.store(dx + off + j);
    }
  }
  write_block_partial<W>(slices, HELD_NORM_WARPS, WIDTH, partial, WIDTH);
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

// dw = the sum of the `chunks` partial rows: block (32, 8) sums 32 columns, its eight thread
// rows taking every eighth chunk, then the eight sums in order.
template <typename T>
__device__ void rms_norm_dw_finish(const float* partial, T* dw, int chunks, int width) {
  __shared__ float acc[8][33];
  const int col = blockIdx.x * 32 + threadIdx.x;
  float sum = 0.f;
  if (col < width)
    for (int c = threadIdx.y; c < chunks; c += 8) sum += partial[(size_t)c * width + col];
  acc[threadIdx.y][threadIdx.x] = sum;
  __syncthreads();
  if (threadIdx.y == 0 && col < width) {
    float total = 0.f;
    for (int k = 0; k < 8; ++k) total += acc[k][threadIdx.x];
    dw[col] = from_f32<T>(total);
  }
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
  extern "C" __global__ void rms_norm_dx_dw_##S(const T* x, const T* w, const T* g, T* dx,    \
                                                float* partial, int rows, int width,          \
                                                float eps, float offset, const T* held,       \
                                                int rows_per_warp) {                          \
    rms_norm_dx_dw<T, 1>(x, w, g, dx, partial, rows, width, eps, offset, held, rows_per_warp); \
  }                                                                                           \
  extern "C" __global__ void rms_norm_dx_dw_wide_##S(const T* x, const T* w, const T* g,      \
                                                     T* dx, float* partial, int rows,         \
                                                     int width, float eps, float offset,      \
                                                     const T* held, int rows_per_warp) {      \
    rms_norm_dx_dw<T, WIDE<T>>(x, w, g, dx, partial, rows, width, eps, offset, held,          \
                               rows_per_warp);                                                \
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
  extern "C" __global__ void __launch_bounds__(ADD_NORM_WIDE_THREADS)                        \
      add_rms_norm_wide_##S(const T* x, const T* d, const T* w, T* out, int rows, int width,   \
                            float eps, float offset) {                                        \
    add_rms_norm_wide<T>(x, d, w, out, rows, width, eps, offset);                             \
  }

FOR_EACH_FLOAT(NORMS_ENTRY_POINTS)
// The many-row residual add and norm: rows of at most 2, 4 or 8 16-byte words a lane.
#define ADD_NORM_ROWS_ENTRY_POINT(S, T, PACKS)                                                  \
  extern "C" __global__ void __launch_bounds__(256, 3) add_rms_norm_rows##PACKS##_##S(         \
      const T* x, const T* d, const T* w, T* sum, T* y, int rows, int width, float eps,        \
      float offset) {                                                                           \
    add_rms_norm_rows<T, PACKS>(x, d, w, sum, y, rows, width, eps, offset);                     \
  }
#define ADD_NORM_ROWS_ENTRY_POINTS(S, T)                                                        \
  ADD_NORM_ROWS_ENTRY_POINT(S, T, 2) ADD_NORM_ROWS_ENTRY_POINT(S, T, 4)                         \
  ADD_NORM_ROWS_ENTRY_POINT(S, T, 8)
FOR_EACH_FLOAT(ADD_NORM_ROWS_ENTRY_POINTS)
// The held gradients' kernels: 16-bit rows of 1,024, 1,536 and 2,048 elements.
#define HELD_NORM_ENTRY_POINT(S, T, PACKS)                                                      \
  extern "C" __global__ void __launch_bounds__(HELD_NORM_WARPS * 32, 1)                         \
      rms_norm_dx_dw_held##PACKS##_##S(const T* x, const T* w, const T* g, T* dx,               \
                                       float* partial, int rows, float eps, float offset,       \
                                       const T* held, int rows_per_block) {                     \
    rms_norm_dx_dw_held<T, PACKS>(x, w, g, dx, partial, rows, eps, offset, held,                \
                                  rows_per_block);                                              \
  }
#define HELD_NORM_ENTRY_POINTS(S, T)                                                            \
  HELD_NORM_ENTRY_POINT(S, T, 4) HELD_NORM_ENTRY_POINT(S, T, 6) HELD_NORM_ENTRY_POINT(S, T, 8)
HELD_NORM_ENTRY_POINTS(bf16, __nv_bfloat16)
HELD_NORM_ENTRY_POINTS(f16, __half)

