// A decode step's attention kernels timed alone: each replayed 100 times from a CUDA graph, on
// its own and after a q/k/v product (the gemv_rms of base's shape), bf16, heads of 64, with
// base's and the 1b's head layouts and a 2,048-position cache. Compares kernels/decode.cu's
// 1,024-thread `decode_step_wide` with `decode_step_tiles` at 4, 8 and 16 warps, and an empty
// kernel (a graph node's own cost); first checks every tiled variant's output against the
// 1,024-thread kernel's at several positions (inside the cache, its last, past it). On a GPU
// machine, from the repository root:
//   nvcc -O3 -arch=sm_90 -std=c++17 -Icrates/ops/kernels bench/decode_attention_micro.cu \
//     -o decode_attention_micro && ./decode_attention_micro
#include "decode.cu"

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

template <int WARPS>
__global__ void __launch_bounds__(WARPS * 32)
    tiles(const bf16* qkv, const bf16* cos, const bf16* sin, bf16* cache, bf16* out, int heads,
          int kv_heads, int max_len, const uint32_t* position) {
  decode_step_tiles<bf16, 64, WARPS>(qkv, cos, sin, cache, out, 1, heads, kv_heads, 64, max_len,
                                     0, position, 0.125f, 0.f, 0);
}

__global__ void empty_kernel(float* out) {
  if (threadIdx.x == 0) out[blockIdx.x] = 1.f;
}

static bf16* random_bf16(size_t n, unsigned seed) {
  std::vector<bf16> host(n);
  srand(seed);
  for (auto& x : host) x = __float2bfloat16(rand() / (float)RAND_MAX - 0.5f);
  bf16* device;
  CHECK(cudaMalloc(&device, n * sizeof(bf16)));
  CHECK(cudaMemcpy(device, host.data(), n * sizeof(bf16), cudaMemcpyHostToDevice));
  return device;
}

struct Shape {
  const char* name;
  int heads, kv_heads, max_len;
  std::vector<uint32_t> timed_positions;
};

int main() {
  const int d = 64, hidden = 768, tables = 4096;
  const Shape shapes[] = {{"base", 12, 12, 272, {16, 140, 270}},
                          {"1b", 32, 8, 272, {16, 140, 270}},
                          {"1b, 2,048 positions", 32, 8, 2048, {1000, 2040}}};
  CHECK(cudaFuncSetAttribute(decode_step_wide_bf16, cudaFuncAttributeMaxDynamicSharedMemorySize,
                             48 * 1024));
  cudaStream_t stream;
  CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  for (const Shape& s : shapes) {
    const int width = (s.heads + 2 * s.kv_heads) * d;
    bf16* qkv = random_bf16(width, 1);
    bf16* cos = random_bf16(tables * d / 2, 2);
    bf16* sin = random_bf16(tables * d / 2, 3);
    bf16* cache = random_bf16((size_t)2 * s.kv_heads * s.max_len * d, 4);
    bf16* x = random_bf16(hidden, 5);
    bf16* w = random_bf16((size_t)width * hidden, 6);
    bf16* nw = random_bf16(hidden, 7);
    bf16 *out, *y;
    float *scores, *sink;
    uint32_t* position;
    CHECK(cudaMalloc(&out, s.heads * d * sizeof(bf16)));
    CHECK(cudaMalloc(&y, width * sizeof(bf16)));
    CHECK(cudaMalloc(&scores, s.heads * s.max_len * sizeof(float)));
    CHECK(cudaMalloc(&sink, 4096 * sizeof(float)));
    CHECK(cudaMalloc(&position, sizeof(uint32_t)));
    const int main_shared = (3 * d + 1024 * 9) * sizeof(float);
    // 0: the 1,024-thread kernel; 1-3: tiles at 4, 8, 16 warps.
    const char* names[] = {"decode_step_wide (1,024 threads)", "decode_step_tiles, 4 warps",
                           "decode_step_tiles, 8 warps", "decode_step_tiles, 16 warps"};
    auto step = [&](int kernel) {
      switch (kernel) {
        case 0:
          decode_step_wide_bf16<<<s.heads, 1024, main_shared, stream>>>(
              qkv, cos, sin, cache, out, scores, 1, s.heads, s.kv_heads, d, d, s.max_len, 0,
              position, 0.125f, 0.f, 0);
          break;
        case 1:
          tiles<4><<<s.heads, 128, 0, stream>>>(qkv, cos, sin, cache, out, s.heads, s.kv_heads,
                                                s.max_len, position);
          break;
        case 2:
          tiles<8><<<s.heads, 256, 0, stream>>>(qkv, cos, sin, cache, out, s.heads, s.kv_heads,
                                                s.max_len, position);
          break;
        default:
          tiles<16><<<s.heads, 512, 0, stream>>>(qkv, cos, sin, cache, out, s.heads,
                                                 s.kv_heads, s.max_len, position);
      }
    };
    auto product = [&] {
      gemv_rms_bf16<<<132 * 4, 256, hidden * sizeof(bf16), stream>>>(x, w, nw, y, 1, hidden,
                                                                      width, 1e-5f, 0.f);
    };
    auto set_position = [&](uint32_t p) {
      CHECK(cudaMemcpy(position, &p, sizeof p, cudaMemcpyHostToDevice));
    };
    auto output = [&] {
      CHECK(cudaStreamSynchronize(stream));
      CHECK(cudaGetLastError());
      std::vector<bf16> host(s.heads * d);
      CHECK(cudaMemcpy(host.data(), out, host.size() * sizeof(bf16), cudaMemcpyDeviceToHost));
      return host;
    };
    printf("%s: %d heads, %d kv heads, a cache of %d positions\n", s.name, s.heads, s.kv_heads,
           s.max_len);
    for (uint32_t p : {0u, 15u, 200u, (uint32_t)s.max_len - 1, (uint32_t)s.max_len + 5}) {
      set_position(p);
      step(0);
      const std::vector<bf16> want = output();
      for (int kernel = 1; kernel < 4; ++kernel) {
        step(kernel);
        const std::vector<bf16> got = output();
        float worst = 0.f;
        for (size_t i = 0; i < got.size(); ++i)
          worst = fmaxf(worst, fabsf(__bfloat162float(got[i]) - __bfloat162float(want[i])));
        printf("  position %u, %s: largest difference %.3g\n", p, names[kernel], worst);
      }
    }
    // Microseconds a launch of `body` (n launches captured in a graph, replayed 20 times).
    auto graph_us = [&](auto body) {
      const int n = 100, replays = 20;
      cudaGraph_t graph;
      cudaGraphExec_t exec;
      CHECK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeGlobal));
      for (int i = 0; i < n; ++i) body();
      CHECK(cudaStreamEndCapture(stream, &graph));
      CHECK(cudaGraphInstantiate(&exec, graph, 0));
      for (int i = 0; i < 3; ++i) CHECK(cudaGraphLaunch(exec, stream));
      cudaEvent_t begin, end;
      CHECK(cudaEventCreate(&begin));
      CHECK(cudaEventCreate(&end));
      CHECK(cudaEventRecord(begin, stream));
      for (int i = 0; i < replays; ++i) CHECK(cudaGraphLaunch(exec, stream));
      CHECK(cudaEventRecord(end, stream));
      CHECK(cudaEventSynchronize(end));
      float ms;
      CHECK(cudaEventElapsedTime(&ms, begin, end));
      CHECK(cudaGraphExecDestroy(exec));
      CHECK(cudaGraphDestroy(graph));
      return ms * 1e3f / (replays * n);
    };
    for (uint32_t p : s.timed_positions) {
      set_position(p);
      const float alone = graph_us(product);
      const float empty = graph_us([&] { empty_kernel<<<s.heads, 128, 0, stream>>>(sink); });
      printf("  position %u: q/k/v product %.2f us, empty kernel %.2f us\n", p, alone, empty);
      for (int kernel = 0; kernel < 4; ++kernel) {
        const float own = graph_us([&] { step(kernel); });
        const float after = graph_us([&] {
          product();
          step(kernel);
        }) - alone;
        printf("    %-34s %6.2f us alone, %6.2f us after the product\n", names[kernel], own,
               after);
      }
    }
  }
  return 0;
}
