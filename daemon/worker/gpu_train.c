/* GPU training steps; see gpu_train.h.
 *
 * One step, in stream order:
 *   (direct)  this rank's stop vote, copied from pinned host memory into the gradient buffer's
 *             last float;
 *   (graph)   gather the batch at the device cursor, forward and backward (the mean loss lands
 *             in the float before the vote), allreduce of gradient + loss + vote, the ZENITH
 *             step with the 1/world of the sum folded in, advance the cursor;
 *   (direct)  copy the rule's report and the reduced loss and vote to a pinned slot, record the
 *             slot's event.
 * The parts marked direct stay outside the graph because their host addresses alternate between
 * two slots: a step's slot is reused two steps later, by which time the host has waited for it. */
#include "gpu_train.h"

#include <cuda_runtime_api.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "zn_batch_cuda.h"
#include "zn_err.h"
#include "zn_gpu_model.h"
#include "zn_log.h"
#include "zn_model_layout.h"
#include "zn_step_cuda.h"

#define PIXELS (28 * 28)
#define SLOTS 2

/* Pinned host memory a step's results are copied into. */
typedef struct {
  zn_cuda_step_report report;
  float loss_and_stop[2]; /* reduced sums: loss over ranks, stop votes */
  float vote;             /* this rank's stop vote, read by the step's first copy */
} slot;

struct gpu_train {
  gpu_train_config cfg;
  int local_batch, eval_batch;
  cudaStream_t stream;
  zn_gpu_model* model;
  zn_cuda_step* step;
  zn_comm* comm;
  size_t n; /* parameters */
  float* momentum;
  float *train_x, *test_x; /* the data sets on the device */
  uint8_t *train_y, *test_y;
  int train_count, test_count;
  float* batch_x; /* this rank's share of the step's batch */
  uint8_t* batch_y;
  uint32_t* perm;  /* the epoch's order */
  int64_t* cursor; /* steps taken in the epoch */
  double* eval_sums;
  slot* slots; /* SLOTS of them, pinned */
  cudaEvent_t done[SLOTS];
  int64_t queued, taken; /* steps queued and results taken since creation */
  cudaGraphExec_t graph;
  int graph_state; /* 0: not captured yet, 1: replaying, -1: off */
};

/* Sets err from a CUDA status and returns ZN_ERR_IO; ZN_OK on success. */
static int cuda_ok(cudaError_t e, const char* what, char* err, size_t errlen) {
  if (e == cudaSuccess) return ZN_OK;
  snprintf(err, errlen, "%s: CUDA: %s", what, cudaGetErrorString(e));
  return ZN_ERR_IO;
}

/* For a call that failed: the CUDA error it left, and ZN_ERR_IO in every case. */
static int failed(const char* what, char* err, size_t errlen) {
  cudaError_t e = cudaGetLastError();
  snprintf(err, errlen, "%s: CUDA: %s", what,
           e == cudaSuccess ? "the launch failed" : cudaGetErrorString(e));
  return ZN_ERR_IO;
}

static int upload(void** dst, const void* src, size_t bytes, const char* what, char* err,
                  size_t errlen) {
  int rc = cuda_ok(cudaMalloc(dst, bytes > 0 ? bytes : 1), what, err, errlen);
  if (rc == ZN_OK && bytes > 0)
    rc = cuda_ok(cudaMemcpy(*dst, src, bytes, cudaMemcpyHostToDevice), what, err, errlen);
  return rc;
}

static int upload_data(gpu_train* g, const zn_dataset* train, const zn_dataset* test, char* err,
                       size_t errlen) {
  g->train_count = train->count;
  g->test_count = test->count;
  size_t tr = (size_t)train->count, te = (size_t)test->count;
  int rc = upload((void**)&g->train_x, train->images, tr * PIXELS * sizeof(float),
                  "copying the training images to the GPU", err, errlen);
  if (rc == ZN_OK)
    rc = upload((void**)&g->train_y, train->labels, tr, "copying the training labels", err, errlen);
  if (rc == ZN_OK)
    rc = upload((void**)&g->test_x, test->images, te * PIXELS * sizeof(float),
                "copying the test images to the GPU", err, errlen);
  if (rc == ZN_OK)
    rc = upload((void**)&g->test_y, test->labels, te, "copying the test labels", err, errlen);
  return rc;
}

/* PyTorch's initialisation, drawn on the host exactly as the CPU model draws it. */
static int init_params(gpu_train* g, char* err, size_t errlen) {
  const zn_model_layout* layout = zn_model_layout_find(g->cfg.model);
  float* host = layout ? malloc(g->n * sizeof(float)) : NULL;
  if (!host) {
    snprintf(err, errlen, "cannot lay out the initial parameters of model '%s'", g->cfg.model);
    return ZN_ERR_INVALID;
  }
  zn_layout_init(layout, host, g->cfg.seed);
  int rc = zn_gpu_model_set_params(g->model, host);
  free(host);
  if (rc != ZN_OK) snprintf(err, errlen, "copying the initial parameters to the GPU failed");
  return rc;
}

static int alloc_state(gpu_train* g, char* err, size_t errlen) {
  size_t n = g->n;
  int rc = cuda_ok(cudaMalloc((void**)&g->momentum, n * sizeof(float)), "momentum", err, errlen);
  if (rc == ZN_OK)
    rc = cuda_ok(cudaMemset(g->momentum, 0, n * sizeof(float)), "momentum", err, errlen);
  if (rc == ZN_OK)
    rc = cuda_ok(cudaMalloc((void**)&g->perm, (size_t)g->train_count * sizeof(uint32_t)),
                 "the epoch's order", err, errlen);
  if (rc == ZN_OK)
    rc = cuda_ok(cudaMalloc((void**)&g->cursor, sizeof(int64_t)), "the cursor", err, errlen);
  if (rc == ZN_OK)
    rc = cuda_ok(cudaMalloc((void**)&g->batch_x, (size_t)g->local_batch * PIXELS * sizeof(float)),
                 "the batch", err, errlen);
  if (rc == ZN_OK)
    rc = cuda_ok(cudaMalloc((void**)&g->batch_y, (size_t)g->local_batch), "the batch labels", err,
                 errlen);
  if (rc == ZN_OK)
    rc = cuda_ok(cudaMalloc((void**)&g->eval_sums, 2 * sizeof(double)), "eval sums", err, errlen);
  if (rc == ZN_OK)
    rc = cuda_ok(cudaHostAlloc((void**)&g->slots, SLOTS * sizeof(slot), cudaHostAllocDefault),
                 "pinned result slots", err, errlen);
  for (int i = 0; rc == ZN_OK && i < SLOTS; i++)
    rc = cuda_ok(cudaEventCreateWithFlags(&g->done[i], cudaEventDisableTiming), "events", err,
                 errlen);
  return rc;
}

int gpu_train_create(const gpu_train_config* cfg, const zn_dataset* train, const zn_dataset* test,
                     gpu_train** out, char* err, size_t errlen) {
  *out = NULL;
  gpu_train* g = calloc(1, sizeof *g);
  if (!g) return ZN_ERR_NOMEM;
  g->cfg = *cfg;
  g->graph_state = cfg->cuda_graph ? 0 : -1;
  g->local_batch = cfg->global_batch / cfg->world;
  g->eval_batch = g->local_batch > 500 ? g->local_batch : 500;
  int rc = cuda_ok(cudaSetDevice(cfg->device), "selecting the GPU", err, errlen);
  if (rc == ZN_OK)
    rc = cuda_ok(cudaStreamCreateWithFlags(&g->stream, cudaStreamNonBlocking), "a stream", err,
                 errlen);
  if (rc == ZN_OK)
    rc = zn_gpu_model_create(cfg->model, g->eval_batch, cfg->device, g->stream, &g->model, err,
                             errlen);
  if (rc == ZN_OK) {
    g->n = zn_gpu_model_num_params(g->model);
    rc = zn_cuda_step_create(cfg->params, g->n, &g->step, err, errlen);
  }
  if (rc == ZN_OK) rc = init_params(g, err, errlen);
  if (rc == ZN_OK) rc = upload_data(g, train, test, err, errlen);
  if (rc == ZN_OK) rc = alloc_state(g, err, errlen);
  /* The uploads, the momentum's clearing and the step's initial state went through the legacy
   * default stream (a pageable cudaMemcpy may return before its DMA lands), which the
   * non-blocking training stream does not wait for: finish them before any step reads them. */
  if (rc == ZN_OK) rc = cuda_ok(cudaDeviceSynchronize(), "setting up the GPU state", err, errlen);
  if (rc != ZN_OK) {
    gpu_train_destroy(g);
    return rc;
  }
  *out = g;
  return ZN_OK;
}

void gpu_train_destroy(gpu_train* g) {
  if (!g) return;
  if (g->stream) cudaStreamSynchronize(g->stream);
  if (g->graph) cudaGraphExecDestroy(g->graph);
  for (int i = 0; i < SLOTS; i++)
    if (g->done[i]) cudaEventDestroy(g->done[i]);
  cudaFreeHost(g->slots);
  void* bufs[] = {g->momentum, g->train_x, g->train_y, g->test_x,  g->test_y,
                  g->perm,     g->cursor,  g->batch_x, g->batch_y, g->eval_sums};
  for (size_t i = 0; i < sizeof bufs / sizeof bufs[0]; i++) cudaFree(bufs[i]);
  zn_cuda_step_destroy(g->step);
  zn_gpu_model_destroy(g->model);
  if (g->stream) cudaStreamDestroy(g->stream);
  free(g);
}

void* gpu_train_stream(gpu_train* g) {
  return g->stream;
}

void gpu_train_set_comm(gpu_train* g, zn_comm* comm) {
  /* A captured step holds the old communicator's allreduce, and NCCL will not destroy a
   * communicator while a graph that uses it exists (ncclCommDestroy waits for it): drop the
   * graph. An in-flight launch of it finishes first; the next step captures it again. */
  if (g->graph) {
    cudaGraphExecDestroy(g->graph);
    g->graph = NULL;
    g->graph_state = 0;
  }
  g->comm = comm;
}

size_t gpu_train_num_params(const gpu_train* g) {
  return g->n;
}

int gpu_train_in_flight(const gpu_train* g) {
  return (int)(g->queued - g->taken);
}

/* ---------------------------------------------------------------- one step */

/* The part of a step that a graph can hold: the same work with the same arguments every step. */
static int queue_body(gpu_train* g, char* err, size_t errlen) {
  float* grads = zn_gpu_model_grads(g->model);
  int64_t offset = (int64_t)g->cfg.rank * g->local_batch;
  if (zn_cuda_gather_batch(g->train_x, g->train_y, PIXELS, g->perm, g->cursor, g->cfg.global_batch,
                           offset, g->local_batch, g->batch_x, g->batch_y, g->stream) != ZN_OK)
    return failed("gathering the batch", err, errlen);
  if (zn_gpu_model_train_batch(g->model, g->batch_x, g->batch_y, g->local_batch, grads + g->n) !=
      ZN_OK) {
    snprintf(err, errlen, "forward and backward: %s", zn_gpu_model_error(g->model));
    return ZN_ERR_IO;
  }
  if (g->comm && zn_comm_allreduce_sum_queued(g->comm, grads, g->n + 2) != ZN_OK) {
    snprintf(err, errlen, "gradient allreduce: %s", zn_comm_error(g->comm));
    return ZN_ERR_COMM;
  }
  float scale = 1.0f / (float)g->cfg.world;
  if (zn_cuda_step_launch(g->step, scale, zn_gpu_model_params(g->model), grads, g->momentum, g->n,
                          g->stream) != ZN_OK)
    return failed("the ZENITH step", err, errlen);
  if (zn_cuda_advance_cursor(g->cursor, g->stream) != ZN_OK)
    return failed("advancing the batch cursor", err, errlen);
  return ZN_OK;
}

/* Whether every rank captured the step: NCCL requires a collective to be launched from a graph
 * on all ranks or on none, so a capture that failed anywhere turns the graph off everywhere. All
 * ranks capture at the same step, so they all vote here, in the same place of the stream. */
static int agree_on_graph(gpu_train* g, int* captured, char* err, size_t errlen) {
  if (!g->comm || zn_comm_size(g->comm) <= 1) return ZN_OK;
  double votes = *captured ? 1.0 : 0.0; /* pageable: staged by the call, so a local will do */
  int rc = cuda_ok(
      cudaMemcpyAsync(g->eval_sums, &votes, sizeof votes, cudaMemcpyHostToDevice, g->stream),
      "the graph vote", err, errlen);
  if (rc == ZN_OK && zn_comm_allreduce_sum_f64(g->comm, g->eval_sums, 1) != ZN_OK) {
    snprintf(err, errlen, "agreeing on the step's graph: %s", zn_comm_error(g->comm));
    return ZN_ERR_COMM;
  }
  if (rc == ZN_OK)
    rc = cuda_ok(
        cudaMemcpyAsync(&votes, g->eval_sums, sizeof votes, cudaMemcpyDeviceToHost, g->stream),
        "the graph vote", err, errlen);
  if (rc == ZN_OK) rc = cuda_ok(cudaStreamSynchronize(g->stream), "the graph vote", err, errlen);
  if (rc == ZN_OK) *captured = votes == (double)zn_comm_size(g->comm);
  return rc;
}

/* Captures the body as a graph; where it fails (here or on another rank) the step runs without
 * one from now on. Only the ranks' vote on it can fail the step. */
static int capture_graph(gpu_train* g, char* err, size_t errlen) {
  char why[512] = "";
  cudaGraph_t graph = NULL;
  cudaError_t e = cudaStreamBeginCapture(g->stream, cudaStreamCaptureModeThreadLocal);
  int rc = e == cudaSuccess ? queue_body(g, why, sizeof why) : ZN_ERR_IO;
  if (e == cudaSuccess) {
    cudaError_t end = cudaStreamEndCapture(g->stream, &graph);
    if (rc == ZN_OK && end != cudaSuccess) e = end;
  }
  if (e == cudaSuccess && rc == ZN_OK) e = cudaGraphInstantiate(&g->graph, graph, 0);
  if (graph) cudaGraphDestroy(graph);
  int captured = e == cudaSuccess && rc == ZN_OK;
  if (!captured) {
    cudaGetLastError(); /* the failed capture's error is handled here, not by the next call */
    g->graph = NULL;
  }
  int everywhere = captured;
  int voted = agree_on_graph(g, &everywhere, err, errlen);
  if (voted == ZN_OK && everywhere) {
    g->graph_state = 1;
    ZN_INFO("training step captured as a CUDA graph");
    return ZN_OK;
  }
  if (captured) {
    cudaGraphExecDestroy(g->graph);
    g->graph = NULL;
    snprintf(why, sizeof why, "another rank's capture failed");
  }
  g->graph_state = -1;
  if (voted != ZN_OK) return voted;
  ZN_WARN("CUDA graph capture failed (%s): steps run without a graph",
          e != cudaSuccess ? cudaGetErrorString(e) : why);
  return ZN_OK;
}

static int queue_graph_or_body(gpu_train* g, char* err, size_t errlen) {
  if (g->graph_state == 0 && g->queued > 0) {
    int rc = capture_graph(g, err, errlen);
    if (rc != ZN_OK) return rc;
  }
  if (g->graph_state == 1)
    return cuda_ok(cudaGraphLaunch(g->graph, g->stream), "launching the step's graph", err, errlen);
  return queue_body(g, err, errlen);
}

int gpu_train_queue_step(gpu_train* g, int stop, char* err, size_t errlen) {
  if (gpu_train_in_flight(g) >= SLOTS) {
    snprintf(err, errlen, "%d steps already in flight", SLOTS);
    return ZN_ERR_INVALID;
  }
  slot* s = &g->slots[g->queued % SLOTS];
  float* grads = zn_gpu_model_grads(g->model);
  s->vote = stop ? 1.0f : 0.0f;
  int rc = cuda_ok(
      cudaMemcpyAsync(grads + g->n + 1, &s->vote, sizeof(float), cudaMemcpyHostToDevice, g->stream),
      "copying the stop vote", err, errlen);
  if (rc == ZN_OK) rc = queue_graph_or_body(g, err, errlen);
  if (rc == ZN_OK && zn_cuda_step_report_async(g->step, &s->report, g->stream) != ZN_OK)
    rc = failed("copying the step's report", err, errlen);
  if (rc == ZN_OK)
    rc = cuda_ok(cudaMemcpyAsync(s->loss_and_stop, grads + g->n, 2 * sizeof(float),
                                 cudaMemcpyDeviceToHost, g->stream),
                 "copying the step's loss", err, errlen);
  if (rc == ZN_OK)
    rc = cuda_ok(cudaEventRecord(g->done[g->queued % SLOTS], g->stream), "recording the step", err,
                 errlen);
  if (rc == ZN_OK) g->queued++;
  return rc;
}

/* Waits for an event: under the collectives' watchdog when there are peers to hang on. */
static int wait_for(gpu_train* g, cudaEvent_t event, char* err, size_t errlen) {
  if (g->comm && zn_comm_size(g->comm) > 1) {
    if (zn_comm_wait_event(g->comm, event) == ZN_OK) return ZN_OK;
    snprintf(err, errlen, "%s", zn_comm_error(g->comm));
    return ZN_ERR_COMM;
  }
  return cuda_ok(cudaEventSynchronize(event), "waiting for the step", err, errlen);
}

int gpu_train_next_result(gpu_train* g, gpu_step_result* out, char* err, size_t errlen) {
  if (gpu_train_in_flight(g) == 0) {
    snprintf(err, errlen, "no step in flight");
    return ZN_ERR_INVALID;
  }
  int i = (int)(g->taken % SLOTS);
  int rc = wait_for(g, g->done[i], err, errlen);
  if (rc != ZN_OK) return rc;
  const slot* s = &g->slots[i];
  out->norm = s->report.norm;
  out->state = s->report.state;
  out->state.window = NULL;
  out->outcome = s->report.outcome;
  out->loss = (double)s->loss_and_stop[0] / g->cfg.world;
  out->stop = s->loss_and_stop[1] > 0;
  g->taken++;
  return ZN_OK;
}

/* ---------------------------------------------------------------- epochs and evaluation */

/* Waits until the stream is idle: everything queued, results still to be taken included. */
static int drain(gpu_train* g, char* err, size_t errlen) {
  cudaEvent_t idle;
  int rc =
      cuda_ok(cudaEventCreateWithFlags(&idle, cudaEventDisableTiming), "an event", err, errlen);
  if (rc != ZN_OK) return rc;
  rc = cuda_ok(cudaEventRecord(idle, g->stream), "recording an event", err, errlen);
  if (rc == ZN_OK) rc = wait_for(g, idle, err, errlen);
  cudaEventDestroy(idle);
  return rc;
}

int gpu_train_start_epoch(gpu_train* g, const uint32_t* perm, int count, int64_t first_step,
                          char* err, size_t errlen) {
  if (count != g->train_count) {
    snprintf(err, errlen, "an order of %d images for a training set of %d", count, g->train_count);
    return ZN_ERR_INVALID;
  }
  int rc = drain(g, err, errlen);
  /* On the training stream: a plain cudaMemcpy runs on the legacy stream, which the next step's
   * gather would not wait for, and from pageable memory it may return before its DMA lands. The
   * host buffer is free again on return (pageable memory is staged by the call). */
  if (rc == ZN_OK)
    rc = cuda_ok(cudaMemcpyAsync(g->perm, perm, (size_t)count * sizeof(uint32_t),
                                 cudaMemcpyHostToDevice, g->stream),
                 "copying the epoch's order", err, errlen);
  if (rc == ZN_OK)
    rc = cuda_ok(cudaMemcpyAsync(g->cursor, &first_step, sizeof first_step, cudaMemcpyHostToDevice,
                                 g->stream),
                 "the cursor", err, errlen);
  if (rc == ZN_OK) rc = cuda_ok(cudaStreamSynchronize(g->stream), "the cursor", err, errlen);
  return rc;
}

int gpu_train_evaluate(gpu_train* g, double* loss, double* accuracy, char* err, size_t errlen) {
  int world = g->cfg.world, rank = g->cfg.rank;
  int per_rank = (g->test_count + world - 1) / world;
  int begin = rank * per_rank;
  int end = begin + per_rank < g->test_count ? begin + per_rank : g->test_count;
  int rc = drain(g, err, errlen);
  if (rc == ZN_OK)
    rc = cuda_ok(cudaMemsetAsync(g->eval_sums, 0, 2 * sizeof(double), g->stream), "eval sums", err,
                 errlen);
  for (int i = begin; rc == ZN_OK && i < end; i += g->eval_batch) {
    int n = end - i < g->eval_batch ? end - i : g->eval_batch;
    if (zn_gpu_model_eval_batch(g->model, g->test_x + (size_t)i * PIXELS, g->test_y + i, n,
                                g->eval_sums) != ZN_OK) {
      snprintf(err, errlen, "evaluation: %s", zn_gpu_model_error(g->model));
      rc = ZN_ERR_IO;
    }
  }
  if (rc == ZN_OK && g->comm && zn_comm_allreduce_sum_f64(g->comm, g->eval_sums, 2) != ZN_OK) {
    snprintf(err, errlen, "evaluation allreduce failed: %s", zn_comm_error(g->comm));
    rc = ZN_ERR_COMM;
  }
  double sums[2];
  if (rc == ZN_OK)
    rc =
        cuda_ok(cudaMemcpyAsync(sums, g->eval_sums, sizeof sums, cudaMemcpyDeviceToHost, g->stream),
                "copying the evaluation", err, errlen);
  if (rc == ZN_OK) rc = cuda_ok(cudaStreamSynchronize(g->stream), "evaluating", err, errlen);
  if (rc != ZN_OK) return rc;
  *loss = sums[0] / g->test_count;
  *accuracy = sums[1] / g->test_count;
  return ZN_OK;
}

int gpu_train_get_state(gpu_train* g, float* params, float* momentum, zn_zenith_state* state,
                        char* err, size_t errlen) {
  int rc = drain(g, err, errlen);
  if (rc == ZN_OK && zn_gpu_model_get_params(g->model, params) != ZN_OK) {
    snprintf(err, errlen, "copying the parameters from the GPU: %s", zn_gpu_model_error(g->model));
    rc = ZN_ERR_IO;
  }
  if (rc == ZN_OK)
    rc = cuda_ok(cudaMemcpy(momentum, g->momentum, g->n * sizeof(float), cudaMemcpyDeviceToHost),
                 "copying the momentum from the GPU", err, errlen);
  if (rc == ZN_OK && zn_cuda_step_read(g->step, state, NULL, NULL, g->stream) != ZN_OK)
    rc = failed("copying the ZENITH state from the GPU", err, errlen);
  return rc;
}

int gpu_train_set_state(gpu_train* g, const float* params, const float* momentum,
                        const zn_zenith_state* state, char* err, size_t errlen) {
  int rc = drain(g, err, errlen);
  if (rc == ZN_OK && zn_gpu_model_set_params(g->model, params) != ZN_OK) {
    snprintf(err, errlen, "copying the parameters to the GPU: %s", zn_gpu_model_error(g->model));
    rc = ZN_ERR_IO;
  }
  if (rc == ZN_OK)
    rc = cuda_ok(cudaMemcpy(g->momentum, momentum, g->n * sizeof(float), cudaMemcpyHostToDevice),
                 "copying the momentum to the GPU", err, errlen);
  if (rc == ZN_OK && zn_cuda_step_write(g->step, state, g->stream) != ZN_OK)
    rc = failed("copying the ZENITH state to the GPU", err, errlen);
  return rc;
}
