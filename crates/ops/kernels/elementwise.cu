// Elementwise and copy kernels: the head split and merge (swap_middle), the 16-bytes-per-thread
// add and scale, the dtype casts and inverted dropout by a counter-based mask.
//
// Launched from src/swap.rs (swap_middle), src/add.rs (add_vec, scale_vec), src/cast.rs
// (cast_to_*) and src/dropout.rs (dropout_vec).

#include "common.cuh"

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

// Inverted dropout whose mask is a function of a seed and each element's index, so that a
// backward pass draws the same mask again instead of keeping it: element i is kept when its
// 16 bits of one of SplitMix64's outputs for `seed` are at least `threshold` (p · 2^16). In
// each run of 16 elements output j (0-3) holds elements 2j, 2j + 1 (quarters 0, 1 from the
// low end) and 2j + 8, 2j + 9 (quarters 2, 3): the elements one thread holds in a tensor-core
// fragment, one draw for four (kernels/lora.cu). out = base + (kept ? x · scale : 0), base
// optional (null); `scale` is 1 / (1 − p) times the caller's factor. src/dropout.rs draws the
// same mask on the host. 16 bytes per thread; the tail by the thread past the last whole
// vector.

// SplitMix64's output number `draw` for `seed`.
__device__ __forceinline__ unsigned long long dropout_bits(unsigned long long seed,
                                                           size_t draw) {
  unsigned long long z = seed + (draw + 1) * 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

// The output that holds element i's bits, and their quarter of it.
__device__ __forceinline__ size_t dropout_draw(size_t i) { return i / 16 * 4 + i % 16 / 2 % 4; }
__device__ __forceinline__ int dropout_quarter(size_t i) { return (int)(i % 16 / 8 * 2 + i % 2); }

// Whether the element whose bits are quarter `q` of `bits` is kept.
__device__ __forceinline__ bool dropout_quarter_kept(unsigned long long bits, int q,
                                                     unsigned long long threshold) {
  return ((bits >> (16 * q)) & 0xffffull) >= threshold;
}

__device__ __forceinline__ bool dropout_keeps(unsigned long long seed, size_t i,
                                              unsigned long long threshold) {
  return dropout_quarter_kept(dropout_bits(seed, dropout_draw(i)), dropout_quarter(i), threshold);
}

template <typename T>
__device__ void dropout_vec(const T* x, const T* base, T* out, size_t n, unsigned long long seed,
                            unsigned long long threshold, float scale) {
  using P = Pack<T, WIDE<T>>;
  const size_t i = ((size_t)blockIdx.x * blockDim.x + threadIdx.x) * WIDE<T>;
  if (i + WIDE<T> <= n) {
    const P v = P::load(x + i);
    P b;
    if (base) b = P::load(base + i);
    P y;
    // i is even (a multiple of WIDE<T>): a pair of elements takes one draw's quarters q, q + 1.
#pragma unroll
    for (int k = 0; k < WIDE<T>; k += 2) {
      const unsigned long long z = dropout_bits(seed, dropout_draw(i + k));
      const int q = dropout_quarter(i + k);
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const float kept = dropout_quarter_kept(z, q + h, threshold) ? to_f32(v.e[k + h]) * scale : 0.f;
        y.e[k + h] = from_f32<T>(base ? to_f32(b.e[k + h]) + kept : kept);
      }
    }
    y.store(out + i);
  } else {
    for (size_t j = i; j < n; ++j) {
      const float kept = dropout_keeps(seed, j, threshold) ? to_f32(x[j]) * scale : 0.f;
      out[j] = from_f32<T>(base ? to_f32(base[j]) + kept : kept);
    }
  }
}

// extern "C" entry points, one per dtype.

#define ELEMENTWISE_ENTRY_POINTS(S, T)                                                         \
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
  extern "C" __global__ void dropout_vec_##S(const T* x, const T* base, T* out, size_t n,     \
                                             unsigned long long seed,                         \
                                             unsigned long long threshold, float scale) {     \
    dropout_vec<T>(x, base, out, n, seed, threshold, scale);                                  \
  }

FOR_EACH_FLOAT(ELEMENTWISE_ENTRY_POINTS)
