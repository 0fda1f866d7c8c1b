/* The trainer's GPU loop; see trainer_run.h. The same schedule as the CPU loop (trainer.c): the
 * same epochs, permutations, shards of the batch, evaluation points and reports, so a job gives
 * the same kind of history on either device. The steps themselves are gpu_train.h's: queued one
 * ahead of the host, their results read one step late. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "gpu_train.h"
#include "trainer_run.h"
#include "zn_comm_nccl.h"
#include "zn_err.h"
#include "zn_log.h"

static int start_gpu(run* r, gpu_train** out) {
  const Zenith__V1__JobSpec* spec = r->spec;
  gpu_train_config cfg = {
      .model = spec->model,
      .device = r->t->env.device,
      .rank = r->rank,
      .world = r->world,
      .global_batch = spec->batch_size,
      .params = &r->params,
      .seed = spec->seed,
      .cuda_graph = spec->cuda_graph,
  };
  char err[512];
  int rc = gpu_train_create(&cfg, &r->train, &r->test, out, err, sizeof err);
  if (rc != ZN_OK)
    snprintf(r->error, sizeof r->error, "setting up training on GPU %d: %s", cfg.device, err);
  return rc;
}

/* Joins the job's other ranks over NCCL, on the training stream. The communicator is not told
 * to abort at a stop request: the stop travels inside the allreduce, as on the CPU; the
 * collectives' timeout is what frees a rank whose peer is gone. */
static int join_peers_nccl(run* r, gpu_train* g) {
  r->kv_ctx = (worker_kv_ctx){r->t->env.channel, &r->t->stop};
  zn_kv kv = worker_kv(&r->kv_ctx);
  zn_comm_config cfg = {r->rank, r->world, r->t->env.host, r->t->asg->kv_prefix, COMM_TIMEOUT_MS};
  zn_comm_nccl_options options = {r->t->env.device, gpu_train_stream(g), NULL};
  char err[512];
  if (zn_comm_create_nccl(&cfg, &kv, &options, &r->comm, err, sizeof err) != ZN_OK) {
    if (atomic_load(&r->t->stop)) return ZN_ERR_CANCELLED;
    snprintf(r->error, sizeof r->error, "could not connect to the job's other workers: %s", err);
    return ZN_ERR_COMM;
  }
  gpu_train_set_comm(g, r->comm);
  return ZN_OK;
}

/* Takes the oldest step's result: records it, and says whether the ranks agreed to stop. */
static int take_result(run* r, gpu_train* g, int* stop) {
  gpu_step_result res;
  char err[512];
  int rc = gpu_train_next_result(g, &res, err, sizeof err);
  if (rc != ZN_OK) {
    snprintf(r->error, sizeof r->error, "step %lld on the GPU: %s", (long long)r->state.step + 1,
             err);
    return rc;
  }
  double* window = r->state.window;
  r->state = res.state;
  r->state.window = window;
  trainer_warn_skipped(r, (zn_step_outcome)res.outcome, res.norm);
  int epoch = (int)((r->state.step - 1) / r->steps_per_epoch) + 1;
  if (r->rank == 0) trainer_record_step(r, (zn_step_outcome)res.outcome, res.norm, res.loss, epoch);
  if (res.stop) *stop = 1;
  return ZN_OK;
}

static int take_all(run* r, gpu_train* g, int* stop) {
  while (gpu_train_in_flight(g) > 0) {
    int rc = take_result(r, g, stop);
    if (rc != ZN_OK) return rc;
  }
  return ZN_OK;
}

static int start_epoch(run* r, gpu_train* g, int epoch, int* stop) {
  int rc = take_all(r, g, stop);
  if (rc != ZN_OK || *stop) return rc;
  zn_data_permutation(r->perm, (uint32_t)r->train.count, r->spec->seed, epoch);
  char err[512];
  rc = gpu_train_start_epoch(g, r->perm, r->train.count, err, sizeof err);
  if (rc != ZN_OK) snprintf(r->error, sizeof r->error, "starting epoch %d: %s", epoch + 1, err);
  return rc;
}

static int evaluate(run* r, gpu_train* g, int* stop, double* loss, double* accuracy) {
  int rc = take_all(r, g, stop);
  if (rc != ZN_OK) return rc;
  char err[512];
  rc = gpu_train_evaluate(g, loss, accuracy, err, sizeof err);
  if (rc != ZN_OK) snprintf(r->error, sizeof r->error, "%s", err);
  return rc;
}

static int queue_step(run* r, gpu_train* g) {
  char err[512];
  int rc = gpu_train_queue_step(g, atomic_load(&r->t->stop) != 0, err, sizeof err);
  if (rc != ZN_OK) snprintf(r->error, sizeof r->error, "queueing a step: %s", err);
  return rc;
}

static int gpu_loop(run* r, gpu_train* g, double* test_loss, double* test_accuracy) {
  int stop = 0, rc = ZN_OK;
  trainer_restart_rate_clock(r);
  for (int64_t t = 0; t < r->total_steps && !stop && rc == ZN_OK; t++) {
    if (t % r->steps_per_epoch == 0) {
      rc = start_epoch(r, g, (int)(t / r->steps_per_epoch), &stop);
      if (rc != ZN_OK || stop) break;
    }
    rc = queue_step(r, g);
    if (rc == ZN_OK && gpu_train_in_flight(g) > 1) rc = take_result(r, g, &stop);
    int every = r->spec->eval_every;
    if (rc == ZN_OK && !stop && every > 0 && (t + 1) % every == 0 && t + 1 < r->total_steps) {
      double loss, acc;
      rc = evaluate(r, g, &stop, &loss, &acc);
      if (rc == ZN_OK && r->rank == 0) trainer_report_eval(r, t + 1, loss, acc);
      trainer_restart_rate_clock(r);
    }
  }
  if (rc == ZN_OK) rc = take_all(r, g, &stop);
  if (r->rank == 0 && r->n_pending) trainer_send_report(r);
  if (rc != ZN_OK) return rc;
  if (stop) return ZN_ERR_CANCELLED;
  rc = evaluate(r, g, &stop, test_loss, test_accuracy);
  if (rc == ZN_OK && r->rank == 0)
    trainer_report_eval(r, r->state.step, *test_loss, *test_accuracy);
  return rc;
}

int trainer_gpu_run(run* r, double* test_loss, double* test_accuracy) {
  r->perm = malloc((size_t)r->train.count * sizeof(uint32_t));
  if (!r->perm) {
    snprintf(r->error, sizeof r->error, "out of memory for the epoch's order");
    return ZN_ERR_NOMEM;
  }
  gpu_train* g = NULL;
  int rc = start_gpu(r, &g);
  if (rc == ZN_OK) {
    ZN_INFO(
        "job started: rank %d of %d, model %s (%zu parameters) on GPU %d, %lld steps of batch "
        "%d (%d per rank), CUDA graph %s",
        r->rank, r->world, r->spec->model, gpu_train_num_params(g), r->t->env.device,
        (long long)r->total_steps, r->spec->batch_size, r->local_batch,
        r->spec->cuda_graph ? "on" : "off");
    rc = join_peers_nccl(r, g);
  }
  if (rc == ZN_OK) rc = gpu_loop(r, g, test_loss, test_accuracy);
  /* The communicator goes before the stream it runs on. */
  zn_comm_destroy(r->comm);
  r->comm = NULL;
  gpu_train_destroy(g);
  return rc;
}
