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

static int start_epoch(run* r, gpu_train* g, int epoch, int64_t first_step, int* stop) {
  int rc = take_all(r, g, stop);
  if (rc != ZN_OK || *stop) return rc;
  zn_data_permutation(r->perm, (uint32_t)r->train.count, r->spec->seed, epoch);
  char err[512];
  rc = gpu_train_start_epoch(g, r->perm, r->train.count, first_step, err, sizeof err);
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

/* ---------------------------------------------------------------- checkpoints */

/* The host side of a checkpoint: a CPU model of batch 1 (for its buffers and tensor table), the
 * momentum and the rule's window. trainer_checkpoint writes from them and trainer_resume reads
 * into them, exactly as on the CPU; only the copies to and from the GPU are added here. */
static int make_host_mirror(run* r) {
  if (zn_model_create(r->spec->model, 1, &r->model) != ZN_OK) {
    snprintf(r->error, sizeof r->error, "model '%s' is unknown to this worker", r->spec->model);
    return ZN_ERR_INVALID;
  }
  r->momentum = calloc(zn_model_num_params(r->model), sizeof(float));
  r->window = calloc((size_t)r->params.window, sizeof(double));
  if (!r->momentum || !r->window) {
    snprintf(r->error, sizeof r->error, "out of memory for the checkpoint buffers");
    return ZN_ERR_NOMEM;
  }
  zn_model_init(r->model, r->spec->seed);
  zn_zenith_state_init(&r->params, &r->state, r->window);
  return ZN_OK;
}

static int resume_on_gpu(run* r, gpu_train* g) {
  int rc = trainer_resume(r);
  if (rc != ZN_OK || r->start_step == 0) return rc;
  char err[512];
  rc = gpu_train_set_state(g, zn_model_params(r->model), r->momentum, &r->state, err, sizeof err);
  if (rc != ZN_OK) snprintf(r->error, sizeof r->error, "restoring the checkpoint: %s", err);
  return rc;
}

/* Waits for the steps in flight, brings the state to the host and writes it. A failed write is
 * logged and the job goes on; a failed copy from the GPU is the job's error. */
static int checkpoint_on_gpu(run* r, gpu_train* g, int64_t request, int* stop) {
  int rc = take_all(r, g, stop);
  if (rc != ZN_OK) return rc;
  char err[512];
  rc = gpu_train_get_state(g, zn_model_params(r->model), r->momentum, &r->state, err, sizeof err);
  if (rc != ZN_OK) {
    snprintf(r->error, sizeof r->error, "reading the state for a checkpoint: %s", err);
    return rc;
  }
  if (request == -1)
    trainer_checkpoint_if_leaving(r);
  else if (trainer_checkpoint(r, request) == ZN_OK && request > 0)
    r->checkpoint_answered = request;
  return ZN_OK;
}

/* Rank 0, after a step's result: the scheduled checkpoint (the first step at or past each
 * multiple of checkpoint_every: results arrive a step late, and the state is read once the
 * step in flight is done) or the one the coordinator asked for. */
static int maybe_checkpoint(run* r, gpu_train* g, int* stop) {
  if (r->rank != 0) return ZN_OK;
  int64_t every = r->spec->checkpoint_every;
  int64_t request = atomic_load(&r->t->checkpoint_request);
  int scheduled = every > 0 && r->state.step / every > r->last_checkpoint_step / every &&
                  r->state.step >= every;
  int asked = request > r->checkpoint_answered;
  if (!scheduled && !asked) return ZN_OK;
  return checkpoint_on_gpu(r, g, asked ? request : 0, stop);
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
  for (int64_t t = r->start_step; t < r->total_steps && !stop && rc == ZN_OK; t++) {
    int64_t in_epoch = t % r->steps_per_epoch;
    if (in_epoch == 0 || t == r->start_step) {
      rc = start_epoch(r, g, (int)(t / r->steps_per_epoch), in_epoch, &stop);
      if (rc != ZN_OK || stop) break;
    }
    rc = queue_step(r, g);
    if (rc == ZN_OK && gpu_train_in_flight(g) > 1) rc = take_result(r, g, &stop);
    if (rc == ZN_OK && !stop) rc = maybe_checkpoint(r, g, &stop);
    int every = r->spec->eval_every;
    if (rc == ZN_OK && !stop && every > 0 && (t + 1) % every == 0 && t + 1 < r->total_steps) {
      double loss, acc;
      rc = evaluate(r, g, &stop, &loss, &acc);
      if (rc == ZN_OK && r->rank == 0) trainer_report_eval(r, t + 1, loss, acc);
      trainer_restart_rate_clock(r);
    }
  }
  if (rc == ZN_OK) rc = take_all(r, g, &stop);
  if (rc == ZN_OK && stop)
    rc = checkpoint_on_gpu(r, g, -1, &stop);
  else if (rc == ZN_OK && r->rank == 0 && r->last_checkpoint_step != r->state.step)
    rc = checkpoint_on_gpu(r, g, 0, &stop); /* the trained model */
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
  int rc = make_host_mirror(r);
  if (rc == ZN_OK) rc = start_gpu(r, &g);
  if (rc == ZN_OK) rc = resume_on_gpu(r, g);
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
  /* The communicator goes before the stream it runs on, and after the step graph that holds
   * its allreduce. */
  if (g) gpu_train_set_comm(g, NULL);
  zn_comm_destroy(r->comm);
  r->comm = NULL;
  gpu_train_destroy(g);
  return rc;
}
