/* The batch kernels; see zn_batch_cuda.h. One block per image: its threads copy the image's
 * pixels (784 for Fashion-MNIST) with coalesced loads. */
#include "zn_batch_cuda.h"

#include <cuda_runtime.h>

#include "zn_err.h"

#define THREADS 256

__global__ static void gather_kernel(const float* images, const uint8_t* labels, int pixels,
                                     const uint32_t* perm, const int64_t* cursor, int64_t stride,
                                     int64_t offset, float* x, uint8_t* y) {
  int i = blockIdx.x;
  uint32_t j = perm[*cursor * stride + offset + i];
  const float* src = images + (size_t)j * pixels;
  float* dst = x + (size_t)i * pixels;
  for (int p = threadIdx.x; p < pixels; p += THREADS) dst[p] = src[p];
  if (threadIdx.x == 0) y[i] = labels[j];
}

__global__ static void advance_kernel(int64_t* cursor) {
  *cursor += 1;
}

/* Peeks rather than clears, so that the caller can still read the launch's error. */
static int launched(void) {
  return cudaPeekAtLastError() == cudaSuccess ? ZN_OK : ZN_ERR_IO;
}

extern "C" int zn_cuda_gather_batch(const float* images, const uint8_t* labels, int pixels,
                                    const uint32_t* perm, const int64_t* cursor, int64_t stride,
                                    int64_t offset, int n, float* x, uint8_t* y, void* stream) {
  if (n <= 0) return ZN_OK;
  gather_kernel<<<n, THREADS, 0, (cudaStream_t)stream>>>(images, labels, pixels, perm, cursor,
                                                         stride, offset, x, y);
  return launched();
}

extern "C" int zn_cuda_advance_cursor(int64_t* cursor, void* stream) {
  advance_kernel<<<1, 1, 0, (cudaStream_t)stream>>>(cursor);
  return launched();
}
