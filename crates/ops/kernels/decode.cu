// Decoding kernels, for steps bound by kernel launches: the attention of one query per head
// against a KV cache read in place, and matrix-vector products (one with the SwiGLU or GeGLU
// of a stacked gate/up projection; the RMSNorm of their input or a residual add fused in).
//
// Launched from src/attention/decode.rs (decode attention), src/gemv.rs and src/gemv_fused.rs.

#include "common.cuh"

#include <climits>

// ---------------------------------------------------------------------------------------------
// Decode attention: one query per (batch, head) against a KV cache read in place (a view into
// the preallocated cache, so no copy of it per token), one block per (batch, head). A decode
// step's blocks are few, and each reads few keys, so what costs is rounds of dependent memory
// accesses, not bytes: keys are read a thread per key (each thread's loads of its whole key
// issued together, so the block's keys arrive in one round, not a round per key), values by
// d / W threads per position, blockDim / (d / W) positions at a time, whose partial sums meet in
// shared memory. W elements are read at once (WIDE<T> where the launcher found the rows 16-byte
// aligned, else 1). Scores are attention_logit's (common.cuh: scaled, soft-capped where
// cap > 0); with window > 0 only the last `window` positions are attended to.

// DECODE_THREADS threads a block (launch_constants.h); its shared memory, in floats, besides
// the query (and the step's own key and value): blockDim * W partial sums and blockDim slice
// sums.

// The attention of a block's query (f32 `d` in shared memory) to the positions [first, end)
// of keys k + j * k_sp and values v + j * v_sp and, with `fresh` (f32 [2, d] in shared memory:
// the step's own key and value, whose cache slot another block may be writing), one more at
// `end`. `s` is the block's f32 scratch for the scores of positions up to `end`; `work` is
// shared memory of blockDim * (W + 1) floats. Thread i < d writes out[i].
template <typename T, int W>
__device__ void attend_query(const float* query, const T* k, long long k_sp, const T* v,
                             long long v_sp, int first, int end, const float* fresh, int d,
                             float scale, float cap, float* s, float* work, T* out) {
  using P = Pack<T, W>;
  float m = -INFINITY;
  for (int j = first + threadIdx.x; j < end; j += blockDim.x) {
    const T* kj = k + j * k_sp;
    float dot = 0.f;
#pragma unroll 8
    for (int c = 0; c < d; c += W) {
      const P key = P::load(kj + c);
#pragma unroll
      for (int e = 0; e < W; ++e) dot += query[c + e] * to_f32(key.e[e]);
    }
    dot = attention_logit(dot, scale, cap);
    s[j] = dot;
    m = fmaxf(m, dot);
  }
  if (fresh != nullptr && threadIdx.x < 32) {
    float dot = 0.f;
    for (int i = threadIdx.x; i < d; i += 32) dot += query[i] * fresh[i];
    dot = attention_logit(warp_sum(dot), scale, cap);
    if (threadIdx.x == 0) s[end] = dot;
    m = fmaxf(m, dot);
  }
  m = block_max(m);  // its barriers also publish the scores to the whole block
  const int last = end + (fresh != nullptr ? 1 : 0);
  float sum = 0.f;
  for (int j = first + threadIdx.x; j < last; j += blockDim.x) {
    const float p = __expf(s[j] - m);
    s[j] = p;
    sum += p;
  }
  const float inv = 1.f / block_sum(sum);  // and the probabilities
  const int chunks = d / W, rows = blockDim.x / chunks;
  const int r = threadIdx.x / chunks, c = (threadIdx.x % chunks) * W;
  if (r < rows) {
    float acc[W];
#pragma unroll
    for (int e = 0; e < W; ++e) acc[e] = 0.f;
#pragma unroll 4
    for (int j = first + r; j < end; j += rows) {
      const float p = s[j];
      const P value = P::load(v + j * v_sp + c);
#pragma unroll
      for (int e = 0; e < W; ++e) acc[e] += p * to_f32(value.e[e]);
    }
#pragma unroll
    for (int e = 0; e < W; ++e) work[r * d + c + e] = acc[e];
  }
  __syncthreads();
  // blockDim / d slices of threads each sum every slices-th row of partial sums, then the
  // first d threads sum the slices.
  float* slice_sums = work + blockDim.x * W;
  const int slices = blockDim.x / d, i = threadIdx.x % d, slice = threadIdx.x / d;
  if (slice < slices) {
    float total = 0.f;
    for (int row = slice; row < rows; row += slices) total += work[row * d + i];
    slice_sums[slice * d + i] = total;
  }
  __syncthreads();
  if (threadIdx.x < d) {
    float total = 0.f;
    for (int sl = 0; sl < slices; ++sl) total += slice_sums[sl * d + threadIdx.x];
    if (fresh != nullptr) total += s[end] * fresh[d + threadIdx.x];
    out[threadIdx.x] = from_f32<T>(total * inv);
  }
}

// q is [b*h, d] contiguous; k and v have element strides (batch, kv head, position) and unit
// stride along d; query head h reads kv head h / group. `scores` is [b*h, kv_len] f32 scratch.
// Dynamic shared memory: the query, then attend_query's work.
template <typename T, int W>
__device__ void decode_attention(const T* q, const T* k, const T* v, T* out, float* scores,
                                 int heads, int group, int kv_len, int d, long long k_sb,
                                 long long k_sh, long long k_sp, long long v_sb, long long v_sh,
                                 long long v_sp, float scale, const uint32_t* position,
                                 float cap, int window) {
  const int bh = blockIdx.x, b = bh / heads, kv_head = (bh % heads) / group;
  float* s = scores + (size_t)bh * kv_len;
  // A replayed decode step attends to the positions up to its own, read from `position`;
  // kv_len is then the cache's capacity, which bounds it.
  if (position != nullptr) kv_len = min(kv_len, (int)min(*position, (uint32_t)INT_MAX - 1) + 1);
  const int first = window > 0 ? max(0, kv_len - window) : 0;
  extern __shared__ float shared[];
  for (int i = threadIdx.x; i < d; i += blockDim.x) shared[i] = to_f32(q[(size_t)bh * d + i]);
  __syncthreads();
  attend_query<T, W>(shared, k + b * k_sb + kv_head * k_sh, k_sp, v + b * v_sb + kv_head * v_sh,
                     v_sp, first, kv_len, nullptr, d, scale, cap, s, shared + d,
                     out + (size_t)bh * d);
}

// What a decode step's block (batch, query head: blockIdx.x) attends to: its kv head's rows of
// the cache [2, b, kv_heads, max_len, d], the cached positions [first, end), and its own key and
// value when `fresh` (a position past the cache writes nothing and attends to the cache as it
// is).
template <typename T>
struct StepBlock {
  T *keys, *values;
  int end, first;
  bool fresh;
};

// The cache rows of (batch, query head) bh's kv head, [max_len, d] each: StepBlock's keys and
// values.
template <typename T>
__device__ __forceinline__ StepBlock<T> cache_rows(T* cache, int bh, int batch, int heads,
                                                   int kv_heads, int d, int max_len) {
  const int b = bh / heads, kv = bh % heads / (heads / kv_heads);
  T* keys = cache + ((size_t)b * kv_heads + kv) * max_len * d;
  return {keys, keys + (size_t)batch * kv_heads * max_len * d, 0, 0, false};
}

// The shared start of the step kernels: reads the step's position (`start`, or from `position`:
// a step replayed from a CUDA graph, whose cos and sin are then the whole [max positions,
// rotary / 2] tables, else the step's row), rotates the block's query head and its kv head's
// key from the packed projections qkv [b, (heads + 2 kv_heads) * d] (RoPE over the first
// `rotary` elements, as write_kv does, rounded to T as the cache holds them) into `query` and
// `own` (f32 in shared memory: d, and the key then the value, 2 d), and has the first block of
// each group of query heads write that key and value into the cache. Ends with a barrier.
template <typename T>
__device__ StepBlock<T> start_step(const T* qkv, const T* cos, const T* sin, T* cache, int batch,
                                   int heads, int kv_heads, int d, int rotary, int max_len,
                                   int start, const uint32_t* position, int window, float* query,
                                   float* own) {
  const int pos = position != nullptr ? (int)min(*position, (uint32_t)INT_MAX) : start;
  const bool fresh = pos < max_len;
  const int bh = blockIdx.x, b = bh / heads, h = bh % heads, group = heads / kv_heads;
  const int kv = h / group, rhalf = rotary / 2;
  if (position != nullptr && fresh) {
    cos += (size_t)pos * rhalf;
    sin += (size_t)pos * rhalf;
  }
  const T* row = qkv + (size_t)b * (heads + 2 * kv_heads) * d;
  StepBlock<T> step = cache_rows(cache, bh, batch, heads, kv_heads, d, max_len);
  T *kc = step.keys, *vc = step.values;
  const bool writer = fresh && h % group == 0;
  for (int i = threadIdx.x; i < d; i += blockDim.x) {
    const T key = rope_element(row + (size_t)(heads + kv) * d, cos, sin, i, rhalf);
    const T value = row[(size_t)(heads + kv_heads + kv) * d + i];
    query[i] = to_f32(rope_element(row + (size_t)h * d, cos, sin, i, rhalf));
    own[i] = to_f32(key);
    own[d + i] = to_f32(value);
    if (writer) {
      kc[(size_t)pos * d + i] = key;
      vc[(size_t)pos * d + i] = value;
    }
  }
  __syncthreads();
  step.end = fresh ? pos : max_len;
  step.first = window > 0 ? max(0, step.end + (fresh ? 1 : 0) - window) : 0;
  step.fresh = fresh;
  return step;
}

// A whole decode step's attention from its packed projections, a block per (batch, query
// head): start_step's rotation and cache write, then attend_query over the cached positions
// before the step's and, from shared memory, the step's own key and value (their cache slot may
// not be written yet when another block reads it). Dynamic shared memory: the query, the key
// and the value, then attend_query's work.
template <typename T, int W>
__device__ void decode_step(const T* qkv, const T* cos, const T* sin, T* cache, T* out,
                            float* scores, int batch, int heads, int kv_heads, int d, int rotary,
                            int max_len, int start, const uint32_t* position, float scale,
                            float cap, int window) {
  extern __shared__ float shared[];
  float *query = shared, *own = shared + d;
  const StepBlock<T> step = start_step(qkv, cos, sin, cache, batch, heads, kv_heads, d, rotary,
                                       max_len, start, position, window, query, own);
  const size_t bh = blockIdx.x;
  attend_query<T, W>(query, step.keys, d, step.values, d, step.first, step.end,
                     step.fresh ? own : nullptr, d, scale, cap, scores + bh * max_len,
                     shared + 3 * d, out + bh * d);
}

// The same step in warp tiles, for head sizes D of 64 or 128 whose keys fit a lane's registers
// (D * sizeof(T) at most 256 bytes): WARPS warps a block, one block per (batch, head). Each warp
// takes 32 cached positions at a time, a lane per key, with an online softmax across its
// tiles, and the warps meet once, behind one barrier; there is no scores scratch. A short
// step's time is rounds of dependent memory accesses, so each warp requests its first tile's
// keys and value rows first (the cache's address does not depend on the step's position, only
// which rows count). Rows past the attended ones are loaded but never used (their memory may
// hold anything). Scores as decode_step's (the dot products in the same order), the softmax
// online. A warp's later tiles each cost a round of loads, so the launcher takes this kernel
// only for caches of at most three tiles a warp.
//
// With CLUSTER > 1 (Hopper), a (batch, head) is a cluster of CLUSTER blocks (blockIdx.x / CLUSTER;
// rank blockIdx.x % CLUSTER), whose warps take the tiles in turn: blocks small enough to be
// resident beside the q/k/v product's, so that they load their first tiles while it runs. The
// warps' parts then meet in rank 0's block through distributed shared memory, and rank 0 alone
// attends to the step's own key and value and writes them into the cache.
template <typename T, int D, int WARPS, int CLUSTER>
__device__ void decode_step_tiles(const T* qkv, const T* cos, const T* sin, T* cache, T* out,
                                  int batch, int heads, int kv_heads, int rotary, int max_len,
                                  int start, const uint32_t* position, float scale, float cap,
                                  int window) {
  constexpr int V = 16 / sizeof(T), KEY_UNITS = D / V, E = D / 32;  // E: elements a lane
  constexpr int THREADS = WARPS * 32, R = (D + THREADS - 1) / THREADS;  // R: rotated a thread
  using ValuePack = Pack<T, E>;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int rank = blockIdx.x % CLUSTER, bh = blockIdx.x / CLUSTER;
  const int b = bh / heads, h = bh % heads, group = heads / kv_heads;
  const int kv = h / group, rhalf = rotary / 2;
  const StepBlock<T> rows = cache_rows(cache, bh, batch, heads, kv_heads, D, max_len);
  T *kc = rows.keys, *vc = rows.values;
  uint4 key[KEY_UNITS];
  ValuePack value[32];
  // Tile t0's keys (a lane's whole key) and value rows (a lane's E elements of each of the
  // tile's 32), for the rows below `limit`.
  auto load_tile = [&](int t0, int limit) {
    if (t0 + lane < limit) {
      const uint4* k = reinterpret_cast<const uint4*>(kc + (size_t)(t0 + lane) * D);
#pragma unroll
      for (int u = 0; u < KEY_UNITS; ++u) key[u] = k[u];
    }
#pragma unroll
    for (int k = 0; k < 32; ++k)
      if (t0 + k < limit) value[k] = ValuePack::load(vc + (size_t)(t0 + k) * D + lane * E);
  };
  const int first_tile = (rank * WARPS + warp) * 32;
  // The output projection after this kernel may launch now: it loads its first weights and
  // waits (start_product).
  dependents_may_launch();
  load_tile(first_tile, max_len);
  // Launched programmatically (src/attention/decode.rs), the kernel has loaded its first tile
  // while the projections ahead of it ran: no kernel of the step writes the cached rows it
  // attends to (earlier steps wrote them; this step's row is written below, after the wait).
  wait_for_previous();
  // The step's position (`start`, or from `position`: a step replayed from a CUDA graph, whose
  // cos and sin are then the whole [max positions, rotary / 2] tables, else the step's row) and
  // the rotation's factors for this thread's elements (1 and 0 past the rotated ones).
  const int pos = position != nullptr ? (int)min(*position, (uint32_t)INT_MAX) : start;
  const bool fresh = pos < max_len;  // a position past the cache writes nothing
  if (position != nullptr && fresh) {
    cos += (size_t)pos * rhalf;
    sin += (size_t)pos * rhalf;
  }
  float c[R], s[R];
#pragma unroll
  for (int r = 0; r < R; ++r) {
    const int i = threadIdx.x + r * THREADS, j = i < rhalf ? i : i - rhalf;
    const bool rotated = i < D && i < 2 * rhalf;
    c[r] = rotated ? to_f32(cos[j]) : 1.f;
    s[r] = rotated ? to_f32(sin[j]) : 0.f;
  }
  // Element i of head x of the packed projections [b, (heads + 2 kv_heads) * D], rotated with
  // the thread's factors r as rope_element rotates it.
  const T* row = qkv + (size_t)b * (heads + 2 * kv_heads) * D;
  auto rotated = [&](int x, int r, int i) {
    const T* head = row + (size_t)x * D;
    if (i >= 2 * rhalf) return head[i];
    const int j = i < rhalf ? i : i - rhalf;
    const float x1 = to_f32(head[j]), x2 = to_f32(head[rhalf + j]);
    return from_f32<T>(i < rhalf ? x1 * c[r] - x2 * s[r] : x2 * c[r] + x1 * s[r]);
  };
  // The rotated query, and the step's own key and value (f32, for the fresh position: their
  // cache slot may not be written yet when another block of the group reads it), which the
  // group's first block writes into the cache.
  __shared__ float query[D], own[2 * D];
  __shared__ float warp_max_of[WARPS], warp_sum_of[WARPS], warp_out[WARPS][D];
  const bool writer = rank == 0 && fresh && h % group == 0;
#pragma unroll
  for (int r = 0; r < R; ++r) {
    const int i = threadIdx.x + r * THREADS;
    if (i >= D) break;
    const T k = rotated(heads + kv, r, i), v = row[(size_t)(heads + kv_heads + kv) * D + i];
    query[i] = to_f32(rotated(h, r, i));
    own[i] = to_f32(k);
    own[D + i] = to_f32(v);
    if (writer) {
      kc[(size_t)pos * D + i] = k;
      vc[(size_t)pos * D + i] = v;
    }
  }
  __syncthreads();
  const int end = fresh ? pos : max_len;  // the cached positions attended to: [first, end)
  const int first = window > 0 ? max(0, end + (fresh ? 1 : 0) - window) : 0;
  float m = -INFINITY, l = 0.f, acc[E];
#pragma unroll
  for (int e = 0; e < E; ++e) acc[e] = 0.f;
  for (int t0 = first_tile; t0 < end; t0 += CLUSTER * THREADS) {
    if (t0 != first_tile) load_tile(t0, end);
    const int j = t0 + lane;
    float score = -INFINITY;
    if (j >= first && j < end) {
      float dot = 0.f;
#pragma unroll
      for (int u = 0; u < KEY_UNITS; ++u) {
        const T* k = reinterpret_cast<const T*>(&key[u]);
#pragma unroll
        for (int e = 0; e < V; ++e) dot += query[u * V + e] * to_f32(k[e]);
      }
      score = attention_logit(dot, scale, cap);
    }
    const float tile_max = warp_max(score);
    if (tile_max == -INFINITY) continue;  // the whole tile before the window
    const float new_max = fmaxf(m, tile_max), rescale = __expf(m - new_max);
    const float p = __expf(score - new_max);
    l = l * rescale + warp_sum(p);
#pragma unroll
    for (int e = 0; e < E; ++e) acc[e] *= rescale;
#pragma unroll
    for (int k = 0; k < 32; ++k) {
      const float pk = __shfl_sync(0xffffffff, p, k);
      if (t0 + k < end)
#pragma unroll
        for (int e = 0; e < E; ++e) acc[e] += pk * to_f32(value[k].e[e]);
    }
    m = new_max;
  }
  if (rank == 0 && warp == 0 && fresh) {  // the step's own key and value, from shared memory
    float dot = 0.f;
#pragma unroll
    for (int e = 0; e < E; ++e) dot += query[lane * E + e] * own[lane * E + e];
    const float score = attention_logit(warp_sum(dot), scale, cap);
    const float new_max = fmaxf(m, score), rescale = __expf(m - new_max);
    const float p = __expf(score - new_max);
    l = l * rescale + p;
#pragma unroll
    for (int e = 0; e < E; ++e) acc[e] = acc[e] * rescale + p * own[D + lane * E + e];
    m = new_max;
  }
  if (lane == 0) {
    warp_max_of[warp] = m;
    warp_sum_of[warp] = l;
  }
#pragma unroll
  for (int e = 0; e < E; ++e) warp_out[warp][lane * E + e] = acc[e];
  cluster_sync<CLUSTER>();
  // The parts of the cluster's warps, each read once, then merged at their common maximum.
  if (rank == 0) {
    for (int i = threadIdx.x; i < D; i += THREADS) {
      constexpr int PARTS = CLUSTER * WARPS;
      float maxima[PARTS], sums[PARTS], outs[PARTS];
#pragma unroll
      for (int r = 0; r < CLUSTER; ++r)
#pragma unroll
        for (int w = 0; w < WARPS; ++w) {
          maxima[r * WARPS + w] = cluster_load<CLUSTER>(&warp_max_of[w], r);
          sums[r * WARPS + w] = cluster_load<CLUSTER>(&warp_sum_of[w], r);
          outs[r * WARPS + w] = cluster_load<CLUSTER>(&warp_out[w][i], r);
        }
      float all_max = -INFINITY;
#pragma unroll
      for (int p = 0; p < PARTS; ++p) all_max = fmaxf(all_max, maxima[p]);
      float sum = 0.f, total = 0.f;
#pragma unroll
      for (int p = 0; p < PARTS; ++p) {
        const float f = maxima[p] == -INFINITY ? 0.f : __expf(maxima[p] - all_max);
        sum += sums[p] * f;
        total += outs[p] * f;
      }
      out[(size_t)bh * D + i] = from_f32<T>(total / sum);
    }
  }
  // No block of the cluster leaves (and frees its parts) before rank 0 has read them.
  if constexpr (CLUSTER > 1) cluster_sync<CLUSTER>();
}

// ---------------------------------------------------------------------------------------------
// Matrix-vector products for decoding: y[r] = w · x[r] for a few rows r of x [rows, in] and a
// weight w [out, in], one warp per output feature, 16-byte loads (in must be a multiple of
// 16 / sizeof(T) and both operands 16-byte aligned: the launcher checks); variants apply the
// SwiGLU or GeGLU of a stacked gate/up weight or add a residual on the way out, or take the
// RMSNorm of x on the way in. cuBLAS runs these shapes as split-K GEMMs of two kernels each; a
// decode step is bound by launches.

// Elements per 16-byte unit, and units of each operand a lane loads per round (below).
template <typename T> constexpr int DOT_WIDTH = 16 / sizeof(T);
constexpr int DOT_UNITS = 8;

// Loads a lane's units of the round from unit `first` of the N weight rows into `a`.
template <typename T, int N>
__device__ __forceinline__ void load_weight_round(uint4 (&a)[N][DOT_UNITS], const T* const (&w)[N],
                                                  int first, int units) {
#pragma unroll
  for (int u = 0; u < DOT_UNITS; ++u) {
    const int i = first + 32 * u;
    if (i >= units) break;
#pragma unroll
    for (int n = 0; n < N; ++n) a[n][u] = reinterpret_cast<const uint4*>(w[n])[i];
  }
}

// The dot products of N weight rows with one row of x, summed over the warp (every lane gets
// them). Each lane loads its next DOT_UNITS 16-byte units of every operand before any
// arithmetic: a decode step's products are too small to hide memory latency behind other
// warps, so the rounds of dependent loads are a warp's time. Each lane sums its units in
// ascending order. `a` is the weight rounds' registers; where `preloaded`, it already holds the
// first round (start_product).
template <typename T, int N>
__device__ __forceinline__ void warp_dots(const T* const (&w)[N], const T* x, int in,
                                          float (&dots)[N], uint4 (&a)[N][DOT_UNITS],
                                          bool preloaded) {
  constexpr int V = DOT_WIDTH<T>, U = DOT_UNITS;
  const int lane = threadIdx.x & 31, units = in / V;
  const uint4* xv = reinterpret_cast<const uint4*>(x);
  float acc[N];
#pragma unroll
  for (int n = 0; n < N; ++n) acc[n] = 0.f;
  for (int first = lane; first < units; first += 32 * U) {
    uint4 b[U];
    if (first != lane || !preloaded) load_weight_round<T, N>(a, w, first, units);
#pragma unroll
    for (int u = 0; u < U; ++u)
      if (first + 32 * u < units) b[u] = xv[first + 32 * u];
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

// Output features go to warps in order, one per warp of the grid, then again from the start of
// the grid while any are left: the launcher gives a product one warp per feature, and a
// norm-taking one (below) launched in stream order no more blocks than the device holds at
// once, so that each block normalizes its input once however many features it computes.
__device__ __forceinline__ int first_warp_row() {
  return blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
}
__device__ __forceinline__ int warp_row_stride() { return gridDim.x * (blockDim.x >> 5); }

// Every product's start: loads the first round of its warp's first feature's weight rows into
// `a` (w's row o, and for a gated unit also row out + o: N of them), lets the next kernel in
// the stream launch, then waits for the kernel ahead (common.cuh). Launched programmatically
// (src/programmatic.rs: only where nothing in the step writes the weight), the weights' first
// round is on its way while the kernel ahead ends, and the next kernel's blocks are resident
// when this one ends; launched in stream order, the wait is nothing. Nothing but the weight is
// read before the wait. Returns whether `a` holds the round (the warp has a feature).
template <typename T, int N>
__device__ __forceinline__ bool start_product(uint4 (&a)[N][DOT_UNITS], const T* w, int in,
                                              int out) {
  const int o = first_warp_row(), lane = threadIdx.x & 31;
  const bool has_row = o < out;
  if (has_row) {
    const T* rows[N];
#pragma unroll
    for (int n = 0; n < N; ++n) rows[n] = w + (size_t)(o + n * out) * in;
    load_weight_round<T, N>(a, rows, lane, in / DOT_WIDTH<T>);
  }
  dependents_may_launch();
  wait_for_previous();
  return has_row;
}

// y[r][o] = w[o] · x[r], plus residual[r][o] where `residual` is given (the sum rounded as
// the separate projection and add store it: the product to T, then the sum). `a` and
// `preloaded` are start_product's.
template <typename T>
__device__ void gemv(const T* x, const T* w, const T* residual, T* y, int rows, int in, int out,
                     uint4 (&a)[1][DOT_UNITS], bool preloaded) {
  for (int o = first_warp_row(); o < out; o += warp_row_stride()) {
    const T* row[1] = {w + (size_t)o * in};
    for (int r = 0; r < rows; ++r) {
      float dot[1];
      warp_dots<T, 1>(row, x + (size_t)r * in, in, dot, a, preloaded);
      preloaded = false;
      if ((threadIdx.x & 31) != 0) continue;
      const size_t i = (size_t)r * out + o;
      y[i] = residual == nullptr
                 ? from_f32<T>(dot[0])
                 : from_f32<T>(to_f32(residual[i]) + to_f32(from_f32<T>(dot[0])));
    }
  }
}

// The gated unit of a stacked gate/up projection: w is [2 out, in] (gate rows, then up rows)
// and y[r][o] = act(g) · u with g = w[o] · x[r] and u = w[out + o] · x[r], both rounded to T
// first as the separate projections store them; act is A (common.cuh: SwiGLU's or GeGLU's).
template <typename A, typename T>
__device__ void gemv_glu(const T* x, const T* w, T* y, int rows, int in, int out,
                         uint4 (&a)[2][DOT_UNITS], bool preloaded) {
  for (int o = first_warp_row(); o < out; o += warp_row_stride()) {
    const T* gate_up[2] = {w + (size_t)o * in, w + (size_t)(out + o) * in};
    for (int r = 0; r < rows; ++r) {
      float dots[2];
      warp_dots<T, 2>(gate_up, x + (size_t)r * in, in, dots, a, preloaded);
      preloaded = false;
      const float g = to_f32(from_f32<T>(dots[0])), u = to_f32(from_f32<T>(dots[1]));
      if ((threadIdx.x & 31) == 0) y[(size_t)r * out + o] = from_f32<T>(A::value(g) * u);
    }
  }
}

// The products above on the RMSNorm of x's rows, taken on the way in (a decode step's norm
// before its q/k/v and gate/up projections, without a kernel of its own): each block
// normalizes the rows into shared memory as rms_norm stores them (x · r · (offset + nw) in f32,
// rounded to T), then its warps read them from there. Every thread issues its loads of a round
// of NORM_PACKS 16-byte packs before their first use. The launcher checks that the rows fit in
// the default dynamic shared memory and that x and nw start on 16 bytes.
constexpr int NORM_PACKS = 4;

template <typename T>
__device__ const T* rms_normed_rows(const T* x, const T* nw, int rows, int in, float eps,
                                    float offset) {
  using P = Pack<T, WIDE<T>>;
  constexpr int V = WIDE<T>;
  extern __shared__ uint4 normed_rows[];
  T* xs = reinterpret_cast<T*>(normed_rows);
  const int units = in / V, step = blockDim.x * NORM_PACKS;
  auto store = [&](const P& xv, const P& wv, float inv, int r, int i) {
    P normed;
#pragma unroll
    for (int k = 0; k < V; ++k)
      normed.e[k] = from_f32<T>(to_f32(xv.e[k]) * inv * (offset + to_f32(wv.e[k])));
    normed.store(xs + (size_t)r * in + i * V);
  };
  if (units <= (int)blockDim.x) {
    // Rows of at most a pack a thread (widths up to 2,048 in 16 bits): the thread's packs of x
    // and of the norm weight are loaded once, before the block's sum, and normalized from
    // registers.
    const bool mine = (int)threadIdx.x < units;
    for (int r = 0; r < rows; ++r) {
      P xv, wv;
      float ss = 0.f;
      if (mine) {
        xv = P::load(x + (size_t)r * in + threadIdx.x * V);
        wv = P::load(nw + threadIdx.x * V);
#pragma unroll
        for (int k = 0; k < V; ++k) ss += to_f32(xv.e[k]) * to_f32(xv.e[k]);
      }
      const float inv = rsqrtf(block_sum(ss) / in + eps);
      if (mine) store(xv, wv, inv, r, threadIdx.x);
    }
    __syncthreads();
    return xs;
  }
  for (int r = 0; r < rows; ++r) {
    const T* xr = x + (size_t)r * in;
    float ss = 0.f;
    for (int first = threadIdx.x; first < units; first += step) {
      P v[NORM_PACKS];
#pragma unroll
      for (int p = 0; p < NORM_PACKS; ++p)
        if (first + p * blockDim.x < units) v[p] = P::load(xr + (first + p * blockDim.x) * V);
#pragma unroll
      for (int p = 0; p < NORM_PACKS; ++p)
        if (first + p * blockDim.x < units)
#pragma unroll
          for (int k = 0; k < V; ++k) ss += to_f32(v[p].e[k]) * to_f32(v[p].e[k]);
    }
    const float inv = rsqrtf(block_sum(ss) / in + eps);
    for (int i = threadIdx.x; i < units; i += blockDim.x)
      store(P::load(xr + i * V), P::load(nw + i * V), inv, r, i);
  }
  __syncthreads();
  return xs;
}

// ---------------------------------------------------------------------------------------------
// Greedy decoding's argmax over each row of x [rows, n] (src/argmax.rs): blocks of 256
// threads each reduce a chunk of ARGMAX_CHUNK elements of a row to its largest value and that
// value's first index (grid (chunks, rows)); argmax_finish, one block per row, reduces those.
// Ties go to the lowest index, as candle's CPU argmax; NaN is never taken. ARGMAX_CHUNK is in
// launch_constants.h.

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

// Greedy decoding's head (src/gemv_fused.rs' rms_norm_head_greedy_step): the product of one
// row x with w [out, in], whose outputs are not stored; each block writes the largest of the
// outputs it computed, rounded to T as stored logits would hold them, and that output's index
// (take_larger's order) to values[blockIdx.x] and indices[blockIdx.x]: argmax_chunks' pass,
// without the logits written and read again. argmax_finish then reduces the blocks'.
template <typename T>
__device__ void gemv_maxima(const T* x, const T* w, float* values, int* indices, int in, int out,
                            uint4 (&a)[1][DOT_UNITS], bool preloaded) {
  float v = -INFINITY;
  int i = INT_MAX;
  for (int o = first_warp_row(); o < out; o += warp_row_stride()) {
    const T* row[1] = {w + (size_t)o * in};
    float dot[1];
    warp_dots<T, 1>(row, x, in, dot, a, preloaded);
    preloaded = false;
    take_larger(v, i, to_f32(from_f32<T>(dot[0])), o);
  }
  block_argmax(v, i);
  if (threadIdx.x == 0) {
    values[blockIdx.x] = v;
    indices[blockIdx.x] = i;
  }
}

// A row with no value above NaN (all NaN) gets index 0. Blocks take rows in turn. With
// `advance` (greedy decoding's hand-off between captured steps, src/argmax.rs's greedy_step; one
// block), each pick also goes to `log` (page-locked host memory, a ring of `log_slots` steps of
// `rows` picks, the step at position advance[0] in slot advance[0] % log_slots), and then
// advance[0] and advance[1], the next step's position and window slot, go up by one.
extern "C" __global__ void argmax_finish(const float* values, const int* indices, uint32_t* out,
                                         int chunks, int rows, uint32_t* advance, uint32_t* log,
                                         int log_slots) {
  uint32_t* logged =
      advance != nullptr && log != nullptr ? log + (size_t)(advance[0] % log_slots) * rows : nullptr;
  for (int row = blockIdx.x; row < rows; row += gridDim.x) {
    const size_t first = (size_t)row * chunks;
    float v = -INFINITY;
    int i = INT_MAX;
    for (int c = threadIdx.x; c < chunks; c += blockDim.x)
      take_larger(v, i, values[first + c], indices[first + c]);
    block_argmax(v, i);
    if (threadIdx.x == 0) {
      const uint32_t pick = i == INT_MAX ? 0 : i;
      out[row] = pick;
      if (logged != nullptr) logged[row] = pick;
    }
    // block_argmax's shared memory is reused by the next row.
    __syncthreads();
  }
  if (advance != nullptr && threadIdx.x == 0) {
    __threadfence_system();
    advance[0] += 1;
    advance[1] += 1;
  }
}

// extern "C" entry points, one per dtype; the attention kernels also once per access width
// (`_wide`: 16-byte accesses).

// decode_attention##WIDTH##_##S and decode_step##WIDTH##_##S reading W elements at once.
#define DECODE_ATTENTION_ENTRY_POINTS(S, T, WIDTH, W)                                          \
  extern "C" __global__ void __launch_bounds__(DECODE_THREADS) decode_attention##WIDTH##_##S( \
      const T* q, const T* k, const T* v, T* out, float* scores, int heads, int group,        \
      int kv_len, int d, long long k_sb, long long k_sh, long long k_sp, long long v_sb,      \
      long long v_sh, long long v_sp, float scale, const uint32_t* position, float cap,       \
      int window) {                                                                           \
    decode_attention<T, W>(q, k, v, out, scores, heads, group, kv_len, d, k_sb, k_sh, k_sp,   \
                           v_sb, v_sh, v_sp, scale, position, cap, window);                   \
  }                                                                                           \
  extern "C" __global__ void __launch_bounds__(DECODE_THREADS) decode_step##WIDTH##_##S(      \
      const T* qkv, const T* cos, const T* sin, T* cache, T* out, float* scores, int batch,   \
      int heads, int kv_heads, int d, int rotary, int max_len, int start,                     \
      const uint32_t* position, float scale, float cap, int window) {                         \
    decode_step<T, W>(qkv, cos, sin, cache, out, scores, batch, heads, kv_heads, d, rotary,   \
                      max_len, start, position, scale, cap, window);                          \
  }

// NAME##_##S: decode_step_tiles for head size D with WARPS warps a block and CLUSTER blocks a
// (batch, head) (the step's arguments but the scores scratch, the head size and the access
// width; src/attention/decode.rs launches WARPS * 32 threads a block), DIMS its cluster's
// dimensions where CLUSTER > 1, BOUNDS its launch bounds' arguments in parentheses.
#define DECODE_STEP_TILES_ENTRY_POINT(S, T, D, WARPS, CLUSTER, BOUNDS, NAME, DIMS)              \
  extern "C" __global__ void DIMS __launch_bounds__ BOUNDS NAME##_##S(                         \
      const T* qkv, const T* cos, const T* sin, T* cache, T* out, int batch, int heads,       \
      int kv_heads, int rotary, int max_len, int start, const uint32_t* position, float scale,\
      float cap, int window) {                                                                \
    decode_step_tiles<T, D, WARPS, CLUSTER>(qkv, cos, sin, cache, out, batch, heads,          \
                                            kv_heads, rotary, max_len, start, position,       \
                                            scale, cap, window);                              \
  }

// Cluster dimensions exist on compute capability 9.0 (and in the host pass, which declares the
// entry points); elsewhere the clustered entry points trap, and the launcher never picks them.
#if (defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900) || !defined(__CUDA_ARCH__)
#define STEP_CLUSTER_DIMS(C) __cluster_dims__(C, 1, 1)
#else
#define STEP_CLUSTER_DIMS(C)
#endif

// gemv_##NAME##_##S and gemv_##NAME##_rms_##S: the gated unit A of a stacked projection, of x
// and of x's RMSNorm.
#define GEMV_GLU_ENTRY_POINTS(S, T, NAME, A)                                                   \
  extern "C" __global__ void gemv_##NAME##_##S(const T* x, const T* w, T* y, int rows, int in, \
                                               int out) {                                     \
    uint4 a[2][DOT_UNITS];                                                                    \
    const bool preloaded = start_product<T, 2>(a, w, in, out);                                \
    gemv_glu<A, T>(x, w, y, rows, in, out, a, preloaded);                                     \
  }                                                                                           \
  extern "C" __global__ void gemv_##NAME##_rms_##S(const T* x, const T* w, const T* nw, T* y, \
                                                   int rows, int in, int out, float eps,      \
                                                   float offset) {                            \
    uint4 a[2][DOT_UNITS];                                                                    \
    const bool preloaded = start_product<T, 2>(a, w, in, out);                                \
    gemv_glu<A, T>(rms_normed_rows<T>(x, nw, rows, in, eps, offset), w, y, rows, in, out, a,  \
                   preloaded);                                                                \
  }

#define DECODE_ENTRY_POINTS(S, T)                                                              \
  GEMV_GLU_ENTRY_POINTS(S, T, swiglu, Silu)                                                   \
  GEMV_GLU_ENTRY_POINTS(S, T, geglu, GeluTanh)                                                \
  extern "C" __global__ void gemv_##S(const T* x, const T* w, T* y, int rows, int in,         \
                                      int out) {                                              \
    uint4 a[1][DOT_UNITS];                                                                    \
    const bool preloaded = start_product<T, 1>(a, w, in, out);                                \
    gemv<T>(x, w, nullptr, y, rows, in, out, a, preloaded);                                   \
  }                                                                                           \
  extern "C" __global__ void gemv_rms_##S(const T* x, const T* w, const T* nw, T* y, int rows, \
                                          int in, int out, float eps, float offset) {         \
    uint4 a[1][DOT_UNITS];                                                                    \
    const bool preloaded = start_product<T, 1>(a, w, in, out);                                \
    gemv<T>(rms_normed_rows<T>(x, nw, rows, in, eps, offset), w, nullptr, y, rows, in, out,   \
            a, preloaded);                                                                    \
  }                                                                                           \
  extern "C" __global__ void gemv_rms_maxima_##S(const T* x, const T* w, const T* nw,         \
                                                 float* values, int* indices, int in, int out, \
                                                 float eps, float offset) {                   \
    uint4 a[1][DOT_UNITS];                                                                    \
    const bool preloaded = start_product<T, 1>(a, w, in, out);                                \
    gemv_maxima<T>(rms_normed_rows<T>(x, nw, 1, in, eps, offset), w, values, indices, in, out, \
                   a, preloaded);                                                             \
  }                                                                                           \
  extern "C" __global__ void gemv_residual_##S(const T* x, const T* w, const T* residual,     \
                                               T* y, int rows, int in, int out) {             \
    uint4 a[1][DOT_UNITS];                                                                    \
    const bool preloaded = start_product<T, 1>(a, w, in, out);                                \
    gemv<T>(x, w, residual, y, rows, in, out, a, preloaded);                                  \
  }                                                                                           \
  extern "C" __global__ void argmax_chunks_##S(const T* x, float* values, int* indices, int n, \
                                               int chunks) {                                  \
    argmax_chunks<T>(x, values, indices, n, chunks);                                          \
  }                                                                                           \
  DECODE_ATTENTION_ENTRY_POINTS(S, T, , 1)                                                    \
  DECODE_ATTENTION_ENTRY_POINTS(S, T, _wide, WIDE<T>)

FOR_EACH_FLOAT(DECODE_ENTRY_POINTS)
// Sixteen warps where a lane's tile fits 128 registers (16-bit heads of 64), else eight.
DECODE_STEP_TILES_ENTRY_POINT(bf16, __nv_bfloat16, 64, 16, 1, (512), decode_step_tiles64, )
DECODE_STEP_TILES_ENTRY_POINT(f16, __half, 64, 16, 1, (512), decode_step_tiles64, )
DECODE_STEP_TILES_ENTRY_POINT(f32, float, 64, 8, 1, (256), decode_step_tiles64, )
DECODE_STEP_TILES_ENTRY_POINT(bf16, __nv_bfloat16, 128, 8, 1, (256), decode_step_tiles128, )
DECODE_STEP_TILES_ENTRY_POINT(f16, __half, 128, 8, 1, (256), decode_step_tiles128, )
// 16-bit heads of 64 over few (batch, head)s: clusters of four blocks of four warps, each block
// held to 128 registers a thread (16K a block), so that it fits beside two of the q/k/v
// product's blocks.
DECODE_STEP_TILES_ENTRY_POINT(bf16, __nv_bfloat16, 64, 4, 4, (128, 4), decode_step_tiles64c4,
                              STEP_CLUSTER_DIMS(4))
DECODE_STEP_TILES_ENTRY_POINT(f16, __half, 64, 4, 4, (128, 4), decode_step_tiles64c4,
                              STEP_CLUSTER_DIMS(4))
