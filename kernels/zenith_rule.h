/* The ZENITH rate rule: from the global norm n_t of the reduced gradient to the learning rate
 * eta_t, exactly as docs/optimizer.md (steps 2-5 of "One step") defines it. The rule keeps O(W)
 * scalars: a ring of the last W norms, their running sum, the largest windowed mean seen so far and
 * two counters. It is header-only and free of libc beyond <math.h> so that the CPU step, the CUDA
 * step and the checkpoint code all run the very same arithmetic; every worker feeds it the same
 * reduced norm and therefore computes the same rate without talking to the others. */
#ifndef ZN_ZENITH_RULE_H
#define ZN_ZENITH_RULE_H

#include <math.h>
#include <stdint.h>

#ifdef __CUDACC__
#define ZN_HD __host__ __device__
#else
#define ZN_HD
#endif

/* Hyper-parameters; names and meanings as in the table of docs/optimizer.md. */
typedef struct {
  double lr0;             /* eta0: initial and largest rate */
  int window;             /* W >= 1: norms in the sliding window */
  double momentum;        /* mu in [0, 1) */
  int nesterov;           /* nonzero: Nesterov variant */
  double weight_decay;    /* lambda, coupled (added to the gradient) */
  double decoupled_decay; /* applied to the weights directly, scaled by eta_t */
  double lr_min;          /* floor on eta_t */
  double spike_factor;    /* s; 0 turns the spike guard off */
} zn_zenith_params;

/* Everything a checkpoint must carry for the rule (the momentum buffers live with the weights).
 * window is caller-owned storage for params.window doubles used as a ring: while filling, the
 * entries are window[head .. head+count) (mod W); once full, window[head] is the oldest. */
typedef struct {
  int64_t step;    /* t: steps attempted so far, skipped ones included */
  int count;       /* norms in the window, min(steps taken, W) */
  int head;        /* ring index of the oldest norm */
  double sum;      /* running sum of the window (checkpointed, never recomputed) */
  double mean;     /* m_t */
  double peak;     /* M_t, with M_0 = 0 */
  double lr;       /* eta_t of the last step taken (eta0 before the first) */
  int64_t skipped; /* steps skipped for a non-finite norm */
  int64_t spikes;  /* steps skipped by the spike guard */
  double* window;
} zn_zenith_state;

typedef enum {
  ZN_STEP_TAKEN = 0,
  ZN_STEP_SKIPPED_NONFINITE,
  ZN_STEP_SKIPPED_SPIKE,
} zn_step_outcome;

static inline ZN_HD void zn_zenith_params_default(zn_zenith_params* p) {
  p->lr0 = 0.05;
  p->window = 100;
  p->momentum = 0.9;
  p->nesterov = 0;
  p->weight_decay = 5e-4;
  p->decoupled_decay = 0.0;
  p->lr_min = 0.0;
  p->spike_factor = 0.0;
}

/* Resets s to the state before step 1, using window_storage (p->window doubles) as its ring. */
static inline ZN_HD void zn_zenith_state_init(const zn_zenith_params* p, zn_zenith_state* s,
                                              double* window_storage) {
  s->step = 0;
  s->count = 0;
  s->head = 0;
  s->sum = 0.0;
  s->mean = 0.0;
  s->peak = 0.0;
  s->lr = p->lr0;
  s->skipped = 0;
  s->spikes = 0;
  s->window = window_storage;
  for (int i = 0; i < p->window; i++) window_storage[i] = 0.0;
}

/* The i-th oldest norm in the window, 0 <= i < s->count: the order a checkpoint writes them in.
 * A restore writes them back to window[0 .. count) with head = 0, which the ring accepts. */
static inline ZN_HD double zn_zenith_window_at(const zn_zenith_params* p, const zn_zenith_state* s,
                                               int i) {
  return s->window[(s->head + i) % p->window];
}

/* One application of steps 2-5 for step t = s->step + 1 with global gradient norm `norm`.
 *
 * The spike guard is armed once the window holds W norms. With no skipped steps this is exactly
 * docs/optimizer.md's "t > W"; after a skip, t runs ahead of the window, and waiting for a full
 * window keeps the guard's premise (M_{t-1} is the peak of full-window means) true rather than
 * judging a norm against a mean of fewer than W entries.
 *
 * The running sum is updated by subtracting the evicted norm and then adding the new one, in that
 * order, so a restored checkpoint reproduces it bit for bit. Its rounding drift can at worst make
 * m_t a hair negative when every recent norm is 0; eta_t is then floored at lr_min >= 0, never
 * negative.
 *
 * eta_t is formed as eta0 * (m_t / M_t): the ratio is exactly 1 at the peak and rounds to at most
 * 1 below it, so eta_t equals eta0 bit for bit at the peak and can never exceed it. */
static inline ZN_HD zn_step_outcome zn_zenith_rate(const zn_zenith_params* p, zn_zenith_state* s,
                                                   double norm) {
  s->step++;
  if (!isfinite(norm)) {
    s->skipped++;
    return ZN_STEP_SKIPPED_NONFINITE;
  }
  if (p->spike_factor > 0.0 && s->count == p->window && norm > p->spike_factor * s->peak) {
    s->spikes++;
    return ZN_STEP_SKIPPED_SPIKE;
  }

  if (s->count == p->window) {
    s->sum -= s->window[s->head];
    s->window[s->head] = norm;
    s->head = (s->head + 1) % p->window;
  } else {
    s->window[(s->head + s->count) % p->window] = norm;
    s->count++;
  }
  s->sum += norm;
  s->mean = s->sum / s->count;

  if (s->mean > s->peak) s->peak = s->mean;
  double lr = s->peak > 0.0 ? p->lr0 * (s->mean / s->peak) : p->lr0;
  s->lr = lr > p->lr_min ? lr : p->lr_min;
  return ZN_STEP_TAKEN;
}

#endif
