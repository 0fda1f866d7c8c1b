/* The part of the CBLAS interface Zenith's CPU layers use (sgemm, row- or column-major), for the
 * standalone GPU-check build on a machine with no BLAS installed (see ref_sgemm.c). Everywhere
 * else the layers compile against OpenBLAS's own cblas.h. */
#ifndef ZN_REFBLAS_CBLAS_H
#define ZN_REFBLAS_CBLAS_H

typedef enum { CblasRowMajor = 101, CblasColMajor = 102 } CBLAS_ORDER;
typedef enum { CblasNoTrans = 111, CblasTrans = 112 } CBLAS_TRANSPOSE;

void cblas_sgemm(CBLAS_ORDER order, CBLAS_TRANSPOSE ta, CBLAS_TRANSPOSE tb, int m, int n, int k,
                 float alpha, const float* a, int lda, const float* b, int ldb, float beta,
                 float* c, int ldc);

/* Accepted and ignored: the reference sgemm has no threads. */
void openblas_set_num_threads(int n);

#endif
