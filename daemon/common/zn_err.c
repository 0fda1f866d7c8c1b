/* Text for zn_err codes. */
#include "zn_err.h"

const char* zn_err_str(int err) {
  switch (err) {
    case ZN_OK:
      return "ok";
    case ZN_ERR_INVALID:
      return "invalid argument";
    case ZN_ERR_IO:
      return "I/O error";
    case ZN_ERR_NOMEM:
      return "out of memory";
    case ZN_ERR_NOT_FOUND:
      return "not found";
    case ZN_ERR_RPC:
      return "remote call failed";
    case ZN_ERR_TIMEOUT:
      return "timed out";
    case ZN_ERR_CANCELLED:
      return "cancelled";
    case ZN_ERR_COMM:
      return "collective failed";
    case ZN_ERR_STORE:
      return "database error";
    case ZN_ERR_NUMERIC:
      return "numeric error";
    default:
      return "unknown error";
  }
}
