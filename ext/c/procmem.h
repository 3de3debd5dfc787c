/* Reading another process's memory in bulk, and finding the pages CRIU will dump. */
#ifndef DX_PROCMEM_H
#define DX_PROCMEM_H

#include <sys/types.h>

#include "dx_common.h"

/* Read runs (vaddr, length) of process pid into buf, back to back (buf holds the sum
 * of lengths).  process_vm_readv is called with at most IOV_MAX remote iovecs and at most
 * DX_READ_BATCH bytes per call.  A piece that cannot be read (unmapped meanwhile) is
 * zero-filled in buf, recorded in fail_vaddrs/fail_lens (adjacent pieces merged, at
 * most fail_cap kept) and reading resumes at the next page.  Returns the number of failed
 * pieces (possibly > fail_cap), or -errno when the process cannot be read at all
 * (ESRCH: gone, EPERM: not allowed). */
#define DX_READ_BATCH (1ul << 30)
ptrdiff_t dx_read_process_memory(pid_t pid, const uint64_t *run_vaddrs, const uint64_t *run_lens,
                                 size_t nruns, uint8_t *buf, uint64_t *fail_vaddrs,
                                 uint64_t *fail_lens, size_t fail_cap, uint64_t *bytes_failed);

/* Bits of a /proc/PID/pagemap entry (Documentation/admin-guide/mm/pagemap.rst). */
#define DX_PM_PRESENT (1ull << 63)
#define DX_PM_SWAPPED (1ull << 62)
#define DX_PM_FILE (1ull << 61)           /* file page or shared anonymous */
#define DX_PM_PFN_MASK ((1ull << 55) - 1)  /* the page frame number (root only) */

/* For each VMA [starts[k], ends[k]) (page aligned, ascending) read its pagemap entries
 * from the open pagemap fd and append the runs of present or swapped pages, as (vaddr,
 * length in bytes), to *run_vaddrs / *run_lens (malloc'd, grown as needed; the caller
 * frees them).  Returns the number of runs or -errno. */
ptrdiff_t dx_pagemap_runs(int fd, const uint64_t *starts, const uint64_t *ends, size_t nvmas,
                          const uint8_t *skip_file, uint64_t zero_pfn,
                          uint64_t **run_vaddrs, uint64_t **run_lens);

/* process_vm_readv of the pages of vaddrs (ascending, one per page) whose skip byte is 0
 * (all when skip is NULL) into their slots of buf (page i at i * 4096), touching runs
 * batched (IOV_MAX iovecs per call).  What process_vm_readv cannot read — PROT_NONE
 * pages (guard pages, GC heaps), or pages unmapped meanwhile — is read with one pread of
 * /proc/PID/mem (memfd, opened by the caller; -1: none) per failed run: the kernel reads
 * PROT_NONE private pages for it (FOLL_FORCE).  Pages that still cannot be read are
 * zero-filled and counted in *pages_failed; *pages_forced counts those read through
 * memfd.  Returns the pages read (skipped ones not counted) or -errno (ESRCH, EPERM). */
ptrdiff_t dx_read_pages(pid_t pid, int memfd, const uint64_t *vaddrs, size_t n,
                        const uint8_t *skip, uint8_t *buf, uint64_t *pages_failed,
                        uint64_t *pages_forced);
#endif
