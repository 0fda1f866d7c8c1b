/* What the trainer's CPU loop (trainer.c) and GPU loop (trainer_gpu.c) share: the state of one
 * run of a job and the reporting both do. Internal to the trainer. */
#ifndef ZN_TRAINER_RUN_H
#define ZN_TRAINER_RUN_H

#include <pthread.h>
#include <stdatomic.h>

#include "trainer.h"
#include "worker_kv.h"
#include "zenith_rule.h"
#include "zn_comm.h"
#include "zn_data.h"
#include "zn_model.h"

#define COMM_TIMEOUT_MS 60000

struct trainer {
  Zenith__V1__Assignment* asg;
  trainer_env env;
  pthread_t thread;
  atomic_int stop; /* asked to stop: 1 by the coordinator, 2 by the worker */
  char stop_reason[256];
};

/* Everything one run of the loop owns, freed in one place. */
typedef struct {
  trainer* t;
  const Zenith__V1__JobSpec* spec;
  int rank, world, local_batch;
  zn_dataset train, test;
  zn_model* model; /* the CPU loop's */
  zn_comm* comm;
  worker_kv_ctx kv_ctx; /* the rendezvous store's context, alive as long as comm */
  zn_zenith_params params;
  zn_zenith_state state; /* as of the last step recorded */
  double* window;
  float* momentum;
  float* reduced; /* gradient sum + loss + stop flag */
  float* batch_x;
  uint8_t* batch_y;
  uint32_t* perm;
  int64_t total_steps, steps_per_epoch;
  /* rank 0's metrics not yet reported */
  Zenith__V1__StepMetrics* pending;
  size_t n_pending, cap_pending;
  double last_report;
  int64_t images_since_report;
  int reported_total;
  char error[1024];
} run;

/* Rank 0 queues the step r->state describes (taken or skipped) for the coordinator, and sends
 * what is queued every REPORT_EVERY_SEC and at the last step. */
void trainer_record_step(run* r, zn_step_outcome outcome, double norm, double loss, int epoch);
/* Sends what trainer_record_step has queued. */
int trainer_send_report(run* r);
void trainer_report_eval(run* r, int64_t step, double loss, double accuracy);
/* Logs a skipped step as a warning. */
void trainer_warn_skipped(const run* r, zn_step_outcome outcome, double norm);
/* After an evaluation: images/s measures training, not evaluation. */
void trainer_restart_rate_clock(run* r);

/* The GPU loop, for a cuda job on a worker with a GPU: builds the model on env.device, joins
 * the peers over NCCL, trains and evaluates. Returns like the CPU loop: ZN_OK, or
 * ZN_ERR_CANCELLED, or an error with r->error set. */
int trainer_gpu_run(run* r, double* test_loss, double* test_accuracy);

#endif
