// CHECK(call): a CUDA runtime call whose error, if any, is printed with its place before the
// benchmark exits (bench/*.cu).
#pragma once

#include <cuda_runtime.h>

#include <cstdio>
#include <cstdlib>

#define CHECK(x)                                                                  \
  do {                                                                            \
    cudaError_t e = (x);                                                          \
    if (e != cudaSuccess) {                                                       \
      printf("%s:%d %s\n", __FILE__, __LINE__, cudaGetErrorString(e));            \
      exit(1);                                                                    \
    }                                                                             \
  } while (0)
