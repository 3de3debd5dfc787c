"""`deltaxfer report FILE [--plot OUT.png]`: a migration report (migrate --report) read
back, summarized, and drawn: the rounds (pages sent and bytes on the wire, with the
predicted downtime after each) and the freeze broken into its steps."""
from __future__ import annotations

import json


class ReportError(ValueError):
    pass


def load(path: str) -> dict:
    try:
        with open(path) as f:
            report = json.load(f)
    except OSError as e:
        raise ReportError(f"{path}: {e.strerror}") from None
    except ValueError as e:
        raise ReportError(f"{path}: not a JSON report ({e})") from None
    if not isinstance(report, dict) or not isinstance(report.get("rounds"), list):
        raise ReportError(f"{path}: not a deltaxfer migration report (no rounds)")
    return report


FREEZE_STEPS = ("dump", "read_memory", "residual", "files", "commit_restore")


def plot(report: dict, out: str) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ReportError("plotting needs matplotlib: pip install 'deltaxfer[plot]'") from None
    rounds = report["rounds"]
    fig, (ax1, ax3) = plt.subplots(1, 2, figsize=(11, 4.2),
                                   gridspec_kw={"width_ratios": [3, 1.4]})
    x = [r["round"] for r in rounds]
    mib = [r["wire_bytes"] / 2**20 for r in rounds]
    colors = ["tab:blue" if r.get("live", True) else "tab:red" for r in rounds]
    ax1.bar(x, mib, color=colors)
    ax1.set_yscale("log")
    ax1.set_xlabel("round (red: the final round, inside the freeze)")
    ax1.set_ylabel("MiB on the wire (log)")
    for r, m in zip(rounds, mib):
        ax1.annotate(f"{r['changed']} pg", (r["round"], m), ha="center", va="bottom",
                     fontsize=7)
    pred = [(r["round"], r["predicted_downtime"] * 1000) for r in rounds
            if r.get("predicted_downtime") is not None]
    if pred:
        ax2 = ax1.twinx()
        ax2.plot([p[0] for p in pred], [p[1] for p in pred], "k.-", label="predicted downtime")
        if report.get("downtime") is not None:
            ax2.axhline(report["downtime"] * 1000, color="tab:red", ls="--",
                        label="measured downtime")
        ax2.set_ylabel("downtime, ms")
        ax2.set_ylim(bottom=0)
        ax2.legend(loc="upper right", fontsize=8)
    ax1.set_title(f"pid {report.get('pid')} -> {report.get('to')}: {report.get('outcome')}",
                  fontsize=10)
    freeze = report.get("freeze", {})
    steps = [(k, freeze[k] * 1000) for k in FREEZE_STEPS if isinstance(freeze.get(k), float)]
    bottom = 0.0
    for name, ms in steps:
        ax3.bar([0], [ms], bottom=bottom, label=f"{name} {ms:.0f} ms")
        bottom += ms
    ax3.set_xticks([])
    ax3.set_ylabel("ms")
    ax3.set_title("the freeze, step by step", fontsize=10)
    if steps:
        ax3.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
