/* The mlp and cnn models (see zn_model.h): a table of parameter tensors per model, one flat
 * parameter buffer and one flat gradient buffer, and the activation buffers of a max_batch batch,
 * all allocated once at creation so a training step allocates nothing.
 *
 * The cnn keeps its convolution activations channel-major ([c][n][h][w], see zn_layers.h) so each
 * convolution is one GEMM over the whole batch. Each convolution's bias and ReLU are applied in
 * the pooling pass that follows it, the only pass that reads the GEMM output, and the second
 * pooling writes NCHW, the order PyTorch's flatten feeds the first Linear layer. The convolution
 * outputs are scratch: the backward pass reuses them for their own gradients. */
#include "zn_model.h"

#include <assert.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include <cblas.h>

#include "zn_err.h"
#include "zn_layers.h"
#include "zn_rng.h"

enum { MAX_TENSORS = 8, IMG = 28, CLASSES = 10, ALIGN = 64 };

typedef struct {
  const char* name;
  int ndim;
  int shape[4];
  int fan_in; /* of the layer the tensor belongs to: sets its initialisation bound */
} tensor_spec;

static const tensor_spec mlp_spec[] = {
    {"1.weight", 2, {256, 784}, 784}, {"1.bias", 1, {256}, 784},
    {"3.weight", 2, {10, 256}, 256},  {"3.bias", 1, {10}, 256},
};

static const tensor_spec cnn_spec[] = {
    {"0.weight", 4, {32, 1, 3, 3}, 9},     {"0.bias", 1, {32}, 9},
    {"3.weight", 4, {64, 32, 3, 3}, 288},  {"3.bias", 1, {64}, 288},
    {"7.weight", 2, {128, 3136}, 3136},    {"7.bias", 1, {128}, 3136},
    {"9.weight", 2, {10, 128}, 128},       {"9.bias", 1, {10}, 128},
};

typedef enum { MODEL_MLP, MODEL_CNN } model_kind;

/* Activations of one batch. mlp uses h, dh, logits, dlogits; cnn uses all of them. */
typedef struct {
  float *col1, *a1, *p1, *dp1, *col2, *a2, *p2, *dp2;
  uint8_t *arg1, *arg2;
  float *h, *dh, *logits, *dlogits;
} activations;

struct zn_model {
  model_kind kind;
  int max_batch;
  const tensor_spec* spec;
  int ntensors;
  size_t offset[MAX_TENSORS];
  size_t nparams;
  float* params;
  float* grads;
  activations act;
  void* arena; /* every activation buffer, carved from one allocation */
};

static size_t tensor_count(const tensor_spec* t) {
  size_t c = 1;
  for (int d = 0; d < t->ndim; d++) c *= (size_t)t->shape[d];
  return c;
}

static size_t round_up(size_t bytes) {
  return (bytes + ALIGN - 1) / ALIGN * ALIGN;
}

/* Lays the activation buffers of a batch of b out in one arena; with base NULL it only sizes
 * them. Returns the arena's size in bytes. */
static size_t carve(model_kind kind, size_t b, char* base, activations* a) {
  size_t at = 0;
#define TAKE(field, type, count)                                      \
  do {                                                                \
    a->field = base ? (type*)(base + at) : NULL;                      \
    at += round_up(sizeof(type) * (count));                           \
  } while (0)
  size_t hidden = kind == MODEL_MLP ? 256 : 128;
  TAKE(h, float, b * hidden);
  TAKE(dh, float, b * hidden);
  TAKE(logits, float, b * CLASSES);
  TAKE(dlogits, float, b * CLASSES);
  if (kind == MODEL_CNN) {
    TAKE(col1, float, 9 * b * 784);
    TAKE(a1, float, 32 * b * 784);
    TAKE(p1, float, 32 * b * 196);
    TAKE(dp1, float, 32 * b * 196);
    TAKE(arg1, uint8_t, 32 * b * 196);
    TAKE(col2, float, 288 * b * 196);
    TAKE(a2, float, 64 * b * 196);
    TAKE(p2, float, b * 3136);
    TAKE(dp2, float, b * 3136);
    TAKE(arg2, uint8_t, b * 3136);
  }
#undef TAKE
  return at;
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
  m->spec = kind == MODEL_MLP ? mlp_spec : cnn_spec;
  m->ntensors = kind == MODEL_MLP ? 4 : 8;
  for (int i = 0; i < m->ntensors; i++) {
    m->offset[i] = m->nparams;
    m->nparams += tensor_count(&m->spec[i]);
  }

  size_t pbytes = round_up(sizeof(float) * m->nparams);
  size_t abytes = carve(kind, (size_t)max_batch, NULL, &m->act);
  m->params = aligned_alloc(ALIGN, pbytes);
  m->grads = aligned_alloc(ALIGN, pbytes);
  m->arena = aligned_alloc(ALIGN, abytes);
  if (!m->params || !m->grads || !m->arena) {
    zn_model_destroy(m);
    return ZN_ERR_NOMEM;
  }
  memset(m->params, 0, pbytes);
  memset(m->grads, 0, pbytes);
  carve(kind, (size_t)max_batch, m->arena, &m->act);
  *out = m;
  return ZN_OK;
}

void zn_model_destroy(zn_model* m) {
  if (!m) return;
  free(m->params);
  free(m->grads);
  free(m->arena);
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
  zn_rng rng;
  zn_rng_seed(&rng, seed);
  for (int i = 0; i < m->ntensors; i++) {
    float bound = (float)(1.0 / sqrt((double)m->spec[i].fan_in));
    float* p = m->params + m->offset[i];
    size_t count = tensor_count(&m->spec[i]);
    for (size_t j = 0; j < count; j++) p[j] = zn_rng_uniform(&rng, -bound, bound);
  }
}

/* Parameter tensor i of the model, in the parameter or the gradient buffer. */
static float* P(zn_model* m, int i) {
  return m->params + m->offset[i];
}

static float* G(zn_model* m, int i) {
  return m->grads + m->offset[i];
}

static const float* mlp_forward(zn_model* m, const float* x, int n) {
  activations* a = &m->act;
  zn_linear_forward(x, P(m, 0), P(m, 1), a->h, n, 784, 256);
  zn_relu_forward(a->h, a->h, (size_t)n * 256);
  zn_linear_forward(a->h, P(m, 2), P(m, 3), a->logits, n, 256, CLASSES);
  return a->logits;
}

static void mlp_backward(zn_model* m, const float* x, int n) {
  activations* a = &m->act;
  zn_linear_backward(a->h, P(m, 2), a->dlogits, a->dh, G(m, 2), G(m, 3), n, 256, CLASSES);
  zn_relu_backward(a->h, a->dh, a->dh, (size_t)n * 256);
  zn_linear_backward(x, P(m, 0), a->dh, NULL, G(m, 0), G(m, 1), n, 784, 256);
}

static zn_conv2d_shape conv1_shape(int n) {
  return (zn_conv2d_shape){.n = n, .cin = 1, .h = IMG, .w = IMG, .cout = 32, .k = 3, .pad = 1};
}

static zn_conv2d_shape conv2_shape(int n) {
  return (zn_conv2d_shape){.n = n, .cin = 32, .h = 14, .w = 14, .cout = 64, .k = 3, .pad = 1};
}

static zn_pool_shape pool1_shape(int n) {
  return (zn_pool_shape){.c = 32, .n = n, .h = IMG, .w = IMG, .relu = 1, .out_nchw = 0};
}

static zn_pool_shape pool2_shape(int n) {
  return (zn_pool_shape){.c = 64, .n = n, .h = 14, .w = 14, .relu = 1, .out_nchw = 1};
}

static const float* cnn_forward(zn_model* m, const float* x, int n) {
  activations* a = &m->act;
  zn_conv2d_shape c1 = conv1_shape(n), c2 = conv2_shape(n);
  zn_pool_shape q1 = pool1_shape(n), q2 = pool2_shape(n);

  zn_conv2d_forward(&c1, x, P(m, 0), NULL, a->col1, a->a1);
  zn_maxpool2_forward(&q1, a->a1, P(m, 1), a->p1, a->arg1);
  zn_conv2d_forward(&c2, a->p1, P(m, 2), NULL, a->col2, a->a2);
  zn_maxpool2_forward(&q2, a->a2, P(m, 3), a->p2, a->arg2);

  zn_linear_forward(a->p2, P(m, 4), P(m, 5), a->h, n, 3136, 128);
  zn_relu_forward(a->h, a->h, (size_t)n * 128);
  zn_linear_forward(a->h, P(m, 6), P(m, 7), a->logits, n, 128, CLASSES);
  return a->logits;
}

/* The convolution outputs a2 and a1 are dead after the forward pass, so each takes the gradient
 * of its own values; the pooling backward also yields the convolution's bias gradient. */
static void cnn_backward(zn_model* m, int n) {
  activations* a = &m->act;
  zn_conv2d_shape c1 = conv1_shape(n), c2 = conv2_shape(n);
  zn_pool_shape q1 = pool1_shape(n), q2 = pool2_shape(n);

  zn_linear_backward(a->h, P(m, 6), a->dlogits, a->dh, G(m, 6), G(m, 7), n, 128, CLASSES);
  zn_relu_backward(a->h, a->dh, a->dh, (size_t)n * 128);
  zn_linear_backward(a->p2, P(m, 4), a->dh, a->dp2, G(m, 4), G(m, 5), n, 3136, 128);

  zn_maxpool2_backward(&q2, a->dp2, a->p2, a->arg2, a->a2, G(m, 3));
  zn_conv2d_backward(&c2, P(m, 2), a->a2, a->col2, a->dp1, G(m, 2), NULL);
  zn_maxpool2_backward(&q1, a->dp1, a->p1, a->arg1, a->a1, G(m, 1));
  zn_conv2d_backward(&c1, P(m, 0), a->a1, a->col1, NULL, G(m, 0), NULL);
}

static const float* forward(zn_model* m, const float* x, int n) {
  return m->kind == MODEL_MLP ? mlp_forward(m, x, n) : cnn_forward(m, x, n);
}

float zn_model_train_batch(zn_model* m, const float* x, const uint8_t* y, int n, int* correct) {
  assert(n >= 1 && n <= m->max_batch);
  const float* logits = forward(m, x, n);
  double loss = zn_softmax_xent(logits, y, n, CLASSES, m->act.dlogits, correct);

  if (m->kind == MODEL_MLP)
    mlp_backward(m, x, n);
  else
    cnn_backward(m, n);
  return (float)loss;
}

double zn_model_eval_batch(zn_model* m, const float* x, const uint8_t* y, int n, int* correct) {
  double total = 0.0;
  int right = 0;
  for (int at = 0; at < n; at += m->max_batch) {
    int b = n - at < m->max_batch ? n - at : m->max_batch;
    int ok = 0;
    const float* logits = forward(m, x + (size_t)at * IMG * IMG, b);
    total += zn_softmax_xent(logits, y + at, b, CLASSES, NULL, &ok) * b;
    right += ok;
  }
  if (correct) *correct = right;
  return total;
}

int zn_model_num_tensors(const zn_model* m) {
  return m->ntensors;
}

const char* zn_model_tensor_name(const zn_model* m, int i) {
  return m->spec[i].name;
}

void zn_model_tensor_shape(const zn_model* m, int i, int* ndim, int shape[4]) {
  *ndim = m->spec[i].ndim;
  for (int d = 0; d < 4; d++) shape[d] = d < *ndim ? m->spec[i].shape[d] : 1;
}

size_t zn_model_tensor_offset(const zn_model* m, int i) {
  return m->offset[i];
}

void zn_model_set_threads(int n) {
  openblas_set_num_threads(n < 1 ? 1 : n);
}
