"""A migration's settings: one table, one path into `Options`.

Every way of configuring a migration gives the same flat mapping of settings, under the
same names and in the same units (``downtime_target_ms``, ``max_rounds``, ``xor``, ...):

- `deltaxfer migrate`'s command line (`from_args`: the argparse namespace; the flags are
  made from this table by `add_arguments`),
- `deltaxfer-hook`'s configuration file (``NAME = VALUE`` lines), the CRIU configuration
  files its criu reads (``# deltaxfer: NAME = VALUE`` lines, comments to CRIU) and its
  environment (``DELTAXFER_<NAME>``), read by `hook.hook_config`.

`options_from` checks each value and turns the mapping into `Options`; a bad
value raises `SettingError` naming the setting and where it came from (the flag, the
variable, or the file). `SETTINGS` is the table the CLI's --help and docs/OPERATIONS.md
cite. Only the standard library and `keys` at import: the hook imports this module.
"""
from __future__ import annotations

import math
import shlex
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from deltaxfer.keys import ConfigError

ENV_PREFIX = "DELTAXFER_"


class SettingError(ConfigError):
    """A setting's value cannot be used; the message names the setting, its source and
    what it takes."""


@dataclass(frozen=True)
class Setting:
    name: str              # the key in the mapping, the hook file and DELTAXFER_<NAME>
    type: str              # int, float, bool, choice, str, path, options
    unit: str              # "" where there is none
    default: Any
    help: str
    flag: str              # the `deltaxfer migrate` flag (bool default True: --no-...)
    choices: tuple = ()
    minimum: float | None = None
    metavar: str | None = None
    not_hook: str = ""     # why the hook (inside the operator's criu dump) cannot honour it

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.name.upper()


_CRIU_DECIDES = ("the operator's own `criu dump` runs the freeze: give it to that criu "
                 "(its command line or configuration file)")
SETTINGS: tuple[Setting, ...] = (
    Setting("session", "str", "", None, "session name on the destination (default: unique; "
            "the hook: hook-HOST-PID)", "--session", metavar="NAME"),
    Setting("downtime_target_ms", "float", "ms", 300.0, "freeze when the predicted downtime "
            "is below this", "--downtime-target", minimum=0),
    Setting("max_rounds", "int", "rounds", 10, "live rounds at most", "--max-rounds",
            minimum=0),
    Setting("round_timeout_s", "float", "s", 120.0, "a live round during which less than "
            "1 MiB reaches the destination for this long (a destination that stopped "
            "reading, a link slowed to a crawl) ends the migration before the freeze: the "
            "source runs on. A slow link that keeps moving is waited for",
            "--round-timeout", minimum=1, metavar="SECONDS"),
    Setting("xor", "bool", "", True, "XOR deltas against the destination's copy (off: send "
            "changed pages whole)", "--no-xor"),
    Setting("lz4", "bool", "", True, "compress page frames", "--no-lz4"),
    Setting("xor_cache_mib", "int", "MiB", 64, "bounded cache of sent pages for XOR deltas",
            "--xor-cache-mib", minimum=0),
    Setting("tracking", "choice", "", "auto", "written-page tracking (userfaultfd "
            "write-protect + PAGEMAP_SCAN, Linux >= 6.7): auto = when the kernel can, else "
            "content hashing; on = fail without it; off = content hashing only", "--tracking",
            choices=("auto", "on", "off")),
    Setting("converge", "choice", "", "auto", "when the rounds stop shrinking with the "
            "predicted downtime over the target: throttle = slow the process tree in steps "
            "(a stop/continue duty cycle of 30..95 %, released before the freeze and on "
            "every exit) and go on; postcopy = freeze and resume the copy at once, the pages "
            "written since the last round following it (fetched first when it faults on "
            "them; needs written-page tracking and a `serve --restore` with deltaxfer's "
            "lazy-pages server); auto = throttle, then post-copy if the predicted downtime "
            "is still over the target and post-copy is possible; off = freeze with what is "
            "left", "--converge", choices=("auto", "throttle", "postcopy", "off")),
    Setting("freeze", "choice", "", "auto", "how CRIU dumps in the freeze: lazy (pages stay "
            "in the frozen tasks; needs ~2048 open files per GiB), page-server (a plain dump "
            "whose pages deltaxfer throws away as they come), auto: lazy when it fits",
            "--freeze", not_hook=_CRIU_DECIDES, choices=("auto", "lazy", "page-server")),
    Setting("overlap_dump", "bool", "", True, "send the pages written since the last round "
            "while CRIU dumps the frozen tree (one more round once CRIU has seized every "
            "thread; the final round then carries only what changed during the dump); off: "
            "after the dump. Lazy freezes with written-page tracking, not post-copy",
            "--no-overlap-dump", not_hook="the hook's pre-dump process ends before CRIU "
            "freezes the tree"),
    Setting("grow_pipes", "bool", "", True, "let CRIU's page pipes grow to 4 MiB in the "
            "dump: where root lacks CAP_SYS_RESOURCE, raise fs.pipe-max-size to 4 MiB for the "
            "freeze and put the host's value back after (4x fewer pipes and open files, half "
            "the lazy dump's time at 4-8 GiB; the hook: raised at the end of pre-dump, put "
            "back at post-dump); off: leave the sysctl alone", "--no-grow-pipes"),
    Setting("encoder_threads", "int", "threads", None, "threads that read and encode "
            "windows of pages (default: $DELTAXFER_ENCODER_THREADS, else all cores)",
            "--encoder-threads", metavar="N", minimum=1),
    Setting("restore", "bool", "", True, "restore on the destination (off: stop after the "
            "destination holds the images: the source is left stopped (resume it with "
            "SIGCONT, or restore the images there with `criu restore -D PATH`), unless "
            "kill_source)",
            "--no-restore"),
    Setting("kill_source", "bool", "", False, "with restore off: kill the source once the "
            "destination holds the images", "--kill-source", 
            not_hook="CRIU ends the tasks after a successful post-dump"),
    Setting("criu_opt", "options", "", (), "more options for `criu dump` (repeat the flag; "
            "in the hook's file or variable: shell words, e.g. --ext-unix-sk --file-locks); "
            "options deltaxfer sets itself or that would break it (-t, -D, -o, --action-script, "
            "--lazy-pages, --page-server, --leave-running, ...) are refused", "--criu-opt",
            not_hook=_CRIU_DECIDES, metavar="OPT"),
    Setting("criu_config", "path", "", None, "a CRIU configuration file for `criu dump` "
            "(passed as --config FILE; checked like criu_opt)", "--criu-config",
            not_hook=_CRIU_DECIDES, metavar="FILE"),
    Setting("criu_verbosity", "choice", "", "2", "criu dump's log level (-vN) in dump.log: 2 "
            "= errors and warnings, what explains a failure; 3 adds CRIU's phases; 4 every "
            "page pipe and page (~0.09 s more freeze per GiB here)", "--criu-verbosity",
            not_hook=_CRIU_DECIDES, choices=("1", "2", "3", "4")),
    Setting("log_dir", "path", "", None, "keep criu's dump.log (and the hook's messages) as "
            "DIR/SESSION.dump.log (default: beside report as FILE.dump.log; without either, "
            "not kept)", "--log-dir",
            not_hook="the hook writes to criu's own dump log (criu -o)", metavar="DIR"),
    Setting("report", "path", "", None, "write the JSON report here too (the hook: at "
            "post-dump; pre-dump's rounds go to FILE.pre-dump)", "--report", metavar="FILE"),
    Setting("tls_ca", "path", "", None, "use TLS; trust only this CA (PEM) for the server's "
            "certificate, which must name the destination's host (or tls_server_name)",
            "--tls-ca", metavar="FILE"),
    Setting("tls_server_name", "str", "", None, "the name (or IP address) the server's "
            "certificate must carry, in place of the destination's host",
            "--tls-server-name", metavar="NAME"),
    Setting("tls_pin", "str", "sha256:HEX", None, "accept only the server certificate with "
            "this SHA-256 (of its DER: openssl x509 -in CERT -outform DER | sha256sum)",
            "--tls-pin"),
)
BY_NAME = {s.name: s for s in SETTINGS}

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def _dest(s: Setting) -> str:
    return s.flag.lstrip("-").replace("-", "_")


def add_arguments(parser) -> None:
    """The table's settings as `deltaxfer migrate` flags (help and defaults from it)."""
    for s in SETTINGS:
        unit = f" {s.unit}" if s.unit else ""
        tag = f" [setting {s.name}; hook: {s.env}]"
        if s.type == "bool":
            what = "turn off: " if s.default else ""
            parser.add_argument(s.flag, action="store_true",
                                help=(what + s.help + tag).replace("%", "%%"))
            continue
        default = ""
        if isinstance(s.default, (int, float)):
            default = f" (default {s.default:g}{unit})"
        elif isinstance(s.default, str):
            default = f" (default {s.default})"
        kw = dict(help=(s.help + default + tag).replace("%", "%%"))
        if s.type == "int":
            kw.update(type=int)
        elif s.type == "float":
            kw.update(type=float)
        elif s.type == "choice":
            kw.update(choices=s.choices)
        elif s.type == "options":
            kw.update(action="append", default=[])
        metavar = s.metavar or {"ms": "MS", "MiB": "MIB", "sha256:HEX": "sha256:HEX"}.get(s.unit)
        if metavar:
            kw.update(metavar=metavar)
        parser.add_argument(s.flag, **kw)


def from_args(args) -> tuple[dict, dict]:
    """The argparse namespace of `add_arguments` as (settings, sources): a flag left out
    is left out of the mapping (the table's default applies)."""
    values, sources = {}, {}
    for s in SETTINGS:
        v = getattr(args, _dest(s))
        if s.type == "bool":
            if not v:
                continue
            v = not s.default           # --no-xor: xor off; --kill-source: on
        elif v is None or (s.type == "options" and not v):
            continue
        values[s.name] = v
        sources[s.name] = s.flag
    return values, sources


def _bad(s: Setting, where: str, value, expected: str) -> SettingError:
    return SettingError(f"{where} {value!r}: {s.name} takes {expected}")


def parse(s: Setting, value, where: str):
    """One setting's value, from a string (a file, a variable) or already typed (the
    command line), checked; ``where`` names its source for the error."""
    if s.type == "bool":
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in _TRUE:
            return True
        if text in _FALSE:
            return False
        raise _bad(s, where, value, "yes or no (1/0, true/false, on/off)")
    if s.type in ("int", "float"):
        kind = "an integer" if s.type == "int" else "a number"
        try:
            n = (int if s.type == "int" else float)(
                value.strip() if isinstance(value, str) else value)
        except (TypeError, ValueError):
            n = None
        if n is None or (s.type == "float" and not math.isfinite(n)) or \
                (s.minimum is not None and n < s.minimum):
            at_least = f" >= {s.minimum:g}" if s.minimum is not None else ""
            unit = f" ({s.unit})" if s.unit else ""
            raise _bad(s, where, value, f"{kind}{at_least}{unit}")
        return n
    if s.type == "choice":
        text = str(value).strip()
        if text not in s.choices:
            raise _bad(s, where, value, "one of " + ", ".join(s.choices))
        return text
    if s.type == "options":
        if isinstance(value, str):
            try:
                return shlex.split(value)
            except ValueError as e:
                raise _bad(s, where, value, f"shell words ({e})") from None
        return [str(v) for v in value]
    text = str(value).strip()
    if not text:
        raise _bad(s, where, value, "a non-empty value")
    return text


@dataclass
class Options:
    """What one migration is to do: built only by `options_from` (from flags, the hook's
    file and environment alike); `migrate.Agent` reads it."""
    session: str | None = None
    downtime_target: float = 0.3
    max_rounds: int = 10
    xor: bool = True
    compress: bool = True
    cache_bytes: int = 64 << 20
    restore: bool = True
    ssl: object = None
    work_dir: str | None = None
    freeze_timeout: float | None = None   # default: 15 s + 2 s per GiB of memory
    round_timeout: float = 120.0           # a live round that moves < 1 MiB this long: give up
    tracking: str = "auto"           # written-page tracking: auto (if the kernel can), on, off
    freeze: str = "auto"             # lazy, page-server, or auto (lazy when it fits)
    progress: object = None          # callable(str) for the per-round line
    encoder_threads: int | None = None   # None: $DELTAXFER_ENCODER_THREADS, else all cores
    converge: str = "auto"           # auto, throttle (throttle.py), postcopy (postcopy.py), off
    overlap_dump: bool = True        # a round while CRIU dumps the seized tree (migrate.py)
    grow_pipes: bool = True          # fs.pipe-max-size raised for the dump (criu/pipes.py)
    criu_opts: list = field(default_factory=list)   # the operator's own `criu dump` options
    criu_config: str | None = None   # a CRIU configuration file for the dump (--config)
    criu_verbosity: int = 2          # criu dump's -vN (criu.runner.CRIU_VERBOSITY)
    kill_source: bool = False        # restore=False: kill the source once the images are held
    log_path: str | None = None      # keep criu's dump.log (and the hook's messages) here
    log_dir: str | None = None       # ... or as <session>.dump.log in this directory
    report: str | None = None        # write the JSON report here too (the CLI, the hook)


def options_from(values: Mapping[str, Any], sources: Mapping[str, str] | None = None, *,
                 session_default: str | None = None,
                 progress: Callable[[str], None] | None = None, for_hook: bool = False):
    """`Options` from a flat mapping of settings (names and units of `SETTINGS`;
    strings are parsed, typed values checked). ``sources`` names where each came from
    (a flag, DELTAXFER_NAME, "NAME in FILE") for the errors; an unknown name is refused,
    and so, ``for_hook``, is a setting that a hook inside the operator's `criu dump`
    cannot honour (freeze, criu_opt, ...: that criu decides)."""
    from deltaxfer.criu.runner import CriuError, check_criu_config, check_criu_opts
    from deltaxfer.keys import client_tls
    import os

    sources = sources or {}
    where = {s.name: sources.get(s.name, s.name) for s in SETTINGS}
    unknown = sorted(set(values) - set(BY_NAME))
    if unknown:
        raise SettingError(f"unknown setting {unknown[0]!r} ({sources.get(unknown[0], 'given')}); "
                           "the settings are " + ", ".join(BY_NAME))
    v = {s.name: s.default for s in SETTINGS}
    for name, value in values.items():
        s = BY_NAME[name]
        if value is not None:
            v[name] = parse(s, value, where[name])
        if for_hook and s.not_hook and v[name] not in (s.default, []):
            raise SettingError(f"{where[name]}: {name} is not for deltaxfer-hook: "
                               f"{s.not_hook}; remove it there")
    if v["kill_source"] and v["restore"]:
        raise SettingError(f"{where['kill_source']}: kill_source goes with restore off "
                           f"(--no-restore, restore = no): a migration that restores always "
                           "ends the source once the destination runs its copy")
    if v["log_dir"] and not os.path.isdir(v["log_dir"]):
        raise SettingError(f"{where['log_dir']} {v['log_dir']} is not a directory: create "
                           "it first")
    try:
        criu_opts = check_criu_opts(list(v["criu_opt"]), "dump", flag=where["criu_opt"])
        criu_config = check_criu_config(v["criu_config"], "dump", flag=where["criu_config"])
    except CriuError as e:
        raise SettingError(str(e)) from None
    try:
        ssl = client_tls(v["tls_ca"], v["tls_server_name"], v["tls_pin"])
    except ConfigError as e:
        names = [where[n] for n in ("tls_ca", "tls_server_name", "tls_pin") if v[n]]
        raise SettingError(f"{', '.join(names)}: {e}") from None
    report = v["report"]
    return Options(session=v["session"] or session_default,
                   downtime_target=v["downtime_target_ms"] / 1000,
                   max_rounds=v["max_rounds"], round_timeout=v["round_timeout_s"],
                   xor=v["xor"], compress=v["lz4"],
                   cache_bytes=v["xor_cache_mib"] << 20, restore=v["restore"],
                   tracking=v["tracking"], freeze=v["freeze"], converge=v["converge"],
                   overlap_dump=v["overlap_dump"], grow_pipes=v["grow_pipes"],
                   encoder_threads=v["encoder_threads"], ssl=ssl, progress=progress,
                   criu_opts=criu_opts, criu_config=criu_config,
                   criu_verbosity=int(v["criu_verbosity"]),
                   kill_source=v["kill_source"], log_dir=v["log_dir"],
                   log_path=report + ".dump.log" if report and not v["log_dir"] else None,
                   report=report)


def table_markdown() -> str:
    """The settings as a Markdown table (docs/OPERATIONS.md cites it)."""
    rows = ["| setting | `migrate` flag | hook variable | type | default | meaning |",
            "|---|---|---|---|---|---|"]
    for s in SETTINGS:
        t = "|".join(s.choices) if s.choices else s.type + (f" ({s.unit})" if s.unit else "")
        d = "-" if s.default in (None, ()) else str(s.default).lower() if isinstance(
            s.default, bool) else f"{s.default:g}" if isinstance(s.default, float) else s.default
        env = f"`{s.env}`" if not s.not_hook else f"- ({s.not_hook})"
        cells = [f"`{s.name}`", f"`{s.flag}`", env, t, d, s.help]
        rows.append("| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |")
    return "\n".join(rows) + "\n"
