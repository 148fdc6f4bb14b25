// replay_us(stream, record, replays, warmups): the microseconds one replay of a CUDA graph
// takes, the graph being what record() launches on `stream` while it is captured, timed over
// `replays` replays after `warmups` (bench/*.cu).
#pragma once

#include <cuda_runtime.h>

#include "cuda_check.h"

template <typename Record>
static float replay_us(cudaStream_t stream, Record record, int replays, int warmups) {
  cudaGraph_t graph;
  cudaGraphExec_t exec;
  CHECK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeGlobal));
  record();
  CHECK(cudaStreamEndCapture(stream, &graph));
  CHECK(cudaGraphInstantiate(&exec, graph, 0));
  for (int i = 0; i < warmups; ++i) CHECK(cudaGraphLaunch(exec, stream));
  cudaEvent_t begin, end;
  CHECK(cudaEventCreate(&begin));
  CHECK(cudaEventCreate(&end));
  CHECK(cudaEventRecord(begin, stream));
  for (int i = 0; i < replays; ++i) CHECK(cudaGraphLaunch(exec, stream));
  CHECK(cudaEventRecord(end, stream));
  CHECK(cudaEventSynchronize(end));
  CHECK(cudaGetLastError());
  float ms;
  CHECK(cudaEventElapsedTime(&ms, begin, end));
  CHECK(cudaEventDestroy(begin));
  CHECK(cudaEventDestroy(end));
  CHECK(cudaGraphExecDestroy(exec));
  CHECK(cudaGraphDestroy(graph));
  return ms * 1e3f / replays;
}
