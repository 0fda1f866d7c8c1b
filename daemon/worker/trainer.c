/* The trainer thread; see trainer.h.
 *
 * Every rank runs the same loop on the same schedule. Two scalars ride at the
 * end of the gradient allreduce: the rank's batch loss and its stop flag. So
 * the global loss costs no extra collective, and a stop asked of any rank
 * (cancel, shutdown) is seen by all of them at the same step: no rank is ever
 * left waiting in a collective for a peer that has already left.
 *
 * Evaluation is shared too: each rank scores its slice of the test set and one
 * small allreduce adds the sums up. */
#include "trainer.h"

#include <malloc.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "trainer_run.h"
#include "zn_err.h"
#include "zn_log.h"
#include "zn_step.h"
#include "zn_time.h"

#define REPORT_EVERY_SEC 0.25
#define RPC_TIMEOUT_MS 10000

static void params_from_spec(const Zenith__V1__JobSpec* spec, zn_zenith_params* p) {
  zn_zenith_params_default(p);
  const Zenith__V1__ZenithParams* o = spec->optimizer;
  if (!o) return;
  p->lr0 = o->lr0;
  p->window = o->window;
  p->momentum = o->momentum;
  p->nesterov = o->nesterov;
  p->weight_decay = o->weight_decay;
  p->decoupled_decay = o->decoupled_decay;
  p->lr_min = o->lr_min;
  p->spike_factor = o->spike_factor;
}

/* ---------------------------------------------------------------- reporting */

/* Sends one ReportMetrics for this worker's job; *cancel gets the reply's word
 * that the job is over. `what` names the report in a failure's warning. */
static int post_report(run* r, Zenith__V1__ReportMetricsRequest* req, const char* what,
                       int* cancel) {
  req->worker_id = (char*)r->t->env.worker_id;
  req->job_id = r->t->asg->job_id;
  req->has_attempt = 1;
  req->attempt = r->t->asg->attempt;
  ProtobufCMessage* msg;
  zn_rpc_status st;
  int rc =
      zn_rpc_unary(r->t->env.channel, "/zenith.v1.Workers/ReportMetrics", &req->base,
                   &zenith__v1__report_metrics_response__descriptor, RPC_TIMEOUT_MS, &msg, &st);
  if (rc != ZN_OK) {
    ZN_WARN("%s report failed: %s %s", what, zn_rpc_code_name(st.code), st.message);
    return rc;
  }
  const Zenith__V1__ReportMetricsResponse* resp = (const void*)msg;
  *cancel = resp->cancel;
  if (resp->checkpoint_request > 0) trainer_request_checkpoint(r->t, resp->checkpoint_request);
  protobuf_c_message_free_unpacked(msg, NULL);
  return ZN_OK;
}

int trainer_send_report(run* r) {
  Zenith__V1__ReportMetricsRequest req = ZENITH__V1__REPORT_METRICS_REQUEST__INIT;
  Zenith__V1__StepMetrics** ptrs = malloc((r->n_pending ? r->n_pending : 1) * sizeof *ptrs);
  for (size_t i = 0; i < r->n_pending; i++) ptrs[i] = &r->pending[i];
  req.n_metrics = r->n_pending;
  req.metrics = ptrs;
  if (!r->reported_total) {
    req.has_total_steps = 1;
    req.total_steps = r->total_steps;
  }
  if (!r->refused_reported) {
    req.n_refused_checkpoints = r->n_refused;
    req.refused_checkpoints = r->refused;
  }
  int cancel = 0;
  int rc = post_report(r, &req, "metrics", &cancel);
  free(ptrs);
  if (rc != ZN_OK) return rc;
  r->reported_total = r->refused_reported = 1;
  r->n_pending = 0;
  if (cancel) trainer_request_stop(r->t, 1, "the coordinator ended the job");
  return ZN_OK;
}

void trainer_report_eval(run* r, int64_t step, double loss, double accuracy) {
  Zenith__V1__EvalResult ev = ZENITH__V1__EVAL_RESULT__INIT;
  ev.has_step = ev.has_test_loss = ev.has_test_accuracy = ev.has_unix_ms = 1;
  ev.step = step;
  ev.test_loss = loss;
  ev.test_accuracy = accuracy;
  ev.unix_ms = zn_unix_ms();
  Zenith__V1__EvalResult* evs[1] = {&ev};
  Zenith__V1__ReportMetricsRequest req = ZENITH__V1__REPORT_METRICS_REQUEST__INIT;
  req.n_evals = 1;
  req.evals = evs;
  int cancel_ignored; /* the next metrics report acts on it */
  post_report(r, &req, "evaluation", &cancel_ignored);
}

void trainer_record_step(run* r, zn_step_outcome outcome, double norm, double loss, int epoch) {
  if (r->n_pending == r->cap_pending) {
    r->cap_pending = r->cap_pending ? 2 * r->cap_pending : 64;
    r->pending = realloc(r->pending, r->cap_pending * sizeof *r->pending);
  }
  Zenith__V1__StepMetrics* m = &r->pending[r->n_pending++];
  zenith__v1__step_metrics__init(m);
  m->has_step = m->has_epoch = m->has_loss = m->has_grad_norm = m->has_window_mean = 1;
  m->has_peak = m->has_lr = m->has_skipped = m->has_skipped_steps = m->has_spike_steps = 1;
  m->has_images_per_sec = m->has_unix_ms = 1;
  m->step = r->state.step;
  m->epoch = epoch;
  m->loss = loss;
  m->grad_norm = norm;
  m->window_mean = r->state.mean;
  m->peak = r->state.peak;
  m->lr = r->state.lr;
  m->skipped = outcome != ZN_STEP_TAKEN;
  m->skipped_steps = r->state.skipped;
  m->spike_steps = r->state.spikes;
  m->unix_ms = zn_unix_ms();

  r->images_since_report += r->spec->batch_size;
  double now = zn_mono_sec();
  double elapsed = now - r->last_report;
  m->images_per_sec = elapsed > 0 ? r->images_since_report / elapsed : 0;
  if (elapsed >= REPORT_EVERY_SEC || r->state.step == r->total_steps) {
    for (size_t i = 0; i < r->n_pending; i++) r->pending[i].images_per_sec = m->images_per_sec;
    trainer_send_report(r);
    r->last_report = now;
    r->images_since_report = 0;
  }
}

void trainer_warn_skipped(const run* r, zn_step_outcome outcome, double norm) {
  if (outcome != ZN_STEP_TAKEN)
    ZN_WARN("step %lld skipped: gradient norm %g is %s", (long long)r->state.step, norm,
            outcome == ZN_STEP_SKIPPED_SPIKE ? "a spike" : "not finite");
}

void trainer_restart_rate_clock(run* r) {
  r->last_report = zn_mono_sec();
  r->images_since_report = 0;
}

/* ---------------------------------------------------------------- setup */

/* The models take 28x28 images; any other size is refused before it is read past. */
static int check_image_size(run* r, const zn_dataset* ds, const char* file) {
  if (ds->rows == 28 && ds->cols == 28) return ZN_OK;
  snprintf(r->error, sizeof r->error, "%s/%s: images are %dx%d, but the models take 28x28",
           r->spec->data_dir, file, ds->rows, ds->cols);
  return ZN_ERR_INVALID;
}

static int load_data(run* r) {
  const char* dir = r->spec->data_dir;
  if (zn_dataset_load(dir, 1, &r->train, r->error, sizeof r->error) != ZN_OK) return ZN_ERR_IO;
  if (zn_dataset_load(dir, 0, &r->test, r->error, sizeof r->error) != ZN_OK) return ZN_ERR_IO;
  if (check_image_size(r, &r->train, "train-images-idx3-ubyte") != ZN_OK ||
      check_image_size(r, &r->test, "t10k-images-idx3-ubyte") != ZN_OK)
    return ZN_ERR_INVALID;
  if (r->train.count < r->spec->batch_size) {
    snprintf(r->error, sizeof r->error, "%s has %d training images, fewer than one batch of %d",
             dir, r->train.count, r->spec->batch_size);
    return ZN_ERR_INVALID;
  }
  return ZN_OK;
}

static int plan_steps(run* r) {
  r->steps_per_epoch = r->train.count / r->spec->batch_size;
  int64_t by_epochs = (int64_t)r->spec->epochs * r->steps_per_epoch;
  if (r->spec->epochs > 0 && r->spec->max_steps > 0)
    r->total_steps = by_epochs < r->spec->max_steps ? by_epochs : r->spec->max_steps;
  else
    r->total_steps = r->spec->epochs > 0 ? by_epochs : r->spec->max_steps;
  return ZN_OK;
}

/* Bytes the allocator has handed out, over all arenas and mmapped blocks. */
static size_t heap_in_use(void) {
  struct mallinfo2 mi = mallinfo2();
  return mi.uordblks + mi.hblkhd;
}

/* The momentum of this rank's part of the vector (all of it unless sharded), with the heap it
 * took measured rather than computed: the number a user compares across worker counts. */
static int alloc_optimizer_state(run* r) {
  size_t n = zn_model_num_params(r->model);
  zn_shard_plan_make(n, r->sharded ? r->world : 1, r->sharded ? r->rank : 0, &r->plan);
  if (r->sharded && zn_model_reserve(r->model, zn_shard_padded(&r->plan)) != ZN_OK)
    return ZN_ERR_NOMEM;
  size_t len = r->plan.hi - r->plan.lo;
  size_t before = heap_in_use();
  r->momentum = calloc(len ? len : 1, sizeof(float));
  size_t after = heap_in_use();
  r->optimizer_bytes = after > before ? after - before : 0;
  if (r->momentum) memset(r->momentum, 0, len * sizeof(float)); /* resident, as in training */
  return r->momentum ? ZN_OK : ZN_ERR_NOMEM;
}

static int build_model(run* r) {
  int eval_batch = r->local_batch > 500 ? r->local_batch : 500;
  if (zn_model_create(r->spec->model, eval_batch, &r->model) != ZN_OK) {
    snprintf(r->error, sizeof r->error, "model '%s' is unknown to this worker", r->spec->model);
    return ZN_ERR_INVALID;
  }
  zn_model_init(r->model, r->spec->seed);
  size_t n = zn_model_num_params(r->model);
  int state_ok = alloc_optimizer_state(r) == ZN_OK;
  if (!r->sharded) r->reduced = calloc(n + 2, sizeof(float));
  r->window = calloc((size_t)r->params.window, sizeof(double));
  r->batch_x = malloc((size_t)eval_batch * 784 * sizeof(float));
  r->batch_y = malloc((size_t)eval_batch);
  r->perm = malloc((size_t)r->train.count * sizeof(uint32_t));
  if (!state_ok || (!r->sharded && !r->reduced) || !r->window || !r->batch_x || !r->batch_y ||
      !r->perm) {
    snprintf(r->error, sizeof r->error, "out of memory for a model of %zu parameters", n);
    return ZN_ERR_NOMEM;
  }
  zn_zenith_state_init(&r->params, &r->state, r->window);
  return trainer_resume(r);
}

static int join_peers(run* r) {
  r->kv_ctx = (worker_kv_ctx){r->t->env.channel, &r->t->stop};
  zn_kv kv = worker_kv(&r->kv_ctx);
  zn_comm_config cfg = {r->rank, r->world, r->t->env.host, r->t->asg->kv_prefix, COMM_TIMEOUT_MS};
  char err[512];
  if (zn_comm_create_gloo(&cfg, &kv, &r->comm, err, sizeof err) != ZN_OK) {
    if (atomic_load(&r->t->stop)) return ZN_ERR_CANCELLED; /* stopped while waiting for peers */
    snprintf(r->error, sizeof r->error, "could not connect to the job's other workers: %s", err);
    return ZN_ERR_COMM;
  }
  return ZN_OK;
}

/* ---------------------------------------------------------------- the loop */

static void gather_batch(run* r, const uint32_t* indices, int n) {
  size_t pixels = (size_t)r->train.rows * r->train.cols;
  for (int i = 0; i < n; i++) {
    memcpy(r->batch_x + (size_t)i * pixels, r->train.images + (size_t)indices[i] * pixels,
           pixels * sizeof(float));
    r->batch_y[i] = r->train.labels[indices[i]];
  }
}

/* Mean loss and accuracy over the whole test set, every rank scoring a slice. */
static int evaluate(run* r, double* loss, double* accuracy) {
  int per_rank = (r->test.count + r->world - 1) / r->world;
  int begin = r->rank * per_rank;
  int end = begin + per_rank < r->test.count ? begin + per_rank : r->test.count;
  size_t pixels = (size_t)r->test.rows * r->test.cols;
  int chunk = r->local_batch > 500 ? r->local_batch : 500;
  double sums[2] = {0, 0};
  for (int i = begin; i < end; i += chunk) {
    int n = end - i < chunk ? end - i : chunk;
    int correct = 0;
    sums[0] += zn_model_eval_batch(r->model, r->test.images + (size_t)i * pixels,
                                   r->test.labels + i, n, &correct);
    sums[1] += correct;
  }
  if (zn_comm_allreduce_sum_f64(r->comm, sums, 2) != ZN_OK) {
    snprintf(r->error, sizeof r->error, "evaluation allreduce failed: %s", zn_comm_error(r->comm));
    return ZN_ERR_COMM;
  }
  *loss = sums[0] / r->test.count;
  *accuracy = sums[1] / r->test.count;
  return ZN_OK;
}

/* The unsharded reduction and update: one allreduce of the gradient with the loss and the stop
 * flag riding at its end, then the whole step on every rank. */
static int reduce_and_step(run* r, int64_t t, int epoch, float loss, int* stop_out) {
  size_t n = zn_model_num_params(r->model);
  memcpy(r->reduced, zn_model_grads(r->model), n * sizeof(float));
  r->reduced[n] = loss;
  r->reduced[n + 1] = atomic_load(&r->t->stop) ? 1.0f : 0.0f;
  if (zn_comm_allreduce_sum(r->comm, r->reduced, n + 2) != ZN_OK) {
    snprintf(r->error, sizeof r->error, "gradient allreduce at step %lld failed: %s",
             (long long)(t + 1), zn_comm_error(r->comm));
    return ZN_ERR_COMM;
  }
  if (r->reduced[n + 1] > 0) {
    *stop_out = 1;
    return ZN_OK;
  }

  double norm;
  float scale = 1.0f / (float)r->world;
  zn_step_outcome outcome = zn_zenith_step(&r->params, &r->state, scale, zn_model_params(r->model),
                                           r->reduced, r->momentum, n, &norm);
  trainer_warn_skipped(r, outcome, norm);
  if (r->rank == 0) trainer_record_step(r, outcome, norm, r->reduced[n] * scale, epoch + 1);
  return ZN_OK;
}

/* The scalars of a sharded step's one small allreduce. Besides the sum of squares, each rank's
 * loss and stop flags ride it, and rank 0's wish for a checkpoint: every rank learns at the same
 * step whether to stop, and whether the momentum must be gathered for a checkpoint. */
enum { SC_SUMSQ, SC_LOSS, SC_STOP, SC_LEAVING, SC_CHECKPOINT, SC_COUNT };

static int reduce_and_step_sharded(run* r, int64_t t, int epoch, float loss, int* stop_out) {
  int stop = atomic_load(&r->t->stop);
  double sc[SC_COUNT] = {0};
  sc[SC_LOSS] = loss;
  sc[SC_STOP] = stop != 0;
  sc[SC_LEAVING] = stop == 2;
  sc[SC_CHECKPOINT] =
      r->rank == 0 && atomic_load(&r->t->checkpoint_request) > r->checkpoint_answered;
  float* g = zn_model_grads(r->model);
  if (zn_shard_reduce(r->comm, &r->plan, g, sc, SC_COUNT) != ZN_OK) {
    snprintf(r->error, sizeof r->error, "gradient reduce-scatter at step %lld failed: %s",
             (long long)(t + 1), zn_comm_error(r->comm));
    return ZN_ERR_COMM;
  }
  if (sc[SC_STOP] > 0) {
    *stop_out = 1;
    r->someone_leaving = sc[SC_LEAVING] > 0;
    return ZN_OK;
  }
  r->checkpoint_asked = sc[SC_CHECKPOINT] > 0;

  double norm;
  zn_step_outcome outcome;
  float scale = 1.0f / (float)r->world;
  if (zn_shard_update(r->comm, &r->plan, &r->params, &r->state, scale, sc[SC_SUMSQ],
                      zn_model_params(r->model), g, r->momentum, &outcome, &norm) != ZN_OK) {
    snprintf(r->error, sizeof r->error, "parameter all-gather at step %lld failed: %s",
             (long long)(t + 1), zn_comm_error(r->comm));
    return ZN_ERR_COMM;
  }
  trainer_warn_skipped(r, outcome, norm);
  if (r->rank == 0) trainer_record_step(r, outcome, norm, sc[SC_LOSS] * scale, epoch + 1);
  return ZN_OK;
}

/* One optimizer step. *stop_out becomes 1 when every rank agreed to stop. */
static int train_step(run* r, int64_t t, int* stop_out) {
  int64_t in_epoch = t % r->steps_per_epoch;
  int epoch = (int)(t / r->steps_per_epoch);
  if (in_epoch == 0 || t == r->start_step)
    zn_data_permutation(r->perm, (uint32_t)r->train.count, r->spec->seed, epoch);
  const uint32_t* mine = r->perm + in_epoch * r->spec->batch_size + r->rank * r->local_batch;
  gather_batch(r, mine, r->local_batch);

  int correct;
  float loss = zn_model_train_batch(r->model, r->batch_x, r->batch_y, r->local_batch, &correct);
  if (r->sharded) return reduce_and_step_sharded(r, t, epoch, loss, stop_out);
  return reduce_and_step(r, t, epoch, loss, stop_out);
}

/* Sharded checkpoints are collective: every rank gathers the momentum into its spent gradient
 * buffer (the next backward pass overwrites it), then `write` says whether this rank writes the
 * file. Returns ZN_ERR_COMM, with r->error set, when the gather failed (the job cannot go on);
 * otherwise what the write returned, or ZN_OK for a rank that does not write. */
static int checkpoint_sharded(run* r, int write, int64_t request) {
  const char* dir = r->t->asg->checkpoint_dir;
  if (!dir || !dir[0]) return ZN_OK; /* no checkpoints: the same on every rank */
  float* full = zn_model_grads(r->model);
  if (zn_shard_gather(r->comm, &r->plan, r->momentum, full) != ZN_OK) {
    snprintf(r->error, sizeof r->error, "momentum all-gather for a checkpoint at step %lld: %s",
             (long long)r->state.step, zn_comm_error(r->comm));
    return ZN_ERR_COMM;
  }
  r->last_checkpoint_step = r->state.step; /* on every rank: they decide the final one alike */
  if (!write) return ZN_OK;
  r->momentum_full = full;
  int rc = trainer_checkpoint(r, request);
  r->momentum_full = NULL;
  return rc;
}

/* A checkpoint of the state after r->state.step steps, which this rank writes when `write`.
 * Unsharded, every rank holds the whole state and only a writer does anything; sharded, it is a
 * collective that every rank enters. ZN_ERR_COMM means a failed gather, after which the job
 * cannot go on; a failed write is logged and the job goes on. */
static int checkpoint_by(run* r, int write, int64_t request) {
  if (r->sharded) return checkpoint_sharded(r, write, request);
  return write ? trainer_checkpoint(r, request) : ZN_OK;
}

void trainer_checkpoint_if_leaving(run* r) {
  /* Leaving on SIGTERM (the worker is being taken away): a checkpoint first, so the job goes on
   * elsewhere from here rather than from the last scheduled one. Any rank can write it; sharded,
   * all ranks gather the momentum, when the step's allreduce said that one of them leaves. */
  int leaving = atomic_load(&r->t->stop) == 2;
  if (r->sharded ? !r->someone_leaving : !leaving) return;
  if (checkpoint_by(r, leaving, 0) == ZN_OK && leaving) r->preempted = 1;
}

/* After a step: rank 0 writes the scheduled checkpoint, or the one the coordinator asked for.
 * Sharded, every rank takes part (its asking was shared by the step's allreduce); only a failed
 * gather is returned as an error. */
static int maybe_checkpoint(run* r) {
  int every = r->spec->checkpoint_every;
  int64_t request = atomic_load(&r->t->checkpoint_request);
  int scheduled = every > 0 && r->state.step % every == 0;
  int asked = r->sharded ? r->checkpoint_asked : request > r->checkpoint_answered;
  if (!scheduled && !asked) return ZN_OK;
  int64_t answering = asked && r->rank == 0 ? request : 0;
  int rc = checkpoint_by(r, r->rank == 0, answering);
  if (rc == ZN_OK && answering) r->checkpoint_answered = answering;
  return rc == ZN_ERR_COMM ? rc : ZN_OK;
}

/* The trained model is kept: a final checkpoint, unless the last step just wrote one. */
static int final_checkpoint(run* r) {
  if (r->last_checkpoint_step == r->state.step) return ZN_OK;
  return checkpoint_by(r, r->rank == 0, 0) == ZN_ERR_COMM ? ZN_ERR_COMM : ZN_OK;
}

static int run_loop(run* r, double* test_loss, double* test_accuracy) {
  int stop = 0;
  r->last_report = zn_mono_sec();
  for (int64_t t = r->start_step; t < r->total_steps && !stop; t++) {
    int rc = train_step(r, t, &stop);
    if (rc == ZN_OK && !stop) rc = maybe_checkpoint(r);
    if (rc != ZN_OK) return rc;
    int every = r->spec->eval_every;
    if (!stop && every > 0 && (t + 1) % every == 0 && t + 1 < r->total_steps) {
      double loss, acc;
      if ((rc = evaluate(r, &loss, &acc)) != ZN_OK) return rc;
      if (r->rank == 0) trainer_report_eval(r, t + 1, loss, acc);
      trainer_restart_rate_clock(r);
    }
  }
  if (r->rank == 0 && r->n_pending) trainer_send_report(r);
  if (stop) {
    trainer_checkpoint_if_leaving(r);
    return ZN_ERR_CANCELLED;
  }
  int rc = final_checkpoint(r);
  if (rc == ZN_OK) rc = evaluate(r, test_loss, test_accuracy);
  if (rc == ZN_OK && r->rank == 0)
    trainer_report_eval(r, r->state.step, *test_loss, *test_accuracy);
  return rc;
}

/* ---------------------------------------------------------------- the thread */

static void finish(run* r, int rc, double test_loss, double test_accuracy) {
  trainer* t = r->t;
  Zenith__V1__FinishJobRequest req = ZENITH__V1__FINISH_JOB_REQUEST__INIT;
  req.worker_id = (char*)t->env.worker_id;
  req.job_id = t->asg->job_id;
  req.has_ok = req.has_steps = req.has_attempt = 1;
  req.attempt = t->asg->attempt;
  req.ok = rc == ZN_OK;
  req.n_refused_checkpoints = r->refused_reported ? 0 : r->n_refused;
  req.refused_checkpoints = r->refused;
  req.steps = r->state.step;
  if (rc == ZN_ERR_CANCELLED) {
    int by_coordinator = atomic_load(&t->stop) == 1;
    int asked_here = atomic_load(&t->stop) != 0;
    req.has_preempted = 1;
    req.preempted = r->preempted;
    req.has_cancelled = 1;
    req.cancelled = by_coordinator || !asked_here;
    if (!asked_here)
      snprintf(r->error, sizeof r->error, "stopped because another rank stopped");
    else
      snprintf(r->error, sizeof r->error, "%s", t->stop_reason);
  }
  req.error = r->error;
  req.has_collective_failed = 1;
  req.collective_failed = rc == ZN_ERR_COMM;
  if (rc == ZN_OK && r->rank == 0) {
    req.has_has_test_result = req.has_test_result = 1;
    req.has_test_loss = req.has_test_accuracy = 1;
    req.test_loss = test_loss;
    req.test_accuracy = test_accuracy;
  }
  ProtobufCMessage* msg;
  zn_rpc_status st;
  if (zn_rpc_unary(t->env.channel, "/zenith.v1.Workers/FinishJob", &req.base,
                   &zenith__v1__finish_job_response__descriptor, RPC_TIMEOUT_MS, &msg,
                   &st) == ZN_OK)
    protobuf_c_message_free_unpacked(msg, NULL);
  else
    ZN_WARN("could not report the end of the job: %s %s", zn_rpc_code_name(st.code), st.message);
}

static void free_run(run* r) {
  for (size_t i = 0; i < r->n_refused; i++) free(r->refused[i]);
  free(r->refused);
  if (r->comm) zn_comm_destroy(r->comm);
  if (r->model) zn_model_destroy(r->model);
  zn_dataset_free(&r->train);
  zn_dataset_free(&r->test);
  free(r->window);
  free(r->momentum);
  free(r->reduced);
  free(r->batch_x);
  free(r->batch_y);
  free(r->perm);
  free(r->pending);
}

static int threads_for(const trainer* t) {
  int from_spec = t->asg->spec->threads;
  return from_spec > 0 ? from_spec : t->env.threads;
}

static int is_cuda_job(const run* r) {
  return r->spec->device && strcmp(r->spec->device, "cuda") == 0;
}

static int run_on_gpu(run* r, double* test_loss, double* test_accuracy) {
  if (r->t->env.device < 0) {
    snprintf(r->error, sizeof r->error, "a cuda job was given to a worker without a GPU");
    return ZN_ERR_INVALID;
  }
#ifdef ZN_HAVE_GPU_TRAINING
  return trainer_gpu_run(r, test_loss, test_accuracy);
#else
  snprintf(r->error, sizeof r->error,
           "this worker was built without GPU training (CUDA, cuDNN and NCCL)");
  return ZN_ERR_INVALID;
#endif
}

static void log_optimizer_state(const run* r) {
  const zn_shard_plan* p = &r->plan;
  if (r->sharded)
    ZN_INFO(
        "sharding optimizer: this rank keeps the momentum of parameters [%zu, %zu) of %zu "
        "(%zu); optimizer state %zu bytes (heap measured)",
        p->lo, p->hi, p->n, p->hi - p->lo, r->optimizer_bytes);
  else
    ZN_INFO("sharding none: optimizer state %zu bytes (heap measured)", r->optimizer_bytes);
}

static int is_sharded(const Zenith__V1__JobSpec* spec) {
  return spec->sharding && strcmp(spec->sharding, "optimizer") == 0;
}

static int run_job(run* r, double* test_loss, double* test_accuracy) {
  int rc = load_data(r);
  if (rc == ZN_OK) rc = plan_steps(r);
  if (rc != ZN_OK) return rc;
  if (is_cuda_job(r)) return run_on_gpu(r, test_loss, test_accuracy);
  rc = build_model(r);
  if (rc != ZN_OK) return rc;
  ZN_INFO(
      "job started: rank %d of %d, model %s (%zu parameters) on the CPU, %lld steps of batch %d "
      "(%d per rank), %d thread(s)",
      r->rank, r->world, r->spec->model, zn_model_num_params(r->model), (long long)r->total_steps,
      r->spec->batch_size, r->local_batch, threads_for(r->t));
  log_optimizer_state(r);
  rc = join_peers(r);
  if (rc == ZN_OK) rc = run_loop(r, test_loss, test_accuracy);
  return rc;
}

static void* trainer_main(void* arg) {
  trainer* t = arg;
  run r = {0};
  r.t = t;
  r.spec = t->asg->spec;
  r.rank = t->asg->rank;
  r.world = t->asg->world_size;
  r.local_batch = r.spec->batch_size / r.world;
  r.last_checkpoint_step = -1;
  r.sharded = is_sharded(r.spec) && !is_cuda_job(&r);
  params_from_spec(r.spec, &r.params);
  zn_log_set_context(t->asg->job_id, r.rank);
  zn_model_set_threads(threads_for(t));

  double t0 = zn_mono_sec(), test_loss = 0, test_accuracy = 0;
  int rc = run_job(&r, &test_loss, &test_accuracy);

  if (rc == ZN_OK)
    ZN_INFO("job done: %lld steps in %.1f s, test accuracy %.4f", (long long)r.state.step,
            zn_mono_sec() - t0, test_accuracy);
  else if (rc == ZN_ERR_CANCELLED)
    ZN_INFO("job stopped at step %lld: %s", (long long)r.state.step,
            atomic_load(&t->stop) ? t->stop_reason : "another rank stopped");
  else
    ZN_ERROR("job failed at step %lld: %s", (long long)r.state.step, r.error);
  finish(&r, rc, test_loss, test_accuracy);
  free_run(&r);
  zn_log_set_context(NULL, -1);
  t->env.on_done(t->env.ud);
  return NULL;
}

trainer* trainer_start(const Zenith__V1__Assignment* assignment, const trainer_env* env) {
  trainer* t = calloc(1, sizeof *t);
  if (!t) return NULL;
  t->asg = zn_rpc_clone_message(&assignment->base);
  t->env = *env;
  if (pthread_create(&t->thread, NULL, trainer_main, t) != 0) {
    zenith__v1__assignment__free_unpacked(t->asg, NULL);
    free(t);
    return NULL;
  }
  return t;
}

void trainer_request_stop(trainer* t, int cancelled_by_coordinator, const char* why) {
  int expected = 0;
  if (atomic_compare_exchange_strong(&t->stop, &expected, cancelled_by_coordinator ? 1 : 2))
    snprintf(t->stop_reason, sizeof t->stop_reason, "%s", why);
}

const char* trainer_job_id(const trainer* t) {
  return t->asg->job_id;
}

int trainer_attempt(const trainer* t) {
  return t->asg->attempt;
}

void trainer_request_checkpoint(trainer* t, int64_t request) {
  int64_t seen = atomic_load(&t->checkpoint_request);
  if (request > seen) atomic_store(&t->checkpoint_request, request);
}

void trainer_destroy(trainer* t) {
  if (!t) return;
  pthread_join(t->thread, NULL);
  zenith__v1__assignment__free_unpacked(t->asg, NULL);
  free(t);
}
