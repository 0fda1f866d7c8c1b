/* The worker daemon (`zenithd worker`): registers with the coordinator, sends
 * heartbeats, and runs the jobs it is assigned on a trainer thread. */
#ifndef ZN_WORKER_H
#define ZN_WORKER_H

typedef struct {
  const char* coordinator; /* host:port */
  const char* name;        /* unique among the cluster's workers */
  const char* host;        /* address the collectives listen on */
  int threads;             /* compute threads, unless a job spec sets them */
  int device;              /* CUDA device index asked for (--device cuda:N), or -1: the CPU */
} worker_config;

/* Runs until SIGINT or SIGTERM; returns the process exit code. */
int zn_worker_run(const worker_config* cfg);

#endif
