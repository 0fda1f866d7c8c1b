/* Batches for GPU training, assembled on the device from a data set kept there, so a training
 * step reads nothing from the host and can be replayed as a CUDA graph.
 *
 * The epoch's order (a permutation of the training set) lives on the device, and so does a step
 * cursor: the gather reads the cursor to find this step's slice of the order, and the step
 * advances it at its end. Both kernels' arguments stay the same from step to step, which is what
 * lets a captured graph be replayed. */
#ifndef ZN_BATCH_CUDA_H
#define ZN_BATCH_CUDA_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* For i < n, with j = perm[*cursor * stride + offset + i]: x[i] = images[j] (pixels floats)
 * and y[i] = labels[j]. All pointers are device pointers; queued on `stream`. */
int zn_cuda_gather_batch(const float* images, const uint8_t* labels, int pixels,
                         const uint32_t* perm, const int64_t* cursor, int64_t stride,
                         int64_t offset, int n, float* x, uint8_t* y, void* stream);

/* *cursor += 1, queued on `stream`. */
int zn_cuda_advance_cursor(int64_t* cursor, void* stream);

#ifdef __cplusplus
}
#endif

#endif
