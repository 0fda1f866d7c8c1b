/* zenithctl checkpoint, checkpoints and resume, and the checkpoint lines of `status`.
 *
 * `checkpoint` asks a running job for a checkpoint and waits until a worker has written it and
 * the coordinator has recorded it: that takes a heartbeat and a training step or two, so the call
 * waits longer than other commands do (--timeout). */
#include <errno.h>
#include <jansson.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "ctl.h"
#include "zn_err.h"

#define CHECKPOINT_TIMEOUT_S 600

/* One flag of a command that takes a job id: a switch (value NULL) or a flag with a value. */
typedef struct {
  const char* name;
  const char** value;
  int* set;
} job_flag;

/* Reads `COMMAND JOB [flags]`. Returns 0, or prints a usage error naming what is wrong and returns
 * -1. */
static int parse_job_command(const ctl_args* a, job_flag* flags, int nflags, const char** job) {
  *job = NULL;
  for (int i = 1; i < a->argc; i++) {
    const char* arg = a->argv[i];
    job_flag* f = NULL;
    for (int k = 0; k < nflags && !f; k++)
      if (strcmp(arg, flags[k].name) == 0) f = &flags[k];
    if (f && f->value && i + 1 >= a->argc) {
      fprintf(stderr, "zenithctl %s: %s needs a value\n", a->argv[0], arg);
      return -1;
    }
    if (f && f->value)
      *f->value = a->argv[++i];
    else if (f)
      *f->set = 1;
    else if (arg[0] != '-' && !*job)
      *job = arg;
    else {
      fprintf(stderr, "zenithctl %s: unexpected argument '%s'\n", a->argv[0], arg);
      return -1;
    }
  }
  if (!*job) {
    fprintf(stderr, "zenithctl %s: give the job id, e.g. `zenithctl %s j-1`\n", a->argv[0],
            a->argv[0]);
    return -1;
  }
  return 0;
}

/* "1.2 MB": decimal units, as file managers and `ls -h --si` show them. */
static const char* format_bytes(int64_t bytes, char* buf, size_t len) {
  const char* units[] = {"bytes", "kB", "MB", "GB", "TB"};
  double v = (double)bytes;
  int u = 0;
  while (v >= 1000 && u < 4) {
    v /= 1000;
    u++;
  }
  if (u == 0)
    snprintf(buf, len, "%lld bytes", (long long)bytes);
  else
    snprintf(buf, len, "%.1f %s", v, units[u]);
  return buf;
}

static const char* format_time(int64_t unix_ms, char* buf, size_t len) {
  time_t sec = (time_t)(unix_ms / 1000);
  struct tm tm;
  gmtime_r(&sec, &tm);
  strftime(buf, len, "%Y-%m-%dT%H:%M:%SZ", &tm);
  return buf;
}

json_t* ctl_checkpoint_json(const Zenith__V1__Checkpoint* c) {
  return json_pack("{s:s, s:s, s:I, s:s, s:s, s:I, s:I}", "id", c->id ? c->id : "", "job",
                   c->job_id ? c->job_id : "", "step", (json_int_t)c->step, "path",
                   c->path ? c->path : "", "digest", c->digest ? c->digest : "", "bytes",
                   (json_int_t)c->bytes, "unix_ms", (json_int_t)c->unix_ms);
}

void ctl_print_job_checkpoints(const Zenith__V1__Job* j) {
  if (j->spec) printf("restarts:      %d of %d\n", j->restarts, j->spec->max_restarts);
  const Zenith__V1__Checkpoint* c = j->latest_checkpoint;
  if (!c || !c->id) {
    printf("checkpoints:   %d written\n", j->checkpoints);
    return;
  }
  char size[32];
  printf("checkpoints:   %d written; latest %s at step %lld, %s\n", j->checkpoints, c->id,
         (long long)c->step, format_bytes(c->bytes, size, sizeof size));
  printf("               %s\n", c->path);
}

/* ---------------------------------------------------------------- checkpoint */

static int parse_timeout(const char* text, int* seconds) {
  char* end;
  errno = 0;
  long v = text ? strtol(text, &end, 10) : CHECKPOINT_TIMEOUT_S;
  if (text && (!*text || *end || errno || v < 1 || v > 86400)) {
    fprintf(stderr, "zenithctl checkpoint: --timeout expects seconds from 1 to 86400, got '%s'\n",
            text);
    return -1;
  }
  *seconds = (int)v;
  return 0;
}

int ctl_checkpoint(const ctl_args* a) {
  const char* job = NULL;
  const char* timeout_text = NULL;
  job_flag flags[] = {{"--timeout", &timeout_text, NULL}};
  int timeout_s;
  if (parse_job_command(a, flags, 1, &job) != 0 || parse_timeout(timeout_text, &timeout_s) != 0)
    return 2;

  Zenith__V1__CheckpointRequest req = ZENITH__V1__CHECKPOINT_REQUEST__INIT;
  req.id = (char*)job;
  zn_rpc_channel* ch = ctl_open_channel(a);
  ProtobufCMessage* msg = NULL;
  zn_rpc_status st;
  int rc = zn_rpc_unary(ch, "/zenith.v1.Zenith/CheckpointJob", &req.base,
                        &zenith__v1__checkpoint__descriptor, timeout_s * 1000, &msg, &st);
  zn_rpc_channel_close(ch);
  if (rc != ZN_OK) {
    ctl_print_rpc_error(a, &st);
    if (st.code == ZN_RPC_DEADLINE_EXCEEDED)
      fprintf(stderr,
              "zenithctl checkpoint: job %s wrote no checkpoint within %d s; its steps may take "
              "longer (--timeout), see `zenithctl status %s`\n",
              job, timeout_s, job);
    return 1;
  }
  const Zenith__V1__Checkpoint* c = (const void*)msg;
  char size[32];
  printf("checkpoint:    %s\n", c->id);
  printf("job:           %s\n", c->job_id);
  printf("step:          %lld\n", (long long)c->step);
  printf("path:          %s\n", c->path);
  printf("digest:        sha256 %s\n", c->digest);
  printf("size:          %s (%lld bytes)\n", format_bytes(c->bytes, size, sizeof size),
         (long long)c->bytes);
  protobuf_c_message_free_unpacked(msg, NULL);
  return 0;
}

/* ---------------------------------------------------------------- checkpoints */

static void print_checkpoint_table(const char* job, const Zenith__V1__ListCheckpointsResponse* r) {
  if (r->n_checkpoints == 0) {
    printf("job %s has no checkpoints\n", job);
    return;
  }
  printf("%-12s %-9s %-11s %-21s %s\n", "ID", "STEP", "SIZE", "WRITTEN", "PATH");
  for (size_t i = 0; i < r->n_checkpoints; i++) {
    const Zenith__V1__Checkpoint* c = r->checkpoints[i];
    char size[32], when[32];
    printf("%-12s %-9lld %-11s %-21s %s\n", c->id, (long long)c->step,
           format_bytes(c->bytes, size, sizeof size), format_time(c->unix_ms, when, sizeof when),
           c->path);
  }
}

int ctl_checkpoints(const ctl_args* a) {
  const char* job = NULL;
  int json = 0;
  job_flag flags[] = {{"--json", NULL, &json}};
  if (parse_job_command(a, flags, 1, &job) != 0) return 2;
  Zenith__V1__ListCheckpointsRequest req = ZENITH__V1__LIST_CHECKPOINTS_REQUEST__INIT;
  req.id = (char*)job;
  Zenith__V1__ListCheckpointsResponse* resp =
      (void*)ctl_call(a, "/zenith.v1.Zenith/ListCheckpoints", &req.base,
                      &zenith__v1__list_checkpoints_response__descriptor);
  if (!resp) return 1;
  if (json) {
    json_t* arr = json_array();
    for (size_t i = 0; i < resp->n_checkpoints; i++)
      json_array_append_new(arr, ctl_checkpoint_json(resp->checkpoints[i]));
    json_dumpf(arr, stdout, JSON_INDENT(2) | JSON_PRESERVE_ORDER);
    fputc('\n', stdout);
    json_decref(arr);
  } else {
    print_checkpoint_table(job, resp);
  }
  protobuf_c_message_free_unpacked(&resp->base, NULL);
  return 0;
}

/* ---------------------------------------------------------------- resume */

/* --workers N of resume: a positive whole number; the coordinator checks it against the job. */
static int parse_workers(const char* text, int32_t* workers) {
  char* end;
  errno = 0;
  long v = text ? strtol(text, &end, 10) : 0;
  if (text && (!*text || *end || errno || v < 1 || v > INT32_MAX)) {
    fprintf(stderr, "zenithctl resume: --workers expects a whole number of at least 1, got '%s'\n",
            text);
    return -1;
  }
  *workers = (int32_t)v;
  return 0;
}

int ctl_resume(const ctl_args* a) {
  const char* job = NULL;
  const char* from = NULL;
  const char* workers = NULL;
  const char* sharding = NULL;
  job_flag flags[] = {
      {"--from", &from, NULL}, {"--workers", &workers, NULL}, {"--sharding", &sharding, NULL}};
  Zenith__V1__ResumeJobRequest req = ZENITH__V1__RESUME_JOB_REQUEST__INIT;
  if (parse_job_command(a, flags, 3, &job) != 0 || parse_workers(workers, &req.workers) != 0 ||
      (sharding && ctl_check_sharding("resume", sharding) != 0))
    return 2;
  if (from && !from[0]) { /* the coordinator would take "" for "the latest" */
    fprintf(stderr,
            "zenithctl resume: --from expects a checkpoint id (`zenithctl checkpoints %s` "
            "lists them), got ''\n",
            job);
    return 2;
  }
  req.has_workers = req.workers > 0;
  req.id = (char*)job;
  req.from = (char*)from;
  req.sharding = (char*)sharding;
  Zenith__V1__Job* resumed =
      (void*)ctl_call(a, "/zenith.v1.Zenith/ResumeJob", &req.base, &zenith__v1__job__descriptor);
  if (!resumed) return 1;
  printf("%s %s%s%s\n", resumed->id, ctl_state_name(resumed->state),
         resumed->reason && resumed->reason[0] ? " - " : "",
         resumed->reason ? resumed->reason : "");
  protobuf_c_message_free_unpacked(&resumed->base, NULL);
  return 0;
}
