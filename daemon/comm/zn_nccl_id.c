/* The NCCL id exchange; see zn_nccl_id.h. */
#include "zn_nccl_id.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int zn_nccl_exchange_id(const zn_kv* kv, const char* prefix, int rank, int timeout_ms,
                        zn_nccl_make_id make_id, uint8_t id[ZN_NCCL_ID_BYTES], char* err,
                        size_t errlen) {
  char key[512];
  snprintf(key, sizeof key, "%s/nccl-id", prefix);
  if (rank == 0) {
    int rc = make_id(id, err, errlen);
    if (rc != ZN_OK) return rc;
    rc = kv->set(kv->ctx, key, id, ZN_NCCL_ID_BYTES);
    if (rc != ZN_OK) snprintf(err, errlen, "could not publish %s: %s", key, zn_err_str(rc));
    return rc;
  }

  const char* keys[1] = {key};
  int rc = kv->wait(kv->ctx, keys, 1, timeout_ms);
  if (rc != ZN_OK) {
    snprintf(err, errlen, "rank 0 did not publish %s within %d ms: %s", key, timeout_ms,
             zn_err_str(rc));
    return rc;
  }
  void* value = NULL;
  size_t len = 0;
  rc = kv->get(kv->ctx, key, &value, &len);
  if (rc == ZN_OK && len != ZN_NCCL_ID_BYTES) {
    snprintf(err, errlen, "%s holds %zu bytes, not an NCCL id of %d", key, len, ZN_NCCL_ID_BYTES);
    rc = ZN_ERR_INVALID;
  } else if (rc != ZN_OK) {
    snprintf(err, errlen, "could not read %s: %s", key, zn_err_str(rc));
  } else {
    memcpy(id, value, ZN_NCCL_ID_BYTES);
  }
  free(value);
  return rc;
}
