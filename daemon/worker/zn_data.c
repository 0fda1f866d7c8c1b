/* Reading Fashion-MNIST's IDX files. An IDX file is a 4-byte magic number (two zero bytes, a
 * type byte, 0x08 for unsigned bytes, and the number of dimensions), one big-endian uint32 per
 * dimension, then the data in row-major order. zlib's gzopen reads gzipped and plain files alike,
 * so the loader accepts either. The files come from outside the program: every size is checked
 * before it is trusted, and every failure names the file and what is wrong with it, because
 * "invalid input" alone does not tell an operator which of four files to replace. */
#include "zn_data.h"

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <zlib.h>

#include "zn_err.h"
#include "zn_rng.h"

#define IDX_TYPE_UBYTE 0x08
/* Bounds that no real image set comes near; they keep count * rows * cols far below SIZE_MAX. */
#define MAX_SIDE 4096
#define MAX_COUNT 10000000
#define CHUNK (1 << 16)

typedef struct {
  gzFile gz;
  char path[1024];
} idx_file;

static int fail(int rc, char* err, size_t errlen, const char* fmt, ...)
    __attribute__((format(printf, 4, 5)));

static int fail(int rc, char* err, size_t errlen, const char* fmt, ...) {
  if (err && errlen) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err, errlen, fmt, ap);
    va_end(ap);
  }
  return rc;
}

/* Opens dir/name, or dir/name.gz when the plain file does not exist. */
static int open_idx(const char* dir, const char* name, idx_file* f, char* err, size_t errlen) {
  snprintf(f->path, sizeof f->path, "%s/%s", dir, name);
  errno = 0;
  f->gz = gzopen(f->path, "rb");
  if (f->gz) return ZN_OK;
  if (errno != ENOENT) {
    return fail(ZN_ERR_IO, err, errlen, "%s: cannot open: %s", f->path,
                errno ? strerror(errno) : "out of memory");
  }

  snprintf(f->path, sizeof f->path, "%s/%s.gz", dir, name);
  errno = 0;
  f->gz = gzopen(f->path, "rb");
  if (f->gz) return ZN_OK;
  if (errno == ENOENT) {
    return fail(ZN_ERR_IO, err, errlen, "%s/%s: missing file (neither it nor %s.gz exists)", dir,
                name, name);
  }
  return fail(ZN_ERR_IO, err, errlen, "%s: cannot open: %s", f->path,
              errno ? strerror(errno) : "out of memory");
}

/* Reads exactly len bytes of the part `what`, of which `before` bytes were read by earlier calls
 * out of `total`. A short file is malformed (truncated); a failing read or a corrupt gzip stream is
 * reported with zlib's own words. */
static int read_part(idx_file* f, void* buf, size_t len, const char* what, size_t before,
                     size_t total, char* err, size_t errlen) {
  size_t got = 0;
  while (got < len) {
    size_t want = len - got < CHUNK ? len - got : CHUNK;
    int n = gzread(f->gz, (char*)buf + got, (unsigned)want);
    if (n > 0) {
      got += (size_t)n;
      continue;
    }
    int zerr = Z_OK;
    const char* msg = gzerror(f->gz, &zerr);
    if (n == 0 || zerr == Z_BUF_ERROR) break;
    if (zerr == Z_ERRNO) {
      return fail(ZN_ERR_IO, err, errlen, "%s: read failed: %s", f->path, strerror(errno));
    }
    return fail(ZN_ERR_INVALID, err, errlen, "%s: corrupt gzip data: %s", f->path, msg);
  }
  if (got < len) {
    return fail(ZN_ERR_INVALID, err, errlen, "%s: truncated %s: expected %zu bytes, found %zu",
                f->path, what, total, before + got);
  }
  return ZN_OK;
}

/* Reads the magic number and the ndims big-endian sizes, each checked against its bound. */
static int read_header(idx_file* f, int ndims, uint32_t* dims, char* err, size_t errlen) {
  size_t header_len = 4 + 4 * (size_t)ndims;
  uint8_t magic[4];
  int rc = read_part(f, magic, sizeof magic, "header", 0, header_len, err, errlen);
  if (rc != ZN_OK) return rc;
  uint32_t got = (uint32_t)magic[0] << 24 | (uint32_t)magic[1] << 16 | magic[2] << 8 | magic[3];
  if (magic[0] != 0 || magic[1] != 0 || magic[2] != IDX_TYPE_UBYTE) {
    return fail(ZN_ERR_INVALID, err, errlen,
                "%s: bad magic number 0x%08x (expected 0x%08x: unsigned-byte IDX data)", f->path,
                got, (unsigned)(IDX_TYPE_UBYTE << 8 | ndims));
  }
  if (magic[3] != ndims) {
    return fail(ZN_ERR_INVALID, err, errlen, "%s: wrong dimension count %d (expected %d)", f->path,
                magic[3], ndims);
  }

  for (int i = 0; i < ndims; i++) {
    uint8_t b[4];
    rc = read_part(f, b, sizeof b, "header", 4 + 4 * (size_t)i, header_len, err, errlen);
    if (rc != ZN_OK) return rc;
    dims[i] = (uint32_t)b[0] << 24 | (uint32_t)b[1] << 16 | (uint32_t)b[2] << 8 | b[3];
    uint32_t limit = i == 0 ? MAX_COUNT : MAX_SIDE;
    if (dims[i] == 0 || dims[i] > limit) {
      return fail(ZN_ERR_INVALID, err, errlen, "%s: dimension %d is %u (expected 1 to %u)", f->path,
                  i, dims[i], limit);
    }
  }
  return ZN_OK;
}

/* Pixels go through a 256-entry table: one rounding per value, identical on every worker. */
static int read_pixels(idx_file* f, zn_dataset* ds, char* err, size_t errlen) {
  float table[256];
  for (int b = 0; b < 256; b++) table[b] = ((float)b / 255.0f - ZN_FMNIST_MEAN) / ZN_FMNIST_STD;

  size_t total = (size_t)ds->count * (size_t)ds->rows * (size_t)ds->cols;
  char what[96];
  snprintf(what, sizeof what, "pixel data (the header promises %d images of %dx%d)", ds->count,
           ds->rows, ds->cols);
  uint8_t* chunk = malloc(CHUNK);
  if (!chunk) return fail(ZN_ERR_NOMEM, err, errlen, "%s: out of memory", f->path);

  int rc = ZN_OK;
  for (size_t done = 0; done < total;) {
    size_t len = total - done < CHUNK ? total - done : CHUNK;
    rc = read_part(f, chunk, len, what, done, total, err, errlen);
    if (rc != ZN_OK) break;
    for (size_t i = 0; i < len; i++) ds->images[done + i] = table[chunk[i]];
    done += len;
  }
  free(chunk);
  return rc;
}

static int load_images(const char* dir, const char* name, zn_dataset* ds, char* path_out, char* err,
                       size_t errlen) {
  idx_file f;
  int rc = open_idx(dir, name, &f, err, errlen);
  if (rc != ZN_OK) return rc;
  snprintf(path_out, sizeof f.path, "%s", f.path);

  uint32_t dims[3];
  rc = read_header(&f, 3, dims, err, errlen);
  if (rc != ZN_OK) goto done;
  ds->count = (int)dims[0], ds->rows = (int)dims[1], ds->cols = (int)dims[2];
  ds->images = malloc((size_t)dims[0] * dims[1] * dims[2] * sizeof(float));
  if (!ds->images) {
    rc = fail(ZN_ERR_NOMEM, err, errlen, "%s: out of memory for %u images", f.path, dims[0]);
    goto done;
  }
  rc = read_pixels(&f, ds, err, errlen);

done:
  gzclose(f.gz);
  return rc;
}

static int load_labels(const char* dir, const char* name, const char* images_path, zn_dataset* ds,
                       char* err, size_t errlen) {
  idx_file f;
  int rc = open_idx(dir, name, &f, err, errlen);
  if (rc != ZN_OK) return rc;

  uint32_t count = 0;
  rc = read_header(&f, 1, &count, err, errlen);
  if (rc != ZN_OK) goto done;
  if (count != (uint32_t)ds->count) {
    rc = fail(ZN_ERR_INVALID, err, errlen,
              "%s: image/label count mismatch: %u labels, but %s "
              "has %d images",
              f.path, count, images_path, ds->count);
    goto done;
  }
  ds->labels = malloc(count);
  if (!ds->labels) {
    rc = fail(ZN_ERR_NOMEM, err, errlen, "%s: out of memory for %u labels", f.path, count);
    goto done;
  }
  rc = read_part(&f, ds->labels, count, "label data", 0, count, err, errlen);
  if (rc != ZN_OK) goto done;

  for (uint32_t i = 0; i < count; i++) {
    if (ds->labels[i] >= ZN_FMNIST_CLASSES) {
      rc = fail(ZN_ERR_INVALID, err, errlen, "%s: label %d at index %u is out of range (> %d)",
                f.path, ds->labels[i], i, ZN_FMNIST_CLASSES - 1);
      break;
    }
  }

done:
  gzclose(f.gz);
  return rc;
}

int zn_dataset_load(const char* dir, int train, zn_dataset* out, char* err, size_t errlen) {
  const char* split = train ? "train" : "t10k";
  char name[64], images_path[1024];
  zn_dataset ds = {0};

  snprintf(name, sizeof name, "%s-images-idx3-ubyte", split);
  int rc = load_images(dir, name, &ds, images_path, err, errlen);
  if (rc != ZN_OK) goto fail;
  snprintf(name, sizeof name, "%s-labels-idx1-ubyte", split);
  rc = load_labels(dir, name, images_path, &ds, err, errlen);
  if (rc != ZN_OK) goto fail;

  *out = ds;
  return ZN_OK;

fail:
  zn_dataset_free(&ds);
  memset(out, 0, sizeof *out);
  return rc;
}

void zn_dataset_free(zn_dataset* ds) {
  free(ds->images);
  free(ds->labels);
  memset(ds, 0, sizeof *ds);
}

void zn_data_permutation(uint32_t* perm, uint32_t n, uint64_t seed, int epoch) {
  zn_rng rng;
  zn_rng_seed(&rng, zn_rng_mix(seed ^ zn_rng_mix((uint64_t)(int64_t)epoch)));
  for (uint32_t i = 0; i < n; i++) perm[i] = i;
  for (uint32_t i = n; i > 1; i--) {
    uint32_t j = zn_rng_below(&rng, i);
    uint32_t tmp = perm[i - 1];
    perm[i - 1] = perm[j];
    perm[j] = tmp;
  }
}
