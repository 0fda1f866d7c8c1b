/* The mlp and cnn models of zn_model.h on an NVIDIA GPU: the same tensors, in the same flat
 * layout and order (so a parameter buffer moves between the CPU and the GPU model unchanged),
 * computed with cuBLAS (the GEMMs), cuDNN (convolutions and pooling) and small kernels of
 * kernels/cuda/zn_layers_cuda.h (bias, ReLU, loss, bias gradient).
 *
 * Every call that computes only QUEUES work on the model's stream and returns: nothing
 * synchronises, nothing allocates, and every pointer it is given is a device pointer, so a
 * training step built from these calls can be captured in a CUDA graph and replayed. All buffers
 * are allocated at creation for batches of up to max_batch images; convolution algorithms are
 * chosen there too, among cuDNN's deterministic ones, so two runs give the same bits.
 *
 * One model is used from one thread at a time. */
#ifndef ZN_GPU_MODEL_H
#define ZN_GPU_MODEL_H

#include <stddef.h>
#include <stdint.h>

typedef struct zn_gpu_model zn_gpu_model;

/* name is "mlp" or "cnn"; device is the CUDA device index (made current on the calling thread),
 * stream a cudaStream_t on it (the model's cuBLAS and cuDNN handles are bound to it). ZN_OK, or a
 * zn_err code with err filled: ZN_ERR_INVALID (unknown name, max_batch < 1), ZN_ERR_NOMEM,
 * ZN_ERR_IO (a CUDA, cuBLAS or cuDNN failure, named in err). Parameters start at zero: upload
 * them with zn_gpu_model_set_params. Creation runs one training and one evaluation batch of
 * max_batch zero images and waits for them, so every library kernel is loaded before a graph is
 * captured; with the cuDNN handle (the cnn's) it takes about a second. Destroy the model before
 * its stream. */
int zn_gpu_model_create(const char* name, int max_batch, int device, void* stream,
                        zn_gpu_model** out, char* err, size_t errlen);
void zn_gpu_model_destroy(zn_gpu_model* m);

size_t zn_gpu_model_num_params(const zn_gpu_model* m);

/* Device buffers. params: num_params floats. grads: num_params + 2 floats, the last two free for
 * the caller (the trainer puts the batch loss and its stop flag there, so one allreduce carries
 * all three). Both are 256-byte aligned. */
float* zn_gpu_model_params(zn_gpu_model* m);
float* zn_gpu_model_grads(zn_gpu_model* m);

/* Copies num_params floats from or to host memory, laid out as zn_model's buffer; these two
 * synchronise the stream. ZN_OK or ZN_ERR_IO. */
int zn_gpu_model_set_params(zn_gpu_model* m, const float* host);
int zn_gpu_model_get_params(zn_gpu_model* m, float* host);

/* Queues forward and backward on n <= max_batch images x[n][784] (device) with labels y[n]
 * (device, 0..9): OVERWRITES the gradient buffer's first num_params floats with d(mean loss over
 * the n)/d(params) and writes the mean loss, as a float, to *loss (device; may point into the
 * gradient buffer's spare floats). ZN_OK, or ZN_ERR_IO if a launch failed, ZN_ERR_INVALID if n
 * is not in 1..max_batch (zn_gpu_model_error says which). */
int zn_gpu_model_train_batch(zn_gpu_model* m, const float* x, const uint8_t* y, int n, float* loss);

/* Queues a forward pass on n <= max_batch images and ADDS, on the device, the sum of the n
 * losses to sums[0] and the number of correct argmax predictions to sums[1] (doubles). */
int zn_gpu_model_eval_batch(zn_gpu_model* m, const float* x, const uint8_t* y, int n, double* sums);

/* What made the last failing call fail, naming the CUDA, cuBLAS or cuDNN call; "" if none did. */
const char* zn_gpu_model_error(const zn_gpu_model* m);

#endif
