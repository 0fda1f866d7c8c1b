/* A job's whole history, as one WatchJob stream with history_only delivers it, and the file
 * output that `zenithctl history` and `zenithctl plot` write it to. */
#ifndef ZN_CTL_HISTORY_H
#define ZN_CTL_HISTORY_H

#include <limits.h>
#include <stddef.h>
#include <stdio.h>

#include "ctl.h"

typedef struct {
  const Zenith__V1__Job* job; /* the latest job message of the stream */
  /* The steps of the run that continued, in order: when a job restarted (a coordinator restart,
   * a resume from a checkpoint), a step reported again replaces itself and every later one. */
  const Zenith__V1__StepMetrics** steps;
  size_t n_steps;
  const Zenith__V1__EvalResult** evals;
  size_t n_evals;
  const Zenith__V1__JobEvent** events;
  size_t n_events;
  ProtobufCMessage** items; /* the stream's messages, which own everything above */
  size_t n_items;
} ctl_job_history;

/* Reads job `id`'s history; on failure prints why (naming the job) and returns -1. */
int ctl_history_fetch(const ctl_args* a, const char* id, ctl_job_history* h);
void ctl_history_free(ctl_job_history* h);

/* The arguments of history and plot: JOB, -o FILE and, for history, --format (default csv). */
typedef struct {
  const char* id;
  const char* out; /* NULL: stdout */
  const char* format;
} ctl_export_args;

/* 0; or 1 after printing the usage (--help); or -1 after printing what is wrong. */
int ctl_parse_export_args(const ctl_args* a, const char* usage, int with_format,
                          ctl_export_args* e);

/* Where a command's output goes. A regular file (new or existing) is written whole or not at
 * all: into a temporary file next to it, synced and renamed over it (over the file a symbolic
 * link names, not the link). Anything else that exists (a FIFO, a terminal, /dev/stdout on a
 * pipe) is written in place, and NULL or "-" means stdout. */
typedef struct {
  FILE* f;
  const char* cmd;       /* for messages: "history", "plot" */
  const char* path;      /* as given, for messages */
  char target[PATH_MAX]; /* the file path names, links resolved */
  char tmp[PATH_MAX];    /* empty unless writing through a temporary file */
} ctl_output;

/* 0, or prints "zenithctl CMD: cannot write PATH: reason" and returns -1. */
int ctl_output_open(ctl_output* o, const char* cmd, const char* path);
/* Finishes the file (flush, sync, rename, sync of the folder); on failure prints what failed,
 * removes the temporary file and returns -1. */
int ctl_output_commit(ctl_output* o);
/* Gives up: closes and removes the temporary file, leaving any earlier file as it was. */
void ctl_output_abort(ctl_output* o);

/* The start of every export: opens e->out for the command and reads the history of e->id. On
 * failure prints why, leaves no file behind and returns -1. */
int ctl_export_begin(const ctl_args* a, const ctl_export_args* e, ctl_output* out,
                     ctl_job_history* h);

#endif
