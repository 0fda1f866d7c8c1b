/* zenithctl watch: follows a job's WatchJob stream.
 *
 * On a terminal one status line is redrawn in place (a progress bar with step
 * and total, epoch, loss, learning rate, gradient norm and images/s), and
 * events and evaluations are printed above it as they come. Into a pipe or a
 * file it prints plain lines instead: about twenty progress lines per job plus
 * every event, so a log stays readable. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "ctl.h"
#include "zn_err.h"
#include "zn_time.h"

#define BAR_WIDTH 24

typedef struct {
  int tty;
  int line_drawn;
  int64_t total_steps;
  int epochs;
  int64_t last_printed_step;
  char id[64];
  char reason[256];
  int jobs_seen;
  double started;
} view;

static void clear_line(view* v) {
  if (v->tty && v->line_drawn) fputs("\r\033[K", stdout);
  v->line_drawn = 0;
}

static void print_bar(int64_t step, int64_t total) {
  int filled = total > 0 ? (int)(BAR_WIDTH * step / total) : 0;
  if (filled > BAR_WIDTH) filled = BAR_WIDTH;
  putchar('[');
  for (int i = 0; i < BAR_WIDTH; i++) putchar(i < filled ? '#' : '.');
  putchar(']');
}

static void show_metrics(view* v, const Zenith__V1__StepMetrics* m) {
  int64_t total = v->total_steps;
  if (v->tty) {
    clear_line(v);
    print_bar(m->step, total);
    printf(" %lld/%lld  epoch %d/%d  loss %.4f  lr %.5f  |g| %.3f  %.0f img/s", (long long)m->step,
           (long long)total, m->epoch, v->epochs, m->loss, m->lr, m->grad_norm, m->images_per_sec);
    v->line_drawn = 1;
    fflush(stdout);
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

static void show_line(view* v, const char* fmt, const char* a, const char* b) {
  clear_line(v);
  printf(fmt, a, b);
  fflush(stdout);
}

static void show_eval(view* v, const Zenith__V1__EvalResult* e) {
  clear_line(v);
  printf("%s eval at step %lld: test accuracy %.2f%%, test loss %.4f\n", v->id, (long long)e->step,
         100 * e->test_accuracy, e->test_loss);
  fflush(stdout);
}

static void take_job(view* v, const Zenith__V1__Job* j) {
  if (j->total_steps > 0) v->total_steps = j->total_steps;
  const char* reason = j->reason ? j->reason : "";
  if (reason[0] && strcmp(reason, v->reason) != 0) {
    clear_line(v);
    printf("%s %s: %s\n", j->id, ctl_state_name(j->state), reason);
    fflush(stdout);
  }
  snprintf(v->reason, sizeof v->reason, "%s", reason);
  if (j->spec) {
    v->epochs = j->spec->epochs;
    if (!v->total_steps && j->spec->max_steps > 0) v->total_steps = j->spec->max_steps;
  }
}

/* The summary printed once the job has ended. Returns the exit code. */
static int show_end(view* v, const Zenith__V1__Job* j) {
  clear_line(v);
  double secs = j->finished_unix_ms > j->started_unix_ms && j->started_unix_ms > 0
                    ? (j->finished_unix_ms - j->started_unix_ms) / 1000.0
                    : 0;
  if (j->state == ZENITH__V1__JOB_STATE__SUCCEEDED) {
    printf("%s SUCCEEDED: %lld steps in %.1f s; test accuracy %.2f%%, test loss %.4f\n", j->id,
           (long long)j->step, secs, 100 * j->test_accuracy, j->test_loss);
    return 0;
  }
  printf("%s %s%s%s\n", j->id, ctl_state_name(j->state), j->error && j->error[0] ? ": " : "",
         j->error ? j->error : "");
  return 1;
}

static int is_final(int state) {
  return state == ZENITH__V1__JOB_STATE__SUCCEEDED || state == ZENITH__V1__JOB_STATE__FAILED ||
         state == ZENITH__V1__JOB_STATE__CANCELLED;
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
      if (strcmp(item->event->kind, "succeeded") != 0)
        show_line(v, "%s\n", item->event->message, "");
      break;
    default:
      break;
  }
  return -1;
}

int ctl_watch_job(const ctl_args* a, const char* id) {
  view v = {0};
  v.tty = isatty(STDOUT_FILENO);
  v.started = zn_mono_sec();
  snprintf(v.id, sizeof v.id, "%s", id);

  zn_rpc_channel* ch = zn_rpc_channel_open(a->coordinator, 0);
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
    clear_line(&v);
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
  return code;
}
