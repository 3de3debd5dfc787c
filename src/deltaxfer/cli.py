"""deltaxfer: live migration of CRIU-checkpointed processes with page-level deltas."""
from __future__ import annotations

import argparse
import json
import sys

from deltaxfer import __version__


def _emit(args, data: dict, render) -> None:
    if getattr(args, "json", False):
        json.dump(data, sys.stdout, indent=2, sort_keys=False)
        sys.stdout.write("\n")
    else:
        sys.stdout.write(render(data))


def cmd_criu(args) -> int:
    from deltaxfer.criu.runner import find_criu

    criu = find_criu(args.criu)
    info = {"path": criu.path, "version": criu.version_str, "found_by": criu.origin}
    if args.check:
        ok, out = criu.check()
        info["check"] = "passed" if ok else "failed"
        info["check_output"] = out
    _emit(args, info, lambda d: "".join(f"{k}: {v}\n" for k, v in d.items()))
    return 0 if info.get("check", "passed") == "passed" else 1


def cmd_inspect(args) -> int:
    from deltaxfer.inspection import inspect_dump, render_inspect

    _emit(args, inspect_dump(args.dir), render_inspect)
    return 0


def cmd_diff(args) -> int:
    from deltaxfer.inspection import diff_dumps, render_diff

    _emit(args, diff_dumps(args.old, args.new), render_diff)
    return 0


def cmd_rewrite(args) -> int:
    from dataclasses import asdict

    from deltaxfer.criu.dumpdir import rewrite

    report = asdict(rewrite(args.src, args.dst, coalesce=not args.no_coalesce))
    _emit(args, report, lambda d: (
        f"rewrote {d['pagemaps']} pagemap(s): {d['entries_before']} -> {d['entries_after']} "
        f"entries, {d['pages']} pages ({d['bytes'] / 2**20:.1f} MiB); "
        f"{d['copied_files']} other files copied into {args.dst}\n"))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="deltaxfer", description=__doc__)
    parser.add_argument("--version", action="version", version=f"deltaxfer {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("criu", help="show which criu deltaxfer uses (and run `criu check`)")
    p.add_argument("--criu", metavar="PATH", help="criu binary (default: $DELTAXFER_CRIU, "
                   "the local prefix from `make criu`, then PATH)")
    p.add_argument("--check", action="store_true", help="also run `criu check`")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_criu)

    p = sub.add_parser("inspect", help="processes, VMAs and pages of a CRIU image directory")
    p.add_argument("dir", help="CRIU image directory (criu dump -D DIR)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("diff", help="what changed between two dumps of the same process, "
                                    "and what a delta transfer would send")
    p.add_argument("old", help="earlier CRIU image directory")
    p.add_argument("new", help="later CRIU image directory")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_diff)

    p = sub.add_parser("rewrite", help="rebuild a dump with pagemaps and pages written by "
                                       "deltaxfer (what a migration destination does)")
    p.add_argument("src", help="CRIU image directory")
    p.add_argument("dst", help="new directory to create")
    p.add_argument("--no-coalesce", action="store_true", help="keep CRIU's pagemap entries as they are")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_rewrite)
    return parser


def main(argv=None) -> int:
    from deltaxfer.criu.images import ImageError
    from deltaxfer.criu.runner import CriuError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ImageError, CriuError) as e:
        print(f"deltaxfer {args.command}: error: {e}", file=sys.stderr)
        return 2
    except FileExistsError as e:
        print(f"deltaxfer {args.command}: error: {e.filename} already exists", file=sys.stderr)
        return 2
    except BrokenPipeError:
        return 1
