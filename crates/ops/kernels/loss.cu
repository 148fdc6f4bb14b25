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

// A logit's gradient (softmax - onehot(target)) * scale from the logit x less its row's
// log-sum-exp; a row of scale 0 (a masked token) gets 0 without the exponential.
__device__ __forceinline__ float logit_grad(float x_less_lse, bool target, float scale) {
  const float p = scale == 0.f ? 0.f : __expf(x_less_lse);
  return (p - (target ? 1.f : 0.f)) * scale;
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
  for (int j = threadIdx.x; j < vocab; j += blockDim.x)
    d[off + j] = from_f32<T>(logit_grad(to_f32(logits[off + j]) - m - lse, j == (int)t, scale));
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
      for (int k = 0; k < V; ++k)
        o[k] = from_f32<T>(logit_grad(to_f32(e[k]) - lse, j + k == (int)t, scale));
      *reinterpret_cast<uint4*>(dx + j) = out;
    }
  } else {
    for (int j = threadIdx.x; j < vocab; j += blockDim.x)
      dx[j] = from_f32<T>(logit_grad(to_f32(x[j]) - lse, j == (int)t, scale));
  }
}

// The NLL and gradient of a row whose logits are read once: each thread holds its share of the
// row in registers (HELD_WORDS 16-byte words) from the max and sum to the gradient, and
// a row wider than a block's HELD_SPAN 16-byte words is spread over a cluster of C blocks
// (Hopper), which exchange their maxima and sums through distributed shared memory. The kernel
// above reads each row twice (a 1B model's 128K-vocabulary logits: 0.5 GB a chunk more).
// Needs rows of whole, 16-byte aligned words; C > 1 needs compute capability 9.0.
// HELD_THREADS and HELD_WORDS are in launch_constants.h.
constexpr int HELD_SPAN = HELD_THREADS * HELD_WORDS;

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
#define HELD_CLUSTERS 1
#endif

// (max, sum of exp(x − max)) of a row from each part's (max, sum).
__device__ __forceinline__ float2 merge_max_sum(float2 a, float2 b) {
  const float m = fmaxf(a.x, b.x);
  if (m == -INFINITY) return make_float2(m, 0.f);
  return make_float2(m, a.y * __expf(a.x - m) + b.y * __expf(b.x - m));
}

// The (max, sum) of the row over the C blocks of its cluster, from this block's.
template <int C> __device__ __forceinline__ float2 cluster_max_sum(float2 own) {
  if constexpr (C == 1) {
    return own;
  } else {
#ifdef HELD_CLUSTERS
    __shared__ float2 shared_stats;
    if (threadIdx.x == 0) shared_stats = own;
    cluster_sync<C>();
    float2 row = make_float2(-INFINITY, 0.f);
#pragma unroll
    for (int r = 0; r < C; ++r) {
      float2 part;
      asm volatile("ld.shared::cluster.v2.f32 {%0, %1}, [%2];"
                   : "=f"(part.x), "=f"(part.y)
                   : "r"(cluster_address(&shared_stats, r))
                   : "memory");
      row = merge_max_sum(row, part);
    }
    // No block of the cluster leaves (and frees its `shared_stats`) before all have read them:
    // the matching wait ends the kernel.
    asm volatile("barrier.cluster.arrive.release.aligned;" ::: "memory");
    return row;
#else
    __trap();
    return own;
#endif
  }
}

template <int C> __device__ __forceinline__ void cluster_exit() {
#ifdef HELD_CLUSTERS
  if constexpr (C > 1) asm volatile("barrier.cluster.wait.acquire.aligned;" ::: "memory");
#endif
}

template <typename T, int C>
__device__ void token_nll_with_grad_held(const T* logits, const uint32_t* targets, const float* g,
                                         float* nll, T* d, int vocab) {
  constexpr int V = 16 / sizeof(T);
  const int row = blockIdx.x / C, part = blockIdx.x % C;
  const size_t off = (size_t)row * vocab;
  const T* x = logits + off;
  // Element index of this thread's word i (words of a block interleaved by thread), and how
  // many of its words are in the row.
  const int start = (part * HELD_SPAN + (int)threadIdx.x) * V;
  auto first = [&](int i) { return start + i * HELD_THREADS * V; };
  const int words = max(0, (vocab - start + HELD_THREADS * V - 1) / (HELD_THREADS * V));
  uint4 held[HELD_WORDS];
#pragma unroll
  for (int i = 0; i < HELD_WORDS; ++i)
    if (i < words) held[i] = *reinterpret_cast<const uint4*>(x + first(i));
  // The values are at hand: the maximum, then the sum of exponentials, each over registers.
  float m = -INFINITY;
#pragma unroll
  for (int i = 0; i < HELD_WORDS; ++i) {
    if (i >= words) break;
#pragma unroll
    for (int k = 0; k < V; ++k) m = fmaxf(m, held_f32<T>(held[i], k));
  }
  const float block_m = block_max(m);
  float sum = 0.f;
  if (block_m != -INFINITY) {
#pragma unroll
    for (int i = 0; i < HELD_WORDS; ++i) {
      if (i >= words) break;
#pragma unroll
      for (int k = 0; k < V; ++k) sum += __expf(held_f32<T>(held[i], k) - block_m);
    }
  }
  const float block_s = block_sum(sum);
  const float2 stats = cluster_max_sum<C>(make_float2(block_m, block_s));
  const float lse = stats.x + logf(stats.y);
  const uint32_t t = targets[row];
  if (part == 0 && threadIdx.x == 0) nll[row] = t < (uint32_t)vocab ? lse - to_f32(x[t]) : NAN;
  const float scale = g[row];
#pragma unroll
  for (int i = 0; i < HELD_WORDS; ++i) {
    if (i >= words) break;
    const int j = first(i);
    uint4 out;
    T* o = reinterpret_cast<T*>(&out);
#pragma unroll
    for (int k = 0; k < V; ++k)
      o[k] = from_f32<T>(logit_grad(held_f32<T>(held[i], k) - lse, j + k == (int)t, scale));
    *reinterpret_cast<uint4*>(d + off + j) = out;
  }
  cluster_exit<C>();
}

// Cluster dimensions exist on compute capability 9.0 (and in the host pass, which declares the
// entry points); elsewhere the clustered entry points trap, and the launcher never picks them.
#if defined(HELD_CLUSTERS) || !defined(__CUDA_ARCH__)
#define HELD_CLUSTER_DIMS(C) __cluster_dims__(C, 1, 1)
#else
#define HELD_CLUSTER_DIMS(C)
#endif

#define HELD_ENTRY_POINT(S, T, C, DIMS)                                                        \
  extern "C" __global__ void DIMS __launch_bounds__(HELD_THREADS, 2)                           \
      token_nll_with_grad_held##C##_##S(const T* logits, const uint32_t* targets,              \
                                        const float* g, float* nll, T* d, int vocab) {         \
    token_nll_with_grad_held<T, C>(logits, targets, g, nll, d, vocab);                         \
  }
#define HELD_ENTRY_POINTS(S, T)                                                                \
  HELD_ENTRY_POINT(S, T, 1, )                                                                  \
  HELD_ENTRY_POINT(S, T, 2, HELD_CLUSTER_DIMS(2))                                              \
  HELD_ENTRY_POINT(S, T, 4, HELD_CLUSTER_DIMS(4))                                              \
  HELD_ENTRY_POINT(S, T, 8, HELD_CLUSTER_DIMS(8))

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
FOR_EACH_FLOAT(HELD_ENTRY_POINTS)
