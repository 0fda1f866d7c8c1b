/* The standard gRPC health service; see zn_health.h for the contract.
 *
 * The status table is the one thing shared between threads: the daemon sets
 * statuses from its own thread (the worker's libuv loop, the coordinator's
 * server thread) while each server's handlers read them on theirs. It sits
 * behind a mutex, and every change bumps a version counter. A server's calls
 * may only be touched on that server's thread, so a change is not written to
 * watchers by the setter: each server's tick compares the counter with the
 * version it last delivered and, when they differ, writes the new status to
 * each of its watchers whose status changed. A change therefore reaches a
 * watcher within one tick of its server. */
#include "zn_health.h"

#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "health.pb-c.h"
#include "zn_err.h"
#include "zn_log.h"

#define MAX_SERVICES 16
#define MAX_ENDPOINTS 4
#define SERVICE_NAME_MAX 128
/* How often a health-only listener looks for changes: well inside a probe's period. */
#define LISTENER_TICK_MS 50

typedef Grpc__Health__V1__HealthCheckRequest CheckRequest;
typedef Grpc__Health__V1__HealthCheckResponse CheckResponse;

typedef struct {
  char name[SERVICE_NAME_MAX];
  int status;
} service;

typedef struct watcher {
  zn_rpc_call* call;
  char* service;
  int sent; /* the status this client saw last */
  struct watcher* next;
} watcher;

/* One server's view: its watchers, touched on its thread only. */
struct zn_health_endpoint {
  zn_health* health;
  unsigned seen; /* the version last delivered to the watchers */
  watcher* watchers;
};

struct zn_health {
  pthread_mutex_t lock; /* guards services and n_services */
  service services[MAX_SERVICES];
  int n_services;
  atomic_uint version;
  zn_health_endpoint endpoints[MAX_ENDPOINTS];
  int n_endpoints;
};

struct zn_health_listener {
  zn_rpc_server* server;
  pthread_t thread;
  char address[300];
};

const char* zn_health_status_name(int status) {
  static const char* names[] = {"UNKNOWN", "SERVING", "NOT_SERVING", "SERVICE_UNKNOWN"};
  return status >= 0 && status <= 3 ? names[status] : "UNKNOWN";
}

zn_health* zn_health_create(void) {
  zn_health* h = calloc(1, sizeof *h);
  if (!h) return NULL;
  pthread_mutex_init(&h->lock, NULL);
  return h;
}

void zn_health_destroy(zn_health* h) {
  if (!h) return;
  for (int i = 0; i < h->n_endpoints; i++) {
    for (watcher* w = h->endpoints[i].watchers; w;) {
      watcher* next = w->next;
      free(w->service);
      free(w);
      w = next;
    }
  }
  pthread_mutex_destroy(&h->lock);
  free(h);
}

/* The status of a service, or -1 for a name the table does not hold. */
static int status_of(zn_health* h, const char* name) {
  int status = -1;
  pthread_mutex_lock(&h->lock);
  for (int i = 0; i < h->n_services; i++)
    if (strcmp(h->services[i].name, name) == 0) status = h->services[i].status;
  pthread_mutex_unlock(&h->lock);
  return status;
}

int zn_health_set(zn_health* h, const char* name, int status) {
  if (strlen(name) >= SERVICE_NAME_MAX) return ZN_ERR_INVALID;
  int rc = ZN_OK;
  int changed = 0; /* the worker sets its status after every heartbeat; most change nothing */
  pthread_mutex_lock(&h->lock);
  int i = 0;
  while (i < h->n_services && strcmp(h->services[i].name, name) != 0) i++;
  if (i == h->n_services && i == MAX_SERVICES) {
    rc = ZN_ERR_INVALID;
  } else {
    int added = i == h->n_services;
    if (added) snprintf(h->services[h->n_services++].name, SERVICE_NAME_MAX, "%s", name);
    changed = added || h->services[i].status != status;
    h->services[i].status = status;
  }
  pthread_mutex_unlock(&h->lock);
  if (changed) atomic_fetch_add(&h->version, 1);
  return rc;
}

/* ---------------------------------------------------------------- handlers */

static void handle_check(void* ud, zn_rpc_call* call, const ProtobufCMessage* msg) {
  zn_health_endpoint* e = ud;
  const CheckRequest* req = (const CheckRequest*)msg;
  int status = status_of(e->health, req->service);
  if (status < 0) {
    zn_rpc_fail(call, ZN_RPC_NOT_FOUND, "unknown service '%s'", req->service);
    return;
  }
  CheckResponse resp = GRPC__HEALTH__V1__HEALTH_CHECK_RESPONSE__INIT;
  resp.status = (Grpc__Health__V1__HealthCheckResponse__ServingStatus)status;
  zn_rpc_reply(call, &resp.base);
}

static int write_status(zn_rpc_call* call, int status) {
  CheckResponse resp = GRPC__HEALTH__V1__HEALTH_CHECK_RESPONSE__INIT;
  resp.status = (Grpc__Health__V1__HealthCheckResponse__ServingStatus)status;
  return zn_rpc_stream_write(call, &resp.base);
}

/* A watched name the table does not hold is SERVICE_UNKNOWN until it is set. */
static int watched_status(zn_health* h, const char* name) {
  int status = status_of(h, name);
  return status < 0 ? ZN_HEALTH_SERVICE_UNKNOWN : status;
}

static void on_watcher_gone(void* ud, zn_rpc_call* call) {
  zn_health_endpoint* e = ud;
  for (watcher** p = &e->watchers; *p; p = &(*p)->next) {
    if ((*p)->call != call) continue;
    watcher* w = *p;
    *p = w->next;
    free(w->service);
    free(w);
    return;
  }
}

static void handle_watch(void* ud, zn_rpc_call* call, const ProtobufCMessage* msg) {
  zn_health_endpoint* e = ud;
  const CheckRequest* req = (const CheckRequest*)msg;
  watcher* w = calloc(1, sizeof *w);
  if (!w || !(w->service = strdup(req->service))) {
    free(w);
    zn_rpc_fail(call, ZN_RPC_RESOURCE_EXHAUSTED, "out of memory");
    return;
  }
  w->call = call;
  w->sent = watched_status(e->health, req->service);
  if (write_status(call, w->sent) != 0) { /* the client is gone already */
    free(w->service);
    free(w);
    return;
  }
  w->next = e->watchers;
  e->watchers = w;
  zn_rpc_call_on_close(call, on_watcher_gone, e);
}

void zn_health_tick(void* endpoint) {
  zn_health_endpoint* e = endpoint;
  unsigned version = atomic_load(&e->health->version);
  if (version == e->seen) return;

  /* Marked seen before reading: a change made while we read bumps the version again and is
   * delivered by the next tick. */
  e->seen = version;
  for (watcher* w = e->watchers; w; w = w->next) {
    int status = watched_status(e->health, w->service);
    if (status != w->sent && write_status(w->call, status) == 0) w->sent = status;
  }
}

int zn_health_serve(zn_health* h, zn_rpc_server* s, zn_health_endpoint** out) {
  if (h->n_endpoints == MAX_ENDPOINTS) return ZN_ERR_INVALID;
  zn_health_endpoint* e = &h->endpoints[h->n_endpoints++];
  e->health = h;
  int rc = zn_rpc_server_add_method(s, "/grpc.health.v1.Health/Check", ZN_RPC_UNARY,
                                    &grpc__health__v1__health_check_request__descriptor,
                                    handle_check, e);
  if (rc == ZN_OK)
    rc = zn_rpc_server_add_method(s, "/grpc.health.v1.Health/Watch", ZN_RPC_SERVER_STREAM,
                                  &grpc__health__v1__health_check_request__descriptor, handle_watch,
                                  e);
  if (rc == ZN_OK && out) *out = e;
  return rc;
}

/* ---------------------------------------------------------------- listener */

static void* listener_main(void* arg) {
  zn_health_listener* l = arg;
  zn_rpc_server_run(l->server);
  return NULL;
}

int zn_health_listen(zn_health* h, const char* addr, zn_health_listener** out, int* bound_port,
                     char* err, size_t errlen) {
  zn_health_listener* l = calloc(1, sizeof *l);
  if (!l) return ZN_ERR_NOMEM;
  int port = 0;
  int rc = zn_rpc_server_create(addr, &l->server, &port, err, errlen);
  if (rc != ZN_OK) {
    free(l);
    return rc;
  }
  zn_health_endpoint* e = NULL;
  rc = zn_health_serve(h, l->server, &e);
  if (rc == ZN_OK) {
    zn_rpc_server_set_tick(l->server, LISTENER_TICK_MS, zn_health_tick, e);
    zn_rpc_server_start(l->server);
    if (pthread_create(&l->thread, NULL, listener_main, l) != 0) rc = ZN_ERR_NOMEM;
  }
  if (rc != ZN_OK) {
    snprintf(err, errlen, "cannot serve the health service on %s: %s", addr, zn_err_str(rc));
    zn_rpc_server_destroy(l->server);
    free(l);
    return rc;
  }
  snprintf(l->address, sizeof l->address, "%s", addr);
  char* colon = strrchr(l->address, ':');
  if (colon) snprintf(colon + 1, sizeof l->address - (size_t)(colon + 1 - l->address), "%d", port);
  if (bound_port) *bound_port = port;
  *out = l;
  return ZN_OK;
}

const char* zn_health_listener_address(const zn_health_listener* l) {
  return l->address;
}

void zn_health_listener_stop(zn_health_listener* l) {
  if (!l) return;
  zn_rpc_server_stop(l->server);
  pthread_join(l->thread, NULL);
  zn_rpc_server_destroy(l->server);
  free(l);
}
