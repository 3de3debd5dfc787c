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
