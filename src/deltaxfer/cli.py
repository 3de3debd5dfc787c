"""deltaxfer: live migration of CRIU-checkpointed processes with page-level deltas."""
from __future__ import annotations

import argparse
import json
import os
import signal
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

    if args.install:    # Debian 13's criu in a private prefix (deltaxfer.criu.install)
        from deltaxfer.criu.install import install
        args.criu = args.criu or install(args.prefix)
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

    _emit(args, diff_dumps(args.old, args.new, exact=args.exact), render_diff)
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


def cmd_serve(args) -> int:
    import asyncio
    import logging

    from deltaxfer import transport
    from deltaxfer.criu.runner import find_criu
    from deltaxfer.keys import ConfigError, server_key, server_tls
    from deltaxfer.serve import serve
    from deltaxfer.store import StoreError

    from deltaxfer.criu.runner import check_criu_config, check_criu_opts

    host, port = _hostport(args.listen, "--listen")
    if os.path.lexists(args.dir) and not os.path.isdir(args.dir):
        raise ConfigError(f"--dir {args.dir} is a file, not a directory: give a directory "
                          "(it is created if missing)")
    if (args.criu_restore_opt or args.criu_config) and not args.restore:
        raise ConfigError("--criu-restore-opt and --criu-config apply to `criu restore`: give "
                          "--restore too")
    restore_opts = check_criu_opts(args.criu_restore_opt, "restore", "--criu-restore-opt")
    restore_config = check_criu_config(args.criu_config, "restore")
    if args.apply_threads is not None and not 1 <= args.apply_threads <= 64:
        raise ConfigError(f"--apply-threads {args.apply_threads}: give 1 to 64 threads")
    key = server_key(args.key_file, args.insecure, host)
    tls = server_tls(args.tls_cert, args.tls_key)
    os.umask(0o077)     # every file the receiver (and its criu) creates is private
    criu = find_criu(args.criu) if args.restore else None
    if criu is not None:
        criu.lazy_server = args.lazy_pages_server
    if args.runc_root and not args.restore:
        raise ConfigError("--runc-root restores containers: give --restore too")
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s deltaxfer serve: %(message)s")

    def on_commit(report):
        if args.json:
            print(json.dumps(report), flush=True)

    def on_sigterm():
        # the sessions in flight end as with a killed receiver (the next start recovers
        # them), but a `criu restore` started early and not fed yet is killed first: one
        # still starting would otherwise wait in its open for a writer that is gone
        from deltaxfer.criu.early import kill_unfed
        kill_unfed()
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)

    async def main_loop():
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, on_sigterm)
        try:
            server = await serve(
                host, port, key=key, directory=args.dir, ssl=tls, criu=criu,
                quota_bytes=args.quota_mib << 20 if args.quota_mib else None,
                session_quota_bytes=args.session_quota_mib << 20 if args.session_quota_mib
                else None, max_sessions=args.max_sessions,
                max_connections=args.max_connections, on_commit=on_commit,
                lazy_restore=not args.no_lazy_restore, insecure=args.insecure,
                parent_linked_final=args.parent_linked_final,
                idle_timeout=args.idle_timeout or None, runc_root=args.runc_root,
                restore_opts=restore_opts, restore_config=restore_config,
                criu_verbosity=args.criu_verbosity,
                early_restore=not args.no_early_restore,
                apply_threads=args.apply_threads, keep_pages=args.keep_pages)
        except StoreError as e:
            raise ConfigError(f"--dir {args.dir}: {e.reason}") from None
        addrs = ", ".join(f"{s.getsockname()[0]}:{s.getsockname()[1]}" for s in server.sockets)
        logging.getLogger("deltaxfer.serve").info(
            "listening on %s, storing in %s%s%s", addrs, args.dir, " (TLS)" if tls else "",
            " WITHOUT A KEY (--insecure: only local processes of this user are admitted)"
            if args.insecure else "")
        async with server:
            await server.serve_forever()

    try:
        transport.run(main_loop(), loop=args.loop)
    except KeyboardInterrupt:
        pass
    return 0


def cmd_send(args) -> int:
    from deltaxfer import transport
    from deltaxfer.keys import client_key, client_tls
    from deltaxfer.send import render, send_dump

    host, port = _hostport(args.to, "--to")
    key = client_key(args.key_file, args.insecure, host)
    report = transport.run(send_dump(
        args.image_dir, host, port, key, args.session,
        ssl=client_tls(args.tls_ca, args.tls_server_name, args.tls_pin),
        restore=args.restore, base=args.base, xor=not args.no_xor,
        compress=not args.no_lz4), loop=args.loop)
    _emit(args, report, render)
    return 0


def cmd_migrate(args) -> int:
    from deltaxfer import transport
    from deltaxfer.criu.runner import find_criu
    from deltaxfer.keys import client_key
    from deltaxfer.migrate import migrate
    from deltaxfer.settings import from_args, options_from

    host, port = _hostport(args.to, "--to")
    tty = sys.stderr.isatty()

    def progress(line):
        if not args.quiet:
            print(line, file=sys.stderr, flush=True)

    # the settings (docs/OPERATIONS.md's table): the same path as the hook's file and
    # environment; each is checked before anything starts
    opts = options_from(*from_args(args), progress=progress if (tty or args.progress) else None)
    key = client_key(args.key_file, args.insecure, host)
    criu = find_criu(args.criu)
    if args.runc is not None or args.pid is None:
        return _migrate_container(args, host, port, key, criu, opts)
    report = transport.run(migrate(args.pid, host, port, key, criu, opts), loop=args.loop).as_dict()
    if opts.report:
        with open(opts.report, "w") as f:
            json.dump(report, f, indent=2)
    _emit(args, report, render_migration)
    # --no-restore: "stored" is what was asked
    return 0 if report["outcome"] == "migrated" or report["outcome"].startswith("stored") else 1


def _migrate_container(args, host, port, key, criu, opts) -> int:
    """`migrate --runc ID [--runc-root DIR]`: a runc container (docs/CONTAINERS.md)."""
    from deltaxfer import transport
    from deltaxfer.keys import ConfigError
    from deltaxfer.migrate_runc import migrate_container
    from deltaxfer.runc import DEFAULT_ROOT
    if args.runc is None:
        raise ConfigError("give the PID of the process tree to migrate, or --runc ID for a "
                          "runc container")
    if args.pid is not None:
        raise ConfigError(f"--runc {args.runc} migrates the container's own process tree: "
                          f"leave out the PID ({args.pid})")
    report = transport.run(migrate_container(args.runc, args.runc_root or DEFAULT_ROOT, host,
                                             port, key, criu, opts, dest_id=args.runc_dest_id),
                           loop=args.loop).as_dict()
    if opts.report:
        with open(opts.report, "w") as f:
            json.dump(report, f, indent=2)
    _emit(args, report, render_migration)
    return 0 if report["outcome"] == "migrated" else 1


def render_migration(r: dict) -> str:
    lines = [f"deltaxfer migrate pid {r['pid']} -> {r['to']}: {r['outcome']}"]
    if r.get("container"):
        c = r["container"]
        lines[0] = (f"deltaxfer migrate runc container {c['id']} (root {c['root']}) -> "
                    f"{r['to']}: {r['outcome']}")
    if r["error"]:
        lines.append(f"  cause: {r['error']}")
    live = [x for x in r["rounds"] if x.get("live")]
    lines.append(f"  {len(live)} live round(s); stopped: {r['stop_reason'] or '-'}")
    if r["downtime"] is not None:
        steps = ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in r["freeze"].items()
                          if isinstance(v, float))
        lines.append(f"  downtime {r['downtime'] * 1000:.0f} ms (predicted "
                     f"{(r['predicted_downtime'] or 0) * 1000:.0f} ms): {steps}")
    lines.append(f"  total {r['total_seconds']:.2f} s, {r['wire_bytes_sent'] / 2**20:.1f} MiB "
                 f"sent, {r['cpu_seconds']:.2f} CPU s")
    if r["restored_pid"]:
        lines.append(f"  running on the destination as pid {r['restored_pid']} "
                     f"(images in {r['destination_path']})")
    if r.get("source_exit_seconds") is not None:
        lines.append(f"  the source was killed and had exited "
                     f"{r['source_exit_seconds'] * 1000:.0f} ms later")
    if r.get("hint"):
        lines.append(f"  next: {r['hint']}")
    if r.get("dump_log"):
        lines.append(f"  criu's dump log: {r['dump_log']}")
    return "\n".join(lines) + "\n"


def cmd_report(args) -> int:
    from deltaxfer.report import load, plot

    report = load(args.file)
    if args.plot:
        plot(report, args.plot)
    _emit(args, report, lambda r: render_migration(r) + (f"  plot: {args.plot}\n" if args.plot else ""))
    return 0


def cmd_hook(args) -> int:
    from deltaxfer.hook import run_hook

    return run_hook()


def _hostport(text: str, what: str) -> tuple[str, int]:
    """HOST:PORT, with a port out of range said as such."""
    from deltaxfer.keys import ConfigError, parse_hostport
    _, sep, port = text.rpartition(":")
    if sep and port.isdigit() and int(port) > 65535:
        raise ConfigError(f"{what} {text}: port {int(port)} is out of range (1-65535)")
    return parse_hostport(text, what=what)


def _transport_reason(e) -> str:
    from deltaxfer.transport import AuthError, PeerError

    if isinstance(e, PeerError):
        return f"the other side refused: {e.reason} ({e.code})"
    if isinstance(e, AuthError):
        return f"authentication failed: {e}"
    return str(e)


def _json_flag(p) -> None:
    p.add_argument("--json", action="store_true", help="machine-readable output")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="deltaxfer", description=__doc__)
    parser.add_argument("--version", action="version", version=f"deltaxfer {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("criu", help="show which criu deltaxfer uses (and run `criu check`)")
    p.add_argument("--criu", metavar="PATH", help="criu binary (default: $DELTAXFER_CRIU, "
                   "the local prefix from `make criu`, then PATH)")
    p.add_argument("--check", action="store_true", help="also run `criu check`")
    p.add_argument("--install", action="store_true", help="as root: unless a criu on PATH "
                   "passes `criu check`, install Debian 13's criu privately under --prefix "
                   "(apt-get download from the mirror of this machine's apt sources)")
    p.add_argument("--prefix", metavar="DIR", help="where --install puts criu (default: "
                   "$DELTAXFER_CRIU_PREFIX, else .local/criu of the checkout or beside the venv)")
    _json_flag(p)
    p.set_defaults(func=cmd_criu)

    p = sub.add_parser("inspect", help="processes, VMAs and pages of a CRIU image directory")
    p.add_argument("dir", help="CRIU image directory (criu dump -D DIR)")
    _json_flag(p)
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("diff", help="what changed between two dumps of the same process, "
                                    "and what a delta transfer would send")
    p.add_argument("old", help="earlier CRIU image directory")
    p.add_argument("new", help="later CRIU image directory")
    p.add_argument("--exact", action="store_true", help="compress every page for the whole-"
                   "image transfer size (default: estimated from a sample, with its error)")
    _json_flag(p)
    p.set_defaults(func=cmd_diff)

    p = sub.add_parser("rewrite", help="rebuild a dump with pagemaps and pages written by "
                                       "deltaxfer (what a migration destination does)")
    p.add_argument("src", help="CRIU image directory")
    p.add_argument("dst", help="new directory to create")
    p.add_argument("--no-coalesce", action="store_true", help="keep CRIU's pagemap entries as they are")
    _json_flag(p)
    p.set_defaults(func=cmd_rewrite)

    p = sub.add_parser("serve", help="receive transfers and migrations (the destination)")
    p.add_argument("--listen", required=True, metavar="ADDR:PORT", help="address to listen on")
    p.add_argument("--key-file", help="pre-shared key: >= 32 random bytes (head -c 32 "
                   "/dev/urandom > key), mode 0600, owned by root or you; required unless "
                   "--insecure")
    p.add_argument("--insecure", action="store_true",
                   help="no key: only on a loopback --listen address, admitting only local "
                        "processes of this daemon's user (clients use the published key, "
                        "see docs/SECURITY.md)")
    p.add_argument("--dir", required=True, help="where sessions and image directories are kept")
    p.add_argument("--restore", action="store_true",
                   help="allow senders to ask for `criu restore` of what they sent")
    p.add_argument("--criu", metavar="PATH", help="criu binary for --restore")
    p.add_argument("--criu-restore-opt", metavar="OPT", action="append", default=[],
                   help="with --restore: one more option for `criu restore` (repeat it; "
                        "e.g. --criu-restore-opt=--ext-unix-sk); options serve sets itself "
                        "(-D, -d, --pidfile, -o, --lazy-pages, ...) are refused")
    p.add_argument("--criu-config", metavar="FILE",
                   help="with --restore: a CRIU configuration file for `criu restore` "
                        "(passed as --config FILE; checked like --criu-restore-opt)")
    p.add_argument("--criu-verbosity", type=int, choices=(1, 2, 3, 4), default=2,
                   metavar="N", help="log level (-vN) of `criu restore` and its lazy-pages "
                                     "daemon in the session's restore.log / lazy-pages.log: "
                                     "2 = errors and warnings (default), 4 = every page")
    p.add_argument("--runc-root", metavar="DIR",
                   help="with --restore: restore runc containers that senders migrate "
                        "(`deltaxfer migrate --runc`) with `runc restore` under this runc "
                        "root, from the bundle path they name (it must exist here, owned "
                        "by root, not writable by others)")
    p.add_argument("--no-lazy-restore", action="store_true",
                   help="restore copying every page in before the process runs (default: "
                        "the process runs at once and its pages are filled from the local "
                        "images as it touches them, the rest in the background)")
    p.add_argument("--lazy-pages-server", choices=("deltaxfer", "criu"), default="deltaxfer",
                   help="who fills a lazy restore's pages: deltaxfer's own server (default: "
                        "faulted pages first, all others copied in the background on all "
                        "cores) or `criu lazy-pages` (one page per fault, one thread)")
    p.add_argument("--apply-threads", type=int, metavar="N", default=None,
                   help="threads per session that apply a whole memory image's frames at "
                        "once (a first round's bulk: lz4, hashing and the pages file's "
                        "writes); default: half the cores, at most 8 (1 on 2 cores: the "
                        "session's worker applies them in arrival order)")
    p.add_argument("--no-early-restore", action="store_true",
                   help="start a migration's `criu restore` at its commit (default: with its "
                        "first round, waiting at its first image, so that CRIU's start-up "
                        "-- 35-45 ms here -- is not part of the freeze)")
    p.add_argument("--keep-pages", action="store_true",
                   help="keep a migrated copy's memory images in its session once it runs "
                        "(default: they are removed then, and deltaxfer's lazy-pages server "
                        "gives their page cache back block by block as it places the pages: "
                        "about one copy of the process's memory here, not two; the session's "
                        "next migration then sends every page)")
    p.add_argument("--parent-linked-final", action="store_true",
                   help="write a migration's final round as a child image over the held "
                        "pages (only the residual is written; restored eagerly)")
    p.add_argument("--quota-mib", type=int, help="disk quota for transfers in flight")
    p.add_argument("--session-quota-mib", type=int,
                   help="disk quota per session (what it keeps plus what it has in flight)")
    p.add_argument("--max-sessions", type=int,
                   help="sessions kept in --dir at most; a new one beyond is refused")
    p.add_argument("--max-connections", type=int, default=8,
                   help="connections at once (default 8); more are refused as busy")
    p.add_argument("--idle-timeout", type=float, default=300, metavar="S",
                   help="drop a session silent for this long (default 300 s; 0: never)")
    p.add_argument("--tls-cert", help="serve TLS with this certificate (PEM)")
    p.add_argument("--tls-key", help="private key of --tls-cert (PEM)")
    p.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop")
    p.add_argument("--json", action="store_true", help="print one JSON line per commit")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("send", help="ship a CRIU image directory to a `deltaxfer serve`")
    p.add_argument("image_dir", help="CRIU image directory")
    p.add_argument("--to", required=True, metavar="HOST:PORT")
    p.add_argument("--key-file", help="pre-shared key: >= 32 random bytes (head -c 32 "
                   "/dev/urandom > key), mode 0600, owned by root or you; required unless "
                   "--insecure")
    p.add_argument("--insecure", action="store_true",
                   help="reach a `serve --insecure` on loopback (its published key)")
    p.add_argument("--session", default="default",
                   help="session name; a later send in the same session sends only the delta")
    p.add_argument("--base", metavar="DIR", help="the dump sent last time, for XOR deltas "
                   "(default: the receiver's record of it, if it is still here)")
    p.add_argument("--restore", action="store_true", help="have the receiver restore it")
    p.add_argument("--no-xor", action="store_true", help="send changed pages whole")
    p.add_argument("--no-lz4", action="store_true", help="do not compress page frames")
    p.add_argument("--tls-ca", help="use TLS; trust only this CA (PEM) for the server's "
                   "certificate, which must name the host of --to (or --tls-server-name)")
    p.add_argument("--tls-server-name", metavar="NAME",
                   help="the name (or IP address) the server's certificate must carry, in "
                        "place of the host of --to")
    p.add_argument("--tls-pin", metavar="sha256:HEX",
                   help="accept only the server certificate with this SHA-256 (of its DER: "
                        "openssl x509 -in CERT -outform DER | sha256sum)")
    p.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop")
    _json_flag(p)
    p.set_defaults(func=cmd_send)

    p = sub.add_parser("migrate", help="live-migrate a running process tree to a `deltaxfer serve`")
    p.add_argument("pid", type=int, nargs="?", help="root of the process tree (not with --runc)")
    p.add_argument("--runc", metavar="ID", help="migrate this runc container (its init and "
                   "tree; `runc checkpoint` freezes it): the destination restores it with "
                   "`runc restore` (serve --runc-root), from the same bundle path")
    p.add_argument("--runc-root", metavar="DIR", help="the runc --root the container runs "
                   "under (default /run/runc)")
    p.add_argument("--runc-dest-id", metavar="ID", help="the container's ID at the "
                   "destination (default: the same); another ID where both runc roots share "
                   "a host, so that the copy gets its own cgroup")
    p.add_argument("--to", required=True, metavar="HOST:PORT")
    p.add_argument("--key-file", help="pre-shared key: >= 32 random bytes (head -c 32 "
                   "/dev/urandom > key), mode 0600, owned by root or you; required unless "
                   "--insecure")
    p.add_argument("--insecure", action="store_true",
                   help="reach a `serve --insecure` on loopback (its published key)")
    p.add_argument("--criu", metavar="PATH", help="criu binary")
    # the migration's settings, from one table (deltaxfer.settings; docs/OPERATIONS.md)
    from deltaxfer.settings import add_arguments as settings_arguments
    settings_arguments(p)
    p.add_argument("--progress", action="store_true", help="per-round lines even without a terminal")
    p.add_argument("--quiet", action="store_true", help="no per-round lines")
    p.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop")
    p.add_argument("--json", action="store_true", help="print the JSON report")
    p.set_defaults(func=cmd_migrate)

    p = sub.add_parser("report", help="summarize (and plot) a migration report")
    p.add_argument("file", help="JSON report of deltaxfer migrate --report")
    p.add_argument("--plot", metavar="OUT.png", help="draw the rounds and the freeze")
    _json_flag(p)
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("hook", help="deltaxfer-hook, the CRIU action script, run by hand (give "
                                    "CRIU the executable: criu dump --action-script "
                                    "PATH/deltaxfer-hook); configured by the environment")
    p.set_defaults(func=cmd_hook)

    from deltaxfer.sessions import add_arguments as sessions_arguments, cmd_sessions
    p = sub.add_parser("sessions", help="list or remove the sessions a `deltaxfer serve` "
                                        "keeps in its --dir")
    sessions_arguments(p, _json_flag)
    p.set_defaults(func=cmd_sessions)
    return parser


def main(argv=None) -> int:
    from deltaxfer.criu.images import ImageError
    from deltaxfer.criu.runner import CriuError
    from deltaxfer.keys import ConfigError
    from deltaxfer.report import ReportError
    from deltaxfer.transport import TransportError
    from deltaxfer.wire import ProtocolError

    args = build_parser().parse_args(argv)
    hint = None
    try:
        return args.func(args)
    except (ImageError, CriuError, ConfigError, ReportError) as e:
        error = str(e)
    except (TransportError, ProtocolError) as e:
        error = _transport_reason(e)
    except FileExistsError as e:
        error = f"{e.filename} already exists"
    except BrokenPipeError:
        return 1
    except OSError as e:
        error, hint = _os_error(args, e)
    _report_error(args, error, hint)
    return 2


def _os_error(args, e: OSError) -> tuple[str, str | None]:
    """An OSError as (what happened, what to do): a failed connection to --to names the
    address and what to check."""
    from deltaxfer.migrate import connect_failure
    to = getattr(args, "to", None)
    if to:
        host, _, port = to.rpartition(":")
        why = connect_failure(host.strip("[]") or "0.0.0.0", int(port), e)
        if why:
            return why
    text = e.strerror or str(e) or type(e).__name__
    return text + (f": {e.filename}" if e.filename else ""), None


def _report_error(args, error: str, hint: str | None) -> None:
    """One line on stderr; with --json, a JSON object on stdout ({"error", "hint"})."""
    if getattr(args, "json", False):
        if hint is None:
            error, sep, rest = error.partition("; ")
            hint = rest if sep else None
        json.dump({"command": args.command, "error": error, "hint": hint}, sys.stdout)
        sys.stdout.write("\n")
        return
    print(f"deltaxfer {args.command}: error: {error}" + (f"; {hint}" if hint else ""),
          file=sys.stderr)
