"""pyheap -- a self-checking CPython heap workload for CRIU migration tests.

    python3 pyheap.py --objects N --result PATH [--mutate-per-s K] [--seed S]

Builds N small objects (dicts, tuples, strings, lists of ints, bytes, a few
array('d')), each a pure function of (seed, index, generation).  A mutator in
the main loop replaces K objects per second; mutation number k replaces the
object at slot(seed, k) with its next generation.  So the whole expected heap
is recomputable from (seed, mutation count) alone, by replaying the slots.

Result protocol (PATH replaced atomically, PATH.tmp + rename), like memwork:
    READY objects=N seed=S pid=P                once built
    SIGUSR1 -> OK objects=N checked=N mutations=M digest=... pid=P
               BAD index=<i> ... first=<i,...> ...
    SIGUSR2 -> REGION obj=<i> addr=0x... len=<n> ...: where the payload of the
               first bytes object lies in memory (CPython: id() is the address),
               so a test can corrupt the heap from outside via /proc/PID/mem.
    SIGTERM -> exit

Only the standard library is used; stdin/stdout/stderr are not.
"""

import argparse
import hashlib
import os
import signal
import struct
import sys
import time
from array import array

M64 = (1 << 64) - 1


def mix(x):
    """splitmix64 finaliser (the same mixing as the C workloads)."""
    x = (x + 0x9E3779B97F4A7C15) & M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & M64
    return x ^ (x >> 31)


WORDS = ("alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel",
         "india", "juliet", "kilo", "lima", "mike", "november", "oscar", "papa")


def make(seed, i, gen):
    """Object `i` at generation `gen`: deterministic, small, varied in type.
    All its randomness comes from one SHAKE-128 stream keyed by (seed, i, gen):
    a hash call per object, not a Python-level PRNG step per value."""
    stream = hashlib.shake_128(b"%d:%d:%d" % (seed, i, gen))
    head = stream.digest(64)
    w = struct.unpack("<8Q", head)
    k = w[0] % 100
    if k < 25:
        return {
            "id": i,
            "gen": gen,
            "name": "obj-%d-%d-%x" % (i, gen, w[1] & 0xFFFF),
            "tags": [WORDS[b % 16] for b in head[16:17 + w[2] % 4]],
            "score": (w[3] >> 11) / float(1 << 53),
            "nested": {"a": w[4] % 1000, "b": (w[5] % 7, WORDS[w[6] % 16])},
        }
    if k < 45:
        return (i, gen, WORDS[w[1] % 16] * (1 + w[2] % 3), (w[3] >> 11) / 3.0,
                (w[4] % 97, -(w[5] % 1000)))
    if k < 65:
        n = 3 + w[1] % 20
        return " ".join(WORDS[b % 16] for b in head[24:24 + n]) + " #%d.%d" % (i, gen)
    if k < 85:
        m = 5 + w[1] % 36
        vals = struct.unpack_from("<%dQ" % m, stream.digest(64 + 8 * m), 64)
        # Every fifth int beyond 64 bits: CPython's multi-digit long objects.
        return [v << 70 if j % 5 == 0 else v for j, v in enumerate(vals)]
    if k < 97:
        n = 16 + w[1] % 497
        return stream.digest(64 + n)[64:]
    m = 16 + w[1] % 241
    vals = struct.unpack_from("<%dQ" % m, stream.digest(64 + 8 * m), 64)
    return array("d", [(v >> 11) / float(1 << 20) for v in vals])


def slot(seed, k, n):
    """Which object mutation number k replaces."""
    return mix(seed ^ mix(k + 0x6D7574)) % n


def expected_gens(seed, n, mutations):
    gens = [0] * n
    for k in range(mutations):
        gens[slot(seed, k, n)] += 1
    return gens


def canon(obj):
    """Canonical bytes of an object, for the digest: the raw payload for bytes
    and arrays (exact and cheap), repr for the rest (dict order is insertion
    order, float repr round-trips)."""
    t = type(obj)
    if t is bytes:
        return obj
    if t is array:
        return b"array:" + obj.tobytes()
    return repr(obj).encode()


class Heap:
    def __init__(self, seed, n):
        self.seed = seed
        self.n = n
        self.objs = [make(seed, i, 0) for i in range(n)]
        self.gens = [0] * n
        self.mutations = 0

    def mutate(self):
        i = slot(self.seed, self.mutations, self.n)
        self.gens[i] += 1
        self.objs[i] = make(self.seed, i, self.gens[i])
        self.mutations += 1

    def verify(self):
        """Rebuild the expected heap from (seed, mutations) only -- not from
        self.gens, which lives in the same (possibly damaged) heap -- and
        compare object by object.  The digest (of the canonical bytes of the
        live heap) lets a test compare two processes' heaps."""
        gens = expected_gens(self.seed, self.n, self.mutations)
        digest = hashlib.sha256()
        bad = []
        objs = self.objs
        if len(objs) != self.n:
            return "BAD reason=length length=%d objects=%d mutations=%d pid=%d" % (
                len(objs), self.n, self.mutations, os.getpid())
        for i in range(self.n):
            have, want = objs[i], make(self.seed, i, gens[i])
            # == compares every element (floats exactly); the type check
            # catches e.g. a list that came back as a tuple.
            if type(have) is not type(want) or have != want:
                bad.append(i)
            digest.update(canon(have))
        if bad:
            i = bad[0]
            return ("BAD index=%d type=%s gen=%d bad_objects=%d first=%s objects=%d "
                    "checked=%d mutations=%d pid=%d") % (
                i, type(objs[i]).__name__, gens[i], len(bad),
                ",".join(map(str, bad[:8])), self.n, self.n, self.mutations, os.getpid())
        return "OK objects=%d checked=%d mutations=%d digest=%s pid=%d" % (
            self.n, self.n, self.mutations, digest.hexdigest()[:16], os.getpid())

    def region(self):
        for i, o in enumerate(self.objs):
            if type(o) is bytes and len(o) >= 64:
                # CPython: id() is the object's address; the payload (ob_sval)
                # starts at the end of the fixed part, bytes.__basicsize__ - 1.
                addr = id(o) + bytes.__basicsize__ - 1
                return "REGION obj=%d addr=0x%x len=%d objects=%d seed=%d pid=%d" % (
                    i, addr, len(o), self.n, self.seed, os.getpid())
        return "REGION obj=-1 objects=%d seed=%d pid=%d" % (self.n, self.seed, os.getpid())


def write_result(path, line):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(line + "\n")
    os.replace(tmp, path)  # readers see the whole line or nothing


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--objects", type=int, required=True)
    ap.add_argument("--result", required=True)
    ap.add_argument("--mutate-per-s", type=float, default=0.0)
    ap.add_argument("--seed", type=int, default=1)
    a = ap.parse_args(argv)
    if a.objects <= 0 or a.mutate_per_s < 0:
        ap.error("--objects must be > 0 and --mutate-per-s >= 0")

    flags = {"verify": False, "region": False, "exit": False}

    def on_signal(sig, frame):
        flags[{signal.SIGUSR1: "verify", signal.SIGUSR2: "region"}.get(sig, "exit")] = True

    for s in (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM):
        signal.signal(s, on_signal)

    heap = Heap(a.seed, a.objects)
    write_result(a.result, "READY objects=%d seed=%d pid=%d" % (a.objects, a.seed, os.getpid()))

    rate = a.mutate_per_s
    t0 = time.monotonic()
    done = 0  # mutations since t0
    while True:
        if flags["exit"]:
            return 0
        if flags["verify"]:
            flags["verify"] = False
            write_result(a.result, heap.verify())
        if flags["region"]:
            flags["region"] = False
            write_result(a.result, heap.region())
        if rate <= 0:
            time.sleep(0.01)  # idle: no busy loop
            continue
        now = time.monotonic()
        target = (now - t0) * rate
        if target - done > rate * 0.1:
            # After a freeze, do not burst to catch up: keep <= 100 ms backlog.
            t0 = now - (done / rate + 0.1)
            target = (now - t0) * rate
        batch = 0
        while done < target and batch < 10000:  # bounded, to serve signals
            heap.mutate()
            done += 1
            batch += 1
        time.sleep(0.005)


if __name__ == "__main__":
    sys.exit(main())
