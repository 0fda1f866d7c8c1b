/* Spec validation and defaults; see coord_spec.h. */
#include "coord_spec.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define FAIL(...)                       \
  do {                                  \
    snprintf(err, errlen, __VA_ARGS__); \
    return -1;                          \
  } while (0)

static int known_model(const char* m) {
  return m && (strcmp(m, "mlp") == 0 || strcmp(m, "cnn") == 0);
}

int coord_spec_known_device(const char* device) {
  return device && (strcmp(device, "cpu") == 0 || strcmp(device, "cuda") == 0);
}

const char* coord_spec_device(const Zenith__V1__JobSpec* spec) {
  return spec->device && spec->device[0] ? spec->device : "cpu";
}

const char* coord_spec_sharding(const Zenith__V1__JobSpec* spec) {
  return spec->sharding && spec->sharding[0] ? spec->sharding : "none";
}

/* Only the CPU step keeps a shard of the momentum; the GPU step keeps all of it. */
static int validate_sharding(const char* sharding, const char* device, char* err, size_t errlen) {
  if (strcmp(sharding, "none") != 0 && strcmp(sharding, "optimizer") != 0)
    FAIL("sharding: unknown sharding '%.40s%s'; choose none or optimizer", sharding,
         strlen(sharding) > 40 ? "..." : "");
  if (strcmp(sharding, "optimizer") == 0 && strcmp(device, "cuda") == 0)
    FAIL(
        "sharding: 'optimizer' runs on cpu jobs only in this version; use --sharding none for "
        "cuda jobs");
  return 0;
}

static int validate_optimizer(const Zenith__V1__ZenithParams* p, char* err, size_t errlen) {
  if (!p) return 0;
  if (!isfinite(p->lr0) || p->lr0 <= 0)
    FAIL("optimizer.lr0: must be a finite number > 0 (got %g)", p->lr0);
  if (p->window < 1 || p->window > 1000000)
    FAIL("optimizer.window: must be between 1 and 1000000 steps (got %d)", p->window);
  if (!isfinite(p->momentum) || p->momentum < 0 || p->momentum >= 1)
    FAIL("optimizer.momentum: must be in [0, 1) (got %g)", p->momentum);
  if (!isfinite(p->weight_decay) || p->weight_decay < 0)
    FAIL("optimizer.weight_decay: must be >= 0 (got %g)", p->weight_decay);
  if (!isfinite(p->decoupled_decay) || p->decoupled_decay < 0)
    FAIL("optimizer.decoupled_decay: must be >= 0 (got %g)", p->decoupled_decay);
  if (!isfinite(p->lr_min) || p->lr_min < 0 || p->lr_min > p->lr0)
    FAIL("optimizer.lr_min: must be in [0, lr0 = %g] (got %g)", p->lr0, p->lr_min);
  if (!isfinite(p->spike_factor) || p->spike_factor < 0)
    FAIL("optimizer.spike_factor: must be >= 0, 0 turns the guard off (got %g)", p->spike_factor);
  return 0;
}

int coord_spec_validate(const Zenith__V1__JobSpec* spec, char* err, size_t errlen) {
  if (!spec) FAIL("spec: missing");
  if (spec->name && strlen(spec->name) > ZN_MAX_NAME_BYTES)
    FAIL("name: %zu bytes is over the limit of %d", strlen(spec->name), ZN_MAX_NAME_BYTES);
  if (spec->data_dir && strlen(spec->data_dir) > ZN_MAX_PATH_BYTES)
    FAIL("data_dir: %zu bytes is over the limit of %d", strlen(spec->data_dir), ZN_MAX_PATH_BYTES);
  if (!known_model(spec->model))
    FAIL("model: unknown model '%s'; choose mlp or cnn", spec->model ? spec->model : "");
  if (spec->dataset && spec->dataset[0] && strcmp(spec->dataset, "fashion-mnist") != 0)
    FAIL("dataset: unknown dataset '%s'; the supported dataset is fashion-mnist", spec->dataset);
  if (!coord_spec_known_device(coord_spec_device(spec)))
    FAIL("device: unknown device '%s'; choose cpu or cuda", spec->device);
  if (validate_sharding(coord_spec_sharding(spec), coord_spec_device(spec), err, errlen) != 0)
    return -1;
  if (spec->workers < 1 || spec->workers > ZN_MAX_WORKERS)
    FAIL("workers: must be between 1 and %d (got %d)", ZN_MAX_WORKERS, spec->workers);
  if (spec->batch_size < 1 || spec->batch_size > 65536)
    FAIL("batch_size: must be between 1 and 65536 (got %d)", spec->batch_size);
  if (spec->batch_size % spec->workers != 0)
    FAIL("batch_size: %d is not divisible by workers = %d; each worker takes an equal slice",
         spec->batch_size, spec->workers);
  if (spec->epochs < 0) FAIL("epochs: must be >= 0 (got %d)", spec->epochs);
  if (spec->max_steps < 0) FAIL("max_steps: must be >= 0 (got %lld)", (long long)spec->max_steps);
  if (spec->epochs == 0 && spec->max_steps == 0)
    FAIL("epochs, max_steps: set at least one of them to a positive number");
  if (spec->eval_every < 0) FAIL("eval_every: must be >= 0 (got %d)", spec->eval_every);
  if (spec->threads < 0 || spec->threads > 1024)
    FAIL("threads: must be between 0 and 1024 (got %d)", spec->threads);
  if (spec->checkpoint_every < 0)
    FAIL("checkpoint_every: must be >= 0 steps; 0 means on request and at the end only (got %d)",
         spec->checkpoint_every);
  if (spec->keep_checkpoints < 1 || spec->keep_checkpoints > ZN_MAX_KEEP_CHECKPOINTS)
    FAIL("keep_checkpoints: must be between 1 and %d (got %d)", ZN_MAX_KEEP_CHECKPOINTS,
         spec->keep_checkpoints);
  if (spec->max_restarts < 0 || spec->max_restarts > ZN_MAX_RESTARTS)
    FAIL("max_restarts: must be between 0 and %d (got %d)", ZN_MAX_RESTARTS, spec->max_restarts);
  return validate_optimizer(spec->optimizer, err, errlen);
}

/* "1, 2, 4": the worker counts up to ZN_MAX_WORKERS that divide batch_size. */
static void list_divisors(int batch_size, char* out, size_t len) {
  size_t used = 0;
  out[0] = '\0';
  for (int w = 1; w <= ZN_MAX_WORKERS && w <= batch_size && used < len; w++)
    if (batch_size % w == 0)
      used += (size_t)snprintf(out + used, len - used, "%s%d", used ? ", " : "", w);
}

/* A resume names the workers it wants, so the message names workers first, and what fits. */
static int validate_resume_workers(const Zenith__V1__JobSpec* spec, int workers, char* err,
                                   size_t errlen) {
  if (workers < 1 || workers > ZN_MAX_WORKERS)
    FAIL("workers: must be between 1 and %d, or 0 to keep the job's %d (got %d)", ZN_MAX_WORKERS,
         spec->workers, workers);
  if (spec->batch_size % workers != 0) {
    char fits[400];
    list_divisors(spec->batch_size, fits, sizeof fits);
    FAIL(
        "workers: %d does not divide batch_size %d; each worker takes an equal slice, so "
        "choose one of %s",
        workers, spec->batch_size, fits);
  }
  return 0;
}

static void set_default_string(char** field, const char* value) {
  if (*field && (*field)[0]) return;
  free(*field);
  *field = strdup(value);
}

int coord_spec_resume(Zenith__V1__JobSpec* spec, int workers, const char* sharding, char* changes,
                      size_t changes_len, char* err, size_t errlen) {
  size_t used = 0;
  changes[0] = '\0';
  if (workers != 0 && validate_resume_workers(spec, workers, err, errlen) != 0) return -1;
  if (workers != 0 && workers != spec->workers) {
    used += (size_t)snprintf(changes, changes_len, "on %d worker%s (was %d)", workers,
                             workers == 1 ? "" : "s", spec->workers);
    spec->has_workers = 1;
    spec->workers = workers;
  }

  if (!sharding || !sharding[0]) return 0;
  if (validate_sharding(sharding, coord_spec_device(spec), err, errlen) != 0) return -1;
  const char* was = coord_spec_sharding(spec);
  if (strcmp(sharding, was) == 0) return 0;
  if (used < changes_len)
    snprintf(changes + used, changes_len - used, "%ssharding %s (was %s)", used ? ", " : "",
             sharding, was);
  free(spec->sharding); /* after the last use of `was`, which may point into it */
  spec->sharding = strdup(sharding);
  return 0;
}

void coord_spec_fill_defaults(Zenith__V1__JobSpec* spec) {
  set_default_string(&spec->dataset, "fashion-mnist");
  set_default_string(&spec->data_dir, ZN_DEFAULT_DATA_DIR);
  set_default_string(&spec->name, "");
  set_default_string(&spec->device, "cpu");
  coord_spec_fill_stored(spec);
  spec->has_workers = spec->has_batch_size = spec->has_epochs = spec->has_max_steps = 1;
  spec->has_seed = spec->has_eval_every = spec->has_threads = spec->has_cuda_graph = 1;
  spec->has_checkpoint_every = spec->has_keep_checkpoints = spec->has_max_restarts = 1;
  if (!spec->optimizer) {
    spec->optimizer = malloc(sizeof *spec->optimizer);
    zenith__v1__zenith_params__init(spec->optimizer);
  }
  Zenith__V1__ZenithParams* p = spec->optimizer;
  p->has_lr0 = p->has_window = p->has_momentum = p->has_nesterov = 1;
  p->has_weight_decay = p->has_decoupled_decay = p->has_lr_min = p->has_spike_factor = 1;
}

void coord_spec_fill_stored(Zenith__V1__JobSpec* spec) {
  if (spec) set_default_string(&spec->sharding, "none");
}
