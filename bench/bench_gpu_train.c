/* Training on one GPU through the worker's own GPU step (daemon/worker/gpu_train.h): the batch
 * gathered on the device from Fashion-MNIST, forward, backward, the ZENITH step, its report
 * copied back one step late, with or without the CUDA graph.
 *
 * Two modes. By default it times `steps` steps after `warmup` and prints
 * `zenith_gpu images_per_s=<x> ...`; bench_gpu_train_torch.py times PyTorch on the same model,
 * batch and kind of step. With --epochs E it trains E epochs in the order a worker uses for the
 * seed (zn_data_permutation), evaluates on the test set and prints
 * `zenith_gpu test_accuracy=<a> ...`: tests/gpu/run.sh compares that with a CPU run.
 *
 * usage: bench_gpu_train --data-dir DIR [--model cnn|mlp] [--batch 128] [--graph 0|1]
 *                        [--warmup 20] [--steps 500] [--device 0] [--epochs E --seed S] */
#define _POSIX_C_SOURCE 200809L /* clock_gettime */

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "gpu_train.h"
#include "zn_data.h"

typedef struct {
  const char* data_dir;
  const char* model;
  int batch, graph, warmup, steps, device, epochs, seed;
} options;

static int parse(int argc, char** argv, options* o) {
  for (int i = 1; i + 1 < argc; i += 2) {
    const char* k = argv[i];
    const char* v = argv[i + 1];
    if (strcmp(k, "--data-dir") == 0)
      o->data_dir = v;
    else if (strcmp(k, "--model") == 0)
      o->model = v;
    else if (strcmp(k, "--batch") == 0)
      o->batch = atoi(v);
    else if (strcmp(k, "--graph") == 0)
      o->graph = atoi(v);
    else if (strcmp(k, "--warmup") == 0)
      o->warmup = atoi(v);
    else if (strcmp(k, "--steps") == 0)
      o->steps = atoi(v);
    else if (strcmp(k, "--device") == 0)
      o->device = atoi(v);
    else if (strcmp(k, "--epochs") == 0)
      o->epochs = atoi(v);
    else if (strcmp(k, "--seed") == 0)
      o->seed = atoi(v);
    else
      return -1;
  }
  return argc % 2 == 1 && o->data_dir && o->batch > 0 && o->steps > 0 ? 0 : -1;
}

static double now(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

/* Trains o->epochs epochs as a worker of a one-worker job would, then evaluates. */
static int train_epochs(gpu_train* g, const options* o, int count) {
  char err[512];
  uint32_t* perm = malloc((size_t)count * sizeof *perm);
  int per_epoch = count / o->batch, rc = 0;
  gpu_step_result last;
  double t0 = now();
  for (int e = 0; e < o->epochs && rc == 0; e++) {
    zn_data_permutation(perm, (uint32_t)count, (uint64_t)o->seed, e);
    rc = gpu_train_start_epoch(g, perm, count, 0, err, sizeof err);
    for (int s = 0; s < per_epoch && rc == 0; s++) {
      rc = gpu_train_queue_step(g, 0, err, sizeof err);
      while (rc == 0 && gpu_train_in_flight(g) > (s + 1 < per_epoch ? 1 : 0))
        rc = gpu_train_next_result(g, &last, err, sizeof err);
    }
  }
  double train_s = now() - t0, loss = 0, acc = 0;
  if (rc == 0) rc = gpu_train_evaluate(g, &loss, &acc, err, sizeof err);
  free(perm);
  if (rc != 0) {
    fprintf(stderr, "bench_gpu_train: %s\n", err);
    return 1;
  }
  printf(
      "zenith_gpu test_accuracy=%.4f test_loss=%.4f epochs=%d seed=%d steps=%lld "
      "train_seconds=%.1f lr=%.5f model=%s graph=%d\n",
      acc, loss, o->epochs, o->seed, (long long)last.state.step, train_s, last.state.lr, o->model,
      o->graph);
  return 0;
}

/* Runs `steps` steps, keeping one in flight; the epoch restarts whenever it runs out. */
static int run_steps(gpu_train* g, const uint32_t* perm, int count, int batch, int steps,
                     gpu_step_result* last) {
  char err[512] = "";
  int per_epoch = count / batch;
  if (steps <= 0) return 0; /* --warmup 0 */
  for (int s = 0; s < steps; s++) {
    if (s % per_epoch == 0 && gpu_train_start_epoch(g, perm, count, 0, err, sizeof err) != 0) break;
    if (gpu_train_queue_step(g, 0, err, sizeof err) != 0) break;
    if (gpu_train_in_flight(g) > 1 && gpu_train_next_result(g, last, err, sizeof err) != 0) break;
    if (s + 1 == steps) {
      int rc = 0;
      while (rc == 0 && gpu_train_in_flight(g) > 0)
        rc = gpu_train_next_result(g, last, err, sizeof err);
      if (rc == 0) return 0;
      break;
    }
  }
  fprintf(stderr, "bench_gpu_train: %s\n", err);
  return 1;
}

static int time_steps(gpu_train* g, const options* o, const uint32_t* perm, int count) {
  gpu_step_result last;
  int rc = run_steps(g, perm, count, o->batch, o->warmup, &last);
  double t0 = now();
  if (rc == 0) rc = run_steps(g, perm, count, o->batch, o->steps, &last);
  double dt = now() - t0;
  if (rc == 0)
    printf("zenith_gpu images_per_s=%.1f graph=%d batch=%d steps=%d model=%s loss=%.4f lr=%.5f\n",
           (double)o->batch * o->steps / dt, o->graph, o->batch, o->steps, o->model, last.loss,
           last.state.lr);
  return rc;
}

int main(int argc, char** argv) {
  options o = {.model = "cnn", .batch = 128, .graph = 1, .warmup = 20, .steps = 500, .seed = 1};
  if (parse(argc, argv, &o) != 0) {
    fprintf(stderr,
            "usage: bench_gpu_train --data-dir DIR [--model cnn|mlp] [--batch N] [--graph 0|1] "
            "[--warmup W] [--steps S] [--device D] [--epochs E --seed S]\n");
    return 2;
  }
  char err[512];
  zn_dataset train = {0}, test = {0};
  if (zn_dataset_load(o.data_dir, 1, &train, err, sizeof err) != 0 ||
      zn_dataset_load(o.data_dir, 0, &test, err, sizeof err) != 0) {
    fprintf(stderr, "bench_gpu_train: %s\n", err);
    return 1;
  }
  uint32_t* perm = malloc((size_t)train.count * sizeof *perm);
  zn_data_permutation(perm, (uint32_t)train.count, 1, 0);

  zn_zenith_params params;
  zn_zenith_params_default(&params);
  gpu_train_config cfg = {o.model, o.device, 0, 1, o.batch, &params, (uint64_t)o.seed, o.graph};
  gpu_train* g;
  if (gpu_train_create(&cfg, &train, &test, &g, err, sizeof err) != 0) {
    fprintf(stderr, "bench_gpu_train: %s\n", err);
    return 1;
  }
  int rc = o.epochs > 0 ? train_epochs(g, &o, train.count) : time_steps(g, &o, perm, train.count);
  gpu_train_destroy(g);
  free(perm);
  zn_dataset_free(&train);
  zn_dataset_free(&test);
  return rc;
}
