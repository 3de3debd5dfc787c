/* Threads applying frames to at-index page appliers (see applypool.h). */
#define _GNU_SOURCE
#include <errno.h>
#include <stdlib.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include "applypool.h"

static void finish_job(dx_apply_pool *p, dx_apply_job *j)
{
    dx_applier_release(j->a);           /* its file may be closed from here on */
    pthread_mutex_lock(&p->mu);
    j->next = NULL;
    if (p->done_tail) p->done_tail->next = j; else p->done = j;
    p->done_tail = j;
    pthread_mutex_unlock(&p->mu);
    uint64_t one = 1;
    while (write(p->efd, &one, sizeof one) < 0 && errno == EINTR)
        ;
}

static void *worker(void *arg)
{
    dx_apply_pool *p = arg;
    dx_apply_work w;
    memset(&w, 0, sizeof w);
    unsigned gen = 0;
    for (;;) {
        pthread_mutex_lock(&p->mu);
        while (!p->todo && !p->stopping) {
            if (gen != p->trim_gen) {        /* idle after a trim: give the memory back */
                gen = p->trim_gen;
                pthread_mutex_unlock(&p->mu);
                dx_apply_work_free(&w);
                pthread_mutex_lock(&p->mu);
                continue;
            }
            pthread_cond_wait(&p->cv, &p->mu);
        }
        dx_apply_job *j = p->todo;
        if (!j) {                        /* stopping, nothing left */
            pthread_mutex_unlock(&p->mu);
            break;
        }
        p->todo = j->next;
        if (!p->todo) p->todo_tail = NULL;
        int cancelled = p->stopping;
        pthread_mutex_unlock(&p->mu);
        if (cancelled) {
            j->rc = -DX_E_APPLY_CANCELLED;
        } else {
            j->rc = dx_applier_apply_with(j->a, &w, j->buf, j->len, j->max_raw, j->counts);
            j->err_offset = w.err_offset;
            j->err_vaddr = w.err_vaddr;
            j->err_errno = w.err_errno;
        }
        finish_job(p, j);
    }
    dx_apply_work_free(&w);
    return NULL;
}

int dx_apply_pool_start(dx_apply_pool *p, int nthreads)
{
    memset(p, 0, sizeof *p);
    if (nthreads < 1) return -DX_E_ARG;
    p->efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (p->efd < 0) return -DX_E_NOMEM;
    p->threads = calloc((size_t)nthreads, sizeof *p->threads);
    if (!p->threads || pthread_mutex_init(&p->mu, NULL) || pthread_cond_init(&p->cv, NULL)) {
        close(p->efd);
        free(p->threads);
        return -DX_E_NOMEM;
    }
    for (int i = 0; i < nthreads; i++) {
        if (pthread_create(&p->threads[i], NULL, worker, p)) {
            dx_apply_pool_stop(p);       /* the ones started */
            dx_apply_pool_free(p);
            return -DX_E_NOMEM;
        }
        p->nthreads++;
    }
    return 0;
}

void dx_apply_pool_submit(dx_apply_pool *p, dx_apply_job *j)
{
    j->next = NULL;
    j->rc = 0;
    j->counts[0] = j->counts[1] = j->counts[2] = 0;
    pthread_mutex_lock(&p->mu);
    if (p->todo_tail) p->todo_tail->next = j; else p->todo = j;
    p->todo_tail = j;
    pthread_cond_signal(&p->cv);
    pthread_mutex_unlock(&p->mu);
}

dx_apply_job *dx_apply_pool_take_done(dx_apply_pool *p)
{
    uint64_t n;
    while (read(p->efd, &n, sizeof n) < 0 && errno == EINTR)
        ;
    pthread_mutex_lock(&p->mu);
    dx_apply_job *j = p->done;
    p->done = p->done_tail = NULL;
    pthread_mutex_unlock(&p->mu);
    return j;
}

void dx_apply_pool_stop(dx_apply_pool *p)
{
    pthread_mutex_lock(&p->mu);
    p->stopping = 1;
    pthread_cond_broadcast(&p->cv);
    pthread_mutex_unlock(&p->mu);
    for (int i = 0; i < p->nthreads; i++) pthread_join(p->threads[i], NULL);
    p->nthreads = 0;
}

void dx_apply_pool_trim(dx_apply_pool *p)
{
    pthread_mutex_lock(&p->mu);
    p->trim_gen++;
    pthread_cond_broadcast(&p->cv);
    pthread_mutex_unlock(&p->mu);
}

void dx_apply_pool_free(dx_apply_pool *p)
{
    if (p->efd >= 0) close(p->efd);
    p->efd = -1;
    free(p->threads);
    p->threads = NULL;
    pthread_cond_destroy(&p->cv);
    pthread_mutex_destroy(&p->mu);
}
