/* The worker's one source of randomness: splitmix64 (Steele, Lea and Flood, "Fast splittable
 * pseudorandom number generators", OOPSLA 2014; the 64-bit finaliser of Vigna's splitmix64.c).
 * The state advances by the golden-ratio constant and each output is that state run through a
 * bijective mixer, so a seed of any quality gives a full-period, well-mixed stream. It is small
 * and defined to the bit, so every worker, and every resumed run, draws the same numbers from the
 * same seed: data order and weight initialisation are reproducible across processes. */
#ifndef ZN_RNG_H
#define ZN_RNG_H

#include <stdint.h>

typedef struct {
  uint64_t state;
} zn_rng;

/* The splitmix64 output mixer; also used to derive independent seeds from (seed, epoch). */
static inline uint64_t zn_rng_mix(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

static inline void zn_rng_seed(zn_rng* r, uint64_t seed) {
  r->state = seed;
}

static inline uint64_t zn_rng_next(zn_rng* r) {
  r->state += 0x9E3779B97F4A7C15ull;
  return zn_rng_mix(r->state);
}

/* Uniform in [0, bound), bound >= 1, without modulo bias (Lemire's multiply-and-reject on the
 * high 32 bits of each draw). */
static inline uint32_t zn_rng_below(zn_rng* r, uint32_t bound) {
  uint64_t m = (zn_rng_next(r) >> 32) * bound;
  if ((uint32_t)m < bound) {
    uint32_t threshold = (uint32_t)(-bound) % bound;
    while ((uint32_t)m < threshold) m = (zn_rng_next(r) >> 32) * bound;
  }
  return (uint32_t)(m >> 32);
}

/* Uniform float in [a, b), a < b: 24 random bits give every float in [0, 1) on a 2^-24 grid.
 * Rounding of a + (b - a) * u can land on b itself; such a draw is rejected, so b is never
 * returned. */
static inline float zn_rng_uniform(zn_rng* r, float a, float b) {
  for (;;) {
    float u = (float)(zn_rng_next(r) >> 40) * 0x1p-24f;
    float x = a + (b - a) * u;
    if (x < b) return x;
  }
}

#endif
