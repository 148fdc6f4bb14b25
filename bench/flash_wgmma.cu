// The Hopper flash kernels (kernels/flash_wgmma.cuh: wgmma, sm_90a) against flash_mma's
// (mma.sync), bf16, causal, random inputs, at the shapes the 1b, 8b and base presets train at:
// first each output is compared (the forward's outputs and log-sum-exps, the key/value
// gradients; the query gradients and deltas to rounding), then each kernel is timed (20
// launches after 3). The forward at heads of 64 and 128, the backward at 64.
//
// On a GPU machine, from the repository root:
//   nvcc -O3 -std=c++17 -gencode=arch=compute_90a,code=sm_90a -Icrates/ops/kernels \
//     bench/flash_wgmma.cu -o flash_wgmma && ./flash_wgmma
// (session 33's first version, with the kernels inside and one to three warpgroups a block,
// is commit 0413c2d.)
#include "attention.cu"

#include <cuda_runtime.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "cuda_check.h"

typedef __nv_bfloat16 bf16;

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



static float to_float(bf16 x) { return __bfloat162float(x); }
static float to_float(float x) { return x; }

// Largest |x - y| over n values on the device (infinite where either is NaN).
template <typename T> static float max_diff(const T* x, const T* y, size_t n) {
  std::vector<T> a(n), b(n);
  CHECK(cudaMemcpy(a.data(), x, n * sizeof(T), cudaMemcpyDeviceToHost));
  CHECK(cudaMemcpy(b.data(), y, n * sizeof(T), cudaMemcpyDeviceToHost));
  float d = 0.f;
  for (size_t i = 0; i < n; ++i) {
    const float e = fabsf(to_float(a[i]) - to_float(b[i]));
    d = std::isnan(e) ? INFINITY : fmaxf(d, e);
  }
  return d;
}

// One line: both kernels' times and rates, and wgmma's speedup.
static void report(const char* what, double flops, float ref_us, float us) {
  printf("  %-20s mma.sync %8.1f us (%5.1f TFLOP/s), wgmma %8.1f us (%5.1f TFLOP/s): %.2fx\n",
         what, ref_us, flops / ref_us * 1e-6, us, flops / us * 1e-6, ref_us / us);
}

// Random q, k, v of shape `s` (head size D), and the arguments a forward takes.
template <int D> static Args inputs(const Shape& s) {
  const size_t nq = (size_t)s.batch * s.heads * s.len * D,
               nkv = (size_t)s.batch * s.kv_heads * s.len * D;
  Args a{};
  a.q = random_bf16(nq, 1);
  a.k = random_bf16(nkv, 2);
  a.v = random_bf16(nkv, 3);
  CHECK(cudaMalloc(&a.out, nq * 2));
  CHECK(cudaMalloc(&a.lse, nq / D * 4));
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
  return a;
}

#define FWD_ARGS(a)                                                                            \
  a.q, a.k, a.v, a.out, a.lse, a.heads, a.group, a.q_len, a.kv_len, a.k_sb, a.k_sh, a.k_sp,  \
      a.v_sb, a.v_sh, a.v_sp, a.scale_log2, a.cap_log2, a.window, a.starts, a.q_sb, a.q_sh,    \
      a.q_sp
#define SHAPE_ARGS(a)                                                                          \
  a.heads, a.group, a.q_len, a.kv_len, a.k_sb, a.k_sh, a.k_sp, a.v_sb, a.v_sh, a.v_sp,         \
      a.scale_log2, a.cap_log2, a.window, a.starts

// A kernel's launch with `smem` bytes of dynamic shared memory allowed.
template <typename Kernel> static void allow(Kernel kernel, int smem) {
  CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
}

template <int D> static void run_forward(const Shape& s) {
  Args a = inputs<D>(s), w = a;
  const size_t n_out = (size_t)s.batch * s.heads * s.len * D, n_lse = n_out / D;
  CHECK(cudaMalloc(&w.out, n_out * 2));
  CHECK(cudaMalloc(&w.lse, n_lse * 4));
  auto ref = D == 64 ? flash_mma_fwd_d64_bf16 : flash_mma_fwd_d128_bf16;
  auto hopper = D == 64 ? flash_wgmma_fwd_d64_bf16 : flash_wgmma_fwd_d128_bf16;
  const int ref_smem = 5 * FA_TILE * (D + 8) * 2, smem = 1024 + 5 * FA_TILE * D * 2;
  allow(ref, ref_smem);
  allow(hopper, smem);
  const dim3 grid((s.len + 63) / 64, s.batch * s.heads);
  auto run_ref = [&] { ref<<<grid, FM_THREADS, ref_smem>>>(FWD_ARGS(a)); };
  auto run = [&] { hopper<<<grid, FM_THREADS, smem>>>(FWD_ARGS(w)); };
  run_ref();
  run();
  CHECK(cudaDeviceSynchronize());
  const double flops = 4.0 * s.batch * s.heads * (double)s.len * s.len * D / 2;
  printf("%s forward (batch %d, %d heads, %d kv heads, %d positions, head size %d):\n", s.name,
         s.batch, s.heads, s.kv_heads, s.len, D);
  printf("  max |out diff| %.3g, max |lse diff| %.3g\n", max_diff(w.out, a.out, n_out),
         max_diff(w.lse, a.lse, n_lse));
  report("forward", flops, time_us(run_ref), time_us(run));
  for (const void* x : {(const void*)a.q, (const void*)a.k, (const void*)a.v, (const void*)a.out,
                        (const void*)a.lse, (const void*)w.out, (const void*)w.lse})
    CHECK(cudaFree(const_cast<void*>(x)));
}

// The query and key/value gradients at heads of 64, on the forward's output and log-sum-exps
// and a random dout.
static void run_backward(const Shape& s) {
  constexpr int D = 64;
  Args a = inputs<D>(s);
  const size_t nq = (size_t)s.batch * s.heads * s.len * D,
               nkv = (size_t)s.batch * s.kv_heads * s.len * D, n_rows = nq / D;
  const int fwd_smem = 5 * FA_TILE * (D + 8) * 2;
  allow(flash_mma_fwd_d64_bf16, fwd_smem);
  const dim3 q_grid((s.len + 63) / 64, s.batch * s.heads),
      kv_grid((s.len + 63) / 64, s.batch * s.kv_heads);
  flash_mma_fwd_d64_bf16<<<q_grid, FM_THREADS, fwd_smem>>>(FWD_ARGS(a));
  const bf16* dout = random_bf16(nq, 4);
  float *delta_ref, *delta_w;
  bf16 *dq_ref, *dq_w, *dk_ref, *dk_w, *dv_ref, *dv_w;
  CHECK(cudaMalloc(&delta_ref, n_rows * 4));
  CHECK(cudaMalloc(&delta_w, n_rows * 4));
  for (bf16** x : {&dq_ref, &dq_w}) CHECK(cudaMalloc(x, nq * 2));
  for (bf16** x : {&dk_ref, &dk_w, &dv_ref, &dv_w}) CHECK(cudaMalloc(x, nkv * 2));
  const long long g_sb = a.k_sb, g_sh = a.k_sh, g_sp = D;
  const float scale = 1.f / sqrtf((float)D);
  const int ref_q_smem = 6 * FA_TILE * (D + 8) * 2 + 4 * FA_TILE,
            ref_kv_smem = 6 * FA_TILE * (D + 8) * 2 + 4 * 2 * 3 * FA_TILE,
            q_smem = 1024 + 7 * FA_TILE * D * 2 + 4 * FA_TILE,
            kv_smem = 1024 + 6 * FA_TILE * D * 2 + 4 * 2 * 3 * FA_TILE;
  allow(flash_mma_bwd_q_d64_bf16, ref_q_smem);
  allow(flash_mma_bwd_kv_d64_bf16, ref_kv_smem);
  allow(flash_wgmma_bwd_q_d64_bf16, q_smem);
  allow(flash_wgmma_bwd_kv_d64_bf16, kv_smem);
  auto ref_q = [&] {
    flash_mma_bwd_q_d64_bf16<<<q_grid, FM_THREADS, ref_q_smem>>>(
        a.q, a.k, a.v, dout, a.lse, a.out, delta_ref, dq_ref, SHAPE_ARGS(a), scale, a.q_sb,
        a.q_sh, a.q_sp);
  };
  auto ref_kv = [&] {
    flash_mma_bwd_kv_d64_bf16<<<kv_grid, FM_THREADS, ref_kv_smem>>>(
        a.q, a.k, a.v, dout, a.lse, delta_ref, dk_ref, dv_ref, SHAPE_ARGS(a), scale, a.q_sb,
        a.q_sh, a.q_sp, g_sb, g_sh, g_sp);
  };
  auto hopper_q = [&] {
    flash_wgmma_bwd_q_d64_bf16<<<q_grid, FM_THREADS, q_smem>>>(
        a.q, a.k, a.v, dout, a.lse, a.out, delta_w, dq_w, SHAPE_ARGS(a), scale, a.q_sb, a.q_sh,
        a.q_sp);
  };
  auto hopper_kv = [&] {
    flash_wgmma_bwd_kv_d64_bf16<<<kv_grid, FM_THREADS, kv_smem>>>(
        a.q, a.k, a.v, dout, a.lse, delta_ref, dk_w, dv_w, SHAPE_ARGS(a), scale, a.q_sb, a.q_sh,
        a.q_sp, g_sb, g_sh, g_sp);
  };
  ref_q();
  ref_kv();
  hopper_q();
  hopper_kv();
  CHECK(cudaDeviceSynchronize());
  const double flops_q = 3 * 2.0 * s.batch * s.heads * (double)s.len * s.len * D / 2,
               flops_kv = 4 * 2.0 * s.batch * s.heads * (double)s.len * s.len * D / 2;
  printf("%s backward, head size %d:\n", s.name, D);
  printf("  max |dq diff| %.3g, max |delta diff| %.3g, max |dk diff| %.3g, max |dv diff| %.3g\n",
         max_diff(dq_w, dq_ref, nq), max_diff(delta_w, delta_ref, n_rows),
         max_diff(dk_w, dk_ref, nkv), max_diff(dv_w, dv_ref, nkv));
  const float rq = time_us(ref_q), rkv = time_us(ref_kv), wq = time_us(hopper_q),
              wkv = time_us(hopper_kv);
  report("query gradients", flops_q, rq, wq);
  report("key/value gradients", flops_kv, rkv, wkv);
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
  const Shape one_b{"1b", 4, 32, 8, 2048, 64}, base{"base", 16, 12, 12, 512, 64},
      eight_b{"8b", 4, 32, 8, 2048, 128};
  run_forward<64>(one_b);
  run_forward<64>(base);
  run_forward<128>(eight_b);
  run_backward(one_b);
  run_backward(base);
  return 0;
}
