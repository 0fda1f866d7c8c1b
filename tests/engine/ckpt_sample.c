/* Writes the checkpoint that test_ckpt_python.py opens with numpy and torch: every value follows a
 * formula the Python test computes again on its side, so the two agree only if the file means
 * what docs/checkpoints.md says it means.
 *
 *   ckpt_sample PATH   prints "DIGEST BYTES" of the file it wrote
 *
 * The formulas are chosen to come out bit for bit the same in Python: sin through the same C
 * library (Python's math.sin calls it), 1/(i+1) and integer products exactly. */
#include <math.h>
#include <stdint.h>
#include <stdio.h>

#include "zn_ckpt.h"
#include "zn_err.h"

enum { W0 = 3, W1 = 5, W2 = 7, NW = W0 * W1 * W2, NV = 11, NC = 4 };

int main(int argc, char** argv) {
  if (argc != 2) {
    fprintf(stderr, "usage: %s PATH\n", argv[0]);
    return 2;
  }

  static float w[NW];
  static double v[NV];
  static int64_t counts[NC];
  for (int i = 0; i < NW; i++) w[i] = (float)sin(0.001 * i);
  for (int i = 0; i < NV; i++) v[i] = 1.0 / (i + 1);
  for (int i = 0; i < NC; i++) counts[i] = (int64_t)(i * i - 5) * 1000000007;
  int64_t step = 123456789012;

  /* 105 floats are 420 bytes, so "layer1.bias" starts 4 bytes off an 8-byte boundary. */
  const zn_ckpt_tensor t[] = {
      {"layer1.weight", ZN_CKPT_F32, 3, {W0, W1, W2}, w},
      {"layer1.bias", ZN_CKPT_F64, 1, {NV}, v},
      {"zenith.step", ZN_CKPT_I64, 0, {0}, &step},
      {"counts", ZN_CKPT_I64, 1, {NC}, counts},
      {"empty", ZN_CKPT_F32, 2, {0, 3}, NULL},
  };
  const zn_ckpt_meta meta[] = {{"zenith.job", "j-42"}, {"zenith.step", "1200"}, {"note", "café ✓"}};

  char digest[65], err[512];
  int64_t bytes = 0;
  int rc = zn_ckpt_write(argv[1], t, 5, meta, 3, digest, &bytes, err, sizeof err);
  if (rc != ZN_OK) {
    fprintf(stderr, "ckpt_sample: %s\n", err);
    return 1;
  }
  printf("%s %lld\n", digest, (long long)bytes);
  return 0;
}
