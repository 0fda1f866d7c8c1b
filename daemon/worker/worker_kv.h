/* The collectives' rendezvous store (zn_kv) over the coordinator's KvSet,
 * KvGet and KvWait RPCs. */
#ifndef ZN_WORKER_KV_H
#define ZN_WORKER_KV_H

#include "zn_comm.h"
#include "zn_rpc.h"

/* The returned zn_kv's ctx is the channel; it needs no cleanup of its own. */
zn_kv worker_kv(zn_rpc_channel* channel);

#endif
