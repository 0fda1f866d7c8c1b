/* The worker daemon's control loop (`zenithd worker`), on libuv.
 *
 * The loop thread owns the worker's state. Blocking calls to the coordinator
 * (register, heartbeat) run on libuv's thread pool and come back to the loop
 * in their after-work callbacks; the trainer thread wakes the loop through an
 * async handle when its job ends. Signals arrive as loop events too, so a
 * SIGTERM during training stops the job on every rank at the same step, tells
 * the coordinator, and only then exits. */
#include "worker.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <uv.h>

#include "gpu_probe.h"
#include "trainer.h"
#include "worker_channel.h"
#include "zenith.pb-c.h"
#include "zn_err.h"
#include "zn_health.h"
#include "zn_log.h"
#include "zn_rpc.h"

#define RPC_TIMEOUT_MS 5000
#define REGISTER_RETRY_MS 1000
/* How long the health listener outlives the loop, so that its watchers hear the last
 * NOT_SERVING (its server looks for changes every 50 ms) before the process exits. */
#define HEALTH_GRACE_MS 200

typedef struct {
  worker_config cfg;
  uv_loop_t* loop;
  uv_timer_t heartbeat_timer;
  uv_timer_t register_timer;
  uv_signal_t sigint, sigterm;
  uv_async_t trainer_done;
  zn_rpc_channel* channel;
  char worker_id[64];
  int heartbeat_ms;
  int registered;
  int call_in_flight;   /* one register or heartbeat at a time */
  int coordinator_down; /* for logging the change once, not every beat */
  int name_refused;     /* likewise for a name that a live worker holds */
  int must_reregister;
  int shutting_down;
  int exit_code;
  int device;            /* the CUDA device it trains on, or -1: the CPU */
  char device_text[160]; /* the device as the logs show it */
  trainer* trainer;
  zn_health* health; /* with --health-listen only, as is its listener */
  zn_health_listener* health_listener;
} worker;

/* One blocking call done on the thread pool. */
typedef struct {
  uv_work_t req;
  worker* w;
  int is_register;
  int rc;
  zn_rpc_status status;
  ProtobufCMessage* response;
  char job_id[64];
  int attempt;
} control_call;

static void start_register(worker* w);
static void close_all(worker* w);
static void on_heartbeat_timer(uv_timer_t* timer);

static void on_register_timer(uv_timer_t* timer) {
  start_register(timer->data);
}

/* ---------------------------------------------------------------- thread pool side */

static void do_register(control_call* c) {
  worker* w = c->w;
  Zenith__V1__RegisterRequest req = ZENITH__V1__REGISTER_REQUEST__INIT;
  req.name = (char*)w->cfg.name;
  req.host = (char*)w->cfg.host;
  req.device = w->device >= 0 ? "cuda" : "cpu";
  req.has_pid = 1;
  req.pid = (int)getpid();
  c->rc = zn_rpc_unary(w->channel, "/zenith.v1.Workers/RegisterWorker", &req.base,
                       &zenith__v1__register_response__descriptor, RPC_TIMEOUT_MS, &c->response,
                       &c->status);
}

static void do_heartbeat(control_call* c) {
  Zenith__V1__HeartbeatRequest req = ZENITH__V1__HEARTBEAT_REQUEST__INIT;
  req.worker_id = c->w->worker_id;
  req.job_id = c->job_id;
  req.has_attempt = c->job_id[0] != '\0';
  req.attempt = c->attempt;
  c->rc = zn_rpc_unary(c->w->channel, "/zenith.v1.Workers/Heartbeat", &req.base,
                       &zenith__v1__heartbeat_response__descriptor, RPC_TIMEOUT_MS, &c->response,
                       &c->status);
}

static void work_cb(uv_work_t* req) {
  control_call* c = req->data;
  if (c->is_register)
    do_register(c);
  else
    do_heartbeat(c);
}

/* ---------------------------------------------------------------- loop side */

static int is_unreachable(const zn_rpc_status* st) {
  return st->code == ZN_RPC_UNAVAILABLE || st->code == ZN_RPC_DEADLINE_EXCEEDED;
}

static void note_coordinator(worker* w, int rc, const zn_rpc_status* st) {
  if (rc != ZN_OK && is_unreachable(st) && !w->coordinator_down) {
    ZN_WARN("coordinator %s unreachable: %s %s", w->cfg.coordinator, zn_rpc_code_name(st->code),
            st->message);
    w->coordinator_down = 1;
  } else if (rc == ZN_OK && w->coordinator_down) {
    ZN_INFO("coordinator %s reachable again", w->cfg.coordinator);
    w->coordinator_down = 0;
  }
}

/* SERVING while registered with a coordinator that answers, and not draining. */
static void update_health(worker* w) {
  if (!w->health) return;
  int serving = w->registered && !w->coordinator_down && !w->shutting_down;
  zn_health_set(w->health, "", serving ? ZN_HEALTH_SERVING : ZN_HEALTH_NOT_SERVING);
}

static void on_trainer_finished(void* ud) {
  worker* w = ud;
  uv_async_send(&w->trainer_done);
}

static void start_trainer(worker* w, const Zenith__V1__Assignment* asg) {
  trainer_env env = {.channel = w->channel,
                     .worker_id = w->worker_id,
                     .worker_name = w->cfg.name,
                     .host = w->cfg.host,
                     .threads = w->cfg.threads,
                     .device = w->device,
                     .on_done = on_trainer_finished,
                     .ud = w};
  ZN_INFO("assigned job %s as rank %d of %d", asg->job_id, asg->rank, asg->world_size);
  w->trainer = trainer_start(asg, &env);
  if (!w->trainer) ZN_ERROR("could not start a trainer thread for job %s", asg->job_id);
}

/* A refused registration: a bad name or missing credentials (no client
 * certificate for a coordinator that wants one) end the daemon, since no retry
 * can mend them; a name held by a live worker is retried, since that worker
 * may be this one's crashed predecessor whose heartbeats are about to time out. */
static void register_refused(worker* w, const zn_rpc_status* st) {
  if (st->code == ZN_RPC_INVALID_ARGUMENT || st->code == ZN_RPC_UNAUTHENTICATED ||
      st->code == ZN_RPC_PERMISSION_DENIED) {
    ZN_ERROR("the coordinator refused this worker: %s", st->message);
    w->shutting_down = 1;
    w->exit_code = 1;
    return;
  }
  if (st->code == ZN_RPC_ALREADY_EXISTS && !w->name_refused) {
    ZN_ERROR("%s; retrying every %d ms", st->message, REGISTER_RETRY_MS);
    w->name_refused = 1;
  }
  uv_timer_start(&w->register_timer, on_register_timer, REGISTER_RETRY_MS, 0);
}

static void after_register(worker* w, control_call* c) {
  if (c->rc != ZN_OK) {
    register_refused(w, &c->status);
    return;
  }
  w->name_refused = 0;
  Zenith__V1__RegisterResponse* resp = (void*)c->response;
  snprintf(w->worker_id, sizeof w->worker_id, "%s", resp->worker_id);
  w->heartbeat_ms = resp->heartbeat_ms > 0 ? resp->heartbeat_ms : 500;
  w->registered = 1;
  w->must_reregister = 0;
  ZN_INFO("registered with %s as %s (%s, device %s); heartbeat every %d ms", w->cfg.coordinator,
          w->worker_id, w->cfg.name, w->device_text, w->heartbeat_ms);
  uv_timer_start(&w->heartbeat_timer, on_heartbeat_timer, 0, (uint64_t)w->heartbeat_ms);
}

static void after_heartbeat(worker* w, control_call* c) {
  if (c->rc != ZN_OK) return;
  Zenith__V1__HeartbeatResponse* resp = (void*)c->response;
  if (resp->reregister) {
    ZN_WARN(
        "the coordinator no longer knows this worker (it restarted, or declared this "
        "worker lost); registering again");
    w->registered = 0;
    w->must_reregister = 1;
    uv_timer_stop(&w->heartbeat_timer);
    if (w->trainer)
      trainer_request_stop(w->trainer, 1, "the coordinator no longer knows this worker");
    else
      start_register(w);
    return;
  }
  if (resp->cancel && w->trainer)
    trainer_request_stop(w->trainer, 1, "the job was cancelled or ended by the coordinator");
  if (resp->checkpoint_request > 0 && w->trainer)
    trainer_request_checkpoint(w->trainer, resp->checkpoint_request);
  if (resp->assignment && (w->trainer || w->shutting_down))
    ZN_WARN("assignment of job %s refused: this worker is %s", resp->assignment->job_id,
            w->trainer ? "still running a job" : "shutting down");
  else if (resp->assignment)
    start_trainer(w, resp->assignment);
}

static void after_work_cb(uv_work_t* req, int status) {
  control_call* c = req->data;
  worker* w = c->w;
  w->call_in_flight = 0;
  note_coordinator(w, c->rc, &c->status);
  if (!w->shutting_down) {
    if (c->is_register)
      after_register(w, c);
    else
      after_heartbeat(w, c);
  }
  update_health(w);
  if (c->response) protobuf_c_message_free_unpacked(c->response, NULL);
  free(c);
  if (w->shutting_down && !w->trainer) close_all(w);
}

static void queue_call(worker* w, int is_register) {
  if (w->call_in_flight || w->shutting_down) return;
  control_call* c = calloc(1, sizeof *c);
  c->w = w;
  c->is_register = is_register;
  c->req.data = c;
  if (w->trainer) {
    snprintf(c->job_id, sizeof c->job_id, "%s", trainer_job_id(w->trainer));
    c->attempt = trainer_attempt(w->trainer);
  }
  w->call_in_flight = 1;
  uv_queue_work(w->loop, &c->req, work_cb, after_work_cb);
}

static void start_register(worker* w) {
  queue_call(w, 1);
}

static void on_heartbeat_timer(uv_timer_t* timer) {
  worker* w = timer->data;
  if (w->registered) queue_call(w, 0);
}

static void on_trainer_done(uv_async_t* async) {
  worker* w = async->data;
  trainer_destroy(w->trainer);
  w->trainer = NULL;
  if (w->shutting_down) {
    if (!w->call_in_flight) close_all(w);
    return;
  }
  if (w->must_reregister) start_register(w);
}

static void close_all(worker* w) {
  uv_close((uv_handle_t*)&w->heartbeat_timer, NULL);
  uv_close((uv_handle_t*)&w->register_timer, NULL);
  uv_close((uv_handle_t*)&w->sigint, NULL);
  uv_close((uv_handle_t*)&w->sigterm, NULL);
  uv_close((uv_handle_t*)&w->trainer_done, NULL);
}

static void on_signal(uv_signal_t* handle, int signum) {
  worker* w = handle->data;
  if (w->shutting_down) return;
  w->shutting_down = 1;
  update_health(w); /* before the job's checkpoint: a draining worker takes no new work */
  const char* name = signum == SIGTERM ? "SIGTERM" : "SIGINT";
  ZN_INFO("received %s: shutting down", name);
  uv_timer_stop(&w->heartbeat_timer);
  uv_timer_stop(&w->register_timer);
  if (w->trainer) {
    char why[160];
    snprintf(why, sizeof why, "worker %s stopped by %s", w->cfg.name, name);
    trainer_request_stop(w->trainer, 0, why);
  } else if (!w->call_in_flight) {
    close_all(w);
  }
}

/* Settles the device before the first registration, since the coordinator
 * schedules by it. A GPU that cannot be used leaves the worker on the CPU with
 * a warning, rather than ending it: the cluster keeps a worker, and the log
 * says why it is not the one asked for. */
static void choose_device(worker* w) {
  w->device = -1;
  snprintf(w->device_text, sizeof w->device_text, "cpu");
  if (w->cfg.device < 0) return;
  char text[128];
  if (zn_gpu_probe(w->cfg.device, text, sizeof text) != 0) {
    ZN_WARN("--device cuda:%d cannot be used (%s); this worker runs on the CPU", w->cfg.device,
            text);
    return;
  }
  w->device = w->cfg.device;
  snprintf(w->device_text, sizeof w->device_text, "cuda:%d (%s)", w->device, text);
}

/* --health-listen: the health service alone, plain text, on a server thread of its own. It says
 * NOT_SERVING until the first registration. A bad address stops the start. */
static int start_health(worker* w) {
  char err[512];
  int port = 0;
  w->health = zn_health_create();
  if (!w->health) return ZN_ERR_NOMEM;
  update_health(w);
  int rc = zn_health_listen(w->health, w->cfg.health_listen, &w->health_listener, &port, err,
                            sizeof err);
  if (rc != ZN_OK) {
    ZN_ERROR("--health-listen: %s", err);
    zn_health_destroy(w->health);
    w->health = NULL;
    return rc;
  }
  ZN_INFO("health service (plain text) on %s", zn_health_listener_address(w->health_listener));
  if (w->cfg.health_port_file) {
    FILE* f = fopen(w->cfg.health_port_file, "w");
    if (f) {
      fprintf(f, "%d\n", port);
      fclose(f);
    }
  }
  return ZN_OK;
}

static void stop_health(worker* w) {
  if (!w->health) return;
  update_health(w);
  uv_sleep(HEALTH_GRACE_MS);
  zn_health_listener_stop(w->health_listener);
  zn_health_destroy(w->health);
}

int zn_worker_run(const worker_config* cfg) {
  worker w = {0};
  w.cfg = *cfg;
  w.loop = uv_default_loop();
  w.channel = worker_open_channel(cfg);
  if (!w.channel) return 1;
  if (cfg->health_listen && start_health(&w) != ZN_OK) {
    zn_rpc_channel_close(w.channel);
    return 1;
  }
  uv_timer_init(w.loop, &w.heartbeat_timer);
  uv_timer_init(w.loop, &w.register_timer);
  w.heartbeat_timer.data = w.register_timer.data = &w;
  uv_signal_init(w.loop, &w.sigint);
  uv_signal_init(w.loop, &w.sigterm);
  w.sigint.data = w.sigterm.data = &w;
  uv_signal_start(&w.sigint, on_signal, SIGINT);
  uv_signal_start(&w.sigterm, on_signal, SIGTERM);
  uv_async_init(w.loop, &w.trainer_done, on_trainer_done);
  w.trainer_done.data = &w;

  choose_device(&w);
  ZN_INFO("starting as %s: coordinator %s, collectives on %s, device %s, %d compute thread(s)",
          cfg->name, cfg->coordinator, cfg->host, w.device_text, cfg->threads);
  start_register(&w);
  uv_run(w.loop, UV_RUN_DEFAULT);
  uv_loop_close(w.loop);
  stop_health(&w);
  zn_rpc_channel_close(w.channel);
  ZN_INFO("stopped");
  return w.exit_code;
}
