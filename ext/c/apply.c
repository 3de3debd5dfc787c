/* The destination's page applier (see apply.h). */
#define _GNU_SOURCE
#include <errno.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <unistd.h>

#include "apply.h"
#include "delta.h"
#include "frame.h"
#include "hash.h"

static const uint8_t apply_zero_page[DX_PAGE_SIZE];

const char *dx_apply_strerror(int code)
{
    switch (-code) {
    case DX_E_APPLY_ORDER: return "page records out of order (vaddrs must ascend within an image)";
    case DX_E_APPLY_NOT_HELD: return "XOR delta for a page the destination does not hold";
    case DX_E_APPLY_IO: return "writing the pages file failed";
    case DX_E_APPLY_HELD_SHORT: return "the held pages file is shorter than its pagemap";
    case DX_E_APPLY_NO_PAGES: return "page records for an image without present pages";
    case DX_E_APPLY_TWICE: return "page record for a page already received in this round";
    case DX_E_APPLY_CANCELLED: return "the apply threads stopped before this frame was applied";
    case DX_E_UNKNOWN_VADDR: return "page record for a vaddr outside the image's pagemap";
    default: return dx_strerror(code);
    }
}

int dx_applier_init(dx_applier *a, const uint64_t *vaddrs, size_t npages, int fd, int mode,
                    const uint64_t *held_vaddrs, size_t nheld, int held_fd,
                    uint64_t *hashes, uint64_t *recv_vaddrs, uint8_t *src)
{
    memset(a, 0, sizeof *a);
    a->vaddrs = vaddrs;
    a->npages = npages;
    a->held_vaddrs = held_vaddrs;
    a->fd = fd;
    a->mode = mode;
    a->hashes = hashes;
    a->recv_vaddrs = recv_vaddrs;
    a->src = src;
    if (mode != DX_APPLY_AT_INDEX && mode != DX_APPLY_APPEND) return -DX_E_ARG;
    if (mode == DX_APPLY_AT_INDEX && npages && !src) return -DX_E_ARG;
    if (mode == DX_APPLY_APPEND && npages && !recv_vaddrs) return -DX_E_ARG;
    if (nheld) {
        struct stat st;
        if (held_fd < 0) return -DX_E_ARG;
        if (fstat(held_fd, &st)) { a->w.err_errno = errno; return -DX_E_APPLY_IO; }
        if ((uint64_t)st.st_size < (uint64_t)nheld * DX_PAGE_SIZE) return -DX_E_APPLY_HELD_SHORT;
        void *m = mmap(NULL, nheld * DX_PAGE_SIZE, PROT_READ, MAP_SHARED, held_fd, 0);
        if (m == MAP_FAILED) { a->w.err_errno = errno; return -DX_E_APPLY_IO; }
        a->held_pages = m;
        a->nheld = nheld;
    }
    if (src) memset(src, DX_SRC_NONE, npages);
    if (pthread_mutex_init(&a->write_lock, NULL)) { dx_applier_free(a); return -DX_E_NOMEM; }
    if (pthread_mutex_init(&a->idle_mu, NULL)) {
        pthread_mutex_destroy(&a->write_lock);
        dx_applier_free(a);
        return -DX_E_NOMEM;
    }
    if (pthread_cond_init(&a->idle_cv, NULL)) {
        pthread_mutex_destroy(&a->idle_mu);
        pthread_mutex_destroy(&a->write_lock);
        dx_applier_free(a);
        return -DX_E_NOMEM;
    }
    a->lock_ready = 1;
    return 0;
}

void dx_applier_hold(dx_applier *a)
{
    pthread_mutex_lock(&a->idle_mu);
    a->held++;
    pthread_mutex_unlock(&a->idle_mu);
}

void dx_applier_release(dx_applier *a)
{
    pthread_mutex_lock(&a->idle_mu);
    if (--a->held == 0) pthread_cond_broadcast(&a->idle_cv);
    pthread_mutex_unlock(&a->idle_mu);
}

void dx_applier_wait_idle(dx_applier *a)
{
    if (!a->lock_ready) return;
    pthread_mutex_lock(&a->idle_mu);
    while (a->held) pthread_cond_wait(&a->idle_cv, &a->idle_mu);
    pthread_mutex_unlock(&a->idle_mu);
}

/* A work area's buffers are mapped, not malloc'd: freeing them must give the memory back
 * (dx_apply_pool_trim after a round's bulk), and glibc serves a 4 MiB malloc from a
 * thread's arena once a free of a larger block raised its mmap threshold, where a free
 * keeps it resident. */
static void *work_map(size_t n)
{
    void *p = mmap(NULL, n, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    return p == MAP_FAILED ? NULL : p;
}

void dx_apply_work_free(dx_apply_work *w)
{
    if (w->raw) munmap(w->raw, w->raw_cap);
    if (w->scratch) munmap(w->scratch, (size_t)DX_APPLY_RUN_PAGES * DX_PAGE_SIZE);
    if (w->iov) munmap(w->iov, w->iov_cap * sizeof *w->iov);
    if (w->runs) munmap(w->runs, w->iov_cap * sizeof *w->runs);
    w->raw = w->scratch = NULL;
    w->iov = NULL;
    w->runs = NULL;
    w->raw_cap = w->iov_cap = 0;
}

/* Room for n iovecs and n runs in w (a frame's collected writes). */
static int work_iov(dx_apply_work *w, size_t n)
{
    if (n <= w->iov_cap) return 0;
    size_t cap = n < 1024 ? 1024 : n;
    struct iovec *iov = work_map(cap * sizeof *iov);
    dx_apply_run *runs = iov ? work_map(cap * sizeof *runs) : NULL;
    if (!runs) {
        if (iov) munmap(iov, cap * sizeof *iov);
        return -DX_E_NOMEM;
    }
    if (w->iov) munmap(w->iov, w->iov_cap * sizeof *w->iov);
    if (w->runs) munmap(w->runs, w->iov_cap * sizeof *w->runs);
    w->iov = iov;
    w->runs = runs;
    w->iov_cap = cap;
    return 0;
}

void dx_applier_free(dx_applier *a)
{
    if (a->held_pages) munmap((void *)a->held_pages, a->nheld * DX_PAGE_SIZE);
    a->held_pages = NULL;
    a->nheld = 0;
    dx_apply_work_free(&a->w);
    if (a->lock_ready) {
        pthread_mutex_destroy(&a->write_lock);
        pthread_cond_destroy(&a->idle_cv);
        pthread_mutex_destroy(&a->idle_mu);
    }
    a->lock_ready = 0;
}

/* Pages [from, from+n) of in_fd to pages [to, to+n) of out_fd, in the kernel; 0, or
 * -DX_E_APPLY_IO (errno in *err) or -DX_E_APPLY_HELD_SHORT (in_fd ended first). */
static int copy_pages(int in_fd, uint64_t from, int out_fd, uint64_t to, uint64_t n, int *err)
{
    loff_t off_in = (loff_t)(from * DX_PAGE_SIZE), off_out = (loff_t)(to * DX_PAGE_SIZE);
    size_t left = (size_t)n * DX_PAGE_SIZE;
    while (left) {
        ssize_t k = copy_file_range(in_fd, &off_in, out_fd, &off_out, left, 0);
        if (k < 0 && errno == EINTR) continue;
        if (k < 0) { *err = errno; return -DX_E_APPLY_IO; }
        if (k == 0) return -DX_E_APPLY_HELD_SHORT;
        left -= (size_t)k;
    }
    return 0;
}

int64_t dx_applier_share_held(dx_applier *a, int held_fd, const uint64_t *held_hashes)
{
    if (a->mode != DX_APPLY_AT_INDEX) return -DX_E_ARG;
    size_t i = 0, j = 0;
    int64_t shared = 0;
    while (i < a->nheld && j < a->npages) {
        if (a->held_vaddrs[i] < a->vaddrs[j]) { i++; continue; }
        if (a->vaddrs[j] < a->held_vaddrs[i]) { j++; continue; }
        size_t n = 0;          /* a run: consecutive in both files */
        while (i + n < a->nheld && j + n < a->npages && a->held_vaddrs[i + n] == a->vaddrs[j + n])
            n++;
        int rc = copy_pages(held_fd, i, a->fd, j, n, &a->w.err_errno);
        if (rc) return rc;
        for (size_t k = 0; k < n; k++) {
            a->hashes[j + k] = held_hashes[i + k];
            a->src[j + k] = DX_SRC_HELD;
        }
        i += n;
        j += n;
        shared += (int64_t)n;
    }
    return shared;
}

/* Write iov[0..n) at page `at` of the output, finishing short writes.  At-index, the
 * first write of a frame takes the applier's write lock (*locked), held to the frame's
 * end: the filesystem takes the file's inode lock for each buffered write anyway, and a
 * frame's writes (runs broken by zero pages: ~5 pages each for memwork's page mix) would
 * otherwise hand a lock from thread to thread every few microseconds.  (A frame whose
 * runs were collected first takes it before its first write_run: apply_one.) */
static int write_run(dx_applier *a, dx_apply_work *w, struct iovec *iov, int n, uint64_t at,
                     int *locked)
{
    off_t off = (off_t)(at * DX_PAGE_SIZE);
    if (!*locked && a->mode == DX_APPLY_AT_INDEX && a->lock_ready) {
        pthread_mutex_lock(&a->write_lock);
        *locked = 1;
    }
    while (n > 0) {
        ssize_t k = pwritev(a->fd, iov, n, off);
        if (k < 0 && errno == EINTR) continue;
        if (k <= 0) { w->err_errno = k < 0 ? errno : ENOSPC; return -DX_E_APPLY_IO; }
        off += k;
        while (n > 0 && (size_t)k >= iov->iov_len) { k -= (ssize_t)iov->iov_len; iov++; n--; }
        if (n > 0) { iov->iov_base = (uint8_t *)iov->iov_base + k; iov->iov_len -= (size_t)k; }
    }
    return 0;
}

/* Where the record for vaddr goes: its layout index at or after cur, or an error
 * (cur > 0: the previous record's index + 1, which vaddr must be above). */
static int locate(const dx_applier *a, size_t cur, uint64_t vaddr, size_t *idx)
{
    if (cur > 0 && vaddr <= a->vaddrs[cur - 1]) return -DX_E_APPLY_ORDER;
    ptrdiff_t k = dx_find_vaddr(a->vaddrs + cur, a->npages - cur, vaddr);
    if (k < 0) return -DX_E_UNKNOWN_VADDR;
    *idx = cur + (size_t)k;
    return 0;
}

static int apply_one(dx_applier *a, dx_apply_work *w, const uint8_t *raw, size_t raw_len,
                     uint64_t counts[3])
{
    const int at_index = a->mode == DX_APPLY_AT_INDEX;
    /* append: records ascend across the image; at-index: within the frame */
    const size_t first = at_index ? 0 : a->next;
    size_t cur = first, idx, nfull = 0, nxor = 0, nzero = 0;
    int rc;
    /* 1. every record checked before any page is written */
    for (size_t p = 0; p < raw_len; p += DX_RECORD_HEADER_SIZE + dx_load16(raw + p + 9)) {
        uint64_t vaddr = dx_load64(raw + p);
        w->err_vaddr = vaddr;
        if ((rc = locate(a, cur, vaddr, &idx))) return rc;
        if (raw[p + 8] == DX_REC_XOR) {
            if (dx_find_vaddr(a->held_vaddrs, a->nheld, vaddr) < 0) return -DX_E_APPLY_NOT_HELD;
            nxor++;
        } else if (raw[p + 8] == DX_REC_FULL) {
            nfull++;
        } else {
            nzero++;
        }
        cur = idx + 1;
    }
    /* At-index without XOR records (a first round): the frame's runs are collected --
     * pages claimed, hashed, zero pages found -- with no lock held, then written under
     * the write lock in one go, so that the lock covers only the writes (other threads
     * hash and claim meanwhile). XOR pages are built in the run scratch, one run at a
     * time: a frame with any is written run by run. An iovec per written page, each a
     * record of the frame: the full ones, the zero ones over held pages, and up to
     * DX_APPLY_ZERO_BRIDGE zero pages bridged before each of those. */
    const int collect = at_index && !nxor && a->lock_ready;
    const size_t bridged = (nfull + (a->nheld ? nzero : 0)) * (1 + DX_APPLY_ZERO_BRIDGE);
    const size_t iov_need = (bridged < nfull + nzero ? bridged : nfull + nzero) + 1;
    if (collect && (rc = work_iov(w, iov_need))) return rc;
    size_t nruns = 0, ibase = 0;
    /* 2. build, hash and write, in runs of consecutive file pages */
    const uint64_t zh = dx_zero_page_hash();
    struct iovec iov_run[DX_APPLY_RUN_PAGES];
    struct iovec *const iov0 = collect ? w->iov : iov_run;
    struct iovec *iov = iov0;           /* the current run's: iov0 + ibase */
    int nrun = 0;
    uint64_t run_at = 0, mine[3] = {0, 0, 0};
    size_t held_cur = 0, zgap = 0;   /* zero pages skipped right after the run */
    int locked = 0;
    cur = first;
    for (size_t p = 0; p < raw_len;) {
        uint64_t vaddr = dx_load64(raw + p);
        uint8_t kind = raw[p + 8];
        size_t plen = dx_load16(raw + p + 9);
        const uint8_t *payload = raw + p + DX_RECORD_HEADER_SIZE;
        p += DX_RECORD_HEADER_SIZE + plen;
        locate(a, cur, vaddr, &idx);              /* checked above */
        cur = idx + 1;
        int write;
        uint64_t at;
        if (at_index) {
            /* claim the page: once per round, whichever thread comes first */
            uint8_t was = __atomic_exchange_n(&a->src[idx], (uint8_t)DX_SRC_RECEIVED,
                                              __ATOMIC_RELAXED);
            if (was == DX_SRC_RECEIVED) {
                w->err_vaddr = vaddr;
                rc = -DX_E_APPLY_TWICE;
                goto out;
            }
            at = idx;
            /* a zero page needs no write where nothing was written (preallocated) */
            write = !(kind == DX_REC_ZERO && was == DX_SRC_NONE);
            if (!write) {
                if (nrun && zgap < DX_APPLY_ZERO_BRIDGE && at == run_at + nrun + zgap)
                    zgap++;
                else
                    zgap = DX_APPLY_ZERO_BRIDGE + 1;  /* no bridge to the next write */
            } else if (zgap && zgap <= DX_APPLY_ZERO_BRIDGE && at == run_at + nrun + zgap &&
                       nrun + zgap < DX_APPLY_RUN_PAGES) {
                /* a few zero pages of this frame between two written ones: written too
                 * (from the zero page), one pwritev instead of two */
                if (collect && ibase + (size_t)nrun + zgap + 1 > w->iov_cap) {
                    rc = -DX_E_NOMEM;             /* (iov_need above bounds it) */
                    goto out;
                }
                for (size_t z = 0; z < zgap; z++) {
                    iov[nrun].iov_base = (void *)apply_zero_page;
                    iov[nrun].iov_len = DX_PAGE_SIZE;
                    nrun++;
                }
            }
            if (write) zgap = 0;
        } else {
            a->next = idx + 1;
            at = a->append_pages;
            write = kind != DX_REC_ZERO;          /* a hole, made part of the file at finish */
        }
        if (write && nrun && (at != run_at + (uint64_t)nrun || nrun == (int)DX_APPLY_RUN_PAGES)) {
            if (collect) {
                w->runs[nruns++] = (dx_apply_run){run_at, (uint32_t)ibase, (uint32_t)nrun};
                ibase += (size_t)nrun;
                iov = iov0 + ibase;
            } else if ((rc = write_run(a, w, iov, nrun, run_at, &locked))) {
                goto out;
            }
            nrun = 0;
        }
        const uint8_t *page;
        uint64_t h;
        if (kind == DX_REC_ZERO) {
            page = apply_zero_page;
            h = zh;
        } else if (kind == DX_REC_FULL) {
            page = payload;
            h = dx_page_is_zero(page) ? zh : dx_xxh3(page, DX_PAGE_SIZE);
        } else {
            ptrdiff_t j = dx_find_vaddr(a->held_vaddrs + held_cur, a->nheld - held_cur, vaddr);
            held_cur += (size_t)j;                /* checked above: found */
            uint8_t *slot = w->scratch + (size_t)nrun * DX_PAGE_SIZE;
            memcpy(slot, a->held_pages + held_cur * DX_PAGE_SIZE, DX_PAGE_SIZE);
            dx_xor_decode(slot, payload, plen);   /* validated with the frame */
            page = slot;
            h = dx_page_is_zero(page) ? zh : dx_xxh3(page, DX_PAGE_SIZE);
        }
        if (write) {
            if (collect && ibase + (size_t)nrun + 1 > w->iov_cap) {
                rc = -DX_E_NOMEM;                 /* (iov_need above bounds it) */
                goto out;
            }
            if (!nrun) run_at = at;
            iov[nrun].iov_base = (void *)page;
            iov[nrun].iov_len = DX_PAGE_SIZE;
            nrun++;
        }
        if (at_index) {
            a->hashes[idx] = h;
        } else {
            a->recv_vaddrs[a->nrecv] = vaddr;
            a->hashes[a->nrecv] = h;
            a->append_pages++;
            a->nrecv++;
        }
        mine[kind]++;
    }
    if (collect) {
        if (nrun) w->runs[nruns++] = (dx_apply_run){run_at, (uint32_t)ibase, (uint32_t)nrun};
        rc = 0;
        if (nruns) {
            pthread_mutex_lock(&a->write_lock);
            locked = 1;
        }
        for (size_t r = 0; r < nruns && !rc; r++)
            rc = write_run(a, w, w->iov + w->runs[r].first, (int)w->runs[r].n, w->runs[r].at,
                           &locked);
    } else {
        rc = nrun ? write_run(a, w, iov, nrun, run_at, &locked) : 0;
    }
out:
    if (locked) pthread_mutex_unlock(&a->write_lock);
    for (int k = 0; k < 3; k++) {
        counts[k] += mine[k];
        if (at_index) {
            __atomic_fetch_add(&a->counts[k], mine[k], __ATOMIC_RELAXED);
            __atomic_fetch_add(&a->nrecv, (size_t)mine[k], __ATOMIC_RELAXED);
        } else {
            a->counts[k] += mine[k];
        }
    }
    return rc;
}

int dx_applier_apply_with(dx_applier *a, dx_apply_work *w, const uint8_t *buf, size_t len,
                          size_t max_raw, uint64_t counts[3])
{
    size_t off = 0;
    int rc;
    counts[0] = counts[1] = counts[2] = 0;
    if (!w->scratch) {
        w->scratch = work_map((size_t)DX_APPLY_RUN_PAGES * DX_PAGE_SIZE);
        if (!w->scratch) return -DX_E_NOMEM;
    }
    while (off < len) {
        dx_frame_header h;
        w->err_offset = off;
        w->err_vaddr = 0;
        if ((rc = dx_frame_header_parse(buf + off, len - off, max_raw, &h))) return rc;
        if (h.raw_len > w->raw_cap) {      /* (its content need not survive) */
            size_t cap = (h.raw_len + DX_PAGE_SIZE - 1) & ~(size_t)(DX_PAGE_SIZE - 1);
            uint8_t *r = work_map(cap);
            if (!r) return -DX_E_NOMEM;
            if (w->raw) munmap(w->raw, w->raw_cap);
            w->raw = r;
            w->raw_cap = cap;
        }
        if ((rc = dx_frame_decode(buf + off, &h, w->raw))) return rc;
        if (h.record_count && !a->npages) return -DX_E_APPLY_NO_PAGES;
        if ((rc = apply_one(a, w, w->raw, h.raw_len, counts))) return rc;
        off += DX_FRAME_HEADER_SIZE + h.stored_len;
    }
    return 0;
}

int dx_applier_apply(dx_applier *a, const uint8_t *buf, size_t len, size_t max_raw,
                     uint64_t counts[3])
{
    return dx_applier_apply_with(a, &a->w, buf, len, max_raw, counts);
}

int64_t dx_applier_finish(dx_applier *a)
{
    if (a->mode == DX_APPLY_APPEND) {
        if (ftruncate(a->fd, (off_t)(a->append_pages * DX_PAGE_SIZE))) {
            a->w.err_errno = errno;
            return -DX_E_APPLY_IO;
        }
        return 0;
    }
    int64_t missing = 0;
    for (size_t i = 0; i < a->npages; i++) missing += a->src[i] == DX_SRC_NONE;
    return missing;
}

int dx_pagemap_check(const uint64_t *pairs, size_t n, uint64_t max_nr, uint64_t *present,
                     size_t *err_index)
{
    unsigned __int128 prev_end = 0;
    uint64_t total = 0;
    for (size_t i = 0; i < n; i++) {
        uint64_t vaddr = pairs[2 * i], nr = pairs[2 * i + 1] & 0xffffffffu;
        uint32_t flags = (uint32_t)(pairs[2 * i + 1] >> 32);
        unsigned __int128 end = (unsigned __int128)vaddr + (unsigned __int128)nr * DX_PAGE_SIZE;
        *err_index = i;
        if (vaddr & (DX_PAGE_SIZE - 1)) return -DX_E_UNALIGNED;
        if (nr == 0 || nr > max_nr || end > ((unsigned __int128)1 << 64)) return -DX_E_ARG;
        if ((unsigned __int128)vaddr < prev_end) return -DX_E_UNSORTED;
        prev_end = end;
        if (flags & DX_PE_PRESENT) total += nr;
    }
    *present = total;
    return 0;
}

void dx_pagemap_present_vaddrs(const uint64_t *pairs, size_t n, uint64_t *out)
{
    size_t k = 0;
    for (size_t i = 0; i < n; i++) {
        if (!((pairs[2 * i + 1] >> 32) & DX_PE_PRESENT)) continue;
        uint64_t v = pairs[2 * i], nr = pairs[2 * i + 1] & 0xffffffffu;
        for (uint64_t j = 0; j < nr; j++) out[k++] = v + j * DX_PAGE_SIZE;
    }
}

int64_t dx_copy_received_runs(int src_fd, int dst_fd, const uint64_t *runs, size_t nruns,
                              uint64_t *out, int *err)
{
    uint64_t at = 0, off = 0;
    int64_t copied = 0;
    for (size_t r = 0; r < nruns; r++) {
        uint64_t n = runs[3 * r + 1];
        if (!runs[3 * r + 2]) {
            int rc = copy_pages(src_fd, off, dst_fd, at, n, err);
            if (rc) return rc;
            out[2 * copied] = at;
            out[2 * copied + 1] = n;
            copied++;
            off += n;
        }
        at += n;
    }
    return copied;
}

int dx_write_u64_runs(int fd, const uint64_t *values, const uint64_t *pairs, size_t npairs)
{
    for (size_t r = 0; r < npairs; r++) {
        const uint8_t *p = (const uint8_t *)(values + pairs[2 * r]);
        size_t left = (size_t)pairs[2 * r + 1] * 8;
        off_t off = (off_t)(pairs[2 * r] * 8);
        while (left) {
            ssize_t k = pwrite(fd, p, left, off);
            if (k < 0 && errno == EINTR) continue;
            if (k <= 0) { if (k == 0) errno = ENOSPC; return -1; }
            p += k;
            off += k;
            left -= (size_t)k;
        }
    }
    return 0;
}
