/* How the ranks of an NCCL job agree on one communicator id: rank 0 makes it
 * (ncclGetUniqueId) and publishes it in the job's key-value rendezvous; every
 * other rank waits for the key and reads it. Kept apart from the NCCL backend
 * so that it is tested on machines without a GPU. */
#ifndef ZN_NCCL_ID_H
#define ZN_NCCL_ID_H

#include <stdint.h>

#include "zn_comm.h"

#define ZN_NCCL_ID_BYTES 128 /* sizeof(ncclUniqueId) */

/* Fills id on rank 0 (0 on success, else a zn_err code; err says why). */
typedef int (*zn_nccl_make_id)(uint8_t id[ZN_NCCL_ID_BYTES], char* err, size_t errlen);

/* Every rank ends with rank 0's id, or an error naming the key and the cause. */
int zn_nccl_exchange_id(const zn_kv* kv, const char* prefix, int rank, int timeout_ms,
                        zn_nccl_make_id make_id, uint8_t id[ZN_NCCL_ID_BYTES], char* err,
                        size_t errlen);

#endif
