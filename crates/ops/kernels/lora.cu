// LoRA's products with a dropped input, each part's dropout mask drawn where the kernel reads
// or writes the masked values (dropout_bits in elementwise.cu, the same bits as
// src/dropout.rs), for up to LORA_PARTS parts stacked along the ranks:
//
//   bottleneck   xa[row, off_p + j] += scale · Σ_k mask_p(row, k) · x[row, k] · a[off_p + j, k]
//   factor grad  da[off_p + j, col] += scale · Σ_row g[row, off_p + j] · mask_p(row, col) · x[row, col]
//   input grad   out = base + scale · Σ_p mask_p ⊙ (g[:, part p] @ a[part p, :])
//
// for the input x [rows, cols], the stacked factors a [R, cols], the bottleneck's gradient g
// [rows, R] (R = Σ r_p ≤ 64) and the frozen product's gradient base [rows, cols]. All run on
// the tensor cores (mma.sync, 16-bit operands, f32 sums) in blocks of 4 warps (FM_THREADS),
// tiles staged in shared memory by cp.async. The first two sum over an activation-sized
// dimension: a block sums a slice of it (blockIdx.y) and adds its sums atomically into f32
// outputs the launcher zeroed. Ranks are multiples of 8 and cols a multiple of 64 (the
// launchers' checks), so each 8-wide tile of ranks is one part's, each 64-wide tile of columns
// whole, and the columns 2t, 2t + 1, 2t + 8, 2t + 9 of a 16-wide step that a thread holds in a
// fragment take one draw's four quarters (dropout_draw).

constexpr int LORA_LD = fm_stride<64>();

// The parts of one launch: how many, each one's seed and rank (unused ones 0), the threshold
// their 16-bit draws are kept at or above, and the scale of the sums.
struct LoraParts {
  int count;
  unsigned long long seeds[LORA_PARTS];
  int ranks[LORA_PARTS];
  unsigned long long threshold;
  float scale;

  // The parts' first 8-rank tiles (start[count] and past: the summed rank's tiles), and the
  // summed rank.
  __device__ __forceinline__ int tile_starts(int (&start)[LORA_PARTS + 1]) const {
    start[0] = 0;
#pragma unroll
    for (int p = 0; p < LORA_PARTS; ++p) start[p + 1] = start[p] + (p < count ? ranks[p] / 8 : 0);
    return 8 * start[LORA_PARTS];
  }

  // Part p's draw `draw`.
  __device__ __forceinline__ unsigned long long bits(int p, size_t draw) const {
    return dropout_bits(seeds[p], draw);
  }

  // Whether the element whose bits are 16-bit quarter q of `bits` is kept.
  __device__ __forceinline__ bool kept(unsigned long long bits, int q) const {
    return dropout_quarter_kept(bits, q, threshold);
  }

  // Bits of `value`'s two 16-bit halves kept by quarters q (low) and q + 1 (high) of `bits`.
  __device__ __forceinline__ uint32_t kept_pair(uint32_t value, unsigned long long bits,
                                                int q) const {
    return value & ((kept(bits, q) ? 0x0000ffffu : 0u) | (kept(bits, q + 1) ? 0xffff0000u : 0u));
  }
};

// Runs body(buf, start) for the 64-wide steps start = begin, begin + 64, .. below end, each
// step's tiles in buffer buf, copied by load(buf, start) while the step before computes.
template <typename Load, typename Body>
__device__ __forceinline__ void lora_steps(int begin, int end, Load load, Body body) {
  load(0, begin);
  for (int start = begin, buf = 0; start < end; start += 64, buf ^= 1) {
    if (start + 64 < end) {
      load(buf ^ 1, start + 64);
      fm_wait<1>();
    } else {
      fm_wait<0>();
    }
    __syncthreads();
    body(buf, start);
    __syncthreads();
  }
}

template <typename T>
__device__ void masked_lora_bottleneck(const T* x, const T* a, float* out, int rows, int cols,
                                       const LoraParts& parts, int k_per_block) {
  __shared__ __align__(16) T xs[2][64 * LORA_LD];
  __shared__ __align__(16) T as[2][64 * LORA_LD];
  int start[LORA_PARTS + 1];
  const int total_rank = parts.tile_starts(start), tiles = total_rank / 8;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
  const int row0 = blockIdx.x * 64;
  const int k_begin = blockIdx.y * k_per_block, k_end = min(cols, k_begin + k_per_block);
  auto load = [&](int buf, int k0) {
    fm_load_tile<T, 64, 64>(xs[buf], x + k0, cols, row0, rows);
    fm_load_tile<T, 64, 64>(as[buf], a + k0, cols, 0, total_rank);
    fm_commit();
  };
  float acc[8][4] = {};
  lora_steps(k_begin, k_end, load, [&](int buf, int k0) {
#pragma unroll
    for (int kk = 0; kk < 64; kk += 16) {
      uint32_t af[4], bf[4][4];
      fm_frag_a<LORA_LD>(af, xs[buf], warp * 16, kk);
#pragma unroll
      for (int q = 0; q < 4; ++q)
        if (2 * q < tiles) fm_frag_b_rows<LORA_LD>(bf[q], as[buf], 16 * q, kk);
#pragma unroll
      for (int p = 0; p < LORA_PARTS; ++p) {
        if (p == parts.count) break;
        // Registers 0-3 of the A operand: rows g, g + 8, g, g + 8; columns 2t and 2t + 8, so
        // registers h and h + 2 take one draw.
        uint32_t m[4];
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const size_t index = (size_t)(row0 + warp * 16 + g + 8 * h) * cols + k0 + kk + 2 * t;
          const unsigned long long bits = parts.bits(p, dropout_draw(index));
          m[h] = parts.kept_pair(af[h], bits, 0);
          m[h + 2] = parts.kept_pair(af[h + 2], bits, 2);
        }
#pragma unroll
        for (int n = 0; n < 8; ++n)
          if (n >= start[p] && n < start[p + 1])
            Mma<T>::run(acc[n], m, bf[n / 2][2 * (n & 1)], bf[n / 2][2 * (n & 1) + 1]);
      }
    }
  });
#pragma unroll
  for (int n = 0; n < 8; ++n) {
    if (n >= tiles) break;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int row = row0 + warp * 16 + g + 8 * h;
      if (row >= rows) continue;
      float* to = out + (size_t)row * total_rank + 8 * n + 2 * t;
      atomicAdd(to, parts.scale * acc[n][2 * h]);
      atomicAdd(to + 1, parts.scale * acc[n][2 * h + 1]);
    }
  }
}

// The A operand (16 × 16) at rows m0.., columns k0.. of the transpose of a row-major tile
// (the tile's rows are the reduced dimension).
template <int LD, typename T>
__device__ __forceinline__ void lora_frag_a_cols(uint32_t (&a)[4], const T* tile, int m0, int k0) {
  const int lane = threadIdx.x & 31;
  fm_ldmatrix<true>(a, tile + (k0 + (lane >> 4) * 8 + (lane & 7)) * LD + m0 + ((lane >> 3) & 1) * 8);
}

template <typename T>
__device__ void masked_lora_factor_grad(const T* g, const T* x, float* out, int rows, int cols,
                                        const LoraParts& parts, int rows_per_block) {
  __shared__ __align__(16) T xs[2][64 * LORA_LD];
  __shared__ __align__(16) T gs[2][64 * LORA_LD];
  __shared__ __align__(16) T xm[64 * LORA_LD];
  int start[LORA_PARTS + 1];
  const int total_rank = parts.tile_starts(start);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, lg = lane >> 2, t = lane & 3;
  const int col0 = blockIdx.x * 64;
  const int r_begin = blockIdx.y * rows_per_block, r_end = min(rows, r_begin + rows_per_block);
  // Ranks past the last part's are read by its 16-rank tile: zeros, never copied over.
  for (int i = threadIdx.x; i < 64 * LORA_LD; i += FM_THREADS)
    gs[0][i] = gs[1][i] = from_f32<T>(0.f);
  __syncthreads();
  const int chunks = total_rank / 8;  // 16-byte chunks of a row of g
  auto load = [&](int buf, int r0) {
    fm_load_tile<T, 64, 64>(xs[buf], x + col0, cols, r0, r_end);
    for (int i = threadIdx.x; i < 64 * chunks; i += FM_THREADS) {
      const int r = i / chunks, c = i % chunks * 8;
      fm_copy16(gs[buf] + r * LORA_LD + c, g + (size_t)(r0 + r) * total_rank + c, r0 + r < r_end);
    }
    fm_commit();
  };
  float acc[4][2][4] = {};
  lora_steps(r_begin, r_end, load, [&](int buf, int r0) {
#pragma unroll
    for (int p = 0; p < LORA_PARTS; ++p) {
      if (p == parts.count) break;
      // The tile through part p's mask: 16 columns (two 16-byte packs, four draws) a thread
      // and pass; pair j of the first pack takes draw j's quarters 0-1, of the second 2-3.
      for (int i = threadIdx.x; i < 64 * 4; i += FM_THREADS) {
        const int r = i / 4, c = i % 4 * 16;
        uint4* packs = reinterpret_cast<uint4*>(xs[buf] + r * LORA_LD + c);
        uint32_t in[2][4] = {{packs[0].x, packs[0].y, packs[0].z, packs[0].w},
                             {packs[1].x, packs[1].y, packs[1].z, packs[1].w}};
        const size_t draw = dropout_draw((size_t)(r0 + r) * cols + col0 + c);
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const unsigned long long bits = parts.bits(p, draw + j);
          in[0][j] = parts.kept_pair(in[0][j], bits, 0);
          in[1][j] = parts.kept_pair(in[1][j], bits, 2);
        }
        uint4* to = reinterpret_cast<uint4*>(xm + r * LORA_LD + c);
        to[0] = make_uint4(in[0][0], in[0][1], in[0][2], in[0][3]);
        to[1] = make_uint4(in[1][0], in[1][1], in[1][2], in[1][3]);
      }
      __syncthreads();
#pragma unroll
      for (int kk = 0; kk < 64; kk += 16) {
        uint32_t bf[4];
        fm_frag_b_cols<LORA_LD>(bf, xm, kk, warp * 16);
#pragma unroll
        for (int mt = 0; mt < 4; ++mt) {
          // The 16-rank tile mt holds 8-rank tiles 2mt and 2mt + 1; rows of other parts are
          // zeroed (registers 0 and 2 hold rank lg of the tile, 1 and 3 rank lg + 8).
          const bool low = 2 * mt >= start[p] && 2 * mt < start[p + 1];
          const bool high = 2 * mt + 1 >= start[p] && 2 * mt + 1 < start[p + 1];
          if (!low && !high) continue;
          uint32_t af[4];
          lora_frag_a_cols<LORA_LD>(af, gs[buf], 16 * mt, kk);
          if (!low) af[0] = af[2] = 0;
          if (!high) af[1] = af[3] = 0;
          Mma<T>::run(acc[mt][0], af, bf[0], bf[1]);
          Mma<T>::run(acc[mt][1], af, bf[2], bf[3]);
        }
      }
      __syncthreads();
    }
  });
#pragma unroll
  for (int mt = 0; mt < 4; ++mt)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int rank = 16 * mt + lg + 8 * h;
      if (rank >= total_rank) continue;
#pragma unroll
      for (int n = 0; n < 2; ++n) {
        float* to = out + (size_t)rank * cols + col0 + warp * 16 + 8 * n + 2 * t;
        atomicAdd(to, parts.scale * acc[mt][n][2 * h]);
        atomicAdd(to + 1, parts.scale * acc[mt][n][2 * h + 1]);
      }
    }
}

// out = base + scale · Σ_p mask_p ⊙ (g_p @ a_p): a block the 64 × 64 tile of rows row0.. and
// columns col0.., warp w its rows 16w.. (8 column tiles). Each part's product is summed over
// its 16-rank steps (ranks of other parts zeroed in the A operand, as above), masked where the
// accumulator holds it (registers 0-1: row lg, columns 2t and 2t + 1; 2-3: row lg + 8), and
// added to the tile's total, which goes through shared memory so that base is read and out
// written 16 bytes a thread.
template <typename T>
__device__ void masked_lora_input_grad(const T* base, const T* g, const T* a, T* out, int rows,
                                       int cols, const LoraParts& parts) {
  constexpr int TOTAL_LD = 64 + 4;
  __shared__ __align__(16) T gs[64 * LORA_LD];
  __shared__ __align__(16) T as[64 * LORA_LD];
  __shared__ __align__(16) float total_tile[64 * TOTAL_LD];
  int start[LORA_PARTS + 1];
  const int total_rank = parts.tile_starts(start);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, lg = lane >> 2, t = lane & 3;
  const int row0 = blockIdx.y * 64, col0 = blockIdx.x * 64;
  const int chunks = total_rank / 8;  // 16-byte chunks of a row of g
  for (int i = threadIdx.x; i < 64 * chunks; i += FM_THREADS) {
    const int r = i / chunks, c = i % chunks * 8;
    fm_copy16(gs + r * LORA_LD + c, g + (size_t)(row0 + r) * total_rank + c, row0 + r < rows);
  }
  fm_load_tile<T, 64, 64>(as, a + col0, cols, 0, total_rank);
  fm_commit();
  fm_wait<0>();
  __syncthreads();
  float total[8][4] = {};
#pragma unroll
  for (int p = 0; p < LORA_PARTS; ++p) {
    if (p == parts.count) break;
    float acc[8][4] = {};
#pragma unroll
    for (int k0 = 0; k0 < 64; k0 += 16) {
      // The 16-rank step k0 holds 8-rank tiles k0 / 8 and k0 / 8 + 1 (registers 0-1 and 2-3
      // of the A operand hold ranks 2t.. and 2t + 8.., of the first and the second).
      const bool low = k0 / 8 >= start[p] && k0 / 8 < start[p + 1];
      const bool high = k0 / 8 + 1 >= start[p] && k0 / 8 + 1 < start[p + 1];
      if (!low && !high) continue;
      uint32_t af[4];
      fm_frag_a<LORA_LD>(af, gs, warp * 16, k0);
      if (!low) af[0] = af[1] = 0;
      if (!high) af[2] = af[3] = 0;
#pragma unroll
      for (int n = 0; n < 8; n += 2) {
        uint32_t bf[4];
        fm_frag_b_cols<LORA_LD>(bf, as, k0, 8 * n);
        Mma<T>::run(acc[n], af, bf[0], bf[1]);
        Mma<T>::run(acc[n + 1], af, bf[2], bf[3]);
      }
    }
    // Column tiles n and n + 1 (n even) hold columns 2t.. and 2t + 8.. of a 16-wide run: one
    // draw for the four a row.
#pragma unroll
    for (int n = 0; n < 8; n += 2)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const size_t index = (size_t)(row0 + warp * 16 + lg + 8 * h) * cols + col0 + 8 * n + 2 * t;
        const unsigned long long bits = parts.bits(p, dropout_draw(index));
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          if (parts.kept(bits, e)) total[n][2 * h + e] += acc[n][2 * h + e];
          if (parts.kept(bits, 2 + e))
            total[n + 1][2 * h + e] += acc[n + 1][2 * h + e];
        }
      }
  }
#pragma unroll
  for (int n = 0; n < 8; ++n)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      float* to = total_tile + (warp * 16 + lg + 8 * h) * TOTAL_LD + 8 * n + 2 * t;
      to[0] = total[n][2 * h];
      to[1] = total[n][2 * h + 1];
    }
  __syncthreads();
  using P = Pack<T, WIDE<T>>;
  for (int i = threadIdx.x; i < 64 * 64 / WIDE<T>; i += FM_THREADS) {
    const int r = i / (64 / WIDE<T>), c = i % (64 / WIDE<T>) * WIDE<T>;
    if (row0 + r >= rows) continue;
    const size_t first = (size_t)(row0 + r) * cols + col0 + c;
    const P b = P::load(base + first);
    P y;
#pragma unroll
    for (int k = 0; k < WIDE<T>; ++k)
      y.e[k] = from_f32<T>(to_f32(b.e[k]) + parts.scale * total_tile[r * TOTAL_LD + c + k]);
    y.store(out + first);
  }
}

// The parts as separate arguments (unused ones' seeds and ranks 0), and as the struct the
// kernels take.
#define LORA_PART_PARAMS                                                                      \
  int count, unsigned long long seed0, unsigned long long seed1, unsigned long long seed2,    \
      unsigned long long seed3, int rank0, int rank1, int rank2, int rank3,                   \
      unsigned long long threshold, float scale
#define LORA_PARTS_STRUCT                                                                     \
  const LoraParts parts {                                                                     \
    count, {seed0, seed1, seed2, seed3}, {rank0, rank1, rank2, rank3}, threshold, scale       \
  }

#define LORA_ENTRY_POINTS(S, T)                                                                \
  extern "C" __global__ void __launch_bounds__(FM_THREADS) masked_lora_bottleneck_##S(        \
      const T* x, const T* a, float* out, int rows, int cols, LORA_PART_PARAMS,                \
      int k_per_block) {                                                                      \
    LORA_PARTS_STRUCT;                                                                        \
    masked_lora_bottleneck<T>(x, a, out, rows, cols, parts, k_per_block);                     \
  }                                                                                           \
  extern "C" __global__ void __launch_bounds__(FM_THREADS) masked_lora_factor_grad_##S(       \
      const T* g, const T* x, float* out, int rows, int cols, LORA_PART_PARAMS,                \
      int rows_per_block) {                                                                   \
    LORA_PARTS_STRUCT;                                                                        \
    masked_lora_factor_grad<T>(g, x, out, rows, cols, parts, rows_per_block);                 \
  }                                                                                           \
  extern "C" __global__ void __launch_bounds__(FM_THREADS) masked_lora_input_grad_##S(        \
      const T* base, const T* g, const T* a, T* out, int rows, int cols, LORA_PART_PARAMS) {   \
    LORA_PARTS_STRUCT;                                                                        \
    masked_lora_input_grad<T>(base, g, a, out, rows, cols, parts);                            \
  }

LORA_ENTRY_POINTS(bf16, __nv_bfloat16)
LORA_ENTRY_POINTS(f16, __half)
