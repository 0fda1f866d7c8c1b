/* The two models a worker can train on 28x28 single-channel images with 10 classes, built from
 * the CPU layers in kernels/zn_layers.h:
 *   mlp: flatten 784, Linear 256, ReLU, Linear 10
 *   cnn: Conv 1->32 3x3 pad 1, ReLU, MaxPool 2, Conv 32->64 3x3 pad 1, ReLU, MaxPool 2,
 *        flatten 3136, Linear 128, ReLU, Linear 10
 * All parameters live in one flat float buffer, and all gradients in a second one with the same
 * layout, so the allreduce and the optimizer step each see a single array. Within the buffers the
 * tensors are laid out, named and shaped like the state_dict of the equivalent PyTorch
 * nn.Sequential ("0.weight" [32,1,3,3], ...), so weights move to and from PyTorch unchanged.
 *
 * A model owns the activation buffers of a batch of up to max_batch images. It is not safe to use
 * one model from two threads at once (it runs its own threads inside each call). */
#ifndef ZN_MODEL_H
#define ZN_MODEL_H

#include <stddef.h>
#include <stdint.h>

typedef struct zn_model zn_model;

/* name is "mlp" or "cnn"; returns ZN_OK, ZN_ERR_INVALID (unknown name, max_batch < 1) or
 * ZN_ERR_NOMEM. Parameters start at zero: call zn_model_init. */
int zn_model_create(const char* name, int max_batch, zn_model** out);
void zn_model_destroy(zn_model* m);

/* Makes the parameter and gradient buffers hold at least `floats` floats (zeros past the
 * parameters), for collectives that work on padded blocks; values are kept. The pointers of
 * zn_model_params and zn_model_grads change. */
int zn_model_reserve(zn_model* m, size_t floats);

size_t zn_model_num_params(const zn_model* m);
float* zn_model_params(zn_model* m);
float* zn_model_grads(zn_model* m);
int zn_model_max_batch(const zn_model* m);

/* PyTorch's default initialisation: every weight and bias tensor, in state_dict order, drawn
 * U(-1/sqrt(fan_in), 1/sqrt(fan_in)) from a zn_rng seeded with seed (kaiming-uniform with
 * a = sqrt(5) gives exactly that bound for the weights). */
void zn_model_init(zn_model* m, uint64_t seed);

/* Forward and backward on n <= max_batch images x[n][1][28][28] with labels y[n] in 0..9.
 * OVERWRITES the gradient buffer with d(mean loss over the n)/d(params) and returns that mean
 * loss; *correct (may be NULL) counts correct argmax predictions. */
float zn_model_train_batch(zn_model* m, const float* x, const uint8_t* y, int n, int* correct);

/* Forward only, on any n (taken max_batch at a time): returns the SUM of the n losses. */
double zn_model_eval_batch(zn_model* m, const float* x, const uint8_t* y, int n, int* correct);

/* The parameter tensors, in state_dict order: name, shape (ndim <= 4) and offset in floats from
 * the start of the parameter (and gradient) buffer. */
int zn_model_num_tensors(const zn_model* m);
const char* zn_model_tensor_name(const zn_model* m, int i);
void zn_model_tensor_shape(const zn_model* m, int i, int* ndim, int shape[4]);
size_t zn_model_tensor_offset(const zn_model* m, int i);

/* Threads each training or evaluation batch is split over, process-wide (1 to 64; default 1).
 * Each thread takes a contiguous share of the batch and runs it with single-threaded OpenBLAS, so
 * this also sets OpenBLAS to one thread (openblas_set_num_threads(1)). Until it is called,
 * OpenBLAS keeps its own thread count and a batch runs as one share. */
void zn_model_set_threads(int n);

#endif
