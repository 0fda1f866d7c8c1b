/* zenithctl's settings, see ctl_config.h. The config file is `key = value`
 * lines (coordinator, token, ca, insecure, cert, key), with blank lines and # comments
 * allowed; $ZENITH_CONFIG names it, else ~/.config/zenith/config, which may be
 * absent. Without --insecure or a CA, plain text is used only for a loopback
 * coordinator: traffic that never leaves the machine gains nothing from TLS,
 * and anything else is verified against the system's trusted roots. */
#include "ctl_config.h"

#include <ctype.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "zn_secret.h"

#define DEFAULT_COORDINATOR "127.0.0.1:7070"

static void set(ctl_setting* s, const char* value, const char* source) {
  if (s->value || !value) return;
  s->value = value;
  snprintf(s->source, sizeof s->source, "%s", source);
}

static void set_env(ctl_setting* s, const char* name) {
  const char* v = getenv(name);
  if (v && v[0]) set(s, v, name);
}

static char* trim(char* text) {
  while (isspace((unsigned char)*text)) text++;
  size_t len = strlen(text);
  while (len > 0 && isspace((unsigned char)text[len - 1])) text[--len] = '\0';
  return text;
}

static ctl_setting* setting_named(ctl_config* c, const char* key) {
  if (strcmp(key, "coordinator") == 0) return &c->coordinator;
  if (strcmp(key, "token") == 0) return &c->token;
  if (strcmp(key, "ca") == 0) return &c->ca;
  if (strcmp(key, "insecure") == 0) return &c->insecure;
  if (strcmp(key, "cert") == 0) return &c->cert;
  if (strcmp(key, "key") == 0) return &c->key;
  return NULL;
}

/* One line of the config file; 0, or 2 after naming the file and line. */
static int apply_line(ctl_config* c, const char* path, int number, char* line) {
  char* text = trim(line);
  if (text[0] == '\0' || text[0] == '#') return 0;
  char* eq = strchr(text, '=');
  if (!eq) {
    fprintf(stderr, "zenithctl: %s:%d: expected `key = value`, got '%s'\n", path, number, text);
    return 2;
  }
  *eq = '\0';
  char* key = trim(text);
  char* value = trim(eq + 1);
  ctl_setting* s = setting_named(c, key);
  if (!s) {
    fprintf(stderr,
            "zenithctl: %s:%d: unknown key '%s' (coordinator, token, ca, insecure, cert or key)\n",
            path, number, key);
    return 2;
  }
  if (value[0] == '\0') {
    fprintf(stderr, "zenithctl: %s:%d: '%s' has no value\n", path, number, key);
    return 2;
  }
  if (s->value || c->stored == (int)(sizeof c->storage / sizeof c->storage[0])) return 0;
  char* copy = strdup(value);
  c->storage[c->stored++] = copy;
  char source[600];
  snprintf(source, sizeof source, "config file %s", path);
  set(s, copy, source);
  return 0;
}

static int read_config_file(ctl_config* c) {
  const char* path = getenv("ZENITH_CONFIG");
  int named = path && path[0];
  char fallback[512];
  if (!named) {
    const char* home = getenv("HOME");
    if (!home) return 0;
    snprintf(fallback, sizeof fallback, "%s/.config/zenith/config", home);
    path = fallback;
  }
  FILE* f = fopen(path, "r");
  if (!f) {
    if (!named && errno == ENOENT) return 0;
    fprintf(stderr, "zenithctl: cannot read the config file %s: %s\n", path, strerror(errno));
    return 2;
  }
  char line[4096];
  int rc = 0;
  for (int number = 1; rc == 0 && fgets(line, sizeof line, f); number++)
    rc = apply_line(c, path, number, line);
  fclose(f);
  return rc;
}

/* "1", "true", "yes" are true; "0", "false", "no" false; -1 otherwise. */
static int parse_bool(const char* text) {
  if (!strcmp(text, "1") || !strcmp(text, "true") || !strcmp(text, "yes")) return 1;
  if (!strcmp(text, "0") || !strcmp(text, "false") || !strcmp(text, "no")) return 0;
  return -1;
}

static int read_one(const ctl_setting* s, const char* name, zn_pem_kind kind, char** out) {
  char err[700];
  if (zn_secret_read_pem(name, s->value, kind, out, err, sizeof err) == 0) return 0;
  fprintf(stderr, "zenithctl: %s (from %s)\n", err, s->source);
  return 2;
}

/* The optional client certificate, sent over TLS only. */
static int read_client_cert(ctl_config* c) {
  if (!c->cert.value && !c->key.value) return 0;
  if (!c->cert.value || !c->key.value) {
    fprintf(stderr, "zenithctl: cert and key go together (%s given alone)\n",
            c->cert.value ? "cert" : "key");
    return 2;
  }
  if (read_one(&c->cert, "cert", ZN_PEM_CERTS, &c->cert_pem) ||
      read_one(&c->key, "key", ZN_PEM_KEY, &c->key_pem))
    return 2;
  c->rpc.client_cert = c->cert_pem;
  c->rpc.client_key = c->key_pem;
  return 0;
}

static int choose_transport(ctl_config* c) {
  int insecure = c->insecure.value ? parse_bool(c->insecure.value) : 0;
  if (insecure < 0) {
    fprintf(stderr, "zenithctl: insecure (from %s) must be 1 or 0, true or false, got '%s'\n",
            c->insecure.source, c->insecure.value);
    return 2;
  }
  if (insecure && c->ca.value) {
    fprintf(stderr, "zenithctl: insecure (from %s) contradicts ca (from %s): give one\n",
            c->insecure.source, c->ca.source);
    return 2;
  }
  c->rpc.token = c->token.value;
  if (insecure) {
    snprintf(c->transport, sizeof c->transport, "plain text (insecure from %s)",
             c->insecure.source);
  } else if (c->ca.value) {
    if (read_one(&c->ca, "ca", ZN_PEM_CERTS, &c->ca_pem)) return 2;
    c->rpc.tls = 1;
    c->rpc.ca = c->ca_pem;
    snprintf(c->transport, sizeof c->transport, "TLS, verified against ca %s (from %s)",
             c->ca.value, c->ca.source);
    return read_client_cert(c);
  } else if (zn_addr_is_loopback(c->coordinator.value)) {
    snprintf(c->transport, sizeof c->transport, "plain text (a loopback coordinator, no ca given)");
  } else {
    c->rpc.tls = 1;
    snprintf(c->transport, sizeof c->transport, "TLS, verified against the system's roots");
    return read_client_cert(c);
  }
  return 0;
}

int ctl_config_resolve(ctl_config* c, const ctl_flags* flags) {
  memset(c, 0, sizeof *c);
  set(&c->coordinator, flags->coordinator, "--coordinator");
  set(&c->token, flags->token, "--token");
  set(&c->ca, flags->ca, "--ca");
  set(&c->cert, flags->cert, "--cert");
  set(&c->key, flags->key, "--key");
  set(&c->insecure, flags->insecure ? "1" : NULL, "--insecure");
  set_env(&c->coordinator, "ZENITH_COORDINATOR");
  set_env(&c->token, "ZENITH_TOKEN");
  set_env(&c->ca, "ZENITH_CA");
  set_env(&c->cert, "ZENITH_CERT");
  set_env(&c->key, "ZENITH_KEY");
  set_env(&c->insecure, "ZENITH_INSECURE");
  int rc = read_config_file(c);
  if (rc != 0) return rc;
  set(&c->coordinator, DEFAULT_COORDINATOR, "default");
  return choose_transport(c);
}

void ctl_config_describe(const ctl_config* c) {
  fprintf(stderr, "zenithctl: coordinator %s (from %s)\n", c->coordinator.value,
          c->coordinator.source);
  if (c->token.value)
    fprintf(stderr, "zenithctl: token from %s (%zu characters)\n", c->token.source,
            strlen(c->token.value));
  else
    fprintf(stderr, "zenithctl: no token\n");
  fprintf(stderr, "zenithctl: transport %s\n", c->transport);
  if (c->rpc.client_cert)
    fprintf(stderr, "zenithctl: client certificate %s (from %s)\n", c->cert.value, c->cert.source);
}

void ctl_config_free(ctl_config* c) {
  for (int i = 0; i < c->stored; i++) zn_secret_free(c->storage[i]);
  zn_secret_free(c->ca_pem);
  zn_secret_free(c->cert_pem);
  zn_secret_free(c->key_pem);
}
