// A greedy decode step's layers as a replayed step runs them: per layer the q/k/v product
// taking its norm, the step attention, the output product adding the residual, the gate/up
// product taking its norm, and the down product adding the residual, each product launched
// programmatically (kernels/decode.cu's entry points), captured in one CUDA graph and replayed.
// Times a step with the library's step attention (`decode_step_tiles64`, launched
// programmatically and in stream order), with none (the floor the attention adds to) and with
// a kernel that only waits and copies (what any kernel of its own costs there), at base's and
// the 1b's shapes (bf16, random weights, a cache of 272 positions as the bench's generate rows
// hold), with the products' grids one warp a feature or capped at the blocks the device holds
// at once (src/gemv_fused.rs' programmatic_grid caps the q/k/v product's).
//
// On a GPU machine, from the repository root:
//   nvcc -O3 -arch=sm_90a -std=c++17 -Icrates/ops/kernels -Ibench bench/decode_chain.cu \
//     -o decode_chain
//   ./decode_chain [REPLAYS]
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

constexpr int D = 64, MAX_LEN = 272;

// A separate kernel's least cost in the chain: waits for the product, copies the queries.
__global__ void wait_copy(const bf16* qkv, bf16* out) {
  dependents_may_launch();
  wait_for_previous();
  out[blockIdx.x * D + threadIdx.x] = qkv[blockIdx.x * D + threadIdx.x];
}

// Fills x[0, n) with values in [-scale, scale) from a hash of the index and a seed.
__global__ void fill_kernel(bf16* x, size_t n, uint32_t seed, float scale) {
  for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
       i += (size_t)gridDim.x * blockDim.x) {
    uint32_t h = ((uint32_t)i ^ (seed * 0x9e3779b9u)) * 2654435761u;
    h ^= h >> 15;
    h *= 2246822519u;
    h ^= h >> 13;
    x[i] = __float2bfloat16(((h & 0xffff) / 65536.f - 0.5f) * 2.f * scale);
  }
}

static bf16* filled(size_t n, uint32_t seed, float scale) {
  bf16* x;
  CHECK(cudaMalloc(&x, n * sizeof(bf16)));
  fill_kernel<<<1024, 256>>>(x, n, seed, scale);
  CHECK(cudaGetLastError());
  return x;
}

// Launches kernel on grid x block with `shared` bytes, programmatically where `pdl`.
template <typename... Params, typename... Args>
static void launch(cudaStream_t stream, void (*kernel)(Params...), int grid, int block,
                   size_t shared, bool pdl, Args... args) {
  cudaLaunchConfig_t config = {};
  config.gridDim = dim3(grid);
  config.blockDim = dim3(block);
  config.dynamicSmemBytes = shared;
  config.stream = stream;
  cudaLaunchAttribute attribute;
  attribute.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attribute.val.programmaticStreamSerializationAllowed = 1;
  config.attrs = &attribute;
  config.numAttrs = pdl ? 1 : 0;
  CHECK(cudaLaunchKernelEx(&config, kernel, static_cast<Params>(args)...));
}

struct Shape {
  const char* name;
  int hidden, heads, kv_heads, inter, layers;
};

struct Layer {
  bf16 *qkv_w, *o_w, *gate_up_w, *down_w, *norm1, *norm2, *cache;
};

// An attention form: a name and how it is launched.
struct Form {
  const char* name;
  std::function<void(cudaStream_t, const bf16*, bf16*, bf16*)> run;  // qkv, cache, out
};

int main(int argc, char** argv) {
  const int replays = argc > 1 ? atoi(argv[1]) : 200;
  cudaStream_t stream;
  CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  int sms = 0;
  CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
  const Shape shapes[] = {{"base", 768, 12, 12, 2048, 12}, {"1b", 2048, 32, 8, 8192, 16}};
  bf16* cos = filled(MAX_LEN * D / 2, 1, 1.f);
  bf16* sin = filled(MAX_LEN * D / 2, 2, 1.f);
  uint32_t* position;
  CHECK(cudaMalloc(&position, sizeof(uint32_t)));
  auto set_position = [&](uint32_t p) {
    CHECK(cudaMemcpy(position, &p, sizeof p, cudaMemcpyHostToDevice));
  };
  for (const Shape& s : shapes) {
    const int width = (s.heads + 2 * s.kv_heads) * D, q_width = s.heads * D;
    std::vector<Layer> layers(s.layers);
    for (int l = 0; l < s.layers; ++l) {
      Layer& y = layers[l];
      y.qkv_w = filled((size_t)width * s.hidden, 10 + l, 0.05f);
      y.o_w = filled((size_t)s.hidden * q_width, 100 + l, 0.05f);
      y.gate_up_w = filled((size_t)2 * s.inter * s.hidden, 200 + l, 0.05f);
      y.down_w = filled((size_t)s.hidden * s.inter, 300 + l, 0.05f);
      y.norm1 = filled(s.hidden, 400 + l, 1.f);
      y.norm2 = filled(s.hidden, 500 + l, 1.f);
      y.cache = filled((size_t)2 * s.kv_heads * MAX_LEN * D, 600 + l, 1.f);
    }
    bf16* x0 = filled(s.hidden, 7, 1.f);
    bf16 *xa, *xb, *qkv, *attn, *mlp;
    CHECK(cudaMalloc(&xa, s.hidden * sizeof(bf16)));
    CHECK(cudaMalloc(&xb, s.hidden * sizeof(bf16)));
    CHECK(cudaMalloc(&qkv, width * sizeof(bf16)));
    CHECK(cudaMalloc(&attn, q_width * sizeof(bf16)));
    CHECK(cudaMalloc(&mlp, s.inter * sizeof(bf16)));
    CHECK(cudaDeviceSynchronize());

    const int heads = s.heads, kv = s.kv_heads;
    auto tiles = [=](bool pdl) {
      return [=](cudaStream_t st, const bf16* q, bf16* cache, bf16* out) {
        launch(st, decode_step_tiles64_bf16, heads, 512, 0, pdl, q, cos, sin, cache, out, 1,
               heads, kv, D, MAX_LEN, 0, (const uint32_t*)position, 0.125f, 0.f, 0);
      };
    };
    std::vector<Form> forms = {
        {"none", nullptr},
        {"tiles, 16 warps", tiles(true)},
        {"tiles, 16 warps, stream order", tiles(false)},
        {"wait and copy (64 threads a head)",
         [=](cudaStream_t st, const bf16* q, bf16*, bf16* o) {
           launch(st, wait_copy, heads, D, 0, true, q, o);
         }},
    };

    printf("%s: hidden %d, %d heads, %d kv heads, ffn %d, %d layers, a cache of %d\n", s.name,
           s.hidden, s.heads, s.kv_heads, s.inter, s.layers, MAX_LEN);

    // Blocks of each product: one warp a feature, or at most what the device holds at once
    // (`capped`, a mask: 1 the q/k/v product, 2 the gate/up product, 4 the residual ones).
    auto blocks = [&](auto kernel, int out, size_t shared, bool cap) {
      int per_sm = 0;
      CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, 256, shared));
      return cap ? std::min(out / 8, per_sm * sms) : out / 8;
    };
    // The layers' chain: the residual's copy first, in stream order, then every product
    // programmatically, the attention as its form launches it.
    auto step = [&](const Form& form, int capped) {
      CHECK(cudaMemcpyAsync(xa, x0, s.hidden * sizeof(bf16), cudaMemcpyDeviceToDevice, stream));
      for (const Layer& y : layers) {
        const size_t normed = s.hidden * sizeof(bf16);
        launch(stream, gemv_rms_bf16, blocks(gemv_rms_bf16, width, normed, capped & 1), 256,
               normed, true, (const bf16*)xa, (const bf16*)y.qkv_w, (const bf16*)y.norm1, qkv, 1,
               s.hidden, width, 1e-5f, 0.f);
        const bf16* o_in = qkv;
        if (form.run) {
          form.run(stream, qkv, y.cache, attn);
          o_in = attn;
        }
        const int residual_blocks = blocks(gemv_residual_bf16, s.hidden, 0, capped & 4);
        launch(stream, gemv_residual_bf16, residual_blocks, 256, 0, true, o_in,
               (const bf16*)y.o_w, (const bf16*)xa, xb, 1, q_width, s.hidden);
        launch(stream, gemv_swiglu_rms_bf16,
               blocks(gemv_swiglu_rms_bf16, s.inter, normed, capped & 2), 256, normed, true,
               (const bf16*)xb, (const bf16*)y.gate_up_w, (const bf16*)y.norm2, mlp, 1, s.hidden,
               s.inter, 1e-5f, 0.f);
        launch(stream, gemv_residual_bf16, residual_blocks, 256, 0, true, (const bf16*)mlp,
               (const bf16*)y.down_w, (const bf16*)xb, xa, 1, s.inter, s.hidden);
      }
    };
    auto step_us = [&](const Form& form, int capped) {
      return replay_us(stream, [&] { step(form, capped); }, replays, 5);
    };
    for (uint32_t p : {270u}) {
      set_position(p);
      for (int capped : {0, 1, 3, 7}) {
        printf("  position %u, grids capped (1 q/k/v, 2 gate/up, 4 residual): %d "
               "(layers' step, us; attention a layer)\n",
               p, capped);
        float floor = 0.f;
        for (const Form& f : forms) {
          // Three rounds, the best kept.
          float best = 1e30f;
          for (int round = 0; round < 3; ++round) best = fminf(best, step_us(f, capped));
          if (!f.run) floor = best;
          printf("    %-38s %8.2f  %6.2f\n", f.name, best, (best - floor) / s.layers);
        }
      }
    }
    for (Layer& y : layers)
      for (bf16* p : {y.qkv_w, y.o_w, y.gate_up_w, y.down_w, y.norm1, y.norm2, y.cache})
        CHECK(cudaFree(p));
    for (bf16* p : {x0, xa, xb, qkv, attn, mlp}) CHECK(cudaFree(p));
  }
  return 0;
}
