/* Reading the files that secure Zenith's connections: PEM certificates and
 * keys for TLS, and the bearer token of the user-facing API. Each reader
 * checks what it read, so that a wrong file stops a daemon at start with the
 * flag and the file named, rather than failing every handshake later. */
#ifndef ZN_SECRET_H
#define ZN_SECRET_H

#include <stddef.h>

typedef enum { ZN_PEM_CERTS, ZN_PEM_KEY } zn_pem_kind;

/* Reads PEM text that must hold at least one certificate, or a private key.
 * On failure err says "FLAG FILE: why"; *out is malloc'd. */
int zn_secret_read_pem(const char* flag, const char* path, zn_pem_kind kind, char** out, char* err,
                       size_t errlen);
/* 0 when the private key belongs to the first certificate of the chain. */
int zn_secret_check_pair(const char* cert_pem, const char* key_pem);
/* The token is the file's text less trailing whitespace; an empty one is an
 * error. The text is never copied into err. */
int zn_secret_read_token(const char* flag, const char* path, char** out, char* err, size_t errlen);
/* Overwrites and frees a secret (NULL is fine). */
void zn_secret_free(char* secret);
/* 1 when host:port names this machine's loopback (127.0.0.0/8, ::1, localhost). */
int zn_addr_is_loopback(const char* addr);

#endif
