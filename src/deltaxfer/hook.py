"""The CRIU action script: `criu dump --action-script /path/to/deltaxfer-hook`.

CRIU execs the script's path as it is (no shell, no arguments), with stdin closed and
stdout/stderr going to its log, and tells it what is happening through the environment:
CRTOOLS_SCRIPT_ACTION (pre-dump, post-dump, ...), CRTOOLS_IMAGE_DIR, CRTOOLS_INIT_PID.
The hook is started inside the freeze window, so this module imports only the standard
library: it reports to the migration agent (`deltaxfer migrate`, which started the dump
and set DELTAXFER_AGENT) and exits with the agent's verdict. A non-zero exit at post-dump
makes CRIU resume the tasks: that is the rollback.
"""
import json
import os
import subprocess
import sys

from deltaxfer.hook_env import AGENT_ENV, AGENT_FAILED_ENV, LAZY_PORT_ENV, TIMEOUT_ENV  # noqa: F401


CONFIG_ENV = "DELTAXFER_CONFIG"
DEFAULT_CONFIG = "/etc/deltaxfer/hook.conf"
# the hook's own keys; every migration setting (deltaxfer.settings.SETTINGS) is a key too
_HOOK_KEYS = ("to", "key_file", "criu")


HELP = f"""\
usage: deltaxfer-hook            (run by CRIU, not by hand)

deltaxfer's CRIU action script: `criu dump --action-script PATH` (or `action-script PATH`
in a CRIU configuration file), where PATH is this program. CRIU runs it with no arguments
and says what is happening in the environment: CRTOOLS_SCRIPT_ACTION (pre-dump,
post-dump, pre-restore, post-restore, ...), CRTOOLS_IMAGE_DIR, CRTOOLS_INIT_PID.

- Started by `deltaxfer migrate` ({AGENT_ENV} set): reports to that migration agent and
  exits with its verdict; a non-zero exit at post-dump makes CRIU resume the tasks.
- Started by a plain `criu dump`: migrates the tree itself (live rounds at pre-dump, the
  residual and the restore at post-dump) to the destination set by:
    {CONFIG_ENV}=FILE  a KEY = VALUE file (default {DEFAULT_CONFIG}); it names the criu
                      binary run as root, so it must be a regular file (not a symbolic
                      link) owned by root or by the user running the hook, and not
                      writable by group or others
    keys: to (HOST:PORT of `deltaxfer serve`), key_file (the pre-shared key, mode 0600),
          criu, and the settings of `deltaxfer migrate` a hook can honour, under the
          same names and units (the table: docs/OPERATIONS.md, "Settings"):
@SETTING_KEYS@
    `# deltaxfer: KEY = VALUE` lines in the CRIU configuration files this criu reads
    (default.conf, --config FILE or $CRIU_CONFIG_FILE; comments to CRIU) override the
    file's key: one file can configure the dump and the migration;
    DELTAXFER_<KEY> (DELTAXFER_TO, DELTAXFER_KEY_FILE, DELTAXFER_MAX_ROUNDS, ...)
    overrides both.
- pre-restore, on a directory `deltaxfer serve` received: refuses one that is not a
  completed transfer. post-restore: logs the restored tree.

{TIMEOUT_ENV}: seconds to wait for the agent's verdict (default: no limit).
"""


class HookConfigError(ValueError):
    """The hook's configuration file must not be used; the message says why and how."""


def _read_config_file(path: str) -> str | None:
    """The configuration file's text, None if there is none. It names the criu that the
    hook runs as root: opened without following a symbolic link, and refused unless
    owned by root (or us) and not writable by group or others."""
    if not os.path.lexists(path):
        return None
    from deltaxfer.keys import ConfigError, read_owned_file   # only here: no agent
    try:
        return read_owned_file(path, "hook configuration", private=False).decode(
            "utf-8", "replace")
    except ConfigError as e:
        raise HookConfigError(str(e)) from None


CRIU_CONFIG_MARK = "deltaxfer:"   # `# deltaxfer: KEY = VALUE` in a CRIU configuration file


def _criu_config_settings(path: str, keys) -> list[tuple[int, str, str]]:
    """The `# deltaxfer: KEY = VALUE` lines of a CRIU configuration file (comments to
    CRIU), as (line number, key, value). A file with such lines is held to the hook
    file's rules (it may name the criu run as root): HookConfigError otherwise, as for
    an unknown key; a file without them is CRIU's business alone."""
    try:
        with open(path, "rb") as f:
            plain = f.read().decode("utf-8", "replace")
    except OSError:
        return []
    if CRIU_CONFIG_MARK not in plain:
        return []
    text = _read_config_file(path)     # the checks: owner, mode, no symbolic link
    out = []
    for n, line in enumerate((text or "").splitlines(), 1):
        line = line.strip()
        if not line.startswith("#"):
            continue
        body = line[1:].strip()
        if not body.startswith(CRIU_CONFIG_MARK):
            continue
        body = body[len(CRIU_CONFIG_MARK):].strip()
        if "=" not in body:
            raise HookConfigError(f"{path} line {n}: expected `# {CRIU_CONFIG_MARK} KEY = "
                                  f"VALUE`, got {line[:80]!r}")
        k, v = body.split("=", 1)
        k = k.strip().lower().replace("-", "_")
        if k not in keys:
            raise HookConfigError(f"{path} line {n}: unknown key {k!r}; the keys are "
                                  + ", ".join(keys))
        out.append((n, k, v.strip()))
    return out


def hook_config(env=os.environ, criu_pid: int | None = None) -> dict:
    """Settings for a hook run by a plain `criu dump` (CRIU closes stdin and keeps the
    command line to the script path), from, the later winning:

    1. a KEY=VALUE file ($DELTAXFER_CONFIG, else /etc/deltaxfer/hook.conf; keys: to,
       key_file, criu and every setting of deltaxfer.settings.SETTINGS);
    2. the CRIU configuration files the criu running the hook reads (``criu_pid``, default
       our parent; in CRIU's order, so a dump's own --config comes last), in lines
       ``# deltaxfer: KEY = VALUE`` that CRIU skips as comments: one file can configure
       both the dump and where it goes;
    3. DELTAXFER_<KEY> variables.

    Values stay strings (criu_opt: shell words, a repeated key's lines joined), checked by
    settings.options_from; "_sources" says where each came from ("KEY in FILE" or the
    variable), for its errors. An unknown key raises HookConfigError, as does a file
    with settings that is a symbolic link, owned by another user or writable by group or
    others; a missing file is no file."""
    from deltaxfer.settings import BY_NAME, ENV_PREFIX   # only here: no agent
    keys = _HOOK_KEYS + tuple(BY_NAME)
    path = env.get(CONFIG_ENV, DEFAULT_CONFIG)
    out, sources = {"_file": path}, {}

    def put(k: str, v: str, where: str) -> None:
        if k == "criu_opt" and sources.get(k) == f"{k} in {where}":
            out[k] = f"{out[k]} {v}"           # repeated in one file: more shell words
        else:
            out[k] = v
        sources[k] = f"{k} in {where}"

    for n, line in enumerate((_read_config_file(path) or "").splitlines(), 1):
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            k, v = line.split("=", 1)
            k = k.strip().lower().replace("-", "_")
            if k not in keys:
                raise HookConfigError(f"{path} line {n}: unknown key {k!r}; the keys are "
                                      + ", ".join(keys))
            put(k, v.strip(), path)
    argv = _criu_dump_argv(os.getppid() if criu_pid is None else criu_pid)
    for cpath in criu_config_files(argv, env):
        for _, k, v in _criu_config_settings(cpath, keys):
            put(k, v, f"{cpath} (CRIU configuration)")
    for k in keys:
        v = env.get(ENV_PREFIX + k.upper())
        if v:
            out[k] = v
            sources[k] = ENV_PREFIX + k.upper()
    out["_sources"] = sources
    return out


def check_received_images(image_dir: str) -> str | None:
    """pre-restore, for operators who run `criu restore` themselves on a directory that
    `deltaxfer serve` received: refuse one that is not a completed transfer. Returns the
    reason to refuse, or None. Directories that deltaxfer did not write pass."""
    real = os.path.realpath(image_dir)
    session = os.path.dirname(real)
    meta_path = os.path.join(session, "meta.json")
    if not os.path.exists(meta_path) or os.path.basename(real) not in ("images", "images.tmp"):
        return None
    try:
        with open(meta_path) as f:
            meta = json.load(f)
    except (OSError, ValueError) as e:
        return f"cannot read {meta_path}: {e}"
    if os.path.basename(real) != "images" or meta.get("committed") != real:
        return (f"{real} is not a completed deltaxfer transfer (the session's last commit is "
                f"{meta.get('committed')}); restoring it could start a half-received process")
    if os.path.exists(os.path.join(session, "held", ".dirty")):
        return f"{real}: the receiver died while writing this session's pages"
    return None


def _config_leave_state(path: str) -> str | None:
    """The last leave-running / leave-stopped line of a CRIU configuration file."""
    state = None
    try:
        with open(path, errors="replace") as f:
            for line in f:
                words = line.split("#", 1)[0].split()
                if words:
                    state = _LEAVE.get(words[0].lstrip("-"), state)
    except OSError:
        pass
    return state


_LEAVE = {"leave-running": "running", "R": "running", "leave-stopped": "stopped", "s": "stopped"}


def _criu_dump_argv(criu_pid: int) -> list[str] | None:
    """The arguments after `dump` of the criu that runs this hook, None if it is not a
    `criu dump` (or cannot be read)."""
    try:
        with open(f"/proc/{criu_pid}/cmdline", "rb") as f:
            argv = [w.decode(errors="replace") for w in f.read().split(b"\0") if w]
    except OSError:
        return None
    if "dump" not in argv:
        return None
    return argv[argv.index("dump") + 1:]


def criu_config_files(argv: list[str] | None, env=os.environ) -> list[str]:
    """The CRIU configuration files the criu with these dump arguments reads, in CRIU's
    order (a later file's word wins): the default files (unless --no-default-config),
    then --config FILE (else $CRIU_CONFIG_FILE). For a criu not seen (None: run over RPC,
    as runc runs it), only $CRIU_CONFIG_FILE."""
    if argv is None:
        return [env["CRIU_CONFIG_FILE"]] if env.get("CRIU_CONFIG_FILE") else []
    config, defaults = None, True
    for i, w in enumerate(argv):
        if w == "--no-default-config":
            defaults = False
        elif w == "--config" and i + 1 < len(argv):
            config = argv[i + 1]
        elif w.startswith("--config="):
            config = w.split("=", 1)[1]
    files = []
    if defaults:
        files += ["/etc/criu/default.conf"]
        if env.get("HOME"):
            files.append(os.path.join(env["HOME"], ".criu", "default.conf"))
    config = config or env.get("CRIU_CONFIG_FILE")
    if config:
        files.append(config)
    return files


def dump_leaves(criu_pid: int, env=os.environ) -> tuple[str | None, str]:
    """What the `criu dump` that runs this hook (its parent, ``criu_pid``) does with the
    tasks afterwards -- "running" (--leave-running), "stopped", or None (killed, CRIU's
    default, or unknown) -- and where that was said. CRIU does not tell action scripts, so
    it is read as CRIU reads it, the last word winning: the configuration files
    (criu_config_files), then the command line. A criu run over RPC (`criu swrk`, runc)
    is not seen here."""
    argv = _criu_dump_argv(criu_pid)
    if argv is None:
        return None, "not a criu dump"
    cmdline = None
    for w in argv:
        if w.startswith("--") and w[2:] in _LEAVE:
            cmdline = _LEAVE[w[2:]]
        elif w in ("-R", "-s"):
            cmdline = _LEAVE[w[1:]]
    state, where = None, ""
    for path in criu_config_files(argv, env):
        s = _config_leave_state(path)
        if s:
            state, where = s, f"the CRIU configuration file {path}"
    if cmdline:
        state, where = cmdline, "criu's command line"
    return state, where


def refuse_leave_running(action: str, env=os.environ) -> str | None:
    """pre-dump / post-dump: the reason to refuse a dump that leaves the tasks running
    (the source would run on beside the copy the destination restores), or None."""
    state, where = dump_leaves(os.getppid(), env)
    if state != "running":
        return None
    return (f"{action} refused: this criu dump leaves the tasks running (--leave-running, in "
            f"{where}): once the destination restores its copy the process would run on both "
            "hosts; dump with --leave-stopped (or without --leave-running) instead")


def _fill_std_fds() -> None:
    """CRIU starts the script with stdin closed: the first socket we open would become fd
    0, which libuv (uvloop) refuses with an assertion. Put /dev/null there first."""
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            os.open(os.devnull, os.O_RDWR)   # the lowest free descriptor: this one


def run_hook(env=os.environ) -> int:
    _fill_std_fds()
    action = env.get("CRTOOLS_SCRIPT_ACTION", "")
    if action == "pre-restore":
        reason = check_received_images(env.get("CRTOOLS_IMAGE_DIR", ""))
        if reason:
            print(f"deltaxfer hook: pre-restore refused: {reason}", file=sys.stderr)
            return 1
        return 0
    if action == "post-restore":
        print(f"deltaxfer hook: post-restore: restored tree {env.get('CRTOOLS_INIT_PID', '?')} "
              f"from {os.path.realpath(env.get('CRTOOLS_IMAGE_DIR', ''))}", file=sys.stderr)
        return 0
    if action in ("pre-dump", "post-dump"):
        reason = refuse_leave_running(action, env)
        if reason:
            print(f"deltaxfer hook: {reason}; criu resumes the tasks", file=sys.stderr)
            return 1
    agent = env.get(AGENT_ENV)
    if not agent:
        try:
            config = hook_config(env)
        except HookConfigError as e:
            print(f"deltaxfer hook: {action}: {e}", file=sys.stderr)
            return 1 if action == "post-dump" else 0
        if config.get("to"):
            if action not in ("pre-dump", "post-dump"):
                return 0
            from deltaxfer.migrate import run_standalone_hook   # heavy imports: only here
            return run_standalone_hook(action, config, env)
        print(f"deltaxfer hook: {action}: no {AGENT_ENV} (a dump started by `deltaxfer "
              f"migrate`) and no destination (DELTAXFER_TO or 'to' in {config['_file']}), "
              "so there is nowhere to migrate to", file=sys.stderr)
        return 1 if action == "post-dump" else 0
    if action not in ("pre-dump", "post-dump"):
        return 0
    try:
        if env.get(AGENT_FAILED_ENV):
            # hook_agent.py asked and got no answer: asking again could run post-dump twice
            raise ConnectionError(env[AGENT_FAILED_ENV])
        from deltaxfer.hook_agent import ask_agent   # the one exchange with the agent
        reply = ask_agent(agent, action, env)
    except (OSError, ValueError) as e:
        # The agent died (or hangs past its own deadline): nobody will end the lazy dump
        # that CRIU starts after this hook, so arrange for it, and let CRIU resume.
        reply = {"ok": False, "reason": str(e) if env.get(AGENT_FAILED_ENV)
                 else f"the migration agent is gone ({e})"}
        if action == "post-dump" and env.get(LAZY_PORT_ENV):
            _end_lazy_dump_later(int(env[LAZY_PORT_ENV]))
        # the agent raised fs.pipe-max-size for this dump and cannot put it back; its
        # hold died with it, so this restores the host's value unless another migration
        # holds it (criu/pipes.py)
        from deltaxfer.criu.pipes import PipeSizeRaise
        PipeSizeRaise().release(held_elsewhere=True)
    if not reply.get("ok"):
        print(f"deltaxfer hook: {action} failed: {reply.get('reason')}; criu resumes the "
              "tasks", file=sys.stderr)
        return 1
    return 0


def _end_lazy_dump_later(port: int) -> None:
    """The agent died: once this hook has exited and CRIU listens for lazy pages, close
    that listener so CRIU resumes the tasks instead of waiting for a client forever."""
    code = ("from deltaxfer.criu.lazy import end_lazy_dump; "
            "from deltaxfer.criu.runner import find_criu; "
            f"end_lazy_dump('127.0.0.1', {port}, find_criu().version, timeout=600)")
    subprocess.Popen([sys.executable, "-c", code], start_new_session=True,
                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                     stderr=subprocess.DEVNULL)


def _setting_keys() -> str:
    """The settings the hook takes, from the table itself (never a list to keep in step)."""
    import textwrap
    from deltaxfer.settings import SETTINGS
    return textwrap.fill(", ".join(s.name for s in SETTINGS if not s.not_hook), width=88,
                         initial_indent=" " * 10, subsequent_indent=" " * 10)


def main(argv=None) -> int:
    """`deltaxfer-hook`: CRIU runs it without arguments; --help says what it is."""
    args = sys.argv[1:] if argv is None else list(argv)
    if args in (["--help"], ["-h"]):
        sys.stdout.write(HELP.replace("@SETTING_KEYS@", _setting_keys()))
        sys.exit(0)
    if args:
        print(f"deltaxfer-hook: unexpected arguments {args!r}: CRIU runs this action script "
              "without arguments (see deltaxfer-hook --help)", file=sys.stderr)
        sys.exit(2)
    if not os.environ.get("CRTOOLS_SCRIPT_ACTION"):
        print("deltaxfer-hook: CRTOOLS_SCRIPT_ACTION is not set: this is CRIU's action "
              "script, run by `criu dump --action-script`, not by hand (see deltaxfer-hook "
              "--help)", file=sys.stderr)
        sys.exit(2)
    sys.exit(run_hook())


if __name__ == "__main__":
    main()
