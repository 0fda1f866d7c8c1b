/* The models' parameter layout; see zn_model_layout.h. */
#include "zn_model_layout.h"

#include <math.h>
#include <string.h>

#include "zn_rng.h"

static const zn_tensor_spec mlp_tensors[] = {
    {"1.weight", 2, {256, 784}, 784},
    {"1.bias", 1, {256}, 784},
    {"3.weight", 2, {10, 256}, 256},
    {"3.bias", 1, {10}, 256},
};

static const zn_tensor_spec cnn_tensors[] = {
    {"0.weight", 4, {32, 1, 3, 3}, 9},    {"0.bias", 1, {32}, 9},
    {"3.weight", 4, {64, 32, 3, 3}, 288}, {"3.bias", 1, {64}, 288},
    {"7.weight", 2, {128, 3136}, 3136},   {"7.bias", 1, {128}, 3136},
    {"9.weight", 2, {10, 128}, 128},      {"9.bias", 1, {10}, 128},
};

static const zn_model_layout layouts[] = {
    {"mlp", mlp_tensors, 4},
    {"cnn", cnn_tensors, 8},
};

const zn_model_layout* zn_model_layout_find(const char* name) {
  for (size_t i = 0; name && i < sizeof layouts / sizeof layouts[0]; i++)
    if (strcmp(layouts[i].model, name) == 0) return &layouts[i];
  return NULL;
}

size_t zn_layout_tensor_count(const zn_model_layout* l, int i) {
  size_t c = 1;
  for (int d = 0; d < l->tensors[i].ndim; d++) c *= (size_t)l->tensors[i].shape[d];
  return c;
}

size_t zn_layout_tensor_offset(const zn_model_layout* l, int i) {
  size_t at = 0;
  for (int j = 0; j < i; j++) at += zn_layout_tensor_count(l, j);
  return at;
}

size_t zn_layout_num_params(const zn_model_layout* l) {
  return zn_layout_tensor_offset(l, l->ntensors);
}

void zn_layout_init(const zn_model_layout* l, float* params, uint64_t seed) {
  zn_rng rng;
  zn_rng_seed(&rng, seed);
  for (int i = 0; i < l->ntensors; i++) {
    float bound = (float)(1.0 / sqrt((double)l->tensors[i].fan_in));
    float* p = params + zn_layout_tensor_offset(l, i);
    size_t count = zn_layout_tensor_count(l, i);
    for (size_t j = 0; j < count; j++) p[j] = zn_rng_uniform(&rng, -bound, bound);
  }
}
