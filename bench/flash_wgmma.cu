// A Hopper (wgmma) flash attention forward against kernels/flash_mma.cuh's (mma.sync), bf16,
// causal: first the outputs and log-sum-exps are compared, then both are timed at the shapes
// the 1b and 8b train at and at base's.
//
// A block is WG warpgroups of 128 threads, each owning 64 consecutive queries; the block walks
// key/value tiles of 64, double-buffered in shared memory by cp.async, stored as the tensor
// cores read them: rows of 64 elements (128 bytes) with the 128-byte swizzle (16-byte chunk c
// of row r at chunk c ^ (r mod 8)), a head size of 128 as two such column blocks. Scores are
// one warpgroup product (wgmma.m64n64k16, queries and keys from shared memory, K-major); the
// online softmax is flash_mma.cuh's, per warp, on the accumulators, whose layout per warp is
// mma.sync's; the probabilities go from registers into the weighted sum of the values (A from
// registers, the values MN-major from shared memory).
//
// The descriptors' byte offsets are kernel arguments, so one run can try the layouts the PTX
// manual leaves to reading: the host tries them in turn until the output matches.
//   nvcc -O3 -std=c++17 -gencode=arch=compute_90a,code=sm_90a -Icrates/ops/kernels \
//     bench/flash_wgmma.cu -o flash_wgmma
#include "attention.cu"

#include <cuda_runtime.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <vector>

#define CHECK(x)                                                                  \
  do {                                                                            \
    cudaError_t e = (x);                                                          \
    if (e != cudaSuccess) {                                                       \
      printf("%s:%d %s\n", __FILE__, __LINE__, cudaGetErrorString(e));            \
      exit(1);                                                                    \
    }                                                                             \
  } while (0)

typedef __nv_bfloat16 bf16;

// d (64 × 64, f32) = (accumulate ? d : 0) + A · B, A and B from shared memory, both K-major.
__device__ __forceinline__ void wgmma_ss_n64(float (&d)[8][4], uint64_t a, uint64_t b,
                                             int accumulate) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, %32, %33, p, 1, 1, 0, 0;\n}\n"
      : "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]), "+f"(d[1][0]), "+f"(d[1][1]), "+f"(d[1][2]), "+f"(d[1][3]), "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3]), "+f"(d[3][0]), "+f"(d[3][1]), "+f"(d[3][2]), "+f"(d[3][3]), "+f"(d[4][0]), "+f"(d[4][1]), "+f"(d[4][2]), "+f"(d[4][3]), "+f"(d[5][0]), "+f"(d[5][1]), "+f"(d[5][2]), "+f"(d[5][3]), "+f"(d[6][0]), "+f"(d[6][1]), "+f"(d[6][2]), "+f"(d[6][3]), "+f"(d[7][0]), "+f"(d[7][1]), "+f"(d[7][2]), "+f"(d[7][3])
      : "l"(a), "l"(b), "r"(accumulate));
}
// d (64 × 64, f32) += A · B, A (64 × 16) from registers, B from shared memory, MN-major.
__device__ __forceinline__ void wgmma_rs_n64(float (&d)[8][4], const uint32_t (&a)[4],
                                             uint64_t b) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, {%32, %33, %34, %35}, %36, p, 1, 1, 1;\n}\n"
      : "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]), "+f"(d[1][0]), "+f"(d[1][1]), "+f"(d[1][2]), "+f"(d[1][3]), "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3]), "+f"(d[3][0]), "+f"(d[3][1]), "+f"(d[3][2]), "+f"(d[3][3]), "+f"(d[4][0]), "+f"(d[4][1]), "+f"(d[4][2]), "+f"(d[4][3]), "+f"(d[5][0]), "+f"(d[5][1]), "+f"(d[5][2]), "+f"(d[5][3]), "+f"(d[6][0]), "+f"(d[6][1]), "+f"(d[6][2]), "+f"(d[6][3]), "+f"(d[7][0]), "+f"(d[7][1]), "+f"(d[7][2]), "+f"(d[7][3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(1));
}
// d (64 × 128, f32) += A · B, A (64 × 16) from registers, B from shared memory, MN-major.
__device__ __forceinline__ void wgmma_rs_n128(float (&d)[16][4], const uint32_t (&a)[4],
                                             uint64_t b) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, {%64, %65, %66, %67}, %68, p, 1, 1, 1;\n}\n"
      : "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]), "+f"(d[1][0]), "+f"(d[1][1]), "+f"(d[1][2]), "+f"(d[1][3]), "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3]), "+f"(d[3][0]), "+f"(d[3][1]), "+f"(d[3][2]), "+f"(d[3][3]), "+f"(d[4][0]), "+f"(d[4][1]), "+f"(d[4][2]), "+f"(d[4][3]), "+f"(d[5][0]), "+f"(d[5][1]), "+f"(d[5][2]), "+f"(d[5][3]), "+f"(d[6][0]), "+f"(d[6][1]), "+f"(d[6][2]), "+f"(d[6][3]), "+f"(d[7][0]), "+f"(d[7][1]), "+f"(d[7][2]), "+f"(d[7][3]), "+f"(d[8][0]), "+f"(d[8][1]), "+f"(d[8][2]), "+f"(d[8][3]), "+f"(d[9][0]), "+f"(d[9][1]), "+f"(d[9][2]), "+f"(d[9][3]), "+f"(d[10][0]), "+f"(d[10][1]), "+f"(d[10][2]), "+f"(d[10][3]), "+f"(d[11][0]), "+f"(d[11][1]), "+f"(d[11][2]), "+f"(d[11][3]), "+f"(d[12][0]), "+f"(d[12][1]), "+f"(d[12][2]), "+f"(d[12][3]), "+f"(d[13][0]), "+f"(d[13][1]), "+f"(d[13][2]), "+f"(d[13][3]), "+f"(d[14][0]), "+f"(d[14][1]), "+f"(d[14][2]), "+f"(d[14][3]), "+f"(d[15][0]), "+f"(d[15][1]), "+f"(d[15][2]), "+f"(d[15][3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(1));
}

__device__ __forceinline__ void wg_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
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
// Shared memory written through the generic proxy (cp.async) and read next by the tensor cores.
__device__ __forceinline__ void async_proxy_fence() {
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}

// A shared-memory matrix descriptor with the 128-byte swizzle.
__device__ __forceinline__ uint64_t wg_desc(uint32_t address, uint32_t lbo, uint32_t sbo) {
  return (uint64_t)((address & 0x3FFFF) >> 4) | (uint64_t)((lbo >> 4) & 0x3FFF) << 16 |
         (uint64_t)((sbo >> 4) & 0x3FFF) << 32 | (uint64_t)1 << 62;
}

// Byte offset of element (r, c) in an [R][D] tile stored as D / 64 column blocks of [R][64]
// with the 128-byte swizzle.
template <int R> __device__ __forceinline__ uint32_t wg_swizzled(int r, int c) {
  return (c >> 6) * R * 128 + r * 128 + ((((c >> 3) & 7) ^ (r & 7)) << 4) + (c & 7) * 2;
}

// Starts copying rows row0..row0+R-1 of an [n, D] matrix into the swizzled tile `dst`; rows at
// or beyond n become zeros.
template <int D, int R, int THREADS>
__device__ __forceinline__ void wg_load_tile(uint8_t* dst, const bf16* src, long long stride,
                                             int row0, int n) {
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

// Descriptor byte offsets: queries and keys (K-major: lbo, sbo), values (MN-major: lbo, sbo).
struct WgLayout {
  int qk_lbo, qk_sbo, v_lbo, v_sbo;
};

template <int D, int WG>
__device__ void wgmma_fwd(const bf16* q, const bf16* k, const bf16* v, bf16* out, float* lse,
                          FA_SHAPE, FA_SCORING, Q_LAYOUT, WgLayout lay) {
  using T = bf16;
  constexpr int THREADS = 128 * WG, ROWS = 64 * WG, BN = FA_TILE;
  constexpr int Q_BYTES = ROWS * D * 2, KV_BYTES = BN * D * 2;
  extern __shared__ uint8_t wg_raw[];
  uint8_t* qs = wg_raw + ((1024 - (fm_shared_address(wg_raw) & 1023)) & 1023);
  uint8_t* kv = qs + Q_BYTES;  // buffer b: keys at kv + 2b · KV_BYTES, values after them
  const FaQueryBlock<T> at(k, v, heads, group, k_sb, k_sh, v_sb, v_sh, ROWS);
  const int bh = at.bh, q0 = at.q0, shift = kv_len - q_len;
  const int wg = threadIdx.x >> 7;
  const FmLane lane(16);
  const long long head = fm_head_start(bh, heads, q_sb, q_sh);
  wg_load_tile<D, ROWS, THREADS>(qs, q + head, q_sp, q0, q_len);
  const bool segmented = starts != nullptr;
  const FmKeyRange keys(q0, ROWS, lane.r0, 16, shift, kv_len, window, segmented);
  const FmKeyRange group_keys(q0, ROWS, 64 * wg, 64, shift, kv_len, window, segmented);
  wg_load_tile<D, BN, THREADS>(kv, at.keys, k_sp, keys.begin, kv_len);
  wg_load_tile<D, BN, THREADS>(kv + KV_BYTES, at.values, v_sp, keys.begin, kv_len);
  fm_commit();
  float o[1][D / 8][4] = {};
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {};
  int first[1][2];
  fm_row_segment_starts<1>(first, starts, bh / heads, q_len, q0 + lane.r0 + lane.g);
  const uint32_t q_addr = fm_shared_address(qs) + wg * 64 * 128;
  for (int k0 = keys.begin, it = 0; k0 < keys.end; k0 += BN, ++it) {
    uint8_t* ks = kv + (it & 1) * 2 * KV_BYTES;
    fm_wait<0>();
    async_proxy_fence();
    __syncthreads();  // this tile has landed; every warpgroup is done with the other buffer
    if (k0 + BN < keys.end) {
      uint8_t* next = kv + (~it & 1) * 2 * KV_BYTES;
      wg_load_tile<D, BN, THREADS>(next, at.keys, k_sp, k0 + BN, kv_len);
      wg_load_tile<D, BN, THREADS>(next + KV_BYTES, at.values, v_sp, k0 + BN, kv_len);
      fm_commit();
    }
    if (k0 > group_keys.warp_last || k0 + BN <= group_keys.warp_first_key) continue;
    const uint32_t k_addr = fm_shared_address(ks), v_addr = k_addr + KV_BYTES;
    float s[8][4] = {};
    wg_hold(s);
    wg_fence();
#pragma unroll
    for (int kc = 0; kc < D / 16; ++kc) {
      // Column block kc / 4 (64 elements), 16 columns (32 bytes) into it.
      const uint32_t column = (kc & 3) * 32;
      wgmma_ss_n64(s, wg_desc(q_addr + (kc >> 2) * ROWS * 128 + column, lay.qk_lbo, lay.qk_sbo),
                   wg_desc(k_addr + (kc >> 2) * BN * 128 + column, lay.qk_lbo, lay.qk_sbo),
                   kc > 0);
    }
    wg_commit();
    wg_wait<0>();
    wg_hold(s);
    const int pos = q0 + lane.r0 + lane.g + shift, key = k0 + 2 * lane.t;
    fm_variant(keys.masked(k0), cap_log2 > 0.f, [&](auto mask, auto cap) {
      fm_online_softmax<decltype(mask)::value, decltype(cap)::value, D>(
          s, m, l, o[0], pos, key, first[0], kv_len, FA_SCORING_ARGS);
    });
    uint32_t p[4][4];
    fm_to_operand<T>(p, s);
    wg_hold(o[0]);
    wg_fence();
#pragma unroll
    for (int kk = 0; kk < 4; ++kk)
      WgOut<D>::run(o[0], p[kk], wg_desc(v_addr + kk * 16 * 128, lay.v_lbo, lay.v_sbo));
    wg_commit();
    wg_wait<0>();
    wg_hold(o[0]);
  }
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

template <int D, int WG>
__global__ void __launch_bounds__(128 * WG)
    wgmma_fwd_kernel(const bf16* q, const bf16* k, const bf16* v, bf16* out, float* lse, FA_SHAPE,
                     FA_SCORING, Q_LAYOUT, WgLayout lay) {
  wgmma_fwd<D, WG>(q, k, v, out, lse, FA_SHAPE_ARGS, FA_SCORING_ARGS, q_sb, q_sh, q_sp, lay);
}

template <int D, int WG> constexpr int wgmma_shared_bytes() {
  return 1024 + (64 * WG + 4 * FA_TILE) * D * 2;
}

// The warpgroup's score-shaped products against a 64-row tile: acc (64 × 64) = A · Bᵀ over D
// columns, A the 64 rows at a_addr of a swizzled [A_ROWS][D] tile, B the rows of a swizzled
// [64][D] tile at b_addr (both K-major). Issued and committed; the caller waits.
template <int D, int A_ROWS>
__device__ __forceinline__ void wg_scores(float (&acc)[8][4], uint32_t a_addr, uint32_t b_addr,
                                          const WgLayout& lay) {
#pragma unroll
  for (int kc = 0; kc < D / 16; ++kc) {
    const uint32_t column = (kc & 3) * 32;
    wgmma_ss_n64(acc, wg_desc(a_addr + (kc >> 2) * A_ROWS * 128 + column, lay.qk_lbo, lay.qk_sbo),
                 wg_desc(b_addr + (kc >> 2) * FA_TILE * 128 + column, lay.qk_lbo, lay.qk_sbo),
                 kc > 0);
  }
}

// acc (64 × D) += W · M for W (64 × 64) held as A operands and M the swizzled [64][D] tile at
// m_addr (its rows the reduced dimension: MN-major). Issued and committed.
template <int D>
__device__ __forceinline__ void wg_weighted_rows(float (&acc)[D / 8][4], const uint32_t (&w)[4][4],
                                                 uint32_t m_addr, const WgLayout& lay) {
#pragma unroll
  for (int kk = 0; kk < 4; ++kk)
    WgOut<D>::run(acc, w[kk], wg_desc(m_addr + kk * 16 * 128, lay.v_lbo, lay.v_sbo));
}

// Query gradients and deltas as flash_mma_bwd_q, a warpgroup's 64 queries at a time.
template <int D, int WG>
__device__ void wgmma_bwd_q(const bf16* q, const bf16* k, const bf16* v, const bf16* dout,
                            const float* lse, const bf16* out, float* delta, bf16* dq, FA_SHAPE,
                            FA_SCORING, float scale, Q_LAYOUT, WgLayout lay) {
  using T = bf16;
  constexpr int THREADS = 128 * WG, ROWS = 64 * WG, BN = FA_TILE;
  constexpr int Q_BYTES = ROWS * D * 2, KV_BYTES = BN * D * 2;
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
  wg_load_tile<D, BN, THREADS>(kv, at.keys, k_sp, keys.begin, kv_len);
  wg_load_tile<D, BN, THREADS>(kv + KV_BYTES, at.values, v_sp, keys.begin, kv_len);
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
  for (int k0 = keys.begin, it = 0; k0 < keys.end; k0 += BN, ++it) {
    uint8_t* ks = kv + (it & 1) * 2 * KV_BYTES;
    fm_wait<0>();
    async_proxy_fence();
    __syncthreads();
    if (k0 + BN < keys.end) {
      uint8_t* next = kv + (~it & 1) * 2 * KV_BYTES;
      wg_load_tile<D, BN, THREADS>(next, at.keys, k_sp, k0 + BN, kv_len);
      wg_load_tile<D, BN, THREADS>(next + KV_BYTES, at.values, v_sp, k0 + BN, kv_len);
      fm_commit();
    }
    if (k0 > group_keys.warp_last || k0 + BN <= group_keys.warp_first_key) continue;
    const uint32_t k_addr = fm_shared_address(ks), v_addr = k_addr + KV_BYTES;
    float s[8][4] = {}, ds[8][4] = {};
    wg_hold(s);
    wg_hold(ds);
    wg_fence();
    wg_scores<D, ROWS>(s, q_addr, k_addr, lay);
    wg_scores<D, ROWS>(ds, do_addr, v_addr, lay);
    wg_commit();
    wg_wait<0>();
    wg_hold(s);
    wg_hold(ds);
    const int pos = q0 + lane.r0 + lane.g + shift, key = k0 + 2 * lane.t;
    fm_variant(keys.masked(k0), cap_log2 > 0.f, [&](auto mask, auto cap) {
      fm_query_score_grads<decltype(mask)::value, decltype(cap)::value>(
          s, ds, row_lse, row_delta, pos, key, first[0], kv_len, FA_SCORING_ARGS);
    });
    uint32_t w[4][4];
    fm_to_operand<T>(w, ds);
    wg_hold(dq_acc[0]);
    wg_fence();
    wg_weighted_rows<D>(dq_acc[0], w, k_addr, lay);
    wg_commit();
    wg_wait<0>();
    wg_hold(dq_acc[0]);
  }
  fm_store_rows<T, D, 1>(dq + head, q_sp, dq_acc, q0 + lane.r0, q_len, scale);
}

// Key and value gradients as flash_mma_bwd_kv, a warpgroup's 64 keys at a time (a block's
// 64·WG), walking the query tiles of each query head of the group.
template <int D, int WG>
__device__ void wgmma_bwd_kv(FA_BWD_INPUTS(bf16), bf16* dk, bf16* dv, FA_SHAPE, FA_SCORING,
                             float scale, Q_LAYOUT, G_LAYOUT, WgLayout lay) {
  using T = bf16;
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
    wg_hold(p);
    wg_hold(ds);
    wg_fence();
    wg_scores<D, KEYS>(p, k_addr, q_addr, lay);
    wg_scores<D, KEYS>(ds, v_addr, do_addr, lay);
    wg_commit();
    wg_wait<0>();
    wg_hold(p);
    wg_hold(ds);
    fm_variant(masked, cap_log2 > 0.f, [&](auto mask, auto cap) {
      fm_key_score_grads<decltype(mask)::value, decltype(cap)::value, 8>(
          p, ds, row_stats, key, q0, 2 * lane.t, q_len, kv_len, shift, FA_SCORING_ARGS);
    });
    uint32_t wp[4][4], wds[4][4];
    fm_to_operand<T>(wp, p);
    fm_to_operand<T>(wds, ds);
    wg_hold(dv_acc[0]);
    wg_hold(dk_acc[0]);
    wg_fence();
    wg_weighted_rows<D>(dv_acc[0], wp, do_addr, lay);
    wg_weighted_rows<D>(dk_acc[0], wds, q_addr, lay);
    wg_commit();
    wg_wait<0>();
    wg_hold(dv_acc[0]);
    wg_hold(dk_acc[0]);
  }
  const long long grads = b * g_sb + kv_head * g_sh;
  fm_store_rows<T, D, 1>(dk + grads, g_sp, dk_acc, k0 + lane.r0, kv_len, scale);
  fm_store_rows<T, D, 1>(dv + grads, g_sp, dv_acc, k0 + lane.r0, kv_len, 1.f);
}

template <int D, int WG>
__global__ void __launch_bounds__(128 * WG)
    wgmma_bwd_q_kernel(const bf16* q, const bf16* k, const bf16* v, const bf16* dout,
                       const float* lse, const bf16* out, float* delta, bf16* dq, FA_SHAPE,
                       FA_SCORING, float scale, Q_LAYOUT, WgLayout lay) {
  wgmma_bwd_q<D, WG>(q, k, v, dout, lse, out, delta, dq, FA_SHAPE_ARGS, FA_SCORING_ARGS, scale,
                     q_sb, q_sh, q_sp, lay);
}

template <int D, int WG>
__global__ void __launch_bounds__(128 * WG)
    wgmma_bwd_kv_kernel(FA_BWD_INPUTS(bf16), bf16* dk, bf16* dv, FA_SHAPE, FA_SCORING,
                        float scale, Q_LAYOUT, G_LAYOUT, WgLayout lay) {
  wgmma_bwd_kv<D, WG>(FA_BWD_INPUT_ARGS, dk, dv, FA_SHAPE_ARGS, FA_SCORING_ARGS, scale, q_sb,
                      q_sh, q_sp, g_sb, g_sh, g_sp, lay);
}

template <int D, int WG> constexpr int wgmma_bwd_q_shared_bytes() {
  return 1024 + 3 * 64 * WG * D * 2 + 4 * FA_TILE * D * 2 + 4 * 64 * WG;
}
template <int D, int WG> constexpr int wgmma_bwd_kv_shared_bytes() {
  return 1024 + 2 * 64 * WG * D * 2 + 4 * FA_TILE * D * 2 + 4 * 2 * 3 * FA_TILE;
}

struct Shape {
  const char* name;
  int batch, heads, kv_heads, len, d;
};

static bf16* random_bf16(size_t n, unsigned seed) {
  std::vector<bf16> host(n);
  srand(seed);
  for (auto& x : host) x = __float2bfloat16(2.f * rand() / (float)RAND_MAX - 1.f);
  bf16* device;
  CHECK(cudaMalloc(&device, n * sizeof(bf16)));
  CHECK(cudaMemcpy(device, host.data(), n * sizeof(bf16), cudaMemcpyHostToDevice));
  return device;
}

// The arguments every forward takes, in order.
struct Args {
  const bf16 *q, *k, *v;
  bf16* out;
  float* lse;
  int heads, group, q_len, kv_len;
  long long k_sb, k_sh, k_sp, v_sb, v_sh, v_sp;
  float scale_log2, cap_log2;
  int window;
  const unsigned* starts;
  long long q_sb, q_sh, q_sp;
};

template <typename Launch> static float time_us(Launch launch, int reps = 20) {
  for (int i = 0; i < 3; ++i) launch();
  cudaEvent_t a, b;
  CHECK(cudaEventCreate(&a));
  CHECK(cudaEventCreate(&b));
  CHECK(cudaEventRecord(a));
  for (int i = 0; i < reps; ++i) launch();
  CHECK(cudaEventRecord(b));
  CHECK(cudaEventSynchronize(b));
  float ms;
  CHECK(cudaEventElapsedTime(&ms, a, b));
  CHECK(cudaGetLastError());
  return 1000.f * ms / reps;
}

struct Diff {
  float out, lse;
};

static Diff compare(const Args& a, bf16* out_ref, float* lse_ref, size_t n_out, size_t n_lse) {
  std::vector<bf16> x(n_out), y(n_out);
  std::vector<float> lx(n_lse), ly(n_lse);
  CHECK(cudaMemcpy(x.data(), a.out, n_out * 2, cudaMemcpyDeviceToHost));
  CHECK(cudaMemcpy(y.data(), out_ref, n_out * 2, cudaMemcpyDeviceToHost));
  CHECK(cudaMemcpy(lx.data(), a.lse, n_lse * 4, cudaMemcpyDeviceToHost));
  CHECK(cudaMemcpy(ly.data(), lse_ref, n_lse * 4, cudaMemcpyDeviceToHost));
  Diff d{0.f, 0.f};
  for (size_t i = 0; i < n_out; ++i) {
    const float e = fabsf(__bfloat162float(x[i]) - __bfloat162float(y[i]));
    d.out = std::isnan(e) ? INFINITY : fmaxf(d.out, e);
  }
  for (size_t i = 0; i < n_lse; ++i) {
    const float e = fabsf(lx[i] - ly[i]);
    d.lse = std::isnan(e) ? INFINITY : fmaxf(d.lse, e);
  }
  return d;
}

#define FWD_ARGS(a)                                                                            \
  a.q, a.k, a.v, a.out, a.lse, a.heads, a.group, a.q_len, a.kv_len, a.k_sb, a.k_sh, a.k_sp,  \
      a.v_sb, a.v_sh, a.v_sp, a.scale_log2, a.cap_log2, a.window, a.starts, a.q_sb, a.q_sh,    \
      a.q_sp

template <int D, int WG>
static bool run_wgmma(const Shape& s, Args a, bf16* out_ref, float* lse_ref, double flops,
                      float ref_us) {
  auto kernel = wgmma_fwd_kernel<D, WG>;
  const int smem = wgmma_shared_bytes<D, WG>();
  CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  const dim3 grid((s.len + 64 * WG - 1) / (64 * WG), s.batch * s.heads);
  const size_t n_out = (size_t)s.batch * s.heads * s.len * D, n_lse = n_out / D;
  const WgLayout layouts[] = {{16, 1024, FA_TILE * 128, 1024}, {16, 1024, 1024, FA_TILE * 128}};
  for (const WgLayout& lay : layouts) {
    CHECK(cudaMemset(a.out, 0, n_out * 2));
    CHECK(cudaMemset(a.lse, 0, n_lse * 4));
    kernel<<<grid, 128 * WG, smem>>>(FWD_ARGS(a), lay);
    CHECK(cudaDeviceSynchronize());
    const Diff d = compare(a, out_ref, lse_ref, n_out, n_lse);
    printf("  wgmma WG=%d layout v(lbo %d, sbo %d): max |out diff| %.3g, max |lse diff| %.3g\n", WG,
           lay.v_lbo, lay.v_sbo, d.out, d.lse);
    if (d.out < 3e-2f && d.lse < 1e-3f) {
      const float us = time_us([&] { kernel<<<grid, 128 * WG, smem>>>(FWD_ARGS(a), lay); });
      printf("  wgmma WG=%d: %8.1f us, %6.1f TFLOP/s, %.2fx mma.sync\n", WG, us,
             flops / us * 1e-6, ref_us / us);
      return true;
    }
  }
  return false;
}

template <int D> static void run_shape(const Shape& s) {
  const size_t nq = (size_t)s.batch * s.heads * s.len * D,
               nkv = (size_t)s.batch * s.kv_heads * s.len * D, n_lse = nq / D;
  Args a{};
  a.q = random_bf16(nq, 1);
  a.k = random_bf16(nkv, 2);
  a.v = random_bf16(nkv, 3);
  CHECK(cudaMalloc(&a.out, nq * 2));
  CHECK(cudaMalloc(&a.lse, n_lse * 4));
  a.heads = s.heads;
  a.group = s.heads / s.kv_heads;
  a.q_len = a.kv_len = s.len;
  a.k_sb = a.v_sb = (long long)s.kv_heads * s.len * D;
  a.k_sh = a.v_sh = (long long)s.len * D;
  a.k_sp = a.v_sp = D;
  a.scale_log2 = 1.4426950408889634f / sqrtf((float)D);
  a.cap_log2 = 0.f;
  a.window = 1 << 30;
  a.starts = nullptr;
  a.q_sb = (long long)s.heads * s.len * D;
  a.q_sh = (long long)s.len * D;
  a.q_sp = D;
  bf16* out_ref;
  float* lse_ref;
  CHECK(cudaMalloc(&out_ref, nq * 2));
  CHECK(cudaMalloc(&lse_ref, n_lse * 4));
  const double flops = 4.0 * s.batch * s.heads * (double)s.len * s.len * D / 2;
  auto ref = D == 64 ? flash_mma_fwd_d64_bf16 : flash_mma_fwd_d128_bf16;
  const int ref_smem = 5 * FA_TILE * (D + 8) * 2;
  CHECK(cudaFuncSetAttribute(ref, cudaFuncAttributeMaxDynamicSharedMemorySize, ref_smem));
  const dim3 ref_grid((s.len + 63) / 64, s.batch * s.heads);
  Args r = a;
  r.out = out_ref;
  r.lse = lse_ref;
  ref<<<ref_grid, FM_THREADS, ref_smem>>>(FWD_ARGS(r));
  CHECK(cudaDeviceSynchronize());
  const float ref_us = time_us([&] { ref<<<ref_grid, FM_THREADS, ref_smem>>>(FWD_ARGS(r)); });
  printf("%s (batch %d, %d heads, %d kv heads, %d positions, head size %d):\n", s.name, s.batch,
         s.heads, s.kv_heads, s.len, D);
  printf("  mma.sync: %8.1f us, %6.1f TFLOP/s\n", ref_us, flops / ref_us * 1e-6);
  run_wgmma<D, 1>(s, a, out_ref, lse_ref, flops, ref_us);
  run_wgmma<D, 2>(s, a, out_ref, lse_ref, flops, ref_us);
  if constexpr (D == 64) run_wgmma<D, 3>(s, a, out_ref, lse_ref, flops, ref_us);
  CHECK(cudaFree((void*)a.q));
  CHECK(cudaFree((void*)a.k));
  CHECK(cudaFree((void*)a.v));
  CHECK(cudaFree(a.out));
  CHECK(cudaFree(a.lse));
  CHECK(cudaFree(out_ref));
  CHECK(cudaFree(lse_ref));
}

// Largest |x - y| over n bf16 values (infinite where either is NaN).
static float max_diff_bf16(const bf16* x, const bf16* y, size_t n) {
  std::vector<bf16> a(n), b(n);
  CHECK(cudaMemcpy(a.data(), x, n * 2, cudaMemcpyDeviceToHost));
  CHECK(cudaMemcpy(b.data(), y, n * 2, cudaMemcpyDeviceToHost));
  float d = 0.f;
  for (size_t i = 0; i < n; ++i) {
    const float e = fabsf(__bfloat162float(a[i]) - __bfloat162float(b[i]));
    d = std::isnan(e) ? INFINITY : fmaxf(d, e);
  }
  return d;
}

static float max_diff_f32(const float* x, const float* y, size_t n) {
  std::vector<float> a(n), b(n);
  CHECK(cudaMemcpy(a.data(), x, n * 4, cudaMemcpyDeviceToHost));
  CHECK(cudaMemcpy(b.data(), y, n * 4, cudaMemcpyDeviceToHost));
  float d = 0.f;
  for (size_t i = 0; i < n; ++i) {
    const float e = fabsf(a[i] - b[i]);
    d = std::isnan(e) ? INFINITY : fmaxf(d, e);
  }
  return d;
}

// The backward kernels: flash_mma's query and key/value gradients against the wgmma ones at
// WG warpgroups a block, on the forward's output and log-sum-exps and a random dout.
template <int D, int WG> static void run_backward(const Shape& s) {
  const size_t nq = (size_t)s.batch * s.heads * s.len * D,
               nkv = (size_t)s.batch * s.kv_heads * s.len * D, n_rows = nq / D;
  Args a{};
  a.q = random_bf16(nq, 1);
  a.k = random_bf16(nkv, 2);
  a.v = random_bf16(nkv, 3);
  CHECK(cudaMalloc(&a.out, nq * 2));
  CHECK(cudaMalloc(&a.lse, n_rows * 4));
  a.heads = s.heads;
  a.group = s.heads / s.kv_heads;
  a.q_len = a.kv_len = s.len;
  a.k_sb = a.v_sb = (long long)s.kv_heads * s.len * D;
  a.k_sh = a.v_sh = (long long)s.len * D;
  a.k_sp = a.v_sp = D;
  a.scale_log2 = 1.4426950408889634f / sqrtf((float)D);
  a.window = 1 << 30;
  a.q_sb = (long long)s.heads * s.len * D;
  a.q_sh = (long long)s.len * D;
  a.q_sp = D;
  const float scale = 1.f / sqrtf((float)D);
  auto fwd = D == 64 ? flash_mma_fwd_d64_bf16 : flash_mma_fwd_d128_bf16;
  const int fwd_smem = 5 * FA_TILE * (D + 8) * 2;
  CHECK(cudaFuncSetAttribute(fwd, cudaFuncAttributeMaxDynamicSharedMemorySize, fwd_smem));
  fwd<<<dim3((s.len + 63) / 64, s.batch * s.heads), FM_THREADS, fwd_smem>>>(FWD_ARGS(a));
  const bf16* dout = random_bf16(nq, 4);
  float *delta_ref, *delta_w;
  bf16 *dq_ref, *dq_w, *dk_ref, *dk_w, *dv_ref, *dv_w;
  CHECK(cudaMalloc(&delta_ref, n_rows * 4));
  CHECK(cudaMalloc(&delta_w, n_rows * 4));
  for (bf16** x : {&dq_ref, &dq_w}) CHECK(cudaMalloc(x, nq * 2));
  for (bf16** x : {&dk_ref, &dk_w, &dv_ref, &dv_w}) CHECK(cudaMalloc(x, nkv * 2));
  const long long g_sb = a.k_sb, g_sh = a.k_sh, g_sp = D;
#define SHAPE_ARGS                                                                              \
  a.heads, a.group, a.q_len, a.kv_len, a.k_sb, a.k_sh, a.k_sp, a.v_sb, a.v_sh, a.v_sp,         \
      a.scale_log2, a.cap_log2, a.window, a.starts
  auto ref_q = D == 64 ? flash_mma_bwd_q_d64_bf16 : flash_mma_bwd_q_d128_bf16;
  auto ref_kv = D == 64 ? flash_mma_bwd_kv_d64_bf16 : flash_mma_bwd_kv_d128_bf16;
  const int ref_q_smem = 6 * FA_TILE * (D + 8) * 2 + 4 * FA_TILE,
            ref_kv_smem = 6 * FA_TILE * (D + 8) * 2 + 4 * 2 * 3 * FA_TILE;
  CHECK(cudaFuncSetAttribute(ref_q, cudaFuncAttributeMaxDynamicSharedMemorySize, ref_q_smem));
  CHECK(cudaFuncSetAttribute(ref_kv, cudaFuncAttributeMaxDynamicSharedMemorySize, ref_kv_smem));
  const dim3 ref_q_grid((s.len + 63) / 64, s.batch * s.heads),
      ref_kv_grid((s.len + 63) / 64, s.batch * s.kv_heads);
  auto run_ref_q = [&] {
    ref_q<<<ref_q_grid, FM_THREADS, ref_q_smem>>>(a.q, a.k, a.v, dout, a.lse, a.out, delta_ref,
                                                  dq_ref, SHAPE_ARGS, scale, a.q_sb, a.q_sh,
                                                  a.q_sp);
  };
  auto run_ref_kv = [&] {
    ref_kv<<<ref_kv_grid, FM_THREADS, ref_kv_smem>>>(a.q, a.k, a.v, dout, a.lse, delta_ref,
                                                     dk_ref, dv_ref, SHAPE_ARGS, scale, a.q_sb,
                                                     a.q_sh, a.q_sp, g_sb, g_sh, g_sp);
  };
  run_ref_q();
  run_ref_kv();
  CHECK(cudaDeviceSynchronize());
  const double flops_q = 3 * 2.0 * s.batch * s.heads * (double)s.len * s.len * D / 2,
               flops_kv = 4 * 2.0 * s.batch * s.heads * (double)s.len * s.len * D / 2;
  const float ref_q_us = time_us(run_ref_q), ref_kv_us = time_us(run_ref_kv);
  printf("%s backward, head size %d:\n", s.name, D);
  printf("  mma.sync query gradients:     %8.1f us, %6.1f TFLOP/s\n", ref_q_us,
         flops_q / ref_q_us * 1e-6);
  printf("  mma.sync key/value gradients: %8.1f us, %6.1f TFLOP/s\n", ref_kv_us,
         flops_kv / ref_kv_us * 1e-6);
  const WgLayout lay{16, 1024, FA_TILE * 128, 1024};
  auto wq = wgmma_bwd_q_kernel<D, WG>;
  const int wq_smem = wgmma_bwd_q_shared_bytes<D, WG>();
  CHECK(cudaFuncSetAttribute(wq, cudaFuncAttributeMaxDynamicSharedMemorySize, wq_smem));
  const dim3 wq_grid((s.len + 64 * WG - 1) / (64 * WG), s.batch * s.heads);
  auto run_wq = [&] {
    wq<<<wq_grid, 128 * WG, wq_smem>>>(a.q, a.k, a.v, dout, a.lse, a.out, delta_w, dq_w,
                                      SHAPE_ARGS, scale, a.q_sb, a.q_sh, a.q_sp, lay);
  };
  auto wkv = wgmma_bwd_kv_kernel<D, WG>;
  const int wkv_smem = wgmma_bwd_kv_shared_bytes<D, WG>();
  CHECK(cudaFuncSetAttribute(wkv, cudaFuncAttributeMaxDynamicSharedMemorySize, wkv_smem));
  const dim3 wkv_grid((s.len + 64 * WG - 1) / (64 * WG), s.batch * s.kv_heads);
  auto run_wkv = [&] {
    wkv<<<wkv_grid, 128 * WG, wkv_smem>>>(a.q, a.k, a.v, dout, a.lse, delta_ref, dk_w, dv_w,
                                          SHAPE_ARGS, scale, a.q_sb, a.q_sh, a.q_sp, g_sb, g_sh,
                                          g_sp, lay);
  };
#undef SHAPE_ARGS
  run_wq();
  CHECK(cudaDeviceSynchronize());
  printf("  wgmma WG=%d query gradients: max |dq diff| %.3g, max |delta diff| %.3g\n", WG,
         max_diff_bf16(dq_w, dq_ref, nq), max_diff_f32(delta_w, delta_ref, n_rows));
  run_wkv();
  CHECK(cudaDeviceSynchronize());
  printf("  wgmma WG=%d key/value gradients: max |dk diff| %.3g, max |dv diff| %.3g\n", WG,
         max_diff_bf16(dk_w, dk_ref, nkv), max_diff_bf16(dv_w, dv_ref, nkv));
  const float wq_us = time_us(run_wq), wkv_us = time_us(run_wkv);
  printf("  wgmma WG=%d query gradients:     %8.1f us, %6.1f TFLOP/s, %.2fx\n", WG, wq_us,
         flops_q / wq_us * 1e-6, ref_q_us / wq_us);
  printf("  wgmma WG=%d key/value gradients: %8.1f us, %6.1f TFLOP/s, %.2fx\n", WG, wkv_us,
         flops_kv / wkv_us * 1e-6, ref_kv_us / wkv_us);
  for (const void* x : {(const void*)a.q, (const void*)a.k, (const void*)a.v,
                        (const void*)a.out, (const void*)a.lse, (const void*)dout,
                        (const void*)delta_ref, (const void*)delta_w, (const void*)dq_ref,
                        (const void*)dq_w, (const void*)dk_ref, (const void*)dk_w,
                        (const void*)dv_ref, (const void*)dv_w})
    CHECK(cudaFree(const_cast<void*>(x)));
}

int main() {
  cudaDeviceProp prop;
  CHECK(cudaGetDeviceProperties(&prop, 0));
  printf("%s\n", prop.name);
  run_shape<64>({"1b", 4, 32, 8, 2048, 64});
  run_shape<64>({"base", 16, 12, 12, 512, 64});
  run_shape<128>({"8b", 4, 32, 8, 2048, 128});
  run_backward<128, 1>({"8b", 4, 32, 8, 2048, 128});
  run_backward<64, 1>({"1b", 4, 32, 8, 2048, 64});
  run_backward<64, 2>({"1b", 4, 32, 8, 2048, 64});
  run_backward<64, 1>({"base", 16, 12, 12, 512, 64});
  run_backward<64, 2>({"base", 16, 12, 12, 512, 64});
  return 0;
}
