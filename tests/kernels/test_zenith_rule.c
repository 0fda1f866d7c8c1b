/* Tests of the ZENITH rate rule (kernels/zenith_rule.h) against docs/optimizer.md: its worked
 * example row by row, the non-finite and spike skips, the lr_min floor, the bound eta_t <= eta0,
 * and the checkpoint contract that a window restored in order continues the same eta_t sequence. */
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#include <cmocka.h>

#include "zenith_rule.h"

/* Both sides at full precision on failure. tol 0 demands bit equality. */
#define ASSERT_NEAR(actual, expected, tol)                                                   \
  do {                                                                                       \
    double a_ = (actual), e_ = (expected);                                                   \
    if (!(fabs(a_ - e_) <= (tol)))                                                           \
      fail_msg("%s = %.17g, expected %.17g (tolerance %g)", #actual, a_, e_, (double)(tol)); \
  } while (0)

static zn_zenith_params example_params(void) {
  zn_zenith_params p;
  zn_zenith_params_default(&p);
  p.window = 3;
  p.lr0 = 0.1;
  return p;
}

/* One row of the worked example in docs/optimizer.md; lr_tol is 0 where the table's value is exact.
 */
typedef struct {
  double norm;
  int outcome;
  int count;
  double window[3];
  double mean, peak, lr, lr_tol;
} example_row;

static void worked_example_matches_every_row(void** unused) {
  const example_row rows[] = {
      {2.0, ZN_STEP_TAKEN, 1, {2}, 2.0, 2.0, 0.1, 0},
      {4.0, ZN_STEP_TAKEN, 2, {2, 4}, 3.0, 3.0, 0.1, 0},
      {3.0, ZN_STEP_TAKEN, 3, {2, 4, 3}, 3.0, 3.0, 0.1, 0},
      {2.0, ZN_STEP_TAKEN, 3, {4, 3, 2}, 3.0, 3.0, 0.1, 0},
      {1.0, ZN_STEP_TAKEN, 3, {3, 2, 1}, 2.0, 3.0, 0.2 / 3.0, 1e-15},
      {NAN, ZN_STEP_SKIPPED_NONFINITE, 3, {3, 2, 1}, 2.0, 3.0, 0.2 / 3.0, 1e-15},
      {0.0, ZN_STEP_TAKEN, 3, {2, 1, 0}, 1.0, 3.0, 0.1 / 3.0, 1e-15},
  };
  zn_zenith_params p = example_params();
  double ring[3];
  zn_zenith_state s;
  zn_zenith_state_init(&p, &s, ring);

  for (int r = 0; r < 7; r++) {
    const example_row* e = &rows[r];
    print_message("t=%d n=%g\n", r + 1, e->norm);
    assert_int_equal(zn_zenith_rate(&p, &s, e->norm), e->outcome);
    assert_int_equal(s.step, r + 1);
    assert_int_equal(s.count, e->count);
    for (int i = 0; i < e->count; i++) ASSERT_NEAR(zn_zenith_window_at(&p, &s, i), e->window[i], 0);
    ASSERT_NEAR(s.mean, e->mean, 0);
    ASSERT_NEAR(s.peak, e->peak, 0);
    ASSERT_NEAR(s.lr, e->lr, e->lr_tol);
  }
  assert_int_equal(s.skipped, 1);
  assert_int_equal(s.spikes, 0);
  ASSERT_NEAR(s.sum, 3.0, 0);
}

static void inf_norm_is_skipped_and_leaves_state(void** unused) {
  zn_zenith_params p = example_params();
  double ring[3];
  zn_zenith_state s;
  zn_zenith_state_init(&p, &s, ring);
  zn_zenith_rate(&p, &s, 2.0);
  zn_zenith_rate(&p, &s, 1.0);

  assert_int_equal(zn_zenith_rate(&p, &s, INFINITY), ZN_STEP_SKIPPED_NONFINITE);
  assert_int_equal(zn_zenith_rate(&p, &s, -INFINITY), ZN_STEP_SKIPPED_NONFINITE);
  assert_int_equal(s.step, 4);
  assert_int_equal(s.skipped, 2);
  assert_int_equal(s.count, 2);
  ASSERT_NEAR(s.sum, 3.0, 0);
  ASSERT_NEAR(s.mean, 1.5, 0);
  ASSERT_NEAR(s.peak, 2.0, 0);
  ASSERT_NEAR(s.lr, 0.1 * 0.75, 0);
}

static void spike_after_window_fills_is_skipped_and_counted_apart(void** unused) {
  zn_zenith_params p = example_params();
  p.spike_factor = 2.0;
  double ring[3];
  zn_zenith_state s;
  zn_zenith_state_init(&p, &s, ring);
  for (int i = 0; i < 3; i++) zn_zenith_rate(&p, &s, 1.0);

  /* M_3 = 1, so 2.0 is exactly at the guard (n > s*M skips, n = s*M does not) and 2.5 is over. */
  assert_int_equal(zn_zenith_rate(&p, &s, 2.5), ZN_STEP_SKIPPED_SPIKE);
  assert_int_equal(s.spikes, 1);
  assert_int_equal(s.skipped, 0);
  assert_int_equal(s.step, 4);
  ASSERT_NEAR(s.sum, 3.0, 0);
  ASSERT_NEAR(s.peak, 1.0, 0);
  ASSERT_NEAR(s.lr, 0.1, 0);

  assert_int_equal(zn_zenith_rate(&p, &s, 2.0), ZN_STEP_TAKEN);
  ASSERT_NEAR(s.sum, 4.0, 0);
  assert_int_equal(s.spikes, 1);
}

static void spike_before_window_fills_is_taken(void** unused) {
  zn_zenith_params p = example_params();
  p.spike_factor = 2.0;
  double ring[3];
  zn_zenith_state s;
  zn_zenith_state_init(&p, &s, ring);
  zn_zenith_rate(&p, &s, 1.0);
  zn_zenith_rate(&p, &s, 1.0);

  assert_int_equal(zn_zenith_rate(&p, &s, 100.0), ZN_STEP_TAKEN);
  assert_int_equal(s.spikes, 0);
  ASSERT_NEAR(s.mean, 34.0, 0);
  ASSERT_NEAR(s.peak, 34.0, 0);
}

static void spike_guard_waits_for_full_window_after_a_skip(void** unused) {
  /* t = 4 > W, but the NaN at t = 2 leaves only 2 norms in the window: not yet armed. */
  zn_zenith_params p = example_params();
  p.spike_factor = 2.0;
  double ring[3];
  zn_zenith_state s;
  zn_zenith_state_init(&p, &s, ring);
  zn_zenith_rate(&p, &s, 1.0);
  zn_zenith_rate(&p, &s, NAN);
  zn_zenith_rate(&p, &s, 1.0);

  assert_int_equal(zn_zenith_rate(&p, &s, 10.0), ZN_STEP_TAKEN);
  assert_int_equal(s.step, 4);
  assert_int_equal(zn_zenith_rate(&p, &s, 100.0), ZN_STEP_SKIPPED_SPIKE);
}

static void lr_min_floors_the_rate(void** unused) {
  zn_zenith_params p = example_params();
  p.lr_min = 0.05;
  double ring[3];
  zn_zenith_state s;
  zn_zenith_state_init(&p, &s, ring);
  zn_zenith_rate(&p, &s, 4.0);
  zn_zenith_rate(&p, &s, 0.0);
  ASSERT_NEAR(s.lr, 0.05, 0); /* eta0 * 2/4 = 0.05 exactly, equal to the floor */
  zn_zenith_rate(&p, &s, 0.0);
  ASSERT_NEAR(s.mean, 4.0 / 3.0, 0);
  ASSERT_NEAR(s.lr, 0.05, 0); /* eta0 * (4/3)/4 = 0.0333... is floored */
}

static void zero_norms_give_lr0(void** unused) {
  zn_zenith_params p = example_params();
  double ring[3];
  zn_zenith_state s;
  zn_zenith_state_init(&p, &s, ring);
  assert_int_equal(zn_zenith_rate(&p, &s, 0.0), ZN_STEP_TAKEN);
  ASSERT_NEAR(s.peak, 0.0, 0);
  ASSERT_NEAR(s.lr, 0.1, 0);
}

/* A double-precision reference with no ring: the mean is recomputed from the full history. */
static double reference_mean(const double* hist, int t, int w) {
  int first = t > w ? t - w : 0;
  double sum = 0;
  for (int i = first; i < t; i++) sum += hist[i];
  return sum / (t - first);
}

static void lr_never_exceeds_lr0_and_tracks_reference(void** unused) {
  zn_zenith_params p;
  zn_zenith_params_default(&p);
  p.window = 7;
  double ring[7], hist[2000];
  zn_zenith_state s;
  zn_zenith_state_init(&p, &s, ring);

  uint64_t x = 88172645463325252ull; /* xorshift64: any fixed sequence of positive norms */
  double peak = 0;
  for (int t = 0; t < 2000; t++) {
    x ^= x << 13, x ^= x >> 7, x ^= x << 17;
    hist[t] = (double)(x >> 11) * 0x1p-53 * 10.0 / (1.0 + t / 200.0);
    assert_int_equal(zn_zenith_rate(&p, &s, hist[t]), ZN_STEP_TAKEN);

    double m = reference_mean(hist, t + 1, p.window);
    peak = m > peak ? m : peak;
    ASSERT_NEAR(s.mean, m, 1e-12 * peak);
    ASSERT_NEAR(s.lr, p.lr0 * m / peak, 1e-12);
    if (s.lr > p.lr0) fail_msg("t=%d: lr %.17g exceeds lr0 %.17g", t + 1, s.lr, p.lr0);
  }
}

static void restored_window_continues_the_same_rates(void** unused) {
  zn_zenith_params p = example_params();
  p.window = 4;
  double ring_a[4], ring_b[4];
  zn_zenith_state a, b;
  zn_zenith_state_init(&p, &a, ring_a);
  const double norms[] = {0.3, 1.7, 2.9, 0.4, 5.1, 1.1, 0.7, 2.2, 0.9, 0.05, 3.3, 0.2};
  for (int i = 0; i < 6; i++) zn_zenith_rate(&p, &a, norms[i]);

  /* What a checkpoint writes: the scalars and the window oldest first, into a fresh ring. */
  zn_zenith_state_init(&p, &b, ring_b);
  b.step = a.step, b.count = a.count, b.sum = a.sum, b.mean = a.mean, b.peak = a.peak;
  b.lr = a.lr, b.skipped = a.skipped, b.spikes = a.spikes;
  for (int i = 0; i < a.count; i++) ring_b[i] = zn_zenith_window_at(&p, &a, i);
  assert_int_not_equal(a.head, b.head);

  for (int i = 6; i < 12; i++) {
    zn_zenith_rate(&p, &a, norms[i]);
    zn_zenith_rate(&p, &b, norms[i]);
    ASSERT_NEAR(b.lr, a.lr, 0);
    ASSERT_NEAR(b.sum, a.sum, 0);
  }
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(worked_example_matches_every_row),
      cmocka_unit_test(inf_norm_is_skipped_and_leaves_state),
      cmocka_unit_test(spike_after_window_fills_is_skipped_and_counted_apart),
      cmocka_unit_test(spike_before_window_fills_is_taken),
      cmocka_unit_test(spike_guard_waits_for_full_window_after_a_skip),
      cmocka_unit_test(lr_min_floors_the_rate),
      cmocka_unit_test(zero_norms_give_lr0),
      cmocka_unit_test(lr_never_exceeds_lr0_and_tracks_reference),
      cmocka_unit_test(restored_window_continues_the_same_rates),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
