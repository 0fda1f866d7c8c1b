/* The reference sgemm of tests/gpu/refblas, which stands in for OpenBLAS in the standalone
 * GPU-check build, against OpenBLAS itself: every order and transpose combination the CBLAS
 * interface allows, on odd sizes with padded leading dimensions, alpha and beta both used.
 * The reference's symbols are renamed at compile time (see CMakeLists.txt) so both link. */
#include <math.h>
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <stdlib.h>

#include <cblas.h>
#include <cmocka.h>

void zn_ref_sgemm(int order, int ta, int tb, int m, int n, int k, float alpha, const float* a,
                  int lda, const float* b, int ldb, float beta, float* c, int ldc);

static float* random_floats(size_t n, unsigned seed) {
  float* x = malloc(n * sizeof(float));
  srand(seed);
  for (size_t i = 0; i < n; i++) x[i] = (float)rand() / RAND_MAX * 2.0f - 1.0f;
  return x;
}

static void check_case(int order, int ta, int tb) {
  const int m = 7, n = 5, k = 9, pad = 3;
  /* Stored dimensions of A (m x k, or k x m when transposed) and B, in the given order. */
  int a_rows = ta == CblasTrans ? k : m, a_cols = ta == CblasTrans ? m : k;
  int b_rows = tb == CblasTrans ? n : k, b_cols = tb == CblasTrans ? k : n;
  int row_major = order == CblasRowMajor;
  int lda = (row_major ? a_cols : a_rows) + pad, ldb = (row_major ? b_cols : b_rows) + pad;
  int ldc = (row_major ? n : m) + pad;
  size_t asz = (size_t)lda * (row_major ? a_rows : a_cols);
  size_t bsz = (size_t)ldb * (row_major ? b_rows : b_cols);
  size_t csz = (size_t)ldc * (row_major ? m : n);
  float* a = random_floats(asz, 1);
  float* b = random_floats(bsz, 2);
  float* want = random_floats(csz, 3);
  float* got = random_floats(csz, 3);
  cblas_sgemm(order, ta, tb, m, n, k, 0.75f, a, lda, b, ldb, -0.5f, want, ldc);
  zn_ref_sgemm(order, ta, tb, m, n, k, 0.75f, a, lda, b, ldb, -0.5f, got, ldc);
  for (size_t i = 0; i < csz; i++) assert_true(fabsf(got[i] - want[i]) <= 1e-5f);
  free(a), free(b), free(want), free(got);
}

static void all_combinations(void** state) {
  (void)state;
  int orders[] = {CblasRowMajor, CblasColMajor};
  int trans[] = {CblasNoTrans, CblasTrans};
  for (int o = 0; o < 2; o++)
    for (int i = 0; i < 2; i++)
      for (int j = 0; j < 2; j++) check_case(orders[o], trans[i], trans[j]);
}

int main(void) {
  const struct CMUnitTest tests[] = {cmocka_unit_test(all_combinations)};
  return cmocka_run_group_tests(tests, NULL, NULL);
}
