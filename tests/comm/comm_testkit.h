/* A harness for tests of code that runs on every rank of a job: it forks one process per rank,
 * connects them over Gloo on loopback, runs a callback on each and waits for all of them under a
 * deadline, so that a test of a collective can fail but never hang.
 *
 * The ranks rendezvous through a key-value store kept in a fresh temporary folder (a key is a file
 * written atomically by rename, so a reader never sees half a value). The same folder is where
 * the ranks leave what the parent should check: each writes its results there with
 * zn_testkit_put, and reports success or failure through its exit code. After zn_testkit_run the
 * parent reads the results with zn_testkit_get, compares them with references of its own, and
 * removes the folder with zn_testkit_cleanup.
 *
 *   static int rank_sum(zn_comm* comm, int rank, const char* dir, void* arg) {
 *     float x = (float)rank;
 *     if (zn_comm_allreduce_sum(comm, &x, 1) != ZN_OK) return 1;
 *     char name[32];
 *     snprintf(name, sizeof(name), "out-%d.bin", rank);
 *     return zn_testkit_put(dir, name, &x, sizeof(x)) == 0 ? 0 : 2;
 *   }
 *
 *   zn_testkit_world w = {.size = 3};
 *   assert_int_equal(zn_testkit_run(&w, rank_sum, NULL), 0);
 *   ... zn_testkit_get(w.dir, "out-0.bin", &data, &len) ...
 *   zn_testkit_cleanup(&w);
 *
 * The harness uses no test framework, so that any test program can link it (zn_comm_testkit).
 * Fork it from a process that has no threads of its own running. */
#ifndef ZN_COMM_TESTKIT_H
#define ZN_COMM_TESTKIT_H

#include <stddef.h>

#include "zn_comm.h"

#define ZN_TESTKIT_MAX_RANKS 16
/* The exit code of a rank whose communicator could not be created; the reason is on stderr. */
#define ZN_TESTKIT_EXIT_CREATE 100

/* What every rank runs, in its own process. comm is connected to the other ranks (it is
 * destroyed after the call returns); dir is the world's folder. arg is zn_testkit_run's, as the
 * parent had it when it forked. The return value is the rank's exit code: 0 means success. */
typedef int (*zn_testkit_rank_fn)(zn_comm* comm, int rank, const char* dir, void* arg);

typedef struct {
  /* Set by the caller. */
  int size;        /* ranks in the world, 1 to ZN_TESTKIT_MAX_RANKS */
  int present;     /* ranks 0 to present - 1 are started, the others never show up; 0: all */
  int timeout_ms;  /* the communicators' timeout (zn_comm_config); 0: 5000 */
  int deadline_ms; /* ranks still running this long after the start are killed; 0: 10000 */

  /* Filled in by zn_testkit_run. */
  char dir[64];                     /* the world's folder; "" if none was made */
  int status[ZN_TESTKIT_MAX_RANKS]; /* waitpid status of each started rank */
  int killed[ZN_TESTKIT_MAX_RANKS]; /* 1 for a rank killed at the deadline */
} zn_testkit_world;

/* Makes a fresh folder, forks ranks 0 to present - 1, creates each one's communicator with
 * zn_comm_create_gloo (host 127.0.0.1) and runs fn on it, then waits for all of them until the
 * deadline and kills those still running. Returns 0 only when every started rank exited with 0
 * before the deadline; otherwise the number of ranks that did not (-1 if the world's size is out
 * of range or the folder or a process could not be made), with one line per such rank on stderr.
 * w->status says how each one ended, for a test that expects a rank to fail or die. */
int zn_testkit_run(zn_testkit_world* w, zn_testkit_rank_fn fn, void* arg);

/* Removes the world's folder and everything in it; safe to call twice, or after a failed run. */
void zn_testkit_cleanup(zn_testkit_world* w);

/* Writes len bytes to the file `name` in dir, atomically. Names starting with "kv-" belong to the
 * rendezvous store. Returns 0 on success. */
int zn_testkit_put(const char* dir, const char* name, const void* data, size_t len);

/* Reads the file `name` in dir into a malloc'd buffer that the caller frees. Returns 0, or
 * ZN_ERR_NOT_FOUND if there is no such file, or ZN_ERR_IO. */
int zn_testkit_get(const char* dir, const char* name, void** data, size_t* len);

/* CLOCK_MONOTONIC in milliseconds: one clock for every process on the machine. */
double zn_testkit_now_ms(void);

void zn_testkit_sleep_ms(int ms);

#endif
