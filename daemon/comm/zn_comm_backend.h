/* The table of operations a collectives backend (Gloo, NCCL) provides to the
 * dispatch in zn_comm.c. Internal to daemon/comm: callers use zn_comm.h.
 *
 * The dispatch validates arguments, handles the world of one without a backend and adds the
 * operation and rank to error messages, so a backend only moves bytes and reports the text of
 * its own failure into err. Backend functions must not let a C++ exception escape. */
#ifndef ZN_COMM_BACKEND_H
#define ZN_COMM_BACKEND_H

#include <stddef.h>

#include "zn_comm.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef enum { ZN_COMM_F32, ZN_COMM_F64 } zn_comm_dtype;

typedef struct {
  const char* name;
  int (*allreduce_sum)(void* impl, void* buf, size_t n, zn_comm_dtype dtype, char* err,
                       size_t errlen);
  int (*broadcast)(void* impl, void* buf, size_t bytes, int root, char* err, size_t errlen);
  int (*barrier)(void* impl, char* err, size_t errlen);
  void (*destroy)(void* impl);
  /* Device backends only (NULL otherwise): queue an allreduce without waiting for it, and wait
   * for a CUDA event under the backend's watchdog. */
  int (*allreduce_queue)(void* impl, float* buf, size_t n, char* err, size_t errlen);
  int (*wait_event)(void* impl, void* event, char* err, size_t errlen);
  /* buf holds size blocks of count floats (or bytes bytes), count and bytes > 0; see zn_comm.h. */
  int (*reduce_scatter_sum)(void* impl, float* buf, size_t count, char* err, size_t errlen);
  int (*allgather)(void* impl, void* buf, size_t bytes, char* err, size_t errlen);
} zn_comm_ops;

/* Connects a backend to the peers named by cfg (size >= 2, already validated) and returns its
 * state in *impl; arg is the backend's own (a device and stream, for NCCL). */
typedef int (*zn_comm_connect_fn)(const zn_comm_config* cfg, const zn_kv* kv, void* arg,
                                  void** impl, char* err, size_t errlen);

/* The one constructor every backend goes through: validates cfg, handles the world of one, and
 * names the backend, rank and prefix in a connect failure. */
int zn_comm_create_with(const zn_comm_config* cfg, const zn_kv* kv, const zn_comm_ops* ops,
                        zn_comm_connect_fn connect, void* arg, zn_comm** out, char* err,
                        size_t errlen);

#ifdef __cplusplus
}
#endif

#endif
