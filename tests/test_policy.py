"""The convergence policy: when live rounds stop and the freeze begins."""
import pytest
from deltaxfer.policy import Convergence, RoundMeasure


def m(n, changed, *, pages=100_000, wire=None, seconds=0.5, read=0.1, interval=1.0):
    wire = changed * 2000 if wire is None else wire
    return RoundMeasure(n, pages, changed, wire, seconds, read, interval)


def test_first_round_never_stops():
    assert not Convergence(max_rounds=1).observe(m(1, 100_000, interval=float("inf"))).stop


def test_converges_when_the_prediction_is_under_the_target():
    c = Convergence(downtime_target=0.5, freeze_overhead=0.1)
    c.observe(m(1, 100_000, interval=float("inf")))
    d = c.observe(m(2, 100, seconds=0.2, read=0.1, interval=1.0))
    # 0.1 overhead + 0.1 read + (100 pages/s * 0.2 s * 2000 B) / (200000 B / 0.1 s)
    assert d.stop and d.reason.startswith("converged")
    assert abs(d.predicted_downtime - 0.22) < 1e-9


def test_stops_when_rounds_stop_shrinking_or_at_max_or_when_nothing_changed():
    c = Convergence(downtime_target=0.01)
    c.observe(m(1, 100_000, interval=float("inf")))
    assert not c.observe(m(2, 5000)).stop
    d = c.observe(m(3, 4800))                       # 96 % of the previous: not shrinking
    assert d.stop and "stopped shrinking" in d.reason
    c = Convergence(downtime_target=0.01, max_rounds=3)
    for n, changed in ((1, 100_000), (2, 5000)):
        c.observe(m(n, changed, interval=float("inf") if n == 1 else 1.0))
    assert c.observe(m(3, 1000)).reason.startswith("max rounds")
    c = Convergence(downtime_target=0.01)
    c.observe(m(1, 100_000, interval=float("inf")))
    assert c.observe(m(2, 0)).reason == "no page changed since the last round"


def test_a_tree_too_large_for_a_lazy_dump_is_seen_before_the_freeze():
    import resource
    from deltaxfer.migrate import lazy_dump_fits
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert lazy_dump_fits(1 << 30) == (True, "")      # 1 GiB fits any sane limit
    assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] == hard   # soft raised to hard
    with open("/proc/sys/fs/nr_open") as f:
        nr_open = int(f.read())
    if hard != resource.RLIM_INFINITY:
        # more than even fs.nr_open allows: no raise can make it fit
        fits, why = lazy_dump_fits((nr_open // 2048 + 2) << 30, 2048)
        assert not fits and "open files" in why and "could not be raised" in why
        assert resource.getrlimit(resource.RLIMIT_NOFILE) == (hard, hard)


def test_the_open_files_limit_is_raised_for_a_lazy_dump_where_root_may(monkeypatch):
    """A hard limit below what the dump needs is raised to that and a quarter more
    (root with CAP_SYS_RESOURCE may; this sandbox's root may not, so the call is
    recorded here, and the refusal is the next test's)."""
    import resource
    from deltaxfer import migrate
    calls = []
    monkeypatch.setattr(resource, "getrlimit", lambda what: (2000, 2000))
    monkeypatch.setattr(resource, "setrlimit", lambda what, lim: calls.append((what, lim)))
    fits, why = migrate.lazy_dump_fits(3 << 30, 2048)   # needs 1024 + 3 x 2048 = 7168
    assert fits and why == "open-files limit raised from 2000 to 8960", why
    assert calls == [(resource.RLIMIT_NOFILE, (8960, 8960))]


def test_a_limit_that_cannot_be_raised_chooses_the_page_server_freeze():
    """Without CAP_SYS_RESOURCE (dropped from the bounding set, as in an unprivileged
    container) a hard limit of 2000 stays: a 3 GiB tree does not fit a lazy dump, and
    the reason says so (choose_freeze then takes the page-server freeze)."""
    import json
    import subprocess
    import sys
    code = ("import json, resource; from deltaxfer.migrate import lazy_dump_fits; "
            "print(json.dumps([lazy_dump_fits(3 << 30, 2048), "
            "resource.getrlimit(resource.RLIMIT_NOFILE)]))")
    out = subprocess.run(["prlimit", "--nofile=2000:2000", "setpriv",
                          "--bounding-set=-sys_resource", sys.executable, "-c", code],
                         capture_output=True, text=True, check=True).stdout
    (fits, why), limit = json.loads(out)
    assert not fits and "needs about 7168 open files, the limit is 2000" in why, why
    assert limit == [2000, 2000]