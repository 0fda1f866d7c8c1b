/* zn_kv over RPC; see worker_kv.h. Each call carries its own deadline so a
 * coordinator that went away turns into an error, not a hang. A wait for
 * peers is cut into one-second slices, so that a job cancelled while its
 * workers wait for a peer that never comes stops within a second. */
#include "worker_kv.h"

#include <stdlib.h>
#include <string.h>

#include "zenith.pb-c.h"
#include "zn_err.h"
#include "zn_log.h"

#define KV_CALL_MS 10000
#define WAIT_SLICE_MS 1000

static int kv_set(void* ud, const char* key, const void* value, size_t len) {
  worker_kv_ctx* ctx = ud;
  Zenith__V1__KvSetRequest req = ZENITH__V1__KV_SET_REQUEST__INIT;
  req.key = (char*)key;
  req.has_value = 1;
  req.value.data = (uint8_t*)value;
  req.value.len = len;
  ProtobufCMessage* resp;
  zn_rpc_status st;
  int rc = zn_rpc_unary(ctx->channel, "/zenith.v1.Workers/KvSet", &req.base,
                        &zenith__v1__kv_set_response__descriptor, KV_CALL_MS, &resp, &st);
  if (rc != ZN_OK) {
    ZN_WARN("rendezvous: setting %s failed: %s %s", key, zn_rpc_code_name(st.code), st.message);
    return rc;
  }
  protobuf_c_message_free_unpacked(resp, NULL);
  return ZN_OK;
}

static int kv_get(void* ud, const char* key, void** value, size_t* len) {
  worker_kv_ctx* ctx = ud;
  Zenith__V1__KvGetRequest req = ZENITH__V1__KV_GET_REQUEST__INIT;
  req.key = (char*)key;
  ProtobufCMessage* msg;
  zn_rpc_status st;
  int rc = zn_rpc_unary(ctx->channel, "/zenith.v1.Workers/KvGet", &req.base,
                        &zenith__v1__kv_get_response__descriptor, KV_CALL_MS, &msg, &st);
  if (rc != ZN_OK) {
    ZN_WARN("rendezvous: reading %s failed: %s %s", key, zn_rpc_code_name(st.code), st.message);
    return rc;
  }
  Zenith__V1__KvGetResponse* resp = (void*)msg;
  rc = ZN_ERR_NOT_FOUND;
  if (resp->found) {
    *len = resp->value.len;
    *value = malloc(*len ? *len : 1);
    memcpy(*value, resp->value.data, *len);
    rc = ZN_OK;
  }
  protobuf_c_message_free_unpacked(msg, NULL);
  return rc;
}

static int wait_slice(worker_kv_ctx* ctx, const char* const* keys, int nkeys, int slice_ms) {
  Zenith__V1__KvWaitRequest req = ZENITH__V1__KV_WAIT_REQUEST__INIT;
  req.n_keys = (size_t)nkeys;
  req.keys = (char**)keys;
  req.has_timeout_ms = 1;
  req.timeout_ms = slice_ms;
  ProtobufCMessage* resp;
  zn_rpc_status st;
  int rc =
      zn_rpc_unary(ctx->channel, "/zenith.v1.Workers/KvWait", &req.base,
                   &zenith__v1__kv_wait_response__descriptor, slice_ms + KV_CALL_MS, &resp, &st);
  if (rc == ZN_OK) {
    protobuf_c_message_free_unpacked(resp, NULL);
    return ZN_OK;
  }
  if (st.code == ZN_RPC_DEADLINE_EXCEEDED) return ZN_ERR_TIMEOUT;
  ZN_WARN("rendezvous: waiting for %d key(s) failed: %s %s", nkeys, zn_rpc_code_name(st.code),
          st.message);
  return rc;
}

static int kv_wait(void* ud, const char* const* keys, int nkeys, int timeout_ms) {
  worker_kv_ctx* ctx = ud;
  for (int waited = 0; waited < timeout_ms; waited += WAIT_SLICE_MS) {
    if (ctx->stop && atomic_load(ctx->stop)) return ZN_ERR_CANCELLED;
    int slice = timeout_ms - waited < WAIT_SLICE_MS ? timeout_ms - waited : WAIT_SLICE_MS;
    int rc = wait_slice(ctx, keys, nkeys, slice);
    if (rc != ZN_ERR_TIMEOUT) return rc;
  }
  return ZN_ERR_TIMEOUT;
}

zn_kv worker_kv(worker_kv_ctx* ctx) {
  zn_kv kv = {ctx, kv_set, kv_get, kv_wait};
  return kv;
}
