// One AdamW step over many f32 parameters in one launch. `tensors` holds 8 words per parameter:
// weight, gradient, first and second moment addresses, element count, the weight-decay keep
// factor (1 - lr * wd) as f32 bits, the address of the weight's compute-dtype copy (0: none)
// and that copy's dtype (COPY_BF16 or COPY_F16). `chunks` holds one word per block: the
// parameter index in the high 24 bits and the first element in the low 40. Updates are in
// place; a copy is written as the cast of the updated weight (round to nearest even, as the
// cast kernels), so mixed precision casts no master weight before its next step.
//
// Launched from src/adamw.rs.

#include "common.cuh"

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

// The copy dtypes (src/adamw.rs: CopyKind); ADAMW_WORDS, the words per parameter in the
// descriptor table, is in launch_constants.h.
#define COPY_BF16 1
#define COPY_F16 2

// Writes elements i.. (N of them, 8-byte aligned when N is 4) of a weight's 16-bit copy.
template <typename T, int N>
__device__ __forceinline__ void store_copy(void* copy, uint64_t i, const float (&w)[N]) {
  Pack<T, N> out;
#pragma unroll
  for (int k = 0; k < N; ++k) out.e[k] = from_f32<T>(w[k]);
  out.store(static_cast<T*>(copy) + i);
}

template <int N>
__device__ __forceinline__ void write_copy(void* copy, uint64_t kind, uint64_t i,
                                           const float (&w)[N]) {
  if (kind == COPY_BF16)
    store_copy<__nv_bfloat16, N>(copy, i, w);
  else if (kind == COPY_F16)
    store_copy<__half, N>(copy, i, w);
}

extern "C" __global__ void adamw_multi(const uint64_t* tensors, const uint64_t* chunks,
                                       int chunk_len, float lr, float beta1, float beta2,
                                       float eps, float bias1, float bias2, float grad_scale) {
  const uint64_t c = chunks[blockIdx.x];
  const uint64_t t = c >> 40, start = c & ((1ull << 40) - 1);
  const uint64_t* desc = tensors + ADAMW_WORDS * t;
  float* w = (float*)desc[0];
  const float* g = (const float*)desc[1];
  float* m = (float*)desc[2];
  float* v = (float*)desc[3];
  const uint64_t n = desc[4];
  const float keep = __uint_as_float((uint32_t)desc[5]);
  void* copy = (void*)desc[6];
  const uint64_t kind = copy ? desc[7] : 0;
  const uint64_t end = min(n, start + (uint64_t)chunk_len);
  uint64_t scalar_from = start;
  // Chunks start at multiples of chunk_len (a multiple of 4): four elements per access where
  // all four buffers are 16-byte aligned (and the copy 8-byte aligned).
  const bool copy_aligned = (reinterpret_cast<uintptr_t>(copy) & 7) == 0;
  if (aligned16(w) && aligned16(g) && aligned16(m) && aligned16(v) && copy_aligned) {
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
      if (kind) write_copy<4>(copy, kind, i, {wi.x, wi.y, wi.z, wi.w});
    }
    scalar_from = vec_end;
  }
  for (uint64_t i = scalar_from + threadIdx.x; i < end; i += blockDim.x) {
    adamw_update(w[i], g[i], m[i], v[i], keep, lr, beta1, beta2, eps, bias1, bias2, grad_scale);
    if (kind) write_copy<1>(copy, kind, i, {w[i]});
  }
}

// Sum of squares of many f32 tensors (global gradient norm), in two deterministic passes: one
// partial sum per chunk (same descriptor layout as adamw_multi; only the gradient address and
// count are read), then one block sums the partials in a fixed order.
extern "C" __global__ void sum_squares_multi(const uint64_t* tensors, const uint64_t* chunks,
                                             int chunk_len, float* partial) {
  const uint64_t c = chunks[blockIdx.x];
  const uint64_t t = c >> 40, start = c & ((1ull << 40) - 1);
  const float* g = (const float*)tensors[ADAMW_WORDS * t + 1];
  const uint64_t end = min(tensors[ADAMW_WORDS * t + 4], start + (uint64_t)chunk_len);
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
