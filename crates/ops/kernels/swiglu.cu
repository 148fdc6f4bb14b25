// Gated linear units: y = act(gate) * up over n elements in rows of `width`, y contiguous, for
// act = silu (SwiGLU) or the tanh-approximated GELU (GeGLU): one kernel body per direction,
// the activation a template parameter. Row r of gate and of up starts at r · stride: separate
// tensors are one row (width = stride = n), the halves of a packed [.., 2 · width] projection
// have stride 2 · width with up = gate + width. The gradients go to the same places in d_gate
// and d_up ([d_gate; d_up] in one 2n buffer, or the halves of one packed gradient).
//
// Launched from src/swiglu.rs.

#include "common.cuh"

// Elements i·W .. i·W + W − 1 for thread i; width and stride are multiples of W.
template <typename A, typename T, int W>
__device__ void glu_fwd(const T* gate, const T* up, T* y, size_t n, long long width,
                        long long stride) {
  using P = Pack<T, W>;
  const size_t i = ((size_t)blockIdx.x * blockDim.x + threadIdx.x) * W;
  if (i >= n) return;
  const size_t at = (i / width) * stride + i % width;
  const P g = P::load(gate + at), u = P::load(up + at);
  P out;
#pragma unroll
  for (int k = 0; k < W; ++k) out.e[k] = from_f32<T>(A::value(to_f32(g.e[k])) * to_f32(u.e[k]));
  out.store(y + i);
}

template <typename A, typename T, int W>
__device__ void glu_bwd(const T* gate, const T* up, const T* grad, T* d_gate, T* d_up, size_t n,
                        long long width, long long stride) {
  using P = Pack<T, W>;
  const size_t i = ((size_t)blockIdx.x * blockDim.x + threadIdx.x) * W;
  if (i >= n) return;
  const size_t at = (i / width) * stride + i % width;
  const P g = P::load(gate + at), u = P::load(up + at), dy = P::load(grad + i);
  P dg, du;
#pragma unroll
  for (int k = 0; k < W; ++k) {
    const float gk = to_f32(g.e[k]), uk = to_f32(u.e[k]), dk = to_f32(dy.e[k]);
    float a, da;
    A::with_derivative(gk, a, da);
    dg.e[k] = from_f32<T>(dk * uk * da);
    du.e[k] = from_f32<T>(dk * a);
  }
  dg.store(d_gate + at);
  du.store(d_up + at);
}

// extern "C" entry points, one per unit (NAME, activation A) and dtype.

#define GLU_ENTRY_POINTS(NAME, A, S, T)                                                        \
  extern "C" __global__ void NAME##_fwd_##S(const T* gate, const T* up, T* y, size_t n,        \
                                            long long width, long long stride) {              \
    glu_fwd<A, T, 1>(gate, up, y, n, width, stride);                                          \
  }                                                                                           \
  extern "C" __global__ void NAME##_fwd_wide_##S(const T* gate, const T* up, T* y, size_t n,   \
                                                 long long width, long long stride) {         \
    glu_fwd<A, T, WIDE<T>>(gate, up, y, n, width, stride);                                    \
  }                                                                                           \
  extern "C" __global__ void NAME##_bwd_##S(const T* gate, const T* up, const T* grad,        \
                                            T* d_gate, T* d_up, size_t n, long long width,    \
                                            long long stride) {                               \
    glu_bwd<A, T, 1>(gate, up, grad, d_gate, d_up, n, width, stride);                         \
  }                                                                                           \
  extern "C" __global__ void NAME##_bwd_wide_##S(const T* gate, const T* up, const T* grad,   \
                                                 T* d_gate, T* d_up, size_t n,                \
                                                 long long width, long long stride) {         \
    glu_bwd<A, T, WIDE<T>>(gate, up, grad, d_gate, d_up, n, width, stride);                   \
  }

#define SWIGLU_ENTRY_POINTS(S, T) GLU_ENTRY_POINTS(swiglu, Silu, S, T)
#define GEGLU_ENTRY_POINTS(S, T) GLU_ENTRY_POINTS(geglu, GeluTanh, S, T)

FOR_EACH_FLOAT(SWIGLU_ENTRY_POINTS)
FOR_EACH_FLOAT(GEGLU_ENTRY_POINTS)
