/* The small kernels of the GPU model (daemon/worker/zn_gpu_model.c) that cuBLAS and cuDNN do not
 * provide: bias and ReLU, the softmax cross-entropy loss with its gradient, and the bias
 * gradient. Their semantics are those of the CPU layers in kernels/zn_layers.h.
 *
 * Every launcher only queues work on `stream` (a cudaStream_t) and returns the launch's
 * cudaError_t as an int, 0 (cudaSuccess) when it was queued: nothing allocates or synchronises,
 * so the launches can be captured in a CUDA graph. All pointers are device pointers.
 *
 * Determinism. The reductions (the loss and the bias gradient) give every element to a fixed
 * thread, add in a fixed order and combine the threads' sums in a fixed tree, in double; no
 * atomics. So two runs on the same input give the same bits, whatever the timing. */
#ifndef ZN_LAYERS_CUDA_H
#define ZN_LAYERS_CUDA_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* y is [rows][channels][inner] (inner = 1 for a Linear output [n][out], h*w for an NCHW
 * convolution output): y += bias[channel], then y = max(y, 0) when relu is set. In place. */
int zn_cuda_bias_forward(float* y, const float* bias, int rows, int channels, int inner, int relu,
                         void* stream);

/* dx = dy where the forward OUTPUT y > 0, else 0 (PyTorch's convention at 0); dx may be dy. */
int zn_cuda_relu_backward(const float* y, const float* dy, float* dx, size_t count, void* stream);

/* dbias[c] = the sum of dy[r][c][i] over every row r and inner index i (overwritten). */
int zn_cuda_bias_backward(const float* dy, float* dbias, int rows, int channels, int inner,
                          void* stream);

/* Softmax cross-entropy over logits[n][k] with labels[n] in [0, k), as zn_softmax_xent: the
 * log-sum-exp in double after a shift by the row's maximum. Each output may be NULL:
 *   dlogits[n][k]  d(mean loss)/d(logits) (may not alias logits);
 *   mean_loss      the mean loss over the n rows, as a float;
 *   sums           sums[0] += the sum of the n losses, sums[1] += the number of rows whose first
 *                  maximal logit is the label (doubles, added to).
 * A label outside [0, k) makes its row's loss NaN and its gradient row zero. One block does the
 * whole batch: the work is n*k exponentials, far too little to spread over the GPU. */
int zn_cuda_softmax_xent(const float* logits, const uint8_t* labels, int n, int k, float* dlogits,
                         float* mean_loss, double* sums, void* stream);

#ifdef __cplusplus
}
#endif

#endif
