/* The standard gRPC health service (grpc.health.v1.Health: Check and Watch) on
 * zn_rpc servers, as proto/health.proto describes it.
 *
 * A zn_health holds one status per service name ("" for the whole daemon). The
 * daemon changes a status with zn_health_set, from any thread: the table is
 * locked, and each server's watchers are told on that server's own thread, by
 * zn_health_tick, which the server's tick must call (the RPC layer lets a call
 * be touched only from its server's thread). One zn_health may be served on
 * several servers at once, each running on its own thread.
 *
 * A listener is a server of its own that serves nothing but the health
 * service, on a thread of its own: the worker's --health-listen and the
 * coordinator's plain-text one. */
#ifndef ZN_HEALTH_H
#define ZN_HEALTH_H

#include <stddef.h>

#include "zn_rpc.h"

/* The values of HealthCheckResponse.ServingStatus. */
enum {
  ZN_HEALTH_UNKNOWN = 0,
  ZN_HEALTH_SERVING = 1,
  ZN_HEALTH_NOT_SERVING = 2,
  ZN_HEALTH_SERVICE_UNKNOWN = 3,
};

typedef struct zn_health zn_health;
typedef struct zn_health_endpoint zn_health_endpoint;
typedef struct zn_health_listener zn_health_listener;

zn_health* zn_health_create(void);
/* After every server it was served on has been destroyed. */
void zn_health_destroy(zn_health* h);

/* Sets the status of a service, adding the name if it is new. Safe from any thread. */
int zn_health_set(zn_health* h, const char* service, int status);
const char* zn_health_status_name(int status);

/* Registers Check and Watch on s (before zn_rpc_server_start). The endpoint lives as long as h. */
int zn_health_serve(zn_health* h, zn_rpc_server* s, zn_health_endpoint** out);
/* Sends every change since the last tick to the endpoint's watchers. On its server's thread only;
 * the signature is a zn_rpc_tick_fn's, for servers that have no other tick. */
void zn_health_tick(void* endpoint);

/* Binds addr and serves the health service alone there, on a thread of its own. *bound_port gets
 * the port (for port 0). err says why it could not. */
int zn_health_listen(zn_health* h, const char* addr, zn_health_listener** out, int* bound_port,
                     char* err, size_t errlen);
/* The listener's address with its bound port, as logs show it ("127.0.0.1:40211"). */
const char* zn_health_listener_address(const zn_health_listener* l);
/* Stops the listener, waits for its thread and frees it. NULL is fine. */
void zn_health_listener_stop(zn_health_listener* l);

#endif
