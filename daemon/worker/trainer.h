/* The trainer: one thread that runs one job assignment from start to end.
 *
 * It loads the data, builds the model, joins the job's other ranks through
 * the collectives, and runs the loop: forward and backward on this rank's
 * slice of the global batch, an allreduce of the gradient sum, the global norm
 * of the reduced gradient, the ZENITH rate and the fused update. Rank 0
 * reports every step's metrics to the coordinator. The trainer knows nothing
 * of gRPC beyond the worker's channel it is handed. */
#ifndef ZN_TRAINER_H
#define ZN_TRAINER_H

#include "zenith.pb-c.h"
#include "zn_rpc.h"

typedef struct trainer trainer;

typedef struct {
  zn_rpc_channel* channel; /* to the coordinator; thread-safe */
  const char* worker_id;
  const char* worker_name;
  const char* host;          /* address the collectives listen on */
  int threads;               /* compute threads when the spec leaves it to the worker */
  int device;                /* CUDA device index, or -1: train on the CPU */
  void (*on_done)(void* ud); /* called on the trainer thread as it ends */
  void* ud;
} trainer_env;

/* Starts the thread; the assignment is copied. NULL if the thread could not start. */
trainer* trainer_start(const Zenith__V1__Assignment* assignment, const trainer_env* env);
/* Asks the job to stop at the next step boundary, on every rank together. */
void trainer_request_stop(trainer* t, int cancelled_by_coordinator, const char* why);
const char* trainer_job_id(const trainer* t);
int trainer_attempt(const trainer* t);
/* The coordinator asks for a checkpoint (request id > 0); rank 0 writes it after its next step. */
void trainer_request_checkpoint(trainer* t, int64_t request);
/* Joins the thread (after on_done) and frees it. */
void trainer_destroy(trainer* t);

#endif
