/* Whether this worker can train on a given GPU: asked once at start-up, when
 * the worker is started with --device cuda:N, so that a worker whose GPU is
 * missing says why and runs on the CPU instead of failing every job it gets. */
#ifndef ZN_GPU_PROBE_H
#define ZN_GPU_PROBE_H

#include <stddef.h>

/* 0 when CUDA device `index` exists and can be used: text then holds its name.
 * -1 otherwise, with text saying why: a build without GPU training, a CUDA runtime that
 * cannot count devices (no driver, no GPU), or an index past the last device. */
int zn_gpu_probe(int index, char* text, size_t len);

#endif
