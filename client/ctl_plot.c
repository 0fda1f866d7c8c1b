/* zenithctl plot: a job's learning rate and gradient norms over its steps, as an SVG or a PNG
 * for a report.
 *
 * One drawing routine serves both formats: it draws on a cairo context, which is an SVG surface
 * for .svg and an image surface written out as PNG for .png, both PLOT_W x PLOT_H pixels. Two
 * panels share the step axis: eta_t on top, and n_t, m_t and M_t below (docs/optimizer.md names
 * them). Both value axes start at 0, so that eta_t / lr0 = m_t / M_t can be read off the picture.
 *
 * A skipped step's norm is left out of the lines and of the scales (a non-finite or spiking n_t
 * would flatten everything else) and marked with a red tick at the top of the lower panel. A
 * long job is drawn with at most four points per pixel column (its first, lowest, highest and
 * last value there), which looks the same as every point and keeps an SVG small. The SVG also
 * carries a <title> and a <desc> that name the job and the series, for screen readers and for
 * anything that searches the file. */
#include <cairo-svg.h>
#include <cairo.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "ctl_history.h"

#define PLOT_W 1000
#define PLOT_H 700
#define HALF_PI 1.57079632679489661923

typedef struct {
  double x, y, w, h;
} box;

typedef struct {
  double lo, hi;
} span;

enum { S_ETA, S_NORM, S_MEAN, S_PEAK };

typedef struct {
  const char* name;
  const char* label;
  double r, g, b, width;
  int dashed;
} style;

static const style styles[] = {
    [S_ETA] = {"eta_t", "learning rate", 0.85, 0.37, 0.01, 2.0, 0},
    [S_NORM] = {"n_t", "gradient norm", 0.60, 0.69, 0.85, 1.0, 0},
    [S_MEAN] = {"m_t", "window mean", 0.10, 0.36, 0.72, 2.0, 0},
    [S_PEAK] = {"M_t", "peak of m_t", 0.15, 0.15, 0.15, 1.5, 1},
};

/* A step's value of a series; NAN where the series has no point (a skipped step's norm). */
static double value_of(const Zenith__V1__StepMetrics* m, int series) {
  double v = series == S_ETA    ? m->lr
             : series == S_NORM ? (m->skipped ? NAN : m->grad_norm)
             : series == S_MEAN ? m->window_mean
                                : m->peak;
  return isfinite(v) ? v : NAN;
}

/* ---------------------------------------------------------------- scales and text */

/* A round tick spacing (1, 2 or 5 times a power of ten) giving about `target` ticks. */
static double tick_step(double width, int target) {
  double raw = width / target;
  double mag = pow(10, floor(log10(raw)));
  double f = raw / mag;
  return (f < 1.5 ? 1 : f < 3 ? 2 : f < 7 ? 5 : 10) * mag;
}

/* [0, the largest value of the series rounded up to a tick]; [0, 1] when there is none. */
static span value_span(const ctl_job_history* h, int first, int last) {
  double top = 0;
  for (size_t i = 0; i < h->n_steps; i++)
    for (int s = first; s <= last; s++) {
      double v = value_of(h->steps[i], s);
      if (v > top) top = v;
    }
  if (!(top > 0)) return (span){0, 1};
  double step = tick_step(top * 1.04, 5);
  return (span){0, ceil(top * 1.04 / step) * step};
}

static double map(double v, span from, double a, double b) {
  return a + (v - from.lo) / (from.hi - from.lo) * (b - a);
}

static void tick_label(char* buf, size_t len, double v, double step) {
  int decimals = step < 1 ? (int)ceil(-log10(step) - 1e-9) : 0;
  snprintf(buf, len, "%.*f", decimals, fabs(v) < step * 1e-9 ? 0.0 : v);
}

/* Draws text with its anchor at (x, y): ax and ay are 0 (left, top) to 1 (right, bottom). */
static void text_at(cairo_t* cr, double x, double y, double ax, double ay, const char* s) {
  cairo_text_extents_t te;
  cairo_text_extents(cr, s, &te);
  cairo_move_to(cr, x - te.x_bearing - ax * te.width, y - te.y_bearing - ay * te.height);
  cairo_show_text(cr, s);
}

static void font(cairo_t* cr, double size, int bold, double grey) {
  cairo_select_font_face(cr, "sans-serif", CAIRO_FONT_SLANT_NORMAL,
                         bold ? CAIRO_FONT_WEIGHT_BOLD : CAIRO_FONT_WEIGHT_NORMAL);
  cairo_set_font_size(cr, size);
  cairo_set_source_rgb(cr, grey, grey, grey);
}

static void use_style(cairo_t* cr, const style* s) {
  cairo_set_source_rgb(cr, s->r, s->g, s->b);
  cairo_set_line_width(cr, s->width);
  double dash[] = {6, 4};
  cairo_set_dash(cr, dash, s->dashed ? 2 : 0, 0);
}

/* ---------------------------------------------------------------- panels */

/* The frame, the value grid with its labels, the step grid and the rotated axis title. */
static void draw_frame(cairo_t* cr, box b, span xs, span ys, const char* title, int step_labels) {
  font(cr, 12, 0, 0.25);
  cairo_set_line_width(cr, 1);
  double ystep = tick_step(ys.hi - ys.lo, 5);
  for (double v = ys.lo; v <= ys.hi + ystep * 1e-6; v += ystep) {
    double y = round(map(v, ys, b.y + b.h, b.y)) + 0.5;
    cairo_set_source_rgb(cr, 0.88, 0.88, 0.88);
    cairo_move_to(cr, b.x, y);
    cairo_line_to(cr, b.x + b.w, y);
    cairo_stroke(cr);
    char label[32];
    tick_label(label, sizeof label, v, ystep);
    cairo_set_source_rgb(cr, 0.25, 0.25, 0.25);
    text_at(cr, b.x - 8, y, 1, 0.5, label);
  }
  double xstep = fmax(1, tick_step(xs.hi - xs.lo, 8)); /* steps are whole numbers */
  for (double v = ceil(xs.lo / xstep) * xstep; v <= xs.hi + xstep * 1e-6; v += xstep) {
    double x = round(map(v, xs, b.x, b.x + b.w)) + 0.5;
    cairo_set_source_rgb(cr, 0.88, 0.88, 0.88);
    cairo_move_to(cr, x, b.y);
    cairo_line_to(cr, x, b.y + b.h);
    cairo_stroke(cr);
    if (!step_labels) continue;
    char label[32];
    tick_label(label, sizeof label, v, xstep);
    cairo_set_source_rgb(cr, 0.25, 0.25, 0.25);
    text_at(cr, x, b.y + b.h + 8, 0.5, 0, label);
  }
  cairo_set_source_rgb(cr, 0.3, 0.3, 0.3);
  cairo_rectangle(cr, b.x + 0.5, b.y + 0.5, b.w, b.h);
  cairo_stroke(cr);

  cairo_save(cr);
  font(cr, 13, 0, 0.1);
  cairo_translate(cr, b.x - 62, b.y + b.h / 2);
  cairo_rotate(cr, -HALF_PI);
  text_at(cr, 0, 0, 0.5, 0.5, title);
  cairo_restore(cr);
}

/* Adds the chosen points of one pixel column (indices into h->steps: its first, lowest, highest
 * and last) to the path, in step order and without repeats. */
static void add_column(cairo_t* cr, const ctl_job_history* h, int series, const size_t pick[4],
                       box b, span xs, span ys, int* pen) {
  size_t low = pick[1] < pick[2] ? pick[1] : pick[2], high = pick[1] < pick[2] ? pick[2] : pick[1];
  size_t order[4] = {pick[0], low, high, pick[3]};
  for (int k = 0; k < 4; k++) {
    if (k > 0 && order[k] == order[k - 1]) continue;
    const Zenith__V1__StepMetrics* m = h->steps[order[k]];
    double x = map((double)m->step, xs, b.x, b.x + b.w);
    double y = map(value_of(m, series), ys, b.y + b.h, b.y);
    if (!*pen) cairo_move_to(cr, x, y);
    cairo_line_to(cr, x, y); /* also makes a lone point a dot */
    *pen = 1;
  }
}

/* One series as a line clipped to the panel, broken where it has no value. */
static void draw_series(cairo_t* cr, const ctl_job_history* h, int series, box b, span xs,
                        span ys) {
  cairo_save(cr);
  cairo_rectangle(cr, b.x, b.y, b.w, b.h);
  cairo_clip(cr);
  cairo_new_path(cr);
  int pen = 0, open = 0; /* open: the current column has points in pick */
  long column = -1;
  size_t pick[4] = {0, 0, 0, 0};
  for (size_t i = 0; i <= h->n_steps; i++) {
    double v = i < h->n_steps ? value_of(h->steps[i], series) : NAN;
    long x = i < h->n_steps ? (long)floor(map((double)h->steps[i]->step, xs, b.x, b.x + b.w)) : 0;
    if (open && (isnan(v) || x != column)) {
      add_column(cr, h, series, pick, b, xs, ys, &pen);
      open = 0;
    }
    if (isnan(v)) {
      pen = 0;
    } else if (!open) {
      column = x;
      pick[0] = pick[1] = pick[2] = pick[3] = i;
      open = 1;
    } else {
      if (v < value_of(h->steps[pick[1]], series)) pick[1] = i;
      if (v > value_of(h->steps[pick[2]], series)) pick[2] = i;
      pick[3] = i;
    }
  }
  use_style(cr, &styles[series]);
  cairo_set_line_cap(cr, CAIRO_LINE_CAP_ROUND);
  cairo_set_line_join(cr, CAIRO_LINE_JOIN_ROUND);
  cairo_stroke(cr);
  cairo_restore(cr);
}

/* Red ticks along the top of the norm panel at the skipped steps; returns how many. */
static size_t draw_skipped(cairo_t* cr, const ctl_job_history* h, box b, span xs) {
  size_t n = 0;
  cairo_set_source_rgb(cr, 0.85, 0.1, 0.1);
  cairo_set_line_width(cr, 1.5);
  cairo_set_dash(cr, NULL, 0, 0);
  for (size_t i = 0; i < h->n_steps; i++) {
    if (!h->steps[i]->skipped) continue;
    double x = map((double)h->steps[i]->step, xs, b.x, b.x + b.w);
    cairo_move_to(cr, x, b.y + 1);
    cairo_line_to(cr, x, b.y + 10);
    n++;
  }
  cairo_stroke(cr);
  return n;
}

/* A legend in one row above the panel, flush with its right edge, where it hides no data: a line
 * sample and a text per entry. */
static void draw_legend(cairo_t* cr, box b, const style* entries, const char** texts, int n) {
  font(cr, 12, 0, 0.1);
  double widths[8], total = 0;
  for (int i = 0; i < n; i++) {
    cairo_text_extents_t te;
    cairo_text_extents(cr, texts[i], &te);
    widths[i] = 28 + 6 + te.x_advance;
    total += widths[i] + (i ? 20 : 0);
  }
  double x = b.x + b.w - total, cy = b.y - 11;
  for (int i = 0; i < n; i++) {
    use_style(cr, &entries[i]);
    cairo_move_to(cr, x, cy);
    cairo_line_to(cr, x + 28, cy);
    cairo_stroke(cr);
    font(cr, 12, 0, 0.1);
    text_at(cr, x + 34, cy, 0, 0.5, texts[i]);
    x += widths[i] + 20;
  }
}

/* ---------------------------------------------------------------- the picture */

static void draw_titles(cairo_t* cr, const ctl_job_history* h, double x) {
  const Zenith__V1__Job* j = h->job;
  const Zenith__V1__JobSpec* s = j->spec;
  const char* name = s && s->name && s->name[0] ? s->name : NULL;
  char line[512];
  snprintf(line, sizeof line, "%s%s%s%s: ZENITH learning rate and gradient norms", j->id,
           name ? " (" : "", name ? name : "", name ? ")" : "");
  font(cr, 18, 1, 0.05);
  text_at(cr, x, 18, 0, 0, line);

  char spec[256] = "", result[64] = "";
  if (s)
    snprintf(spec, sizeof spec, "%s on %s, %d worker(s), batch %d, lr0 %g, window %d; ",
             s->model ? s->model : "?", s->dataset ? s->dataset : "?", s->workers, s->batch_size,
             s->optimizer ? s->optimizer->lr0 : 0, s->optimizer ? s->optimizer->window : 0);
  if (j->has_test_result)
    snprintf(result, sizeof result, ", test accuracy %.2f%%", 100 * j->test_accuracy);
  snprintf(line, sizeof line, "%s%zu steps, %s%s", spec, h->n_steps, ctl_state_name(j->state),
           result);
  font(cr, 13, 0, 0.35);
  text_at(cr, x, 44, 0, 0, line);
}

static void draw_plot(cairo_t* cr, const ctl_job_history* h) {
  cairo_set_source_rgb(cr, 1, 1, 1);
  cairo_paint(cr);
  box top = {100, 90, PLOT_W - 130, 190};
  box low = {100, top.y + top.h + 34, PLOT_W - 130, PLOT_H - 80 - (top.y + top.h + 34)};
  draw_titles(cr, h, top.x - 60);

  double last = h->n_steps ? (double)h->steps[h->n_steps - 1]->step : 1;
  span xs = {0, last > 1 ? last : 1};
  span eta = value_span(h, S_ETA, S_ETA);
  span norms = value_span(h, S_NORM, S_PEAK);
  draw_frame(cr, top, xs, eta, "learning rate eta_t", 0);
  draw_frame(cr, low, xs, norms, "gradient norm", 1);
  font(cr, 13, 0, 0.1);
  text_at(cr, low.x + low.w / 2, low.y + low.h + 30, 0.5, 0, "step");

  if (!h->n_steps) {
    font(cr, 14, 0, 0.4);
    text_at(cr, top.x + top.w / 2, top.y + top.h / 2, 0.5, 0.5, "no steps reported yet");
  }
  draw_series(cr, h, S_ETA, top, xs, eta);
  for (int s = S_NORM; s <= S_PEAK; s++) draw_series(cr, h, s, low, xs, norms);
  size_t skipped = draw_skipped(cr, h, low, xs);

  const char* eta_text[] = {"eta_t  learning rate"};
  draw_legend(cr, top, &styles[S_ETA], eta_text, 1);
  char mean_text[64], skipped_text[64];
  int window = h->job->spec && h->job->spec->optimizer ? h->job->spec->optimizer->window : 0;
  snprintf(mean_text, sizeof mean_text, "m_t  window mean (W = %d)", window);
  snprintf(skipped_text, sizeof skipped_text, "skipped step (%zu)", skipped);
  style entries[] = {
      styles[S_NORM], styles[S_MEAN], styles[S_PEAK], {"", "", 0.85, 0.1, 0.1, 1.5, 0}};
  const char* texts[] = {"n_t  gradient norm", mean_text, "M_t  peak of m_t", skipped_text};
  draw_legend(cr, low, entries, texts, skipped ? 4 : 3);
}

/* ---------------------------------------------------------------- files */

static cairo_status_t write_stream(void* closure, const unsigned char* data, unsigned int len) {
  return fwrite(data, 1, len, closure) == len ? CAIRO_STATUS_SUCCESS : CAIRO_STATUS_WRITE_ERROR;
}

static void xml_escaped(FILE* f, const char* s) {
  for (; *s; s++) {
    if (*s == '&')
      fputs("&amp;", f);
    else if (*s == '<')
      fputs("&lt;", f);
    else if (*s == '>')
      fputs("&gt;", f);
    else
      fputc(*s, f);
  }
}

/* The SVG as cairo wrote it, with a <title> and a <desc> after the opening <svg> tag. */
static void write_svg(FILE* out, const char* svg, size_t len, const ctl_job_history* h) {
  const char* open = strstr(svg, "<svg");
  const char* end = open ? strchr(open, '>') : NULL;
  size_t head = end ? (size_t)(end + 1 - svg) : 0;
  fwrite(svg, 1, head, out);
  const Zenith__V1__JobSpec* s = h->job->spec;
  fputs("\n<title>", out);
  xml_escaped(out, h->job->id);
  if (s && s->name && s->name[0]) {
    fputs(" (", out);
    xml_escaped(out, s->name);
    fputs(")", out);
  }
  fputs(": ZENITH learning rate and gradient norms</title>\n", out);
  fprintf(out,
          "<desc>Over %zu optimizer steps: eta_t (learning rate) in the upper panel; n_t "
          "(gradient norm), m_t (window mean) and M_t (peak of m_t) in the lower "
          "panel.</desc>",
          h->n_steps);
  fwrite(svg + head, 1, len - head, out);
}

/* Draws the plot onto out.f as SVG or PNG; returns a cairo status. */
static cairo_status_t render(const ctl_job_history* h, int png, FILE* out) {
  if (png) {
    cairo_surface_t* surface = cairo_image_surface_create(CAIRO_FORMAT_RGB24, PLOT_W, PLOT_H);
    cairo_t* cr = cairo_create(surface);
    draw_plot(cr, h);
    cairo_status_t st = cairo_status(cr);
    cairo_destroy(cr);
    if (st == CAIRO_STATUS_SUCCESS)
      st = cairo_surface_write_to_png_stream(surface, write_stream, out);
    cairo_surface_destroy(surface);
    return st;
  }

  char* svg = NULL;
  size_t len = 0;
  FILE* mem = open_memstream(&svg, &len);
  if (!mem) return CAIRO_STATUS_NO_MEMORY;
  cairo_surface_t* surface = cairo_svg_surface_create_for_stream(write_stream, mem, PLOT_W, PLOT_H);
  cairo_svg_surface_set_document_unit(surface, CAIRO_SVG_UNIT_PX);
  cairo_t* cr = cairo_create(surface);
  draw_plot(cr, h);
  cairo_status_t st = cairo_status(cr);
  cairo_destroy(cr);
  cairo_surface_finish(surface);
  if (st == CAIRO_STATUS_SUCCESS) st = cairo_surface_status(surface);
  cairo_surface_destroy(surface);
  if (fclose(mem) != 0 && st == CAIRO_STATUS_SUCCESS) st = CAIRO_STATUS_NO_MEMORY;
  if (st == CAIRO_STATUS_SUCCESS) write_svg(out, svg, len, h);
  free(svg);
  return st;
}

/* ---------------------------------------------------------------- the command */

static const char* plot_usage =
    "usage: zenithctl plot JOB -o FILE.svg|FILE.png\n"
    "  Draws the learning rate eta_t, and the gradient norm n_t with its window mean m_t and\n"
    "  peak M_t, over the job's steps: 1000 x 700 pixels, the format from FILE's extension.\n";

static int ends_with(const char* s, const char* tail) {
  size_t n = strlen(s), k = strlen(tail);
  return n > k && strcasecmp(s + n - k, tail) == 0;
}

int ctl_plot(const ctl_args* a) {
  ctl_export_args e;
  int parsed = ctl_parse_export_args(a, plot_usage, 0, &e);
  if (parsed != 0) return parsed > 0 ? 0 : 2;
  if (!e.out) {
    fprintf(stderr, "zenithctl plot: -o FILE is required, a .svg or .png file\n");
    return 2;
  }
  int png = ends_with(e.out, ".png");
  if (!png && !ends_with(e.out, ".svg")) {
    fprintf(stderr, "zenithctl plot: -o expects a file name ending in .svg or .png, got '%s'\n",
            e.out);
    return 2;
  }

  ctl_output out;
  ctl_job_history h;
  if (ctl_export_begin(a, &e, &out, &h) != 0) return 1;
  cairo_status_t st = render(&h, png, out.f);
  ctl_history_free(&h);
  if (st != CAIRO_STATUS_SUCCESS) {
    fprintf(stderr, "zenithctl plot: cannot draw %s: %s\n", e.out, cairo_status_to_string(st));
    ctl_output_abort(&out);
    return 1;
  }
  return ctl_output_commit(&out) == 0 ? 0 : 1;
}
