"""The live rounds read the pages CRIU will dump: not pages only read (the shared zero
page), not private file pages never written; C and reference kernels agree."""
import os
import subprocess
import sys

import pytest

from deltaxfer import _core
from deltaxfer.core import procmem, reference

CHILD = r"""
import ctypes, mmap, sys, time
m = mmap.mmap(-1, 64 * 4096, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
addr = ctypes.addressof(ctypes.c_char.from_buffer(m))
for i in range(32):
    _ = m[i * 4096]          # read faults: the zero page
for i in range(32, 64):
    m[i * 4096] = 1          # written: the process's own pages
print(hex(addr), flush=True)
sys.stdin.read()
"""


@pytest.fixture
def child():
    p = subprocess.Popen([sys.executable, "-c", CHILD], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True)
    addr = int(p.stdout.readline(), 16)
    yield p.pid, addr
    p.kill()
    p.wait()


def test_zero_page_reads_are_not_dumped(child):
    if os.geteuid() != 0:
        pytest.skip("page frame numbers are visible to root only")
    pid, addr = child
    assert procmem.zero_page_pfn() != 0
    pages = set(_core.run_page_vaddrs(*procmem.criu_runs(pid)))
    read_only = {addr + i * 4096 for i in range(32)}
    written = {addr + i * 4096 for i in range(32, 64)}
    assert written <= pages and not (read_only & pages)
    # the plain present-page scan sees both (it is what the filter removes)
    plain = set(_core.run_page_vaddrs(*procmem.present_runs(pid)))
    assert read_only | written <= plain


def test_file_pages_not_written_are_skipped_and_kernels_agree(child):
    pid, _ = child
    maps = [v for v in procmem.read_maps(pid) if v.perms[3] == "p" and v.perms[0] == "r"]
    starts = [v.start for v in maps]
    ends = [v.end for v in maps]
    skip = bytes(1 if v.inode else 0 for v in maps)
    from array import array
    fd = os.open(f"/proc/{pid}/pagemap", os.O_RDONLY)
    try:
        zp = procmem.zero_page_pfn()
        c = _core.pagemap_runs(fd, array("Q", starts), array("Q", ends), skip, zp)
        ref = reference.pagemap_runs(fd, array("Q", starts), array("Q", ends), skip, zp)
        unfiltered = _core.pagemap_runs(fd, array("Q", starts), array("Q", ends))
    finally:
        os.close(fd)
    assert c == ref
    # the interpreter's text is mapped from its file and present, but never written
    assert sum(unfiltered[1]) > sum(c[1])
    with pytest.raises(ValueError, match="skip_file has"):
        _core.pagemap_runs(0, array("Q", starts), array("Q", ends), b"\0")
