"""A Python process with a realistic heap, for the real-memory benchmarks.

usage: heap_workload.py SIZE_MIB STATE_DIR
Builds ~SIZE_MIB of small objects (tuples, ints, strings, dicts) and float arrays,
touches STATE_DIR/ready, then on SIGUSR1 rewrites ~MUTATE of its objects in
contiguous blocks (as a program updating a slice of its records does) and touches
STATE_DIR/mutated.  The cyclic GC is off so that only the mutation writes memory.
"""
import gc
import os
import random
import signal
import sys
import time
from array import array

MUTATE = 0.10
BLOCK = 512


def main() -> None:
    size_mib, state = int(sys.argv[1]), sys.argv[2]
    gc.disable()
    rng = random.Random(42)
    n = size_mib * 1024 * 1024 * 6 // 10 // 200            # ~60 % small objects
    records = [(i, f"user-{i:09d}-{rng.getrandbits(40):010x}", i * 0.5) for i in range(n)]
    index = {r[1]: r for r in records[::4]}
    arrays = [array("d", (rng.random() for _ in range(256 * 1024 // 8)))
              for _ in range(size_mib * 4 // 10 * 4)]   # ~40 % in 256 KiB arrays
    open(os.path.join(state, "ready"), "w").close()
    mutated = False

    def on_signal(signo, frame):
        nonlocal mutated
        mutated = True

    signal.signal(signal.SIGUSR1, on_signal)
    while not mutated:
        time.sleep(0.05)
    blocks = rng.sample(range(n // BLOCK), int(n // BLOCK * MUTATE))
    for b in blocks:
        for i in range(b * BLOCK, (b + 1) * BLOCK):
            records[i] = (i, f"user-{i:09d}-{rng.getrandbits(40):010x}", i * 0.25)
    for a in rng.sample(arrays, int(len(arrays) * MUTATE)):
        for k in range(0, len(a), 7):
            a[k] += 1.0
    open(os.path.join(state, "mutated"), "w").close()
    while True:
        time.sleep(1)
    print(len(index))


if __name__ == "__main__":
    main()
