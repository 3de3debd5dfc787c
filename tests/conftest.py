"""Shared fixtures. Tests marked ``criu`` run the real criu on real processes: they need
root and a criu that passes `criu check` (`make criu`). Where that is missing they FAIL
with the fix, rather than skip, so CI can never go green without them; set
DELTAXFER_SKIP_CRIU=1 to skip them deliberately on a machine that cannot run CRIU."""
import os

import pytest

from deltaxfer.criu.runner import CriuError, find_criu


@pytest.fixture(scope="session")
def criu():
    if os.environ.get("DELTAXFER_SKIP_CRIU") == "1":
        pytest.skip("DELTAXFER_SKIP_CRIU=1")
    if os.geteuid() != 0:
        pytest.fail("real-CRIU tests need root (criu dump/restore); run `sudo make test`")
    try:
        c = find_criu()
    except CriuError as e:
        pytest.fail(str(e))
    return c


@pytest.fixture(params=["uvloop", "asyncio"])
def loop_kind(request):
    """Each transport test runs on both event loops."""
    return request.param


@pytest.fixture(autouse=True)
def _no_leftover_processes(request):
    """After a test that had a tmp_path, a process still running whose command line names
    that directory -- a workload's restored copy that a failing test never adopted, a
    lazy-pages server -- is killed and reported as a warning: one failure must not leave
    memory-hungry processes to the tests after it."""
    yield
    tmp = request.node.funcargs.get("tmp_path")
    if tmp is None:
        return
    import signal
    import time
    import warnings
    needle = str(tmp).encode()

    def running() -> dict[int, str]:
        out = {}
        for name in os.listdir("/proc"):
            if not name.isdigit() or int(name) == os.getpid():
                continue
            try:
                with open(f"/proc/{name}/cmdline", "rb") as f:
                    argv = f.read().split(b"\0")
            except OSError:
                continue
            if any(needle in a for a in argv):
                out[int(name)] = b" ".join(argv[:3]).decode(errors="replace")
        return out
    deadline = time.monotonic() + 2.0      # a daemon finishing its last pages may end
    while (procs := running()) and time.monotonic() < deadline:
        time.sleep(0.1)
    left = []
    for pid, what in procs.items():
        try:
            os.kill(pid, signal.SIGKILL)
            left.append(f"{pid} {what}")
        except OSError:
            pass
    if left:
        warnings.warn(f"{request.node.nodeid} left {len(left)} process(es) running, "
                      f"killed: {left}")
