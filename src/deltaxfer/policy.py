"""When to stop the pre-copy rounds and freeze.

deltaxfer predicts the downtime of freezing *now* from what the rounds measured — the
dirty rate, the link's bandwidth, and how fast memory is read — and freezes when the
prediction is under the target (QEMU's approach, whose default target is 300 ms), when
the rounds stop shrinking (the workload dirties memory as fast as we send it: more
rounds only cost time), or at a round limit.

P.Haul, for comparison, used a fixed rule: stop when a pre-dump has ≤ 64 pages, when it
grew by > 10 % over the previous one, or after 8 iterations. A fixed page count ignores
both the link (64 pages take 2 µs on 10 Gbit/s and 0.3 ms at 10 Mbit/s) and the memory
size (the freeze must also read what it does not send); a prediction in seconds does not.
"""
from __future__ import annotations

from dataclasses import dataclass, field


# the residual's transfer time below which auto-converge never throttles: the rest of the
# freeze (CRIU's dump and restore) dominates it
MIN_TRANSFER_BUDGET = 0.05
# The freeze besides the residual's transfer, as a function of the tree's memory: CRIU's
# lazy dump (seizing, the parasite, splicing every page into its pipes: it grows with
# memory), the final scan, the files, the commit and the restore (started early: its
# start-up is not in the freeze). Fitted to the app-observed pauses of memwork dirtying
# 10 MiB/s on loopback (2026-11-30, early restore, 4 MiB page pipes: 256 MiB 0.06-0.09 s,
# 1 GiB 0.15 s, 4 GiB 0.37-0.48 s, 8 GiB 0.76 s), whose residual was a few ms of it.
FREEZE_FIXED_S = 0.05
FREEZE_PER_GIB_S = 0.085
PAGE = 4096
# a round whose changed pages are at least this share of the tree's: the writer covers
# its working set faster than a round, so the dirty rate measured over the round's
# interval says nothing of a shorter one (the residual is the whole set again)
SATURATED = 0.5
BANDWIDTH_SAMPLE = 1 << 20    # bytes: a round that small measures latency, not the link


@dataclass
class RoundMeasure:
    round: int
    pages: int            # pages scanned (present pages of the tree)
    changed: int          # pages sent: changed + added since the previous round
    wire_bytes: int       # bytes on the wire for this round
    seconds: float        # the round, read to confirmation
    read_seconds: float   # reading the memory
    interval: float       # time since the previous round's read started (dirtying window)


@dataclass
class Decision:
    stop: bool
    reason: str
    predicted_downtime: float
    dirty_pages_per_s: float
    bandwidth: float
    throttle: float = 0.0    # the share of time the tree is to spend stopped from now on


@dataclass
class Convergence:
    downtime_target: float = 0.3
    max_rounds: int = 10
    min_rounds: int = 2          # the first round copies everything: it says nothing of dirtying
    # the first round whose prediction may stop the rounds: round 2's dirty rate is measured
    # over the whole first copy, where a writer with a small working set saturates; from
    # round 3 on the interval is a live round's
    min_converge_round: int = 3
    shrink: float = 0.9          # a round must send < 90 % of the previous one to go on
    # the freeze besides the residual's transfer, seconds; None: FREEZE_FIXED_S +
    # FREEZE_PER_GIB_S per GiB of the tree's present pages (freeze_seconds)
    freeze_overhead: float | None = None
    # auto-converge (throttle.py): the duty-cycle levels to climb, one per round, when the
    # rounds stop shrinking and the predicted downtime is over the target; () = never
    throttle_levels: tuple = ()
    history: list[RoundMeasure] = field(default_factory=list)
    throttle: float = 0.0          # the level in force
    # set when the rounds stopped: sending the residual still breaks the target with
    # every throttle level used (what post-copy is for: --converge auto)
    over_budget: bool = False

    def freeze_seconds(self, pages: int) -> float:
        """The freeze's cost besides sending the residual, for a tree of ``pages``."""
        if self.freeze_overhead is not None:
            return self.freeze_overhead
        return FREEZE_FIXED_S + FREEZE_PER_GIB_S * pages * PAGE / 2**30

    def predict(self, m: RoundMeasure) -> tuple[float, float, float]:
        """(predicted downtime, dirty pages/s, bandwidth B/s) if we froze after round m.

        Frozen, the freeze's own cost (freeze_seconds), reading what was written as fast
        as this round read, and sending what was dirtied since the last read — dirty rate
        × the time a round takes — at the bandwidth and bytes per page the rounds
        measured."""
        dirty_rate = m.changed / m.interval if m.interval > 0 else 0.0
        send_seconds = max(m.seconds - m.read_seconds, 1e-6)
        bandwidth = m.wire_bytes / send_seconds if m.wire_bytes else float("inf")
        bytes_per_page = m.wire_bytes / m.changed if m.changed else 4096.0
        residual_pages = min(dirty_rate * m.seconds, m.pages)
        if m.pages and m.changed >= SATURATED * m.pages:
            residual_pages = max(residual_pages, m.changed)
        transfer = residual_pages * bytes_per_page / bandwidth if bandwidth else 0.0
        return self.freeze_seconds(m.pages) + m.read_seconds + transfer, dirty_rate, bandwidth

    def link_bandwidth(self) -> float:
        """Bytes/s of the best round big enough to measure the link (>= 1 MB), or 0."""
        return max((h.wire_bytes / max(h.seconds - h.read_seconds, 1e-6)
                    for h in self.history if h.wire_bytes >= BANDWIDTH_SAMPLE), default=0.0)

    def observe(self, m: RoundMeasure) -> Decision:
        self.history.append(m)
        predicted, dirty_rate, bandwidth = self.predict(m)
        n = len(self.history)

        def decide(stop, reason):
            return Decision(stop, reason, predicted, dirty_rate, bandwidth, self.throttle)

        if n < self.min_rounds:
            return decide(False, "first rounds")
        if m.changed == 0:
            return decide(True, "no page changed since the last round")
        if predicted <= self.downtime_target and n >= self.min_converge_round:
            return decide(True, f"converged: predicted downtime {predicted * 1000:.0f} ms "
                                f"<= target {self.downtime_target * 1000:.0f} ms")
        stalled = None
        if n >= 2:
            prev = self.history[-2]
            if prev.changed and m.changed >= self.shrink * prev.changed:
                stalled = f"rounds stopped shrinking ({prev.changed} -> {m.changed} pages)"
        if stalled or n >= self.max_rounds:
            # QEMU's auto-converge: rather than freeze with a residual over the target,
            # slow the tree one step more and try another round — only when sending the
            # residual is what breaks the target: the freeze's fixed cost (CRIU, restore)
            # is not made smaller by slowing the process
            # the residual after a stalled round is about that round's dirty set (QEMU's
            # estimate): the dirty rate seen saturates at the writer's working set. Its
            # time on the link at the best throughput a big round showed (a small round's
            # time is its fixed latency, not bytes over bandwidth)
            bytes_per_page = m.wire_bytes / m.changed if m.changed else 4096.0
            residual = max(min(dirty_rate * m.seconds, m.pages) * bytes_per_page, m.wire_bytes)
            link = self.link_bandwidth() or bandwidth
            transfer = residual / link if link else 0.0
            budget = max(self.downtime_target - self.freeze_seconds(m.pages),
                         MIN_TRANSFER_BUDGET)
            higher = [lv for lv in self.throttle_levels if lv > self.throttle]
            if higher and transfer > budget and \
                    n < self.max_rounds + len(self.throttle_levels):
                self.throttle = higher[0]
                return decide(False, f"{stalled or 'max rounds reached'}, predicted downtime "
                                     f"{predicted * 1000:.0f} ms: throttling the tree to "
                                     f"{self.throttle:.0%} stopped")
            self.over_budget = transfer > budget
            if stalled:
                return decide(True, stalled + (f" at {self.throttle:.0%} throttle"
                                               if self.throttle else ""))
            return decide(True, f"max rounds ({self.max_rounds}) reached")
        return decide(False, "shrinking")
