/* The sharded ZENITH step; see zn_shard.h. */
#include "zn_shard.h"

#include <math.h>
#include <string.h>

#include "zn_step.h"

void zn_shard_plan_make(size_t n, int world, int rank, zn_shard_plan* p) {
  size_t per_rank = (n + (size_t)world - 1) / (size_t)world;
  p->n = n;
  p->world = world;
  p->rank = rank;
  p->block = (per_rank + ZN_SHARD_ALIGN - 1) / ZN_SHARD_ALIGN * ZN_SHARD_ALIGN;
  size_t start = (size_t)rank * p->block;
  p->lo = start < n ? start : n;
  p->hi = start + p->block < n ? start + p->block : n;
}

size_t zn_shard_padded(const zn_shard_plan* p) {
  size_t padded = (size_t)p->world * p->block;
  return padded ? padded : 1;
}

int zn_shard_reduce(zn_comm* comm, const zn_shard_plan* p, float* g, double* scalars, int count) {
  /* The padding takes part in the reduce-scatter; zeros keep it from ever holding NaN. */
  memset(g + p->n, 0, ((size_t)p->world * p->block - p->n) * sizeof(float));
  int rc = zn_comm_reduce_scatter_sum(comm, g, p->block);
  if (rc != ZN_OK) return rc;
  scalars[0] = zn_sumsq(g + p->lo, p->hi - p->lo);
  return zn_comm_allreduce_sum_f64(comm, scalars, (size_t)count);
}

int zn_shard_update(zn_comm* comm, const zn_shard_plan* p, const zn_zenith_params* params,
                    zn_zenith_state* s, float grad_scale, double sumsq, float* w, const float* g,
                    float* v, zn_step_outcome* outcome, double* norm) {
  /* The same expression as zn_zenith_step's, so that equal sums give equal bits. */
  *norm = (double)grad_scale * sqrt(sumsq);
  *outcome = zn_zenith_rate(params, s, *norm);
  /* Every rank has the same n_t, so all of them skip together and nothing needs gathering. */
  if (*outcome != ZN_STEP_TAKEN) return ZN_OK;
  zn_step_apply(params, s->lr, grad_scale, w + p->lo, g + p->lo, v, p->hi - p->lo);
  return zn_comm_allgather(comm, w, p->block * sizeof(float));
}

int zn_shard_gather(zn_comm* comm, const zn_shard_plan* p, const float* v, float* full) {
  float* mine = full + (size_t)p->rank * p->block;
  size_t len = p->hi - p->lo;
  if (len) memcpy(mine, v, len * sizeof(float)); /* an empty shard may have no buffer */
  memset(mine + len, 0, (p->block - len) * sizeof(float));
  return zn_comm_allgather(comm, full, p->block * sizeof(float));
}
