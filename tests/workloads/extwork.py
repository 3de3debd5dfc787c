"""extwork -- a self-checking process that holds what CRIU dumps only when told to.

    python3 extwork.py --result PATH --peer SOCKET --lock FILE [--mib N] [--seed S]

It holds
- a unix datagram socket connected to SOCKET, a socket bound by a process outside the
  dumped tree (the test): CRIU dumps it only with --ext-unix-sk, and reconnects it by
  its path on restore;
- a shared flock(2) on FILE: CRIU dumps it only with --file-locks (shared, so that on one
  machine the restored copy can take it while the stopped source still holds it);
- N MiB of memory filled from the seed, one page in 64 rewritten as it runs.

Result protocol (PATH replaced atomically, PATH.tmp + rename), like the other workloads:
    READY pid=P mib=N                  once set up (and "hello n=0 pid=P" sent to SOCKET)
    SIGUSR1 -> OK pages=N lock=1 sent=K mutations=M pid=P   after checking that its
               memory is intact, that its file descriptor still holds the flock (its
               /proc/self/fdinfo lists the lock) and sending "ping K pid=P" to SOCKET
               BAD why=... otherwise
    SIGTERM -> exit

Only the standard library is used; stdin/stdout/stderr are not.
"""
import argparse
import fcntl
import hashlib
import os
import signal
import socket
import time

PAGE = 4096


def page_bytes(seed: int, index: int, gen: int) -> bytes:
    return hashlib.shake_128(b"%d:%d:%d" % (seed, index, gen)).digest(PAGE)


def write_result(path: str, line: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(line + "\n")
    os.replace(tmp, path)


def holds_flock(fd: int) -> bool:
    """Whether this open file description holds a flock (the kernel lists it)."""
    with open(f"/proc/self/fdinfo/{fd}") as f:
        return any(line.startswith("lock:") and "FLOCK" in line for line in f)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--result", required=True)
    ap.add_argument("--peer", required=True)
    ap.add_argument("--lock", required=True)
    ap.add_argument("--mib", type=float, default=4)
    ap.add_argument("--seed", type=int, default=1)
    a = ap.parse_args()

    pages = max(1, int(a.mib * 2**20) // PAGE)
    mem = bytearray(pages * PAGE)
    gens = [0] * pages
    for i in range(pages):
        mem[i * PAGE:(i + 1) * PAGE] = page_bytes(a.seed, i, 0)

    lock_fd = os.open(a.lock, os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(lock_fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    sk = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sk.connect(a.peer)
    sk.send(b"hello n=0 pid=%d" % os.getpid())

    asked = []
    signal.signal(signal.SIGUSR1, lambda *_: asked.append(1))
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    write_result(a.result, f"READY pid={os.getpid()} mib={a.mib:g}")

    mutations = sent = 0
    while True:
        time.sleep(0.02)
        i = (mutations * 64) % pages
        gens[i] += 1
        mem[i * PAGE:(i + 1) * PAGE] = page_bytes(a.seed, i, gens[i])
        mutations += 1
        if not asked:
            continue
        asked.clear()
        bad = next((i for i in range(pages)
                    if mem[i * PAGE:(i + 1) * PAGE] != page_bytes(a.seed, i, gens[i])), None)
        if bad is not None:
            write_result(a.result, f"BAD why=memory page={bad} pid={os.getpid()}")
            continue
        if not holds_flock(lock_fd):
            write_result(a.result, f"BAD why=no-flock pid={os.getpid()}")
            continue
        try:
            sent += 1
            sk.send(b"ping %d pid=%d" % (sent, os.getpid()))
        except OSError as e:
            write_result(a.result, f"BAD why=send errno={e.errno} pid={os.getpid()}")
            continue
        write_result(a.result, f"OK pages={pages} lock=1 sent={sent} mutations={mutations} "
                               f"pid={os.getpid()}")


if __name__ == "__main__":
    main()
