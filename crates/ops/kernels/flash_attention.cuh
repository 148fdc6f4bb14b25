// Flash-style causal attention, forward and backward, included by attention.cu (it uses the
// helpers of common.cuh). The T×T scores and probabilities never reach global memory: the
// forward keeps a running max and sum per query row (online softmax) and saves only the output
// and one log-sum-exp per row; the backward recomputes the probabilities tile by tile from it.
//
// Layout: q, out, dout [batch * heads, q_len, D] contiguous; k and v [batch, kv_heads, kv_len, D]
// with element strides (batch, kv head, position) and unit stride along D, so views into a KV
// cache work. Query head h reads kv head h / group (grouped-query attention without repeating
// the keys). Query i sits at position kv_len - q_len + i and sees keys up to it, the last
// `window` of them (FA_SCORING).
//
// Tiles are 64 queries × 64 keys, 256 threads as 16 × 16: thread (ty, tx) owns rows 4ty..4ty+3
// of a tile, score columns tx + 16j and head-dimension columns 64c + 4tx..64c + 4tx + 3. Math
// is f32 FMA (SIMT) on f32 copies of the tiles in shared memory, read as float4, for every
// input dtype. The log-sum-exp is kept in base 2 (scores times
// scale * log2(e)), which is all the backward needs. The backward is two kernels, one per
// gradient owner (keys/values, then queries), so nothing is accumulated with atomics and the
// result is the same on every run.

#pragma once

#include "common.cuh"

constexpr int FA_THREADS = 256;

// Row stride (in floats) of a [64][D] tile in shared memory: padded by 4 so that rows stay
// 16-byte aligned for float4 reads and rows tx + 16j of one quarter-warp fall in distinct banks.
template <int D> __host__ __device__ constexpr int fa_stride() { return D + 4; }
constexpr int FA_PAD = FA_TILE + 4;  // row stride of the 64 × 64 score tiles

// The sizes and key/value strides every tiled kernel takes after its buffers, and the inputs
// of both backward kernels, as parameter lists and as argument lists.
#define FA_SHAPE                                                                              \
  int heads, int group, int q_len, int kv_len, long long k_sb, long long k_sh, long long k_sp, \
      long long v_sb, long long v_sh, long long v_sp
#define FA_SHAPE_ARGS heads, group, q_len, kv_len, k_sb, k_sh, k_sp, v_sb, v_sh, v_sp
#define FA_BWD_INPUTS(T) \
  const T *q, const T *k, const T *v, const T *dout, const float *lse, const float *delta
#define FA_BWD_INPUT_ARGS q, k, v, dout, lse, delta

// How scores become logits, every tiled kernel's last parameters before its layout: the
// base-2 scale (scale · log2 e), the soft cap in base 2 (cap · log2 e; 0 for none: Gemma 2's
// `cap · tanh(x / cap)` on the scaled score x), the window, how many positions a query
// sees, its own included (the launcher passes a huge one for none, so masks need no case), and
// the segment starts of packed rows (u32 [batch, q_len]: a query sees no key before its
// example's start; self-attention only, q_len = kv_len; null for none).
#define FA_SCORING float scale_log2, float cap_log2, int window, const unsigned int* starts
#define FA_SCORING_ARGS scale_log2, cap_log2, window, starts

// Whether the query at position `pos` sees the key at `key` (keys past kv_len are the
// caller's to mask).
__device__ __forceinline__ bool fa_sees(int pos, int key, int window) {
  return key <= pos && pos - key < window;
}

// The first key the query `query` of batch row `b` may see for its segment: its start in
// `starts` (FA_SCORING), 0 without segments or past the last query.
__device__ __forceinline__ int fa_segment_start(const unsigned int* starts, int b, int q_len,
                                                int query) {
  return starts != nullptr && query < q_len ? (int)starts[(size_t)b * q_len + query] : 0;
}

// A soft-capped raw score: s' with s' · scale_log2 = cap_log2 · tanh(s · scale_log2 / cap_log2),
// so the kernels go on as with uncapped scores.
__device__ __forceinline__ float fa_capped(float s, float scale_log2, float cap_log2) {
  return cap_log2 * tanhf(s * scale_log2 / cap_log2) / scale_log2;
}

// d(capped)/d(raw) from the capped score: 1 − tanh².
__device__ __forceinline__ float fa_cap_slope(float capped, float scale_log2, float cap_log2) {
  const float t = capped * scale_log2 / cap_log2;
  return 1.f - t * t;
}

// The first key (a multiple of the tile) that a query from `pos0` on can see.
__device__ __forceinline__ int fa_key_begin(int pos0, int window) {
  return max(0, pos0 - window + 1) / FA_TILE * FA_TILE;
}

// The queries (exclusive end) that can see a key tile from k0: positions up to
// k0 + 63 + window − 1.
__device__ __forceinline__ int fa_query_end(int k0, int window, int shift, int q_len) {
  return min(q_len, k0 + FA_TILE - 1 + window - shift);
}

// exp2(x − m) and exp2(m_old − m) stay defined (0) while a row has seen no key (m = −∞):
// with a window, rows meet tiles wholly before their window.
__device__ __forceinline__ float fa_finite_max(float m) { return m == -INFINITY ? 0.f : m; }

// The block's dynamic shared memory (16-byte aligned for float4 reads), laid out as `tiles`
// [64][D + 4] tiles, then `scores` [64][68] score tiles, then per-row vectors of 64 floats (the
// launcher sizes it the same way): the start of the i-th of each.
template <int D> struct FaShared {
  int tiles, scores;
  __device__ float* tile(int i) const {
    extern __shared__ float4 fa_smem[];
    return reinterpret_cast<float*>(fa_smem) + i * FA_TILE * fa_stride<D>();
  }
  __device__ float* score(int i) const { return tile(tiles) + i * FA_TILE * FA_PAD; }
  __device__ float* rows(int i) const { return score(scores) + i * FA_TILE; }
};

// Rows row0..row0+63 of an [n, D] matrix (row stride `stride`) as f32 into `dst` [64][D + 4];
// rows at or beyond n are zeros.
template <typename T, int D>
__device__ __forceinline__ void fa_load_tile(float* dst, const T* src, long long stride, int row0,
                                             int n) {
  for (int e = threadIdx.x; e < FA_TILE * D; e += FA_THREADS) {
    const int r = e / D, c = e % D, row = row0 + r;
    dst[r * fa_stride<D>() + c] = row < n ? to_f32(src[(long long)row * stride + c]) : 0.f;
  }
}

// Per-row values (log-sum-exp or delta) of rows row0..row0+63 into `dst`; 0 beyond n.
__device__ __forceinline__ void fa_load_rows(float* dst, const float* src, int row0, int n) {
  for (int r = threadIdx.x; r < FA_TILE; r += FA_THREADS) dst[r] = row0 + r < n ? src[row0 + r] : 0.f;
}

__device__ __forceinline__ const float4* fa_vec(const float* p) {
  return reinterpret_cast<const float4*>(p);
}

// acc[i][j] += Σ_d a[4ty + i][d] · b[tx + 16j][d] over two [64][D + 4] tiles, four d at a time.
template <int D>
__device__ __forceinline__ void fa_dot_tiles(float (&acc)[4][4], const float* a, const float* b,
                                             int ty, int tx) {
  constexpr int S = fa_stride<D>();
#pragma unroll 4
  for (int d = 0; d < D; d += 4) {
    float4 x[4], y[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) x[i] = *fa_vec(a + (4 * ty + i) * S + d);
#pragma unroll
    for (int j = 0; j < 4; ++j) y[j] = *fa_vec(b + (tx + 16 * j) * S + d);
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j)
        acc[i][j] += x[i].x * y[j].x + x[i].y * y[j].y + x[i].z * y[j].z + x[i].w * y[j].w;
  }
}

// The accumulator of D-wide rows: acc[i][4c + k] is column 64c + 4tx + k of row 4ty + i.
template <int D> using FaRows = float[4][D / 16];

// acc += w · m for a [64][68] weight tile (rows 4ty + i) and a [64][D + 4] matrix tile.
template <int D>
__device__ __forceinline__ void fa_weighted_rows(FaRows<D>& acc, const float* w, const float* m,
                                                 int ty, int tx) {
  constexpr int S = fa_stride<D>();
#pragma unroll 2
  for (int j = 0; j < FA_TILE; j += 4) {
    float4 x[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) x[i] = *fa_vec(w + (4 * ty + i) * FA_PAD + j);
#pragma unroll
    for (int c = 0; c < D / 64; ++c) {
      float4 y[4];
#pragma unroll
      for (int k = 0; k < 4; ++k) y[k] = *fa_vec(m + (j + k) * S + 64 * c + 4 * tx);
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const float xs[4] = {x[i].x, x[i].y, x[i].z, x[i].w};
#pragma unroll
        for (int k = 0; k < 4; ++k) {
          acc[i][4 * c + 0] += xs[k] * y[k].x;
          acc[i][4 * c + 1] += xs[k] * y[k].y;
          acc[i][4 * c + 2] += xs[k] * y[k].z;
          acc[i][4 * c + 3] += xs[k] * y[k].w;
        }
      }
    }
  }
}

// Multiplies row 4ty + i of the accumulator by f[i].
template <int D>
__device__ __forceinline__ void fa_scale_rows(FaRows<D>& acc, const float (&f)[4]) {
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int c = 0; c < D / 16; ++c) acc[i][c] *= f[i];
}

// Stores rows row0 + 4ty + i (those below n) of acc · scale into `dst` [n, D].
template <typename T, int D>
__device__ __forceinline__ void fa_store_rows(T* dst, const FaRows<D>& acc, int row0, int n,
                                              int ty, int tx, float scale) {
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int row = row0 + 4 * ty + i;
    if (row >= n) continue;
#pragma unroll
    for (int c = 0; c < D / 16; ++c)
      dst[(size_t)row * D + 64 * (c / 4) + 4 * tx + c % 4] = from_f32<T>(acc[i][c] * scale);
  }
}

// The work of this block in a grid of (tiles, rows) (tiles of 64 queries or keys by batch ×
// heads): `.x` the tile's rank by work (0 the heaviest), `.y` the row. Blocks start in the order
// of their linear index (x fastest), and the ranks follow that order across rows: every row's
// heaviest tile first, then every row's second, and the lightest last. Under a causal mask a
// tile's work grows with its rank's distance from the end (a key/value tile's up to 128 times
// the lightest's at 2,048 tokens with 4 query heads a kv head), so ranks taken row by row
// started the heaviest tiles of the last rows after most of the grid and ran them alone at the
// end; in this order the tail is the shortest tiles.
__device__ __forceinline__ int2 fa_block_work() {
  const unsigned linear = blockIdx.x + gridDim.x * blockIdx.y;
  return make_int2(linear / gridDim.y, linear % gridDim.y);
}

// What a block over one tile of `rows` queries works on (the forward and the query
// gradients): its batch × head, first query (the heaviest tiles, the last queries, first), its
// thread's tile coordinates (in these kernels' 16 × 16 thread layout), and the key and value
// rows of its kv head.
template <typename T> struct FaQueryBlock {
  int bh, q0, ty, tx;
  const T* keys;
  const T* values;
  __device__ FaQueryBlock(const T* k, const T* v, int heads, int group, long long k_sb,
                          long long k_sh, long long v_sb, long long v_sh, int rows = FA_TILE)
      : bh(fa_block_work().y),
        q0((gridDim.x - 1 - fa_block_work().x) * rows),
        ty(threadIdx.x >> 4),
        tx(threadIdx.x & 15) {
    const int b = bh / heads, kv_head = (bh % heads) / group;
    keys = k + b * k_sb + kv_head * k_sh;
    values = v + b * v_sb + kv_head * v_sh;
  }
};

// Forward: one block per (query tile, batch × head), the heaviest tiles (last queries) first.
// Shared memory: q tile, k-then-v tile, probabilities.
template <typename T, int D>
__device__ void flash_attention_fwd(const T* q, const T* k, const T* v, T* out, float* lse,
                                    FA_SHAPE, FA_SCORING) {
  const FaShared<D> shared{2, 1};
  float *qs = shared.tile(0), *kvs = shared.tile(1), *ps = shared.score(0);
  const FaQueryBlock<T> at(k, v, heads, group, k_sb, k_sh, v_sb, v_sh);
  const int bh = at.bh, q0 = at.q0, shift = kv_len - q_len, ty = at.ty, tx = at.tx;
  const T *kb = at.keys, *vb = at.values;
  fa_load_tile<T, D>(qs, q + (size_t)bh * q_len * D, D, q0, q_len);
  FaRows<D> o = {};
  float m[4], l[4] = {}, alpha[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) m[i] = -INFINITY;
  // Keys past the tile's last query position are masked for every row of the tile, and
  // those before its first query's window.
  const int key_end = min(kv_len, q0 + FA_TILE + shift);
  for (int k0 = fa_key_begin(q0 + shift, window); k0 < key_end; k0 += FA_TILE) {
    __syncthreads();  // the previous tile's readers are done with kvs and ps
    fa_load_tile<T, D>(kvs, kb, k_sp, k0, kv_len);
    __syncthreads();
    float s[4][4] = {};
    fa_dot_tiles<D>(s, qs, kvs, ty, tx);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int pos = q0 + 4 * ty + i + shift;
      const int first = fa_segment_start(starts, bh / heads, q_len, q0 + 4 * ty + i);
      float row_max = -INFINITY;
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int key = k0 + tx + 16 * j;
        const float x = cap_log2 > 0.f ? fa_capped(s[i][j], scale_log2, cap_log2) : s[i][j];
        const bool seen = fa_sees(pos, key, window) && key >= first && key < kv_len;
        s[i][j] = seen ? x * scale_log2 : -INFINITY;
        row_max = fmaxf(row_max, s[i][j]);
      }
      // The 16 threads of a row are a half-warp.
      const float m_new = fmaxf(m[i], warp_max<16>(row_max)), m_use = fa_finite_max(m_new);
      alpha[i] = exp2f(m[i] - m_use);
      float row_sum = 0.f;
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        s[i][j] = exp2f(s[i][j] - m_use);
        row_sum += s[i][j];
      }
      l[i] = l[i] * alpha[i] + warp_sum<16>(row_sum);
      m[i] = m_new;
    }
    fa_scale_rows<D>(o, alpha);
    __syncthreads();  // everyone is done with the keys
    fa_load_tile<T, D>(kvs, vb, v_sp, k0, kv_len);
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) ps[(4 * ty + i) * FA_PAD + tx + 16 * j] = s[i][j];
    __syncthreads();
    fa_weighted_rows<D>(o, ps, kvs, ty, tx);
  }
  float inv[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    inv[i] = 1.f / l[i];
    const int row = q0 + 4 * ty + i;
    if (tx == 0 && row < q_len) lse[(size_t)bh * q_len + row] = m[i] + log2f(l[i]);
  }
  fa_scale_rows<D>(o, inv);
  fa_store_rows<T, D>(out + (size_t)bh * q_len * D, o, q0, q_len, ty, tx, 1.f);
}

// delta[row] = Σ_d dout[row][d] · out[row][d], one warp per row of D.
template <typename T>
__device__ void flash_attention_delta(const T* out, const T* dout, float* delta, int rows, int d) {
  const int row = warp_row(rows);
  if (row < 0) return;
  const int lane = threadIdx.x & 31;
  float sum = 0.f;
  for (int j = lane; j < d; j += 32)
    sum += to_f32(out[(size_t)row * d + j]) * to_f32(dout[(size_t)row * d + j]);
  sum = warp_sum(sum);
  if (lane == 0) delta[row] = sum;
}

// The probabilities p and score gradients ds = p (dp − delta) of one 64 × 64 tile pair, for
// the thread's rows 4ty + i and columns tx + 16j: the scores are the dot products of rows of
// tiles[0] and tiles[1] (queries and keys), dp those of tiles[2] and tiles[3] (dout and values).
// `rows_are_keys` says which side the rows are (the key/value kernel works on the transposed
// tile and passes keys, queries, values, dout); `b` is the batch row (for segment starts).
template <int D>
__device__ __forceinline__ void fa_probabilities(float (&s)[4][4], float (&dp)[4][4],
                                                 const float* const (&tiles)[4],
                                                 const float* lse_s, const float* delta_s,
                                                 bool rows_are_keys, int row0, int col0,
                                                 int q_len, int kv_len, int shift, int ty, int tx,
                                                 int b, FA_SCORING) {
  fa_dot_tiles<D>(s, tiles[0], tiles[1], ty, tx);
  fa_dot_tiles<D>(dp, tiles[2], tiles[3], ty, tx);
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int r = 4 * ty + i, c = tx + 16 * j;
      const int query = rows_are_keys ? col0 + c : row0 + r;
      const int key = rows_are_keys ? row0 + r : col0 + c;
      const int local = rows_are_keys ? c : r;
      const bool seen = query < q_len && key < kv_len && fa_sees(query + shift, key, window) &&
                        key >= fa_segment_start(starts, b, q_len, query);
      const bool capped = cap_log2 > 0.f;
      const float x = capped ? fa_capped(s[i][j], scale_log2, cap_log2) : s[i][j];
      const float p = seen ? exp2f(x * scale_log2 - lse_s[local]) : 0.f;
      const float slope = capped ? fa_cap_slope(x, scale_log2, cap_log2) : 1.f;
      s[i][j] = p;
      dp[i][j] = p * (dp[i][j] - delta_s[local]) * slope;
    }
}

// Writes the thread's part of a 64 × 64 register tile into a [64][68] shared tile.
__device__ __forceinline__ void fa_put_tile(float* dst, const float (&t)[4][4], int ty, int tx) {
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) dst[(4 * ty + i) * FA_PAD + tx + 16 * j] = t[i][j];
}

// Key and value gradients: one block per (key tile, batch × kv head); it walks every query
// tile at or after the diagonal (and before the window's end) of each query head in its group. dk and dv are
// [batch, kv_heads, kv_len, D] contiguous. Shared memory: k, v, q, dout tiles, then the p and
// ds tiles (keys × queries), then the queries' log-sum-exp and delta.
template <typename T, int D>
__device__ void flash_attention_bwd_kv(FA_BWD_INPUTS(T), T* dk, T* dv, FA_SHAPE, FA_SCORING,
                                       float scale) {
  const FaShared<D> shared{4, 2};
  float *ks = shared.tile(0), *vs = shared.tile(1), *qs = shared.tile(2), *dos = shared.tile(3);
  float *ps = shared.score(0), *dss = shared.score(1);
  float *lse_s = shared.rows(0), *delta_s = shared.rows(1);
  const int2 work = fa_block_work();  // the first key tile sees the most queries
  const int kv_heads = heads / group, bkv = work.y, b = bkv / kv_heads;
  const int kv_head = bkv % kv_heads, k0 = work.x * FA_TILE, shift = kv_len - q_len;
  const int ty = threadIdx.x >> 4, tx = threadIdx.x & 15;
  fa_load_tile<T, D>(ks, k + b * k_sb + kv_head * k_sh, k_sp, k0, kv_len);
  fa_load_tile<T, D>(vs, v + b * v_sb + kv_head * v_sh, v_sp, k0, kv_len);
  FaRows<D> dk_acc = {}, dv_acc = {};
  // The first query that sees key k0 is k0 - shift; start at its tile.
  const int q_begin = max(0, k0 - shift) / FA_TILE * FA_TILE;
  const int q_end = fa_query_end(k0, window, shift, q_len);
  for (int g = 0; g < group; ++g) {
    const size_t bh = (size_t)b * heads + kv_head * group + g;
    for (int q0 = q_begin; q0 < q_end; q0 += FA_TILE) {
      __syncthreads();  // the previous tile's readers are done
      fa_load_tile<T, D>(qs, q + bh * q_len * D, D, q0, q_len);
      fa_load_tile<T, D>(dos, dout + bh * q_len * D, D, q0, q_len);
      fa_load_rows(lse_s, lse + bh * q_len, q0, q_len);
      fa_load_rows(delta_s, delta + bh * q_len, q0, q_len);
      __syncthreads();
      float s[4][4] = {}, dp[4][4] = {};
      fa_probabilities<D>(s, dp, {ks, qs, vs, dos}, lse_s, delta_s, true, k0, q0, q_len, kv_len,
                          shift, ty, tx, b, FA_SCORING_ARGS);
      fa_put_tile(ps, s, ty, tx);
      fa_put_tile(dss, dp, ty, tx);
      __syncthreads();
      fa_weighted_rows<D>(dv_acc, ps, dos, ty, tx);
      fa_weighted_rows<D>(dk_acc, dss, qs, ty, tx);
    }
  }
  fa_store_rows<T, D>(dk + (size_t)bkv * kv_len * D, dk_acc, k0, kv_len, ty, tx, scale);
  fa_store_rows<T, D>(dv + (size_t)bkv * kv_len * D, dv_acc, k0, kv_len, ty, tx, 1.f);
}

// Query gradients: one block per (query tile, batch × head), heaviest first, walking the key
// tiles from the first row's window up to the diagonal. dq is [batch * heads, q_len, D]. Shared memory: q, dout, k, v
// tiles, the ds tile (queries × keys), the rows' log-sum-exp and delta.
template <typename T, int D>
__device__ void flash_attention_bwd_q(FA_BWD_INPUTS(T), T* dq, FA_SHAPE, FA_SCORING,
                                      float scale) {
  const FaShared<D> shared{4, 1};
  float *qs = shared.tile(0), *dos = shared.tile(1), *ks = shared.tile(2), *vs = shared.tile(3);
  float *dss = shared.score(0), *lse_s = shared.rows(0), *delta_s = shared.rows(1);
  const FaQueryBlock<T> at(k, v, heads, group, k_sb, k_sh, v_sb, v_sh);
  const int bh = at.bh, q0 = at.q0, shift = kv_len - q_len, ty = at.ty, tx = at.tx;
  const T *kb = at.keys, *vb = at.values;
  fa_load_tile<T, D>(qs, q + (size_t)bh * q_len * D, D, q0, q_len);
  fa_load_tile<T, D>(dos, dout + (size_t)bh * q_len * D, D, q0, q_len);
  fa_load_rows(lse_s, lse + (size_t)bh * q_len, q0, q_len);
  fa_load_rows(delta_s, delta + (size_t)bh * q_len, q0, q_len);
  FaRows<D> dq_acc = {};
  const int key_end = min(kv_len, q0 + FA_TILE + shift);
  for (int k0 = fa_key_begin(q0 + shift, window); k0 < key_end; k0 += FA_TILE) {
    __syncthreads();
    fa_load_tile<T, D>(ks, kb, k_sp, k0, kv_len);
    fa_load_tile<T, D>(vs, vb, v_sp, k0, kv_len);
    __syncthreads();
    float s[4][4] = {}, dp[4][4] = {};
    fa_probabilities<D>(s, dp, {qs, ks, dos, vs}, lse_s, delta_s, false, q0, k0, q_len, kv_len,
                        shift, ty, tx, bh / heads, FA_SCORING_ARGS);
    fa_put_tile(dss, dp, ty, tx);
    __syncthreads();
    fa_weighted_rows<D>(dq_acc, dss, ks, ty, tx);
  }
  fa_store_rows<T, D>(dq + (size_t)bh * q_len * D, dq_acc, q0, q_len, ty, tx, scale);
}


#define FLASH_ENTRY_POINTS_D(S, T, D)                                                          \
  extern "C" __global__ void __launch_bounds__(FA_THREADS) flash_attention_fwd_d##D##_##S(    \
      const T* q, const T* k, const T* v, T* out, float* lse, FA_SHAPE, FA_SCORING) {          \
    flash_attention_fwd<T, D>(q, k, v, out, lse, FA_SHAPE_ARGS, FA_SCORING_ARGS);             \
  }                                                                                           \
  extern "C" __global__ void __launch_bounds__(FA_THREADS) flash_attention_bwd_kv_d##D##_##S( \
      FA_BWD_INPUTS(T), T* dk, T* dv, FA_SHAPE, FA_SCORING, float scale) {                       \
    flash_attention_bwd_kv<T, D>(FA_BWD_INPUT_ARGS, dk, dv, FA_SHAPE_ARGS, FA_SCORING_ARGS,    \
                                 scale);                                                      \
  }                                                                                           \
  extern "C" __global__ void __launch_bounds__(FA_THREADS) flash_attention_bwd_q_d##D##_##S(  \
      FA_BWD_INPUTS(T), T* dq, FA_SHAPE, FA_SCORING, float scale) {                              \
    flash_attention_bwd_q<T, D>(FA_BWD_INPUT_ARGS, dq, FA_SHAPE_ARGS, FA_SCORING_ARGS, scale); \
  }

#define FLASH_ENTRY_POINTS(S, T)                                                               \
  FLASH_ENTRY_POINTS_D(S, T, 64)                                                               \
  FLASH_ENTRY_POINTS_D(S, T, 128)                                                              \
  extern "C" __global__ void flash_attention_delta_##S(const T* out, const T* dout,           \
                                                       float* delta, int rows, int d) {       \
    flash_attention_delta<T>(out, dout, delta, rows, d);                                      \
  }
