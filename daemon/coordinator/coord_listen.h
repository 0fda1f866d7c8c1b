/* The coordinator's gRPC listener with its protection: TLS (and mutual TLS)
 * from PEM files, plain text only when asked for, and the bearer token that
 * guards the user-facing API. */
#ifndef ZN_COORD_LISTEN_H
#define ZN_COORD_LISTEN_H

#include "coordinator.h"
#include "zn_rpc.h"

/* Checks that the flags ask for TLS or plain text, consistently, before
 * anything is opened; logs why not and returns non-zero. */
int coord_listen_check(const coord_config* cfg);
/* Creates the server on cfg->listen; on failure logs why (naming the flag and
 * file at fault) and returns non-zero. */
int coord_listen(const coord_config* cfg, zn_rpc_server** out, int* bound_port);

#endif
