/* The fused CPU ZENITH step. Both loops are written so that GCC vectorises them at -O3 for the
 * baseline x86-64 (SSE2) or AArch64 target without -march=native or -ffast-math: the norm keeps
 * LANES independent double accumulators, which makes the summation order explicit (and the result
 * the same on every worker running this binary), and the update has no loop-carried dependence.
 * Both passes read the gradient once; the update also reads and writes w and v once. */
#include "zn_step.h"

#include <math.h>

/* Eight doubles: four SSE2 or two AVX registers of independent partial sums. */
#define LANES 8

double zn_sumsq(const float* g, size_t n) {
  double acc[LANES] = {0};
  size_t i = 0;
  for (; i + LANES <= n; i += LANES) {
    for (int k = 0; k < LANES; k++) {
      double x = g[i + k];
      acc[k] += x * x;
    }
  }
  for (; i < n; i++) {
    double x = g[i];
    acc[0] += x * x;
  }

  /* Pairwise reduction of the lanes: a fixed order, so the result does not depend on the build. */
  for (int width = LANES / 2; width > 0; width /= 2) {
    for (int k = 0; k < width; k++) acc[k] += acc[k + width];
  }
  return acc[0];
}

/* The update in float, as the weights are stored; lr and the decay terms are rounded to float
 * once, outside the loop. The nesterov choice is hoisted so each loop body is branch-free. */
static void apply_heavy_ball(float mu, float wd, float lr, float lr_dd, float scale,
                             float* restrict w, const float* restrict g, float* restrict v,
                             size_t n) {
  for (size_t i = 0; i < n; i++) {
    float d = scale * g[i] + wd * w[i];
    float vi = mu * v[i] + d;
    v[i] = vi;
    w[i] = w[i] - lr * vi - lr_dd * w[i];
  }
}

static void apply_nesterov(float mu, float wd, float lr, float lr_dd, float scale,
                           float* restrict w, const float* restrict g, float* restrict v,
                           size_t n) {
  for (size_t i = 0; i < n; i++) {
    float d = scale * g[i] + wd * w[i];
    float vi = mu * v[i] + d;
    v[i] = vi;
    float u = d + mu * vi;
    w[i] = w[i] - lr * u - lr_dd * w[i];
  }
}

void zn_step_apply(const zn_zenith_params* p, double lr, float grad_scale, float* w,
                   const float* g_sum, float* v, size_t n) {
  float mu = (float)p->momentum;
  float wd = (float)p->weight_decay;
  float lr_dd = (float)(lr * p->decoupled_decay);
  if (p->nesterov) {
    apply_nesterov(mu, wd, (float)lr, lr_dd, grad_scale, w, g_sum, v, n);
  } else {
    apply_heavy_ball(mu, wd, (float)lr, lr_dd, grad_scale, w, g_sum, v, n);
  }
}

zn_step_outcome zn_zenith_step(const zn_zenith_params* p, zn_zenith_state* s, float grad_scale,
                               float* w, const float* g_sum, float* v, size_t n, double* norm_out) {
  double norm = (double)grad_scale * sqrt(zn_sumsq(g_sum, n));
  if (norm_out) *norm_out = norm;

  zn_step_outcome outcome = zn_zenith_rate(p, s, norm);
  if (outcome == ZN_STEP_TAKEN) zn_step_apply(p, s->lr, grad_scale, w, g_sum, v, n);
  return outcome;
}
