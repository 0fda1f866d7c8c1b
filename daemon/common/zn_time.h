/* Clocks: wall time for records, a monotonic clock for intervals. */
#ifndef ZN_TIME_H
#define ZN_TIME_H

#include <stdint.h>
#include <time.h>

static inline int64_t zn_unix_ms(void) {
  struct timespec ts;
  clock_gettime(CLOCK_REALTIME, &ts);
  return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static inline double zn_mono_sec(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

#endif
