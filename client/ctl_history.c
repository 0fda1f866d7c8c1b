/* zenithctl history: a job's whole history as CSV or JSON, and what `zenithctl plot` shares with
 * it (reading the history, parsing JOB and -o, writing the output file).
 *
 * The history is one WatchJob stream with history_only set: the job, then every item the
 * coordinator has recorded for it, and then the stream ends, also while the job still runs.
 *
 * CSV is one rectangular table, one row per step under a header line, so that any spreadsheet or
 * data-frame reader takes it as it is; evaluations and events, which have other columns, are in
 * the JSON form only. Numbers have CTL_REAL_DIGITS significant digits, as in `status --json`. A
 * non-finite value is nan, inf or -inf in CSV and null in JSON. */
#define _XOPEN_SOURCE 700 /* realpath */
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "ctl_history.h"
#include "zn_err.h"

/* ---------------------------------------------------------------- reading the history */

/* Sorts the stream's items into the history's arrays. ZN_ERR_NOMEM, or ZN_ERR_INVALID when the
 * stream held no job. */
static int index_items(ctl_job_history* h) {
  size_t n_steps = 0, n_evals = 0, n_events = 0;
  for (size_t i = 0; i < h->n_items; i++) {
    const Zenith__V1__WatchJobResponse* it = (const void*)h->items[i];
    n_steps += it->item_case == ZENITH__V1__WATCH_JOB_RESPONSE__ITEM_METRICS;
    n_evals += it->item_case == ZENITH__V1__WATCH_JOB_RESPONSE__ITEM_EVAL;
    n_events += it->item_case == ZENITH__V1__WATCH_JOB_RESPONSE__ITEM_EVENT;
  }
  h->steps = calloc(n_steps + 1, sizeof *h->steps);
  h->evals = calloc(n_evals + 1, sizeof *h->evals);
  h->events = calloc(n_events + 1, sizeof *h->events);
  if (!h->steps || !h->evals || !h->events) return ZN_ERR_NOMEM;

  for (size_t i = 0; i < h->n_items; i++) {
    const Zenith__V1__WatchJobResponse* it = (const void*)h->items[i];
    switch (it->item_case) {
      case ZENITH__V1__WATCH_JOB_RESPONSE__ITEM_JOB:
        h->job = it->job;
        break;
      case ZENITH__V1__WATCH_JOB_RESPONSE__ITEM_METRICS:
        /* A step reported again starts the run that continued from there. */
        while (h->n_steps > 0 && h->steps[h->n_steps - 1]->step >= it->metrics->step) h->n_steps--;
        h->steps[h->n_steps++] = it->metrics;
        break;
      case ZENITH__V1__WATCH_JOB_RESPONSE__ITEM_EVAL:
        h->evals[h->n_evals++] = it->eval;
        break;
      case ZENITH__V1__WATCH_JOB_RESPONSE__ITEM_EVENT:
        h->events[h->n_events++] = it->event;
        break;
      default:
        break;
    }
  }
  return h->job ? ZN_OK : ZN_ERR_INVALID;
}

int ctl_history_fetch(const ctl_args* a, const char* id, ctl_job_history* h) {
  memset(h, 0, sizeof *h);
  zn_rpc_channel* ch = ctl_open_channel(a);
  Zenith__V1__WatchJobRequest req = ZENITH__V1__WATCH_JOB_REQUEST__INIT;
  req.id = (char*)id;
  req.has_history_only = 1;
  req.history_only = 1;
  zn_rpc_stream* st = NULL;
  zn_rpc_status status;
  int rc = -1;
  if (zn_rpc_stream_open(ch, "/zenith.v1.Zenith/WatchJob", &req.base,
                         &zenith__v1__watch_job_response__descriptor, &st, &status) != ZN_OK) {
    fprintf(stderr, "zenithctl: out of memory opening the history of %s\n", id);
    goto done;
  }

  size_t cap = 0;
  ProtobufCMessage* msg;
  while (zn_rpc_stream_next(st, &msg, &status) == 1) {
    if (h->n_items == cap) {
      cap = cap ? 2 * cap : 1024;
      ProtobufCMessage** grown = realloc(h->items, cap * sizeof *grown);
      if (!grown) {
        protobuf_c_message_free_unpacked(msg, NULL);
        fprintf(stderr, "zenithctl: out of memory reading the history of %s\n", id);
        goto done;
      }
      h->items = grown;
    }
    h->items[h->n_items++] = msg;
  }
  if (status.code != ZN_RPC_OK) {
    ctl_print_rpc_error(a, &status);
    goto done;
  }
  int indexed = index_items(h);
  if (indexed != ZN_OK) {
    fprintf(stderr, "zenithctl: the history of %s: %s\n", id,
            indexed == ZN_ERR_NOMEM ? "out of memory" : "the coordinator sent it without the job");
    goto done;
  }
  rc = 0;

done:
  zn_rpc_stream_close(st);
  zn_rpc_channel_close(ch);
  if (rc != 0) ctl_history_free(h);
  return rc;
}

void ctl_history_free(ctl_job_history* h) {
  for (size_t i = 0; i < h->n_items; i++) protobuf_c_message_free_unpacked(h->items[i], NULL);
  free(h->items);
  free(h->steps);
  free(h->evals);
  free(h->events);
  memset(h, 0, sizeof *h);
}

/* ---------------------------------------------------------------- the output file */

static int output_failed(ctl_output* o, const char* what, int err) {
  fprintf(stderr, "zenithctl %s: cannot write %s: %s%s%s\n", o->cmd, o->path, what,
          what[0] ? ": " : "", strerror(err));
  ctl_output_abort(o);
  return -1;
}

int ctl_output_open(ctl_output* o, const char* cmd, const char* path) {
  memset(o, 0, sizeof *o);
  o->cmd = cmd;
  o->path = path;
  if (!path || strcmp(path, "-") == 0) {
    o->path = "stdout";
    o->f = stdout;
    return 0;
  }

  /* An existing file is replaced where it really is: through a symbolic link (/dev/stdout
   * redirected to a file, say), not in place of the link. */
  struct stat sb;
  if (stat(path, &sb) == 0 && !S_ISREG(sb.st_mode)) {
    o->f = fopen(path, "w");
    return o->f ? 0 : output_failed(o, "", errno);
  }
  if (!realpath(path, o->target)) snprintf(o->target, sizeof o->target, "%s", path);
  if ((size_t)snprintf(o->tmp, sizeof o->tmp, "%s.tmp-XXXXXX", o->target) >= sizeof o->tmp) {
    o->tmp[0] = '\0';
    return output_failed(o, "", ENAMETOOLONG);
  }
  int fd = mkstemp(o->tmp);
  if (fd < 0) {
    o->tmp[0] = '\0';
    return output_failed(o, "", errno);
  }
  /* mkstemp makes the file private; an export gets the permissions any new file would. */
  mode_t mask = umask(0);
  umask(mask);
  if (fchmod(fd, 0666 & ~mask) != 0 || !(o->f = fdopen(fd, "w"))) {
    int err = errno;
    close(fd);
    return output_failed(o, "", err);
  }
  return 0;
}

/* Syncs the folder that holds path, so that the rename into it is durable. */
static int sync_folder(const char* path) {
  char dir[PATH_MAX];
  snprintf(dir, sizeof dir, "%s", path);
  char* slash = strrchr(dir, '/');
  if (!slash)
    snprintf(dir, sizeof dir, ".");
  else if (slash == dir)
    slash[1] = '\0';
  else
    *slash = '\0';
  int fd = open(dir, O_RDONLY | O_DIRECTORY);
  if (fd < 0) return -1;
  int rc = fsync(fd);
  close(fd);
  return rc;
}

int ctl_output_commit(ctl_output* o) {
  if (o->f == stdout)
    return fflush(stdout) == 0 && !ferror(stdout) ? 0 : output_failed(o, "", errno ? errno : EIO);

  FILE* f = o->f;
  o->f = NULL;
  if (fflush(f) != 0 || ferror(f)) {
    int err = errno ? errno : EIO;
    fclose(f);
    return output_failed(o, "", err);
  }
  if (o->tmp[0] && fsync(fileno(f)) != 0) {
    int err = errno;
    fclose(f);
    return output_failed(o, "fsync", err);
  }
  if (fclose(f) != 0) return output_failed(o, "close", errno);
  if (!o->tmp[0]) return 0;
  if (rename(o->tmp, o->target) != 0) return output_failed(o, "rename", errno);
  o->tmp[0] = '\0';
  if (sync_folder(o->target) != 0) return output_failed(o, "fsync of its folder", errno);
  return 0;
}

void ctl_output_abort(ctl_output* o) {
  if (o->f && o->f != stdout) fclose(o->f);
  o->f = NULL;
  if (o->tmp[0]) unlink(o->tmp);
  o->tmp[0] = '\0';
}

/* ---------------------------------------------------------------- arguments */

int ctl_parse_export_args(const ctl_args* a, const char* usage, int with_format,
                          ctl_export_args* e) {
  static const struct option options[] = {{"output", required_argument, 0, 'o'},
                                          {"format", required_argument, 0, 'f'},
                                          {"help", no_argument, 0, 'h'},
                                          {0, 0, 0, 0}};
  const char* cmd = a->argv[0];
  memset(e, 0, sizeof *e);
  e->format = "csv";
  optind = 1;
  opterr = 0;
  int opt;
  while ((opt = getopt_long(a->argc, a->argv, "o:h", options, NULL)) != -1) {
    if (opt == 'h') {
      fputs(usage, stdout);
      return 1;
    }
    if (opt == '?' || (opt == 'f' && !with_format)) {
      fprintf(stderr, "zenithctl %s: unknown flag or missing value: '%s'\n\n%s", cmd,
              a->argv[optind - 1], usage);
      return -1;
    }
    if (opt == 'o') e->out = optarg;
    if (opt == 'f') e->format = optarg;
  }
  if (optind != a->argc - 1) {
    fprintf(stderr, "zenithctl %s: give one job id, e.g. `zenithctl %s j-1`\n\n%s", cmd, cmd,
            usage);
    return -1;
  }
  e->id = a->argv[optind];
  return 0;
}

int ctl_export_begin(const ctl_args* a, const ctl_export_args* e, ctl_output* out,
                     ctl_job_history* h) {
  if (ctl_output_open(out, a->argv[0], e->out) != 0) return -1;
  if (ctl_history_fetch(a, e->id, h) == 0) return 0;
  ctl_output_abort(out);
  return -1;
}

/* ---------------------------------------------------------------- CSV */

static void csv_real(FILE* f, double v) {
  if (isnan(v))
    fputs("nan", f);
  else if (isinf(v))
    fputs(v > 0 ? "inf" : "-inf", f);
  else
    fprintf(f, "%.*g", CTL_REAL_DIGITS, v);
}

static void write_csv(const ctl_job_history* h, FILE* f) {
  fputs(
      "step,epoch,loss,grad_norm,window_mean,peak,lr,skipped,skipped_steps,spike_steps,"
      "images_per_sec,unix_ms\n",
      f);
  for (size_t i = 0; i < h->n_steps; i++) {
    const Zenith__V1__StepMetrics* m = h->steps[i];
    fprintf(f, "%lld,%d,", (long long)m->step, m->epoch);
    const double reals[] = {m->loss, m->grad_norm, m->window_mean, m->peak, m->lr};
    for (size_t k = 0; k < sizeof reals / sizeof reals[0]; k++) {
      csv_real(f, reals[k]);
      fputc(',', f);
    }
    fprintf(f, "%d,%lld,%lld,", m->skipped ? 1 : 0, (long long)m->skipped_steps,
            (long long)m->spike_steps);
    csv_real(f, m->images_per_sec);
    fprintf(f, ",%lld\n", (long long)m->unix_ms);
  }
}

/* ---------------------------------------------------------------- JSON */

#define JSON_FLAGS (JSON_PRESERVE_ORDER | JSON_REAL_PRECISION(CTL_REAL_DIGITS))

static json_t* real(double v) {
  return isfinite(v) ? json_real(v) : json_null();
}

static json_t* step_json(const Zenith__V1__StepMetrics* m) {
  json_t* o = json_object();
  json_object_set_new(o, "step", json_integer(m->step));
  json_object_set_new(o, "epoch", json_integer(m->epoch));
  json_object_set_new(o, "loss", real(m->loss));
  json_object_set_new(o, "grad_norm", real(m->grad_norm));
  json_object_set_new(o, "window_mean", real(m->window_mean));
  json_object_set_new(o, "peak", real(m->peak));
  json_object_set_new(o, "lr", real(m->lr));
  json_object_set_new(o, "skipped", json_boolean(m->skipped));
  json_object_set_new(o, "skipped_steps", json_integer(m->skipped_steps));
  json_object_set_new(o, "spike_steps", json_integer(m->spike_steps));
  json_object_set_new(o, "images_per_sec", real(m->images_per_sec));
  json_object_set_new(o, "unix_ms", json_integer(m->unix_ms));
  return o;
}

static json_t* eval_json(const Zenith__V1__EvalResult* e) {
  return json_pack("{s:I, s:o, s:o, s:I}", "step", (json_int_t)e->step, "test_loss",
                   real(e->test_loss), "test_accuracy", real(e->test_accuracy), "unix_ms",
                   (json_int_t)e->unix_ms);
}

static json_t* event_json(const Zenith__V1__JobEvent* ev) {
  return json_pack("{s:I, s:s, s:s}", "unix_ms", (json_int_t)ev->unix_ms, "kind",
                   ev->kind ? ev->kind : "", "message", ev->message ? ev->message : "");
}

/* One array element on a line of its own; takes the reference to o. */
static void write_element(FILE* f, json_t* o, int first) {
  fputs(first ? "\n    " : ",\n    ", f);
  json_dumpf(o, f, JSON_FLAGS);
  json_decref(o);
}

static void write_json(const ctl_job_history* h, FILE* f) {
  /* The job indented as `status --json` prints it, one level deeper. */
  json_t* job_obj = ctl_job_json(h->job);
  char* job = json_dumps(job_obj, JSON_INDENT(2) | JSON_FLAGS);
  json_decref(job_obj);
  fputs("{\n  \"job\": ", f);
  for (const char* c = job; c && *c; c++) {
    fputc(*c, f);
    if (*c == '\n') fputs("  ", f);
  }
  free(job);

  fputs(",\n  \"steps\": [", f);
  for (size_t i = 0; i < h->n_steps; i++) write_element(f, step_json(h->steps[i]), i == 0);
  fputs(h->n_steps ? "\n  ],\n  \"evals\": [" : "],\n  \"evals\": [", f);
  for (size_t i = 0; i < h->n_evals; i++) write_element(f, eval_json(h->evals[i]), i == 0);
  fputs(h->n_evals ? "\n  ],\n  \"events\": [" : "],\n  \"events\": [", f);
  for (size_t i = 0; i < h->n_events; i++) write_element(f, event_json(h->events[i]), i == 0);
  fputs(h->n_events ? "\n  ]\n}\n" : "]\n}\n", f);
}

/* ---------------------------------------------------------------- the command */

static const char* history_usage =
    "usage: zenithctl history JOB [--format csv|json] [-o FILE]\n"
    "  --format csv    one row per step under a header line (default)\n"
    "  --format json   an object with the job, its steps, evaluations and events\n"
    "  -o FILE         write FILE (whole or not at all) instead of stdout\n"
    "Columns: step, epoch, loss, grad_norm (n_t), window_mean (m_t), peak (M_t), lr (eta_t),\n"
    "skipped, skipped_steps, spike_steps, images_per_sec, unix_ms.\n";

int ctl_history(const ctl_args* a) {
  ctl_export_args e;
  int parsed = ctl_parse_export_args(a, history_usage, 1, &e);
  if (parsed != 0) return parsed > 0 ? 0 : 2;
  int json = strcmp(e.format, "json") == 0;
  if (!json && strcmp(e.format, "csv") != 0) {
    fprintf(stderr, "zenithctl history: --format expects csv or json, got '%s'\n", e.format);
    return 2;
  }

  ctl_output out;
  ctl_job_history h;
  if (ctl_export_begin(a, &e, &out, &h) != 0) return 1;
  if (json)
    write_json(&h, out.f);
  else
    write_csv(&h, out.f);
  ctl_history_free(&h);
  return ctl_output_commit(&out) == 0 ? 0 : 1;
}
