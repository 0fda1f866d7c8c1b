/* The parameter layout of the models, shared by the CPU model (zn_model.h) and the GPU model
 * (zn_gpu_model.h) so the two cannot disagree: each model's tensors in state_dict order, with
 * the names and shapes of the equivalent PyTorch nn.Sequential, packed one after the other in a
 * flat float buffer, and PyTorch's default initialisation of that buffer. Needs no BLAS and no
 * GPU: tools that only move parameters link it alone. */
#ifndef ZN_MODEL_LAYOUT_H
#define ZN_MODEL_LAYOUT_H

#include <stddef.h>
#include <stdint.h>

typedef struct {
  const char* name; /* "0.weight", ... */
  int ndim;
  int shape[4];
  int fan_in; /* of the layer the tensor belongs to: sets its initialisation bound */
} zn_tensor_spec;

typedef struct {
  const char* model; /* "mlp" or "cnn" */
  const zn_tensor_spec* tensors;
  int ntensors;
} zn_model_layout;

/* The layout of the model called name, or NULL if there is none. */
const zn_model_layout* zn_model_layout_find(const char* name);

/* Elements of tensor i, its offset in floats from the start of the buffer, and the whole
 * buffer's length in floats. */
size_t zn_layout_tensor_count(const zn_model_layout* l, int i);
size_t zn_layout_tensor_offset(const zn_model_layout* l, int i);
size_t zn_layout_num_params(const zn_model_layout* l);

/* PyTorch's default initialisation: every tensor, in order, drawn U(-1/sqrt(fan_in),
 * 1/sqrt(fan_in)) from a zn_rng seeded with seed (kaiming-uniform with a = sqrt(5) gives exactly
 * that bound for the weights). */
void zn_layout_init(const zn_model_layout* l, float* params, uint64_t seed);

#endif
