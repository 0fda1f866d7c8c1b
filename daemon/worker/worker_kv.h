/* The collectives' rendezvous store (zn_kv) over the coordinator's KvSet,
 * KvGet and KvWait RPCs. */
#ifndef ZN_WORKER_KV_H
#define ZN_WORKER_KV_H

#include "zn_comm.h"
#include "zn_rpc.h"

#include <stdatomic.h>

typedef struct {
  zn_rpc_channel* channel;
  atomic_int* stop; /* non-zero: give up waiting (the job is being stopped) */
} worker_kv_ctx;

/* The returned zn_kv points at ctx, which must outlive it. */
zn_kv worker_kv(worker_kv_ctx* ctx);

#endif
