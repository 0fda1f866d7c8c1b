/* Key-value rendezvous; see coord_kv.h. A handful of keys per job run, so a
 * linked list is the right structure. A KvWait whose keys are not all there
 * is parked and answered by the KvSet that completes it, by the tick once its
 * deadline passes, or dropped when its client leaves. */
#include "coord_kv.h"

#include <stdlib.h>
#include <string.h>

#include "zenith.pb-c.h"
#include "zn_err.h"
#include "zn_log.h"
#include "zn_time.h"

#define MAX_KEY_BYTES 512
#define MAX_VALUE_BYTES (64 << 10)
#define MAX_WAIT_KEYS 1024
#define DEFAULT_WAIT_MS 30000
/* Bounds on the whole store: a few keys per rank of each running job fit
 * easily, and a misbehaving client cannot grow the coordinator without end. */
#define MAX_KEYS 100000
#define MAX_TOTAL_BYTES ((size_t)64 << 20)

typedef struct entry {
  char* key;
  uint8_t* value;
  size_t len;
  struct entry* next;
} entry;

typedef struct waiter {
  zn_rpc_call* call;
  const Zenith__V1__KvWaitRequest* request;
  int timeout_ms;
  int64_t deadline_ms;
  struct waiter* next;
} waiter;

struct coord_kv {
  entry* entries;
  waiter* waiters;
  size_t count;
  size_t bytes; /* of all values */
};

coord_kv* coord_kv_create(void) {
  return calloc(1, sizeof(coord_kv));
}

static void free_entry(coord_kv* kv, entry* e) {
  kv->bytes -= e->len;
  kv->count--;
  free(e->key);
  free(e->value);
  free(e);
}

void coord_kv_destroy(coord_kv* kv) {
  if (!kv) return;
  for (entry* e = kv->entries; e;) {
    entry* next = e->next;
    free_entry(kv, e);
    e = next;
  }
  for (waiter* w = kv->waiters; w;) {
    waiter* next = w->next;
    free(w);
    w = next;
  }
  free(kv);
}

static entry* find(coord_kv* kv, const char* key) {
  for (entry* e = kv->entries; e; e = e->next)
    if (strcmp(e->key, key) == 0) return e;
  return NULL;
}

static int all_present(coord_kv* kv, const Zenith__V1__KvWaitRequest* req) {
  for (size_t i = 0; i < req->n_keys; i++)
    if (!find(kv, req->keys[i])) return 0;
  return 1;
}

static void unlink_waiter(coord_kv* kv, waiter* target) {
  for (waiter** p = &kv->waiters; *p; p = &(*p)->next) {
    if (*p == target) {
      *p = target->next;
      free(target);
      return;
    }
  }
}

static void answer_ready_waiters(coord_kv* kv) {
  Zenith__V1__KvWaitResponse resp = ZENITH__V1__KV_WAIT_RESPONSE__INIT;
  waiter** p = &kv->waiters;
  while (*p) {
    waiter* w = *p;
    if (all_present(kv, w->request)) {
      *p = w->next;
      zn_rpc_reply(w->call, &resp.base);
      free(w);
    } else {
      p = &w->next;
    }
  }
}

static const char* check_key(const char* key) {
  if (!key || !key[0]) return "key is empty";
  if (strlen(key) > MAX_KEY_BYTES) return "key is longer than 512 bytes";
  return NULL;
}

static void handle_set(void* ud, zn_rpc_call* call, const ProtobufCMessage* msg) {
  coord_kv* kv = ud;
  const Zenith__V1__KvSetRequest* req = (const void*)msg;
  const char* bad = check_key(req->key);
  if (bad) {
    zn_rpc_fail(call, ZN_RPC_INVALID_ARGUMENT, "KvSet: %s", bad);
    return;
  }
  if (req->value.len > MAX_VALUE_BYTES) {
    zn_rpc_fail(call, ZN_RPC_INVALID_ARGUMENT, "KvSet: value of %zu bytes is over the 64 KiB limit",
                req->value.len);
    return;
  }
  entry* e = find(kv, req->key);
  size_t replaced = e ? e->len : 0;
  if (kv->bytes - replaced + req->value.len > MAX_TOTAL_BYTES || (!e && kv->count >= MAX_KEYS)) {
    zn_rpc_fail(call, ZN_RPC_RESOURCE_EXHAUSTED,
                "KvSet: the rendezvous store is full (%zu keys, %zu bytes); keys of ended jobs "
                "are dropped when the jobs end",
                kv->count, kv->bytes);
    return;
  }
  if (!e) {
    e = calloc(1, sizeof *e);
    e->key = strdup(req->key);
    e->next = kv->entries;
    kv->entries = e;
    kv->count++;
  }
  kv->bytes -= e->len;
  free(e->value);
  e->value = malloc(req->value.len ? req->value.len : 1);
  if (req->value.len) memcpy(e->value, req->value.data, req->value.len);
  e->len = req->value.len;
  kv->bytes += e->len;

  Zenith__V1__KvSetResponse resp = ZENITH__V1__KV_SET_RESPONSE__INIT;
  zn_rpc_reply(call, &resp.base);
  answer_ready_waiters(kv);
}

static void handle_get(void* ud, zn_rpc_call* call, const ProtobufCMessage* msg) {
  coord_kv* kv = ud;
  const Zenith__V1__KvGetRequest* req = (const void*)msg;
  const char* bad = check_key(req->key);
  if (bad) {
    zn_rpc_fail(call, ZN_RPC_INVALID_ARGUMENT, "KvGet: %s", bad);
    return;
  }
  Zenith__V1__KvGetResponse resp = ZENITH__V1__KV_GET_RESPONSE__INIT;
  entry* e = find(kv, req->key);
  resp.has_found = 1;
  resp.found = e != NULL;
  if (e) {
    resp.has_value = 1;
    resp.value.data = e->value;
    resp.value.len = e->len;
  }
  zn_rpc_reply(call, &resp.base);
}

static void on_waiter_gone(void* ud, zn_rpc_call* call) {
  coord_kv* kv = ud;
  for (waiter* w = kv->waiters; w; w = w->next) {
    if (w->call == call) {
      unlink_waiter(kv, w);
      return;
    }
  }
}

static void handle_wait(void* ud, zn_rpc_call* call, const ProtobufCMessage* msg) {
  coord_kv* kv = ud;
  const Zenith__V1__KvWaitRequest* req = (const void*)msg;
  if (req->n_keys == 0 || req->n_keys > MAX_WAIT_KEYS) {
    zn_rpc_fail(call, ZN_RPC_INVALID_ARGUMENT, "KvWait: give between 1 and %d keys (got %zu)",
                MAX_WAIT_KEYS, req->n_keys);
    return;
  }
  for (size_t i = 0; i < req->n_keys; i++) {
    const char* bad = check_key(req->keys[i]);
    if (bad) {
      zn_rpc_fail(call, ZN_RPC_INVALID_ARGUMENT, "KvWait: keys[%zu]: %s", i, bad);
      return;
    }
  }
  if (all_present(kv, req)) {
    Zenith__V1__KvWaitResponse resp = ZENITH__V1__KV_WAIT_RESPONSE__INIT;
    zn_rpc_reply(call, &resp.base);
    return;
  }
  waiter* w = calloc(1, sizeof *w);
  w->call = call;
  w->request = req;
  w->timeout_ms = req->timeout_ms > 0 ? req->timeout_ms : DEFAULT_WAIT_MS;
  w->deadline_ms = zn_unix_ms() + w->timeout_ms;
  w->next = kv->waiters;
  kv->waiters = w;
  zn_rpc_call_on_close(call, on_waiter_gone, kv);
}

void coord_kv_expire(coord_kv* kv) {
  int64_t now = zn_unix_ms();
  waiter** p = &kv->waiters;
  while (*p) {
    waiter* w = *p;
    if (now >= w->deadline_ms) {
      *p = w->next;
      const char* missing = "";
      for (size_t i = 0; i < w->request->n_keys; i++)
        if (!find(kv, w->request->keys[i])) missing = w->request->keys[i];
      zn_rpc_fail(w->call, ZN_RPC_DEADLINE_EXCEEDED, "KvWait: key %s was not set within %d ms",
                  missing, w->request->timeout_ms);
      free(w);
    } else {
      p = &w->next;
    }
  }
}

void coord_kv_drop_prefix(coord_kv* kv, const char* prefix) {
  size_t n = strlen(prefix);
  entry** p = &kv->entries;
  while (*p) {
    entry* e = *p;
    if (strncmp(e->key, prefix, n) == 0) {
      *p = e->next;
      free_entry(kv, e);
    } else {
      p = &e->next;
    }
  }
}

size_t coord_kv_count(const coord_kv* kv) {
  return kv->count;
}

int coord_kv_add_methods(coord_kv* kv, zn_rpc_server* server) {
  int rc = zn_rpc_server_add_method(server, "/zenith.v1.Workers/KvSet", ZN_RPC_UNARY,
                                    &zenith__v1__kv_set_request__descriptor, handle_set, kv);
  if (rc == ZN_OK)
    rc = zn_rpc_server_add_method(server, "/zenith.v1.Workers/KvGet", ZN_RPC_UNARY,
                                  &zenith__v1__kv_get_request__descriptor, handle_get, kv);
  if (rc == ZN_OK)
    rc = zn_rpc_server_add_method(server, "/zenith.v1.Workers/KvWait", ZN_RPC_UNARY,
                                  &zenith__v1__kv_wait_request__descriptor, handle_wait, kv);
  return rc;
}
