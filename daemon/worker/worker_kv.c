/* zn_kv over RPC; see worker_kv.h. Each call carries its own deadline so a
 * coordinator that went away turns into an error, not a hang. */
#include "worker_kv.h"

#include <stdlib.h>
#include <string.h>

#include "zenith.pb-c.h"
#include "zn_err.h"
#include "zn_log.h"

#define KV_CALL_MS 10000

static int kv_set(void* ctx, const char* key, const void* value, size_t len) {
  Zenith__V1__KvSetRequest req = ZENITH__V1__KV_SET_REQUEST__INIT;
  req.key = (char*)key;
  req.has_value = 1;
  req.value.data = (uint8_t*)value;
  req.value.len = len;
  ProtobufCMessage* resp;
  zn_rpc_status st;
  int rc = zn_rpc_unary(ctx, "/zenith.v1.Workers/KvSet", &req.base,
                        &zenith__v1__kv_set_response__descriptor, KV_CALL_MS, &resp, &st);
  if (rc != ZN_OK) {
    ZN_WARN("rendezvous: setting %s failed: %s %s", key, zn_rpc_code_name(st.code), st.message);
    return rc;
  }
  protobuf_c_message_free_unpacked(resp, NULL);
  return ZN_OK;
}

static int kv_get(void* ctx, const char* key, void** value, size_t* len) {
  Zenith__V1__KvGetRequest req = ZENITH__V1__KV_GET_REQUEST__INIT;
  req.key = (char*)key;
  ProtobufCMessage* msg;
  zn_rpc_status st;
  int rc = zn_rpc_unary(ctx, "/zenith.v1.Workers/KvGet", &req.base,
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

static int kv_wait(void* ctx, const char* const* keys, int nkeys, int timeout_ms) {
  Zenith__V1__KvWaitRequest req = ZENITH__V1__KV_WAIT_REQUEST__INIT;
  req.n_keys = (size_t)nkeys;
  req.keys = (char**)keys;
  req.has_timeout_ms = 1;
  req.timeout_ms = timeout_ms;
  ProtobufCMessage* resp;
  zn_rpc_status st;
  int rc =
      zn_rpc_unary(ctx, "/zenith.v1.Workers/KvWait", &req.base,
                   &zenith__v1__kv_wait_response__descriptor, timeout_ms + KV_CALL_MS, &resp, &st);
  if (rc != ZN_OK) {
    ZN_WARN("rendezvous: waiting for %d key(s) failed: %s %s", nkeys, zn_rpc_code_name(st.code),
            st.message);
    return st.code == ZN_RPC_DEADLINE_EXCEEDED ? ZN_ERR_TIMEOUT : rc;
  }
  protobuf_c_message_free_unpacked(resp, NULL);
  return ZN_OK;
}

zn_kv worker_kv(zn_rpc_channel* channel) {
  zn_kv kv = {channel, kv_set, kv_get, kv_wait};
  return kv;
}
