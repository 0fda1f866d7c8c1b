/* The GPU probe; see gpu_probe.h. Built with the CUDA runtime where the GPU
 * trainer is (ZN_HAVE_GPU_TRAINING: CUDA, cuDNN and NCCL were all found), and
 * as an answer of "no" everywhere else, so the worker asks the same question
 * in every build. */
#include "gpu_probe.h"

#include <stdio.h>

#ifdef ZN_HAVE_GPU_TRAINING
#include <cuda_runtime_api.h>

int zn_gpu_probe(int index, char* text, size_t len) {
  int count = 0;
  cudaError_t rc = cudaGetDeviceCount(&count);
  if (rc != cudaSuccess) {
    snprintf(text, len, "cudaGetDeviceCount failed: %s", cudaGetErrorString(rc));
    return -1;
  }
  if (count == 0) {
    snprintf(text, len, "cudaGetDeviceCount found no CUDA device");
    return -1;
  }
  if (index >= count) {
    snprintf(text, len, "there is no CUDA device %d: this machine has %d (0 to %d)", index, count,
             count - 1);
    return -1;
  }
  struct cudaDeviceProp prop;
  rc = cudaGetDeviceProperties(&prop, index);
  if (rc != cudaSuccess) {
    snprintf(text, len, "cudaGetDeviceProperties(%d) failed: %s", index, cudaGetErrorString(rc));
    return -1;
  }
  snprintf(text, len, "%s", prop.name);
  return 0;
}

#else

int zn_gpu_probe(int index, char* text, size_t len) {
  (void)index;
#ifdef ZN_HAVE_CUDA
  snprintf(text, len, "this build has no GPU training: cuDNN or NCCL was not found when it was "
                      "configured");
#else
  snprintf(text, len, "this build has no CUDA support");
#endif
  return -1;
}

#endif
