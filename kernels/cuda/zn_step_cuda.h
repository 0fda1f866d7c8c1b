/* The ZENITH step on an NVIDIA GPU: the global norm of the reduced gradient,
 * the rate rule and the fused update, all on the device, so that a step
 * needs no round trip to the host.
 *
 * Three kernels run in order on one stream: block partial sums of squares
 * (double), a one-block kernel that adds the partials in a fixed order, forms
 * n_t and applies the rate rule of zenith_rule.h to a state kept in device
 * memory, and the update, which reads eta_t and the step's outcome from that
 * state. The grid of the first kernel is fixed when the step is created, so
 * the norm's bits never depend on timing. */
#ifndef ZN_STEP_CUDA_H
#define ZN_STEP_CUDA_H

#include <stddef.h>

#include "zenith_rule.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct zn_cuda_step zn_cuda_step;

/* What a step leaves for the host to read: the rule's state after it (its window pointer is
 * meaningless on the host), n_t and the step's zn_step_outcome. */
typedef struct {
  zn_zenith_state state;
  double norm;
  int outcome;
} zn_cuda_step_report;

/* For up to n parameters; allocates the window and the partials on the
 * current device. 0, or a negative zn_err code with err filled. */
int zn_cuda_step_create(const zn_zenith_params* p, size_t n, zn_cuda_step** out, char* err,
                        size_t errlen);
void zn_cuda_step_destroy(zn_cuda_step* s);

/* Queues one step on `stream` (a cudaStream_t; NULL for the default stream).
 * w, g_sum and v are device buffers of n floats, 16-byte aligned (as
 * cudaMalloc returns them); g_sum is the allreduced SUM, scaled by grad_scale. */
int zn_cuda_step_launch(zn_cuda_step* s, float grad_scale, float* w, const float* g_sum, float* v,
                        size_t n, void* stream);

/* Waits for the stream's work and copies the rule's state to the host:
 * *state (its window must hold params.window doubles), the last n_t and the
 * last outcome. */
int zn_cuda_step_read(zn_cuda_step* s, zn_zenith_state* state, double* norm, int* outcome,
                      void* stream);

/* Replaces the rule's state on the device with *state (whose window holds params.window doubles
 * in ring order, as zn_zenith_state keeps them): how a resumed checkpoint continues. Waits for
 * the stream. */
int zn_cuda_step_write(zn_cuda_step* s, const zn_zenith_state* state, void* stream);

/* Queues a copy of the last step's report into *host (pinned memory, so the copy is
 * asynchronous) on `stream`; it is there once the stream has passed this point. */
int zn_cuda_step_report_async(zn_cuda_step* s, zn_cuda_step_report* host, void* stream);

#ifdef __cplusplus
}
#endif

#endif
