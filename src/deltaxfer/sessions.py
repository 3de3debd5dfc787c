"""`deltaxfer sessions list|rm`: the sessions a `deltaxfer serve` keeps in its --dir.

Reads the layout the store writes (see deltaxfer.store's module docstring): one
directory per session, named by the session rule (``wire.check_session_name``), holding
``meta.json`` (round, source, committed path), ``held/`` (the pages of the last
completed round), ``images/`` (the restorable image directory of the last commit; after a
restore also criu's ``restore.log``, ``lazy-pages.log`` and ``restored.pid``) and, while a
transfer is in flight or after the daemon died in one, ``*.tmp``, ``images.old``,
``held/.dirty`` or a ``restoring`` record in meta.json.

Nothing here follows a symbolic link: a session directory that is a link is not a
session, sizes and times are taken with lstat, and removal is an rmtree that unlinks
links instead of descending into them. A session is removed by first renaming it out of
the session namespace (to a name starting with "."; serve ignores such names), then
deleting it, so a serve that looks for it meanwhile finds no half-deleted session.
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import stat
import sys
import time

from deltaxfer.core import procmem
from deltaxfer.keys import ConfigError

# A session modified this recently may belong to a transfer in progress: between two
# live rounds of a migration (the source reading memory) nothing in it is temporary.
# serve drops a silent session after --idle-timeout, 300 s by default.
RECENT_SECONDS = 300.0


def _is_session_name(name: str) -> bool:
    from deltaxfer.store import is_session_name     # the one session name rule (wire's)
    return is_session_name(name)


def _check_root(root: str) -> str:
    root = os.path.abspath(root)
    try:
        st = os.lstat(root)
    except OSError as e:
        raise ConfigError(f"--dir {root}: {e.strerror}") from None
    if stat.S_ISLNK(st.st_mode):
        raise ConfigError(f"--dir {root} is a symbolic link; name the directory itself")
    if not stat.S_ISDIR(st.st_mode):
        raise ConfigError(f"--dir {root} is not a directory")
    if st.st_uid != os.geteuid():
        raise ConfigError(f"--dir {root} belongs to uid {st.st_uid}, not to uid "
                          f"{os.geteuid()} (who runs this); run as the user of serve")
    return root


def _walk(path: str):
    """(bytes allocated, hard links counted once; newest mtime) of a tree, by lstat."""
    seen, total, newest = set(), 0, os.lstat(path).st_mtime
    for dirpath, dirnames, filenames in os.walk(path):      # never follows links
        for n in dirnames + filenames:
            try:
                st = os.lstat(os.path.join(dirpath, n))
            except OSError:
                continue
            newest = max(newest, st.st_mtime)
            if not stat.S_ISDIR(st.st_mode) and (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                total += st.st_blocks * 512
    return total, newest


def _read_meta(path: str) -> dict:
    try:
        fd = os.open(os.path.join(path, "meta.json"), os.O_RDONLY | os.O_NOFOLLOW)
        with os.fdopen(fd) as f:
            meta = json.load(f)
        return meta if isinstance(meta, dict) else {}
    except (OSError, ValueError):
        return {}


def _restored(images: str) -> tuple[int | None, bool | None]:
    """The pid criu restored from this image directory (its pidfile), and whether that
    process still runs: a process with that pid that started after the pidfile was
    written is another one (the pid was reused)."""
    pidfile = os.path.join(images, "restored.pid")
    try:
        st = os.lstat(pidfile)
        if not stat.S_ISREG(st.st_mode):
            return None, None
        fd = os.open(pidfile, os.O_RDONLY | os.O_NOFOLLOW)
        with os.fdopen(fd) as f:
            pid = int(f.read(32).strip())
    except (OSError, ValueError):
        return None, None
    started = procmem.started_at(pid)
    return pid, started is not None and started <= st.st_mtime + 2.0


def unfinished(path: str, meta: dict) -> list[str]:
    """Why this session is not at rest (empty when it is)."""
    why = []
    for n in sorted(os.listdir(path)):
        if n.endswith(".tmp") or n == "images.old":
            why.append(f"{n} (a transfer in flight, or serve died in one)")
    if os.path.lexists(os.path.join(path, "held", ".dirty")):
        why.append("held/.dirty (a round was being written in place)")
    if meta.get("restoring"):
        why.append("a restore waiting for the source's RESUME")
    images = os.path.join(path, "images")
    if os.path.isdir(images) and not os.path.islink(images):
        pids = procmem.lazy_pages_daemons(images)
        if pids:
            why.append(f"criu lazy-pages (pid {', '.join(map(str, pids))}) still serves "
                       "pages from images/")
    return why


def describe(root: str, name: str, now: float | None = None) -> dict:
    path = os.path.join(root, name)
    meta = _read_meta(path)
    size, modified = _walk(path)
    images = os.path.join(path, "images")
    committed = os.path.isdir(images) and not os.path.islink(images)
    pid, running = _restored(images) if committed else (None, None)
    now = time.time() if now is None else now
    return {
        "name": name,
        "round": meta.get("round") if isinstance(meta.get("round"), int) else None,
        "source": meta.get("source") or None,
        "bytes": size,
        "modified": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(modified)),
        "age_seconds": round(max(0.0, now - modified), 1),
        "committed": committed,
        "images": images if committed else None,
        "restored": pid is not None,
        "restored_pid": pid,
        "restored_running": running,
        "unfinished": unfinished(path, meta),
    }


def session_names(root: str) -> list[str]:
    """The session directories of a serve --dir: names matching the session rule that
    are directories, not links."""
    out = []
    for n in sorted(os.listdir(root)):
        if not _is_session_name(n):
            continue
        try:
            st = os.lstat(os.path.join(root, n))
        except OSError:
            continue
        if stat.S_ISDIR(st.st_mode):
            out.append(n)
    return out


def list_sessions(root: str) -> list[dict]:
    root = _check_root(root)
    now = time.time()
    out = []
    for n in session_names(root):
        try:
            out.append(describe(root, n, now))
        except FileNotFoundError:    # removed meanwhile
            continue
    return out


def remove_sessions(root: str, names=(), *, older_than_days: float | None = None,
                    force: bool = False, dry_run: bool = False) -> dict:
    """Remove the named sessions, or every session older than ``older_than_days`` (by its
    newest modification). Refused, unless ``force``: a session with unfinished state or
    modified in the last RECENT_SECONDS (it may be in use). Never: a name that is not a
    session name, a link, not a directory."""
    root = _check_root(root)
    now = time.time()
    removed, refused, freed = [], [], 0
    if older_than_days is not None:
        cutoff = older_than_days * 86400.0
        candidates = [n for n in session_names(root)
                      if now - _walk(os.path.join(root, n))[1] >= cutoff]
    else:
        candidates = list(dict.fromkeys(names))
    for name in candidates:
        path = os.path.join(root, name)
        if not _is_session_name(name):
            refused.append({"name": name, "reason": "not a session name (1-64 of "
                            "[A-Za-z0-9._-], starting with a letter or digit)"})
            continue
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            refused.append({"name": name, "reason": f"no such session in {root}"})
            continue
        if not stat.S_ISDIR(st.st_mode):
            refused.append({"name": name, "reason": "not a directory (a link or a file): "
                            "not a session; left alone"})
            continue
        info = describe(root, name, now)
        if not force:
            if info["unfinished"]:
                refused.append({"name": name, "reason": "unfinished: " +
                                "; ".join(info["unfinished"]) + " (--force to remove anyway)"})
                continue
            if info["age_seconds"] < RECENT_SECONDS:
                refused.append({"name": name, "reason": f"modified {info['age_seconds']:.0f} s "
                                "ago: it may belong to a transfer in progress (--force to "
                                "remove anyway)"})
                continue
        if not dry_run:
            doomed = os.path.join(root, f".removing-{name}-{secrets.token_hex(4)}")
            os.rename(path, doomed)             # out of serve's sight, atomically
            shutil.rmtree(doomed)               # unlinks links, never follows them
        removed.append(name)
        freed += info["bytes"]
    return {"dir": root, "removed": removed, "refused": refused, "bytes_freed": freed,
            "dry_run": dry_run}


# -- the command ---------------------------------------------------------------------------

def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def render_list(sessions: list[dict]) -> str:
    if not sessions:
        return "no sessions\n"
    rows = [("SESSION", "ROUND", "SIZE", "MODIFIED", "STATE", "SOURCE")]
    for s in sessions:
        if s["unfinished"]:
            state = "unfinished"
        elif s["restored"]:
            state = f"restored pid {s['restored_pid']} " + (
                "(running)" if s["restored_running"] else "(gone)")
        elif s["committed"]:
            state = "committed"
        else:
            state = "held only (not committed)"
        rows.append((s["name"], str(s["round"] if s["round"] is not None else "-"),
                     _size(s["bytes"]), s["modified"], state, s["source"] or "-"))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r[:5], widths)) + "  " + r[5] for r in rows]
    for s in sessions:
        for why in s["unfinished"]:
            lines.append(f"{s['name']}: unfinished: {why}")
    return "\n".join(lines) + "\n"


def render_rm(r: dict) -> str:
    verb = "would remove" if r["dry_run"] else "removed"
    lines = [f"{verb} {n}" for n in r["removed"]]
    lines.append(f"{verb} {len(r['removed'])} session(s), {_size(r['bytes_freed'])}")
    return "\n".join(lines) + "\n"


def cmd_sessions(args) -> int:
    """`deltaxfer sessions list|rm` (wired in deltaxfer.cli)."""
    if args.action == "list":
        sessions = list_sessions(args.dir)
        if args.json:
            json.dump({"dir": os.path.abspath(args.dir), "sessions": sessions}, sys.stdout,
                      indent=2)
            sys.stdout.write("\n")
        else:
            sys.stdout.write(render_list(sessions))
        return 0
    if bool(args.names) == (args.older_than is not None):
        raise ConfigError("name the sessions to remove, or give --older-than DAYS (not both)")
    if args.older_than is not None and args.older_than < 0:
        raise ConfigError("--older-than must be 0 or more days")
    r = remove_sessions(args.dir, args.names, older_than_days=args.older_than,
                        force=args.force, dry_run=args.dry_run)
    if args.json:
        json.dump(r, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        sys.stdout.write(render_rm(r))
    for x in r["refused"]:
        print(f"deltaxfer sessions rm: refused {x['name']}: {x['reason']}", file=sys.stderr)
    return 1 if r["refused"] else 0


def add_arguments(p, json_flag) -> None:
    """The `sessions` subcommand's arguments (deltaxfer.cli calls this)."""
    sub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    q = sub.add_parser("list", help="each session: round, source, size on disk, last "
                                    "modified, committed/restored, unfinished state")
    q.add_argument("--dir", required=True, help="the serve --dir")
    json_flag(q)
    q = sub.add_parser("rm", help="remove sessions (refuses one with unfinished state or "
                                  f"modified in the last {RECENT_SECONDS:.0f} s unless --force)")
    q.add_argument("names", nargs="*", metavar="NAME", help="sessions to remove")
    q.add_argument("--dir", required=True, help="the serve --dir")
    q.add_argument("--older-than", type=float, metavar="DAYS",
                   help="remove every session not modified for this many days")
    q.add_argument("--force", action="store_true",
                   help="remove even sessions with unfinished state or recent changes")
    q.add_argument("--dry-run", action="store_true", help="say what would be removed")
    json_flag(q)
