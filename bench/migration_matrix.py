"""Which migrations the benchmark runs: groups of (workload, link, methods), picked by
``DX_MATRIX``.

* ``default`` (what ``make bench-migrate`` runs; 3 repetitions, 123 migrations, about
  40 min on a quiet 2-core machine by the per-migration times seen here, more on a busy
  one): memwork 1 GiB dirtying 10 MiB/s on all four links with deltaxfer and the three
  baselines, plus deltaxfer's ablations (``--no-xor``, ``--no-lz4``) on the two shaped
  links (the issue's main question, and the cells of its 1 and 10 Gbit/s goals); on the
  1 Gbit/s link, the size sweep (256 MiB with deltaxfer, page-server and tar-lz4; 4 GiB
  with deltaxfer and page-server) and the dirty-rate sweep (0 and 100 MiB/s, deltaxfer
  and page-server, the goal's baseline); the Python heap (300k objects, ~210 MB, 5000
  replaced/s) and redis (100k keys, ~150 MB) with every method on the 1 Gbit/s link.
* ``smoke``: tiny sizes, every method on every link, every workload; one repetition.
* ``ci``: what ``make test`` runs (``--benchmark-disable``): a 32 MiB memwork over the
  1 Gbit/s link, deltaxfer and page-server, nothing written.
* ``wirespeed``: issue 12's cells (1 GiB against page-server on loopback, 1 and 10
  Gbit/s; 4 GiB at 1 Gbit/s, with the destination's memory floor beside:
  ``memory-floor``, bench/memory_floor.py) and deltaxfer's freeze beside CRIU's lazy
  floor (stock, and with 4 MiB page pipes) at 256 MiB, 1 and 4 GiB on loopback;
  2 repetitions.
* ``lazyrestore``: deltaxfer's lazy-pages server against `criu lazy-pages`
  (``dx-criulazy``) at 1 and 4 GiB on loopback, page-server beside at 1 GiB; 2 repetitions.
* ``brownout``: scanwork at 1 GiB on loopback, as a plain read (``scan1G-m0``, ~0.12 s
  a pass) and with 12 mixing rounds per word (``scan1G-m12``, ~2.3 s a pass, as issue
  17's example), deltaxfer's lazy-pages server against `criu lazy-pages`: the pass
  spanning the move (its freeze subtracted) and the next, against the passes before;
  2 repetitions.
* ``full``: the cross product, memwork {256M, 1G, 4G} x {0, 10, 100} MiB/s x 4 links x
  6 methods, plus pyheap and redis on every link (hours here).
* otherwise a comma list of ``WORKLOAD@LINK`` (all methods) or
  ``WORKLOAD@LINK:METHOD+METHOD``, workloads named as in ``WORKLOADS`` or
  ``mem<SIZE>-d<RATE>`` (e.g. ``mem512M-d20@10gbit:deltaxfer+page-server``) or
  ``scan<SIZE>-m<ROUNDS>``.
"""
from __future__ import annotations

import re

from migration_lab import LINKS, WorkloadSpec, memwork, scanwork
from migration_methods import BASELINES, METHODS

ALL = METHODS
DISKLESS = ("deltaxfer", "page-server", "tar-lz4")
WORKLOADS = {
    "pyheap": WorkloadSpec("pyheap", "pyheap", objects=300_000, mutate=5000),
    "redis": WorkloadSpec("redis", "redis", keys=100_000),
    "pyheap-small": WorkloadSpec("pyheap-small", "pyheap", objects=20_000, mutate=2000),
    "redis-small": WorkloadSpec("redis-small", "redis", keys=5_000),
}
LINK_ORDER = ("lo", "veth", "1gbit", "10gbit")


def workload(name: str) -> WorkloadSpec:
    if name in WORKLOADS:
        return WORKLOADS[name]
    m = re.fullmatch(r"scan(\d+)([MG])-m(\d+)", name)
    if m:
        return scanwork(int(m.group(1)) * (1024 if m.group(2) == "G" else 1), int(m.group(3)))
    m = re.fullmatch(r"mem(w?)(\d+)([MG])-d(\d+(?:\.\d+)?)", name)
    if not m:
        raise ValueError(f"unknown workload {name!r}: {sorted(WORKLOADS)} or "
                         "mem[w]<N>[MG]-d<R> (w: every mutation rewrites a whole page) or "
                         "scan<N>[MG]-m<K> (reads all its memory, K mixing rounds per word)")
    mib = int(m.group(2)) * (1024 if m.group(3) == "G" else 1)
    return memwork(mib, float(m.group(4)), whole=bool(m.group(1)))


def _groups(spec: str) -> list[tuple[WorkloadSpec, str, tuple[str, ...]]]:
    out = []
    for item in filter(None, (s.strip() for s in spec.split(","))):
        cell, _, methods = item.partition(":")
        wname, _, link = cell.partition("@")
        if link not in LINKS:
            raise ValueError(f"{item}: unknown link {link!r}; links: {list(LINKS)}")
        ms = tuple(methods.split("+")) if methods else ALL
        bad = [m for m in ms if m not in METHODS]
        if bad:
            raise ValueError(f"{item}: unknown method(s) {bad}; methods: {list(METHODS)}")
        out.append((workload(wname), link, ms))
    return out


def _join(groups) -> str:
    return ",".join(f"{w}@{l}:{'+'.join(m)}" for w, l, m in groups)


NO_ABLATION = ("deltaxfer", *BASELINES)
DX_PS = ("deltaxfer", "page-server")
DEFAULT = _join(
    [("mem1G-d10", link, NO_ABLATION) for link in ("lo", "veth")]
    + [("mem1G-d10", link, ALL) for link in ("1gbit", "10gbit")]
    + [("mem256M-d10", "1gbit", DISKLESS), ("mem4G-d10", "1gbit", DX_PS),
       ("mem1G-d0", "1gbit", DX_PS), ("mem1G-d100", "1gbit", DX_PS),
       ("pyheap", "1gbit", ALL), ("redis", "1gbit", ALL)])
SMOKE = _join([("mem32M-d10", link, ALL) for link in LINK_ORDER]
              + [("pyheap-small", "1gbit", ALL), ("redis-small", "1gbit", ALL)])
CI = "mem32M-d10@1gbit:deltaxfer+page-server"
FULL = _join([(f"mem{s}-d{d}", link, ALL) for s in ("256M", "1G", "4G") for d in (0, 10, 100)
              for link in LINK_ORDER]
             + [(w, link, ALL) for w in ("pyheap", "redis") for link in LINK_ORDER])
# issue 12 (every round at wire speed) and issue 17's floor, in one run: the 1 GiB
# workload against CRIU's page-server on loopback and the shaped links, 4 GiB at 1 Gbit/s,
# and deltaxfer's freeze beside CRIU's own lazy floor at 256 MiB, 1 and 4 GiB
# (both floors: CRIU as the host runs it, and with its page pipes at 4 MiB as deltaxfer's
# freeze has them where root lacks CAP_SYS_RESOURCE: criu/pipes.py)
FLOORS = ("lazy-floor", "lazy-floor-4m")
WIRESPEED = _join(
    [("mem1G-d10", "lo", ("deltaxfer", "page-server", *FLOORS))]
    + [("mem1G-d10", link, DX_PS) for link in ("1gbit", "10gbit")]
    + [("mem4G-d10", "1gbit", (*DX_PS, "memory-floor"))]
    + [(f"mem{s}-d10", "lo", ("deltaxfer", *FLOORS)) for s in ("256M", "4G")])
# issue 17's fast writer: 1 GiB whose every mutation rewrites a whole page with fresh
# random bytes at 60 MiB/s, over 1 Gbit/s, with each convergence (auto = the policy's
# choice, throttle, post-copy, none); one at 200 MiB/s, faster than the rounds; and one
# changing single words at 200 MiB/s (its changes XOR-compress)
CONVERGE = _join([(wl, "1gbit", ("deltaxfer", "dx-throttle", "dx-postcopy", "dx-noconverge"))
                  for wl in ("memw1G-d60", "memw1G-d200", "mem1G-d200")])
# the lazy restore's page server: deltaxfer's own against `criu lazy-pages` (downtime,
# the first pass after the move, the destination's CPU), 1 and 4 GiB on loopback, with
# CRIU's page-server migration as the total-time baseline at 1 GiB
LAZYRESTORE = _join([("mem1G-d10", "lo", ("deltaxfer", "dx-criulazy", "page-server")),
                     ("mem4G-d10", "lo", ("deltaxfer", "dx-criulazy"))])
# issue 17's brownout: workloads that read all their memory over and over, a fast reader
# (a plain read: ~0.12 s per GiB here) and one spending ~2.2 s per GiB and pass (as the
# issue's), the pass spanning the move and the next one against the passes before it
BROWNOUT = _join([(w, "lo", ("deltaxfer", "dx-criulazy")) for w in ("scan1G-m0", "scan1G-m12")])
NAMED = {"default": DEFAULT, "smoke": SMOKE, "ci": CI, "full": FULL, "wirespeed": WIRESPEED,
         "converge": CONVERGE, "lazyrestore": LAZYRESTORE, "brownout": BROWNOUT}
REPS = {"default": 3, "smoke": 1, "ci": 1, "full": 3, "wirespeed": 2, "converge": 2,
        "lazyrestore": 2, "brownout": 2}


def select(name: str) -> tuple[list, int]:
    """(groups, default repetitions) of a matrix name or cell list."""
    return _groups(NAMED.get(name, name)), REPS.get(name, 3)
