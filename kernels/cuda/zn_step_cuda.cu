/* The CUDA ZENITH step; see zn_step_cuda.h.
 *
 * Launch geometry. The norm kernel runs a fixed grid (at most 1024 blocks of
 * 256 threads, fewer for small models) with a grid-stride loop over float4
 * loads; each thread keeps a double sum, the block adds its 256 sums in a
 * fixed tree and writes one partial. The rate kernel is one block of 256
 * threads: thread t adds partials t, t+256, ... in order, then the same fixed
 * tree. So the norm's bits depend only on n and the data. The update kernel
 * is grid-stride over float4 too, with enough blocks to fill the device. */
#include "zn_step_cuda.h"

#include <cuda_runtime.h>
#include <stdio.h>
#include <stdlib.h>

#include "zn_err.h"

#define THREADS 256
#define MAX_NORM_BLOCKS 1024

/* What the device keeps between steps: the rule's parameters and the report
 * (state, last norm and outcome), the window living in its own buffer. */
typedef struct {
  zn_zenith_params params;
  zn_cuda_step_report report;
} device_rule;

struct zn_cuda_step {
  zn_zenith_params params;
  device_rule* rule; /* device */
  double* window;    /* device, params.window doubles */
  double* partials;  /* device, norm_blocks doubles */
  int norm_blocks;
  int update_blocks;
};

#define CUDA_TRY(expr, what)                                         \
  do {                                                               \
    cudaError_t e_ = (expr);                                         \
    if (e_ != cudaSuccess) {                                         \
      snprintf(err, errlen, "%s: %s", what, cudaGetErrorString(e_)); \
      zn_cuda_step_destroy(s);                                       \
      return ZN_ERR_IO;                                              \
    }                                                                \
  } while (0)

/* Sums the THREADS values of `shared` into shared[0] in a fixed tree. */
__device__ static void block_sum(double* shared) {
  for (int width = THREADS / 2; width > 0; width /= 2) {
    __syncthreads();
    if (threadIdx.x < width) shared[threadIdx.x] += shared[threadIdx.x + width];
  }
  __syncthreads();
}

__global__ static void sumsq_partial_kernel(const float* g, size_t n, double* partials) {
  __shared__ double shared[THREADS];
  const float4* g4 = (const float4*)g;
  size_t n4 = n / 4;
  size_t stride = (size_t)gridDim.x * THREADS;
  double acc = 0.0;
  for (size_t i = (size_t)blockIdx.x * THREADS + threadIdx.x; i < n4; i += stride) {
    float4 x = g4[i];
    acc += (double)x.x * x.x + (double)x.y * x.y + (double)x.z * x.z + (double)x.w * x.w;
  }
  size_t tail = 4 * n4 + (size_t)blockIdx.x * THREADS + threadIdx.x;
  if (blockIdx.x == 0 && tail < n) acc += (double)g[tail] * g[tail];
  shared[threadIdx.x] = acc;
  block_sum(shared);
  if (threadIdx.x == 0) partials[blockIdx.x] = shared[0];
}

__global__ static void rate_kernel(device_rule* rule, const double* partials, int nblocks,
                                   float grad_scale) {
  __shared__ double shared[THREADS];
  double acc = 0.0;
  for (int i = threadIdx.x; i < nblocks; i += THREADS) acc += partials[i];
  shared[threadIdx.x] = acc;
  block_sum(shared);
  if (threadIdx.x == 0) {
    double norm = (double)grad_scale * sqrt(shared[0]);
    rule->report.norm = norm;
    rule->report.outcome = (int)zn_zenith_rate(&rule->params, &rule->report.state, norm);
  }
}

__device__ static float update_one(float w, float g, float* v, float mu, float wd, float lr,
                                   float lr_dd, float scale, int nesterov) {
  float d = scale * g + wd * w;
  float vi = mu * *v + d;
  *v = vi;
  float u = nesterov ? d + mu * vi : vi;
  return w - lr * u - lr_dd * w;
}

__global__ static void update_kernel(const device_rule* rule, float* w, const float* g, float* v,
                                     size_t n, float scale) {
  if (rule->report.outcome != ZN_STEP_TAKEN) return;
  const zn_zenith_params* p = &rule->params;
  double rate = rule->report.state.lr;
  float mu = (float)p->momentum, wd = (float)p->weight_decay, lr = (float)rate;
  float lr_dd = (float)(rate * p->decoupled_decay);
  int nesterov = p->nesterov;
  float4* w4 = (float4*)w;
  float4* v4 = (float4*)v;
  const float4* g4 = (const float4*)g;
  size_t n4 = n / 4, stride = (size_t)gridDim.x * THREADS;
  for (size_t i = (size_t)blockIdx.x * THREADS + threadIdx.x; i < n4; i += stride) {
    float4 wi = w4[i], gi = g4[i], vi = v4[i];
    wi.x = update_one(wi.x, gi.x, &vi.x, mu, wd, lr, lr_dd, scale, nesterov);
    wi.y = update_one(wi.y, gi.y, &vi.y, mu, wd, lr, lr_dd, scale, nesterov);
    wi.z = update_one(wi.z, gi.z, &vi.z, mu, wd, lr, lr_dd, scale, nesterov);
    wi.w = update_one(wi.w, gi.w, &vi.w, mu, wd, lr, lr_dd, scale, nesterov);
    w4[i] = wi;
    v4[i] = vi;
  }
  size_t tail = 4 * n4 + (size_t)blockIdx.x * THREADS + threadIdx.x;
  if (blockIdx.x == 0 && tail < n)
    w[tail] = update_one(w[tail], g[tail], &v[tail], mu, wd, lr, lr_dd, scale, nesterov);
}

extern "C" int zn_cuda_step_create(const zn_zenith_params* p, size_t n, zn_cuda_step** out,
                                   char* err, size_t errlen) {
  zn_cuda_step* s = (zn_cuda_step*)calloc(1, sizeof *s);
  if (!s) return ZN_ERR_NOMEM;
  s->params = *p;
  size_t groups = (n / 4 + THREADS - 1) / THREADS;
  s->norm_blocks = groups < 1 ? 1 : (groups > MAX_NORM_BLOCKS ? MAX_NORM_BLOCKS : (int)groups);
  int sms = 0, device = 0;
  CUDA_TRY(cudaGetDevice(&device), "querying the current GPU");
  CUDA_TRY(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device),
           "querying the GPU");
  s->update_blocks = groups < 1 ? 1 : (groups > (size_t)sms * 8 ? sms * 8 : (int)groups);

  CUDA_TRY(cudaMalloc((void**)&s->rule, sizeof(device_rule)), "allocating the rule's state");
  CUDA_TRY(cudaMalloc((void**)&s->window, (size_t)p->window * sizeof(double)),
           "allocating the norm window");
  CUDA_TRY(cudaMalloc((void**)&s->partials, (size_t)s->norm_blocks * sizeof(double)),
           "allocating the norm partials");

  device_rule host = {};
  host.params = *p;
  double* scratch = (double*)calloc((size_t)p->window, sizeof(double));
  zn_zenith_state_init(p, &host.report.state, scratch);
  free(scratch);
  host.report.state.window = s->window;
  CUDA_TRY(cudaMemset(s->window, 0, (size_t)p->window * sizeof(double)), "clearing the window");
  CUDA_TRY(cudaMemcpy(s->rule, &host, sizeof host, cudaMemcpyHostToDevice),
           "copying the rule's state");
  *out = s;
  return ZN_OK;
}

extern "C" void zn_cuda_step_destroy(zn_cuda_step* s) {
  if (!s) return;
  cudaFree(s->rule);
  cudaFree(s->window);
  cudaFree(s->partials);
  free(s);
}

extern "C" int zn_cuda_step_launch(zn_cuda_step* s, float grad_scale, float* w, const float* g_sum,
                                   float* v, size_t n, void* stream) {
  cudaStream_t st = (cudaStream_t)stream;
  sumsq_partial_kernel<<<s->norm_blocks, THREADS, 0, st>>>(g_sum, n, s->partials);
  rate_kernel<<<1, THREADS, 0, st>>>(s->rule, s->partials, s->norm_blocks, grad_scale);
  update_kernel<<<s->update_blocks, THREADS, 0, st>>>(s->rule, w, g_sum, v, n, grad_scale);
  /* Peeks rather than clears, so that the caller can still read the launch's error. */
  return cudaPeekAtLastError() == cudaSuccess ? ZN_OK : ZN_ERR_IO;
}

extern "C" int zn_cuda_step_read(zn_cuda_step* s, zn_zenith_state* state, double* norm,
                                 int* outcome, void* stream) {
  device_rule host;
  cudaStream_t st = (cudaStream_t)stream;
  if (cudaMemcpyAsync(&host, s->rule, sizeof host, cudaMemcpyDeviceToHost, st) != cudaSuccess ||
      cudaMemcpyAsync(state->window, s->window, (size_t)s->params.window * sizeof(double),
                      cudaMemcpyDeviceToHost, st) != cudaSuccess ||
      cudaStreamSynchronize(st) != cudaSuccess)
    return ZN_ERR_IO;
  double* host_window = state->window;
  *state = host.report.state;
  state->window = host_window;
  if (norm) *norm = host.report.norm;
  if (outcome) *outcome = host.report.outcome;
  return ZN_OK;
}

extern "C" int zn_cuda_step_write(zn_cuda_step* s, const zn_zenith_state* state, void* stream) {
  cudaStream_t st = (cudaStream_t)stream;
  device_rule host = {};
  host.params = s->params;
  host.report.state = *state;
  host.report.state.window = s->window;
  host.report.outcome = ZN_STEP_TAKEN;
  /* Both copies are from pageable memory, staged before the calls return; the wait keeps `host`
   * alive until the device has it in any case. */
  if (cudaMemcpyAsync(s->rule, &host, sizeof host, cudaMemcpyHostToDevice, st) != cudaSuccess ||
      cudaMemcpyAsync(s->window, state->window, (size_t)s->params.window * sizeof(double),
                      cudaMemcpyHostToDevice, st) != cudaSuccess ||
      cudaStreamSynchronize(st) != cudaSuccess)
    return ZN_ERR_IO;
  return ZN_OK;
}

extern "C" int zn_cuda_step_report_async(zn_cuda_step* s, zn_cuda_step_report* host, void* stream) {
  cudaError_t e = cudaMemcpyAsync(host, &s->rule->report, sizeof *host, cudaMemcpyDeviceToHost,
                                  (cudaStream_t)stream);
  return e == cudaSuccess ? ZN_OK : ZN_ERR_IO;
}
