"""The migration benchmark's results page, regenerated from its JSON.

    python bench/matrix_report.py docs/results/matrix.json [--page docs/RESULTS.md]
                                  [--readme README.md]

Prints the tables; with --page writes the Markdown page and its plots (PNG, in a
``results/`` folder beside the page); with --readme replaces the block between
``<!-- matrix-results:begin -->`` and ``<!-- matrix-results:end -->`` in the README by a
short table (not for a smoke run: its numbers are not results).

Every number on the page is a median over the repetitions of one cell (workload, link,
method) with its min-max spread; every ratio compares medians of the same run.
"""
from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from collections import defaultdict
from pathlib import Path

METHODS = ("deltaxfer", "dx-noxor", "dx-nolz4", "rsync", "page-server", "tar-lz4")
BASELINES = ("rsync", "page-server", "tar-lz4")
LINKS = ("lo", "veth", "1gbit", "10gbit")
METRICS = ("downtime_s", "app_pause_s", "total_s", "wire_bytes", "cpu_src_s", "cpu_dst_s",
           "rounds")
GOAL_CELL = "mem1G-d10"
README_BEGIN, README_END = "<!-- matrix-results:begin -->", "<!-- matrix-results:end -->"


def cells(runs: list[dict]) -> dict:
    """(workload, link, method) -> {"n", "errors", metric: (median, min, max)}."""
    by = defaultdict(list)
    for r in runs:
        by[(r["workload"], r["link"], r["method"])].append(r)
    out = {}
    for key, rows in by.items():
        ok = [r for r in rows if "error" not in r]
        c = {"n": len(ok), "errors": len(rows) - len(ok), "runs": ok}
        for m in METRICS:
            vals = [r[m] for r in ok if r.get(m) is not None]
            if vals:
                c[m] = (statistics.median(vals), min(vals), max(vals))
        out[key] = c
    return out


def _order(keys):
    def k(w):
        m = re.fullmatch(r"mem(\d+)([MG])-d([\d.]+)", w)
        if m:
            return (0, int(m.group(1)) * (1024 if m.group(2) == "G" else 1), float(m.group(3)))
        return (1, 0, w)
    return sorted(keys, key=k)


def fmt(c, m):
    if m not in c:
        return "—"
    med, lo, hi = c[m]
    if m == "wire_bytes":
        return f"{med / 1e6:.1f} ({lo / 1e6:.1f}–{hi / 1e6:.1f})"
    if m == "rounds":
        return f"{med:g}" if lo == hi else f"{med:g} ({lo:g}–{hi:g})"
    if m in ("downtime_s", "app_pause_s"):
        return f"{med:.3f} ({lo:.3f}–{hi:.3f})"
    return f"{med:.2f} ({lo:.2f}–{hi:.2f})"


def tables(cs: dict) -> list[str]:
    lines = []
    groups = defaultdict(list)
    for (w, link, method) in cs:
        groups[(w, link)].append(method)
    for w in _order({w for w, _ in groups}):
        for link in LINKS:
            if (w, link) not in groups:
                continue
            lines += [f"#### {w} over {link}", "",
                      "| method | downtime s | app pause s | total s | wire MB | CPU s source | "
                      "CPU s destination | rounds | runs |",
                      "|---|---|---|---|---|---|---|---|---|"]
            for method in METHODS:
                c = cs.get((w, link, method))
                if c is None:
                    continue
                err = f", **{c['errors']} failed**" if c["errors"] else ""
                lines.append(f"| {method} | {fmt(c, 'downtime_s')} | {fmt(c, 'app_pause_s')} | "
                             f"{fmt(c, 'total_s')} | "
                             f"{fmt(c, 'wire_bytes')} | {fmt(c, 'cpu_src_s')} | "
                             f"{fmt(c, 'cpu_dst_s')} | {fmt(c, 'rounds')} | {c['n']}{err} |")
            lines.append("")
    return lines


def _med(cs, w, link, method, m):
    c = cs.get((w, link, method))
    return c[m][0] if c and m in c else None


def _median_run(cs, w, link, method):
    c = cs.get((w, link, method))
    if not c or not c["runs"]:
        return None
    runs = sorted(c["runs"], key=lambda r: r["downtime_s"])
    return runs[len(runs) // 2]


def _why_downtime(run) -> str:
    steps = sorted(run.get("freeze", {}).items(), key=lambda kv: -kv[1])[:3]
    return ("where deltaxfer's freeze went (median run): " +
            ", ".join(f"{k} {v:.3f} s" for k, v in steps))


def _why_bytes(run) -> str:
    trace = run.get("round_trace") or []
    if not trace:
        return ""
    first, rest = trace[0]["wire_bytes"], sum(p["wire_bytes"] for p in trace[1:])
    return (f"deltaxfer's first round (all of memory, zero pages elided, lz4) sent "
            f"{first / 1e6:.0f} MB, the {len(trace) - 1} later rounds {rest / 1e6:.1f} MB "
            f"(stream bytes; the link adds headers)")


def _why_total(run) -> str:
    trace = run.get("round_trace") or []
    live = [p for p in trace if p["live"]]
    if not live:
        return ""
    t1 = live[0]["t"]
    return (f"deltaxfer's first round took {t1:.2f} s for {live[0]['wire_bytes'] / 1e6:.0f} MB "
            f"({live[0]['wire_bytes'] / 1e6 / max(t1, 1e-9):.0f} MB/s), the live rounds "
            f"{live[-1]['t']:.2f} s in all; CPU {run['cpu_src_s']:.1f} s source, "
            f"{run['cpu_dst_s']:.1f} s destination")


def goals(cs: dict) -> list[tuple[str, str, str]]:
    """(goal, measured, verdict) for the issue's three goals, where the cells ran; a
    missed goal's verdict carries the measurements that say why."""
    out = []
    w = GOAL_CELL
    dx = _med(cs, w, "1gbit", "deltaxfer", "downtime_s")
    base = {b: _med(cs, w, "1gbit", b, "downtime_s") for b in BASELINES}
    base = {b: v for b, v in base.items() if v is not None}
    if dx is not None and base:
        best = min(base, key=base.get)
        ratio = base[best] / dx
        out.append(("1 Gbit/s, 1 GiB, 10 MiB/s: deltaxfer downtime ≤ 1/30 of the best baseline",
                    f"deltaxfer {dx:.3f} s, best baseline {best} {base[best]:.3f} s: "
                    f"{ratio:.1f}× lower", "met" if ratio >= 30 else
                    f"**missed**: {_why_downtime(_median_run(cs, w, '1gbit', 'deltaxfer'))}"))
    dxb = _med(cs, w, "1gbit", "deltaxfer", "wire_bytes")
    psb = _med(cs, w, "1gbit", "page-server", "wire_bytes")
    if dxb is not None and psb is not None:
        out.append(("same cell: deltaxfer bytes on the wire ≤ 1/3 of page-server's",
                    f"{dxb / 1e6:.1f} MB vs {psb / 1e6:.1f} MB: {dxb / psb:.2f}×",
                    "met" if dxb * 3 <= psb else
                    f"**missed**: {_why_bytes(_median_run(cs, w, '1gbit', 'deltaxfer'))}"))
    dxt = _med(cs, w, "10gbit", "deltaxfer", "total_s")
    bt = {b: _med(cs, w, "10gbit", b, "total_s") for b in BASELINES}
    bt = {b: v for b, v in bt.items() if v is not None}
    if dxt is not None and bt:
        fastest = min(bt, key=bt.get)
        out.append(("10 Gbit/s, same workload: deltaxfer total time ≤ every baseline's",
                    f"deltaxfer {dxt:.2f} s, fastest baseline {fastest} {bt[fastest]:.2f} s",
                    "met" if dxt <= bt[fastest] else
                    f"**missed**: {_why_total(_median_run(cs, w, '10gbit', 'deltaxfer'))}"))
    return out


def freeze_lines(cs: dict) -> list[str]:
    lines = ["| cell | downtime s | " + " | ".join(
        ("dump", "read_memory", "residual", "files", "commit_restore", "resume")) +
        " | stop reason |", "|---|---|---|---|---|---|---|---|"]
    for (w, link, method), c in sorted(cs.items()):
        if method != "deltaxfer" or not c["runs"]:
            continue
        steps = defaultdict(list)
        for r in c["runs"]:
            for k, v in r.get("freeze", {}).items():
                steps[k].append(v)
        med = {k: statistics.median(v) for k, v in steps.items()}
        reasons = sorted({r.get("stop_reason", "") for r in c["runs"]})
        lines.append(f"| {w} @ {link} | {c['downtime_s'][0]:.3f} | " + " | ".join(
            f"{med[k]:.3f}" if k in med else "—" for k in
            ("dump", "read_memory", "residual", "files", "commit_restore", "resume")) +
            f" | {'; '.join(reasons)} |")
    return lines


# -- plots ------------------------------------------------------------------------------------

def _bars(ax, cs, xs, key_of, metric, scale, methods):
    import numpy as np

    width = 0.8 / len(methods)
    for i, method in enumerate(methods):
        meds, errs = [], [[], []]
        for x in xs:
            c = cs.get(key_of(x, method))
            if c and metric in c:
                med, lo, hi = (v / scale for v in c[metric])
                meds.append(med)
                errs[0].append(med - lo)
                errs[1].append(hi - med)
            else:
                meds.append(np.nan)
                errs[0].append(0)
                errs[1].append(0)
        ax.bar(np.arange(len(xs)) + (i - (len(methods) - 1) / 2) * width, meds, width,
               yerr=errs, label=method, capsize=2)
    ax.set_xticks(range(len(xs)), xs)


def main_workload(cs: dict) -> str | None:
    """The workload compared across links: the goal cell's, else the one on most links."""
    on = defaultdict(set)
    for w, link, _ in cs:
        on[w].add(link)
    if GOAL_CELL in on:
        return GOAL_CELL
    return max(_order(on), key=lambda w: len(on[w]), default=None)


def plots(cs: dict, outdir: Path, title_note: str) -> list[tuple[str, str]]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    outdir.mkdir(parents=True, exist_ok=True)
    made = []
    main = main_workload(cs)
    links = [lk for lk in LINKS if any(k[:2] == (main, lk) for k in cs)]
    on1g = _order({w for w, lk, _ in cs if lk == "1gbit"})
    for metric, scale, unit, fname in (("downtime_s", 1, "downtime, s (log)", "downtime"),
                                       ("wire_bytes", 1e6, "bytes on the wire, MB (log)",
                                        "bytes")):
        panels = [(f"{main}, per link", links, lambda x, m: (main, x, m)),
                  ("1 Gbit/s, per workload", on1g, lambda x, m: (x, "1gbit", m))]
        panels = [p for p in panels if p[1]]
        if not panels:
            continue
        fig, axes = plt.subplots(1, len(panels), figsize=(7 * len(panels), 4.2), squeeze=False)
        for ax, (title, xs, key_of) in zip(axes[0], panels):
            methods = [m for m in METHODS if any(key_of(x, m) in cs for x in xs)]
            _bars(ax, cs, xs, key_of, metric, scale, methods)
            ax.set_yscale("log")
            ax.set_ylabel(unit)
            ax.set_title(f"{title}{title_note}", fontsize=10)
            ax.tick_params(axis="x", labelsize=8)
        axes[0][-1].legend(fontsize=8)
        fig.tight_layout()
        path = outdir / f"{fname}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        made.append((fname, path.name))
    # rounds over time: deltaxfer's median-downtime run of each cell on the 1 Gbit/s link
    fig, ax = plt.subplots(figsize=(8, 4.2))
    drawn = 0
    for w in on1g:
        c = cs.get((w, "1gbit", "deltaxfer"))
        if not c or not c["runs"]:
            continue
        runs = sorted(c["runs"], key=lambda r: r["downtime_s"])
        trace = runs[len(runs) // 2].get("round_trace") or []
        if not trace:
            continue
        line, = ax.plot([p["t"] for p in trace], [max(p["wire_bytes"], 1) / 1e6 for p in trace],
                        "o-", label=w)
        final = [p for p in trace if not p["live"]]
        if final:
            ax.plot([final[-1]["t"]], [max(final[-1]["wire_bytes"], 1) / 1e6], "s",
                    color=line.get_color(), markersize=9, markerfacecolor="none")
        drawn += 1
    if drawn:
        ax.set_yscale("log")
        ax.set_xlabel("end of the round, s after the first round began (sum of round durations)")
        ax.set_ylabel("MB sent in the round (log)")
        ax.set_title(f"deltaxfer rounds, 1 Gbit/s (square: the final round, in the freeze)"
                     f"{title_note}", fontsize=10)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(outdir / "rounds.png", dpi=100)
        made.append(("rounds", "rounds.png"))
    plt.close(fig)
    return made


# -- the page -----------------------------------------------------------------------------

SMOKE_BANNER = """> **Placeholder: a smoke run, not results.** These numbers come from the smoke matrix
> (tiny workloads, one repetition, a busy 2-core machine) that checks the harness end to
> end. They say nothing about performance; the default matrix replaces this page.
"""

HOW = """## How it is measured

Harness: `bench/bench_migrate.py` (pytest-benchmark) with `bench/migration_lab.py` (links,
workloads, counters), `bench/migration_methods.py` (the methods) and
`bench/migration_matrix.py` (the cells); this page is made by `bench/matrix_report.py`
from `docs/results/matrix.json`.

- **Workloads**, each PID 1 of its own PID namespace in the source network namespace, a
  fresh one per method and repetition, checked once before the move and again on the
  destination (a failed check fails the run): `memN-dR` = memwork (`tests/workloads/
  memwork.c`), N of private memory of mixed pages (random, written zeros, text, sparse,
  untouched) dirtying R MiB/s, verifying every page; `pyheap` = a CPython heap of small
  objects replacing some per second, verifying every object; `redis` = Debian's
  redis-server (unix socket only, no persistence) holding keys whose values a Lua script
  inside the restored server recomputes and compares (`tests/workloads/rediswork.py`).
- **Links**: `lo` = both sides in one private network namespace over 127.0.0.1; `veth` =
  two namespaces joined by a veth pair; `1gbit`/`10gbit` = that veth shaped with `tc
  qdisc ... tbf rate R burst 1mb latency 50ms` on both ends.
- **Methods**: `deltaxfer` (`deltaxfer serve --restore` / `deltaxfer migrate`, defaults),
  `dx-noxor` (`--no-xor`), `dx-nolz4` (`--no-lz4`); `rsync` = `criu dump` to a directory,
  `rsync -a` to an rsync daemon, `criu restore -d`; `page-server` = `criu page-server` on
  the destination + `criu dump --page-server` + the other images as `tar | socket` +
  restore; `tar-lz4` = `criu dump`, `tar | lz4 -1 | socket` into `socket | lz4 -d | tar
  -x`, restore. The listeners (serve, rsync daemon, page-server, receivers) start before
  the clock.
- **Downtime**: deltaxfer: the report's `downtime` (the pre-dump hook, just before CRIU
  freezes the tree → the destination's copy runs). Baselines: `criu dump` start (a plain
  dump freezes at once) → `criu restore -d` returned.
- **App pause** (memwork only): the longest gap between two turns of the workload's
  main loop on CLOCK_REALTIME, read from the restored copy — freeze to running again as
  the application saw it, the same measure for every method. (Not CLOCK_MONOTONIC: CRIU
  restores a task that had its own PID namespace into a new time namespace whose
  monotonic offset hides the time it was frozen; both hosts here share one clock.)
- **Total time**: deltaxfer: `deltaxfer migrate` start → exit (live rounds included);
  baselines: the same interval as their downtime (they stop the process for all of it).
- **Bytes on the wire**: kernel interface counters (`/proc/net/dev`), both directions,
  headers and ACKs included: on a veth the tx bytes of both ends; on `lo` the loopback's
  tx bytes in the private namespace. Only the migration runs in these namespaces.
- **CPU seconds**: user + system. Commands run to completion (`criu dump`, `criu
  restore`, `rsync`, the `tar | lz4 | socket` pipelines, `deltaxfer migrate` with the
  criu it starts) by `os.wait4` rusage, children included; servers that run on
  (`deltaxfer serve` with its criu restore and lazy-pages daemon, the rsync daemon) by
  /proc utime+stime+cutime+cstime of their process tree, after minus before, read after
  the restored copy verified (so lazy page-in counts), the workload's own processes left
  out.
- **Rounds**: deltaxfer: live rounds + the final one (report); baselines: 1.
- Medians over the repetitions, (min–max) in brackets.
"""


def page(data: dict, cs: dict, made: list, plots_rel: str) -> str:
    meta = data["meta"]
    m = meta["machine"]
    smoke = meta.get("smoke")
    out = ["# deltaxfer against what users would pick instead: results", ""]
    if smoke:
        out += [SMOKE_BANNER]
    reps = sorted({c["n"] for c in cs.values()})
    out += [f"Matrix `{meta['matrix']}`, run {meta['date']}, {meta['elapsed_s'] / 60:.0f} min; "
            f"{len(cs)} cells, {'/'.join(map(str, reps))} run(s) each.", "",
            f"**Machine**: {m.get('cpu')}, {m.get('cpus')} CPUs, {m.get('mem_gib')} GiB, "
            f"{m.get('os')}, kernel {m.get('kernel')}, Python {m.get('python')}, "
            f"criu {meta.get('criu')}. Both hosts, both CRIUs, the workload and the disk "
            "share this machine.", "",
            f"**Rerun**: `{meta.get('command', 'make bench-migrate')}` (writes "
            "`docs/results/matrix.json`, this page and its plots); the page alone: "
            "`.venv/bin/python bench/matrix_report.py docs/results/matrix.json --page "
            "docs/RESULTS.md`. Cells: `DX_MATRIX` (`default`, `smoke`, `full` or a list, "
            "see `bench/migration_matrix.py`), repetitions: `DX_MATRIX_REPS`.", ""]
    if data.get("failures"):
        out += ["**Failed runs**:", ""] + [f"- `{f[:300]}`" for f in data["failures"]] + [""]
    g = goals(cs)
    out += ["## The issue's goals (same run)", ""]
    if g:
        out += ["| goal | measured (medians) | verdict |", "|---|---|---|"]
        out += [f"| {a} | {b} | {c} |" for a, b, c in g]
        if smoke:
            out += ["", "(a smoke run has no `mem1G-d10` cells: no verdict)"]
    else:
        out += [f"The goal cells (`{GOAL_CELL}` on `1gbit` and `10gbit`) were not in this run."]
    out += [""]
    for name, file in made:
        out += [f"![{name}]({plots_rel}/{file})", ""]
    out += ["## Every cell", ""] + tables(cs)
    out += ["## deltaxfer's freeze, step by step (medians, s)", ""] + freeze_lines(cs) + [""]
    # what the numbers cannot say themselves (the run's conditions, the scale runs on a
    # lent machine), kept by hand beside the JSON
    notes = Path(__file__).resolve().parents[1] / "docs" / "results" / "NOTES.md"
    if notes.exists() and not smoke:
        out += [notes.read_text().rstrip(), ""]
    out += [HOW]
    return "\n".join(out)


def readme_block(cs: dict) -> str:
    rows = ["| 1 GiB, 10 MiB/s dirty | downtime s | total s | wire MB |", "|---|---|---|---|"]
    for link in ("1gbit", "10gbit"):
        for method in ("deltaxfer", "page-server", "rsync", "tar-lz4"):
            c = cs.get((GOAL_CELL, link, method))
            if c and "downtime_s" in c:
                rows.append(f"| {method}, {link} | {c['downtime_s'][0]:.3f} | "
                            f"{c['total_s'][0]:.2f} | {c['wire_bytes'][0] / 1e6:.0f} |")
    return "\n".join(rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("json")
    p.add_argument("--page", help="write the Markdown page here, its plots in results/ beside it")
    p.add_argument("--readme", help="update the results block of this README")
    args = p.parse_args(argv)
    data = json.loads(Path(args.json).read_text())
    cs = cells(data["runs"])
    smoke = data["meta"].get("smoke")
    print("\n".join(tables(cs)))
    for a, b, c in goals(cs):
        print(f"goal: {a}: {b}: {c}")
    if args.page:
        page_path = Path(args.page)
        made = plots(cs, page_path.parent / "results", " (SMOKE RUN)" if smoke else "")
        page_path.write_text(page(data, cs, made, "results"))
        print(f"page written to {page_path}")
    if args.readme:
        if smoke:
            print("not updating the README from a smoke run", file=sys.stderr)
        else:
            text = Path(args.readme).read_text()
            i, j = text.find(README_BEGIN), text.find(README_END)
            if i < 0 or j < i:
                print(f"{args.readme}: no {README_BEGIN} ... {README_END} block", file=sys.stderr)
                return 1
            Path(args.readme).write_text(text[:i + len(README_BEGIN)] + "\n" + readme_block(cs)
                                         + "\n" + text[j:])
    return 0


if __name__ == "__main__":
    sys.exit(main())
