/* The CPU layers the worker's models are built from: Linear, Conv2d (stride 1, zero padding),
 * ReLU, 2x2 max pooling and softmax cross-entropy, in float32, with the GEMMs in OpenBLAS.
 *
 * Layouts. Linear activations are batch-major, x[n][in], and weights are stored the way PyTorch
 * stores them (Linear w[out][in], Conv2d w[cout][cin][k][k]) so a flat parameter buffer matches a
 * state_dict tensor for tensor. Convolution activations are channel-major, x[c][n][h][w]
 * ("CNHW"): then one im2col buffer col[cin*k*k][n*ho*wo] covers the whole batch and the
 * convolution is ONE large GEMM, y[cout][n*ho*wo] = w[cout][cin*k*k] * col, instead of n small
 * ones. For a single input channel (an image batch [n][1][h][w]) CNHW and NCHW are the same bytes.
 * The pooling layer is where the layout may change back: it can write NCHW, the order PyTorch's
 * flatten sees before a Linear layer.
 *
 * Pooling phases. A convolution followed by 2x2 pooling can order each image's output pixels by
 * pooling phase instead of row-major: four planes [4][ho/2][wo/2], plane q = 2*(oh%2) + ow%2
 * holding the pixels (2*ph + q/2, 2*pw + q%2). The four candidates of every pooling window then
 * sit at the same index of four contiguous planes, and the pooling passes become elementwise
 * (vectorisable) max and select loops instead of strided gathers. The phase-ordered paths keep
 * their per-plane scratch on the stack, which bounds them to padded inputs of up to 64 x 64 and
 * (k/2 + 1)^2 * ho * wo <= 8192; the row-major paths have no such bound.
 *
 * The Linear backward OVERWRITES its gradients; the convolution and pooling backwards overwrite
 * or, with accumulate set, add to them, so a batch can be run through in chunks of images that
 * stay in cache. */
#ifndef ZN_LAYERS_H
#define ZN_LAYERS_H

#include <stddef.h>
#include <stdint.h>

/* y[n][out] = x[n][in] w[out][in]^T + b[out]. */
void zn_linear_forward(const float* x, const float* w, const float* b, float* y, int n, int in,
                       int out);

/* From dy[n][out]: dw[out][in] and db[out] (overwritten) and, when dx is not NULL, dx[n][in]. */
void zn_linear_backward(const float* x, const float* w, const float* dy, float* dx, float* dw,
                        float* db, int n, int in, int out);

/* y = max(x, 0) elementwise; y may be x. */
void zn_relu_forward(const float* x, float* y, size_t count);

/* dx = dy where the forward OUTPUT y > 0, else 0 (PyTorch's convention at 0); dx may be dy. */
void zn_relu_backward(const float* y, const float* dy, float* dx, size_t count);

/* A stride-1 convolution with zero padding: input x[cin][n][h][w], weights w[cout][cin][k][k],
 * output y[cout][n][ho][wo] with ho = h + 2*pad - k + 1 and wo likewise. */
typedef struct {
  int n, cin, h, w;
  int cout, k, pad;
  int phases; /* order each image's output pixels by pooling phase (ho, wo even) */
} zn_conv2d_shape;

int zn_conv2d_out_h(const zn_conv2d_shape* s);
int zn_conv2d_out_w(const zn_conv2d_shape* s);

/* Floats in the col buffer: cin*k*k rows of n*ho*wo. */
size_t zn_conv2d_col_floats(const zn_conv2d_shape* s);

/* col[cin*k*k][n*ho*wo] = the k*k shifted, zero-padded copies of every input plane (each image's
 * ho*wo columns in phase order when s->phases is set). */
void zn_im2col(const zn_conv2d_shape* s, const float* x, float* col);

/* Fills col with im2col(x) and computes y = conv(x, w) + b; b may be NULL (no bias: the model
 * adds it in the pooling pass instead). The caller keeps col for the backward pass. */
void zn_conv2d_forward(const zn_conv2d_shape* s, const float* x, const float* w, const float* b,
                       float* col, float* y);

/* From dy[cout][n][ho][wo] and col = im2col(x) as the forward left it: dw, db when not NULL
 * (both overwritten, or added to when accumulate is set), and dx[cin][n][h][w] (overwritten)
 * when not NULL. col is clobbered when dx is asked for: it becomes the column gradient before
 * being folded back into dx. */
void zn_conv2d_backward(const zn_conv2d_shape* s, const float* w, const float* dy, float* col,
                        float* dx, float* dw, float* db, int accumulate);

/* 2x2, stride-2 max pooling over x[c][n][h][w] (odd h or w drop their last row or column, as
 * PyTorch does). When bias is not NULL, bias[c] is added first; when relu is set, ReLU is applied
 * first. Both commute with the max, so they cost nothing beyond the pooling pass:
 * max(relu(x + b)) = relu(max(x) + b). */
typedef struct {
  int c, n, h, w;
  int relu;      /* apply ReLU before pooling */
  int out_nchw;  /* write y (and arg) as [n][c][h/2][w/2] instead of [c][n][h/2][w/2] */
  int in_phases; /* x (and dx) planes are in pooling-phase order (h, w even) */
} zn_pool_shape;

/* y and arg have c*n*(h/2)*(w/2) entries; arg[i] in 0..3 is the winner's position in its window
 * (row-major; the first of equal maxima wins, as in PyTorch). */
void zn_maxpool2_forward(const zn_pool_shape* s, const float* x, const float* bias, float* y,
                         uint8_t* arg);

/* dx[c][n][h][w] (every element written) gets dy at each window's winner, zero elsewhere and
 * zero where relu is set and the pooled output y was not positive. dbias (may be NULL) gets the
 * per-channel sum of what reached dx: overwritten, or added to when accumulate is set. */
void zn_maxpool2_backward(const zn_pool_shape* s, const float* dy, const float* y,
                          const uint8_t* arg, float* dx, float* dbias, int accumulate);

/* Softmax cross-entropy over logits[n][k] with labels[n] in [0, k): returns the mean loss over
 * the n rows, computed in double. *correct (may be NULL) counts rows whose first maximal logit
 * is the label. dlogits (may be NULL; may be logits) gets d(mean loss)/d(logits). */
double zn_softmax_xent(const float* logits, const uint8_t* labels, int n, int k, float* dlogits,
                       int* correct);

#endif
