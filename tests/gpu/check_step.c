/* GPU checks of the CUDA ZENITH step, run by tests/gpu/run.sh on a machine
 * with an NVIDIA GPU (never by ctest: CI has no GPU).
 *
 *   1. The worked example of docs/optimizer.md through the device rule.
 *   2. Several steps on fresh random data against the CPU step (zn_zenith_step),
 *      with the bounds stated below.
 *   3. The step's achieved bandwidth on a 100M-parameter flat model against a
 *      device-to-device copy measured in the same run.
 * Prints one line per check; exits 1 if any correctness check fails. */
#include <cuda_runtime.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "check_cuda.h"
#include "zn_step.h"
#include "zn_step_cuda.h"

static int failures;

/* Three device buffers of n floats (weights, gradient, momentum), zeroed. */
static void device_buffers(size_t n, float** w, float** g, float** v) {
  size_t bytes = n * 4 > 16 ? n * 4 : 16; /* at least one float4 */
  float** bufs[3] = {w, g, v};
  for (int i = 0; i < 3; i++) {
    CHECK_CUDA(cudaMalloc((void**)bufs[i], bytes));
    CHECK_CUDA(cudaMemset(*bufs[i], 0, bytes));
  }
}

static void expect_close(const char* what, double got, double want, double rel) {
  double err = fabs(got - want) / (fabs(want) > 1e-300 ? fabs(want) : 1.0);
  if (!(err <= rel)) {
    printf("FAIL %s: got %.17g, want %.17g (relative error %.3g > %.3g)\n", what, got, want, err,
           rel);
    failures++;
  }
}

static void worked_example(void) {
  zn_zenith_params p;
  zn_zenith_params_default(&p);
  p.window = 3;
  p.lr0 = 0.1;
  const double norms[7] = {2, 4, 3, 2, 1, NAN, 0};
  const double mean[7] = {2, 3, 3, 3, 2, 2, 1};
  const double peak[7] = {2, 3, 3, 3, 3, 3, 3};
  const double lr[7] = {0.1, 0.1, 0.1, 0.1, 0.1 * 2 / 3, 0.1 * 2 / 3, 0.1 / 3};

  zn_cuda_step* s;
  char err[256];
  if (zn_cuda_step_create(&p, 1, &s, err, sizeof err) != 0) {
    printf("FAIL worked example: %s\n", err);
    failures++;
    return;
  }
  float *w, *g, *v;
  device_buffers(1, &w, &g, &v);
  double window[3];
  zn_zenith_state st = {0};
  st.window = window;
  for (int t = 0; t < 7; t++) {
    float gt = (float)norms[t];
    CHECK_CUDA(cudaMemcpy(g, &gt, sizeof gt, cudaMemcpyHostToDevice));
    zn_cuda_step_launch(s, 1.0f, w, g, v, 1, NULL);
    int outcome;
    zn_cuda_step_read(s, &st, NULL, &outcome, NULL);
    char what[64];
    snprintf(what, sizeof what, "worked example t=%d m_t", t + 1);
    expect_close(what, st.mean, mean[t], 1e-15);
    snprintf(what, sizeof what, "worked example t=%d M_t", t + 1);
    expect_close(what, st.peak, peak[t], 1e-15);
    snprintf(what, sizeof what, "worked example t=%d eta_t", t + 1);
    expect_close(what, st.lr, lr[t], 1e-15);
    if ((t == 5) != (outcome == ZN_STEP_SKIPPED_NONFINITE)) {
      printf("FAIL worked example t=%d: outcome %d\n", t + 1, outcome);
      failures++;
    }
  }
  expect_close("worked example skipped count", (double)st.skipped, 1, 0);
  printf("worked example (W=3, eta0=0.1) on the GPU: %s\n", failures ? "FAILED" : "ok");
  cudaFree(w);
  cudaFree(g);
  cudaFree(v);
  zn_cuda_step_destroy(s);
}

static float uniform(unsigned* state) {
  *state = *state * 1664525u + 1013904223u;
  return (float)((*state >> 8) / 16777216.0) * 2.0f - 1.0f;
}

/* Several steps of GPU and CPU from the same data. The norm and eta_t come
 * from double sums in different orders: 1e-12 relative. The weights differ
 * by float rounding and by the GPU's fused multiply-adds: 1e-5 relative to
 * the largest weight. */
static void against_cpu(size_t n, int nesterov, double decoupled) {
  zn_zenith_params p;
  zn_zenith_params_default(&p);
  p.window = 4;
  p.nesterov = nesterov;
  p.decoupled_decay = decoupled;
  float *hw = malloc(n * 4), *hg = malloc(n * 4), *hv = calloc(n, 4), *gw = malloc(n * 4);
  unsigned seed = 12345u + (unsigned)n;
  for (size_t i = 0; i < n; i++) hw[i] = uniform(&seed);

  float *w, *g, *v;
  device_buffers(n, &w, &g, &v);
  CHECK_CUDA(cudaMemcpy(w, hw, n * 4, cudaMemcpyHostToDevice));
  zn_cuda_step* s;
  char err[256];
  if (zn_cuda_step_create(&p, n, &s, err, sizeof err) != 0) {
    printf("FAIL create: %s\n", err);
    failures++;
    return;
  }
  double cpu_window[4], gpu_window[4];
  zn_zenith_state cpu, gpu = {0};
  zn_zenith_state_init(&p, &cpu, cpu_window);
  gpu.window = gpu_window;
  int before = failures;
  for (int step = 0; step < 6; step++) {
    for (size_t i = 0; i < n; i++) hg[i] = uniform(&seed) * (float)(1 + step % 3);
    CHECK_CUDA(cudaMemcpy(g, hg, n * 4, cudaMemcpyHostToDevice));
    double cpu_norm, gpu_norm;
    zn_zenith_step(&p, &cpu, 0.5f, hw, hg, hv, n, &cpu_norm);
    zn_cuda_step_launch(s, 0.5f, w, g, v, n, NULL);
    zn_cuda_step_read(s, &gpu, &gpu_norm, NULL, NULL);
    expect_close("norm", gpu_norm, cpu_norm, 1e-12);
    expect_close("eta_t", gpu.lr, cpu.lr, 1e-12);
  }
  CHECK_CUDA(cudaMemcpy(gw, w, n * 4, cudaMemcpyDeviceToHost));
  double max_err = 0, max_w = 0;
  for (size_t i = 0; i < n; i++) {
    max_err = fmax(max_err, fabs((double)gw[i] - hw[i]));
    max_w = fmax(max_w, fabs((double)hw[i]));
  }
  expect_close("weights (max error / max |w|)", 1.0 + max_err / max_w, 1.0, 1e-5);
  printf("GPU vs CPU step, n=%zu nesterov=%d decoupled=%g: max weight error %.3g of %.3g: %s\n", n,
         nesterov, decoupled, max_err, max_w, failures > before ? "FAILED" : "ok");
  cudaFree(w);
  cudaFree(g);
  cudaFree(v);
  zn_cuda_step_destroy(s);
  free(hw);
  free(hg);
  free(hv);
  free(gw);
}

static void bandwidth(size_t n) {
  zn_zenith_params p;
  zn_zenith_params_default(&p);
  float *w, *g, *v;
  device_buffers(n, &w, &g, &v);
  zn_cuda_step* s;
  char err[256];
  if (zn_cuda_step_create(&p, n, &s, err, sizeof err) != 0) {
    printf("FAIL create: %s\n", err);
    failures++;
    return;
  }
  cudaEvent_t a, b;
  cudaEventCreate(&a);
  cudaEventCreate(&b);
  const int reps = 20;
  for (int i = 0; i < 3; i++) zn_cuda_step_launch(s, 1.0f, w, g, v, n, NULL);
  cudaEventRecord(a, NULL);
  for (int i = 0; i < reps; i++) zn_cuda_step_launch(s, 1.0f, w, g, v, n, NULL);
  cudaEventRecord(b, NULL);
  CHECK_CUDA(cudaEventSynchronize(b));
  float step_ms;
  cudaEventElapsedTime(&step_ms, a, b);
  step_ms /= reps;

  cudaEventRecord(a, NULL);
  for (int i = 0; i < reps; i++) cudaMemcpyAsync(w, g, n * 4, cudaMemcpyDeviceToDevice, NULL);
  cudaEventRecord(b, NULL);
  CHECK_CUDA(cudaEventSynchronize(b));
  float copy_ms;
  cudaEventElapsedTime(&copy_ms, a, b);
  copy_ms /= reps;

  double step_gbs = 24.0 * n / (step_ms * 1e6), copy_gbs = 8.0 * n / (copy_ms * 1e6);
  printf("| fused step, %zu parameters | %.3f ms | %.0f GB/s |\n", n, step_ms, step_gbs);
  printf("| device-to-device copy | %.3f ms | %.0f GB/s |\n", copy_ms, copy_gbs);
  printf("| step / copy bandwidth | | %.2f |\n", step_gbs / copy_gbs);
  cudaFree(w);
  cudaFree(g);
  cudaFree(v);
  zn_cuda_step_destroy(s);
}

int main(void) {
  worked_example();
  against_cpu(1, 0, 0);
  against_cpu(1000003, 0, 0);
  against_cpu(1000003, 1, 0.01);
  bandwidth(100u * 1000u * 1000u);
  printf("%s\n", failures ? "GPU checks FAILED" : "GPU checks passed");
  return failures ? 1 : 0;
}
