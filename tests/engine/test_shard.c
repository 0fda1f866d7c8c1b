/* The sharded ZENITH step (zn_shard.h) against the unsharded one.
 *
 * The plan: shards of parameter counts that the worker count does not divide, blocks aligned
 * to 16 floats, and empty shards when there are more workers than blocks, checked against
 * hand-worked cases and against the properties every plan must have.
 *
 * The step: N forked ranks, joined over Gloo on loopback, each with its own gradient every
 * step, run the sharded step for several steps; the parent runs the unsharded step
 * (zn_zenith_step) on the sum of the same gradients and compares eta_t step by step, the
 * weights and the momentum. On 2 ranks the reduced gradient is exactly the parent's sum (a sum
 * of two floats has one order), so only the sum of squares is added in another order: eta_t
 * must agree to 1e-12 relative and the weights to a few float ulps. On 3 and 4 ranks
 * the ring reduce-scatter adds the ranks in another order than the parent. */
#define _POSIX_C_SOURCE 200809L

#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "comm_testkit.h"
#include "zn_shard.h"
#include "zn_step.h"

#define STEPS 6
#define MAX_N 1000

/* ---------------------------------------------------------------- the plan */

static void expect_shard(size_t n, int world, int rank, size_t block, size_t lo, size_t hi) {
  zn_shard_plan p;
  zn_shard_plan_make(n, world, rank, &p);
  assert_int_equal(p.block, block);
  assert_int_equal(p.lo, lo);
  assert_int_equal(p.hi, hi);
}

static void test_plan_hand_worked(void** state) {
  (void)state;
  /* 37 on 3: ceil(37 / 3) = 13, rounded up to 16. */
  expect_shard(37, 3, 0, 16, 0, 16);
  expect_shard(37, 3, 1, 16, 16, 32);
  expect_shard(37, 3, 2, 16, 32, 37);
  /* 10 on 4: one block of 16 holds everything; ranks 1..3 have empty shards. */
  expect_shard(10, 4, 0, 16, 0, 10);
  expect_shard(10, 4, 1, 16, 10, 10);
  expect_shard(10, 4, 3, 16, 10, 10);
  /* 40 on 3: ceil = 14 -> 16; the last rank gets the 8 left. */
  expect_shard(40, 3, 2, 16, 32, 40);
  /* 33 on 2: ceil = 17 -> 32, so rank 1 keeps only 1. */
  expect_shard(33, 2, 1, 32, 32, 33);
  /* mlp on 3 workers (docs/sharding.md's table). */
  expect_shard(203530, 3, 0, 67856, 0, 67856);
  expect_shard(203530, 3, 2, 67856, 135712, 203530);
  expect_shard(0, 2, 1, 0, 0, 0);
}

static void test_plan_tiles_every_vector(void** state) {
  (void)state;
  for (size_t n = 0; n < 300; n++) {
    for (int world = 1; world <= 9; world++) {
      size_t next = 0;
      for (int rank = 0; rank < world; rank++) {
        zn_shard_plan p;
        zn_shard_plan_make(n, world, rank, &p);
        assert_int_equal(p.block % ZN_SHARD_ALIGN, 0);
        assert_true((size_t)world * p.block >= n);
        assert_true(p.block < (n + world - 1) / world + ZN_SHARD_ALIGN);
        assert_int_equal(p.lo, next); /* contiguous, in rank order */
        assert_true(p.hi >= p.lo && p.hi - p.lo <= p.block);
        assert_true(p.lo == n || p.lo == (size_t)rank * p.block); /* starts on its block */
        next = p.hi;
      }
      assert_int_equal(next, n);
    }
  }
}

/* ---------------------------------------------------------------- the step */

typedef struct {
  size_t n;
  zn_zenith_params params;
} step_case;

static float uniform(uint64_t* s) {
  *s = *s * 6364136223846793005ULL + 1442695040888963407ULL;
  return (float)((*s >> 40) * (1.0 / 16777216.0)) * 2.0f - 1.0f;
}

/* What rank r contributes at step t, and the shared starting weights: the same formulas in the
 * ranks and in the parent. Step 3's gradients are ten times larger, a spike the rule skips. */
static void gradient(float* g, size_t n, int rank, int t) {
  uint64_t s = 1000003u * (uint64_t)(rank + 1) + 7919u * (uint64_t)t;
  float scale = t == 3 ? 40.0f : 1.0f;
  for (size_t i = 0; i < n; i++) g[i] = scale * uniform(&s);
}

static void initial_weights(float* w, size_t n) {
  uint64_t s = 42;
  for (size_t i = 0; i < n; i++) w[i] = uniform(&s);
}

static void case_params(zn_zenith_params* p) {
  zn_zenith_params_default(p);
  p->window = 3;
  p->weight_decay = 1e-3;
  p->spike_factor = 3.0;
}

/* One rank: STEPS sharded steps, then its weights, its momentum shard and the etas to a file. */
static int run_rank(zn_comm* comm, int rank, const char* dir, void* arg) {
  const step_case* c = arg;
  int world = zn_comm_size(comm);
  zn_shard_plan p;
  zn_shard_plan_make(c->n, world, rank, &p);
  size_t padded = zn_shard_padded(&p), len = p.hi - p.lo;
  float* w = calloc(padded, sizeof(float));
  float* g = calloc(padded, sizeof(float));
  float* v = calloc(len ? len : 1, sizeof(float));
  double window[3], eta[STEPS];
  zn_zenith_state s;
  zn_zenith_state_init(&c->params, &s, window);
  initial_weights(w, c->n);
  for (int t = 0; t < STEPS; t++) {
    gradient(g, c->n, rank, t);
    double sumsq[1] = {0}, norm;
    zn_step_outcome outcome;
    if (zn_shard_reduce(comm, &p, g, sumsq, 1) != ZN_OK ||
        zn_shard_update(comm, &p, &c->params, &s, 1.0f / (float)world, sumsq[0], w, g, v, &outcome,
                        &norm) != ZN_OK)
      return 1;
    eta[t] = outcome == ZN_STEP_TAKEN ? s.lr : -1.0;
  }
  /* eta, then the weights, then the momentum shard */
  size_t bytes = sizeof eta + (c->n + len) * sizeof(float);
  char* out = malloc(bytes);
  memcpy(out, eta, sizeof eta);
  memcpy(out + sizeof eta, w, c->n * sizeof(float));
  if (len) memcpy(out + sizeof eta + c->n * sizeof(float), v, len * sizeof(float));
  char name[32];
  snprintf(name, sizeof name, "out-%d.bin", rank);
  int ok = zn_testkit_put(dir, name, out, bytes) == 0;
  free(out);
  free(w);
  free(g);
  free(v);
  return ok ? 0 : 1;
}

/* The unsharded reference on the ranks' summed gradients. */
static void reference(const step_case* c, int world, double* eta, float* w, float* v) {
  float* g = malloc(c->n * sizeof(float) + 1);
  float* sum = malloc(c->n * sizeof(float) + 1);
  double window[3];
  zn_zenith_state s;
  zn_zenith_state_init(&c->params, &s, window);
  initial_weights(w, c->n);
  memset(v, 0, c->n * sizeof(float));
  for (int t = 0; t < STEPS; t++) {
    memset(sum, 0, c->n * sizeof(float));
    for (int r = 0; r < world; r++) {
      gradient(g, c->n, r, t);
      for (size_t i = 0; i < c->n; i++) sum[i] += g[i];
    }
    double norm;
    zn_step_outcome o = zn_zenith_step(&c->params, &s, 1.0f / (float)world, w, sum, v, c->n, &norm);
    eta[t] = o == ZN_STEP_TAKEN ? s.lr : -1.0;
  }
  free(g);
  free(sum);
}

static double rel_gap(const float* a, const float* b, size_t n) {
  double worst = 0, scale = 1e-30;
  for (size_t i = 0; i < n; i++) {
    worst = fmax(worst, fabs((double)a[i] - b[i]));
    scale = fmax(scale, fabs((double)a[i]));
  }
  return worst / scale;
}

static void check_case(size_t n, int world, double eta_tol, double tensor_tol) {
  step_case c = {.n = n};
  case_params(&c.params);
  zn_testkit_world world_of = {.size = world, .deadline_ms = 30000};
  assert_int_equal(zn_testkit_run(&world_of, run_rank, &c), 0);

  static float v[MAX_N], want_w[MAX_N], want_v[MAX_N];
  double want_eta[STEPS];
  reference(&c, world, want_eta, want_w, want_v);
  for (int rank = 0; rank < world; rank++) {
    zn_shard_plan p;
    zn_shard_plan_make(n, world, rank, &p);
    size_t len = p.hi - p.lo;
    char name[32];
    snprintf(name, sizeof name, "out-%d.bin", rank);
    void* data;
    size_t bytes;
    assert_int_equal(zn_testkit_get(world_of.dir, name, &data, &bytes), 0);
    assert_int_equal(bytes, STEPS * sizeof(double) + (n + len) * sizeof(float));
    const double* eta = data;
    const float* w = (const float*)(eta + STEPS);
    memcpy(v + p.lo, w + n, len * sizeof(float));
    for (int t = 0; t < STEPS; t++) {
      assert_true((eta[t] < 0) == (want_eta[t] < 0)); /* skipped at the same steps */
      if (want_eta[t] > 0) assert_true(fabs(eta[t] - want_eta[t]) <= eta_tol * want_eta[t]);
    }
    assert_true(rel_gap(want_w, w, n) <= tensor_tol); /* every rank holds all the weights */
    free(data);
  }
  assert_true(want_eta[3] < 0);                     /* the spike was skipped, by every rank */
  assert_true(rel_gap(want_v, v, n) <= tensor_tol); /* the shards make up the momentum */
  zn_testkit_cleanup(&world_of);
}

/* 2 ranks: the same reduced gradient, the sum of squares in another order. */
static void test_two_ranks_match_the_unsharded_step(void** state) {
  (void)state;
  check_case(1000, 2, 1e-12, 1e-6);
  check_case(33, 2, 1e-12, 1e-6); /* rank 1 keeps one parameter */
}

/* Counts the world does not divide, and ranks with empty shards. */
static void test_uneven_and_empty_shards(void** state) {
  (void)state;
  check_case(37, 3, 1e-6, 1e-5);
  check_case(1000, 3, 1e-6, 1e-5);
  check_case(10, 4, 1e-6, 1e-5); /* ranks 1, 2 and 3 own nothing */
  check_case(1, 3, 1e-6, 1e-5);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_plan_hand_worked),
      cmocka_unit_test(test_plan_tiles_every_vector),
      cmocka_unit_test(test_two_ranks_match_the_unsharded_step),
      cmocka_unit_test(test_uneven_and_empty_shards),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
