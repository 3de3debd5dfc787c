/* Threads that apply frames to at-index page appliers (apply.h) with no Python on them.
 *
 * The receiving event loop submits jobs (one PAGES payload each: an applier and its
 * frames, which the caller keeps alive until the job comes back); the pool's threads run
 * dx_applier_apply_with, each with its own work area, and queue the finished job; the
 * eventfd `efd` becomes readable when finished jobs wait, and dx_apply_pool_take_done
 * hands them back (the caller releases the buffers then).  Each applier counts the jobs
 * it has in the pool (dx_applier_hold / dx_applier_wait_idle): its file is not closed
 * while one runs.  The loop never waits for a thread; a thread never takes the GIL.
 */
#ifndef DX_APPLYPOOL_H
#define DX_APPLYPOOL_H

#include <pthread.h>

#include "apply.h"

typedef struct dx_apply_job {
    dx_applier *a;
    const uint8_t *buf;
    size_t len, max_raw;
    uint64_t token;             /* the caller's */
    /* result */
    int rc;
    uint64_t counts[3];
    size_t err_offset;
    uint64_t err_vaddr;
    int err_errno;
    struct dx_apply_job *next;
} dx_apply_job;

typedef struct {
    pthread_mutex_t mu;
    pthread_cond_t cv;          /* todo not empty, or stopping */
    dx_apply_job *todo, *todo_tail, *done, *done_tail;
    pthread_t *threads;
    int nthreads, stopping, efd;
    unsigned trim_gen;          /* bumped by dx_apply_pool_trim */
} dx_apply_pool;

/* 0, or a negative dx_error (the pool is then not started and needs no stop). */
int dx_apply_pool_start(dx_apply_pool *p, int nthreads);
/* Queue a job; dx_applier_hold(j->a) first. */
void dx_apply_pool_submit(dx_apply_pool *p, dx_apply_job *j);
/* Every finished job (a list through ->next, in no order), or NULL; reads the eventfd. */
dx_apply_job *dx_apply_pool_take_done(dx_apply_pool *p);
/* Each thread frees its work area (the decoded frame, up to a frame's raw size, and the
 * scratch pages) the next time it has nothing to do: after a round's bulk, the memory
 * is not kept for rounds that may not need it. Its next job allocates again. */
void dx_apply_pool_trim(dx_apply_pool *p);
/* Stop the threads (a job running finishes; jobs not started come back with
 * rc -DX_E_APPLY_CANCELLED) and join them; the finished jobs stay for take_done. */
void dx_apply_pool_stop(dx_apply_pool *p);
/* After stop and the last take_done. */
void dx_apply_pool_free(dx_apply_pool *p);

#endif
