/* Checkpoint files in the safetensors layout: an 8-byte little-endian header length N, N bytes of
 * JSON naming each tensor's dtype, shape and byte range, then the tensors packed back to back.
 *
 * Integrity: the header's "__metadata__" carries "zenith.sha256", the SHA-256 of the whole file
 * with that value read as 64 '0' characters. The writer always puts this entry first, so the
 * digest sits at a fixed offset: the reader finds it without trusting anything else in the file,
 * and the writer can hash the file before it exists and patch the digest in without moving a byte.
 *
 * Durability: the bytes go to a temporary file in the same folder, which is synced, renamed over
 * the final name, and the folder synced; rename within a folder is atomic, so a crash leaves the
 * old checkpoint or the new one. The reader trusts nothing: every size is checked before it is
 * used, and every refusal names the file and what is wrong with it. */
#include "zn_ckpt.h"

#include <errno.h>
#include <fcntl.h>
#include <jansson.h>
#include <openssl/evp.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "zn_err.h"

/* The format stores tensors little-endian, and both sides copy them as they lie in memory. */
#if !defined(__BYTE_ORDER__) || __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "zn_ckpt copies tensors byte for byte, which is only right on a little-endian machine"
#endif

#define LEN_BYTES 8
/* The safetensors library refuses larger headers; within its bound our files stay open to it. */
#define MAX_HEADER 100000000u
#define META_KEY "__metadata__"
#define DIGEST_HEX 64
#define DIGEST_PREFIX "{\"" META_KEY "\":{\"" ZN_CKPT_DIGEST_KEY "\":\""
#define DIGEST_AT (sizeof DIGEST_PREFIX - 1) /* the digest's offset inside the header */
#define WRITE_CHUNK ((size_t)1 << 30)
#define TEMP_ATTEMPTS 100

static const char ZEROS[DIGEST_HEX + 1] =
    "0000000000000000000000000000000000000000000000000000000000000000";

static const struct {
  const char* name;
  size_t size;
} DTYPES[] = {[ZN_CKPT_F32] = {"F32", 4}, [ZN_CKPT_F64] = {"F64", 8}, [ZN_CKPT_I64] = {"I64", 8}};
#define NDTYPES ((int)(sizeof DTYPES / sizeof DTYPES[0]))

/* Where a message goes and the file it is about: every message starts with the path. */
typedef struct {
  const char* path;
  char* buf;
  size_t len;
} errbuf;

static int fail(const errbuf* e, int rc, const char* fmt, ...)
    __attribute__((format(printf, 3, 4)));

static int fail(const errbuf* e, int rc, const char* fmt, ...) {
  if (!e->buf || e->len == 0) return rc;
  int n = snprintf(e->buf, e->len, "%s: ", e->path);
  if (n < 0 || (size_t)n >= e->len) return rc;
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(e->buf + n, e->len - (size_t)n, fmt, ap);
  va_end(ap);
  return rc;
}

/* ---- sizes and hashing, shared by the writer and the reader ---- */

/* Bytes of a tensor of this dtype and shape, or -1 for a negative dimension or a size past 2^63. */
static int64_t byte_size(zn_ckpt_dtype dtype, int ndim, const int64_t* shape) {
  int64_t n = (int64_t)DTYPES[dtype].size;
  for (int i = 0; i < ndim; i++) {
    if (shape[i] < 0) return -1;
    if (shape[i] != 0 && n > INT64_MAX / shape[i]) return -1;
    n *= shape[i];
  }
  return n;
}

int64_t zn_ckpt_numel(const zn_ckpt_tensor* t) {
  int64_t n = 1;
  for (int i = 0; i < t->ndim; i++) n *= t->shape[i];
  return n;
}

typedef struct {
  const void* p;
  size_t n;
} span;

/* SHA-256 of the spans one after the other, as 64 lowercase hex digits; -1 if libcrypto fails. */
static int sha256_hex(const span* parts, int nparts, char hex[DIGEST_HEX + 1]) {
  EVP_MD_CTX* ctx = EVP_MD_CTX_new();
  int ok = ctx && EVP_DigestInit_ex(ctx, EVP_sha256(), NULL);
  for (int i = 0; ok && i < nparts; i++) ok = EVP_DigestUpdate(ctx, parts[i].p, parts[i].n);

  unsigned char md[32];
  unsigned int mdlen = 0;
  ok = ok && EVP_DigestFinal_ex(ctx, md, &mdlen) && mdlen == sizeof md;
  EVP_MD_CTX_free(ctx);
  if (!ok) return -1;
  for (int i = 0; i < 32; i++) snprintf(hex + 2 * i, 3, "%02x", md[i]);
  return 0;
}

static void put_le64(uint8_t* b, uint64_t v) {
  for (int i = 0; i < LEN_BYTES; i++) b[i] = (uint8_t)(v >> (8 * i));
}

static uint64_t get_le64(const uint8_t* b) {
  uint64_t v = 0;
  for (int i = 0; i < LEN_BYTES; i++) v |= (uint64_t)b[i] << (8 * i);
  return v;
}

/* ---- the writer: the header ---- */

/* Adds __metadata__ with the digest placeholder as its first entry, then the caller's entries. */
static int describe_meta(const errbuf* e, const zn_ckpt_meta* meta, int nmeta, json_t* root) {
  json_t* md = json_object();
  if (!md || json_object_set_new(root, META_KEY, md) != 0)
    return fail(e, ZN_ERR_NOMEM, "out of memory");
  if (json_object_set_new(md, ZN_CKPT_DIGEST_KEY, json_string(ZEROS)) != 0) {
    return fail(e, ZN_ERR_NOMEM, "out of memory");
  }

  for (int i = 0; i < nmeta; i++) {
    const char* key = meta[i].key;
    if (!key || !meta[i].value)
      return fail(e, ZN_ERR_INVALID, "metadata entry %d has no key or value", i);
    if (strcmp(key, ZN_CKPT_DIGEST_KEY) == 0) {
      return fail(e, ZN_ERR_INVALID, "metadata key \"%s\" is reserved for the digest", key);
    }
    if (json_object_get(md, key))
      return fail(e, ZN_ERR_INVALID, "two metadata entries have the key \"%s\"", key);
    json_t* value = json_string(meta[i].value);
    if (!value)
      return fail(e, ZN_ERR_INVALID, "metadata \"%s\": the value is not valid UTF-8", key);
    if (json_object_set_new(md, key, value) != 0) {
      return fail(e, ZN_ERR_INVALID, "metadata entry %d: the key is not valid UTF-8", i);
    }
  }
  return ZN_OK;
}

/* Checks tensor i, adds its entry at *offset to the header and moves *offset past its bytes. */
static int describe_tensor(const errbuf* e, const zn_ckpt_tensor* t, int i, int64_t* offset,
                           json_t* root) {
  if (!t->name) return fail(e, ZN_ERR_INVALID, "tensor %d has no name", i);
  if (strcmp(t->name, META_KEY) == 0) {
    return fail(e, ZN_ERR_INVALID, "tensor %d: the name \"%s\" is reserved for metadata", i,
                META_KEY);
  }
  if (json_object_get(root, t->name))
    return fail(e, ZN_ERR_INVALID, "two tensors are named \"%s\"", t->name);
  if ((int)t->dtype < 0 || (int)t->dtype >= NDTYPES) {
    return fail(e, ZN_ERR_INVALID, "tensor \"%s\": unknown dtype %d", t->name, (int)t->dtype);
  }
  if (t->ndim < 0 || t->ndim > ZN_CKPT_MAX_DIMS) {
    return fail(e, ZN_ERR_INVALID, "tensor \"%s\": %d dimensions (0 to %d allowed)", t->name,
                t->ndim, ZN_CKPT_MAX_DIMS);
  }
  int64_t bytes = byte_size(t->dtype, t->ndim, t->shape);
  if (bytes < 0 || *offset > INT64_MAX - bytes) {
    return fail(e, ZN_ERR_INVALID, "tensor \"%s\": a negative dimension or more than 2^63 bytes",
                t->name);
  }
  if (bytes > 0 && !t->data) return fail(e, ZN_ERR_INVALID, "tensor \"%s\": data is NULL", t->name);

  json_t* entry = json_object();
  json_t* shape = json_array();
  int bad = !entry || !shape;
  for (int d = 0; !bad && d < t->ndim; d++)
    bad = json_array_append_new(shape, json_integer(t->shape[d]));
  bad |= json_object_set_new(entry, "dtype", json_string(DTYPES[t->dtype].name));
  bad |= json_object_set_new(entry, "shape", shape);
  bad |=
      json_object_set_new(entry, "data_offsets",
                          json_pack("[I,I]", (json_int_t)*offset, (json_int_t)(*offset + bytes)));
  if (bad) {
    json_decref(entry);
    return fail(e, ZN_ERR_NOMEM, "out of memory");
  }
  if (json_object_set_new(root, t->name, entry) != 0) {
    return fail(e, ZN_ERR_INVALID, "tensor %d: the name is not valid UTF-8", i);
  }
  *offset += bytes;
  return ZN_OK;
}

/* Pads the header with spaces so that the data section starts on an 8-byte boundary, which lets a
 * reader use 8-byte tensors in place. */
static int pad_header(const errbuf* e, char* json, char** text, size_t* len) {
  size_t used = strlen(json);
  if (strncmp(json, DIGEST_PREFIX, DIGEST_AT) != 0) {
    return fail(e, ZN_ERR_INVALID, "internal error: jansson did not keep the digest first");
  }
  size_t padded = (LEN_BYTES + used + 7) / 8 * 8 - LEN_BYTES;
  if (padded > MAX_HEADER) {
    return fail(e, ZN_ERR_INVALID, "the header would be %zu bytes, over the format's %u", padded,
                MAX_HEADER);
  }
  char* grown = realloc(json, padded);
  if (!grown) return fail(e, ZN_ERR_NOMEM, "out of memory");
  memset(grown + used, ' ', padded - used);
  *text = grown;
  *len = padded;
  return ZN_OK;
}

/* The header text with the digest placeholder; it is malloc'd and not NUL-terminated. */
static int build_header(const errbuf* e, const zn_ckpt_tensor* tensors, int ntensors,
                        const zn_ckpt_meta* meta, int nmeta, char** text, size_t* len) {
  json_t* root = json_object();
  int rc = root ? describe_meta(e, meta, nmeta, root) : fail(e, ZN_ERR_NOMEM, "out of memory");
  int64_t offset = 0;
  for (int i = 0; rc == ZN_OK && i < ntensors; i++) {
    rc = describe_tensor(e, &tensors[i], i, &offset, root);
  }
  char* json = rc == ZN_OK ? json_dumps(root, JSON_COMPACT) : NULL;
  json_decref(root);
  if (rc != ZN_OK) return rc;
  if (!json) return fail(e, ZN_ERR_NOMEM, "out of memory");

  rc = pad_header(e, json, text, len);
  if (rc != ZN_OK) free(json);
  return rc;
}

/* ---- the writer: the file ---- */

/* Writes n bytes, resuming after short writes and signals. */
static int write_all(int fd, const uint8_t* p, size_t n) {
  while (n > 0) {
    ssize_t w = write(fd, p, n < WRITE_CHUNK ? n : WRITE_CHUNK);
    if (w < 0 && errno == EINTR) continue;
    if (w <= 0) {
      if (w == 0) errno = EIO;
      return -1;
    }
    p += w;
    n -= (size_t)w;
  }
  return 0;
}

/* Serial numbers in temporary names keep two threads that write the same checkpoint apart. */
static atomic_uint temp_serial;

/* Creates ".NAME.tmp.PID.SERIAL" beside the checkpoint: hidden, and never ending in the
 * checkpoint's own suffix, so no listing mistakes it for one. O_EXCL never opens another
 * writer's file; a name left by a crashed process that had our PID is skipped. */
static int create_temp(const errbuf* e, char** tmp, int* fd) {
  const char* slash = strrchr(e->path, '/');
  const char* base = slash ? slash + 1 : e->path;
  if (*base == '\0') return fail(e, ZN_ERR_INVALID, "the path names a folder, not a file");
  size_t cap = strlen(e->path) + 64;
  char* name = malloc(cap);
  if (!name) return fail(e, ZN_ERR_NOMEM, "out of memory");

  for (int attempt = 0; attempt < TEMP_ATTEMPTS; attempt++) {
    snprintf(name, cap, "%.*s.%s.tmp.%ld.%u", (int)(base - e->path), e->path, base, (long)getpid(),
             atomic_fetch_add(&temp_serial, 1));
    *fd = open(name, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
    if (*fd >= 0) {
      *tmp = name;
      return ZN_OK;
    }
    if (errno != EEXIST) break;
  }
  int rc = fail(e, ZN_ERR_IO, "cannot create temporary file %s: %s", name, strerror(errno));
  free(name);
  return rc;
}

/* Writes the parts to the temporary file, syncs it and closes it, whatever happens. */
static int fill_temp(const errbuf* e, const char* tmp, int fd, const span* parts, int nparts) {
  int rc = ZN_OK;
  for (int i = 0; rc == ZN_OK && i < nparts; i++) {
    if (write_all(fd, parts[i].p, parts[i].n) != 0) {
      rc = fail(e, ZN_ERR_IO, "cannot write temporary file %s: %s", tmp, strerror(errno));
    }
  }
  if (rc == ZN_OK && fsync(fd) != 0) {
    rc = fail(e, ZN_ERR_IO, "cannot sync temporary file %s: %s", tmp, strerror(errno));
  }
  /* Network filesystems may report a failed write only here. */
  if (close(fd) != 0 && rc == ZN_OK) {
    rc = fail(e, ZN_ERR_IO, "cannot close temporary file %s: %s", tmp, strerror(errno));
  }
  return rc;
}

/* Makes the rename itself durable: until the folder is synced, a power cut may undo it. */
static int sync_folder(const errbuf* e) {
  const char* slash = strrchr(e->path, '/');
  char* dir = !slash             ? strdup(".")
              : slash == e->path ? strdup("/")
                                 : strndup(e->path, (size_t)(slash - e->path));
  if (!dir) return fail(e, ZN_ERR_NOMEM, "out of memory");

  int rc = ZN_OK;
  int fd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0 || fsync(fd) != 0) {
    rc = fail(e, ZN_ERR_IO,
              "renamed into place, but its folder %s could not be synced (%s): the new checkpoint "
              "may not survive a power cut",
              dir, strerror(errno));
  }
  if (fd >= 0) close(fd);
  free(dir);
  return rc;
}

static void discard_temp(const char* tmp) {
  if (unlink(tmp) != 0 && errno != ENOENT) {
    ZN_WARN("could not remove temporary checkpoint file %s: %s", tmp, strerror(errno));
  }
}

/* Temporary file, fsync, rename over the final name, fsync of the folder. Before the rename a
 * failure removes the temporary file and leaves the final path as it was. */
static int write_atomically(const errbuf* e, const span* parts, int nparts) {
  char* tmp = NULL;
  int fd = -1;
  int rc = create_temp(e, &tmp, &fd);
  if (rc != ZN_OK) return rc;

  rc = fill_temp(e, tmp, fd, parts, nparts);
  if (rc == ZN_OK && rename(tmp, e->path) != 0) {
    rc = fail(e, ZN_ERR_IO, "cannot rename %s onto it: %s", tmp, strerror(errno));
  }
  if (rc != ZN_OK) discard_temp(tmp);
  free(tmp);
  return rc == ZN_OK ? sync_folder(e) : rc;
}

/* The file as spans: the length prefix, the header, then each tensor's bytes. */
static span* file_parts(const uint8_t* len8, const char* header, size_t header_len,
                        const zn_ckpt_tensor* tensors, int ntensors) {
  span* parts = malloc(sizeof(span) * (size_t)(ntensors + 2));
  if (!parts) return NULL;
  parts[0] = (span){len8, LEN_BYTES};
  parts[1] = (span){header, header_len};
  for (int i = 0; i < ntensors; i++) {
    const zn_ckpt_tensor* t = &tensors[i];
    parts[i + 2] = (span){t->data, (size_t)byte_size(t->dtype, t->ndim, t->shape)};
  }
  return parts;
}

int zn_ckpt_write(const char* path, const zn_ckpt_tensor* tensors, int ntensors,
                  const zn_ckpt_meta* meta, int nmeta, char digest_hex[65], int64_t* bytes,
                  char* err, size_t errlen) {
  errbuf e = {path ? path : "(null)", err, errlen};
  if (!path || ntensors < 0 || nmeta < 0 || (ntensors && !tensors) || (nmeta && !meta)) {
    return fail(&e, ZN_ERR_INVALID, "bad arguments to zn_ckpt_write");
  }

  char* header = NULL;
  size_t header_len = 0;
  span* parts = NULL;
  int rc = ZN_OK;
  ZN_CHECK_GOTO(build_header(&e, tensors, ntensors, meta, nmeta, &header, &header_len), rc, done);

  uint8_t len8[LEN_BYTES];
  put_le64(len8, header_len);
  parts = file_parts(len8, header, header_len, tensors, ntensors);
  if (!parts) ZN_CHECK_GOTO(fail(&e, ZN_ERR_NOMEM, "out of memory"), rc, done);

  /* The header holds the placeholder while it is hashed; the digest then takes its place. */
  char hex[DIGEST_HEX + 1];
  if (sha256_hex(parts, ntensors + 2, hex) != 0) {
    ZN_CHECK_GOTO(fail(&e, ZN_ERR_NOMEM, "libcrypto could not compute SHA-256"), rc, done);
  }
  memcpy(header + DIGEST_AT, hex, DIGEST_HEX);
  ZN_CHECK_GOTO(write_atomically(&e, parts, ntensors + 2), rc, done);

  if (digest_hex) memcpy(digest_hex, hex, sizeof hex);
  if (bytes) {
    *bytes = LEN_BYTES + (int64_t)header_len;
    for (int i = 0; i < ntensors; i++) *bytes += (int64_t)parts[i + 2].n;
  }
done:
  free(parts);
  free(header);
  return rc;
}

/* ---- the reader ---- */

typedef struct {
  zn_ckpt_tensor t;
  uint64_t begin, end; /* data_offsets */
  int order;           /* place in the header: orders empty tensors that share an offset */
  void* copy;          /* an aligned copy, when the bytes in the file are not aligned */
} entry;

struct zn_ckpt {
  uint8_t* file;
  size_t size;
  size_t header_len;
  entry* entries;
  int nentries;
  zn_ckpt_meta* meta;
  int nmeta;
  char digest[DIGEST_HEX + 1];
};

static int read_contents(const errbuf* e, int fd, size_t size, zn_ckpt* c) {
  c->file = malloc(size ? size : 1);
  if (!c->file) return fail(e, ZN_ERR_NOMEM, "out of memory for %zu bytes", size);
  while (c->size < size) {
    ssize_t r =
        read(fd, c->file + c->size, size - c->size < WRITE_CHUNK ? size - c->size : WRITE_CHUNK);
    if (r < 0 && errno == EINTR) continue;
    if (r < 0) return fail(e, ZN_ERR_IO, "read failed: %s", strerror(errno));
    if (r == 0) {
      return fail(e, ZN_ERR_IO, "the file shrank while it was read (%zu of %zu bytes)", c->size,
                  size);
    }
    c->size += (size_t)r;
  }
  return ZN_OK;
}

static int read_whole(const errbuf* e, zn_ckpt* c) {
  int fd = open(e->path, O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    return fail(e, errno == ENOENT ? ZN_ERR_NOT_FOUND : ZN_ERR_IO, "cannot open: %s",
                strerror(errno));
  }
  struct stat st;
  int rc = ZN_OK;
  if (fstat(fd, &st) != 0) {
    rc = fail(e, ZN_ERR_IO, "cannot stat: %s", strerror(errno));
  } else if (!S_ISREG(st.st_mode)) {
    rc = fail(e, ZN_ERR_INVALID, "not a checkpoint: not a regular file");
  } else {
    rc = read_contents(e, fd, (size_t)st.st_size, c);
  }
  close(fd);
  return rc;
}

/* Where the header's JSON object really ends, trailing spaces included, found by parsing from the
 * start of the header towards the end of the file; -1 when no whole object is there. It tells a
 * damaged length prefix from a truncated or damaged header. */
static int64_t json_extent(const zn_ckpt* c) {
  size_t avail = c->size - LEN_BYTES;
  if (avail > MAX_HEADER) avail = MAX_HEADER;
  json_error_t jerr;
  json_t* v = json_loadb((const char*)c->file + LEN_BYTES, avail, JSON_DISABLE_EOF_CHECK, &jerr);
  if (!v) return -1;
  json_decref(v);

  /* With JSON_DISABLE_EOF_CHECK jansson leaves the bytes it consumed in position. */
  size_t end = (size_t)jerr.position;
  while (end < avail && c->file[LEN_BYTES + end] == ' ') end++;
  return (int64_t)end;
}

static int length_mismatch(const errbuf* e, uint64_t said, int64_t extent) {
  return fail(e, ZN_ERR_INVALID,
              "the header length says %llu bytes, but the JSON header is %lld: the length or the "
              "header is damaged",
              (unsigned long long)said, (long long)extent);
}

/* The length prefix against the file's size; sets header_len. */
static int check_length(const errbuf* e, zn_ckpt* c) {
  if (c->size == 0) return fail(e, ZN_ERR_INVALID, "not a checkpoint: the file is empty");
  if (c->size < LEN_BYTES) {
    return fail(e, ZN_ERR_INVALID, "truncated: %zu bytes, fewer than the %d of the header length",
                c->size, LEN_BYTES);
  }
  uint64_t n = get_le64(c->file);
  size_t avail = c->size - LEN_BYTES;
  if (n > MAX_HEADER) {
    return fail(e, ZN_ERR_INVALID, "not a checkpoint: header length %llu is larger than %s",
                (unsigned long long)n, n > avail ? "the file" : "the format allows");
  }
  if (avail > 0 && c->file[LEN_BYTES] != '{') {
    return fail(e, ZN_ERR_INVALID, "not a checkpoint: the header does not start with '{'");
  }
  if (n > avail) {
    int64_t extent = json_extent(c);
    if (extent >= 0 && (size_t)extent < avail) return length_mismatch(e, n, extent);
    return fail(e, ZN_ERR_INVALID,
                "truncated: the header length says %llu bytes, the file has %zu after it",
                (unsigned long long)n, avail);
  }
  c->header_len = (size_t)n;
  return ZN_OK;
}

static int load_header_json(const errbuf* e, const zn_ckpt* c, json_t** root) {
  json_error_t jerr;
  *root =
      json_loadb((const char*)c->file + LEN_BYTES, c->header_len, JSON_REJECT_DUPLICATES, &jerr);
  if (*root && json_is_object(*root)) return ZN_OK;
  if (*root) return fail(e, ZN_ERR_INVALID, "not a checkpoint: the header is not a JSON object");

  int64_t extent = json_extent(c);
  if (extent >= 0 && (size_t)extent != c->header_len)
    return length_mismatch(e, c->header_len, extent);
  return fail(e, ZN_ERR_INVALID, "damaged header: %s (at byte %d of the header)", jerr.text,
              jerr.position);
}

static int parse_meta(const errbuf* e, zn_ckpt* c, json_t* md) {
  if (!md) return ZN_OK;
  if (!json_is_object(md))
    return fail(e, ZN_ERR_INVALID, "damaged header: %s is not an object", META_KEY);
  c->meta = calloc(json_object_size(md) + 1, sizeof *c->meta);
  if (!c->meta) return fail(e, ZN_ERR_NOMEM, "out of memory");

  const char* key;
  json_t* value;
  json_object_foreach(md, key, value) {
    if (!json_is_string(value)) {
      return fail(e, ZN_ERR_INVALID, "damaged header: metadata \"%s\" is not a string", key);
    }
    zn_ckpt_meta* m = &c->meta[c->nmeta++];
    m->key = strdup(key);
    m->value = strdup(json_string_value(value));
    if (!m->key || !m->value) return fail(e, ZN_ERR_NOMEM, "out of memory");
  }
  return ZN_OK;
}

/* The digest must be where the writer puts it, first in the header: there it is found from the
 * raw bytes, without trusting the rest of the file. */
static int find_digest(const errbuf* e, zn_ckpt* c) {
  const char* d = zn_ckpt_meta_get(c, ZN_CKPT_DIGEST_KEY);
  if (!d) {
    return fail(e, ZN_ERR_INVALID,
                "not a Zenith checkpoint: no \"%s\" digest in its metadata (a safetensors file "
                "from another program?)",
                ZN_CKPT_DIGEST_KEY);
  }
  const char* at = (const char*)c->file + LEN_BYTES + DIGEST_AT;
  if (c->header_len <= DIGEST_AT + DIGEST_HEX ||
      memcmp(c->file + LEN_BYTES, DIGEST_PREFIX, DIGEST_AT) || strlen(d) != DIGEST_HEX ||
      memcmp(at, d, DIGEST_HEX) != 0 || at[DIGEST_HEX] != '"') {
    return fail(e, ZN_ERR_INVALID,
                "not a Zenith checkpoint: the \"%s\" digest is not the header's first entry, "
                "where Zenith writes it",
                ZN_CKPT_DIGEST_KEY);
  }
  if (strspn(d, "0123456789abcdef") != DIGEST_HEX) {
    return fail(e, ZN_ERR_INVALID,
                "damaged header: the digest \"%s\" is not 64 lowercase hex digits", d);
  }
  memcpy(c->digest, d, sizeof c->digest);
  return ZN_OK;
}

/* "[3, 5, 7]" for messages. */
static const char* shape_text(const zn_ckpt_tensor* t, char* buf, size_t len) {
  int n = snprintf(buf, len, "[");
  for (int i = 0; i < t->ndim && n > 0 && (size_t)n < len; i++) {
    n += snprintf(buf + n, len - (size_t)n, "%s%lld", i ? ", " : "", (long long)t->shape[i]);
  }
  if (n > 0 && (size_t)n < len) snprintf(buf + n, len - (size_t)n, "]");
  return buf;
}

static int parse_dtype(const errbuf* e, const char* name, json_t* v, zn_ckpt_dtype* dtype) {
  const char* s = json_string_value(v);
  for (int d = 0; s && d < NDTYPES; d++) {
    if (strcmp(s, DTYPES[d].name) == 0) {
      *dtype = (zn_ckpt_dtype)d;
      return ZN_OK;
    }
  }
  return fail(e, ZN_ERR_INVALID, "tensor \"%s\": dtype %s is not one Zenith reads (F32, F64, I64)",
              name, s ? s : "missing or not a string");
}

static int parse_shape(const errbuf* e, const char* name, json_t* v, zn_ckpt_tensor* t) {
  if (!json_is_array(v))
    return fail(e, ZN_ERR_INVALID, "damaged header: tensor \"%s\" has no shape", name);
  if (json_array_size(v) > ZN_CKPT_MAX_DIMS) {
    return fail(e, ZN_ERR_INVALID, "tensor \"%s\" has %zu dimensions; Zenith reads up to %d", name,
                json_array_size(v), ZN_CKPT_MAX_DIMS);
  }
  t->ndim = (int)json_array_size(v);
  for (int i = 0; i < t->ndim; i++) {
    json_t* d = json_array_get(v, (size_t)i);
    if (!json_is_integer(d) || json_integer_value(d) < 0) {
      return fail(e, ZN_ERR_INVALID, "damaged header: tensor \"%s\": dimension %d is not a size",
                  name, i);
    }
    t->shape[i] = json_integer_value(d);
  }
  return ZN_OK;
}

static int parse_offsets(const errbuf* e, const char* name, json_t* v, entry* t) {
  json_t* b = json_array_get(v, 0);
  json_t* end = json_array_get(v, 1);
  if (json_array_size(v) != 2 || !json_is_integer(b) || !json_is_integer(end) ||
      json_integer_value(b) < 0 || json_integer_value(end) < json_integer_value(b)) {
    return fail(e, ZN_ERR_INVALID,
                "damaged header: tensor \"%s\" has no valid data_offsets [begin, end]", name);
  }
  t->begin = (uint64_t)json_integer_value(b);
  t->end = (uint64_t)json_integer_value(end);
  return ZN_OK;
}

/* One tensor's entry: its dtype, shape and offsets, and the offsets against dtype and shape. */
static int parse_tensor(const errbuf* e, const char* name, json_t* v, entry* t) {
  t->t.name = strdup(name);
  if (!t->t.name) return fail(e, ZN_ERR_NOMEM, "out of memory");
  if (!json_is_object(v))
    return fail(e, ZN_ERR_INVALID, "damaged header: tensor \"%s\" is not an object", name);

  int rc = parse_dtype(e, name, json_object_get(v, "dtype"), &t->t.dtype);
  if (rc == ZN_OK) rc = parse_shape(e, name, json_object_get(v, "shape"), &t->t);
  if (rc == ZN_OK) rc = parse_offsets(e, name, json_object_get(v, "data_offsets"), t);
  if (rc != ZN_OK) return rc;

  char shape[128];
  int64_t need = byte_size(t->t.dtype, t->t.ndim, t->t.shape);
  if (need < 0) {
    return fail(e, ZN_ERR_INVALID,
                "damaged header: tensor \"%s\" has shape %s, more than 2^63 bytes", name,
                shape_text(&t->t, shape, sizeof shape));
  }
  if (t->end - t->begin != (uint64_t)need) {
    return fail(
        e, ZN_ERR_INVALID,
        "damaged header: tensor \"%s\" has data_offsets [%llu, %llu], %llu bytes, but %s %s "
        "takes %lld",
        name, (unsigned long long)t->begin, (unsigned long long)t->end,
        (unsigned long long)(t->end - t->begin), DTYPES[t->t.dtype].name,
        shape_text(&t->t, shape, sizeof shape), (long long)need);
  }
  return ZN_OK;
}

static int parse_tensors(const errbuf* e, zn_ckpt* c, json_t* root) {
  c->entries = calloc(json_object_size(root) + 1, sizeof *c->entries);
  if (!c->entries) return fail(e, ZN_ERR_NOMEM, "out of memory");

  const char* key;
  json_t* value;
  json_object_foreach(root, key, value) {
    if (strcmp(key, META_KEY) == 0) continue;
    entry* t = &c->entries[c->nentries];
    t->order = c->nentries++;
    int rc = parse_tensor(e, key, value, t);
    if (rc != ZN_OK) return rc;
  }
  return ZN_OK;
}

static int by_offset(const void* a, const void* b) {
  const entry* x = a;
  const entry* y = b;
  if (x->begin != y->begin) return x->begin < y->begin ? -1 : 1;
  if (x->end != y->end) return x->end < y->end ? -1 : 1;
  return x->order - y->order;
}

/* The tensors must tile the data section exactly: from offset 0, no gap, no overlap, and ending
 * where the file ends. Leaves the entries in file order. */
static int check_layout(const errbuf* e, zn_ckpt* c) {
  qsort(c->entries, (size_t)c->nentries, sizeof *c->entries, by_offset);
  uint64_t pos = 0;
  for (int i = 0; i < c->nentries; i++) {
    const entry* t = &c->entries[i];
    if (t->begin < pos) {
      return fail(e, ZN_ERR_INVALID, "damaged header: tensors \"%s\" and \"%s\" overlap",
                  c->entries[i - 1].t.name, t->t.name);
    }
    if (t->begin > pos && i == 0) {
      return fail(e, ZN_ERR_INVALID,
                  "damaged header: a gap of %llu bytes before tensor \"%s\", the first",
                  (unsigned long long)t->begin, t->t.name);
    }
    if (t->begin > pos) {
      return fail(e, ZN_ERR_INVALID,
                  "damaged header: a gap of %llu bytes between tensors \"%s\" and \"%s\"",
                  (unsigned long long)(t->begin - pos), c->entries[i - 1].t.name, t->t.name);
    }
    pos = t->end;
  }

  size_t data_len = c->size - LEN_BYTES - c->header_len;
  if (pos > data_len) {
    return fail(e, ZN_ERR_INVALID, "truncated: header says %llu bytes of tensors, the file has %zu",
                (unsigned long long)pos, data_len);
  }
  if (pos < data_len) {
    return fail(e, ZN_ERR_INVALID,
                "damaged: the header's tensors take %llu bytes, but %zu follow the header: the "
                "header length or the file is damaged",
                (unsigned long long)pos, data_len);
  }
  return ZN_OK;
}

static int verify_digest(const errbuf* e, const zn_ckpt* c) {
  size_t at = LEN_BYTES + DIGEST_AT;
  span parts[3] = {
      {c->file, at}, {ZEROS, DIGEST_HEX}, {c->file + at + DIGEST_HEX, c->size - at - DIGEST_HEX}};
  char actual[DIGEST_HEX + 1];
  if (sha256_hex(parts, 3, actual) != 0)
    return fail(e, ZN_ERR_NOMEM, "libcrypto could not compute SHA-256");
  if (strcmp(actual, c->digest) != 0) {
    return fail(e, ZN_ERR_INVALID,
                "digest mismatch (file says %s, contents hash to %s): the file is damaged",
                c->digest, actual);
  }
  return ZN_OK;
}

/* Points each tensor at its bytes, or at an aligned copy where they are not aligned for the
 * dtype in the file (an F64 after an odd number of F32s, or a header padded by another writer). */
static int place_data(const errbuf* e, zn_ckpt* c) {
  const uint8_t* data = c->file + LEN_BYTES + c->header_len;
  for (int i = 0; i < c->nentries; i++) {
    entry* t = &c->entries[i];
    const uint8_t* p = data + t->begin;
    size_t n = (size_t)(t->end - t->begin);
    t->t.data = p;
    if ((uintptr_t)p % DTYPES[t->t.dtype].size == 0) continue;

    /* malloc's alignment suits every dtype here. */
    t->copy = malloc(n ? n : 1);
    if (!t->copy) return fail(e, ZN_ERR_NOMEM, "out of memory for tensor \"%s\"", t->t.name);
    memcpy(t->copy, p, n);
    t->t.data = t->copy;
  }
  return ZN_OK;
}

int zn_ckpt_read(const char* path, zn_ckpt** out, char* err, size_t errlen) {
  errbuf e = {path ? path : "(null)", err, errlen};
  if (!path || !out) return fail(&e, ZN_ERR_INVALID, "bad arguments to zn_ckpt_read");
  *out = NULL;
  zn_ckpt* c = calloc(1, sizeof *c);
  if (!c) return fail(&e, ZN_ERR_NOMEM, "out of memory");

  json_t* root = NULL;
  int rc = ZN_OK;
  ZN_CHECK_GOTO(read_whole(&e, c), rc, done);
  ZN_CHECK_GOTO(check_length(&e, c), rc, done);
  ZN_CHECK_GOTO(load_header_json(&e, c, &root), rc, done);
  ZN_CHECK_GOTO(parse_meta(&e, c, json_object_get(root, META_KEY)), rc, done);
  ZN_CHECK_GOTO(find_digest(&e, c), rc, done);
  ZN_CHECK_GOTO(parse_tensors(&e, c, root), rc, done);
  ZN_CHECK_GOTO(check_layout(&e, c), rc, done);
  ZN_CHECK_GOTO(verify_digest(&e, c), rc, done);
  ZN_CHECK_GOTO(place_data(&e, c), rc, done);
done:
  json_decref(root);
  if (rc != ZN_OK) {
    zn_ckpt_free(c);
    return rc;
  }
  *out = c;
  return ZN_OK;
}

int zn_ckpt_num_tensors(const zn_ckpt* c) {
  return c->nentries;
}

const zn_ckpt_tensor* zn_ckpt_tensor_at(const zn_ckpt* c, int i) {
  return i >= 0 && i < c->nentries ? &c->entries[i].t : NULL;
}

const zn_ckpt_tensor* zn_ckpt_find(const zn_ckpt* c, const char* name) {
  for (int i = 0; i < c->nentries; i++) {
    if (strcmp(c->entries[i].t.name, name) == 0) return &c->entries[i].t;
  }
  return NULL;
}

const char* zn_ckpt_meta_get(const zn_ckpt* c, const char* key) {
  for (int i = 0; i < c->nmeta; i++) {
    if (strcmp(c->meta[i].key, key) == 0) return c->meta[i].value;
  }
  return NULL;
}

const char* zn_ckpt_digest(const zn_ckpt* c) {
  return c->digest;
}

void zn_ckpt_free(zn_ckpt* c) {
  if (!c) return;
  for (int i = 0; i < c->nentries; i++) {
    free((char*)c->entries[i].t.name);
    free(c->entries[i].copy);
  }
  for (int i = 0; i < c->nmeta; i++) {
    free((char*)c->meta[i].key);
    free((char*)c->meta[i].value);
  }
  free(c->entries);
  free(c->meta);
  free(c->file);
  free(c);
}
