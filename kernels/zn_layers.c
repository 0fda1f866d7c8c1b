/* The CPU layers (see zn_layers.h for the layouts). The arithmetic-heavy parts are OpenBLAS
 * sgemm calls sized to the whole batch; everything else here is a single streaming pass that
 * writes each output once, so no buffer needs clearing beforehand: im2col writes its zero padding
 * explicitly, the pooling backward writes zeros where no gradient arrives, and col2im gathers
 * into each input plane rather than scattering into a cleared one. */
#include "zn_layers.h"

#include <assert.h>
#include <math.h>
#include <string.h>

#include <cblas.h>

void zn_linear_forward(const float* x, const float* w, const float* b, float* y, int n, int in,
                       int out) {
  cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, n, out, in, 1.0f, x, in, w, in, 0.0f, y,
              out);
  for (int i = 0; i < n; i++) {
    float* row = y + (size_t)i * out;
    for (int j = 0; j < out; j++) row[j] += b[j];
  }
}

void zn_linear_backward(const float* x, const float* w, const float* dy, float* dx, float* dw,
                        float* db, int n, int in, int out) {
  cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, out, in, n, 1.0f, dy, out, x, in, 0.0f, dw,
              in);

  for (int j = 0; j < out; j++) db[j] = 0.0f;
  for (int i = 0; i < n; i++) {
    const float* row = dy + (size_t)i * out;
    for (int j = 0; j < out; j++) db[j] += row[j];
  }

  if (dx)
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, n, in, out, 1.0f, dy, out, w, in, 0.0f,
                dx, in);
}

void zn_relu_forward(const float* x, float* y, size_t count) {
  for (size_t i = 0; i < count; i++) y[i] = x[i] > 0.0f ? x[i] : 0.0f;
}

void zn_relu_backward(const float* y, const float* dy, float* dx, size_t count) {
  for (size_t i = 0; i < count; i++) dx[i] = y[i] > 0.0f ? dy[i] : 0.0f;
}

int zn_conv2d_out_h(const zn_conv2d_shape* s) {
  return s->h + 2 * s->pad - s->k + 1;
}

int zn_conv2d_out_w(const zn_conv2d_shape* s) {
  return s->w + 2 * s->pad - s->k + 1;
}

size_t zn_conv2d_col_floats(const zn_conv2d_shape* s) {
  size_t plane = (size_t)zn_conv2d_out_h(s) * (size_t)zn_conv2d_out_w(s);
  return (size_t)s->cin * s->k * s->k * (size_t)s->n * plane;
}

/* The output columns [lo, hi) whose input column ow + dw lies inside [0, w). */
static void valid_range(int dw, int w, int wo, int* lo, int* hi) {
  *lo = dw < 0 ? -dw : 0;
  *hi = w - dw < wo ? w - dw : wo;
  if (*hi < *lo) *hi = *lo;
}

/* One col row segment for one input plane: out[oh][ow] = plane[oh + dh][ow + dw] or 0. */
static void shift_plane(const float* plane, int h, int w, int ho, int wo, int dh, int dw,
                        float* out) {
  int lo, hi;
  valid_range(dw, w, wo, &lo, &hi);
  for (int oh = 0; oh < ho; oh++, out += wo) {
    int ih = oh + dh;
    if (ih < 0 || ih >= h) {
      memset(out, 0, sizeof(float) * (size_t)wo);
      continue;
    }
    const float* src = plane + (size_t)ih * w + dw;
    for (int ow = 0; ow < lo; ow++) out[ow] = 0.0f;
    memcpy(out + lo, src + lo, sizeof(float) * (size_t)(hi - lo));
    for (int ow = hi; ow < wo; ow++) out[ow] = 0.0f;
  }
}

void zn_im2col(const zn_conv2d_shape* s, const float* x, float* col) {
  int ho = zn_conv2d_out_h(s), wo = zn_conv2d_out_w(s);
  size_t in_plane = (size_t)s->h * s->w, out_plane = (size_t)ho * wo;

  for (int c = 0; c < s->cin; c++) {
    for (int kh = 0; kh < s->k; kh++) {
      for (int kw = 0; kw < s->k; kw++) {
        for (int i = 0; i < s->n; i++) {
          const float* plane = x + ((size_t)c * s->n + i) * in_plane;
          shift_plane(plane, s->h, s->w, ho, wo, kh - s->pad, kw - s->pad, col + i * out_plane);
        }
        col += (size_t)s->n * out_plane;
      }
    }
  }
}

/* The adjoint of im2col for one input plane: dx[ih][iw] = sum over (kh, kw) of
 * dcol[(kh, kw)][ih - kh + pad][iw - kw + pad]. Gathering per plane keeps the k*k additions in
 * a plane that stays in L1, and writes dx exactly once. */
static void col2im_plane(const zn_conv2d_shape* s, const float* dcol, size_t row_stride,
                         float* dx) {
  int ho = zn_conv2d_out_h(s), wo = zn_conv2d_out_w(s);
  memset(dx, 0, sizeof(float) * (size_t)s->h * s->w);

  for (int kh = 0; kh < s->k; kh++) {
    for (int kw = 0; kw < s->k; kw++, dcol += row_stride) {
      int dh = kh - s->pad, dw = kw - s->pad, lo, hi;
      valid_range(dw, s->w, wo, &lo, &hi);
      for (int oh = 0; oh < ho; oh++) {
        int ih = oh + dh;
        if (ih < 0 || ih >= s->h) continue;
        float* dst = dx + (size_t)ih * s->w + dw;
        const float* src = dcol + (size_t)oh * wo;
        for (int ow = lo; ow < hi; ow++) dst[ow] += src[ow];
      }
    }
  }
}

static void col2im(const zn_conv2d_shape* s, const float* dcol, float* dx) {
  size_t out_plane = (size_t)zn_conv2d_out_h(s) * zn_conv2d_out_w(s);
  size_t in_plane = (size_t)s->h * s->w;
  size_t row_stride = (size_t)s->n * out_plane;
  size_t kk = (size_t)s->k * s->k;

  for (int c = 0; c < s->cin; c++) {
    for (int i = 0; i < s->n; i++) {
      const float* src = dcol + (size_t)c * kk * row_stride + i * out_plane;
      col2im_plane(s, src, row_stride, dx + ((size_t)c * s->n + i) * in_plane);
    }
  }
}

void zn_conv2d_forward(const zn_conv2d_shape* s, const float* x, const float* w, const float* b,
                       float* col, float* y) {
  int kdim = s->cin * s->k * s->k;
  int cols = s->n * zn_conv2d_out_h(s) * zn_conv2d_out_w(s);

  zn_im2col(s, x, col);
  cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, s->cout, cols, kdim, 1.0f, w, kdim, col,
              cols, 0.0f, y, cols);

  if (!b) return;
  for (int o = 0; o < s->cout; o++) {
    float* row = y + (size_t)o * cols;
    for (int j = 0; j < cols; j++) row[j] += b[o];
  }
}

void zn_conv2d_backward(const zn_conv2d_shape* s, const float* w, const float* dy, float* col,
                        float* dx, float* dw, float* db) {
  int kdim = s->cin * s->k * s->k;
  int cols = s->n * zn_conv2d_out_h(s) * zn_conv2d_out_w(s);

  /* dw first: it is the last reader of col, which the column gradient then overwrites. */
  cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, s->cout, kdim, cols, 1.0f, dy, cols, col,
              cols, 0.0f, dw, kdim);

  if (db) {
    for (int o = 0; o < s->cout; o++) {
      const float* row = dy + (size_t)o * cols;
      double sum = 0.0;
      for (int j = 0; j < cols; j++) sum += row[j];
      db[o] = (float)sum;
    }
  }

  if (!dx) return;
  cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, kdim, cols, s->cout, 1.0f, w, kdim, dy,
              cols, 0.0f, col, cols);
  col2im(s, col, dx);
}

/* Where plane (channel c, image i) of the pooled output starts, in the output's layout. */
static size_t pooled_plane(const zn_pool_shape* s, int c, int i) {
  size_t plane = (size_t)(s->h / 2) * (s->w / 2);
  return (s->out_nchw ? (size_t)i * s->c + c : (size_t)c * s->n + i) * plane;
}

/* Pools one input plane; b is the channel's bias. */
static void pool_plane(const zn_pool_shape* s, const float* x, float b, float* y, uint8_t* arg) {
  int ho = s->h / 2, wo = s->w / 2;
  for (int oh = 0; oh < ho; oh++) {
    const float* r0 = x + (size_t)(2 * oh) * s->w;
    const float* r1 = r0 + s->w;
    for (int ow = 0; ow < wo; ow++) {
      float v[4] = {r0[2 * ow], r0[2 * ow + 1], r1[2 * ow], r1[2 * ow + 1]};
      int best = 0;
      for (int q = 1; q < 4; q++)
        if (v[q] > v[best]) best = q;
      float m = v[best] + b;
      y[oh * wo + ow] = s->relu && !(m > 0.0f) ? 0.0f : m;
      arg[oh * wo + ow] = (uint8_t)best;
    }
  }
}

void zn_maxpool2_forward(const zn_pool_shape* s, const float* x, const float* bias, float* y,
                         uint8_t* arg) {
  size_t in_plane = (size_t)s->h * s->w;
  for (int c = 0; c < s->c; c++) {
    float b = bias ? bias[c] : 0.0f;
    for (int i = 0; i < s->n; i++) {
      size_t at = pooled_plane(s, c, i);
      pool_plane(s, x + ((size_t)c * s->n + i) * in_plane, b, y + at, arg + at);
    }
  }
}

/* Spreads one pooled plane's gradient over its input plane; returns the sum that got through. */
static float unpool_plane(const zn_pool_shape* s, const float* dy, const float* y,
                          const uint8_t* arg, float* dx) {
  int ho = s->h / 2, wo = s->w / 2;
  float sum = 0.0f;
  if (s->h & 1) memset(dx + (size_t)(s->h - 1) * s->w, 0, sizeof(float) * (size_t)s->w);

  for (int oh = 0; oh < ho; oh++) {
    float* r0 = dx + (size_t)(2 * oh) * s->w;
    float* r1 = r0 + s->w;
    for (int ow = 0; ow < wo; ow++) {
      int j = oh * wo + ow;
      float g = s->relu && !(y[j] > 0.0f) ? 0.0f : dy[j];
      r0[2 * ow] = arg[j] == 0 ? g : 0.0f;
      r0[2 * ow + 1] = arg[j] == 1 ? g : 0.0f;
      r1[2 * ow] = arg[j] == 2 ? g : 0.0f;
      r1[2 * ow + 1] = arg[j] == 3 ? g : 0.0f;
      sum += g;
    }
    if (s->w & 1) r0[s->w - 1] = r1[s->w - 1] = 0.0f;
  }
  return sum;
}

void zn_maxpool2_backward(const zn_pool_shape* s, const float* dy, const float* y,
                          const uint8_t* arg, float* dx, float* dbias) {
  size_t in_plane = (size_t)s->h * s->w;
  for (int c = 0; c < s->c; c++) {
    double sum = 0.0;
    for (int i = 0; i < s->n; i++) {
      size_t at = pooled_plane(s, c, i);
      sum += unpool_plane(s, dy + at, y + at, arg + at, dx + ((size_t)c * s->n + i) * in_plane);
    }
    if (dbias) dbias[c] = (float)sum;
  }
}

double zn_softmax_xent(const float* logits, const uint8_t* labels, int n, int k, float* dlogits,
                       int* correct) {
  double total = 0.0;
  int right = 0;

  for (int i = 0; i < n; i++) {
    const float* z = logits + (size_t)i * k;
    int best = 0;
    for (int j = 1; j < k; j++)
      if (z[j] > z[best]) best = j;
    right += best == labels[i];

    /* Shift by the max so exp never overflows; the sum is in double so the loss is exact to
     * float precision even for confident predictions. */
    double zmax = z[best], sum = 0.0;
    for (int j = 0; j < k; j++) sum += exp((double)z[j] - zmax);
    double lse = zmax + log(sum);
    total += lse - z[labels[i]];

    if (!dlogits) continue;
    float* d = dlogits + (size_t)i * k;
    for (int j = 0; j < k; j++) {
      double p = exp((double)z[j] - lse);
      d[j] = (float)((p - (j == labels[i])) / n);
    }
  }

  if (correct) *correct = right;
  return total / n;
}
