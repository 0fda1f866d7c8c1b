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
  /* Serves grpc.health.v1.Health there (plain text) when set; SERVING while registered with a
   * reachable coordinator and not draining. */
  const char* health_listen;
  const char* health_port_file; /* if set, its bound port is written there (for port 0) */

  /* How the worker reaches the coordinator: TLS verified against tls_ca
   * (PEM file), with tls_cert and tls_key as its client certificate for
   * mutual TLS; or plain text, which needs insecure. */
  const char* tls_ca;
  const char* tls_cert;
  const char* tls_key;
  int insecure;
} worker_config;

/* Runs until SIGINT or SIGTERM; returns the process exit code. */
int zn_worker_run(const worker_config* cfg);

#endif
