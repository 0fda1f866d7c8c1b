/* Training throughput of a zn_model on one worker: a fixed random batch, a few warm-up steps,
 * then a timed run of forward, backward and an SGD-with-momentum update, the same work the
 * PyTorch side (bench_train_torch.py) times. Prints one line, `zenith images_per_s=<x> ...`,
 * for bench_train.sh to read.
 *
 * usage: bench_train [--model cnn|mlp] [--batch 128] [--threads 2] [--warmup 10] [--steps 100] */
#define _POSIX_C_SOURCE 200809L /* clock_gettime */

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "zn_model.h"
#include "zn_rng.h"

typedef struct {
  const char* model;
  int batch, threads, warmup, steps;
} options;

static int parse(int argc, char** argv, options* o) {
  for (int i = 1; i + 1 < argc; i += 2) {
    const char* k = argv[i];
    const char* v = argv[i + 1];
    if (strcmp(k, "--model") == 0)
      o->model = v;
    else if (strcmp(k, "--batch") == 0)
      o->batch = atoi(v);
    else if (strcmp(k, "--threads") == 0)
      o->threads = atoi(v);
    else if (strcmp(k, "--warmup") == 0)
      o->warmup = atoi(v);
    else if (strcmp(k, "--steps") == 0)
      o->steps = atoi(v);
    else
      return -1;
  }
  return argc % 2 == 1 && o->batch > 0 && o->threads > 0 && o->steps > 0 ? 0 : -1;
}

static double now(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

/* v = mu v + g; w -= lr v: torch.optim.SGD's momentum step without dampening. */
static void sgd_step(float* w, const float* g, float* v, size_t n) {
  const float lr = 0.01f, mu = 0.9f;
  for (size_t i = 0; i < n; i++) {
    v[i] = mu * v[i] + g[i];
    w[i] -= lr * v[i];
  }
}

int main(int argc, char** argv) {
  options o = {.model = "cnn", .batch = 128, .threads = 2, .warmup = 10, .steps = 100};
  if (parse(argc, argv, &o) != 0) {
    fprintf(stderr,
            "usage: bench_train [--model cnn|mlp] [--batch N] [--threads T] "
            "[--warmup W] [--steps S]\n");
    return 2;
  }

  zn_model* m = NULL;
  if (zn_model_create(o.model, o.batch, &m) != 0) {
    fprintf(stderr, "bench_train: cannot create model %s\n", o.model);
    return 1;
  }
  zn_model_set_threads(o.threads);
  zn_model_init(m, 1);

  size_t np = zn_model_num_params(m);
  float* v = calloc(np, sizeof(float));
  float* x = malloc(sizeof(float) * (size_t)o.batch * 784);
  uint8_t* y = malloc((size_t)o.batch);
  zn_rng rng;
  zn_rng_seed(&rng, 2);
  for (size_t i = 0; i < (size_t)o.batch * 784; i++) x[i] = zn_rng_uniform(&rng, 0.0f, 1.0f);
  for (int i = 0; i < o.batch; i++) y[i] = (uint8_t)zn_rng_below(&rng, 10);

  float loss = 0.0f;
  double t0 = 0.0;
  for (int s = 0; s < o.warmup + o.steps; s++) {
    if (s == o.warmup) t0 = now();
    loss = zn_model_train_batch(m, x, y, o.batch, NULL);
    sgd_step(zn_model_params(m), zn_model_grads(m), v, np);
  }
  double dt = now() - t0;

  printf("zenith images_per_s=%.1f threads=%d batch=%d steps=%d model=%s final_loss=%.4f\n",
         (double)o.batch * o.steps / dt, o.threads, o.batch, o.steps, o.model, loss);
  free(v), free(x), free(y);
  zn_model_destroy(m);
  return 0;
}
