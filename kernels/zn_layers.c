/* The CPU layers (see zn_layers.h for the layouts). The arithmetic-heavy parts are OpenBLAS
 * sgemm calls over every image the caller passes at once; everything else here is a streaming
 * pass that writes each output once, so no caller buffer needs clearing beforehand: im2col
 * writes its zero padding explicitly, the pooling backward writes zeros where no gradient
 * arrives, and col2im sums into one input plane at a time in a small scratch that stays in L1. */
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

/* Phase-ordered im2col and col2im work on the zero-padded input plane split into its four
 * polyphase planes poly[a][b][i][j] = padded[2i + a][2j + b]: output pixel (2ph + qa, 2pw + qb)
 * reads padded[2ph + qa + kh][2pw + qb + kw], and for fixed (q, kh, kw) those are wo/2
 * consecutive floats of one polyphase plane, so each col row segment is a few short copies. */
enum { POLY_MAX = 4 * 32 * 32 };

typedef struct {
  int hh, wh; /* each polyphase plane is hh x wh */
} poly_dims;

static poly_dims poly_of(const zn_conv2d_shape* s) {
  poly_dims d = {(s->h + 2 * s->pad + 1) / 2, (s->w + 2 * s->pad + 1) / 2};
  assert(4 * d.hh * d.wh <= POLY_MAX);
  return d;
}

/* The two polyphase rows that padded row r = ih + pad lands in: even padded columns go to *e,
 * odd ones to *o, padded column c at index c / 2. */
static void poly_rows(const zn_conv2d_shape* s, poly_dims d, float* poly, int ih, float** e,
                      float** o) {
  int r = ih + s->pad;
  size_t plane = (size_t)d.hh * d.wh;
  *e = poly + (size_t)(2 * (r & 1)) * plane + (size_t)(r >> 1) * d.wh;
  *o = *e + plane;
}

/* Zero padding first, then each input row dealt out to its two polyphase rows; the two
 * stride-2 loops have no branches, so they vectorise. */
static void poly_split(const zn_conv2d_shape* s, poly_dims d, const float* x, float* poly) {
  memset(poly, 0, sizeof(float) * 4 * (size_t)d.hh * d.wh);
  int even = s->pad & 1; /* the first input column whose padded column is even */
  for (int ih = 0; ih < s->h; ih++) {
    float *e, *o;
    poly_rows(s, d, poly, ih, &e, &o);
    const float* src = x + (size_t)ih * s->w;
    for (int iw = even; iw < s->w; iw += 2) e[(iw + s->pad) >> 1] = src[iw];
    for (int iw = 1 - even; iw < s->w; iw += 2) o[(iw + s->pad) >> 1] = src[iw];
  }
}

/* The inverse of poly_split, dropping the padding. */
static void poly_merge(const zn_conv2d_shape* s, poly_dims d, float* poly, float* x) {
  int even = s->pad & 1;
  for (int ih = 0; ih < s->h; ih++) {
    float *e, *o;
    poly_rows(s, d, poly, ih, &e, &o);
    float* dst = x + (size_t)ih * s->w;
    for (int iw = even; iw < s->w; iw += 2) dst[iw] = e[(iw + s->pad) >> 1];
    for (int iw = 1 - even; iw < s->w; iw += 2) dst[iw] = o[(iw + s->pad) >> 1];
  }
}

/* Where in poly the (phase q, kernel tap kh, kw) window of phase-ordered outputs starts. */
static size_t poly_at(poly_dims d, int q, int kh, int kw) {
  int r = (q >> 1) + kh, c = (q & 1) + kw;
  return (size_t)(2 * (r & 1) + (c & 1)) * d.hh * d.wh + (size_t)(r >> 1) * d.wh + (c >> 1);
}

/* Copies a run of n floats, 4 at a time; a run that is not a multiple of 4 ends with one more
 * 4-float move that overlaps the previous one, so a run of 7 costs two moves, not 1 + 3. */
static void copy_run(float* out, const float* src, int n) {
  if (n < 4) {
    for (int j = 0; j < n; j++) out[j] = src[j];
    return;
  }
  for (int j = 0; j + 4 <= n; j += 4) memcpy(out + j, src + j, 4 * sizeof(float));
  if (n & 3) memcpy(out + n - 4, src + n - 4, 4 * sizeof(float));
}

static void im2col_phases(const zn_conv2d_shape* s, const float* x, float* col) {
  int ho2 = zn_conv2d_out_h(s) / 2, wo2 = zn_conv2d_out_w(s) / 2;
  size_t in_plane = (size_t)s->h * s->w, out_plane = (size_t)4 * ho2 * wo2;
  size_t row_stride = (size_t)s->n * out_plane, kk = (size_t)s->k * s->k;
  poly_dims d = poly_of(s);
  float poly[POLY_MAX];

  for (int c = 0; c < s->cin; c++) {
    for (int i = 0; i < s->n; i++) {
      poly_split(s, d, x + ((size_t)c * s->n + i) * in_plane, poly);
      float* row = col + (size_t)c * kk * row_stride + i * out_plane;
      for (int kh = 0; kh < s->k; kh++) {
        for (int kw = 0; kw < s->k; kw++, row += row_stride) {
          float* out = row;
          for (int q = 0; q < 4; q++) {
            const float* src = poly + poly_at(d, q, kh, kw);
            for (int ph = 0; ph < ho2; ph++, src += d.wh, out += wo2) copy_run(out, src, wo2);
          }
        }
      }
    }
  }
}

/* dst[0..n) += src[0..n), 4 at a time and then one by one; the runs are 7 to 14 long, too short
 * for the compiler's own vector loop to pay for its alias checks. */
static void add_run(float* restrict dst, const float* restrict src, int n) {
  int j = 0;
  for (; j + 4 <= n; j += 4) {
    float a[4], b[4];
    memcpy(a, dst + j, sizeof(a));
    memcpy(b, src + j, sizeof(b));
    for (int l = 0; l < 4; l++) a[l] += b[l];
    memcpy(dst + j, a, sizeof(a));
  }
  for (; j < n; j++) dst[j] += src[j];
}

static void add_block(float* restrict dst, const float* restrict src, int n) {
  for (int j = 0; j < n; j++) dst[j] += src[j];
}

/* The adjoint of im2col_phases. The (q, kh, kw) blocks of one input plane are first summed by
 * where they land: the polyphase plane and the (row, column) offset within it. Those sums are
 * whole contiguous blocks, so they vectorise fully; only the (k/2 + 1)^2 per plane sums are
 * then added into the plane as short shifted runs, instead of every one of the 4 k^2 blocks. */
enum { GROUP_MAX = 8192 };

static void col2im_phases(const zn_conv2d_shape* s, const float* dcol, float* dx) {
  int ho2 = zn_conv2d_out_h(s) / 2, wo2 = zn_conv2d_out_w(s) / 2, count = ho2 * wo2;
  int nd = s->k / 2 + 1; /* offsets 0 .. k/2 in each direction */
  size_t in_plane = (size_t)s->h * s->w, out_plane = (size_t)4 * count;
  size_t row_stride = (size_t)s->n * out_plane, kk = (size_t)s->k * s->k;
  size_t groups = (size_t)4 * nd * nd * count;
  poly_dims d = poly_of(s);
  float poly[POLY_MAX], sum[GROUP_MAX];
  assert(groups <= GROUP_MAX);

  for (int c = 0; c < s->cin; c++) {
    for (int i = 0; i < s->n; i++) {
      memset(sum, 0, sizeof(float) * groups);
      const float* row = dcol + (size_t)c * kk * row_stride + i * out_plane;
      for (int kh = 0; kh < s->k; kh++) {
        for (int kw = 0; kw < s->k; kw++, row += row_stride) {
          for (int q = 0; q < 4; q++) {
            int r = (q >> 1) + kh, col = (q & 1) + kw;
            int g = ((2 * (r & 1) + (col & 1)) * nd + (r >> 1)) * nd + (col >> 1);
            add_block(sum + (size_t)g * count, row + (size_t)q * count, count);
          }
        }
      }

      memset(poly, 0, sizeof(float) * 4 * (size_t)d.hh * d.wh);
      for (int g = 0; g < 4 * nd * nd; g++) {
        int plane = g / (nd * nd), dr = g / nd % nd, dc = g % nd;
        float* dst = poly + (size_t)plane * d.hh * d.wh + (size_t)dr * d.wh + dc;
        const float* src = sum + (size_t)g * count;
        for (int ph = 0; ph < ho2; ph++, dst += d.wh, src += wo2) add_run(dst, src, wo2);
      }
      poly_merge(s, d, poly, dx + ((size_t)c * s->n + i) * in_plane);
    }
  }
}

static void im2col_rows(const zn_conv2d_shape* s, const float* x, float* col) {
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

void zn_im2col(const zn_conv2d_shape* s, const float* x, float* col) {
  assert(!s->phases || (zn_conv2d_out_h(s) % 2 == 0 && zn_conv2d_out_w(s) % 2 == 0));
  if (s->phases)
    im2col_phases(s, x, col);
  else
    im2col_rows(s, x, col);
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

static void col2im_rows(const zn_conv2d_shape* s, const float* dcol, float* dx) {
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
                        float* dx, float* dw, float* db, int accumulate) {
  int kdim = s->cin * s->k * s->k;
  int cols = s->n * zn_conv2d_out_h(s) * zn_conv2d_out_w(s);

  /* dw first: it is the last reader of col, which the column gradient then overwrites. */
  cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, s->cout, kdim, cols, 1.0f, dy, cols, col,
              cols, accumulate ? 1.0f : 0.0f, dw, kdim);

  if (db) {
    for (int o = 0; o < s->cout; o++) {
      const float* row = dy + (size_t)o * cols;
      double sum = 0.0;
      for (int j = 0; j < cols; j++) sum += row[j];
      db[o] = (float)sum + (accumulate ? db[o] : 0.0f);
    }
  }

  if (!dx) return;
  cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, kdim, cols, s->cout, 1.0f, w, kdim, dy, cols,
              0.0f, col, cols);
  if (s->phases)
    col2im_phases(s, col, dx);
  else
    col2im_rows(s, col, dx);
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

/* Pools one phase-ordered plane: the window of output j is x[j], x[P + j], x[2P + j],
 * x[3P + j]. Written as selects so the compiler vectorises it. */
static void pool_phases(const zn_pool_shape* s, const float* x, float b, float* y, uint8_t* arg) {
  int count = (s->h / 2) * (s->w / 2);
  const float *x1 = x + count, *x2 = x1 + count, *x3 = x2 + count;
  float floor = s->relu ? 0.0f : -INFINITY;
  for (int j = 0; j < count; j++) {
    float m = x[j];
    int a = 0;
    a = x1[j] > m ? 1 : a, m = x1[j] > m ? x1[j] : m;
    a = x2[j] > m ? 2 : a, m = x2[j] > m ? x2[j] : m;
    a = x3[j] > m ? 3 : a, m = x3[j] > m ? x3[j] : m;
    m += b;
    y[j] = m > floor ? m : floor;
    arg[j] = (uint8_t)a;
  }
}

void zn_maxpool2_forward(const zn_pool_shape* s, const float* x, const float* bias, float* y,
                         uint8_t* arg) {
  assert(!s->in_phases || (s->h % 2 == 0 && s->w % 2 == 0));
  size_t in_plane = (size_t)s->h * s->w;
  for (int c = 0; c < s->c; c++) {
    float b = bias ? bias[c] : 0.0f;
    for (int i = 0; i < s->n; i++) {
      size_t at = pooled_plane(s, c, i);
      const float* plane = x + ((size_t)c * s->n + i) * in_plane;
      if (s->in_phases)
        pool_phases(s, plane, b, y + at, arg + at);
      else
        pool_plane(s, plane, b, y + at, arg + at);
    }
  }
}

/* The gradient of pool_phases for one plane; returns the sum that got through, accumulated in
 * eight fixed lanes so the loop vectorises and the order (hence the rounding) is fixed. */
static float unpool_phases(const zn_pool_shape* s, const float* restrict dy,
                           const float* restrict y, const uint8_t* restrict arg,
                           float* restrict dx) {
  int count = (s->h / 2) * (s->w / 2);
  float* restrict dx1 = dx + count;
  float* restrict dx2 = dx1 + count;
  float* restrict dx3 = dx2 + count;
  float lanes[8] = {0}, floor = s->relu ? 0.0f : -INFINITY;
  for (int j = 0; j < count; j++) {
    float d = dy[j], g = y[j] > floor ? d : 0.0f, a = arg[j];
    dx[j] = a == 0.0f ? g : 0.0f;
    dx1[j] = a == 1.0f ? g : 0.0f;
    dx2[j] = a == 2.0f ? g : 0.0f;
    dx3[j] = a == 3.0f ? g : 0.0f;
  }
  for (int j = 0; j + 8 <= count; j += 8)
    for (int l = 0; l < 8; l++) {
      float d = dy[j + l];
      lanes[l] += y[j + l] > floor ? d : 0.0f;
    }
  for (int j = count & ~7; j < count; j++) {
    float d = dy[j];
    lanes[j & 7] += y[j] > floor ? d : 0.0f;
  }
  return ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3])) +
         ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7]));
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
                          const uint8_t* arg, float* dx, float* dbias, int accumulate) {
  assert(!s->in_phases || (s->h % 2 == 0 && s->w % 2 == 0));
  size_t in_plane = (size_t)s->h * s->w;
  for (int c = 0; c < s->c; c++) {
    double sum = 0.0;
    for (int i = 0; i < s->n; i++) {
      size_t at = pooled_plane(s, c, i);
      float* plane = dx + ((size_t)c * s->n + i) * in_plane;
      if (s->in_phases)
        sum += unpool_phases(s, dy + at, y + at, arg + at, plane);
      else
        sum += unpool_plane(s, dy + at, y + at, arg + at, plane);
    }
    if (dbias) dbias[c] = (float)sum + (accumulate ? dbias[c] : 0.0f);
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
