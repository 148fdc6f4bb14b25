// What every kernel file shares: the dtype conversions, the vector access type `Pack` and
// WIDE<T>, warp and block reductions, the row of a warp-per-row kernel, the logistic function
// and the gated units' activations, and FOR_EACH_FLOAT, which instantiates a family's entry
// points per dtype. launch_constants.h holds the sizes a kernel's launcher reads too.
//
// Every kernel reads and writes its tensor dtype (f32, bf16 or f16: the `_f32`/`_bf16`/`_f16`
// suffix) and accumulates in f32, as the composite references of the ops do (src/reference.rs
// gathers them). Row kernels run one block per row (the causal softmax, the RMSNorm training
// kernels and gemv one warp per row); blockDim.x is a multiple of 32 and at most 1024.

#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>
#include <type_traits>

#include "launch_constants.h"

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

// Element k of a 16-byte word of T held in registers, as f32. A bf16 element is unpacked where
// it is used (an opaque shift or mask, an f16 one by an opaque conversion): left to itself, the compiler keeps a thread's unpacked
// values between its passes over the words it holds, twice the registers of the packed ones
// (loss.cu's held rows, norms.cu's held gradients).
template <typename T> __device__ __forceinline__ float held_f32(const uint4& word, int k) {
  return to_f32(reinterpret_cast<const T*>(&word)[k]);
}
template <> __device__ __forceinline__ float held_f32<__nv_bfloat16>(const uint4& word, int k) {
  const uint32_t pair = reinterpret_cast<const uint32_t*>(&word)[k / 2];
  uint32_t bits;
  if (k % 2 == 0)
    asm volatile("shl.b32 %0, %1, 16;" : "=r"(bits) : "r"(pair));
  else
    asm volatile("and.b32 %0, %1, 0xffff0000;" : "=r"(bits) : "r"(pair));
  return __uint_as_float(bits);
}
template <> __device__ __forceinline__ float held_f32<__half>(const uint4& word, int k) {
  const uint32_t pair = reinterpret_cast<const uint32_t*>(&word)[k / 2];
  const unsigned short half = k % 2 == 0 ? pair & 0xffff : pair >> 16;
  float value;
  asm volatile("cvt.f32.f16 %0, %1;" : "=f"(value) : "h"(half));
  return value;
}

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

// The logistic function.
__device__ __forceinline__ float sigmoid(float x) { return 1.f / (1.f + __expf(-x)); }

// The activations of the gated linear units (swiglu.cu, and gemv's in decode.cu): the value,
// and the value with its derivative.
struct Silu {
  __device__ __forceinline__ static float value(float g) { return g * sigmoid(g); }
  __device__ __forceinline__ static void with_derivative(float g, float& a, float& da) {
    const float s = sigmoid(g);
    a = g * s;
    da = s * (1.f + g * (1.f - s));
  }
};

// PyTorch's tanh-approximated GELU (`gelu_pytorch_tanh`, Gemma's GeGLU).
struct GeluTanh {
  static constexpr float SCALE = 0.7978845608f;  // sqrt(2 / pi)
  static constexpr float CUBIC = 0.044715f;
  __device__ __forceinline__ static float value(float g) {
    return 0.5f * g * (1.f + tanhf(SCALE * g * (1.f + CUBIC * g * g)));
  }
  __device__ __forceinline__ static void with_derivative(float g, float& a, float& da) {
    const float t = tanhf(SCALE * g * (1.f + CUBIC * g * g));
    a = 0.5f * g * (1.f + t);
    da = 0.5f * (1.f + t) + 0.5f * g * (1.f - t * t) * SCALE * (1.f + 3.f * CUBIC * g * g);
  }
};

// The logit of an attention score: scaled, then soft-capped to (-cap, cap) where cap > 0
// (Gemma 2's `cap · tanh(x / cap)`).
__device__ __forceinline__ float attention_logit(float s, float scale, float cap) {
  const float x = s * scale;
  return cap > 0.f ? cap * tanhf(x / cap) : x;
}

// Element i of a head x after RoPE over its first 2 * rhalf elements (rotate-half layout; cos
// and sin are the position's rows of rhalf), rounded to T; past the rotated elements, x[i].
// write_kv (rope_kv.cu) and decode_step (decode.cu) rotate with it.
template <typename T>
__device__ __forceinline__ T rope_element(const T* x, const T* cos, const T* sin, int i,
                                          int rhalf) {
  if (i >= 2 * rhalf) return x[i];
  const int j = i < rhalf ? i : i - rhalf;
  const float c = to_f32(cos[j]), s = to_f32(sin[j]);
  const float x1 = to_f32(x[j]), x2 = to_f32(x[rhalf + j]);
  return from_f32<T>(i < rhalf ? x1 * c - x2 * s : x2 * c + x1 * s);
}

// Thread block clusters (compute capability 9.0). cluster_sync<C>() is a barrier of the C
// blocks of the cluster (the block's own where C is 1): shared memory written before it is
// visible to the others after it. cluster_load<C>(local, rank) reads the float at `local` in
// the shared memory of the cluster's block `rank` (the block's own where C is 1), through
// cluster_address. Compiled for
// an older GPU, a cluster of several blocks traps: launchers take clustered kernels only where
// the device runs this build's 9.0 machine code (src/launch.rs's runs_hopper_code).
template <int C>
__device__ __forceinline__ void cluster_sync() {
  if constexpr (C == 1) {
    __syncthreads();
  } else {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("barrier.cluster.arrive.release.aligned;\nbarrier.cluster.wait.acquire.aligned;\n"
                 ::: "memory");
#else
    __trap();
#endif
  }
}

// The address, in the cluster's shared memory window, of `local` in block `rank`'s shared
// memory (for an ld.shared::cluster).
__device__ __forceinline__ uint32_t cluster_address(const void* local, int rank) {
  uint32_t remote = 0;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("mapa.shared::cluster.u32 %0, %1, %2;"
               : "=r"(remote)
               : "r"((uint32_t)__cvta_generic_to_shared(local)), "r"(rank));
#else
  __trap();
#endif
  return remote;
}

template <int C>
__device__ __forceinline__ float cluster_load(const float* local, int rank) {
  if constexpr (C == 1) {
    return *local;
  } else {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    float value;
    asm volatile("ld.shared::cluster.f32 %0, [%1];"
                 : "=f"(value)
                 : "r"(cluster_address(local, rank))
                 : "memory");
    return value;
#else
    __trap();
    return 0.f;
#endif
  }
}

// Programmatic dependent launch (compute capability 9.x; src/programmatic.rs says which
// launches use it). `dependents_may_launch` lets the next kernel in the stream start its
// blocks once every block of this one has run it; `wait_for_previous` waits until the kernel
// ahead has ended and its writes are visible. A kernel launched that way reads before its wait
// only what no kernel ahead of it may be writing (the kernel just ahead may itself have
// started before the one ahead of it ended), and writes nothing. Launched in stream order, or
// compiled for an older GPU, both do nothing.
__device__ __forceinline__ void dependents_may_launch() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

__device__ __forceinline__ void wait_for_previous() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

// M(suffix, type) for each float dtype: a family's entry points, once per dtype.
#define FOR_EACH_FLOAT(M) M(f32, float) M(bf16, __nv_bfloat16) M(f16, __half)
