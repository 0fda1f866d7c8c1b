/* The coordinator's in-memory state, shared by the files of the coordinator (coordinator.c:
 * services, scheduler, liveness; coord_ckpt.c: checkpoints, resume and restarts) and by no one
 * else. Everything here is touched from the RPC server's one thread only, so nothing is locked.
 *
 * The helpers declared at the end are defined in coordinator.c. Each change to a job goes
 * through the same steps: edit the Job, coord_save_job (the store first), then
 * coord_record_event and coord_announce_job (what watchers see). */
#ifndef ZN_COORD_INTERNAL_H
#define ZN_COORD_INTERNAL_H

#include <stdint.h>

#include "coord_kv.h"
#include "coord_metrics.h"
#include "coord_spec.h"
#include "coordinator.h"
#include "zenith.pb-c.h"
#include "zn_health.h"
#include "zn_rpc.h"
#include "zn_store.h"

typedef Zenith__V1__Job Job;
typedef struct coord_ckpt coord_ckpt;

typedef struct worker {
  char id[64];
  char name[128];
  char host[128];
  char device[8]; /* "cpu" or "cuda": only jobs of this device are given to it */
  int64_t last_seen_ms;
  int64_t registered_ms;
  int lost;
  char job_id[64]; /* job it runs or was given; empty when idle */
  int attempt;     /* the attempt of that job it was given */
  int rank;
  int assignment_pending; /* given a job, not yet told */
  int pid;
  struct worker* next;
} worker;

typedef struct watcher {
  zn_rpc_call* call;
  struct watcher* next;
} watcher;

/* A job that is queued or running; final jobs live in the store only. */
typedef struct active_job {
  Job* job;
  /* The run of the job its workers were last given: 1 for the first, one more for each
   * restart, preemption or resume. Requests of another attempt belong to a run that is over. */
  int attempt;
  int ranks_done;
  uint8_t rank_done[ZN_MAX_WORKERS]; /* which ranks have reported their end */
  /* A rank's collective failed: the cause may be a peer that died, which the
   * liveness check names once its heartbeats are overdue. Until then the
   * failure is held, so the job's error names the lost worker, not the
   * survivor that noticed first. */
  char* held_error;
  int64_t held_until_ms;
  /* Why a job that ran before is queued again (a restart, a preemption, a resume); the
   * scheduler puts it in front of what the job waits for. Empty for a new job. */
  char requeue_note[256];
  watcher* watchers;
  struct active_job* next;
} active_job;

typedef struct coordinator {
  coord_config cfg;
  zn_rpc_server* server;
  zn_store* store;
  coord_kv* kv;
  coord_metrics* metrics; /* NULL without --metrics-listen */
  coord_ckpt* ckpt;       /* checkpoint folder and the CheckpointJob calls waiting */
  worker* workers;        /* in registration order */
  active_job* active;     /* in submission order */

  /* The health service: on the API listener (health_main), and on the plain-text
   * --health-listen when set. stop_at_ms: when a stop signal has turned it NOT_SERVING, the time
   * the server stops; 0 until then. */
  zn_health* health;
  zn_health_endpoint* health_main;
  zn_health_listener* health_listener;
  int64_t stop_at_ms;
} coordinator;

/* The attempt a worker's request speaks for: the request's own field, or, from a worker that
 * predates the field, the attempt the worker was given. */
static inline int coord_request_attempt(const worker* w, int has_attempt, int attempt) {
  return has_attempt ? attempt : w->attempt;
}

const char* coord_state_name(int state);
/* Replaces a malloc'd string field with a copy of value. */
void coord_set_string(char** field, const char* value);
active_job* coord_find_active(coordinator* co, const char* id);
/* A registered worker that is not lost, or NULL. */
worker* coord_find_worker(coordinator* co, const char* id);
void coord_save_job(coordinator* co, const Job* job);
/* Appends an event to the job's history (the store first), then sends it to the watchers. */
void coord_record_event(coordinator* co, active_job* a, const char* kind, const char* fmt, ...)
    __attribute__((format(printf, 4, 5)));
/* Sends the job as it is now to its watchers. */
void coord_announce_job(active_job* a);
/* Frees the workers given the job that have not been told yet. */
void coord_release_workers(coordinator* co, const char* job_id);

#endif
