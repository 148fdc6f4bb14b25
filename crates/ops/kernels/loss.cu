// Cross-entropy over the vocabulary, one row of logits per block. Targets are u32 and checked
// on the host side by the caller's contract; an out-of-range target yields NaN, not a read.
//
// Launched from src/cross_entropy.rs.

#include "common.cuh"

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

// extern "C" entry points, one per dtype.

#define LOSS_ENTRY_POINTS(S, T)                                                                \
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
  }

FOR_EACH_FLOAT(LOSS_ENTRY_POINTS)
