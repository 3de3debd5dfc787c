#define _GNU_SOURCE
#include <errno.h>
#include <limits.h>
#include <stdlib.h>
#include <sys/uio.h>
#include <unistd.h>

#include "procmem.h"

#ifndef IOV_MAX
#define IOV_MAX 1024
#endif

static void note_failure(uint64_t vaddr, uint64_t len, uint64_t *fv, uint64_t *fl,
                         size_t cap, size_t *nfail)
{
    if (*nfail && *nfail <= cap && fv[*nfail - 1] + fl[*nfail - 1] == vaddr) {
        fl[*nfail - 1] += len;
        return;
    }
    if (*nfail < cap) { fv[*nfail] = vaddr; fl[*nfail] = len; }
    (*nfail)++;
}

ptrdiff_t dx_read_process_memory(pid_t pid, const uint64_t *run_vaddrs, const uint64_t *run_lens,
                                 size_t nruns, uint8_t *buf, uint64_t *fail_vaddrs,
                                 uint64_t *fail_lens, size_t fail_cap, uint64_t *bytes_failed)
{
    struct iovec remote[IOV_MAX];
    size_t run = 0, nfail = 0;
    uint64_t off = 0;          /* offset inside run_vaddrs[run] */
    uint8_t *dst = buf;
    *bytes_failed = 0;
    for (;;) {
        while (run < nruns && run_lens[run] == off) { run++; off = 0; }
        if (run >= nruns) break;
        /* a batch: up to IOV_MAX remote pieces and DX_READ_BATCH bytes, read into one
         * contiguous local iovec because the runs sit back to back in buf */
        size_t k = 0, total = 0, r = run;
        uint64_t o = off;
        while (r < nruns && k < IOV_MAX && total < DX_READ_BATCH) {
            uint64_t len = run_lens[r] - o;
            if (len > DX_READ_BATCH - total) len = DX_READ_BATCH - total;
            if (len) {
                remote[k].iov_base = (void *)(uintptr_t)(run_vaddrs[r] + o);
                remote[k].iov_len = len;
                k++;
                total += len;
            }
            if (o + len < run_lens[r]) break;
            r++;
            o = 0;
        }
        struct iovec local = {.iov_base = dst, .iov_len = total};
        ssize_t n = process_vm_readv(pid, &local, 1, remote, (unsigned long)k, 0);
        if (n < 0) {
            if (errno != EFAULT) return -errno;
            n = 0;    /* the first remote piece is unreadable */
        }
        /* advance the cursor over what was read */
        uint64_t left = (uint64_t)n;
        dst += n;
        while (left) {
            uint64_t step = run_lens[run] - off < left ? run_lens[run] - off : left;
            off += step;
            left -= step;
            if (off == run_lens[run] && left) { run++; off = 0; }
        }
        if ((size_t)n == total) continue;
        while (run < nruns && run_lens[run] == off) { run++; off = 0; }   /* at a run end */
        if (run >= nruns) break;
        /* skip the unreadable page: up to the next page boundary or the run end */
        uint64_t addr = run_vaddrs[run] + off;
        uint64_t skip = DX_PAGE_SIZE - (addr & (DX_PAGE_SIZE - 1));
        if (skip > run_lens[run] - off) skip = run_lens[run] - off;
        memset(dst, 0, skip);
        note_failure(addr, skip, fail_vaddrs, fail_lens, fail_cap, &nfail);
        *bytes_failed += skip;
        dst += skip;
        off += skip;
    }
    return (ptrdiff_t)nfail;
}

#define PAGEMAP_CHUNK 4096

ptrdiff_t dx_pagemap_runs(int fd, const uint64_t *starts, const uint64_t *ends, size_t nvmas,
                          const uint8_t *skip_file, uint64_t zero_pfn,
                          uint64_t **run_vaddrs, uint64_t **run_lens)
{
    uint64_t *entries = malloc(PAGEMAP_CHUNK * sizeof *entries);
    size_t nruns = 0, cap = 0;
    *run_vaddrs = *run_lens = NULL;
    if (!entries) return -ENOMEM;
    for (size_t k = 0; k < nvmas; k++) {
        for (uint64_t va = starts[k]; va < ends[k];) {
            size_t want = (size_t)((ends[k] - va) >> DX_PAGE_SHIFT);
            if (want > PAGEMAP_CHUNK) want = PAGEMAP_CHUNK;
            ssize_t got = pread(fd, entries, want * 8, (off_t)((va >> DX_PAGE_SHIFT) * 8));
            if (got < 0) { free(entries); return -errno; }
            if (got < 8) break;   /* past the end of the address space */
            size_t n = (size_t)got / 8;
            for (size_t i = 0; i < n; i++) {
                uint64_t e = entries[i];
                if (!(e & (DX_PM_PRESENT | DX_PM_SWAPPED))) continue;
                /* as CRIU: a private file page not yet copied-on-write is the file's */
                if (skip_file && skip_file[k] && (e & DX_PM_FILE)) continue;
                /* as CRIU: a page only read (mapped to the shared zero page) is absent */
                if (zero_pfn && (e & DX_PM_PRESENT) && (e & DX_PM_PFN_MASK) == zero_pfn) continue;
                uint64_t page = va + ((uint64_t)i << DX_PAGE_SHIFT);
                if (nruns && (*run_vaddrs)[nruns - 1] + (*run_lens)[nruns - 1] == page) {
                    (*run_lens)[nruns - 1] += DX_PAGE_SIZE;
                    continue;
                }
                if (nruns == cap) {
                    cap = cap ? cap * 2 : 256;
                    uint64_t *v = realloc(*run_vaddrs, cap * sizeof *v);
                    if (v) *run_vaddrs = v;
                    uint64_t *l = v ? realloc(*run_lens, cap * sizeof *l) : NULL;
                    if (l) *run_lens = l;
                    if (!v || !l) { free(entries); return -ENOMEM; }
                }
                (*run_vaddrs)[nruns] = page;
                (*run_lens)[nruns] = DX_PAGE_SIZE;
                nruns++;
            }
            va += (uint64_t)n << DX_PAGE_SHIFT;
        }
    }
    free(entries);
    return (ptrdiff_t)nruns;
}

#define READ_RUN_MAX_PAGES 65536u     /* 256 MiB per iovec at most */

/* pread of [addr, addr + len) from /proc/PID/mem into dst: what process_vm_readv could
 * not read (PROT_NONE pages: the kernel reads them with FOLL_FORCE).  A page that even
 * this cannot read (unmapped meanwhile) is zero-filled and counted; reading resumes at
 * the next page.  Returns the pages read through memfd, or -errno. */
static ptrdiff_t pread_run(pid_t pid, int memfd, uint64_t addr, uint8_t *dst, size_t len,
                           uint64_t *pages_failed)
{
    size_t off = 0;
    ptrdiff_t forced = 0;
    while (off < len) {
        if (memfd < 0) {   /* no /proc/PID/mem: page by page with process_vm_readv */
            struct iovec l1 = {dst + off, DX_PAGE_SIZE};
            struct iovec r1 = {(void *)(uintptr_t)(addr + off), DX_PAGE_SIZE};
            ssize_t g = process_vm_readv(pid, &l1, 1, &r1, 1, 0);
            if (g < 0 && errno != EFAULT) return -errno;
            if (g != (ssize_t)DX_PAGE_SIZE) {
                memset(dst + off, 0, DX_PAGE_SIZE);
                (*pages_failed)++;
            }
            off += DX_PAGE_SIZE;
            continue;
        }
        ssize_t g = pread(memfd, dst + off, len - off, (off_t)(addr + off));
        if (g < 0 && errno == EINTR) continue;
        if (g > 0) {
            forced += (ptrdiff_t)((size_t)g / DX_PAGE_SIZE);
            off += (size_t)g;
            if (off % DX_PAGE_SIZE) {   /* a partial page: finish it below */
                size_t rest = DX_PAGE_SIZE - off % DX_PAGE_SIZE;
                memset(dst + off, 0, rest);
                off += rest;
                (*pages_failed)++;
            }
            continue;
        }
        /* nothing readable at addr + off: this page is lost (unmapped meanwhile) */
        memset(dst + off, 0, DX_PAGE_SIZE);
        (*pages_failed)++;
        off += DX_PAGE_SIZE;
    }
    return forced;
}

ptrdiff_t dx_read_pages(pid_t pid, int memfd, const uint64_t *vaddrs, size_t n,
                        const uint8_t *skip, uint8_t *buf, uint64_t *pages_failed,
                        uint64_t *pages_forced)
{
    struct iovec loc[IOV_MAX], rem[IOV_MAX];
    ptrdiff_t read = 0;
    size_t i = 0;
    *pages_failed = 0;
    *pages_forced = 0;
    while (i < n) {
        size_t k = 0, total = 0;
        while (i < n && k < IOV_MAX) {
            if (skip && skip[i]) { i++; continue; }
            size_t j = i + 1;
            while (j < n && !(skip && skip[j]) && vaddrs[j] == vaddrs[j - 1] + DX_PAGE_SIZE
                   && j - i < READ_RUN_MAX_PAGES)
                j++;
            size_t len = (j - i) * DX_PAGE_SIZE;
            rem[k].iov_base = (void *)(uintptr_t)vaddrs[i];
            rem[k].iov_len = len;
            loc[k].iov_base = buf + i * DX_PAGE_SIZE;
            loc[k].iov_len = len;
            k++;
            total += len;
            i = j;
        }
        if (!k) break;
        ssize_t got = process_vm_readv(pid, loc, (unsigned long)k, rem, (unsigned long)k, 0);
        if (got < 0 && errno != EFAULT) return -errno;
        if (got < 0) got = 0;
        read += (ptrdiff_t)(total / DX_PAGE_SIZE);
        if (got == (ssize_t)total) continue;
        /* process_vm_readv stopped at an unreadable page (PROT_NONE, or unmapped
         * meanwhile): the rest of this batch through /proc/PID/mem, one pread per run */
        size_t done = (size_t)got;
        for (size_t q = 0; q < k; q++) {
            size_t len = loc[q].iov_len;
            if (done >= len) { done -= len; continue; }
            ptrdiff_t f = pread_run(pid, memfd, (uint64_t)(uintptr_t)rem[q].iov_base + done,
                                    (uint8_t *)loc[q].iov_base + done, len - done,
                                    pages_failed);
            if (f < 0) return f;
            *pages_forced += (uint64_t)f;
            done = 0;
        }
    }
    return read;
}
