/* GPU checks of the GPU model (daemon/worker/zn_gpu_model.h) against the CPU model (zn_model.h),
 * run by tests/gpu/run.sh on a machine with an NVIDIA GPU (never by ctest: CI has no GPU).
 *
 * For each model (mlp, cnn) and batch size (64, and an odd 37) the CPU model is initialised with
 * zn_model_init, its parameter buffer is uploaded to the GPU model byte for byte, and both run on
 * the same random batch (images U[0, 1), labels U{0..9}). One line per check, with the measured
 * error and its bound:
 *   parameters     downloaded again: bitwise equal to what was uploaded
 *   loss           |gpu - cpu| / |cpu|                                  <= 1e-5
 *   gradient       max |g_gpu - g_cpu| / max |g_cpu| over the buffer    <= 1e-4
 *                  and over each tensor, relative to its own maximum    <= 1e-4
 *   determinism    a second train_batch: bitwise equal gradient and loss
 *   eval sums      the loss sum: relative error                         <= 1e-5
 *                  the correct count: equal
 * Why these bounds: both sides compute in float32 with float32 accumulation, in different orders
 * (OpenBLAS over im2col here, cuBLAS and cuDNN there). The longest sums (a weight gradient over
 * n * 784 terms) keep about 1e-5 relative accuracy, ten times inside the gradient bound, and the
 * loss is a double computation over logits that agree to about 1e-6. TF32 tensor cores (10-bit
 * mantissas) would miss these bounds by two orders of magnitude.
 *
 * Decision margins. ReLU, max pooling and argmax are discontinuous: a value within rounding of a
 * decision's boundary (a pre-activation next to 0, two pooling candidates or the two top logits
 * nearly equal) may legitimately be decided one way here and the other way there, and a single
 * such flip moves a gradient sum by a whole term, far beyond the bound. So every batch first goes
 * through a float64 reference forward pass that carries, with each value, an estimate of its
 * float32 rounding error (the variance of a sequential sum's rounding, u^2 times the sum of the
 * squared partial sums, plus the inputs' errors carried through the weights). Each decision's
 * margin is measured in standard deviations of the difference of two such independent errors;
 * a batch with a decision closer than MIN_MARGIN of them is replaced by the next data seed's (the
 * line says so). The error estimate is conservative and at 6 deviations a flip's odds are below
 * 1e-9, so the comparison never hinges on a coin toss. */
#include <cuda_runtime.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "check_cuda.h"
#include "zn_err.h"
#include "zn_gpu_model.h"
#include "zn_model.h"
#include "zn_rng.h"

enum { IMG = 28 * 28, CLASSES = 10, MAX_BATCH = 64, MAX_SEEDS = 200 };

#define PARAM_SEED 20240607u
#define LOSS_BOUND 1e-5
#define GRAD_BOUND 1e-4
#define EVAL_BOUND 1e-5
#define MIN_MARGIN 6.0
#define UNIT_ROUNDOFF 0x1p-24

static int failures;

static const char* verdict(int ok) {
  if (!ok) failures++;
  return ok ? "ok" : "FAILED";
}

/* ---------------------------------------------------------------- the float64 reference */

/* A value of the reference pass and the variance of its float32 rounding error. */
typedef struct {
  double v, var;
} est;

/* The closest decision seen so far, in deviations, and where it was. */
typedef struct {
  double sigmas;
  char where[96];
} margin;

/* |a - b| in deviations of the difference of the two sides' errors (each side's error in a
 * and in b: variance 2 (var_a + var_b)). */
static double deviations(est a, est b) {
  double sd = sqrt(2.0 * (a.var + b.var)), gap = fabs(a.v - b.v);
  if (sd == 0.0) return gap == 0.0 ? 0.0 : INFINITY;
  return gap / sd;
}

static void note(margin* m, double sigmas, const char* layer, int image, int index) {
  if (sigmas >= m->sigmas) return;
  m->sigmas = sigmas;
  snprintf(m->where, sizeof m->where, "%s, image %d, index %d", layer, image, index);
}

/* b + sum of w[i] x[i], accumulated as a sequential float32 sum would be, for its error. */
typedef struct {
  double sum, partial_squares, carried;
} dot;

static dot dot_start(double b) {
  return (dot){b, b * b, 0.0};
}

static void dot_add(dot* d, double w, est x) {
  d->sum += w * x.v;
  d->partial_squares += d->sum * d->sum;
  d->carried += w * w * x.var;
}

static est dot_end(const dot* d) {
  return (est){d->sum, UNIT_ROUNDOFF * UNIT_ROUNDOFF * d->partial_squares + d->carried};
}

/* y[o] = b[o] + w[o] . x for a Linear layer; with relu, each pre-activation's distance from 0
 * is a decision, and y = max(y, 0). */
static void ref_linear(const est* x, int in, const float* w, const float* b, int out, int relu,
                       est* y, margin* m, const char* layer, int image) {
  for (int o = 0; o < out; o++) {
    dot d = dot_start(b[o]);
    for (int i = 0; i < in; i++) dot_add(&d, w[(size_t)o * in + i], x[i]);
    y[o] = dot_end(&d);
    if (!relu) continue;
    note(m, deviations(y[o], (est){0.0, 0.0}), layer, image, o);
    if (y[o].v <= 0.0) y[o] = (est){0.0, 0.0};
  }
}

/* One image's 3x3, padding 1 convolution with bias, x[cin][side][side] to y[cout][side][side]. */
static void ref_conv(const est* x, int cin, int side, const float* w, const float* b, int cout,
                     est* y) {
  for (int co = 0; co < cout; co++)
    for (int oh = 0; oh < side; oh++)
      for (int ow = 0; ow < side; ow++) {
        dot d = dot_start(b[co]);
        for (int ci = 0; ci < cin; ci++)
          for (int kh = 0; kh < 3; kh++)
            for (int kw = 0; kw < 3; kw++) {
              int ih = oh + kh - 1, iw = ow + kw - 1;
              if (ih < 0 || ih >= side || iw < 0 || iw >= side) continue;
              double wv = w[((co * cin + ci) * 3 + kh) * 3 + kw];
              dot_add(&d, wv, x[(ci * side + ih) * side + iw]);
            }
        y[(co * side + oh) * side + ow] = dot_end(&d);
      }
}

/* The decision of one 2x2 window of ReLU then max: which candidate wins, and whether the winner
 * is positive at all. Returns the pooled value. */
static est pool_window(const est* c[4], margin* m, const char* layer, int image, int index) {
  int top = 0;
  for (int q = 1; q < 4; q++)
    if (c[q]->v > c[top]->v) top = q;
  int second = top == 0 ? 1 : 0;
  for (int q = 0; q < 4; q++)
    if (q != top && c[q]->v > c[second]->v) second = q;

  est zero = {0.0, 0.0};
  double sigmas = deviations(*c[top], zero);
  if (c[top]->v > 0.0 && c[second]->v > 0.0) sigmas = fmin(sigmas, deviations(*c[top], *c[second]));
  note(m, sigmas, layer, image, index);
  return c[top]->v > 0.0 ? *c[top] : zero;
}

/* x[c][side][side] to y[c][side/2][side/2]: ReLU, then 2x2 max pooling. */
static void ref_pool(const est* x, int channels, int side, est* y, margin* m, const char* layer,
                     int image) {
  int half = side / 2;
  for (int c = 0; c < channels; c++)
    for (int ph = 0; ph < half; ph++)
      for (int pw = 0; pw < half; pw++) {
        const est* base = x + (c * side + 2 * ph) * side + 2 * pw;
        const est* cand[4] = {base, base + 1, base + side, base + side + 1};
        int at = (c * half + ph) * half + pw;
        y[at] = pool_window(cand, m, layer, image, at);
      }
}

/* The argmax decision: the gap between the two largest logits. */
static void ref_argmax(const est* z, margin* m, int image) {
  int top = 0, second = 1;
  for (int j = 1; j < CLASSES; j++)
    if (z[j].v > z[top].v) top = j;
  if (top == 1) second = 0;
  for (int j = 0; j < CLASSES; j++)
    if (j != top && z[j].v > z[second].v) second = j;
  note(m, deviations(z[top], z[second]), "argmax", image, top);
}

/* Scratch for one image of the reference pass. */
typedef struct {
  est *x, *c1, *p1, *c2, *p2, *h, *logits;
} ref_buffers;

static const float* tensor(zn_model* cpu, int i) {
  return zn_model_params(cpu) + zn_model_tensor_offset(cpu, i);
}

static void ref_mlp_image(zn_model* cpu, ref_buffers* b, margin* m, int image) {
  ref_linear(b->x, IMG, tensor(cpu, 0), tensor(cpu, 1), 256, 1, b->h, m, "1 (ReLU)", image);
  ref_linear(b->h, 256, tensor(cpu, 2), tensor(cpu, 3), CLASSES, 0, b->logits, m, "", image);
}

static void ref_cnn_image(zn_model* cpu, ref_buffers* b, margin* m, int image) {
  ref_conv(b->x, 1, 28, tensor(cpu, 0), tensor(cpu, 1), 32, b->c1);
  ref_pool(b->c1, 32, 28, b->p1, m, "0 (ReLU, pool)", image);
  ref_conv(b->p1, 32, 14, tensor(cpu, 2), tensor(cpu, 3), 64, b->c2);
  ref_pool(b->c2, 64, 14, b->p2, m, "3 (ReLU, pool)", image);
  ref_linear(b->p2, 3136, tensor(cpu, 4), tensor(cpu, 5), 128, 1, b->h, m, "7 (ReLU)", image);
  ref_linear(b->h, 128, tensor(cpu, 6), tensor(cpu, 7), CLASSES, 0, b->logits, m, "", image);
}

/* The closest decision of the batch, in deviations. */
static margin reference_margin(zn_model* cpu, int is_cnn, const float* x, int n) {
  ref_buffers b;
  est* arena = malloc(sizeof(est) * (IMG + 32 * 784 + 32 * 196 + 64 * 196 + 3136 + 256 + 16));
  if (!arena) {
    fprintf(stderr, "no memory for the reference pass\n");
    exit(1);
  }
  b.x = arena;
  b.c1 = b.x + IMG;
  b.p1 = b.c1 + 32 * 784;
  b.c2 = b.p1 + 32 * 196;
  b.p2 = b.c2 + 64 * 196;
  b.h = b.p2 + 3136;
  b.logits = b.h + 256;

  margin m = {INFINITY, ""};
  for (int i = 0; i < n; i++) {
    for (int p = 0; p < IMG; p++) b.x[p] = (est){x[(size_t)i * IMG + p], 0.0};
    if (is_cnn)
      ref_cnn_image(cpu, &b, &m, i);
    else
      ref_mlp_image(cpu, &b, &m, i);
    ref_argmax(b.logits, &m, i);
  }
  free(arena);
  return m;
}

/* ---------------------------------------------------------------- batches */

static void make_batch(uint64_t seed, int n, float* x, uint8_t* y) {
  zn_rng rng;
  zn_rng_seed(&rng, seed);
  for (size_t p = 0; p < (size_t)n * IMG; p++) x[p] = zn_rng_uniform(&rng, 0.0f, 1.0f);
  for (int i = 0; i < n; i++) y[i] = (uint8_t)zn_rng_below(&rng, CLASSES);
}

/* The first batch from seed on whose decisions are all at least MIN_MARGIN deviations from their
 * boundaries. Returns 0 if none of MAX_SEEDS is. */
static int pick_batch(zn_model* cpu, const char* name, int n, uint64_t seed, float* x, uint8_t* y) {
  int is_cnn = strcmp(name, "cnn") == 0;
  for (int tries = 0; tries < MAX_SEEDS; tries++, seed++) {
    make_batch(seed, n, x, y);
    margin m = reference_margin(cpu, is_cnn, x, n);
    if (m.sigmas >= MIN_MARGIN) {
      printf("%s n=%d: batch seed %llu, closest decision %.1f deviations from its boundary\n", name,
             n, (unsigned long long)seed, m.sigmas);
      return 1;
    }
    printf("%s n=%d: batch seed %llu skipped: a decision %.2f deviations from its boundary (%s)\n",
           name, n, (unsigned long long)seed, m.sigmas, m.where);
  }
  printf("FAIL %s n=%d: no batch among %d seeds keeps every decision %.0f deviations away\n", name,
         n, MAX_SEEDS, MIN_MARGIN);
  failures++;
  return 0;
}

/* ---------------------------------------------------------------- comparisons */

static double max_abs(const float* a, size_t count) {
  double m = 0.0;
  for (size_t i = 0; i < count; i++) m = fmax(m, fabs((double)a[i]));
  return m;
}

static double max_diff(const float* a, const float* b, size_t count) {
  double m = 0.0;
  for (size_t i = 0; i < count; i++) m = fmax(m, fabs((double)a[i] - (double)b[i]));
  return m;
}

static double relative(double got, double want) {
  return fabs(got - want) / (fabs(want) > 0.0 ? fabs(want) : 1.0);
}

/* The whole gradient, then each tensor against its own largest entry. */
static void compare_grads(zn_model* cpu, const char* what, const float* gpu, const float* ref) {
  size_t count = zn_model_num_params(cpu);
  double scale = max_abs(ref, count), err = max_diff(gpu, ref, count) / scale;
  int ok = err <= GRAD_BOUND;
  printf("%s gradient: max |gpu - cpu| / max |cpu| = %.3g (bound %.0e) %s\n", what, err, GRAD_BOUND,
         verdict(ok));
  for (int t = 0; t < zn_model_num_tensors(cpu); t++) {
    size_t at = zn_model_tensor_offset(cpu, t);
    size_t len =
        (t + 1 < zn_model_num_tensors(cpu) ? zn_model_tensor_offset(cpu, t + 1) : count) - at;
    double terr = max_diff(gpu + at, ref + at, len) / max_abs(ref + at, len);
    printf("  %s %s: %.3g (bound %.0e) %s\n", what, zn_model_tensor_name(cpu, t), terr, GRAD_BOUND,
           verdict(terr <= GRAD_BOUND));
  }
}

/* ---------------------------------------------------------------- one model */

typedef struct {
  const char* name;
  zn_model* cpu;
  zn_gpu_model* gpu;
  cudaStream_t stream;
  size_t nparams;
  float *x, *grads, *cpu_grads, *again; /* host */
  uint8_t* y;
  float *dx, *dloss; /* device */
  uint8_t* dy;
  double* dsums;
} bench;

/* Queues a GPU training batch and fetches its gradient and loss. 0 if the model failed. */
static int gpu_train(bench* b, int n, float* grads, float* loss) {
  if (zn_gpu_model_train_batch(b->gpu, b->dx, b->dy, n, b->dloss) != ZN_OK) {
    printf("FAIL %s n=%d: train_batch: %s\n", b->name, n, zn_gpu_model_error(b->gpu));
    failures++;
    return 0;
  }
  CHECK_CUDA(cudaStreamSynchronize(b->stream));
  CHECK_CUDA(cudaMemcpy(grads, zn_gpu_model_grads(b->gpu), b->nparams * sizeof(float),
                        cudaMemcpyDeviceToHost));
  CHECK_CUDA(cudaMemcpy(loss, b->dloss, sizeof(float), cudaMemcpyDeviceToHost));
  return 1;
}

static void check_train(bench* b, int n, const char* what) {
  float cpu_loss = zn_model_train_batch(b->cpu, b->x, b->y, n, NULL);
  memcpy(b->cpu_grads, zn_model_grads(b->cpu), b->nparams * sizeof(float));
  float loss, loss_again;
  if (!gpu_train(b, n, b->grads, &loss)) return;

  double err = relative(loss, cpu_loss);
  printf("%s loss: gpu %.9g cpu %.9g, relative error %.3g (bound %.0e) %s\n", what, loss, cpu_loss,
         err, LOSS_BOUND, verdict(err <= LOSS_BOUND));
  compare_grads(b->cpu, what, b->grads, b->cpu_grads);

  if (!gpu_train(b, n, b->again, &loss_again)) return;
  int same = memcmp(b->grads, b->again, b->nparams * sizeof(float)) == 0 &&
             memcmp(&loss, &loss_again, sizeof loss) == 0;
  printf("%s determinism: a second run's gradient and loss bitwise %s %s\n", what,
         same ? "equal" : "DIFFERENT", verdict(same));
}

static void check_eval(bench* b, int n, const char* what) {
  int cpu_correct = 0;
  double cpu_sum = zn_model_eval_batch(b->cpu, b->x, b->y, n, &cpu_correct);
  double sums[2];
  CHECK_CUDA(cudaMemsetAsync(b->dsums, 0, sizeof sums, b->stream));
  if (zn_gpu_model_eval_batch(b->gpu, b->dx, b->dy, n, b->dsums) != ZN_OK) {
    printf("FAIL %s: eval_batch: %s\n", what, zn_gpu_model_error(b->gpu));
    failures++;
    return;
  }
  CHECK_CUDA(cudaStreamSynchronize(b->stream));
  CHECK_CUDA(cudaMemcpy(sums, b->dsums, sizeof sums, cudaMemcpyDeviceToHost));

  double err = relative(sums[0], cpu_sum);
  printf("%s eval loss sum: gpu %.12g cpu %.12g, relative error %.3g (bound %.0e) %s\n", what,
         sums[0], cpu_sum, err, EVAL_BOUND, verdict(err <= EVAL_BOUND));
  printf("%s eval correct: gpu %.0f cpu %d (must be equal) %s\n", what, sums[1], cpu_correct,
         verdict(sums[1] == (double)cpu_correct));
}

static void check_batch(bench* b, int n, uint64_t seed) {
  char what[64];
  snprintf(what, sizeof what, "%s n=%d", b->name, n);
  if (!pick_batch(b->cpu, b->name, n, seed, b->x, b->y)) return;
  CHECK_CUDA(cudaMemcpy(b->dx, b->x, (size_t)n * IMG * sizeof(float), cudaMemcpyHostToDevice));
  CHECK_CUDA(cudaMemcpy(b->dy, b->y, (size_t)n, cudaMemcpyHostToDevice));
  check_train(b, n, what);
  check_eval(b, n, what);
}

static void check_params_round_trip(bench* b) {
  if (zn_gpu_model_set_params(b->gpu, zn_model_params(b->cpu)) != ZN_OK ||
      zn_gpu_model_get_params(b->gpu, b->again) != ZN_OK) {
    printf("FAIL %s: parameter copy: %s\n", b->name, zn_gpu_model_error(b->gpu));
    failures++;
    return;
  }
  int same = memcmp(b->again, zn_model_params(b->cpu), b->nparams * sizeof(float)) == 0;
  printf("%s parameters: %zu uploaded and downloaded again, bitwise %s %s\n", b->name, b->nparams,
         same ? "equal" : "DIFFERENT", verdict(same));
}

static int open_bench(bench* b, const char* name, cudaStream_t stream) {
  memset(b, 0, sizeof *b);
  b->name = name;
  b->stream = stream;
  if (zn_model_create(name, MAX_BATCH, &b->cpu) != ZN_OK) {
    printf("FAIL %s: zn_model_create\n", name);
    return 0;
  }
  zn_model_init(b->cpu, PARAM_SEED);
  char err[512];
  if (zn_gpu_model_create(name, MAX_BATCH, 0, stream, &b->gpu, err, sizeof err) != ZN_OK) {
    printf("FAIL %s: zn_gpu_model_create: %s\n", name, err);
    return 0;
  }
  b->nparams = zn_model_num_params(b->cpu);
  if (zn_gpu_model_num_params(b->gpu) != b->nparams) {
    printf("FAIL %s: %zu parameters on the GPU, %zu on the CPU\n", name,
           zn_gpu_model_num_params(b->gpu), b->nparams);
    return 0;
  }
  b->x = malloc((size_t)MAX_BATCH * IMG * sizeof(float));
  b->y = malloc(MAX_BATCH);
  b->grads = malloc(b->nparams * sizeof(float));
  b->cpu_grads = malloc(b->nparams * sizeof(float));
  b->again = malloc(b->nparams * sizeof(float));
  if (!b->x || !b->y || !b->grads || !b->cpu_grads || !b->again) {
    printf("FAIL %s: no host memory\n", name);
    return 0;
  }
  CHECK_CUDA(cudaMalloc((void**)&b->dx, (size_t)MAX_BATCH * IMG * sizeof(float)));
  CHECK_CUDA(cudaMalloc((void**)&b->dy, MAX_BATCH));
  CHECK_CUDA(cudaMalloc((void**)&b->dloss, sizeof(float)));
  CHECK_CUDA(cudaMalloc((void**)&b->dsums, 2 * sizeof(double)));
  return 1;
}

static void close_bench(bench* b) {
  zn_gpu_model_destroy(b->gpu);
  zn_model_destroy(b->cpu);
  cudaFree(b->dx);
  cudaFree(b->dy);
  cudaFree(b->dloss);
  cudaFree(b->dsums);
  free(b->x);
  free(b->y);
  free(b->grads);
  free(b->cpu_grads);
  free(b->again);
}

/* The batches start from seeds whose decisions were found far enough from their boundaries; the
 * search in pick_batch only runs on if the parameters or the data drawing change. */
static void check_model(const char* name, uint64_t seed_full, uint64_t seed_odd,
                        cudaStream_t stream) {
  bench b;
  if (open_bench(&b, name, stream)) {
    check_params_round_trip(&b);
    check_batch(&b, MAX_BATCH, seed_full);
    check_batch(&b, 37, seed_odd);
  } else {
    failures++;
  }
  close_bench(&b);
}

int main(void) {
  /* One CPU thread: the CPU model's gradient is then a single shard's, summed in one order. */
  zn_model_set_threads(1);
  cudaStream_t stream;
  CHECK_CUDA(cudaStreamCreate(&stream));
  check_model("mlp", 1, 1001, stream);
  check_model("cnn", 5044, 6003, stream);
  CHECK_CUDA(cudaStreamDestroy(stream));
  printf("%s\n", failures ? "GPU model checks FAILED" : "GPU model checks passed");
  return failures ? 1 : 0;
}
