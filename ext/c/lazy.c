/* deltaxfer's lazy-pages server (see lazy.h and docs/ARCHITECTURE.md "Lazy restore").
 *
 * One event thread reads every task's userfaultfd; `workers` threads copy the pages no
 * fault asked for yet.  Per task:
 *   segs      the image pages still to place, as runs [start, end) of the task's current
 *             addresses, each with the index (pidx) of its first page in the pages file;
 *             sorted by start (fault lookup) and, as a copy, by pidx (the workers' order);
 *   done      one bit per page of the pages file: placed, found present, or dropped;
 *   pending   (post-copy) one bit per page of the pages file whose content is still on
 *             the source: neither a fault nor a worker places it; a fault on it asks for
 *             it (a request record on the request fd); dx_lazy_arrived clears the bits
 *             once the receiver wrote the pages into the file, and places them.  Shared
 *             by a task and its forks (the same pages file);
 *   rw        workers copy under the read side; the event thread reads and handles the
 *             task's messages under the write side.  A remove/unmap/remap event lets the
 *             process go on as soon as it is read, so no copy may be in flight between
 *             reading it and applying it to segs (a copy landing after the process
 *             discarded a range would bring back stale data): the write side excludes
 *             exactly that.  A copy refused with EAGAIN (the address space is changing:
 *             an event is queued) releases the read side so that the event can be read.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include "hash.h"
#include "lazy.h"

#define PS 4096ULL
#define PE_PARENT (1ULL << 0)
#define PE_LAZY (1ULL << 1)
#define PE_PRESENT (1ULL << 2)
#define GRACE_NS (100ULL * 1000 * 1000)   /* a complete task's uffd stays open this long */
#define MAX_RETRY 256
#define HOLE_SPAN (2ULL << 20)  /* a fault in a hole maps zeros up to this alignment */
#define GAP_PAGES 512           /* holes between image runs up to this are zero-mapped */
#define RA_FIRST 8          /* a forward reader's first window (pages), then doubling */
#define RA_SLACK 64         /* pages past the last window still counted as going forward */
#define BLK_SHIFT 9         /* recycling: blocks of 512 pages (2 MiB) of a pages file */
#define BLK_PAGES (1ULL << BLK_SHIFT)
#define BLK_OPEN 0           /* block states: lazy pages still to place */
#define BLK_READY 1          /* all placed (or dropped) before any fork: may be punched */
#define BLK_PUNCHED 2        /* punched (or being punched) by the recycler */
#define BLK_NEVER 3          /* never: pages criu restores itself, or open at a fork */

typedef struct { uint64_t start, end, pidx; } seg_t;

typedef struct task {
    dx_lazy *lz;
    int uffd, pid;
    int closed;                 /* uffd closed: under rw (write) */
    atomic_int gone;            /* the process exited (or a hard error stopped it) */
    atomic_int exhausted;       /* the workers' cursor passed the last run */
    atomic_int failed;          /* a copy failed for good: no more background copies; the
                                   uffd stays open (its missing pages never read as zeros) */
    pthread_rwlock_t rw;
    pthread_mutex_t cmu;        /* cursor */
    seg_t *segs, *bypidx;
    size_t nseg;
    uint64_t cursor;
    int jumped;                 /* the cursor skipped ahead: rescan from 0 at the end */
    _Atomic uint64_t hint;      /* 1 + the page after the last faulted window (0: none) */
    uint64_t ra_start, ra_end;  /* event thread: pages file range [start, end) of the
                                   last fault's window, for telling a reader going
                                   forward from scattered accesses */
    uint32_t ra_pages;          /* event thread: the next sequential fault's window */
    const uint8_t *data;
    uint64_t data_pages;
    _Atomic uint64_t *done;
    _Atomic uint64_t *pending;  /* NULL: nothing pending; shared with forks */
    _Atomic uint64_t *waiting;  /* with pending: per page, when a fault first asked for it */
    int own_pending;
    const uint64_t *zero;       /* NULL, or one bit per page of the pages file: all zeros
                                   (from the receiver's hashes); shared with forks */
    int own_zero;
    atomic_llong left;          /* pages in segs not yet done */
    /* recycling (dx_lazy_recycle): a block of the pages file whose lazy pages are all done
     * is punched out of the file by the recycler thread, so that its page cache is free
     * memory again for the pages placed next.  NULL arrays / pfd -1: never (a fork's
     * child, a file read ahead, or no writable fd).  A block goes OPEN -> READY when its
     * last page is marked, OPEN -> NEVER at a fork (the child may need any page the parent
     * still lacked), READY -> PUNCHED by the recycler: compare-and-swap, so a block that
     * completes as a fork is handled is either READY (complete before: the child has its
     * pages) or NEVER, never both. */
    int pfd;
    atomic_int punch_failed;
    uint16_t *blk_need;         /* per block: lazy pages in it */
    _Atomic uint16_t *blk_got;  /* per block: those done */
    atomic_uchar *blk_state;
    uint64_t nblk;
    uint64_t complete_since;    /* event thread only */
} task_t;

struct dx_lazy {
    int ep, wakefd;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    task_t **tasks;
    size_t ntasks, cap;
    void **maps;
    size_t *maplens, nmaps, mapcap;
    pthread_t *pop;             /* one thread per mapping: map the file's pages in */
    size_t npop;
    int prefetching, stop, complete;
    uint32_t chunk, fpages;
    pthread_t evt;
    pthread_t *wk;
    int nwk, evt_started;
    atomic_ullong zero_image;
    atomic_ullong recycled, recycle_failed, punches;
    pthread_t recycler;
    int recycler_started;
    atomic_ullong tasks_n, forks, pages_total, faulted, prefetched, present, dropped, zero,
        faults, events, eagain, gone_n, abandoned, pending_n, postcopied, requests,
        requests_dropped, waits, wait_ns, wait_max_ns;
    int reqfd;                  /* post-copy: where fault requests go (-1: none) */
    uint64_t prefetch_ns, placed_ns, complete_ns;
    int error;
    char error_what[128];
};

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

/* CLOCK_REALTIME + ms, for pthread_cond_timedwait */
static struct timespec deadline_in(int ms)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    ts.tv_sec += ms / 1000;
    ts.tv_nsec += (long)(ms % 1000) * 1000000L;
    if (ts.tv_nsec >= 1000000000L) {
        ts.tv_sec++;
        ts.tv_nsec -= 1000000000L;
    }
    return ts;
}

static void set_error(dx_lazy *lz, int err, const char *what, uint64_t addr)
{
    pthread_mutex_lock(&lz->mu);
    if (!lz->error) {
        lz->error = err;
        snprintf(lz->error_what, sizeof lz->error_what, "%s at 0x%llx: %s", what,
                 (unsigned long long)addr, strerror(-err));
    }
    pthread_mutex_unlock(&lz->mu);
}

/* -- the done bitmap -------------------------------------------------------------------- */

static inline int test_page(task_t *t, uint64_t p)
{
    return (atomic_load_explicit(&t->done[p >> 6], memory_order_relaxed) >> (p & 63)) & 1;
}

/* The end of the run of pages from q that stays in q's block, at most e. */
static inline uint64_t block_run_end(uint64_t q, uint64_t e)
{
    uint64_t be = ((q >> BLK_SHIFT) + 1) << BLK_SHIFT;
    return be < e ? be : e;
}

/* Block b of t's pages file has every lazy page done: the recycler may punch it. */
static inline void block_done(task_t *t, uint64_t b)
{
    unsigned char open = BLK_OPEN;
    atomic_compare_exchange_strong(&t->blk_state[b], &open, BLK_READY);
}

/* Mark pages [p, p+n) done; counts the newly marked ones into *ctr and out of left. */
static void mark(task_t *t, uint64_t p, uint64_t n, atomic_ullong *ctr)
{
    uint64_t newly = 0;
    while (n) {
        uint64_t bit = p & 63, take = 64 - bit < n ? 64 - bit : n;
        uint64_t mask = take == 64 ? ~0ULL : (((1ULL << take) - 1) << bit);
        uint64_t old = atomic_fetch_or(&t->done[p >> 6], mask);
        uint64_t k = (uint64_t)__builtin_popcountll(mask & ~old);
        newly += k;
        if (k && t->blk_got && p < t->data_pages) {     /* one word lies in one block */
            uint64_t b = p >> BLK_SHIFT;
            if (atomic_fetch_add(&t->blk_got[b], (uint16_t)k) + k == t->blk_need[b])
                block_done(t, b);
        }
        p += take;
        n -= take;
    }
    if (newly) {
        atomic_fetch_sub(&t->left, (long long)newly);
        if (ctr)
            atomic_fetch_add(ctr, newly);
    }
}

static inline int test_pending(task_t *t, uint64_t p)
{
    return t->pending &&
        ((atomic_load_explicit(&t->pending[p >> 6], memory_order_acquire) >> (p & 63)) & 1);
}

/* neither placeable now nor to be placed: done, or still on the source */
static inline int skip_page(task_t *t, uint64_t p)
{
    return test_page(t, p) || test_pending(t, p);
}

/* -- segments --------------------------------------------------------------------------- */

static int cmp_start(const void *a, const void *b)
{
    const seg_t *x = a, *y = b;
    return x->start < y->start ? -1 : x->start > y->start;
}

static int cmp_pidx(const void *a, const void *b)
{
    const seg_t *x = a, *y = b;
    return x->pidx < y->pidx ? -1 : x->pidx > y->pidx;
}

/* index of the last seg with start <= addr, or -1 */
static long find_le(const seg_t *s, size_t n, uint64_t addr)
{
    long lo = 0, hi = (long)n - 1, ans = -1;
    while (lo <= hi) {
        long mid = (lo + hi) / 2;
        if (s[mid].start <= addr) {
            ans = mid;
            lo = mid + 1;
        } else {
            hi = mid - 1;
        }
    }
    return ans;
}

/* index in t->bypidx of the first run (by pidx) that ends after page p, or nseg */
static size_t first_run_after(const task_t *t, uint64_t p)
{
    long lo = 0, hi = (long)t->nseg - 1, k = (long)t->nseg;
    while (lo <= hi) {
        long mid = (lo + hi) / 2;
        const seg_t *s = &t->bypidx[mid];
        if (s->pidx + (s->end - s->start) / PS > p) {
            k = mid;
            hi = mid - 1;
        } else {
            lo = mid + 1;
        }
    }
    return (size_t)k;
}

static seg_t *find_seg(task_t *t, uint64_t addr)
{
    long i = find_le(t->segs, t->nseg, addr);
    if (i < 0 || addr >= t->segs[i].end)
        return NULL;
    return &t->segs[i];
}

/* The pages of t's runs: what is left to place of a fresh task. */
static long long seg_pages(const task_t *t)
{
    long long n = 0;
    for (size_t i = 0; i < t->nseg; i++)
        n += (long long)((t->segs[i].end - t->segs[i].start) / PS);
    return n;
}

static int rebuild_bypidx(task_t *t)
{
    seg_t *b = realloc(t->bypidx, (t->nseg ? t->nseg : 1) * sizeof(seg_t));
    if (!b)
        return -ENOMEM;
    memcpy(b, t->segs, t->nseg * sizeof(seg_t));
    qsort(b, t->nseg, sizeof(seg_t), cmp_pidx);
    t->bypidx = b;
    return 0;
}

/* Apply an event to [lo, hi): drop its pages (``drop``) or move them by ``delta``.
 * Called under the task's write lock. */
static int edit_segs(task_t *t, uint64_t lo, uint64_t hi, int drop, uint64_t delta)
{
    long first = find_le(t->segs, t->nseg, lo);
    size_t i = first < 0 ? 0 : (size_t)first;
    while (i < t->nseg && t->segs[i].end <= lo)
        i++;
    if (i >= t->nseg || t->segs[i].start >= hi)
        return 0;                                   /* no image page in the range */
    seg_t *out = malloc((t->nseg + 2) * sizeof(seg_t));
    if (!out)
        return -ENOMEM;
    size_t k = 0;
    for (size_t j = 0; j < t->nseg; j++) {
        seg_t s = t->segs[j];
        if (s.end <= lo || s.start >= hi) {
            out[k++] = s;
            continue;
        }
        if (s.start < lo)
            out[k++] = (seg_t){s.start, lo, s.pidx};
        uint64_t ms = s.start > lo ? s.start : lo, me = s.end < hi ? s.end : hi;
        uint64_t mp = s.pidx + (ms - s.start) / PS;
        if (drop)
            mark(t, mp, (me - ms) / PS, &t->lz->dropped);
        else
            out[k++] = (seg_t){ms + delta, me + delta, mp};
        if (s.end > hi)
            out[k++] = (seg_t){hi, s.end, s.pidx + (hi - s.start) / PS};
    }
    qsort(out, k, sizeof(seg_t), cmp_start);
    free(t->segs);
    t->segs = out;
    t->nseg = k;
    return rebuild_bypidx(t);
}

/* The background threads yield to everything else: the receiver and the agent finishing
 * the freeze (RESUMED ends the downtime) and the restored process itself. The event
 * thread, which answers the process's faults, keeps the normal priority. */
static void background_priority(void)
{
    setpriority(PRIO_PROCESS, (id_t)syscall(SYS_gettid), 10);
}

/* -- placing pages ---------------------------------------------------------------------- */

static void wake(task_t *t, uint64_t addr)
{
    struct uffdio_range r = {.start = addr, .len = PS};
    ioctl(t->uffd, UFFDIO_WAKE, &r);
}

/* Pages [p, p+n) were just placed: the faults that waited on them (post-copy) are over. */
static void note_waits(task_t *t, uint64_t p, uint64_t n)
{
    dx_lazy *lz = t->lz;
    uint64_t now = 0;
    for (uint64_t q = p; q < p + n; q++) {
        uint64_t since = atomic_exchange(&t->waiting[q], 0);
        if (!since)
            continue;
        if (!now)
            now = now_ns();
        uint64_t w = now > since ? now - since : 0;
        atomic_fetch_add(&lz->waits, 1);
        atomic_fetch_add(&lz->wait_ns, w);
        unsigned long long m = atomic_load(&lz->wait_max_ns);
        while (w > m && !atomic_compare_exchange_weak(&lz->wait_max_ns, &m, w)) {
        }
    }
}

/* Page p of the pages file is all zeros: by the receiver's hashes when it gave them (the
 * file's page is not read, nor brought into the page cache), else by its content. */
static inline int page_is_zero(const task_t *t, uint64_t p)
{
    if (t->zero)
        return (int)((t->zero[p >> 6] >> (p & 63)) & 1);
    return dx_page_is_zero(t->data + p * PS);
}

/* UFFDIO_COPY pages [p, p+n) of the pages file to addr..: returns how many were handled
 * (copied or found present) before it stopped; *why = 0, or the -errno it stopped on
 * (-EAGAIN: the address space is changing, try again after its event is read). */
static uint64_t place(task_t *t, uint64_t addr, uint64_t p, uint64_t n, atomic_ullong *ctr,
                      int *why)
{
    dx_lazy *lz = t->lz;
    uint64_t handled = 0;
    *why = 0;
    while (n) {
        /* a run of pages that are all zeros or none zero: zeros get the zero page (no
         * copy, no memory until the process writes there, as for a page never written) */
        int zero = page_is_zero(t, p);
        uint64_t k = 1;
        while (k < n && page_is_zero(t, p + k) == zero)
            k++;
        int rc;
        uint64_t got;
        if (zero) {
            struct uffdio_zeropage z = {.range = {.start = addr, .len = k * PS}, .mode = 0};
            rc = ioctl(t->uffd, UFFDIO_ZEROPAGE, &z);
            got = rc == 0 ? k : (z.zeropage > 0 ? (uint64_t)z.zeropage / PS : 0);
        } else {
            struct uffdio_copy c = {.dst = addr,
                                    .src = (uint64_t)(uintptr_t)(t->data + p * PS),
                                    .len = k * PS, .mode = 0, .copy = 0};
            rc = ioctl(t->uffd, UFFDIO_COPY, &c);
            got = rc == 0 ? k : (c.copy > 0 ? (uint64_t)c.copy / PS : 0);
        }
        int e = rc ? errno : 0;
        if (got) {
            if (zero)
                atomic_fetch_add(&lz->zero_image, got);
            mark(t, p, got, ctr);
            if (t->waiting)
                note_waits(t, p, got);
            addr += got * PS;
            p += got;
            n -= got;
            handled += got;
        }
        if (!n)
            break;
        if (rc == 0 || (e == EAGAIN && got))
            continue;                   /* the next run, or the rest of a partial one */
        if (e == EEXIST) {                          /* placed by the other side */
            mark(t, p, 1, &lz->present);
            addr += PS;
            p++;
            n--;
            handled++;
            continue;
        }
        *why = -e;
        break;
    }
    return handled;
}

static void task_gone(task_t *t)
{
    if (!atomic_exchange(&t->gone, 1))
        atomic_fetch_add(&t->lz->gone_n, 1);
}

/* Ask the receiver for pages [p, p+n) of t's pages file (post-copy): one record
 * {int32 pid, uint32 n, uint64 p}; never blocks -- a request that does not fit is dropped
 * (the source sends every pending page anyway, only later). 0 (nothing asked) if page p
 * arrived since the fault saw it pending. */
static int request(task_t *t, uint64_t p, uint64_t n)
{
    dx_lazy *lz = t->lz;
    struct { int32_t pid; uint32_t n; uint64_t p; } rec = {t->pid, (uint32_t)n, p};
    uint64_t none = 0;
    atomic_compare_exchange_strong(&t->waiting[p], &none, now_ns());
    if (!test_pending(t, p)) {
        /* it arrived since the fault saw it pending (dx_lazy_arrived clears the bit, then
         * places): placed already, its note_waits has passed, so this wait is taken back
         * (else a later copy over the page would count it after the post-copy's end was
         * reported); not yet placed, that placing counts it. No request either way. */
        if (test_page(t, p))
            atomic_exchange(&t->waiting[p], 0);
        return 0;
    }
    int fd = __atomic_load_n(&lz->reqfd, __ATOMIC_ACQUIRE);
    if (fd >= 0 && send(fd, &rec, sizeof rec, MSG_DONTWAIT | MSG_NOSIGNAL) == sizeof rec)
        atomic_fetch_add(&lz->requests, 1);
    else
        atomic_fetch_add(&lz->requests_dropped, 1);
    return 1;
}

/* Map the zero page at pages [addr, addr + n*PS) of t that the dump had no page for.
 * 0 if the page at addr is mapped now (the waiters on what was mapped are woken), else
 * -EAGAIN (the address space is changing), or 1: nothing mapped at addr -- it is there
 * already, or it is not ours (a range leaving the registered VMA is cut to its first
 * page first).  `fault`: a fault waits on addr (errors are the server's then). */
static int zero_range(task_t *t, uint64_t addr, uint64_t n, int fault)
{
    dx_lazy *lz = t->lz;
    for (;;) {
        struct uffdio_zeropage z = {.range = {.start = addr, .len = n * PS}, .mode = 0};
        int rc = ioctl(t->uffd, UFFDIO_ZEROPAGE, &z);
        if (z.zeropage > 0) {          /* all, or a partial run: mapped and woken */
            atomic_fetch_add(&lz->zero, (unsigned long long)z.zeropage / PS);
            return 0;
        }
        if (rc == 0)
            return 0;
        int e = errno;
        if (e == ENOENT && n > 1) {     /* past the end of the registered VMA */
            n = 1;
            continue;
        }
        if (e == EAGAIN)
            return -EAGAIN;
        if (e == ESRCH || e == ENOSPC)
            task_gone(t);
        else if (fault && e != EEXIST && e != ENOENT)
            set_error(lz, -e, "UFFDIO_ZEROPAGE", addr);
        return 1;
    }
}

/* A worker placed pages of t up to `end`, the end of an image run: the hole after it, up
 * to the next run, holds pages the dump had none for (never written on the source, which
 * read as zeros there without a fault).  A short hole between runs gets the zero page now,
 * so that a reader going through the image does not stop at each one; a long hole (an
 * untouched part of a large mapping) is left to its faults, which take 2 MiB at once:
 * mapping it all would cost page tables for memory nobody uses. */
static void zero_gap_after(task_t *t, uint64_t end)
{
    long i = find_le(t->segs, t->nseg, end - 1);
    if (i < 0 || (size_t)(i + 1) >= t->nseg || t->segs[i].end != end)
        return;
    uint64_t next = t->segs[i + 1].start;
    if (next > end && next - end <= GAP_PAGES * PS)
        zero_range(t, end, (next - end) / PS, 0);
}

/* Serve one faulting address: its page and the not-yet-placed pages after it in the same
 * run, up to fault_pages.  0, or -EAGAIN to try again once the queued event is read. */
static int serve_fault(task_t *t, uint64_t addr)
{
    dx_lazy *lz = t->lz;
    seg_t *s = find_seg(t, addr);
    if (!s) {
        /* Not an image page: memory the dump had no page for (never written), read as
         * zeros.  The zero page goes over the rest of that hole up to the next image page
         * or the 2 MiB boundary (one page table), in one call: a reader crossing a long
         * hole takes one fault per 2 MiB, not one per page. */
        long i = find_le(t->segs, t->nseg, addr);
        uint64_t end = (addr | (HOLE_SPAN - 1)) + 1;
        if ((size_t)(i + 1) < t->nseg && t->segs[i + 1].start < end)
            end = t->segs[i + 1].start;
        int rc = zero_range(t, addr, (end - addr) / PS, 1);
        if (rc == -EAGAIN)
            return -EAGAIN;
        if (rc)
            wake(t, addr);
        return 0;
    }
    uint64_t p = s->pidx + (addr - s->start) / PS;
    if (test_page(t, p)) {
        wake(t, addr);
        return 0;
    }
    if (test_pending(t, p)) {
        /* still on the source: ask for it (and the pending pages after it); the thread
         * waits until dx_lazy_arrived places it */
        uint64_t n = 1;
        while (n < lz->fpages && addr + n * PS < s->end && test_pending(t, p + n) &&
               !test_page(t, p + n))
            n++;
        if (!request(t, p, n))
            wake(t, addr);      /* it arrived meanwhile: placed, or about to be */
        return 0;
    }
    /* Like readahead: a fault at or just after the previous fault's window is a reader
     * going forward -- its window doubles (up to fault_pages) and the workers jump to
     * just after it; any other fault is a scattered access, served with its own page
     * only (the least time the thread waits) and leaving the workers where they are. */
    int forward = t->ra_end && p >= t->ra_start && p <= t->ra_end + RA_SLACK;
    uint32_t want = forward ? t->ra_pages : 1;
    uint64_t n = 1;
    while (n < want && addr + n * PS < s->end && !skip_page(t, p + n))
        n++;
    int why;
    uint64_t got = place(t, addr, p, n, &lz->faulted, &why);
    t->ra_start = p;
    t->ra_end = p + (got ? got : 1);
    t->ra_pages = forward ? (t->ra_pages * 2 < lz->fpages ? t->ra_pages * 2 : lz->fpages)
                          : (lz->fpages < RA_FIRST ? lz->fpages : RA_FIRST);
    if (got) {
        /* a reader going forward reads on from here: the workers follow it */
        if (forward)
            atomic_store(&t->hint, p + got + 1);
        /* The faulting page is there, but maybe not by this copy: a worker's UFFDIO_COPY
         * that filled it (EEXIST here) wakes the waiters of its range only when the whole
         * copy returns, and a fault queued while that copy ran was seen asleep until the
         * task's uffd closed (~0.1 s later, measured).  A wake of a page nobody waits on
         * costs one ioctl. */
        wake(t, addr);
        return 0;
    }
    if (why == -EAGAIN)
        return -EAGAIN;
    if (why == -ESRCH || why == -ENOSPC)
        task_gone(t);
    else if (why == -ENOENT)
        mark(t, p, 1, &lz->dropped);
    else if (why)
        set_error(lz, why, "UFFDIO_COPY on a fault", addr);
    wake(t, addr);
    return 0;
}

/* -- tasks ------------------------------------------------------------------------------ */

static task_t *task_new(dx_lazy *lz, int uffd, int pid, const uint8_t *data, uint64_t pages)
{
    task_t *t = calloc(1, sizeof *t);
    if (!t)
        return NULL;
    t->lz = lz;
    t->uffd = uffd;
    t->pid = pid;
    t->data = data;
    t->data_pages = pages;
    t->pfd = -1;
    size_t words = (pages + 63) / 64 + 1;
    t->done = calloc(words, sizeof(uint64_t));
    if (!t->done) {
        free(t);
        return NULL;
    }
    pthread_rwlockattr_t ra;
    pthread_rwlockattr_init(&ra);
    /* the event thread must not wait behind a stream of worker copies */
    pthread_rwlockattr_setkind_np(&ra, PTHREAD_RWLOCK_PREFER_WRITER_NONRECURSIVE_NP);
    pthread_rwlock_init(&t->rw, &ra);
    pthread_rwlockattr_destroy(&ra);
    pthread_mutex_init(&t->cmu, NULL);
    return t;
}

static void task_free(task_t *t)
{
    if (!t->closed && t->uffd >= 0)
        close(t->uffd);
    if (t->pfd >= 0)
        close(t->pfd);
    free(t->blk_need);
    free((void *)t->blk_got);
    free((void *)t->blk_state);
    free(t->segs);
    free(t->bypidx);
    free((void *)t->done);
    if (t->own_zero)
        free((void *)t->zero);
    if (t->own_pending) {
        free((void *)t->pending);
        free((void *)t->waiting);
    }
    pthread_rwlock_destroy(&t->rw);
    pthread_mutex_destroy(&t->cmu);
    free(t);
}

static int register_task(dx_lazy *lz, task_t *t)
{
    int fl = fcntl(t->uffd, F_GETFL);
    if (fl >= 0 && !(fl & O_NONBLOCK))
        fcntl(t->uffd, F_SETFL, fl | O_NONBLOCK);
    pthread_mutex_lock(&lz->mu);
    if (lz->ntasks == lz->cap) {
        size_t cap = lz->cap ? lz->cap * 2 : 8;
        task_t **n = realloc(lz->tasks, cap * sizeof *n);
        if (!n) {
            pthread_mutex_unlock(&lz->mu);
            return -ENOMEM;
        }
        lz->tasks = n;
        lz->cap = cap;
    }
    /* counted before the workers can see it (they decrement left) */
    atomic_fetch_add(&lz->tasks_n, 1);
    atomic_fetch_add(&lz->pages_total, (unsigned long long)atomic_load(&t->left));
    lz->tasks[lz->ntasks++] = t;
    lz->complete = 0;
    pthread_cond_broadcast(&lz->cv);
    pthread_mutex_unlock(&lz->mu);
    struct epoll_event ev = {.events = EPOLLIN, .data.ptr = t};
    if (epoll_ctl(lz->ep, EPOLL_CTL_ADD, t->uffd, &ev) < 0)
        return -errno;
    return 0;
}

/* A fork of task `parent` (under its write lock): the child's uffd serves a copy of the
 * parent's address space.  Every page the parent still lacked at the fork is missing in
 * the child too; pages placed in the parent between the fork and the read of its event
 * are not, and which those are is not known -- so the child starts from the parent's
 * whole current run list with nothing marked, and a page the child already has is found
 * present (EEXIST) and skipped. */
static void handle_fork(task_t *parent, int ufd)
{
    dx_lazy *lz = parent->lz;
    task_t *c = task_new(lz, ufd, parent->pid, parent->data, parent->data_pages);
    if (!c) {
        close(ufd);
        set_error(lz, -ENOMEM, "fork of a restored task", 0);
        return;
    }
    c->pending = parent->pending;
    c->zero = parent->zero;
    c->waiting = parent->waiting;
    c->segs = malloc((parent->nseg ? parent->nseg : 1) * sizeof(seg_t));
    if (c->segs) {
        memcpy(c->segs, parent->segs, parent->nseg * sizeof(seg_t));
        c->nseg = parent->nseg;
        atomic_store(&c->left, seg_pages(c));
    }
    if (!c->segs || rebuild_bypidx(c) < 0) {
        task_free(c);
        set_error(lz, -ENOMEM, "fork of a restored task", 0);
        return;
    }
    /* From now on the child may need any page the parent still lacks: a block not
     * complete yet is never punched (the child never punches).  A complete block (READY
     * or PUNCHED) was complete before the fork -- copies are refused from the fork until
     * its event is read, and this runs under the parent's write lock -- so the child has
     * its pages: they are done for it. */
    if (parent->blk_state) {
        for (uint64_t b = 0; b < parent->nblk; b++) {
            unsigned char open = BLK_OPEN;
            atomic_compare_exchange_strong(&parent->blk_state[b], &open, BLK_NEVER);
        }
        for (size_t i = 0; i < c->nseg; i++) {
            const seg_t *s = &c->segs[i];
            uint64_t q = s->pidx, e = s->pidx + (s->end - s->start) / PS;
            for (uint64_t r; q < e; q = r) {
                r = block_run_end(q, e);
                unsigned char st = atomic_load(&parent->blk_state[q >> BLK_SHIFT]);
                if (st == BLK_READY || st == BLK_PUNCHED)
                    mark(c, q, r - q, NULL);
            }
        }
    }
    atomic_fetch_add(&lz->forks, 1);
    int rc = register_task(lz, c);
    if (rc < 0)
        set_error(lz, rc, "fork of a restored task: epoll", 0);
}

static void handle_msg(task_t *t, struct uffd_msg *m, uint64_t *retry, int *nretry)
{
    dx_lazy *lz = t->lz;
    int rc = 0;
    switch (m->event) {
    case UFFD_EVENT_PAGEFAULT: {
        uint64_t addr = m->arg.pagefault.address & ~(PS - 1);
        atomic_fetch_add(&lz->faults, 1);
        if (serve_fault(t, addr) == -EAGAIN) {
            if (*nretry < MAX_RETRY)
                retry[(*nretry)++] = addr;
            else      /* the kernel asks again when the faulting thread retries */
                wake(t, addr);
        }
        return;
    }
    case UFFD_EVENT_FORK:
        atomic_fetch_add(&lz->events, 1);
        handle_fork(t, (int)m->arg.fork.ufd);
        return;
    case UFFD_EVENT_REMAP:
        atomic_fetch_add(&lz->events, 1);
        rc = edit_segs(t, m->arg.remap.from, m->arg.remap.from + m->arg.remap.len, 0,
                       m->arg.remap.to - m->arg.remap.from);
        break;
    case UFFD_EVENT_REMOVE: {
        /* the range stays mapped: stop serving it, its next faults are plain zero fills */
        atomic_fetch_add(&lz->events, 1);
        struct uffdio_range r = {.start = m->arg.remove.start,
                                 .len = m->arg.remove.end - m->arg.remove.start};
        if (ioctl(t->uffd, UFFDIO_UNREGISTER, &r) < 0) {
            if (errno == ENOMEM || errno == ESRCH)
                task_gone(t);
            else
                set_error(lz, -errno, "UFFDIO_UNREGISTER after madvise", r.start);
        }
        rc = edit_segs(t, m->arg.remove.start, m->arg.remove.end, 1, 0);
        break;
    }
    case UFFD_EVENT_UNMAP:
        atomic_fetch_add(&lz->events, 1);
        rc = edit_segs(t, m->arg.remove.start, m->arg.remove.end, 1, 0);
        break;
    default:
        set_error(lz, -EPROTO, "unexpected userfaultfd event", m->event);
        return;
    }
    if (rc < 0)
        set_error(lz, rc, "following an mremap/munmap/madvise", 0);
}

/* Read and handle every queued message of t, under its write lock. */
static void handle_task(task_t *t)
{
    struct uffd_msg msgs[32];
    uint64_t retry[MAX_RETRY];
    int nretry = 0, spins = 0;
    pthread_rwlock_wrlock(&t->rw);
    while (!t->closed) {
        ssize_t r = read(t->uffd, msgs, sizeof msgs);
        if (r > 0) {
            for (size_t i = 0; i < (size_t)r / sizeof msgs[0]; i++)
                handle_msg(t, &msgs[i], retry, &nretry);
            continue;
        }
        if (r < 0 && errno == EINTR)
            continue;
        if (r < 0 && errno != EAGAIN) {
            set_error(t->lz, -errno, "reading a userfaultfd", 0);
            break;
        }
        if (!nretry)
            break;
        int k = 0;
        for (int i = 0; i < nretry; i++)
            if (serve_fault(t, retry[i]) == -EAGAIN)
                retry[k++] = retry[i];
        nretry = k;
        if (nretry) {
            atomic_fetch_add(&t->lz->eagain, 1);
            if (++spins > 100000) {   /* ~2 s of an address space that never settles */
                set_error(t->lz, -EAGAIN, "a fault kept being refused", retry[0]);
                for (int i = 0; i < nretry; i++)
                    wake(t, retry[i]);
                break;
            }
            usleep(20);
        }
    }
    pthread_rwlock_unlock(&t->rw);
}

static void close_task(task_t *t)
{
    pthread_rwlock_wrlock(&t->rw);
    if (!t->closed) {
        long long left = atomic_load(&t->left);
        if (left > 0)          /* the task exited first: these were never needed */
            atomic_fetch_add(&t->lz->abandoned, (unsigned long long)left);
        epoll_ctl(t->lz->ep, EPOLL_CTL_DEL, t->uffd, NULL);
        close(t->uffd);
        t->closed = 1;
    }
    pthread_rwlock_unlock(&t->rw);
}

/* Close the tasks that are complete (for GRACE_NS: a fork read late still gets served);
 * note when all are. */
static void check_complete(dx_lazy *lz)
{
    pthread_mutex_lock(&lz->mu);
    int prefetching = lz->prefetching;
    size_t n = lz->ntasks;
    pthread_mutex_unlock(&lz->mu);
    if (!prefetching)
        return;
    uint64_t now = now_ns();
    int open = 0, unplaced = 0;
    for (size_t i = 0; i < n; i++) {
        pthread_mutex_lock(&lz->mu);
        task_t *t = lz->tasks[i];
        pthread_mutex_unlock(&lz->mu);
        if (t->closed)
            continue;
        if (atomic_load(&t->gone) || atomic_load(&t->left) <= 0) {
            if (!t->complete_since)
                t->complete_since = now;
            if (atomic_load(&t->gone) || now - t->complete_since >= GRACE_NS) {
                close_task(t);
                continue;
            }
        } else {
            t->complete_since = 0;
            unplaced++;
        }
        open++;
    }
    if (!unplaced) {
        pthread_mutex_lock(&lz->mu);
        if (!lz->placed_ns)
            lz->placed_ns = now;
        pthread_mutex_unlock(&lz->mu);
    }
    if (!open) {
        pthread_mutex_lock(&lz->mu);
        if (lz->ntasks == n && !lz->complete) {
            lz->complete = 1;
            lz->complete_ns = now;
            pthread_cond_broadcast(&lz->cv);
        }
        pthread_mutex_unlock(&lz->mu);
    }
}

/* The tasks as they are now (a copy: the list may grow meanwhile); NULL without memory. */
static task_t **tasks_now(dx_lazy *lz, size_t *n)
{
    pthread_mutex_lock(&lz->mu);
    *n = lz->ntasks;
    task_t **ts = malloc((*n ? *n : 1) * sizeof *ts);
    if (ts)
        memcpy(ts, lz->tasks, *n * sizeof *ts);
    pthread_mutex_unlock(&lz->mu);
    return ts;
}

static int stopping(dx_lazy *lz)
{
    pthread_mutex_lock(&lz->mu);
    int stop = lz->stop;
    pthread_mutex_unlock(&lz->mu);
    return stop;
}

static void *event_main(void *arg)
{
    dx_lazy *lz = arg;
    struct epoll_event evs[32];
    pthread_setname_np(pthread_self(), "dx-lazy-events");
    while (!stopping(lz)) {
        int n = epoll_wait(lz->ep, evs, 32, 10);
        for (int i = 0; i < n; i++) {
            if (!evs[i].data.ptr) {
                uint64_t v;
                if (read(lz->wakefd, &v, sizeof v) < 0) { /* nothing */ }
                continue;
            }
            handle_task(evs[i].data.ptr);
        }
        check_complete(lz);
    }
    return NULL;
}

/* -- background workers ----------------------------------------------------------------- */

/* Pick the next chunk of t not placed yet (under its read lock): 1 with *addr, *p, *n. */
static int next_chunk(task_t *t, uint64_t *addr, uint64_t *p, uint64_t *n)
{
    uint32_t chunk = t->lz->chunk;
    int found = 0;
    pthread_mutex_lock(&t->cmu);
    /* "faulted pages first": a fault moves the workers to just after its window (the
     * process most likely reads on from there); what they skipped is found by a pass
     * from the start once they reach the end */
    uint64_t h = atomic_exchange(&t->hint, 0);
    if (h && h - 1 > t->cursor) {
        t->cursor = h - 1;
        t->jumped = 1;
    }
again:;
    long k = (long)first_run_after(t, t->cursor);
    for (; k < (long)t->nseg; k++) {
        const seg_t *s = &t->bypidx[k];
        uint64_t end = s->pidx + (s->end - s->start) / PS;
        uint64_t q = t->cursor > s->pidx ? t->cursor : s->pidx;
        while (q < end && skip_page(t, q))
            q++;
        if (q < end) {
            uint64_t r = q + 1;
            while (r < end && r - q < chunk && !skip_page(t, r))
                r++;
            *addr = s->start + (q - s->pidx) * PS;
            *p = q;
            *n = r - q;
            t->cursor = r;
            found = 1;
            break;
        }
        t->cursor = end;
    }
    if (!found && t->jumped) {
        t->jumped = 0;
        t->cursor = 0;
        goto again;
    }
    if (!found)
        atomic_store(&t->exhausted, 1);
    pthread_mutex_unlock(&t->cmu);
    return found;
}

static void rewind_cursor(task_t *t, uint64_t p)
{
    pthread_mutex_lock(&t->cmu);
    if (p < t->cursor)
        t->cursor = p;
    atomic_store(&t->exhausted, 0);
    pthread_mutex_unlock(&t->cmu);
}

/* One chunk of some task: 1 if work was done (or tried), 0 if there was none. */
static int work_once(dx_lazy *lz, size_t *rr)
{
    pthread_mutex_lock(&lz->mu);
    size_t n = lz->ntasks;
    task_t *t = NULL;
    for (size_t i = 0; i < n; i++) {
        task_t *c = lz->tasks[(*rr + i) % n];
        if (!c->closed && !atomic_load(&c->gone) && !atomic_load(&c->exhausted) &&
            !atomic_load(&c->failed)) {
            t = c;
            *rr = (*rr + i) % n;     /* stay on this task: its pages are in file order */
            break;
        }
    }
    pthread_mutex_unlock(&lz->mu);
    if (!t)
        return 0;
    pthread_rwlock_rdlock(&t->rw);
    if (t->closed || atomic_load(&t->gone)) {
        pthread_rwlock_unlock(&t->rw);
        return 1;
    }
    uint64_t addr, p, cnt;
    if (!next_chunk(t, &addr, &p, &cnt)) {
        pthread_rwlock_unlock(&t->rw);
        return 1;
    }
    int why;
    uint64_t got = place(t, addr, p, cnt, &lz->prefetched, &why);
    if (got == cnt && !why)
        zero_gap_after(t, addr + cnt * PS);
    int again = 0;
    if (why == -EAGAIN) {
        atomic_fetch_add(&lz->eagain, 1);
        rewind_cursor(t, p + got);
        again = 1;
    } else if (why == -ESRCH || why == -ENOSPC) {
        task_gone(t);
    } else if (why == -ENOENT) {
        /* not registered (any more): the process cannot fault on it through us */
        mark(t, p + got, cnt - got, &lz->dropped);
    } else if (why) {
        set_error(lz, why, "UFFDIO_COPY in the background", addr + got * PS);
        atomic_store(&t->failed, 1);
    }
    pthread_rwlock_unlock(&t->rw);
    if (again)
        usleep(50);             /* let the event thread read what changes the address space */
    return 1;
}

static void *worker_main(void *arg)
{
    dx_lazy *lz = arg;
    size_t rr = 0;
    pthread_setname_np(pthread_self(), "dx-lazy-copy");
    background_priority();
    for (;;) {
        pthread_mutex_lock(&lz->mu);
        while (!lz->stop && !lz->prefetching)
            pthread_cond_wait(&lz->cv, &lz->mu);
        int stop = lz->stop;
        pthread_mutex_unlock(&lz->mu);
        if (stop)
            break;
        if (!work_once(lz, &rr)) {
            struct timespec ts = deadline_in(5);
            pthread_mutex_lock(&lz->mu);
            if (!lz->stop)
                pthread_cond_timedwait(&lz->cv, &lz->mu, &ts);
            pthread_mutex_unlock(&lz->mu);
        }
    }
    return NULL;
}

/* Map a pages file's pages into our page tables ahead of the copies (they are in the
 * page cache: the receiver just wrote them), while the restore is still running, so that
 * UFFDIO_COPY does not take a page fault on its source per 16 pages. */
struct populate_arg {
    void *addr;
    size_t len;
};

static void *populate_main(void *arg)
{
    struct populate_arg *a = arg;
    pthread_setname_np(pthread_self(), "dx-lazy-map");
    background_priority();
#ifndef MADV_POPULATE_READ
#define MADV_POPULATE_READ 22
#endif
    for (size_t off = 0; off < a->len; off += 64 << 20) {
        size_t n = a->len - off < (64 << 20) ? a->len - off : (64 << 20);
        if (madvise((char *)a->addr + off, n, MADV_POPULATE_READ) < 0)
            break;          /* an old kernel (EINVAL) or unmapped: the copies fault instead */
    }
    free(a);
    return NULL;
}

/* -- the interface ---------------------------------------------------------------------- */

dx_lazy *dx_lazy_new(int workers, uint32_t chunk_pages, uint32_t fault_pages, int *err)
{
    if (workers < 1 || workers > 256 || !chunk_pages || !fault_pages ||
        chunk_pages > (1u << 20) || fault_pages > (1u << 20)) {
        *err = -EINVAL;
        return NULL;
    }
    dx_lazy *lz = calloc(1, sizeof *lz);
    if (!lz) {
        *err = -ENOMEM;
        return NULL;
    }
    lz->chunk = chunk_pages;
    lz->reqfd = -1;
    lz->fpages = fault_pages;
    lz->ep = epoll_create1(EPOLL_CLOEXEC);
    lz->wakefd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    pthread_mutex_init(&lz->mu, NULL);
    pthread_cond_init(&lz->cv, NULL);
    if (lz->ep < 0 || lz->wakefd < 0) {
        *err = -errno;
        dx_lazy_free(lz);
        return NULL;
    }
    struct epoll_event ev = {.events = EPOLLIN, .data.ptr = NULL};
    epoll_ctl(lz->ep, EPOLL_CTL_ADD, lz->wakefd, &ev);
    lz->wk = calloc((size_t)workers, sizeof(pthread_t));
    if (!lz->wk) {
        *err = -ENOMEM;
        dx_lazy_free(lz);
        return NULL;
    }
    int rc = pthread_create(&lz->evt, NULL, event_main, lz);
    if (rc) {
        *err = -rc;
        dx_lazy_free(lz);
        return NULL;
    }
    lz->evt_started = 1;
    for (int i = 0; i < workers; i++) {
        rc = pthread_create(&lz->wk[i], NULL, worker_main, lz);
        if (rc) {
            *err = -rc;
            dx_lazy_free(lz);
            return NULL;
        }
        lz->nwk++;
    }
    return lz;
}

int dx_lazy_add(dx_lazy *lz, int uffd, int pid, int pages_fd, uint64_t pages_file_size,
                const uint64_t *vaddr, const uint64_t *nr_pages, const uint64_t *flags,
                size_t n, const uint64_t *vma_start, const uint64_t *vma_end, size_t nvma,
                const uint64_t *pending, size_t npending, const uint64_t *hashes,
                size_t nhashes)
{
    uint64_t data_pages = pages_file_size / PS;
    /* the receiver's hashes, one per page: the zero pages are known without reading */
    int known_zeros = nhashes && nhashes == data_pages;
    const uint8_t *data = NULL;
    if (data_pages) {
        void *m = mmap(NULL, data_pages * PS, PROT_READ, MAP_SHARED, pages_fd, 0);
        if (m == MAP_FAILED) {
            int e = -errno;
            close(uffd);
            return e;
        }
        pthread_mutex_lock(&lz->mu);
        if (lz->nmaps == lz->mapcap) {
            size_t cap = lz->mapcap ? lz->mapcap * 2 : 8;
            void **a = realloc(lz->maps, cap * sizeof *a);
            size_t *b = a ? realloc(lz->maplens, cap * sizeof *b) : NULL;
            if (a)
                lz->maps = a;
            if (!a || !b) {
                pthread_mutex_unlock(&lz->mu);
                munmap(m, data_pages * PS);
                close(uffd);
                return -ENOMEM;
            }
            lz->maplens = b;
            lz->mapcap = cap;
        }
        lz->maps[lz->nmaps] = m;
        lz->maplens[lz->nmaps++] = data_pages * PS;
        /* with the receiver's hashes the zero pages are known and never read: mapping
         * the file ahead would read them (allocating and clearing page cache for the
         * parts of the file never written), and on a machine whose cores are all busy
         * the copies map what they read as fast (measured: 2 cores, 1 GiB) */
        struct populate_arg *pa = known_zeros ? NULL : malloc(sizeof *pa);
        pthread_t *pt = realloc(lz->pop, (lz->npop + 1) * sizeof(pthread_t));
        if (pt)
            lz->pop = pt;
        if (pa && pt) {
            pa->addr = m;
            pa->len = data_pages * PS;
            if (pthread_create(&lz->pop[lz->npop], NULL, populate_main, pa) == 0)
                lz->npop++;
            else
                free(pa);
        } else {
            free(pa);
        }
        pthread_mutex_unlock(&lz->mu);
        data = m;
    }
    task_t *t = task_new(lz, uffd, pid, data, data_pages);
    if (!t) {
        close(uffd);
        return -ENOMEM;
    }
    /* recycling needs the file open for writing (to punch it) and the receiver's hashes
     * (without them a thread maps the whole file ahead, and would read punched blocks
     * back in as zeros) */
    if (data_pages && known_zeros && pages_fd >= 0 &&
        (fcntl(pages_fd, F_GETFL) & O_ACCMODE) == O_RDWR) {
        t->nblk = (data_pages + BLK_PAGES - 1) >> BLK_SHIFT;
        t->blk_need = calloc(t->nblk, sizeof *t->blk_need);
        t->blk_got = calloc(t->nblk, sizeof *t->blk_got);
        t->blk_state = calloc(t->nblk, sizeof *t->blk_state);
        if (!t->blk_need || !t->blk_got || !t->blk_state) {
            task_free(t);
            return -ENOMEM;
        }
        t->pfd = fcntl(pages_fd, F_DUPFD_CLOEXEC, 0);
    }
    /* the lazy runs, cut at VMA ends: one UFFDIO_COPY stays inside one VMA */
    size_t cap = n + nvma + 1, k = 0, j = 0, pi = 0;
    t->segs = malloc(cap * sizeof(seg_t));
    if (!t->segs) {
        task_free(t);
        return -ENOMEM;
    }
    if (npending) {
        t->pending = calloc((data_pages + 63) / 64 + 1, sizeof(uint64_t));
        t->waiting = calloc(data_pages + 1, sizeof(uint64_t));
        if (!t->pending || !t->waiting) {
            task_free(t);
            return -ENOMEM;
        }
        t->own_pending = 1;
    }
    uint64_t pidx = 0;
    for (size_t i = 0; i < n; i++) {
        uint64_t f = flags[i];
        if (!(f & PE_PRESENT)) {
            if ((f & PE_LAZY) && (f & PE_PARENT)) {
                task_free(t);
                return -EINVAL;                 /* lazy pages in a parent image */
            }
            continue;
        }
        uint64_t start = vaddr[i], end = vaddr[i] + nr_pages[i] * PS, here = pidx;
        pidx += nr_pages[i];
        if (pidx > data_pages) {
            task_free(t);
            return -EINVAL;                     /* the pages file is too short */
        }
        /* pending pages (sorted) must be lazy pages of the image: criu would restore any
         * other page itself, from the file, stale */
        if (pi < npending && pending[pi] < start) {
            task_free(t);
            return -EINVAL;
        }
        for (; pi < npending && pending[pi] < end; pi++) {
            if (!(f & PE_LAZY) || (pending[pi] & (PS - 1))) {
                task_free(t);
                return -EINVAL;
            }
            uint64_t q = here + (pending[pi] - start) / PS;
            t->pending[q >> 6] |= 1ULL << (q & 63);
        }
        if (!(f & PE_LAZY))
            continue;
        if (t->blk_need)
            for (uint64_t q = here, qe = here + nr_pages[i], r; q < qe; q = r) {
                r = block_run_end(q, qe);
                t->blk_need[q >> BLK_SHIFT] = (uint16_t)(t->blk_need[q >> BLK_SHIFT] + (r - q));
            }
        while (start < end) {
            while (j < nvma && vma_end[j] <= start)
                j++;
            if (j >= nvma || vma_start[j] > start) {
                task_free(t);
                return -EINVAL;                 /* a lazy page outside every VMA */
            }
            uint64_t e2 = end < vma_end[j] ? end : vma_end[j];
            if (k == cap) {
                cap *= 2;
                seg_t *s2 = realloc(t->segs, cap * sizeof(seg_t));
                if (!s2) {
                    task_free(t);
                    return -ENOMEM;
                }
                t->segs = s2;
            }
            t->segs[k++] = (seg_t){start, e2, here};
            here += (e2 - start) / PS;
            start = e2;
        }
    }
    if (pi < npending) {
        task_free(t);
        return -EINVAL;                         /* a pending page outside the image */
    }
    if (known_zeros) {
        uint64_t *z = calloc((data_pages + 63) / 64 + 1, sizeof(uint64_t));
        if (!z) {
            task_free(t);
            return -ENOMEM;
        }
        const uint64_t zh = dx_zero_page_hash();
        for (uint64_t q = 0; q < data_pages; q++)
            if (hashes[q] == zh && !(t->pending && test_pending(t, q)))
                z[q >> 6] |= 1ULL << (q & 63);
        t->zero = z;
        t->own_zero = 1;
    }
    if (t->blk_need)
        for (uint64_t b = 0; b < t->nblk; b++) {
            /* a block with pages criu restores itself (not lazy) is never punched */
            uint64_t full = data_pages - (b << BLK_SHIFT);
            if (full > BLK_PAGES)
                full = BLK_PAGES;
            if (t->blk_need[b] != full)
                atomic_store(&t->blk_state[b], BLK_NEVER);
        }
    atomic_fetch_add(&lz->pending_n, (unsigned long long)npending);
    t->nseg = k;
    qsort(t->segs, k, sizeof(seg_t), cmp_start);
    atomic_store(&t->left, seg_pages(t));
    if (rebuild_bypidx(t) < 0) {
        task_free(t);
        return -ENOMEM;
    }
    int rc = register_task(lz, t);
    if (rc < 0) {
        /* registered in the list (freed with the server) but not polled: fail loudly */
        set_error(lz, rc, "epoll of a userfaultfd", 0);
        return rc;
    }
    return 0;
}

void dx_lazy_set_request_fd(dx_lazy *lz, int fd)
{
    __atomic_store_n(&lz->reqfd, fd, __ATOMIC_RELEASE);
}

/* Place pages [p, p+n) of t's pages file where t's runs still want them (under its read
 * lock); the workers are pointed back at p for whatever this could not place. */
static uint64_t place_arrived(task_t *t, uint64_t p, uint64_t n)
{
    dx_lazy *lz = t->lz;
    uint64_t placed = 0, endp = p + n;
    pthread_rwlock_rdlock(&t->rw);
    if (t->closed || atomic_load(&t->gone)) {
        pthread_rwlock_unlock(&t->rw);
        return 0;
    }
    for (size_t k = first_run_after(t, p); k < t->nseg; k++) {   /* bypidx: by pidx */
        const seg_t *s = &t->bypidx[k];
        uint64_t sp = s->pidx, se = s->pidx + (s->end - s->start) / PS;
        if (se <= p)
            continue;
        if (sp >= endp)
            break;
        uint64_t q = sp > p ? sp : p, qe = se < endp ? se : endp;
        while (q < qe) {
            while (q < qe && test_page(t, q))
                q++;
            uint64_t r = q;
            while (r < qe && !test_page(t, r))
                r++;
            if (r == q)
                break;
            int why;
            uint64_t got = place(t, s->start + (q - sp) * PS, q, r - q, &lz->postcopied, &why);
            placed += got;
            if (why == -ESRCH || why == -ENOSPC) {
                task_gone(t);
                goto out;
            }
            if (why == -ENOENT) {
                /* not mapped where the runs say (yet): during the restore the restorer
                 * is still moving VMAs into place; the workers place it once it is done
                 * (after the restore, a range the process dropped comes as an event) */
                got++;
            } else if (why == -EAGAIN) {
                goto out;                           /* the workers retry it */
            } else if (why) {
                set_error(lz, why, "UFFDIO_COPY of a post-copied page", s->start + (q - sp) * PS);
                goto out;
            }
            q += got;
        }
    }
out:
    pthread_rwlock_unlock(&t->rw);
    rewind_cursor(t, p);
    return placed;
}

int64_t dx_lazy_arrived(dx_lazy *lz, int pid, uint64_t p, uint64_t n)
{
    size_t nt, m = 0;
    task_t **ts = tasks_now(lz, &nt);
    if (!ts)
        return -ENOMEM;
    for (size_t i = 0; i < nt; i++)
        if (ts[i]->pid == pid && ts[i]->pending)
            ts[m++] = ts[i];
    if (!m) {
        free(ts);
        return -ENOENT;
    }
    if (p + n > ts[0]->data_pages || p + n < p) {
        free(ts);
        return -EINVAL;
    }
    /* the content is in the file now: no longer pending for any task of this image */
    _Atomic uint64_t *pend = ts[0]->pending;
    for (uint64_t q = p, left = n; left;) {
        uint64_t bit = q & 63, take = 64 - bit < left ? 64 - bit : left;
        uint64_t mask = take == 64 ? ~0ULL : (((1ULL << take) - 1) << bit);
        atomic_fetch_and_explicit(&pend[q >> 6], ~mask, memory_order_release);
        q += take;
        left -= take;
    }
    int64_t placed = 0;
    for (size_t i = 0; i < m; i++)
        placed += (int64_t)place_arrived(ts[i], p, n);
    free(ts);
    pthread_mutex_lock(&lz->mu);
    pthread_cond_broadcast(&lz->cv);            /* workers waiting for work */
    pthread_mutex_unlock(&lz->mu);
    return placed;
}

/* Block b is READY: the recycler takes it (-> PUNCHED). */
static inline int claim_block(task_t *t, uint64_t b)
{
    unsigned char ready = BLK_READY;
    return atomic_load(&t->blk_state[b]) == BLK_READY &&
        atomic_compare_exchange_strong(&t->blk_state[b], &ready, BLK_PUNCHED);
}

/* Punch blocks [b, e) of t's pages file (all claimed READY -> PUNCHED). */
static void punch_run(task_t *t, uint64_t b, uint64_t e)
{
    dx_lazy *lz = t->lz;
    uint64_t off = b << (BLK_SHIFT + 12), end = e << (BLK_SHIFT + 12);
    if (end > t->data_pages * PS)
        end = t->data_pages * PS;
    atomic_fetch_add(&lz->punches, 1);
    if (fallocate(t->pfd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, (off_t)off,
                  (off_t)(end - off)) == 0) {
        atomic_fetch_add(&lz->recycled, (end - off) / PS);
    } else {
        /* a filesystem that cannot punch: the pages stay in the page cache until the
         * file goes, as without recycling */
        atomic_fetch_add(&lz->recycle_failed, (end - off) / PS);
        atomic_store(&t->punch_failed, 1);
    }
}

/* One pass over every task: punch each run of READY blocks, one fallocate per run (a
 * punch of blocks on disk may wait for a discard: runs keep those few and large, and no
 * copy or fault ever waits for one).  Returns the blocks punched. */
static uint64_t recycle_pass(dx_lazy *lz)
{
    uint64_t done = 0;
    size_t n;
    task_t **ts = tasks_now(lz, &n);
    if (!ts)
        return 0;
    for (size_t i = 0; i < n; i++) {
        task_t *t = ts[i];
        if (!t->blk_state || t->pfd < 0 || atomic_load(&t->punch_failed))
            continue;
        uint64_t b = 0;
        while (b < t->nblk) {
            uint64_t e = b;
            while (e < t->nblk && claim_block(t, e))
                e++;
            if (e == b) {
                b++;
                continue;
            }
            punch_run(t, b, e);
            done += e - b;
            b = e;
        }
    }
    free(ts);
    return done;
}

static void *recycler_main(void *arg)
{
    dx_lazy *lz = arg;
    pthread_setname_np(pthread_self(), "dx-lazy-recycle");
    background_priority();
    while (!stopping(lz))
        if (!recycle_pass(lz))
            usleep(2000);
    return NULL;
}

int64_t dx_lazy_recycle(dx_lazy *lz)
{
    pthread_mutex_lock(&lz->mu);
    int rc = 0;
    if (!lz->recycler_started && !lz->stop) {
        rc = pthread_create(&lz->recycler, NULL, recycler_main, lz);
        if (rc == 0)
            lz->recycler_started = 1;
    }
    pthread_mutex_unlock(&lz->mu);
    if (rc)
        return -rc;
    return (int64_t)atomic_load(&lz->recycled);
}

void dx_lazy_prefetch(dx_lazy *lz)
{
    pthread_mutex_lock(&lz->mu);
    if (!lz->prefetching) {
        lz->prefetching = 1;
        lz->prefetch_ns = now_ns();
    }
    pthread_cond_broadcast(&lz->cv);
    pthread_mutex_unlock(&lz->mu);
}

int dx_lazy_wait(dx_lazy *lz, int timeout_ms)
{
    struct timespec ts = deadline_in(timeout_ms);
    pthread_mutex_lock(&lz->mu);
    while (!lz->complete) {
        if (pthread_cond_timedwait(&lz->cv, &lz->mu, &ts) == ETIMEDOUT)
            break;
    }
    int done = lz->complete;
    pthread_mutex_unlock(&lz->mu);
    return done;
}

void dx_lazy_get_stats(dx_lazy *lz, dx_lazy_stats *o)
{
    memset(o, 0, sizeof *o);
    o->tasks = atomic_load(&lz->tasks_n);
    o->forks = atomic_load(&lz->forks);
    o->pages_total = atomic_load(&lz->pages_total);
    o->pages_faulted = atomic_load(&lz->faulted);
    o->pages_prefetched = atomic_load(&lz->prefetched);
    o->pages_present = atomic_load(&lz->present);
    o->pages_dropped = atomic_load(&lz->dropped);
    o->pages_zero = atomic_load(&lz->zero);
    o->pages_zero_image = atomic_load(&lz->zero_image);
    o->faults = atomic_load(&lz->faults);
    o->events = atomic_load(&lz->events);
    o->eagain = atomic_load(&lz->eagain);
    o->tasks_gone = atomic_load(&lz->gone_n);
    o->pages_abandoned = atomic_load(&lz->abandoned);
    o->pages_pending = atomic_load(&lz->pending_n);
    o->pages_postcopied = atomic_load(&lz->postcopied);
    o->requests = atomic_load(&lz->requests);
    o->requests_dropped = atomic_load(&lz->requests_dropped);
    o->fault_waits = atomic_load(&lz->waits);
    o->fault_wait_ns = atomic_load(&lz->wait_ns);
    o->fault_wait_max_ns = atomic_load(&lz->wait_max_ns);
    o->pages_recycled = atomic_load(&lz->recycled);
    o->pages_recycle_failed = atomic_load(&lz->recycle_failed);
    o->punches = atomic_load(&lz->punches);
    pthread_mutex_lock(&lz->mu);
    o->prefetch_ns = lz->prefetch_ns;
    o->complete_ns = lz->complete_ns;
    o->placed_ns = lz->placed_ns;
    o->error = lz->error;
    memcpy(o->error_what, lz->error_what, sizeof o->error_what);
    pthread_mutex_unlock(&lz->mu);
}

void dx_lazy_free(dx_lazy *lz)
{
    if (!lz)
        return;
    pthread_mutex_lock(&lz->mu);
    lz->stop = 1;
    pthread_cond_broadcast(&lz->cv);
    pthread_mutex_unlock(&lz->mu);
    if (lz->wakefd >= 0) {
        uint64_t one = 1;
        if (write(lz->wakefd, &one, sizeof one) < 0) { /* the 10 ms poll ends it anyway */ }
    }
    if (lz->evt_started)
        pthread_join(lz->evt, NULL);
    for (int i = 0; i < lz->nwk; i++)
        pthread_join(lz->wk[i], NULL);
    if (lz->recycler_started)
        pthread_join(lz->recycler, NULL);
    for (size_t i = 0; i < lz->npop; i++)
        pthread_join(lz->pop[i], NULL);
    free(lz->pop);
    for (size_t i = 0; i < lz->ntasks; i++)
        task_free(lz->tasks[i]);
    for (size_t i = 0; i < lz->nmaps; i++)
        munmap(lz->maps[i], lz->maplens[i]);
    free(lz->tasks);
    free(lz->maps);
    free(lz->maplens);
    free(lz->wk);
    if (lz->ep >= 0)
        close(lz->ep);
    if (lz->wakefd >= 0)
        close(lz->wakefd);
    pthread_mutex_destroy(&lz->mu);
    pthread_cond_destroy(&lz->cv);
    free(lz);
}
