/* Zenith's one error type: 0 is success, a negative zn_err is a failure.
 * Functions that fail also leave a human-readable message for their caller
 * where a code alone would not say what to fix. */
#ifndef ZN_ERR_H
#define ZN_ERR_H

#include "zn_log.h"

typedef enum {
  ZN_OK = 0,
  ZN_ERR_INVALID = -1, /* bad argument or input */
  ZN_ERR_IO = -2,      /* file or socket I/O failed */
  ZN_ERR_NOMEM = -3,
  ZN_ERR_NOT_FOUND = -4,
  ZN_ERR_RPC = -5, /* a remote call failed */
  ZN_ERR_TIMEOUT = -6,
  ZN_ERR_CANCELLED = -7,
  ZN_ERR_COMM = -8,  /* a collective failed */
  ZN_ERR_STORE = -9, /* the coordinator's database failed */
  ZN_ERR_NUMERIC = -10,
} zn_err;

const char* zn_err_str(int err);

/* Logs file:line once and jumps to the function's single cleanup label. */
#define ZN_CHECK_GOTO(expr, errvar, label)                                    \
  do {                                                                        \
    int zn_check_rc_ = (expr);                                                \
    if (zn_check_rc_ != ZN_OK) {                                              \
      ZN_LOG(ZN_LOG_DEBUG, "%s failed: %s", #expr, zn_err_str(zn_check_rc_)); \
      (errvar) = zn_check_rc_;                                                \
      goto label;                                                             \
    }                                                                         \
  } while (0)

#endif
