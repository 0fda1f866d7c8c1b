/* Opens the worker's channel to the coordinator. TLS needs --tls-ca, the CA
 * the coordinator's certificate is checked against; a client certificate is
 * added for coordinators that require one (mutual TLS). Plain text must be
 * asked for with --insecure, so that a forgotten flag never sends a cluster's
 * traffic in the clear. Files are checked here so that a wrong one stops the
 * start instead of failing every registration. */
#include "worker_channel.h"

#include <stdlib.h>

#include "zn_err.h"
#include "zn_log.h"
#include "zn_secret.h"

static int check_mode(const worker_config* cfg) {
  if (!cfg->tls_ca && !cfg->insecure) {
    ZN_ERROR(
        "the worker will not talk plain text unless asked: give --tls-ca FILE to verify the "
        "coordinator over TLS, or --insecure");
    return ZN_ERR_INVALID;
  }
  if (cfg->tls_ca && cfg->insecure) {
    ZN_ERROR("--insecure contradicts --tls-ca: give one or the other");
    return ZN_ERR_INVALID;
  }
  if (!cfg->tls_cert != !cfg->tls_key) {
    ZN_ERROR("--tls-cert and --tls-key go together: give both or neither");
    return ZN_ERR_INVALID;
  }
  if (cfg->tls_cert && !cfg->tls_ca) {
    ZN_ERROR("--tls-cert needs TLS: give --tls-ca too");
    return ZN_ERR_INVALID;
  }
  return ZN_OK;
}

typedef struct {
  char* ca;
  char* cert;
  char* key;
} pem_files;

static int read_pems(const worker_config* cfg, pem_files* p) {
  char err[512];
  int rc = zn_secret_read_pem("--tls-ca", cfg->tls_ca, ZN_PEM_CERTS, &p->ca, err, sizeof err);
  if (rc == ZN_OK && cfg->tls_cert)
    rc = zn_secret_read_pem("--tls-cert", cfg->tls_cert, ZN_PEM_CERTS, &p->cert, err, sizeof err);
  if (rc == ZN_OK && cfg->tls_key)
    rc = zn_secret_read_pem("--tls-key", cfg->tls_key, ZN_PEM_KEY, &p->key, err, sizeof err);
  if (rc != ZN_OK) {
    ZN_ERROR("%s", err);
    return rc;
  }
  if (p->cert && zn_secret_check_pair(p->cert, p->key) != ZN_OK) {
    ZN_ERROR("--tls-key %s is not the key of the certificate in --tls-cert %s", cfg->tls_key,
             cfg->tls_cert);
    return ZN_ERR_INVALID;
  }
  return ZN_OK;
}

zn_rpc_channel* worker_open_channel(const worker_config* cfg) {
  if (check_mode(cfg) != ZN_OK) return NULL;
  if (cfg->insecure) {
    if (!zn_addr_is_loopback(cfg->coordinator))
      ZN_WARN("--insecure: talking plain text to %s, off this machine", cfg->coordinator);
    return zn_rpc_channel_open(cfg->coordinator, 1);
  }

  pem_files pems = {0};
  zn_rpc_channel* ch = NULL;
  if (read_pems(cfg, &pems) == ZN_OK) {
    zn_rpc_client_opts opts = {
        .tls = 1, .ca = pems.ca, .client_cert = pems.cert, .client_key = pems.key};
    ch = zn_rpc_channel_open_with(cfg->coordinator, 1, &opts);
    ZN_INFO("TLS to %s%s", cfg->coordinator, pems.cert ? ", with a client certificate" : "");
  }
  zn_secret_free(pems.ca);
  zn_secret_free(pems.cert);
  zn_secret_free(pems.key);
  return ch;
}
