/* The CPU layers against double precision. Each forward is compared with a naive double-precision
 * loop written independently of im2col and GEMM; each backward is compared with central finite
 * differences of that double-precision forward, taken on the scalar L = sum(r * y) for a fixed
 * random r, so dy = r. In double, a step of 1e-6 leaves a truncation and rounding error near
 * 1e-9, far below what is checked, and the piecewise-linear layers (ReLU, max pooling) are exactly
 * linear over the step because no random input lies within 1e-6 of a kink.
 *
 * Error measure, per tensor: max|ours - reference| / max|reference|. Tolerances: 1e-5 for
 * forwards (float rounding of sums of up to ~100 products) and 1e-4 for gradients. */
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "zn_layers.h"

#define FWD_TOL 1e-5
#define GRAD_TOL 1e-4
#define FD_EPS 1e-6

/* ---- helpers ---- */

static uint64_t rng_state = 0x9E3779B97F4A7C15ull;

static double uniform(double lo, double hi) {
  rng_state ^= rng_state << 13;
  rng_state ^= rng_state >> 7;
  rng_state ^= rng_state << 17;
  return lo + (hi - lo) * (double)(rng_state >> 11) * 0x1.0p-53;
}

/* Random values that are exactly representable as floats, held in both precisions. */
static void fill(double* d, float* f, size_t n, double lo, double hi) {
  for (size_t i = 0; i < n; i++) {
    f[i] = (float)uniform(lo, hi);
    d[i] = f[i];
  }
}

static double* dalloc(size_t n) {
  double* p = calloc(n ? n : 1, sizeof(double));
  assert_non_null(p);
  return p;
}

static float* falloc(size_t n) {
  float* p = calloc(n ? n : 1, sizeof(float));
  assert_non_null(p);
  return p;
}

/* Fails, printing the worst element on both sides, when max|a-b|/max|b| exceeds tol. */
static void expect_close(const char* what, const float* a, const double* b, size_t n, double tol) {
  double maxdiff = 0.0, maxref = 0.0;
  size_t worst = 0;
  for (size_t i = 0; i < n; i++) {
    double d = fabs(a[i] - b[i]);
    if (d > maxdiff) maxdiff = d, worst = i;
    if (fabs(b[i]) > maxref) maxref = fabs(b[i]);
  }
  double rel = maxref > 0.0 ? maxdiff / maxref : maxdiff;
  if (rel > tol || maxref == 0.0)
    fail_msg("%s: rel err %.3e > %.1e (max|ref| %.3e); worst [%zu]: ours %.9g, reference %.9g",
             what, rel, tol, maxref, worst, (double)a[worst], b[worst]);
}

typedef double (*loss_fn)(void* ctx);

/* g[i] = dL/dv[i] by central differences, v being one of the arrays the loss reads. */
static void fd_grad(loss_fn loss, void* ctx, double* v, size_t n, double* g) {
  for (size_t i = 0; i < n; i++) {
    double keep = v[i];
    v[i] = keep + FD_EPS;
    double up = loss(ctx);
    v[i] = keep - FD_EPS;
    double down = loss(ctx);
    v[i] = keep;
    g[i] = (up - down) / (2.0 * FD_EPS);
  }
}

static double dot(const double* a, const double* b, size_t n) {
  double s = 0.0;
  for (size_t i = 0; i < n; i++) s += a[i] * b[i];
  return s;
}

/* ---- Linear ---- */

typedef struct {
  int n, in, out;
  double *x, *w, *b, *r, *y;
} linear_ctx;

static void linear_ref(linear_ctx* c) {
  for (int i = 0; i < c->n; i++)
    for (int o = 0; o < c->out; o++) {
      double s = c->b[o];
      for (int j = 0; j < c->in; j++) s += c->x[i * c->in + j] * c->w[o * c->in + j];
      c->y[i * c->out + o] = s;
    }
}

static double linear_loss(void* ctx) {
  linear_ctx* c = ctx;
  linear_ref(c);
  return dot(c->r, c->y, (size_t)c->n * c->out);
}

static void linear_matches_double_reference_and_finite_differences(void** state) {
  linear_ctx c = {.n = 5, .in = 13, .out = 7};
  size_t nx = (size_t)c.n * c.in, nw = (size_t)c.out * c.in, ny = (size_t)c.n * c.out;
  c.x = dalloc(nx), c.w = dalloc(nw), c.b = dalloc(c.out), c.r = dalloc(ny), c.y = dalloc(ny);
  float *x = falloc(nx), *w = falloc(nw), *b = falloc(c.out), *r = falloc(ny), *y = falloc(ny);
  fill(c.x, x, nx, -1, 1), fill(c.w, w, nw, -1, 1), fill(c.b, b, c.out, -1, 1);
  fill(c.r, r, ny, -1, 1);

  zn_linear_forward(x, w, b, y, c.n, c.in, c.out);
  linear_ref(&c);
  expect_close("linear y", y, c.y, ny, FWD_TOL);

  float *dx = falloc(nx), *dw = falloc(nw), *db = falloc(c.out);
  double *gx = dalloc(nx), *gw = dalloc(nw), *gb = dalloc(c.out);
  zn_linear_backward(x, w, r, dx, dw, db, c.n, c.in, c.out);
  fd_grad(linear_loss, &c, c.x, nx, gx);
  fd_grad(linear_loss, &c, c.w, nw, gw);
  fd_grad(linear_loss, &c, c.b, c.out, gb);
  expect_close("linear dx", dx, gx, nx, GRAD_TOL);
  expect_close("linear dw", dw, gw, nw, GRAD_TOL);
  expect_close("linear db", db, gb, c.out, GRAD_TOL);

  free(c.x), free(c.w), free(c.b), free(c.r), free(c.y), free(x), free(w), free(b), free(r);
  free(y), free(dx), free(dw), free(db), free(gx), free(gw), free(gb);
}

/* ---- ReLU ---- */

typedef struct {
  size_t n;
  double *x, *r;
} relu_ctx;

static double relu_loss(void* ctx) {
  relu_ctx* c = ctx;
  double s = 0.0;
  for (size_t i = 0; i < c->n; i++) s += c->r[i] * (c->x[i] > 0.0 ? c->x[i] : 0.0);
  return s;
}

static void relu_matches_finite_differences_and_zeroes_negatives(void** state) {
  relu_ctx c = {.n = 64};
  c.x = dalloc(c.n), c.r = dalloc(c.n);
  float *x = falloc(c.n), *r = falloc(c.n), *y = falloc(c.n), *dx = falloc(c.n);
  double *yref = dalloc(c.n), *g = dalloc(c.n);
  fill(c.x, x, c.n, -1, 1), fill(c.r, r, c.n, -1, 1);

  zn_relu_forward(x, y, c.n);
  for (size_t i = 0; i < c.n; i++) yref[i] = c.x[i] > 0.0 ? c.x[i] : 0.0;
  expect_close("relu y", y, yref, c.n, 0.0);

  zn_relu_backward(y, r, dx, c.n);
  fd_grad(relu_loss, &c, c.x, c.n, g);
  expect_close("relu dx", dx, g, c.n, GRAD_TOL);

  free(c.x), free(c.r), free(x), free(r), free(y), free(dx), free(yref), free(g);
}

/* ---- Conv2d ---- */

typedef struct {
  zn_conv2d_shape s;
  double *x, *w, *b, *r, *y;
} conv_ctx;

/* Where output pixel (oh, ow) sits within its image's plane: row-major, or in pooling-phase
 * order [4][ho/2][wo/2] with phase 2*(oh%2) + ow%2. */
static size_t out_index(int phases, int ho, int wo, int oh, int ow) {
  if (!phases) return (size_t)oh * wo + ow;
  return ((size_t)(2 * (oh % 2) + ow % 2) * (ho / 2) + oh / 2) * (wo / 2) + ow / 2;
}

/* Direct convolution on CNHW activations, straight from the definition. */
static void conv_ref(conv_ctx* c) {
  const zn_conv2d_shape* s = &c->s;
  int ho = zn_conv2d_out_h(s), wo = zn_conv2d_out_w(s);
  for (int o = 0; o < s->cout; o++)
    for (int i = 0; i < s->n; i++)
      for (int oh = 0; oh < ho; oh++)
        for (int ow = 0; ow < wo; ow++) {
          double acc = c->b[o];
          for (int ci = 0; ci < s->cin; ci++)
            for (int kh = 0; kh < s->k; kh++)
              for (int kw = 0; kw < s->k; kw++) {
                int ih = oh + kh - s->pad, iw = ow + kw - s->pad;
                if (ih < 0 || ih >= s->h || iw < 0 || iw >= s->w) continue;
                acc += c->w[((o * s->cin + ci) * s->k + kh) * s->k + kw] *
                       c->x[((ci * s->n + i) * s->h + ih) * s->w + iw];
              }
          c->y[((size_t)o * s->n + i) * ho * wo + out_index(s->phases, ho, wo, oh, ow)] = acc;
        }
}

static double conv_loss(void* ctx) {
  conv_ctx* c = ctx;
  conv_ref(c);
  return dot(c->r, c->y,
             (size_t)c->s.cout * c->s.n * zn_conv2d_out_h(&c->s) * zn_conv2d_out_w(&c->s));
}

static void check_conv(zn_conv2d_shape s) {
  conv_ctx c = {.s = s};
  size_t nx = (size_t)s.cin * s.n * s.h * s.w, nw = (size_t)s.cout * s.cin * s.k * s.k;
  size_t ny = (size_t)s.cout * s.n * zn_conv2d_out_h(&s) * zn_conv2d_out_w(&s);
  c.x = dalloc(nx), c.w = dalloc(nw), c.b = dalloc(s.cout), c.r = dalloc(ny), c.y = dalloc(ny);
  float *x = falloc(nx), *w = falloc(nw), *b = falloc(s.cout), *r = falloc(ny), *y = falloc(ny);
  float* col = falloc(zn_conv2d_col_floats(&s));
  fill(c.x, x, nx, -1, 1), fill(c.w, w, nw, -1, 1), fill(c.b, b, s.cout, -1, 1);
  fill(c.r, r, ny, -1, 1);

  zn_conv2d_forward(&s, x, w, b, col, y);
  conv_ref(&c);
  expect_close("conv y", y, c.y, ny, FWD_TOL);

  float *dx = falloc(nx), *dw = falloc(nw), *db = falloc(s.cout);
  double *gx = dalloc(nx), *gw = dalloc(nw), *gb = dalloc(s.cout);
  zn_conv2d_backward(&s, w, r, col, dx, dw, db, 0);
  fd_grad(conv_loss, &c, c.x, nx, gx);
  fd_grad(conv_loss, &c, c.w, nw, gw);
  fd_grad(conv_loss, &c, c.b, s.cout, gb);
  expect_close("conv dx", dx, gx, nx, GRAD_TOL);
  expect_close("conv dw", dw, gw, nw, GRAD_TOL);
  expect_close("conv db", db, gb, s.cout, GRAD_TOL);

  free(c.x), free(c.w), free(c.b), free(c.r), free(c.y), free(x), free(w), free(b), free(r);
  free(y), free(col), free(dx), free(dw), free(db), free(gx), free(gw), free(gb);
}

static void conv2d_3x3_pad1_matches_reference_and_finite_differences(void** state) {
  check_conv((zn_conv2d_shape){.n = 3, .cin = 2, .h = 6, .w = 5, .cout = 4, .k = 3, .pad = 1});
}

static void conv2d_unpadded_and_wide_padding_match_reference(void** state) {
  check_conv((zn_conv2d_shape){.n = 2, .cin = 3, .h = 5, .w = 7, .cout = 2, .k = 3, .pad = 0});
  check_conv((zn_conv2d_shape){.n = 2, .cin = 2, .h = 4, .w = 6, .cout = 3, .k = 5, .pad = 2});
}

static void conv2d_in_pooling_phase_order_matches_reference(void** state) {
  check_conv((zn_conv2d_shape){
      .n = 3, .cin = 2, .h = 6, .w = 8, .cout = 4, .k = 3, .pad = 1, .phases = 1});
  check_conv((zn_conv2d_shape){
      .n = 2, .cin = 2, .h = 7, .w = 5, .cout = 3, .k = 4, .pad = 1, .phases = 1});
}

/* Accumulating backward passes over two halves of a batch must give the one-pass gradients. */
static void conv2d_backward_accumulates_over_chunks(void** state) {
  zn_conv2d_shape s = {.n = 4, .cin = 2, .h = 6, .w = 6, .cout = 3, .k = 3, .pad = 1};
  zn_conv2d_shape half = s;
  half.n = 2;
  size_t nx = (size_t)s.cin * s.n * 36, ny = (size_t)s.cout * s.n * 36, nw = (size_t)3 * 2 * 9;
  double *dd = dalloc(ny + nx), ref_w[54], ref_b[3];
  float *x = falloc(nx), *dy = falloc(ny), *w = falloc(nw), *col = falloc(zn_conv2d_col_floats(&s));
  float *xh = falloc(nx / 2), *dyh = falloc(ny / 2), dw[54], db[3], dw1[54], db1[3];
  fill(dd, x, nx, -1, 1), fill(dd, dy, ny, -1, 1), fill(dd, w, nw, -1, 1);

  zn_im2col(&s, x, col);
  zn_conv2d_backward(&s, w, dy, col, NULL, dw1, db1, 0);
  for (int i = 0; i < 54; i++) ref_w[i] = dw1[i];
  for (int i = 0; i < 3; i++) ref_b[i] = db1[i];

  /* CNHW: image half h of channel c is the contiguous run [c][2h .. 2h+1]. */
  for (int h = 0; h < 2; h++) {
    for (int c = 0; c < s.cin; c++) memcpy(xh + c * 72, x + (c * 4 + 2 * h) * 36, 72 * 4);
    for (int c = 0; c < s.cout; c++) memcpy(dyh + c * 72, dy + (c * 4 + 2 * h) * 36, 72 * 4);
    zn_im2col(&half, xh, col);
    zn_conv2d_backward(&half, w, dyh, col, NULL, dw, db, h);
  }
  expect_close("chunked dw", dw, ref_w, 54, 1e-6);
  expect_close("chunked db", db, ref_b, 3, 1e-6);
  free(dd), free(x), free(dy), free(w), free(col), free(xh), free(dyh);
}

/* ---- MaxPool2d 2x2 (with the optional fused bias and ReLU) ---- */

typedef struct {
  zn_pool_shape s;
  double *x, *b, *r, *y;
} pool_ctx;

static void pool_ref(pool_ctx* c) {
  const zn_pool_shape* s = &c->s;
  int ho = s->h / 2, wo = s->w / 2;
  for (int ch = 0; ch < s->c; ch++)
    for (int i = 0; i < s->n; i++)
      for (int oh = 0; oh < ho; oh++)
        for (int ow = 0; ow < wo; ow++) {
          double m = -INFINITY;
          for (int q = 0; q < 4; q++) {
            size_t plane = ((size_t)ch * s->n + i) * s->h * s->w;
            double v =
                c->x[plane + out_index(s->in_phases, s->h, s->w, 2 * oh + q / 2, 2 * ow + q % 2)];
            v += c->b[ch];
            if (s->relu && v < 0.0) v = 0.0;
            if (v > m) m = v;
          }
          size_t out = s->out_nchw ? (size_t)i * s->c + ch : (size_t)ch * s->n + i;
          c->y[(out * ho + oh) * wo + ow] = m;
        }
}

static double pool_loss(void* ctx) {
  pool_ctx* c = ctx;
  pool_ref(c);
  return dot(c->r, c->y, (size_t)c->s.c * c->s.n * (c->s.h / 2) * (c->s.w / 2));
}

static void check_pool(zn_pool_shape s) {
  pool_ctx c = {.s = s};
  size_t nx = (size_t)s.c * s.n * s.h * s.w, ny = (size_t)s.c * s.n * (s.h / 2) * (s.w / 2);
  c.x = dalloc(nx), c.b = dalloc(s.c), c.r = dalloc(ny), c.y = dalloc(ny);
  float *x = falloc(nx), *b = falloc(s.c), *r = falloc(ny), *y = falloc(ny);
  uint8_t* arg = calloc(ny, 1);
  fill(c.x, x, nx, -1, 1), fill(c.b, b, s.c, -0.3, 0.3), fill(c.r, r, ny, -1, 1);

  zn_maxpool2_forward(&s, x, b, y, arg);
  pool_ref(&c);
  expect_close("pool y", y, c.y, ny, FWD_TOL);

  /* Poison dx: the backward must write every element, zeros included. */
  float *dx = falloc(nx), *db = falloc(s.c);
  double *gx = dalloc(nx), *gb = dalloc(s.c);
  for (size_t i = 0; i < nx; i++) dx[i] = NAN;
  zn_maxpool2_backward(&s, r, y, arg, dx, db, 0);
  fd_grad(pool_loss, &c, c.x, nx, gx);
  fd_grad(pool_loss, &c, c.b, s.c, gb);
  expect_close("pool dx", dx, gx, nx, GRAD_TOL);
  expect_close("pool dbias", db, gb, s.c, GRAD_TOL);

  free(c.x), free(c.b), free(c.r), free(c.y), free(x), free(b), free(r), free(y), free(arg);
  free(dx), free(db), free(gx), free(gb);
}

static void maxpool_with_bias_and_relu_matches_finite_differences(void** state) {
  check_pool((zn_pool_shape){.c = 3, .n = 2, .h = 6, .w = 8, .relu = 1, .out_nchw = 0});
}

static void maxpool_plain_to_nchw_matches_finite_differences(void** state) {
  check_pool((zn_pool_shape){.c = 4, .n = 3, .h = 4, .w = 4, .relu = 0, .out_nchw = 1});
}

static void maxpool_odd_sizes_drop_last_row_and_column(void** state) {
  check_pool((zn_pool_shape){.c = 2, .n = 2, .h = 5, .w = 7, .relu = 1, .out_nchw = 1});
}

static void maxpool_from_phase_order_matches_finite_differences(void** state) {
  check_pool((zn_pool_shape){.c = 3, .n = 2, .h = 6, .w = 10, .relu = 1, .in_phases = 1});
  check_pool((zn_pool_shape){.c = 2, .n = 3, .h = 4, .w = 4, .out_nchw = 1, .in_phases = 1});
}

/* ---- softmax cross-entropy ---- */

typedef struct {
  int n, k;
  double* z;
  const uint8_t* labels;
} xent_ctx;

static double xent_loss(void* ctx) {
  xent_ctx* c = ctx;
  double total = 0.0;
  for (int i = 0; i < c->n; i++) {
    const double* z = c->z + (size_t)i * c->k;
    double sum = 0.0;
    for (int j = 0; j < c->k; j++) sum += exp(z[j]);
    total += log(sum) - z[c->labels[i]];
  }
  return total / c->n;
}

static void softmax_xent_matches_hand_worked_example(void** state) {
  /* Logits (0, ln 3) with label 1: p = (1/4, 3/4), loss = ln(4/3), gradient (1/4, -1/4). */
  float z[2] = {0.0f, (float)log(3.0)};
  uint8_t label = 1;
  float d[2];
  int correct = -1;
  double loss = zn_softmax_xent(z, &label, 1, 2, d, &correct);
  double want[2] = {0.25, -0.25};
  if (fabs(loss - log(4.0 / 3.0)) > 1e-7)
    fail_msg("loss %.9g, want ln(4/3) = %.9g", loss, log(4.0 / 3.0));
  expect_close("xent d", d, want, 2, 1e-6);
  assert_int_equal(correct, 1);
}

static void softmax_xent_gradient_matches_finite_differences(void** state) {
  enum { N = 6, K = 10 };
  uint8_t labels[N] = {0, 3, 9, 9, 5, 2};
  double zd[N * K];
  float z[N * K], d[N * K];
  fill(zd, z, N * K, -4, 4);
  z[1 * K + 3] = zd[1 * K + 3] = 9.0f; /* rows 1 and 3 predicted right, the rest not */
  z[3 * K + 9] = zd[3 * K + 9] = 9.0f;
  for (int i = 0; i < N; i++)
    if (i != 1 && i != 3) z[i * K + (labels[i] + 1) % K] = zd[i * K + (labels[i] + 1) % K] = 9.0f;

  xent_ctx c = {.n = N, .k = K, .z = zd, .labels = labels};
  int correct = -1;
  double loss = zn_softmax_xent(z, labels, N, K, d, &correct);
  double want = xent_loss(&c);
  if (fabs(loss - want) > 1e-6 * fabs(want)) fail_msg("loss %.9g, reference %.9g", loss, want);
  assert_int_equal(correct, 2);

  double g[N * K];
  fd_grad(xent_loss, &c, zd, N * K, g);
  expect_close("xent dlogits", d, g, N * K, GRAD_TOL);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(linear_matches_double_reference_and_finite_differences),
      cmocka_unit_test(relu_matches_finite_differences_and_zeroes_negatives),
      cmocka_unit_test(conv2d_3x3_pad1_matches_reference_and_finite_differences),
      cmocka_unit_test(conv2d_unpadded_and_wide_padding_match_reference),
      cmocka_unit_test(conv2d_in_pooling_phase_order_matches_reference),
      cmocka_unit_test(conv2d_backward_accumulates_over_chunks),
      cmocka_unit_test(maxpool_with_bias_and_relu_matches_finite_differences),
      cmocka_unit_test(maxpool_plain_to_nchw_matches_finite_differences),
      cmocka_unit_test(maxpool_odd_sizes_drop_last_row_and_column),
      cmocka_unit_test(maxpool_from_phase_order_matches_finite_differences),
      cmocka_unit_test(softmax_xent_matches_hand_worked_example),
      cmocka_unit_test(softmax_xent_gradient_matches_finite_differences),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
