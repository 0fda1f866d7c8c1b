/* Terminal charts of eta_t and of n_t, m_t, M_t over the steps, for `zenithctl watch`.
 *
 * Each chart is a one-line legend and `rows` rows of braille characters: a character is a cell
 * of 2 x 4 dots, so a chart 70 cells wide and 8 rows high has 140 x 32 dots. A series is drawn
 * as line segments between its points, so a noisy n_t fills the band it moves in, as it would on
 * paper. A cell has one colour, that of the last series drawn in it: n_t first, then m_t and
 * M_t over it, so that the two smooth lines stay visible. The value axes start at 0, the top
 * rounded up to two significant digits and printed at the top row, like the plot's axes; the
 * norm axis ends at 1.5 times the peak, an n_t above it drawn at the top edge (see axis_top).
 *
 * Every line is kept under the width given, in columns (braille and box-drawing characters are
 * one column each), because a terminal that wraps a line breaks the cursor arithmetic with which
 * watch redraws the charts in place. */
#include "ctl_chart.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#define MAX_POINTS 4096
#define LABEL_COLS 9 /* a value in 8 columns and the axis */
#define MIN_WIDTH 30

enum { C_ETA, C_NORM, C_MEAN, C_PEAK, N_SERIES };

static const struct {
  const char* name;
  const char* label;
  const char* short_label;
  const char* ansi; /* SGR colour */
} series[N_SERIES] = {
    {"eta_t", "learning rate", "lr", "33"},
    {"n_t", "grad norm", "norm", "90"},
    {"m_t", "window mean", "mean", "36"},
    {"M_t", "peak", "peak", "35"},
};

typedef struct {
  int64_t step;
  double v[N_SERIES]; /* NAN where a series has no point: a skipped step's norm */
} point;

struct ctl_chart {
  point* pts;
  size_t n;
  int64_t stride; /* steps between kept points, doubled each time the buffer fills */
  int64_t skipped;
};

ctl_chart* ctl_chart_new(void) {
  ctl_chart* c = calloc(1, sizeof *c);
  if (!c) return NULL;
  c->pts = malloc(MAX_POINTS * sizeof *c->pts);
  if (!c->pts) {
    free(c);
    return NULL;
  }
  c->stride = 1;
  return c;
}

void ctl_chart_free(ctl_chart* c) {
  if (!c) return;
  free(c->pts);
  free(c);
}

static double finite_or_nan(double v) {
  return isfinite(v) ? v : NAN;
}

void ctl_chart_add(ctl_chart* c, const Zenith__V1__StepMetrics* m) {
  while (c->n > 0 && c->pts[c->n - 1].step >= m->step) c->n--;
  point p = {m->step,
             {finite_or_nan(m->lr), m->skipped ? NAN : finite_or_nan(m->grad_norm),
              finite_or_nan(m->window_mean), finite_or_nan(m->peak)}};
  c->skipped = m->skipped_steps + m->spike_steps;

  /* The last point stands in for the steps since the one before it until they are a stride
   * apart; then it stays and the next one is appended. */
  if (c->n >= 2 && c->pts[c->n - 1].step - c->pts[c->n - 2].step < c->stride)
    c->pts[c->n - 1] = p;
  else
    c->pts[c->n++] = p;
  if (c->n < MAX_POINTS) return;
  size_t kept = 0;
  for (size_t i = 0; i < c->n; i += 2) c->pts[kept++] = c->pts[i];
  if (c->pts[kept - 1].step != p.step) c->pts[kept++] = p;
  c->n = kept;
  c->stride *= 2;
}

int ctl_chart_lines(int rows) {
  return 2 * (1 + rows) + 2;
}

/* ---------------------------------------------------------------- the dot canvas */

typedef struct {
  int cols, rows;
  uint8_t* bits;  /* braille dots of each cell */
  uint8_t* color; /* 1 + the series that drew last in the cell; 0 for none */
} canvas;

/* Braille dot numbering: bit of the dot at (x % 2, y % 4) within its cell. */
static const uint8_t dot_bit[4][2] = {{0x01, 0x08}, {0x02, 0x10}, {0x04, 0x20}, {0x40, 0x80}};

static void set_dot(canvas* cv, int x, int y, int s) {
  if (x < 0 || y < 0 || x >= 2 * cv->cols || y >= 4 * cv->rows) return;
  size_t cell = (size_t)(y / 4) * cv->cols + x / 2;
  cv->bits[cell] |= dot_bit[y % 4][x % 2];
  cv->color[cell] = (uint8_t)(s + 1);
}

static void draw_segment(canvas* cv, int x0, int y0, int x1, int y1, int s) {
  int n = abs(x1 - x0) > abs(y1 - y0) ? abs(x1 - x0) : abs(y1 - y0);
  for (int k = 0; k <= n; k++) {
    double t = n ? (double)k / n : 0;
    set_dot(cv, (int)lround(x0 + t * (x1 - x0)), (int)lround(y0 + t * (y1 - y0)), s);
  }
}

static void draw_points(canvas* cv, const ctl_chart* c, int s, int64_t x_max, double y_max) {
  int dots_x = 2 * cv->cols, dots_y = 4 * cv->rows;
  int pen = 0, px = 0, py = 0;
  for (size_t i = 0; i < c->n; i++) {
    double v = c->pts[i].v[s];
    if (isnan(v)) {
      pen = 0;
      continue;
    }
    int x = x_max > 1 ? (int)lround((double)(c->pts[i].step - 1) * (dots_x - 1) / (x_max - 1)) : 0;
    int y = dots_y - 1 - (int)lround(fmin(v / y_max, 1) * (dots_y - 1));
    draw_segment(cv, pen ? px : x, pen ? py : y, x, y, s);
    pen = 1;
    px = x;
    py = y;
  }
}

/* The top of a value axis: the largest value, rounded up to two significant digits. In the norm
 * chart, n_t counts only up to NORM_HEADROOM times the largest m_t (M_t): the norm of the first
 * steps is often several times the peak of its mean, and eight rows scaled to such a spike would
 * squeeze m_t and M_t, which set the rate, into the bottom two. A higher n_t is drawn at the
 * top edge. */
#define NORM_HEADROOM 1.5
static double axis_top(const ctl_chart* c, int first, int last) {
  double top = 0, norm = 0;
  for (size_t i = 0; i < c->n; i++)
    for (int s = first; s <= last; s++) {
      double v = c->pts[i].v[s];
      if (s == C_NORM && v > norm) norm = v;
      if (s != C_NORM && v > top) top = v;
    }
  if (first <= C_NORM && C_NORM <= last)
    top = top > 0 && norm > NORM_HEADROOM * top ? NORM_HEADROOM * top : fmax(top, norm);
  if (!(top > 0)) return 1;
  double mag = pow(10, floor(log10(top)) - 1);
  return ceil(top / mag - 1e-9) * mag;
}

static void put_cell(FILE* out, uint8_t bits) {
  if (!bits) {
    fputc(' ', out);
    return;
  }
  /* U+2800 + bits in UTF-8. */
  fputc(0xE2, out);
  fputc(0xA0 | (bits >> 6), out);
  fputc(0x80 | (bits & 0x3F), out);
}

static void put_rows(FILE* out, const canvas* cv, double y_max, int color) {
  for (int r = 0; r < cv->rows; r++) {
    if (r == 0)
      fprintf(out, "%8.3g┤", y_max);
    else if (r == cv->rows - 1)
      fprintf(out, "%8s┤", "0");
    else
      fprintf(out, "%8s│", "");
    int current = 0;
    for (int k = 0; k < cv->cols; k++) {
      size_t cell = (size_t)r * cv->cols + k;
      int want = cv->color[cell];
      if (color && cv->bits[cell] && want != current) {
        fprintf(out, "\033[%sm", series[want - 1].ansi);
        current = want;
      }
      put_cell(out, cv->bits[cell]);
    }
    fputs(color && current ? "\033[0m\n" : "\n", out);
  }
}

/* ---------------------------------------------------------------- legends and axis */

/* A legend entry's text in one of its forms, from the longest (0) to the shortest (3). */
static void legend_text(char* buf, size_t len, int s, double value, int form) {
  if (isnan(value) && form < 3) form = 3;
  if (form == 0) snprintf(buf, len, "%s %s %.4g", series[s].name, series[s].label, value);
  if (form == 1) snprintf(buf, len, "%s %s %.4g", series[s].name, series[s].short_label, value);
  if (form == 2) snprintf(buf, len, "%s %.4g", series[s].name, value);
  if (form == 3) snprintf(buf, len, "%s", series[s].name);
}

/* One legend line: a coloured mark and a text per series, with the latest values, in the
 * longest form that fits in width - 1 columns, indented to the chart's left edge where there is
 * room; if not even the names fit, the entries that do. */
static void put_legend(FILE* out, const ctl_chart* c, int first, int last, int width, int color) {
  const point* p = &c->pts[c->n - 1];
  char text[N_SERIES][64], skipped[32] = "";
  if (last == C_PEAK && c->skipped > 0)
    snprintf(skipped, sizeof skipped, "   %lld skipped", (long long)c->skipped);
  int cols = 0;
  for (int form = 0; form < 4; form++) {
    cols = (int)strlen(skipped);
    for (int s = first; s <= last; s++) {
      legend_text(text[s], sizeof text[s], s, p->v[s], form);
      cols += (s > first ? 3 : 0) + 3 + (int)strlen(text[s]);
    }
    if (cols < width) break;
  }

  int used = fprintf(out, "%*s", cols + LABEL_COLS < width ? LABEL_COLS : 0, "");
  for (int s = first; s <= last; s++) {
    int need = (s > first ? 3 : 0) + 3 + (int)strlen(text[s]);
    if (used + need >= width) break;
    fputs(s > first ? "   " : "", out);
    if (color)
      fprintf(out, "\033[%sm━━\033[0m %s", series[s].ansi, text[s]);
    else
      fprintf(out, "━━ %s", text[s]);
    used += need;
  }
  if (used + (int)strlen(skipped) < width) fputs(skipped, out);
  fputc('\n', out);
}

/* The step axis under the lower chart: a rule, then 1 at the left, the last step at the right. */
static void put_step_axis(FILE* out, int cols, int64_t x_max) {
  fprintf(out, "%*s└", LABEL_COLS - 1, "");
  for (int k = 0; k < cols; k++) fputs("─", out);
  fputc('\n', out);

  char labels[256], right[32];
  if (cols >= (int)sizeof labels) cols = sizeof labels - 1;
  memset(labels, ' ', cols);
  labels[cols] = '\0';
  labels[0] = '1';
  int n = snprintf(right, sizeof right, "%lld", (long long)x_max);
  if (n < cols - 2) memcpy(labels + cols - n, right, n);
  if (cols > 20) memcpy(labels + cols / 2 - 2, "step", 4);
  fprintf(out, "%*s%s\n", LABEL_COLS, "", labels);
}

/* ---------------------------------------------------------------- drawing */

static void put_chart(FILE* out, canvas* cv, const ctl_chart* c, int first, int last, int64_t x_max,
                      int color) {
  size_t cells = (size_t)cv->cols * cv->rows;
  memset(cv->bits, 0, cells);
  memset(cv->color, 0, cells);
  double y_max = axis_top(c, first, last);
  for (int s = first; s <= last; s++) draw_points(cv, c, s, x_max, y_max);
  put_rows(out, cv, y_max, color);
}

int ctl_chart_draw(const ctl_chart* c, FILE* out, int width, int rows, int64_t last_step,
                   int color) {
  if (width < MIN_WIDTH || rows < 2 || c->n == 0) return 0;
  int cols = width - 1 - LABEL_COLS;
  canvas cv = {cols, rows, malloc((size_t)cols * rows), malloc((size_t)cols * rows)};
  if (!cv.bits || !cv.color) {
    free(cv.bits);
    free(cv.color);
    return 0;
  }
  int64_t x_max = last_step > c->pts[c->n - 1].step ? last_step : c->pts[c->n - 1].step;

  put_legend(out, c, C_ETA, C_ETA, width, color);
  put_chart(out, &cv, c, C_ETA, C_ETA, x_max, color);
  put_legend(out, c, C_NORM, C_PEAK, width, color);
  put_chart(out, &cv, c, C_NORM, C_PEAK, x_max, color);
  put_step_axis(out, cols, x_max);
  free(cv.bits);
  free(cv.color);
  return ctl_chart_lines(rows);
}
