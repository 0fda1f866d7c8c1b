/* The training data: Fashion-MNIST in its IDX files, read whole into memory as normalised float
 * images and byte labels, and the per-epoch order in which a worker visits them. Every worker
 * computes the same permutation from the job's seed and the epoch, so the shards they take from
 * it are disjoint without any coordination. */
#ifndef ZN_DATA_H
#define ZN_DATA_H

#include <stddef.h>
#include <stdint.h>

/* Per-pixel normalisation of Fashion-MNIST's training set, after scaling bytes to [0, 1]. */
#define ZN_FMNIST_MEAN 0.2860f
#define ZN_FMNIST_STD 0.3530f
#define ZN_FMNIST_CLASSES 10

typedef struct {
  int count, rows, cols;
  float* images;   /* count * rows * cols, row-major, (x/255 - MEAN) / STD */
  uint8_t* labels; /* count, each < ZN_FMNIST_CLASSES */
} zn_dataset;

/* Loads {train,t10k}-images-idx3-ubyte and -labels-idx1-ubyte from dir, each either plain or
 * with a .gz suffix. Returns ZN_OK, or ZN_ERR_IO (a file missing or unreadable), ZN_ERR_INVALID
 * (malformed contents) or ZN_ERR_NOMEM, with err naming the file and the fault; *out is then
 * zeroed and owns nothing. */
int zn_dataset_load(const char* dir, int train, zn_dataset* out, char* err, size_t errlen);

void zn_dataset_free(zn_dataset* ds);

/* Writes a permutation of 0 .. n-1 to perm: Fisher-Yates driven by a zn_rng seeded with
 * zn_rng_mix(seed ^ zn_rng_mix(epoch)). Mixing the epoch before combining it keeps the epochs'
 * streams unrelated (adding it to the state would make one epoch's stream a shift of the next). */
void zn_data_permutation(uint32_t* perm, uint32_t n, uint64_t seed, int epoch);

#endif
