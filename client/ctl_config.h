/* Where zenithctl finds its coordinator and how it reaches it: the address,
 * the bearer token, the CA and whether plain text is wanted. Each comes from
 * a flag, else the environment, else the config file, else a default, and
 * each remembers which, for `zenithctl -v`. */
#ifndef ZN_CTL_CONFIG_H
#define ZN_CTL_CONFIG_H

#include "zn_rpc.h"

typedef struct {
  const char* value; /* NULL: not given anywhere */
  char source[600];  /* "--token", "ZENITH_TOKEN", "config file PATH", "default" */
} ctl_setting;

typedef struct {
  ctl_setting coordinator, token, ca, insecure;
  ctl_setting cert, key; /* a client certificate, for a coordinator with mTLS and no token */
  char* storage[8];      /* the strings read from the config file */
  int stored;
  char* ca_pem;
  char* cert_pem;
  char* key_pem;
  zn_rpc_client_opts rpc; /* ready for zn_rpc_channel_open_with */
  char transport[1400];   /* how and why, for -v */
} ctl_config;

/* The flags' values (NULL: not given) go in first; then the environment and
 * the config file fill what is left. Returns 0, or 2 after printing why (a
 * bad config line is named as FILE:LINE). */
typedef struct {
  const char* coordinator;
  const char* token;
  const char* ca;
  const char* cert;
  const char* key;
  int insecure;
} ctl_flags;

int ctl_config_resolve(ctl_config* c, const ctl_flags* flags);
/* Prints each setting's source to stderr; never the token itself. */
void ctl_config_describe(const ctl_config* c);
void ctl_config_free(ctl_config* c);

#endif
