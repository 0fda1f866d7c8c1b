/* Checkpoint files: named tensors plus string metadata, in the safetensors layout so that numpy
 * and PyTorch users can open them without Zenith (docs/checkpoints.md gives the format and a
 * loader). A file carries the SHA-256 of its own bytes under the metadata key "zenith.sha256";
 * the reader refuses any file whose digest, sizes or offsets do not hold. Writes are atomic and
 * durable: a crash leaves the old file or the new one at the path, never a mix.
 *
 * Every function that can fail returns ZN_OK or a negative zn_err code (zn_err.h) and writes a
 * message into err that names the file and what is wrong with it. */
#ifndef ZN_CKPT_H
#define ZN_CKPT_H

#include <stddef.h>
#include <stdint.h>

#define ZN_CKPT_MAX_DIMS 4
/* The metadata key the library writes itself; callers may not use it. */
#define ZN_CKPT_DIGEST_KEY "zenith.sha256"

typedef enum { ZN_CKPT_F32, ZN_CKPT_F64, ZN_CKPT_I64 } zn_ckpt_dtype;

/* One tensor, row-major and little-endian. ndim 0 is a scalar (one element); a zero in shape makes
 * an empty tensor. The name may be any UTF-8 string except "__metadata__". */
typedef struct {
  const char* name;
  zn_ckpt_dtype dtype;
  int ndim;
  int64_t shape[ZN_CKPT_MAX_DIMS];
  const void* data;
} zn_ckpt_tensor;

typedef struct {
  const char* key;
  const char* value;
} zn_ckpt_meta;

/* Elements in a tensor: the product of its shape, 1 for a scalar. */
int64_t zn_ckpt_numel(const zn_ckpt_tensor* t);

/* Writes the tensors, in the order given, and the metadata to path atomically. digest_hex receives
 * the file's digest (64 hex digits and a NUL) and *bytes its size; either may be NULL. Names and
 * metadata keys must be unique. On failure the file at path, if any, is untouched. */
int zn_ckpt_write(const char* path, const zn_ckpt_tensor* tensors, int ntensors,
                  const zn_ckpt_meta* meta, int nmeta, char digest_hex[65], int64_t* bytes,
                  char* err, size_t errlen);

/* A checkpoint read into memory and verified. */
typedef struct zn_ckpt zn_ckpt;

/* Reads and verifies the whole file. Each tensor's data is aligned for its dtype. */
int zn_ckpt_read(const char* path, zn_ckpt** out, char* err, size_t errlen);

/* Tensors in file order; the pointers live as long as the checkpoint. */
int zn_ckpt_num_tensors(const zn_ckpt* c);
const zn_ckpt_tensor* zn_ckpt_tensor_at(const zn_ckpt* c, int i);
/* The tensor called name, or NULL. */
const zn_ckpt_tensor* zn_ckpt_find(const zn_ckpt* c, const char* name);
/* The metadata value under key, or NULL. */
const char* zn_ckpt_meta_get(const zn_ckpt* c, const char* key);
/* The verified digest, 64 lowercase hex digits. */
const char* zn_ckpt_digest(const zn_ckpt* c);

void zn_ckpt_free(zn_ckpt* c);

#endif
