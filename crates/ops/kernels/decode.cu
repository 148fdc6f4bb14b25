// Decoding kernels, for steps bound by kernel launches: the attention of one query per head
// against a KV cache read in place, and matrix-vector products (one with the SwiGLU or GeGLU
// of a stacked gate/up projection).
//
// Launched from src/attention/decode.rs (decode attention) and src/gemv.rs.

#include "common.cuh"

#include <climits>

// ---------------------------------------------------------------------------------------------
// Decode attention: one query per (batch, head) against a KV cache read in place (a view into
// the preallocated cache, so no copy of it per token). q is [b*h, d] contiguous; k and v have
// element strides (batch, kv head, position) and unit stride along d; query head h reads kv
// head h / group. `scores` is [b*h, kv_len] f32 scratch. One block per (batch, head), of 1024
// threads (a decode step has few blocks, so each is made wide): a warp per key for the scores
// (lanes along d, so rows are read coalesced), then blockDim / d groups of d threads that each
// sum the values of every groups-th key, and a final sum over the groups. Dynamic shared
// memory: the query (d floats), then blockDim partial sums. Scores are attention_logit's
// (common.cuh: scaled, soft-capped where cap > 0); with window > 0 only the last `window`
// positions are attended to.

template <typename T>
__device__ void decode_attention(const T* q, const T* k, const T* v, T* out, float* scores,
                                 int heads, int group, int kv_len, int d, long long k_sb,
                                 long long k_sh, long long k_sp, long long v_sb, long long v_sh,
                                 long long v_sp, float scale, const uint32_t* position,
                                 float cap, int window) {
  // A replayed decode step attends to the positions up to its own, read from `position`;
  // kv_len is then the cache's capacity, which bounds it.
  if (position != nullptr) kv_len = min(kv_len, (int)*position + 1);
  const int first = window > 0 ? max(0, kv_len - window) : 0;
  extern __shared__ float shared[];
  float* query = shared;
  float* partial = shared + d;
  const int bh = blockIdx.x, b = bh / heads, kv_head = (bh % heads) / group;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  const T* kb = k + b * k_sb + kv_head * k_sh;
  const T* vb = v + b * v_sb + kv_head * v_sh;
  float* s = scores + (size_t)bh * kv_len;
  for (int i = threadIdx.x; i < d; i += blockDim.x) query[i] = to_f32(q[(size_t)bh * d + i]);
  __syncthreads();
  float m = -INFINITY;
  for (int j = first + warp; j < kv_len; j += warps) {
    const T* kj = kb + j * k_sp;
    float dot = 0.f;
    for (int i = lane; i < d; i += 32) dot += query[i] * to_f32(kj[i]);
    dot = attention_logit(warp_sum(dot), scale, cap);
    if (lane == 0) s[j] = dot;
    m = fmaxf(m, dot);
  }
  m = block_max(m);  // its barriers also publish the scores to the whole block
  float sum = 0.f;
  for (int j = first + threadIdx.x; j < kv_len; j += blockDim.x) {
    const float p = __expf(s[j] - m);
    s[j] = p;
    sum += p;
  }
  const float inv = 1.f / block_sum(sum);  // and the probabilities
  const int groups = blockDim.x / d, g = threadIdx.x / d, i = threadIdx.x % d;
  float acc = 0.f;
  if (g < groups) {
#pragma unroll 4
    for (int j = first + g; j < kv_len; j += groups) acc += s[j] * to_f32(vb[j * v_sp + i]);
  }
  partial[threadIdx.x] = acc;
  __syncthreads();
  if (threadIdx.x < d) {
    float total = 0.f;
    for (int gg = 0; gg < groups; ++gg) total += partial[gg * d + threadIdx.x];
    out[(size_t)bh * d + threadIdx.x] = from_f32<T>(total * inv);
  }
}

// ---------------------------------------------------------------------------------------------
// Matrix-vector products for decoding: y[r] = w · x[r] for a few rows r of x [rows, in] and a
// weight w [out, in], one warp per output feature, 16-byte loads (in must be a multiple of
// 16 / sizeof(T) and both operands 16-byte aligned: the launcher checks); one variant applies
// the SwiGLU of a stacked gate/up weight on the way out. cuBLAS runs these
// shapes as split-K GEMMs of two kernels each; a decode step is bound by launches.

// The dot products of N weight rows with one row of x, summed over the warp (every lane gets
// them). Each lane loads its next U 16-byte units of every operand before any arithmetic: a
// decode step's products are too small to hide memory latency behind other warps, so the
// rounds of dependent loads are a warp's time. Each lane sums its units in ascending order.
template <typename T, int N>
__device__ __forceinline__ void warp_dots(const T* const (&w)[N], const T* x, int in,
                                          float (&dots)[N]) {
  constexpr int V = 16 / sizeof(T), U = 8;  // elements per 16-byte unit, units per round
  const int lane = threadIdx.x & 31, units = in / V;
  const uint4* xv = reinterpret_cast<const uint4*>(x);
  float acc[N];
#pragma unroll
  for (int n = 0; n < N; ++n) acc[n] = 0.f;
  for (int first = lane; first < units; first += 32 * U) {
    uint4 b[U], a[N][U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int i = first + 32 * u;
      if (i >= units) break;
      b[u] = xv[i];
#pragma unroll
      for (int n = 0; n < N; ++n) a[n][u] = reinterpret_cast<const uint4*>(w[n])[i];
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      if (first + 32 * u >= units) break;
      const T* bp = reinterpret_cast<const T*>(&b[u]);
#pragma unroll
      for (int n = 0; n < N; ++n) {
        const T* ap = reinterpret_cast<const T*>(&a[n][u]);
#pragma unroll
        for (int k = 0; k < V; ++k) acc[n] += to_f32(ap[k]) * to_f32(bp[k]);
      }
    }
  }
#pragma unroll
  for (int n = 0; n < N; ++n) dots[n] = warp_sum(acc[n]);
}

// y[r][o] = w[o] · x[r].
template <typename T>
__device__ void gemv(const T* x, const T* w, T* y, int rows, int in, int out) {
  const int o = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
  if (o >= out) return;  // the whole warp leaves together
  const T* row[1] = {w + (size_t)o * in};
  for (int r = 0; r < rows; ++r) {
    float dot[1];
    warp_dots<T, 1>(row, x + (size_t)r * in, in, dot);
    if ((threadIdx.x & 31) == 0) y[(size_t)r * out + o] = from_f32<T>(dot[0]);
  }
}

// The gated unit of a stacked gate/up projection: w is [2 out, in] (gate rows, then up rows)
// and y[r][o] = act(g) · u with g = w[o] · x[r] and u = w[out + o] · x[r], both rounded to T
// first as the separate projections store them; act is A (common.cuh: SwiGLU's or GeGLU's).
template <typename A, typename T>
__device__ void gemv_glu(const T* x, const T* w, T* y, int rows, int in, int out) {
  const int o = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
  if (o >= out) return;
  const T* gate_up[2] = {w + (size_t)o * in, w + (size_t)(out + o) * in};
  for (int r = 0; r < rows; ++r) {
    float dots[2];
    warp_dots<T, 2>(gate_up, x + (size_t)r * in, in, dots);
    const float g = to_f32(from_f32<T>(dots[0])), u = to_f32(from_f32<T>(dots[1]));
    if ((threadIdx.x & 31) == 0) y[(size_t)r * out + o] = from_f32<T>(A::value(g) * u);
  }
}

// ---------------------------------------------------------------------------------------------
// Greedy decoding's argmax over each row of x [rows, n] (src/argmax.rs): blocks of 256
// threads each reduce a chunk of ARGMAX_CHUNK elements of a row to its largest value and that
// value's first index (grid (chunks, rows)); argmax_finish, one block per row, reduces those.
// Ties go to the lowest index, as candle's CPU argmax; NaN is never taken.
constexpr int ARGMAX_CHUNK = 4096;

// (v, i) becomes (v2, i2) where that is larger, or as large at a lower index.
__device__ __forceinline__ void take_larger(float& v, int& i, float v2, int i2) {
  if (v2 > v || (v2 == v && i2 < i)) {
    v = v2;
    i = i2;
  }
}

// The block's largest (v, i) by take_larger; thread 0 gets it.
__device__ void block_argmax(float& v, int& i) {
  __shared__ float values[32];
  __shared__ int indices[32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  for (int o = 16; o > 0; o >>= 1)
    take_larger(v, i, __shfl_xor_sync(0xffffffff, v, o), __shfl_xor_sync(0xffffffff, i, o));
  if (lane == 0) {
    values[warp] = v;
    indices[warp] = i;
  }
  __syncthreads();
  if (warp != 0) return;
  v = lane < warps ? values[lane] : -INFINITY;
  i = lane < warps ? indices[lane] : INT_MAX;
  for (int o = 16; o > 0; o >>= 1)
    take_larger(v, i, __shfl_xor_sync(0xffffffff, v, o), __shfl_xor_sync(0xffffffff, i, o));
}

template <typename T>
__device__ void argmax_chunks(const T* x, float* values, int* indices, int n, int chunks) {
  const int row = blockIdx.y, chunk = blockIdx.x;
  const T* xr = x + (size_t)row * n;
  const int end = min(n, (chunk + 1) * ARGMAX_CHUNK);
  float v = -INFINITY;
  int i = INT_MAX;
#pragma unroll 8
  for (int j = chunk * ARGMAX_CHUNK + threadIdx.x; j < end; j += blockDim.x)
    take_larger(v, i, to_f32(xr[j]), j);
  block_argmax(v, i);
  if (threadIdx.x == 0) {
    values[(size_t)row * chunks + chunk] = v;
    indices[(size_t)row * chunks + chunk] = i;
  }
}

// A row with no value above NaN (all NaN) gets index 0.
extern "C" __global__ void argmax_finish(const float* values, const int* indices, uint32_t* out,
                                         int chunks) {
  const size_t first = (size_t)blockIdx.x * chunks;
  float v = -INFINITY;
  int i = INT_MAX;
  for (int c = threadIdx.x; c < chunks; c += blockDim.x)
    take_larger(v, i, values[first + c], indices[first + c]);
  block_argmax(v, i);
  if (threadIdx.x == 0) out[blockIdx.x] = i == INT_MAX ? 0 : i;
}

// extern "C" entry points, one per dtype.

#define DECODE_ENTRY_POINTS(S, T)                                                              \
  extern "C" __global__ void gemv_swiglu_##S(const T* x, const T* w, T* y, int rows, int in,  \
                                             int out) {                                       \
    gemv_glu<Silu, T>(x, w, y, rows, in, out);                                                \
  }                                                                                           \
  extern "C" __global__ void gemv_geglu_##S(const T* x, const T* w, T* y, int rows, int in,   \
                                            int out) {                                        \
    gemv_glu<GeluTanh, T>(x, w, y, rows, in, out);                                            \
  }                                                                                           \
  extern "C" __global__ void gemv_##S(const T* x, const T* w, T* y, int rows, int in,         \
                                      int out) {                                              \
    gemv<T>(x, w, y, rows, in, out);                                                          \
  }                                                                                           \
  extern "C" __global__ void argmax_chunks_##S(const T* x, float* values, int* indices, int n, \
                                               int chunks) {                                  \
    argmax_chunks<T>(x, values, indices, n, chunks);                                          \
  }                                                                                           \
  extern "C" __global__ void decode_attention_##S(                                          \
      const T* q, const T* k, const T* v, T* out, float* scores, int heads, int group,        \
      int kv_len, int d, long long k_sb, long long k_sh, long long k_sp, long long v_sb,      \
      long long v_sh, long long v_sp, float scale, const uint32_t* position, float cap,       \
      int window) {                                                                           \
    decode_attention<T>(q, k, v, out, scores, heads, group, kv_len, d, k_sb, k_sh, k_sp, v_sb, \
                        v_sh, v_sp, scale, position, cap, window);                            \
  }

FOR_EACH_FLOAT(DECODE_ENTRY_POINTS)
