/* The readers of zn_secret.h. OpenSSL parses the PEM text here only to check
 * it; gRPC parses it again when it builds its credentials. */
#include "zn_secret.h"

#include <ctype.h>
#include <errno.h>
#include <openssl/bio.h>
#include <openssl/crypto.h>
#include <openssl/pem.h>
#include <openssl/x509.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "zn_err.h"

/* Secrets and certificates are small; a larger file is a wrong path. */
#define MAX_SECRET_BYTES (1 << 20)

static int read_all(const char* flag, const char* path, char** out, size_t* len, char* err,
                    size_t errlen) {
  FILE* f = fopen(path, "rb");
  if (!f) {
    snprintf(err, errlen, "%s %s: cannot read it: %s", flag, path, strerror(errno));
    return ZN_ERR_IO;
  }
  char* buf = malloc(MAX_SECRET_BYTES + 1);
  size_t n = buf ? fread(buf, 1, MAX_SECRET_BYTES + 1, f) : 0;
  int failed = !buf || ferror(f);
  fclose(f);
  if (failed || n > MAX_SECRET_BYTES) {
    snprintf(err, errlen, "%s %s: cannot read it: %s", flag, path,
             failed ? "read error" : "larger than 1 MiB");
    zn_secret_free(buf);
    return ZN_ERR_IO;
  }
  buf[n] = '\0';
  *out = buf;
  *len = n;
  return ZN_OK;
}

static int pem_holds(const char* text, size_t len, zn_pem_kind kind) {
  BIO* bio = BIO_new_mem_buf(text, (int)len);
  if (!bio) return 0;
  int ok = 0;
  if (kind == ZN_PEM_CERTS) {
    X509* cert = PEM_read_bio_X509(bio, NULL, NULL, NULL);
    ok = cert != NULL;
    X509_free(cert);
  } else {
    EVP_PKEY* key = PEM_read_bio_PrivateKey(bio, NULL, NULL, NULL);
    ok = key != NULL;
    EVP_PKEY_free(key);
  }
  BIO_free(bio);
  return ok;
}

int zn_secret_read_pem(const char* flag, const char* path, zn_pem_kind kind, char** out, char* err,
                       size_t errlen) {
  char* text = NULL;
  size_t len = 0;
  int rc = read_all(flag, path, &text, &len, err, errlen);
  if (rc != ZN_OK) return rc;
  if (!pem_holds(text, len, kind)) {
    snprintf(err, errlen, "%s %s: not a PEM %s", flag, path,
             kind == ZN_PEM_CERTS ? "certificate" : "private key (or it is encrypted)");
    zn_secret_free(text);
    return ZN_ERR_INVALID;
  }
  *out = text;
  return ZN_OK;
}

int zn_secret_check_pair(const char* cert_pem, const char* key_pem) {
  BIO* cert_bio = BIO_new_mem_buf(cert_pem, -1);
  BIO* key_bio = BIO_new_mem_buf(key_pem, -1);
  X509* cert = cert_bio ? PEM_read_bio_X509(cert_bio, NULL, NULL, NULL) : NULL;
  EVP_PKEY* key = key_bio ? PEM_read_bio_PrivateKey(key_bio, NULL, NULL, NULL) : NULL;
  int match = cert && key && X509_check_private_key(cert, key) == 1;
  X509_free(cert);
  EVP_PKEY_free(key);
  BIO_free(cert_bio);
  BIO_free(key_bio);
  return match ? ZN_OK : ZN_ERR_INVALID;
}

int zn_secret_read_token(const char* flag, const char* path, char** out, char* err, size_t errlen) {
  char* text = NULL;
  size_t len = 0;
  int rc = read_all(flag, path, &text, &len, err, errlen);
  if (rc != ZN_OK) return rc;
  while (len > 0 && isspace((unsigned char)text[len - 1])) text[--len] = '\0';
  if (len == 0 || strlen(text) != len) {
    snprintf(err, errlen, "%s %s: %s", flag, path,
             len == 0 ? "the file is empty; it must hold the token" : "the token holds a NUL byte");
    zn_secret_free(text);
    return ZN_ERR_INVALID;
  }
  *out = text;
  return ZN_OK;
}

void zn_secret_free(char* secret) {
  if (!secret) return;
  OPENSSL_cleanse(secret, strlen(secret));
  free(secret);
}

int zn_addr_is_loopback(const char* addr) {
  if (strncmp(addr, "ipv4:", 5) == 0) addr += 5;
  if (strncmp(addr, "ipv6:", 5) == 0) addr += 5;
  if (strncmp(addr, "127.", 4) == 0) return 1;
  if (strncmp(addr, "localhost:", 10) == 0 || strcmp(addr, "localhost") == 0) return 1;
  return strncmp(addr, "[::1]", 5) == 0;
}
