// NF4 weights (src/nf4.rs): dequantization into a dense buffer, and the matrix-vector product
// of decoding read straight from the 4-bit codes.
//
// `tables` holds the 16 NF4 values, the 256 of the dynamic map, then one f32 scale per 256
// absmaxes. A block's absmax is map[absmax code] * scale + offset, rounded after each step (no
// fused multiply-add), as bitsandbytes computes it; an element is its NF4 value times that,
// rounded once to the output dtype.

#include "common.cuh"

#define NF4_TABLES (16 + 256)

__device__ __forceinline__ float nf4_block_absmax(const uint8_t* absmax, const float* tables,
                                                   float offset, size_t block) {
  return __fadd_rn(__fmul_rn(tables[16 + absmax[block]], tables[NF4_TABLES + block / 256]), offset);
}

// Sixteen elements (eight bytes of codes, a quarter of a block of 64) per thread: the codes read
// as one 8-byte word and the values written 16 bytes at a time where the codes are 8-byte
// aligned and the sixteen lie inside the tensor; element by element elsewhere (the tail, and
// codes at an odd offset). NF4_PER_THREAD is in launch_constants.h.
template <typename T>
__device__ void nf4_dequantize(const uint8_t* packed, const uint8_t* absmax, const float* tables,
                               T* out, float offset, size_t n) {
  __shared__ float nf4[16];
  if (threadIdx.x < 16) nf4[threadIdx.x] = tables[threadIdx.x];
  __syncthreads();
  const size_t e0 = ((size_t)blockIdx.x * blockDim.x + threadIdx.x) * NF4_PER_THREAD;
  if (e0 >= n) return;
  const float scale = nf4_block_absmax(absmax, tables, offset, e0 / 64);
  if (e0 + NF4_PER_THREAD <= n && reinterpret_cast<uintptr_t>(packed) % 8 == 0) {
    const uint2 word = *reinterpret_cast<const uint2*>(packed + e0 / 2);
    Pack<T, NF4_PER_THREAD> v;
#pragma unroll
    for (int j = 0; j < NF4_PER_THREAD / 2; ++j) {
      const uint32_t byte = ((j < 4 ? word.x : word.y) >> (8 * (j % 4))) & 0xff;
      v.e[2 * j] = from_f32<T>(__fmul_rn(nf4[byte >> 4], scale));
      v.e[2 * j + 1] = from_f32<T>(__fmul_rn(nf4[byte & 15], scale));
    }
    v.store(out + e0);
    return;
  }
  for (size_t e = e0; e < n && e < e0 + NF4_PER_THREAD; ++e) {
    const uint8_t codes = packed[e / 2];
    out[e] = from_f32<T>(__fmul_rn(nf4[e % 2 == 0 ? codes >> 4 : codes & 15], scale));
  }
}

// y[r, o] = sum_k x[r, k] w[o, k] for a weight [out, in] stored as NF4, `in` a multiple of 64
// (so every row starts a block and 8 codes never straddle one). One warp per output feature;
// each lane reads 4 bytes (8 codes) at a time, and the row is read once for all `rows` inputs
// (at most NF4_GEMV_ROWS, the launcher's limit: launch_constants.h).
template <typename T>
__device__ void nf4_gemv(const T* x, const uint8_t* packed, const uint8_t* absmax,
                         const float* tables, T* y, float offset, int rows, int in, int out) {
  __shared__ float nf4[16];
  if (threadIdx.x < 16) nf4[threadIdx.x] = tables[threadIdx.x];
  __syncthreads();
  const int o = warp_row(out);
  if (o < 0) return;
  const int lane = threadIdx.x & 31;
  const size_t first = (size_t)o * in;  // the row's first element
  float acc[NF4_GEMV_ROWS] = {0.f};
  for (int k = lane * 8; k < in; k += 32 * 8) {
    const size_t e = first + k;
    const float scale = nf4_block_absmax(absmax, tables, offset, e / 64);
    const uint32_t word = *reinterpret_cast<const uint32_t*>(packed + e / 2);
    float w[8];
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const uint32_t b = (word >> (8 * j)) & 0xff;
      w[2 * j] = nf4[b >> 4] * scale;
      w[2 * j + 1] = nf4[b & 15] * scale;
    }
    for (int r = 0; r < rows; ++r) {
      const T* xr = x + (size_t)r * in + k;
#pragma unroll
      for (int j = 0; j < 8; ++j) acc[r] += to_f32(xr[j]) * w[j];
    }
  }
  for (int r = 0; r < rows; ++r) {
    const float total = warp_sum(acc[r]);
    if (lane == 0) y[(size_t)r * out + o] = from_f32<T>(total);
  }
}

#define NF4_ENTRY_POINTS(S, T)                                                                  \
  extern "C" __global__ void nf4_dequantize_##S(const uint8_t* packed, const uint8_t* absmax,  \
                                                const float* tables, T* out, float offset,     \
                                                size_t n) {                                    \
    nf4_dequantize<T>(packed, absmax, tables, out, offset, n);                                 \
  }                                                                                            \
  extern "C" __global__ void nf4_gemv_##S(const T* x, const uint8_t* packed,                   \
                                          const uint8_t* absmax, const float* tables, T* y,    \
                                          float offset, int rows, int in, int out) {           \
    nf4_gemv<T>(x, packed, absmax, tables, y, offset, rows, in, out);                          \
  }

FOR_EACH_FLOAT(NF4_ENTRY_POINTS)
