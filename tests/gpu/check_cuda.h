/* What the GPU check programs share: a CUDA call that fails ends the check at once, naming the
 * call, its line and CUDA's reason (a check cannot go on without its device buffers). */
#ifndef ZN_CHECK_CUDA_H
#define ZN_CHECK_CUDA_H

#include <cuda_runtime_api.h>
#include <stdio.h>
#include <stdlib.h>

#define CHECK_CUDA(expr)                                                                     \
  do {                                                                                       \
    cudaError_t e_ = (expr);                                                                 \
    if (e_ != cudaSuccess) {                                                                 \
      fprintf(stderr, "%s:%d: %s: %s\n", __FILE__, __LINE__, #expr, cudaGetErrorString(e_)); \
      exit(1);                                                                               \
    }                                                                                        \
  } while (0)

#endif
