"""Reading a live child process's memory: process_vm_readv runs, short reads when a page
is unmapped meanwhile, pagemap runs of present pages; C core and Python reference."""
import os
import subprocess
import sys
from array import array

import pytest

from core_cases import IMPLS, PAGE
from deltaxfer.core import procmem

NPAGES = 2100

CHILD = r"""
import ctypes, mmap, sys
n = int(sys.argv[1])
# private: Python's default anonymous mmap is MAP_SHARED, which CRIU dumps as shmem
m = mmap.mmap(-1, n * 4096, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
for i in range(n):
    m[i * 4096:(i + 1) * 4096] = (i.to_bytes(4, "little") + b"page") * 512
addr = ctypes.addressof(ctypes.c_char.from_buffer(m))
libc = ctypes.CDLL(None)
libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
print(addr, flush=True)
for line in sys.stdin:
    cmd, arg = line.split()
    if cmd == "unmap":
        libc.munmap(addr + int(arg) * 4096, 4096)
    print("ok", flush=True)
"""


def expected_page(i: int) -> bytes:
    return (i.to_bytes(4, "little") + b"page") * 512


class Child:
    def __init__(self):
        self.proc = subprocess.Popen([sys.executable, "-c", CHILD, str(NPAGES)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.addr = int(self.proc.stdout.readline())
        self.pid = self.proc.pid

    def command(self, cmd, arg):
        self.proc.stdin.write(f"{cmd} {arg}\n")
        self.proc.stdin.flush()
        assert self.proc.stdout.readline().strip() == "ok"

    def close(self):
        self.proc.kill()
        self.proc.wait()


@pytest.fixture
def child():
    c = Child()
    yield c
    c.close()


@pytest.fixture(params=IMPLS)
def impl(request):
    return request.param


def read(impl, pid, runs):
    buf = bytearray(sum(n for _, n in runs))
    failed, nfailed = impl.read_process_memory(pid, array("Q", [v for v, _ in runs]),
                                               array("Q", [n for _, n in runs]), buf)
    return buf, failed, nfailed


def test_reads_runs_including_unaligned_ones(impl, child):
    a = child.addr
    pattern = b"".join(expected_page(i) for i in range(20))
    runs = [(a, 20 * PAGE), (a + 100, 5000), (a + 10 * PAGE + 4090, 3), (a + 7, 1)]
    buf, failed, nfailed = read(impl, child.pid, runs)
    assert (failed, nfailed) == ([], 0)
    expect = pattern + pattern[100:5100] + pattern[10 * PAGE + 4090:10 * PAGE + 4093] + pattern[7:8]
    assert buf == expect


def test_more_runs_than_iov_max(impl, child):
    runs = [(child.addr + i * PAGE, PAGE) for i in range(0, NPAGES, 2)]   # 1050 runs
    runs += [(child.addr + i * PAGE + 8, 16) for i in range(1, NPAGES, 2)]  # + 1050 more
    assert len(runs) > 2 * 1024 - 100
    buf, failed, _ = read(impl, child.pid, runs)
    assert failed == []
    off = 0
    for v, n in runs:
        i, o = divmod(v - child.addr, PAGE)
        assert buf[off:off + n] == expected_page(i)[o:o + n]
        off += n


def test_short_read_reports_the_unmapped_page(impl, child):
    child.command("unmap", 5)
    child.command("unmap", 6)
    child.command("unmap", 30)
    runs = [(child.addr, 20 * PAGE), (child.addr + 25 * PAGE, 10 * PAGE)]
    buf, failed, nfailed = read(impl, child.pid, runs)
    assert failed == [(child.addr + 5 * PAGE, 2 * PAGE), (child.addr + 30 * PAGE, PAGE)]
    assert nfailed == 3 * PAGE
    pages = [bytes(buf[i * PAGE:(i + 1) * PAGE]) for i in range(30)]
    indices = list(range(20)) + list(range(25, 35))
    for k, i in enumerate(indices):
        assert pages[k] == (bytes(PAGE) if i in (5, 6, 30) else expected_page(i)), i


def test_unreadable_first_piece_and_partial_page(impl, child):
    child.command("unmap", 3)
    runs = [(child.addr + 3 * PAGE + 100, 200), (child.addr + 2 * PAGE + 4000, 200)]
    buf, failed, nfailed = read(impl, child.pid, runs)
    assert failed == [(child.addr + 3 * PAGE + 100, 200), (child.addr + 3 * PAGE, 104)]
    assert nfailed == 304
    assert buf[200:296] == expected_page(2)[4000:]


def test_process_gone(impl):
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    with pytest.raises(ProcessLookupError, match=f"process {p.pid}"):
        read(impl, p.pid, [(0x10000, PAGE)])


def test_pagemap_runs_cover_the_written_mapping(impl, child):
    child.command("unmap", 40)
    vmas = [v for v in procmem.read_maps(child.pid) if v.private_writable_anonymous]
    run_v, run_l = procmem.present_runs(child.pid, vmas, impl=impl)
    assert len(run_v) == len(run_l) > 0
    covered = set()
    for v, n in zip(run_v, run_l):
        assert v % PAGE == 0 and n % PAGE == 0 and n > 0
        covered.update(range(v, v + n, PAGE))
    mapping = {child.addr + i * PAGE for i in range(NPAGES)}
    assert mapping - covered == {child.addr + 40 * PAGE}
    assert procmem.present_runs(child.pid, vmas, impl=procmem.native) == \
        procmem.present_runs(child.pid, vmas, impl=__import__("deltaxfer.core.reference",
                                                              fromlist=["x"]))


def test_snapshot_reads_what_criu_would_dump(impl, child):
    snap = procmem.snapshot(child.pid, impl=impl)
    assert snap.failed == [] and len(snap.pages) == len(snap.vaddrs) * PAGE
    index = {v: k for k, v in enumerate(snap.vaddrs)}
    for i in (0, 1, 777, NPAGES - 1):
        k = index[child.addr + i * PAGE]
        assert snap.pages[k * PAGE:(k + 1) * PAGE] == expected_page(i)
    assert list(snap.vaddrs) == sorted(set(snap.vaddrs))


def test_parse_maps():
    text = ("55d0c0000000-55d0c0021000 rw-p 00000000 00:00 0                          [heap]\n"
            "7f0000000000-7f0000100000 rw-p 00000000 00:00 0 \n"
            "7f0000100000-7f0000200000 rw-s 00000000 00:01 42                         /dev/zero (deleted)\n"
            "7f0000200000-7f0000300000 r--p 00000000 08:01 1234                       /usr/lib/libc.so.6\n"
            "7f0000300000-7f0000301000 rw-p 00100000 08:01 1234                       /usr/lib/libc.so.6\n"
            "7ffc00000000-7ffc00021000 rw-p 00000000 00:00 0                          [stack]\n"
            "7ffc00100000-7ffc00102000 r--p 00000000 00:00 0                          [vvar]\n"
            "ffffffffff600000-ffffffffff601000 --xp 00000000 00:00 0                  [vsyscall]\n")
    vmas = procmem.parse_maps(text)
    assert len(vmas) == 8
    assert vmas[2].path == "/dev/zero (deleted)" and vmas[2].inode == 42
    picked = [v.path for v in vmas if v.private_writable_anonymous]
    assert picked == ["[heap]", "", "[stack]"]
    assert vmas[0].start == 0x55D0C0000000 and vmas[0].end == 0x55D0C0021000


def test_clean_mask_is_tracked_and_not_written_and_held():
    from deltaxfer import _core
    P = 4096
    vaddrs = array("Q", [P * i for i in (1, 2, 3, 4, 5, 8, 9, 10, 20)])
    tracked = (array("Q", [P * 1, P * 8]), array("Q", [P * 6, P * 11]))   # 1-5, 8-10
    written = (array("Q", [P * 3, P * 9]), array("Q", [P * 4, P * 10]))   # 3, 9
    held = array("Q", [P * i for i in (1, 2, 3, 5, 8, 9, 10, 20)])       # not 4
    m = _core.clean_mask(vaddrs, *tracked, *written, held)
    #          1  2  3  4  5  8  9  10 20
    assert list(m) == [1, 1, 0, 0, 1, 1, 0, 1, 0]


def test_read_pages_masked_reads_only_unmasked_pages_into_their_slots():
    import ctypes
    import mmap
    from deltaxfer import _core
    P = 4096
    m = mmap.mmap(-1, 6 * P)
    base = ctypes.addressof(ctypes.c_char.from_buffer(m))
    for i in range(6):
        m[i * P:(i + 1) * P] = bytes([i + 1]) * P
    vaddrs = array("Q", [base + i * P for i in (0, 1, 2, 4, 5)])
    clean = bytes([0, 1, 0, 0, 1])
    buf = bytearray(b"\xee" * (5 * P))
    got, failed = _core.read_pages_masked(os.getpid(), vaddrs, clean, buf)
    assert (got, failed) == (3, 0)
    assert [buf[i * P] for i in range(5)] == [1, 0xee, 3, 5, 0xee]
    assert buf[2 * P:3 * P] == bytes([3]) * P
    # a page unmapped meanwhile: zero-filled and counted, the rest still read
    vaddrs2 = array("Q", [base, base + 100 * 2**30])
    buf2 = bytearray(b"\xee" * (2 * P))
    got, failed = _core.read_pages_masked(os.getpid(), vaddrs2, None, buf2)
    assert (got, failed) == (2, 1) and buf2[0] == 1 and buf2[P:] == bytes(P)


def test_clean_mask_c_equals_reference():
    import random
    from deltaxfer import _core
    from deltaxfer.core.reference import track as ref
    P = 4096
    rng = random.Random(12)
    for _ in range(200):
        vaddrs = array("Q", sorted(P * x for x in rng.sample(range(64), rng.randint(0, 40))))

        def ranges():
            cuts = sorted(rng.sample(range(70), 2 * rng.randint(0, 5)))
            return (array("Q", [P * c for c in cuts[0::2]]),
                    array("Q", [P * c for c in cuts[1::2]]))
        held = array("Q", sorted(P * x for x in rng.sample(range(64), rng.randint(0, 50))))
        args = (vaddrs, *ranges(), *ranges(), held)
        assert _core.clean_mask(*args) == ref.clean_mask(*args), args


def _own_pages():
    """Six pages of our memory, page i filled with i + 1, page 3 PROT_NONE."""
    import ctypes
    import mmap
    P = 4096
    m = mmap.mmap(-1, 6 * P)
    for i in range(6):
        m[i * P:(i + 1) * P] = bytes([i + 1]) * P
    base = ctypes.addressof(ctypes.c_char.from_buffer(m))
    libc = ctypes.CDLL(None)
    libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    assert libc.mprotect(base + 3 * P, P, 0) == 0
    return m, base, libc


def test_read_pages_masked_and_read_pages_c_equal_reference():
    """C == reference, bytes and counts: clean pages left alone, an unmapped page
    zero-filled and counted, a PROT_NONE page failed by process_vm_readv alone and read
    through /proc/PID/mem by read_pages."""
    from deltaxfer import _core
    from deltaxfer.core.reference import track as ref
    P = 4096
    m, base, libc = _own_pages()
    try:
        vaddrs = array("Q", [base + i * P for i in range(6)] + [base + 100 * 2**30])
        clean = bytes([0, 1, 0, 0, 0, 0, 0])
        out = {}
        for name, impl in (("c", _core), ("ref", ref)):
            buf = bytearray(b"\xee" * (7 * P))
            out[name, "masked"] = impl.read_pages_masked(os.getpid(), vaddrs, clean, buf), buf
            fd = os.open("/proc/self/mem", os.O_RDONLY)
            try:
                buf2 = bytearray(b"\xee" * (7 * P))
                got, failed, forced = impl.read_pages(os.getpid(), vaddrs, clean, buf2, fd)
                out[name, "pages"] = (got, failed), buf2
                assert forced >= 1
                buf3 = bytearray(7 * P)
                got, failed, forced = impl.read_pages(os.getpid(), vaddrs, None, buf3, -1)
                out[name, "nofd"] = (got, failed, forced), buf3
            finally:
                os.close(fd)
        assert out["c", "masked"] == out["ref", "masked"]
        assert out["c", "masked"][0] == (6, 2)       # PROT_NONE and unmapped failed
        assert out["c", "pages"] == out["ref", "pages"]
        assert out["c", "pages"][0] == (6, 1)        # only the unmapped page failed
        buf2 = out["c", "pages"][1]
        assert [buf2[i * P] for i in range(7)] == [1, 0xee, 3, 4, 5, 6, 0]
        assert out["c", "nofd"] == out["ref", "nofd"]
        assert out["c", "nofd"][0] == (7, 2, 0)
    finally:
        libc.mprotect(base + 3 * P, P, 3)
        m.close()
