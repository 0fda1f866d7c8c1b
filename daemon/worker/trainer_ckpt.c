/* The trainer's checkpoints; see trainer_run.h.
 *
 * A checkpoint is everything the loop needs to go on as if it had never stopped: the parameters
 * and momentum (tensors named as in PyTorch's state_dict, momentum under "momentum."), the ZENITH
 * window in age order (tensor "zenith.window", oldest first) and, as metadata, the rule's
 * scalars, the data-order position and the job's spec. The rule's doubles are written with 17
 * significant digits, which read back to the same bits, and the running sum is stored rather
 * than recomputed, so a resumed run takes bit-identical steps. Every rank holds the same state
 * after a step (the allreduce gives all of them the same gradient), so any rank can write one:
 * rank 0 does on schedule and on request, and a rank leaving on SIGTERM does on its way out.
 * A sharded job's ranks first gather the momentum (trainer.c), so that the file holds the whole
 * state in the same layout either way. */
#include <errno.h>
#include <inttypes.h>
#include <jansson.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "trainer_run.h"
#include "zn_ckpt.h"
#include "zn_err.h"
#include "zn_log.h"
#include "zn_time.h"

#define CKPT_FORMAT "1"
#define RPC_TIMEOUT_MS 10000

enum { MAX_META = 24, MAX_TENSORS = 2 * 8 + 1 };

/* Metadata values live in one buffer of fixed-size slots for the duration of a write. */
typedef struct {
  zn_ckpt_meta meta[MAX_META];
  char values[MAX_META][96];
  int n;
} meta_set;

static void put_meta(meta_set* m, const char* key, const char* fmt, ...)
    __attribute__((format(printf, 3, 4)));

static void put_meta(meta_set* m, const char* key, const char* fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(m->values[m->n], sizeof m->values[m->n], fmt, ap);
  va_end(ap);
  m->meta[m->n].key = key;
  m->meta[m->n].value = m->values[m->n];
  m->n++;
}

static const char* sharding_name(const Zenith__V1__JobSpec* s) {
  return s->sharding && s->sharding[0] ? s->sharding : "none";
}

/* The spec in JSON, for people and tools reading the file; resuming checks only the fields that
 * decide the run's arithmetic (model, batch, seed, window), which are also plain metadata. */
static char* spec_json(const Zenith__V1__JobSpec* s, const zn_zenith_params* p) {
  json_t* o = json_pack(
      "{s:s, s:s, s:i, s:i, s:i, s:I, s:I, s:i, s:s, s:s, s:{s:f, s:i, s:f, s:b, s:f, s:f, s:f, "
      "s:f}}",
      "model", s->model, "dataset", s->dataset ? s->dataset : "", "workers", s->workers,
      "batch_size", s->batch_size, "epochs", s->epochs, "max_steps", (json_int_t)s->max_steps,
      "seed", (json_int_t)s->seed, "eval_every", s->eval_every, "device",
      s->device ? s->device : "cpu", "sharding", sharding_name(s), "optimizer", "lr0", p->lr0,
      "window", p->window, "momentum", p->momentum, "nesterov", p->nesterov, "weight_decay",
      p->weight_decay, "decoupled_decay", p->decoupled_decay, "lr_min", p->lr_min, "spike_factor",
      p->spike_factor);
  char* text = o ? json_dumps(o, JSON_COMPACT | JSON_REAL_PRECISION(17)) : NULL;
  json_decref(o);
  return text;
}

static void collect_meta(const run* r, meta_set* m) {
  const zn_zenith_state* s = &r->state;
  put_meta(m, "zenith.format", "%s", CKPT_FORMAT);
  put_meta(m, "zenith.job", "%s", r->t->asg->job_id);
  put_meta(m, "zenith.model", "%s", r->spec->model);
  put_meta(m, "zenith.batch_size", "%d", r->spec->batch_size);
  put_meta(m, "zenith.seed", "%" PRIu64, r->spec->seed);
  put_meta(m, "zenith.workers", "%d", r->world);
  put_meta(m, "zenith.sharding", "%s", sharding_name(r->spec));
  put_meta(m, "zenith.window_size", "%d", r->params.window);
  put_meta(m, "zenith.step", "%" PRId64, s->step);
  put_meta(m, "zenith.count", "%d", s->count);
  put_meta(m, "zenith.sum", "%.17g", s->sum);
  put_meta(m, "zenith.mean", "%.17g", s->mean);
  put_meta(m, "zenith.peak", "%.17g", s->peak);
  put_meta(m, "zenith.lr", "%.17g", s->lr);
  put_meta(m, "zenith.skipped", "%" PRId64, s->skipped);
  put_meta(m, "zenith.spikes", "%" PRId64, s->spikes);
  put_meta(m, "data.epoch", "%" PRId64, s->step / r->steps_per_epoch);
  put_meta(m, "data.position", "%" PRId64, s->step % r->steps_per_epoch);
  put_meta(m, "data.steps_per_epoch", "%" PRId64, r->steps_per_epoch);
}

/* Parameter and momentum tensors, in state_dict order, pointing into the run's buffers. */
static int collect_tensors(const run* r, zn_ckpt_tensor* t, char names[][64], double* window) {
  int n = 0, k = zn_model_num_tensors(r->model);
  for (int pass = 0; pass < 2; pass++) {
    const float* momentum = r->momentum_full ? r->momentum_full : r->momentum;
    const float* base = pass == 0 ? zn_model_params(r->model) : momentum;
    for (int i = 0; i < k; i++, n++) {
      int ndim, shape[4];
      zn_model_tensor_shape(r->model, i, &ndim, shape);
      snprintf(names[n], 64, "%s%s", pass == 0 ? "" : "momentum.",
               zn_model_tensor_name(r->model, i));
      t[n] = (zn_ckpt_tensor){
          names[n], ZN_CKPT_F32, ndim, {0}, base + zn_model_tensor_offset(r->model, i)};
      for (int d = 0; d < ndim; d++) t[n].shape[d] = shape[d];
    }
  }
  for (int i = 0; i < r->state.count; i++)
    window[i] = zn_zenith_window_at(&r->params, &r->state, i);
  t[n] = (zn_ckpt_tensor){"zenith.window", ZN_CKPT_F64, 1, {r->state.count}, window};
  return n + 1;
}

static void report_checkpoint(run* r, const char* path, const char* digest, int64_t bytes,
                              int64_t request) {
  Zenith__V1__ReportCheckpointRequest req = ZENITH__V1__REPORT_CHECKPOINT_REQUEST__INIT;
  req.worker_id = (char*)r->t->env.worker_id;
  req.job_id = r->t->asg->job_id;
  req.has_attempt = req.has_step = req.has_bytes = req.has_request = 1;
  req.attempt = r->t->asg->attempt;
  req.step = r->state.step;
  req.path = (char*)path;
  req.digest = (char*)digest;
  req.bytes = bytes;
  req.request = request;
  ProtobufCMessage* msg;
  zn_rpc_status st;
  if (zn_rpc_unary(r->t->env.channel, "/zenith.v1.Workers/ReportCheckpoint", &req.base,
                   &zenith__v1__report_checkpoint_response__descriptor, RPC_TIMEOUT_MS, &msg,
                   &st) == ZN_OK)
    protobuf_c_message_free_unpacked(msg, NULL);
  else
    ZN_WARN("checkpoint %s written but not recorded by the coordinator: %s %s", path,
            zn_rpc_code_name(st.code), st.message);
}

int trainer_checkpoint(run* r, int64_t request) {
  const char* dir = r->t->asg->checkpoint_dir;
  if (!dir || !dir[0]) return ZN_OK; /* a coordinator that keeps no checkpoints */
  if (mkdir(dir, 0755) != 0 && errno != EEXIST) {
    ZN_WARN("cannot create the checkpoint folder %s: %s", dir, strerror(errno));
    return ZN_ERR_IO;
  }
  char path[4096];
  snprintf(path, sizeof path, "%s/step-%06" PRId64 "-a%d-r%d.safetensors", dir, r->state.step,
           r->t->asg->attempt, r->rank);
  meta_set meta = {.n = 0};
  collect_meta(r, &meta);
  char* spec = spec_json(r->spec, &r->params);
  zn_ckpt_meta all[MAX_META + 1];
  memcpy(all, meta.meta, (size_t)meta.n * sizeof all[0]);
  all[meta.n] = (zn_ckpt_meta){"zenith.spec", spec ? spec : "{}"};

  zn_ckpt_tensor tensors[MAX_TENSORS];
  char names[MAX_TENSORS][64];
  double* window = malloc((size_t)r->params.window * sizeof(double));
  int nt = collect_tensors(r, tensors, names, window);
  char digest[65], err[1024];
  int64_t bytes = 0;
  double t0 = zn_mono_sec();
  int rc = zn_ckpt_write(path, tensors, nt, all, meta.n + 1, digest, &bytes, err, sizeof err);
  double ms = (zn_mono_sec() - t0) * 1000.0;
  free(window);
  free(spec);
  if (rc != ZN_OK) {
    ZN_WARN("checkpoint at step %" PRId64 " failed: %s", r->state.step, err);
    return rc;
  }
  ZN_INFO("checkpoint written: step %" PRId64 ", %.1f MB in %.0f ms: %s", r->state.step,
          bytes / 1e6, ms, path);
  r->last_checkpoint_step = r->state.step;
  report_checkpoint(r, path, digest, bytes, request);
  return ZN_OK;
}

/* ---------------------------------------------------------------- resume */

static int meta_i64(const zn_ckpt* c, const char* key, int64_t* v) {
  const char* s = zn_ckpt_meta_get(c, key);
  char* end;
  if (!s) return -1;
  *v = strtoll(s, &end, 10);
  return *end ? -1 : 0;
}

static int meta_f64(const zn_ckpt* c, const char* key, double* v) {
  const char* s = zn_ckpt_meta_get(c, key);
  char* end;
  if (!s) return -1;
  *v = strtod(s, &end);
  return *end ? -1 : 0;
}

/* Whether a verified checkpoint belongs to this job's arithmetic; why not in `why`. */
static int fits(const run* r, const zn_ckpt* c, char* why, size_t len) {
  int64_t batch, seed_ok = 0, window;
  const char* model = zn_ckpt_meta_get(c, "zenith.model");
  const char* seed = zn_ckpt_meta_get(c, "zenith.seed");
  char want_seed[32];
  snprintf(want_seed, sizeof want_seed, "%" PRIu64, r->spec->seed);
  seed_ok = seed && strcmp(seed, want_seed) == 0;
  if (!model || strcmp(model, r->spec->model) != 0)
    snprintf(why, len, "it holds model '%s', the job trains '%s'", model ? model : "?",
             r->spec->model);
  else if (meta_i64(c, "zenith.batch_size", &batch) != 0 || batch != r->spec->batch_size)
    snprintf(why, len, "it was written with another global batch size");
  else if (meta_i64(c, "zenith.window_size", &window) != 0 || window != r->params.window)
    snprintf(why, len, "it was written with another ZENITH window");
  else if (!seed_ok)
    snprintf(why, len, "it was written with seed %s, the job has %s", seed ? seed : "?", want_seed);
  else
    return 1;
  return 0;
}

/* Copies a tensor of the checkpoint into dst, checking its dtype and size. */
static int take_tensor(const zn_ckpt* c, const char* name, zn_ckpt_dtype dtype, void* dst,
                       int64_t count, char* why, size_t len) {
  const zn_ckpt_tensor* t = zn_ckpt_find(c, name);
  if (!t || t->dtype != dtype || zn_ckpt_numel(t) != count) {
    snprintf(why, len, "tensor '%s' is %s", name, t ? "of the wrong type or size" : "missing");
    return -1;
  }
  memcpy(dst, t->data, (size_t)count * (dtype == ZN_CKPT_F32 ? 4 : 8));
  return 0;
}

static int restore_state(run* r, const zn_ckpt* c, char* why, size_t len) {
  zn_zenith_state s = r->state;
  int64_t count;
  if (meta_i64(c, "zenith.step", &s.step) || meta_i64(c, "zenith.count", &count) ||
      meta_f64(c, "zenith.sum", &s.sum) || meta_f64(c, "zenith.mean", &s.mean) ||
      meta_f64(c, "zenith.peak", &s.peak) || meta_f64(c, "zenith.lr", &s.lr) ||
      meta_i64(c, "zenith.skipped", &s.skipped) || meta_i64(c, "zenith.spikes", &s.spikes) ||
      count < 0 || count > r->params.window || s.step < 0 || s.step > r->total_steps) {
    snprintf(why, len, "its ZENITH state is incomplete or out of range");
    return -1;
  }
  s.count = (int)count;
  s.head = 0; /* oldest first, as zn_zenith_window_at wrote them */
  if (take_tensor(c, "zenith.window", ZN_CKPT_F64, s.window, count, why, len)) return -1;
  r->state = s;
  return 0;
}

/* The file holds the whole momentum, whatever the worker count and sharding it was written
 * with. Sharded, it is read into the gradient buffer (free until the first step) and this rank
 * keeps its shard; so a job can go on with another number of workers, sharded or not. */
static int restore(run* r, const zn_ckpt* c, char* why, size_t len) {
  if (!fits(r, c, why, len)) return -1;
  float* momentum = r->sharded ? zn_model_grads(r->model) : r->momentum;
  int k = zn_model_num_tensors(r->model);
  char name[80];
  for (int i = 0; i < k; i++) {
    int ndim, shape[4];
    zn_model_tensor_shape(r->model, i, &ndim, shape);
    int64_t count = 1;
    for (int d = 0; d < ndim; d++) count *= shape[d];
    size_t off = zn_model_tensor_offset(r->model, i);
    const char* tn = zn_model_tensor_name(r->model, i);
    snprintf(name, sizeof name, "momentum.%s", tn);
    if (take_tensor(c, tn, ZN_CKPT_F32, zn_model_params(r->model) + off, count, why, len) ||
        take_tensor(c, name, ZN_CKPT_F32, momentum + off, count, why, len))
      return -1;
  }
  if (r->sharded)
    memcpy(r->momentum, momentum + r->plan.lo, (r->plan.hi - r->plan.lo) * sizeof(float));
  return restore_state(r, c, why, len);
}

static size_t momentum_len(const run* r) {
  return r->sharded ? r->plan.hi - r->plan.lo : zn_model_num_params(r->model);
}

static void note_refused(run* r, const char* path, const char* why) {
  ZN_WARN("checkpoint refused: %s: %s", path, why);
  r->refused = realloc(r->refused, (r->n_refused + 1) * sizeof *r->refused);
  size_t n = strlen(path) + strlen(why) + 3;
  char* text = malloc(n);
  snprintf(text, n, "%s: %s", path, why);
  r->refused[r->n_refused++] = text;
}

int trainer_resume(run* r) {
  const Zenith__V1__Assignment* asg = r->t->asg;
  for (size_t i = 0; i < asg->n_resume_from; i++) {
    const char* path = asg->resume_from[i];
    zn_ckpt* c = NULL;
    char err[1024], why[512];
    if (zn_ckpt_read(path, &c, err, sizeof err) != ZN_OK) {
      /* err names the file already */
      note_refused(r, path, strncmp(err, path, strlen(path)) == 0 ? err + strlen(path) + 2 : err);
      continue;
    }
    int ok = restore(r, c, why, sizeof why) == 0;
    zn_ckpt_free(c);
    if (!ok) {
      note_refused(r, path, why);
      /* A partial copy may have touched the buffers: start them over. */
      zn_model_init(r->model, r->spec->seed);
      memset(r->momentum, 0, momentum_len(r) * sizeof(float));
      zn_zenith_state_init(&r->params, &r->state, r->window);
      continue;
    }
    r->start_step = r->last_checkpoint_step = r->state.step;
    ZN_INFO("resumed from %s at step %" PRId64 " (epoch %" PRId64 ", step %" PRId64 " of it)", path,
            r->state.step, r->state.step / r->steps_per_epoch + 1,
            r->state.step % r->steps_per_epoch);
    return ZN_OK;
  }
  if (asg->n_resume_from)
    ZN_WARN("no usable checkpoint among %zu: the job starts again from step 0", asg->n_resume_from);
  return ZN_OK;
}
