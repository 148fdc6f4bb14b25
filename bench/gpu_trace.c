// A timeline of a CUDA program without Nsight Systems (which the lent GPU machine lacks): a
// CUPTI activity tracer loaded into the program, writing one line per kernel, copy, memset,
// synchronization and driver API call, all on CUPTI's one clock. bench/gpu_gaps.py reads it
// and says where the GPU sat idle between kernels and what the host was doing then.
//
// Build on the GPU machine against its own CUPTI (record layouts change between versions, so
// the struct names are passed in; bench/gpu_trace.sh does this):
//   gcc -O2 -shared -fPIC bench/gpu_trace.c -I$CUPTI/include -L$CUPTI/lib64 -lcupti
//       -DKERNEL_RECORD=CUpti_ActivityKernel10 (and the other records) -o gpu_trace.so
// Run:
//   LLMTOOL_TRACE_OUT=trace.tsv LD_PRELOAD=./gpu_trace.so ./llmtool bench --device cuda ...
//
// Lines (tab-separated, times in ns):
//   K start end correlation stream grid_x grid_y grid_z block_x name     a kernel
//   C start end correlation bytes copy_kind                              a copy
//   S start end correlation bytes                                        a memset
//   Y start end correlation sync_type                                    a synchronization
//   A start end correlation thread callback_id name                      a driver API call
#include <cupti.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>

#ifndef KERNEL_RECORD
#define KERNEL_RECORD CUpti_ActivityKernel10
#endif
#ifndef MEMCPY_RECORD
#define MEMCPY_RECORD CUpti_ActivityMemcpy6
#endif
#ifndef MEMSET_RECORD
#define MEMSET_RECORD CUpti_ActivityMemset4
#endif
#ifndef SYNC_RECORD
#define SYNC_RECORD CUpti_ActivitySynchronization2
#endif

#define BUFFER_BYTES (8u << 20)

static FILE* out;
static pthread_mutex_t out_lock = PTHREAD_MUTEX_INITIALIZER;

static void check(CUptiResult result, const char* what) {
  if (result == CUPTI_SUCCESS) return;
  const char* text = "?";
  cuptiGetResultString(result, &text);
  fprintf(stderr, "gpu_trace: %s: %s\n", what, text);
}

static void CUPTIAPI buffer_requested(uint8_t** buffer, size_t* size, size_t* max_records) {
  *buffer = aligned_alloc(8, BUFFER_BYTES);
  *size = *buffer ? BUFFER_BYTES : 0;
  *max_records = 0;
}

static void write_record(const CUpti_Activity* record) {
  switch (record->kind) {
    case CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL:
    case CUPTI_ACTIVITY_KIND_KERNEL: {
      const KERNEL_RECORD* k = (const KERNEL_RECORD*)record;
      fprintf(out, "K\t%llu\t%llu\t%u\t%u\t%d\t%d\t%d\t%d\t%s\n", (unsigned long long)k->start,
              (unsigned long long)k->end, k->correlationId, k->streamId, k->gridX, k->gridY,
              k->gridZ, k->blockX, k->name ? k->name : "?");
      break;
    }
    case CUPTI_ACTIVITY_KIND_MEMCPY: {
      const MEMCPY_RECORD* c = (const MEMCPY_RECORD*)record;
      fprintf(out, "C\t%llu\t%llu\t%u\t%llu\t%u\n", (unsigned long long)c->start,
              (unsigned long long)c->end, c->correlationId, (unsigned long long)c->bytes,
              (unsigned)c->copyKind);
      break;
    }
    case CUPTI_ACTIVITY_KIND_MEMSET: {
      const MEMSET_RECORD* s = (const MEMSET_RECORD*)record;
      fprintf(out, "S\t%llu\t%llu\t%u\t%llu\n", (unsigned long long)s->start,
              (unsigned long long)s->end, s->correlationId, (unsigned long long)s->bytes);
      break;
    }
    case CUPTI_ACTIVITY_KIND_SYNCHRONIZATION: {
      const SYNC_RECORD* y = (const SYNC_RECORD*)record;
      fprintf(out, "Y\t%llu\t%llu\t%u\t%u\n", (unsigned long long)y->start,
              (unsigned long long)y->end, y->correlationId, (unsigned)y->type);
      break;
    }
    case CUPTI_ACTIVITY_KIND_DRIVER: {
      const CUpti_ActivityAPI* a = (const CUpti_ActivityAPI*)record;
      const char* name = "?";
      cuptiGetCallbackName(CUPTI_CB_DOMAIN_DRIVER_API, a->cbid, &name);
      fprintf(out, "A\t%llu\t%llu\t%u\t%u\t%u\t%s\n", (unsigned long long)a->start,
              (unsigned long long)a->end, a->correlationId, a->threadId, (unsigned)a->cbid, name);
      break;
    }
    default:
      break;
  }
}

static void CUPTIAPI buffer_completed(CUcontext context, uint32_t stream, uint8_t* buffer,
                                      size_t size, size_t valid) {
  (void)context;
  (void)stream;
  (void)size;
  CUpti_Activity* record = NULL;
  pthread_mutex_lock(&out_lock);
  while (out && cuptiActivityGetNextRecord(buffer, valid, &record) == CUPTI_SUCCESS)
    write_record(record);
  size_t dropped = 0;
  cuptiActivityGetNumDroppedRecords(context, stream, &dropped);
  if (out && dropped) fprintf(stderr, "gpu_trace: %zu records dropped\n", dropped);
  pthread_mutex_unlock(&out_lock);
  free(buffer);
}

static void finish(void) {
  check(cuptiActivityFlushAll(1), "flush");
  pthread_mutex_lock(&out_lock);
  if (out) fclose(out);
  out = NULL;
  pthread_mutex_unlock(&out_lock);
}

__attribute__((constructor)) static void start(void) {
  const char* path = getenv("LLMTOOL_TRACE_OUT");
  if (!path) return;
  out = fopen(path, "w");
  if (!out) {
    perror(path);
    return;
  }
  check(cuptiActivityRegisterCallbacks(buffer_requested, buffer_completed), "callbacks");
  const CUpti_ActivityKind kinds[] = {
      CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL, CUPTI_ACTIVITY_KIND_MEMCPY,
      CUPTI_ACTIVITY_KIND_MEMSET, CUPTI_ACTIVITY_KIND_SYNCHRONIZATION};
  for (size_t i = 0; i < sizeof kinds / sizeof kinds[0]; ++i)
    check(cuptiActivityEnable(kinds[i]), "enable");
  // Tracing every driver call slows the host: LLMTOOL_TRACE_NO_API=1 leaves them out.
  if (!getenv("LLMTOOL_TRACE_NO_API"))
    check(cuptiActivityEnable(CUPTI_ACTIVITY_KIND_DRIVER), "enable driver calls");
  atexit(finish);
}
