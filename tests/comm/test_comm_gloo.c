/* Tests of the collectives interface over its Gloo backend, with real processes on loopback.
 *
 * Each test forks one process per rank with comm_testkit.h. The ranks run their collectives,
 * write what they received to out-<rank>.bin (or out-<rank>-<case>.bin) in the world's folder and
 * report through their exit code. The parent then checks the exit codes and compares the outputs
 * with references it computes itself. A rank that hangs is killed at the kit's deadline and fails
 * the test, so no test can hang.
 *
 * The reduce-scatter (a ring) adds in a fixed order, which these tests pin down exactly: block b
 * is summed from rank b + 1 around the ring, ((x[b+1] + x[b+2]) + ...) + x[b]. */
#define _POSIX_C_SOURCE 200809L

#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <float.h>
#include <math.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>

#include "comm_testkit.h"
#include "zn_comm.h"

#define MAX_RANKS 4

/* What the parent passes to every rank. */
typedef struct {
  size_t n;       /* elements or bytes, as the test means them */
  int timeout_ms; /* the world's communicator timeout, for ranks that wait it out */
  int calls;      /* how many times to repeat the collective, for tests that repeat it */
} job;

/* Prints "rank r: ..." and returns code from the rank's function when cond is false. */
#define RANK_CHECK(cond, code, ...)       \
  do {                                    \
    if (!(cond)) {                        \
      fprintf(stderr, "rank %d: ", rank); \
      fprintf(stderr, __VA_ARGS__);       \
      fprintf(stderr, "\n");              \
      return (code);                      \
    }                                     \
  } while (0)

/* ---- The world of each test, removed after it whether it passed or not ---- */

static zn_testkit_world last_world;

static int remove_last_world(void** state) {
  zn_testkit_cleanup(&last_world);
  return 0;
}

/* Runs fn on the world's ranks; returns what zn_testkit_run returned. */
static int run_world(zn_testkit_world* w, zn_testkit_rank_fn fn, void* arg) {
  int rc = zn_testkit_run(w, fn, arg);
  last_world = *w;
  return rc;
}

static void output_name(char* name, size_t cap, int rank, int which) {
  if (which < 0) {
    snprintf(name, cap, "out-%d.bin", rank);
  } else {
    snprintf(name, cap, "out-%d-%d.bin", rank, which);
  }
}

/* Output `which` of a rank (-1: its only one). Returns 1 on success. */
static int write_output(const char* dir, int rank, int which, const void* data, size_t len) {
  char name[64];
  output_name(name, sizeof(name), rank, which);
  return zn_testkit_put(dir, name, data, len) == ZN_OK;
}

static void* read_output(const zn_testkit_world* w, int rank, int which, size_t expect_len) {
  char name[64];
  output_name(name, sizeof(name), rank, which);
  void* data = NULL;
  size_t len = 0;
  int rc = zn_testkit_get(w->dir, name, &data, &len);
  if (rc != ZN_OK) fail_msg("rank %d wrote no %s: %d", rank, name, rc);
  if (len != expect_len) fail_msg("%s is %zu bytes, expected %zu", name, len, expect_len);
  return data;
}

static void assert_exited(const zn_testkit_world* w, int rank, int code) {
  int st = w->status[rank];
  if (w->killed[rank]) fail_msg("rank %d was killed at the deadline", rank);
  if (!WIFEXITED(st)) fail_msg("rank %d did not exit normally (status 0x%x)", rank, st);
  if (WEXITSTATUS(st) != code) {
    fail_msg("rank %d exited with %d, expected %d", rank, WEXITSTATUS(st), code);
  }
}

static void assert_killed(const zn_testkit_world* w, int rank) {
  if (!WIFSIGNALED(w->status[rank]) || WTERMSIG(w->status[rank]) != SIGKILL) {
    fail_msg("rank %d was meant to die of SIGKILL, status 0x%x", rank, w->status[rank]);
  }
}

/* ---- Inputs every process computes the same way ---- */

static uint64_t mix(uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

/* Input i of a rank for its call-th collective of a test. */
static uint64_t input_bits_of(int call, int rank, size_t i) {
  return mix(((uint64_t)call << 52) ^ ((uint64_t)rank << 40) ^ (uint64_t)i);
}

static uint64_t input_bits(int rank, size_t i) {
  return input_bits_of(0, rank, i);
}

/* In [-1, 1) with the full 24-bit mantissa used, so that sums of them round. */
static float input_f32_of(int call, int rank, size_t i) {
  return (float)((double)(input_bits_of(call, rank, i) >> 40) / 8388608.0 - 1.0);
}

static float input_f32(int rank, size_t i) {
  return input_f32_of(0, rank, i);
}

static double input_f64(int rank, size_t i) {
  return (double)(input_bits(rank, i) >> 11) / 4503599627370496.0 - 1.0;
}

/* An integer in [-1000, 1000]: every partial sum is exact in float. */
static float input_int(int rank, size_t i) {
  return (float)((int)(input_bits(rank, i) % 2001) - 1000);
}

/* Element i of block b summed the way the ring reduce-scatter adds: starting at rank b + 1,
 * each rank adds its own value to the partial sum that reaches it, rank b last. */
static float fixed_order_sum(int size, int call, int block, size_t i) {
  float acc = input_f32_of(call, (block + 1) % size, i);
  for (int k = 2; k <= size; k++) acc = acc + input_f32_of(call, (block + k) % size, i);
  return acc;
}

/* Fills buf (size blocks of count) with this rank's inputs of a call, and returns it. */
static float* fill_inputs(float* buf, int size, int call, int rank, size_t count) {
  for (size_t i = 0; i < (size_t)size * count; i++) buf[i] = input_f32_of(call, rank, i);
  return buf;
}

/* The first element of block `rank` that differs from the fixed-order sum, or count if none. */
static size_t first_wrong(const float* block, int size, int call, int rank, size_t count) {
  for (size_t i = 0; i < count; i++) {
    float expect = fixed_order_sum(size, call, rank, (size_t)rank * count + i);
    if (memcmp(&block[i], &expect, sizeof(float)) != 0) return i;
  }
  return count;
}

/* ---- What the ranks run: allreduce, broadcast, barrier, failures ---- */

static int rank_allreduce_ints(zn_comm* comm, int rank, const char* dir, void* arg) {
  const job* j = arg;
  float* buf = malloc(j->n * sizeof(float));
  for (size_t i = 0; i < j->n; i++) buf[i] = input_int(rank, i);
  int rc = zn_comm_allreduce_sum(comm, buf, j->n);
  RANK_CHECK(rc == ZN_OK, 1, "allreduce returned %d: %s", rc, zn_comm_error(comm));
  RANK_CHECK(write_output(dir, rank, -1, buf, j->n * sizeof(float)), 2, "write failed");
  free(buf);
  return 0;
}

/* Sums twice from the same inputs; the two results must be the same bits. */
static int rank_allreduce_f32(zn_comm* comm, int rank, const char* dir, void* arg) {
  const job* j = arg;
  float* a = malloc(j->n * sizeof(float));
  float* b = malloc(j->n * sizeof(float));
  for (size_t i = 0; i < j->n; i++) a[i] = b[i] = input_f32(rank, i);
  double t0 = zn_testkit_now_ms();
  int rc = zn_comm_allreduce_sum(comm, a, j->n);
  if (rank == 0)
    fprintf(stderr, "rank 0: sum of %zu floats over %d ranks took %.1f ms\n", j->n,
            zn_comm_size(comm), zn_testkit_now_ms() - t0);
  RANK_CHECK(rc == ZN_OK, 1, "first allreduce returned %d: %s", rc, zn_comm_error(comm));
  rc = zn_comm_allreduce_sum(comm, b, j->n);
  RANK_CHECK(rc == ZN_OK, 1, "second allreduce returned %d: %s", rc, zn_comm_error(comm));
  RANK_CHECK(memcmp(a, b, j->n * sizeof(float)) == 0, 3, "two sums of the same inputs differ");
  RANK_CHECK(write_output(dir, rank, -1, a, j->n * sizeof(float)), 2, "write failed");
  free(a);
  free(b);
  return 0;
}

static int rank_allreduce_f64(zn_comm* comm, int rank, const char* dir, void* arg) {
  const job* j = arg;
  double* buf = malloc(j->n * sizeof(double));
  for (size_t i = 0; i < j->n; i++) buf[i] = input_f64(rank, i);
  int rc = zn_comm_allreduce_sum_f64(comm, buf, j->n);
  RANK_CHECK(rc == ZN_OK, 1, "allreduce returned %d: %s", rc, zn_comm_error(comm));
  RANK_CHECK(write_output(dir, rank, -1, buf, j->n * sizeof(double)), 2, "write failed");
  free(buf);
  return 0;
}

/* The last rank is the root; the others start from a different byte pattern. */
static int rank_broadcast(zn_comm* comm, int rank, const char* dir, void* arg) {
  const job* j = arg;
  int root = zn_comm_size(comm) - 1;
  unsigned char* buf = malloc(j->n);
  for (size_t i = 0; i < j->n; i++) {
    buf[i] = rank == root ? (unsigned char)input_bits(root, i) : (unsigned char)(0x5a + rank);
  }
  int rc = zn_comm_broadcast(comm, buf, j->n, root);
  RANK_CHECK(rc == ZN_OK, 1, "broadcast returned %d: %s", rc, zn_comm_error(comm));
  RANK_CHECK(write_output(dir, rank, -1, buf, j->n), 2, "write failed");
  free(buf);
  return 0;
}

/* The last rank arrives 300 ms late and records when it entered; the others record when they
 * left. Times are CLOCK_MONOTONIC, which all processes on one machine share. */
static int rank_barrier(zn_comm* comm, int rank, const char* dir, void* arg) {
  int last = zn_comm_size(comm) - 1;
  if (rank == last) zn_testkit_sleep_ms(300);
  double entered = zn_testkit_now_ms();
  int rc = zn_comm_barrier(comm);
  double left = zn_testkit_now_ms();
  RANK_CHECK(rc == ZN_OK, 1, "barrier returned %d: %s", rc, zn_comm_error(comm));
  double t = rank == last ? entered : left;
  RANK_CHECK(write_output(dir, rank, -1, &t, sizeof(t)), 2, "write failed");
  return 0;
}

/* One collective of a kind on a small buffer; the dead-peer tests run each kind. */
typedef enum { OP_ALLREDUCE, OP_REDUCE_SCATTER, OP_ALLGATHER } op_kind;

typedef struct {
  job base;
  op_kind op;
  const char* name; /* how the dispatch names it in errors */
} op_job;

static int run_op(zn_comm* comm, op_kind op, float* buf, size_t count) {
  switch (op) {
    case OP_ALLREDUCE:
      return zn_comm_allreduce_sum(comm, buf, count);
    case OP_REDUCE_SCATTER:
      return zn_comm_reduce_scatter_sum(comm, buf, count);
    case OP_ALLGATHER:
      return zn_comm_allgather(comm, buf, count * sizeof(float));
  }
  return ZN_ERR_INVALID;
}

/* The last rank takes part in one collective and is then killed; every other rank's next one
 * must fail, and fast, with a message that names the operation and the rank. */
static int rank_peer_dies(zn_comm* comm, int rank, const char* dir, void* arg) {
  const op_job* j = arg;
  enum { COUNT = 1000 };
  float buf[MAX_RANKS * COUNT];
  for (int i = 0; i < MAX_RANKS * COUNT; i++) buf[i] = 1.0f;
  int rc = run_op(comm, j->op, buf, COUNT);
  RANK_CHECK(rc == ZN_OK, 1, "first %s returned %d: %s", j->name, rc, zn_comm_error(comm));
  if (rank == zn_comm_size(comm) - 1) raise(SIGKILL);

  double t0 = zn_testkit_now_ms();
  rc = run_op(comm, j->op, buf, COUNT);
  double took = zn_testkit_now_ms() - t0;
  RANK_CHECK(rc == ZN_ERR_COMM, 4, "%s after the peer died returned %d, expected %d", j->name, rc,
             ZN_ERR_COMM);
  char expect[96];
  size_t amount = j->op == OP_ALLGATHER ? COUNT * sizeof(float) : COUNT;
  snprintf(expect, sizeof(expect), "%s of %zu", j->name, amount);
  RANK_CHECK(strstr(zn_comm_error(comm), expect) != NULL, 5, "error '%s' does not name '%s'",
             zn_comm_error(comm), expect);
  snprintf(expect, sizeof(expect), "(rank %d of %d, gloo)", rank, zn_comm_size(comm));
  RANK_CHECK(strstr(zn_comm_error(comm), expect) != NULL, 5, "error '%s' does not name '%s'",
             zn_comm_error(comm), expect);
  fprintf(stderr, "rank %d: failed after %.0f ms with: %s\n", rank, took, zn_comm_error(comm));
  RANK_CHECK(write_output(dir, rank, -1, &took, sizeof(took)), 2, "write failed");
  return 0;
}

/* Rank 1 stays alive but never joins the sum, outliving rank 0's timeout. */
static int rank_peer_silent(zn_comm* comm, int rank, const char* dir, void* arg) {
  const job* j = arg;
  if (rank == 1) {
    zn_testkit_sleep_ms(j->timeout_ms + 1500);
    return 0;
  }
  float buf[16] = {0};
  double t0 = zn_testkit_now_ms();
  int rc = zn_comm_allreduce_sum(comm, buf, 16);
  double took = zn_testkit_now_ms() - t0;
  RANK_CHECK(rc == ZN_ERR_COMM, 4, "allreduce with a silent peer returned %d, expected %d", rc,
             ZN_ERR_COMM);
  RANK_CHECK(zn_comm_error(comm)[0] != '\0', 5, "no error message");
  fprintf(stderr, "rank 0: failed after %.0f ms with: %s\n", took, zn_comm_error(comm));
  RANK_CHECK(write_output(dir, 0, -1, &took, sizeof(took)), 2, "write failed");
  return 0;
}

/* The split allreduce belongs to device backends: Gloo refuses it with a reason, and the
 * communicator stays usable for ordinary collectives. */
static int rank_device_ops_refused(zn_comm* comm, int rank, const char* dir, void* arg) {
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

/* ---- What the ranks run: reduce-scatter and all-gather ---- */

/* The counts every world is tried with: none, fewer than the ranks, odd, and many. */
static const size_t scatter_counts[] = {0, 1, 2, 3, 5, 1000};
#define NUM_SCATTER_COUNTS (sizeof(scatter_counts) / sizeof(scatter_counts[0]))

/* Fills buf with this rank's inputs of a call and reduce-scatters it. With which >= 0 the rank's
 * block becomes that output, for the parent to check; otherwise the rank checks it here against
 * the fixed-order sum. Returns the rank's exit code: 0 if all went well. */
static int scatter_once(zn_comm* comm, int rank, const char* dir, float* buf, size_t count,
                        int call, int which) {
  fill_inputs(buf, zn_comm_size(comm), call, rank, count);
  int rc = zn_comm_reduce_scatter_sum(comm, buf, count);
  RANK_CHECK(rc == ZN_OK, 1, "call %d of %zu returned %d: %s", call, count, rc,
             zn_comm_error(comm));
  float* mine = buf + (size_t)rank * count;
  if (which >= 0) {
    RANK_CHECK(write_output(dir, rank, which, mine, count * sizeof(float)), 2, "write failed");
    return 0;
  }
  size_t bad = first_wrong(mine, zn_comm_size(comm), call, rank, count);
  RANK_CHECK(bad == count, 3, "call %d: element %zu of the block is wrong", call, bad);
  return 0;
}

/* One reduce-scatter per count, each on a buffer of its own, with the count's index as the call;
 * the block of each is output <count index>. */
static int rank_reduce_scatter_counts(zn_comm* comm, int rank, const char* dir, void* arg) {
  int size = zn_comm_size(comm);
  for (size_t c = 0; c < NUM_SCATTER_COUNTS; c++) {
    float* buf = malloc(size * scatter_counts[c] * sizeof(float) + 1);
    int code = scatter_once(comm, rank, dir, buf, scatter_counts[c], (int)c, (int)c);
    free(buf);
    if (code != 0) return code;
  }
  return 0;
}

/* Three calls on one buffer with new inputs each time, then one on a second buffer, then one on
 * the first again: nothing of an earlier call may leak into a later one. Output k is call k's
 * block of this rank. */
static int rank_reduce_scatter_reuse(zn_comm* comm, int rank, const char* dir, void* arg) {
  const job* j = arg;
  int size = zn_comm_size(comm);
  float* first = malloc(size * j->n * sizeof(float));
  float* second = malloc(size * j->n * sizeof(float));
  float* bufs[5] = {first, first, first, second, first};
  int code = 0;
  for (int call = 0; call < 5 && code == 0; call++) {
    code = scatter_once(comm, rank, dir, bufs[call], j->n, call, call);
  }
  free(first);
  free(second);
  return code;
}

/* Rank 0 moves to a new buffer for the second call while the others keep theirs: a buffer's
 * address is each rank's own, and the ranks must still meet in the same collective. */
static int rank_reduce_scatter_one_moves(zn_comm* comm, int rank, const char* dir, void* arg) {
  const job* j = arg;
  int size = zn_comm_size(comm);
  float* first = malloc(size * j->n * sizeof(float));
  float* moved = malloc(size * j->n * sizeof(float));
  int code = 0;
  for (int call = 0; call < 3 && code == 0; call++) {
    float* buf = rank == 0 && call > 0 ? moved : first;
    code = scatter_once(comm, rank, dir, buf, j->n, call, -1);
  }
  free(first);
  free(moved);
  return code;
}

/* Calls back to back on one buffer, new inputs each time, each rank checking its own block: a
 * rank that starts the next call early must not disturb a slower one still in the last, and what
 * a rank is still sending must not change under the transport. */
static int rank_reduce_scatter_many(zn_comm* comm, int rank, const char* dir, void* arg) {
  const job* j = arg;
  float* buf = malloc(zn_comm_size(comm) * j->n * sizeof(float));
  int code = 0;
  for (int call = 0; call < j->calls && code == 0; call++) {
    code = scatter_once(comm, rank, dir, buf, j->n, call, -1);
  }
  free(buf);
  return code;
}

/* The same inputs through the ring allreduce and through the reduce-scatter; output 0 is the
 * allreduce's block of this rank, output 1 the reduce-scatter's. */
static int rank_scatter_and_allreduce(zn_comm* comm, int rank, const char* dir, void* arg) {
  const job* j = arg;
  int size = zn_comm_size(comm);
  size_t total = size * j->n;
  float* all = fill_inputs(malloc(total * sizeof(float)), size, 0, rank, j->n);
  float* scattered = fill_inputs(malloc(total * sizeof(float)), size, 0, rank, j->n);
  int rc = zn_comm_allreduce_sum(comm, all, total);
  RANK_CHECK(rc == ZN_OK, 1, "allreduce returned %d: %s", rc, zn_comm_error(comm));
  rc = zn_comm_reduce_scatter_sum(comm, scattered, j->n);
  RANK_CHECK(rc == ZN_OK, 1, "reduce-scatter returned %d: %s", rc, zn_comm_error(comm));
  size_t bytes = j->n * sizeof(float);
  RANK_CHECK(write_output(dir, rank, 0, all + (size_t)rank * j->n, bytes), 2, "write failed");
  RANK_CHECK(write_output(dir, rank, 1, scattered + (size_t)rank * j->n, bytes), 2, "write failed");
  free(all);
  free(scattered);
  return 0;
}

/* The byte counts every all-gather world is tried with. */
static const size_t gather_bytes[] = {0, 1, 7, 1000, 100003};
#define NUM_GATHER_BYTES (sizeof(gather_bytes) / sizeof(gather_bytes[0]))

/* One all-gather per byte count; every block but this rank's starts as filler. Writes the whole
 * buffer as output <count index>. */
static int rank_allgather(zn_comm* comm, int rank, const char* dir, void* arg) {
  int size = zn_comm_size(comm);
  for (size_t c = 0; c < NUM_GATHER_BYTES; c++) {
    size_t bytes = gather_bytes[c];
    unsigned char* buf = malloc(size * bytes + 1);
    memset(buf, 0x5a + rank, size * bytes);
    for (size_t i = 0; i < bytes; i++) {
      buf[(size_t)rank * bytes + i] = (unsigned char)input_bits_of((int)c, rank, i);
    }
    int rc = zn_comm_allgather(comm, buf, bytes);
    RANK_CHECK(rc == ZN_OK, 1, "allgather of %zu returned %d: %s", bytes, rc, zn_comm_error(comm));
    RANK_CHECK(write_output(dir, rank, (int)c, buf, size * bytes), 2, "write failed");
    free(buf);
  }
  return 0;
}

/* Bad arguments are refused on every rank before any byte moves, with the reason; afterwards the
 * communicator still works. */
static int rank_bad_arguments(zn_comm* comm, int rank, const char* dir, void* arg) {
  int size = zn_comm_size(comm);
  int rc = zn_comm_reduce_scatter_sum(comm, NULL, 4);
  RANK_CHECK(rc == ZN_ERR_INVALID, 1, "reduce-scatter of NULL returned %d", rc);
  RANK_CHECK(strstr(zn_comm_error(comm), "reduce_scatter_sum of 4 floats per rank") &&
                 strstr(zn_comm_error(comm), "NULL"),
             2, "error was '%s'", zn_comm_error(comm));
  rc = zn_comm_allgather(comm, NULL, 4);
  RANK_CHECK(rc == ZN_ERR_INVALID, 3, "allgather of NULL returned %d", rc);
  RANK_CHECK(strstr(zn_comm_error(comm), "allgather of 4 bytes per rank") &&
                 strstr(zn_comm_error(comm), "NULL"),
             4, "error was '%s'", zn_comm_error(comm));

  float buf[MAX_RANKS * 2];
  fill_inputs(buf, size, 0, rank, 2);
  rc = zn_comm_reduce_scatter_sum(comm, buf, 2);
  RANK_CHECK(rc == ZN_OK, 7, "reduce-scatter after the refusals: %s", zn_comm_error(comm));
  size_t bad = first_wrong(buf + rank * 2, size, 0, rank, 2);
  RANK_CHECK(bad == 2, 8, "element %zu of the block is wrong", bad);
  return 0;
}

/* ---- Tests: allreduce, broadcast, barrier, failures ---- */

static void host_backend_refuses_the_device_split_allreduce(void** state) {
  zn_testkit_world w = {.size = 2};
  assert_int_equal(run_world(&w, rank_device_ops_refused, NULL), 0);
}

static void allreduce_sum_of_integers_is_exact_on_two_ranks(void** state) {
  zn_testkit_world w = {.size = 2};
  job j = {.n = 1000};
  assert_int_equal(run_world(&w, rank_allreduce_ints, &j), 0);
  for (int r = 0; r < w.size; r++) {
    float* out = read_output(&w, r, -1, j.n * sizeof(float));
    for (size_t i = 0; i < j.n; i++) {
      float expect = input_int(0, i) + input_int(1, i);
      if (out[i] != expect) fail_msg("rank %d [%zu]: got %g, expected %g", r, i, out[i], expect);
    }
    free(out);
  }
}

/* Each element is a sum of three floats with two roundings, so it lies within 2 units of float
 * rounding of the double-precision sum, measured against the sum of magnitudes. */
static void allreduce_of_500k_floats_matches_double_reference_on_three_ranks(void** state) {
  zn_testkit_world w = {.size = 3};
  job j = {.n = 500000};
  assert_int_equal(run_world(&w, rank_allreduce_f32, &j), 0);
  float* out = read_output(&w, 0, -1, j.n * sizeof(float));
  double worst = 0;
  for (size_t i = 0; i < j.n; i++) {
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
  zn_testkit_world w = {.size = 3};
  job j = {.n = 500000};
  assert_int_equal(run_world(&w, rank_allreduce_f32, &j), 0);
  float* out0 = read_output(&w, 0, -1, j.n * sizeof(float));
  for (int r = 1; r < w.size; r++) {
    float* out = read_output(&w, r, -1, j.n * sizeof(float));
    for (size_t i = 0; i < j.n; i++) {
      if (memcmp(&out[i], &out0[i], sizeof(float)) != 0) {
        fail_msg("[%zu]: rank 0 has %.9g, rank %d has %.9g", i, out0[i], r, out[i]);
      }
    }
    free(out);
  }
  free(out0);
}

static void allreduce_f64_matches_reference_on_two_ranks(void** state) {
  zn_testkit_world w = {.size = 2};
  job j = {.n = 100000};
  assert_int_equal(run_world(&w, rank_allreduce_f64, &j), 0);
  double* out0 = read_output(&w, 0, -1, j.n * sizeof(double));
  double* out1 = read_output(&w, 1, -1, j.n * sizeof(double));
  for (size_t i = 0; i < j.n; i++) {
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
  zn_testkit_world w = {.size = 3};
  job j = {.n = 100003};
  assert_int_equal(run_world(&w, rank_broadcast, &j), 0);
  for (int r = 0; r < w.size; r++) {
    unsigned char* out = read_output(&w, r, -1, j.n);
    for (size_t i = 0; i < j.n; i++) {
      unsigned char expect = (unsigned char)input_bits(w.size - 1, i);
      if (out[i] != expect)
        fail_msg("rank %d [%zu]: got 0x%02x, expected 0x%02x", r, i, out[i], expect);
    }
    free(out);
  }
}

static void barrier_holds_every_rank_until_the_last_arrives(void** state) {
  zn_testkit_world w = {.size = 3};
  assert_int_equal(run_world(&w, rank_barrier, NULL), 0);
  double* late_entered = read_output(&w, w.size - 1, -1, sizeof(double));
  for (int r = 0; r < w.size - 1; r++) {
    double* left = read_output(&w, r, -1, sizeof(double));
    if (*left < *late_entered) {
      fail_msg("rank %d left the barrier %.1f ms before the last rank entered it", r,
               *late_entered - *left);
    }
    free(left);
  }
  free(late_entered);
}

/* The last rank of the world dies after one collective of the kind; each survivor's next one
 * fails with ZN_ERR_COMM no later than half a second past the timeout. */
static void check_dead_peer(int size, op_kind op, const char* name) {
  zn_testkit_world w = {.size = size, .timeout_ms = 3000};
  op_job j = {.op = op, .name = name};
  assert_int_equal(run_world(&w, rank_peer_dies, &j), 1);
  assert_killed(&w, size - 1);
  for (int r = 0; r < size - 1; r++) {
    assert_exited(&w, r, 0);
    double* took = read_output(&w, r, -1, sizeof(double));
    print_message("rank %d: %s failed %.0f ms after the peer died (timeout %d ms)\n", r, name,
                  *took, w.timeout_ms);
    if (*took > w.timeout_ms + 500) fail_msg("took %.0f ms, timeout %d ms", *took, w.timeout_ms);
    free(took);
  }
}

static void dead_peer_fails_the_next_collective_within_the_timeout(void** state) {
  check_dead_peer(2, OP_ALLREDUCE, "allreduce_sum");
}

static void dead_peer_fails_the_next_reduce_scatter_within_the_timeout(void** state) {
  check_dead_peer(3, OP_REDUCE_SCATTER, "reduce_scatter_sum");
}

static void dead_peer_fails_the_next_allgather_within_the_timeout(void** state) {
  check_dead_peer(3, OP_ALLGATHER, "allgather");
}

static void silent_peer_fails_the_collective_at_the_timeout(void** state) {
  zn_testkit_world w = {.size = 2, .timeout_ms = 1000};
  job j = {.timeout_ms = w.timeout_ms};
  assert_int_equal(run_world(&w, rank_peer_silent, &j), 0);
  double* took = read_output(&w, 0, -1, sizeof(double));
  print_message("collective failed after %.0f ms (timeout %d ms)\n", *took, w.timeout_ms);
  if (*took < w.timeout_ms * 0.9 || *took > w.timeout_ms + 1000) {
    fail_msg("took %.0f ms, expected about the timeout of %d ms", *took, w.timeout_ms);
  }
  free(took);
}

static void rendezvous_without_peers_fails_at_the_timeout(void** state) {
  zn_testkit_world w = {.size = 2, .present = 1, .timeout_ms = 500};
  job j = {.n = 4};
  double t0 = zn_testkit_now_ms();
  assert_int_equal(run_world(&w, rank_allreduce_ints, &j), 1);
  double took = zn_testkit_now_ms() - t0;
  assert_exited(&w, 0, ZN_TESTKIT_EXIT_CREATE);
  if (took > w.timeout_ms + 1500)
    fail_msg("gave up after %.0f ms, timeout %d ms", took, w.timeout_ms);
}

/* ---- Tests: reduce-scatter and all-gather ---- */

/* Every rank's block of every count against the parent's fixed-order sum, bit for bit. */
static void check_reduce_scatter_counts(int size) {
  zn_testkit_world w = {.size = size};
  assert_int_equal(run_world(&w, rank_reduce_scatter_counts, NULL), 0);
  for (size_t c = 0; c < NUM_SCATTER_COUNTS; c++) {
    size_t count = scatter_counts[c];
    for (int r = 0; r < size; r++) {
      float* out = read_output(&w, r, (int)c, count * sizeof(float));
      size_t bad = first_wrong(out, size, (int)c, r, count);
      if (bad < count) {
        size_t i = (size_t)r * count + bad;
        fail_msg("%d ranks, count %zu: rank %d [%zu] is %.9g, expected %.9g", size, count, r, bad,
                 out[bad], fixed_order_sum(size, (int)c, r, i));
      }
      free(out);
    }
  }
}

static void reduce_scatter_in_a_world_of_one_keeps_the_block(void** state) {
  check_reduce_scatter_counts(1);
}

static void reduce_scatter_is_the_exact_sum_on_two_ranks(void** state) {
  check_reduce_scatter_counts(2);
}

static void reduce_scatter_sums_in_a_fixed_order_on_three_ranks(void** state) {
  check_reduce_scatter_counts(3);
}

static void reduce_scatter_sums_in_a_fixed_order_on_four_ranks(void** state) {
  check_reduce_scatter_counts(4);
}

/* The fixed-order sum is also the true sum to within its size - 1 roundings: checked against
 * double precision once, so that the exact tests above are not comparing with a wrong formula. */
static void fixed_order_sum_is_within_its_roundings_of_the_double_sum(void** state) {
  for (int size = 2; size <= MAX_RANKS; size++) {
    for (size_t i = 0; i < 100000; i++) {
      double ref = 0, mag = 0;
      for (int r = 0; r < size; r++) ref += input_f32(r, i), mag += fabs(input_f32(r, i));
      double bound = (size - 1) * (FLT_EPSILON / 2) * mag;
      double got = fixed_order_sum(size, 0, (int)(i % (size_t)size), i);
      if (fabs(got - ref) > bound)
        fail_msg("%d ranks [%zu]: %.9g vs %.9g, bound %.3g", size, i, got, ref, bound);
    }
  }
}

static void reduce_scatter_stays_exact_across_buffers(void** state) {
  for (int size = 3; size <= 4; size++) {
    zn_testkit_world w = {.size = size};
    job j = {.n = 1001};
    assert_int_equal(run_world(&w, rank_reduce_scatter_reuse, &j), 0);
    for (int call = 0; call < 5; call++) {
      for (int r = 0; r < size; r++) {
        float* out = read_output(&w, r, call, j.n * sizeof(float));
        size_t bad = first_wrong(out, size, call, r, j.n);
        if (bad < j.n) fail_msg("%d ranks, call %d: rank %d [%zu] is wrong", size, call, r, bad);
        free(out);
      }
    }
    zn_testkit_cleanup(&w);
  }
}

static void reduce_scatter_stays_exact_when_one_rank_moves(void** state) {
  zn_testkit_world w = {.size = 3, .timeout_ms = 3000};
  job j = {.n = 500};
  assert_int_equal(run_world(&w, rank_reduce_scatter_one_moves, &j), 0);
}

static void reduce_scatter_back_to_back_calls_stay_exact_on_three_ranks(void** state) {
  zn_testkit_world w = {.size = 3};
  job j = {.n = 3000, .calls = 200};
  assert_int_equal(run_world(&w, rank_reduce_scatter_many, &j), 0);
}

/* 16 MB blocks: more than a TCP socket takes at once (the kernel caps Gloo's request for a send
 * buffer of that size), so part of each send is written later by Gloo's event loop, while the
 * ring goes on adding into the other blocks: no block may be written while it is being sent. */
static void reduce_scatter_of_blocks_larger_than_a_socket_buffer_is_exact(void** state) {
  for (int size = 2; size <= 3; size++) {
    zn_testkit_world w = {.size = size, .timeout_ms = 20000, .deadline_ms = 25000};
    job j = {.n = 4u << 20, .calls = 6};
    assert_int_equal(run_world(&w, rank_reduce_scatter_many, &j), 0);
    zn_testkit_cleanup(&w);
  }
}

/* Two worlds from the same inputs: every rank's block has the same bits in both. */
static void reduce_scatter_gives_the_same_bits_on_every_run(void** state) {
  for (int size = 3; size <= 4; size++) {
    job j = {.n = 100003};
    float* first[MAX_RANKS];
    for (int run = 0; run < 2; run++) {
      zn_testkit_world w = {.size = size};
      assert_int_equal(run_world(&w, rank_scatter_and_allreduce, &j), 0);
      for (int r = 0; r < size; r++) {
        float* out = read_output(&w, r, 1, j.n * sizeof(float));
        if (run == 0) {
          first[r] = out;
          continue;
        }
        if (memcmp(out, first[r], j.n * sizeof(float)) != 0)
          fail_msg("%d ranks: rank %d's block differs between two runs", size, r);
        free(out);
        free(first[r]);
      }
      zn_testkit_cleanup(&w);
    }
  }
}

/* On two ranks the ring allreduce and the reduce-scatter both compute x0 + x1, and a + b has the
 * bits of b + a: each rank's block is the same bits either way. */
static void reduce_scatter_has_the_allreduce_bits_on_two_ranks(void** state) {
  zn_testkit_world w = {.size = 2};
  job j = {.n = 100003};
  assert_int_equal(run_world(&w, rank_scatter_and_allreduce, &j), 0);
  for (int r = 0; r < w.size; r++) {
    float* all = read_output(&w, r, 0, j.n * sizeof(float));
    float* scattered = read_output(&w, r, 1, j.n * sizeof(float));
    for (size_t i = 0; i < j.n; i++) {
      if (memcmp(&all[i], &scattered[i], sizeof(float)) != 0)
        fail_msg("rank %d [%zu]: allreduce %.9g, reduce-scatter %.9g", r, i, all[i], scattered[i]);
    }
    free(all);
    free(scattered);
  }
}

static void reduce_scatter_and_allgather_refuse_bad_arguments(void** state) {
  zn_testkit_world w = {.size = 2};
  assert_int_equal(run_world(&w, rank_bad_arguments, NULL), 0);
}

static void allgather_gives_every_rank_every_block(void** state) {
  for (int size = 1; size <= MAX_RANKS; size++) {
    zn_testkit_world w = {.size = size};
    assert_int_equal(run_world(&w, rank_allgather, NULL), 0);
    for (size_t c = 0; c < NUM_GATHER_BYTES; c++) {
      size_t bytes = gather_bytes[c];
      for (int r = 0; r < size; r++) {
        unsigned char* out = read_output(&w, r, (int)c, size * bytes);
        for (size_t i = 0; i < size * bytes; i++) {
          int owner = (int)(i / bytes);
          unsigned char expect = (unsigned char)input_bits_of((int)c, owner, i % bytes);
          if (out[i] != expect)
            fail_msg("%d ranks, %zu bytes: rank %d [%zu] is 0x%02x, expected rank %d's 0x%02x",
                     size, bytes, r, i, out[i], owner, expect);
        }
        free(out);
      }
    }
    zn_testkit_cleanup(&w);
  }
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
  assert_int_equal(zn_comm_reduce_scatter_sum(comm, f, 3), ZN_OK);
  assert_true(f[0] == 1.5f && f[1] == -2.0f && f[2] == 3.25f);
  assert_int_equal(zn_comm_allgather(comm, bytes, 4), ZN_OK);
  assert_string_equal(bytes, "abc");
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
  assert_int_equal(zn_comm_reduce_scatter_sum(comm, NULL, 3), ZN_ERR_INVALID);
  assert_non_null(strstr(zn_comm_error(comm), "reduce_scatter_sum of 3 floats per rank (rank 0"));
  assert_int_equal(zn_comm_allgather(comm, NULL, 3), ZN_ERR_INVALID);
  assert_non_null(strstr(zn_comm_error(comm), "allgather of 3 bytes per rank (rank 0 of 1"));
  float f = 0;
  assert_int_equal(zn_comm_reduce_scatter_sum(comm, &f, SIZE_MAX / 2), ZN_ERR_INVALID);
  assert_non_null(strstr(zn_comm_error(comm), "overflows"));
  /* Nothing to move: a NULL buffer of no elements is fine. */
  assert_int_equal(zn_comm_reduce_scatter_sum(comm, NULL, 0), ZN_OK);
  assert_int_equal(zn_comm_allgather(comm, NULL, 0), ZN_OK);
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
#define WORLD_TEST(name) cmocka_unit_test_teardown(name, remove_last_world)
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(world_of_one_needs_no_network),
      cmocka_unit_test(world_of_one_still_validates_arguments),
      cmocka_unit_test(bad_configs_are_rejected_with_a_reason),
      cmocka_unit_test(fixed_order_sum_is_within_its_roundings_of_the_double_sum),
      WORLD_TEST(allreduce_sum_of_integers_is_exact_on_two_ranks),
      WORLD_TEST(host_backend_refuses_the_device_split_allreduce),
      WORLD_TEST(allreduce_of_500k_floats_matches_double_reference_on_three_ranks),
      WORLD_TEST(allreduce_gives_every_rank_the_same_bits),
      WORLD_TEST(allreduce_f64_matches_reference_on_two_ranks),
      WORLD_TEST(broadcast_copies_the_root_bytes_to_every_rank),
      WORLD_TEST(barrier_holds_every_rank_until_the_last_arrives),
      WORLD_TEST(dead_peer_fails_the_next_collective_within_the_timeout),
      WORLD_TEST(dead_peer_fails_the_next_reduce_scatter_within_the_timeout),
      WORLD_TEST(dead_peer_fails_the_next_allgather_within_the_timeout),
      WORLD_TEST(silent_peer_fails_the_collective_at_the_timeout),
      WORLD_TEST(rendezvous_without_peers_fails_at_the_timeout),
      WORLD_TEST(reduce_scatter_in_a_world_of_one_keeps_the_block),
      WORLD_TEST(reduce_scatter_is_the_exact_sum_on_two_ranks),
      WORLD_TEST(reduce_scatter_sums_in_a_fixed_order_on_three_ranks),
      WORLD_TEST(reduce_scatter_sums_in_a_fixed_order_on_four_ranks),
      WORLD_TEST(reduce_scatter_stays_exact_across_buffers),
      WORLD_TEST(reduce_scatter_stays_exact_when_one_rank_moves),
      WORLD_TEST(reduce_scatter_back_to_back_calls_stay_exact_on_three_ranks),
      WORLD_TEST(reduce_scatter_of_blocks_larger_than_a_socket_buffer_is_exact),
      WORLD_TEST(reduce_scatter_gives_the_same_bits_on_every_run),
      WORLD_TEST(reduce_scatter_has_the_allreduce_bits_on_two_ranks),
      WORLD_TEST(reduce_scatter_and_allgather_refuse_bad_arguments),
      WORLD_TEST(allgather_gives_every_rank_every_block),
  };
#undef WORLD_TEST
  if (argc > 1) cmocka_set_test_filter(argv[1]);
  return cmocka_run_group_tests(tests, NULL, NULL);
}
