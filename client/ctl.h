/* zenithctl's commands, one function each; they return the process exit code
 * (0 success, 1 the operation failed, 2 a usage error). */
#ifndef ZN_CTL_H
#define ZN_CTL_H

#include <jansson.h>

#include "zenith.pb-c.h"
#include "zn_rpc.h"

typedef struct {
  const char* coordinator;
  int argc; /* argv[0] is the command's name */
  char** argv;
  const zn_rpc_client_opts* rpc; /* TLS and token, from ctl_config */
} ctl_args;

/* The channel every command uses: the coordinator, secured as configured. */
zn_rpc_channel* ctl_open_channel(const ctl_args* a);

int ctl_submit(const ctl_args* a);
int ctl_list(const ctl_args* a);
int ctl_status(const ctl_args* a);
int ctl_watch(const ctl_args* a);
int ctl_cancel(const ctl_args* a);
int ctl_history(const ctl_args* a);
int ctl_plot(const ctl_args* a);
int ctl_checkpoint(const ctl_args* a);
int ctl_checkpoints(const ctl_args* a);
int ctl_resume(const ctl_args* a);

/* Shared by the commands. */
#define CTL_TIMEOUT_MS 10000
/* Significant digits of every number zenithctl writes as data (JSON, CSV). */
#define CTL_REAL_DIGITS 15
/* Runs one unary call; on failure prints "zenithctl: CODE: message" and returns NULL. */
ProtobufCMessage* ctl_call(const ctl_args* a, const char* method, const ProtobufCMessage* req,
                           const ProtobufCMessageDescriptor* resp_type);
const char* ctl_state_name(int state);
/* Prints why a call failed: "zenithctl: CODE: message", or how to reach the coordinator. */
void ctl_print_rpc_error(const ctl_args* a, const zn_rpc_status* st);
/* A job as a JSON object, and printed as one (newline-terminated). */
json_t* ctl_job_json(const Zenith__V1__Job* job);
void ctl_print_job_json(const Zenith__V1__Job* job);
/* A checkpoint record as a JSON object: id, job, step, path, digest, bytes, unix_ms. */
json_t* ctl_checkpoint_json(const Zenith__V1__Checkpoint* c);
/* The restarts and checkpoints lines of `zenithctl status`. */
void ctl_print_job_checkpoints(const Zenith__V1__Job* job);
/* A spec's sharding; "none" when unset, as from a coordinator that predates the field. */
const char* ctl_spec_sharding(const Zenith__V1__JobSpec* spec);
/* 0 when arg is a sharding (none or optimizer); else prints "zenithctl COMMAND: --sharding
 * expects ..." and returns -1. */
int ctl_check_sharding(const char* command, const char* arg);
/* Watches a job until it ends; returns 0 if it succeeded. */
int ctl_watch_job(const ctl_args* a, const char* id);

#endif
