/* deltaxfer's own lazy-pages server: it takes the userfaultfds a `criu restore
 * --lazy-pages` hands out (one per restored process), places each process's image pages
 * with UFFDIO_COPY straight from the mapped pages files -- the faulted page and a window
 * after it first, the rest by background workers in large batches -- and follows the
 * restored tree's fork, mremap, munmap and madvise(DONTNEED) events.  See
 * docs/ARCHITECTURE.md "Lazy restore" for the protocol with criu and the locking. */
#ifndef DX_LAZY_H
#define DX_LAZY_H

#include <stddef.h>
#include <stdint.h>

typedef struct dx_lazy dx_lazy;

typedef struct {
    uint64_t tasks;             /* userfaultfds served: restored processes + forks */
    uint64_t forks;
    uint64_t pages_total;       /* image pages to place, over every task */
    uint64_t pages_faulted;     /* placed by the fault handler (faulted page + window) */
    uint64_t pages_prefetched;  /* placed by the background workers */
    uint64_t pages_present;     /* found already there (EEXIST): placed by the other side */
    uint64_t pages_dropped;     /* never placed: unmapped or discarded by the process first */
    uint64_t pages_zero;        /* zero pages placed on faults outside the image */
    uint64_t pages_zero_image;  /* image pages found all zeros: the zero page, no copy */
    uint64_t faults;            /* page-fault messages read */
    uint64_t events;            /* fork / remap / remove / unmap messages read */
    uint64_t eagain;            /* copies refused while the address space was changing */
    uint64_t tasks_gone;        /* tasks that exited before every page was placed */
    uint64_t pages_abandoned;   /* the pages those tasks never needed */
    uint64_t pages_pending;     /* post-copy: pages whose content was still on the source */
    uint64_t pages_postcopied;  /* placed as they arrived (dx_lazy_arrived) */
    uint64_t requests;          /* post-copy: faults on pending pages asked for */
    uint64_t requests_dropped;  /* ... that could not be written (no fd, or it was full) */
    uint64_t fault_waits;       /* post-copy: pages a fault waited for, until placed */
    uint64_t fault_wait_ns;     /* ... the waits summed (from the first fault's request) */
    uint64_t fault_wait_max_ns; /* ... the longest */
    uint64_t pages_recycled;    /* pages punched out of the pages files (dx_lazy_recycle) */
    uint64_t pages_recycle_failed; /* ... that the filesystem refused to punch */
    uint64_t punches;           /* fallocate calls: runs of complete blocks */
    uint64_t placed_ns;         /* monotonic clock: no task lacked a page any more */
    uint64_t prefetch_ns;       /* monotonic clock: prefetch started */
    uint64_t complete_ns;       /* monotonic clock: every page of every task placed */
    int error;                  /* first hard error (-errno), 0 if none */
    char error_what[128];
} dx_lazy_stats;

/* A server with `workers` background copy threads (>= 1), copying `chunk_pages` pages per
 * UFFDIO_COPY in the background and up to `fault_pages` from a faulting address on.
 * NULL with *err = -errno on failure. */
dx_lazy *dx_lazy_new(int workers, uint32_t chunk_pages, uint32_t fault_pages, int *err);

/* Serve `uffd` (the server owns it from now on, also on failure) for restored process
 * `pid`, whose pagemap is the n entries (vaddr[i], nr_pages[i], flags[i]) -- CRIU's
 * pagemap_entry flags: present entries take their pages, in order, from the pages file
 * `pages_fd` (mapped here, read-only; the caller may close it) -- and whose VMAs end at
 * vma_start[j]..vma_end[j] (sorted).  Only entries flagged both present and lazy are
 * served (CRIU restores the others itself).  Returns 0 or -errno (-EINVAL: a lazy entry
 * that is in the parent image, outside every VMA, or pages beyond the file).
 * hashes[0..nhashes): the receiver's XXH3 of every page of the pages file (nhashes = the
 * file's pages), or none: pages hashing as the zero page get the zero page, without the
 * file being read (a pending page never: its content is still to come). */
int dx_lazy_add(dx_lazy *lz, int uffd, int pid, int pages_fd, uint64_t pages_file_size,
                const uint64_t *vaddr, const uint64_t *nr_pages, const uint64_t *flags,
                size_t n, const uint64_t *vma_start, const uint64_t *vma_end, size_t nvma,
                const uint64_t *pending, size_t npending, const uint64_t *hashes,
                size_t nhashes);

/* Post-copy: pending[0..npending) (sorted vaddrs, lazy pages of the image) are not in the
 * pages file yet.  No fault or worker places them; a fault on one writes a request
 * {int32 pid, uint32 n, uint64 first page index in the pages file} to the fd set here
 * (a socket; never blocks, dropped when full); dx_lazy_arrived(pid, p, n) says the pages
 * file now holds pages [p, p+n) of image pid: they are placed (waking the faulting
 * threads).  Returns the pages placed, or -errno (-ENOENT: no task of pid with pending
 * pages, -EINVAL: beyond the pages file). */
void dx_lazy_set_request_fd(dx_lazy *lz, int fd);
int64_t dx_lazy_arrived(dx_lazy *lz, int pid, uint64_t p, uint64_t n);

/* The migration is committed (the source is gone): from now on a recycler thread punches
 * every 2 MiB block of a task's pages file whose lazy pages are all placed (or dropped)
 * out of the file (FALLOC_FL_PUNCH_HOLE; runs of such blocks in one call), the blocks
 * done already first, so that the page cache they held is free memory for the pages
 * placed next: the destination then holds about one copy of the process, not two.
 * Only for tasks added with the pages file open for writing and the receiver's hashes;
 * a fork stops it for every block not complete by then (the child may need any page
 * its parent lacked).  The file is not a copy of the process after this: the caller
 * must no longer offer it as one.  Returns the pages punched so far, or -errno. */
int64_t dx_lazy_recycle(dx_lazy *lz);

/* The restore finished (criu sent its end mark): start the background copy. */
void dx_lazy_prefetch(dx_lazy *lz);

/* Wait up to timeout_ms for every task to be complete (all pages placed, or the task
 * gone) and closed.  1 when complete, 0 on timeout. */
int dx_lazy_wait(dx_lazy *lz, int timeout_ms);

void dx_lazy_get_stats(dx_lazy *lz, dx_lazy_stats *out);

/* Stop the threads, close every userfaultfd (the kernel then unregisters their ranges:
 * pages not placed by then are filled with zeros on their next fault), unmap. */
void dx_lazy_free(dx_lazy *lz);

#endif
