/* The NCCL backend; see zn_comm_nccl.h.
 *
 * The communicator is created non-blocking (ncclConfig_t.blocking = 0), so
 * that its creation, like every collective, can be watched and aborted: a
 * rank whose peer died during the rendezvous fails after the timeout instead
 * of waiting forever in ncclCommInitRank. */
#include "zn_comm_nccl.h"

#include <cuda_runtime_api.h>
#include <nccl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "zn_comm_backend.h"
#include "zn_nccl_id.h"

typedef struct {
  ncclComm_t comm;
  int rank;
  cudaStream_t stream;
  atomic_int* stop;
  int timeout_ms;
  float* scratch;      /* one device float, for the barrier */
  cudaEvent_t waiting; /* the event wait_event is watching */
} nccl_impl;

static double now_sec(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

static void abort_comm(nccl_impl* x) {
  if (x->comm) ncclCommAbort(x->comm);
  x->comm = NULL;
}

/* Waits until `done` says the work is over, watching errors, the stop flag
 * and the clock. done returns 1 when finished, 0 while in progress, -1 on a
 * CUDA error (written into err). */
static int watch(nccl_impl* x, int (*done)(nccl_impl*, char*, size_t), const char* what, char* err,
                 size_t errlen) {
  double deadline = now_sec() + x->timeout_ms / 1000.0;
  for (;;) {
    int d = done(x, err, errlen);
    if (d > 0) return ZN_OK;
    if (d < 0) return ZN_ERR_COMM;
    ncclResult_t async = ncclSuccess;
    if (x->comm) ncclCommGetAsyncError(x->comm, &async);
    if (async != ncclSuccess && async != ncclInProgress) {
      snprintf(err, errlen, "%s: NCCL: %s; communicator aborted", what, ncclGetErrorString(async));
      abort_comm(x);
      return ZN_ERR_COMM;
    }
    if (x->stop && atomic_load(x->stop)) {
      snprintf(err, errlen, "%s: stopped (the job is ending); communicator aborted", what);
      abort_comm(x);
      return ZN_ERR_COMM;
    }
    if (now_sec() > deadline) {
      snprintf(err, errlen,
               "%s: no progress within %d ms (a peer is gone or stalled); "
               "communicator aborted",
               what, x->timeout_ms);
      abort_comm(x);
      return ZN_ERR_COMM;
    }
    nanosleep(&(struct timespec){0, 100 * 1000}, NULL);
  }
}

/* Whether the communicator's state is ncclSuccess. Any other state counts as not done: an error
 * is then reported by watch(), which aborts the communicator as NCCL requires after one (a
 * destroy of a communicator in error fails and leaks it). */
static int comm_ready(nccl_impl* x, char* err, size_t errlen) {
  ncclResult_t state = ncclInProgress;
  ncclCommGetAsyncError(x->comm, &state);
  return state == ncclSuccess;
}

/* What a query of a stream or event says. Not ready is no error, but the runtime may keep it as
 * the thread's last error, which the next launch check (cudaGetLastError) would then report as
 * that launch's failure: it is cleared here. */
static int query_done(cudaError_t q, char* err, size_t errlen) {
  if (q == cudaSuccess) return 1;
  if (q == cudaErrorNotReady) {
    cudaGetLastError();
    return 0;
  }
  snprintf(err, errlen, "CUDA: %s", cudaGetErrorString(q));
  return -1;
}

static int stream_done(nccl_impl* x, char* err, size_t errlen) {
  return query_done(cudaStreamQuery(x->stream), err, errlen);
}

static int event_done(nccl_impl* x, char* err, size_t errlen) {
  return query_done(cudaEventQuery(x->waiting), err, errlen);
}

int zn_nccl_unique_id(uint8_t id[ZN_NCCL_ID_BYTES], char* err, size_t errlen) {
  ncclUniqueId unique;
  ncclResult_t r = ncclGetUniqueId(&unique);
  if (r != ncclSuccess) {
    snprintf(err, errlen, "ncclGetUniqueId: %s", ncclGetErrorString(r));
    return ZN_ERR_COMM;
  }
  memcpy(id, unique.internal, ZN_NCCL_ID_BYTES);
  return ZN_OK;
}

static void destroy(void* impl) {
  nccl_impl* x = impl;
  if (x->comm) ncclCommDestroy(x->comm);
  cudaFree(x->scratch);
  free(x);
}

static int start_comm(nccl_impl* x, const zn_comm_config* cfg, const uint8_t id[], char* err,
                      size_t errlen) {
  ncclUniqueId unique;
  memcpy(unique.internal, id, ZN_NCCL_ID_BYTES);
  ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
  config.blocking = 0;
  ncclResult_t r = ncclCommInitRankConfig(&x->comm, cfg->size, unique, cfg->rank, &config);
  if (r != ncclSuccess && r != ncclInProgress) {
    snprintf(err, errlen, "ncclCommInitRankConfig: %s", ncclGetErrorString(r));
    x->comm = NULL;
    return ZN_ERR_COMM;
  }
  return watch(x, comm_ready, "creating the communicator", err, errlen);
}

static int connect_nccl(const zn_comm_config* cfg, const zn_kv* kv, void* arg, void** impl,
                        char* err, size_t errlen) {
  const zn_comm_nccl_options* o = arg;
  nccl_impl* x = calloc(1, sizeof *x);
  if (!x) return ZN_ERR_NOMEM;
  x->stream = (cudaStream_t)o->stream;
  x->stop = o->stop;
  x->timeout_ms = cfg->timeout_ms;
  x->rank = cfg->rank;
  cudaError_t ce = cudaSetDevice(o->device);
  if (ce == cudaSuccess) ce = cudaMalloc((void**)&x->scratch, sizeof(float));
  if (ce != cudaSuccess) {
    snprintf(err, errlen, "CUDA device %d: %s", o->device, cudaGetErrorString(ce));
    destroy(x);
    return ZN_ERR_COMM;
  }
  uint8_t id[ZN_NCCL_ID_BYTES];
  int rc = zn_nccl_exchange_id(kv, cfg->prefix, cfg->rank, cfg->timeout_ms, zn_nccl_unique_id, id,
                               err, errlen);
  if (rc == ZN_OK) rc = start_comm(x, cfg, id, err, errlen);
  if (rc != ZN_OK) {
    destroy(x);
    return rc;
  }
  *impl = x;
  return ZN_OK;
}

/* Queues a collective and watches it; `r` is what NCCL said when queueing. */
static int finish(nccl_impl* x, ncclResult_t r, const char* what, char* err, size_t errlen) {
  if (!x->comm) {
    snprintf(err, errlen, "%s: the communicator was aborted by an earlier failure", what);
    return ZN_ERR_COMM;
  }
  if (r != ncclSuccess && r != ncclInProgress) {
    snprintf(err, errlen, "%s: NCCL: %s", what, ncclGetErrorString(r));
    return ZN_ERR_COMM;
  }
  /* ncclInProgress: a non-blocking communicator has not yet put the operation on the stream (it
   * may still be connecting to peers, as on the first collective of a kind), so until its state
   * is ncclSuccess an idle stream says nothing. */
  if (r == ncclInProgress) {
    int rc = watch(x, comm_ready, what, err, errlen);
    if (rc != ZN_OK) return rc;
  }
  return watch(x, stream_done, what, err, errlen);
}

static int allreduce_sum(void* impl, void* buf, size_t n, zn_comm_dtype dtype, char* err,
                         size_t errlen) {
  nccl_impl* x = impl;
  if (!x->comm) return finish(x, ncclSuccess, "allreduce", err, errlen);
  ncclDataType_t t = dtype == ZN_COMM_F32 ? ncclFloat32 : ncclFloat64;
  return finish(x, ncclAllReduce(buf, buf, n, t, ncclSum, x->comm, x->stream), "allreduce", err,
                errlen);
}

static int broadcast(void* impl, void* buf, size_t bytes, int root, char* err, size_t errlen) {
  nccl_impl* x = impl;
  if (!x->comm) return finish(x, ncclSuccess, "broadcast", err, errlen);
  return finish(x, ncclBroadcast(buf, buf, bytes, ncclUint8, root, x->comm, x->stream), "broadcast",
                err, errlen);
}

/* In place: NCCL allows the receive buffer to be the sender's own block of the send buffer. */
static int reduce_scatter_sum(void* impl, float* buf, size_t count, char* err, size_t errlen) {
  nccl_impl* x = impl;
  const char* what = "reduce-scatter";
  if (!x->comm) return finish(x, ncclSuccess, what, err, errlen);
  float* mine = buf + (size_t)x->rank * count;
  return finish(x, ncclReduceScatter(buf, mine, count, ncclFloat32, ncclSum, x->comm, x->stream),
                what, err, errlen);
}

/* In place: the send buffer is this rank's block of the receive buffer. */
static int allgather(void* impl, void* buf, size_t bytes, char* err, size_t errlen) {
  nccl_impl* x = impl;
  const char* what = "allgather";
  if (!x->comm) return finish(x, ncclSuccess, what, err, errlen);
  const char* mine = (const char*)buf + (size_t)x->rank * bytes;
  return finish(x, ncclAllGather(mine, buf, bytes, ncclUint8, x->comm, x->stream), what, err,
                errlen);
}

static int barrier(void* impl, char* err, size_t errlen) {
  return allreduce_sum(impl, ((nccl_impl*)impl)->scratch, 1, ZN_COMM_F32, err, errlen);
}

static int allreduce_queue(void* impl, float* buf, size_t n, char* err, size_t errlen) {
  nccl_impl* x = impl;
  if (!x->comm) return finish(x, ncclSuccess, "allreduce", err, errlen);
  ncclResult_t r = ncclAllReduce(buf, buf, n, ncclFloat32, ncclSum, x->comm, x->stream);
  if (r != ncclSuccess && r != ncclInProgress) {
    snprintf(err, errlen, "NCCL: %s", ncclGetErrorString(r));
    return ZN_ERR_COMM;
  }
  /* A non-blocking communicator may return before NCCL has taken the operation in (its state
   * is then ncclInProgress), and no other work may go on the stream until it has. */
  return watch(x, comm_ready, "queueing an allreduce", err, errlen);
}

static int wait_event(void* impl, void* event, char* err, size_t errlen) {
  nccl_impl* x = impl;
  if (!x->comm) {
    snprintf(err, errlen, "the communicator was aborted by an earlier failure");
    return ZN_ERR_COMM;
  }
  x->waiting = (cudaEvent_t)event;
  return watch(x, event_done, "the queued step", err, errlen);
}

static const zn_comm_ops nccl_ops = {"nccl",   allreduce_sum,   broadcast,  barrier,
                                     destroy,  allreduce_queue, wait_event, reduce_scatter_sum,
                                     allgather};

int zn_comm_create_nccl(const zn_comm_config* cfg, const zn_kv* kv,
                        const zn_comm_nccl_options* options, zn_comm** out, char* err,
                        size_t errlen) {
  return zn_comm_create_with(cfg, kv, &nccl_ops, connect_nccl, (void*)options, out, err, errlen);
}
