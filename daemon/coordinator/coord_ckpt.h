/* The coordinator's side of checkpoints, resume and automatic restarts (the contract is in
 * proto/zenith.proto; docs/architecture.md tells the story).
 *
 * Workers write checkpoint files into DIR/<job id> (DIR is `--checkpoint-dir`) and report each
 * one that is durable with ReportCheckpoint; the coordinator records it in the store, keeps the
 * newest spec.keep_checkpoints of a job and deletes the files of older ones. A job that loses a
 * worker, or whose collective fails, goes back to the queue for a new attempt (up to
 * spec.max_restarts times), and every assignment lists the job's checkpoints to continue from,
 * newest first. A worker leaving on SIGTERM (preempted) requeues its job the same way without
 * using up a restart. CheckpointJob asks a running job for a checkpoint and answers once one is
 * recorded; ResumeJob puts a failed or cancelled job back in the queue from a checkpoint, on as
 * many workers and with the sharding it asks for (default: as before). */
#ifndef ZN_COORD_CKPT_H
#define ZN_COORD_CKPT_H

#include <stddef.h>
#include <stdint.h>

#include "coord_internal.h"

/* Opens the checkpoint folder, cfg->checkpoint_dir or else STATE/checkpoints: creates it (and
 * its parents) if needed and checks that it is a writable folder. The handle keeps its absolute
 * path, which is what workers are given. On failure err names the folder, the --checkpoint-dir
 * flag and the reason. */
int coord_ckpt_create(const coord_config* cfg, coord_ckpt** out, char* err, size_t errlen);
/* Frees the handle and what it still holds. Call after zn_rpc_server_destroy, whose cancelled
 * calls may still report their clients gone to the handle. */
void coord_ckpt_destroy(coord_ckpt* c);
const char* coord_ckpt_dir(const coord_ckpt* c);

/* Registers ReportCheckpoint (Workers) and CheckpointJob, ListCheckpoints, ResumeJob (Zenith). */
int coord_ckpt_add_methods(coordinator* co);

/* The checkpoint_request for the job's rank 0: the newest CheckpointJob call still waiting for
 * the job, or 0 when none waits. */
int64_t coord_ckpt_pending_request(const coord_ckpt* c, const char* job_id);

/* Sets asg->checkpoint_dir and asg->resume_from for an assignment of the job: its recorded
 * checkpoints newest first, starting at its latest_checkpoint (after a resume from an older one,
 * that one, then the older ones). Free them with coord_ckpt_clear_assignment after the reply. */
void coord_ckpt_fill_assignment(coordinator* co, const active_job* a, Zenith__V1__Assignment* asg);
void coord_ckpt_clear_assignment(Zenith__V1__Assignment* asg);

/* The job reached a final state: its waiting CheckpointJob calls fail, naming the state. */
void coord_ckpt_job_ended(coordinator* co, const Job* job);

/* A running job lost a worker or a collective (why says which). With restarts left, the job goes
 * back to the queue for a new attempt from its latest checkpoint and 0 is returned; with none
 * left, error gets the text to fail the job with and -1 is returned. */
int coord_ckpt_restart(coordinator* co, active_job* a, const char* why, char* error, size_t errlen);

/* Worker w left the running job on SIGTERM after a checkpoint at step: the job goes back to the
 * queue as for a restart, without using up one of its restarts. The worker is leaving, so it is
 * given up at once rather than offered the job again. */
void coord_ckpt_preempted(coordinator* co, active_job* a, worker* w, int64_t step);

/* At start-up, for each job that was queued or running: numbers its next attempt after those in
 * its history, and queues one that was running again, to continue from its latest checkpoint. */
void coord_ckpt_reload_job(coordinator* co, active_job* a);

/* One event per checkpoint the worker refused when resuming ("PATH: what was wrong"). */
void coord_ckpt_refused(coordinator* co, active_job* a, const worker* w, char* const* refused,
                        size_t n);

#endif
