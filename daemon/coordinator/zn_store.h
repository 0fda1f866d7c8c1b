/* The coordinator's persistent store: jobs, and each job's history of events,
 * step metrics and evaluations, in one SQLite file DIR/zenith.db.
 *
 * Everything a restarted coordinator needs is here: the job table (a packed Job
 * protobuf per row, plus the columns we query by), the job-id counter, an
 * append-only history that WatchJob replays before it follows a job live, and
 * the records of the jobs' checkpoints. A
 * write that returned ZN_OK survives a kill -9 of the coordinator and a power
 * loss (see the durability note in zn_store.c).
 *
 * The handle is single-threaded: the coordinator calls it from its one loop
 * thread. Functions return 0 or a negative zn_err; on failure the handle keeps a
 * text naming the operation and the SQLite message, read by zn_store_errmsg. */
#ifndef ZN_STORE_H
#define ZN_STORE_H

#include <stddef.h>
#include <stdint.h>

#include "zenith.pb-c.h"

typedef struct zn_store zn_store;

/* Opens DIR/zenith.db, creating DIR (and its parents) and the schema if needed.
 * Fails with a text in err naming the path when DIR cannot be created or
 * written, when zenith.db is not a Zenith database (garbage, or another
 * program's SQLite file), when its schema is newer than this build, or when
 * another process (a second coordinator on the same DIR) holds it. */
int zn_store_open(const char* dir, zn_store** out, char* err, size_t errlen);
void zn_store_close(zn_store* s);

/* The text of the last failure on this handle; "" when none. */
const char* zn_store_errmsg(const zn_store* s);

/* Writes the next job id, "j-1", "j-2", ...; ids never repeat, across restarts
 * too, even when an id was taken and its job never stored. */
int zn_store_new_job_id(zn_store* s, char* id, size_t len);
/* Likewise "w-1", "w-2", ... for worker registrations. A worker that kept running through a
 * coordinator restart still holds its old id, so ids must not repeat across restarts either:
 * otherwise its heartbeats would pass for those of the worker that registered first. */
int zn_store_new_worker_id(zn_store* s, char* id, size_t len);

/* Inserts the job, or replaces the stored job with the same id. A replaced job
 * keeps its place in zn_store_list_jobs. */
int zn_store_put_job(zn_store* s, const Zenith__V1__Job* job);
/* ZN_ERR_NOT_FOUND when absent. Free with zenith__v1__job__free_unpacked(job, NULL). */
int zn_store_get_job(zn_store* s, const char* id, Zenith__V1__Job** out);
/* All jobs in the order they were first stored. Free with zn_store_free_jobs. */
int zn_store_list_jobs(zn_store* s, Zenith__V1__Job*** jobs, size_t* n);
void zn_store_free_jobs(Zenith__V1__Job** jobs, size_t n);
/* counts[state] = how many stored jobs are in that JobState, for every state below n. */
int zn_store_count_jobs(zn_store* s, int64_t* counts, size_t n);

/* History appends. A batch of metrics is one transaction: after a crash either
 * all n rows are there or none. The job id is not checked against the jobs. */
int zn_store_append_metrics(zn_store* s, const char* job_id, Zenith__V1__StepMetrics* const* m,
                            size_t n);
int zn_store_append_eval(zn_store* s, const char* job_id, const Zenith__V1__EvalResult* e);
int zn_store_append_event(zn_store* s, const char* job_id, const Zenith__V1__JobEvent* e);

/* Called once per history item; returns 0 to go on, non-zero to stop. The item
 * is freed when the callback returns: copy what you keep. */
typedef int (*zn_history_fn)(void* ud, const Zenith__V1__WatchJobResponse* item);

/* Replays a job's history in the order it was appended, events, metrics and
 * evals interleaved. Returns 0 after the last item (also for a job with no
 * history), ZN_ERR_CANCELLED when the callback stopped it. The callback may call
 * the other store functions but not zn_store_replay (ZN_ERR_INVALID). */
int zn_store_replay(zn_store* s, const char* job_id, zn_history_fn fn, void* ud);
int zn_store_history_count(zn_store* s, const char* job_id, int64_t* n);

/* Checkpoint records. add fails on a repeated id. list gives a job's records not yet removed,
 * oldest first (free with zn_store_free_checkpoints); remove marks one as removed (its file was
 * deleted under the keep-last-N policy) without forgetting it. */
int zn_store_add_checkpoint(zn_store* s, const Zenith__V1__Checkpoint* c);
int zn_store_list_checkpoints(zn_store* s, const char* job_id, Zenith__V1__Checkpoint*** out,
                              size_t* n);
void zn_store_free_checkpoints(Zenith__V1__Checkpoint** c, size_t n);
int zn_store_remove_checkpoint(zn_store* s, const char* id);

#endif
