/* Checkpoints, resume and restarts on the coordinator; see coord_ckpt.h.
 *
 * A checkpoint record is written to the store before anything announces it (event, job,
 * CheckpointJob answer), as every change to a job is. Its id is "<job>.<n>", n counting the
 * job's checkpoints from 1; n is kept in the Job row (Job.checkpoints) and checked against the
 * newest record, so a coordinator killed between the two writes does not hand out an id twice.
 *
 * Attempts. A job's attempt goes up by one each time it is started (start_job); a restart or a
 * preemption only puts the job back in the queue, and every request of the attempt that was
 * running (heartbeats, metrics, FinishJob, ReportCheckpoint) is refused or ignored from then on.
 * A job resumed by a user or reloaded at start-up continues its numbering from the "started"
 * events in its history, so an attempt number, and the file names workers derive from it, is
 * never used twice for one job.
 *
 * The coordinator deletes the files of checkpoints past a job's keep_checkpoints. It deletes
 * only files inside the job's checkpoint folder, and never a file that a kept record names. */
#define _XOPEN_SOURCE 700 /* realpath */
#include "coord_ckpt.h"

#include <ctype.h>
#include <errno.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "zn_err.h"
#include "zn_log.h"
#include "zn_time.h"

typedef Zenith__V1__Checkpoint Checkpoint;

#define RUNNING ZENITH__V1__JOB_STATE__RUNNING
#define QUEUED ZENITH__V1__JOB_STATE__QUEUED

/* A CheckpointJob call waiting for the checkpoint it asked for. */
typedef struct waiting_call {
  zn_rpc_call* call;
  char job_id[64];
  int64_t request;
  struct waiting_call* next;
} waiting_call;

struct coord_ckpt {
  char dir[PATH_MAX]; /* absolute */
  waiting_call* waiting;
  int64_t last_request; /* request ids go up across all jobs */
};

/* ---------------------------------------------------------------- the folder */

/* mkdir -p, parents first. */
static int make_dir_tree(const char* dir) {
  if (mkdir(dir, 0755) == 0 || errno == EEXIST) return 0;
  if (errno != ENOENT) return -1;
  char parent[PATH_MAX];
  snprintf(parent, sizeof parent, "%s", dir);
  char* slash = strrchr(parent, '/');
  if (!slash || slash == parent) return -1;
  *slash = '\0';
  if (make_dir_tree(parent) != 0) return -1;
  return mkdir(dir, 0755) == 0 || errno == EEXIST ? 0 : -1;
}

int coord_ckpt_create(const coord_config* cfg, coord_ckpt** out, char* err, size_t errlen) {
  *out = NULL;
  char fallback[PATH_MAX];
  const char* dir = cfg->checkpoint_dir;
  if (!dir) {
    snprintf(fallback, sizeof fallback, "%s/checkpoints", cfg->state_dir);
    dir = fallback;
  }
  struct stat st;
  if (!dir || !dir[0] || strlen(dir) >= PATH_MAX - 256) {
    snprintf(err, errlen, "--checkpoint-dir: give a folder path of 1 to %d bytes", PATH_MAX - 256);
    return ZN_ERR_INVALID;
  }
  if (make_dir_tree(dir) != 0) {
    snprintf(err, errlen, "--checkpoint-dir %s: cannot create the folder: %s", dir,
             strerror(errno));
    return ZN_ERR_IO;
  }
  if (stat(dir, &st) != 0 || !S_ISDIR(st.st_mode)) {
    snprintf(err, errlen, "--checkpoint-dir %s: not a folder", dir);
    return ZN_ERR_IO;
  }
  /* Workers write there (on a shared file system) and the coordinator deletes old files. */
  if (access(dir, W_OK | X_OK) != 0) {
    snprintf(err, errlen, "--checkpoint-dir %s: the folder is not writable: %s", dir,
             strerror(errno));
    return ZN_ERR_IO;
  }
  coord_ckpt* c = calloc(1, sizeof *c);
  /* Workers run elsewhere, in other folders: they are given absolute paths. */
  if (!realpath(dir, c->dir)) snprintf(c->dir, sizeof c->dir, "%s", dir);
  *out = c;
  return ZN_OK;
}

void coord_ckpt_destroy(coord_ckpt* c) {
  if (!c) return;
  while (c->waiting) {
    waiting_call* w = c->waiting;
    c->waiting = w->next;
    free(w);
  }
  free(c);
}

const char* coord_ckpt_dir(const coord_ckpt* c) {
  return c->dir;
}

/* DIR/<job id>, malloc'd. */
static char* job_dir(const coord_ckpt* c, const char* job_id) {
  size_t len = strlen(c->dir) + strlen(job_id) + 2;
  char* path = malloc(len);
  snprintf(path, len, "%s/%s", c->dir, job_id);
  return path;
}

/* Whether path names something inside the job's folder, without a ".." that could leave it. */
static int inside_job_dir(const coord_ckpt* c, const char* job_id, const char* path) {
  char* dir = job_dir(c, job_id);
  size_t n = strlen(dir);
  int inside = strncmp(path, dir, n) == 0 && path[n] == '/' && path[n + 1] != '\0' &&
               !strstr(path, "/../") && strcmp(path + strlen(path) - 3, "/..") != 0;
  free(dir);
  return inside;
}

/* ---------------------------------------------------------------- helpers */

/* The state of a job, active or stored; -1 when there is no such job. */
static int job_state(coordinator* co, const char* id) {
  active_job* a = coord_find_active(co, id);
  if (a) return a->job->state;
  Job* job = NULL;
  if (zn_store_get_job(co->store, id, &job) != ZN_OK) return -1;
  int state = job->state;
  zenith__v1__job__free_unpacked(job, NULL);
  return state;
}

/* "checkpoint X at step S": where the job's next attempt continues from; NULL when it has no
 * checkpoint and starts from step 0. */
static const char* resume_point(const Job* job, char* buf, size_t len) {
  const Checkpoint* c = job->latest_checkpoint;
  if (!c || !c->id || !c->id[0]) return NULL;
  snprintf(buf, len, "checkpoint %s at step %lld", c->id, (long long)c->step);
  return buf;
}

static void set_latest(Job* job, const Checkpoint* c) {
  if (job->latest_checkpoint) zenith__v1__checkpoint__free_unpacked(job->latest_checkpoint, NULL);
  job->latest_checkpoint = zn_rpc_clone_message(&c->base);
}

static int count_started(void* ud, const Zenith__V1__WatchJobResponse* item) {
  if (item->item_case == ZENITH__V1__WATCH_JOB_RESPONSE__ITEM_EVENT && item->event->kind &&
      strcmp(item->event->kind, "started") == 0)
    (*(int*)ud)++;
  return 0;
}

/* Attempts the job has had so far: one "started" event each. */
static int past_attempts(coordinator* co, const char* job_id) {
  int n = 0;
  if (zn_store_replay(co->store, job_id, count_started, &n) != ZN_OK)
    ZN_WARN("job %s: its history could not be read to number its next attempt: %s", job_id,
            zn_store_errmsg(co->store));
  return n;
}

/* Puts a job whose attempt is over back in the queue: the attempt's keys are dropped, workers
 * not yet told are freed, and those still running it get cancel on their next heartbeat (their
 * attempt is over); start_job gives the job its next attempt. */
static void requeue(coordinator* co, active_job* a, const char* note) {
  Job* job = a->job;
  char prefix[96];
  snprintf(prefix, sizeof prefix, "%s/%d/", job->id, a->attempt);
  coord_kv_drop_prefix(co->kv, prefix);
  coord_release_workers(co, job->id);
  free(a->held_error);
  a->held_error = NULL;
  a->ranks_done = 0;
  memset(a->rank_done, 0, sizeof a->rank_done);
  snprintf(a->requeue_note, sizeof a->requeue_note, "%s", note);
  job->state = QUEUED;
  coord_set_string(&job->reason, note);
  coord_save_job(co, job);
  coord_announce_job(a);
}

/* ---------------------------------------------------------------- CheckpointJob calls */

static void on_waiting_gone(void* ud, zn_rpc_call* call) {
  coord_ckpt* c = ud;
  for (waiting_call** p = &c->waiting; *p; p = &(*p)->next) {
    if ((*p)->call == call) {
      waiting_call* gone = *p;
      *p = gone->next;
      free(gone);
      return;
    }
  }
}

int64_t coord_ckpt_pending_request(const coord_ckpt* c, const char* job_id) {
  int64_t newest = 0;
  for (const waiting_call* w = c->waiting; w; w = w->next)
    if (w->request > newest && strcmp(w->job_id, job_id) == 0) newest = w->request;
  return newest;
}

/* Takes the waiting calls of the job that match (all, or those a report of `request` answers)
 * off the list and returns them, oldest first. */
static waiting_call* take_waiting(coord_ckpt* c, const char* job_id, int64_t request) {
  waiting_call* taken = NULL;
  waiting_call** tail = &taken;
  waiting_call** p = &c->waiting;
  while (*p) {
    waiting_call* w = *p;
    if (strcmp(w->job_id, job_id) == 0 && (request < 0 || w->request <= request)) {
      *p = w->next;
      w->next = NULL;
      *tail = w;
      tail = &w->next;
    } else {
      p = &w->next;
    }
  }
  return taken;
}

void coord_ckpt_job_ended(coordinator* co, const Job* job) {
  waiting_call* w = take_waiting(co->ckpt, job->id, -1);
  while (w) {
    waiting_call* next = w->next;
    zn_rpc_fail(w->call, ZN_RPC_FAILED_PRECONDITION,
                "job %s ended (%s) before the checkpoint was written", job->id,
                coord_state_name(job->state));
    free(w);
    w = next;
  }
}

static void handle_checkpoint_job(void* ud, zn_rpc_call* call, const ProtobufCMessage* msg) {
  coordinator* co = ud;
  const Zenith__V1__CheckpointRequest* req = (const void*)msg;
  const char* id = req->id ? req->id : "";
  int state = job_state(co, id);
  if (state < 0) {
    zn_rpc_fail(call, ZN_RPC_NOT_FOUND, "no job with id '%s'; `zenithctl list` shows them", id);
    return;
  }
  if (state != RUNNING) {
    zn_rpc_fail(call, ZN_RPC_FAILED_PRECONDITION,
                "job %s is %s; only a running job can write a checkpoint", id,
                coord_state_name(state));
    return;
  }
  coord_ckpt* c = co->ckpt;
  waiting_call* w = calloc(1, sizeof *w);
  w->call = call;
  snprintf(w->job_id, sizeof w->job_id, "%s", id);
  w->request = ++c->last_request;
  w->next = c->waiting;
  c->waiting = w;
  zn_rpc_call_on_close(call, on_waiting_gone, c);
  ZN_INFO("job %s: checkpoint %lld requested by %s", id, (long long)w->request,
          zn_rpc_call_peer(call));
}

/* ---------------------------------------------------------------- ReportCheckpoint */

/* The active job a report belongs to, after checking the worker, the job and the attempt; NULL
 * once the call has been failed with the reason. */
static active_job* reported_job(coordinator* co, zn_rpc_call* call,
                                const Zenith__V1__ReportCheckpointRequest* req) {
  worker* w = coord_find_worker(co, req->worker_id ? req->worker_id : "");
  if (!w) {
    zn_rpc_fail(call, ZN_RPC_FAILED_PRECONDITION, "unknown worker '%s'; register first",
                req->worker_id ? req->worker_id : "");
    return NULL;
  }
  w->last_seen_ms = zn_unix_ms();
  const char* id = req->job_id ? req->job_id : "";
  int state = job_state(co, id);
  if (state < 0) {
    zn_rpc_fail(call, ZN_RPC_NOT_FOUND, "no job with id '%s'", id);
    return NULL;
  }
  active_job* a = coord_find_active(co, id);
  int attempt = coord_request_attempt(w, req->has_attempt, req->attempt);
  if (a && strcmp(w->job_id, id) != 0) {
    zn_rpc_fail(call, ZN_RPC_FAILED_PRECONDITION, "worker %s is not running job %s", w->name, id);
    return NULL;
  }
  if (a && (attempt != a->attempt || w->attempt != a->attempt)) {
    zn_rpc_fail(call, ZN_RPC_FAILED_PRECONDITION,
                "attempt %d of job %s is over (the job is on attempt %d); the checkpoint of step "
                "%lld from worker %s is not recorded",
                attempt, id, a->attempt, (long long)req->step, w->name);
    return NULL;
  }
  if (state != RUNNING) {
    zn_rpc_fail(call, ZN_RPC_FAILED_PRECONDITION,
                "job %s is %s, not running; the checkpoint of step %lld from worker %s is not "
                "recorded",
                id, coord_state_name(state), (long long)req->step, w->name);
    return NULL;
  }
  return a;
}

static int is_sha256_hex(const char* s) {
  if (!s || strlen(s) != 64) return 0;
  for (; *s; s++)
    if (!isxdigit((unsigned char)*s)) return 0;
  return 1;
}

/* 0 when the report's fields make a record; otherwise "field: what is wrong" in err. */
static int check_report(const coord_ckpt* c, const Zenith__V1__ReportCheckpointRequest* req,
                        char* err, size_t errlen) {
  const char* path = req->path ? req->path : "";
  if (!path[0] || strlen(path) > ZN_MAX_PATH_BYTES)
    snprintf(err, errlen, "path: must be 1 to %d bytes", ZN_MAX_PATH_BYTES);
  else if (!inside_job_dir(c, req->job_id, path))
    snprintf(err, errlen, "path: '%s' is not inside the job's checkpoint folder %s/%s", path,
             c->dir, req->job_id);
  else if (!req->has_step || req->step < 0)
    snprintf(err, errlen, "step: must be >= 0 (got %lld)", (long long)req->step);
  else if (req->bytes <= 0)
    snprintf(err, errlen, "bytes: must be > 0 (got %lld)", (long long)req->bytes);
  else if (!is_sha256_hex(req->digest))
    snprintf(err, errlen, "digest: must be a SHA-256 in 64 hex digits (got '%s')",
             req->digest ? req->digest : "");
  else
    return 0;
  return -1;
}

/* The n of the job's next id "<job>.<n>": past Job.checkpoints and past the newest record. */
static int next_number(const Job* job, Checkpoint* const* list, size_t n) {
  int next = job->checkpoints + 1;
  size_t prefix = strlen(job->id);
  for (size_t i = 0; i < n; i++) {
    const char* id = list[i]->id ? list[i]->id : "";
    if (strncmp(id, job->id, prefix) == 0 && id[prefix] == '.') {
      long k = strtol(id + prefix + 1, NULL, 10);
      if (k >= next && k < INT32_MAX) next = (int)k + 1;
    }
  }
  return next;
}

/* Marks the job's oldest records past keep_checkpoints removed and deletes their files. `list`
 * holds the records before `newest`, oldest first. */
static void keep_newest(coordinator* co, const Job* job, Checkpoint* const* list, size_t n,
                        const Checkpoint* newest) {
  size_t keep = (size_t)(job->spec->keep_checkpoints > 0 ? job->spec->keep_checkpoints : 1);
  size_t excess = n + 1 > keep ? n + 1 - keep : 0;
  for (size_t i = 0; i < excess; i++) {
    const Checkpoint* old = list[i];
    if (zn_store_remove_checkpoint(co->store, old->id) != ZN_OK) {
      ZN_ERROR("job %s: checkpoint %s could not be marked removed: %s", job->id, old->id,
               zn_store_errmsg(co->store));
      continue;
    }
    int shared = strcmp(old->path, newest->path) == 0;
    for (size_t k = excess; k < n && !shared; k++) shared = strcmp(old->path, list[k]->path) == 0;
    if (shared || !inside_job_dir(co->ckpt, job->id, old->path)) {
      ZN_WARN("job %s: file %s of removed checkpoint %s left in place: %s", job->id, old->path,
              old->id, shared ? "a kept checkpoint has the same path" : "outside the job's folder");
    } else if (unlink(old->path) != 0) {
      ZN_WARN("job %s: file %s of removed checkpoint %s could not be deleted: %s", job->id,
              old->path, old->id, strerror(errno));
    } else {
      ZN_INFO("job %s: checkpoint %s (step %lld) removed, keeping the newest %zu", job->id, old->id,
              (long long)old->step, keep);
    }
  }
}

/* Records the reported checkpoint: the store first, then the job, its event and its log line,
 * then the keep-last-N policy. Returns the record (free it), or NULL if the store failed. */
static Checkpoint* record_checkpoint(coordinator* co, active_job* a,
                                     const Zenith__V1__ReportCheckpointRequest* req) {
  Job* job = a->job;
  Checkpoint** list = NULL;
  size_t n = 0;
  if (zn_store_list_checkpoints(co->store, job->id, &list, &n) != ZN_OK) {
    ZN_ERROR("job %s: its checkpoints could not be listed: %s", job->id,
             zn_store_errmsg(co->store));
    return NULL;
  }
  char id[96];
  int number = next_number(job, list, n);
  snprintf(id, sizeof id, "%s.%d", job->id, number);
  Checkpoint draft = ZENITH__V1__CHECKPOINT__INIT;
  draft.id = id;
  draft.job_id = job->id;
  draft.path = req->path;
  draft.digest = req->digest;
  draft.has_step = draft.has_bytes = draft.has_unix_ms = 1;
  draft.step = req->step;
  draft.bytes = req->bytes;
  draft.unix_ms = zn_unix_ms();
  if (zn_store_add_checkpoint(co->store, &draft) != ZN_OK) {
    ZN_ERROR("job %s: checkpoint %s could not be recorded: %s", job->id, id,
             zn_store_errmsg(co->store));
    zn_store_free_checkpoints(list, n);
    return NULL;
  }

  job->has_checkpoints = 1;
  job->checkpoints = number;
  set_latest(job, &draft);
  coord_save_job(co, job);
  coord_record_event(co, a, "checkpoint", "checkpoint %s at step %lld: %lld bytes in %s", id,
                     (long long)draft.step, (long long)draft.bytes, draft.path);
  ZN_INFO("job %s checkpoint %s at step %lld: %lld bytes, sha256 %.12s..., %s", job->id, id,
          (long long)draft.step, (long long)draft.bytes, draft.digest, draft.path);
  coord_announce_job(a);
  keep_newest(co, job, list, n, &draft);
  zn_store_free_checkpoints(list, n);
  return zn_rpc_clone_message(&draft.base);
}

static void handle_report_checkpoint(void* ud, zn_rpc_call* call, const ProtobufCMessage* msg) {
  coordinator* co = ud;
  const Zenith__V1__ReportCheckpointRequest* req = (const void*)msg;
  active_job* a = reported_job(co, call, req);
  if (!a) return;
  char err[ZN_MAX_PATH_BYTES + 256];
  if (check_report(co->ckpt, req, err, sizeof err) != 0) {
    zn_rpc_fail(call, ZN_RPC_INVALID_ARGUMENT, "ReportCheckpoint for job %s: %s", a->job->id, err);
    return;
  }
  Checkpoint* c = record_checkpoint(co, a, req);
  if (!c) {
    zn_rpc_fail(call, ZN_RPC_INTERNAL,
                "the coordinator's database could not record the checkpoint");
    return;
  }

  waiting_call* w = req->request > 0 ? take_waiting(co->ckpt, c->job_id, req->request) : NULL;
  while (w) {
    waiting_call* next = w->next;
    zn_rpc_reply(w->call, &c->base);
    free(w);
    w = next;
  }
  Zenith__V1__ReportCheckpointResponse resp = ZENITH__V1__REPORT_CHECKPOINT_RESPONSE__INIT;
  zn_rpc_reply(call, &resp.base);
  zenith__v1__checkpoint__free_unpacked(c, NULL);
}

/* ---------------------------------------------------------------- assignments */

void coord_ckpt_fill_assignment(coordinator* co, const active_job* a, Zenith__V1__Assignment* asg) {
  const Job* job = a->job;
  asg->checkpoint_dir = job_dir(co->ckpt, job->id);
  if (mkdir(asg->checkpoint_dir, 0755) != 0 && errno != EEXIST)
    ZN_WARN("job %s: cannot create its checkpoint folder %s: %s (its workers will try)", job->id,
            asg->checkpoint_dir, strerror(errno));
  Checkpoint** list = NULL;
  size_t n = 0;
  if (zn_store_list_checkpoints(co->store, job->id, &list, &n) != ZN_OK) {
    ZN_ERROR("job %s: its checkpoints could not be listed; this attempt starts from step 0: %s",
             job->id, zn_store_errmsg(co->store));
    return;
  }
  /* From the latest checkpoint back: after a resume from an older one, the newer ones belong to
   * a run that was abandoned. */
  size_t end = n;
  const Checkpoint* latest = job->latest_checkpoint;
  for (size_t i = 0; latest && latest->id && i < n; i++)
    if (strcmp(list[i]->id, latest->id) == 0) end = i + 1;
  asg->resume_from = malloc((end ? end : 1) * sizeof(char*));
  asg->n_resume_from = end;
  for (size_t i = 0; i < end; i++) asg->resume_from[i] = strdup(list[end - 1 - i]->path);
  zn_store_free_checkpoints(list, n);
}

void coord_ckpt_clear_assignment(Zenith__V1__Assignment* asg) {
  for (size_t i = 0; i < asg->n_resume_from; i++) free(asg->resume_from[i]);
  free(asg->resume_from);
  free(asg->checkpoint_dir);
  asg->resume_from = NULL;
  asg->n_resume_from = 0;
  asg->checkpoint_dir = NULL;
}

/* ---------------------------------------------------------------- restarts */

int coord_ckpt_restart(coordinator* co, active_job* a, const char* why_in, char* error,
                       size_t errlen) {
  Job* job = a->job;
  char why[1200]; /* a copy: why_in may be the held error, which requeue frees */
  snprintf(why, sizeof why, "%s", why_in);
  int max = job->spec->max_restarts;
  if (job->restarts >= max) {
    snprintf(error, errlen, "%s; restarts exhausted (%d of max_restarts %d used)", why,
             job->restarts, max);
    return -1;
  }

  job->has_restarts = 1;
  job->restarts++;
  char point[160], note[256];
  const char* from = resume_point(job, point, sizeof point);
  if (from) {
    coord_record_event(co, a, "restarted", "restart %d of %d after: %s; continuing from %s",
                       job->restarts, max, why, from);
    snprintf(note, sizeof note, "restart %d of %d, from %s", job->restarts, max, from);
  } else {
    coord_record_event(co, a, "restarted",
                       "restart %d of %d after: %s; starting again from step 0: no checkpoint yet",
                       job->restarts, max, why);
    snprintf(note, sizeof note, "restart %d of %d, from step 0", job->restarts, max);
  }
  ZN_WARN("job %s requeued for restart %d of %d (%s) after: %s", job->id, job->restarts, max,
          from ? from : "from step 0", why);
  requeue(co, a, note);
  return 0;
}

void coord_ckpt_preempted(coordinator* co, active_job* a, worker* w, int64_t step) {
  Job* job = a->job;
  coord_record_event(co, a, "preempted",
                     "worker %s (rank %d) left on SIGTERM after a checkpoint at step %lld; the job "
                     "continues on other workers",
                     w->name, w->rank, (long long)step);
  char point[160], note[256];
  const char* from = resume_point(job, point, sizeof point);
  snprintf(note, sizeof note, "preempted, from %s", from ? from : "step 0");
  ZN_INFO("job %s requeued: worker %s (rank %d) was preempted at step %lld; it continues from %s",
          job->id, w->name, w->rank, (long long)step, from ? from : "step 0");
  /* Its daemon is shutting down: the scheduler must not pick it for the next attempt while its
   * heartbeats have not yet timed out. The liveness check forgets it at the next tick. */
  w->lost = 1;
  ZN_INFO("worker %s (%s) left on SIGTERM", w->name, w->id);
  requeue(co, a, note);
}

void coord_ckpt_reload_job(coordinator* co, active_job* a) {
  Job* job = a->job;
  a->attempt = past_attempts(co, job->id);
  if (job->state != RUNNING) return;
  char point[160];
  const char* from = resume_point(job, point, sizeof point);
  snprintf(a->requeue_note, sizeof a->requeue_note,
           "requeued: the coordinator restarted while it ran; from %s", from ? from : "step 0");
  job->state = QUEUED;
  coord_set_string(&job->reason, a->requeue_note);
  coord_save_job(co, job);
  if (from)
    coord_record_event(co, a, "requeued",
                       "the coordinator restarted while the job ran; it continues from %s", from);
  else
    coord_record_event(co, a, "requeued",
                       "the coordinator restarted while the job ran; it starts again from step "
                       "0: no checkpoint yet");
  ZN_WARN("job %s requeued: it was running when the coordinator stopped; it continues from %s",
          job->id, from ? from : "step 0");
}

/* Whether one of the refusals ("PATH: why", as workers report them) names path. */
static int is_refused(const char* path, char* const* refused, size_t n) {
  size_t len = path ? strlen(path) : 0;
  for (size_t i = 0; len && i < n; i++)
    if (strncmp(refused[i], path, len) == 0 && refused[i][len] == ':') return 1;
  return 0;
}

/* The workers refused the job's latest checkpoint and went on from the newest older one they
 * could read, or from step 0: that one becomes the latest, so that status, a later restart and
 * the job's events say where the job really continued from. */
static void step_back_latest(coordinator* co, active_job* a, char* const* refused, size_t n) {
  Job* job = a->job;
  const Checkpoint* latest = job->latest_checkpoint;
  if (!latest || !is_refused(latest->path, refused, n)) return;
  Checkpoint** list = NULL;
  size_t count = 0;
  if (zn_store_list_checkpoints(co->store, job->id, &list, &count) != ZN_OK) return;
  const Checkpoint* used = NULL;
  for (size_t i = 0; i < count; i++)
    if (list[i]->step <= latest->step && !is_refused(list[i]->path, refused, n)) used = list[i];
  if (used) {
    coord_record_event(co, a, "checkpoint_used",
                       "the job continues from checkpoint %s at step %lld, the newest one its "
                       "workers could read",
                       used->id, (long long)used->step);
    set_latest(job, used);
  } else {
    coord_record_event(co, a, "checkpoint_used",
                       "none of the job's checkpoints could be read; it starts again from step 0");
    ZN_WARN("job %s: none of its checkpoints could be read; it starts again from step 0", job->id);
    zenith__v1__checkpoint__free_unpacked(job->latest_checkpoint, NULL);
    job->latest_checkpoint = NULL;
  }
  coord_save_job(co, job);
  zn_store_free_checkpoints(list, count);
}

void coord_ckpt_refused(coordinator* co, active_job* a, const worker* w, char* const* refused,
                        size_t n) {
  for (size_t i = 0; i < n; i++) {
    coord_record_event(co, a, "checkpoint_refused",
                       "worker %s (rank %d) refused checkpoint %s; it tried the next older one",
                       w->name, w->rank, refused[i]);
    ZN_WARN("job %s: worker %s (rank %d) refused checkpoint %s", a->job->id, w->name, w->rank,
            refused[i]);
  }
  step_back_latest(co, a, refused, n);
}

/* ---------------------------------------------------------------- ListCheckpoints, ResumeJob */

static void handle_list_checkpoints(void* ud, zn_rpc_call* call, const ProtobufCMessage* msg) {
  coordinator* co = ud;
  const Zenith__V1__ListCheckpointsRequest* req = (const void*)msg;
  const char* id = req->id ? req->id : "";
  if (job_state(co, id) < 0) {
    zn_rpc_fail(call, ZN_RPC_NOT_FOUND, "no job with id '%s'; `zenithctl list` shows them", id);
    return;
  }
  Zenith__V1__ListCheckpointsResponse resp = ZENITH__V1__LIST_CHECKPOINTS_RESPONSE__INIT;
  if (zn_store_list_checkpoints(co->store, id, &resp.checkpoints, &resp.n_checkpoints) != ZN_OK) {
    zn_rpc_fail(call, ZN_RPC_INTERNAL, "the coordinator's database could not list checkpoints");
    return;
  }
  zn_rpc_reply(call, &resp.base);
  zn_store_free_checkpoints(resp.checkpoints, resp.n_checkpoints);
}

/* The checkpoint a resume starts from: `from`, or the newest; NULL after failing the call. */
static const Checkpoint* resume_checkpoint(zn_rpc_call* call, const Job* job, const char* from,
                                           Checkpoint* const* list, size_t n) {
  if (n == 0) {
    zn_rpc_fail(call, ZN_RPC_FAILED_PRECONDITION,
                "job %s has no checkpoint to resume from; submit it again to train from step 0",
                job->id);
    return NULL;
  }
  if (!from || !from[0]) return list[n - 1];
  for (size_t i = 0; i < n; i++)
    if (strcmp(list[i]->id, from) == 0) return list[i];
  zn_rpc_fail(call, ZN_RPC_NOT_FOUND,
              "job %s has no checkpoint '%s'; `zenithctl checkpoints %s` lists them", job->id, from,
              job->id);
  return NULL;
}

/* A final job becomes active again, queued to continue from checkpoint c. `job` is a copy of the
 * stored job with the request's changes to its spec applied (`changes` names them, "" for none);
 * it is taken over. The job is stored before anything announces it; NULL when the store refused
 * it, and then the stored job is as it was. */
static active_job* reactivate(coordinator* co, Job* job, const Checkpoint* c, const char* changes) {
  active_job* a = calloc(1, sizeof *a);
  a->job = job;
  a->attempt = past_attempts(co, job->id);
  job->state = QUEUED;
  free(job->error);
  job->error = NULL;
  job->has_finished_unix_ms = 0;
  job->finished_unix_ms = 0;
  job->restarts = 0; /* a resumed job has its whole budget of restarts again */
  set_latest(job, c);
  const char* sep = changes[0] ? "; " : "";
  snprintf(a->requeue_note, sizeof a->requeue_note, "resuming from checkpoint %s (step %lld)%s%s",
           c->id, (long long)c->step, sep, changes);
  coord_set_string(&job->reason, a->requeue_note);
  if (zn_store_put_job(co->store, job) != ZN_OK) {
    ZN_ERROR("job %s: the resumed job could not be saved; it stays as it was: %s", job->id,
             zn_store_errmsg(co->store));
    free(a);
    return NULL;
  }
  active_job** tail = &co->active;
  while (*tail) tail = &(*tail)->next;
  *tail = a;
  coord_record_event(co, a, "resumed", "resumed by a user from checkpoint %s at step %lld%s%s",
                     c->id, (long long)c->step, sep, changes);
  ZN_INFO("job %s QUEUED: resuming from checkpoint %s at step %lld%s%s", job->id, c->id,
          (long long)c->step, sep, changes);
  return a;
}

/* The stored job with the request's workers and sharding applied, or NULL after failing the
 * call; `changes` gets what changed. */
static Job* resumed_copy(zn_rpc_call* call, const Job* stored,
                         const Zenith__V1__ResumeJobRequest* req, char* changes, size_t len) {
  Job* job = zn_rpc_clone_message(&stored->base); /* every part malloc'd, to edit field by field */
  coord_spec_fill_stored(job->spec);
  char err[512];
  if (!job->spec || coord_spec_resume(job->spec, req->workers, req->sharding, changes, len, err,
                                      sizeof err) != 0) {
    zn_rpc_fail(call, ZN_RPC_INVALID_ARGUMENT, "cannot resume job %s: %s; the job is unchanged",
                stored->id, job->spec ? err : "spec: missing");
    zenith__v1__job__free_unpacked(job, NULL);
    return NULL;
  }
  return job;
}

static void handle_resume(void* ud, zn_rpc_call* call, const ProtobufCMessage* msg) {
  coordinator* co = ud;
  const Zenith__V1__ResumeJobRequest* req = (const void*)msg;
  const char* id = req->id ? req->id : "";
  active_job* active = coord_find_active(co, id);
  if (active) {
    zn_rpc_fail(call, ZN_RPC_FAILED_PRECONDITION,
                "job %s is still active (%s); only a failed or cancelled job can be resumed", id,
                coord_state_name(active->job->state));
    return;
  }
  Job* job = NULL;
  if (zn_store_get_job(co->store, id, &job) != ZN_OK) {
    zn_rpc_fail(call, ZN_RPC_NOT_FOUND, "no job with id '%s'; `zenithctl list` shows them", id);
    return;
  }
  if (job->state == ZENITH__V1__JOB_STATE__SUCCEEDED) {
    zn_rpc_fail(call, ZN_RPC_FAILED_PRECONDITION,
                "job %s has SUCCEEDED; there is nothing to resume", id);
    zenith__v1__job__free_unpacked(job, NULL);
    return;
  }
  char changes[128]; /* "on 256 workers (was 128), sharding optimizer (was none)" */
  Job* next = resumed_copy(call, job, req, changes, sizeof changes);
  zenith__v1__job__free_unpacked(job, NULL);
  if (!next) return;
  Checkpoint** list = NULL;
  size_t n = 0;
  if (zn_store_list_checkpoints(co->store, id, &list, &n) != ZN_OK) {
    zn_rpc_fail(call, ZN_RPC_INTERNAL, "the coordinator's database could not list checkpoints");
    zenith__v1__job__free_unpacked(next, NULL);
    return;
  }
  const Checkpoint* from = resume_checkpoint(call, next, req->from, list, n);
  active_job* a = from ? reactivate(co, next, from, changes) : NULL;
  if (a) {
    zn_rpc_reply(call, &a->job->base);
  } else {
    if (from)
      zn_rpc_fail(call, ZN_RPC_INTERNAL,
                  "the coordinator's database could not save job %s; it is unchanged", id);
    zenith__v1__job__free_unpacked(next, NULL);
  }
  zn_store_free_checkpoints(list, n);
}

/* ---------------------------------------------------------------- methods */

int coord_ckpt_add_methods(coordinator* co) {
  static const struct {
    const char* path;
    const ProtobufCMessageDescriptor* type;
    zn_rpc_handler handler;
  } methods[] = {
      {"/zenith.v1.Workers/ReportCheckpoint", &zenith__v1__report_checkpoint_request__descriptor,
       handle_report_checkpoint},
      {"/zenith.v1.Zenith/CheckpointJob", &zenith__v1__checkpoint_request__descriptor,
       handle_checkpoint_job},
      {"/zenith.v1.Zenith/ListCheckpoints", &zenith__v1__list_checkpoints_request__descriptor,
       handle_list_checkpoints},
      {"/zenith.v1.Zenith/ResumeJob", &zenith__v1__resume_job_request__descriptor, handle_resume},
  };
  for (size_t i = 0; i < sizeof methods / sizeof methods[0]; i++) {
    int rc = zn_rpc_server_add_method(co->server, methods[i].path, ZN_RPC_UNARY, methods[i].type,
                                      methods[i].handler, co);
    if (rc != ZN_OK) return rc;
  }
  return ZN_OK;
}
