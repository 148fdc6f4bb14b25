// A decode step's kernels timed alone: each replayed 100 times from a CUDA graph (the way a
// replayed step runs them), bf16, launched as src/ops' launchers launch them.
//
// The attention: kernels/decode.cu's 1,024-thread `decode_step_wide` and `decode_step_tiles`
// at 4, 8 and 16 warps, heads of 64, with base's and the 1b's head layouts and a 2,048-position
// cache, on their own and after a q/k/v product, beside an empty kernel (a graph node's own
// cost); first every tiled variant's output is checked against the 1,024-thread kernel's at
// several positions (inside the cache, its last, past it).
//
// The products of a base and a 1b step: the q/k/v and gate/up products taking their norm
// (`gemv_rms`, `gemv_swiglu_rms`, grids of the blocks the device holds at once), the output
// and down products adding the residual (`gemv_residual`), the head (`gemv`, and `gemv_rms`
// taking the final norm, as a decode step runs it; `gemv_rms_maxima` + `argmax_finish`, a
// greedy step's head with its argmax) and the greedy argmax (`argmax_chunks` +
// `argmax_finish`), each with the bandwidth its bytes imply.
//
// To time another version of the kernels, point -I at a copy of its crates/ops/kernels. On a
// GPU machine, from the repository root:
//   nvcc -O3 -arch=sm_90 -std=c++17 -Icrates/ops/kernels bench/decode_micro.cu -o decode_micro
//   ./decode_micro
#include "decode.cu"

#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <vector>

#include "cuda_check.h"
#include "graph_replay.h"

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

// Microseconds a launch of `body`: body(0) ... body(n - 1) captured in a graph, replayed 20
// times.
template <typename Body>
static float graph_us(cudaStream_t stream, Body body) {
  const int n = 100;
  return replay_us(stream, [&] {
    for (int i = 0; i < n; ++i) body(i);
  }, 20, 3) / n;
}

static void attention(cudaStream_t stream) {
  const int d = 64, hidden = 768, tables = 4096;
  const Shape shapes[] = {{"base", 12, 12, 272, {16, 140, 270}},
                          {"1b", 32, 8, 272, {16, 140, 270}},
                          {"1b, 2,048 positions", 32, 8, 2048, {1000, 2040}}};
  CHECK(cudaFuncSetAttribute(decode_step_wide_bf16, cudaFuncAttributeMaxDynamicSharedMemorySize,
                             48 * 1024));
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
    for (uint32_t p : s.timed_positions) {
      set_position(p);
      const float alone = graph_us(stream, [&](int) { product(); });
      const float empty =
          graph_us(stream, [&](int) { empty_kernel<<<s.heads, 128, 0, stream>>>(sink); });
      printf("  position %u: q/k/v product %.2f us, empty kernel %.2f us\n", p, alone, empty);
      for (int kernel = 0; kernel < 4; ++kernel) {
        const float own = graph_us(stream, [&](int) { step(kernel); });
        const float after = graph_us(stream, [&](int) {
          product();
          step(kernel);
        }) - alone;
        printf("    %-34s %6.2f us alone, %6.2f us after the product\n", names[kernel], own,
               after);
      }
    }
  }
}

// Blocks of `threads` threads of `kernel` (with `shared` bytes) the device holds at once.
template <typename Kernel>
static int resident_blocks(Kernel kernel, int threads, size_t shared) {
  int per_sm = 0, sms = 0;
  CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, threads, shared));
  CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
  return per_sm * sms;
}

// Fills x[0, n) with values in [-0.5, 0.5) from a hash of the index.
__global__ void fill_kernel(bf16* x, size_t n) {
  for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
       i += (size_t)gridDim.x * blockDim.x) {
    uint32_t h = (uint32_t)i * 2654435761u;
    h ^= h >> 15;
    x[i] = __float2bfloat16((h & 0xffff) / 65536.f - 0.5f);
  }
}

static void products(cudaStream_t stream) {
  struct Model {
    const char* name;
    int hidden, heads, kv_heads, ffn, vocab;
  };
  const Model models[] = {{"base", 768, 12, 12, 2048, 32000}, {"1b", 2048, 32, 8, 8192, 128256}};
  const int d = 64, warps = 8, threads = 32 * warps;  // per_warp_row: 8 warps a block
  // A step reads each layer's weights once, and its weights do not fit in L2: the launches of
  // a graph take their weights from consecutive slices of a 1 GiB pool.
  const size_t pool = (size_t)1 << 29;  // bf16 elements
  bf16* weights;
  CHECK(cudaMalloc(&weights, pool * sizeof(bf16)));
  fill_kernel<<<1024, 256, 0, stream>>>(weights, pool);
  for (const Model& m : models) {
    const int qkv = (m.heads + 2 * m.kv_heads) * d, attended = m.heads * d;
    bf16* x = random_bf16(std::max(m.ffn, m.hidden), 12);
    bf16* norm = random_bf16(m.hidden, 13);
    bf16* residual = random_bf16(m.hidden, 14);
    bf16* y;
    float* values;
    int* indices;
    uint32_t* token;
    CHECK(cudaMalloc(&y, std::max((size_t)m.vocab, 2 * (size_t)m.ffn) * sizeof(bf16)));
    const int chunks = (m.vocab + 4095) / 4096;
    // Room for argmax_chunks' partial maxima or for a head's blocks'.
    const int partials = 4096;
    CHECK(cudaMalloc(&values, partials * sizeof(float)));
    CHECK(cudaMalloc(&indices, partials * sizeof(int)));
    CHECK(cudaMalloc(&token, sizeof(uint32_t)));
    const size_t shared = m.hidden * sizeof(bf16);
    auto normed_grid = [&](auto kernel, int out) {
      return std::min(resident_blocks(kernel, threads, shared), (out + warps - 1) / warps);
    };
    const int qkv_grid = normed_grid(gemv_rms_bf16, qkv);
    const int glu_grid = normed_grid(gemv_swiglu_rms_bf16, m.ffn);
    const int head_grid = normed_grid(gemv_rms_bf16, m.vocab);
    const int maxima_grid = normed_grid(gemv_rms_maxima_bf16, m.vocab);
    struct Product {
      const char* name;
      size_t elements;  // of the weight
      std::function<void(const bf16*)> run;
    };
    const Product list[] = {
        {"q/k/v with its norm (gemv_rms)", (size_t)qkv * m.hidden,
         [&](const bf16* w) {
           gemv_rms_bf16<<<qkv_grid, threads, shared, stream>>>(x, w, norm, y, 1, m.hidden, qkv,
                                                                1e-5f, 0.f);
         }},
        {"output + residual (gemv_residual)", (size_t)m.hidden * attended,
         [&](const bf16* w) {
           gemv_residual_bf16<<<(m.hidden + warps - 1) / warps, threads, 0, stream>>>(
               x, w, residual, y, 1, attended, m.hidden);
         }},
        {"gate/up with its norm (gemv_swiglu_rms)", 2 * (size_t)m.ffn * m.hidden,
         [&](const bf16* w) {
           gemv_swiglu_rms_bf16<<<glu_grid, threads, shared, stream>>>(x, w, norm, y, 1, m.hidden,
                                                                       m.ffn, 1e-5f, 0.f);
         }},
        {"down + residual (gemv_residual)", (size_t)m.hidden * m.ffn,
         [&](const bf16* w) {
           gemv_residual_bf16<<<(m.hidden + warps - 1) / warps, threads, 0, stream>>>(
               x, w, residual, y, 1, m.ffn, m.hidden);
         }},
        {"head (gemv)", (size_t)m.vocab * m.hidden,
         [&](const bf16* w) {
           gemv_bf16<<<(m.vocab + warps - 1) / warps, threads, 0, stream>>>(x, w, y, 1, m.hidden,
                                                                            m.vocab);
         }},
        {"head with the final norm (gemv_rms)", (size_t)m.vocab * m.hidden,
         [&](const bf16* w) {
           gemv_rms_bf16<<<head_grid, threads, shared, stream>>>(x, w, norm, y, 1, m.hidden,
                                                                 m.vocab, 1e-5f, 0.f);
         }},
        {"head, norm and argmax (gemv_rms_maxima + finish)", (size_t)m.vocab * m.hidden,
         [&](const bf16* w) {
           gemv_rms_maxima_bf16<<<maxima_grid, threads, shared, stream>>>(
               x, w, norm, values, indices, m.hidden, m.vocab, 1e-5f, 0.f);
           argmax_finish<<<1, 256, 0, stream>>>(values, indices, token, maxima_grid, 1, nullptr,
                                                nullptr, 1);
         }},
        {"argmax (chunks + finish)", 0,
         [&](const bf16*) {
           argmax_chunks_bf16<<<dim3(chunks, 1), 256, 0, stream>>>(y, values, indices, m.vocab,
                                                                  chunks);
           argmax_finish<<<1, 256, 0, stream>>>(values, indices, token, chunks, 1, nullptr, nullptr, 1);
         }},
    };
    printf("%s products (hidden %d, ffn %d, vocab %d):\n", m.name, m.hidden, m.ffn, m.vocab);
    for (const Product& p : list) {
      // Slices of the pool start on 256 bytes.
      const size_t stride = (std::max<size_t>(p.elements, 1) + 127) / 128 * 128;
      const size_t slices = std::max<size_t>(1, pool / stride);
      p.run(weights);
      CHECK(cudaStreamSynchronize(stream));
      CHECK(cudaGetLastError());
      const float us = graph_us(stream, [&](int i) { p.run(weights + (i % slices) * stride); });
      const double bytes = 2.0 * p.elements;
      if (p.elements == 0) {
        printf("  %-40s %8.2f us\n", p.name, us);
      } else {
        printf("  %-40s %8.2f us  %8.2f MB of weights  %5.2f TB/s\n", p.name, us, bytes / 1e6,
               bytes / (us * 1e-6) / 1e12);
      }
    }
  }
  CHECK(cudaFree(weights));
}

int main() {
  cudaStream_t stream;
  CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  attention(stream);
  products(stream);
  return 0;
}
