/* The worker's channel to the coordinator, secured as its flags ask. */
#ifndef ZN_WORKER_CHANNEL_H
#define ZN_WORKER_CHANNEL_H

#include "worker.h"
#include "zn_rpc.h"

/* NULL, after logging which flag and file are at fault, when the flags ask
 * for neither TLS nor plain text or a file cannot be used. */
zn_rpc_channel* worker_open_channel(const worker_config* cfg);

#endif
