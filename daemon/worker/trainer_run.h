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
#include "zn_shard.h"

#define COMM_TIMEOUT_MS 60000

struct trainer {
  Zenith__V1__Assignment* asg;
  trainer_env env;
  pthread_t thread;
  atomic_int stop; /* asked to stop: 1 by the coordinator, 2 by the worker */
  char stop_reason[256];
  _Atomic int64_t checkpoint_request; /* the coordinator's latest request id; 0: none */
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
  /* With sharding "optimizer" each rank keeps the momentum of plan's shard only, and the
   * gradient and parameter buffers are padded to the plan's blocks; otherwise the plan is the
   * whole vector on one rank. */
  int sharded;
  zn_shard_plan plan;
  float* momentum;
  const float* momentum_full; /* the whole momentum for a checkpoint when sharded, else NULL */
  size_t optimizer_bytes;     /* heap taken by the momentum, measured when it was allocated */
  int checkpoint_asked;       /* sharded: rank 0 asked for a checkpoint after this step */
  int someone_leaving;        /* sharded: a rank stops on SIGTERM and needs the momentum */
  float* reduced;             /* unsharded: gradient sum + loss + stop flag */
  float* batch_x;
  uint8_t* batch_y;
  uint32_t* perm;
  int64_t total_steps, steps_per_epoch;
  int64_t start_step;           /* where the loop starts: 0, or a checkpoint's step */
  int64_t last_checkpoint_step; /* -1 before the first */
  int64_t checkpoint_answered;  /* the last request id answered */
  int preempted;                /* left on SIGTERM after writing a checkpoint */
  char** refused;               /* checkpoints refused on resume, "PATH: why" */
  size_t n_refused;
  int refused_reported;
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

/* Writes a checkpoint of the state after r->state.step steps into the assignment's checkpoint
 * folder and reports it to the coordinator (request: the id it answers, 0 for a scheduled one).
 * A failure is logged and returned; the job goes on. */
int trainer_checkpoint(run* r, int64_t request);
/* When this worker is being stopped (SIGTERM), writes a checkpoint of the current state and sets
 * r->preempted, so the coordinator continues the job elsewhere from it. Every rank calls it once
 * the loop has stopped: a sharded job's ranks gather the momentum for the one that leaves. */
void trainer_checkpoint_if_leaving(run* r);
/* Continues from the first of the assignment's resume_from checkpoints that reads, verifies and
 * fits this job (model, batch, seed, window): parameters, momentum and ZENITH state restored,
 * r->start_step set. Refused ones are logged and kept in r->refused. ZN_OK also when none is
 * usable: the run then starts from step 0. The CPU model and buffers must exist. */
int trainer_resume(run* r);

/* The GPU loop, for a cuda job on a worker with a GPU: builds the model on env.device, joins
 * the peers over NCCL, trains and evaluates. Returns like the CPU loop: ZN_OK, or
 * ZN_ERR_CANCELLED, or an error with r->error set. */
int trainer_gpu_run(run* r, double* test_loss, double* test_accuracy);

#endif
