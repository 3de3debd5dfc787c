"""References of the compiled helpers of written-page tracking and of the streaming
source's reader: which pages are clean, and reading the others out of a process. One
page at a time, with ctypes' process_vm_readv and os.pread of /proc/PID/mem, where the
core batches runs of pages into few system calls."""
import ctypes
import ctypes.util
import errno
import os

from ._buffers import PAGE_SIZE, byte_view, u64_list

_libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)


class _Iovec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


_libc.process_vm_readv.restype = ctypes.c_ssize_t
_libc.process_vm_readv.argtypes = [ctypes.c_int, ctypes.POINTER(_Iovec), ctypes.c_ulong,
                                   ctypes.POINTER(_Iovec), ctypes.c_ulong, ctypes.c_ulong]


def clean_mask(vaddrs, tracked_starts, tracked_ends, written_starts, written_ends, held):
    """1 for a page inside a tracked range, inside no written range, and held."""
    v = u64_list(vaddrs, "vaddrs")
    ts, te = u64_list(tracked_starts, "tracked_starts"), u64_list(tracked_ends, "tracked_ends")
    ws, we = u64_list(written_starts, "written_starts"), u64_list(written_ends, "written_ends")
    if len(ts) != len(te) or len(ws) != len(we):
        raise ValueError("range starts and ends differ in length")
    held_set = set(u64_list(held, "held"))

    def inside(x, starts, ends):
        return any(a <= x < b for a, b in zip(starts, ends))

    return bytearray(int(inside(x, ts, te) and not inside(x, ws, we) and x in held_set)
                     for x in v)


def _read_page(pid: int, vaddr: int, dst: memoryview) -> bool:
    """process_vm_readv of one page into dst; False when the page cannot be read."""
    buf = (ctypes.c_char * PAGE_SIZE).from_buffer(dst)
    loc = _Iovec(ctypes.addressof(buf), PAGE_SIZE)
    rem = _Iovec(vaddr, PAGE_SIZE)
    n = _libc.process_vm_readv(pid, ctypes.byref(loc), 1, ctypes.byref(rem), 1, 0)
    del buf
    if n < 0:
        err = ctypes.get_errno()
        if err == errno.ESRCH:
            raise ProcessLookupError(err, f"process {pid} no longer exists")
        if err == errno.EPERM:
            raise PermissionError(err, f"not allowed to read the memory of process {pid}")
        if err != errno.EFAULT:
            raise OSError(err, os.strerror(err))
    return n == PAGE_SIZE


def _check(vaddrs, skip, buf):
    v = u64_list(vaddrs, "vaddrs")
    out = byte_view(buf, "buf", writable=True)
    if len(out) != len(v) * PAGE_SIZE:
        raise ValueError(f"buf holds {len(out)} bytes for {len(v)} pages")
    if skip is not None and len(byte_view(skip, "clean")) != len(v):
        raise ValueError(f"clean has {len(byte_view(skip, 'clean'))} bytes for {len(v)} pages")
    return v, out, (None if skip is None else bytes(byte_view(skip, "clean")))


def read_pages_masked(pid, vaddrs, clean, buf):
    """Each page of vaddrs whose clean byte is 0 into its slot of buf (page i at i * 4096);
    a page that cannot be read is zero-filled. Returns (pages read, pages failed)."""
    v, out, skip = _check(vaddrs, clean, buf)
    got = failed = 0
    for i, vaddr in enumerate(v):
        if skip is not None and skip[i]:
            continue
        got += 1
        dst = out[i * PAGE_SIZE:(i + 1) * PAGE_SIZE]
        if not _read_page(pid, vaddr, dst):
            dst[:] = bytes(PAGE_SIZE)
            failed += 1
    return got, failed


def read_pages(pid, vaddrs, skip, buf, memfd=-1):
    """As read_pages_masked, and a page process_vm_readv cannot read (PROT_NONE) is read
    with os.pread of memfd (an open /proc/PID/mem) when given. Returns (pages read, pages
    failed, pages read through memfd). The core reads the rest of a failed batch through
    memfd too, so its third count can be larger; the first two and the bytes agree."""
    v, out, sk = _check(vaddrs, skip, buf)
    got = failed = forced = 0
    for i, vaddr in enumerate(v):
        if sk is not None and sk[i]:
            continue
        got += 1
        dst = out[i * PAGE_SIZE:(i + 1) * PAGE_SIZE]
        if _read_page(pid, vaddr, dst):
            continue
        data = b""
        if memfd >= 0:
            try:
                data = os.pread(memfd, PAGE_SIZE, vaddr)
            except OSError:
                data = b""
        if len(data) == PAGE_SIZE:
            dst[:] = data
            forced += 1
        else:
            dst[:] = bytes(PAGE_SIZE)
            failed += 1
    return got, failed, forced
