/* Builds the coordinator's listener from its security flags; see
 * coord_listen.h. Every file is read and checked before the port is bound,
 * so a bad flag stops the start with a message instead of leaving a listener
 * that fails each handshake. The token is read here, handed to the RPC layer
 * (which keeps only its digest) and wiped; it is never logged. */
#include "coord_listen.h"

#include <stdio.h>
#include <stdlib.h>

#include "zn_err.h"
#include "zn_log.h"
#include "zn_secret.h"

/* The paths of the user-facing service, which the token guards. The Workers
 * service is for daemons, which mutual TLS authenticates instead. */
#define USER_API_PREFIX "/zenith.v1.Zenith/"

typedef struct {
  char* cert;
  char* key;
  char* client_ca;
} pem_files;

static void free_pems(pem_files* p) {
  zn_secret_free(p->cert);
  zn_secret_free(p->key);
  zn_secret_free(p->client_ca);
}

int coord_listen_check(const coord_config* cfg) {
  if (!cfg->tls_cert != !cfg->tls_key) {
    ZN_ERROR("--tls-cert and --tls-key go together: give both, or neither with --insecure");
    return ZN_ERR_INVALID;
  }
  if (cfg->tls_client_ca && !cfg->tls_cert) {
    ZN_ERROR("--tls-client-ca needs TLS on the listener: give --tls-cert and --tls-key too");
    return ZN_ERR_INVALID;
  }
  if (!cfg->tls_cert && !cfg->insecure) {
    ZN_ERROR(
        "the coordinator will not serve plain text unless asked: give --tls-cert and "
        "--tls-key, or --insecure");
    return ZN_ERR_INVALID;
  }
  if (cfg->tls_cert && cfg->insecure) {
    ZN_ERROR("--insecure contradicts --tls-cert: give one or the other");
    return ZN_ERR_INVALID;
  }
  return ZN_OK;
}

static int read_pems(const coord_config* cfg, pem_files* p) {
  char err[512];
  int rc = zn_secret_read_pem("--tls-cert", cfg->tls_cert, ZN_PEM_CERTS, &p->cert, err, sizeof err);
  if (rc == ZN_OK)
    rc = zn_secret_read_pem("--tls-key", cfg->tls_key, ZN_PEM_KEY, &p->key, err, sizeof err);
  if (rc == ZN_OK && cfg->tls_client_ca)
    rc = zn_secret_read_pem("--tls-client-ca", cfg->tls_client_ca, ZN_PEM_CERTS, &p->client_ca, err,
                            sizeof err);
  if (rc != ZN_OK) {
    ZN_ERROR("%s", err);
    return rc;
  }
  if (zn_secret_check_pair(p->cert, p->key) != ZN_OK) {
    ZN_ERROR("--tls-key %s is not the key of the certificate in --tls-cert %s", cfg->tls_key,
             cfg->tls_cert);
    return ZN_ERR_INVALID;
  }
  return ZN_OK;
}

static int create_server(const coord_config* cfg, const pem_files* p, zn_rpc_server** out,
                         int* bound_port) {
  zn_rpc_server_tls tls = {p->cert, p->key, p->client_ca};
  char err[512];
  int rc = zn_rpc_server_create_secure(cfg->listen, cfg->tls_cert ? &tls : NULL, out, bound_port,
                                       err, sizeof err);
  if (rc != ZN_OK) ZN_ERROR("%s", err);
  return rc;
}

static int require_token(const coord_config* cfg, zn_rpc_server* s) {
  char err[512];
  char* token = NULL;
  int rc = zn_secret_read_token("--token-file", cfg->token_file, &token, err, sizeof err);
  if (rc != ZN_OK) {
    ZN_ERROR("%s", err);
    return rc;
  }
  rc = zn_rpc_server_set_auth(s, USER_API_PREFIX, token);
  zn_secret_free(token);
  if (rc != ZN_OK) ZN_ERROR("--token-file %s: the token could not be installed", cfg->token_file);
  return rc;
}

static void log_protection(const coord_config* cfg) {
  if (cfg->insecure && !zn_addr_is_loopback(cfg->listen))
    ZN_WARN(
        "--insecure on %s: the gRPC API is plain text on a non-loopback address; anyone on "
        "the network can read and forge its calls",
        cfg->listen);
  ZN_INFO("gRPC listener: %s%s; user API %s", cfg->tls_cert ? "TLS" : "plain text (--insecure)",
          cfg->tls_client_ca ? ", client certificates required" : "",
          cfg->token_file ? "needs a bearer token" : "open to every client");
}

int coord_listen(const coord_config* cfg, zn_rpc_server** out, int* bound_port) {
  int rc = coord_listen_check(cfg);
  if (rc != ZN_OK) return rc;

  pem_files pems = {0};
  if (cfg->tls_cert) rc = read_pems(cfg, &pems);
  if (rc == ZN_OK) rc = create_server(cfg, &pems, out, bound_port);
  free_pems(&pems);
  if (rc != ZN_OK) return rc;

  if (cfg->token_file) rc = require_token(cfg, *out);
  if (rc != ZN_OK) {
    zn_rpc_server_destroy(*out);
    *out = NULL;
    return rc;
  }
  log_protection(cfg);
  return ZN_OK;
}
