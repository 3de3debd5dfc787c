/* Written-page tracking without soft-dirty: a userfaultfd created inside the target
 * (one injected syscall), set up from our side for asynchronous write-protection, and
 * PAGEMAP_SCAN to list the pages written since the last scan (re-protecting them in the
 * same call).  See docs/TRACKING.md for the sequence and what it guarantees. */
#ifndef DX_TRACK_H
#define DX_TRACK_H

#include <sys/types.h>

#include "dx_common.h"

/* What happened around an injection, for the caller's report. */
typedef struct {
    int signals_requeued;   /* signals that arrived while the target was held, re-sent */
    int steps;              /* single steps taken to run the injected syscalls */
    int stage;              /* how far it got: 1 seized, 2 stopped, 3 created, 4 taken,
                               5 closed in the target, 6 registers restored, 7 detached */
    int refused;            /* why it was refused (returns -EINVAL), DX_REFUSED_* */
} dx_inject_info;

/* The bytes at syscall_ip, re-read once the thread is stopped, are not `syscall`
 * (0f 05): nothing was run in the target. */
#define DX_REFUSED_NOT_SYSCALL 1
/* The fd the system call returned is not a userfaultfd (/proc/self/fd/N of our copy, or
 * /proc/PID/fd/N where it could not be taken): our copy is closed and the target's fd is
 * left alone (it is not ours to close). */
#define DX_REFUSED_NOT_UFFD 2

/* Seize thread `tid` of process `pid` (ptrace), interrupt it, run
 * `userfaultfd(uffd_flags)` in it at `syscall_ip` (the address of a `syscall`
 * instruction mapped executable in the target, e.g. in its vDSO), take the new fd with
 * pidfd_getfd, check that it is a userfaultfd, run `close(fd)` in the target, restore
 * its registers exactly and detach.  The two bytes at syscall_ip are re-read once the
 * thread is stopped and must still be `syscall`.
 * Signals that arrive while it is held are delivered again after the detach.  Returns
 * our fd (>= 0) or -errno; on failure the target's registers and fd table are as
 * before (whatever stage it failed at; see info->stage). */
int dx_inject_userfaultfd(pid_t pid, pid_t tid, uint64_t syscall_ip, int uffd_flags,
                          dx_inject_info *info);
/* The same with system call `nr`(arg) in place of userfaultfd(): for tests of the
 * checks above (a call that returns some other fd number must be refused). */
int dx_inject_fd_syscall(pid_t pid, pid_t tid, uint64_t syscall_ip, long nr, long arg,
                         dx_inject_info *info);

/* userfaultfd(flags) in our own process (a feature probe): the fd or -errno. */
int dx_uffd_create(int flags);

/* UFFDIO_API on fd asking for `features`; the kernel's answer in *got. -errno or 0. */
int dx_uffd_api(int fd, uint64_t features, uint64_t *got);
/* UFFDIO_REGISTER [start, end) for write-protect faults. -errno or 0. */
int dx_uffd_register_wp(int fd, uint64_t start, uint64_t end);
/* UFFDIO_WRITEPROTECT [start, end) (protect != 0) or un-protect. -errno or 0. */
int dx_uffd_writeprotect(int fd, uint64_t start, uint64_t end, int protect);
/* UFFDIO_UNREGISTER [start, end). -errno or 0. */
int dx_uffd_unregister(int fd, uint64_t start, uint64_t end);

/* PAGEMAP_SCAN of [start, end) on an open /proc/PID/pagemap: append the ranges of pages
 * written since they were last protected to (*out_starts, *out_ends) (malloc'd, grown;
 * *nout in/out).  Nothing is re-protected here (PM_SCAN_WP_MATCHING would also turn
 * empty entries into uffd-wp markers): dx_protect_unclean protects what is about to be
 * read.  Every VMA in the range must be registered for asynchronous write-protection
 * (else -EPERM).  Returns pages reported, or -errno. */
ptrdiff_t dx_scan_written(int pagemap_fd, uint64_t start, uint64_t end,
                          uint64_t **out_starts, uint64_t **out_ends, size_t *nout,
                          size_t *cap);

/* Is PAGEMAP_SCAN there?  0 when the ioctl is known (on our own pagemap), else -errno. */
int dx_pagemap_scan_probe(int pagemap_fd);
/* The page set CRIU dumps inside the VMAs [starts[k], ends[k]) -- present or swapped
 * pages, not mapped to the (huge) zero page, and in the VMAs flagged in skip_file
 * (private file mappings) not still the file's page -- as runs (vaddr, length in bytes),
 * from PAGEMAP_SCAN's ranges instead of 8 bytes of /proc/PID/pagemap per page: what
 * dx_pagemap_runs computes. Returns the number of runs (*run_vaddrs, *run_lens malloc'd)
 * or -errno. */
ptrdiff_t dx_scan_page_set(int fd, const uint64_t *starts, const uint64_t *ends, size_t nvmas,
                           const uint8_t *skip_file, uint64_t **run_vaddrs, uint64_t **run_lens);

/* clean[i] = 1 when page vaddrs[i] lies in one of the tracked ranges, in none of the
 * written ranges, and in held_vaddrs (the destination holds it): its content is what
 * was read last time and need not be read again.  All inputs ascending; ranges are
 * [start, end) pairs, disjoint.  Returns the number of clean pages. */
size_t dx_clean_mask(const uint64_t *vaddrs, size_t n,
                     const uint64_t *tr_starts, const uint64_t *tr_ends, size_t ntr,
                     const uint64_t *wr_starts, const uint64_t *wr_ends, size_t nwr,
                     const uint64_t *held, size_t nheld, uint8_t *clean);

/* Read the pages with clean[i] == 0 (all when clean is NULL) of process pid into their
 * slots buf + i * page size.  Unreadable pages are zero-filled and counted in
 * *pages_failed.  Returns the number of pages read (failed ones included) or -errno. */
ptrdiff_t dx_read_pages_masked(pid_t pid, const uint64_t *vaddrs, size_t n,
                               const uint8_t *clean, uint8_t *buf, uint64_t *pages_failed);

/* Write-protect again the pages about to be read (clean[i] == 0) that lie in tracked
 * ranges, in runs; *failed counts runs the kernel refused (such pages stay unprotected,
 * i.e. they will be reported written again). Returns the number of runs. */
ptrdiff_t dx_protect_unclean(int uffd, const uint64_t *vaddrs, size_t n, const uint8_t *clean,
                             const uint64_t *tr_starts, const uint64_t *tr_ends, size_t ntr,
                             size_t *failed);

#endif
