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
    if hard != resource.RLIM_INFINITY:
        fits, why = lazy_dump_fits((hard // 2048 + 2) << 30)
        assert not fits and "open files" in why
