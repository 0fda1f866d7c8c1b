/* Collectives between the ranks of one training job: the one interface the trainer calls, with
 * Gloo (CPU, TCP) or NCCL (GPU) behind the same table of operations.
 *
 * Peers find each other through a key-value rendezvous that the caller supplies; in the worker
 * those calls go to the coordinator's KV RPCs, in tests to a folder. Every call returns a zn_err
 * code (0 on success); after a failure zn_comm_error() says what went wrong, including the text
 * of the transport's error and the peer it names. No call blocks past the configured timeout: a
 * dead or silent peer turns into ZN_ERR_COMM, never a hang, and leaves the communicator broken:
 * destroy it and rendezvous again under a new prefix. A communicator is used by one thread
 * at a time, and every rank must issue the same collectives in the same order. */
#ifndef ZN_COMM_H
#define ZN_COMM_H

#include <stddef.h>

#include "zn_err.h"

#ifdef __cplusplus
extern "C" {
#endif

/* The rendezvous store. set publishes a value under a key; get returns a malloc'd copy that the
 * caller frees, or ZN_ERR_NOT_FOUND if the key is absent; wait blocks until every key exists and
 * returns ZN_ERR_TIMEOUT once timeout_ms has passed without that. */
typedef struct {
  void* ctx;
  int (*set)(void* ctx, const char* key, const void* value, size_t len);
  int (*get)(void* ctx, const char* key, void** value, size_t* len);
  int (*wait)(void* ctx, const char* const* keys, int nkeys, int timeout_ms);
} zn_kv;

typedef struct zn_comm zn_comm;

typedef struct {
  int rank;
  int size;
  const char* host;   /* address to listen on, e.g. "127.0.0.1" */
  const char* prefix; /* key prefix of this run, so that runs sharing a store do not meet */
  int timeout_ms;     /* the rendezvous and every collective fail after this instead of hanging */
} zn_comm_config;

/* Connects this rank to all others over TCP. A world of size 1 needs no network and no kv (it
 * may be NULL). On failure *out is NULL and err holds the reason. */
int zn_comm_create_gloo(const zn_comm_config* cfg, const zn_kv* kv, zn_comm** out, char* err,
                        size_t errlen);

/* Sums buf element-wise over all ranks, in place. Every rank receives the same bits. */
int zn_comm_allreduce_sum(zn_comm* comm, float* buf, size_t n);
int zn_comm_allreduce_sum_f64(zn_comm* comm, double* buf, size_t n);

/* Device backends (NCCL) only; the others fail with ZN_ERR_INVALID. These split an allreduce in
 * two, so that a training step can be queued ahead of the host or captured in a CUDA graph:
 * queued returns once the collective is on the backend's stream, without waiting for it; and
 * wait_event waits for a cudaEvent_t recorded on that stream after it, under the same watchdog
 * as every collective (timeout, errors, stop flag). In a world of one both return at once: there
 * is no peer to wait for, and the caller synchronises on its event itself. */
int zn_comm_allreduce_sum_queued(zn_comm* comm, float* buf, size_t n);
int zn_comm_wait_event(zn_comm* comm, void* event);

/* Reduce-scatter of a sum, in place. buf holds size * count floats in size blocks of count, block
 * r being buf[r * count, (r + 1) * count). On return block `rank` holds the element-wise sum of
 * that block over all ranks; the other blocks are scratch and their contents undefined. count
 * may be 0. The order of the additions is fixed, so the same inputs give the same bits on every
 * run. */
int zn_comm_reduce_scatter_sum(zn_comm* comm, float* buf, size_t count);

/* All-gather in place. buf holds size * bytes bytes in size blocks; block `rank`, [rank * bytes,
 * (rank + 1) * bytes), is this rank's input. On return every block holds its owner's input.
 * bytes may be 0. */
int zn_comm_allgather(zn_comm* comm, void* buf, size_t bytes);

/* Copies root's buf into every other rank's buf. */
int zn_comm_broadcast(zn_comm* comm, void* buf, size_t bytes, int root);

/* Returns once every rank has entered the barrier. */
int zn_comm_barrier(zn_comm* comm);

/* Text of the last failure on this communicator; "" if none. */
const char* zn_comm_error(const zn_comm* comm);

int zn_comm_rank(const zn_comm* comm);
int zn_comm_size(const zn_comm* comm);

/* Closes the connections and frees the communicator; NULL is allowed. */
void zn_comm_destroy(zn_comm* comm);

#ifdef __cplusplus
}
#endif

#endif
