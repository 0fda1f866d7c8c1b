/* The coordinator's Prometheus endpoint (`zenithd coordinator --metrics-listen ADDR`):
 * GET /metrics answers in the text exposition format 0.0.4; the series are listed in
 * docs/monitoring.md.
 *
 * Two threads meet here and share only one buffer. The coordinator's thread builds a
 * snapshot of its workers and jobs (begin, add_worker and add_job for each, publish) and
 * renders it to text; the HTTP server's own thread (libmicrohttpd) copies the last published
 * text under a mutex. A scrape therefore never waits for the coordinator, and never sees
 * its state half changed. */
#ifndef COORD_METRICS_H
#define COORD_METRICS_H

#include <stddef.h>

#include "zenith.pb-c.h"
#include "zn_store.h"

typedef struct coord_metrics coord_metrics;

/* Binds addr ("HOST:PORT", "[IPV6]:PORT", or ":PORT" for every interface; port 0 picks a free
 * one) and starts serving. The store, used from the coordinator's thread only, gives the jobs
 * that finished within the last hour and the count of jobs by state. On failure returns a
 * zn_err and writes to err a message that names the address and why. */
int coord_metrics_start(const char* addr, zn_store* store, coord_metrics** out, char* err,
                        size_t errlen);
/* Stops the server (waiting for a scrape in progress) and frees everything; NULL is a no-op. */
void coord_metrics_stop(coord_metrics* m);

/* The bound address, as "HOST:PORT" with the port filled in, and the port. */
const char* coord_metrics_address(const coord_metrics* m);
int coord_metrics_port(const coord_metrics* m);

/* A snapshot, built on the coordinator's thread: begin, then every live worker (busy: it has
 * a job) and every queued or running job, then publish. The job is read during the call
 * only. */
void coord_metrics_begin(coord_metrics* m);
void coord_metrics_add_worker(coord_metrics* m, const char* device, int busy);
void coord_metrics_add_job(coord_metrics* m, const Zenith__V1__Job* job);
void coord_metrics_publish(coord_metrics* m);

/* A job has reached a final state: its series stay in the snapshots for an hour. */
void coord_metrics_job_ended(coord_metrics* m, const Zenith__V1__Job* job);

#endif
