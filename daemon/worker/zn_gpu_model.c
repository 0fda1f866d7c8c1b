/* The mlp and cnn models on an NVIDIA GPU; see zn_gpu_model.h.
 *
 * Layout. The tensor table (names, shapes, offsets) is zn_model_layout.h's, the CPU model's
 * too: create checks that its shapes are the ones the layers below compute, so a parameter
 * buffer means the same on both devices by construction.
 *
 * Layers. Activations are batch-major, as PyTorch has them: Linear [n][features], convolutions
 * NCHW, so the second pooling's output [n][64][7][7] is already the [n][3136] that flatten feeds
 * the first Linear layer. cuBLAS is column-major: a row-major matrix A[r][c] is, to it, the
 * column-major c x r matrix A^T, which is how the three GEMMs of a Linear layer below read.
 * Bias and ReLU come after the GEMM or convolution, in one pass; the ReLU before each pooling is
 * applied first, as on the CPU (max and ReLU commute, so the pooled values are the same), and
 * its backward masks the pooling's gradient where the convolution's output was not positive.
 *
 * Numerics. Everything is float32 with float32 accumulation: cuBLAS in its default math mode
 * and cuDNN convolutions restricted to FMA kernels, so no TF32 tensor cores round the inputs, and
 * to GEMM-like algorithms (no FFT or Winograd transforms), so each output rounds as a dot product
 * does. Every algorithm is deterministic (choose_algorithms), pooling is
 * CUDNN_POOLING_MAX_DETERMINISTIC and the small kernels reduce in fixed order: two runs give the
 * same bits.
 *
 * Capture. All buffers (cuBLAS's and cuDNN's workspaces included) are allocated by create, for
 * max_batch images, and create runs one warm-up step so every library kernel is loaded before a
 * caller captures a graph. The descriptors of the cnn are host state, set again (without
 * allocating) when the batch size changes. */
#include "zn_gpu_model.h"

#include <cublas_v2.h>
#include <cuda_runtime.h>
#include <cudnn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "zn_err.h"
#include "zn_layers_cuda.h"
#include "zn_model_layout.h"

enum { IMG = 28 * 28, CLASSES = 10, MAX_TENSORS = 8, MAX_ACTIVATIONS = 12 };

/* cuBLAS's recommended workspace on Hopper; the most a cuDNN forward algorithm may ask for. */
#define BLAS_WORKSPACE_BYTES ((size_t)32 << 20)
#define CONV_WORKSPACE_CAP ((size_t)256 << 20)

typedef enum { MODEL_MLP, MODEL_CNN } model_kind;

/* The shapes the layers below compute, in state_dict order; create checks them against the
 * shared layout. */
typedef struct {
  int ndim;
  int shape[4];
} tensor_shape;

static const tensor_shape mlp_shapes[] = {{2, {256, IMG}}, {1, {256}}, {2, {10, 256}}, {1, {10}}};

static const tensor_shape cnn_shapes[] = {
    {4, {32, 1, 3, 3}}, {1, {32}},  {4, {64, 32, 3, 3}}, {1, {64}},
    {2, {128, 3136}},   {1, {128}}, {2, {10, 128}},      {1, {10}},
};

/* The cnn's NCHW activations: channels and side of each, for a batch of n. */
enum { T_X, T_A1, T_P1, T_A2, T_P2, T_COUNT };
static const int act_channels[T_COUNT] = {1, 32, 32, 64, 64};
static const int act_side[T_COUNT] = {28, 28, 14, 14, 7};

/* A 3x3, padding 1 convolution from activation `in` to `out` (same side), and the activation
 * `pooled` its pooling writes. */
typedef struct {
  int in, out, pooled;
  cudnnFilterDescriptor_t filter;
  cudnnConvolutionDescriptor_t desc;
  cudnnConvolutionFwdAlgo_t fwd;
  cudnnConvolutionBwdDataAlgo_t bwd_data;
  cudnnConvolutionBwdFilterAlgo_t bwd_filter;
} conv_layer;

struct zn_gpu_model {
  model_kind kind;
  int max_batch;
  int batch_set; /* the batch size the cnn's descriptors describe; 0 before the first */
  cudaStream_t stream;
  cublasHandle_t blas;
  cudnnHandle_t dnn;
  int ntensors;
  size_t offset[MAX_TENSORS];
  size_t nparams;
  float *params, *grads;
  void *blas_ws, *conv_ws;
  size_t conv_ws_bytes;

  /* Activations and their gradients, max_batch images each; the mlp uses the first four. */
  float *h, *dh, *logits, *dlogits;
  float *a1, *da1, *p1, *dp1, *a2, *da2, *p2, *dp2;

  cudnnTensorDescriptor_t act[T_COUNT];
  cudnnPoolingDescriptor_t pool;
  conv_layer conv[2];
  char error[512];
};

/* ---------------------------------------------------------------- errors */

static int fail(zn_gpu_model* m, int code, const char* what, const char* why) {
  snprintf(m->error, sizeof m->error, "%s: %s", what, why);
  return code;
}

static int cuda_ok(zn_gpu_model* m, cudaError_t e, const char* what) {
  return e == cudaSuccess ? ZN_OK : fail(m, ZN_ERR_IO, what, cudaGetErrorString(e));
}

static int blas_ok(zn_gpu_model* m, cublasStatus_t s, const char* what) {
  return s == CUBLAS_STATUS_SUCCESS ? ZN_OK : fail(m, ZN_ERR_IO, what, cublasGetStatusString(s));
}

static int dnn_ok(zn_gpu_model* m, cudnnStatus_t s, const char* what) {
  return s == CUDNN_STATUS_SUCCESS ? ZN_OK : fail(m, ZN_ERR_IO, what, cudnnGetErrorString(s));
}

/* The launchers of zn_layers_cuda.h return a cudaError_t. */
static int kernel_ok(zn_gpu_model* m, int launched, const char* what) {
  return cuda_ok(m, (cudaError_t)launched, what);
}

#define TRY(expr)                         \
  do {                                    \
    int try_rc_ = (expr);                 \
    if (try_rc_ != ZN_OK) return try_rc_; \
  } while (0)

static const float ONE = 1.0f, ZERO = 0.0f;

/* ---------------------------------------------------------------- Linear layers */

/* y[n][out] = x[n][in] w[out][in]^T + b, then ReLU when relu is set. In cuBLAS's terms,
 * y^T (out x n) = (w^T)^T (out x in) x^T (in x n). */
static int linear_forward(zn_gpu_model* m, const float* x, const float* w, const float* b, float* y,
                          int n, int in, int out, int relu) {
  TRY(blas_ok(
      m,
      cublasSgemm(m->blas, CUBLAS_OP_T, CUBLAS_OP_N, out, n, in, &ONE, w, in, x, in, &ZERO, y, out),
      "cublasSgemm (Linear forward)"));
  return kernel_ok(m, zn_cuda_bias_forward(y, b, n, out, 1, relu, m->stream),
                   "zn_cuda_bias_forward (Linear)");
}

/* From dy[n][out]: dw[out][in] = dy^T x, db[out] = the column sums of dy, and, when dx is not
 * NULL, dx[n][in] = dy w. In cuBLAS's terms dw^T (in x out) = x^T (in x n) dy (n x out) and
 * dx^T (in x n) = w^T (in x out) dy^T (out x n). */
static int linear_backward(zn_gpu_model* m, const float* x, const float* w, const float* dy,
                           float* dx, float* dw, float* db, int n, int in, int out) {
  TRY(blas_ok(m,
              cublasSgemm(m->blas, CUBLAS_OP_N, CUBLAS_OP_T, in, out, n, &ONE, x, in, dy, out,
                          &ZERO, dw, in),
              "cublasSgemm (Linear weight gradient)"));
  TRY(kernel_ok(m, zn_cuda_bias_backward(dy, db, n, out, 1, m->stream),
                "zn_cuda_bias_backward (Linear)"));
  if (!dx) return ZN_OK;
  return blas_ok(m,
                 cublasSgemm(m->blas, CUBLAS_OP_N, CUBLAS_OP_N, in, n, out, &ONE, w, in, dy, out,
                             &ZERO, dx, in),
                 "cublasSgemm (Linear input gradient)");
}

static int relu_backward(zn_gpu_model* m, const float* y, float* dy, size_t count) {
  return kernel_ok(m, zn_cuda_relu_backward(y, dy, dy, count, m->stream), "zn_cuda_relu_backward");
}

/* ---------------------------------------------------------------- the tensors */

static const float* P(const zn_gpu_model* m, int i) {
  return m->params + m->offset[i];
}

static float* G(const zn_gpu_model* m, int i) {
  return m->grads + m->offset[i];
}

/* ---------------------------------------------------------------- mlp */

static int mlp_forward(zn_gpu_model* m, const float* x, int n) {
  TRY(linear_forward(m, x, P(m, 0), P(m, 1), m->h, n, IMG, 256, 1));
  return linear_forward(m, m->h, P(m, 2), P(m, 3), m->logits, n, 256, CLASSES, 0);
}

static int mlp_backward(zn_gpu_model* m, const float* x, int n) {
  TRY(linear_backward(m, m->h, P(m, 2), m->dlogits, m->dh, G(m, 2), G(m, 3), n, 256, CLASSES));
  TRY(relu_backward(m, m->h, m->dh, (size_t)n * 256));
  return linear_backward(m, x, P(m, 0), m->dh, NULL, G(m, 0), G(m, 1), n, IMG, 256);
}

/* ---------------------------------------------------------------- cnn */

/* Points the activation descriptors at a batch of n; host-side, nothing is allocated. */
static int set_descriptors(zn_gpu_model* m, int n) {
  for (int t = 0; t < T_COUNT; t++)
    TRY(dnn_ok(m,
               cudnnSetTensor4dDescriptor(m->act[t], CUDNN_TENSOR_NCHW, CUDNN_DATA_FLOAT, n,
                                          act_channels[t], act_side[t], act_side[t]),
               "cudnnSetTensor4dDescriptor"));
  return ZN_OK;
}

/* The largest workspace the chosen algorithms need for the batch the descriptors describe. */
static int conv_workspace(zn_gpu_model* m, size_t* most) {
  *most = 0;
  for (int i = 0; i < 2; i++) {
    const conv_layer* c = &m->conv[i];
    cudnnTensorDescriptor_t in = m->act[c->in], out = m->act[c->out];
    size_t need[3] = {0, 0, 0};
    TRY(dnn_ok(m,
               cudnnGetConvolutionForwardWorkspaceSize(m->dnn, in, c->filter, c->desc, out, c->fwd,
                                                       &need[0]),
               "cudnnGetConvolutionForwardWorkspaceSize"));
    TRY(dnn_ok(m,
               cudnnGetConvolutionBackwardDataWorkspaceSize(m->dnn, c->filter, out, c->desc, in,
                                                            c->bwd_data, &need[1]),
               "cudnnGetConvolutionBackwardDataWorkspaceSize"));
    TRY(dnn_ok(m,
               cudnnGetConvolutionBackwardFilterWorkspaceSize(m->dnn, in, out, c->desc, c->filter,
                                                              c->bwd_filter, &need[2]),
               "cudnnGetConvolutionBackwardFilterWorkspaceSize"));
    for (int k = 0; k < 3; k++)
      if (need[k] > *most) *most = need[k];
  }
  return ZN_OK;
}

/* Describes a batch of n to cuDNN, when it is not the batch described already. The workspace
 * was allocated for max_batch; a smaller batch is checked to need no more (cuDNN's needs grow
 * with the batch, so this never fails in practice, but an overrun would corrupt memory). */
static int set_batch(zn_gpu_model* m, int n) {
  if (n == m->batch_set) return ZN_OK;
  m->batch_set = 0;
  TRY(set_descriptors(m, n));
  size_t need;
  TRY(conv_workspace(m, &need));
  if (need > m->conv_ws_bytes) {
    snprintf(m->error, sizeof m->error,
             "the convolutions need %zu bytes of workspace for a batch of %d, more than the %zu "
             "allocated for max_batch %d",
             need, n, m->conv_ws_bytes, m->max_batch);
    return ZN_ERR_IO;
  }
  m->batch_set = n;
  return ZN_OK;
}

static int conv_forward(zn_gpu_model* m, const conv_layer* c, const float* x, const float* w,
                        float* y) {
  return dnn_ok(
      m,
      cudnnConvolutionForward(m->dnn, &ONE, m->act[c->in], x, c->filter, w, c->desc, c->fwd,
                              m->conv_ws, m->conv_ws_bytes, &ZERO, m->act[c->out], y),
      "cudnnConvolutionForward");
}

/* dw from the layer's input x and output gradient dy; dx too when it is not NULL. */
static int conv_backward(zn_gpu_model* m, const conv_layer* c, const float* x, const float* w,
                         const float* dy, float* dx, float* dw) {
  TRY(dnn_ok(m,
             cudnnConvolutionBackwardFilter(m->dnn, &ONE, m->act[c->in], x, m->act[c->out], dy,
                                            c->desc, c->bwd_filter, m->conv_ws, m->conv_ws_bytes,
                                            &ZERO, c->filter, dw),
             "cudnnConvolutionBackwardFilter"));
  if (!dx) return ZN_OK;
  return dnn_ok(m,
                cudnnConvolutionBackwardData(m->dnn, &ONE, c->filter, w, m->act[c->out], dy,
                                             c->desc, c->bwd_data, m->conv_ws, m->conv_ws_bytes,
                                             &ZERO, m->act[c->in], dx),
                "cudnnConvolutionBackwardData");
}

/* y = maxpool(x) from activation tx to ty. */
static int pool_forward(zn_gpu_model* m, int tx, const float* x, int ty, float* y) {
  return dnn_ok(m, cudnnPoolingForward(m->dnn, m->pool, &ONE, m->act[tx], x, &ZERO, m->act[ty], y),
                "cudnnPoolingForward");
}

static int pool_backward(zn_gpu_model* m, int tx, const float* x, float* dx, int ty, const float* y,
                         const float* dy) {
  return dnn_ok(m,
                cudnnPoolingBackward(m->dnn, m->pool, &ONE, m->act[ty], y, m->act[ty], dy,
                                     m->act[tx], x, &ZERO, m->act[tx], dx),
                "cudnnPoolingBackward");
}

/* Convolution i of the cnn with its bias and ReLU: the activation its pooling reads. */
static int conv_bias_relu(zn_gpu_model* m, int i, const float* x, float* y, int n) {
  const conv_layer* c = &m->conv[i];
  TRY(conv_forward(m, c, x, P(m, 2 * i), y));
  int side = act_side[c->out];
  return kernel_ok(
      m,
      zn_cuda_bias_forward(y, P(m, 2 * i + 1), n, act_channels[c->out], side * side, 1, m->stream),
      "zn_cuda_bias_forward (convolution)");
}

static int cnn_forward(zn_gpu_model* m, const float* x, int n) {
  TRY(set_batch(m, n));
  TRY(conv_bias_relu(m, 0, x, m->a1, n));
  TRY(pool_forward(m, m->conv[0].out, m->a1, m->conv[0].pooled, m->p1));
  TRY(conv_bias_relu(m, 1, m->p1, m->a2, n));
  TRY(pool_forward(m, m->conv[1].out, m->a2, m->conv[1].pooled, m->p2));
  TRY(linear_forward(m, m->p2, P(m, 4), P(m, 5), m->h, n, 3136, 128, 1));
  return linear_forward(m, m->h, P(m, 6), P(m, 7), m->logits, n, 128, CLASSES, 0);
}

/* From the gradient dp of pooling i's output: the gradients of convolution i's weight and bias
 * and, when dx is not NULL, of its input x. */
static int cnn_conv_backward(zn_gpu_model* m, int i, const float* x, const float* dp, float* dx,
                             int n) {
  const conv_layer* c = &m->conv[i];
  float *a = i == 0 ? m->a1 : m->a2, *da = i == 0 ? m->da1 : m->da2;
  const float* p = i == 0 ? m->p1 : m->p2;
  int channels = act_channels[c->out], plane = act_side[c->out] * act_side[c->out];

  TRY(pool_backward(m, c->out, a, da, c->pooled, p, dp));
  TRY(relu_backward(m, a, da, (size_t)n * channels * plane));
  TRY(kernel_ok(m, zn_cuda_bias_backward(da, G(m, 2 * i + 1), n, channels, plane, m->stream),
                "zn_cuda_bias_backward (convolution)"));
  return conv_backward(m, c, x, P(m, 2 * i), da, dx, G(m, 2 * i));
}

static int cnn_backward(zn_gpu_model* m, const float* x, int n) {
  TRY(linear_backward(m, m->h, P(m, 6), m->dlogits, m->dh, G(m, 6), G(m, 7), n, 128, CLASSES));
  TRY(relu_backward(m, m->h, m->dh, (size_t)n * 128));
  TRY(linear_backward(m, m->p2, P(m, 4), m->dh, m->dp2, G(m, 4), G(m, 5), n, 3136, 128));
  TRY(cnn_conv_backward(m, 1, m->p1, m->dp2, m->dp1, n));
  return cnn_conv_backward(m, 0, x, m->dp1, NULL, n);
}

/* ---------------------------------------------------------------- batches */

static int check_batch(zn_gpu_model* m, int n) {
  if (n >= 1 && n <= m->max_batch) return ZN_OK;
  snprintf(m->error, sizeof m->error, "a batch of %d images for a model of max_batch %d", n,
           m->max_batch);
  return ZN_ERR_INVALID;
}

static int forward(zn_gpu_model* m, const float* x, int n) {
  return m->kind == MODEL_MLP ? mlp_forward(m, x, n) : cnn_forward(m, x, n);
}

int zn_gpu_model_train_batch(zn_gpu_model* m, const float* x, const uint8_t* y, int n,
                             float* loss) {
  m->error[0] = '\0';
  TRY(check_batch(m, n));
  TRY(forward(m, x, n));
  TRY(kernel_ok(m,
                zn_cuda_softmax_xent(m->logits, y, n, CLASSES, m->dlogits, loss, NULL, m->stream),
                "zn_cuda_softmax_xent"));
  return m->kind == MODEL_MLP ? mlp_backward(m, x, n) : cnn_backward(m, x, n);
}

int zn_gpu_model_eval_batch(zn_gpu_model* m, const float* x, const uint8_t* y, int n,
                            double* sums) {
  m->error[0] = '\0';
  TRY(check_batch(m, n));
  TRY(forward(m, x, n));
  return kernel_ok(m, zn_cuda_softmax_xent(m->logits, y, n, CLASSES, NULL, NULL, sums, m->stream),
                   "zn_cuda_softmax_xent");
}

/* ---------------------------------------------------------------- creation */

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

static int same_shape(const tensor_shape* want, int ndim, const int shape[4]) {
  if (ndim != want->ndim) return 0;
  for (int d = 0; d < ndim; d++)
    if (shape[d] != want->shape[d]) return 0;
  return 1;
}

/* The shared layout's offsets, and the check that its shapes are the ones computed here. */
static int read_layout(zn_gpu_model* m, const char* name) {
  const zn_model_layout* l = zn_model_layout_find(name);
  const tensor_shape* want = m->kind == MODEL_MLP ? mlp_shapes : cnn_shapes;
  int expected = m->kind == MODEL_MLP ? 4 : 8;
  int ok = l && l->ntensors == expected;
  for (int i = 0; ok && i < expected; i++) {
    ok = same_shape(&want[i], l->tensors[i].ndim, l->tensors[i].shape);
    m->offset[i] = zn_layout_tensor_offset(l, i);
  }
  if (!ok) return fail(m, ZN_ERR_INVALID, "zn_model_layout", "differs from the GPU model's layers");
  m->ntensors = expected;
  m->nparams = zn_layout_num_params(l);
  return ZN_OK;
}

static int device_alloc(zn_gpu_model* m, void** p, size_t bytes, const char* what) {
  cudaError_t e = cudaMalloc(p, bytes > 0 ? bytes : 1);
  if (e == cudaErrorMemoryAllocation) {
    cudaGetLastError();
    return fail(m, ZN_ERR_NOMEM, what, cudaGetErrorString(e));
  }
  return cuda_ok(m, e, what);
}

/* The activation buffers this kind uses, and the floats each holds per image. */
static int activation_table(zn_gpu_model* m, float*** bufs, size_t* per_image) {
  int hidden = m->kind == MODEL_MLP ? 256 : 128, k = 0;
  float** mlp[] = {&m->h, &m->dh, &m->logits, &m->dlogits};
  size_t mlp_size[] = {hidden, hidden, CLASSES, CLASSES};
  float** cnn[] = {&m->a1, &m->da1, &m->p1, &m->dp1, &m->a2, &m->da2, &m->p2, &m->dp2};
  size_t cnn_size[] = {32 * 784, 32 * 784, 32 * 196, 32 * 196, 64 * 196, 64 * 196, 3136, 3136};
  for (int i = 0; i < 4; i++, k++) {
    bufs[k] = mlp[i];
    per_image[k] = mlp_size[i];
  }
  for (int i = 0; m->kind == MODEL_CNN && i < 8; i++, k++) {
    bufs[k] = cnn[i];
    per_image[k] = cnn_size[i];
  }
  return k;
}

static int alloc_buffers(zn_gpu_model* m) {
  size_t pbytes = m->nparams * sizeof(float);
  TRY(device_alloc(m, (void**)&m->params, pbytes, "cudaMalloc (parameters)"));
  TRY(device_alloc(m, (void**)&m->grads, pbytes + 2 * sizeof(float), "cudaMalloc (gradients)"));
  TRY(cuda_ok(m, cudaMemsetAsync(m->params, 0, pbytes, m->stream), "cudaMemsetAsync (parameters)"));
  TRY(device_alloc(m, &m->blas_ws, BLAS_WORKSPACE_BYTES, "cudaMalloc (cuBLAS workspace)"));

  float** bufs[MAX_ACTIVATIONS];
  size_t per_image[MAX_ACTIVATIONS];
  int count = activation_table(m, bufs, per_image);
  for (int i = 0; i < count; i++)
    TRY(device_alloc(m, (void**)bufs[i], (size_t)m->max_batch * per_image[i] * sizeof(float),
                     "cudaMalloc (activations)"));
  return ZN_OK;
}

/* Both handles on the model's stream. cublasSetStream resets cuBLAS to its own workspace pool,
 * so the preallocated workspace is set after it: then no GEMM allocates, even under capture. */
static int make_handles(zn_gpu_model* m) {
  TRY(blas_ok(m, cublasCreate(&m->blas), "cublasCreate"));
  TRY(blas_ok(m, cublasSetStream(m->blas, m->stream), "cublasSetStream"));
  TRY(blas_ok(m, cublasSetWorkspace(m->blas, m->blas_ws, BLAS_WORKSPACE_BYTES),
              "cublasSetWorkspace"));
  TRY(blas_ok(m, cublasSetMathMode(m->blas, CUBLAS_DEFAULT_MATH), "cublasSetMathMode"));
  if (m->kind != MODEL_CNN) return ZN_OK;
  TRY(dnn_ok(m, cudnnCreate(&m->dnn), "cudnnCreate"));
  return dnn_ok(m, cudnnSetStream(m->dnn, m->stream), "cudnnSetStream");
}

/* A forward algorithm we take: one that computes each output as a plain sum of products
 * (implicit or explicit GEMM, direct), so it rounds as a dot product does, like the CPU; FFT and
 * Winograd transforms round differently and several times worse, which the comparison with the
 * CPU model, and ReLU and pooling decisions near their boundaries, would feel. It must also be
 * deterministic and use FMA kernels only (no TF32). */
static int suitable_forward(const cudnnConvolutionFwdAlgoPerf_t* p) {
  cudnnConvolutionFwdAlgo_t a = p->algo;
  int sums = a == CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_GEMM ||
             a == CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_PRECOMP_GEMM ||
             a == CUDNN_CONVOLUTION_FWD_ALGO_GEMM || a == CUDNN_CONVOLUTION_FWD_ALGO_DIRECT;
  return sums && p->status == CUDNN_STATUS_SUCCESS && p->determinism == CUDNN_DETERMINISTIC &&
         p->mathType == CUDNN_FMA_MATH;
}

/* Whether cuDNN runs forward algorithm a on this layer within the workspace cap. */
static int forward_fits(zn_gpu_model* m, const conv_layer* c, cudnnConvolutionFwdAlgo_t a) {
  size_t need = 0;
  cudnnStatus_t s = cudnnGetConvolutionForwardWorkspaceSize(m->dnn, m->act[c->in], c->filter,
                                                            c->desc, m->act[c->out], a, &need);
  return s == CUDNN_STATUS_SUCCESS && need <= CONV_WORKSPACE_CAP;
}

/* Forward: the first suitable one of cuDNN's suggestions (fastest first) that fits, else the
 * implicit GEMMs, which cuDNN has for every float NCHW convolution. Backward: ALGO_1 for data and
 * for filter, the only ones of theirs that are both deterministic and transform-free. Whether
 * cuDNN supports the backward ones here is checked when the workspace is sized, and all three run
 * once in the warm-up step. */
static int choose_algorithms(zn_gpu_model* m, conv_layer* c) {
  cudnnConvolutionFwdAlgoPerf_t perf[CUDNN_CONVOLUTION_FWD_ALGO_COUNT];
  int found = 0;
  TRY(dnn_ok(m,
             cudnnGetConvolutionForwardAlgorithm_v7(m->dnn, m->act[c->in], c->filter, c->desc,
                                                    m->act[c->out],
                                                    CUDNN_CONVOLUTION_FWD_ALGO_COUNT, &found, perf),
             "cudnnGetConvolutionForwardAlgorithm_v7"));
  c->bwd_data = CUDNN_CONVOLUTION_BWD_DATA_ALGO_1;
  c->bwd_filter = CUDNN_CONVOLUTION_BWD_FILTER_ALGO_1;
  for (int i = 0; i < found; i++)
    if (suitable_forward(&perf[i]) && forward_fits(m, c, perf[i].algo)) {
      c->fwd = perf[i].algo;
      return ZN_OK;
    }
  const cudnnConvolutionFwdAlgo_t fallback[] = {CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_PRECOMP_GEMM,
                                                CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_GEMM};
  for (int i = 0; i < 2; i++)
    if (forward_fits(m, c, fallback[i])) {
      c->fwd = fallback[i];
      return ZN_OK;
    }
  return fail(m, ZN_ERR_IO, "choosing a convolution algorithm",
              "cuDNN offers no deterministic, FMA-only implicit GEMM for this layer");
}

/* Convolution i: 3x3 cross-correlation (PyTorch's Conv2d), padding 1, stride 1, FMA math. */
static int make_conv(zn_gpu_model* m, int i) {
  conv_layer* c = &m->conv[i];
  c->in = i == 0 ? T_X : T_P1;
  c->out = i == 0 ? T_A1 : T_A2;
  c->pooled = i == 0 ? T_P1 : T_P2;
  TRY(dnn_ok(m, cudnnCreateFilterDescriptor(&c->filter), "cudnnCreateFilterDescriptor"));
  TRY(dnn_ok(m,
             cudnnSetFilter4dDescriptor(c->filter, CUDNN_DATA_FLOAT, CUDNN_TENSOR_NCHW,
                                        act_channels[c->out], act_channels[c->in], 3, 3),
             "cudnnSetFilter4dDescriptor"));
  TRY(dnn_ok(m, cudnnCreateConvolutionDescriptor(&c->desc), "cudnnCreateConvolutionDescriptor"));
  TRY(dnn_ok(m,
             cudnnSetConvolution2dDescriptor(c->desc, 1, 1, 1, 1, 1, 1, CUDNN_CROSS_CORRELATION,
                                             CUDNN_DATA_FLOAT),
             "cudnnSetConvolution2dDescriptor"));
  return dnn_ok(m, cudnnSetConvolutionMathType(c->desc, CUDNN_FMA_MATH),
                "cudnnSetConvolutionMathType");
}

/* The cnn's descriptors, its algorithms for max_batch and one workspace for the largest of
 * their needs. */
static int make_cnn(zn_gpu_model* m) {
  for (int t = 0; t < T_COUNT; t++)
    TRY(dnn_ok(m, cudnnCreateTensorDescriptor(&m->act[t]), "cudnnCreateTensorDescriptor"));
  TRY(dnn_ok(m, cudnnCreatePoolingDescriptor(&m->pool), "cudnnCreatePoolingDescriptor"));
  TRY(dnn_ok(m,
             cudnnSetPooling2dDescriptor(m->pool, CUDNN_POOLING_MAX_DETERMINISTIC,
                                         CUDNN_NOT_PROPAGATE_NAN, 2, 2, 0, 0, 2, 2),
             "cudnnSetPooling2dDescriptor"));
  for (int i = 0; i < 2; i++) TRY(make_conv(m, i));

  TRY(set_descriptors(m, m->max_batch));
  for (int i = 0; i < 2; i++) TRY(choose_algorithms(m, &m->conv[i]));
  TRY(conv_workspace(m, &m->conv_ws_bytes));
  TRY(device_alloc(m, &m->conv_ws, m->conv_ws_bytes, "cudaMalloc (cuDNN workspace)"));
  m->batch_set = m->max_batch;
  return ZN_OK;
}

/* One training and one evaluation batch of max_batch zero images, waited for: every kernel the
 * steps use is loaded here (cuDNN compiles some at first use), so a graph captured later finds
 * nothing left to load, and whatever would fail in a step fails here, named. The gradients it
 * leaves are cleared. */
static int warm_up(zn_gpu_model* m) {
  float* x = NULL;
  uint8_t* y = NULL;
  double* sums = NULL;
  size_t xbytes = (size_t)m->max_batch * IMG * sizeof(float);
  size_t gbytes = (m->nparams + 2) * sizeof(float);
  int rc = device_alloc(m, (void**)&x, xbytes, "cudaMalloc (warm-up images)");
  if (rc == ZN_OK) rc = device_alloc(m, (void**)&y, (size_t)m->max_batch, "cudaMalloc (labels)");
  if (rc == ZN_OK) rc = device_alloc(m, (void**)&sums, 2 * sizeof(double), "cudaMalloc (sums)");
  if (rc == ZN_OK) rc = cuda_ok(m, cudaMemsetAsync(x, 0, xbytes, m->stream), "cudaMemsetAsync");
  if (rc == ZN_OK)
    rc = cuda_ok(m, cudaMemsetAsync(y, 0, (size_t)m->max_batch, m->stream), "cudaMemsetAsync");
  if (rc == ZN_OK)
    rc = cuda_ok(m, cudaMemsetAsync(sums, 0, 2 * sizeof(double), m->stream), "cudaMemsetAsync");
  if (rc == ZN_OK) rc = zn_gpu_model_train_batch(m, x, y, m->max_batch, m->grads + m->nparams);
  if (rc == ZN_OK) rc = zn_gpu_model_eval_batch(m, x, y, m->max_batch, sums);
  if (rc == ZN_OK)
    rc = cuda_ok(m, cudaMemsetAsync(m->grads, 0, gbytes, m->stream), "cudaMemsetAsync");
  if (rc == ZN_OK)
    rc = cuda_ok(m, cudaStreamSynchronize(m->stream), "cudaStreamSynchronize (warm-up step)");
  cudaFree(x);
  cudaFree(y);
  cudaFree(sums);
  return rc;
}

int zn_gpu_model_create(const char* name, int max_batch, int device, void* stream,
                        zn_gpu_model** out, char* err, size_t errlen) {
  model_kind kind;
  *out = NULL;
  if (parse_kind(name, &kind) != ZN_OK || max_batch < 1) {
    snprintf(err, errlen, "no GPU model '%s' with max_batch %d (models: mlp, cnn; max_batch >= 1)",
             name ? name : "(null)", max_batch);
    return ZN_ERR_INVALID;
  }
  zn_gpu_model* m = calloc(1, sizeof *m);
  if (!m) {
    snprintf(err, errlen, "no memory for the GPU model");
    return ZN_ERR_NOMEM;
  }
  m->kind = kind;
  m->max_batch = max_batch;
  m->stream = (cudaStream_t)stream;

  int rc = cuda_ok(m, cudaSetDevice(device), "cudaSetDevice");
  if (rc == ZN_OK) rc = read_layout(m, name);
  if (rc == ZN_OK) rc = alloc_buffers(m);
  if (rc == ZN_OK) rc = make_handles(m);
  if (rc == ZN_OK && kind == MODEL_CNN) rc = make_cnn(m);
  if (rc == ZN_OK) rc = warm_up(m);
  if (rc != ZN_OK) {
    snprintf(err, errlen, "%s", m->error);
    zn_gpu_model_destroy(m);
    return rc;
  }
  m->error[0] = '\0';
  *out = m;
  return ZN_OK;
}

static void destroy_cnn(zn_gpu_model* m) {
  for (int i = 0; i < 2; i++) {
    if (m->conv[i].filter) cudnnDestroyFilterDescriptor(m->conv[i].filter);
    if (m->conv[i].desc) cudnnDestroyConvolutionDescriptor(m->conv[i].desc);
  }
  for (int t = 0; t < T_COUNT; t++)
    if (m->act[t]) cudnnDestroyTensorDescriptor(m->act[t]);
  if (m->pool) cudnnDestroyPoolingDescriptor(m->pool);
  if (m->dnn) cudnnDestroy(m->dnn);
}

void zn_gpu_model_destroy(zn_gpu_model* m) {
  if (!m) return;
  /* Work still queued may use the buffers; its errors no longer matter to anyone. */
  cudaStreamSynchronize(m->stream);
  destroy_cnn(m);
  if (m->blas) cublasDestroy(m->blas);
  float** bufs[MAX_ACTIVATIONS];
  size_t per_image[MAX_ACTIVATIONS];
  int count = activation_table(m, bufs, per_image);
  for (int i = 0; i < count; i++) cudaFree(*bufs[i]);
  cudaFree(m->params);
  cudaFree(m->grads);
  cudaFree(m->blas_ws);
  cudaFree(m->conv_ws);
  free(m);
}

/* ---------------------------------------------------------------- accessors */

size_t zn_gpu_model_num_params(const zn_gpu_model* m) {
  return m->nparams;
}

float* zn_gpu_model_params(zn_gpu_model* m) {
  return m->params;
}

float* zn_gpu_model_grads(zn_gpu_model* m) {
  return m->grads;
}

const char* zn_gpu_model_error(const zn_gpu_model* m) {
  return m->error;
}

/* On the model's stream, so the copy is ordered after the steps queued before it (a plain
 * cudaMemcpy would not wait for a non-blocking stream). */
static int copy_params(zn_gpu_model* m, void* dst, const void* src, enum cudaMemcpyKind kind) {
  m->error[0] = '\0';
  TRY(cuda_ok(m, cudaMemcpyAsync(dst, src, m->nparams * sizeof(float), kind, m->stream),
              "cudaMemcpyAsync (parameters)"));
  return cuda_ok(m, cudaStreamSynchronize(m->stream), "cudaStreamSynchronize (parameters)");
}

int zn_gpu_model_set_params(zn_gpu_model* m, const float* host) {
  return copy_params(m, m->params, host, cudaMemcpyHostToDevice);
}

int zn_gpu_model_get_params(zn_gpu_model* m, float* host) {
  return copy_params(m, host, m->params, cudaMemcpyDeviceToHost);
}
