// Embedding backward: d_table[ids[i]] += grad[i] for every token, accumulated in f32.
//
// Launched from src/embedding.rs.

#include "common.cuh"

template <typename T>
__device__ void embedding_grad(const uint32_t* ids, const T* grad, float* d_table, int tokens,
                               int width, int vocab) {
  const size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= (size_t)tokens * width) return;
  const uint32_t id = ids[i / width];
  if (id < (uint32_t)vocab) atomicAdd(&d_table[(size_t)id * width + i % width], to_f32(grad[i]));
}

// extern "C" entry points, one per dtype.

#define EMBEDDING_ENTRY_POINTS(S, T)                                                           \
  extern "C" __global__ void embedding_grad_##S(const uint32_t* ids, const T* grad,           \
                                                float* d_table, int tokens, int width,        \
                                                int vocab) {                                  \
    embedding_grad<T>(ids, grad, d_table, tokens, width, vocab);                              \
  }

FOR_EACH_FLOAT(EMBEDDING_ENTRY_POINTS)
