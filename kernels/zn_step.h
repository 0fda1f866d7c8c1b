/* The ZENITH step on the CPU: the global gradient norm, the rate rule and the weight update over
 * one flat float buffer of parameters. The trainer hands in the allreduced SUM of the workers'
 * gradients together with grad_scale = 1/N, so the division that turns the sum into the mean is
 * folded into the passes that read the gradient instead of costing a pass of its own. */
#ifndef ZN_STEP_H
#define ZN_STEP_H

#include <stddef.h>

#include "zenith_rule.h"

/* Sum of g[i]^2 accumulated in double precision; deterministic for a given n and g. */
double zn_sumsq(const float* g, size_t n);

/* Step 6 of docs/optimizer.md in one pass over n parameters, with g = grad_scale * g_sum and eta_t
 * = lr. w, g_sum and v must not overlap. */
void zn_step_apply(const zn_zenith_params* p, double lr, float grad_scale, float* w,
                   const float* g_sum, float* v, size_t n);

/* A whole step: n_t = grad_scale * sqrt(sumsq(g_sum)), the rate rule, and the update when the
 * rule takes the step. *norm_out (may be NULL) receives n_t, also for a skipped step. */
zn_step_outcome zn_zenith_step(const zn_zenith_params* p, zn_zenith_state* s, float grad_scale,
                               float* w, const float* g_sum, float* v, size_t n, double* norm_out);

#endif
