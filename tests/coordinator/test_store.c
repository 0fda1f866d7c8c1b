/* Tests of the coordinator's SQLite store (zn_store), each against a fresh
 * temporary folder.
 *
 * Values are compared field by field with what the test itself put in; metric
 * rows are generated from their step number by expected_metrics(), so a replayed
 * row can be checked without keeping the original. The crash test forks a child
 * that appends batches of metrics in a loop, kills it with SIGKILL, and checks
 * that SQLite's own integrity check passes and that exactly the whole batches the
 * child had been told were committed (and possibly the one after) come back.
 *
 * Run one test by name: test_store <name>. */
#define _XOPEN_SOURCE 700

#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <errno.h>
#include <ftw.h>
#include <inttypes.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <sqlite3.h>

#include "zn_err.h"
#include "zn_store.h"

#define BATCH 10

typedef struct {
  char dir[64];
} fixture;

/* ---------------------------------------------------------------- helpers */

#define EXPECT_DBL(a, b)                                                \
  do {                                                                  \
    double a_ = (a), b_ = (b);                                          \
    if (a_ != b_) {                                                     \
      print_error("%s = %.17g, expected %s = %.17g\n", #a, a_, #b, b_); \
      fail();                                                           \
    }                                                                   \
  } while (0)

#define EXPECT_OK(expr, s)                                                                       \
  do {                                                                                           \
    int rc_ = (expr);                                                                            \
    if (rc_ != ZN_OK) {                                                                          \
      print_error("%s returned %d (%s): %s\n", #expr, rc_, zn_err_str(rc_), zn_store_errmsg(s)); \
      fail();                                                                                    \
    }                                                                                            \
  } while (0)

static int rm_entry(const char* path, const struct stat* sb, int flag, struct FTW* ftw) {
  return remove(path);
}

static int setup(void** state) {
  fixture* f = calloc(1, sizeof *f);
  snprintf(f->dir, sizeof f->dir, "/tmp/zn-store-XXXXXX");
  if (!mkdtemp(f->dir)) return -1;
  chmod(f->dir, 0755); /* so that a child running as another user can look inside */
  *state = f;
  return 0;
}

static int teardown(void** state) {
  fixture* f = *state;
  chmod(f->dir, 0755);
  nftw(f->dir, rm_entry, 16, FTW_DEPTH | FTW_PHYS);
  free(f);
  return 0;
}

static zn_store* open_ok(const char* dir) {
  char err[512] = "";
  zn_store* s = NULL;
  int rc = zn_store_open(dir, &s, err, sizeof err);
  if (rc != ZN_OK) print_error("zn_store_open(%s): %d: %s\n", dir, rc, err);
  assert_int_equal(rc, ZN_OK);
  assert_non_null(s);
  return s;
}

/* Every field of a metrics row is a function of its step, with values that do
 * not round-trip by accident (no small integers for the doubles). */
static void expected_metrics(int64_t step, Zenith__V1__StepMetrics* m) {
  zenith__v1__step_metrics__init(m);
  m->has_step = m->has_epoch = m->has_loss = m->has_grad_norm = 1;
  m->has_window_mean = m->has_peak = m->has_lr = m->has_skipped = 1;
  m->has_skipped_steps = m->has_spike_steps = m->has_images_per_sec = m->has_unix_ms = 1;
  m->step = step;
  m->epoch = (int32_t)(1 + step / 469);
  m->loss = 2.302585092994046 / (1.0 + 0.01 * (double)step);
  m->grad_norm = 1.0 / 3.0 + (double)step * 1e-3;
  m->window_mean = 0.7 * m->grad_norm;
  m->peak = 1.5 * m->grad_norm;
  m->lr = 0.05 * m->window_mean / m->peak;
  m->skipped = step % 7 == 0;
  m->skipped_steps = step / 7;
  m->spike_steps = step / 11;
  m->images_per_sec = 12345.678 + (double)step;
  m->unix_ms = 1764780000000 + step;
}

static void check_metrics(const Zenith__V1__StepMetrics* got, int64_t step) {
  Zenith__V1__StepMetrics want;
  expected_metrics(step, &want);
  assert_true(got->has_step && got->has_epoch && got->has_loss && got->has_grad_norm);
  assert_true(got->has_window_mean && got->has_peak && got->has_lr && got->has_skipped);
  assert_true(got->has_skipped_steps && got->has_spike_steps && got->has_images_per_sec);
  assert_true(got->has_unix_ms);
  assert_int_equal(got->step, want.step);
  assert_int_equal(got->epoch, want.epoch);
  EXPECT_DBL(got->loss, want.loss);
  EXPECT_DBL(got->grad_norm, want.grad_norm);
  EXPECT_DBL(got->window_mean, want.window_mean);
  EXPECT_DBL(got->peak, want.peak);
  EXPECT_DBL(got->lr, want.lr);
  assert_int_equal(got->skipped, want.skipped);
  assert_int_equal(got->skipped_steps, want.skipped_steps);
  assert_int_equal(got->spike_steps, want.spike_steps);
  EXPECT_DBL(got->images_per_sec, want.images_per_sec);
  assert_int_equal(got->unix_ms, want.unix_ms);
}

/* Appends steps first .. first+n-1 as one batch. */
static int append_steps(zn_store* s, const char* job, int64_t first, size_t n) {
  Zenith__V1__StepMetrics rows[64];
  Zenith__V1__StepMetrics* ptrs[64];
  for (size_t i = 0; i < n; i++) {
    expected_metrics(first + (int64_t)i, &rows[i]);
    ptrs[i] = &rows[i];
  }
  return zn_store_append_metrics(s, job, ptrs, n);
}

static Zenith__V1__Job* make_job(const char* id, int64_t created) {
  Zenith__V1__Job* j = calloc(1, sizeof *j);
  zenith__v1__job__init(j);
  j->id = strdup(id);
  j->has_state = 1;
  j->state = ZENITH__V1__JOB_STATE__QUEUED;
  j->has_created_unix_ms = 1;
  j->created_unix_ms = created;
  return j;
}

/* ---------------------------------------------------------------- jobs */

static void check_spec(const Zenith__V1__JobSpec* g, const Zenith__V1__JobSpec* w) {
  assert_non_null(g);
  assert_string_equal(g->name, w->name);
  assert_string_equal(g->model, w->model);
  assert_string_equal(g->dataset, w->dataset);
  assert_string_equal(g->data_dir, w->data_dir);
  assert_true(g->has_workers && g->has_batch_size && g->has_epochs && g->has_max_steps);
  assert_true(g->has_seed && g->has_eval_every && g->has_threads);
  assert_int_equal(g->workers, w->workers);
  assert_int_equal(g->batch_size, w->batch_size);
  assert_int_equal(g->epochs, w->epochs);
  assert_int_equal(g->max_steps, w->max_steps);
  assert_int_equal(g->seed, w->seed);
  assert_int_equal(g->eval_every, w->eval_every);
  assert_int_equal(g->threads, w->threads);

  const Zenith__V1__ZenithParams* go = g->optimizer;
  const Zenith__V1__ZenithParams* wo = w->optimizer;
  assert_non_null(go);
  assert_true(go->has_lr0 && go->has_window && go->has_momentum && go->has_nesterov);
  assert_true(go->has_weight_decay && go->has_decoupled_decay && go->has_lr_min);
  assert_true(go->has_spike_factor);
  EXPECT_DBL(go->lr0, wo->lr0);
  assert_int_equal(go->window, wo->window);
  EXPECT_DBL(go->momentum, wo->momentum);
  assert_int_equal(go->nesterov, wo->nesterov);
  EXPECT_DBL(go->weight_decay, wo->weight_decay);
  EXPECT_DBL(go->decoupled_decay, wo->decoupled_decay);
  EXPECT_DBL(go->lr_min, wo->lr_min);
  EXPECT_DBL(go->spike_factor, wo->spike_factor);
}

static void job_round_trip_keeps_every_field(void** state) {
  fixture* f = *state;
  Zenith__V1__ZenithParams opt = ZENITH__V1__ZENITH_PARAMS__INIT;
  opt.has_lr0 = opt.has_window = opt.has_momentum = opt.has_nesterov = 1;
  opt.has_weight_decay = opt.has_decoupled_decay = opt.has_lr_min = opt.has_spike_factor = 1;
  opt.lr0 = 0.07;
  opt.window = 37;
  opt.momentum = 0.85;
  opt.nesterov = 1;
  opt.weight_decay = 3e-4;
  opt.decoupled_decay = 1e-5;
  opt.lr_min = 1e-4;
  opt.spike_factor = 4.5;

  Zenith__V1__JobSpec spec = ZENITH__V1__JOB_SPEC__INIT;
  spec.name = "fmnist cnn, 2 workers";
  spec.model = "cnn";
  spec.dataset = "fashion-mnist";
  spec.data_dir = "/usr/share/datasets/fashion-mnist";
  spec.has_workers = spec.has_batch_size = spec.has_epochs = spec.has_max_steps = 1;
  spec.has_seed = spec.has_eval_every = spec.has_threads = 1;
  spec.workers = 2;
  spec.batch_size = 256;
  spec.epochs = 3;
  spec.max_steps = 1400;
  spec.seed = 0xFEDCBA9876543210ULL; /* above INT64_MAX: checks the uint64 path */
  spec.eval_every = 200;
  spec.optimizer = &opt;
  spec.threads = 4;

  Zenith__V1__StepMetrics last;
  expected_metrics(1234, &last);
  char* workers[] = {"w-alpha", "w-beta"};

  Zenith__V1__Job job = ZENITH__V1__JOB__INIT;
  job.id = "j-42";
  job.spec = &spec;
  job.has_state = job.has_step = job.has_total_steps = job.has_epoch = 1;
  job.has_created_unix_ms = job.has_started_unix_ms = job.has_finished_unix_ms = 1;
  job.has_has_test_result = job.has_test_loss = job.has_test_accuracy = 1;
  job.state = ZENITH__V1__JOB_STATE__FAILED;
  job.reason = "worker w-beta lost";
  job.error = "heartbeat timeout after 15000 ms";
  job.step = 1234;
  job.total_steps = 1407;
  job.epoch = 3;
  job.created_unix_ms = 1764780000123;
  job.started_unix_ms = 1764780001456;
  job.finished_unix_ms = 1764780099789;
  job.has_test_result = 1;
  job.test_loss = 0.31415926535897931;
  job.test_accuracy = 0.8871;
  job.n_workers = 2;
  job.workers = workers;
  job.last = &last;

  zn_store* s = open_ok(f->dir);
  EXPECT_OK(zn_store_put_job(s, &job), s);
  zn_store_close(s);
  s = open_ok(f->dir);

  Zenith__V1__Job* g = NULL;
  EXPECT_OK(zn_store_get_job(s, "j-42", &g), s);
  assert_string_equal(g->id, "j-42");
  check_spec(g->spec, &spec);
  assert_true(g->has_state && g->has_step && g->has_total_steps && g->has_epoch);
  assert_true(g->has_created_unix_ms && g->has_started_unix_ms && g->has_finished_unix_ms);
  assert_true(g->has_has_test_result && g->has_test_loss && g->has_test_accuracy);
  assert_int_equal(g->state, ZENITH__V1__JOB_STATE__FAILED);
  assert_string_equal(g->reason, job.reason);
  assert_string_equal(g->error, job.error);
  assert_int_equal(g->step, 1234);
  assert_int_equal(g->total_steps, 1407);
  assert_int_equal(g->epoch, 3);
  assert_int_equal(g->created_unix_ms, 1764780000123);
  assert_int_equal(g->started_unix_ms, 1764780001456);
  assert_int_equal(g->finished_unix_ms, 1764780099789);
  assert_int_equal(g->has_test_result, 1);
  EXPECT_DBL(g->test_loss, 0.31415926535897931);
  EXPECT_DBL(g->test_accuracy, 0.8871);
  assert_int_equal(g->n_workers, 2);
  assert_string_equal(g->workers[0], "w-alpha");
  assert_string_equal(g->workers[1], "w-beta");
  assert_non_null(g->last);
  check_metrics(g->last, 1234);

  zenith__v1__job__free_unpacked(g, NULL);
  zn_store_close(s);
}

static void list_keeps_creation_order_across_updates(void** state) {
  fixture* f = *state;
  zn_store* s = open_ok(f->dir);
  /* Created times out of id order, and j-2 updated last: the listing follows
   * the order in which jobs were first stored, not time stamps or updates. */
  const char* ids[] = {"j-1", "j-2", "j-3", "j-10"};
  const int64_t created[] = {500, 100, 300, 200};
  for (int i = 0; i < 4; i++) {
    Zenith__V1__Job* j = make_job(ids[i], created[i]);
    EXPECT_OK(zn_store_put_job(s, j), s);
    zenith__v1__job__free_unpacked(j, NULL);
  }
  Zenith__V1__Job* j2 = make_job("j-2", 100);
  j2->state = ZENITH__V1__JOB_STATE__RUNNING;
  EXPECT_OK(zn_store_put_job(s, j2), s);
  zenith__v1__job__free_unpacked(j2, NULL);
  zn_store_close(s);

  s = open_ok(f->dir);
  Zenith__V1__Job** jobs = NULL;
  size_t n = 0;
  EXPECT_OK(zn_store_list_jobs(s, &jobs, &n), s);
  assert_int_equal(n, 4);
  for (size_t i = 0; i < n; i++) {
    assert_string_equal(jobs[i]->id, ids[i]);
    assert_int_equal(jobs[i]->created_unix_ms, created[i]);
  }
  assert_int_equal(jobs[1]->state, ZENITH__V1__JOB_STATE__RUNNING);
  assert_int_equal(jobs[0]->state, ZENITH__V1__JOB_STATE__QUEUED);
  zn_store_free_jobs(jobs, n);
  zn_store_close(s);
}

static void list_of_empty_store_is_empty(void** state) {
  fixture* f = *state;
  zn_store* s = open_ok(f->dir);
  Zenith__V1__Job** jobs = (Zenith__V1__Job**)1;
  size_t n = 99;
  EXPECT_OK(zn_store_list_jobs(s, &jobs, &n), s);
  assert_int_equal(n, 0);
  zn_store_free_jobs(jobs, n);
  zn_store_close(s);
}

static void count_jobs_counts_each_state_after_updates(void** state) {
  fixture* f = *state;
  zn_store* s = open_ok(f->dir);
  /* j-2 moves from QUEUED to RUNNING: it is counted once, in its latest state. */
  const char* ids[] = {"j-1", "j-2", "j-3", "j-2"};
  const int states[] = {ZENITH__V1__JOB_STATE__SUCCEEDED, ZENITH__V1__JOB_STATE__QUEUED,
                        ZENITH__V1__JOB_STATE__SUCCEEDED, ZENITH__V1__JOB_STATE__RUNNING};
  for (int i = 0; i < 4; i++) {
    Zenith__V1__Job* j = make_job(ids[i], 1);
    j->state = states[i];
    EXPECT_OK(zn_store_put_job(s, j), s);
    zenith__v1__job__free_unpacked(j, NULL);
  }
  int64_t counts[8];
  EXPECT_OK(zn_store_count_jobs(s, counts, 8), s);
  assert_int_equal(counts[ZENITH__V1__JOB_STATE__QUEUED], 0);
  assert_int_equal(counts[ZENITH__V1__JOB_STATE__RUNNING], 1);
  assert_int_equal(counts[ZENITH__V1__JOB_STATE__SUCCEEDED], 2);
  assert_int_equal(counts[ZENITH__V1__JOB_STATE__FAILED], 0);
  assert_int_equal(counts[7], 0);
  zn_store_close(s);
}

static void job_ids_continue_after_reopen(void** state) {
  fixture* f = *state;
  char id[16];
  zn_store* s = open_ok(f->dir);
  EXPECT_OK(zn_store_new_job_id(s, id, sizeof id), s);
  assert_string_equal(id, "j-1");
  EXPECT_OK(zn_store_new_job_id(s, id, sizeof id), s);
  assert_string_equal(id, "j-2");
  zn_store_close(s);

  s = open_ok(f->dir);
  EXPECT_OK(zn_store_new_job_id(s, id, sizeof id), s);
  assert_string_equal(id, "j-3");
  zn_store_close(s);
}

/* A worker that lived through a coordinator restart still uses its old id: a new registration
 * must never be handed the same one. */
static void worker_ids_continue_after_reopen_apart_from_job_ids(void** state) {
  fixture* f = *state;
  char id[32];
  zn_store* s = open_ok(f->dir);
  EXPECT_OK(zn_store_new_worker_id(s, id, sizeof id), s);
  assert_string_equal(id, "w-1");
  EXPECT_OK(zn_store_new_job_id(s, id, sizeof id), s);
  assert_string_equal(id, "j-1");
  EXPECT_OK(zn_store_new_worker_id(s, id, sizeof id), s);
  assert_string_equal(id, "w-2");
  zn_store_close(s);
  s = open_ok(f->dir);
  EXPECT_OK(zn_store_new_worker_id(s, id, sizeof id), s);
  assert_string_equal(id, "w-3");
  zn_store_close(s);
}

static void get_of_unknown_id_is_not_found(void** state) {
  fixture* f = *state;
  zn_store* s = open_ok(f->dir);
  Zenith__V1__Job* j = make_job("j-1", 1);
  EXPECT_OK(zn_store_put_job(s, j), s);
  zenith__v1__job__free_unpacked(j, NULL);

  Zenith__V1__Job* g = (Zenith__V1__Job*)1;
  assert_int_equal(zn_store_get_job(s, "j-7", &g), ZN_ERR_NOT_FOUND);
  assert_null(g);
  assert_non_null(strstr(zn_store_errmsg(s), "j-7"));
  zn_store_close(s);
}

/* ---------------------------------------------------------------- history */

typedef struct {
  int kinds[256];
  int64_t keys[256]; /* metrics and evals: step; events: unix_ms */
  char event_kinds[8][16];
  int n, events, stop_after;
} collected;

static int collect(void* ud, const Zenith__V1__WatchJobResponse* item) {
  collected* c = ud;
  if (c->n >= 256) return 1;
  c->kinds[c->n] = (int)item->item_case;
  switch (item->item_case) {
    case ZENITH__V1__WATCH_JOB_RESPONSE__ITEM_METRICS:
      check_metrics(item->metrics, item->metrics->step);
      c->keys[c->n] = item->metrics->step;
      break;
    case ZENITH__V1__WATCH_JOB_RESPONSE__ITEM_EVAL:
      EXPECT_DBL(item->eval->test_loss, 0.5 + 1.0 / (double)item->eval->step);
      EXPECT_DBL(item->eval->test_accuracy, 0.8 - 1.0 / (double)item->eval->step);
      c->keys[c->n] = item->eval->step;
      break;
    case ZENITH__V1__WATCH_JOB_RESPONSE__ITEM_EVENT:
      c->keys[c->n] = item->event->unix_ms;
      snprintf(c->event_kinds[c->events++ % 8], 16, "%s", item->event->kind);
      break;
    default:
      fail_msg("unexpected item case %d", (int)item->item_case);
  }
  c->n++;
  return c->stop_after && c->n >= c->stop_after;
}

static void append_event(zn_store* s, const char* job, const char* kind, int64_t ms) {
  Zenith__V1__JobEvent e = ZENITH__V1__JOB_EVENT__INIT;
  e.has_unix_ms = 1;
  e.unix_ms = ms;
  e.kind = (char*)kind;
  e.message = "from the test";
  EXPECT_OK(zn_store_append_event(s, job, &e), s);
}

static void append_eval(zn_store* s, const char* job, int64_t step) {
  Zenith__V1__EvalResult e = ZENITH__V1__EVAL_RESULT__INIT;
  e.has_step = e.has_test_loss = e.has_test_accuracy = e.has_unix_ms = 1;
  e.step = step;
  e.test_loss = 0.5 + 1.0 / (double)step;
  e.test_accuracy = 0.8 - 1.0 / (double)step;
  e.unix_ms = 1764780000000 + step;
  EXPECT_OK(zn_store_append_eval(s, job, &e), s);
}

static void history_replays_in_append_order_after_reopen(void** state) {
  fixture* f = *state;
  zn_store* s = open_ok(f->dir);
  append_event(s, "j-1", "submitted", 111);
  EXPECT_OK(append_steps(s, "j-1", 1, BATCH), s);
  EXPECT_OK(append_steps(s, "j-2", 1, 3), s); /* another job's rows, in between */
  EXPECT_OK(append_steps(s, "j-1", 11, BATCH), s);
  append_eval(s, "j-1", 20);
  EXPECT_OK(append_steps(s, "j-1", 21, 7), s);
  append_event(s, "j-1", "succeeded", 222);
  zn_store_close(s);

  s = open_ok(f->dir);
  int64_t count = 0;
  EXPECT_OK(zn_store_history_count(s, "j-1", &count), s);
  assert_int_equal(count, 1 + 10 + 10 + 1 + 7 + 1);
  EXPECT_OK(zn_store_history_count(s, "j-2", &count), s);
  assert_int_equal(count, 3);

  collected c = {0};
  EXPECT_OK(zn_store_replay(s, "j-1", collect, &c), s);
  assert_int_equal(c.n, 30);
  const int M = ZENITH__V1__WATCH_JOB_RESPONSE__ITEM_METRICS;
  int pos = 0;
  assert_int_equal(c.kinds[pos], ZENITH__V1__WATCH_JOB_RESPONSE__ITEM_EVENT);
  assert_int_equal(c.keys[pos++], 111);
  for (int step = 1; step <= 20; step++, pos++) {
    assert_int_equal(c.kinds[pos], M);
    assert_int_equal(c.keys[pos], step);
  }
  assert_int_equal(c.kinds[pos], ZENITH__V1__WATCH_JOB_RESPONSE__ITEM_EVAL);
  assert_int_equal(c.keys[pos++], 20);
  for (int step = 21; step <= 27; step++, pos++) {
    assert_int_equal(c.kinds[pos], M);
    assert_int_equal(c.keys[pos], step);
  }
  assert_int_equal(c.kinds[pos], ZENITH__V1__WATCH_JOB_RESPONSE__ITEM_EVENT);
  assert_int_equal(c.keys[pos], 222);
  assert_string_equal(c.event_kinds[0], "submitted");
  assert_string_equal(c.event_kinds[1], "succeeded");
  zn_store_close(s);
}

static void replay_of_job_without_history_delivers_nothing(void** state) {
  fixture* f = *state;
  zn_store* s = open_ok(f->dir);
  EXPECT_OK(append_steps(s, "j-1", 1, 2), s);
  collected c = {0};
  EXPECT_OK(zn_store_replay(s, "j-9", collect, &c), s);
  assert_int_equal(c.n, 0);
  int64_t count = -1;
  EXPECT_OK(zn_store_history_count(s, "j-9", &count), s);
  assert_int_equal(count, 0);
  zn_store_close(s);
}

static void replay_stops_when_callback_asks(void** state) {
  fixture* f = *state;
  zn_store* s = open_ok(f->dir);
  EXPECT_OK(append_steps(s, "j-1", 1, BATCH), s);
  collected c = {.stop_after = 4};
  assert_int_equal(zn_store_replay(s, "j-1", collect, &c), ZN_ERR_CANCELLED);
  assert_int_equal(c.n, 4);

  /* The statement was reset: a second replay starts from the first row. */
  collected all = {0};
  EXPECT_OK(zn_store_replay(s, "j-1", collect, &all), s);
  assert_int_equal(all.n, BATCH);
  assert_int_equal(all.keys[0], 1);
  zn_store_close(s);
}

/* ---------------------------------------------------------------- refusals */

static void write_file(const char* path, const void* data, size_t len) {
  FILE* fp = fopen(path, "wb");
  assert_non_null(fp);
  assert_int_equal(fwrite(data, 1, len, fp), len);
  fclose(fp);
}

static void expect_open_fails_naming(const char* dir, const char* name, const char* why) {
  char err[512] = "";
  zn_store* s = (zn_store*)1;
  int rc = zn_store_open(dir, &s, err, sizeof err);
  print_message("error text: %s\n", err);
  assert_int_not_equal(rc, ZN_OK);
  assert_null(s);
  if (!strstr(err, name) || !strstr(err, why))
    fail_msg("\"%s\" lacks \"%s\" or \"%s\"", err, name, why);
}

static void garbage_file_is_refused_naming_it(void** state) {
  fixture* f = *state;
  char path[128], garbage[4096];
  snprintf(path, sizeof path, "%s/zenith.db", f->dir);
  for (size_t i = 0; i < sizeof garbage; i++) garbage[i] = (char)(i * 131 + 7);
  write_file(path, garbage, sizeof garbage);

  expect_open_fails_naming(f->dir, path, "not a Zenith database");

  /* Refused without being touched. */
  struct stat st;
  assert_int_equal(stat(path, &st), 0);
  assert_int_equal(st.st_size, sizeof garbage);
}

static void short_text_file_is_refused_naming_it(void** state) {
  fixture* f = *state;
  char path[128];
  snprintf(path, sizeof path, "%s/zenith.db", f->dir);
  write_file(path, "jobs: j-1 j-2\n", 14);
  expect_open_fails_naming(f->dir, path, "not a Zenith database");
}

static void other_sqlite_file_is_refused_naming_it(void** state) {
  fixture* f = *state;
  char path[128];
  snprintf(path, sizeof path, "%s/zenith.db", f->dir);
  sqlite3* db = NULL;
  assert_int_equal(sqlite3_open(path, &db), SQLITE_OK);
  assert_int_equal(
      sqlite3_exec(db, "CREATE TABLE t (x); INSERT INTO t VALUES (1);", NULL, NULL, NULL),
      SQLITE_OK);
  sqlite3_close(db);
  expect_open_fails_naming(f->dir, path, "not a Zenith database");
}

static void folder_below_a_file_is_refused_naming_it(void** state) {
  fixture* f = *state;
  char file[128], dir[160];
  snprintf(file, sizeof file, "%s/plain", f->dir);
  write_file(file, "x", 1);
  snprintf(dir, sizeof dir, "%s/sub/store", file);
  expect_open_fails_naming(dir, file, "Not a directory");
}

/* Opens dir in a child (as user nobody when we are root: root writes anywhere)
 * and sends back the code and error text. */
static int open_as_nobody(const char* dir, char* err, size_t errlen) {
  int fd[2];
  assert_int_equal(pipe(fd), 0);
  pid_t pid = fork();
  assert_true(pid >= 0);
  if (pid == 0) {
    close(fd[0]);
    char msg[512] = "";
    int rc = ZN_ERR_INVALID;
    if (geteuid() == 0 && (setgid(65534) != 0 || setuid(65534) != 0))
      snprintf(msg, sizeof msg, "setuid(nobody): %s", strerror(errno));
    else {
      zn_store* s = NULL;
      rc = zn_store_open(dir, &s, msg, sizeof msg);
      zn_store_close(s);
    }
    if (write(fd[1], &rc, sizeof rc) != sizeof rc || write(fd[1], msg, sizeof msg) != sizeof msg)
      _exit(2);
    _exit(0);
  }
  close(fd[1]);
  int rc = 1;
  char msg[512] = "";
  ssize_t got = read(fd[0], &rc, sizeof rc);
  if (got == sizeof rc) got = read(fd[0], msg, sizeof msg);
  close(fd[0]);
  int status = 0;
  waitpid(pid, &status, 0);
  assert_true(WIFEXITED(status) && WEXITSTATUS(status) == 0);
  snprintf(err, errlen, "%s", msg);
  return rc;
}

static void unwritable_folder_is_refused_naming_it(void** state) {
  fixture* f = *state;
  char dir[128], err[512];
  snprintf(dir, sizeof dir, "%s/readonly", f->dir);
  assert_int_equal(mkdir(dir, 0555), 0);
  int rc = open_as_nobody(dir, err, sizeof err);
  print_message("error text: %s\n", err);
  assert_int_not_equal(rc, ZN_OK);
  if (!strstr(err, dir) || !strstr(err, "not writable"))
    fail_msg("\"%s\" lacks \"%s\" or \"not writable\"", err, dir);
}

static void second_open_is_refused_while_held(void** state) {
  fixture* f = *state;
  zn_store* s = open_ok(f->dir);
  char path[128];
  snprintf(path, sizeof path, "%s/zenith.db", f->dir);
  expect_open_fails_naming(f->dir, path, "in use by another process");
  zn_store_close(s);
  zn_store_close(open_ok(f->dir)); /* and free again once closed */
}

static void missing_folders_are_created(void** state) {
  fixture* f = *state;
  char dir[160];
  snprintf(dir, sizeof dir, "%s/a/b/c", f->dir);
  zn_store* s = open_ok(dir);
  char id[16];
  EXPECT_OK(zn_store_new_job_id(s, id, sizeof id), s);
  zn_store_close(s);
  char path[192];
  snprintf(path, sizeof path, "%s/zenith.db", dir);
  struct stat st;
  assert_int_equal(stat(path, &st), 0);
}

/* ---------------------------------------------------------------- crash */

/* The child: resumes after what the store holds, appends batches forever and
 * reports the last step of each committed batch on fd. */
static void append_forever(const char* dir, int fd) {
  alarm(60); /* never outlive a parent that failed to kill us */
  zn_store* s = NULL;
  char err[512];
  int64_t have = 0;
  if (zn_store_open(dir, &s, err, sizeof err) != ZN_OK ||
      zn_store_history_count(s, "j-1", &have) != ZN_OK)
    _exit(3);
  for (int64_t first = have + 1;; first += BATCH) {
    if (append_steps(s, "j-1", first, BATCH) != ZN_OK) _exit(4);
    int64_t last = first + BATCH - 1;
    if (write(fd, &last, sizeof last) != sizeof last) _exit(5);
  }
}

static int64_t run_and_kill(const char* dir, int64_t kill_after_step) {
  int fd[2];
  assert_int_equal(pipe(fd), 0);
  pid_t pid = fork();
  assert_true(pid >= 0);
  if (pid == 0) {
    close(fd[0]);
    append_forever(dir, fd[1]);
  }
  close(fd[1]);

  int64_t acked = 0, last;
  while (acked < kill_after_step && read(fd[0], &last, sizeof last) == sizeof last) acked = last;
  kill(pid, SIGKILL);
  /* Batches committed between our last read and the kill were acknowledged too. */
  while (read(fd[0], &last, sizeof last) == sizeof last) acked = last;
  close(fd[0]);

  int status = 0;
  assert_int_equal(waitpid(pid, &status, 0), pid);
  if (!WIFSIGNALED(status) || WTERMSIG(status) != SIGKILL)
    fail_msg("child was not killed (exit status %d)", WIFEXITED(status) ? WEXITSTATUS(status) : -1);
  return acked;
}

static void integrity_ok(const char* dir) {
  char path[128];
  snprintf(path, sizeof path, "%s/zenith.db", dir);
  sqlite3* db = NULL;
  sqlite3_stmt* st = NULL;
  assert_int_equal(sqlite3_open_v2(path, &db, SQLITE_OPEN_READWRITE, NULL), SQLITE_OK);
  assert_int_equal(sqlite3_prepare_v2(db, "PRAGMA integrity_check", -1, &st, NULL), SQLITE_OK);
  assert_int_equal(sqlite3_step(st), SQLITE_ROW);
  assert_string_equal((const char*)sqlite3_column_text(st, 0), "ok");
  sqlite3_finalize(st);
  sqlite3_close(db);
}

static int check_next_step(void* ud, const Zenith__V1__WatchJobResponse* item) {
  int64_t* next = ud;
  assert_int_equal(item->item_case, ZENITH__V1__WATCH_JOB_RESPONSE__ITEM_METRICS);
  check_metrics(item->metrics, *next);
  (*next)++;
  return 0;
}

static void kill_during_appends_keeps_whole_batches(void** state) {
  fixture* f = *state;
  int64_t acked = 0;
  /* Three crashes, each child resuming from the rows the last one left. */
  for (int round = 0; round < 3; round++) {
    acked = run_and_kill(f->dir, acked + 200 + 30 * round);
    integrity_ok(f->dir);

    zn_store* s = open_ok(f->dir);
    int64_t count = 0;
    EXPECT_OK(zn_store_history_count(s, "j-1", &count), s);
    print_message("round %d: %" PRId64 " steps acknowledged, %" PRId64 " rows stored\n", round,
                  acked, count);
    /* Every acknowledged batch is there; at most the batch in flight is more. */
    assert_true(count >= acked && count <= acked + BATCH);
    assert_int_equal(count % BATCH, 0);

    /* Each replayed row is complete and steps run 1, 2, ... without a gap. */
    int64_t next = 1;
    EXPECT_OK(zn_store_replay(s, "j-1", check_next_step, &next), s);
    assert_int_equal(next - 1, count);
    zn_store_close(s);
    acked = count;
  }
}

/* ---------------------------------------------------------------- checkpoints */

static void put_checkpoint(zn_store* s, const char* id, const char* job, int64_t step) {
  char path[64], digest[65];
  snprintf(path, sizeof path, "/ckpt/%s/step-%lld.safetensors", job, (long long)step);
  for (int i = 0; i < 64; i++) digest[i] = "0123456789abcdef"[(step * 7 + i) % 16];
  digest[64] = '\0';
  Zenith__V1__Checkpoint c = ZENITH__V1__CHECKPOINT__INIT;
  c.id = (char*)id;
  c.job_id = (char*)job;
  c.has_step = c.has_bytes = c.has_unix_ms = 1;
  c.step = step;
  c.path = path;
  c.digest = digest;
  c.bytes = 1000 + step;
  c.unix_ms = 1700000000000 + step;
  EXPECT_OK(zn_store_add_checkpoint(s, &c), s);
}

static void checkpoints_are_listed_per_job_in_order_and_survive_reopen(void** state) {
  fixture* f = *state;
  zn_store* s = open_ok(f->dir);
  put_checkpoint(s, "c-1", "j-1", 100);
  put_checkpoint(s, "c-2", "j-2", 50);
  put_checkpoint(s, "c-3", "j-1", 200);
  put_checkpoint(s, "c-4", "j-1", 300);
  EXPECT_OK(zn_store_remove_checkpoint(s, "c-1"), s);
  /* An id is never reused, removed or not. */
  Zenith__V1__Checkpoint dup = ZENITH__V1__CHECKPOINT__INIT;
  dup.id = "c-1";
  dup.job_id = "j-1";
  assert_int_not_equal(zn_store_add_checkpoint(s, &dup), ZN_OK);
  zn_store_close(s);

  s = open_ok(f->dir);
  Zenith__V1__Checkpoint** list = NULL;
  size_t n = 0;
  EXPECT_OK(zn_store_list_checkpoints(s, "j-1", &list, &n), s);
  assert_int_equal(n, 2);
  assert_string_equal(list[0]->id, "c-3");
  assert_int_equal(list[0]->step, 200);
  assert_string_equal(list[0]->path, "/ckpt/j-1/step-200.safetensors");
  assert_int_equal(list[0]->bytes, 1200);
  assert_int_equal(list[0]->unix_ms, 1700000000200);
  assert_int_equal(strlen(list[0]->digest), 64);
  assert_string_equal(list[1]->id, "c-4");
  assert_int_equal(list[1]->step, 300);
  zn_store_free_checkpoints(list, n);
  EXPECT_OK(zn_store_list_checkpoints(s, "j-9", &list, &n), s);
  assert_int_equal(n, 0);
  zn_store_free_checkpoints(list, n);
  zn_store_close(s);
}

/* A database written by the first schema (no checkpoints table) is upgraded in place: its jobs
 * stay, and checkpoints can be recorded. */
static void version_1_database_gains_the_checkpoints_table(void** state) {
  fixture* f = *state;
  zn_store* s = open_ok(f->dir);
  Zenith__V1__Job job = ZENITH__V1__JOB__INIT;
  job.id = "j-1";
  job.has_state = 1;
  job.state = ZENITH__V1__JOB_STATE__FAILED;
  EXPECT_OK(zn_store_put_job(s, &job), s);
  zn_store_close(s);

  char path[PATH_MAX];
  snprintf(path, sizeof path, "%s/zenith.db", f->dir);
  sqlite3* db = NULL;
  assert_int_equal(sqlite3_open(path, &db), SQLITE_OK);
  assert_int_equal(
      sqlite3_exec(db, "DROP TABLE checkpoints; PRAGMA user_version = 1;", NULL, NULL, NULL),
      SQLITE_OK);
  sqlite3_close(db);

  s = open_ok(f->dir);
  Zenith__V1__Job* got = NULL;
  EXPECT_OK(zn_store_get_job(s, "j-1", &got), s);
  assert_int_equal(got->state, ZENITH__V1__JOB_STATE__FAILED);
  zenith__v1__job__free_unpacked(got, NULL);
  put_checkpoint(s, "c-1", "j-1", 10);
  Zenith__V1__Checkpoint** list = NULL;
  size_t n = 0;
  EXPECT_OK(zn_store_list_checkpoints(s, "j-1", &list, &n), s);
  assert_int_equal(n, 1);
  zn_store_free_checkpoints(list, n);
  zn_store_close(s);
}

int main(int argc, char** argv) {
#define T(fn) cmocka_unit_test_setup_teardown(fn, setup, teardown)
  const struct CMUnitTest tests[] = {
      T(job_round_trip_keeps_every_field),
      T(list_keeps_creation_order_across_updates),
      T(list_of_empty_store_is_empty),
      T(count_jobs_counts_each_state_after_updates),
      T(job_ids_continue_after_reopen),
      T(worker_ids_continue_after_reopen_apart_from_job_ids),
      T(get_of_unknown_id_is_not_found),
      T(history_replays_in_append_order_after_reopen),
      T(replay_of_job_without_history_delivers_nothing),
      T(replay_stops_when_callback_asks),
      T(garbage_file_is_refused_naming_it),
      T(short_text_file_is_refused_naming_it),
      T(other_sqlite_file_is_refused_naming_it),
      T(folder_below_a_file_is_refused_naming_it),
      T(unwritable_folder_is_refused_naming_it),
      T(second_open_is_refused_while_held),
      T(missing_folders_are_created),
      T(kill_during_appends_keeps_whole_batches),
      T(checkpoints_are_listed_per_job_in_order_and_survive_reopen),
      T(version_1_database_gains_the_checkpoints_table),
  };
#undef T
  if (argc > 1) {
    /* A misspelt name must fail, not run zero tests and pass. */
    size_t i = 0;
    while (i < sizeof tests / sizeof tests[0] && strcmp(tests[i].name, argv[1]) != 0) i++;
    if (i == sizeof tests / sizeof tests[0]) {
      fprintf(stderr, "test_store: no test named %s\n", argv[1]);
      return 2;
    }
    cmocka_set_test_filter(argv[1]);
  }
  return cmocka_run_group_tests(tests, NULL, NULL);
}
