/* zenithd: Zenith's daemon, in one of two roles.
 *
 *   zenithd coordinator [--listen ADDR] [--state DIR] ...
 *   zenithd worker [--coordinator ADDR] [--name NAME] [--threads N] [--device cpu|cuda:N] ...
 *
 * This file only reads flags and hands a config to the role's run function. */
#include <ctype.h>
#include <getopt.h>
#include <limits.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "coordinator.h"
#include "worker.h"
#include "zn_log.h"

static const char* usage_text =
    "usage: zenithd coordinator [flags]\n"
    "         --listen ADDR            address to serve the gRPC API on (127.0.0.1:7070)\n"
    "         --state DIR              folder for zenith.db, the jobs and their history "
    "(./zenith-state)\n"
    "         --heartbeat-ms N         how often workers send a heartbeat (500)\n"
    "         --worker-timeout-ms N    a worker silent this long is lost (5000)\n"
    "         --port-file FILE         write the bound port there (useful with port 0)\n"
    "         --checkpoint-dir DIR     where workers write checkpoints, DIR/<job id>; a folder\n"
    "                                  every worker reaches at the same path (STATE/checkpoints)\n"
    "         --metrics-listen ADDR    serve Prometheus metrics on http://ADDR/metrics (off)\n"
    "         --metrics-port-file FILE write the metrics port there (useful with port 0)\n"
    "         --tls-cert FILE          serve gRPC over TLS with this PEM certificate chain\n"
    "         --tls-key FILE           ... and this PEM private key\n"
    "         --tls-client-ca FILE     require client certificates signed by this CA (mTLS)\n"
    "         --token-file FILE        the zenith.v1.Zenith API needs this bearer token\n"
    "         --insecure               serve plain text (TLS or --insecure is required)\n"
    "       zenithd worker [flags]\n"
    "         --coordinator ADDR       the coordinator ($ZENITH_COORDINATOR, else 127.0.0.1:7070)\n"
    "         --name NAME              unique worker name (HOSTNAME-PID)\n"
    "         --host ADDR              address the collectives listen on (127.0.0.1)\n"
    "         --threads N              compute threads when a job does not set them (all cores)\n"
    "         --device cpu|cuda:N      train on the CPU, or on GPU N; a GPU that cannot be used\n"
    "                                  leaves the worker on the CPU, with a warning (cpu)\n"
    "         --tls-ca FILE            talk TLS, verifying the coordinator against this PEM CA\n"
    "         --tls-cert FILE          the worker's PEM client certificate (for mTLS)\n"
    "         --tls-key FILE           ... and its PEM private key\n"
    "         --insecure               talk plain text (--tls-ca or --insecure is required)\n"
    "       both: --health-listen ADDR     serve only the gRPC health service there, plain text\n"
    "                                  (for Kubernetes' gRPC probes; port 0 picks one) (off)\n"
    "             --health-port-file FILE write the health port there (useful with port 0)\n"
    "             --log-level debug|info|warn|error (info)\n";

static int parse_int(const char* flag, const char* text, int min, int* out) {
  char* end;
  long v = strtol(text, &end, 10);
  if (*text == '\0' || *end != '\0' || v < min || v > INT_MAX) {
    fprintf(stderr, "zenithd: %s expects a whole number >= %d, got '%s'\n", flag, min, text);
    return -1;
  }
  *out = (int)v;
  return 0;
}

enum {
  OPT_LISTEN = 1,
  OPT_STATE,
  OPT_HEARTBEAT,
  OPT_TIMEOUT,
  OPT_PORT_FILE,
  OPT_CHECKPOINT_DIR,
  OPT_METRICS_LISTEN,
  OPT_METRICS_PORT_FILE,
  OPT_TLS_CLIENT_CA,
  OPT_TOKEN_FILE,
  OPT_COORDINATOR,
  OPT_NAME,
  OPT_HOST,
  OPT_THREADS,
  OPT_DEVICE,
  OPT_TLS_CA,
  OPT_HEALTH_LISTEN,
  OPT_HEALTH_PORT_FILE,
  OPT_LOG_LEVEL,
  OPT_HELP,
  OPT_TLS_CERT, /* these three belong to both roles */
  OPT_TLS_KEY,
  OPT_INSECURE
};

static const struct option options[] = {
    {"listen", required_argument, 0, OPT_LISTEN},
    {"state", required_argument, 0, OPT_STATE},
    {"heartbeat-ms", required_argument, 0, OPT_HEARTBEAT},
    {"worker-timeout-ms", required_argument, 0, OPT_TIMEOUT},
    {"port-file", required_argument, 0, OPT_PORT_FILE},
    {"checkpoint-dir", required_argument, 0, OPT_CHECKPOINT_DIR},
    {"metrics-listen", required_argument, 0, OPT_METRICS_LISTEN},
    {"metrics-port-file", required_argument, 0, OPT_METRICS_PORT_FILE},
    {"tls-client-ca", required_argument, 0, OPT_TLS_CLIENT_CA},
    {"token-file", required_argument, 0, OPT_TOKEN_FILE},
    {"coordinator", required_argument, 0, OPT_COORDINATOR},
    {"name", required_argument, 0, OPT_NAME},
    {"host", required_argument, 0, OPT_HOST},
    {"threads", required_argument, 0, OPT_THREADS},
    {"device", required_argument, 0, OPT_DEVICE},
    {"tls-ca", required_argument, 0, OPT_TLS_CA},
    {"health-listen", required_argument, 0, OPT_HEALTH_LISTEN},
    {"health-port-file", required_argument, 0, OPT_HEALTH_PORT_FILE},
    {"log-level", required_argument, 0, OPT_LOG_LEVEL},
    {"help", no_argument, 0, OPT_HELP},
    {"tls-cert", required_argument, 0, OPT_TLS_CERT},
    {"tls-key", required_argument, 0, OPT_TLS_KEY},
    {"insecure", no_argument, 0, OPT_INSECURE},
    {0, 0, 0, 0}};

static int flag_fits_role(int opt, int is_coordinator) {
  if (opt == OPT_HEALTH_LISTEN || opt == OPT_HEALTH_PORT_FILE) return 1;
  if (opt == OPT_LOG_LEVEL || opt == OPT_HELP || opt >= OPT_TLS_CERT) return 1;
  return is_coordinator ? opt < OPT_COORDINATOR : opt >= OPT_COORDINATOR;
}

/* "cpu" is -1; "cuda:N" is N, the index of a GPU. */
static int parse_device(const char* text, int* out) {
  if (strcmp(text, "cpu") == 0) {
    *out = -1;
    return 0;
  }
  long index = -1;
  char* end = NULL;
  if (strncmp(text, "cuda:", 5) == 0 && isdigit((unsigned char)text[5]))
    index = strtol(text + 5, &end, 10);
  if (index < 0 || *end != '\0' || index > INT_MAX) {
    fprintf(stderr, "zenithd: --device expects cpu or cuda:N (N a GPU index, from 0), got '%s'\n",
            text);
    return -1;
  }
  *out = (int)index;
  return 0;
}

/* Stores one parsed flag; -1 (after saying why) when its value is bad. */
static int apply_flag(int opt, char* value, coord_config* cc, worker_config* wc) {
  switch (opt) {
    case OPT_LISTEN:
      cc->listen = value;
      return 0;
    case OPT_STATE:
      cc->state_dir = value;
      return 0;
    case OPT_PORT_FILE:
      cc->port_file = value;
      return 0;
    case OPT_CHECKPOINT_DIR:
      cc->checkpoint_dir = value;
      return 0;
    case OPT_METRICS_LISTEN:
      cc->metrics_listen = value;
      return 0;
    case OPT_METRICS_PORT_FILE:
      cc->metrics_port_file = value;
      return 0;
    case OPT_COORDINATOR:
      wc->coordinator = value;
      return 0;
    case OPT_NAME:
      wc->name = value;
      return 0;
    case OPT_HOST:
      wc->host = value;
      return 0;
    case OPT_HEALTH_LISTEN:
      cc->health_listen = wc->health_listen = value;
      return 0;
    case OPT_HEALTH_PORT_FILE:
      cc->health_port_file = wc->health_port_file = value;
      return 0;
    case OPT_TLS_CLIENT_CA:
      cc->tls_client_ca = value;
      return 0;
    case OPT_TOKEN_FILE:
      cc->token_file = value;
      return 0;
    case OPT_TLS_CA:
      wc->tls_ca = value;
      return 0;
    case OPT_TLS_CERT:
      cc->tls_cert = wc->tls_cert = value;
      return 0;
    case OPT_TLS_KEY:
      cc->tls_key = wc->tls_key = value;
      return 0;
    case OPT_INSECURE:
      cc->insecure = wc->insecure = 1;
      return 0;
    case OPT_HEARTBEAT:
      return parse_int("--heartbeat-ms", value, 10, &cc->heartbeat_ms);
    case OPT_TIMEOUT:
      return parse_int("--worker-timeout-ms", value, 100, &cc->worker_timeout_ms);
    case OPT_THREADS:
      return parse_int("--threads", value, 1, &wc->threads);
    case OPT_DEVICE:
      return parse_device(value, &wc->device);
    case OPT_LOG_LEVEL:
      if (zn_log_set_level_name(value) == 0) return 0;
      fprintf(stderr, "zenithd: --log-level expects debug, info, warn or error, got '%s'\n", value);
      return -1;
  }
  return -1;
}

int main(int argc, char** argv) {
  if (argc < 2 || (strcmp(argv[1], "coordinator") != 0 && strcmp(argv[1], "worker") != 0)) {
    fputs(usage_text, stderr);
    return 2;
  }
  int is_coordinator = strcmp(argv[1], "coordinator") == 0;
  coord_config cc = {.listen = "127.0.0.1:7070",
                     .state_dir = "zenith-state",
                     .heartbeat_ms = 500,
                     .worker_timeout_ms = 5000};
  char default_name[128];
  char host[64] = "localhost";
  gethostname(host, sizeof host);
  snprintf(default_name, sizeof default_name, "%s-%d", host, (int)getpid());
  long cores = sysconf(_SC_NPROCESSORS_ONLN);
  const char* env_coordinator = getenv("ZENITH_COORDINATOR");
  worker_config wc = {
      .coordinator = env_coordinator && env_coordinator[0] ? env_coordinator : "127.0.0.1:7070",
      .name = default_name,
      .host = "127.0.0.1",
      .threads = cores > 0 ? (int)cores : 1,
      .device = -1};

  optind = 2;
  int opt;
  while ((opt = getopt_long(argc, argv, "", options, NULL)) != -1) {
    if (opt == '?') {
      fputs(usage_text, stderr);
      return 2;
    }
    if (!flag_fits_role(opt, is_coordinator)) {
      fprintf(stderr, "zenithd: --%s is not a flag of `zenithd %s`\n%s", options[opt - 1].name,
              argv[1], usage_text);
      return 2;
    }
    if (opt == OPT_HELP) {
      fputs(usage_text, stdout);
      return 0;
    }
    if (apply_flag(opt, optarg, &cc, &wc) != 0) return 2;
  }
  if (optind < argc) {
    fprintf(stderr, "zenithd: unexpected argument '%s'\n%s", argv[optind], usage_text);
    return 2;
  }
  size_t name_len = strlen(wc.name);
  if (!is_coordinator && (name_len == 0 || name_len > 127)) {
    fprintf(stderr, "zenithd: --name must be 1 to 127 characters (got %zu)\n", name_len);
    return 2;
  }
  if (is_coordinator && (long long)cc.worker_timeout_ms <= 2LL * cc.heartbeat_ms) {
    fprintf(stderr,
            "zenithd: --worker-timeout-ms (%d) must be more than twice --heartbeat-ms (%d)\n",
            cc.worker_timeout_ms, cc.heartbeat_ms);
    return 2;
  }

  /* A peer that dies mid-write must fail the collective, not kill the daemon. */
  signal(SIGPIPE, SIG_IGN);
  zn_log_set_role(argv[1]);
  return is_coordinator ? zn_coordinator_run(&cc) : zn_worker_run(&wc);
}
