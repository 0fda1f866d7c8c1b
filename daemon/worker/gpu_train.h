/* Data-parallel training steps on one GPU: what the trainer runs for a cuda job, and what the
 * GPU benchmark times. The training and test sets are copied to the device once; each step
 * gathers its batch there, runs forward and backward (zn_gpu_model.h), allreduces the gradient
 * with NCCL, and takes the ZENITH step on the device (zn_step_cuda.h). The host only queues:
 * it learns a step's loss, n_t and rate from a small report copied back asynchronously, one
 * step behind, so the GPU never waits for the host.
 *
 * After a first step run directly (it warms up cuBLAS, cuDNN and NCCL), the step can be captured
 * once as a CUDA graph and replayed: one launch per step instead of some twenty. A capture that
 * fails falls back to direct launches for the rest of the run, with a warning, on every rank:
 * the ranks vote on it, as NCCL needs a collective graph-launched everywhere or nowhere.
 *
 * The stop flag rides in the allreduce as in the CPU trainer, so all ranks see it at the same
 * step; as results arrive one step late, every rank also runs the one step queued after it. */
#ifndef ZN_GPU_TRAIN_H
#define ZN_GPU_TRAIN_H

#include <stddef.h>
#include <stdint.h>

#include "zenith_rule.h"
#include "zn_comm.h"
#include "zn_data.h"

typedef struct gpu_train gpu_train;

typedef struct {
  const char* model; /* "mlp" or "cnn" */
  int device;        /* CUDA device index */
  int rank, world;
  int global_batch; /* a step's images over all ranks; this rank takes global_batch / world */
  const zn_zenith_params* params;
  uint64_t seed;  /* initialisation, as zn_model_init */
  int cuda_graph; /* capture the step as a CUDA graph after the first one */
} gpu_train_config;

/* What the host learns of one step once it is done: the rule's report, the mean loss over the
 * global batch, and whether any rank asked to stop at this step. */
typedef struct {
  double norm;
  zn_zenith_state state; /* window pointer meaningless */
  int outcome;           /* a zn_step_outcome */
  double loss;
  int stop;
} gpu_step_result;

/* Creates the model, the step and the stream on cfg->device and copies both data sets to the
 * device. ZN_OK or a zn_err code with err filled. */
int gpu_train_create(const gpu_train_config* cfg, const zn_dataset* train, const zn_dataset* test,
                     gpu_train** out, char* err, size_t errlen);
void gpu_train_destroy(gpu_train* g);

/* The stream (a cudaStream_t) to create the NCCL communicator on, and the communicator to use
 * (NULL, or one of size 1, in a world of one). Setting it drops a step graph captured with the
 * previous one: set NULL before destroying a communicator, which NCCL refuses to do (it waits)
 * while a graph still uses it. */
void* gpu_train_stream(gpu_train* g);
void gpu_train_set_comm(gpu_train* g, zn_comm* comm);

size_t gpu_train_num_params(const gpu_train* g);

/* Waits for every queued step (their results stay readable with gpu_train_next_result), then
 * uploads the epoch's order of the training set and sets the step cursor to first_step, the
 * epoch's step the next one is (0, or where a resumed checkpoint stopped). */
int gpu_train_start_epoch(gpu_train* g, const uint32_t* perm, int count, int64_t first_step,
                          char* err, size_t errlen);

/* Queues one step; stop is this rank's vote to stop there. At most two steps are in flight:
 * take a result before queueing a third. */
int gpu_train_queue_step(gpu_train* g, int stop, char* err, size_t errlen);

/* Steps queued and not yet taken with gpu_train_next_result. */
int gpu_train_in_flight(const gpu_train* g);

/* Waits for the oldest step in flight (under the collectives' watchdog) and returns its result. */
int gpu_train_next_result(gpu_train* g, gpu_step_result* out, char* err, size_t errlen);

/* Mean loss and accuracy over the test set, every rank scoring its slice; steps must have been
 * taken (no step in flight). */
int gpu_train_evaluate(gpu_train* g, double* loss, double* accuracy, char* err, size_t errlen);

/* The training state, for a checkpoint and back from one: parameters and momentum (num_params
 * floats each, zn_model's layout) and the ZENITH state (state->window: params.window doubles of
 * host memory). Both wait for the queued steps first. */
int gpu_train_get_state(gpu_train* g, float* params, float* momentum, zn_zenith_state* state,
                        char* err, size_t errlen);
int gpu_train_set_state(gpu_train* g, const float* params, const float* momentum,
                        const zn_zenith_state* state, char* err, size_t errlen);

#endif
