# Reading another process's memory (ext/c/procmem.c).

import errno as _errno
import os as _os

cdef enum:
    _READ_FAIL_CAP = 4096
READ_FAIL_CAP = _READ_FAIL_CAP


def read_process_memory(int pid, run_vaddrs, run_lens, buf):
    """Read runs (vaddr, length) of process pid into buf, back to back.

    Returns (failed, bytes_failed): failed lists (vaddr, length) pieces that could not be
    read (unmapped meanwhile; zero-filled in buf), at most READ_FAIL_CAP of them.
    Raises ProcessLookupError / PermissionError when the process cannot be read at all.
    """
    cdef _Buffer vb = u64_buffer(run_vaddrs, "run_vaddrs")
    cdef _Buffer lb = u64_buffer(run_lens, "run_lens")
    cdef _Buffer bb = bytes_buffer(buf, "buf", True)
    cdef size_t n = u64_len(vb), i, total = 0
    if u64_len(lb) != n:
        raise ValueError(f"run_vaddrs has {n} entries but run_lens has {u64_len(lb)}")
    for i in range(n):
        total += u64_ptr(lb)[i]
    if total != bb.nbytes:
        raise ValueError(f"buf holds {bb.nbytes} bytes but the runs add up to {total}")
    cdef array.array fv = new_u64_array(_READ_FAIL_CAP)
    cdef array.array fl = new_u64_array(_READ_FAIL_CAP)
    cdef uint64_t bytes_failed = 0
    cdef ptrdiff_t nfail
    with nogil:
        nfail = dx_read_process_memory(pid, u64_ptr(vb), u64_ptr(lb), n, bb.ptr,
                                       <uint64_t *>fv.data.as_voidptr,
                                       <uint64_t *>fl.data.as_voidptr, _READ_FAIL_CAP,
                                       &bytes_failed)
    if nfail < 0:
        err = -nfail
        if err == _errno.ESRCH:
            raise ProcessLookupError(err, f"process {pid} no longer exists")
        if err == _errno.EPERM:
            raise PermissionError(err, f"not allowed to read the memory of process {pid} "
                                       f"(needs CAP_SYS_PTRACE or the same user)")
        raise OSError(err, f"process_vm_readv on process {pid}: {_os.strerror(err)}")
    k = min(nfail, READ_FAIL_CAP)
    return [(fv[j], fl[j]) for j in range(k)], bytes_failed


def pagemap_runs(int fd, starts, ends, skip_file=None, uint64_t zero_pfn=0):
    """Runs (vaddr, length in bytes) of present or swapped pages inside the given VMAs.

    fd is an open /proc/PID/pagemap; starts/ends are the VMAs' bounds (uint64 arrays).
    skip_file (one byte per VMA): in those VMAs (private file mappings) skip the pages
    still backed by the file; zero_pfn: skip pages mapped to the shared zero page — the
    two pages CRIU does not dump. Returns (run_vaddrs, run_lens) as array('Q').
    """
    cdef _Buffer sb = u64_buffer(starts, "starts")
    cdef _Buffer eb = u64_buffer(ends, "ends")
    cdef size_t n = u64_len(sb), i
    if u64_len(eb) != n:
        raise ValueError(f"starts has {n} entries but ends has {u64_len(eb)}")
    for i in range(n):
        if (u64_ptr(sb)[i] | u64_ptr(eb)[i]) % DX_PAGE_SIZE or u64_ptr(sb)[i] > u64_ptr(eb)[i]:
            raise ValueError(f"VMA {i} [{u64_ptr(sb)[i]:#x}, {u64_ptr(eb)[i]:#x}) is not "
                             f"a page-aligned range")
    cdef uint64_t *rv = NULL
    cdef uint64_t *rl = NULL
    cdef ptrdiff_t k
    cdef _Buffer fb
    cdef const uint8_t *fp = NULL
    if skip_file is not None:
        fb = bytes_buffer(skip_file, "skip_file")
        if fb.nbytes != n:
            raise ValueError(f"skip_file has {fb.nbytes} entries for {n} VMAs")
        fp = <const uint8_t *>fb.ptr
    with nogil:
        k = dx_pagemap_runs(fd, u64_ptr(sb), u64_ptr(eb), n, fp, zero_pfn, &rv, &rl)
    try:
        if k < 0:
            raise OSError(-k, f"reading pagemap: {_os.strerror(-k)}")
        out_v = new_u64_array(k)
        out_l = new_u64_array(k)
        if k:
            memcpy((<array.array>out_v).data.as_voidptr, rv, k * 8)
            memcpy((<array.array>out_l).data.as_voidptr, rl, k * 8)
        return out_v, out_l
    finally:
        free(rv)
        free(rl)


def run_page_vaddrs(run_vaddrs, run_lens):
    """The vaddr of every page of page-aligned runs, as array('Q')."""
    cdef _Buffer vb = u64_buffer(run_vaddrs, "run_vaddrs")
    cdef _Buffer lb = u64_buffer(run_lens, "run_lens")
    cdef size_t n = u64_len(vb), i, total = 0, k = 0
    cdef uint64_t off
    if u64_len(lb) != n:
        raise ValueError(f"run_vaddrs has {n} entries but run_lens has {u64_len(lb)}")
    for i in range(n):
        if (u64_ptr(vb)[i] | u64_ptr(lb)[i]) % DX_PAGE_SIZE:
            raise ValueError(f"run {i} ({u64_ptr(vb)[i]:#x}, {u64_ptr(lb)[i]}) is not page aligned")
        total += u64_ptr(lb)[i] // DX_PAGE_SIZE
    cdef array.array out = new_u64_array(total)
    cdef uint64_t *op = <uint64_t *>out.data.as_voidptr
    with nogil:
        for i in range(n):
            off = 0
            while off < u64_ptr(lb)[i]:
                op[k] = u64_ptr(vb)[i] + off
                k += 1
                off += DX_PAGE_SIZE
    return out


def read_pages(int pid, vaddrs, skip, buf, int memfd=-1):
    """Read the pages of vaddrs (ascending, one per page) whose skip byte is 0 (all when
    skip is None) from process pid into their slots of buf (page i at i * 4096): batched
    process_vm_readv, and what it cannot read (PROT_NONE pages) with one pread of memfd,
    an open /proc/PID/mem (-1: none), per failed run. Returns (pages read, pages failed:
    unreadable even so, zero-filled, pages read through memfd)."""
    cdef _Buffer vb = u64_buffer(vaddrs, "vaddrs")
    cdef _Buffer bb = bytes_buffer(buf, "buf", True)
    cdef size_t n = u64_len(vb)
    if bb.nbytes != n * DX_PAGE_SIZE:
        raise ValueError(f"buf holds {bb.nbytes} bytes for {n} pages")
    cdef _Buffer sb
    cdef const uint8_t *sp = NULL
    if skip is not None:
        sb = bytes_buffer(skip, "skip", False)
        if sb.nbytes != n:
            raise ValueError(f"skip has {sb.nbytes} bytes for {n} pages")
        sp = sb.ptr
    check_vaddrs(vb, "vaddrs")
    cdef uint64_t failed = 0, forced = 0
    cdef ptrdiff_t got
    with nogil:
        got = dx_read_pages(pid, memfd, u64_ptr(vb), n, sp, bb.ptr, &failed, &forced)
    if got < 0:
        err = -got
        if err == _errno.ESRCH:
            raise ProcessLookupError(err, f"process {pid} no longer exists")
        if err == _errno.EPERM:
            raise PermissionError(err, f"not allowed to read the memory of process {pid} "
                                       f"(needs CAP_SYS_PTRACE or the same user)")
        raise OSError(err, f"process_vm_readv on process {pid}: {_os.strerror(err)}")
    return got, failed, forced
