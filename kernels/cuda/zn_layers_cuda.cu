/* The GPU model's small kernels; see zn_layers_cuda.h.
 *
 * Launch geometry. The elementwise kernels (bias, ReLU) run grid-stride loops of 256-thread
 * blocks, at most MAX_BLOCKS of them: enough to fill an H200 several times over, and no
 * reduction depends on the grid. The bias gradient runs one 256-thread block per channel: thread
 * t adds elements t, t + 256, ... of its channel in that order, in double, and the block then
 * adds its 256 sums in a fixed tree, so each sum's bits depend only on the data. The loss runs
 * one block for the whole batch, each thread taking rows t, t + 256, ..., the same way. */
#include "zn_layers_cuda.h"

#include <cuda_runtime.h>

#define THREADS 256
#define MAX_BLOCKS 4096

static int grid_for(size_t count) {
  size_t blocks = (count + THREADS - 1) / THREADS;
  return blocks > MAX_BLOCKS ? MAX_BLOCKS : (int)blocks;
}

static int launch_status(void) {
  return (int)cudaGetLastError();
}

/* Adds the THREADS values of `shared` into shared[0] in a fixed tree; every thread must call it. */
template <typename T>
__device__ static void block_sum(T* shared) {
  for (int width = THREADS / 2; width > 0; width /= 2) {
    __syncthreads();
    if (threadIdx.x < width) shared[threadIdx.x] += shared[threadIdx.x + width];
  }
  __syncthreads();
}

__global__ static void bias_forward_kernel(float* y, const float* bias, size_t count, int channels,
                                           int inner, int relu) {
  size_t stride = (size_t)gridDim.x * THREADS;
  for (size_t i = (size_t)blockIdx.x * THREADS + threadIdx.x; i < count; i += stride) {
    float v = y[i] + bias[(i / (size_t)inner) % (size_t)channels];
    y[i] = relu && !(v > 0.0f) ? 0.0f : v;
  }
}

__global__ static void relu_backward_kernel(const float* y, const float* dy, float* dx,
                                            size_t count) {
  size_t stride = (size_t)gridDim.x * THREADS;
  for (size_t i = (size_t)blockIdx.x * THREADS + threadIdx.x; i < count; i += stride)
    dx[i] = y[i] > 0.0f ? dy[i] : 0.0f;
}

/* Block c sums channel c. */
__global__ static void bias_backward_kernel(const float* dy, float* dbias, int rows, int channels,
                                            int inner) {
  __shared__ double shared[THREADS];
  int c = blockIdx.x;
  size_t per_channel = (size_t)rows * (size_t)inner;
  double acc = 0.0;
  for (size_t j = threadIdx.x; j < per_channel; j += THREADS) {
    size_t r = j / (size_t)inner, i = j % (size_t)inner;
    acc += (double)dy[(r * (size_t)channels + (size_t)c) * (size_t)inner + i];
  }
  shared[threadIdx.x] = acc;
  block_sum(shared);
  if (threadIdx.x == 0) dbias[c] = (float)shared[0];
}

/* One row of the loss: returns its loss (NaN for a bad label), counts a correct prediction and
 * writes the row's gradient when d is not NULL. */
__device__ static double xent_row(const float* z, int label, int n, int k, float* d, int* correct) {
  int best = 0;
  for (int j = 1; j < k; j++)
    if (z[j] > z[best]) best = j;
  int valid = label < k;
  *correct += valid && best == label;

  /* Shifted by the maximum so exp never overflows; in double, as on the CPU, so the loss of a
   * confident prediction keeps float precision. */
  double zmax = z[best], sum = 0.0;
  for (int j = 0; j < k; j++) sum += exp((double)z[j] - zmax);
  double lse = zmax + log(sum);

  if (d)
    for (int j = 0; j < k; j++) {
      double p = exp((double)z[j] - lse);
      d[j] = valid ? (float)((p - (j == label)) / n) : 0.0f;
    }
  return valid ? lse - z[label] : nan("");
}

__global__ static void softmax_xent_kernel(const float* logits, const uint8_t* labels, int n, int k,
                                           float* dlogits, float* mean_loss, double* sums) {
  __shared__ double loss[THREADS];
  __shared__ int right[THREADS];
  double acc = 0.0;
  int correct = 0;
  for (int r = threadIdx.x; r < n; r += THREADS) {
    float* d = dlogits ? dlogits + (size_t)r * k : NULL;
    acc += xent_row(logits + (size_t)r * k, labels[r], n, k, d, &correct);
  }
  loss[threadIdx.x] = acc;
  right[threadIdx.x] = correct;
  block_sum(loss);
  block_sum(right);
  if (threadIdx.x != 0) return;
  if (mean_loss) *mean_loss = (float)(loss[0] / n);
  if (sums) {
    sums[0] += loss[0];
    sums[1] += (double)right[0];
  }
}

extern "C" int zn_cuda_bias_forward(float* y, const float* bias, int rows, int channels, int inner,
                                    int relu, void* stream) {
  size_t count = (size_t)rows * (size_t)channels * (size_t)inner;
  if (count == 0) return (int)cudaSuccess;
  bias_forward_kernel<<<grid_for(count), THREADS, 0, (cudaStream_t)stream>>>(y, bias, count,
                                                                             channels, inner, relu);
  return launch_status();
}

extern "C" int zn_cuda_relu_backward(const float* y, const float* dy, float* dx, size_t count,
                                     void* stream) {
  if (count == 0) return (int)cudaSuccess;
  relu_backward_kernel<<<grid_for(count), THREADS, 0, (cudaStream_t)stream>>>(y, dy, dx, count);
  return launch_status();
}

extern "C" int zn_cuda_bias_backward(const float* dy, float* dbias, int rows, int channels,
                                     int inner, void* stream) {
  if (channels <= 0) return (int)cudaSuccess;
  bias_backward_kernel<<<channels, THREADS, 0, (cudaStream_t)stream>>>(dy, dbias, rows, channels,
                                                                       inner);
  return launch_status();
}

extern "C" int zn_cuda_softmax_xent(const float* logits, const uint8_t* labels, int n, int k,
                                    float* dlogits, float* mean_loss, double* sums, void* stream) {
  if (n <= 0 || k <= 0) return (int)cudaErrorInvalidValue;
  softmax_xent_kernel<<<1, THREADS, 0, (cudaStream_t)stream>>>(logits, labels, n, k, dlogits,
                                                               mean_loss, sums);
  return launch_status();
}
