/* Dispatch for the collectives interface: checks arguments, keeps the error text, runs a world of
 * one without any backend, and forwards everything else to the backend's table of operations.
 *
 * The backend reports only its own failure ("Connection closed by peer [127.0.0.1]:40123"); this
 * file adds which operation failed, on which rank and for how many elements, so that the line the
 * trainer logs is enough to tell which collective of which job broke. */
#define _POSIX_C_SOURCE 200809L

#include "zn_comm.h"

#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "zn_comm_backend.h"

#define ERR_CAP 1024

struct zn_comm {
  const zn_comm_ops* ops; /* NULL in a world of one, where every collective is a no-op */
  void* impl;
  int rank;
  int size;
  char err[ERR_CAP];
};

/* Gloo writes to its sockets with writev, so a write that lands after a peer has died raises
 * SIGPIPE, whose default action would kill the whole daemon instead of failing one job. Gloo's
 * event loop usually reads the closed connection first, but the window is there. A library must
 * not change the process's signal dispositions, so each call blocks SIGPIPE in the calling thread
 * (the write then fails with EPIPE, which Gloo reports as an error) and, before restoring the
 * mask, discards a SIGPIPE raised meanwhile. Gloo's event-loop thread is started during connect,
 * under the same mask, and keeps it for life. */
typedef struct {
  sigset_t old;
  int drain;
} pipe_guard;

static void guard_enter(pipe_guard* g) {
  sigset_t pipe_set;
  sigemptyset(&pipe_set);
  sigaddset(&pipe_set, SIGPIPE);
  pthread_sigmask(SIG_BLOCK, &pipe_set, &g->old);

  /* A SIGPIPE that was already pending, or already blocked by the caller, is the caller's. */
  sigset_t pending;
  sigpending(&pending);
  g->drain = !sigismember(&g->old, SIGPIPE) && !sigismember(&pending, SIGPIPE);
}

static void guard_leave(pipe_guard* g) {
  if (g->drain) {
    sigset_t pipe_set;
    sigemptyset(&pipe_set);
    sigaddset(&pipe_set, SIGPIPE);
    struct timespec zero = {0, 0};
    while (sigtimedwait(&pipe_set, NULL, &zero) == SIGPIPE) {
    }
  }
  pthread_sigmask(SIG_SETMASK, &g->old, NULL);
}

static void put_err(char* err, size_t errlen, const char* fmt, ...) {
  if (!err || errlen == 0) return;
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(err, errlen, fmt, ap);
  va_end(ap);
}

static int check_config(const zn_comm_config* cfg, const zn_kv* kv, char* err, size_t errlen) {
  if (!cfg) {
    put_err(err, errlen, "no config");
    return ZN_ERR_INVALID;
  }
  if (cfg->size < 1 || cfg->rank < 0 || cfg->rank >= cfg->size) {
    put_err(err, errlen, "rank %d is not in a world of size %d", cfg->rank, cfg->size);
    return ZN_ERR_INVALID;
  }
  if (cfg->timeout_ms <= 0) {
    put_err(err, errlen, "timeout_ms must be positive, got %d", cfg->timeout_ms);
    return ZN_ERR_INVALID;
  }
  if (cfg->size == 1) return ZN_OK;

  if (!kv || !kv->set || !kv->get || !kv->wait) {
    put_err(err, errlen, "a world of size %d needs a kv store with set, get and wait", cfg->size);
    return ZN_ERR_INVALID;
  }
  if (!cfg->host || !cfg->host[0] || !cfg->prefix) {
    put_err(err, errlen, "a world of size %d needs a host to listen on and a key prefix",
            cfg->size);
    return ZN_ERR_INVALID;
  }
  return ZN_OK;
}

int zn_comm_create_with(const zn_comm_config* cfg, const zn_kv* kv, const zn_comm_ops* ops,
                        zn_comm_connect_fn connect, void* arg, zn_comm** out, char* err,
                        size_t errlen) {
  if (!out) {
    put_err(err, errlen, "no output pointer");
    return ZN_ERR_INVALID;
  }
  *out = NULL;
  int rc = check_config(cfg, kv, err, errlen);
  if (rc != ZN_OK) return rc;

  zn_comm* comm = calloc(1, sizeof(*comm));
  if (!comm) {
    put_err(err, errlen, "out of memory");
    return ZN_ERR_NOMEM;
  }
  comm->rank = cfg->rank;
  comm->size = cfg->size;

  if (cfg->size > 1) {
    char detail[ERR_CAP] = "";
    pipe_guard g;
    guard_enter(&g);
    rc = connect(cfg, kv, arg, &comm->impl, detail, sizeof(detail));
    guard_leave(&g);
    if (rc != ZN_OK) {
      put_err(err, errlen, "%s rendezvous of rank %d of %d under prefix '%s' on %s: %s", ops->name,
              cfg->rank, cfg->size, cfg->prefix, cfg->host, detail);
      free(comm);
      return rc;
    }
    comm->ops = ops;
  }
  *out = comm;
  return ZN_OK;
}

/* Records a failure as "<what> (rank r of n, backend): <detail>". */
static int fail(zn_comm* comm, int rc, const char* what, const char* detail) {
  const char* backend = comm->ops ? comm->ops->name : "local";
  snprintf(comm->err, sizeof(comm->err), "%s (rank %d of %d, %s): %s", what, comm->rank, comm->size,
           backend, detail);
  return rc;
}

static int allreduce(zn_comm* comm, void* buf, size_t n, zn_comm_dtype dtype) {
  if (!comm) return ZN_ERR_INVALID;
  char what[96];
  snprintf(what, sizeof(what), "allreduce_sum of %zu %s", n,
           dtype == ZN_COMM_F32 ? "floats" : "doubles");
  if (n > 0 && !buf) return fail(comm, ZN_ERR_INVALID, what, "buffer is NULL");
  if (!comm->ops || n == 0) return ZN_OK;

  char detail[ERR_CAP] = "";
  pipe_guard g;
  guard_enter(&g);
  int rc = comm->ops->allreduce_sum(comm->impl, buf, n, dtype, detail, sizeof(detail));
  guard_leave(&g);
  return rc == ZN_OK ? ZN_OK : fail(comm, rc, what, detail);
}

int zn_comm_allreduce_sum(zn_comm* comm, float* buf, size_t n) {
  return allreduce(comm, buf, n, ZN_COMM_F32);
}

int zn_comm_allreduce_sum_f64(zn_comm* comm, double* buf, size_t n) {
  return allreduce(comm, buf, n, ZN_COMM_F64);
}

/* ZN_OK when the backend has the device operation, else a failure naming the backend. */
static int device_only(zn_comm* comm, int present, const char* what) {
  if (present) return ZN_OK;
  char detail[96];
  snprintf(detail, sizeof detail, "the %s backend runs on the host; this needs a GPU backend",
           comm->ops->name);
  return fail(comm, ZN_ERR_INVALID, what, detail);
}

int zn_comm_allreduce_sum_queued(zn_comm* comm, float* buf, size_t n) {
  if (!comm) return ZN_ERR_INVALID;
  if (!comm->ops || n == 0) return ZN_OK;
  const char* what = "queued allreduce_sum";
  int rc = device_only(comm, comm->ops->allreduce_queue != NULL, what);
  if (rc != ZN_OK) return rc;
  char detail[ERR_CAP] = "";
  rc = comm->ops->allreduce_queue(comm->impl, buf, n, detail, sizeof detail);
  return rc == ZN_OK ? ZN_OK : fail(comm, rc, what, detail);
}

int zn_comm_wait_event(zn_comm* comm, void* event) {
  if (!comm) return ZN_ERR_INVALID;
  if (!comm->ops) return ZN_OK;
  const char* what = "waiting for queued collectives";
  int rc = device_only(comm, comm->ops->wait_event != NULL, what);
  if (rc != ZN_OK) return rc;
  char detail[ERR_CAP] = "";
  rc = comm->ops->wait_event(comm->impl, event, detail, sizeof detail);
  return rc == ZN_OK ? ZN_OK : fail(comm, rc, what, detail);
}

/* The two collectives over size blocks of n units each: floats summed by reduce-scatter, or bytes
 * gathered. */
typedef enum { REDUCE_SCATTER_SUM, ALLGATHER } blockwise_op;

static int blockwise(zn_comm* comm, blockwise_op op, void* buf, size_t n) {
  if (!comm) return ZN_ERR_INVALID;
  char what[96];
  if (op == REDUCE_SCATTER_SUM) {
    snprintf(what, sizeof(what), "reduce_scatter_sum of %zu floats per rank", n);
  } else {
    snprintf(what, sizeof(what), "allgather of %zu bytes per rank", n);
  }
  size_t unit = op == REDUCE_SCATTER_SUM ? sizeof(float) : 1;
  if (n > 0 && !buf) return fail(comm, ZN_ERR_INVALID, what, "buffer is NULL");
  if (n > SIZE_MAX / unit / (size_t)comm->size)
    return fail(comm, ZN_ERR_INVALID, what, "the buffer's size overflows size_t");
  if (!comm->ops || n == 0) return ZN_OK;

  char detail[ERR_CAP] = "";
  pipe_guard g;
  guard_enter(&g);
  int rc = op == REDUCE_SCATTER_SUM
               ? comm->ops->reduce_scatter_sum(comm->impl, buf, n, detail, sizeof(detail))
               : comm->ops->allgather(comm->impl, buf, n, detail, sizeof(detail));
  guard_leave(&g);
  return rc == ZN_OK ? ZN_OK : fail(comm, rc, what, detail);
}

int zn_comm_reduce_scatter_sum(zn_comm* comm, float* buf, size_t count) {
  return blockwise(comm, REDUCE_SCATTER_SUM, buf, count);
}

int zn_comm_allgather(zn_comm* comm, void* buf, size_t bytes) {
  return blockwise(comm, ALLGATHER, buf, bytes);
}

int zn_comm_broadcast(zn_comm* comm, void* buf, size_t bytes, int root) {
  if (!comm) return ZN_ERR_INVALID;
  char what[96];
  snprintf(what, sizeof(what), "broadcast of %zu bytes from rank %d", bytes, root);
  if (root < 0 || root >= comm->size) return fail(comm, ZN_ERR_INVALID, what, "no such root");
  if (bytes > 0 && !buf) return fail(comm, ZN_ERR_INVALID, what, "buffer is NULL");
  if (!comm->ops || bytes == 0) return ZN_OK;

  char detail[ERR_CAP] = "";
  pipe_guard g;
  guard_enter(&g);
  int rc = comm->ops->broadcast(comm->impl, buf, bytes, root, detail, sizeof(detail));
  guard_leave(&g);
  return rc == ZN_OK ? ZN_OK : fail(comm, rc, what, detail);
}

int zn_comm_barrier(zn_comm* comm) {
  if (!comm) return ZN_ERR_INVALID;
  if (!comm->ops) return ZN_OK;

  char detail[ERR_CAP] = "";
  pipe_guard g;
  guard_enter(&g);
  int rc = comm->ops->barrier(comm->impl, detail, sizeof(detail));
  guard_leave(&g);
  return rc == ZN_OK ? ZN_OK : fail(comm, rc, "barrier", detail);
}

const char* zn_comm_error(const zn_comm* comm) {
  return comm ? comm->err : "no communicator";
}

int zn_comm_rank(const zn_comm* comm) {
  return comm ? comm->rank : -1;
}

int zn_comm_size(const zn_comm* comm) {
  return comm ? comm->size : 0;
}

void zn_comm_destroy(zn_comm* comm) {
  if (!comm) return;
  if (comm->ops) comm->ops->destroy(comm->impl);
  free(comm);
}
