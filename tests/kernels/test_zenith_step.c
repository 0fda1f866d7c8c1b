/* Tests of the fused CPU step (kernels/zn_step.c) against independent double-precision scalar
 * references: the update of step 6 in docs/optimizer.md for every combination of Nesterov and decay
 * kind, the double-accumulated sum of squares, and the whole step including its non-finite skip.
 *
 * Error bound for the update: the kernel works in float (with lr, mu and the decays rounded to
 * float once), about ten roundings of 2^-24 each along the longest chain. Each result must be
 * within 1e-6 (about 17 float ulps) of the sum of the magnitudes of the terms that form it, which
 * is the scale its rounding errors live on even where the terms cancel. */
#include <float.h>
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>

#include <cmocka.h>

#include "zn_step.h"

#define UPDATE_TOL 1e-6

static const size_t sizes[] = {1, 7, 1001, 100003};

static uint64_t rng_state;

static double uniform(double a, double b) {
  rng_state ^= rng_state << 13, rng_state ^= rng_state >> 7, rng_state ^= rng_state << 17;
  return a + (b - a) * (double)(rng_state >> 11) * 0x1p-53;
}

static float* random_floats(size_t n, double a, double b) {
  float* x = malloc(n * sizeof(float));
  assert_non_null(x);
  for (size_t i = 0; i < n; i++) x[i] = (float)uniform(a, b);
  return x;
}

/* Step 6 in double from the float inputs, with the error scale of each result alongside. */
static void reference_update(const zn_zenith_params* p, double lr, double gs, double w, double g,
                             double v, double* w_out, double* v_out, double* w_scale,
                             double* v_scale) {
  double d = gs * g + p->weight_decay * w;
  double v1 = p->momentum * v + d;
  double u = p->nesterov ? d + p->momentum * v1 : v1;
  *v_out = v1;
  *w_out = w - lr * u - lr * p->decoupled_decay * w;

  double d_scale = fabs(gs * g) + fabs(p->weight_decay * w);
  *v_scale = d_scale + fabs(p->momentum * v);
  double u_scale = p->nesterov ? d_scale + p->momentum * *v_scale : *v_scale;
  *w_scale = fabs(w) + lr * u_scale + lr * p->decoupled_decay * fabs(w);
}

static void check_apply(int nesterov, double weight_decay, double decoupled_decay) {
  zn_zenith_params p;
  zn_zenith_params_default(&p);
  p.nesterov = nesterov;
  p.weight_decay = weight_decay;
  p.decoupled_decay = decoupled_decay;
  const double lr = 0.0371;
  const float gs = 0.5f;
  rng_state = 0x9E3779B97F4A7C15ull + (uint64_t)nesterov;

  for (size_t k = 0; k < sizeof sizes / sizeof sizes[0]; k++) {
    size_t n = sizes[k];
    float* w = random_floats(n, -1, 1);
    float* g = random_floats(n, -2, 2);
    float* v = random_floats(n, -0.5, 0.5);
    float* w0 = malloc(n * sizeof(float));
    float* v0 = malloc(n * sizeof(float));
    assert_non_null(w0);
    assert_non_null(v0);
    for (size_t i = 0; i < n; i++) w0[i] = w[i], v0[i] = v[i];

    zn_step_apply(&p, lr, gs, w, g, v, n);

    double worst = 0;
    for (size_t i = 0; i < n; i++) {
      double wr, vr, ws, vs;
      reference_update(&p, lr, gs, w0[i], g[i], v0[i], &wr, &vr, &ws, &vs);
      double ew = fabs(w[i] - wr) / ws, ev = fabs(v[i] - vr) / vs;
      if (ew > UPDATE_TOL || ev > UPDATE_TOL)
        fail_msg("n=%zu i=%zu: w %.9g vs %.17g, v %.9g vs %.17g (scaled errors %g, %g)", n, i, w[i],
                 wr, v[i], vr, ew, ev);
      worst = fmax(worst, fmax(ew, ev));
    }
    print_message("n=%zu worst scaled error %.3g\n", n, worst);
    free(w), free(g), free(v), free(w0), free(v0);
  }
}

static void apply_heavy_ball_coupled_decay(void** unused) {
  check_apply(0, 5e-4, 0);
}

static void apply_nesterov_coupled_decay(void** unused) {
  check_apply(1, 5e-4, 0);
}

static void apply_heavy_ball_decoupled_decay(void** unused) {
  check_apply(0, 0, 0.01);
}

static void apply_nesterov_decoupled_decay(void** unused) {
  check_apply(1, 0, 0.01);
}

static void apply_nesterov_both_decays(void** unused) {
  check_apply(1, 0.02, 0.03);
}

static long double reference_sumsq(const float* g, size_t n) {
  long double s = 0;
  for (size_t i = 0; i < n; i++) s += (long double)g[i] * g[i];
  return s;
}

/* Positive terms summed in 8 lanes and then pairwise: relative error at most (n/8 + 4) roundings
 * of the double unit, plus one per square. */
static void sumsq_matches_reference(void** unused) {
  const size_t more[] = {0, 1, 7, 8, 9, 1001, 100003};
  rng_state = 12345;
  for (size_t k = 0; k < sizeof more / sizeof more[0]; k++) {
    size_t n = more[k];
    float* g = random_floats(n ? n : 1, -3, 3);
    double got = zn_sumsq(g, n);
    long double want = reference_sumsq(g, n);
    double tol = ((double)n / 8 + 5) * DBL_EPSILON * (double)want;
    if (!(fabs(got - (double)want) <= tol))
      fail_msg("n=%zu: sumsq %.17g, reference %.17Lg (tolerance %g)", n, got, want, tol);
    free(g);
  }
}

static void sumsq_accumulates_beyond_float_range(void** unused) {
  /* 1e30^2 overflows float but not double: a float accumulator would give Inf. */
  float g[1000];
  for (int i = 0; i < 1000; i++) g[i] = 1e30f;
  double want = 1000.0 * (double)1e30f * (double)1e30f;
  double got = zn_sumsq(g, 1000);
  if (!(fabs(got - want) <= 1e-13 * want)) fail_msg("sumsq %.17g, expected %.17g", got, want);
}

static void step_computes_norm_rate_and_update(void** unused) {
  zn_zenith_params p;
  zn_zenith_params_default(&p);
  p.window = 2;
  p.lr0 = 0.1;
  double ring[2];
  zn_zenith_state s;
  zn_zenith_state_init(&p, &s, ring);
  const size_t n = 1001;
  const float gs = 0.25f;
  rng_state = 777;
  float* w = random_floats(n, -1, 1);
  float* v = calloc(n, sizeof(float));
  assert_non_null(v);

  /* Gradient scales 4, 1, 1: the windowed norm falls from 4a to 2.5a to a, so eta_t goes
   * 0.1, 0.0625, 0.025 with a the norm of the base gradient. */
  float* base = random_floats(n, -1, 1);
  const double factor[] = {4, 1, 1}, want_lr[] = {0.1, 0.0625, 0.025};
  double a = 0.25 * sqrt((double)reference_sumsq(base, n));
  for (int t = 0; t < 3; t++) {
    float* g = malloc(n * sizeof(float));
    float* w0 = malloc(n * sizeof(float));
    float* v0 = malloc(n * sizeof(float));
    assert_true(g && w0 && v0);
    for (size_t i = 0; i < n; i++) g[i] = (float)factor[t] * base[i], w0[i] = w[i], v0[i] = v[i];

    double norm = 0;
    assert_int_equal(zn_zenith_step(&p, &s, gs, w, g, v, n, &norm), ZN_STEP_TAKEN);
    if (!(fabs(norm - factor[t] * a) <= 1e-12 * norm))
      fail_msg("t=%d norm %.17g, expected %.17g", t + 1, norm, factor[t] * a);
    if (!(fabs(s.lr - want_lr[t]) <= 1e-15))
      fail_msg("t=%d lr %.17g, expected %.17g", t + 1, s.lr, want_lr[t]);
    for (size_t i = 0; i < n; i++) {
      double wr, vr, ws, vs;
      reference_update(&p, want_lr[t], gs, w0[i], g[i], v0[i], &wr, &vr, &ws, &vs);
      if (fabs(w[i] - wr) > UPDATE_TOL * ws || fabs(v[i] - vr) > UPDATE_TOL * vs)
        fail_msg("t=%d i=%zu: w %.9g vs %.17g, v %.9g vs %.17g", t + 1, i, w[i], wr, v[i], vr);
    }
    free(g), free(w0), free(v0);
  }
  free(w), free(v), free(base);
}

static void check_nonfinite_skip(float bad) {
  zn_zenith_params p;
  zn_zenith_params_default(&p);
  double ring[100];
  zn_zenith_state s;
  zn_zenith_state_init(&p, &s, ring);
  const size_t n = 1001;
  rng_state = 4242;
  float* w = random_floats(n, -1, 1);
  float* g = random_floats(n, -1, 1);
  float* v = random_floats(n, -1, 1);
  float* w0 = malloc(n * sizeof(float));
  float* v0 = malloc(n * sizeof(float));
  assert_true(w0 && v0);
  for (size_t i = 0; i < n; i++) w0[i] = w[i], v0[i] = v[i];
  g[n / 2] = bad;

  double norm = 0;
  assert_int_equal(zn_zenith_step(&p, &s, 1.0f, w, g, v, n, &norm), ZN_STEP_SKIPPED_NONFINITE);
  assert_false(isfinite(norm));
  assert_int_equal(s.skipped, 1);
  assert_int_equal(s.count, 0);
  assert_memory_equal(w, w0, n * sizeof(float));
  assert_memory_equal(v, v0, n * sizeof(float));
  free(w), free(g), free(v), free(w0), free(v0);
}

static void step_with_nan_gradient_changes_nothing(void** unused) {
  check_nonfinite_skip(NAN);
}

static void step_with_inf_gradient_changes_nothing(void** unused) {
  check_nonfinite_skip(-INFINITY);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(apply_heavy_ball_coupled_decay),
      cmocka_unit_test(apply_nesterov_coupled_decay),
      cmocka_unit_test(apply_heavy_ball_decoupled_decay),
      cmocka_unit_test(apply_nesterov_decoupled_decay),
      cmocka_unit_test(apply_nesterov_both_decays),
      cmocka_unit_test(sumsq_matches_reference),
      cmocka_unit_test(sumsq_accumulates_beyond_float_range),
      cmocka_unit_test(step_computes_norm_rate_and_update),
      cmocka_unit_test(step_with_nan_gradient_changes_nothing),
      cmocka_unit_test(step_with_inf_gradient_changes_nothing),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
