/* A plain sgemm, so that the CPU reference of the GPU checks builds on a GPU machine without
 * any BLAS (a bare CUDA image): C = alpha op(A) op(B) + beta C. It is slow (no blocking, no
 * vectors) but exact in the ordinary sense (a double accumulator per element), which is all a
 * reference for checks on batches of a few dozen images needs. The daemons never link it. */
#include "cblas.h"

#include <stddef.h>

/* Element (i, j) of op(X), X stored row-major with leading dimension ld. */
static float at(const float* x, int ld, int trans, int i, int j) {
  return trans ? x[(size_t)j * ld + i] : x[(size_t)i * ld + j];
}

static void sgemm_row_major(int ta, int tb, int m, int n, int k, float alpha, const float* a,
                            int lda, const float* b, int ldb, float beta, float* c, int ldc) {
  for (int i = 0; i < m; i++)
    for (int j = 0; j < n; j++) {
      double acc = 0.0;
      for (int p = 0; p < k; p++) acc += (double)at(a, lda, ta, i, p) * at(b, ldb, tb, p, j);
      float* out = &c[(size_t)i * ldc + j];
      *out = (float)(alpha * acc + (beta == 0.0f ? 0.0 : (double)beta * *out));
    }
}

void cblas_sgemm(CBLAS_ORDER order, CBLAS_TRANSPOSE ta, CBLAS_TRANSPOSE tb, int m, int n, int k,
                 float alpha, const float* a, int lda, const float* b, int ldb, float beta,
                 float* c, int ldc) {
  int at_ = ta == CblasTrans, bt = tb == CblasTrans;
  if (order == CblasRowMajor)
    sgemm_row_major(at_, bt, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
  else /* column-major C = op(A) op(B) is row-major C^T = op(B)^T op(A)^T */
    sgemm_row_major(bt, at_, n, m, k, alpha, b, ldb, a, lda, beta, c, ldc);
}

void openblas_set_num_threads(int n) {
  (void)n;
}
