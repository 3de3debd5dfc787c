"""Reference of reading another process's memory: /proc/PID/mem instead of
process_vm_readv, struct-unpacked pagemap entries instead of the C loop."""
import errno
import os
import struct
from array import array

from ._buffers import PAGE_SIZE, byte_view, u64_list

PM_PRESENT = 1 << 63
PM_FILE = 1 << 61
PM_PFN_MASK = (1 << 55) - 1
PM_SWAPPED = 1 << 62


def read_process_memory(pid, run_vaddrs, run_lens, buf):
    va, ln = u64_list(run_vaddrs, "run_vaddrs"), u64_list(run_lens, "run_lens")
    out = byte_view(buf, "buf", writable=True)
    if len(va) != len(ln):
        raise ValueError(f"run_vaddrs has {len(va)} entries but run_lens has {len(ln)}")
    if sum(ln) != len(out):
        raise ValueError(f"buf holds {len(out)} bytes but the runs add up to {sum(ln)}")
    try:
        fd = os.open(f"/proc/{pid}/mem", os.O_RDONLY)
    except FileNotFoundError:
        raise ProcessLookupError(errno.ESRCH, f"process {pid} no longer exists") from None
    failed, bytes_failed, dst = [], 0, 0
    try:
        for vaddr, length in zip(va, ln):
            off = 0
            while off < length:
                addr = vaddr + off
                step = min(PAGE_SIZE - addr % PAGE_SIZE, length - off)
                try:
                    data = os.pread(fd, step, addr)
                except OSError:
                    data = b""
                if len(data) != step:
                    out[dst:dst + step] = bytes(step)
                    if failed and sum(failed[-1]) == addr:
                        failed[-1] = (failed[-1][0], failed[-1][1] + step)
                    else:
                        failed.append((addr, step))
                    bytes_failed += step
                else:
                    out[dst:dst + step] = data
                dst += step
                off += step
    finally:
        os.close(fd)
    return failed, bytes_failed


def pagemap_runs(fd, starts, ends, skip_file=None, zero_pfn=0):
    runs_v, runs_l = array("Q"), array("Q")
    starts, ends = u64_list(starts, "starts"), u64_list(ends, "ends")
    skip = bytes(skip_file) if skip_file is not None else bytes(len(starts))
    if len(skip) != len(starts):
        raise ValueError(f"skip_file has {len(skip)} entries for {len(starts)} VMAs")
    for start, end, skip_file_pages in zip(starts, ends, skip):
        if (start | end) % PAGE_SIZE or start > end:
            raise ValueError(f"VMA [{start:#x}, {end:#x}) is not a page-aligned range")
        npages = (end - start) // PAGE_SIZE
        data = os.pread(fd, npages * 8, start // PAGE_SIZE * 8)
        for i, (entry,) in enumerate(struct.iter_unpack("<Q", data)):
            if not entry & (PM_PRESENT | PM_SWAPPED):
                continue
            if skip_file_pages and entry & PM_FILE:
                continue
            if zero_pfn and entry & PM_PRESENT and entry & PM_PFN_MASK == zero_pfn:
                continue
            page = start + i * PAGE_SIZE
            if runs_v and runs_v[-1] + runs_l[-1] == page:
                runs_l[-1] += PAGE_SIZE
            else:
                runs_v.append(page)
                runs_l.append(PAGE_SIZE)
    return runs_v, runs_l


def run_page_vaddrs(run_vaddrs, run_lens):
    out = array("Q")
    for i, (v, n) in enumerate(zip(u64_list(run_vaddrs, "run_vaddrs"), u64_list(run_lens, "run_lens"))):
        if (v | n) % PAGE_SIZE:
            raise ValueError(f"run {i} ({v:#x}, {n}) is not page aligned")
        out.extend(range(v, v + n, PAGE_SIZE))
    return out
