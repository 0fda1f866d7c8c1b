/* The coordinator daemon: the user-facing Zenith service, the worker-facing
 * Workers service, the scheduler and the metric fan-out to watchers.
 *
 * Everything runs on the RPC server's one thread (handlers and a 100 ms tick),
 * so the state below needs no locks. Jobs, their metrics, evaluations and
 * events are written to the SQLite store before they are announced, so what a
 * watcher has seen survives a restart. Workers are known only in memory: after
 * a restart they are told to register again. The structs are in coord_internal.h;
 * checkpoints, resume and automatic restarts are in coord_ckpt.c. */
#include "coordinator.h"

#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "coord_ckpt.h"
#include "coord_kv.h"
#include "coord_listen.h"
#include "coord_metrics.h"
#include "coord_spec.h"
#include "zenith.pb-c.h"
#include "zn_err.h"
#include "zn_health.h"
#include "zn_log.h"
#include "zn_rpc.h"
#include "zn_store.h"
#include "zn_time.h"

static zn_rpc_server* volatile signal_target;

/* Set by SIGINT or SIGTERM. The tick then turns the health service NOT_SERVING, and stops the
 * server STOP_GRACE_MS later: long enough for probes and health watchers, on this server and on
 * the --health-listen one, to hear it while the server still answers. */
static volatile sig_atomic_t stop_signalled;
#define STOP_GRACE_MS 300

static void on_signal(int sig) {
  if (signal_target) stop_signalled = 1;
}

/* ---------------------------------------------------------------- helpers */

const char* coord_state_name(int state) {
  const ProtobufCEnumValue* v =
      protobuf_c_enum_descriptor_get_value(&zenith__v1__job_state__descriptor, state);
  return v ? v->name : "UNKNOWN";
}

static int is_final(int state) {
  return state == ZENITH__V1__JOB_STATE__SUCCEEDED || state == ZENITH__V1__JOB_STATE__FAILED ||
         state == ZENITH__V1__JOB_STATE__CANCELLED;
}

void coord_set_string(char** field, const char* value) {
  free(*field);
  *field = strdup(value);
}

active_job* coord_find_active(coordinator* co, const char* id) {
  for (active_job* a = co->active; a; a = a->next)
    if (strcmp(a->job->id, id) == 0) return a;
  return NULL;
}

worker* coord_find_worker(coordinator* co, const char* id) {
  for (worker* w = co->workers; w; w = w->next)
    if (!w->lost && strcmp(w->id, id) == 0) return w;
  return NULL;
}

void coord_save_job(coordinator* co, const Job* job) {
  if (zn_store_put_job(co->store, job) != ZN_OK)
    ZN_ERROR("job %s: could not be saved to the state database", job->id);
}

static void broadcast(active_job* a, const Zenith__V1__WatchJobResponse* item) {
  watcher** p = &a->watchers;
  while (*p) {
    if (zn_rpc_stream_write((*p)->call, &item->base) != 0) {
      watcher* gone = *p;
      *p = gone->next;
      free(gone);
    } else {
      p = &(*p)->next;
    }
  }
}

void coord_record_event(coordinator* co, active_job* a, const char* kind, const char* fmt, ...) {
  char text[1024];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(text, sizeof text, fmt, ap);
  va_end(ap);
  Zenith__V1__JobEvent ev = ZENITH__V1__JOB_EVENT__INIT;
  ev.has_unix_ms = 1;
  ev.unix_ms = zn_unix_ms();
  ev.kind = (char*)kind;
  ev.message = text;
  zn_store_append_event(co->store, a->job->id, &ev);
  Zenith__V1__WatchJobResponse item = ZENITH__V1__WATCH_JOB_RESPONSE__INIT;
  item.item_case = ZENITH__V1__WATCH_JOB_RESPONSE__ITEM_EVENT;
  item.event = &ev;
  broadcast(a, &item);
}

void coord_announce_job(active_job* a) {
  Zenith__V1__WatchJobResponse item = ZENITH__V1__WATCH_JOB_RESPONSE__INIT;
  item.item_case = ZENITH__V1__WATCH_JOB_RESPONSE__ITEM_JOB;
  item.job = a->job;
  broadcast(a, &item);
}

void coord_release_workers(coordinator* co, const char* job_id) {
  for (worker* w = co->workers; w; w = w->next) {
    if (strcmp(w->job_id, job_id) == 0 && w->assignment_pending) {
      w->job_id[0] = '\0';
      w->assignment_pending = 0;
    }
  }
}

static void drop_active(coordinator* co, active_job* target) {
  for (active_job** p = &co->active; *p; p = &(*p)->next) {
    if (*p == target) {
      *p = target->next;
      break;
    }
  }
  for (watcher* w = target->watchers; w;) {
    watcher* next = w->next;
    zn_rpc_stream_finish(w->call, ZN_RPC_OK, "");
    free(w);
    w = next;
  }
  zenith__v1__job__free_unpacked(target->job, NULL);
  free(target->held_error);
  free(target);
}

/* Moves a job to a final state: saved, announced, watchers closed. Workers
 * still on it learn from their next heartbeat that it is over. */
static void end_job(coordinator* co, active_job* a, int state, const char* error) {
  Job* job = a->job;
  job->state = state;
  job->has_state = 1;
  job->has_finished_unix_ms = 1;
  job->finished_unix_ms = zn_unix_ms();
  if (error) coord_set_string(&job->error, error);
  coord_set_string(&job->reason,
                   state == ZENITH__V1__JOB_STATE__CANCELLED ? "cancelled by a user" : "");
  coord_save_job(co, job);

  const char* kind = state == ZENITH__V1__JOB_STATE__SUCCEEDED ? "succeeded"
                     : state == ZENITH__V1__JOB_STATE__FAILED  ? "failed"
                                                               : "cancelled";
  if (state == ZENITH__V1__JOB_STATE__SUCCEEDED)
    coord_record_event(co, a, kind, "job succeeded after %lld steps: test accuracy %.4f",
                       (long long)job->step, job->test_accuracy);
  else
    coord_record_event(co, a, kind, "job %s%s%s", kind, error ? ": " : "", error ? error : "");
  ZN_INFO("job %s %s%s%s", job->id, coord_state_name(state), error ? ": " : "", error ? error : "");

  char prefix[96];
  snprintf(prefix, sizeof prefix, "%s/", job->id);
  coord_kv_drop_prefix(co->kv, prefix);
  coord_release_workers(co, job->id);
  coord_ckpt_job_ended(co, job);
  coord_announce_job(a);
  if (co->metrics) coord_metrics_job_ended(co->metrics, job);
  drop_active(co, a);
}

/* ---------------------------------------------------------------- Zenith service */

static void schedule(coordinator* co);

static void handle_submit(void* ud, zn_rpc_call* call, const ProtobufCMessage* msg) {
  coordinator* co = ud;
  const Zenith__V1__SubmitJobRequest* req = (const void*)msg;
  char err[512];
  if (coord_spec_validate(req->spec, err, sizeof err) != 0) {
    zn_rpc_fail(call, ZN_RPC_INVALID_ARGUMENT, "invalid job spec: %s", err);
    return;
  }

  Job draft = ZENITH__V1__JOB__INIT;
  char id[64];
  if (zn_store_new_job_id(co->store, id, sizeof id) != ZN_OK) {
    zn_rpc_fail(call, ZN_RPC_INTERNAL, "the coordinator's database could not allocate a job id");
    return;
  }
  draft.id = id;
  draft.spec = req->spec;
  draft.has_state = 1;
  draft.state = ZENITH__V1__JOB_STATE__QUEUED;
  draft.has_created_unix_ms = 1;
  draft.created_unix_ms = zn_unix_ms();
  draft.reason = "waiting for workers";

  active_job* a = calloc(1, sizeof *a);
  a->job = zn_rpc_clone_message(&draft.base);
  coord_spec_fill_defaults(a->job->spec);
  coord_save_job(co, a->job);
  for (active_job** p = &co->active;; p = &(*p)->next) {
    if (!*p) {
      *p = a;
      break;
    }
  }
  const Zenith__V1__JobSpec* spec = a->job->spec;
  char sharded[48] = "";
  if (strcmp(spec->sharding, "none") != 0)
    snprintf(sharded, sizeof sharded, ", sharding %.32s", spec->sharding);
  coord_record_event(co, a, "submitted", "job submitted: model %s, %d %s worker(s), batch %d%s",
                     spec->model, spec->workers, spec->device, spec->batch_size, sharded);
  ZN_INFO("job %s QUEUED: model %s, %d %s worker(s), batch %d, %d epoch(s), max %lld steps%s", id,
          spec->model, spec->workers, spec->device, spec->batch_size, spec->epochs,
          (long long)spec->max_steps, sharded);

  schedule(co); /* start it now if workers are idle, rather than at the next tick */
  Zenith__V1__SubmitJobResponse resp = ZENITH__V1__SUBMIT_JOB_RESPONSE__INIT;
  resp.job = a->job;
  zn_rpc_reply(call, &resp.base);
}

/* The current view of a job: live if active, else from the store. */
static Job* load_job(coordinator* co, const char* id, int* owned) {
  active_job* a = coord_find_active(co, id);
  *owned = 0;
  if (a) return a->job;
  Job* job = NULL;
  if (zn_store_get_job(co->store, id, &job) != ZN_OK) return NULL;
  coord_spec_fill_stored(job->spec);
  *owned = 1;
  return job;
}

static void handle_get(void* ud, zn_rpc_call* call, const ProtobufCMessage* msg) {
  coordinator* co = ud;
  const Zenith__V1__GetJobRequest* req = (const void*)msg;
  int owned;
  Job* job = load_job(co, req->id ? req->id : "", &owned);
  if (!job) {
    zn_rpc_fail(call, ZN_RPC_NOT_FOUND, "no job with id '%s'; `zenithctl list` shows them",
                req->id ? req->id : "");
    return;
  }
  zn_rpc_reply(call, &job->base);
  if (owned) zenith__v1__job__free_unpacked(job, NULL);
}

static void handle_list(void* ud, zn_rpc_call* call, const ProtobufCMessage* msg) {
  coordinator* co = ud;
  Job** jobs = NULL;
  size_t n = 0;
  if (zn_store_list_jobs(co->store, &jobs, &n) != ZN_OK) {
    zn_rpc_fail(call, ZN_RPC_INTERNAL, "the coordinator's database could not list jobs");
    return;
  }
  /* Active jobs change faster than they are saved: answer with their live view. */
  Job** view = malloc((n ? n : 1) * sizeof *view);
  for (size_t i = 0; i < n; i++) {
    active_job* a = coord_find_active(co, jobs[i]->id);
    if (!a) coord_spec_fill_stored(jobs[i]->spec);
    view[i] = a ? a->job : jobs[i];
  }
  Zenith__V1__ListJobsResponse resp = ZENITH__V1__LIST_JOBS_RESPONSE__INIT;
  resp.n_jobs = n;
  resp.jobs = view;
  zn_rpc_reply(call, &resp.base);
  free(view);
  zn_store_free_jobs(jobs, n);
}

static void handle_cancel(void* ud, zn_rpc_call* call, const ProtobufCMessage* msg) {
  coordinator* co = ud;
  const Zenith__V1__CancelJobRequest* req = (const void*)msg;
  const char* id = req->id ? req->id : "";
  active_job* a = coord_find_active(co, id);
  if (!a) {
    int owned;
    Job* job = load_job(co, id, &owned);
    if (!job) {
      zn_rpc_fail(call, ZN_RPC_NOT_FOUND, "no job with id '%s'; `zenithctl list` shows them", id);
      return;
    }
    zn_rpc_fail(call, ZN_RPC_FAILED_PRECONDITION, "job %s has already ended (%s)", id,
                coord_state_name(job->state));
    if (owned) zenith__v1__job__free_unpacked(job, NULL);
    return;
  }
  Job* snapshot = zn_rpc_clone_message(&a->job->base);
  end_job(co, a, ZENITH__V1__JOB_STATE__CANCELLED, NULL);
  snapshot->state = ZENITH__V1__JOB_STATE__CANCELLED;
  zn_rpc_reply(call, &snapshot->base);
  zenith__v1__job__free_unpacked(snapshot, NULL);
}

typedef struct {
  zn_rpc_call* call;
} replay_ctx;

static int replay_one(void* ud, const Zenith__V1__WatchJobResponse* item) {
  replay_ctx* ctx = ud;
  return zn_rpc_stream_write(ctx->call, &item->base) == 0 ? 0 : 1;
}

static void on_watcher_gone(void* ud, zn_rpc_call* call) {
  coordinator* co = ud;
  for (active_job* a = co->active; a; a = a->next) {
    for (watcher** p = &a->watchers; *p; p = &(*p)->next) {
      if ((*p)->call == call) {
        watcher* gone = *p;
        *p = gone->next;
        free(gone);
        return;
      }
    }
  }
}

static void handle_watch(void* ud, zn_rpc_call* call, const ProtobufCMessage* msg) {
  coordinator* co = ud;
  const Zenith__V1__WatchJobRequest* req = (const void*)msg;
  int owned;
  Job* job = load_job(co, req->id ? req->id : "", &owned);
  if (!job) {
    zn_rpc_fail(call, ZN_RPC_NOT_FOUND, "no job with id '%s'; `zenithctl list` shows them",
                req->id ? req->id : "");
    return;
  }
  Zenith__V1__WatchJobResponse first = ZENITH__V1__WATCH_JOB_RESPONSE__INIT;
  first.item_case = ZENITH__V1__WATCH_JOB_RESPONSE__ITEM_JOB;
  first.job = job;
  zn_rpc_stream_write(call, &first.base);
  replay_ctx ctx = {call};
  int replayed = zn_store_replay(co->store, job->id, replay_one, &ctx);
  if (replayed != ZN_OK && replayed != ZN_ERR_CANCELLED)
    ZN_ERROR("job %s: its history could not be replayed: %s", job->id, zn_store_errmsg(co->store));

  if (req->history_only && !owned) { /* still running, but only its history so far was asked for */
    zn_rpc_stream_finish(call, ZN_RPC_OK, "");
    return;
  }
  if (owned) { /* already final: the replay is the whole story */
    zn_rpc_stream_write(call, &first.base);
    zn_rpc_stream_finish(call, ZN_RPC_OK, "");
    zenith__v1__job__free_unpacked(job, NULL);
    return;
  }
  active_job* a = coord_find_active(co, job->id);
  watcher* w = calloc(1, sizeof *w);
  w->call = call;
  w->next = a->watchers;
  a->watchers = w;
  zn_rpc_call_on_close(call, on_watcher_gone, co);
}

/* ---------------------------------------------------------------- Workers service */

static void handle_register(void* ud, zn_rpc_call* call, const ProtobufCMessage* msg) {
  coordinator* co = ud;
  const Zenith__V1__RegisterRequest* req = (const void*)msg;
  if (!req->name || !req->name[0] || strlen(req->name) >= sizeof(((worker*)0)->name)) {
    zn_rpc_fail(call, ZN_RPC_INVALID_ARGUMENT, "Register: name must be 1 to 127 characters");
    return;
  }
  const char* device = req->device && req->device[0] ? req->device : "cpu";
  if (!coord_spec_known_device(device)) {
    zn_rpc_fail(call, ZN_RPC_INVALID_ARGUMENT, "Register: device must be cpu or cuda (got '%s')",
                device);
    return;
  }
  /* A name belongs to one live worker. A second process asking for it is
   * refused until the holder's heartbeats stop (a restarted worker whose
   * predecessor crashed gets in once the old registration times out). */
  for (worker* w = co->workers; w; w = w->next) {
    if (!w->lost && strcmp(w->name, req->name) == 0) {
      zn_rpc_fail(call, ZN_RPC_ALREADY_EXISTS,
                  "worker name '%s' is in use by a live worker (%s, pid %d); give this one "
                  "another --name",
                  req->name, w->id, w->pid);
      return;
    }
  }
  char id[sizeof(((worker*)0)->id)];
  if (zn_store_new_worker_id(co->store, id, sizeof id) != ZN_OK) {
    zn_rpc_fail(call, ZN_RPC_INTERNAL, "the coordinator's database could not allocate a worker id");
    return;
  }
  worker* w = calloc(1, sizeof *w);
  snprintf(w->id, sizeof w->id, "%s", id);
  snprintf(w->name, sizeof w->name, "%s", req->name);
  snprintf(w->host, sizeof w->host, "%s", req->host && req->host[0] ? req->host : "127.0.0.1");
  snprintf(w->device, sizeof w->device, "%s", device);
  w->pid = req->pid;
  w->last_seen_ms = w->registered_ms = zn_unix_ms();
  worker** tail = &co->workers;
  while (*tail) tail = &(*tail)->next;
  *tail = w;
  ZN_INFO("worker %s registered as %s from %s (host %s, device %s, pid %d)", w->name, w->id,
          zn_rpc_call_peer(call), w->host, w->device, req->pid);

  Zenith__V1__RegisterResponse resp = ZENITH__V1__REGISTER_RESPONSE__INIT;
  resp.worker_id = w->id;
  resp.has_heartbeat_ms = 1;
  resp.heartbeat_ms = co->cfg.heartbeat_ms;
  zn_rpc_reply(call, &resp.base);
}

static void handle_heartbeat(void* ud, zn_rpc_call* call, const ProtobufCMessage* msg) {
  coordinator* co = ud;
  const Zenith__V1__HeartbeatRequest* req = (const void*)msg;
  Zenith__V1__HeartbeatResponse resp = ZENITH__V1__HEARTBEAT_RESPONSE__INIT;
  worker* w = coord_find_worker(co, req->worker_id ? req->worker_id : "");
  if (!w) {
    resp.has_reregister = 1;
    resp.reregister = 1;
    zn_rpc_reply(call, &resp.base);
    return;
  }
  w->last_seen_ms = zn_unix_ms();

  Zenith__V1__Assignment asg = ZENITH__V1__ASSIGNMENT__INIT;
  active_job* a = w->job_id[0] ? coord_find_active(co, w->job_id) : NULL;
  const char* running = req->job_id ? req->job_id : "";
  if (w->job_id[0] && !running[0] &&
      (!a || w->attempt != a->attempt || a->job->state != ZENITH__V1__JOB_STATE__RUNNING)) {
    /* Its job or its attempt ended and the worker is idle, though its FinishJob never came
     * (a call lost on the way, or a restart that overtook it): the worker is free again. */
    w->job_id[0] = '\0';
    a = NULL;
  }
  if (a && !running[0] && !w->assignment_pending &&
      a->job->state == ZENITH__V1__JOB_STATE__RUNNING) {
    /* Idle, yet told of this job: the worker never started it. Say it again. */
    ZN_WARN("worker %s is idle but was given job %s; sending the assignment again", w->name,
            a->job->id);
    w->assignment_pending = 1;
  }
  if (w->assignment_pending && a && !running[0]) {
    char prefix[96];
    snprintf(prefix, sizeof prefix, "%s/%d", a->job->id, a->attempt);
    asg.job_id = a->job->id;
    asg.has_attempt = asg.has_rank = asg.has_world_size = 1;
    asg.attempt = a->attempt;
    asg.rank = w->rank;
    asg.world_size = a->job->spec->workers;
    asg.spec = a->job->spec;
    asg.kv_prefix = prefix;
    resp.assignment = &asg;
    w->assignment_pending = 0;
    coord_ckpt_fill_assignment(co, a, &asg);
    zn_rpc_reply(call, &resp.base);
    coord_ckpt_clear_assignment(&asg);
    return;
  }
  int attempt = coord_request_attempt(w, req->has_attempt, req->attempt);
  if (running[0] &&
      (!a || strcmp(running, a->job->id) != 0 || a->job->state != ZENITH__V1__JOB_STATE__RUNNING ||
       attempt != a->attempt || w->attempt != a->attempt)) {
    resp.has_cancel = 1;
    resp.cancel = 1;
  } else if (running[0] && w->rank == 0) {
    resp.checkpoint_request = coord_ckpt_pending_request(co->ckpt, a->job->id);
    resp.has_checkpoint_request = resp.checkpoint_request > 0;
  }
  zn_rpc_reply(call, &resp.base);
}

static active_job* job_of_worker(coordinator* co, zn_rpc_call* call, const char* worker_id,
                                 const char* job_id, worker** w_out) {
  worker* w = coord_find_worker(co, worker_id ? worker_id : "");
  *w_out = w;
  if (!w) {
    zn_rpc_fail(call, ZN_RPC_FAILED_PRECONDITION, "unknown worker '%s'; register first",
                worker_id ? worker_id : "");
    return NULL;
  }
  w->last_seen_ms = zn_unix_ms();
  active_job* a = job_id ? coord_find_active(co, job_id) : NULL;
  if (a && strcmp(w->job_id, job_id) != 0) {
    zn_rpc_fail(call, ZN_RPC_FAILED_PRECONDITION, "worker %s is not running job %s", w->name,
                job_id);
    *w_out = NULL;
    return NULL;
  }
  return a;
}

static void apply_metrics(coordinator* co, active_job* a,
                          const Zenith__V1__ReportMetricsRequest* r) {
  Job* job = a->job;
  if (r->has_total_steps && r->total_steps != job->total_steps) {
    job->has_total_steps = 1;
    job->total_steps = r->total_steps;
    coord_announce_job(a); /* watchers learn the length of the job before its first step */
  }
  if (r->n_metrics) {
    zn_store_append_metrics(co->store, job->id, r->metrics, r->n_metrics);
    const Zenith__V1__StepMetrics* last = r->metrics[r->n_metrics - 1];
    if (job->last) zenith__v1__step_metrics__free_unpacked(job->last, NULL);
    job->last = zn_rpc_clone_message(&last->base);
    job->has_step = job->has_epoch = 1;
    job->step = last->step;
    job->epoch = last->epoch;
  }
  for (size_t i = 0; i < r->n_evals; i++) {
    zn_store_append_eval(co->store, job->id, r->evals[i]);
    ZN_INFO("job %s eval at step %lld: test loss %.4f, test accuracy %.4f", job->id,
            (long long)r->evals[i]->step, r->evals[i]->test_loss, r->evals[i]->test_accuracy);
  }
  coord_save_job(co, job);

  Zenith__V1__WatchJobResponse item = ZENITH__V1__WATCH_JOB_RESPONSE__INIT;
  item.item_case = ZENITH__V1__WATCH_JOB_RESPONSE__ITEM_METRICS;
  for (size_t i = 0; i < r->n_metrics; i++) {
    item.metrics = r->metrics[i];
    broadcast(a, &item);
  }
  item.item_case = ZENITH__V1__WATCH_JOB_RESPONSE__ITEM_EVAL;
  for (size_t i = 0; i < r->n_evals; i++) {
    item.eval = r->evals[i];
    broadcast(a, &item);
  }
}

static void handle_report(void* ud, zn_rpc_call* call, const ProtobufCMessage* msg) {
  coordinator* co = ud;
  const Zenith__V1__ReportMetricsRequest* req = (const void*)msg;
  worker* w;
  active_job* a = job_of_worker(co, call, req->worker_id, req->job_id, &w);
  if (!w) return;
  if (a && w->rank != 0) {
    zn_rpc_fail(call, ZN_RPC_FAILED_PRECONDITION,
                "job %s takes metrics from rank 0; worker %s is rank %d", a->job->id, w->name,
                w->rank);
    return;
  }
  Zenith__V1__ReportMetricsResponse resp = ZENITH__V1__REPORT_METRICS_RESPONSE__INIT;
  int attempt = coord_request_attempt(w, req->has_attempt, req->attempt);
  resp.has_cancel = 1;
  resp.cancel = !a || a->job->state != ZENITH__V1__JOB_STATE__RUNNING || attempt != a->attempt ||
                w->attempt != a->attempt;
  if (!resp.cancel) {
    coord_ckpt_refused(co, a, w, req->refused_checkpoints, req->n_refused_checkpoints);
    apply_metrics(co, a, req);
    resp.checkpoint_request = coord_ckpt_pending_request(co->ckpt, a->job->id);
    resp.has_checkpoint_request = resp.checkpoint_request > 0;
  }
  zn_rpc_reply(call, &resp.base);
}

/* A worker that left on SIGTERM reported an attempt that is already over: another rank's
 * preemption requeued the job first (a node drain stops several workers at once). The daemon is
 * going away all the same, so it must not be scheduled again; and if the scheduler has already
 * put it in the job's next attempt, which it will never start, that attempt is a preemption too
 * and costs no restart. */
static void left_late_on_sigterm(coordinator* co, active_job* a, worker* w, int64_t step) {
  if (a && a->job->state == ZENITH__V1__JOB_STATE__RUNNING && w->attempt == a->attempt &&
      strcmp(w->job_id, a->job->id) == 0) {
    coord_ckpt_preempted(co, a, w, step);
    return;
  }
  w->lost = 1;
  ZN_INFO("worker %s (%s) left on SIGTERM", w->name, w->id);
}

static void handle_finish(void* ud, zn_rpc_call* call, const ProtobufCMessage* msg) {
  coordinator* co = ud;
  const Zenith__V1__FinishJobRequest* req = (const void*)msg;
  worker* w;
  active_job* a = job_of_worker(co, call, req->worker_id, req->job_id, &w);
  if (!w) return;
  int rank = w->rank;
  int attempt = coord_request_attempt(w, req->has_attempt, req->attempt);
  int current = a && a->job->state == ZENITH__V1__JOB_STATE__RUNNING && attempt == a->attempt &&
                w->attempt == a->attempt;
  if (req->job_id && strcmp(w->job_id, req->job_id) == 0 && attempt == w->attempt)
    w->job_id[0] = '\0';
  Zenith__V1__FinishJobResponse resp = ZENITH__V1__FINISH_JOB_RESPONSE__INIT;
  zn_rpc_reply(call, &resp.base);
  if (!current) { /* the job has ended, or a restart has replaced this attempt */
    if (req->preempted) left_late_on_sigterm(co, a, w, req->steps);
    return;
  }

  coord_ckpt_refused(co, a, w, req->refused_checkpoints, req->n_refused_checkpoints);
  if (req->preempted) {
    coord_ckpt_preempted(co, a, w, req->steps);
    return;
  }

  if (!req->ok && !req->cancelled) {
    char why[1200];
    snprintf(why, sizeof why, "rank %d (worker %s): %s", rank, w->name,
             req->error && req->error[0] ? req->error : "failed without a message");
    if (req->collective_failed) {
      /* With three or more ranks, every survivor reports the broken collective: the first
       * report is held, the others add nothing to it. */
      if (!a->held_error) {
        a->held_error = strdup(why);
        a->held_until_ms = zn_unix_ms() + co->cfg.worker_timeout_ms;
      }
      return;
    }
    end_job(co, a, ZENITH__V1__JOB_STATE__FAILED, why);
    return;
  }
  if (req->has_test_result) {
    a->job->has_has_test_result = a->job->has_test_result = 1;
    a->job->has_test_loss = a->job->has_test_accuracy = 1;
    a->job->test_loss = req->test_loss;
    a->job->test_accuracy = req->test_accuracy;
  }
  if (req->has_steps) {
    a->job->has_step = 1;
    a->job->step = req->steps;
  }
  if (!a->rank_done[rank]) {
    a->rank_done[rank] = 1;
    a->ranks_done++;
  }
  if (a->ranks_done == a->job->spec->workers) {
    if (req->cancelled && !req->ok)
      end_job(co, a, ZENITH__V1__JOB_STATE__FAILED, "the workers stopped the job early");
    else
      end_job(co, a, ZENITH__V1__JOB_STATE__SUCCEEDED, NULL);
  }
}

/* ---------------------------------------------------------------- scheduler */

/* Idle workers of the device that answered recently: one that has missed a few
 * heartbeats (stopped, or cut off) is not given a job while it may be about to be lost. */
static int idle_workers(coordinator* co, const char* device, worker** out, int want) {
  int64_t window = 3 * (int64_t)co->cfg.heartbeat_ms;
  int64_t fresh_after = zn_unix_ms() - (window > 1000 ? window : 1000);
  int n = 0;
  for (worker* w = co->workers; w && n < want; w = w->next)
    if (!w->lost && !w->job_id[0] && w->last_seen_ms >= fresh_after &&
        strcmp(w->device, device) == 0)
      out[n++] = w;
  return n;
}

static int registered_workers(const coordinator* co, const char* device) {
  int n = 0;
  for (const worker* w = co->workers; w; w = w->next)
    if (!w->lost && strcmp(w->device, device) == 0) n++;
  return n;
}

static const char* plural(int n) {
  return n == 1 ? "" : "s";
}

/* Why a job waits, in terms a user can act on: the workers of its device it
 * needs, how many are idle, every registered worker by device, and, when too
 * few of its device are registered at all, how to start more. */
static void waiting_reason(const coordinator* co, const char* device, int want, int idle, char* out,
                           size_t len) {
  int cpu = registered_workers(co, "cpu");
  int cuda = registered_workers(co, "cuda");
  char registered[80];
  if (cpu && cuda)
    snprintf(registered, sizeof registered, "%d cpu and %d cuda workers registered", cpu, cuda);
  else if (cpu || cuda)
    snprintf(registered, sizeof registered, "%d %s worker%s registered", cpu + cuda,
             cpu ? "cpu" : "cuda", plural(cpu + cuda));
  else
    snprintf(registered, sizeof registered, "no workers registered");
  int is_cuda = strcmp(device, "cuda") == 0;
  int too_few = (is_cuda ? cuda : cpu) < want;
  snprintf(out, len, "waiting for %d %s worker%s: %d idle %s worker%s (%s%s%s)", want, device,
           plural(want), idle, device, plural(idle), registered,
           too_few ? "; start workers with --device " : "",
           too_few ? (is_cuda ? "cuda:N" : "cpu") : "");
}

static void start_job(coordinator* co, active_job* a, worker** chosen) {
  Job* job = a->job;
  int n = job->spec->workers;
  a->attempt++;
  a->requeue_note[0] = '\0';
  a->ranks_done = 0;
  memset(a->rank_done, 0, sizeof a->rank_done);
  for (size_t i = 0; i < job->n_workers; i++) free(job->workers[i]);
  free(job->workers);
  job->workers = calloc(n, sizeof(char*));
  job->n_workers = n;
  for (int r = 0; r < n; r++) {
    snprintf(chosen[r]->job_id, sizeof chosen[r]->job_id, "%s", job->id);
    chosen[r]->rank = r;
    chosen[r]->attempt = a->attempt;
    chosen[r]->assignment_pending = 1;
    job->workers[r] = strdup(chosen[r]->name);
  }
  job->state = ZENITH__V1__JOB_STATE__RUNNING;
  job->has_started_unix_ms = 1;
  job->started_unix_ms = zn_unix_ms();
  coord_set_string(&job->reason, "");
  coord_save_job(co, job);
  coord_record_event(co, a, "started", "job started on %d worker(s); rank 0 is %s", n,
                     job->workers[0]);
  ZN_INFO("job %s RUNNING on %d %s worker(s), rank 0 = %s", job->id, n,
          coord_spec_device(job->spec), job->workers[0]);
  coord_announce_job(a);
}

static void schedule(coordinator* co) {
  for (active_job* a = co->active; a; a = a->next) {
    Job* job = a->job;
    if (job->state != ZENITH__V1__JOB_STATE__QUEUED) continue;
    const char* device = coord_spec_device(job->spec);
    int want = job->spec->workers;
    worker** chosen = calloc(want, sizeof *chosen);
    int have = idle_workers(co, device, chosen, want);
    if (have == want) {
      start_job(co, a, chosen);
    } else {
      char reason[512];
      int n = a->requeue_note[0] ? snprintf(reason, sizeof reason, "%s; ", a->requeue_note) : 0;
      waiting_reason(co, device, want, have, reason + n, sizeof reason - (size_t)n);
      if (!job->reason || strcmp(job->reason, reason) != 0) {
        coord_set_string(&job->reason, reason);
        coord_announce_job(a);
      }
    }
    free(chosen);
  }
}

static void check_liveness(coordinator* co) {
  int64_t now = zn_unix_ms();
  for (worker* w = co->workers; w; w = w->next) {
    if (w->lost || now - w->last_seen_ms <= co->cfg.worker_timeout_ms) continue;
    w->lost = 1;
    ZN_WARN("worker %s (%s) lost: no heartbeat for %.1f s", w->name, w->id,
            (now - w->last_seen_ms) / 1000.0);
    active_job* a = w->job_id[0] ? coord_find_active(co, w->job_id) : NULL;
    if (!a || a->job->state != ZENITH__V1__JOB_STATE__RUNNING || w->attempt != a->attempt) continue;
    char why[300];
    snprintf(why, sizeof why, "worker %s (rank %d) lost: no heartbeat for %.1f s", w->name, w->rank,
             (now - w->last_seen_ms) / 1000.0);
    coord_record_event(co, a, "worker_lost", "%s", why);
    char error[1400];
    if (coord_ckpt_restart(co, a, why, error, sizeof error) != 0)
      end_job(co, a, ZENITH__V1__JOB_STATE__FAILED, error);
  }
  /* Forget lost workers that no job refers to any more. */
  worker** p = &co->workers;
  while (*p) {
    worker* w = *p;
    if (w->lost) {
      *p = w->next;
      free(w);
    } else {
      p = &w->next;
    }
  }
}

/* Held collective failures whose peers all stayed alive end their jobs now. */
static void release_held_errors(coordinator* co) {
  int64_t now = zn_unix_ms();
  active_job* a = co->active;
  while (a) {
    active_job* next = a->next;
    char error[1400];
    if (a->held_error && now >= a->held_until_ms &&
        coord_ckpt_restart(co, a, a->held_error, error, sizeof error) != 0)
      end_job(co, a, ZENITH__V1__JOB_STATE__FAILED, error);
    a = next;
  }
}

/* Hands the metrics endpoint this tick's workers and active jobs; it renders them for scrapes. */
static void publish_metrics(coordinator* co) {
  if (!co->metrics) return;
  coord_metrics_begin(co->metrics);
  for (worker* w = co->workers; w; w = w->next)
    if (!w->lost) coord_metrics_add_worker(co->metrics, w->device, w->job_id[0] != '\0');
  for (active_job* a = co->active; a; a = a->next) coord_metrics_add_job(co->metrics, a->job);
  coord_metrics_publish(co->metrics);
}

/* The names the health service answers for: the whole daemon ("") and each of its services. */
static void set_health(coordinator* co, int status) {
  static const char* names[] = {"", "zenith.v1.Zenith", "zenith.v1.Workers"};
  for (size_t i = 0; i < sizeof names / sizeof names[0]; i++)
    zn_health_set(co->health, names[i], status);
}

static void check_stop(coordinator* co) {
  if (!stop_signalled) return;
  int64_t now = zn_unix_ms();
  if (co->stop_at_ms == 0) {
    ZN_INFO("stop signal received: health NOT_SERVING; stopping in %d ms", STOP_GRACE_MS);
    set_health(co, ZN_HEALTH_NOT_SERVING);
    co->stop_at_ms = now + STOP_GRACE_MS;
  } else if (now >= co->stop_at_ms) {
    zn_rpc_server_stop(co->server);
  }
}

static void tick(void* ud) {
  coordinator* co = ud;
  check_stop(co);
  zn_health_tick(co->health_main);
  check_liveness(co);
  release_held_errors(co);
  schedule(co);
  coord_kv_expire(co->kv);
  publish_metrics(co);
}

/* ---------------------------------------------------------------- start-up */

/* Jobs that were running when the coordinator stopped go back to the queue:
 * their workers are told to register again, and the job continues from its
 * latest checkpoint. */
static int load_active_jobs(coordinator* co) {
  Job** jobs = NULL;
  size_t n = 0;
  if (zn_store_list_jobs(co->store, &jobs, &n) != ZN_OK) return ZN_ERR_STORE;
  active_job** tail = &co->active;
  for (size_t i = 0; i < n; i++) {
    if (is_final(jobs[i]->state)) continue;
    active_job* a = calloc(1, sizeof *a);
    a->job = zn_rpc_clone_message(&jobs[i]->base);
    coord_spec_fill_stored(a->job->spec);
    *tail = a;
    tail = &a->next;
    coord_ckpt_reload_job(co, a);
  }
  zn_store_free_jobs(jobs, n);
  return ZN_OK;
}

typedef struct {
  const char* path;
  zn_rpc_kind kind;
  const ProtobufCMessageDescriptor* type;
  zn_rpc_handler handler;
} method_entry;

static int add_methods(coordinator* co) {
  const method_entry methods[] = {
      {"/zenith.v1.Zenith/SubmitJob", ZN_RPC_UNARY, &zenith__v1__submit_job_request__descriptor,
       handle_submit},
      {"/zenith.v1.Zenith/GetJob", ZN_RPC_UNARY, &zenith__v1__get_job_request__descriptor,
       handle_get},
      {"/zenith.v1.Zenith/ListJobs", ZN_RPC_UNARY, &zenith__v1__list_jobs_request__descriptor,
       handle_list},
      {"/zenith.v1.Zenith/CancelJob", ZN_RPC_UNARY, &zenith__v1__cancel_job_request__descriptor,
       handle_cancel},
      {"/zenith.v1.Zenith/WatchJob", ZN_RPC_SERVER_STREAM,
       &zenith__v1__watch_job_request__descriptor, handle_watch},
      {"/zenith.v1.Workers/RegisterWorker", ZN_RPC_UNARY, &zenith__v1__register_request__descriptor,
       handle_register},
      {"/zenith.v1.Workers/Heartbeat", ZN_RPC_UNARY, &zenith__v1__heartbeat_request__descriptor,
       handle_heartbeat},
      {"/zenith.v1.Workers/ReportMetrics", ZN_RPC_UNARY,
       &zenith__v1__report_metrics_request__descriptor, handle_report},
      {"/zenith.v1.Workers/FinishJob", ZN_RPC_UNARY, &zenith__v1__finish_job_request__descriptor,
       handle_finish},
  };
  for (size_t i = 0; i < sizeof methods / sizeof methods[0]; i++) {
    int rc = zn_rpc_server_add_method(co->server, methods[i].path, methods[i].kind, methods[i].type,
                                      methods[i].handler, co);
    if (rc != ZN_OK) return rc;
  }
  int rc = coord_ckpt_add_methods(co);
  return rc != ZN_OK ? rc : coord_kv_add_methods(co->kv, co->server);
}

static void shutdown_coordinator(coordinator* co) {
  while (co->active) {
    active_job* a = co->active;
    co->active = a->next;
    for (watcher* w = a->watchers; w;) {
      watcher* next = w->next;
      free(w);
      w = next;
    }
    zenith__v1__job__free_unpacked(a->job, NULL);
    free(a);
  }
  while (co->workers) {
    worker* w = co->workers;
    co->workers = w->next;
    free(w);
  }
  coord_metrics_stop(co->metrics);
  zn_health_listener_stop(co->health_listener);
  zn_rpc_server_destroy(co->server);
  coord_ckpt_destroy(co->ckpt); /* after the server, whose cancelled calls may still report */
  coord_kv_destroy(co->kv);
  zn_store_close(co->store);
  zn_health_destroy(co->health);
}

static void write_port_file(const char* path, int port) {
  FILE* f = fopen(path, "w");
  if (f) {
    fprintf(f, "%d\n", port);
    fclose(f);
  }
}

/* The Prometheus endpoint that --metrics-listen asks for; an address that cannot be bound
 * stops the start, as the gRPC one does. */
static int start_metrics(coordinator* co) {
  char err[512];
  int rc = coord_metrics_start(co->cfg.metrics_listen, co->store, &co->metrics, err, sizeof err);
  if (rc != ZN_OK) {
    ZN_ERROR("--metrics-listen: %s", err);
    return rc;
  }
  ZN_INFO("metrics on http://%s/metrics", coord_metrics_address(co->metrics));
  if (co->cfg.metrics_port_file)
    write_port_file(co->cfg.metrics_port_file, coord_metrics_port(co->metrics));
  return ZN_OK;
}

/* The health service on the API listener and, with --health-listen, on a plain-text listener of
 * its own, which a bad address stops the start for. NOT_SERVING until the API listener is up. */
static int start_health(coordinator* co) {
  co->health = zn_health_create();
  if (!co->health) return ZN_ERR_NOMEM;
  set_health(co, ZN_HEALTH_NOT_SERVING);
  int rc = zn_health_serve(co->health, co->server, &co->health_main);
  if (rc != ZN_OK || !co->cfg.health_listen) return rc;
  char err[512];
  int port = 0;
  rc = zn_health_listen(co->health, co->cfg.health_listen, &co->health_listener, &port, err,
                        sizeof err);
  if (rc != ZN_OK) {
    ZN_ERROR("--health-listen: %s", err);
    return rc;
  }
  ZN_INFO("health service (plain text) on %s", zn_health_listener_address(co->health_listener));
  if (co->cfg.health_port_file) write_port_file(co->cfg.health_port_file, port);
  return ZN_OK;
}

int zn_coordinator_run(const coord_config* cfg) {
  coordinator co = {0};
  co.cfg = *cfg;
  char err[512];
  if (coord_listen_check(cfg) != ZN_OK) return 1;
  int rc = zn_store_open(cfg->state_dir, &co.store, err, sizeof err);
  if (rc != ZN_OK) {
    ZN_ERROR("cannot open the state folder %s: %s", cfg->state_dir, err);
    return 1;
  }
  ZN_INFO("state in %s/zenith.db", cfg->state_dir);
  if (coord_ckpt_create(cfg, &co.ckpt, err, sizeof err) != ZN_OK) {
    ZN_ERROR("%s", err);
    zn_store_close(co.store);
    return 1;
  }
  ZN_INFO("checkpoints in %s", coord_ckpt_dir(co.ckpt));
  co.kv = coord_kv_create();
  int port = 0;
  rc = coord_listen(cfg, &co.server, &port);
  if (rc != ZN_OK) {
    coord_ckpt_destroy(co.ckpt);
    coord_kv_destroy(co.kv);
    zn_store_close(co.store);
    return 1;
  }
  if (add_methods(&co) != ZN_OK || load_active_jobs(&co) != ZN_OK) {
    ZN_ERROR("the coordinator could not start its services: %s", zn_store_errmsg(co.store));
    shutdown_coordinator(&co);
    return 1;
  }
  if (cfg->metrics_listen && start_metrics(&co) != ZN_OK) {
    shutdown_coordinator(&co);
    return 1;
  }
  if (start_health(&co) != ZN_OK) {
    shutdown_coordinator(&co);
    return 1;
  }
  zn_rpc_server_set_tick(co.server, 100, tick, &co);
  zn_rpc_server_start(co.server);
  char shown[300];
  snprintf(shown, sizeof shown, "%s", cfg->listen);
  char* colon = strrchr(shown, ':');
  if (colon) snprintf(colon + 1, sizeof shown - (size_t)(colon + 1 - shown), "%d", port);
  ZN_INFO("listening on %s", shown);
  if (cfg->port_file) write_port_file(cfg->port_file, port);
  set_health(&co, ZN_HEALTH_SERVING);

  signal_target = co.server;
  signal(SIGINT, on_signal);
  signal(SIGTERM, on_signal);
  zn_rpc_server_run(co.server);
  ZN_INFO("shutting down");
  signal_target = NULL;
  shutdown_coordinator(&co);
  ZN_INFO("stopped");
  return 0;
}
