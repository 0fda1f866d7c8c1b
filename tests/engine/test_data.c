/* Tests of the data layer (daemon/worker/zn_data.c, zn_rng.h): the real Fashion-MNIST files load
 * with their known shape, labels and pixel statistics; every malformed file is refused with a
 * message that names the file and the fault; the RNG reproduces splitmix64's published outputs;
 * and the epoch permutation is a permutation, reproducible, and new each epoch.
 * The real-data tests read ZN_FMNIST_DIR from the environment, else the folder CMake compiled in,
 * and are skipped (not passed) when the files are absent. */
#define _POSIX_C_SOURCE 200809L

#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <zlib.h>

#include <cmocka.h>

#include "zn_data.h"
#include "zn_err.h"
#include "zn_rng.h"

/* ---- the real dataset, loaded once per split ---- */

static zn_dataset real[2];
static int real_loaded[2];

static const zn_dataset* real_split(int train) {
  if (!real_loaded[train]) {
    const char* dir = getenv("ZN_FMNIST_DIR") ? getenv("ZN_FMNIST_DIR") : ZN_FMNIST_DIR;
    char err[512] = "";
    int rc = zn_dataset_load(dir, train, &real[train], err, sizeof err);
    if (rc == ZN_ERR_IO && strstr(err, "missing")) {
      print_message("skipping: %s\n", err);
      skip();
    }
    if (rc != ZN_OK) fail_msg("loading %s: %s (%d)", dir, err, rc);
    real_loaded[train] = 1;
  }
  return &real[train];
}

static void check_shape_and_classes(int train, int count, int per_class, const int* first) {
  const zn_dataset* ds = real_split(train);
  assert_int_equal(ds->count, count);
  assert_int_equal(ds->rows, 28);
  assert_int_equal(ds->cols, 28);
  for (int i = 0; i < 10; i++) assert_int_equal(ds->labels[i], first[i]);

  int hist[ZN_FMNIST_CLASSES] = {0};
  for (int i = 0; i < ds->count; i++) hist[ds->labels[i]]++;
  for (int c = 0; c < ZN_FMNIST_CLASSES; c++) assert_int_equal(hist[c], per_class);
}

static void real_train_set_has_60000_balanced_labels(void** unused) {
  const int first[10] = {9, 0, 0, 3, 0, 2, 7, 2, 5, 5};
  check_shape_and_classes(1, 60000, 6000, first);
}

static void real_test_set_has_10000_balanced_labels(void** unused) {
  const int first[10] = {9, 2, 1, 1, 6, 1, 4, 6, 5, 7};
  check_shape_and_classes(0, 10000, 1000, first);
}

static void real_train_pixels_have_zero_mean_unit_std(void** unused) {
  const zn_dataset* ds = real_split(1);
  size_t n = (size_t)ds->count * ds->rows * ds->cols;
  double sum = 0, sumsq = 0;
  for (size_t i = 0; i < n; i++)
    sum += ds->images[i], sumsq += (double)ds->images[i] * ds->images[i];
  double mean = sum / n, std = sqrt(sumsq / n - mean * mean);
  print_message("normalised train pixels: mean %.6f std %.6f\n", mean, std);
  if (fabs(mean) > 0.01 || fabs(std - 1) > 0.01) fail_msg("mean %.6f std %.6f", mean, std);
}

/* Undoing the normalisation must give back the file's bytes: their total (from Python's gzip and
 * numpy) and a row of the first image. */
static void real_train_pixels_round_trip_to_file_bytes(void** unused) {
  const zn_dataset* ds = real_split(1);
  size_t n = (size_t)ds->count * ds->rows * ds->cols;
  uint64_t total = 0;
  for (size_t i = 0; i < n; i++) {
    total += (uint64_t)lround((ds->images[i] * ZN_FMNIST_STD + ZN_FMNIST_MEAN) * 255.0);
  }
  assert_int_equal(total, 3431114169ull);

  const int row10[28] = {0,   0,   0,   0,   0,   0,   0,   0,   0,   0,   0,   0,   0,   193,
                         228, 218, 213, 198, 180, 212, 210, 211, 213, 223, 220, 243, 202, 0};
  for (int c = 0; c < 28; c++) {
    double want = ((double)row10[c] / 255.0 - ZN_FMNIST_MEAN) / ZN_FMNIST_STD;
    double got = ds->images[10 * 28 + c];
    if (fabs(got - want) > 1e-6) fail_msg("pixel (10,%d): %.9g, expected %.9g", c, got, want);
  }
}

/* ---- malformed files, each test in its own temporary folder ---- */

static const char* const file_names[] = {
    "train-images-idx3-ubyte",    "train-labels-idx1-ubyte", "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte",  "t10k-labels-idx1-ubyte",
};

static int make_dir(void** state) {
  char* dir = malloc(64);
  if (!dir) return -1;
  snprintf(dir, 64, "/tmp/zn_test_data.XXXXXX");
  if (!mkdtemp(dir)) return -1;
  *state = dir;
  return 0;
}

static int remove_dir(void** state) {
  char* dir = *state;
  char path[256];
  for (size_t i = 0; i < sizeof file_names / sizeof file_names[0]; i++) {
    snprintf(path, sizeof path, "%s/%s", dir, file_names[i]);
    unlink(path);
  }
  int rc = rmdir(dir);
  free(dir);
  return rc;
}

static void write_file(const char* dir, const char* name, const uint8_t* bytes, size_t len) {
  char path[256];
  snprintf(path, sizeof path, "%s/%s", dir, name);
  FILE* f = fopen(path, "wb");
  assert_non_null(f);
  assert_int_equal(fwrite(bytes, 1, len, f), len);
  assert_int_equal(fclose(f), 0);
}

/* An IDX file of unsigned bytes: magic 0x000008<ndims>, the sizes, then data_len bytes. */
static size_t idx_bytes(uint8_t* out, int ndims, const uint32_t* dims, const uint8_t* data,
                        size_t data_len) {
  size_t k = 0;
  out[k++] = 0, out[k++] = 0, out[k++] = 0x08, out[k++] = (uint8_t)ndims;
  for (int i = 0; i < ndims; i++) {
    out[k++] = dims[i] >> 24, out[k++] = dims[i] >> 16, out[k++] = dims[i] >> 8;
    out[k++] = (uint8_t)dims[i];
  }
  memcpy(out + k, data, data_len);
  return k + data_len;
}

/* Three 2x2 images with bytes 0..11 and labels {3, 9, 0}: a valid pair unless a test edits it. */
static const uint8_t small_pixels[12] = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 255};
static const uint8_t small_labels[3] = {3, 9, 0};

static void write_small_images(const char* dir, size_t pixel_len) {
  uint8_t buf[64];
  const uint32_t dims[3] = {3, 2, 2};
  write_file(dir, "train-images-idx3-ubyte", buf, idx_bytes(buf, 3, dims, small_pixels, pixel_len));
}

static void write_labels(const char* dir, uint32_t count, const uint8_t* labels) {
  uint8_t buf[64];
  write_file(dir, "train-labels-idx1-ubyte", buf, idx_bytes(buf, 1, &count, labels, count));
}

/* Loads dir's train split, which must fail with rc and a message holding both needles. */
static void expect_failure(const char* dir, int rc, const char* file, const char* problem) {
  zn_dataset ds;
  char err[512] = "";
  int got = zn_dataset_load(dir, 1, &ds, err, sizeof err);
  print_message("error: %s\n", err);
  assert_int_equal(got, rc);
  assert_null(ds.images);
  assert_null(ds.labels);
  if (!strstr(err, dir) || !strstr(err, file)) fail_msg("'%s' does not name %s/%s", err, dir, file);
  if (!strstr(err, problem)) fail_msg("'%s' does not say '%s'", err, problem);
}

static void small_plain_files_load_and_normalise(void** state) {
  const char* dir = *state;
  write_small_images(dir, 12);
  write_labels(dir, 3, small_labels);

  zn_dataset ds;
  char err[256] = "";
  assert_int_equal(zn_dataset_load(dir, 1, &ds, err, sizeof err), ZN_OK);
  assert_int_equal(ds.count, 3);
  assert_int_equal(ds.rows, 2);
  assert_int_equal(ds.cols, 2);
  assert_memory_equal(ds.labels, small_labels, 3);
  for (int i = 0; i < 12; i++) {
    double want = ((double)small_pixels[i] / 255.0 - 0.2860) / 0.3530;
    if (fabs(ds.images[i] - want) > 1e-6) fail_msg("pixel %d: %.9g vs %.9g", i, ds.images[i], want);
  }
  zn_dataset_free(&ds);
}

static void gzipped_files_load(void** state) {
  const char* dir = *state;
  uint8_t buf[64];
  const uint32_t dims[3] = {3, 2, 2};
  size_t len = idx_bytes(buf, 3, dims, small_pixels, 12);
  char path[256];
  snprintf(path, sizeof path, "%s/train-images-idx3-ubyte.gz", dir);
  gzFile gz = gzopen(path, "wb");
  assert_non_null(gz);
  assert_int_equal(gzwrite(gz, buf, (unsigned)len), (int)len);
  assert_int_equal(gzclose(gz), Z_OK);
  write_labels(dir, 3, small_labels);

  zn_dataset ds;
  char err[256] = "";
  assert_int_equal(zn_dataset_load(dir, 1, &ds, err, sizeof err), ZN_OK);
  assert_int_equal(ds.count, 3);
  if (fabs(ds.images[11] - (1.0 - 0.2860) / 0.3530) > 1e-6) fail_msg("pixel 11: %g", ds.images[11]);
  zn_dataset_free(&ds);
}

static void missing_images_file_is_named(void** state) {
  expect_failure(*state, ZN_ERR_IO, "train-images-idx3-ubyte", "missing file");
}

static void missing_labels_file_is_named(void** state) {
  write_small_images(*state, 12);
  expect_failure(*state, ZN_ERR_IO, "train-labels-idx1-ubyte", "missing file");
}

static void bad_magic_number_is_named(void** state) {
  uint8_t buf[64];
  const uint32_t dims[3] = {3, 2, 2};
  size_t len = idx_bytes(buf, 3, dims, small_pixels, 12);
  buf[2] = 0x09; /* signed bytes, which the loader does not read */
  write_file(*state, "train-images-idx3-ubyte", buf, len);
  write_labels(*state, 3, small_labels);
  expect_failure(*state, ZN_ERR_INVALID, "train-images-idx3-ubyte", "bad magic number 0x00000903");
}

static void wrong_dimension_count_is_named(void** state) {
  uint8_t buf[64];
  const uint32_t dims[2] = {3, 4};
  write_file(*state, "train-images-idx3-ubyte", buf, idx_bytes(buf, 2, dims, small_pixels, 12));
  write_labels(*state, 3, small_labels);
  expect_failure(*state, ZN_ERR_INVALID, "train-images-idx3-ubyte",
                 "wrong dimension count 2 (expected 3)");
}

static void truncated_header_is_named(void** state) {
  uint8_t buf[64];
  const uint32_t dims[3] = {3, 2, 2};
  idx_bytes(buf, 3, dims, small_pixels, 12);
  write_file(*state, "train-images-idx3-ubyte", buf, 10);
  expect_failure(*state, ZN_ERR_INVALID, "train-images-idx3-ubyte",
                 "truncated header: expected 16 bytes, found 10");
}

static void truncated_pixels_are_named(void** state) {
  write_small_images(*state, 10);
  write_labels(*state, 3, small_labels);
  expect_failure(*state, ZN_ERR_INVALID, "train-images-idx3-ubyte",
                 "truncated pixel data (the header promises 3 images of 2x2): expected 12 bytes, "
                 "found 10");
}

static void truncated_gzip_stream_is_named(void** state) {
  const char* dir = *state;
  uint8_t pixels[4000], buf[4100];
  uint32_t state32 = 1;
  for (int i = 0; i < 4000; i++)
    pixels[i] = (uint8_t)((state32 = state32 * 1103515245u + 12345u) >> 24);
  const uint32_t dims[3] = {10, 20, 20};
  size_t len = idx_bytes(buf, 3, dims, pixels, 4000);
  uLongf zlen = compressBound(len) + 64;
  uint8_t* z = malloc(zlen);
  assert_non_null(z);
  char path[256];
  snprintf(path, sizeof path, "%s/train-images-idx3-ubyte.gz", dir);
  gzFile gz = gzopen(path, "wb");
  assert_non_null(gz);
  assert_int_equal(gzwrite(gz, buf, (unsigned)len), (int)len);
  assert_int_equal(gzclose(gz), Z_OK);

  /* Keep the first half of the compressed stream. */
  FILE* f = fopen(path, "rb");
  assert_non_null(f);
  size_t zgot = fread(z, 1, zlen, f);
  fclose(f);
  write_file(dir, "train-images-idx3-ubyte.gz", z, zgot / 2);
  free(z);
  expect_failure(dir, ZN_ERR_INVALID, "train-images-idx3-ubyte.gz", "truncated pixel data");
}

static void image_label_count_mismatch_names_both_files(void** state) {
  write_small_images(*state, 12);
  write_labels(*state, 2, small_labels);
  expect_failure(*state, ZN_ERR_INVALID, "train-labels-idx1-ubyte",
                 "image/label count mismatch: 2 labels");
  char err[512] = "";
  zn_dataset ds;
  zn_dataset_load(*state, 1, &ds, err, sizeof err);
  if (!strstr(err, "train-images-idx3-ubyte has 3 images")) fail_msg("'%s'", err);
}

static void label_above_9_is_named(void** state) {
  const uint8_t labels[3] = {3, 10, 0};
  write_small_images(*state, 12);
  write_labels(*state, 3, labels);
  expect_failure(*state, ZN_ERR_INVALID, "train-labels-idx1-ubyte",
                 "label 10 at index 1 is out of range (> 9)");
}

/* ---- the RNG and the epoch permutation ---- */

static void rng_reproduces_splitmix64_reference(void** unused) {
  /* splitmix64 from seed 1234567, as computed by Vigna's reference (checked here in Python). */
  const uint64_t want[5] = {6457827717110365317ull, 3203168211198807973ull, 9817491932198370423ull,
                            4593380528125082431ull, 16408922859458223821ull};
  zn_rng r;
  zn_rng_seed(&r, 1234567);
  for (int i = 0; i < 5; i++) assert_int_equal(zn_rng_next(&r), want[i]);
}

static void rng_uniform_stays_in_range_with_mean_midpoint(void** unused) {
  zn_rng r;
  zn_rng_seed(&r, 99);
  double sum = 0;
  const int n = 100000;
  for (int i = 0; i < n; i++) {
    float x = zn_rng_uniform(&r, -0.5f, 1.5f);
    if (!(x >= -0.5f && x < 1.5f)) fail_msg("draw %d = %.9g outside [-0.5, 1.5)", i, x);
    sum += x;
  }
  /* The mean of n uniforms on a width-2 interval has std 2/sqrt(12 n) = 0.0018; 0.01 is 5.5 sd. */
  if (fabs(sum / n - 0.5) > 0.01) fail_msg("mean %.6f, expected 0.5", sum / n);
  for (int i = 0; i < 1000; i++) assert_int_equal(zn_rng_below(&r, 1), 0);
}

static void check_is_permutation(const uint32_t* perm, uint32_t n) {
  uint8_t* seen = calloc(n ? n : 1, 1);
  assert_non_null(seen);
  for (uint32_t i = 0; i < n; i++) {
    if (perm[i] >= n || seen[perm[i]])
      fail_msg("perm[%u] = %u repeats or is out of range", i, perm[i]);
    seen[perm[i]] = 1;
  }
  free(seen);
}

static void permutation_is_a_permutation(void** unused) {
  const uint32_t sizes[] = {0, 1, 2, 7, 60000};
  for (size_t k = 0; k < 5; k++) {
    uint32_t n = sizes[k];
    uint32_t* perm = malloc((n ? n : 1) * sizeof(uint32_t));
    assert_non_null(perm);
    zn_data_permutation(perm, n, 42, 3);
    check_is_permutation(perm, n);
    free(perm);
  }
}

static void permutation_is_deterministic(void** unused) {
  const uint32_t n = 60000;
  uint32_t* a = malloc(n * sizeof(uint32_t));
  uint32_t* b = malloc(n * sizeof(uint32_t));
  assert_true(a && b);
  zn_data_permutation(a, n, 42, 5);
  zn_data_permutation(b, n, 42, 5);
  assert_memory_equal(a, b, n * sizeof(uint32_t));
  free(a), free(b);
}

/* Two independent permutations agree in about one position; identity agrees in all n. */
static uint32_t agreements(const uint32_t* a, const uint32_t* b, uint32_t n) {
  uint32_t same = 0;
  for (uint32_t i = 0; i < n; i++) same += a[i] == b[i];
  return same;
}

static void permutation_differs_across_epochs_and_seeds(void** unused) {
  const uint32_t n = 60000;
  uint32_t* e0 = malloc(n * sizeof(uint32_t));
  uint32_t* e1 = malloc(n * sizeof(uint32_t));
  uint32_t* s1 = malloc(n * sizeof(uint32_t));
  uint32_t* id = malloc(n * sizeof(uint32_t));
  assert_true(e0 && e1 && s1 && id);
  for (uint32_t i = 0; i < n; i++) id[i] = i;
  zn_data_permutation(e0, n, 42, 0);
  zn_data_permutation(e1, n, 42, 1);
  zn_data_permutation(s1, n, 43, 0);

  uint32_t c01 = agreements(e0, e1, n), cs = agreements(e0, s1, n), cid = agreements(e0, id, n);
  print_message("agreements: epochs %u, seeds %u, identity %u (of %u)\n", c01, cs, cid, n);
  /* Each count is about Poisson(1): 20 would be a 1e-18 event. */
  if (c01 > 20 || cs > 20 || cid > 20) fail_msg("agreements %u, %u, %u", c01, cs, cid);
  free(e0), free(e1), free(s1), free(id);
}

static int free_real(void** unused) {
  for (int i = 0; i < 2; i++) {
    if (real_loaded[i]) zn_dataset_free(&real[i]);
  }
  return 0;
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(real_train_set_has_60000_balanced_labels),
      cmocka_unit_test(real_test_set_has_10000_balanced_labels),
      cmocka_unit_test(real_train_pixels_have_zero_mean_unit_std),
      cmocka_unit_test(real_train_pixels_round_trip_to_file_bytes),
      cmocka_unit_test_setup_teardown(small_plain_files_load_and_normalise, make_dir, remove_dir),
      cmocka_unit_test_setup_teardown(gzipped_files_load, make_dir, remove_dir),
      cmocka_unit_test_setup_teardown(missing_images_file_is_named, make_dir, remove_dir),
      cmocka_unit_test_setup_teardown(missing_labels_file_is_named, make_dir, remove_dir),
      cmocka_unit_test_setup_teardown(bad_magic_number_is_named, make_dir, remove_dir),
      cmocka_unit_test_setup_teardown(wrong_dimension_count_is_named, make_dir, remove_dir),
      cmocka_unit_test_setup_teardown(truncated_header_is_named, make_dir, remove_dir),
      cmocka_unit_test_setup_teardown(truncated_pixels_are_named, make_dir, remove_dir),
      cmocka_unit_test_setup_teardown(truncated_gzip_stream_is_named, make_dir, remove_dir),
      cmocka_unit_test_setup_teardown(image_label_count_mismatch_names_both_files, make_dir,
                                      remove_dir),
      cmocka_unit_test_setup_teardown(label_above_9_is_named, make_dir, remove_dir),
      cmocka_unit_test(rng_reproduces_splitmix64_reference),
      cmocka_unit_test(rng_uniform_stays_in_range_with_mean_midpoint),
      cmocka_unit_test(permutation_is_a_permutation),
      cmocka_unit_test(permutation_is_deterministic),
      cmocka_unit_test(permutation_differs_across_epochs_and_seeds),
  };
  return cmocka_run_group_tests(tests, NULL, free_real);
}
