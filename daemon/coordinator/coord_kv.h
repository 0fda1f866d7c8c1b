/* The coordinator's key-value rendezvous: workers of one job publish their
 * addresses under a per-run prefix and wait for each other's keys before the
 * collectives connect. Values live in memory only: a run that loses its
 * coordinator starts over and publishes again. */
#ifndef ZN_COORD_KV_H
#define ZN_COORD_KV_H

#include <stddef.h>

#include "zn_rpc.h"

typedef struct coord_kv coord_kv;

coord_kv* coord_kv_create(void);
void coord_kv_destroy(coord_kv* kv);

/* Registers KvSet, KvGet and KvWait on the server. */
int coord_kv_add_methods(coord_kv* kv, zn_rpc_server* server);
/* Fails waits whose deadline has passed; called from the server tick. */
void coord_kv_expire(coord_kv* kv);
/* Forgets every key under prefix (a finished run's keys). */
void coord_kv_drop_prefix(coord_kv* kv, const char* prefix);
size_t coord_kv_count(const coord_kv* kv);

#endif
