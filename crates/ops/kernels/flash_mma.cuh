// Flash attention on tensor cores for the 16-bit dtypes (bf16, f16), included by attention.cu
// after flash_attention.cuh, whose layout, tiling of the grid, parameter lists and base-2
// log-sum-exp it shares: the forward's lse and the backward's delta are interchangeable between
// the two, and the launcher picks these kernels wherever the rows are 16-byte aligned.
//
// A block is 4 warps. In the forward and the query gradients a warp owns 16·MT consecutive
// queries and walks the key tiles of 64 (a warp's MT row tiles share every B operand it loads;
// the entry points use MT = 1, see FM_FWD_BLOCKS); in the key/value gradients it owns 16 keys
// of the block's 64 and walks the query tiles of 64. Operands are staged as 16-bit [rows][D + 8] tiles in shared
// memory with cp.async (rows padded by 16 bytes so the eight rows one ldmatrix reads fall in
// distinct banks), the next tile's copy in flight while the current one is multiplied, and
// multiplied with mma.sync.m16n8k16 (f32 accumulate). Probabilities and score gradients go from
// the accumulators straight into the next product's A operand (rounded to the 16-bit dtype, as
// every flash attention does), never through memory. Warps whose rows a tile's causal mask
// (or window) hides entirely skip its products. The score functions are instantiated for
// masked or whole tiles and capped or plain scores (fm_variant): a plain causal tile runs the
// same code as without the options.
//
// The query gradients run first and compute each row's delta (Σ dout · out) from the tiles they
// load anyway, for the key/value gradients after them: no separate delta kernel.
//
// Fragment layout of m16n8k16 (lane = 4g + t): A holds rows g and g + 8, columns 2t, 2t + 1
// and 2t + 8, 2t + 9; B holds rows (k) 2t, 2t + 1 and 2t + 8, 2t + 9 of column (n) g; the f32
// accumulator holds columns 2t, 2t + 1 of rows g (elements 0, 1) and g + 8 (elements 2, 3).
//
// The file is long because the forward and both backward kernels share its fragment, copy and
// tile-walking helpers.

#pragma once

#include "flash_attention.cuh"

// Element strides (batch, head, position; unit along D) of the query side: q, out, dout and dq
// share them, so the kernels read and write [b, heads, t, D] tensors and the [b, t, heads, D]
// rows of projections alike. The key/value gradients have their own (G_LAYOUT).
#define Q_LAYOUT long long q_sb, long long q_sh, long long q_sp
#define G_LAYOUT long long g_sb, long long g_sh, long long g_sp

// The start of head `bh` (batch × heads + head) in the query-side layout.
__device__ __forceinline__ long long fm_head_start(int bh, int heads, long long q_sb,
                                                   long long q_sh) {
  return (bh / heads) * q_sb + (bh % heads) * q_sh;
}

// Calls f(mask, cap) with std::integral_constant<bool> arguments for the two flags, so the
// callee is instantiated for each combination and the flags are tested once per call.
template <typename F> __device__ __forceinline__ void fm_variant(bool mask, bool cap, F f) {
  using Yes = std::true_type;
  using No = std::false_type;
  if (mask) {
    if (cap)
      f(Yes{}, Yes{});
    else
      f(Yes{}, No{});
  } else if (cap) {
    f(No{}, Yes{});
  } else {
    f(No{}, No{});
  }
}

// Row stride (elements) of a [64][D] tile in shared memory.
template <int D> __host__ __device__ constexpr int fm_stride() { return D + 8; }

// One m16n8k16 step of T (bf16 or f16) operands with f32 accumulation.
#define FM_MMA(TYPE)                                                                            \
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32." #TYPE "." #TYPE                        \
               ".f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"                   \
               : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])                                 \
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1))

template <typename T> struct Mma {
  // c += a · b for one 16 × 8 × 16 step.
  __device__ __forceinline__ static void run(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                             uint32_t b1) {
    if constexpr (std::is_same<T, __half>::value)
      FM_MMA(f16);
    else
      FM_MMA(bf16);
  }
  // Two values as one 32-bit operand register, `lo` in the low half.
  __device__ __forceinline__ static uint32_t pack(float lo, float hi) {
    const T l = from_f32<T>(lo), h = from_f32<T>(hi);
    return (uint32_t)reinterpret_cast<const uint16_t&>(l) |
           (uint32_t)reinterpret_cast<const uint16_t&>(h) << 16;
  }
};

__device__ __forceinline__ uint32_t fm_shared_address(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// Four 8 × 8 16-bit matrices from shared memory; lane 8i + r gives row r of matrix i.
template <bool TRANS> __device__ __forceinline__ void fm_ldmatrix(uint32_t (&r)[4], const void* p) {
  if (TRANS)
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(fm_shared_address(p)));
  else
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(fm_shared_address(p)));
}

// 16 bytes from global to shared memory without passing through registers; zeros where
// `valid` is false (nothing is read then).
__device__ __forceinline__ void fm_copy16(void* dst, const void* src, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(fm_shared_address(dst)),
               "l"(src), "r"(valid ? 16 : 0));
}
// The same for 4 bytes (per-row f32 and u32 values, whose rows need not start 16-byte
// aligned; cp.async copies that small go through L1, `.ca`).
__device__ __forceinline__ void fm_copy4(void* dst, const void* src, bool valid) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(fm_shared_address(dst)),
               "l"(src), "r"(valid ? 4 : 0));
}
__device__ __forceinline__ void fm_commit() { asm volatile("cp.async.commit_group;\n" ::); }
// Waits until at most N of this thread's committed copy groups are still in flight.
template <int N> __device__ __forceinline__ void fm_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

// 2^x with the hardware approximation (2 ulp; subnormal results flush to zero, which only
// drops probabilities below 1e-38), one instruction where exp2f adds range handling around it.
__device__ __forceinline__ float fm_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// The queries a block of the query-side kernels covers with MT row tiles of 16 per warp.
template <int MT> __host__ __device__ constexpr int fm_query_rows() {
  return 16 * MT * (FM_THREADS / 32);
}

// Starts copying rows row0..row0+ROWS-1 of an [n, D] matrix (row stride `stride`, 16-byte
// aligned rows) into `dst` [ROWS][D + 8]; rows at or beyond n become zeros. A thread copies the
// same column of every (FM_THREADS / (D / 8))-th row, so its addresses are one base and fixed
// steps: a tile's copy is a compare and a 16-byte copy a chunk, not a division and a 64-bit
// product (ncu had the integer pipe the forward's busiest, at 51%).
template <typename T, int D, int ROWS = FA_TILE>
__device__ __forceinline__ void fm_load_tile(T* dst, const T* src, long long stride, int row0,
                                             int n) {
  constexpr int CHUNKS = D / 8, STEP = FM_THREADS / CHUNKS;  // 16-byte chunks a row; rows a pass
  static_assert(FM_THREADS % CHUNKS == 0 && ROWS % STEP == 0, "whole passes over the tile");
  const int r = threadIdx.x / CHUNKS, c = threadIdx.x % CHUNKS * 8, row = row0 + r;
  const T* from = src + row * stride + c;
  T* to = dst + r * fm_stride<D>() + c;
#pragma unroll
  for (int i = 0; i < ROWS / STEP; ++i) {
    // A row past n reads nothing (a copy of 0 bytes fills zeros), so its address may point past it.
    fm_copy16(to + i * STEP * fm_stride<D>(), from + i * STEP * stride, row + i * STEP < n);
  }
}

// Starts copying a query tile's per-row values, rows row0..row0+63, into `dst` [3][64]: the
// log-sum-exp, the delta and the segment start (u32) from `starts` (the batch row's), zeros
// without packed rows (null), so the mask tests it unconditionally (a test in every score of
// whether there are segments had the compiler keep each masked variant twice). Rows at or
// beyond n become zeros; every mask tests query < q_len too, so a zero start there unmasks
// nothing. Warps 0-1 copy the log-sum-exps and segment starts, warps 2-3 the deltas.
__device__ __forceinline__ void fm_load_row_stats(float* dst, const float* lse, const float* delta,
                                                  const unsigned int* starts, int row0, int n) {
  static_assert(FM_THREADS == 2 * FA_TILE, "a thread copies one row's log-sum-exp or delta");
  const int r = threadIdx.x % FA_TILE, row = row0 + r;
  const bool packed = starts != nullptr;
  if (threadIdx.x < FA_TILE) {
    fm_copy4(dst + r, lse + row, row < n);
    // A copy that reads nothing still takes a valid address.
    fm_copy4(dst + 2 * FA_TILE + r, packed ? (const void*)(starts + row) : lse, packed && row < n);
  } else {
    fm_copy4(dst + FA_TILE + r, delta + row, row < n);
  }
}

// The A operand (16 × 16) at rows r0.., columns k0.. of a row-major tile.
template <int LD, typename T>
__device__ __forceinline__ void fm_frag_a(uint32_t (&a)[4], const T* tile, int r0, int k0) {
  const int lane = threadIdx.x & 31;
  fm_ldmatrix<false>(a, tile + (r0 + (lane & 15)) * LD + k0 + (lane >> 4) * 8);
}

// B operands of the two n-tiles n0 and n0 + 8 over k0..k0+15 (registers 0, 1 and 2, 3), where
// B[k][n] = tile[n][k] (the tile's rows are the product's columns).
template <int LD, typename T>
__device__ __forceinline__ void fm_frag_b_rows(uint32_t (&b)[4], const T* tile, int n0, int k0) {
  const int lane = threadIdx.x & 31, m = lane >> 3;
  fm_ldmatrix<false>(b, tile + (n0 + (m >> 1) * 8 + (lane & 7)) * LD + k0 + (m & 1) * 8);
}

// The same where B[k][n] = tile[k][n] (the tile's rows are the reduced dimension).
template <int LD, typename T>
__device__ __forceinline__ void fm_frag_b_cols(uint32_t (&b)[4], const T* tile, int k0, int n0) {
  const int lane = threadIdx.x & 31, m = lane >> 3;
  fm_ldmatrix<true>(b, tile + (k0 + (m & 1) * 8 + (lane & 7)) * LD + n0 + (m >> 1) * 8);
}

// acc[i] (16 × 8NC) += A_i · Bᵀ over K columns, for A_i rows r0 + 16i.. of tile `a` and B
// rows 0..8NC-1 of tile `b` (both row-major [.][K]): the warp's scores against a whole tile
// (NC = 8), or against its first 32 rows (NC = 4). Each B operand is loaded once for the MT
// row tiles.
template <typename T, int LD, int K, int MT, int NC = 8>
__device__ __forceinline__ void fm_dot_tile(float (&acc)[MT][NC][4], const T* a, int r0,
                                           const T* b) {
#pragma unroll
  for (int k0 = 0; k0 < K; k0 += 16) {
    uint32_t af[MT][4];
#pragma unroll
    for (int i = 0; i < MT; ++i) fm_frag_a<LD>(af[i], a, r0 + 16 * i, k0);
#pragma unroll
    for (int j = 0; j < NC; j += 2) {
      uint32_t bf[4];
      fm_frag_b_rows<LD>(bf, b, 8 * j, k0);
#pragma unroll
      for (int i = 0; i < MT; ++i) {
        Mma<T>::run(acc[i][j], af[i], bf[0], bf[1]);
        Mma<T>::run(acc[i][j + 1], af[i], bf[2], bf[3]);
      }
    }
  }
}

// acc[i] (16 × 8NT) += W_i · M for W_i (16 × 16KK) held as A operands and M rows 0..16KK-1 of
// tile `m` (row-major [.][8NT]): weighted sums of a tile's rows (KK = 4: all 64).
template <typename T, int LD, int NT, int MT, int KK = 4>
__device__ __forceinline__ void fm_weighted_rows(float (&acc)[MT][NT][4],
                                                 const uint32_t (&w)[MT][KK][4], const T* m) {
#pragma unroll
  for (int kk = 0; kk < KK; ++kk)
#pragma unroll
    for (int j = 0; j < NT; j += 2) {
      uint32_t bf[4];
      fm_frag_b_cols<LD>(bf, m, 16 * kk, 8 * j);
#pragma unroll
      for (int i = 0; i < MT; ++i) {
        Mma<T>::run(acc[i][j], w[i][kk], bf[0], bf[1]);
        Mma<T>::run(acc[i][j + 1], w[i][kk], bf[2], bf[3]);
      }
    }
}

// A 16 × 16KK accumulator as the A operands of the next product (16-bit).
template <typename T, int KK = 4>
__device__ __forceinline__ void fm_to_operand(uint32_t (&a)[KK][4], const float (&c)[2 * KK][4]) {
#pragma unroll
  for (int kk = 0; kk < KK; ++kk) {
    a[kk][0] = Mma<T>::pack(c[2 * kk][0], c[2 * kk][1]);
    a[kk][1] = Mma<T>::pack(c[2 * kk][2], c[2 * kk][3]);
    a[kk][2] = Mma<T>::pack(c[2 * kk + 1][0], c[2 * kk + 1][1]);
    a[kk][3] = Mma<T>::pack(c[2 * kk + 1][2], c[2 * kk + 1][3]);
  }
}

// Stores accumulator rows (row0 + 16i + g and row0 + 16i + g + 8, those below n) times
// `scale` into `dst` [n, D] (row stride `stride`).
template <typename T, int D, int MT>
__device__ __forceinline__ void fm_store_rows(T* dst, long long stride,
                                              const float (&acc)[MT][D / 8][4], int row0, int n,
                                              float scale) {
  const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
#pragma unroll
  for (int i = 0; i < MT; ++i)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int row = row0 + 16 * i + g + 8 * h;
      if (row >= n) continue;
#pragma unroll
      for (int j = 0; j < D / 8; ++j) {
        const float lo = acc[i][j][2 * h] * scale, hi = acc[i][j][2 * h + 1] * scale;
        *reinterpret_cast<uint32_t*>(dst + row * stride + 8 * j + 2 * t) = Mma<T>::pack(lo, hi);
      }
    }
}

// Σ a[i] · b[i] over 8 16-bit values at 16-byte aligned shared addresses, one 16-byte load
// each.
template <typename T> __device__ __forceinline__ float fm_dot8(const T* a, const T* b) {
  const uint4 x = *reinterpret_cast<const uint4*>(a), y = *reinterpret_cast<const uint4*>(b);
  const T *xs = reinterpret_cast<const T*>(&x), *ys = reinterpret_cast<const T*>(&y);
  float sum = 0.f;
#pragma unroll
  for (int i = 0; i < 8; ++i) sum = fmaf(to_f32(xs[i]), to_f32(ys[i]), sum);
  return sum;
}

// The tiles of a kernel's dynamic shared memory, in units of [64][D + 8], then f32 vectors.
template <typename T, int D> struct FmShared {
  __device__ static T* tile(int unit) {
    extern __shared__ uint4 fm_smem[];
    return reinterpret_cast<T*>(fm_smem) + unit * FA_TILE * fm_stride<D>();
  }
  __device__ static float* floats(int units) { return reinterpret_cast<float*>(tile(units)); }
};

// Where a thread sits in its warp's accumulators: rows r0 + 16i + g (+ 8), columns 2t (+ 1).
struct FmLane {
  int r0, g, t;
  __device__ explicit FmLane(int rows_per_warp)
      : r0(rows_per_warp * (threadIdx.x >> 5)), g((threadIdx.x & 31) >> 2), t(threadIdx.x & 3) {}
};

// The segment starts (fa_segment_start) of a thread's accumulator rows `row` + 16i and
// `row` + 16i + 8 (FmLane's g + 8h), read once before the key tiles rather than in each.
template <int MT>
__device__ __forceinline__ void fm_row_segment_starts(int (&first)[MT][2],
                                                      const unsigned int* starts, int b,
                                                      int q_len, int row) {
#pragma unroll
  for (int i = 0; i < MT; ++i)
#pragma unroll
    for (int h = 0; h < 2; ++h)
      first[i][h] = fa_segment_start(starts, b, q_len, row + 16 * i + 8 * h);
}

// One step of the online softmax for a warp's 16 rows against a tile of 64 keys: `s` holds raw
// scores (rows g and g + 8 at positions pos and pos + 8, columns key + 8j (+ 1)), and becomes
// the probabilities under the updated row maxima `m` (base 2, scaled); `l` (this thread's part
// of each row's sum) and the output rows `o` are rescaled to the new maxima. A row that has
// seen no key yet (a window's start lies past the tile, or a row past q_len) keeps m = −∞.
template <bool MASK, bool CAP, int D>
__device__ __forceinline__ void fm_online_softmax(float (&s)[8][4], float (&m)[2], float (&l)[2],
                                                  float (&o)[D / 8][4], int pos, int key,
                                                  const int (&first)[2], int kv_len, FA_SCORING) {
  if (CAP)
#pragma unroll
    for (int j = 0; j < 8; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) s[j][e] = fa_capped(s[j][e], scale_log2, cap_log2);
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    // Four independent partial maxima and sums, so the reductions are not one serial chain.
    float part[4] = {-INFINITY, -INFINITY, -INFINITY, -INFINITY};
#pragma unroll
    for (int j = 0; j < 8; ++j)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        float& x = s[j][2 * h + e];
        if (MASK) {
          const int col = key + 8 * j + e;
          x = fa_sees(pos + 8 * h, col, window) && col >= first[h] && col < kv_len ? x : -INFINITY;
        }
        part[(j & 1) * 2 + e] = fmaxf(part[(j & 1) * 2 + e], x);
      }
    const float row_max = fmaxf(fmaxf(part[0], part[1]), fmaxf(part[2], part[3]));
    const float m_new = fmaxf(m[h], warp_max<4>(row_max) * scale_log2);
    const float m_use = MASK ? fa_finite_max(m_new) : m_new;
    const float alpha = fm_exp2(m[h] - m_use);
#pragma unroll
    for (int k = 0; k < 4; ++k) part[k] = 0.f;
#pragma unroll
    for (int j = 0; j < 8; ++j)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        float& x = s[j][2 * h + e];
        x = fm_exp2(fmaf(x, scale_log2, -m_use));
        part[(j & 1) * 2 + e] += x;
      }
    const float row_sum = (part[0] + part[1]) + (part[2] + part[3]);
    l[h] = l[h] * alpha + row_sum;
    m[h] = m_new;
#pragma unroll
    for (int j = 0; j < D / 8; ++j) {
      o[j][2 * h] *= alpha;
      o[j][2 * h + 1] *= alpha;
    }
  }
}

// The key tiles a block of query rows from q0 (`rows` of them) walks, and which of them a
// warp (rows r0..r0 + warp_rows − 1 of the block) masks or skips. Keys past the block's last
// query position are hidden from all its rows, as are those before its first query's window.
struct FmKeyRange {
  int begin, end;       // the block's tiles: [begin, end), begin a multiple of the tile
  int warp_first_pos;   // the warp's first query position
  int warp_first_key;   // the first key that query sees
  int warp_last;        // the warp's last query position (the last key it sees)
  int warp_last_first;  // the first key the warp's last query sees
  int kv_len;
  bool segmented;       // packed rows: every tile takes the mask
  __device__ FmKeyRange(int q0, int rows, int r0, int warp_rows, int shift, int kv_len,
                        int window, bool segmented)
      : begin(fa_key_begin(q0 + shift, window)),
        end(min(kv_len, q0 + rows + shift)),
        warp_first_pos(q0 + r0 + shift),
        warp_first_key(warp_first_pos - window + 1),
        warp_last(q0 + r0 + warp_rows - 1 + shift),
        warp_last_first(warp_last - window + 1),
        kv_len(kv_len),
        segmented(segmented) {}
  // Whether the tile from k0 needs the mask for some row of the warp: it reaches past the
  // warp's first query position (the diagonal), past the last key, or before the window of
  // the warp's last query, or the rows are packed.
  __device__ bool masked(int k0) const {
    return segmented || k0 + FA_TILE - 1 > warp_first_pos || k0 + FA_TILE > kv_len ||
           k0 < warp_last_first;
  }
};

// Runs `tile(ks, vs, k0)` on the key/value tiles k0 = key_begin, key_begin + 64, .. below
// key_end of the block's kv head, which two buffers (a key tile, then its value tile) hold in
// turns: the next tile's copy is in flight while the current one is worked on. The caller has
// started and committed the copy of the first tile into `first`. A warp skips the tiles that
// lie wholly past its last query position (`warp_last`) or before the first key its first
// query sees (`warp_first_key`).
template <typename T, int D, typename F>
__device__ __forceinline__ void fm_key_tiles(T* first, T* second, const FaQueryBlock<T>& at,
                                             long long k_sp, long long v_sp, int kv_len,
                                             int key_begin, int key_end, int warp_first_key,
                                             int warp_last, F tile) {
  constexpr int LD = fm_stride<D>();
  for (int k0 = key_begin, it = 0; k0 < key_end; k0 += FA_TILE, ++it) {
    const T* ks = it & 1 ? second : first;
    fm_wait<0>();
    __syncthreads();  // this tile has landed; every warp is done with the other buffer
    if (k0 + FA_TILE < key_end) {
      T* next = it & 1 ? first : second;
      fm_load_tile<T, D>(next, at.keys, k_sp, k0 + FA_TILE, kv_len);
      fm_load_tile<T, D>(next + FA_TILE * LD, at.values, v_sp, k0 + FA_TILE, kv_len);
      fm_commit();
    }
    if (k0 <= warp_last && k0 + FA_TILE > warp_first_key) tile(ks, ks + FA_TILE * LD, k0);
  }
}

// Forward: one block per (64·MT queries, batch × head), outputs as flash_attention_fwd.
// Shared memory: the query tile, then two key/value buffers.
template <typename T, int D, int MT>
__device__ void flash_mma_fwd(const T* q, const T* k, const T* v, T* out, float* lse, FA_SHAPE,
                              FA_SCORING, Q_LAYOUT) {
  constexpr int LD = fm_stride<D>(), ROWS = fm_query_rows<MT>();
  using S = FmShared<T, D>;
  T* qs = S::tile(0);
  const FaQueryBlock<T> at(k, v, heads, group, k_sb, k_sh, v_sb, v_sh, ROWS);
  const int bh = at.bh, q0 = at.q0, shift = kv_len - q_len;
  const FmLane lane(16 * MT);
  const long long head = fm_head_start(bh, heads, q_sb, q_sh);
  fm_load_tile<T, D, ROWS>(qs, q + head, q_sp, q0, q_len);
  const FmKeyRange keys(q0, ROWS, lane.r0, 16 * MT, shift, kv_len, window, starts != nullptr);
  // Buffer b holds keys at unit MT + 2b and values at MT + 2b + 1.
  fm_load_tile<T, D>(S::tile(MT), at.keys, k_sp, keys.begin, kv_len);
  fm_load_tile<T, D>(S::tile(MT + 1), at.values, v_sp, keys.begin, kv_len);
  fm_commit();
  float o[MT][D / 8][4] = {};
  float m[MT][2], l[MT][2] = {};
#pragma unroll
  for (int i = 0; i < MT; ++i) m[i][0] = m[i][1] = -INFINITY;
  int first[MT][2];
  fm_row_segment_starts(first, starts, bh / heads, q_len, q0 + lane.r0 + lane.g);
  fm_key_tiles<T, D>(S::tile(MT), S::tile(MT + 2), at, k_sp, v_sp, kv_len, keys.begin, keys.end,
                     keys.warp_first_key, keys.warp_last, [&](const T* ks, const T* vs, int k0) {
      float s[MT][8][4] = {};
      fm_dot_tile<T, LD, D, MT>(s, qs, lane.r0, ks);
      uint32_t p[MT][4][4];
#pragma unroll
      for (int i = 0; i < MT; ++i) {
        const int pos = q0 + lane.r0 + 16 * i + lane.g + shift, key = k0 + 2 * lane.t;
        fm_variant(keys.masked(k0), cap_log2 > 0.f, [&](auto mask, auto cap) {
          fm_online_softmax<decltype(mask)::value, decltype(cap)::value, D>(
              s[i], m[i], l[i], o[i], pos, key, first[i], kv_len, FA_SCORING_ARGS);
        });
        fm_to_operand<T>(p[i], s[i]);
      }
      fm_weighted_rows<T, LD, D / 8, MT>(o, p, vs);
  });
#pragma unroll
  for (int i = 0; i < MT; ++i)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const float total = warp_sum<4>(l[i][h]), inv = 1.f / total;
      const int row = q0 + lane.r0 + 16 * i + lane.g + 8 * h;
      if (lane.t == 0 && row < q_len) lse[(size_t)bh * q_len + row] = m[i][h] + log2f(total);
#pragma unroll
      for (int j = 0; j < D / 8; ++j) {
        o[i][j][2 * h] *= inv;
        o[i][j][2 * h + 1] *= inv;
      }
    }
  fm_store_rows<T, D, MT>(out + head, q_sp, o, q0 + lane.r0, q_len, 1.f);
}

// The gradient of a score's logit, p (dp − delta), as that of the raw score: times the cap's
// slope where the scores are capped (`x` the capped score).
template <bool CAP>
__device__ __forceinline__ float fm_score_grad(float p, float dp, float delta, float x,
                                               float scale_log2, float cap_log2) {
  const float ds = p * (dp - delta);
  return CAP ? ds * fa_cap_slope(x, scale_log2, cap_log2) : ds;
}

// The score gradients of a warp's 16 query rows (positions pos, pos + 8, with their
// log-sum-exp and delta) against 64 keys (columns key + 8j (+ 1)), from the raw scores `s`;
// `ds` holds dp on entry. Rows past q_len are zeros on both sides and get 0.
template <bool MASK, bool CAP>
__device__ __forceinline__ void fm_query_score_grads(const float (&s)[8][4], float (&ds)[8][4],
                                                     const float (&lse)[2],
                                                     const float (&delta)[2], int pos, int key,
                                                     const int (&first)[2], int kv_len,
                                                     FA_SCORING) {
#pragma unroll
  for (int j = 0; j < 8; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int h = e >> 1, col = key + 8 * j + (e & 1);
      const float x = CAP ? fa_capped(s[j][e], scale_log2, cap_log2) : s[j][e];
      float p = fm_exp2(fmaf(x, scale_log2, -lse[h]));
      if (MASK) p = fa_sees(pos + 8 * h, col, window) && col >= first[h] && col < kv_len ? p : 0.f;
      ds[j][e] = fm_score_grad<CAP>(p, ds[j][e], delta[h], x, scale_log2, cap_log2);
    }
}

// The same for a warp's 16 key rows (key, key + 8) against 8NC queries of a tile from q0 (the
// thread's columns col + 8j (+ 1) of the tile, whose log-sum-exp, delta and segment start are
// in `stats` as fm_load_row_stats puts them): `p` goes from raw scores to the probabilities,
// `ds` from dp to the score gradients.
template <bool MASK, bool CAP, int NC>
__device__ __forceinline__ void fm_key_score_grads(float (&p)[NC][4], float (&ds)[NC][4],
                                                   const float* stats, int key, int q0, int col,
                                                   int q_len, int kv_len, int shift, FA_SCORING) {
  const float *lse_s = stats, *delta_s = stats + FA_TILE;
  const unsigned int* first_s = reinterpret_cast<const unsigned int*>(stats + 2 * FA_TILE);
#pragma unroll
  for (int j = 0; j < NC; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int c = col + 8 * j + (e & 1), query = q0 + c, row_key = key + 8 * (e >> 1);
      const float x = CAP ? fa_capped(p[j][e], scale_log2, cap_log2) : p[j][e];
      float pr = fm_exp2(fmaf(x, scale_log2, -lse_s[c]));
      if (MASK)
        pr = query < q_len && row_key < kv_len && fa_sees(query + shift, row_key, window) &&
                     row_key >= (int)first_s[c]
                 ? pr
                 : 0.f;
      p[j][e] = pr;
      ds[j][e] = fm_score_grad<CAP>(pr, ds[j][e], delta_s[c], x, scale_log2, cap_log2);
    }
}

// Query gradients, and each row's delta = Σ dout · out for the key/value gradients: one block
// per (64·MT queries, batch × head), heaviest first. Shared memory: q and dout tiles, two
// key/value buffers (the first holding the output tile until the deltas are taken), then the
// block's deltas.
template <typename T, int D, int MT>
__device__ void flash_mma_bwd_q(const T* q, const T* k, const T* v, const T* dout,
                                const float* lse, const T* out, float* delta, T* dq, FA_SHAPE,
                                FA_SCORING, float scale, Q_LAYOUT) {
  constexpr int LD = fm_stride<D>(), ROWS = fm_query_rows<MT>();
  using S = FmShared<T, D>;
  T *qs = S::tile(0), *dos = S::tile(MT), *kv0 = S::tile(2 * MT), *kv1 = S::tile(2 * MT + 2);
  float* delta_s = S::floats(2 * MT + 4);
  const FaQueryBlock<T> at(k, v, heads, group, k_sb, k_sh, v_sb, v_sh, ROWS);
  const int bh = at.bh, q0 = at.q0, shift = kv_len - q_len;
  const FmLane lane(16 * MT);
  const size_t rows0 = (size_t)bh * q_len;
  const long long head = fm_head_start(bh, heads, q_sb, q_sh);
  fm_load_tile<T, D, ROWS>(qs, q + head, q_sp, q0, q_len);
  fm_load_tile<T, D, ROWS>(dos, dout + head, q_sp, q0, q_len);
  fm_load_tile<T, D, ROWS>(kv1, out + head, q_sp, q0, q_len);
  fm_commit();
  const FmKeyRange keys(q0, ROWS, lane.r0, 16 * MT, shift, kv_len, window, starts != nullptr);
  fm_load_tile<T, D>(kv0, at.keys, k_sp, keys.begin, kv_len);
  fm_load_tile<T, D>(kv0 + FA_TILE * LD, at.values, v_sp, keys.begin, kv_len);
  fm_commit();
  fm_wait<1>();
  __syncthreads();
  // Two threads a row, 16 bytes at a time, the pair's two taking alternate 32 columns: the
  // eight threads of a quarter-warp (one 16-byte load's phase) read four rows, whose 16-byte
  // chunks lie D / 8 + 1 ≡ 1 (mod 8) apart, at chunks 4 apart, so they hit eight distinct
  // groups of four banks.
  for (int r = threadIdx.x / 2; r < ROWS; r += FM_THREADS / 2) {
    float sum = 0.f;
#pragma unroll
    for (int c = 32 * (threadIdx.x & 1); c < D; c += 64)
#pragma unroll
      for (int k = c; k < c + 32; k += 8) sum += fm_dot8(dos + r * LD + k, kv1 + r * LD + k);
    sum += __shfl_xor_sync(0xffffffff, sum, 1);
    if ((threadIdx.x & 1) == 0) {
      delta_s[r] = sum;
      if (q0 + r < q_len) delta[rows0 + q0 + r] = sum;
    }
  }
  __syncthreads();  // the deltas are in place and the output tile's buffer is free
  float row_lse[MT][2], row_delta[MT][2];
#pragma unroll
  for (int i = 0; i < MT; ++i)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int r = lane.r0 + 16 * i + lane.g + 8 * h;
      row_lse[i][h] = q0 + r < q_len ? lse[rows0 + q0 + r] : 0.f;
      row_delta[i][h] = delta_s[r];
    }
  int first[MT][2];
  fm_row_segment_starts(first, starts, bh / heads, q_len, q0 + lane.r0 + lane.g);
  float dq_acc[MT][D / 8][4] = {};
  fm_key_tiles<T, D>(kv0, kv1, at, k_sp, v_sp, kv_len, keys.begin, keys.end, keys.warp_first_key,
                     keys.warp_last, [&](const T* ks, const T* vs, int k0) {
      float s[MT][8][4] = {}, ds[MT][8][4] = {};
      fm_dot_tile<T, LD, D, MT>(s, qs, lane.r0, ks);
      fm_dot_tile<T, LD, D, MT>(ds, dos, lane.r0, vs);
      uint32_t w[MT][4][4];
#pragma unroll
      for (int i = 0; i < MT; ++i) {
        const int pos = q0 + lane.r0 + 16 * i + lane.g + shift, key = k0 + 2 * lane.t;
        fm_variant(keys.masked(k0), cap_log2 > 0.f, [&](auto mask, auto cap) {
          fm_query_score_grads<decltype(mask)::value, decltype(cap)::value>(
              s[i], ds[i], row_lse[i], row_delta[i], pos, key, first[i], kv_len, FA_SCORING_ARGS);
        });
        fm_to_operand<T>(w[i], ds[i]);
      }
      fm_weighted_rows<T, LD, D / 8, MT>(dq_acc, w, ks);
  });
  fm_store_rows<T, D, MT>(dq + head, q_sp, dq_acc, q0 + lane.r0, q_len, scale);
}

// Key and value gradients: one block per (64 keys, batch × kv head), walking the query tiles
// of 64 at or after the diagonal (and before the window's end) of each query head in its group; dk and dv as in
// flash_attention_bwd_kv. A warp's rows are keys and its columns queries (the transposed
// scores). Shared memory: k, v tiles, two query buffers (q, dout), then two buffers of the
// query tile's per-row values (fm_load_row_stats), copied with the tiles: no global load is
// left in the tile loop.
template <typename T, int D>
__device__ void flash_mma_bwd_kv(FA_BWD_INPUTS(T), T* dk, T* dv, FA_SHAPE, FA_SCORING,
                                 float scale, Q_LAYOUT, G_LAYOUT) {
  constexpr int LD = fm_stride<D>();
  using S = FmShared<T, D>;
  const T *ks = S::tile(0), *vs = S::tile(1);
  const int2 work = fa_block_work();  // the first key tile sees the most queries
  const int kv_heads = heads / group, bkv = work.y, b = bkv / kv_heads;
  const int kv_head = bkv % kv_heads, k0 = work.x * FA_TILE, shift = kv_len - q_len;
  const FmLane lane(16);
  fm_load_tile<T, D>(S::tile(0), k + b * k_sb + kv_head * k_sh, k_sp, k0, kv_len);
  fm_load_tile<T, D>(S::tile(1), v + b * v_sb + kv_head * v_sh, v_sp, k0, kv_len);
  // The first query that sees key k0 is k0 - shift; start at its tile, and end with the tile
  // of the last query whose window holds key k0 + 63. Tile `it` is query tile it % tiles of
  // query head it / tiles of the group: `loading` holds that pair (head, tile) for the copy in
  // flight and `working` for the products, each stepped a tile at a time (no division a tile).
  const int q_begin = max(0, k0 - shift) / FA_TILE * FA_TILE;
  const int q_end = fa_query_end(k0, window, shift, q_len);
  const int tiles = max(0, (q_end - q_begin + FA_TILE - 1) / FA_TILE), total = group * tiles;
  int2 loading = make_int2(0, 0), working = make_int2(0, 0);
  auto step = [tiles](int2& at) {
    if (++at.y == tiles) {
      at.y = 0;
      ++at.x;
    }
  };
  // Buffer b: q at unit 2 + 2b, dout at 3 + 2b, the per-row values at vectors 3b..3b + 2.
  auto stats = [](int buffer) { return S::floats(6) + 3 * buffer * FA_TILE; };
  const unsigned int* row_starts = starts != nullptr ? starts + (size_t)b * q_len : nullptr;
  auto load = [&](int buffer) {
    const int query_head = kv_head * group + loading.x, q0 = q_begin + loading.y * FA_TILE;
    step(loading);
    const size_t bh = (size_t)b * heads + query_head;
    const long long head = b * q_sb + query_head * q_sh;  // fm_head_start without its division
    fm_load_tile<T, D>(S::tile(2 + 2 * buffer), q + head, q_sp, q0, q_len);
    fm_load_tile<T, D>(S::tile(3 + 2 * buffer), dout + head, q_sp, q0, q_len);
    fm_load_row_stats(stats(buffer), lse + bh * q_len, delta + bh * q_len, row_starts, q0,
                      q_len);
  };
  if (total > 0) load(0);
  fm_commit();
  float dk_acc[1][D / 8][4] = {}, dv_acc[1][D / 8][4] = {};
  // The warp's keys are warp_key..warp_key + 15 (whole-warp decisions, as mma.sync needs every
  // lane); this thread's rows are keys `key` and key + 8.
  const int warp_key = k0 + lane.r0, key = warp_key + lane.g;
  for (int it = 0; it < total; ++it) {
    const int buffer = it & 1, q0 = q_begin + working.y * FA_TILE;
    step(working);
    const T *qs = S::tile(2 + 2 * buffer), *dos = S::tile(3 + 2 * buffer);
    const float* row_stats = stats(buffer);
    fm_wait<0>();
    __syncthreads();  // this tile has landed; every warp is done with the other buffer
    if (it + 1 < total) {
      load(buffer ^ 1);
      fm_commit();
    }
    // Skip the tile when the warp's first key is past every query, or its last key is out of
    // every query's window.
    if (warp_key > q0 + FA_TILE - 1 + shift || q0 + shift - (warp_key + 15) >= window) continue;
    // Only tiles where a key of the warp's reaches past the first query's position, that run
    // past the last key or query, or whose last query's window misses the warp's first key
    // need the mask.
    const bool masked = starts != nullptr || warp_key + 15 > q0 + shift ||
                        warp_key + 16 > kv_len || q0 + FA_TILE > q_len ||
                        q0 + FA_TILE - 1 + shift - warp_key >= window;
    // The tile's queries in two halves of 32: half the probabilities and score gradients are
    // live at a time (a whole tile's took the registers past what three blocks an SM leave,
    // and spilled).
#pragma unroll 1
    for (int c0 = 0; c0 < FA_TILE; c0 += FA_TILE / 2) {
      const T *q_half = qs + c0 * LD, *dout_half = dos + c0 * LD;
      float p[1][4][4] = {}, ds[1][4][4] = {};
      fm_dot_tile<T, LD, D, 1, 4>(p, ks, lane.r0, q_half);
      fm_dot_tile<T, LD, D, 1, 4>(ds, vs, lane.r0, dout_half);
      const int col = c0 + 2 * lane.t;
      fm_variant(masked, cap_log2 > 0.f, [&](auto mask, auto cap) {
        fm_key_score_grads<decltype(mask)::value, decltype(cap)::value, 4>(
            p[0], ds[0], row_stats, key, q0, col, q_len, kv_len, shift, FA_SCORING_ARGS);
      });
      uint32_t w[1][2][4];
      fm_to_operand<T, 2>(w[0], p[0]);
      fm_weighted_rows<T, LD, D / 8, 1, 2>(dv_acc, w, dout_half);
      fm_to_operand<T, 2>(w[0], ds[0]);
      fm_weighted_rows<T, LD, D / 8, 1, 2>(dk_acc, w, q_half);
    }
  }
  const long long grads = b * g_sb + kv_head * g_sh;
  fm_store_rows<T, D, 1>(dk + grads, g_sp, dk_acc, k0 + lane.r0, kv_len, scale);
  fm_store_rows<T, D, 1>(dv + grads, g_sp, dv_acc, k0 + lane.r0, kv_len, 1.f);
}

// Blocks per SM the register allocation must allow (ncu on an H200, base preset: at head size
// 64, 4 and 3 were 6% and 10% faster than the 2 that 220+ unconstrained registers allow; two row
// tiles per warp, which halve the shared-memory reads per product but need those registers,
// were no faster than one). At head size 128 the accumulators need the registers.
#define FM_FWD_BLOCKS(D) ((D) <= 64 ? 4 : 1)
#define FM_BWD_BLOCKS(D) ((D) <= 64 ? 3 : 1)

#define FLASH_MMA_ENTRY_POINTS_D(S, T, D)                                                       \
  extern "C" __global__ void __launch_bounds__(FM_THREADS, FM_FWD_BLOCKS(D))                   \
      flash_mma_fwd_d##D##_##S(const T* q, const T* k, const T* v, T* out, float* lse,          \
                               FA_SHAPE, FA_SCORING, Q_LAYOUT) {                               \
    flash_mma_fwd<T, D, 1>(q, k, v, out, lse, FA_SHAPE_ARGS, FA_SCORING_ARGS, q_sb, q_sh,      \
                           q_sp);                                                              \
  }                                                                                            \
  extern "C" __global__ void __launch_bounds__(FM_THREADS, FM_BWD_BLOCKS(D))                   \
      flash_mma_bwd_q_d##D##_##S(const T* q, const T* k, const T* v, const T* dout,            \
                                 const float* lse, const T* out, float* delta, T* dq,          \
                                 FA_SHAPE, FA_SCORING, float scale, Q_LAYOUT) {                \
    flash_mma_bwd_q<T, D, 1>(q, k, v, dout, lse, out, delta, dq, FA_SHAPE_ARGS,                \
                             FA_SCORING_ARGS, scale, q_sb, q_sh, q_sp);                        \
  }                                                                                            \
  extern "C" __global__ void __launch_bounds__(FM_THREADS, FM_BWD_BLOCKS(D))                   \
      flash_mma_bwd_kv_d##D##_##S(FA_BWD_INPUTS(T), T* dk, T* dv, FA_SHAPE, FA_SCORING,        \
                                  float scale, Q_LAYOUT, G_LAYOUT) {                           \
    flash_mma_bwd_kv<T, D>(FA_BWD_INPUT_ARGS, dk, dv, FA_SHAPE_ARGS, FA_SCORING_ARGS, scale,   \
                           q_sb, q_sh, q_sp, g_sb, g_sh, g_sp);                                \
  }

#define FLASH_MMA_ENTRY_POINTS(S, T) \
  FLASH_MMA_ENTRY_POINTS_D(S, T, 64) \
  FLASH_MMA_ENTRY_POINTS_D(S, T, 128)
