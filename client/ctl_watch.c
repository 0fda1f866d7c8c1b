/* zenithctl watch: follows a job's WatchJob stream.
 *
 * On a terminal a block is redrawn in place: a status line (a progress bar with
 * step and total, epoch, loss, learning rate, gradient norm and images/s) and,
 * under it, charts of eta_t and of n_t, m_t, M_t over the steps (ctl_chart.c),
 * at most 80 columns wide and as high as the terminal allows. Events and
 * evaluations are printed above the block as they come, wrapped to the
 * terminal's width. Redraws are throttled to REDRAWS_PER_SEC, so replaying a
 * long history costs a few frames, not one per step; the last frame stays on
 * the screen when the job ends. Into a pipe or a file it prints plain lines
 * instead: about twenty progress lines per job plus every event, so a log stays
 * readable. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <unistd.h>

#include "ctl.h"
#include "ctl_chart.h"
#include "zn_err.h"
#include "zn_time.h"

#define BAR_WIDTH 24
#define MIN_BAR 8 /* on a narrow terminal, fields give way before the bar gets shorter */
#define CHART_MAX_WIDTH 80
#define CHART_MAX_ROWS 8
#define REDRAWS_PER_SEC 10

typedef struct {
  int tty;
  int color;
  ctl_chart* chart;             /* on a terminal */
  int block_lines;              /* lines of the block on the screen; the cursor ends its last */
  double drawn_at;              /* zn_mono_sec of the last frame */
  int have_step;                /* `last` holds a step */
  Zenith__V1__StepMetrics last; /* the numbers of the latest step (its pointers are not used) */
  int64_t total_steps;
  int epochs;
  int64_t last_printed_step;
  char id[64];
  char reason[256];
  char state_line[512]; /* the last "<id> <STATE>: <why>" line printed */
  int jobs_seen;
  double started;
} view;

/* The terminal's size; 80 x 24 when it does not say. */
static void term_size(int* cols, int* rows) {
  struct winsize ws;
  int ok = ioctl(STDOUT_FILENO, TIOCGWINSZ, &ws) == 0;
  *cols = ok && ws.ws_col > 0 ? ws.ws_col : 80;
  *rows = ok && ws.ws_row > 0 ? ws.ws_row : 24;
}

/* Moves the cursor from the end of the block to the start of its first line. */
static void to_block_start(const view* v) {
  fputs("\r", stdout);
  if (v->block_lines > 1) printf("\033[%dA", v->block_lines - 1);
}

/* Removes the block from the screen, leaving the cursor where it began. */
static void clear_block(view* v) {
  if (v->tty && v->block_lines > 0) {
    to_block_start(v);
    fputs("\033[J", stdout);
  }
  v->block_lines = 0;
}

/* The status line, at most width - 1 columns. On a narrow terminal the fields go in the order
 * img/s, epoch, |g|, loss, until the text leaves room for a bar of at least MIN_BAR cells. */
static void status_line(const view* v, char* out, size_t len, int width) {
  const Zenith__V1__StepMetrics* m = &v->last;
  char fields[6][48];
  snprintf(fields[0], sizeof fields[0], "%lld/%lld", (long long)m->step, (long long)v->total_steps);
  if (v->epochs > 0)
    snprintf(fields[1], sizeof fields[1], "epoch %d/%d", m->epoch, v->epochs);
  else /* bounded by max_steps alone */
    snprintf(fields[1], sizeof fields[1], "epoch %d", m->epoch);
  snprintf(fields[2], sizeof fields[2], "loss %.4f", m->loss);
  snprintf(fields[3], sizeof fields[3], "lr %.5f", m->lr);
  snprintf(fields[4], sizeof fields[4], "|g| %.3f", m->grad_norm);
  snprintf(fields[5], sizeof fields[5], "%.0f img/s", m->images_per_sec);
  static const int dropped_first[] = {5, 1, 4, 2};

  char text[256];
  for (int dropped = 0; dropped <= 4; dropped++) {
    text[0] = '\0';
    for (int f = 0; f < 6; f++) {
      int keep = 1;
      for (int d = 0; d < dropped; d++) keep &= f != dropped_first[d];
      if (keep)
        snprintf(text + strlen(text), sizeof text - strlen(text), "%s%s", f ? "  " : "", fields[f]);
    }
    if ((int)strlen(text) + 3 + MIN_BAR < width) break;
  }
  int bar = width - 1 - 3 - (int)strlen(text);
  if (bar > BAR_WIDTH) bar = BAR_WIDTH;
  if (bar < MIN_BAR) {
    snprintf(out, len, "%.*s", width > 1 ? width - 1 : 0, text);
    return;
  }
  int64_t total = v->total_steps;
  int filled = total > 0 ? (int)(bar * m->step / total) : 0;
  if (filled > bar) filled = bar;
  char cells[BAR_WIDTH + 1];
  for (int i = 0; i < bar; i++) cells[i] = i < filled ? '#' : '.';
  cells[bar] = '\0';
  snprintf(out, len, "[%s] %s", cells, text);
}

/* Draws the block over the one on the screen: one write of the whole frame, every line cleared
 * to its end, so nothing flickers and a shorter frame leaves nothing behind. */
static void draw_block(view* v) {
  if (!v->have_step) return;
  int cols, rows;
  term_size(&cols, &rows);
  char* frame = NULL;
  size_t len = 0;
  FILE* f = open_memstream(&frame, &len);
  if (!f) return;
  char line[512];
  status_line(v, line, sizeof line, cols < (int)sizeof line ? cols : (int)sizeof line);
  fprintf(f, "%s\n", line);
  int chart_rows = (rows - 3 - ctl_chart_lines(0)) / 2;
  if (chart_rows > CHART_MAX_ROWS) chart_rows = CHART_MAX_ROWS;
  int chart_width = cols < CHART_MAX_WIDTH ? cols : CHART_MAX_WIDTH;
  int lines = 1;
  if (v->chart)
    lines += ctl_chart_draw(v->chart, f, chart_width, chart_rows, v->total_steps, v->color);
  fclose(f);

  if (v->block_lines > 0) to_block_start(v);
  len--; /* the last line's newline: the cursor stays at its end */
  for (size_t i = 0; i < len; i++) {
    if (frame[i] == '\n') fputs("\033[K", stdout);
    putchar(frame[i]);
  }
  fputs("\033[K\033[J", stdout);
  fflush(stdout);
  free(frame);
  v->block_lines = lines;
  v->drawn_at = zn_mono_sec();
}

/* Draws the last frame, if there is one, and leaves it on the screen above what follows. */
static void settle_block(view* v) {
  if (!v->tty) return;
  draw_block(v);
  if (v->block_lines > 0) putchar('\n');
  v->block_lines = 0;
}

/* Prints a line of text; on a terminal wrapped at spaces to its width. */
static void put_text(const view* v, const char* text) {
  int cols = 0, rows;
  if (v->tty) term_size(&cols, &rows);
  int width = cols > 1 ? cols - 1 : 1;
  while (v->tty && (int)strlen(text) > width) {
    int cut = width;
    while (cut > width / 2 && text[cut] != ' ') cut--;
    if (text[cut] != ' ') cut = width;
    printf("%.*s\n", cut, text);
    text += cut + (text[cut] == ' ');
  }
  printf("%s\n", text);
}

/* Prints a line of text above the block. */
static void print_above(view* v, const char* text) {
  clear_block(v);
  put_text(v, text);
  /* Within the redraw throttle (a replayed history with many evaluations), the next step
   * brings the block back. */
  if (v->tty && zn_mono_sec() - v->drawn_at >= 1.0 / REDRAWS_PER_SEC) draw_block(v);
  fflush(stdout);
}

static void show_metrics(view* v, const Zenith__V1__StepMetrics* m) {
  int64_t total = v->total_steps;
  if (v->tty) {
    v->last = *m;
    v->have_step = 1;
    if (v->chart) ctl_chart_add(v->chart, m);
    if (zn_mono_sec() - v->drawn_at >= 1.0 / REDRAWS_PER_SEC) draw_block(v);
    return;
  }
  int64_t every = total > 20 ? total / 20 : 1;
  if (m->step - v->last_printed_step < every && m->step != total) return;
  v->last_printed_step = m->step;
  printf(
      "%s step %lld/%lld epoch %d loss %.4f lr %.6f grad_norm %.4f window_mean %.4f "
      "peak %.4f images/s %.0f%s\n",
      v->id, (long long)m->step, (long long)total, m->epoch, m->loss, m->lr, m->grad_norm,
      m->window_mean, m->peak, m->images_per_sec, m->skipped ? " (skipped)" : "");
  fflush(stdout);
}

static void show_eval(view* v, const Zenith__V1__EvalResult* e) {
  char text[256];
  snprintf(text, sizeof text, "%s eval at step %lld: test accuracy %.2f%%, test loss %.4f", v->id,
           (long long)e->step, 100 * e->test_accuracy, e->test_loss);
  print_above(v, text);
}

static int is_final(int state) {
  return state == ZENITH__V1__JOB_STATE__SUCCEEDED || state == ZENITH__V1__JOB_STATE__FAILED ||
         state == ZENITH__V1__JOB_STATE__CANCELLED;
}

static void take_job(view* v, const Zenith__V1__Job* j) {
  if (j->total_steps > 0) v->total_steps = j->total_steps;
  const char* reason = j->reason ? j->reason : "";
  /* The first line says how the job is sharded, unless it is not. */
  const char* sharding = j->spec ? ctl_spec_sharding(j->spec) : "none";
  int header = v->jobs_seen == 0 && strcmp(sharding, "none") != 0;
  int ending = v->jobs_seen > 0 && is_final(j->state); /* show_end says it, once */
  if (header || (!ending && reason[0] && strcmp(reason, v->reason) != 0)) {
    char text[512];
    snprintf(text, sizeof text, "%s %s%s%s%s%s", j->id, ctl_state_name(j->state),
             header ? ", sharding " : "", header ? sharding : "", reason[0] ? ": " : "", reason);
    print_above(v, text);
    snprintf(v->state_line, sizeof v->state_line, "%s", text);
  }
  snprintf(v->reason, sizeof v->reason, "%s", reason);
  if (j->spec) {
    v->epochs = j->spec->epochs;
    if (!v->total_steps && j->spec->max_steps > 0) v->total_steps = j->spec->max_steps;
  }
}

/* The summary printed once the job has ended. Returns the exit code. */
static int show_end(view* v, const Zenith__V1__Job* j) {
  settle_block(v);
  double secs = j->finished_unix_ms > j->started_unix_ms && j->started_unix_ms > 0
                    ? (j->finished_unix_ms - j->started_unix_ms) / 1000.0
                    : 0;
  char text[1024];
  int ok = j->state == ZENITH__V1__JOB_STATE__SUCCEEDED;
  if (ok)
    snprintf(text, sizeof text,
             "%s SUCCEEDED: %lld steps in %.1f s; test accuracy %.2f%%, test loss %.4f", j->id,
             (long long)j->step, secs, 100 * j->test_accuracy, j->test_loss);
  else {
    /* A failed job says why in its error, a cancelled one in its reason. */
    const char* why = j->error && j->error[0] ? j->error : j->reason ? j->reason : "";
    snprintf(text, sizeof text, "%s %s%s%s", j->id, ctl_state_name(j->state), why[0] ? ": " : "",
             why);
  }
  if (strcmp(text, v->state_line) != 0) put_text(v, text); /* an ended job's first line said it */
  return ok ? 0 : 1;
}

/* Handles one stream item; returns -1 to go on, else the exit code. */
static int show_item(view* v, const Zenith__V1__WatchJobResponse* item) {
  switch (item->item_case) {
    case ZENITH__V1__WATCH_JOB_RESPONSE__ITEM_JOB:
      /* The first job message is the state at connection time; the history of
       * an ended job follows it, so only a later one can end the watch. */
      take_job(v, item->job);
      if (v->jobs_seen++ > 0 && is_final(item->job->state)) return show_end(v, item->job);
      break;
    case ZENITH__V1__WATCH_JOB_RESPONSE__ITEM_METRICS:
      show_metrics(v, item->metrics);
      break;
    case ZENITH__V1__WATCH_JOB_RESPONSE__ITEM_EVAL:
      show_eval(v, item->eval);
      break;
    case ZENITH__V1__WATCH_JOB_RESPONSE__ITEM_EVENT:
      if (strcmp(item->event->kind, "succeeded") != 0) print_above(v, item->event->message);
      break;
    default:
      break;
  }
  return -1;
}

int ctl_watch_job(const ctl_args* a, const char* id) {
  view v = {0};
  v.tty = isatty(STDOUT_FILENO);
  if (v.tty) v.chart = ctl_chart_new(); /* without it, the status line alone */
  const char* no_color = getenv("NO_COLOR");
  v.color = !no_color || !no_color[0];
  v.started = zn_mono_sec();
  snprintf(v.id, sizeof v.id, "%s", id);

  zn_rpc_channel* ch = ctl_open_channel(a);
  Zenith__V1__WatchJobRequest req = ZENITH__V1__WATCH_JOB_REQUEST__INIT;
  req.id = (char*)id;
  zn_rpc_stream* st = NULL;
  zn_rpc_status status;
  zn_rpc_stream_open(ch, "/zenith.v1.Zenith/WatchJob", &req.base,
                     &zenith__v1__watch_job_response__descriptor, &st, &status);
  int code = -1;
  ProtobufCMessage* msg;
  while (code < 0 && zn_rpc_stream_next(st, &msg, &status) == 1) {
    code = show_item(&v, (const Zenith__V1__WatchJobResponse*)msg);
    protobuf_c_message_free_unpacked(msg, NULL);
  }
  if (code < 0) {
    settle_block(&v);
    if (status.code == ZN_RPC_OK)
      fprintf(stderr, "zenithctl: the stream of %s ended before the job did\n", id);
    else if (status.code == ZN_RPC_UNAVAILABLE)
      fprintf(stderr, "zenithctl: lost the coordinator at %s: %s\n", a->coordinator,
              status.message);
    else
      fprintf(stderr, "zenithctl: %s: %s\n", zn_rpc_code_name(status.code), status.message);
    code = 1;
  }
  zn_rpc_stream_close(st);
  zn_rpc_channel_close(ch);
  ctl_chart_free(v.chart);
  return code;
}
