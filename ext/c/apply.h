/* The destination's page applier: frames of page records become pages of a pages file.
 *
 * One applier per memory image being received.  Each call takes frames (back to back),
 * checks every record of a frame before any of it is written (records strictly ascending
 * across the whole image, vaddrs in the image's layout, XOR deltas only for pages the
 * destination holds), builds each page (zero / full / XOR against the held page, read
 * from a read-only mapping of the held pages file), hashes it (XXH3-64, as dx_hash_pages)
 * and writes runs of consecutive pages with pwritev -- never through a writable mapping.
 *
 * Two output modes:
 *   DX_APPLY_AT_INDEX  page i of the layout at byte i * 4096 of the output file (a full
 *                      round: the file is preallocated by the caller; zero records for
 *                      pages nothing was written to are not written at all);
 *   DX_APPLY_APPEND    received pages appended in arrival order (a round over held pages:
 *                      its side file, or a final round's child image); zero pages become
 *                      holes, made part of the file by dx_applier_finish.
 * Scratch memory is bounded: the largest frame's raw payload (<= 16 MiB) plus one run
 * (DX_APPLY_RUN_PAGES pages) plus, at-index, an iovec and a run entry per page the frame
 * writes (at most 9 per full record: 16 MiB raw -> ~1.5 MiB), per work area.  Per-page
 * state is 9 bytes (hash + source)
 * in at-index mode, 16 bytes per received page (vaddr + hash) in append mode.
 *
 * Threads.  In append mode one call runs at a time and records ascend across the whole
 * image (the file is written in arrival order).  In at-index mode (a full round, the bulk
 * of a migration's bytes) calls may run at once on several threads, each with its own
 * dx_apply_work: records ascend within a frame, frames may be applied in any order, and
 * each page may be received once per round -- a record for a page already received is
 * refused (DX_E_APPLY_TWICE; the page's source byte is claimed atomically, so two threads
 * cannot both take it).  Counters are updated atomically.  A frame's writes go under the
 * applier's write lock; a frame without XOR records (a first round's) is claimed, hashed
 * and laid out in runs first, with no lock held, and the lock then covers its pwritev
 * calls alone.
 */
#ifndef DX_APPLY_H
#define DX_APPLY_H

#include <pthread.h>
#include <sys/uio.h>

#include "dx_common.h"

#define DX_APPLY_RUN_PAGES 256u
/* at-index: at most this many zero pages of a frame between two written pages are
 * written as well (zeros), so that one pwritev covers both sides: memwork's page mix
 * otherwise breaks a frame into ~5-page runs, a syscall each (1 GiB in 4-page runs:
 * 0.39 CPU-s here, in 1 MiB runs 0.18). Longer zero stretches stay unwritten (their
 * preallocated blocks read as zeros; no page cache). */
#define DX_APPLY_ZERO_BRIDGE 8u

enum { DX_APPLY_AT_INDEX = 0, DX_APPLY_APPEND = 1 };

/* source of each page in at-index mode */
enum { DX_SRC_NONE = 0, DX_SRC_HELD = 1, DX_SRC_RECEIVED = 2 };

/* errors of the applier, beside dx_error's (dx_apply_strerror names both) */
enum {
    DX_E_APPLY_ORDER = 40,      /* a record at or below the previous one's vaddr */
    DX_E_APPLY_NOT_HELD = 41,   /* an XOR delta for a page the destination does not hold */
    DX_E_APPLY_IO = 42,         /* a write or copy failed: errno in err_errno */
    DX_E_APPLY_HELD_SHORT = 43, /* the held pages file is shorter than its pagemap */
    DX_E_APPLY_NO_PAGES = 44,   /* records for an image without present pages */
    DX_E_APPLY_TWICE = 45,      /* at-index: a record for a page already received */
    DX_E_APPLY_CANCELLED = 46,  /* an apply pool (applypool.h) stopped before the job ran */
};

/* One thread's scratch and its last error (the frame's raw payload, one run's built
 * pages).  Zeroed to start; dx_apply_work_free releases it. */
typedef struct {
    uint64_t at;                /* the run's first page in the file */
    uint32_t first, n;          /* its iovecs in dx_apply_work.iov */
} dx_apply_run;

typedef struct {
    uint8_t *raw;               /* one frame's raw payload */
    size_t raw_cap;
    uint8_t *scratch;           /* built pages of one run (DX_APPLY_RUN_PAGES) */
    /* at-index, a frame without XOR records: all its runs, collected (hashed and claimed
     * with no lock held), then written under the write lock at once; iov_cap entries
     * each */
    struct iovec *iov;
    dx_apply_run *runs;
    size_t iov_cap;
    size_t err_offset;          /* last error: the frame's byte offset in the call's buffer */
    uint64_t err_vaddr;         /* the record's vaddr, where there is one */
    int err_errno;              /* DX_E_APPLY_IO: errno */
} dx_apply_work;

void dx_apply_work_free(dx_apply_work *w);

typedef struct {
    const uint64_t *vaddrs;     /* the image's layout, strictly ascending */
    size_t npages;
    const uint64_t *held_vaddrs;/* the held image (XOR bases), may be empty */
    size_t nheld;
    const uint8_t *held_pages;  /* read-only mapping, nheld pages (owned) */
    int fd, mode;
    uint64_t *hashes;           /* at-index: [npages]; append: received pages' [npages] */
    uint64_t *recv_vaddrs;      /* append: [npages] */
    uint8_t *src;               /* at-index: [npages], DX_SRC_* */
    size_t next;                /* append: layout index after the last record applied */
    size_t nrecv;               /* records applied (atomic in at-index mode) */
    uint64_t append_pages;      /* append: file length in pages */
    uint64_t counts[3];         /* records by kind (atomic in at-index mode) */
    dx_apply_work w;            /* the work area of dx_applier_apply, init, share, finish */
    /* at-index: one frame's writes at a time. The filesystems take the file's inode lock
     * for a buffered write anyway; threads queued on it spin (rwsem optimistic spinning)
     * while the writer runs -- a thread waiting here sleeps, its frame decoded. */
    pthread_mutex_t write_lock;
    int lock_ready;
    /* jobs of an apply pool (applypool.h) holding this applier: its file stays open */
    pthread_mutex_t idle_mu;
    pthread_cond_t idle_cv;
    int held;
} dx_applier;

/* A pool job on this applier begins (hold) or has ended its work (release);
 * dx_applier_wait_idle returns once none is held. */
void dx_applier_hold(dx_applier *a);
void dx_applier_release(dx_applier *a);
void dx_applier_wait_idle(dx_applier *a);

/* hashes/recv_vaddrs/src are the caller's arrays of npages entries (recv_vaddrs only
 * in append mode, src only in at-index mode).  held_fd may be -1 (nothing held). */
int dx_applier_init(dx_applier *a, const uint64_t *vaddrs, size_t npages, int fd, int mode,
                    const uint64_t *held_vaddrs, size_t nheld, int held_fd,
                    uint64_t *hashes, uint64_t *recv_vaddrs, uint8_t *src);
void dx_applier_free(dx_applier *a);

/* At-index mode: copy every page the held image and the layout share into the output
 * file (copy_file_range, in ascending runs) and take its hash from held_hashes[nheld].
 * Returns the number of pages shared, or a negative error. */
int64_t dx_applier_share_held(dx_applier *a, int held_fd, const uint64_t *held_hashes);

/* Apply the frames in buf[0..len).  counts[3] gets this call's records by kind. */
int dx_applier_apply(dx_applier *a, const uint8_t *buf, size_t len, size_t max_raw,
                     uint64_t counts[3]);
/* The same with the caller's work area w (its error fields say where a failure was):
 * at-index mode only, from any number of threads at once, each with its own w. */
int dx_applier_apply_with(dx_applier *a, dx_apply_work *w, const uint8_t *buf, size_t len,
                          size_t max_raw, uint64_t counts[3]);

/* End of the image.  At-index: returns the number of pages neither held nor received.
 * Append: sets the file's length (trailing zero pages) and returns 0. */
int64_t dx_applier_finish(dx_applier *a);

const char *dx_apply_strerror(int code);

/* Check pagemap pairs (vaddr, nr_pages | flags << 32): aligned, 0 < nr_pages <= max_nr,
 * ascending, not overlapping, no vaddr past 2^64.  *present gets the number of present
 * pages; on error *err_index is the entry (0-based). */
#define DX_PE_PRESENT 4u
int dx_pagemap_check(const uint64_t *pairs, size_t n, uint64_t max_nr, uint64_t *present,
                     size_t *err_index);
/* The vaddr of every present page of checked pairs into out[present]. */
void dx_pagemap_present_vaddrs(const uint64_t *pairs, size_t n, uint64_t *out);

/* A round over held pages, finishing (store.InPlaceRound.finish): copy the received
 * runs of its side file into the held pages file.  runs: (vaddr, nr_pages, from_held)
 * triples in layout order (dx merge_parent_hashes); the pages of the runs with
 * from_held == 0 lie back to back in src from byte 0 and go to their layout index in
 * dst.  Each copied run's (index, nr_pages) goes to out (2 * nruns entries at most).
 * Returns the number of runs copied, or a negative DX_E_APPLY_* (errno in *err). */
int64_t dx_copy_received_runs(int src_fd, int dst_fd, const uint64_t *runs, size_t nruns,
                              uint64_t *out, int *err);

/* pwrite values[at .. at + n) at byte at * 8 of fd for every (at, n) pair: the entries
 * of a u64 table file that a round changed.  0, or -1 with errno. */
int dx_write_u64_runs(int fd, const uint64_t *values, const uint64_t *pairs, size_t npairs);

#endif
