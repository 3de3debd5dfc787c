"""pyprograms -- CPython processes holding a real library's state, checking it themselves.

    python3 pyprograms.py --kind numpy|sqlite --result PATH [--seed S]

numpy:  a few arrays (float64, int32, a strided view, a 24 MiB one) filled from a seeded
        generator; their SHA-256 digests are recorded at start.
sqlite: an in-memory sqlite3 database (the sqlite3 module): a table of 20000 rows with an
        index on one column; the rows' digest, the index's use and PRAGMA integrity_check.

Result protocol (PATH replaced atomically), as the C workloads':
    READY kind=K digest=D pid=P
    SIGUSR1 -> OK kind=K digest=D ... pid=P   (the state recomputed from memory now equals
               what was recorded at start)  or  BAD kind=K why=... pid=P
    SIGTERM -> exit
"""
import argparse
import hashlib
import os
import signal
import time


def write_result(path, line):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(line + "\n")
    os.replace(tmp, path)


class NumpyState:
    def __init__(self, seed):
        import numpy as np
        rng = np.random.default_rng(seed)
        self.arrays = {
            "f64": rng.standard_normal(1 << 20),
            "i32": rng.integers(-2**31, 2**31 - 1, size=(512, 1024), dtype=np.int32),
            "big": rng.random(3 << 20),
        }
        self.arrays["view"] = self.arrays["i32"][::3, 5::7]
        self.expect = self.digests()

    def digests(self):
        import numpy as np
        h = hashlib.sha256()
        for k in sorted(self.arrays):
            h.update(k.encode())
            h.update(np.ascontiguousarray(self.arrays[k]).tobytes())
        return h.hexdigest()[:32]

    def check(self):
        got = self.digests()
        sums = float(self.arrays["f64"].sum())
        return got == self.expect, f"digest={got} sum={sums:.6f}"


class SqliteState:
    def __init__(self, seed):
        import random
        import sqlite3
        self.db = sqlite3.connect(":memory:")
        self.db.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, k TEXT, v BLOB, n REAL)")
        r = random.Random(seed)
        self.db.executemany("INSERT INTO t VALUES (?, ?, ?, ?)", [
            (i, f"key-{r.getrandbits(40):010x}", r.randbytes(r.randrange(16, 200)), r.random())
            for i in range(20000)])
        self.db.execute("CREATE INDEX t_k ON t (k)")
        self.db.commit()
        self.expect = self.digest()
        self.probe = self.db.execute("SELECT k, id FROM t WHERE id % 997 = 3").fetchall()

    def digest(self):
        h = hashlib.sha256()
        for row in self.db.execute("SELECT id, k, v, n FROM t ORDER BY id"):
            h.update(repr(row).encode())
        return h.hexdigest()[:32]

    def check(self):
        ok = self.db.execute("PRAGMA integrity_check").fetchone()[0]
        if ok != "ok":
            return False, f"why=integrity_check:{ok.replace(' ', '_')[:80]}"
        plan = " ".join(str(r) for r in self.db.execute(
            "EXPLAIN QUERY PLAN SELECT id FROM t WHERE k = ?", ("x",)))
        if "t_k" not in plan:
            return False, "why=index_unused"
        for k, i in self.probe:        # through the index
            got = self.db.execute("SELECT id FROM t WHERE k = ?", (k,)).fetchall()
            if (i,) not in got:
                return False, f"why=index_lookup key={k}"
        got = self.digest()
        return got == self.expect, f"digest={got} rows=20000"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--kind", choices=("numpy", "sqlite"), required=True)
    ap.add_argument("--result", required=True)
    ap.add_argument("--seed", type=int, default=1)
    a = ap.parse_args()
    state = (NumpyState if a.kind == "numpy" else SqliteState)(a.seed)
    flags = {"verify": False, "exit": False}
    signal.signal(signal.SIGUSR1, lambda *_: flags.__setitem__("verify", True))
    signal.signal(signal.SIGTERM, lambda *_: flags.__setitem__("exit", True))
    write_result(a.result, f"READY kind={a.kind} digest={state.expect} pid={os.getpid()}")
    while not flags["exit"]:
        if flags["verify"]:
            flags["verify"] = False
            try:
                ok, detail = state.check()
            except Exception as e:          # a broken heap shows as an exception too
                ok, detail = False, f"why={type(e).__name__}"
            write_result(a.result, f"{'OK' if ok else 'BAD'} kind={a.kind} {detail} "
                                   f"pid={os.getpid()}")
        time.sleep(0.02)


if __name__ == "__main__":
    main()
