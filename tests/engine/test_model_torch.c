/* The models against PyTorch. Each test initialises a zn_model, runs one training batch of 32
 * random images, then hands the same weights and batch to tests/engine/torch_reference.py, which
 * runs the equivalent nn.Sequential in float32 and returns its loss, correct count and gradients.
 *
 * Error measure: for the loss |ours - torch| / |torch| <= 1e-5; for each gradient tensor
 * max|ours - torch| / max|torch| <= 1e-4. Both sides compute in float32 and differ only in the
 * order of their sums, so agreement is near 1e-6; a wrong index or layout gives errors near 1.
 * The python script also checks the tensor names and shapes against PyTorch's state_dict. */
#define _POSIX_C_SOURCE 200809L /* mkstemp */

#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <cmocka.h>

#include "zn_err.h"
#include "zn_model.h"
#include "zn_rng.h"

#define LOSS_TOL 1e-5
#define GRAD_TOL 1e-4
#define BATCH 32

typedef struct {
  double loss;
  int correct;
  float* grads;
} torch_result;

static void random_batch(uint64_t seed, int n, float* x, uint8_t* y) {
  zn_rng rng;
  zn_rng_seed(&rng, seed);
  for (int i = 0; i < n * 784; i++) x[i] = zn_rng_uniform(&rng, 0.0f, 1.0f);
  for (int i = 0; i < n; i++) y[i] = (uint8_t)zn_rng_below(&rng, 10);
}

static void write_input(const char* path, const char* name, zn_model* m, const float* x,
                        const uint8_t* y, int n) {
  FILE* f = fopen(path, "wb");
  assert_non_null(f);
  fprintf(f, "%s %d", name, n);
  for (int i = 0; i < zn_model_num_tensors(m); i++) {
    int nd, shape[4];
    zn_model_tensor_shape(m, i, &nd, shape);
    fprintf(f, " %s:", zn_model_tensor_name(m, i));
    for (int d = 0; d < nd; d++) fprintf(f, d ? "x%d" : "%d", shape[d]);
  }
  fputc('\n', f);
  size_t np = zn_model_num_params(m);
  assert_int_equal(fwrite(zn_model_params(m), sizeof(float), np, f), np);
  assert_int_equal(fwrite(x, sizeof(float), (size_t)n * 784, f), (size_t)n * 784);
  assert_int_equal(fwrite(y, 1, (size_t)n, f), (size_t)n);
  assert_int_equal(fclose(f), 0);
}

/* Runs the PyTorch reference on the model's current weights and the batch. */
static torch_result run_torch(const char* name, zn_model* m, const float* x, const uint8_t* y,
                              int n) {
  char in[] = "/tmp/zn_torch_in_XXXXXX", out[] = "/tmp/zn_torch_out_XXXXXX";
  int fin = mkstemp(in), fout = mkstemp(out);
  assert_true(fin >= 0 && fout >= 0);
  close(fin), close(fout);
  write_input(in, name, m, x, y, n);

  char cmd[1024];
  snprintf(cmd, sizeof(cmd), "%s %s %s %s", ZN_PYTHON, ZN_TORCH_REFERENCE, in, out);
  int rc = system(cmd);
  if (rc != 0) fail_msg("PyTorch reference failed (exit %d): %s", rc, cmd);

  torch_result r = {0};
  size_t np = zn_model_num_params(m);
  r.grads = malloc(sizeof(float) * np);
  FILE* f = fopen(out, "rb");
  assert_non_null(f);
  assert_int_equal(fread(&r.loss, sizeof(double), 1, f), 1);
  assert_int_equal(fread(&r.correct, sizeof(int), 1, f), 1);
  assert_int_equal(fread(r.grads, sizeof(float), np, f), np);
  fclose(f);
  unlink(in), unlink(out);
  return r;
}

/* max|a - b| / max|b| over one tensor; fails printing the worst element on both sides. */
static void expect_tensor_close(const char* what, const float* a, const float* b, size_t n,
                                double tol) {
  double maxdiff = 0.0, maxref = 0.0;
  size_t worst = 0;
  for (size_t i = 0; i < n; i++) {
    double d = fabs((double)a[i] - b[i]);
    if (d > maxdiff) maxdiff = d, worst = i;
    if (fabs(b[i]) > maxref) maxref = fabs(b[i]);
  }
  double rel = maxdiff / maxref;
  printf("  %-9s max|ours-torch|/max|torch| = %.2e (max|torch| %.3e)\n", what, rel, maxref);
  if (!(rel <= tol))
    fail_msg("%s: rel err %.3e > %.0e; worst [%zu]: ours %.9g, torch %.9g", what, rel, tol, worst,
             (double)a[worst], (double)b[worst]);
}

static void check_against_torch(const char* name, uint64_t seed, int threads) {
  zn_model_set_threads(threads);
  zn_model* m = NULL;
  assert_int_equal(zn_model_create(name, BATCH, &m), ZN_OK);
  zn_model_init(m, seed);
  float* x = malloc(sizeof(float) * BATCH * 784);
  uint8_t y[BATCH];
  random_batch(seed + 1, BATCH, x, y);

  int correct = -1;
  float loss = zn_model_train_batch(m, x, y, BATCH, &correct);
  torch_result t = run_torch(name, m, x, y, BATCH);

  printf("  %s loss: ours %.8f, torch %.8f; correct: ours %d, torch %d\n", name, loss, t.loss,
         correct, t.correct);
  if (!(fabs(loss - t.loss) <= LOSS_TOL * fabs(t.loss)))
    fail_msg("%s loss: ours %.9g, torch %.9g", name, loss, t.loss);
  assert_int_equal(correct, t.correct);
  for (int i = 0; i < zn_model_num_tensors(m); i++) {
    size_t at = zn_model_tensor_offset(m, i);
    size_t end =
        i + 1 < zn_model_num_tensors(m) ? zn_model_tensor_offset(m, i + 1) : zn_model_num_params(m);
    expect_tensor_close(zn_model_tensor_name(m, i), zn_model_grads(m) + at, t.grads + at, end - at,
                        GRAD_TOL);
  }

  free(t.grads);
  free(x);
  zn_model_destroy(m);
}

static void cnn_loss_and_gradients_match_pytorch(void** state) {
  check_against_torch("cnn", 42, 1);
}

/* Three threads split 32 images 10/11/11, so every shard ends in a partial chunk. */
static void cnn_split_over_three_threads_matches_pytorch(void** state) {
  check_against_torch("cnn", 43, 3);
}

static void mlp_loss_and_gradients_match_pytorch(void** state) {
  check_against_torch("mlp", 7, 2);
}

/* Evaluation in chunks of max_batch (7 here) must sum the losses that one training batch of 32
 * averages, with the same weights. */
static void eval_sums_the_losses_that_train_averages(void** state) {
  zn_model *whole = NULL, *chunked = NULL;
  assert_int_equal(zn_model_create("cnn", BATCH, &whole), ZN_OK);
  assert_int_equal(zn_model_create("cnn", 7, &chunked), ZN_OK);
  zn_model_init(whole, 3);
  memcpy(zn_model_params(chunked), zn_model_params(whole),
         sizeof(float) * zn_model_num_params(whole));
  float* x = malloc(sizeof(float) * BATCH * 784);
  uint8_t y[BATCH];
  random_batch(4, BATCH, x, y);

  int c_train = -1, c_eval = -1;
  double mean = zn_model_train_batch(whole, x, y, BATCH, &c_train);
  double sum = zn_model_eval_batch(chunked, x, y, BATCH, &c_eval);
  if (!(fabs(sum - BATCH * mean) <= 1e-5 * fabs(BATCH * mean)))
    fail_msg("eval sum %.9g, %d x train mean %.9g", sum, BATCH, BATCH * mean);
  assert_int_equal(c_eval, c_train);

  free(x);
  zn_model_destroy(whole);
  zn_model_destroy(chunked);
}

/* Same seed, same weights; each tensor inside +-1/sqrt(fan_in) and reaching close to it, so
 * the bound is PyTorch's and not a smaller one. */
static void init_is_deterministic_and_uses_pytorch_bounds(void** state) {
  zn_model *a = NULL, *b = NULL;
  assert_int_equal(zn_model_create("cnn", 1, &a), ZN_OK);
  assert_int_equal(zn_model_create("cnn", 1, &b), ZN_OK);
  zn_model_init(a, 11);
  zn_model_init(b, 11);
  size_t np = zn_model_num_params(a);
  assert_memory_equal(zn_model_params(a), zn_model_params(b), sizeof(float) * np);
  zn_model_init(b, 12);
  assert_memory_not_equal(zn_model_params(a), zn_model_params(b), sizeof(float) * np);

  const int fan_in[8] = {9, 9, 288, 288, 3136, 3136, 128, 128};
  for (int i = 0; i < 8; i++) {
    size_t at = zn_model_tensor_offset(a, i);
    size_t end = i < 7 ? zn_model_tensor_offset(a, i + 1) : np;
    double bound = 1.0 / sqrt(fan_in[i]), maxabs = 0.0;
    for (size_t j = at; j < end; j++) maxabs = fmax(maxabs, fabs(zn_model_params(a)[j]));
    double floor = end - at >= 100 ? 0.95 * bound : 0.5 * bound;
    if (maxabs >= bound || maxabs < floor)
      fail_msg("%s: max|w| %.6f, bound %.6f", zn_model_tensor_name(a, i), maxabs, bound);
  }
  zn_model_destroy(a);
  zn_model_destroy(b);
}

static void tensor_table_is_the_pytorch_state_dict(void** state) {
  static const struct {
    const char* name;
    int ndim, shape[4];
  } want[8] = {
      {"0.weight", 4, {32, 1, 3, 3}},  {"0.bias", 1, {32}},
      {"3.weight", 4, {64, 32, 3, 3}}, {"3.bias", 1, {64}},
      {"7.weight", 2, {128, 3136}},    {"7.bias", 1, {128}},
      {"9.weight", 2, {10, 128}},      {"9.bias", 1, {10}},
  };
  zn_model* m = NULL;
  assert_int_equal(zn_model_create("cnn", 1, &m), ZN_OK);
  assert_int_equal(zn_model_num_tensors(m), 8);
  size_t at = 0;
  for (int i = 0; i < 8; i++) {
    int nd, shape[4];
    zn_model_tensor_shape(m, i, &nd, shape);
    assert_string_equal(zn_model_tensor_name(m, i), want[i].name);
    assert_int_equal(nd, want[i].ndim);
    size_t count = 1;
    for (int d = 0; d < nd; d++) assert_int_equal(shape[d], want[i].shape[d]), count *= shape[d];
    assert_int_equal(zn_model_tensor_offset(m, i), at);
    at += count;
  }
  assert_int_equal(zn_model_num_params(m), 421642);
  zn_model_destroy(m);

  assert_int_equal(zn_model_create("mlp", 1, &m), ZN_OK);
  assert_int_equal(zn_model_num_params(m), 784 * 256 + 256 + 256 * 10 + 10);
  zn_model_destroy(m);
}

static void create_rejects_unknown_model_and_bad_batch(void** state) {
  zn_model* m = (zn_model*)&m;
  assert_int_equal(zn_model_create("resnet", 8, &m), ZN_ERR_INVALID);
  assert_null(m);
  assert_int_equal(zn_model_create("cnn", 0, &m), ZN_ERR_INVALID);
  assert_null(m);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(cnn_loss_and_gradients_match_pytorch),
      cmocka_unit_test(cnn_split_over_three_threads_matches_pytorch),
      cmocka_unit_test(mlp_loss_and_gradients_match_pytorch),
      cmocka_unit_test(eval_sums_the_losses_that_train_averages),
      cmocka_unit_test(init_is_deterministic_and_uses_pytorch_bounds),
      cmocka_unit_test(tensor_table_is_the_pytorch_state_dict),
      cmocka_unit_test(create_rejects_unknown_model_and_bad_batch),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
