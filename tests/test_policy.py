"""The convergence policy: when live rounds stop and the freeze begins."""
from deltaxfer.policy import Convergence, RoundMeasure


def m(n, changed, *, pages=100_000, wire=None, seconds=0.5, read=0.1, interval=1.0):
    wire = changed * 2000 if wire is None else wire
    return RoundMeasure(n, pages, changed, wire, seconds, read, interval)


def test_first_round_never_stops():
    assert not Convergence(max_rounds=1).observe(m(1, 100_000, interval=float("inf"))).stop


def test_converges_when_the_prediction_is_under_the_target():
    c = Convergence(downtime_target=0.5, freeze_overhead=0.1)
    c.observe(m(1, 100_000, interval=float("inf")))
    # round 2's dirty rate comes from the whole first copy: never trusted to stop
    d = c.observe(m(2, 200, seconds=0.2, read=0.1, interval=2.0))
    assert not d.stop and d.reason == "shrinking" and d.predicted_downtime < 0.5, d
    d = c.observe(m(3, 100, seconds=0.2, read=0.1, interval=1.0))
    # 0.1 overhead + 0.1 read + (100 pages/s * 0.2 s * 2000 B) / (200000 B / 0.1 s)
    assert d.stop and d.reason.startswith("converged")
    assert abs(d.predicted_downtime - 0.22) < 1e-9


def test_the_freeze_overhead_grows_with_the_tree():
    """No fixed overhead given: CRIU's lazy dump and the rest of the freeze, fitted to
    what this host measured, per GiB of the tree's present pages."""
    from deltaxfer.policy import FREEZE_FIXED_S, FREEZE_PER_GIB_S
    c = Convergence()
    small, large = c.freeze_seconds(65536), c.freeze_seconds(8 * 262144)
    assert abs(small - (FREEZE_FIXED_S + FREEZE_PER_GIB_S / 4)) < 1e-9
    assert abs(large - (FREEZE_FIXED_S + 8 * FREEZE_PER_GIB_S)) < 1e-9
    assert 0.05 < small < 0.15 and 0.5 < large < 1.0
    # a 1 GiB tree dirtying little is predicted to fit 300 ms, an 8 GiB one not
    for pages, fits in ((262144, True), (8 * 262144, False)):
        c = Convergence()
        c.observe(m(1, pages, pages=pages, interval=float("inf")))
        c.observe(m(2, 500, pages=pages, seconds=0.05, read=0.005, interval=1.0))
        d = c.observe(m(3, 100, pages=pages, seconds=0.02, read=0.002, interval=0.05))
        assert d.stop == fits and (not fits or d.reason.startswith("converged")), d


def test_a_writer_covering_the_tree_faster_than_a_round_is_not_extrapolated_linearly():
    """Changed pages >= half the tree: the rate over the round's interval saturated, and
    the residual is predicted as the whole changed set, not as the rate x a shorter
    time."""
    c = Convergence(downtime_target=0.3, freeze_overhead=0.05)
    c.observe(m(1, 10_000, pages=10_000, interval=float("inf")))
    c.observe(m(2, 9_000, pages=10_000, wire=90_000, seconds=0.1, read=0.01, interval=10.0))
    d = c.observe(m(3, 8_000, pages=10_000, wire=80_000, seconds=0.1, read=0.01,
                    interval=5.0))
    # linear: 1600 pages/s x 0.1 s = 160 pages; saturated: all 8000 at 10 B/page over
    # 80000 B / 0.09 s
    expect = 0.05 + 0.01 + 8000 * 10 / (80_000 / 0.09)
    assert abs(d.predicted_downtime - expect) < 1e-9, d


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