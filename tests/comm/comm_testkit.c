/* The forked-ranks harness of comm_testkit.h: the folder key-value store, the fork of one
 * process per rank, and the wait under a deadline. */
#define _POSIX_C_SOURCE 200809L

#include "comm_testkit.h"

#include <dirent.h>
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define DEFAULT_TIMEOUT_MS 5000
#define DEFAULT_DEADLINE_MS 10000

double zn_testkit_now_ms(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return ts.tv_sec * 1e3 + ts.tv_nsec / 1e6;
}

void zn_testkit_sleep_ms(int ms) {
  struct timespec ts = {ms / 1000, (long)(ms % 1000) * 1000000L};
  nanosleep(&ts, NULL);
}

/* ---- Files in the world's folder ---- */

int zn_testkit_put(const char* dir, const char* name, const void* data, size_t len) {
  char path[512], tmp[560];
  snprintf(path, sizeof(path), "%s/%s", dir, name);
  snprintf(tmp, sizeof(tmp), "%s.tmp%d", path, (int)getpid());
  FILE* f = fopen(tmp, "wb");
  if (!f) return ZN_ERR_IO;
  size_t wrote = len > 0 ? fwrite(data, 1, len, f) : 0;
  if (fclose(f) != 0 || wrote != len) return ZN_ERR_IO;
  return rename(tmp, path) == 0 ? ZN_OK : ZN_ERR_IO;
}

int zn_testkit_get(const char* dir, const char* name, void** data, size_t* len) {
  char path[512];
  snprintf(path, sizeof(path), "%s/%s", dir, name);
  FILE* f = fopen(path, "rb");
  if (!f) return errno == ENOENT ? ZN_ERR_NOT_FOUND : ZN_ERR_IO;
  fseek(f, 0, SEEK_END);
  long size = ftell(f);
  fseek(f, 0, SEEK_SET);
  char* buf = size >= 0 ? malloc(size > 0 ? (size_t)size : 1) : NULL;
  size_t got = buf ? fread(buf, 1, (size_t)size, f) : 0;
  fclose(f);
  if (!buf || got != (size_t)size) {
    free(buf);
    return ZN_ERR_IO;
  }
  *data = buf;
  *len = got;
  return ZN_OK;
}

/* ---- The rendezvous store: one file per key ---- */

typedef struct {
  const char* dir;
} dir_kv;

/* "kv-" and the key with its slashes made underscores. */
static void key_name(const char* key, char* name, size_t cap) {
  int n = snprintf(name, cap, "kv-");
  for (const char* c = key; *c && (size_t)n + 1 < cap; c++) name[n++] = *c == '/' ? '_' : *c;
  name[n] = '\0';
}

static int kv_set(void* ctx, const char* key, const void* value, size_t len) {
  char name[256];
  key_name(key, name, sizeof(name));
  return zn_testkit_put(((dir_kv*)ctx)->dir, name, value, len);
}

static int kv_get(void* ctx, const char* key, void** value, size_t* len) {
  char name[256];
  key_name(key, name, sizeof(name));
  return zn_testkit_get(((dir_kv*)ctx)->dir, name, value, len);
}

static int kv_wait(void* ctx, const char* const* keys, int nkeys, int timeout_ms) {
  double deadline = zn_testkit_now_ms() + timeout_ms;
  for (;;) {
    int present = 0;
    for (int i = 0; i < nkeys; i++) {
      char name[256], path[512];
      key_name(keys[i], name, sizeof(name));
      snprintf(path, sizeof(path), "%s/%s", ((dir_kv*)ctx)->dir, name);
      present += access(path, F_OK) == 0;
    }
    if (present == nkeys) return ZN_OK;
    if (zn_testkit_now_ms() > deadline) return ZN_ERR_TIMEOUT;
    zn_testkit_sleep_ms(2);
  }
}

/* ---- The ranks ---- */

static int rank_main(const zn_testkit_world* w, int rank, zn_testkit_rank_fn fn, void* arg) {
  dir_kv ctx = {w->dir};
  zn_kv kv = {&ctx, kv_set, kv_get, kv_wait};
  int timeout_ms = w->timeout_ms > 0 ? w->timeout_ms : DEFAULT_TIMEOUT_MS;
  zn_comm_config cfg = {rank, w->size, "127.0.0.1", "run-1", timeout_ms};
  zn_comm* comm = NULL;
  char err[1024] = "";
  if (zn_comm_create_gloo(&cfg, &kv, &comm, err, sizeof(err)) != ZN_OK) {
    fprintf(stderr, "rank %d: create failed: %s\n", rank, err);
    return ZN_TESTKIT_EXIT_CREATE;
  }
  int code = fn(comm, rank, w->dir, arg);
  zn_comm_destroy(comm);
  return code;
}

/* Waits for the ranks until the deadline, then kills those still running. */
static void reap(zn_testkit_world* w, pid_t* pids, int present, double deadline) {
  int left = present;
  while (left > 0) {
    for (int r = 0; r < present; r++) {
      if (pids[r] > 0 && waitpid(pids[r], &w->status[r], WNOHANG) == pids[r]) {
        pids[r] = 0;
        left--;
      }
    }
    if (left == 0 || zn_testkit_now_ms() > deadline) break;
    zn_testkit_sleep_ms(5);
  }
  for (int r = 0; r < present; r++) {
    if (pids[r] <= 0) continue;
    kill(pids[r], SIGKILL);
    waitpid(pids[r], &w->status[r], 0);
    w->killed[r] = 1;
  }
}

/* Counts the ranks that did not exit with 0 and says on stderr how each one ended. */
static int count_failures(const zn_testkit_world* w, int present, int deadline_ms) {
  int failed = 0;
  for (int r = 0; r < present; r++) {
    int st = w->status[r];
    if (w->killed[r]) {
      fprintf(stderr, "testkit: rank %d was still running after %d ms; killed\n", r, deadline_ms);
    } else if (WIFSIGNALED(st)) {
      fprintf(stderr, "testkit: rank %d died of signal %d\n", r, WTERMSIG(st));
    } else if (!WIFEXITED(st) || WEXITSTATUS(st) != 0) {
      fprintf(stderr, "testkit: rank %d exited with %d\n", r, WEXITSTATUS(st));
    } else {
      continue;
    }
    failed++;
  }
  return failed;
}

int zn_testkit_run(zn_testkit_world* w, zn_testkit_rank_fn fn, void* arg) {
  memset(w->dir, 0, sizeof(w->dir));
  memset(w->status, 0, sizeof(w->status));
  memset(w->killed, 0, sizeof(w->killed));
  int present = w->present > 0 ? w->present : w->size;
  if (w->size < 1 || w->size > ZN_TESTKIT_MAX_RANKS || present > w->size) {
    fprintf(stderr, "testkit: %d of %d ranks is not a world it can run\n", present, w->size);
    return -1;
  }
  snprintf(w->dir, sizeof(w->dir), "/tmp/zn-comm-test-XXXXXX");
  if (!mkdtemp(w->dir)) {
    fprintf(stderr, "testkit: mkdtemp: %s\n", strerror(errno));
    w->dir[0] = '\0';
    return -1;
  }

  int deadline_ms = w->deadline_ms > 0 ? w->deadline_ms : DEFAULT_DEADLINE_MS;
  double deadline = zn_testkit_now_ms() + deadline_ms;
  pid_t pids[ZN_TESTKIT_MAX_RANKS] = {0};
  fflush(stdout);
  fflush(stderr);
  for (int r = 0; r < present; r++) {
    pids[r] = fork();
    if (pids[r] == 0) exit(rank_main(w, r, fn, arg));
    if (pids[r] < 0) {
      fprintf(stderr, "testkit: fork of rank %d: %s\n", r, strerror(errno));
      reap(w, pids, r, 0); /* kills the ranks already started */
      return -1;
    }
  }
  reap(w, pids, present, deadline);
  return count_failures(w, present, deadline_ms);
}

void zn_testkit_cleanup(zn_testkit_world* w) {
  if (!w->dir[0]) return;
  DIR* d = opendir(w->dir);
  if (d) {
    struct dirent* e;
    while ((e = readdir(d)) != NULL) {
      if (strcmp(e->d_name, ".") == 0 || strcmp(e->d_name, "..") == 0) continue;
      char path[512];
      snprintf(path, sizeof(path), "%s/%s", w->dir, e->d_name);
      unlink(path);
    }
    closedir(d);
  }
  rmdir(w->dir);
  w->dir[0] = '\0';
}
