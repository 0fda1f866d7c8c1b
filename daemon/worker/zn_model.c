/* The mlp and cnn models (see zn_model.h): a table of parameter tensors per model, one flat
 * parameter buffer and one flat gradient buffer, and per-thread activation buffers allocated up
 * front so a training step allocates nothing.
 *
 * Threads. A batch is split into one contiguous shard of images per thread; each thread runs the
 * whole forward and backward pass on its shard with single-threaded OpenBLAS, and the shards'
 * gradients are summed at the end in shard order. Splitting the batch rather than each GEMM
 * lets the im2col, pooling and col2im passes run in parallel too, and keeps every GEMM large.
 * Each shard scales its loss gradient by its share of the batch, so the sum is the gradient of
 * the mean over the whole batch. The summation order, hence the last bits of the gradient,
 * depends on the thread count; for a given count every run is bit-for-bit the same.
 *
 * Chunks. Within a shard the cnn's convolutions run CHUNK images at a time, so the im2col
 * columns, the convolution output and the column gradient of a chunk (about 2.5 MB) stay in
 * cache between the GEMM and the pass that consumes them. Only the pooled outputs, their
 * argmax and the small dense layers' activations are kept for the whole shard; the backward
 * pass rebuilds each chunk's columns, which is cheaper than writing and re-reading all of them.
 *
 * Layouts. The convolutions order their output pixels by pooling phase (zn_layers.h), so the
 * pooling that follows each one is an elementwise pass; the first pooling writes [32][c][14][14]
 * per chunk for the second convolution, and the second writes NCHW rows, the order PyTorch's
 * flatten feeds the first Linear layer. Each convolution's bias and ReLU are applied in that
 * pooling pass, the only pass that reads the GEMM output. */
#include "zn_model.h"

#include <assert.h>
#include <math.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

#include <cblas.h>

#include "zn_err.h"
#include "zn_layers.h"
#include "zn_model_layout.h"

enum { MAX_TENSORS = 8, IMG = 28 * 28, CLASSES = 10, ALIGN = 64, CHUNK = 8, MAX_THREADS = 64 };

typedef enum { MODEL_MLP, MODEL_CNN } model_kind;

/* One thread's buffers for up to cap images. mlp uses h, dh, logits and dlogits. */
typedef struct {
  float *h, *dh, *logits, *dlogits;
  float *p1, *p2, *dp2;    /* pooled outputs kept from forward to backward, and dp2 */
  uint8_t *arg1, *arg2;    /* their argmax */
  float *col, *conv, *dp1; /* one chunk's scratch */
  float* grads;            /* this shard's gradients (shard 0 writes the model's own buffer) */
  void* arena;
} shard;

struct zn_model {
  model_kind kind;
  int max_batch;
  const zn_model_layout* layout;
  size_t offset[MAX_TENSORS];
  size_t nparams;
  float* params;
  float* grads;
  shard* shards;
  int nshards;
};

static atomic_int model_threads = 1;

static size_t round_up(size_t bytes) {
  return (bytes + ALIGN - 1) / ALIGN * ALIGN;
}

/* Lays a shard's buffers for cap images out in one arena; with base NULL it only sizes them.
 * Returns the arena's size in bytes. */
static size_t carve(const zn_model* m, size_t cap, char* base, shard* sh) {
  size_t at = 0;
#define TAKE(field, type, count)                  \
  do {                                            \
    sh->field = base ? (type*)(base + at) : NULL; \
    at += round_up(sizeof(type) * (count));       \
  } while (0)
  size_t hidden = m->kind == MODEL_MLP ? 256 : 128;
  TAKE(h, float, cap* hidden);
  TAKE(dh, float, cap* hidden);
  TAKE(logits, float, cap* CLASSES);
  TAKE(dlogits, float, cap* CLASSES);
  if (m->kind == MODEL_CNN) {
    TAKE(p1, float, cap * 32 * 196);
    TAKE(arg1, uint8_t, cap * 32 * 196);
    TAKE(p2, float, cap * 3136);
    TAKE(dp2, float, cap * 3136);
    TAKE(arg2, uint8_t, cap * 3136);
    TAKE(col, float, CHUNK * 288 * 196); /* >= 9 * 784, conv1's columns */
    TAKE(conv, float, CHUNK * 32 * 784); /* >= 64 * 196, conv2's output */
    TAKE(dp1, float, CHUNK * 32 * 196);
  }
#undef TAKE
  return at;
}

static void free_shards(zn_model* m) {
  for (int i = 0; i < m->nshards; i++) {
    free(m->shards[i].arena);
    if (i > 0) free(m->shards[i].grads);
  }
  free(m->shards);
  m->shards = NULL;
  m->nshards = 0;
}

/* (Re)builds n shards of ceil(max_batch / n) images each; on failure keeps what it had. */
static int make_shards(zn_model* m, int n) {
  shard* sh = calloc((size_t)n, sizeof(shard));
  if (!sh) return ZN_ERR_NOMEM;
  size_t cap = ((size_t)m->max_batch + n - 1) / n;
  size_t bytes = carve(m, cap, NULL, &sh[0]);
  size_t gbytes = round_up(sizeof(float) * m->nparams);

  int ok = 1;
  for (int i = 0; i < n && ok; i++) {
    sh[i].arena = aligned_alloc(ALIGN, bytes);
    sh[i].grads = i == 0 ? m->grads : aligned_alloc(ALIGN, gbytes);
    ok = sh[i].arena && sh[i].grads;
    if (ok) carve(m, cap, sh[i].arena, &sh[i]);
  }
  if (!ok) {
    for (int i = 0; i < n; i++) {
      free(sh[i].arena);
      if (i > 0) free(sh[i].grads);
    }
    free(sh);
    return ZN_ERR_NOMEM;
  }

  free_shards(m);
  m->shards = sh;
  m->nshards = n;
  return ZN_OK;
}

static int parse_kind(const char* name, model_kind* kind) {
  if (name && strcmp(name, "mlp") == 0) {
    *kind = MODEL_MLP;
    return ZN_OK;
  }
  if (name && strcmp(name, "cnn") == 0) {
    *kind = MODEL_CNN;
    return ZN_OK;
  }
  return ZN_ERR_INVALID;
}

int zn_model_create(const char* name, int max_batch, zn_model** out) {
  model_kind kind;
  *out = NULL;
  if (parse_kind(name, &kind) != ZN_OK || max_batch < 1) return ZN_ERR_INVALID;

  zn_model* m = calloc(1, sizeof(*m));
  if (!m) return ZN_ERR_NOMEM;
  m->kind = kind;
  m->max_batch = max_batch;
  m->layout = zn_model_layout_find(name);
  for (int i = 0; i < m->layout->ntensors; i++)
    m->offset[i] = zn_layout_tensor_offset(m->layout, i);
  m->nparams = zn_layout_num_params(m->layout);

  size_t pbytes = round_up(sizeof(float) * m->nparams);
  m->params = aligned_alloc(ALIGN, pbytes);
  m->grads = aligned_alloc(ALIGN, pbytes);
  if (!m->params || !m->grads || make_shards(m, 1) != ZN_OK) {
    zn_model_destroy(m);
    return ZN_ERR_NOMEM;
  }
  memset(m->params, 0, pbytes);
  memset(m->grads, 0, pbytes);
  *out = m;
  return ZN_OK;
}

/* Parameters and gradients move to buffers of `floats` floats, the tail zeroed. The
 * thread-private gradient buffers keep their size: they are summed over nparams only. */
int zn_model_reserve(zn_model* m, size_t floats) {
  if (floats <= m->nparams) return ZN_OK;
  size_t bytes = round_up(sizeof(float) * floats);
  float* params = aligned_alloc(ALIGN, bytes);
  float* grads = aligned_alloc(ALIGN, bytes);
  if (!params || !grads) {
    free(params);
    free(grads);
    return ZN_ERR_NOMEM;
  }
  memset(params, 0, bytes);
  memset(grads, 0, bytes);
  memcpy(params, m->params, sizeof(float) * m->nparams);
  memcpy(grads, m->grads, sizeof(float) * m->nparams);
  free(m->params);
  free(m->grads);
  m->params = params;
  m->grads = grads;
  if (m->nshards > 0) m->shards[0].grads = grads; /* shard 0 writes the model's own buffer */
  return ZN_OK;
}

void zn_model_destroy(zn_model* m) {
  if (!m) return;
  free_shards(m);
  free(m->params);
  free(m->grads);
  free(m);
}

size_t zn_model_num_params(const zn_model* m) {
  return m->nparams;
}

float* zn_model_params(zn_model* m) {
  return m->params;
}

float* zn_model_grads(zn_model* m) {
  return m->grads;
}

int zn_model_max_batch(const zn_model* m) {
  return m->max_batch;
}

void zn_model_init(zn_model* m, uint64_t seed) {
  zn_layout_init(m->layout, m->params, seed);
}

/* Parameter tensor i, and its gradient in a shard's buffer. */
static const float* P(const zn_model* m, int i) {
  return m->params + m->offset[i];
}

static float* G(const zn_model* m, const shard* sh, int i) {
  return sh->grads + m->offset[i];
}

/* ---- mlp ---- */

static const float* mlp_forward(const zn_model* m, shard* sh, const float* x, int n) {
  zn_linear_forward(x, P(m, 0), P(m, 1), sh->h, n, 784, 256);
  zn_relu_forward(sh->h, sh->h, (size_t)n * 256);
  zn_linear_forward(sh->h, P(m, 2), P(m, 3), sh->logits, n, 256, CLASSES);
  return sh->logits;
}

static void mlp_backward(const zn_model* m, shard* sh, const float* x, int n) {
  zn_linear_backward(sh->h, P(m, 2), sh->dlogits, sh->dh, G(m, sh, 2), G(m, sh, 3), n, 256,
                     CLASSES);
  zn_relu_backward(sh->h, sh->dh, sh->dh, (size_t)n * 256);
  zn_linear_backward(x, P(m, 0), sh->dh, NULL, G(m, sh, 0), G(m, sh, 1), n, 784, 256);
}

/* ---- cnn ---- */

static zn_conv2d_shape conv1_shape(int c) {
  return (zn_conv2d_shape){
      .n = c, .cin = 1, .h = 28, .w = 28, .cout = 32, .k = 3, .pad = 1, .phases = 1};
}

static zn_conv2d_shape conv2_shape(int c) {
  return (zn_conv2d_shape){
      .n = c, .cin = 32, .h = 14, .w = 14, .cout = 64, .k = 3, .pad = 1, .phases = 1};
}

static zn_pool_shape pool1_shape(int c) {
  return (zn_pool_shape){.c = 32, .n = c, .h = 28, .w = 28, .relu = 1, .in_phases = 1};
}

static zn_pool_shape pool2_shape(int c) {
  return (zn_pool_shape){
      .c = 64, .n = c, .h = 14, .w = 14, .relu = 1, .out_nchw = 1, .in_phases = 1};
}

/* Both convolutions and poolings for images [at, at + c) of the shard. */
static void cnn_chunk_forward(const zn_model* m, shard* sh, const float* x, int at, int c) {
  zn_conv2d_shape c1 = conv1_shape(c), c2 = conv2_shape(c);
  zn_pool_shape q1 = pool1_shape(c), q2 = pool2_shape(c);
  float* p1 = sh->p1 + (size_t)at * 32 * 196;
  uint8_t* arg1 = sh->arg1 + (size_t)at * 32 * 196;

  zn_conv2d_forward(&c1, x + (size_t)at * IMG, P(m, 0), NULL, sh->col, sh->conv);
  zn_maxpool2_forward(&q1, sh->conv, P(m, 1), p1, arg1);
  zn_conv2d_forward(&c2, p1, P(m, 2), NULL, sh->col, sh->conv);
  zn_maxpool2_forward(&q2, sh->conv, P(m, 3), sh->p2 + (size_t)at * 3136,
                      sh->arg2 + (size_t)at * 3136);
}

/* The chunk's convolution gradients, added to the shard's when acc is set. */
static void cnn_chunk_backward(const zn_model* m, shard* sh, const float* x, int at, int c,
                               int acc) {
  zn_conv2d_shape c1 = conv1_shape(c), c2 = conv2_shape(c);
  zn_pool_shape q1 = pool1_shape(c), q2 = pool2_shape(c);
  const float* p1 = sh->p1 + (size_t)at * 32 * 196;
  const uint8_t* arg1 = sh->arg1 + (size_t)at * 32 * 196;
  size_t r2 = (size_t)at * 3136;

  zn_maxpool2_backward(&q2, sh->dp2 + r2, sh->p2 + r2, sh->arg2 + r2, sh->conv, G(m, sh, 3), acc);
  zn_im2col(&c2, p1, sh->col);
  zn_conv2d_backward(&c2, P(m, 2), sh->conv, sh->col, sh->dp1, G(m, sh, 2), NULL, acc);
  zn_maxpool2_backward(&q1, sh->dp1, p1, arg1, sh->conv, G(m, sh, 1), acc);
  zn_im2col(&c1, x + (size_t)at * IMG, sh->col);
  zn_conv2d_backward(&c1, P(m, 0), sh->conv, sh->col, NULL, G(m, sh, 0), NULL, acc);
}

static const float* cnn_forward(const zn_model* m, shard* sh, const float* x, int n) {
  for (int at = 0; at < n; at += CHUNK)
    cnn_chunk_forward(m, sh, x, at, n - at < CHUNK ? n - at : CHUNK);
  zn_linear_forward(sh->p2, P(m, 4), P(m, 5), sh->h, n, 3136, 128);
  zn_relu_forward(sh->h, sh->h, (size_t)n * 128);
  zn_linear_forward(sh->h, P(m, 6), P(m, 7), sh->logits, n, 128, CLASSES);
  return sh->logits;
}

static void cnn_backward(const zn_model* m, shard* sh, const float* x, int n) {
  zn_linear_backward(sh->h, P(m, 6), sh->dlogits, sh->dh, G(m, sh, 6), G(m, sh, 7), n, 128,
                     CLASSES);
  zn_relu_backward(sh->h, sh->dh, sh->dh, (size_t)n * 128);
  zn_linear_backward(sh->p2, P(m, 4), sh->dh, sh->dp2, G(m, sh, 4), G(m, sh, 5), n, 3136, 128);
  for (int at = 0; at < n; at += CHUNK)
    cnn_chunk_backward(m, sh, x, at, n - at < CHUNK ? n - at : CHUNK, at > 0);
}

/* ---- one shard's work, run on its own thread ---- */

typedef struct {
  const zn_model* m;
  shard* sh;
  const float* x;
  const uint8_t* y;
  int n;       /* images in this shard */
  int total;   /* images in the whole batch */
  int train;   /* forward and backward, or forward only */
  double loss; /* mean over the shard's images */
  int correct;
} job;

static void* run_job(void* arg) {
  job* j = arg;
  const zn_model* m = j->m;
  const float* logits =
      m->kind == MODEL_MLP ? mlp_forward(m, j->sh, j->x, j->n) : cnn_forward(m, j->sh, j->x, j->n);
  float* dlogits = j->train ? j->sh->dlogits : NULL;
  j->loss = zn_softmax_xent(logits, j->y, j->n, CLASSES, dlogits, &j->correct);
  if (!j->train) return NULL;

  /* d(shard mean)/d(logits) times n/total is the shard's part of d(batch mean)/d(logits). */
  float share = (float)j->n / (float)j->total;
  for (int i = 0; i < j->n * CLASSES; i++) dlogits[i] *= share;
  if (m->kind == MODEL_MLP)
    mlp_backward(m, j->sh, j->x, j->n);
  else
    cnn_backward(m, j->sh, j->x, j->n);
  return NULL;
}

/* Splits n <= max_batch images over the shards, runs them, and returns the shards' summed
 * losses (each shard's mean times its count). The caller's thread runs shard 0. */
static double run_batch(zn_model* m, const float* x, const uint8_t* y, int n, int train,
                        int* correct) {
  int want = atomic_load(&model_threads);
  if (want > MAX_THREADS) want = MAX_THREADS;
  if (want != m->nshards) make_shards(m, want);
  int t = n < m->nshards ? n : m->nshards;

  job jobs[MAX_THREADS];
  pthread_t tid[MAX_THREADS];
  int started[MAX_THREADS] = {0};
  for (int s = 0; s < t; s++) {
    int lo = (int)((long)s * n / t), hi = (int)((long)(s + 1) * n / t);
    jobs[s] = (job){.m = m,
                    .sh = &m->shards[s],
                    .x = x + (size_t)lo * IMG,
                    .y = y + lo,
                    .n = hi - lo,
                    .total = n,
                    .train = train};
  }
  for (int s = 1; s < t; s++) started[s] = pthread_create(&tid[s], NULL, run_job, &jobs[s]) == 0;
  run_job(&jobs[0]);
  for (int s = 1; s < t; s++) {
    if (started[s])
      pthread_join(tid[s], NULL);
    else
      run_job(&jobs[s]); /* no thread to be had: run it here instead */
  }

  double total = 0.0;
  int right = 0;
  for (int s = 0; s < t; s++) {
    total += jobs[s].loss * jobs[s].n;
    right += jobs[s].correct;
    if (!train || s == 0) continue;
    const float* g = m->shards[s].grads;
    for (size_t i = 0; i < m->nparams; i++) m->grads[i] += g[i];
  }
  if (correct) *correct = right;
  return total;
}

float zn_model_train_batch(zn_model* m, const float* x, const uint8_t* y, int n, int* correct) {
  assert(n >= 1 && n <= m->max_batch);
  return (float)(run_batch(m, x, y, n, 1, correct) / n);
}

double zn_model_eval_batch(zn_model* m, const float* x, const uint8_t* y, int n, int* correct) {
  double total = 0.0;
  int right = 0;
  for (int at = 0; at < n; at += m->max_batch) {
    int b = n - at < m->max_batch ? n - at : m->max_batch;
    int ok = 0;
    total += run_batch(m, x + (size_t)at * IMG, y + at, b, 0, &ok);
    right += ok;
  }
  if (correct) *correct = right;
  return total;
}

int zn_model_num_tensors(const zn_model* m) {
  return m->layout->ntensors;
}

const char* zn_model_tensor_name(const zn_model* m, int i) {
  return m->layout->tensors[i].name;
}

void zn_model_tensor_shape(const zn_model* m, int i, int* ndim, int shape[4]) {
  const zn_tensor_spec* t = &m->layout->tensors[i];
  *ndim = t->ndim;
  for (int d = 0; d < 4; d++) shape[d] = d < *ndim ? t->shape[d] : 1;
}

size_t zn_model_tensor_offset(const zn_model* m, int i) {
  return m->offset[i];
}

void zn_model_set_threads(int n) {
  atomic_store(&model_threads, n < 1 ? 1 : n > MAX_THREADS ? MAX_THREADS : n);
  openblas_set_num_threads(1);
}
