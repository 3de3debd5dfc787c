#define _GNU_SOURCE
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/ptrace.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <sys/wait.h>
#include <unistd.h>
#if defined(__x86_64__)
#include <sys/user.h>
#endif

#include "procmem.h"
#include "track.h"

/* The kernel's uapi (linux/userfaultfd.h, linux/fs.h) as of 6.7; spelled out here because
 * the build machine's headers may be older than the kernel we run on. */
struct dx_uffdio_range { uint64_t start, len; };
struct dx_uffdio_api { uint64_t api, features, ioctls; };
struct dx_uffdio_register { struct dx_uffdio_range range; uint64_t mode, ioctls; };
struct dx_uffdio_writeprotect { struct dx_uffdio_range range; uint64_t mode; };
#define DX_UFFD_API 0xAAull
#define DX_UFFDIO_API _IOWR(0xAA, 0x3F, struct dx_uffdio_api)
#define DX_UFFDIO_REGISTER _IOWR(0xAA, 0x00, struct dx_uffdio_register)
#define DX_UFFDIO_UNREGISTER _IOR(0xAA, 0x01, struct dx_uffdio_range)
#define DX_UFFDIO_WRITEPROTECT _IOWR(0xAA, 0x06, struct dx_uffdio_writeprotect)
#define DX_UFFDIO_REGISTER_MODE_WP (1ull << 1)
#define DX_UFFDIO_WRITEPROTECT_MODE_WP (1ull << 0)

struct dx_page_region { uint64_t start, end, categories; };
struct dx_pm_scan_arg {
    uint64_t size, flags, start, end, walk_end, vec, vec_len, max_pages;
    uint64_t category_inverted, category_mask, category_anyof_mask, return_mask;
};
#define DX_PAGEMAP_SCAN _IOWR('f', 16, struct dx_pm_scan_arg)
#define DX_PM_SCAN_CHECK_WPASYNC (1ull << 1)
#define DX_PAGE_IS_WRITTEN (1ull << 1)
#define DX_PAGE_IS_FILE (1ull << 2)
#define DX_PAGE_IS_PRESENT (1ull << 3)
#define DX_PAGE_IS_SWAPPED (1ull << 4)
#define DX_PAGE_IS_PFNZERO (1ull << 5)

#ifndef SYS_pidfd_open
#define SYS_pidfd_open 434
#endif
#ifndef SYS_pidfd_getfd
#define SYS_pidfd_getfd 438
#endif

/* ---- injecting userfaultfd() ----------------------------------------------------------- */

#if defined(__x86_64__)

#define MAX_PARKED 256
typedef struct {
    int n;
    int sig[MAX_PARKED];
    siginfo_t info[MAX_PARKED];
} parked_t;

static int wait_stopped(pid_t tid, int *status)
{
    for (;;) {
        pid_t r = waitpid(tid, status, __WALL);
        if (r == tid) return WIFSTOPPED(*status) ? 0 : -ESRCH;   /* exited or killed */
        if (r < 0 && errno == EINTR) continue;
        return r < 0 ? -errno : -ECHILD;
    }
}

/* A signal-delivery-stop for a signal that is not ours: keep it to deliver after the
 * detach (the tracee is resumed with the signal suppressed meanwhile). */
static void park(pid_t tid, int sig, parked_t *p)
{
    if (p->n >= MAX_PARKED) return;   /* the same signals again and again: once is enough */
    for (int i = 0; i < p->n; i++)
        if (p->sig[i] == sig && sig < SIGRTMIN) return;   /* standard signals do not queue */
    if (ptrace(PTRACE_GETSIGINFO, tid, 0, &p->info[p->n]) != 0)
        memset(&p->info[p->n], 0, sizeof p->info[p->n]);
    p->sig[p->n++] = sig;
}

static void requeue(pid_t pid, pid_t tid, parked_t *p, dx_inject_info *info)
{
    for (int i = 0; i < p->n; i++) {
        /* with its siginfo where the kernel allows it (user-sent signals), else plainly */
        if (syscall(SYS_rt_tgsigqueueinfo, pid, tid, p->sig[i], &p->info[i]) != 0)
            syscall(SYS_tgkill, pid, tid, p->sig[i]);
        info->signals_requeued++;
    }
}

/* Run one system call in the stopped tracee at ip (a `syscall` instruction) with the
 * saved registers otherwise; *ret gets its return value.  orig_rax = -1 keeps the
 * kernel from restarting an interrupted system call of the tracee's over ours. */
static int run_syscall(pid_t tid, const struct user_regs_struct *saved, uint64_t ip,
                       long nr, long a1, long a2, long *ret, parked_t *parked,
                       dx_inject_info *info)
{
    struct user_regs_struct r = *saved;
    r.rip = ip;
    r.rax = (unsigned long long)nr;
    r.orig_rax = (unsigned long long)-1;
    r.rdi = (unsigned long long)a1;
    r.rsi = (unsigned long long)a2;
    r.rdx = 0;
    if (ptrace(PTRACE_SETREGS, tid, 0, &r) != 0) return -errno;
    for (int step = 0; step < 64; step++) {
        if (ptrace(PTRACE_SINGLESTEP, tid, 0, 0) != 0) return -errno;
        info->steps++;
        int status, rc = wait_stopped(tid, &status);
        if (rc) return rc;
        if (ptrace(PTRACE_GETREGS, tid, 0, &r) != 0) return -errno;
        int sig = WSTOPSIG(status), event = status >> 16;
        if (event == 0 && sig != SIGTRAP) park(tid, sig, parked);
        if (r.rip == ip + 2) {
            *ret = (long)r.rax;
            return 0;
        }
        if (r.rip != ip) return -EFAULT;   /* not where we put it: give up, restore */
    }
    return -ETIMEDOUT;
}

/* Is fd (of process pid, or ours when pid is 0) a userfaultfd? Its /proc link says. */
static int is_userfaultfd(pid_t pid, long fd)
{
    static const char want[] = "anon_inode:[userfaultfd]";
    char path[64], link[sizeof want + 1];
    if (pid) snprintf(path, sizeof path, "/proc/%d/fd/%ld", (int)pid, fd);
    else snprintf(path, sizeof path, "/proc/self/fd/%ld", fd);
    ssize_t n = readlink(path, link, sizeof link);
    return n == (ssize_t)(sizeof want - 1) && memcmp(link, want, sizeof want - 1) == 0;
}

int dx_inject_userfaultfd(pid_t pid, pid_t tid, uint64_t syscall_ip, int uffd_flags,
                          dx_inject_info *info)
{
    return dx_inject_fd_syscall(pid, tid, syscall_ip, SYS_userfaultfd, uffd_flags, info);
}

int dx_inject_fd_syscall(pid_t pid, pid_t tid, uint64_t syscall_ip, long nr, long arg,
                         dx_inject_info *info)
{
    parked_t parked = {0};
    struct user_regs_struct saved;
    int status, rc, ours = -1;
    memset(info, 0, sizeof *info);
    if (ptrace(PTRACE_SEIZE, tid, 0, 0) != 0) return -errno;
    info->stage = 1;
    if (ptrace(PTRACE_INTERRUPT, tid, 0, 0) != 0) {
        rc = -errno;
        ptrace(PTRACE_DETACH, tid, 0, 0);
        return rc;
    }
    /* wait for the interrupt's stop; signals arriving first are parked */
    for (;;) {
        rc = wait_stopped(tid, &status);
        if (rc) return rc;                    /* gone: nothing left to restore */
        if ((status >> 16) == PTRACE_EVENT_STOP) break;
        park(tid, WSTOPSIG(status), &parked);
        if (ptrace(PTRACE_CONT, tid, 0, 0) != 0) return -errno;
    }
    info->stage = 2;
    /* The address was chosen from a read of the target's memory before it was stopped;
     * what runs is what is there now: check it is still `syscall` (0f 05). */
    errno = 0;
    long word = ptrace(PTRACE_PEEKTEXT, tid, (void *)syscall_ip, 0);
    if (errno != 0) {
        rc = -errno;
        goto detach;
    }
    if ((word & 0xffff) != 0x050f) {
        info->refused = DX_REFUSED_NOT_SYSCALL;
        rc = -EINVAL;
        goto detach;
    }
    if (ptrace(PTRACE_GETREGS, tid, 0, &saved) != 0) {
        rc = -errno;
        goto detach;
    }
    long remote = -1, closed = 0;
    rc = run_syscall(tid, &saved, syscall_ip, nr, arg, 0, &remote, &parked, info);
    if (rc == 0 && remote < 0) rc = (int)remote;         /* userfaultfd() failed in there */
    if (rc == 0) {
        info->stage = 3;
        int pidfd = (int)syscall(SYS_pidfd_open, pid, 0);
        if (pidfd >= 0) {
            ours = (int)syscall(SYS_pidfd_getfd, pidfd, (int)remote, 0);
            if (ours < 0) rc = -errno;
            close(pidfd);
        } else {
            rc = -errno;
        }
        /* Only a userfaultfd is what our call created: anything else is an fd the target
         * already had (the call did not do what we asked); never use it, never close it. */
        if (ours >= 0 ? !is_userfaultfd(0, ours) : !is_userfaultfd(pid, remote)) {
            info->refused = DX_REFUSED_NOT_UFFD;
            if (ours >= 0) close(ours);
            ours = -1;
            rc = -EINVAL;
            goto restore;
        }
        if (ours >= 0) info->stage = 4;
        /* close it in the target whatever happened: the target must not keep it */
        int rc2 = run_syscall(tid, &saved, syscall_ip, SYS_close, remote, 0, &closed, &parked,
                              info);
        if (rc2 == 0 && closed == 0) {
            if (ours >= 0) info->stage = 5;
        } else if (rc == 0) {
            rc = rc2 ? rc2 : (int)closed;
        }
    }
restore:
    if (ptrace(PTRACE_SETREGS, tid, 0, &saved) != 0 && rc == 0) rc = -errno;
    else if (info->stage >= 5) info->stage = 6;
detach:
    if (ptrace(PTRACE_DETACH, tid, 0, 0) != 0 && rc == 0) rc = -errno;
    else if (info->stage == 6) info->stage = 7;
    requeue(pid, tid, &parked, info);
    if (rc != 0) {
        if (ours >= 0) close(ours);
        return rc;
    }
    return ours;
}

#else

int dx_inject_userfaultfd(pid_t pid, pid_t tid, uint64_t syscall_ip, int uffd_flags,
                          dx_inject_info *info)
{
    (void)pid; (void)tid; (void)syscall_ip; (void)uffd_flags;
    memset(info, 0, sizeof *info);
    return -ENOSYS;   /* the register layout used above is x86-64's */
}

int dx_inject_fd_syscall(pid_t pid, pid_t tid, uint64_t syscall_ip, long nr, long arg,
                         dx_inject_info *info)
{
    (void)pid; (void)tid; (void)syscall_ip; (void)nr; (void)arg;
    memset(info, 0, sizeof *info);
    return -ENOSYS;
}

#endif

/* ---- userfaultfd set-up ------------------------------------------------------------------ */

int dx_uffd_api(int fd, uint64_t features, uint64_t *got)
{
    struct dx_uffdio_api a = {.api = DX_UFFD_API, .features = features};
    if (ioctl(fd, DX_UFFDIO_API, &a) != 0) return -errno;
    *got = a.features;
    return 0;
}

int dx_uffd_register_wp(int fd, uint64_t start, uint64_t end)
{
    struct dx_uffdio_register r = {.range = {start, end - start},
                                   .mode = DX_UFFDIO_REGISTER_MODE_WP};
    return ioctl(fd, DX_UFFDIO_REGISTER, &r) == 0 ? 0 : -errno;
}

int dx_uffd_writeprotect(int fd, uint64_t start, uint64_t end, int protect)
{
    struct dx_uffdio_writeprotect w = {.range = {start, end - start},
                                       .mode = protect ? DX_UFFDIO_WRITEPROTECT_MODE_WP : 0};
    return ioctl(fd, DX_UFFDIO_WRITEPROTECT, &w) == 0 ? 0 : -errno;
}

int dx_uffd_unregister(int fd, uint64_t start, uint64_t end)
{
    struct dx_uffdio_range r = {start, end - start};
    return ioctl(fd, DX_UFFDIO_UNREGISTER, &r) == 0 ? 0 : -errno;
}

/* ---- PAGEMAP_SCAN -------------------------------------------------------------------------- */

#define SCAN_VEC 512

static int push_range(uint64_t s, uint64_t e, uint64_t **os, uint64_t **oe, size_t *n,
                      size_t *cap)
{
    if (*n && (*oe)[*n - 1] == s) { (*oe)[*n - 1] = e; return 0; }
    if (*n == *cap) {
        size_t c = *cap ? *cap * 2 : 64;
        uint64_t *a = realloc(*os, c * sizeof *a);
        if (!a) return -ENOMEM;
        *os = a;
        uint64_t *b = realloc(*oe, c * sizeof *b);
        if (!b) return -ENOMEM;
        *oe = b;
        *cap = c;
    }
    (*os)[*n] = s;
    (*oe)[*n] = e;
    (*n)++;
    return 0;
}

/* PAGEMAP_SCAN of [start, end) with the flags and category masks of `q` (the rest of it
 * is filled here), the matching ranges appended to (*os, *oe) (touching ones merged);
 * walk_end resumes a scan the vector filled up.  Returns the pages found, or -errno. */
static ptrdiff_t scan_ranges(int fd, uint64_t start, uint64_t end, const struct dx_pm_scan_arg *q,
                             uint64_t **os, uint64_t **oe, size_t *n, size_t *cap)
{
    struct dx_page_region vec[SCAN_VEC];
    ptrdiff_t pages = 0;
    uint64_t cur = start;
    while (cur < end) {
        struct dx_pm_scan_arg a = *q;
        a.size = sizeof a;
        a.start = cur;
        a.end = end;
        a.walk_end = 0;
        a.vec = (uint64_t)(uintptr_t)vec;
        a.vec_len = SCAN_VEC;
        a.max_pages = 0;
        int got = ioctl(fd, DX_PAGEMAP_SCAN, &a);
        if (got < 0) return -errno;
        for (int i = 0; i < got; i++) {
            int rc = push_range(vec[i].start, vec[i].end, os, oe, n, cap);
            if (rc) return rc;
            pages += (ptrdiff_t)((vec[i].end - vec[i].start) >> DX_PAGE_SHIFT);
        }
        if (a.walk_end <= cur || a.walk_end >= end) break;
        cur = a.walk_end;
    }
    return pages;
}

ptrdiff_t dx_scan_written(int fd, uint64_t start, uint64_t end,
                          uint64_t **out_starts, uint64_t **out_ends, size_t *nout, size_t *cap)
{
    struct dx_pm_scan_arg q;
    memset(&q, 0, sizeof q);
    q.flags = DX_PM_SCAN_CHECK_WPASYNC;
    q.category_mask = DX_PAGE_IS_WRITTEN;
    /* not WRITTEN alone: with exactly WRITTEN in both masks the kernel takes a fast
     * path that counts empty page-table entries as written (and, were we to
     * re-protect here, would put a uffd-wp marker in each) */
    q.return_mask = DX_PAGE_IS_WRITTEN | DX_PAGE_IS_PRESENT | DX_PAGE_IS_SWAPPED;
    return scan_ranges(fd, start, end, &q, out_starts, out_ends, nout, cap);
}

ptrdiff_t dx_scan_page_set(int fd, const uint64_t *starts, const uint64_t *ends, size_t nvmas,
                           const uint8_t *skip_file, uint64_t **run_vaddrs, uint64_t **run_lens)
{
    uint64_t *os = NULL, *oe = NULL;
    size_t n = 0, cap = 0;
    *run_vaddrs = *run_lens = NULL;
    for (size_t k = 0; k < nvmas; k++) {
        uint64_t skip = (skip_file && skip_file[k]) ? DX_PAGE_IS_FILE : 0;
        struct dx_pm_scan_arg q;
        memset(&q, 0, sizeof q);
        /* present or swapped, not the (huge) zero page, and in a private file mapping
         * not still the file's page: what CRIU dumps */
        q.category_inverted = DX_PAGE_IS_PFNZERO | skip;
        q.category_mask = DX_PAGE_IS_PFNZERO | skip;
        q.category_anyof_mask = DX_PAGE_IS_PRESENT | DX_PAGE_IS_SWAPPED;
        q.return_mask = DX_PAGE_IS_PRESENT | DX_PAGE_IS_SWAPPED;
        ptrdiff_t rc = scan_ranges(fd, starts[k], ends[k], &q, &os, &oe, &n, &cap);
        if (rc < 0) {
            free(os);
            free(oe);
            return rc;
        }
    }
    for (size_t i = 0; i < n; i++)
        oe[i] -= os[i];                 /* ends -> lengths */
    *run_vaddrs = os;
    *run_lens = oe;
    return (ptrdiff_t)n;
}

int dx_pagemap_scan_probe(int fd)
{
    static uint64_t probe_page[DX_PAGE_SIZE / 8] __attribute__((aligned(4096)));
    struct dx_page_region vec[1];
    struct dx_pm_scan_arg a;
    memset(&a, 0, sizeof a);
    probe_page[0] = 1;    /* present */
    a.size = sizeof a;
    a.start = (uint64_t)(uintptr_t)probe_page;
    a.end = a.start + DX_PAGE_SIZE;
    a.vec = (uint64_t)(uintptr_t)vec;
    a.vec_len = 1;
    a.category_anyof_mask = DX_PAGE_IS_PRESENT;
    a.return_mask = DX_PAGE_IS_PRESENT;
    return ioctl(fd, DX_PAGEMAP_SCAN, &a) >= 0 ? 0 : -errno;
}

/* ---- which pages need reading ------------------------------------------------------------ */

size_t dx_clean_mask(const uint64_t *vaddrs, size_t n,
                     const uint64_t *tr_starts, const uint64_t *tr_ends, size_t ntr,
                     const uint64_t *wr_starts, const uint64_t *wr_ends, size_t nwr,
                     const uint64_t *held, size_t nheld, uint8_t *clean)
{
    size_t t = 0, w = 0, h = 0, count = 0;
    for (size_t i = 0; i < n; i++) {
        uint64_t v = vaddrs[i];
        while (t < ntr && tr_ends[t] <= v) t++;
        while (w < nwr && wr_ends[w] <= v) w++;
        while (h < nheld && held[h] < v) h++;
        int tracked = t < ntr && tr_starts[t] <= v;
        int written = w < nwr && wr_starts[w] <= v;
        int is_held = h < nheld && held[h] == v;
        clean[i] = (uint8_t)(tracked && !written && is_held);
        count += clean[i];
    }
    return count;
}

ptrdiff_t dx_read_pages_masked(pid_t pid, const uint64_t *vaddrs, size_t n,
                               const uint8_t *clean, uint8_t *buf, uint64_t *pages_failed)
{
    /* dx_read_pages without /proc/PID/mem: what process_vm_readv cannot read is
     * zero-filled and counted, page by page */
    uint64_t forced = 0;
    return dx_read_pages(pid, -1, vaddrs, n, clean, buf, pages_failed, &forced);
}

int dx_uffd_create(int flags)
{
    int fd = (int)syscall(SYS_userfaultfd, flags);
    return fd >= 0 ? fd : -errno;
}

ptrdiff_t dx_protect_unclean(int uffd, const uint64_t *vaddrs, size_t n, const uint8_t *clean,
                             const uint64_t *tr_starts, const uint64_t *tr_ends, size_t ntr,
                             size_t *failed)
{
    size_t t = 0, i = 0;
    ptrdiff_t runs = 0;
    *failed = 0;
    while (i < n) {
        uint64_t v = vaddrs[i];
        while (t < ntr && tr_ends[t] <= v) t++;
        if ((clean && clean[i]) || t == ntr || tr_starts[t] > v) { i++; continue; }
        size_t j = i + 1;
        while (j < n && !(clean && clean[j]) && vaddrs[j] == vaddrs[j - 1] + DX_PAGE_SIZE
               && vaddrs[j] < tr_ends[t])
            j++;
        if (dx_uffd_writeprotect(uffd, v, vaddrs[j - 1] + DX_PAGE_SIZE, 1) != 0)
            (*failed)++;   /* left unprotected: reported written next time, never missed */
        runs++;
        i = j;
    }
    return runs;
}
