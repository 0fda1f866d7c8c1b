/* The NCCL id exchange against the real key-value service: a coordinator
 * (zenithd) on loopback, and forked ranks that reach it through the worker's
 * RPC adapter, exactly as workers do. Rank 0 makes the id with
 * ncclGetUniqueId where NCCL is built in (no GPU needed for that), else from
 * /dev/urandom; every rank must end with rank 0's 128 bytes. */
#include <setjmp.h>
#include <signal.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <cmocka.h>

#ifdef ZN_HAVE_NCCL
#include "zn_comm_nccl.h"
#endif

#include "worker_kv.h"
#include "zn_nccl_id.h"

static pid_t coordinator;
static char address[64];
static char state_dir[] = "/tmp/zn-nccl-id-XXXXXX";

static int make_id(uint8_t id[ZN_NCCL_ID_BYTES], char* err, size_t errlen) {
#ifdef ZN_HAVE_NCCL
  return zn_nccl_unique_id(id, err, errlen);
#else
  FILE* f = fopen("/dev/urandom", "rb");
  size_t got = f ? fread(id, 1, ZN_NCCL_ID_BYTES, f) : 0;
  if (f) fclose(f);
  if (got == ZN_NCCL_ID_BYTES) return ZN_OK;
  snprintf(err, errlen, "could not read /dev/urandom");
  return ZN_ERR_IO;
#endif
}

static int start_coordinator(void** state) {
  if (!mkdtemp(state_dir)) return -1;
  char port_file[128];
  snprintf(port_file, sizeof port_file, "%s/port", state_dir);
  coordinator = fork();
  if (coordinator == 0) {
    execl(ZN_ZENITHD, ZN_ZENITHD, "coordinator", "--listen", "127.0.0.1:0", "--state", state_dir,
          "--port-file", port_file, "--log-level", "warn", "--insecure", (char*)NULL);
    _exit(127);
  }
  for (int i = 0; i < 200; i++) {
    FILE* f = fopen(port_file, "r");
    int port = 0;
    if (f && fscanf(f, "%d", &port) == 1 && port > 0) {
      fclose(f);
      snprintf(address, sizeof address, "127.0.0.1:%d", port);
      return 0;
    }
    if (f) fclose(f);
    nanosleep(&(struct timespec){0, 50 * 1000 * 1000}, NULL);
  }
  return -1;
}

static int stop_coordinator(void** state) {
  kill(coordinator, SIGTERM);
  waitpid(coordinator, NULL, 0);
  char cmd[128];
  snprintf(cmd, sizeof cmd, "rm -rf %s", state_dir);
  return system(cmd) == 0 ? 0 : -1;
}

/* One rank in a child process: exchange, then write the id (or nothing) to fd. */
static void run_rank(const char* prefix, int rank, int timeout_ms, int fd) {
  zn_rpc_channel* ch = zn_rpc_channel_open(address, 1);
  worker_kv_ctx ctx = {ch, NULL};
  zn_kv kv = worker_kv(&ctx);
  uint8_t id[ZN_NCCL_ID_BYTES];
  char err[512] = "";
  int rc = zn_nccl_exchange_id(&kv, prefix, rank, timeout_ms, make_id, id, err, sizeof err);
  if (rc == ZN_OK) {
    if (write(fd, id, sizeof id) != (ssize_t)sizeof id) _exit(3);
  } else {
    if (write(fd, err, strlen(err)) < 0) _exit(3);
  }
  zn_rpc_channel_close(ch);
  _exit(rc == ZN_OK ? 0 : 1);
}

/* Runs ranks [first, last) of one exchange; reads what each wrote. */
static void run_ranks(const char* prefix, int first, int last, int timeout_ms, char out[][600],
                      int* codes) {
  pid_t pids[8];
  int fds[8];
  for (int r = first; r < last; r++) {
    int p[2];
    assert_int_equal(pipe(p), 0);
    pids[r] = fork();
    if (pids[r] == 0) {
      close(p[0]);
      run_rank(prefix, r, timeout_ms, p[1]);
    }
    close(p[1]);
    fds[r] = p[0];
  }
  for (int r = first; r < last; r++) {
    memset(out[r], 0, 600);
    ssize_t total = 0, n;
    while ((n = read(fds[r], out[r] + total, 599 - (size_t)total)) > 0) total += n;
    close(fds[r]);
    int status;
    waitpid(pids[r], &status, 0);
    codes[r] = WIFEXITED(status) ? WEXITSTATUS(status) : 99;
  }
}

static void every_rank_gets_rank_zeros_id(void** state) {
  char out[4][600];
  int codes[4];
  run_ranks("job-a/1", 0, 4, 10000, out, codes);
  for (int r = 0; r < 4; r++) {
    if (codes[r] != 0) fail_msg("rank %d failed: %s", r, out[r]);
  }
  uint8_t zero[ZN_NCCL_ID_BYTES] = {0};
  assert_memory_not_equal(out[0], zero, ZN_NCCL_ID_BYTES);
  for (int r = 1; r < 4; r++) assert_memory_equal(out[r], out[0], ZN_NCCL_ID_BYTES);
}

static void missing_rank_zero_times_out_naming_the_key(void** state) {
  char out[4][600];
  int codes[4];
  run_ranks("job-b/1", 1, 2, 500, out, codes);
  assert_int_equal(codes[1], 1);
  if (!strstr(out[1], "job-b/1/nccl-id") || !strstr(out[1], "500 ms"))
    fail_msg("error does not name the key and the timeout: %s", out[1]);
}

/* gRPC must not be started in this process before it forks the ranks, so
 * the bad value is written from a child too. */
static void malformed_id_is_refused_with_its_size(void** state) {
  pid_t writer = fork();
  if (writer == 0) {
    zn_rpc_channel* ch = zn_rpc_channel_open(address, 1);
    worker_kv_ctx ctx = {ch, NULL};
    zn_kv kv = worker_kv(&ctx);
    _exit(kv.set(kv.ctx, "job-c/1/nccl-id", "short", 5) == ZN_OK ? 0 : 1);
  }
  int status;
  waitpid(writer, &status, 0);
  assert_true(WIFEXITED(status) && WEXITSTATUS(status) == 0);
  char out[4][600];
  int codes[4];
  run_ranks("job-c/1", 1, 2, 2000, out, codes);
  assert_int_equal(codes[1], 1);
  if (!strstr(out[1], "holds 5 bytes")) fail_msg("error does not give the size: %s", out[1]);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(every_rank_gets_rank_zeros_id),
      cmocka_unit_test(missing_rank_zero_times_out_naming_the_key),
      cmocka_unit_test(malformed_id_is_refused_with_its_size),
  };
  return cmocka_run_group_tests(tests, start_coordinator, stop_coordinator);
}
