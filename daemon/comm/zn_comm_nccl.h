/* The NCCL backend of the collectives interface (zn_comm.h), for GPU workers.
 *
 * Buffers given to the collectives are device pointers. Each collective is
 * queued on the caller's stream and the call returns once it has completed.
 * While it waits, a watchdog polls three things: the stream, NCCL's
 * asynchronous error, and the caller's stop flag; past cfg->timeout_ms, on an
 * NCCL error, or when the flag is raised, it aborts the communicator
 * (ncclCommAbort) so that no rank is left inside a collective, and the call
 * fails with ZN_ERR_COMM. The communicator's id travels through the job's
 * key-value rendezvous (zn_nccl_id.h). */
#ifndef ZN_COMM_NCCL_H
#define ZN_COMM_NCCL_H

#include <stdatomic.h>

#include "zn_comm.h"
#include "zn_nccl_id.h"

typedef struct {
  int device;       /* CUDA device index of this rank */
  void* stream;     /* cudaStream_t the collectives run on */
  atomic_int* stop; /* non-zero: abort what is in flight (may be NULL) */
} zn_comm_nccl_options;

/* ncclGetUniqueId as a zn_nccl_make_id; needs no GPU. */
int zn_nccl_unique_id(uint8_t id[ZN_NCCL_ID_BYTES], char* err, size_t errlen);

int zn_comm_create_nccl(const zn_comm_config* cfg, const zn_kv* kv,
                        const zn_comm_nccl_options* options, zn_comm** out, char* err,
                        size_t errlen);

#endif
