/* Tests of the collectives interface over its Gloo backend, with real processes on loopback.
 *
 * Each test forks one process per rank. The ranks rendezvous through a key-value store kept in a
 * temporary folder (a key is a file written atomically by rename, so a reader never sees half a
 * value), run their collectives, write what they received to out-<rank>.bin in that folder and
 * report through their exit code. The parent then checks the exit codes and compares the outputs
 * with references it computes itself in double precision. A rank that hangs is killed at a
 * deadline and fails the test, so no test can hang. */
#define _POSIX_C_SOURCE 200809L

#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <dirent.h>
#include <errno.h>
#include <float.h>
#include <math.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "zn_comm.h"

#define MAX_RANKS 4
#define DEADLINE_MS 10000
#define EXIT_CREATE 100

/* ---- A key-value store in a folder, shared by forked processes ---- */

typedef struct {
  char dir[64];
} dir_kv;

static void key_path(const dir_kv* kv, const char* key, char* path, size_t cap) {
  int n = snprintf(path, cap, "%s/kv-", kv->dir);
  for (const char* c = key; *c && (size_t)n + 1 < cap; c++) path[n++] = *c == '/' ? '_' : *c;
  path[n] = '\0';
}

static int kv_set(void* ctx, const char* key, const void* value, size_t len) {
  char path[256], tmp[300];
  key_path(ctx, key, path, sizeof(path));
  snprintf(tmp, sizeof(tmp), "%s.tmp%d", path, (int)getpid());
  FILE* f = fopen(tmp, "wb");
  if (!f) return ZN_ERR_IO;
  size_t wrote = fwrite(value, 1, len, f);
  if (fclose(f) != 0 || wrote != len) return ZN_ERR_IO;
  return rename(tmp, path) == 0 ? ZN_OK : ZN_ERR_IO;
}

static int read_file(const char* path, void** out, size_t* len) {
  FILE* f = fopen(path, "rb");
  if (!f) return errno == ENOENT ? ZN_ERR_NOT_FOUND : ZN_ERR_IO;
  fseek(f, 0, SEEK_END);
  long size = ftell(f);
  fseek(f, 0, SEEK_SET);
  char* buf = malloc(size > 0 ? (size_t)size : 1);
  size_t got = fread(buf, 1, (size_t)size, f);
  fclose(f);
  if (got != (size_t)size) {
    free(buf);
    return ZN_ERR_IO;
  }
  *out = buf;
  *len = got;
  return ZN_OK;
}

static int kv_get(void* ctx, const char* key, void** value, size_t* len) {
  char path[256];
  key_path(ctx, key, path, sizeof(path));
  return read_file(path, value, len);
}

static double now_ms(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return ts.tv_sec * 1e3 + ts.tv_nsec / 1e6;
}

static void sleep_ms(int ms) {
  struct timespec ts = {ms / 1000, (long)(ms % 1000) * 1000000L};
  nanosleep(&ts, NULL);
}

static int kv_wait(void* ctx, const char* const* keys, int nkeys, int timeout_ms) {
  double deadline = now_ms() + timeout_ms;
  for (;;) {
    int present = 0;
    for (int i = 0; i < nkeys; i++) {
      char path[256];
      key_path(ctx, keys[i], path, sizeof(path));
      present += access(path, F_OK) == 0;
    }
    if (present == nkeys) return ZN_OK;
    if (now_ms() > deadline) return ZN_ERR_TIMEOUT;
    sleep_ms(2);
  }
}

/* ---- Forking a world of ranks ---- */

typedef struct world world;
typedef int (*rank_fn)(zn_comm* comm, const world* w);

struct world {
  int size;
  int timeout_ms;
  int present; /* ranks below this are started; the rest never show up */
  rank_fn fn;
  size_t n; /* elements or bytes, as the test means them */
  char dir[64];
  int status[MAX_RANKS]; /* waitpid status of each rank */
};

/* Prints "rank r: ..." and returns code from the rank's function when cond is false. */
#define RANK_CHECK(cond, code, ...)                     \
  do {                                                  \
    if (!(cond)) {                                      \
      fprintf(stderr, "rank %d: ", zn_comm_rank(comm)); \
      fprintf(stderr, __VA_ARGS__);                     \
      fprintf(stderr, "\n");                            \
      return (code);                                    \
    }                                                   \
  } while (0)

static int write_output(const world* w, int rank, const void* data, size_t len) {
  char path[128];
  snprintf(path, sizeof(path), "%s/out-%d.bin", w->dir, rank);
  FILE* f = fopen(path, "wb");
  if (!f) return 0;
  size_t wrote = fwrite(data, 1, len, f);
  return fclose(f) == 0 && wrote == len;
}

static void* read_output(const world* w, int rank, size_t expect_len) {
  char path[128];
  snprintf(path, sizeof(path), "%s/out-%d.bin", w->dir, rank);
  void* data = NULL;
  size_t len = 0;
  int rc = read_file(path, &data, &len);
  if (rc != ZN_OK) fail_msg("rank %d wrote no output (%s): %d", rank, path, rc);
  if (len != expect_len)
    fail_msg("rank %d output is %zu bytes, expected %zu", rank, len, expect_len);
  return data;
}

static int rank_main(const world* w, int rank) {
  dir_kv ctx;
  snprintf(ctx.dir, sizeof(ctx.dir), "%s", w->dir);
  zn_kv kv = {&ctx, kv_set, kv_get, kv_wait};
  zn_comm_config cfg = {rank, w->size, "127.0.0.1", "run-1", w->timeout_ms};
  zn_comm* comm = NULL;
  char err[1024] = "";
  if (zn_comm_create_gloo(&cfg, &kv, &comm, err, sizeof(err)) != ZN_OK) {
    fprintf(stderr, "rank %d: create failed: %s\n", rank, err);
    return EXIT_CREATE;
  }
  int code = w->fn(comm, w);
  zn_comm_destroy(comm);
  return code;
}

static void remove_dir(const char* dir) {
  DIR* d = opendir(dir);
  if (!d) return;
  struct dirent* e;
  while ((e = readdir(d)) != NULL) {
    if (strcmp(e->d_name, ".") == 0 || strcmp(e->d_name, "..") == 0) continue;
    char path[512];
    snprintf(path, sizeof(path), "%s/%s", dir, e->d_name);
    unlink(path);
  }
  closedir(d);
  rmdir(dir);
}

/* The folder of the last world, removed after each test whether it passed or not. */
static char last_dir[64];

static int remove_last_dir(void** state) {
  if (last_dir[0]) remove_dir(last_dir);
  last_dir[0] = '\0';
  return 0;
}

/* Waits for every rank until the deadline, then kills those still running. */
static void reap(world* w, pid_t* pids) {
  double deadline = now_ms() + DEADLINE_MS;
  int left = w->present;
  while (left > 0) {
    for (int r = 0; r < w->present; r++) {
      if (pids[r] > 0 && waitpid(pids[r], &w->status[r], WNOHANG) == pids[r]) {
        pids[r] = 0;
        left--;
      }
    }
    if (left > 0 && now_ms() > deadline) break;
    if (left > 0) sleep_ms(5);
  }
  int hung = -1;
  for (int r = 0; r < w->present; r++) {
    if (pids[r] <= 0) continue;
    kill(pids[r], SIGKILL);
    waitpid(pids[r], &w->status[r], 0);
    hung = r;
  }
  if (hung >= 0) fail_msg("rank %d was still running after %d ms", hung, DEADLINE_MS);
}

/* Runs w->fn on ranks 0..present-1, each in its own process, in a fresh folder. */
static void run_world(world* w) {
  snprintf(w->dir, sizeof(w->dir), "/tmp/zn-comm-test-XXXXXX");
  assert_non_null(mkdtemp(w->dir));
  snprintf(last_dir, sizeof(last_dir), "%s", w->dir);
  if (w->present == 0) w->present = w->size;

  pid_t pids[MAX_RANKS] = {0};
  fflush(stdout);
  fflush(stderr);
  for (int r = 0; r < w->present; r++) {
    pids[r] = fork();
    assert_true(pids[r] >= 0);
    if (pids[r] == 0) exit(rank_main(w, r));
  }
  reap(w, pids);
}

static void assert_exited(const world* w, int rank, int code) {
  int st = w->status[rank];
  if (!WIFEXITED(st)) fail_msg("rank %d did not exit normally (status 0x%x)", rank, st);
  if (WEXITSTATUS(st) != code) {
    fail_msg("rank %d exited with %d, expected %d", rank, WEXITSTATUS(st), code);
  }
}

static void assert_all_exited_ok(const world* w) {
  for (int r = 0; r < w->present; r++) assert_exited(w, r, 0);
}

/* ---- Inputs every process computes the same way ---- */

static uint64_t mix(uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

static uint64_t input_bits(int rank, size_t i) {
  return mix(((uint64_t)rank << 40) ^ (uint64_t)i);
}

/* In [-1, 1) with the full 24-bit mantissa used, so that sums of them round. */
static float input_f32(int rank, size_t i) {
  return (float)((double)(input_bits(rank, i) >> 40) / 8388608.0 - 1.0);
}

static double input_f64(int rank, size_t i) {
  return (double)(input_bits(rank, i) >> 11) / 4503599627370496.0 - 1.0;
}

/* An integer in [-1000, 1000]: every partial sum is exact in float. */
static float input_int(int rank, size_t i) {
  return (float)((int)(input_bits(rank, i) % 2001) - 1000);
}

/* ---- What the ranks run ---- */

static int rank_allreduce_ints(zn_comm* comm, const world* w) {
  float* buf = malloc(w->n * sizeof(float));
  for (size_t i = 0; i < w->n; i++) buf[i] = input_int(zn_comm_rank(comm), i);
  int rc = zn_comm_allreduce_sum(comm, buf, w->n);
  RANK_CHECK(rc == ZN_OK, 1, "allreduce returned %d: %s", rc, zn_comm_error(comm));
  RANK_CHECK(write_output(w, zn_comm_rank(comm), buf, w->n * sizeof(float)), 2, "write failed");
  free(buf);
  return 0;
}

/* Sums twice from the same inputs; the two results must be the same bits. */
static int rank_allreduce_f32(zn_comm* comm, const world* w) {
  float* a = malloc(w->n * sizeof(float));
  float* b = malloc(w->n * sizeof(float));
  for (size_t i = 0; i < w->n; i++) a[i] = b[i] = input_f32(zn_comm_rank(comm), i);
  double t0 = now_ms();
  int rc = zn_comm_allreduce_sum(comm, a, w->n);
  if (zn_comm_rank(comm) == 0)
    fprintf(stderr, "rank 0: sum of %zu floats over %d ranks took %.1f ms\n", w->n, w->size,
            now_ms() - t0);
  RANK_CHECK(rc == ZN_OK, 1, "first allreduce returned %d: %s", rc, zn_comm_error(comm));
  rc = zn_comm_allreduce_sum(comm, b, w->n);
  RANK_CHECK(rc == ZN_OK, 1, "second allreduce returned %d: %s", rc, zn_comm_error(comm));
  RANK_CHECK(memcmp(a, b, w->n * sizeof(float)) == 0, 3, "two sums of the same inputs differ");
  RANK_CHECK(write_output(w, zn_comm_rank(comm), a, w->n * sizeof(float)), 2, "write failed");
  free(a);
  free(b);
  return 0;
}

static int rank_allreduce_f64(zn_comm* comm, const world* w) {
  double* buf = malloc(w->n * sizeof(double));
  for (size_t i = 0; i < w->n; i++) buf[i] = input_f64(zn_comm_rank(comm), i);
  int rc = zn_comm_allreduce_sum_f64(comm, buf, w->n);
  RANK_CHECK(rc == ZN_OK, 1, "allreduce returned %d: %s", rc, zn_comm_error(comm));
  RANK_CHECK(write_output(w, zn_comm_rank(comm), buf, w->n * sizeof(double)), 2, "write failed");
  free(buf);
  return 0;
}

/* The last rank is the root; the others start from a different byte pattern. */
static int rank_broadcast(zn_comm* comm, const world* w) {
  int rank = zn_comm_rank(comm), root = w->size - 1;
  unsigned char* buf = malloc(w->n);
  for (size_t i = 0; i < w->n; i++) {
    buf[i] = rank == root ? (unsigned char)input_bits(root, i) : (unsigned char)(0x5a + rank);
  }
  int rc = zn_comm_broadcast(comm, buf, w->n, root);
  RANK_CHECK(rc == ZN_OK, 1, "broadcast returned %d: %s", rc, zn_comm_error(comm));
  RANK_CHECK(write_output(w, rank, buf, w->n), 2, "write failed");
  free(buf);
  return 0;
}

/* The last rank arrives 300 ms late and records when it entered; the others record when they
 * left. Times are CLOCK_MONOTONIC, which all processes on one machine share. */
static int rank_barrier(zn_comm* comm, const world* w) {
  int rank = zn_comm_rank(comm);
  if (rank == w->size - 1) sleep_ms(300);
  double entered = now_ms();
  int rc = zn_comm_barrier(comm);
  double left = now_ms();
  RANK_CHECK(rc == ZN_OK, 1, "barrier returned %d: %s", rc, zn_comm_error(comm));
  double t = rank == w->size - 1 ? entered : left;
  RANK_CHECK(write_output(w, rank, &t, sizeof(t)), 2, "write failed");
  return 0;
}

/* Rank 1 takes part in one sum and is then killed; rank 0's next sum must fail, and fast. */
static int rank_peer_dies(zn_comm* comm, const world* w) {
  float buf[1024];
  for (int i = 0; i < 1024; i++) buf[i] = 1.0f;
  int rc = zn_comm_allreduce_sum(comm, buf, 1024);
  RANK_CHECK(rc == ZN_OK, 1, "first allreduce returned %d: %s", rc, zn_comm_error(comm));
  if (zn_comm_rank(comm) == 1) raise(SIGKILL);

  double t0 = now_ms();
  rc = zn_comm_allreduce_sum(comm, buf, 1024);
  double took = now_ms() - t0;
  RANK_CHECK(rc == ZN_ERR_COMM, 4, "allreduce after the peer died returned %d, expected %d", rc,
             ZN_ERR_COMM);
  RANK_CHECK(zn_comm_error(comm)[0] != '\0', 5, "no error message");
  fprintf(stderr, "rank 0: failed after %.0f ms with: %s\n", took, zn_comm_error(comm));
  RANK_CHECK(write_output(w, 0, &took, sizeof(took)), 2, "write failed");
  return 0;
}

/* Rank 1 stays alive but never joins the sum, outliving rank 0's timeout. */
static int rank_peer_silent(zn_comm* comm, const world* w) {
  if (zn_comm_rank(comm) == 1) {
    sleep_ms(w->timeout_ms + 1500);
    return 0;
  }
  float buf[16] = {0};
  double t0 = now_ms();
  int rc = zn_comm_allreduce_sum(comm, buf, 16);
  double took = now_ms() - t0;
  RANK_CHECK(rc == ZN_ERR_COMM, 4, "allreduce with a silent peer returned %d, expected %d", rc,
             ZN_ERR_COMM);
  RANK_CHECK(zn_comm_error(comm)[0] != '\0', 5, "no error message");
  fprintf(stderr, "rank 0: failed after %.0f ms with: %s\n", took, zn_comm_error(comm));
  RANK_CHECK(write_output(w, 0, &took, sizeof(took)), 2, "write failed");
  return 0;
}

/* The split allreduce belongs to device backends: Gloo refuses it with a reason, and the
 * communicator stays usable for ordinary collectives. */
static int rank_device_ops_refused(zn_comm* comm, const world* w) {
  float buf[2] = {1.0f, 2.0f};
  int rc = zn_comm_allreduce_sum_queued(comm, buf, 2);
  RANK_CHECK(rc == ZN_ERR_INVALID, 1, "queued allreduce on gloo returned %d", rc);
  RANK_CHECK(strstr(zn_comm_error(comm), "GPU backend") != NULL, 2, "error was '%s'",
             zn_comm_error(comm));
  rc = zn_comm_wait_event(comm, NULL);
  RANK_CHECK(rc == ZN_ERR_INVALID, 3, "wait_event on gloo returned %d", rc);
  RANK_CHECK(zn_comm_allreduce_sum(comm, buf, 2) == ZN_OK, 4, "allreduce after the refusal: %s",
             zn_comm_error(comm));
  RANK_CHECK(buf[0] == 2.0f && buf[1] == 4.0f, 5, "allreduce gave %g %g", buf[0], buf[1]);
  return 0;
}

/* ---- Tests ---- */

static void host_backend_refuses_the_device_split_allreduce(void** state) {
  world w = {.size = 2, .timeout_ms = 5000, .fn = rank_device_ops_refused, .n = 0};
  run_world(&w);
  assert_all_exited_ok(&w);
}

static void allreduce_sum_of_integers_is_exact_on_two_ranks(void** state) {
  world w = {.size = 2, .timeout_ms = 5000, .fn = rank_allreduce_ints, .n = 1000};
  run_world(&w);
  assert_all_exited_ok(&w);
  for (int r = 0; r < w.size; r++) {
    float* out = read_output(&w, r, w.n * sizeof(float));
    for (size_t i = 0; i < w.n; i++) {
      float expect = input_int(0, i) + input_int(1, i);
      if (out[i] != expect) fail_msg("rank %d [%zu]: got %g, expected %g", r, i, out[i], expect);
    }
    free(out);
  }
}

/* Each element is a sum of three floats with two roundings, so it lies within 2 units of float
 * rounding of the double-precision sum, measured against the sum of magnitudes. */
static void allreduce_of_500k_floats_matches_double_reference_on_three_ranks(void** state) {
  world w = {.size = 3, .timeout_ms = 5000, .fn = rank_allreduce_f32, .n = 500000};
  run_world(&w);
  assert_all_exited_ok(&w);
  float* out = read_output(&w, 0, w.n * sizeof(float));
  double worst = 0;
  for (size_t i = 0; i < w.n; i++) {
    double ref = 0, mag = 0;
    for (int r = 0; r < w.size; r++) ref += input_f32(r, i), mag += fabs(input_f32(r, i));
    double bound = 2 * (FLT_EPSILON / 2) * mag;
    double diff = fabs(out[i] - ref);
    if (diff > bound)
      fail_msg("[%zu]: got %.9g, reference %.9g, bound %.3g", i, out[i], ref, bound);
    if (mag > 0 && diff / mag > worst) worst = diff / mag;
  }
  print_message("worst error relative to sum of magnitudes: %.3g\n", worst);
  free(out);
}

static void allreduce_gives_every_rank_the_same_bits(void** state) {
  world w = {.size = 3, .timeout_ms = 5000, .fn = rank_allreduce_f32, .n = 500000};
  run_world(&w);
  assert_all_exited_ok(&w);
  float* out0 = read_output(&w, 0, w.n * sizeof(float));
  for (int r = 1; r < w.size; r++) {
    float* out = read_output(&w, r, w.n * sizeof(float));
    for (size_t i = 0; i < w.n; i++) {
      if (memcmp(&out[i], &out0[i], sizeof(float)) != 0) {
        fail_msg("[%zu]: rank 0 has %.9g, rank %d has %.9g", i, out0[i], r, out[i]);
      }
    }
    free(out);
  }
  free(out0);
}

static void allreduce_f64_matches_reference_on_two_ranks(void** state) {
  world w = {.size = 2, .timeout_ms = 5000, .fn = rank_allreduce_f64, .n = 100000};
  run_world(&w);
  assert_all_exited_ok(&w);
  double* out0 = read_output(&w, 0, w.n * sizeof(double));
  double* out1 = read_output(&w, 1, w.n * sizeof(double));
  for (size_t i = 0; i < w.n; i++) {
    /* Two addends: one rounding, and addition is commutative, so the sum is exact to the bit. */
    double expect = input_f64(0, i) + input_f64(1, i);
    if (out0[i] != expect || memcmp(&out0[i], &out1[i], sizeof(double)) != 0) {
      fail_msg("[%zu]: rank 0 %.17g, rank 1 %.17g, expected %.17g", i, out0[i], out1[i], expect);
    }
  }
  free(out0);
  free(out1);
}

static void broadcast_copies_the_root_bytes_to_every_rank(void** state) {
  world w = {.size = 3, .timeout_ms = 5000, .fn = rank_broadcast, .n = 100003};
  run_world(&w);
  assert_all_exited_ok(&w);
  for (int r = 0; r < w.size; r++) {
    unsigned char* out = read_output(&w, r, w.n);
    for (size_t i = 0; i < w.n; i++) {
      unsigned char expect = (unsigned char)input_bits(w.size - 1, i);
      if (out[i] != expect)
        fail_msg("rank %d [%zu]: got 0x%02x, expected 0x%02x", r, i, out[i], expect);
    }
    free(out);
  }
}

static void barrier_holds_every_rank_until_the_last_arrives(void** state) {
  world w = {.size = 3, .timeout_ms = 5000, .fn = rank_barrier};
  run_world(&w);
  assert_all_exited_ok(&w);
  double* late_entered = read_output(&w, w.size - 1, sizeof(double));
  for (int r = 0; r < w.size - 1; r++) {
    double* left = read_output(&w, r, sizeof(double));
    if (*left < *late_entered) {
      fail_msg("rank %d left the barrier %.1f ms before the last rank entered it", r,
               *late_entered - *left);
    }
    free(left);
  }
  free(late_entered);
}

static void dead_peer_fails_the_next_collective_within_the_timeout(void** state) {
  world w = {.size = 2, .timeout_ms = 3000, .fn = rank_peer_dies};
  run_world(&w);
  assert_exited(&w, 0, 0);
  if (!WIFSIGNALED(w.status[1]) || WTERMSIG(w.status[1]) != SIGKILL) {
    fail_msg("rank 1 was meant to die of SIGKILL, status 0x%x", w.status[1]);
  }
  double* took = read_output(&w, 0, sizeof(double));
  print_message("collective failed %.0f ms after the peer died (timeout %d ms)\n", *took,
                w.timeout_ms);
  if (*took > w.timeout_ms + 500) fail_msg("took %.0f ms, timeout %d ms", *took, w.timeout_ms);
  free(took);
}

static void silent_peer_fails_the_collective_at_the_timeout(void** state) {
  world w = {.size = 2, .timeout_ms = 1000, .fn = rank_peer_silent};
  run_world(&w);
  assert_all_exited_ok(&w);
  double* took = read_output(&w, 0, sizeof(double));
  print_message("collective failed after %.0f ms (timeout %d ms)\n", *took, w.timeout_ms);
  if (*took < w.timeout_ms * 0.9 || *took > w.timeout_ms + 1000) {
    fail_msg("took %.0f ms, expected about the timeout of %d ms", *took, w.timeout_ms);
  }
  free(took);
}

static void rendezvous_without_peers_fails_at_the_timeout(void** state) {
  world w = {.size = 2, .present = 1, .timeout_ms = 500, .fn = rank_allreduce_ints, .n = 4};
  double t0 = now_ms();
  run_world(&w);
  double took = now_ms() - t0;
  assert_exited(&w, 0, EXIT_CREATE);
  if (took > w.timeout_ms + 1500)
    fail_msg("gave up after %.0f ms, timeout %d ms", took, w.timeout_ms);
}

/* ---- A world of one, in this process ---- */

static void world_of_one_needs_no_network(void** state) {
  zn_comm_config cfg = {0, 1, NULL, NULL, 1000};
  zn_comm* comm = NULL;
  char err[256] = "";
  assert_int_equal(zn_comm_create_gloo(&cfg, NULL, &comm, err, sizeof(err)), ZN_OK);
  assert_int_equal(zn_comm_rank(comm), 0);
  assert_int_equal(zn_comm_size(comm), 1);

  float f[3] = {1.5f, -2.0f, 3.25f};
  assert_int_equal(zn_comm_allreduce_sum(comm, f, 3), ZN_OK);
  assert_true(f[0] == 1.5f && f[1] == -2.0f && f[2] == 3.25f);
  double d[2] = {0.1, 1e300};
  assert_int_equal(zn_comm_allreduce_sum_f64(comm, d, 2), ZN_OK);
  assert_true(d[0] == 0.1 && d[1] == 1e300);
  char bytes[4] = "abc";
  assert_int_equal(zn_comm_broadcast(comm, bytes, 4, 0), ZN_OK);
  assert_string_equal(bytes, "abc");
  assert_int_equal(zn_comm_barrier(comm), ZN_OK);
  /* No peer to wait for: the split allreduce is a no-op on any backend. */
  assert_int_equal(zn_comm_allreduce_sum_queued(comm, f, 3), ZN_OK);
  assert_int_equal(zn_comm_wait_event(comm, NULL), ZN_OK);
  assert_true(f[0] == 1.5f && f[1] == -2.0f && f[2] == 3.25f);
  assert_string_equal(zn_comm_error(comm), "");
  zn_comm_destroy(comm);
}

static void world_of_one_still_validates_arguments(void** state) {
  zn_comm_config cfg = {0, 1, NULL, NULL, 1000};
  zn_comm* comm = NULL;
  assert_int_equal(zn_comm_create_gloo(&cfg, NULL, &comm, NULL, 0), ZN_OK);
  char bytes[4] = "abc";
  assert_int_equal(zn_comm_broadcast(comm, bytes, 4, 1), ZN_ERR_INVALID);
  assert_non_null(strstr(zn_comm_error(comm), "no such root"));
  assert_int_equal(zn_comm_allreduce_sum(comm, NULL, 3), ZN_ERR_INVALID);
  assert_non_null(strstr(zn_comm_error(comm), "NULL"));
  zn_comm_destroy(comm);
}

static void bad_configs_are_rejected_with_a_reason(void** state) {
  zn_comm* comm = (zn_comm*)&comm;
  char err[256] = "";
  zn_comm_config rank_out = {2, 2, "127.0.0.1", "p", 1000};
  assert_int_equal(zn_comm_create_gloo(&rank_out, NULL, &comm, err, sizeof(err)), ZN_ERR_INVALID);
  assert_null(comm);
  assert_non_null(strstr(err, "rank 2"));

  zn_comm_config no_timeout = {0, 1, NULL, NULL, 0};
  assert_int_equal(zn_comm_create_gloo(&no_timeout, NULL, &comm, err, sizeof(err)), ZN_ERR_INVALID);
  assert_non_null(strstr(err, "timeout"));

  zn_comm_config two = {0, 2, "127.0.0.1", "p", 1000};
  assert_int_equal(zn_comm_create_gloo(&two, NULL, &comm, err, sizeof(err)), ZN_ERR_INVALID);
  assert_non_null(strstr(err, "kv"));
}

/* With an argument, runs only the test of that name: CTest registers each test on its own. */
int main(int argc, char** argv) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(world_of_one_needs_no_network),
      cmocka_unit_test(world_of_one_still_validates_arguments),
      cmocka_unit_test(bad_configs_are_rejected_with_a_reason),
      cmocka_unit_test_teardown(allreduce_sum_of_integers_is_exact_on_two_ranks, remove_last_dir),
      cmocka_unit_test_teardown(host_backend_refuses_the_device_split_allreduce, remove_last_dir),
      cmocka_unit_test_teardown(allreduce_of_500k_floats_matches_double_reference_on_three_ranks,
                                remove_last_dir),
      cmocka_unit_test_teardown(allreduce_gives_every_rank_the_same_bits, remove_last_dir),
      cmocka_unit_test_teardown(allreduce_f64_matches_reference_on_two_ranks, remove_last_dir),
      cmocka_unit_test_teardown(broadcast_copies_the_root_bytes_to_every_rank, remove_last_dir),
      cmocka_unit_test_teardown(barrier_holds_every_rank_until_the_last_arrives, remove_last_dir),
      cmocka_unit_test_teardown(dead_peer_fails_the_next_collective_within_the_timeout,
                                remove_last_dir),
      cmocka_unit_test_teardown(silent_peer_fails_the_collective_at_the_timeout, remove_last_dir),
      cmocka_unit_test_teardown(rendezvous_without_peers_fails_at_the_timeout, remove_last_dir),
  };
  if (argc > 1) cmocka_set_test_filter(argv[1]);
  return cmocka_run_group_tests(tests, NULL, NULL);
}
