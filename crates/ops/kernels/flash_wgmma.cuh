// Flash attention on Hopper's warpgroup instructions (wgmma), bf16, included by attention.cu
// after flash_mma.cuh, whose grid, parameter lists, masks, online softmax, score gradients and
// output stores it shares: the kernels compute what flash_mma's do (the forward's outputs and
// log-sum-exps and the key/value gradients bit for bit, the query gradients to rounding: the
// deltas are summed in another order), faster on Hopper (bench/flash_wgmma.cu). Compiled only
// for sm_90a (build.rs compiles compute capability 9.0 that way); src/attention/flash.rs
// launches them on such GPUs for heads of 64 (all three kernels) and 128 (the forward).
//
// A block is WG warpgroups of 128 threads (one measured fastest), each owning 64 rows (queries,
// or keys in the key/value gradients) and walking tiles of 64 that cp.async double-buffers in
// shared memory as the tensor cores read them: rows of 64 elements (128 bytes) with the
// 128-byte swizzle (16-byte chunk c of row r at chunk c ^ (r mod 8)), a head of 128 as two such
// column blocks. Score-shaped products are one warpgroup product of two shared tiles
// (m64n64k16, both K-major); probabilities and score gradients go from the accumulators, whose
// layout per warp is mma.sync's, into the A operand (registers) of the weighted sums, whose B
// is a tile read transposed (MN-major). No producer warp, no bulk tensor copies, no overlap of
// a warpgroup's softmax with its products yet.

#pragma once

using wg_bf16 = __nv_bfloat16;

// The kernels' code exists for sm_90a (and for the host pass, which declares the entry points);
// other GPUs' code gets entry points that trap, which the launcher never picks.
#if !defined(__CUDA_ARCH__) || defined(__CUDA_ARCH_FEAT_SM90_ALL)


// The accumulator rows j..j+7 of d as read-write asm operands (four registers a row).
#define WG_ACC_ROW(d, j) "+f"(d[j][0]), "+f"(d[j][1]), "+f"(d[j][2]), "+f"(d[j][3])
#define WG_ACC_ROWS8(d, j)                                                                     \
  WG_ACC_ROW(d, j), WG_ACC_ROW(d, j + 1), WG_ACC_ROW(d, j + 2), WG_ACC_ROW(d, j + 3),          \
      WG_ACC_ROW(d, j + 4), WG_ACC_ROW(d, j + 5), WG_ACC_ROW(d, j + 6), WG_ACC_ROW(d, j + 7)

// d (64 × 64, f32) = (accumulate ? d : 0) + A · B, A and B from shared memory, both K-major.
__device__ __forceinline__ void wgmma_ss_n64(float (&d)[8][4], uint64_t a, uint64_t b,
                                             int accumulate) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {"
      "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
      "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31"
      "}, %32, %33, p, 1, 1, 0, 0;\n}\n"
      : WG_ACC_ROWS8(d, 0)
      : "l"(a), "l"(b), "r"(accumulate));
}
// d (64 × 64, f32) += A · B, A (64 × 16) from registers, B from shared memory, MN-major.
__device__ __forceinline__ void wgmma_rs_n64(float (&d)[8][4], const uint32_t (&a)[4],
                                             uint64_t b) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {"
      "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
      "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31"
      "}, {%32, %33, %34, %35}, %36, p, 1, 1, 1;\n}\n"
      : WG_ACC_ROWS8(d, 0)
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(1));
}
// d (64 × 128, f32) += A · B, A (64 × 16) from registers, B from shared memory, MN-major.
__device__ __forceinline__ void wgmma_rs_n128(float (&d)[16][4], const uint32_t (&a)[4],
                                              uint64_t b) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {"
      "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
      "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "
      "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "
      "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63"
      "}, {%64, %65, %66, %67}, %68, p, 1, 1, 1;\n}\n"
      : WG_ACC_ROWS8(d, 0),
        WG_ACC_ROWS8(d, 8)
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(1));
}

// A warpgroup's products: fence (before the first, after its registers were written),
// commit (the products issued so far become a group) and wait (until at most N groups run).
__device__ __forceinline__ void wg_fence() {
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
}
__device__ __forceinline__ void wg_commit() {
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
}
template <int N> __device__ __forceinline__ void wg_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
// Keeps the compiler from moving accesses of accumulator registers across wgmma instructions.
template <int J> __device__ __forceinline__ void wg_hold(float (&d)[J][4]) {
#pragma unroll
  for (int j = 0; j < J; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) asm volatile("" : "+f"(d[j][e])::"memory");
}
// Runs the warpgroup products that `issue` enqueues to completion, the accumulators `acc` they
// write held in place across them.
template <typename F, typename... Acc>
__device__ __forceinline__ void wg_complete(F issue, Acc&... acc) {
  (wg_hold(acc), ...);
  wg_fence();
  issue();
  wg_commit();
  wg_wait<0>();
  (wg_hold(acc), ...);
}
// Shared memory written through the generic proxy (cp.async) and read next by the tensor cores.
__device__ __forceinline__ void async_proxy_fence() {
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}

// A shared-memory matrix descriptor with the 128-byte swizzle: the operand's start, the byte
// offsets between its core matrices along the leading and the strided dimension.
__device__ __forceinline__ uint64_t wg_desc(uint32_t address, uint32_t lbo, uint32_t sbo) {
  return (uint64_t)((address & 0x3FFFF) >> 4) | (uint64_t)((lbo >> 4) & 0x3FFF) << 16 |
         (uint64_t)((sbo >> 4) & 0x3FFF) << 32 | (uint64_t)1 << 62;
}
// An operand whose rows are the product's M or N dimension (K-major): groups of 8 rows 1,024
// bytes apart (the leading offset is unused with the swizzle).
__device__ __forceinline__ uint64_t wg_k_major(uint32_t address) {
  return wg_desc(address, 16, 1024);
}
// An operand of a [64][D] tile whose rows are the reduced dimension (MN-major): groups of 8
// rows 1,024 bytes apart, column blocks of 64 a tile (64 rows of 128 bytes) apart.
__device__ __forceinline__ uint64_t wg_mn_major(uint32_t address) {
  return wg_desc(address, FA_TILE * 128, 1024);
}

// Byte offset of element (r, c) in an [R][D] tile stored as D / 64 column blocks of [R][64]
// with the 128-byte swizzle.
template <int R> __device__ __forceinline__ uint32_t wg_swizzled(int r, int c) {
  return (c >> 6) * R * 128 + r * 128 + ((((c >> 3) & 7) ^ (r & 7)) << 4) + (c & 7) * 2;
}

// Starts copying rows row0..row0+R-1 of an [n, D] matrix into the swizzled tile `dst`; rows at
// or beyond n become zeros.
template <int D, int R, int THREADS>
__device__ __forceinline__ void wg_load_tile(uint8_t* dst, const wg_bf16* src,
                                             long long stride, int row0, int n) {
  constexpr int CHUNKS = D / 8, STEP = THREADS / CHUNKS;
  static_assert(THREADS % CHUNKS == 0, "whole rows a pass");
  const int r = threadIdx.x / CHUNKS, c = threadIdx.x % CHUNKS * 8;
#pragma unroll
  for (int i = 0; i < (R + STEP - 1) / STEP; ++i) {
    const int rr = r + i * STEP;
    if (R % STEP != 0 && rr >= R) break;
    fm_copy16(dst + wg_swizzled<R>(rr, c), src + (long long)(row0 + rr) * stride + c,
              row0 + rr < n);
  }
}

// acc += A · B for a 16-wide slice of A in registers and B at the descriptor, N = D.
template <int D> struct WgOut;
template <> struct WgOut<64> {
  static __device__ __forceinline__ void run(float (&o)[8][4], const uint32_t (&a)[4], uint64_t b) {
    wgmma_rs_n64(o, a, b);
  }
};
template <> struct WgOut<128> {
  static __device__ __forceinline__ void run(float (&o)[16][4], const uint32_t (&a)[4],
                                             uint64_t b) {
    wgmma_rs_n128(o, a, b);
  }
};

// The warpgroup's score-shaped products against a 64-row tile: acc (64 × 64) = A · Bᵀ over D
// columns, A the 64 rows at a_addr of a swizzled [A_ROWS][D] tile, B the rows of a swizzled
// [64][D] tile at b_addr (both K-major). Issued; the caller commits and waits.
template <int D, int A_ROWS>
__device__ __forceinline__ void wg_scores(float (&acc)[8][4], uint32_t a_addr, uint32_t b_addr) {
#pragma unroll
  for (int kc = 0; kc < D / 16; ++kc) {
    const uint32_t column = (kc & 3) * 32;
    wgmma_ss_n64(acc, wg_k_major(a_addr + (kc >> 2) * A_ROWS * 128 + column),
                 wg_k_major(b_addr + (kc >> 2) * FA_TILE * 128 + column),
                 kc > 0);
  }
}

// acc (64 × D) += W · M for W (64 × 64) held as A operands and M the swizzled [64][D] tile at
// m_addr (its rows the reduced dimension: MN-major). Issued; the caller commits and waits.
template <int D>
__device__ __forceinline__ void wg_weighted_rows(float (&acc)[D / 8][4], const uint32_t (&w)[4][4],
                                                 uint32_t m_addr) {
#pragma unroll
  for (int kk = 0; kk < 4; ++kk)
    WgOut<D>::run(acc, w[kk], wg_mn_major(m_addr + kk * 16 * 128));
}

// Starts copying the key and value rows k0..k0+63 of the block's kv head into `buffer` (the
// keys' swizzled [64][D] tile, then the values').
template <int D, int THREADS>
__device__ __forceinline__ void wg_load_key_tile(uint8_t* buffer, const FaQueryBlock<wg_bf16>& at,
                                                 long long k_sp, long long v_sp, int k0,
                                                 int kv_len) {
  wg_load_tile<D, FA_TILE, THREADS>(buffer, at.keys, k_sp, k0, kv_len);
  wg_load_tile<D, FA_TILE, THREADS>(buffer + FA_TILE * D * 2, at.values, v_sp, k0, kv_len);
}

// Runs `tile(k_addr, v_addr, k0)` (the shared addresses of the key and value tiles from key k0)
// on the block's key/value tiles from keys.begin below keys.end, which two buffers at `kv` hold
// in turns: the next tile's copy is in flight while the current one is worked on. The caller
// has started and committed the copy of the first tile into the first buffer. The warpgroup
// skips the tiles wholly past its last query or before its first query's window (`group`).
template <int D, int THREADS, typename F>
__device__ __forceinline__ void wg_key_tiles(uint8_t* kv, const FaQueryBlock<wg_bf16>& at,
                                             long long k_sp, long long v_sp, int kv_len,
                                             const FmKeyRange& keys, const FmKeyRange& group,
                                             F tile) {
  constexpr int KV_BYTES = FA_TILE * D * 2;
  for (int k0 = keys.begin, it = 0; k0 < keys.end; k0 += FA_TILE, ++it) {
    const uint8_t* ks = kv + (it & 1) * 2 * KV_BYTES;
    fm_wait<0>();
    async_proxy_fence();
    __syncthreads();  // this tile has landed; every warpgroup is done with the other buffer
    if (k0 + FA_TILE < keys.end) {
      wg_load_key_tile<D, THREADS>(kv + (~it & 1) * 2 * KV_BYTES, at, k_sp, v_sp, k0 + FA_TILE,
                                   kv_len);
      fm_commit();
    }
    if (k0 > group.warp_last || k0 + FA_TILE <= group.warp_first_key) continue;
    const uint32_t k_addr = fm_shared_address(ks);
    tile(k_addr, k_addr + KV_BYTES, k0);
  }
}

template <int D, int WG>
__device__ void wgmma_fwd(const wg_bf16* q, const wg_bf16* k, const wg_bf16* v, wg_bf16* out,
                          float* lse, FA_SHAPE, FA_SCORING, Q_LAYOUT) {
  using T = wg_bf16;
  constexpr int THREADS = 128 * WG, ROWS = 64 * WG, Q_BYTES = ROWS * D * 2;
  extern __shared__ uint8_t wg_raw[];
  uint8_t* qs = wg_raw + ((1024 - (fm_shared_address(wg_raw) & 1023)) & 1023);
  uint8_t* kv = qs + Q_BYTES;  // two key/value buffers (wg_key_tiles)
  const FaQueryBlock<T> at(k, v, heads, group, k_sb, k_sh, v_sb, v_sh, ROWS);
  const int bh = at.bh, q0 = at.q0, shift = kv_len - q_len;
  const int wg = threadIdx.x >> 7;
  const FmLane lane(16);
  const long long head = fm_head_start(bh, heads, q_sb, q_sh);
  wg_load_tile<D, ROWS, THREADS>(qs, q + head, q_sp, q0, q_len);
  const bool segmented = starts != nullptr;
  const FmKeyRange keys(q0, ROWS, lane.r0, 16, shift, kv_len, window, segmented);
  const FmKeyRange group_keys(q0, ROWS, 64 * wg, 64, shift, kv_len, window, segmented);
  wg_load_key_tile<D, THREADS>(kv, at, k_sp, v_sp, keys.begin, kv_len);
  fm_commit();
  float o[1][D / 8][4] = {};
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {};
  int first[1][2];
  fm_row_segment_starts<1>(first, starts, bh / heads, q_len, q0 + lane.r0 + lane.g);
  const uint32_t q_addr = fm_shared_address(qs) + wg * 64 * 128;
  wg_key_tiles<D, THREADS>(kv, at, k_sp, v_sp, kv_len, keys, group_keys,
                           [&](uint32_t k_addr, uint32_t v_addr, int k0) {
    float s[8][4] = {};
    wg_complete([&] { wg_scores<D, ROWS>(s, q_addr, k_addr); }, s);
    const int pos = q0 + lane.r0 + lane.g + shift, key = k0 + 2 * lane.t;
    fm_variant(keys.masked(k0), cap_log2 > 0.f, [&](auto mask, auto cap) {
      fm_online_softmax<decltype(mask)::value, decltype(cap)::value, D>(
          s, m, l, o[0], pos, key, first[0], kv_len, FA_SCORING_ARGS);
    });
    uint32_t p[4][4];
    fm_to_operand<T>(p, s);
    wg_complete([&] { wg_weighted_rows<D>(o[0], p, v_addr); }, o[0]);
  });
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const float total = warp_sum<4>(l[h]), inv = 1.f / total;
    const int row = q0 + lane.r0 + lane.g + 8 * h;
    if (lane.t == 0 && row < q_len) lse[(size_t)bh * q_len + row] = m[h] + log2f(total);
#pragma unroll
    for (int j = 0; j < D / 8; ++j) {
      o[0][j][2 * h] *= inv;
      o[0][j][2 * h + 1] *= inv;
    }
  }
  fm_store_rows<T, D, 1>(out + head, q_sp, o, q0 + lane.r0, q_len, 1.f);
}

// Query gradients and deltas as flash_mma_bwd_q, a warpgroup's 64 queries at a time.
template <int D, int WG>
__device__ void wgmma_bwd_q(const wg_bf16* q, const wg_bf16* k, const wg_bf16* v,
                            const wg_bf16* dout, const float* lse, const wg_bf16* out,
                            float* delta, wg_bf16* dq, FA_SHAPE, FA_SCORING, float scale,
                            Q_LAYOUT) {
  using T = wg_bf16;
  constexpr int THREADS = 128 * WG, ROWS = 64 * WG, Q_BYTES = ROWS * D * 2;
  constexpr int KV_BYTES = FA_TILE * D * 2;
  extern __shared__ uint8_t wg_raw[];
  uint8_t* qs = wg_raw + ((1024 - (fm_shared_address(wg_raw) & 1023)) & 1023);
  uint8_t *dos = qs + Q_BYTES, *os = dos + Q_BYTES, *kv = os + Q_BYTES;
  float* delta_s = reinterpret_cast<float*>(kv + 4 * KV_BYTES);
  const FaQueryBlock<T> at(k, v, heads, group, k_sb, k_sh, v_sb, v_sh, ROWS);
  const int bh = at.bh, q0 = at.q0, shift = kv_len - q_len, wg = threadIdx.x >> 7;
  const FmLane lane(16);
  const size_t rows0 = (size_t)bh * q_len;
  const long long head = fm_head_start(bh, heads, q_sb, q_sh);
  wg_load_tile<D, ROWS, THREADS>(qs, q + head, q_sp, q0, q_len);
  wg_load_tile<D, ROWS, THREADS>(dos, dout + head, q_sp, q0, q_len);
  wg_load_tile<D, ROWS, THREADS>(os, out + head, q_sp, q0, q_len);
  fm_commit();
  const bool segmented = starts != nullptr;
  const FmKeyRange keys(q0, ROWS, lane.r0, 16, shift, kv_len, window, segmented);
  const FmKeyRange group_keys(q0, ROWS, 64 * wg, 64, shift, kv_len, window, segmented);
  wg_load_key_tile<D, THREADS>(kv, at, k_sp, v_sp, keys.begin, kv_len);
  fm_commit();
  fm_wait<1>();
  __syncthreads();
  // Deltas: two threads a row, each summing alternate 16-byte chunks.
  for (int r = threadIdx.x / 2; r < ROWS; r += THREADS / 2) {
    float sum = 0.f;
#pragma unroll
    for (int c = 8 * (threadIdx.x & 1); c < D; c += 16)
      sum += fm_dot8(reinterpret_cast<const T*>(dos + wg_swizzled<ROWS>(r, c)),
                     reinterpret_cast<const T*>(os + wg_swizzled<ROWS>(r, c)));
    sum += __shfl_xor_sync(0xffffffff, sum, 1);
    if ((threadIdx.x & 1) == 0) {
      delta_s[r] = sum;
      if (q0 + r < q_len) delta[rows0 + q0 + r] = sum;
    }
  }
  __syncthreads();
  float row_lse[2], row_delta[2];
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int r = lane.r0 + lane.g + 8 * h;
    row_lse[h] = q0 + r < q_len ? lse[rows0 + q0 + r] : 0.f;
    row_delta[h] = delta_s[r];
  }
  int first[1][2];
  fm_row_segment_starts<1>(first, starts, bh / heads, q_len, q0 + lane.r0 + lane.g);
  float dq_acc[1][D / 8][4] = {};
  const uint32_t q_addr = fm_shared_address(qs) + wg * 64 * 128,
                 do_addr = fm_shared_address(dos) + wg * 64 * 128;
  wg_key_tiles<D, THREADS>(kv, at, k_sp, v_sp, kv_len, keys, group_keys,
                           [&](uint32_t k_addr, uint32_t v_addr, int k0) {
    float s[8][4] = {}, ds[8][4] = {};
    wg_complete(
        [&] {
          wg_scores<D, ROWS>(s, q_addr, k_addr);
          wg_scores<D, ROWS>(ds, do_addr, v_addr);
        },
        s, ds);
    const int pos = q0 + lane.r0 + lane.g + shift, key = k0 + 2 * lane.t;
    fm_variant(keys.masked(k0), cap_log2 > 0.f, [&](auto mask, auto cap) {
      fm_query_score_grads<decltype(mask)::value, decltype(cap)::value>(
          s, ds, row_lse, row_delta, pos, key, first[0], kv_len, FA_SCORING_ARGS);
    });
    uint32_t w[4][4];
    fm_to_operand<T>(w, ds);
    wg_complete([&] { wg_weighted_rows<D>(dq_acc[0], w, k_addr); }, dq_acc[0]);
  });
  fm_store_rows<T, D, 1>(dq + head, q_sp, dq_acc, q0 + lane.r0, q_len, scale);
}

// Key and value gradients as flash_mma_bwd_kv, a warpgroup's 64 keys at a time (a block's
// 64·WG), walking the query tiles of each query head of the group.
template <int D, int WG>
__device__ void wgmma_bwd_kv(FA_BWD_INPUTS(wg_bf16), wg_bf16* dk, wg_bf16* dv, FA_SHAPE,
                             FA_SCORING, float scale, Q_LAYOUT, G_LAYOUT) {
  using T = wg_bf16;
  constexpr int THREADS = 128 * WG, KEYS = 64 * WG, BQ = FA_TILE;
  constexpr int K_BYTES = KEYS * D * 2, Q_BYTES = BQ * D * 2;
  extern __shared__ uint8_t wg_raw[];
  uint8_t* ks = wg_raw + ((1024 - (fm_shared_address(wg_raw) & 1023)) & 1023);
  uint8_t *vs = ks + K_BYTES, *qbuf = vs + K_BYTES;  // buffer b: q, then dout, at 2b · Q_BYTES
  float* stats_base = reinterpret_cast<float*>(qbuf + 4 * Q_BYTES);
  const int2 work = fa_block_work();
  const int kv_heads = heads / group, bkv = work.y, b = bkv / kv_heads;
  const int kv_head = bkv % kv_heads, k0 = work.x * KEYS, shift = kv_len - q_len;
  const int wg = threadIdx.x >> 7;
  const FmLane lane(16);
  wg_load_tile<D, KEYS, THREADS>(ks, k + b * k_sb + kv_head * k_sh, k_sp, k0, kv_len);
  wg_load_tile<D, KEYS, THREADS>(vs, v + b * v_sb + kv_head * v_sh, v_sp, k0, kv_len);
  const int q_begin = max(0, k0 - shift) / BQ * BQ;
  const int q_end = min(q_len, k0 + KEYS - 1 + window - shift);
  const int tiles = max(0, (q_end - q_begin + BQ - 1) / BQ), total = group * tiles;
  int2 loading = make_int2(0, 0), working = make_int2(0, 0);
  auto step = [tiles](int2& at) {
    if (++at.y == tiles) {
      at.y = 0;
      ++at.x;
    }
  };
  auto stats = [&](int buffer) { return stats_base + 3 * buffer * BQ; };
  const unsigned int* row_starts = starts != nullptr ? starts + (size_t)b * q_len : nullptr;
  auto load = [&](int buffer) {
    const int query_head = kv_head * group + loading.x, q0 = q_begin + loading.y * BQ;
    step(loading);
    const size_t bh = (size_t)b * heads + query_head;
    const long long head = b * q_sb + query_head * q_sh;
    uint8_t* qt = qbuf + 2 * buffer * Q_BYTES;
    wg_load_tile<D, BQ, THREADS>(qt, q + head, q_sp, q0, q_len);
    wg_load_tile<D, BQ, THREADS>(qt + Q_BYTES, dout + head, q_sp, q0, q_len);
    if (threadIdx.x < FM_THREADS)
      fm_load_row_stats(stats(buffer), lse + bh * q_len, delta + bh * q_len, row_starts, q0,
                        q_len);
  };
  if (total > 0) load(0);
  fm_commit();
  float dk_acc[1][D / 8][4] = {}, dv_acc[1][D / 8][4] = {};
  const int warp_key = k0 + lane.r0, key = warp_key + lane.g, group_key = k0 + 64 * wg;
  const uint32_t k_addr = fm_shared_address(ks) + wg * 64 * 128,
                 v_addr = fm_shared_address(vs) + wg * 64 * 128;
  for (int it = 0; it < total; ++it) {
    const int buffer = it & 1, q0 = q_begin + working.y * BQ;
    step(working);
    const uint32_t q_addr = fm_shared_address(qbuf + 2 * buffer * Q_BYTES),
                   do_addr = q_addr + Q_BYTES;
    const float* row_stats = stats(buffer);
    fm_wait<0>();
    async_proxy_fence();
    __syncthreads();
    if (it + 1 < total) {
      load(buffer ^ 1);
      fm_commit();
    }
    if (group_key > q0 + BQ - 1 + shift || q0 + shift - (group_key + 63) >= window) continue;
    const bool masked = starts != nullptr || warp_key + 15 > q0 + shift ||
                        warp_key + 16 > kv_len || q0 + BQ > q_len ||
                        q0 + BQ - 1 + shift - warp_key >= window;
    float p[8][4] = {}, ds[8][4] = {};
    wg_complete(
        [&] {
          wg_scores<D, KEYS>(p, k_addr, q_addr);
          wg_scores<D, KEYS>(ds, v_addr, do_addr);
        },
        p, ds);
    fm_variant(masked, cap_log2 > 0.f, [&](auto mask, auto cap) {
      fm_key_score_grads<decltype(mask)::value, decltype(cap)::value, 8>(
          p, ds, row_stats, key, q0, 2 * lane.t, q_len, kv_len, shift, FA_SCORING_ARGS);
    });
    uint32_t wp[4][4], wds[4][4];
    fm_to_operand<T>(wp, p);
    fm_to_operand<T>(wds, ds);
    wg_complete(
        [&] {
          wg_weighted_rows<D>(dv_acc[0], wp, do_addr);
          wg_weighted_rows<D>(dk_acc[0], wds, q_addr);
        },
        dv_acc[0], dk_acc[0]);
  }
  const long long grads = b * g_sb + kv_head * g_sh;
  fm_store_rows<T, D, 1>(dk + grads, g_sp, dk_acc, k0 + lane.r0, kv_len, scale);
  fm_store_rows<T, D, 1>(dv + grads, g_sp, dv_acc, k0 + lane.r0, kv_len, 1.f);
}


#endif

// An entry point's body on sm_90a; a trap elsewhere.
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define WGMMA_ONLY(...) __VA_ARGS__
#else
#define WGMMA_ONLY(...) __trap()
#endif

// Dynamic shared memory (see src/attention/flash.rs): 1,024 bytes of room to align the tiles,
// then the kernels' tiles and per-row vectors.
#define FLASH_WGMMA_ENTRY_POINTS_D(D, BWD)                                                      \
  extern "C" __global__ void __launch_bounds__(FM_THREADS) flash_wgmma_fwd_d##D##_bf16(         \
      const wg_bf16* q, const wg_bf16* k, const wg_bf16* v, wg_bf16* out, float* lse, FA_SHAPE, \
      FA_SCORING, Q_LAYOUT) {                                                                   \
    WGMMA_ONLY(wgmma_fwd<D, 1>(q, k, v, out, lse, FA_SHAPE_ARGS, FA_SCORING_ARGS, q_sb, q_sh,   \
                               q_sp));                                                          \
  }                                                                                             \
  BWD(D)

#define FLASH_WGMMA_BWD_ENTRY_POINTS(D)                                                         \
  extern "C" __global__ void __launch_bounds__(FM_THREADS) flash_wgmma_bwd_q_d##D##_bf16(       \
      const wg_bf16* q, const wg_bf16* k, const wg_bf16* v, const wg_bf16* dout,                \
      const float* lse, const wg_bf16* out, float* delta, wg_bf16* dq, FA_SHAPE, FA_SCORING,    \
      float scale, Q_LAYOUT) {                                                                  \
    WGMMA_ONLY(wgmma_bwd_q<D, 1>(q, k, v, dout, lse, out, delta, dq, FA_SHAPE_ARGS,             \
                                 FA_SCORING_ARGS, scale, q_sb, q_sh, q_sp));                    \
  }                                                                                             \
  extern "C" __global__ void __launch_bounds__(FM_THREADS) flash_wgmma_bwd_kv_d##D##_bf16(      \
      FA_BWD_INPUTS(wg_bf16), wg_bf16* dk, wg_bf16* dv, FA_SHAPE, FA_SCORING, float scale,      \
      Q_LAYOUT, G_LAYOUT) {                                                                     \
    WGMMA_ONLY(wgmma_bwd_kv<D, 1>(FA_BWD_INPUT_ARGS, dk, dv, FA_SHAPE_ARGS, FA_SCORING_ARGS,    \
                                  scale, q_sb, q_sh, q_sp, g_sb, g_sh, g_sp));                  \
  }
#define FLASH_WGMMA_NO_BWD(D)

// The key/value gradients at head size 128 would spill (their dk and dv accumulators take 128
// registers a thread): that size keeps flash_mma's backward.
FLASH_WGMMA_ENTRY_POINTS_D(64, FLASH_WGMMA_BWD_ENTRY_POINTS)
FLASH_WGMMA_ENTRY_POINTS_D(128, FLASH_WGMMA_NO_BWD)

