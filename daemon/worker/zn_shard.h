/* The ZENITH step with the optimizer state sharded over the ranks (ZeRO stage 1).
 *
 * The flat parameter vector of n floats is cut into one contiguous block per rank, every block
 * `block` floats long and a multiple of ZN_SHARD_ALIGN, so that a block starts on a 64-byte
 * boundary and the update runs on whole vectors. The blocks cover world * block >= n floats:
 * the last shard is shorter than its block, and a rank whose block starts at or past n has an
 * empty shard. The gradient and parameter buffers handed to these functions hold the padded
 * world * block floats; the momentum buffer only the rank's shard.
 *
 * A step is two calls, so that the caller can act on the flags it adds to the scalar allreduce
 * (the loss, a stop request) before the update:
 *   zn_shard_reduce   reduce-scatter of the gradient sum, then one allreduce in double of this
 *                     rank's sum of squares over its shard together with the caller's scalars;
 *   zn_shard_update   n_t from that global sum of squares, the rate rule, the update of this
 *                     rank's shard, and an all-gather of the parameters.
 * Every rank gets the same n_t and so the same eta_t. It equals the unsharded step's up to the
 * order of the sums (docs/sharding.md). */
#ifndef ZN_SHARD_H
#define ZN_SHARD_H

#include <stddef.h>

#include "zenith_rule.h"
#include "zn_comm.h"

/* Floats per alignment unit of a block: 64 bytes. */
#define ZN_SHARD_ALIGN 16

typedef struct {
  size_t n;      /* parameters */
  size_t block;  /* floats per rank in the collectives; world * block >= n */
  size_t lo, hi; /* this rank's shard of the parameters, [lo, hi); empty when lo == hi */
  int rank, world;
} zn_shard_plan;

void zn_shard_plan_make(size_t n, int world, int rank, zn_shard_plan* p);

/* Floats the padded gradient and parameter buffers must hold: world * block (at least 1). */
size_t zn_shard_padded(const zn_shard_plan* p);

/* Reduces g (zn_shard_padded floats; this rank's gradient in [0, n), the rest is zeroed here) so
 * that g[lo, hi) holds the sum over ranks. Then allreduces scalars[0, count) in double: scalars[0]
 * comes back as the global sum of squares of the reduced gradient, the others as the sums of the
 * ranks' values. count >= 1. */
int zn_shard_reduce(zn_comm* comm, const zn_shard_plan* p, float* g, double* scalars, int count);

/* n_t = grad_scale * sqrt(sumsq), the rate rule and, when it takes the step, the update of
 * w[lo, hi) with g[lo, hi) and the shard's momentum v (hi - lo floats), followed by the
 * all-gather that gives every rank all of w (zn_shard_padded floats). *outcome and *norm are
 * set before any collective runs. */
int zn_shard_update(zn_comm* comm, const zn_shard_plan* p, const zn_zenith_params* params,
                    zn_zenith_state* s, float grad_scale, double sumsq, float* w, const float* g,
                    float* v, zn_step_outcome* outcome, double* norm);

/* Gathers the ranks' momentum shards into full (zn_shard_padded floats) on every rank, so that
 * the whole optimizer state can be written once. A collective: every rank calls it. */
int zn_shard_gather(zn_comm* comm, const zn_shard_plan* p, const float* v, float* full);

#endif
