/* Checking a submitted job spec, and the changes a resume makes to one, and filling in its
 * defaults. Everything a coordinator can judge without the data is judged here, so that a bad
 * spec is refused at SubmitJob (or ResumeJob) with a message naming the field, instead of failing
 * later on a worker. */
#ifndef ZN_COORD_SPEC_H
#define ZN_COORD_SPEC_H

#include <stddef.h>

#include "zenith.pb-c.h"

#define ZN_DEFAULT_DATA_DIR "/usr/share/datasets/fashion-mnist"
#define ZN_MAX_WORKERS 256
/* Text fields are bounded so that job lists stay small enough to send. */
#define ZN_MAX_NAME_BYTES 256
#define ZN_MAX_PATH_BYTES 4096
#define ZN_MAX_KEEP_CHECKPOINTS 1000
#define ZN_MAX_RESTARTS 100

/* Whether device names a device that jobs ask for and workers offer: "cpu" or "cuda". */
int coord_spec_known_device(const char* device);

/* The device a spec asks for: "cpu" when unset, as in jobs stored before specs had one. */
const char* coord_spec_device(const Zenith__V1__JobSpec* spec);

/* The sharding a spec asks for: "none" when unset, as in jobs stored before specs had one. */
const char* coord_spec_sharding(const Zenith__V1__JobSpec* spec);

/* 0 when valid; otherwise writes "field: what is wrong" into err. */
int coord_spec_validate(const Zenith__V1__JobSpec* spec, char* err, size_t errlen);

/* Applies what a ResumeJob request changes to a copy of a stored, valid spec: workers when > 0,
 * sharding when non-empty, each checked as at submit. On success writes into changes what
 * changed, "on 3 workers (was 2), sharding optimizer (was none)" ("" when nothing did), and
 * returns 0; otherwise writes "field: what is wrong" into err and returns -1, and the spec must
 * be dropped. Its strings must be malloc'd, as in an unpacked message. */
int coord_spec_resume(Zenith__V1__JobSpec* spec, int workers, const char* sharding, char* changes,
                      size_t changes_len, char* err, size_t errlen);

/* Fills every unset field of a valid spec with its default (in place; the
 * spec must own its strings through malloc, as an unpacked message does). */
void coord_spec_fill_defaults(Zenith__V1__JobSpec* spec);

/* Fills what a spec read back from the store lacks when an older coordinator stored it (the
 * sharding), so that every view of a job shows the same fields. In place, as above; a NULL spec
 * is left alone. */
void coord_spec_fill_stored(Zenith__V1__JobSpec* spec);

#endif
