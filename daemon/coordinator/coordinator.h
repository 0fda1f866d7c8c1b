/* The coordinator daemon (`zenithd coordinator`): the gRPC API for users and
 * workers, the job store, the scheduler and the rendezvous. */
#ifndef ZN_COORDINATOR_H
#define ZN_COORDINATOR_H

typedef struct {
  const char* listen;         /* host:port to serve on */
  const char* state_dir;      /* holds zenith.db */
  const char* port_file;      /* if set, the bound port is written there (for port 0) */
  int heartbeat_ms;           /* how often workers are asked to send a heartbeat */
  int worker_timeout_ms;      /* a worker silent this long is lost */
  const char* checkpoint_dir; /* workers write checkpoints to DIR/<job>; NULL: STATE/checkpoints */

  /* The Prometheus endpoint (GET /metrics), served when metrics_listen is set. */
  const char* metrics_listen;    /* host:port, or :port for every interface */
  const char* metrics_port_file; /* if set, its bound port is written there (for port 0) */

  /* TLS on the gRPC listener: PEM files. Without tls_cert the listener is
   * plain text, which zenithd allows only with --insecure. */
  const char* tls_cert;
  const char* tls_key;
  const char* tls_client_ca; /* set: workers and clients need a certificate it signed */
  int insecure;              /* plain text was asked for */
  const char* token_file;    /* set: the zenith.v1.Zenith service needs this bearer token */

  /* A plain-text listener that serves only grpc.health.v1.Health, for probes that cannot do TLS
   * (Kubernetes' gRPC probes); off when NULL. The main listener serves the health service too. */
  const char* health_listen;
  const char* health_port_file; /* if set, its bound port is written there (for port 0) */
} coord_config;

/* Serves until SIGINT or SIGTERM; returns the process exit code. */
int zn_coordinator_run(const coord_config* cfg);

#endif
